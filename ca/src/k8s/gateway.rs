//! The Gateway API resources Ward reads, from the `gateway-api` crate (the kube-rs project's
//! bindings, generated from the Gateway API's own CRDs; experimental channel, a superset of
//! standard), and the wire shapes of what Ward writes back: route parent refs and status
//! conditions (`metav1.Condition`). The status types are kept here as plain serde types so the
//! route set can compare and carry them across route kinds; they serialize to exactly the
//! Gateway API's status schema.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use gateway_api::experimental::gatewayclasses::{self, GatewayClass};
pub use gateway_api::experimental::gateways::{self, Gateway};
pub use gateway_api::experimental::grpcroutes::{self, GrpcRoute};
pub use gateway_api::experimental::httproutes::{self, HttpRoute};

/// The Gateway API group.
pub const GROUP: &str = "gateway.networking.k8s.io";

/// A reference to a parent (a Gateway, or for mesh routes a Service).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ParentRef {
    /// API group; `""` (core) for a Service. Default `gateway.networking.k8s.io`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Kind; default `Gateway`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Namespace; default the route's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Name.
    pub name: String,
    /// Section (listener) name; not used for Services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
    /// Port of the parent Service the route applies to; all ports when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
}

/// A route's status: one entry per parent per controller.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteStatus {
    /// Per parent.
    #[serde(default)]
    pub parents: Vec<RouteParentStatus>,
}

/// The status of a route for one parent, written by one controller.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteParentStatus {
    /// The parent, as the route names it.
    pub parent_ref: ParentRef,
    /// Who wrote this entry.
    pub controller_name: String,
    /// `Accepted`, `ResolvedRefs`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// A status condition (`metav1.Condition`).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Type.
    #[serde(rename = "type")]
    pub kind: String,
    /// `True` or `False`.
    pub status: String,
    /// CamelCase reason.
    pub reason: String,
    /// Human message.
    #[serde(default)]
    pub message: String,
    /// The generation it describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When the status last changed (RFC 3339).
    #[serde(default)]
    pub last_transition_time: String,
}

impl Condition {
    /// Condition `kind` for `res` (`ok` is the reason when it holds), keeping the transition
    /// time of `previous` when the status did not change; `now` otherwise.
    pub fn next(
        kind: &str,
        res: &Result<(), super::routes::Why>,
        ok: &str,
        previous: &[Condition],
        generation: Option<i64>,
        now: &str,
    ) -> Condition {
        let (status, reason, message) = match res {
            Ok(()) => ("True", ok.to_owned(), String::new()),
            Err(w) => ("False", w.reason.to_owned(), w.message.clone()),
        };
        let time = match previous.iter().find(|c| c.kind == kind) {
            Some(c) if c.status == status => c.last_transition_time.clone(),
            _ => now.to_owned(),
        };
        Condition {
            kind: kind.to_owned(),
            status: status.to_owned(),
            reason,
            message,
            observed_generation: generation,
            last_transition_time: time,
        }
    }
}
