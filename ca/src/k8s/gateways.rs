//! Ward's Gateways: a `GatewayClass` whose `controllerName` is [`CONTROLLER`] is Ward's, and a
//! `Gateway` of such a class is served by Ward's ingress gateway. This module is the pure part:
//! reading a Gateway's listeners ([`read`]), checking them, matching a route's hostnames with a
//! listener's ([`intersect`]), and the status Ward writes on Gateways and GatewayClasses.
//!
//! A Gateway's routes reach the gateway proxies as a mesh service record named
//! [`record_name`] (`<gateway>.<namespace>.gateway`, a name no Kubernetes Service can have):
//! one port per listener port, no endpoints, and the routes attached to each listener with the
//! hostnames the listener and the route have in common — the path entries and routes already
//! take from the CA through the agent to the proxies.
//!
//! Supported: `HTTP` and `HTTPS` listeners (TLS mode `Terminate`), `hostname`,
//! `allowedRoutes` from `Same` (the default) or `All` namespaces and the kinds `HTTPRoute` and
//! `GRPCRoute`, `certificateRefs` to Secrets in the Gateway's namespace (none: the gateway's
//! own certificates, e.g. ACME). Not supported, with the reason in the status: other
//! protocols, `Passthrough`, namespace selectors, cross-namespace certificate refs.

use super::gateway::{Condition, Gateway, GatewayClass};
use super::routes::{Kind, Why};
use serde::Serialize;

/// The controller name of Ward's GatewayClasses (and of route status for Gateway parents).
pub const CONTROLLER: &str = "ward.dev/gateway";

/// The mesh service record carrying the routes of Gateway `namespace/name`.
pub fn record_name(namespace: &str, name: &str) -> String {
    format!("{name}.{namespace}.gateway")
}

/// Which namespaces' routes a listener takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum From {
    /// The Gateway's own.
    Same,
    /// Any.
    All,
    /// A label selector (not supported: no route attaches).
    Selector,
}

/// A listener as Ward reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    /// Its name (`sectionName` in parent refs).
    pub name: String,
    /// Its port.
    pub port: u16,
    /// `HTTP` or `HTTPS` (anything else is refused in `accepted`).
    pub protocol: String,
    /// The hostname it serves, if one.
    pub hostname: Option<String>,
    /// Route namespaces.
    pub from: From,
    /// Route kinds it takes.
    pub kinds: Vec<Kind>,
    /// Whether Ward can serve it.
    pub accepted: Result<(), Why>,
    /// Whether its references (certificates, route kinds) resolve.
    pub resolved: Result<(), Why>,
    /// Conflict with another listener on the same port.
    pub conflict: Option<Why>,
}

impl Listener {
    /// Whether routes may attach to it.
    pub fn usable(&self) -> bool {
        self.accepted.is_ok() && self.conflict.is_none()
    }
}

/// A Gateway of a Ward class, as the route set and the record need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gw {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// Listeners in the Gateway's order.
    pub listeners: Vec<Listener>,
    /// The conditions of its status as last seen (for transition times).
    pub conditions: Vec<Condition>,
    /// Per listener, its conditions as last seen.
    pub listener_conditions: Vec<(String, Vec<Condition>)>,
}

fn bad(reason: &'static str, message: String) -> Why {
    Why { reason, message }
}

fn wire<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        other => format!("{other:?}"),
    }
}

/// Reads Gateway `g` (whose class is Ward's): its listeners, checked.
pub fn read(g: &Gateway) -> Option<Gw> {
    let namespace = g.metadata.namespace.clone()?;
    let name = g.metadata.name.clone()?;
    let mut listeners: Vec<Listener> = g
        .spec
        .listeners
        .iter()
        .map(|l| listener(&namespace, l))
        .collect();
    // Listeners sharing a port must agree on the protocol and differ in hostname.
    for i in 0..listeners.len() {
        for j in 0..listeners.len() {
            if i == j || listeners[i].port != listeners[j].port {
                continue;
            }
            let (a, b) = (&listeners[i], &listeners[j]);
            let conflict = if a.protocol != b.protocol {
                Some(bad(
                    "ProtocolConflict",
                    format!(
                        "listener {} uses port {} with {}",
                        b.name, b.port, b.protocol
                    ),
                ))
            } else if a.hostname == b.hostname {
                Some(bad(
                    "HostnameConflict",
                    format!(
                        "listener {} serves the same hostname on port {}",
                        b.name, b.port
                    ),
                ))
            } else {
                None
            };
            if conflict.is_some() && listeners[i].conflict.is_none() {
                listeners[i].conflict = conflict;
            }
        }
    }
    let current = current_status(g);
    let listener_conditions = current
        .listeners
        .into_iter()
        .map(|l| (l.name, l.conditions))
        .collect();
    let conditions = current.conditions;
    Some(Gw {
        namespace,
        name,
        generation: g.metadata.generation,
        listeners,
        conditions,
        listener_conditions,
    })
}

/// `metav1.Condition`s as Ward's plain conditions (same wire shape).
fn plain<T: Serialize>(c: &T) -> Vec<Condition> {
    serde_json::to_value(c)
        .ok()
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default()
}

fn listener(ns: &str, l: &super::gateway::gateways::GatewayListeners) -> Listener {
    let port = u16::try_from(l.port).ok().filter(|p| *p != 0);
    let mut accepted = Ok(());
    let mut resolved = Ok(());
    if port.is_none() {
        accepted = Err(bad(
            "UnsupportedValue",
            format!("port {} is not a port", l.port),
        ));
    }
    match l.protocol.as_str() {
        "HTTP" => {}
        "HTTPS" => {
            let tls = l.tls.as_ref();
            let mode = tls.and_then(|t| t.mode.as_ref()).map(wire);
            if mode.as_deref().is_some_and(|m| m != "Terminate") {
                accepted = Err(bad(
                    "UnsupportedValue",
                    format!(
                        "TLS mode {} is not supported; Ward terminates TLS",
                        mode.unwrap_or_default()
                    ),
                ));
            }
            for r in tls
                .and_then(|t| t.certificate_refs.as_ref())
                .into_iter()
                .flatten()
            {
                let group = r.group.as_deref().unwrap_or("");
                let kind = r.kind.as_deref().unwrap_or("Secret");
                if !(group.is_empty() || group == "core") || kind != "Secret" {
                    resolved = Err(bad(
                        "InvalidCertificateRef",
                        format!("certificate ref {group}/{kind} {} is not a Secret", r.name),
                    ));
                } else if r.namespace.as_deref().is_some_and(|n| n != ns) {
                    resolved = Err(bad(
                        "RefNotPermitted",
                        format!(
                            "Secret {}/{} is in another namespace (ReferenceGrant is not supported)",
                            r.namespace.as_deref().unwrap_or_default(),
                            r.name
                        ),
                    ));
                }
            }
        }
        p => {
            accepted = Err(bad(
                "UnsupportedProtocol",
                format!("protocol {p} is not supported; Ward serves HTTP and HTTPS"),
            ));
        }
    }
    if let Some(h) = &l.hostname
        && let Err(e) = ward_spiffe::vhost::check_hostname(h)
    {
        accepted = Err(bad("UnsupportedValue", e));
    }
    let allowed = l.allowed_routes.as_ref();
    let from = match allowed
        .and_then(|a| a.namespaces.as_ref())
        .and_then(|n| n.from.as_ref())
        .map(wire)
        .as_deref()
    {
        None | Some("Same") => From::Same,
        Some("All") => From::All,
        _ => From::Selector,
    };
    let mut kinds = Vec::new();
    match allowed.and_then(|a| a.kinds.as_ref()) {
        None => kinds = vec![Kind::Http, Kind::Grpc],
        Some(ks) => {
            for k in ks {
                let group = k.group.as_deref().unwrap_or(super::gateway::GROUP);
                match (group, k.kind.as_str()) {
                    (super::gateway::GROUP, "HTTPRoute") => kinds.push(Kind::Http),
                    (super::gateway::GROUP, "GRPCRoute") => kinds.push(Kind::Grpc),
                    _ => {
                        resolved = Err(bad(
                            "InvalidRouteKinds",
                            format!("route kind {group}/{} is not supported", k.kind),
                        ));
                    }
                }
            }
        }
    }
    Listener {
        name: l.name.clone(),
        port: port.unwrap_or(0),
        protocol: l.protocol.clone(),
        hostname: l.hostname.clone(),
        from,
        kinds,
        accepted,
        resolved,
        conflict: None,
    }
}

/// Whether hostname `a` (possibly `*.` wildcard) covers `b`.
fn covers(a: &str, b: &str) -> bool {
    match a.strip_prefix('*') {
        Some(suffix) => b.ends_with(suffix) && b.len() > suffix.len(),
        None => a == b,
    }
}

/// The hostnames a route with `route` hostnames serves on a listener with `listener`
/// hostname: the route's, narrowed to the listener's; `None` when they have none in common
/// (the route does not attach to that listener). Empty: every host.
pub fn intersect(listener: Option<&str>, route: &[String]) -> Option<Vec<String>> {
    let Some(l) = listener else {
        return Some(route.to_vec());
    };
    if route.is_empty() {
        return Some(vec![l.to_owned()]);
    }
    let mut out = Vec::new();
    for r in route {
        if covers(l, r) {
            out.push(r.clone());
        } else if covers(r, l) {
            out.push(l.to_owned());
        }
    }
    out.sort();
    out.dedup();
    (!out.is_empty()).then_some(out)
}

/// The status Ward writes on a Gateway (the Gateway API's wire shape, `addresses` left out).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayStatus {
    /// `Accepted`, `Programmed`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Per listener.
    #[serde(default)]
    pub listeners: Vec<ListenerStatus>,
}

/// A listener's status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListenerStatus {
    /// The listener.
    pub name: String,
    /// Route kinds it takes.
    #[serde(default)]
    pub supported_kinds: Vec<RouteKindRef>,
    /// Routes attached.
    #[serde(default)]
    pub attached_routes: i32,
    /// `Accepted`, `Programmed`, `ResolvedRefs`, `Conflicted`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// A route kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RouteKindRef {
    /// Group.
    #[serde(default)]
    pub group: String,
    /// Kind.
    pub kind: String,
}

/// Gateway `g`'s status as last seen.
pub fn current_status(g: &Gateway) -> GatewayStatus {
    g.status
        .as_ref()
        .and_then(|s| serde_json::from_value(serde_json::to_value(s).ok()?).ok())
        .unwrap_or_default()
}

/// The status of a Gateway: `Accepted` and `Programmed`, and per listener `Accepted`,
/// `Programmed`, `ResolvedRefs`, `Conflicted`, supported kinds and attached routes
/// (`attached[i]` for listener `i`).
pub fn status(g: &Gw, attached: &[i32], now: &str) -> GatewayStatus {
    let usable = g.listeners.iter().any(Listener::usable);
    let overall = if usable {
        Ok(())
    } else {
        Err(bad(
            "ListenersNotValid",
            "no listener can be served; see the listeners' conditions".into(),
        ))
    };
    let conditions = [
        Condition::next(
            "Accepted",
            &overall,
            "Accepted",
            &g.conditions,
            g.generation,
            now,
        ),
        Condition::next(
            "Programmed",
            &overall.clone().map_err(|w| bad("Invalid", w.message)),
            "Programmed",
            &g.conditions,
            g.generation,
            now,
        ),
    ];
    let none = Vec::new();
    let listeners: Vec<ListenerStatus> = g
        .listeners
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let prev = g
                .listener_conditions
                .iter()
                .find(|(n, _)| *n == l.name)
                .map_or(&none, |(_, c)| c);
            let conflicted = match &l.conflict {
                // `Conflicted` is a positive-polarity condition: True means in conflict.
                Some(w) => Condition {
                    kind: "Conflicted".into(),
                    status: "True".into(),
                    reason: w.reason.into(),
                    message: w.message.clone(),
                    observed_generation: g.generation,
                    last_transition_time: match prev.iter().find(|c| c.kind == "Conflicted") {
                        Some(c) if c.status == "True" => c.last_transition_time.clone(),
                        _ => now.to_owned(),
                    },
                },
                None => {
                    let mut c = Condition::next(
                        "Conflicted",
                        &Ok(()),
                        "NoConflicts",
                        prev,
                        g.generation,
                        now,
                    );
                    c.status = "False".into();
                    if let Some(p) = prev.iter().find(|p| p.kind == "Conflicted")
                        && p.status == "False"
                    {
                        c.last_transition_time = p.last_transition_time.clone();
                    }
                    c
                }
            };
            let programmed = match (&l.accepted, &l.conflict) {
                (Err(w), _) => Err(bad("Invalid", w.message.clone())),
                (Ok(()), Some(w)) => Err(bad("Invalid", w.message.clone())),
                (Ok(()), None) => Ok(()),
            };
            let supported_kinds = l
                .kinds
                .iter()
                .map(|k| RouteKindRef {
                    group: super::gateway::GROUP.into(),
                    kind: match k {
                        Kind::Http => "HTTPRoute",
                        Kind::Grpc => "GRPCRoute",
                    }
                    .into(),
                })
                .collect();
            let generation = g.generation;
            ListenerStatus {
                name: l.name.clone(),
                supported_kinds,
                attached_routes: attached.get(i).copied().unwrap_or(0),
                conditions: vec![
                    Condition::next("Accepted", &l.accepted, "Accepted", prev, generation, now),
                    Condition::next(
                        "Programmed",
                        &programmed,
                        "Programmed",
                        prev,
                        generation,
                        now,
                    ),
                    Condition::next(
                        "ResolvedRefs",
                        &l.resolved,
                        "ResolvedRefs",
                        prev,
                        generation,
                        now,
                    ),
                    conflicted,
                ],
            }
        })
        .collect();
    GatewayStatus {
        conditions: conditions.to_vec(),
        listeners,
    }
}

/// Whether GatewayClass `c` is Ward's.
pub fn is_ours(c: &GatewayClass) -> bool {
    c.spec.controller_name == CONTROLLER
}

/// The status of one of Ward's GatewayClasses, or `None` when it is already written.
pub fn class_status(c: &GatewayClass, now: &str) -> Option<serde_json::Value> {
    let prev = c
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .map(plain)
        .unwrap_or_default();
    let res = match &c.spec.parameters_ref {
        None => Ok(()),
        Some(_) => Err(bad(
            "InvalidParameters",
            "Ward's GatewayClass takes no parametersRef".into(),
        )),
    };
    let generation = c.metadata.generation;
    let cond = Condition::next("Accepted", &res, "Accepted", &prev, generation, now);
    if prev.contains(&cond) {
        return None;
    }
    Some(serde_json::json!({ "conditions": [cond] }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn gw(listeners: serde_json::Value) -> Gw {
        let g: Gateway = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "web", "namespace": "edge", "generation": 2 },
            "spec": { "gatewayClassName": "ward", "listeners": listeners }
        }))
        .unwrap();
        read(&g).unwrap()
    }

    #[test]
    fn listeners_are_checked() {
        let g = gw(serde_json::json!([
            { "name": "https", "port": 443, "protocol": "HTTPS", "hostname": "*.example.com",
              "tls": { "mode": "Terminate", "certificateRefs": [ { "name": "wild" } ] } },
            { "name": "http", "port": 80, "protocol": "HTTP" },
            { "name": "tcp", "port": 9000, "protocol": "TCP" },
            { "name": "pass", "port": 8443, "protocol": "HTTPS", "tls": { "mode": "Passthrough" } },
            { "name": "other-ns", "port": 444, "protocol": "HTTPS",
              "tls": { "certificateRefs": [ { "name": "c", "namespace": "else" } ] } },
            { "name": "clash", "port": 80, "protocol": "HTTPS" },
            { "name": "sel", "port": 81, "protocol": "HTTP",
              "allowedRoutes": { "namespaces": { "from": "Selector" },
                                 "kinds": [ { "kind": "TCPRoute" }, { "kind": "HTTPRoute" } ] } }
        ]));
        let l = |n: &str| g.listeners.iter().find(|l| l.name == n).unwrap().clone();
        assert!(l("https").usable() && l("https").resolved.is_ok());
        assert_eq!(l("https").kinds, [Kind::Http, Kind::Grpc]);
        assert_eq!(l("tcp").accepted.unwrap_err().reason, "UnsupportedProtocol");
        assert_eq!(l("pass").accepted.unwrap_err().reason, "UnsupportedValue");
        assert_eq!(
            l("other-ns").resolved.unwrap_err().reason,
            "RefNotPermitted"
        );
        assert_eq!(l("http").conflict.unwrap().reason, "ProtocolConflict");
        assert_eq!(l("clash").conflict.unwrap().reason, "ProtocolConflict");
        assert_eq!(l("sel").from, From::Selector);
        assert_eq!(l("sel").kinds, [Kind::Http]);
        assert_eq!(l("sel").resolved.unwrap_err().reason, "InvalidRouteKinds");
        let st = status(&g, &[3, 0, 0, 0, 0, 0, 0], "2026-12-02T00:00:00Z");
        let st = serde_json::to_value(&st).unwrap();
        assert_eq!(st["conditions"][0]["status"], "True");
        assert_eq!(st["listeners"][0]["attachedRoutes"], 3);
        assert_eq!(st["listeners"][0]["conditions"][3]["type"], "Conflicted");
        assert_eq!(st["listeners"][0]["conditions"][3]["status"], "False");
        assert_eq!(st["listeners"][1]["conditions"][3]["status"], "True");
        assert_eq!(st["listeners"][2]["conditions"][1]["status"], "False");
        let none = gw(serde_json::json!([{ "name": "tcp", "port": 9000, "protocol": "TCP" }]));
        let st = status(&none, &[0], "2026-12-02T00:00:00Z");
        assert_eq!(st.conditions[0].reason, "ListenersNotValid");
    }

    #[test]
    fn hostnames_intersect_as_the_gateway_api_says() {
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(intersect(None, &v(&["a.com"])), Some(v(&["a.com"])));
        assert_eq!(intersect(Some("a.com"), &[]), Some(v(&["a.com"])));
        assert_eq!(
            intersect(
                Some("*.example.com"),
                &v(&["shop.example.com", "other.org"])
            ),
            Some(v(&["shop.example.com"]))
        );
        assert_eq!(
            intersect(Some("shop.example.com"), &v(&["*.example.com"])),
            Some(v(&["shop.example.com"]))
        );
        assert_eq!(
            intersect(Some("*.example.com"), &v(&["*.a.example.com"])),
            Some(v(&["*.a.example.com"]))
        );
        assert_eq!(intersect(Some("a.com"), &v(&["b.com"])), None);
        assert_eq!(intersect(Some("*.example.com"), &v(&["example.com"])), None);
    }
}
