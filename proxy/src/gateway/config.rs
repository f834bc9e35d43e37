//! The ingress gateway's configuration: its listeners (`role: gateway`) and the `gateway`
//! section they share — certificates, routes to mesh services, HSTS, per-client rate limits and
//! request size.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use ward_net::duration::serde_str;
use ward_spiffe::route::HttpRoute;

/// A gateway listener: public HTTPS (or HTTP) from clients outside the mesh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayListener {
    /// Name (metrics, logs).
    pub name: String,
    /// Address clients connect to (`0.0.0.0:443`).
    pub listen: SocketAddr,
    /// `https` (TLS terminated with the gateway's certificates) or `http`.
    #[serde(default)]
    pub protocol: GatewayProtocol,
    /// For an `http` listener: answer every request with a redirect to HTTPS on this port
    /// (ACME HTTP-01 challenges excepted) instead of routing it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect_to_https: Option<u16>,
    /// Load balancers (addresses) that open each connection with a PROXY protocol v2 header
    /// naming the client: from them the header is required and its source is the client's
    /// address (rate limits, forwarding headers, the access log); from anyone else a
    /// connection is served as it is.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub proxy_protocol_from: Vec<ward_spiffe::cidr::Cidr>,
    /// With `gateway.kubernetes_gateway`: the Gateway listener port this listener serves
    /// (its routes are those attached to the Gateway's listeners on that port). Default: the
    /// port it listens on (a pod listening on 8443 behind a Service port 443 says 443).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// What a gateway listener speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GatewayProtocol {
    /// TLS, with the certificate the client's server name selects; HTTP/2 or HTTP/1.1 inside.
    #[default]
    Https,
    /// Plaintext HTTP/1.1 (or prior-knowledge HTTP/2).
    Http,
}

/// What every gateway listener of the proxy shares.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayCfg {
    /// Certificates for HTTPS listeners, each served for the DNS names it carries (the
    /// client's server name selects one; without a match, the first is served).
    #[serde(default)]
    pub certificates: Vec<CertFiles>,
    /// Certificates ordered from an ACME server (Let's Encrypt) for the gateway's hostnames.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acme: Option<super::acme::AcmeCfg>,
    /// Routes by host and path to mesh services (the Gateway API's HTTPRoute model, with
    /// `hostnames`).
    #[serde(default)]
    pub routes: Vec<HttpRoute>,
    /// Serve the routes of this Kubernetes Gateway (`namespace/name`, of a GatewayClass with
    /// controller `ward.dev/gateway`) instead of `routes`: the CA attaches the Gateway's
    /// HTTPRoutes and GRPCRoutes to its listeners and sends them through the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes_gateway: Option<String>,
    /// With `kubernetes_gateway`: read the TLS Secrets its HTTPS listeners name in
    /// `certificateRefs` from the API server (`{}`: the pod's service account) and serve them
    /// like certificate files, following them as they change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesCfg>,
    /// `Strict-Transport-Security` on every HTTPS response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hsts: Option<Hsts>,
    /// Requests each client address may make (IPv6 clients by /64); more: 429.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// The largest request body a client may declare; more: 413.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_request_body_bytes: Option<u64>,
}

/// How the gateway reaches the Kubernetes API server.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesCfg {
    /// A kubeconfig file; default: the in-cluster service account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<PathBuf>,
}

/// A certificate chain and its key, PEM files (re-read when they change).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertFiles {
    /// The chain, leaf first.
    pub cert: PathBuf,
    /// The private key (PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
}

/// HTTP Strict Transport Security.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hsts {
    /// How long browsers remember to use HTTPS only.
    #[serde(default = "default_hsts_age", with = "serde_str")]
    pub max_age: Duration,
    /// For subdomains too.
    #[serde(default)]
    pub include_subdomains: bool,
    /// Ask to be preloaded by browsers.
    #[serde(default)]
    pub preload: bool,
}

fn default_hsts_age() -> Duration {
    Duration::from_secs(365 * 86400)
}

impl Hsts {
    /// The header value.
    pub fn header(&self) -> String {
        let mut v = format!("max-age={}", self.max_age.as_secs());
        if self.include_subdomains {
            v.push_str("; includeSubDomains");
        }
        if self.preload {
            v.push_str("; preload");
        }
        v
    }
}

/// A per-client request rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Sustained requests per second.
    pub requests_per_second: u32,
    /// Requests allowed at once above the rate (default: one second's worth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

/// The mesh service record carrying the routes of Gateway `namespace/name` (as the CA names
/// it); `None` when `gateway` is not `namespace/name`.
pub fn record_name(gateway: &str) -> Option<String> {
    let (ns, name) = gateway.split_once('/')?;
    let label = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    (label(ns) && name.split('.').all(label) && name.len() <= 253)
        .then(|| format!("{name}.{ns}.gateway"))
}

impl GatewayCfg {
    /// Checks what can be checked without reading files.
    pub fn validate(&self, listeners: &[&GatewayListener]) -> Result<(), String> {
        if self.kubernetes.is_some() && self.kubernetes_gateway.is_none() {
            return Err(
                "gateway.kubernetes reads a Gateway's certificateRefs: set gateway.kubernetes_gateway"
                    .into(),
            );
        }
        if let Some(g) = &self.kubernetes_gateway {
            if record_name(g).is_none() {
                return Err(format!(
                    "gateway.kubernetes_gateway {g:?} must be namespace/name of a Gateway"
                ));
            }
            if !self.routes.is_empty() {
                return Err(
                    "gateway: routes come from gateway.kubernetes_gateway; leave gateway.routes empty"
                        .into(),
                );
            }
        }
        let hosts =
            ward_spiffe::vhost::VirtualHosts::compile(&self.routes).map_err(|e| e.to_string())?;
        if let Some(a) = &self.acme {
            a.validate(hosts.exact_hostnames())?;
        }
        for l in listeners {
            match (l.protocol, l.redirect_to_https) {
                (GatewayProtocol::Https, Some(_)) => {
                    return Err(format!(
                        "gateway {}: redirect_to_https is for an http listener",
                        l.name
                    ));
                }
                (GatewayProtocol::Https, None)
                    if self.certificates.is_empty()
                        && self.acme.is_none()
                        && self.kubernetes.is_none() =>
                {
                    return Err(format!(
                        "gateway {}: an https listener needs gateway.certificates, gateway.acme or gateway.kubernetes (certificateRefs)",
                        l.name
                    ));
                }
                (_, Some(0)) => return Err(format!("gateway {}: redirect_to_https: 0", l.name)),
                _ => {}
            }
        }
        if let Some(r) = &self.rate_limit
            && (r.requests_per_second == 0 || r.burst == Some(0))
        {
            return Err("gateway.rate_limit: requests_per_second and burst must be > 0".into());
        }
        if let Some(h) = &self.hsts
            && h.preload
            && (!h.include_subdomains || h.max_age < Duration::from_secs(365 * 86400))
        {
            return Err(
                "gateway.hsts: preload needs include_subdomains and a max_age of at least 365d"
                    .into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn listener(protocol: GatewayProtocol, redirect: Option<u16>) -> GatewayListener {
        GatewayListener {
            name: "g".into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            protocol,
            redirect_to_https: redirect,
            proxy_protocol_from: vec![],
            port: None,
        }
    }

    #[test]
    fn inconsistent_gateways_are_refused_with_the_reason() {
        let certs = GatewayCfg {
            certificates: vec![CertFiles {
                cert: "c".into(),
                key: "k".into(),
            }],
            ..Default::default()
        };
        let cases: [(GatewayCfg, GatewayListener, &str); 7] = [
            (
                serde_yaml_ng::from_str("kubernetes_gateway: web").unwrap(),
                listener(GatewayProtocol::Http, None),
                "must be namespace/name",
            ),
            (
                serde_yaml_ng::from_str(
                    "kubernetes_gateway: shop/web\nroutes: [ { name: r, rules: [] } ]",
                )
                .unwrap(),
                listener(GatewayProtocol::Http, None),
                "leave gateway.routes empty",
            ),
            (
                GatewayCfg::default(),
                listener(GatewayProtocol::Https, None),
                "needs gateway.certificates",
            ),
            (
                certs.clone(),
                listener(GatewayProtocol::Https, Some(443)),
                "redirect_to_https is for an http listener",
            ),
            (
                GatewayCfg {
                    rate_limit: Some(RateLimit {
                        requests_per_second: 0,
                        burst: None,
                    }),
                    ..certs.clone()
                },
                listener(GatewayProtocol::Https, None),
                "rate_limit",
            ),
            (
                GatewayCfg {
                    hsts: Some(Hsts {
                        max_age: Duration::from_secs(60),
                        include_subdomains: true,
                        preload: true,
                    }),
                    ..certs.clone()
                },
                listener(GatewayProtocol::Https, None),
                "preload",
            ),
            (
                serde_yaml_ng::from_str("routes: [ { name: r, hostnames: [\"BAD\"], rules: [] } ]")
                    .unwrap(),
                listener(GatewayProtocol::Http, Some(443)),
                "lowercase DNS name",
            ),
        ];
        for (cfg, l, why) in cases {
            let e = cfg.validate(&[&l]).unwrap_err();
            assert!(e.contains(why), "{why}: {e}");
        }
        certs
            .validate(&[&listener(GatewayProtocol::Https, None)])
            .unwrap();
        GatewayCfg::default()
            .validate(&[&listener(GatewayProtocol::Http, Some(443))])
            .unwrap();
        assert_eq!(record_name("shop/web").as_deref(), Some("web.shop.gateway"));
        assert_eq!(record_name("shop/../x"), None);
        assert_eq!(
            Hsts {
                max_age: Duration::from_secs(365 * 86400),
                include_subdomains: true,
                preload: true
            }
            .header(),
            "max-age=31536000; includeSubDomains; preload"
        );
    }
}
