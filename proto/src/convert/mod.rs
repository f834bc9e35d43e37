//! Conversions between the shared SPIFFE types and their messages.

mod egress;
mod route;

pub use egress::{egress_from_proto, egress_to_proto};
pub use route::{routes_from_proto, routes_to_proto};

use crate::types;
use ward_spiffe::policy::{Action, Operation, Policy, Rule, Source, Target};
use ward_spiffe::service::{Endpoint, Service, ServicePort};
use ward_spiffe::{Bundle, JwtAuthority, SpiffeId, TrustDomain};

fn source_to(s: &Source) -> types::AuthzSource {
    types::AuthzSource {
        principals: s.principals.clone(),
        not_principals: s.not_principals.clone(),
        trust_domains: s.trust_domains.clone(),
        not_trust_domains: s.not_trust_domains.clone(),
        namespaces: s.namespaces.clone(),
        not_namespaces: s.not_namespaces.clone(),
    }
}

fn source_from(s: &types::AuthzSource) -> Source {
    Source {
        principals: s.principals.clone(),
        not_principals: s.not_principals.clone(),
        trust_domains: s.trust_domains.clone(),
        not_trust_domains: s.not_trust_domains.clone(),
        namespaces: s.namespaces.clone(),
        not_namespaces: s.not_namespaces.clone(),
    }
}

/// A policy as a message.
pub fn policy_to_proto(p: &Policy, revision: u64) -> types::AuthzPolicy {
    types::AuthzPolicy {
        name: p.name.clone(),
        target_spiffe_ids: p.target.spiffe_ids.clone(),
        action: match p.action {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
        }
        .to_owned(),
        rules: p
            .rules
            .iter()
            .map(|r| types::AuthzRule {
                from: r.from.iter().map(source_to).collect(),
                to: r
                    .to
                    .iter()
                    .map(|o| types::AuthzOperation {
                        methods: o.methods.clone(),
                        not_methods: o.not_methods.clone(),
                        paths: o.paths.clone(),
                        not_paths: o.not_paths.clone(),
                        ports: o.ports.iter().map(|p| u32::from(*p)).collect(),
                        not_ports: o.not_ports.iter().map(|p| u32::from(*p)).collect(),
                    })
                    .collect(),
            })
            .collect(),
        revision,
    }
}

/// A policy message as a policy (not yet validated: compile it into a `PolicySet`).
pub fn policy_from_proto(p: &types::AuthzPolicy) -> Result<Policy, String> {
    let action = match p.action.to_ascii_uppercase().as_str() {
        "ALLOW" => Action::Allow,
        "DENY" => Action::Deny,
        "AUDIT" => Action::Audit,
        other => {
            return Err(format!(
                "policy {:?}: action {other:?} is not ALLOW, DENY or AUDIT",
                p.name
            ));
        }
    };
    let port = |v: &u32| {
        u16::try_from(*v).map_err(|_| format!("policy {:?}: port {v} is out of range", p.name))
    };
    let mut rules = Vec::new();
    for r in &p.rules {
        let mut to = Vec::new();
        for o in &r.to {
            to.push(Operation {
                methods: o.methods.clone(),
                not_methods: o.not_methods.clone(),
                paths: o.paths.clone(),
                not_paths: o.not_paths.clone(),
                ports: o.ports.iter().map(port).collect::<Result<_, _>>()?,
                not_ports: o.not_ports.iter().map(port).collect::<Result<_, _>>()?,
            });
        }
        rules.push(Rule {
            from: r.from.iter().map(source_from).collect(),
            to,
        });
    }
    Ok(Policy {
        name: p.name.clone(),
        target: Target {
            spiffe_ids: p.target_spiffe_ids.clone(),
        },
        action,
        rules,
    })
}

/// A bundle as a message.
pub fn bundle_to_proto(b: &Bundle) -> types::Bundle {
    types::Bundle {
        trust_domain: b.trust_domain.to_string(),
        x509_authorities: b.x509_authorities.clone(),
        jwt_authorities: b
            .jwt_authorities
            .iter()
            .map(|a| types::JwtKey {
                key_id: a.key_id.clone(),
                public_key: a.public_key.clone(),
                expires_at: 0,
            })
            .collect(),
        sequence: b.sequence,
        refresh_hint_seconds: b.refresh_hint_secs.unwrap_or(0).min(u64::from(u32::MAX)) as u32,
    }
}

/// A service as a message.
pub fn service_to_proto(s: &Service, revision: u64, origin: &str) -> types::Service {
    types::Service {
        name: s.name.clone(),
        addresses: s.addresses.iter().map(ToString::to_string).collect(),
        ports: s
            .ports
            .iter()
            .map(|p| types::ServicePort {
                name: p.name.clone(),
                port: u32::from(p.port),
                target_port: p.target_port.map_or(0, u32::from),
            })
            .collect(),
        endpoints: s
            .endpoints
            .iter()
            .map(|e| types::ServiceEndpoint {
                address: e.address.to_string(),
                ports: e
                    .ports
                    .iter()
                    .map(|(k, v)| (k.clone(), u32::from(*v)))
                    .collect(),
                spiffe_ids: e.ids.iter().map(ToString::to_string).collect(),
                ready: e.ready,
                serving: e.serving,
                terminating: e.terminating,
                pod: e.pod.clone().unwrap_or_default(),
            })
            .collect(),
        revision,
        origin: origin.to_owned(),
        routes: routes_to_proto(&s.routes),
    }
}

/// A service message as a service, validated; errors name the field.
pub fn service_from_proto(m: &types::Service) -> Result<Service, String> {
    let port = |what: &str, v: u32| {
        u16::try_from(v).map_err(|_| format!("service {:?}: {what} {v} is not a port", m.name))
    };
    let ip = |what: &str, v: &str| {
        v.parse::<std::net::IpAddr>()
            .map_err(|_| format!("service {:?}: {what} {v:?} is not an IP address", m.name))
    };
    let s = Service {
        name: m.name.clone(),
        addresses: m
            .addresses
            .iter()
            .map(|a| ip("address", a))
            .collect::<Result<_, _>>()?,
        ports: m
            .ports
            .iter()
            .map(|p| {
                Ok(ServicePort {
                    name: p.name.clone(),
                    port: port("port", p.port)?,
                    target_port: match p.target_port {
                        0 => None,
                        t => Some(port("target_port", t)?),
                    },
                })
            })
            .collect::<Result<_, String>>()?,
        endpoints: m
            .endpoints
            .iter()
            .map(|e| {
                Ok(Endpoint {
                    address: ip("endpoint address", &e.address)?,
                    ports: e
                        .ports
                        .iter()
                        .map(|(k, v)| Ok((k.clone(), port("endpoint port", *v)?)))
                        .collect::<Result<_, String>>()?,
                    ids: e
                        .spiffe_ids
                        .iter()
                        .map(|i| {
                            SpiffeId::new(i).map_err(|err| {
                                format!("service {:?}: endpoint ID {i:?}: {err}", m.name)
                            })
                        })
                        .collect::<Result<_, _>>()?,
                    ready: e.ready,
                    serving: e.serving,
                    terminating: e.terminating,
                    pod: (!e.pod.is_empty()).then(|| e.pod.clone()),
                })
            })
            .collect::<Result<_, String>>()?,
        routes: routes_from_proto(&m.routes).map_err(|e| format!("service {:?}: {e}", m.name))?,
    };
    s.validate().map_err(|e| e.to_string())?;
    Ok(s)
}

/// A bundle message as a bundle; fails on an invalid trust domain name.
pub fn bundle_from_proto(b: &types::Bundle) -> Result<Bundle, String> {
    let td = TrustDomain::new(&b.trust_domain)
        .map_err(|e| format!("bundle trust domain {:?}: {e}", b.trust_domain))?;
    Ok(Bundle {
        trust_domain: td,
        x509_authorities: b.x509_authorities.clone(),
        jwt_authorities: b
            .jwt_authorities
            .iter()
            .map(|k| JwtAuthority {
                key_id: k.key_id.clone(),
                public_key: k.public_key.clone(),
            })
            .collect(),
        sequence: b.sequence,
        refresh_hint_secs: (b.refresh_hint_seconds > 0)
            .then_some(u64::from(b.refresh_hint_seconds)),
    })
}
