//! The egress configuration and its message. The conversion back checks the enumerations,
//! ports and address ranges and names what does not fit; `EgressSet::compile` checks the rest.

use ward_spiffe::egress::{EgressDoc, ExternalService, Mode, Protocol};

use super::{source_from, source_to};
use crate::types;

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Deny => "deny",
        Mode::Allow => "allow",
    }
}

fn mode(s: &str) -> Result<Mode, String> {
    match s {
        "" | "deny" => Ok(Mode::Deny),
        "allow" => Ok(Mode::Allow),
        other => Err(format!("egress mode {other:?} is not deny or allow")),
    }
}

/// The configuration as a message.
pub fn egress_to_proto(d: &EgressDoc, revision: u64) -> types::EgressConfig {
    types::EgressConfig {
        default_mode: mode_name(d.default).to_owned(),
        namespaces: d
            .namespaces
            .iter()
            .map(|(k, v)| (k.clone(), mode_name(*v).to_owned()))
            .collect(),
        services: d
            .services
            .iter()
            .map(|s| types::ExternalService {
                name: s.name.clone(),
                protocol: match s.protocol {
                    Protocol::Tls => "tls",
                    Protocol::Http => "http",
                    Protocol::Tcp => "tcp",
                }
                .to_owned(),
                hosts: s.hosts.clone(),
                addresses: s.addresses.iter().map(ToString::to_string).collect(),
                ports: s.ports.iter().map(|p| u32::from(*p)).collect(),
                from: s.from.iter().map(source_to).collect(),
                originate_tls_port: s.originate_tls.map_or(0, u32::from),
            })
            .collect(),
        revision,
    }
}

/// The message as a configuration (not yet compiled).
pub fn egress_from_proto(m: &types::EgressConfig) -> Result<EgressDoc, String> {
    let mut services = Vec::new();
    for s in &m.services {
        let bad = |e: String| format!("external service {:?}: {e}", s.name);
        let protocol = match s.protocol.as_str() {
            "tls" => Protocol::Tls,
            "http" => Protocol::Http,
            "tcp" => Protocol::Tcp,
            other => return Err(bad(format!("protocol {other:?} is not tls, http or tcp"))),
        };
        services.push(ExternalService {
            name: s.name.clone(),
            protocol,
            hosts: s.hosts.clone(),
            addresses: s
                .addresses
                .iter()
                .map(|a| a.parse())
                .collect::<Result<_, String>>()
                .map_err(bad)?,
            ports: s
                .ports
                .iter()
                .map(|p| u16::try_from(*p).map_err(|_| bad(format!("port {p} is out of range"))))
                .collect::<Result<_, _>>()?,
            from: s.from.iter().map(source_from).collect(),
            originate_tls: match s.originate_tls_port {
                0 => None,
                p => Some(
                    u16::try_from(p)
                        .map_err(|_| bad(format!("originate_tls port {p} is out of range")))?,
                ),
            },
        });
    }
    Ok(EgressDoc {
        default: mode(&m.default_mode)?,
        namespaces: m
            .namespaces
            .iter()
            .map(|(k, v)| Ok((k.clone(), mode(v)?)))
            .collect::<Result<_, String>>()?,
        services,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn egress_survives_the_round_trip() {
        let doc: EgressDoc = serde_json::from_value(serde_json::json!({
            "default": "deny", "namespaces": { "legacy": "allow" },
            "services": [
                { "name": "stripe", "protocol": "tls", "hosts": ["api.stripe.com", "*.stripe.com"],
                  "ports": [443], "from": [ { "namespaces": ["shop"], "not_principals": ["spiffe://t/ns/shop/sa/x"] } ] },
                { "name": "db", "protocol": "tcp", "addresses": ["192.0.2.0/24"], "ports": [5432],
                  "from": [ { "principals": ["*"] } ] },
                { "name": "status", "protocol": "http", "hosts": ["status.example.com"], "ports": [80],
                  "originate_tls": 443, "from": [ { "principals": ["*"] } ] } ]
        }))
        .unwrap();
        assert_eq!(egress_from_proto(&egress_to_proto(&doc, 3)).unwrap(), doc);
        let mut m = egress_to_proto(&doc, 3);
        m.services[1].ports[0] = 70000;
        assert!(egress_from_proto(&m).unwrap_err().contains("port 70000"));
        m.services[1].protocol = "udp".into();
        assert!(egress_from_proto(&m).unwrap_err().contains("\"udp\""));
        let mut m = egress_to_proto(&doc, 3);
        m.default_mode = "maybe".into();
        assert!(egress_from_proto(&m).unwrap_err().contains("maybe"));
    }
}
