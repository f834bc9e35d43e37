//! Egress at the sidecar: the external services in force (`ward_spiffe::egress`) and the
//! proxy's own resolver. A destination egress allows by name is reached at the address this
//! resolver gives for that name — never at the address the application dialled — so an
//! allowed SNI or Host sent to another address, an IP literal, or a DNS answer the
//! application got elsewhere reaches nothing it should not. Answers are cached for their TTL
//! (hickory), so a changed record is followed once the old one expires.

use std::net::SocketAddr;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use serde::{Deserialize, Serialize};
use ward_spiffe::egress::{EgressDoc, EgressSet};

/// The `egress` section of the proxy's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressCfg {
    /// The DNS server that resolves allowed names (`10.96.0.10:53`); none: the system's
    /// (`/etc/resolv.conf`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<SocketAddr>,
    /// The external services and the default for other destinations (with `from_agent`:
    /// only until the agent's first answer; none given: deny everything outside the mesh).
    #[serde(default)]
    pub policy: EgressDoc,
    /// Follow the mesh's egress configuration from the agent (with the policies:
    /// `authorization.from_agent` must be on).
    #[serde(default)]
    pub from_agent: bool,
    /// Send every destination outside the mesh through this egress gateway (over mTLS, with
    /// this workload's identity) instead of deciding and connecting here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewayRef>,
    /// PEM roots trusted for TLS origination besides the public ones (a private CA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origination_roots: Option<std::path::PathBuf>,
}

/// Where the egress gateway is and who it must be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayRef {
    /// `host:port` of the gateway's `egress-gateway` listener.
    pub address: String,
    /// SPIFFE IDs the gateway may present (at least one).
    pub expected_ids: Vec<ward_spiffe::SpiffeId>,
}

/// Resolver options for connection-time lookups: A first and AAAA only when there is none
/// (asking both in parallel waits for the slower answer), and "no such record" answers kept
/// for a few seconds — a local DNS server often sends them without the SOA that sets their
/// TTL, and an uncached one costs a DNS round trip on every new connection.
fn tune(o: &mut hickory_resolver::config::ResolverOpts) {
    o.ip_strategy = hickory_resolver::config::LookupIpStrategy::Ipv4thenIpv6;
    o.negative_min_ttl = Some(std::time::Duration::from_secs(5));
}

/// The client TLS of TLS origination: the public roots (webpki-roots) and `extra`.
fn origination_tls(extra: Option<&std::path::Path>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = extra {
        let pem = std::fs::read(path)
            .map_err(|e| format!("egress: origination_roots {}: {e}", path.display()))?;
        let mut n = 0;
        use rustls_pki_types::pem::PemObject as _;
        for c in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
            let c = c.map_err(|e| format!("egress: origination_roots {}: {e}", path.display()))?;
            roots
                .add(c)
                .map_err(|e| format!("egress: origination_roots {}: {e}", path.display()))?;
            n += 1;
        }
        if n == 0 {
            return Err(format!(
                "egress: origination_roots {}: no certificate",
                path.display()
            ));
        }
    }
    let mut cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Egress state: the compiled services and the resolver.
pub struct Egress {
    set: std::sync::RwLock<std::sync::Arc<EgressSet>>,
    from_agent: bool,
    gateway: Option<GatewayRef>,
    origination: std::sync::Arc<rustls::ClientConfig>,
    resolver: TokioResolver,
    dns: String,
}

impl std::fmt::Debug for Egress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Egress")
            .field("set", &self.set)
            .field("dns", &self.dns)
            .finish()
    }
}

impl Egress {
    /// Checks the services and builds the resolver (must run inside the Tokio runtime).
    pub fn new(cfg: &EgressCfg) -> Result<Self, String> {
        let set = EgressSet::compile(cfg.policy.clone()).map_err(|e| format!("egress: {e}"))?;
        let provider = TokioRuntimeProvider::default();
        let (resolver, dns) = match cfg.dns {
            Some(addr) => {
                let mut udp = ConnectionConfig::udp();
                udp.port = addr.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = addr.port();
                let ns = NameServerConfig::new(addr.ip(), true, vec![udp, tcp]);
                let config = ResolverConfig::from_parts(None, Vec::new(), vec![ns]);
                let mut b = TokioResolver::builder_with_config(config, provider);
                tune(b.options_mut());
                let r = b
                    .build()
                    .map_err(|e| format!("egress: resolver for {addr}: {e}"))?;
                (r, addr.to_string())
            }
            None => {
                let r = TokioResolver::builder(provider)
                    .and_then(|mut b| {
                        tune(b.options_mut());
                        b.build()
                    })
                    .map_err(|e| format!("egress: system resolver: {e}"))?;
                (r, "system".to_owned())
            }
        };
        let origination = std::sync::Arc::new(origination_tls(cfg.origination_roots.as_deref())?);
        Ok(Self {
            origination,
            set: std::sync::RwLock::new(std::sync::Arc::new(set)),
            from_agent: cfg.from_agent,
            gateway: cfg.gateway.clone(),
            resolver,
            dns,
        })
    }

    /// The external services in force.
    pub fn set(&self) -> std::sync::Arc<EgressSet> {
        self.set.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The client TLS configuration of TLS origination.
    pub fn origination(&self) -> std::sync::Arc<rustls::ClientConfig> {
        self.origination.clone()
    }

    /// The gateway every destination outside the mesh goes through, if any.
    pub fn gateway(&self) -> Option<&GatewayRef> {
        self.gateway.as_ref()
    }

    /// Whether the set follows the agent.
    pub fn from_agent(&self) -> bool {
        self.from_agent
    }

    /// Replaces the set (from the agent); a configuration that does not compile changes
    /// nothing.
    pub fn replace(&self, doc: EgressDoc) -> Result<(), String> {
        let set = EgressSet::compile(doc).map_err(|e| e.to_string())?;
        *self.set.write().unwrap_or_else(|p| p.into_inner()) = std::sync::Arc::new(set);
        Ok(())
    }

    /// Where `name:port` is, by this proxy's own resolution (IPv4 answers first).
    pub async fn resolve(&self, name: &str, port: u16) -> Result<SocketAddr, String> {
        // Absolute: no search domains, the name as allowed.
        let fqdn = format!("{}.", name.trim_end_matches('.'));
        let answer = self
            .resolver
            .lookup_ip(fqdn.as_str())
            .await
            .map_err(|e| format!("cannot resolve {name} (DNS {}): {e}", self.dns))?;
        let mut ips: Vec<_> = answer.iter().collect();
        ips.sort_by_key(std::net::IpAddr::is_ipv6);
        ips.first()
            .map(|ip| SocketAddr::new(*ip, port))
            .ok_or_else(|| format!("{name} has no address (DNS {})", self.dns))
    }
}
