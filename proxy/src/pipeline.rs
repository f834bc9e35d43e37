//! The one data path every listener runs, whatever its role:
//!
//! ```text
//! listen ─▶ tls (inbound: mTLS, or plaintext when allowed) ─▶ detect (HTTP or opaque TCP)
//!        ─▶ plan (pure: deliver / mesh / refuse) ─▶ forward (pools, mTLS with the expected ID)
//!        ─▶ observe (one record: access log + metrics)
//! ```
//!
//! A role is data ([`RoleCfg`]) that decides which stages run and what `plan` is told; the
//! stages themselves live in their modules (`listen`, `tls`, `detect`, `plan`, `forward`,
//! `observe`, `refusal`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use ward_net::{CredentialSink, PeerPolicy};
use ward_spiffe::SpiffeId;

use crate::authz::Authz;
use crate::config::{
    AppAddress, AppProtocol, Listener, MeshRoute, PortMode, Probe, Protocol, TlsMode,
    UnknownDestination,
};
use crate::detect::{Opening, Prefixed, Sniffed, opening, sniff};
use crate::forward::pools::{AppClients, Upstreams};
use crate::metrics::ConnGuard;
use crate::observe::Observer;
use crate::plan::{Arrived, Knows, Plan, Role};
use crate::tls::ListenerTls;

/// How long detection waits for a client's first bytes.
pub const SNIFF_WAIT: Duration = Duration::from_millis(500);

/// What every listener of a proxy shares.
#[derive(Debug)]
pub struct Shared {
    /// The credential sink.
    pub sink: Arc<CredentialSink>,
    /// Server TLS for inbound roles (any trusted peer; policy decides per request).
    pub server_tls: ListenerTls,
    /// Authorization.
    pub authz: Arc<Authz>,
    /// Access log and metrics.
    pub obs: Observer,
    /// Header carrying the verified peer ID to the application.
    pub header: HeaderName,
    /// Clients per application address.
    pub apps: AppClients,
    /// Pools per peer proxy.
    pub upstreams: Upstreams,
    /// Service discovery, when configured.
    pub discovery: Option<crate::discover::Discovery>,
    /// How endpoints are chosen.
    pub balancer: crate::balance::Balancer,
    /// Retries and timeouts of requests to mesh services.
    pub discovery_cfg: crate::config::DiscoveryCfg,
    /// External services and the resolver for them, when configured.
    pub egress: Option<Arc<crate::egress::Egress>>,
    /// Pass method-override headers on to the application.
    pub forward_method_override: bool,
    /// What one HTTP client may send.
    pub http_limits: crate::config::HttpLimits,
    /// How long a connection may do nothing (`connection_limits.idle_timeout`).
    pub idle_timeout: std::time::Duration,
    /// The ingress gateway's routes, certificates and limits, when it has gateway listeners.
    pub gateway: Option<Arc<crate::gateway::Gateway>>,
}

impl Shared {
    /// This workload's ID, once an SVID is held.
    pub fn own_id(&self) -> Option<SpiffeId> {
        self.server_tls.own_id()
    }
}

/// A listener's role and its settings.
#[derive(Debug, Clone)]
pub enum RoleCfg {
    /// See [`crate::config::Inbound`].
    Inbound {
        /// The application.
        forward_to: String,
        /// Its port (what authorization sees, as for captured traffic).
        app_port: u16,
        /// Plaintext allowed?
        tls: TlsMode,
        /// HTTP version to the application.
        app_protocol: AppProtocol,
    },
    /// See [`crate::config::Outbound`].
    Outbound {
        /// The peer proxy.
        upstream: String,
        /// IDs it may present.
        expected: Vec<SpiffeId>,
    },
    /// See [`crate::config::InboundCapture`].
    InboundCapture {
        /// Where the application is reached.
        app_address: AppAddress,
        /// Ports without an override.
        default_port: PortMode,
        /// Per-port overrides.
        ports: std::collections::BTreeMap<u16, PortMode>,
        /// Probes unauthenticated callers may reach (empty if not authorized).
        probes: Vec<Probe>,
    },
    /// See [`crate::config::OutboundCapture`].
    OutboundCapture {
        /// Mesh destinations.
        routes: Vec<MeshRoute>,
        /// Other destinations.
        unknown: UnknownDestination,
    },
    /// See [`crate::config::EgressGateway`].
    EgressGateway,
    /// See [`crate::gateway::config::GatewayListener`].
    Gateway {
        /// TLS terminated here.
        https: bool,
        /// Only redirect to HTTPS on this port.
        redirect_to_https: Option<u16>,
        /// Load balancers whose connections open with a PROXY v2 header.
        proxy_protocol_from: Vec<ward_spiffe::cidr::Cidr>,
        /// The Gateway listener port whose routes it serves.
        serves_port: u16,
    },
}

impl RoleCfg {
    /// Whether the role serves callers from outside the pod (its peer is the source) rather
    /// than the local application (this workload is the source).
    pub fn is_inbound(&self) -> bool {
        matches!(
            self,
            RoleCfg::Inbound { .. } | RoleCfg::InboundCapture { .. } | RoleCfg::EgressGateway
        )
    }

    /// Whether the role serves callers outside the mesh (the ingress gateway).
    pub fn is_gateway(&self) -> bool {
        matches!(self, RoleCfg::Gateway { .. })
    }
}

/// One listener: its name, bound port, protocol setting, role, and the shared parts.
#[derive(Debug)]
pub struct ListenerCtx {
    /// Name (metrics, logs).
    pub name: Arc<str>,
    /// The bound port (what authorization sees).
    pub port: u16,
    /// HTTP, TCP or detected.
    pub protocol: Protocol,
    /// Role.
    pub role: RoleCfg,
    /// Shared parts.
    pub shared: Arc<Shared>,
}

impl ListenerCtx {
    /// The context of configured listener `l`, bound on `port`.
    pub fn new(l: &Listener, port: u16, shared: Arc<Shared>) -> Self {
        let (protocol, role) = match l {
            Listener::Inbound(i) => (
                i.protocol,
                RoleCfg::Inbound {
                    forward_to: i.forward_to.clone(),
                    app_port: i
                        .forward_to
                        .rsplit_once(':')
                        .and_then(|(_, p)| p.parse().ok())
                        .unwrap_or(port),
                    tls: i.tls,
                    app_protocol: i.app_protocol,
                },
            ),
            Listener::Outbound(o) => (
                o.protocol,
                RoleCfg::Outbound {
                    upstream: o.upstream.clone(),
                    expected: o.expected_ids.clone(),
                },
            ),
            Listener::InboundCapture(c) => (
                c.default_port.protocol,
                RoleCfg::InboundCapture {
                    app_address: c.app_address,
                    default_port: c.default_port,
                    ports: c.ports.clone(),
                    probes: if c.authorize_probes {
                        c.probes.clone()
                    } else {
                        Vec::new()
                    },
                },
            ),
            Listener::OutboundCapture(c) => (
                c.protocol,
                RoleCfg::OutboundCapture {
                    routes: c.routes.clone(),
                    unknown: c.unknown,
                },
            ),
            Listener::EgressGateway(_) => (Protocol::Auto, RoleCfg::EgressGateway),
            Listener::Gateway(g) => (
                Protocol::Http,
                RoleCfg::Gateway {
                    https: g.protocol == crate::gateway::config::GatewayProtocol::Https,
                    redirect_to_https: g.redirect_to_https,
                    proxy_protocol_from: g.proxy_protocol_from.clone(),
                    serves_port: g.port.unwrap_or(port),
                },
            ),
        };
        Self {
            name: Arc::from(l.name()),
            port,
            protocol,
            role,
            shared,
        }
    }

    /// The role as `plan` sees it for connection `conn`.
    pub fn plan_role<'r>(&'r self, conn: &'r ConnInfo) -> Role<'r> {
        match &self.role {
            RoleCfg::Inbound { forward_to, .. } => Role::Inbound {
                app: forward_to,
                probes: &[],
            },
            RoleCfg::Outbound { upstream, expected } => Role::Outbound { upstream, expected },
            RoleCfg::InboundCapture { probes, .. } => Role::Inbound {
                app: &conn.target,
                probes,
            },
            RoleCfg::OutboundCapture { routes, unknown } => Role::OutboundCapture {
                routes,
                unknown: *unknown,
                dst: &conn.target,
            },
            RoleCfg::EgressGateway => Role::EgressGateway,
            RoleCfg::Gateway {
                https,
                redirect_to_https,
                ..
            } => Role::Gateway {
                https: *https,
                redirect_to_https: *redirect_to_https,
            },
        }
    }

    /// What discovery says about where `conn` goes (outbound roles with discovery only).
    pub async fn destination(&self, conn: &ConnInfo) -> Option<crate::discover::Resolution> {
        let d = self.shared.discovery.as_ref()?;
        let authority = match &self.role {
            RoleCfg::Outbound { upstream, .. } => upstream.as_str(),
            RoleCfg::OutboundCapture { .. } => conn.target.as_str(),
            _ => return None,
        };
        d.resolve(authority).await
    }

    /// What arrived on `conn`, with `request` (`None` for the connection itself).
    pub fn arrived<'r, 'h>(
        &'r self,
        conn: &'r ConnInfo,
        request: Option<crate::plan::Head<'h>>,
    ) -> Arrived<'r, 'h>
    where
        'r: 'h,
    {
        Arrived {
            role: self.plan_role(conn),
            port: conn.port,
            orig_dst: conn.orig_dst,
            peer: conn.peer.as_ref(),
            request,
            hello: conn.hello.as_ref().map(Option::as_deref),
        }
    }
}

/// What is known about a connection once it is accepted (and, inbound, handshaken).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The peer's address.
    pub remote: SocketAddr,
    /// The verified peer ID (`None`: unauthenticated, or the local application).
    pub peer: Option<SpiffeId>,
    /// The address the caller dialled, when the connection was captured.
    pub orig_dst: Option<SocketAddr>,
    /// The port authorization sees: the listener's, or the dialled one for captured traffic.
    pub port: u16,
    /// Captured traffic: where it goes (inbound: the application's address; outbound: the
    /// original destination). Empty otherwise.
    pub target: String,
    /// HTTP version to the application.
    pub app_protocol: AppProtocol,
    /// Egress: the server name of the ClientHello the connection opened with (`Some(None)`:
    /// TLS without one); `None`: not TLS, or not looked at.
    pub hello: Option<Option<String>>,
}

/// Server TLS for inbound roles.
pub fn server_tls(sink: Arc<CredentialSink>) -> ListenerTls {
    ListenerTls::new(
        sink,
        PeerPolicy::AnyTrusted,
        vec![b"h2".to_vec(), b"http/1.1".to_vec()],
    )
}

/// Runs one accepted connection through the stages of its listener's role.
pub async fn connection(
    l: Arc<ListenerCtx>,
    tcp: TcpStream,
    remote: SocketAddr,
    drain: CancellationToken,
) {
    let _guard = ConnGuard::new(&l.shared.obs.metrics, &l.name);
    let _ = tcp.set_nodelay(true);
    let mut conn = ConnInfo {
        remote,
        peer: None,
        orig_dst: None,
        port: l.port,
        target: String::new(),
        app_protocol: AppProtocol::Auto,
        hello: None,
    };
    match &l.role {
        RoleCfg::Inbound {
            tls,
            app_protocol,
            app_port,
            ..
        } => {
            conn.app_protocol = *app_protocol;
            conn.port = *app_port;
            inbound(l.clone(), tcp, conn, *tls, l.protocol, drain).await;
        }
        RoleCfg::InboundCapture {
            app_address,
            default_port,
            ports,
            ..
        } => {
            let Some(orig) = redirected(&l, &tcp) else {
                return;
            };
            let mode = ports.get(&orig.port()).copied().unwrap_or(*default_port);
            let app = match (app_address, orig) {
                (AppAddress::Original, a) => a,
                (AppAddress::Loopback, SocketAddr::V4(a)) => {
                    SocketAddr::from(([127, 0, 0, 1], a.port()))
                }
                (AppAddress::Loopback, SocketAddr::V6(a)) => {
                    SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, a.port()))
                }
            };
            conn.orig_dst = Some(orig);
            conn.port = orig.port();
            conn.target = app.to_string();
            conn.app_protocol = mode.app_protocol;
            inbound(l.clone(), tcp, conn, mode.tls, mode.protocol, drain).await;
        }
        RoleCfg::Outbound { .. } => detect(l.clone(), tcp, conn, l.protocol, None, drain).await,
        RoleCfg::EgressGateway => egress_gateway(l, tcp, conn, drain).await,
        RoleCfg::Gateway { .. } => gateway(l, tcp, conn, drain).await,
        RoleCfg::OutboundCapture { .. } => {
            let Some(orig) = redirected(&l, &tcp) else {
                return;
            };
            conn.orig_dst = Some(orig);
            conn.port = orig.port();
            conn.target = orig.to_string();
            // Where the connection goes decides whether its bytes are looked at at all:
            // passthrough and refusals are per connection.
            let meshed = {
                let own = l.shared.own_id();
                let destination = l.destination(&conn).await;
                let egress_set = l.shared.egress.as_ref().map(|e| e.set());
                let knows = Knows {
                    own_id: own.as_ref(),
                    authz: &l.shared.authz,
                    destination: destination.as_ref(),
                    egress: egress_set.as_deref(),
                    gateway: None,
                };
                matches!(
                    crate::plan::plan(&l.arrived(&conn, None), &knows),
                    Ok(Plan::Mesh { .. } | Plan::Balanced { .. })
                )
            };
            let egress = matches!(
                l.role,
                RoleCfg::OutboundCapture {
                    unknown: UnknownDestination::Egress,
                    ..
                }
            );
            let gateway = l.shared.egress.as_ref().and_then(|e| e.gateway().cloned());
            if meshed {
                detect(l.clone(), tcp, conn, l.protocol, None, drain).await;
            } else if let (true, Some(gw)) = (egress, gateway) {
                crate::forward::external::tunnel(&l, tcp, conn, &gw).await;
            } else if egress {
                egress_detect(l, tcp, conn, drain).await;
            } else {
                crate::forward::tcp::serve(l, tcp, conn).await;
            }
        }
    }
}

/// The detect stage for a destination outside the mesh under egress: a ClientHello is read
/// (not terminated) for its server name and the connection planned on it; plaintext goes to
/// the HTTP stage (each request planned on its Host) or, if it is not HTTP, to TCP (planned on
/// the dialled address). The same for a sidecar's captured connection and a tunnel arriving
/// at the egress gateway.
async fn egress_detect<IO>(
    l: Arc<ListenerCtx>,
    mut io: IO,
    mut conn: ConnInfo,
    drain: CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use tokio::io::AsyncReadExt as _;
    let mut first = [0u8; 1];
    let n = match tokio::time::timeout(SNIFF_WAIT, io.read(&mut first)).await {
        Ok(Ok(0)) | Ok(Err(_)) => return,
        Ok(Ok(n)) => n,
        // Silence: a server-speaks-first protocol, planned as TCP.
        Err(_) => 0,
    };
    let read = first[..n].to_vec();
    if read.first() == Some(&0x16) {
        let Ok((hello, prefix)) = crate::detect::client_hello(&mut io, read, SNIFF_WAIT).await
        else {
            return;
        };
        conn.hello = Some(match hello {
            crate::detect::hello::Hello::ClientHello(name) => name,
            // Planned as TLS without a name: only an address grant or the default.
            crate::detect::hello::Hello::More | crate::detect::hello::Hello::Invalid(_) => None,
        });
        crate::forward::tcp::serve(l, Prefixed::new(prefix, io), conn).await;
    } else {
        let io = Prefixed::new(bytes::Bytes::from(read), io);
        detect(l, io, conn, Protocol::Auto, None, drain).await;
    }
}

/// The egress gateway: mTLS from a sidecar (any trusted workload; its ID is the source egress
/// decides for), then the PROXY v2 header naming the address its application dialled, then the
/// application's bytes, which take the egress detect stage.
async fn egress_gateway(
    l: Arc<ListenerCtx>,
    tcp: TcpStream,
    mut conn: ConnInfo,
    drain: CancellationToken,
) {
    let remote = conn.remote;
    let Some(cfg) = l.shared.server_tls.server() else {
        tracing::debug!(%remote, "no SVID yet; refusing connection");
        return;
    };
    let mut a = match crate::tls::accept(cfg, tcp, remote).await {
        Ok(a) => a,
        Err(f) => return l.shared.obs.metrics.tls_failure(&l.name, f.0),
    };
    // The caller's ID is what egress decides for: the listener requires a client certificate,
    // and a tunnel without one is never served, whatever the TLS settings become.
    let Some(peer) = a.peer.take() else {
        return;
    };
    match crate::detect::proxy_header(&mut a.io, SNIFF_WAIT).await {
        Ok(Ok((addrs, rest))) => {
            conn.peer = Some(peer);
            conn.orig_dst = Some(addrs.dst);
            conn.port = addrs.dst.port();
            conn.target = addrs.dst.to_string();
            egress_detect(l, Prefixed::new(rest, a.io), conn, drain).await;
        }
        Ok(Err(why)) => {
            if let Some(n) = not_redirected_limiter().admit(&l.name) {
                tracing::warn!(listener = %l.name, %remote, peer = %peer,
                    reason = why, suppressed = n, "egress gateway tunnel without a valid PROXY header; closed");
            }
        }
        Err(_) => {}
    }
}

/// The ingress gateway's first stages: from a trusted load balancer, the PROXY v2 header that
/// names the client; then (HTTPS) TLS with the certificate the client's server name selects,
/// no client certificate — a TLS-ALPN-01 validation ends with its handshake — and HTTP.
async fn gateway(
    l: Arc<ListenerCtx>,
    mut tcp: TcpStream,
    mut conn: ConnInfo,
    drain: CancellationToken,
) {
    let Some(gw) = l.shared.gateway.clone() else {
        return;
    };
    let RoleCfg::Gateway {
        https,
        proxy_protocol_from,
        ..
    } = &l.role
    else {
        return;
    };
    let mut prefix = bytes::Bytes::new();
    if proxy_protocol_from
        .iter()
        .any(|c| c.contains(conn.remote.ip().to_canonical()))
    {
        match crate::detect::proxy_header(&mut tcp, SNIFF_WAIT).await {
            Ok(Ok((addrs, rest))) => {
                conn.remote = addrs.src;
                prefix = rest;
            }
            Ok(Err(why)) => {
                if let Some(n) = not_redirected_limiter().admit(&l.name) {
                    tracing::warn!(listener = %l.name, remote = %conn.remote, reason = why,
                        suppressed = n, "load balancer connection without a valid PROXY header; closed");
                }
                return;
            }
            Err(_) => return,
        }
    }
    let io = Prefixed::new(prefix, tcp);
    if !*https {
        return detect(l.clone(), io, conn, Protocol::Http, None, drain).await;
    }
    match crate::tls::accept(gw.tls(), io, conn.remote).await {
        Ok(a) if a.alpn.as_deref() == Some(crate::gateway::certs::ACME_TLS_ALPN) => {}
        Ok(a) => detect(l.clone(), a.io, conn, Protocol::Http, a.alpn, drain).await,
        Err(f) => l.shared.obs.metrics.tls_failure(&l.name, f.0),
    }
}

/// The original destination of a captured connection, unless it was not redirected (dialled
/// at the capture port itself, which would make the proxy connect to itself).
fn redirected(l: &ListenerCtx, tcp: &TcpStream) -> Option<SocketAddr> {
    let orig = crate::capture::original_dst(tcp);
    let local = tcp.local_addr().ok();
    match orig {
        Some(o) if Some(o) != local && o.port() != l.port => Some(o),
        _ => {
            if let Some(n) = crate::pipeline::not_redirected_limiter().admit(&l.name) {
                tracing::warn!(listener = %l.name, remote = ?tcp.peer_addr().ok(), suppressed = n,
                    "connection to a capture listener that was not redirected; closed");
            }
            None
        }
    }
}

fn not_redirected_limiter() -> &'static ward_net::ratelog::LogLimiter {
    static L: std::sync::OnceLock<ward_net::ratelog::LogLimiter> = std::sync::OnceLock::new();
    L.get_or_init(ward_net::ratelog::LogLimiter::for_refusals)
}

/// The TLS stage of the inbound roles: mTLS, or plaintext (unauthenticated) where `tls`
/// allows it.
async fn inbound(
    l: Arc<ListenerCtx>,
    tcp: TcpStream,
    conn: ConnInfo,
    tls: TlsMode,
    protocol: Protocol,
    drain: CancellationToken,
) {
    let remote = conn.remote;
    if tls == TlsMode::Permissive {
        match opening(&tcp, SNIFF_WAIT).await {
            // Plaintext (or a silent, server-speaks-first client): unauthenticated.
            Ok(Opening::Plain) => return detect(l, tcp, conn, protocol, None, drain).await,
            Ok(Opening::Tls) => {}
            Ok(Opening::Closed) | Err(_) => return,
        }
    }
    let Some(cfg) = l.shared.server_tls.server() else {
        tracing::debug!(%remote, "no SVID yet; refusing connection");
        return;
    };
    match crate::tls::accept(cfg, tcp, remote).await {
        Ok(a) => {
            let conn = ConnInfo {
                peer: a.peer,
                ..conn
            };
            detect(l, a.io, conn, protocol, a.alpn, drain).await;
        }
        Err(f) => l.shared.obs.metrics.tls_failure(&l.name, f.0),
    }
}

/// The detect stage: the listener's protocol setting, the negotiated ALPN, or the first bytes
/// decide between the HTTP and TCP forward stages.
async fn detect<IO>(
    l: Arc<ListenerCtx>,
    mut io: IO,
    conn: ConnInfo,
    protocol: Protocol,
    alpn: Option<Vec<u8>>,
    drain: CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match (protocol, alpn.as_deref()) {
        (Protocol::Http, _) | (Protocol::Auto, Some(b"h2" | b"http/1.1")) => {
            crate::forward::http::serve(l, io, conn, drain).await;
        }
        (Protocol::Tcp, _) => crate::forward::tcp::serve(l, io, conn).await,
        (Protocol::Auto, _) => {
            let Ok((kind, prefix)) = sniff(&mut io, SNIFF_WAIT).await else {
                return;
            };
            let io = Prefixed::new(prefix, io);
            match kind {
                Sniffed::Http => crate::forward::http::serve(l, io, conn, drain).await,
                Sniffed::Tcp => crate::forward::tcp::serve(l, io, conn).await,
            }
        }
    }
}
