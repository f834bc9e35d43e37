//! Egress: which destinations outside the mesh a workload may reach. The model (as written in
//! `ward-ca egress apply` files and CA records), its validation, and the pure decision for one
//! connection or request.
//!
//! An external service names hosts (exact, or `*.` for exactly one more label) for TLS (the
//! ClientHello's SNI) and HTTP (the Host), or address ranges for TCP, with ports and the
//! sources that may use it (the authorization policies' `from` semantics). A destination no
//! service covers gets the default — `deny` (Istio's REGISTRY_ONLY) or `allow` — which a
//! namespace may override. A named destination is never reached at the address the
//! application dialled: the decision says which name to resolve, and the proxy connects to its
//! own answer, so a forbidden address with an allowed SNI gets nothing.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::cidr::Cidr;
use crate::id::SpiffeId;
use crate::policy::{Source, SourceMatcher};

/// What traffic to an external service looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TLS, matched by the ClientHello's server name (not terminated).
    Tls,
    /// Plaintext HTTP, matched by the Host of each request.
    Http,
    /// Any TCP, matched by destination address.
    Tcp,
}

/// What happens to a destination no external service covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Refused (Istio's REGISTRY_ONLY).
    #[default]
    Deny,
    /// Connected as the application asked (Istio's ALLOW_ANY).
    Allow,
}

/// An external service and who may use it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalService {
    /// Unique name (the rule in decisions and the access log).
    pub name: String,
    /// `tls`, `http` or `tcp`.
    pub protocol: Protocol,
    /// For `tls` and `http`: DNS names, exact or `*.example.com` (one label).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// For `tcp`: address ranges.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<Cidr>,
    /// Destination ports (at least one).
    pub ports: Vec<u16>,
    /// Who may use it (at least one source; `principals: ["*"]` for every workload).
    pub from: Vec<Source>,
    /// For `http`: send the application's plaintext requests on as HTTPS to this port,
    /// verifying the server against public roots (TLS origination).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub originate_tls: Option<u16>,
}

/// The egress configuration of a mesh: `egress: { default, namespaces, services }`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressDoc {
    /// For destinations no service covers.
    #[serde(default)]
    pub default: Mode,
    /// Per-namespace overrides of `default` (sources whose ID says `/ns/<namespace>/`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub namespaces: BTreeMap<String, Mode>,
    /// The external services.
    #[serde(default)]
    pub services: Vec<ExternalService>,
}

/// Why an egress configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("external service {service:?}: {message}")]
pub struct EgressError {
    /// The service (or `namespaces` for an override).
    pub service: String,
    /// What is wrong, naming the field.
    pub message: String,
}

/// A host pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPat {
    Exact(String),
    /// `*.<suffix>`: one label, then `.<suffix>`.
    OneLabel(String),
}

impl HostPat {
    fn parse(s: &str) -> Result<Self, String> {
        let (wild, name) = match s.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        if name.parse::<IpAddr>().is_ok() {
            return Err(format!(
                "host {s:?} is an IP address: name it under `addresses` with protocol tcp"
            ));
        }
        if !is_dns_name(name) {
            return Err(format!(
                "host {s:?} is not a lowercase DNS name (a `*.` wildcard may only be the whole first label)"
            ));
        }
        if wild && !name.contains('.') {
            return Err(format!(
                "host {s:?}: a wildcard needs at least two labels after `*.`"
            ));
        }
        Ok(if wild {
            HostPat::OneLabel(name.to_owned())
        } else {
            HostPat::Exact(name.to_owned())
        })
    }

    fn matches(&self, name: &str) -> bool {
        match self {
            HostPat::Exact(e) => e == name,
            HostPat::OneLabel(suffix) => name
                .strip_suffix(suffix.as_str())
                .and_then(|l| l.strip_suffix('.'))
                .is_some_and(|label| !label.is_empty() && !label.contains('.')),
        }
    }
}

/// A lowercase DNS name: labels of `a-z 0-9 -`, 1–63 bytes, not starting or ending with `-`.
fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

/// A name as requested (SNI or Host), in the form hosts are matched in: lowercase, no trailing
/// dot, no port. `None` if it is not a DNS name (an IP literal among them).
pub fn requested_name(raw: &str) -> Option<String> {
    let lower = raw.trim().to_ascii_lowercase();
    let name = lower.strip_suffix('.').unwrap_or(&lower);
    (name.parse::<IpAddr>().is_err() && is_dns_name(name)).then(|| name.to_owned())
}

#[derive(Debug)]
struct Compiled {
    name: String,
    protocol: Protocol,
    hosts: Vec<HostPat>,
    addresses: Vec<Cidr>,
    ports: Vec<u16>,
    from: Vec<SourceMatcher>,
    originate_tls: Option<u16>,
}

impl Compiled {
    /// Grants go to identified workloads only: a source of only negative conditions
    /// (`not_namespaces`) would otherwise match a caller with no ID at all.
    fn may_use(&self, source: Option<&SpiffeId>) -> bool {
        source.is_some() && self.from.iter().any(|f| f.matches(source))
    }
}

/// A checked egress configuration, ready to decide.
#[derive(Debug, Default)]
pub struct EgressSet {
    default: Mode,
    namespaces: BTreeMap<String, Mode>,
    services: Vec<Compiled>,
    doc: EgressDoc,
}

/// What the application asked for, as the proxy saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen<'a> {
    /// A TLS ClientHello, with its server name if it had one.
    Tls(Option<&'a str>),
    /// An HTTP request with this Host (or authority).
    Http(Option<&'a str>),
    /// Anything else.
    Tcp,
}

/// One connection or request to decide.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    /// The workload the traffic comes from.
    pub source: Option<&'a SpiffeId>,
    /// What it sent.
    pub seen: Seen<'a>,
    /// The address it dialled.
    pub dialled: IpAddr,
    /// The port it dialled.
    pub port: u16,
}

/// Where an allowed destination is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reach {
    /// Resolve this name (the proxy's own resolution) and connect to its answer.
    Name(String),
    /// The address the application dialled (a `tcp` service, or the `allow` default).
    Dialled,
}

/// The decision for one [`Ask`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether it may go.
    pub allowed: bool,
    /// Where to, when allowed.
    pub reach: Reach,
    /// The external service that decided (`None`: the default).
    pub service: Option<String>,
    /// Why, for the caller, the log and `explain`.
    pub reason: String,
    /// Send the request on as HTTPS to this port (an `http` service with `originate_tls`).
    pub originate_tls: Option<u16>,
}

impl EgressSet {
    /// Checks and compiles `doc`.
    pub fn compile(doc: EgressDoc) -> Result<Self, EgressError> {
        let mut services = Vec::new();
        let mut names = HashSet::new();
        for (i, s) in doc.services.iter().enumerate() {
            let label = if s.name.is_empty() {
                format!("#{i}")
            } else {
                s.name.clone()
            };
            let bad = |message: String| EgressError {
                service: label.clone(),
                message,
            };
            if s.name.is_empty() {
                return Err(bad("name must not be empty".into()));
            }
            if !names.insert(s.name.as_str()) {
                return Err(bad("the name is used twice".into()));
            }
            if s.ports.is_empty() || s.ports.contains(&0) {
                return Err(bad(
                    "ports must name at least one port, none of them 0".into()
                ));
            }
            if s.from.is_empty() {
                return Err(bad(
                    "from must name at least one source (principals: [\"*\"] for every workload)"
                        .into(),
                ));
            }
            match (s.protocol, s.hosts.is_empty(), s.addresses.is_empty()) {
                (Protocol::Tcp, true, false) => {}
                (Protocol::Tcp, _, _) => {
                    return Err(bad(
                        "protocol tcp is matched by `addresses` (and takes no `hosts`)".into(),
                    ));
                }
                (_, false, true) => {}
                (p, _, _) => {
                    return Err(bad(format!(
                        "protocol {p:?} is matched by `hosts` (and takes no `addresses`)"
                    )
                    .to_lowercase()));
                }
            }
            if s.originate_tls.is_some() && s.protocol != Protocol::Http {
                return Err(bad(
                    "originate_tls is for protocol http (the application's plaintext is sent on as HTTPS)".into(),
                ));
            }
            if s.originate_tls == Some(0) {
                return Err(bad("originate_tls must be a port, not 0".into()));
            }
            let hosts = s
                .hosts
                .iter()
                .map(|h| HostPat::parse(h))
                .collect::<Result<_, _>>()
                .map_err(bad)?;
            let from = s
                .from
                .iter()
                .enumerate()
                .map(|(fi, f)| SourceMatcher::compile(f).map_err(|e| format!("from[{fi}]: {e}")))
                .collect::<Result<_, _>>()
                .map_err(bad)?;
            services.push(Compiled {
                name: s.name.clone(),
                protocol: s.protocol,
                hosts,
                addresses: s.addresses.clone(),
                ports: s.ports.clone(),
                from,
                originate_tls: s.originate_tls,
            });
        }
        // Overlapping ranges on a shared port must grant the same: otherwise which grant
        // applies would depend on the order they were written in.
        let tcp: Vec<_> = services.iter().zip(&doc.services).collect();
        for (i, (a, da)) in tcp.iter().enumerate() {
            for (b, db) in &tcp[i + 1..] {
                let shared_port = a.ports.iter().any(|p| b.ports.contains(p));
                let overlap = a
                    .addresses
                    .iter()
                    .any(|x| b.addresses.iter().any(|y| overlaps(x, y)));
                if shared_port && overlap && da.from != db.from {
                    return Err(EgressError {
                        service: b.name.clone(),
                        message: format!(
                            "its addresses overlap those of {:?} on a shared port with different `from`",
                            a.name
                        ),
                    });
                }
            }
        }
        for ns in doc.namespaces.keys() {
            if !is_dns_name(ns) || ns.contains('.') {
                return Err(EgressError {
                    service: "namespaces".into(),
                    message: format!("{ns:?} is not a valid Kubernetes namespace"),
                });
            }
        }
        Ok(Self {
            default: doc.default,
            namespaces: doc.namespaces.clone(),
            services,
            doc,
        })
    }

    /// The configuration as written.
    pub fn doc(&self) -> &EgressDoc {
        &self.doc
    }

    /// The default that applies to `source` (its namespace's override, or the mesh's).
    pub fn default_for(&self, source: Option<&SpiffeId>) -> Mode {
        source
            .and_then(crate::policy::namespace_of)
            .and_then(|ns| self.namespaces.get(ns))
            .copied()
            .unwrap_or(self.default)
    }

    /// Decides one connection or request. Pure.
    pub fn decide(&self, a: &Ask<'_>) -> Decision {
        let name = match a.seen {
            Seen::Tls(n) | Seen::Http(n) => n.and_then(requested_name),
            Seen::Tcp => None,
        };
        let by_name = name.as_deref().and_then(|n| {
            let proto = match a.seen {
                Seen::Tls(_) => Protocol::Tls,
                _ => Protocol::Http,
            };
            self.services.iter().find(|s| {
                s.protocol == proto
                    && s.ports.contains(&a.port)
                    && s.hosts.iter().any(|h| h.matches(n))
            })
        });
        let src = a
            .source
            .map_or_else(|| "an unidentified workload".to_owned(), |s| s.to_string());
        if let (Some(s), Some(n)) = (by_name, &name) {
            return if s.may_use(a.source) {
                Decision {
                    allowed: true,
                    reach: Reach::Name(n.clone()),
                    service: Some(s.name.clone()),
                    reason: format!("{n}:{} is external service {}", a.port, s.name),
                    originate_tls: s.originate_tls,
                }
            } else {
                Decision {
                    allowed: false,
                    reach: Reach::Name(n.clone()),
                    service: Some(s.name.clone()),
                    reason: format!("{src} may not use external service {}", s.name),
                    originate_tls: None,
                }
            };
        }
        let by_address = self.services.iter().find(|s| {
            s.protocol == Protocol::Tcp
                && s.ports.contains(&a.port)
                && s.addresses.iter().any(|c| c.contains(a.dialled))
        });
        if let Some(s) = by_address {
            let allowed = s.may_use(a.source);
            return Decision {
                allowed,
                reach: Reach::Dialled,
                service: Some(s.name.clone()),
                reason: if allowed {
                    format!("{}:{} is external service {}", a.dialled, a.port, s.name)
                } else {
                    format!("{src} may not use external service {}", s.name)
                },
                originate_tls: None,
            };
        }
        let what = match (&name, a.seen) {
            (Some(n), _) => format!("{n}:{}", a.port),
            (None, Seen::Tls(Some(raw)) | Seen::Http(Some(raw))) => {
                format!("{raw:?} (not a DNS name) at {}:{}", a.dialled, a.port)
            }
            (None, Seen::Tls(None)) => {
                format!("TLS without a server name to {}:{}", a.dialled, a.port)
            }
            (None, _) => format!("{}:{}", a.dialled, a.port),
        };
        match self.default_for(a.source) {
            Mode::Allow => Decision {
                allowed: true,
                reach: Reach::Dialled,
                service: None,
                reason: format!("{what} is not an external service; the default allows it"),
                originate_tls: None,
            },
            Mode::Deny => Decision {
                allowed: false,
                reach: Reach::Dialled,
                service: None,
                reason: format!("{what} is not an allowed external service"),
                originate_tls: None,
            },
        }
    }
}

fn overlaps(a: &Cidr, b: &Cidr) -> bool {
    a.contains(b.addr()) || b.contains(a.addr())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn set(yaml: &str) -> Result<EgressSet, EgressError> {
        EgressSet::compile(serde_json::from_str(yaml).unwrap())
    }

    fn id(s: &str) -> SpiffeId {
        SpiffeId::new(s).unwrap()
    }

    const DOC: &str = r#"{
        "default": "deny",
        "namespaces": { "legacy": "allow" },
        "services": [
            { "name": "stripe", "protocol": "tls", "hosts": ["api.stripe.com"], "ports": [443],
              "from": [ { "namespaces": ["shop"] } ] },
            { "name": "google", "protocol": "tls", "hosts": ["*.googleapis.com"], "ports": [443],
              "from": [ { "principals": ["*"] } ] },
            { "name": "status", "protocol": "http", "hosts": ["status.example.com"], "ports": [80],
              "from": [ { "principals": ["spiffe://t/ns/shop/sa/web"] } ] },
            { "name": "db", "protocol": "tcp", "addresses": ["192.0.2.0/24"], "ports": [5432],
              "from": [ { "namespaces": ["shop"] } ] }
        ] }"#;

    fn ask<'a>(src: &'a SpiffeId, seen: Seen<'a>, port: u16) -> Ask<'a> {
        Ask {
            source: Some(src),
            seen,
            dialled: "198.51.100.7".parse().unwrap(),
            port,
        }
    }

    #[test]
    fn names_ports_and_sources_decide() {
        let s = set(DOC).unwrap();
        let web = id("spiffe://t/ns/shop/sa/web");
        let other = id("spiffe://t/ns/blog/sa/web");
        let d = s.decide(&ask(&web, Seen::Tls(Some("API.Stripe.com.")), 443));
        assert!(d.allowed, "{d:?}");
        assert_eq!(d.reach, Reach::Name("api.stripe.com".into()));
        assert_eq!(d.service.as_deref(), Some("stripe"));
        // Another port, another source, another name.
        assert!(
            !s.decide(&ask(&web, Seen::Tls(Some("api.stripe.com")), 8443))
                .allowed
        );
        let d = s.decide(&ask(&other, Seen::Tls(Some("api.stripe.com")), 443));
        assert!(
            !d.allowed && d.reason.contains("may not use external service stripe"),
            "{d:?}"
        );
        let d = s.decide(&ask(&web, Seen::Tls(Some("evil.example")), 443));
        assert!(
            !d.allowed && d.reason.contains("not an allowed external service"),
            "{d:?}"
        );
        // A wildcard is one label.
        assert!(
            s.decide(&ask(&other, Seen::Tls(Some("storage.googleapis.com")), 443))
                .allowed
        );
        assert!(
            !s.decide(&ask(&other, Seen::Tls(Some("a.b.googleapis.com")), 443))
                .allowed
        );
        assert!(
            !s.decide(&ask(&other, Seen::Tls(Some("googleapis.com")), 443))
                .allowed
        );
        // HTTP by Host (port stripped by the caller), never a TLS service by Host.
        assert!(
            s.decide(&ask(&web, Seen::Http(Some("status.example.com")), 80))
                .allowed
        );
        assert!(
            !s.decide(&ask(&web, Seen::Http(Some("api.stripe.com")), 443))
                .allowed
        );
        // IP literals and no name at all fall to the default.
        let d = s.decide(&ask(&web, Seen::Tls(Some("93.184.216.34")), 443));
        assert!(!d.allowed && d.reason.contains("not a DNS name"), "{d:?}");
        assert!(!s.decide(&ask(&web, Seen::Tls(None), 443)).allowed);
        // TCP by address.
        let mut a = ask(&web, Seen::Tcp, 5432);
        a.dialled = "192.0.2.9".parse().unwrap();
        let d = s.decide(&a);
        assert!(d.allowed && d.reach == Reach::Dialled, "{d:?}");
        a.source = Some(&other);
        assert!(!s.decide(&a).allowed);
        // The namespace override.
        let legacy = id("spiffe://t/ns/legacy/sa/x");
        let d = s.decide(&ask(&legacy, Seen::Tls(Some("anything.example")), 443));
        assert!(
            d.allowed && d.reach == Reach::Dialled && d.service.is_none(),
            "{d:?}"
        );
        // ... but not for a service that names who may use it.
        assert!(
            !s.decide(&ask(&legacy, Seen::Tls(Some("api.stripe.com")), 443))
                .allowed
        );
        let none = Ask {
            source: None,
            seen: Seen::Tls(Some("api.stripe.com")),
            dialled: "198.51.100.7".parse().unwrap(),
            port: 443,
        };
        assert!(!s.decide(&none).allowed);
        // Nor through a grant of negative conditions only.
        let open = set(r#"{ "services": [
            { "name": "x", "protocol": "tls", "hosts": ["x.example"], "ports": [443],
              "from": [ { "not_namespaces": ["blocked"] } ] } ] }"#)
        .unwrap();
        let anon = Ask {
            source: None,
            seen: Seen::Tls(Some("x.example")),
            dialled: "198.51.100.7".parse().unwrap(),
            port: 443,
        };
        assert!(!open.decide(&anon).allowed);
        assert!(
            open.decide(&ask(&web, Seen::Tls(Some("x.example")), 443))
                .allowed
        );
    }

    #[test]
    fn bad_configurations_are_refused_with_the_reason() {
        let bad = |svc: &str| {
            set(&format!(r#"{{ "services": [ {svc} ] }}"#))
                .unwrap_err()
                .to_string()
        };
        let from = r#""from": [ { "principals": ["*"] } ]"#;
        for (svc, says) in [
            (format!(r#"{{ "name": "a", "protocol": "tls", "hosts": ["a.*.com"], "ports": [443], {from} }}"#), "not a lowercase DNS name"),
            (format!(r#"{{ "name": "a", "protocol": "tls", "hosts": ["*.com"], "ports": [443], {from} }}"#), "two labels"),
            (format!(r#"{{ "name": "a", "protocol": "tls", "hosts": ["*"], "ports": [443], {from} }}"#), "not a lowercase DNS name"),
            (format!(r#"{{ "name": "a", "protocol": "tls", "hosts": ["10.0.0.1"], "ports": [443], {from} }}"#), "is an IP address"),
            (format!(r#"{{ "name": "a", "protocol": "tls", "hosts": ["A.com"], "ports": [443], {from} }}"#), "lowercase"),
            (format!(r#"{{ "name": "a", "protocol": "tcp", "hosts": ["a.com"], "ports": [1], {from} }}"#), "protocol tcp"),
            (format!(r#"{{ "name": "a", "protocol": "http", "addresses": ["10.0.0.0/8"], "ports": [1], {from} }}"#), "protocol http"),
            (format!(r#"{{ "name": "a", "protocol": "tls", "hosts": ["a.com"], "ports": [], {from} }}"#), "ports"),
            (r#"{ "name": "a", "protocol": "tls", "hosts": ["a.com"], "ports": [443], "from": [] }"#.into(), "from must name"),
            (format!(r#"{{ "name": "a", "protocol": "tls", "hosts": ["a.com"], "ports": [443], "originate_tls": 443, {from} }}"#), "originate_tls is for protocol http"),
            (r#"{ "name": "a", "protocol": "tls", "hosts": ["a.com"], "ports": [443], "from": [ { "principals": ["nope"] } ] }"#.into(), "from[0]"),
        ] {
            let e = bad(&svc);
            assert!(e.contains(says), "{svc}: {e}");
        }
        let e = set(&format!(
            r#"{{ "services": [
                {{ "name": "a", "protocol": "tcp", "addresses": ["10.0.0.0/8"], "ports": [5432], {from} }},
                {{ "name": "b", "protocol": "tcp", "addresses": ["10.1.0.0/16"], "ports": [5432, 6379],
                   "from": [ {{ "namespaces": ["x"] }} ] }} ] }}"#
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("\"b\"") && e.contains("overlap") && e.contains("\"a\""),
            "{e}"
        );
        let twice = format!(
            r#"{{ "services": [
                {{ "name": "a", "protocol": "tls", "hosts": ["a.com"], "ports": [443], {from} }},
                {{ "name": "a", "protocol": "tls", "hosts": ["b.com"], "ports": [443], {from} }} ] }}"#
        );
        assert!(set(&twice).unwrap_err().to_string().contains("used twice"));
        let unknown = serde_json::from_str::<EgressDoc>(
            r#"{ "services": [ { "name": "a", "protocol": "udp", "hosts": ["a.com"], "ports": [1], "from": [] } ] }"#,
        )
        .unwrap_err()
        .to_string();
        assert!(unknown.contains("udp"), "{unknown}");
    }
}
