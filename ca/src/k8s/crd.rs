//! Ward's custom resources: `IdentityPolicy` (which pods get which SPIFFE ID),
//! `AuthorizationPolicy` (who may call whom) and `ExternalService` (what outside the mesh who
//! may reach), all cluster-scoped, group `ward.dev`.
//! `ward-ca crds` prints their definitions (with OpenAPI v3 schemas) for the Helm chart.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Which pods get which SPIFFE ID.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "ward.dev",
    version = "v1alpha1",
    kind = "IdentityPolicy",
    status = "IdentityPolicyStatus",
    shortname = "wip",
    printcolumn = r#"{"name":"Pods","type":"integer","jsonPath":".status.podsSelected"}"#,
    printcolumn = r#"{"name":"Failures","type":"integer","jsonPath":".status.renderFailureCount"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct IdentityPolicySpec {
    /// SPIFFE ID template, e.g. `spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}`.
    /// Placeholders: `{trust_domain}`, `{namespace}`, `{service_account}`, `{pod_name}`,
    /// `{pod_uid}`, `{node_name}`, `{pod_label:<key>}`, `{namespace_label:<key>}`.
    pub spiffe_id_template: String,
    /// Pods this policy applies to (all when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    /// Namespaces this policy applies to (all when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// DNS name templates (same placeholders).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_name_templates: Vec<String>,
    /// X.509-SVID TTL, e.g. `1h` (default: the CA's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509_svid_ttl: Option<String>,
    /// JWT-SVID TTL, e.g. `5m` (default: the CA's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_svid_ttl: Option<String>,
}

/// What the controller did with a policy.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IdentityPolicyStatus {
    /// Pods this policy gave an identity.
    pub pods_selected: u32,
    /// Pods for which the templates did not render a valid identity.
    pub render_failure_count: u32,
    /// The first few of those failures.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub render_failures: Vec<RenderFailure>,
}

/// One pod the templates failed for.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RenderFailure {
    /// `namespace/name` of the pod.
    pub pod: String,
    /// What went wrong.
    pub error: String,
}

/// Who may call which workload (see `ward_spiffe::policy` for the semantics).
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "ward.dev",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    shortname = "wap"
)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// SPIFFE ID patterns of the destination workloads.
    pub target_spiffe_ids: Vec<String>,
    /// `ALLOW`, `DENY` or `AUDIT`.
    pub action: String,
    /// Rules; none matches nothing.
    #[serde(default)]
    pub rules: Vec<CrdRule>,
}

/// A rule.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CrdRule {
    /// Sources; none matches every source.
    #[serde(default)]
    pub from: Vec<CrdSource>,
    /// Operations; none matches every operation.
    #[serde(default)]
    pub to: Vec<CrdOperation>,
}

/// A source.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CrdSource {
    /// SPIFFE ID patterns.
    #[serde(default)]
    pub principals: Vec<String>,
    /// Excluded SPIFFE ID patterns.
    #[serde(default)]
    pub not_principals: Vec<String>,
    /// Trust domains.
    #[serde(default)]
    pub trust_domains: Vec<String>,
    /// Excluded trust domains.
    #[serde(default)]
    pub not_trust_domains: Vec<String>,
    /// Namespaces.
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Excluded namespaces.
    #[serde(default)]
    pub not_namespaces: Vec<String>,
}

/// An operation.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CrdOperation {
    /// HTTP methods.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Excluded methods.
    #[serde(default)]
    pub not_methods: Vec<String>,
    /// Path patterns.
    #[serde(default)]
    pub paths: Vec<String>,
    /// Excluded path patterns.
    #[serde(default)]
    pub not_paths: Vec<String>,
    /// Ports.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Excluded ports.
    #[serde(default)]
    pub not_ports: Vec<u16>,
}

impl From<&CrdSource> for ward_spiffe::policy::Source {
    fn from(s: &CrdSource) -> Self {
        Self {
            principals: s.principals.clone(),
            not_principals: s.not_principals.clone(),
            trust_domains: s.trust_domains.clone(),
            not_trust_domains: s.not_trust_domains.clone(),
            namespaces: s.namespaces.clone(),
            not_namespaces: s.not_namespaces.clone(),
        }
    }
}

impl AuthorizationPolicy {
    /// The policy this resource describes; named after the resource.
    pub fn to_policy(&self) -> Result<ward_spiffe::policy::Policy, String> {
        use ward_spiffe::policy::{Action, Operation, Policy, Rule, Source, Target};
        let name = self.metadata.name.clone().ok_or("resource has no name")?;
        let action = match self.spec.action.to_ascii_uppercase().as_str() {
            "ALLOW" => Action::Allow,
            "DENY" => Action::Deny,
            "AUDIT" => Action::Audit,
            other => return Err(format!("action {other:?} is not ALLOW, DENY or AUDIT")),
        };
        Ok(Policy {
            name,
            target: Target {
                spiffe_ids: self.spec.target_spiffe_ids.clone(),
            },
            action,
            rules: self
                .spec
                .rules
                .iter()
                .map(|r| Rule {
                    from: r.from.iter().map(Source::from).collect(),
                    to: r
                        .to
                        .iter()
                        .map(|o| Operation {
                            methods: o.methods.clone(),
                            not_methods: o.not_methods.clone(),
                            paths: o.paths.clone(),
                            not_paths: o.not_paths.clone(),
                            ports: o.ports.clone(),
                            not_ports: o.not_ports.clone(),
                        })
                        .collect(),
                })
                .collect(),
        })
    }
}

/// A destination outside the mesh and who may reach it (see `ward_spiffe::egress` for the
/// semantics); named after the resource.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "ward.dev",
    version = "v1alpha1",
    kind = "ExternalService",
    status = "ExternalServiceStatus",
    shortname = "wes",
    printcolumn = r#"{"name":"Protocol","type":"string","jsonPath":".spec.protocol"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ExternalServiceSpec {
    /// `tls` (matched by SNI), `http` (by Host) or `tcp` (by address).
    pub protocol: String,
    /// DNS names, exact or `*.example.com` (one label), for tls and http.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Address ranges (`192.0.2.0/24`), for tcp.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// Destination ports.
    pub ports: Vec<u16>,
    /// Who may reach it (`principals: ["*"]` for every workload).
    pub from: Vec<CrdSource>,
    /// For http: send requests on as HTTPS to this port, verified against public roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub originate_tls_port: Option<u16>,
}

/// What the controller did with an `ExternalService`.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExternalServiceStatus {
    /// `Accepted`: whether the version in force is this generation, and if not why.
    #[serde(default)]
    pub conditions: Vec<super::gateway::Condition>,
}

impl ExternalService {
    /// The external service this resource describes; named after the resource.
    pub fn to_service(&self) -> Result<ward_spiffe::egress::ExternalService, String> {
        let name = self.metadata.name.clone().ok_or("resource has no name")?;
        let protocol = match self.spec.protocol.as_str() {
            "tls" => ward_spiffe::egress::Protocol::Tls,
            "http" => ward_spiffe::egress::Protocol::Http,
            "tcp" => ward_spiffe::egress::Protocol::Tcp,
            other => return Err(format!("protocol {other:?} is not tls, http or tcp")),
        };
        Ok(ward_spiffe::egress::ExternalService {
            name,
            protocol,
            hosts: self.spec.hosts.clone(),
            addresses: self
                .spec
                .addresses
                .iter()
                .map(|a| a.parse())
                .collect::<Result<_, String>>()?,
            ports: self.spec.ports.clone(),
            from: self
                .spec
                .from
                .iter()
                .map(ward_spiffe::policy::Source::from)
                .collect(),
            originate_tls: self.spec.originate_tls_port,
        })
    }
}

/// The CustomResourceDefinitions as YAML documents.
pub fn definitions_yaml() -> Result<String, String> {
    use kube::CustomResourceExt;
    let mut out = String::new();
    for crd in [
        IdentityPolicy::crd(),
        AuthorizationPolicy::crd(),
        ExternalService::crd(),
    ] {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(&crd).map_err(|e| e.to_string())?);
    }
    Ok(out)
}
