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
use crate::config::{AppProtocol, Listener, Protocol, TlsMode};
use crate::detect::{Opening, Prefixed, Sniffed, opening, sniff};
use crate::forward::pools::{AppClients, Upstreams};
use crate::metrics::ConnGuard;
use crate::observe::Observer;
use crate::plan::Role;
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
        };
        Self {
            name: Arc::from(l.name()),
            port,
            protocol,
            role,
            shared,
        }
    }

    /// The role as `plan` sees it.
    pub fn plan_role(&self) -> Role<'_> {
        match &self.role {
            RoleCfg::Inbound { forward_to, .. } => Role::Inbound { app: forward_to },
            RoleCfg::Outbound { upstream, expected } => Role::Outbound { upstream, expected },
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
    let conn = ConnInfo {
        remote,
        peer: None,
        orig_dst: None,
    };
    match &l.role {
        RoleCfg::Inbound { tls, .. } => {
            if *tls == TlsMode::Permissive {
                match opening(&tcp, SNIFF_WAIT).await {
                    // Plaintext (or a silent, server-speaks-first client): unauthenticated.
                    Ok(Opening::Plain) => return detect(l, tcp, conn, None, drain).await,
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
                    detect(l, a.io, conn, a.alpn, drain).await;
                }
                Err(f) => l.shared.obs.metrics.tls_failure(&l.name, f.0),
            }
        }
        RoleCfg::Outbound { .. } => detect(l, tcp, conn, None, drain).await,
    }
}

/// The detect stage: the listener's protocol setting, the negotiated ALPN, or the first bytes
/// decide between the HTTP and TCP forward stages.
async fn detect<IO>(
    l: Arc<ListenerCtx>,
    mut io: IO,
    conn: ConnInfo,
    alpn: Option<Vec<u8>>,
    drain: CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match (l.protocol, alpn.as_deref()) {
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
