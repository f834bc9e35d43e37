//! The pod-template annotations `inject` reads, parsed with errors that name the annotation
//! and the item.

use std::net::SocketAddr;

use serde_yaml_ng::Value;
use ward_spiffe::SpiffeId;

use crate::config::{MeshRoute, Outbound, Protocol};
use ward_spiffe::cidr::Cidr;

/// The value of annotation `key` of a pod template.
pub(super) fn annotation<'a>(template: &'a Value, key: &str) -> Option<&'a str> {
    template
        .get("metadata")?
        .get("annotations")?
        .get(key)?
        .as_str()
}

fn items(annotation: &str) -> impl Iterator<Item = &str> {
    annotation
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// Parses `ward.dev/outbound`: `<local port>=<host>:<port>@<spiffe id>`, comma-separated.
pub(super) fn outbound(annotation: &str) -> Result<Vec<Outbound>, String> {
    let mut out = Vec::new();
    for item in items(annotation) {
        let bad = |why: &str| {
            format!(
                "ward.dev/outbound {item:?}: {why} (want <local port>=<host>:<port>@<spiffe id>)"
            )
        };
        let (local, rest) = item.split_once('=').ok_or_else(|| bad("no '='"))?;
        let (upstream, id) = rest.split_once('@').ok_or_else(|| bad("no '@'"))?;
        let local: u16 = local.trim().parse().map_err(|_| bad("bad local port"))?;
        let (host, port) = upstream
            .rsplit_once(':')
            .ok_or_else(|| bad("no upstream port"))?;
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(bad("bad upstream"));
        }
        let id = SpiffeId::new(id.trim()).map_err(|e| bad(&e.to_string()))?;
        out.push(Outbound {
            name: format!("out-{local}"),
            listen: SocketAddr::from(([127, 0, 0, 1], local)),
            upstream: upstream.to_owned(),
            expected_ids: vec![id],
            protocol: Protocol::Http,
        });
    }
    Ok(out)
}

/// Parses `ward.dev/mesh-routes`: `<address or CIDR>[:<port>]=<spiffe id>`, comma-separated
/// (IPv6 in brackets when a port follows: `[fd00::5]:8080=...`).
pub(super) fn mesh_routes(annotation: &str) -> Result<Vec<MeshRoute>, String> {
    let mut out = Vec::new();
    for item in items(annotation) {
        let bad = |why: &str| {
            format!(
                "ward.dev/mesh-routes {item:?}: {why} (want <address or CIDR>[:<port>]=<spiffe id>)"
            )
        };
        let (dst, id) = item.split_once('=').ok_or_else(|| bad("no '='"))?;
        let dst = dst.trim();
        let (net, port) = if let Some(rest) = dst.strip_prefix('[') {
            let (net, tail) = rest.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
            let port = match tail.strip_prefix(':') {
                Some(p) => Some(p),
                None if tail.is_empty() => None,
                None => return Err(bad("junk after ']'")),
            };
            (net, port)
        } else if dst.matches(':').count() == 1 {
            let (n, p) = dst.split_once(':').ok_or_else(|| bad("bad address"))?;
            (n, Some(p))
        } else {
            (dst, None)
        };
        let dst: Cidr = net.parse().map_err(|e: String| bad(&e))?;
        let ports = match port {
            Some(p) => vec![p.parse::<u16>().map_err(|_| bad("bad port"))?],
            None => Vec::new(),
        };
        let id = SpiffeId::new(id.trim()).map_err(|e| bad(&e.to_string()))?;
        out.push(MeshRoute {
            dst,
            ports,
            expected_ids: vec![id],
        });
    }
    Ok(out)
}

/// Parses a comma-separated port list annotation.
pub(super) fn ports(key: &str, annotation: &str) -> Result<Vec<u16>, String> {
    items(annotation)
        .map(|p| {
            p.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{key}: {p:?} is not a port"))
        })
        .collect()
}

/// Parses a comma-separated CIDR list annotation.
pub(super) fn cidrs(key: &str, annotation: &str) -> Result<Vec<Cidr>, String> {
    items(annotation)
        .map(|c| c.parse::<Cidr>().map_err(|e| format!("{key}: {e}")))
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn mesh_routes_parse() {
        let r = mesh_routes(
            "10.96.12.7:80=spiffe://e.org/api, 10.1.0.0/16=spiffe://e.org/db,[fd00::5]:8080=spiffe://e.org/six,fd00:1::/64=spiffe://e.org/net6",
        )
        .unwrap();
        assert_eq!(r.len(), 4);
        assert_eq!(
            (r[0].dst.to_string(), r[0].ports.clone()),
            ("10.96.12.7/32".into(), vec![80])
        );
        assert_eq!(
            (r[1].dst.to_string(), r[1].ports.clone()),
            ("10.1.0.0/16".into(), vec![])
        );
        assert_eq!(
            (r[2].dst.to_string(), r[2].ports.clone()),
            ("fd00::5/128".into(), vec![8080])
        );
        assert_eq!(
            (r[3].dst.to_string(), r[3].ports.clone()),
            ("fd00:1::/64".into(), vec![])
        );
        for bad in [
            "10.0.0.1:80",
            "x=spiffe://e.org/a",
            "10.0.0.1:99999=spiffe://e.org/a",
            "10.0.0.1=nope",
        ] {
            let e = mesh_routes(bad).unwrap_err();
            assert!(e.contains("ward.dev/mesh-routes"), "{e}");
        }
        assert_eq!(ports("k", "1, 2").unwrap(), vec![1, 2]);
        assert!(ports("k", "0").is_err());
        assert!(cidrs("k", "10.0.0.0/8, 169.254.169.254").unwrap().len() == 2);
        assert!(cidrs("k", "nope").unwrap_err().starts_with("k: "));
    }
}
