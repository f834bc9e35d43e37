//! Mesh services: what a service name or virtual address (a Kubernetes ClusterIP) resolves to,
//! as the CA keeps it and agents and proxies see it — ports, and endpoints with the SPIFFE IDs
//! their workloads are entitled to.
//!
//! [`resolve`] is the pure step from a service and a port to the endpoints a proxy may use.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::SpiffeId;

/// A service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// `<name>.<namespace>` in Kubernetes; any DNS-style name otherwise.
    pub name: String,
    /// Virtual addresses callers dial (ClusterIPs); may be empty (reached by name only).
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    /// The ports it offers.
    pub ports: Vec<ServicePort>,
    /// Its endpoints.
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    /// Routes attached to it (Gateway API mesh routes): with any, HTTP requests to it go where
    /// the matching rule says, and a request no rule matches is answered 404.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<crate::route::HttpRoute>,
}

/// A port of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePort {
    /// Name (may be empty for a single unnamed port).
    #[serde(default)]
    pub name: String,
    /// The port callers dial.
    pub port: u16,
    /// The port endpoints serve it on, when the endpoint does not say (default: `port`).
    #[serde(default)]
    pub target_port: Option<u16>,
}

/// One endpoint (a pod, or a host).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// Its address.
    pub address: IpAddr,
    /// Target port per service port name, when it differs from the service port's.
    #[serde(default)]
    pub ports: BTreeMap<String, u16>,
    /// The SPIFFE IDs its workload is entitled to; a connection to it must present one.
    pub ids: Vec<SpiffeId>,
    /// Ready to receive new traffic.
    #[serde(default = "yes")]
    pub ready: bool,
    /// Serving (readiness regardless of termination).
    #[serde(default = "yes")]
    pub serving: bool,
    /// Shutting down: gets no new traffic once alternatives exist.
    #[serde(default)]
    pub terminating: bool,
    /// The pod (or host) name, for logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

fn yes() -> bool {
    true
}

/// An endpoint as a proxy uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Where to connect.
    pub addr: SocketAddr,
    /// IDs it must present.
    pub ids: Vec<SpiffeId>,
    /// Terminating but still serving: used only when nothing else is.
    pub draining: bool,
    /// Pod name, for logs.
    pub pod: Option<String>,
}

/// Why a service was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("service {name:?}: {why}")]
pub struct ServiceError {
    /// The service.
    pub name: String,
    /// What is wrong.
    pub why: String,
}

impl Service {
    /// Checks names, ports and endpoints.
    pub fn validate(&self) -> Result<(), ServiceError> {
        let bad = |why: String| ServiceError {
            name: self.name.clone(),
            why,
        };
        let n = &self.name;
        if n.is_empty()
            || n.len() > 253
            || n.starts_with('.')
            || n.ends_with('.')
            || n.contains("..")
            || !n
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        {
            return Err(bad(
                "the name must be lowercase letters, digits, '.' and '-' (e.g. api.shop)".into(),
            ));
        }
        if self.ports.is_empty() {
            return Err(bad("at least one port is required".into()));
        }
        let mut names = std::collections::BTreeSet::new();
        let mut numbers = std::collections::BTreeSet::new();
        for p in &self.ports {
            if p.port == 0 || p.target_port == Some(0) {
                return Err(bad(format!("port {:?}: 0 is not a port", p.name)));
            }
            if !names.insert(p.name.as_str()) || !numbers.insert(p.port) {
                return Err(bad(format!(
                    "port {:?} ({}) is listed twice",
                    p.name, p.port
                )));
            }
        }
        for r in &self.routes {
            if let Some(p) = r.port
                && !numbers.contains(&p)
            {
                return Err(bad(format!(
                    "route {}: port {p} is not a port of the service",
                    r.name
                )));
            }
        }
        crate::route::Routes::compile(&self.routes).map_err(|e| bad(e.to_string()))?;
        for e in &self.endpoints {
            if e.ids.is_empty() {
                return Err(bad(format!(
                    "endpoint {}: no SPIFFE ID (a connection to it could not be checked)",
                    e.address
                )));
            }
            for (name, port) in &e.ports {
                if !names.contains(name.as_str()) || *port == 0 {
                    return Err(bad(format!(
                        "endpoint {}: port {name:?} is not a port of the service",
                        e.address
                    )));
                }
            }
        }
        Ok(())
    }

    /// The service port callers dial as `port`.
    pub fn port(&self, port: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == port)
    }

    /// The routes that apply to `port`.
    pub fn routes_for(&self, port: u16) -> Vec<crate::route::HttpRoute> {
        self.routes
            .iter()
            .filter(|r| r.port.is_none_or(|p| p == port))
            .cloned()
            .collect()
    }

    /// Whether `host` names this service: `<name>`, `<name>.svc`, or `<name>.svc.<domain>`.
    pub fn named(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.');
        match host.strip_prefix(self.name.as_str()) {
            Some("") => true,
            Some(rest) => rest == ".svc" || rest.starts_with(".svc."),
            None => false,
        }
    }
}

/// The endpoints a proxy may use for `port` of `service`: ready ones, and terminating ones
/// that still serve (marked draining, used only when nothing else is). `None` when the
/// service has no such port.
pub fn resolve(service: &Service, port: u16) -> Option<Vec<Target>> {
    let sp = service.port(port)?;
    let default = sp.target_port.unwrap_or(sp.port);
    let mut out = Vec::new();
    for e in &service.endpoints {
        let draining = e.terminating && e.serving;
        if !(e.ready || draining) {
            continue;
        }
        let tp = e.ports.get(&sp.name).copied().unwrap_or(default);
        let t = Target {
            addr: SocketAddr::new(e.address, tp),
            ids: e.ids.clone(),
            draining: draining && !e.ready,
            pod: e.pod.clone(),
        };
        // The same endpoint listed twice (overlapping EndpointSlices) counts once.
        if !out.iter().any(|o: &Target| o.addr == t.addr) {
            out.push(t);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc() -> Service {
        serde_yaml_ng::from_str(
            r#"
name: api.shop
addresses: [10.96.0.10]
ports: [ { name: http, port: 80, target_port: 8080 }, { name: admin, port: 9000 } ]
endpoints:
  - { address: 10.0.0.1, ids: [spiffe://t/api] }
  - { address: 10.0.0.2, ids: [spiffe://t/api], ports: { http: 8081 } }
  - { address: 10.0.0.3, ids: [spiffe://t/api], ready: false }
  - { address: 10.0.0.4, ids: [spiffe://t/api], ready: false, serving: true, terminating: true }
  - { address: 10.0.0.5, ids: [spiffe://t/api], ready: false, serving: false, terminating: true }
  - { address: 10.0.0.1, ids: [spiffe://t/api] }
"#,
        )
        .unwrap()
    }

    #[test]
    fn resolves_ports_readiness_and_draining() {
        let s = svc();
        s.validate().unwrap();
        let t = resolve(&s, 80).unwrap();
        let got: Vec<(String, bool)> = t.iter().map(|t| (t.addr.to_string(), t.draining)).collect();
        assert_eq!(
            got,
            vec![
                ("10.0.0.1:8080".to_owned(), false),
                ("10.0.0.2:8081".to_owned(), false),
                ("10.0.0.4:8080".to_owned(), true),
            ]
        );
        assert_eq!(
            resolve(&s, 9000).unwrap()[0].addr.to_string(),
            "10.0.0.1:9000"
        );
        assert!(resolve(&s, 81).is_none());
        assert!(
            s.named("api.shop") && s.named("api.shop.svc") && s.named("api.shop.svc.cluster.local")
        );
        assert!(!s.named("api.shopx") && !s.named("api") && !s.named("api.shop.evil"));
    }

    #[test]
    fn invalid_services_are_refused_with_a_reason() {
        let mut s = svc();
        s.name = "API".into();
        assert!(s.validate().unwrap_err().to_string().contains("lowercase"));
        let mut s = svc();
        s.endpoints[0].ids.clear();
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("no SPIFFE ID")
        );
        let mut s = svc();
        s.ports.push(ServicePort {
            name: "http".into(),
            port: 81,
            target_port: None,
        });
        assert!(s.validate().unwrap_err().to_string().contains("twice"));
        let mut s = svc();
        s.endpoints[0].ports.insert("nope".into(), 1);
        assert!(s.validate().unwrap_err().to_string().contains("not a port"));
        let mut s = svc();
        s.ports.clear();
        assert!(s.validate().is_err());
        let mut s = svc();
        s.routes = serde_yaml_ng::from_str(
            "[ { name: r, rules: [ { matches: [ { path: { type: regex, value: '(' } } ] } ] } ]",
        )
        .unwrap();
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("route r") && e.contains("regex"), "{e}");
        s.routes = serde_yaml_ng::from_str("[ { name: r, port: 81, rules: [] } ]").unwrap();
        assert!(s.validate().unwrap_err().to_string().contains("port 81"));
    }
}
