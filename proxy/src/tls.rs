//! The TLS stage: rustls configs per peer policy, rebuilt from the credential sink's current
//! SVID whenever it changes (live connections keep the config they started with); accepting
//! mTLS with a deadline; dialling a peer proxy with the expected identity; and the connection
//! type hyper's client pool uses, which carries the verified peer ID to responses.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use ward_net::credentials::{build_client_config, build_server_config};
use ward_net::{ClientAuth, CredentialSink, PeerPolicy, TlsConfigs};
use ward_spiffe::SpiffeId;

type Slot<T> = Mutex<Option<(Arc<TlsConfigs>, Arc<T>)>>;

/// How long a peer has to complete a TLS handshake, either way.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long dialling a TCP peer may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Builds and caches one listener's server or client config.
pub struct ListenerTls {
    sink: Arc<CredentialSink>,
    rx: watch::Receiver<Option<Arc<TlsConfigs>>>,
    policy: PeerPolicy,
    alpn: Vec<Vec<u8>>,
    server: Slot<ServerConfig>,
    client: Slot<ClientConfig>,
}

impl std::fmt::Debug for ListenerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerTls")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl ListenerTls {
    /// Configs that accept peers allowed by `policy` and offer `alpn`.
    pub fn new(sink: Arc<CredentialSink>, policy: PeerPolicy, alpn: Vec<Vec<u8>>) -> Self {
        Self {
            rx: sink.subscribe(),
            sink,
            policy,
            alpn,
            server: Mutex::new(None),
            client: Mutex::new(None),
        }
    }

    fn current(&self) -> Option<Arc<TlsConfigs>> {
        self.rx.borrow().clone()
    }

    /// The server config for the current SVID (client certificates required).
    pub fn server(&self) -> Option<Arc<ServerConfig>> {
        let cur = self.current()?;
        let mut slot = self.server.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((k, cfg)) = slot.as_ref()
            && Arc::ptr_eq(k, &cur)
        {
            return Some(cfg.clone());
        }
        let cfg = build_server_config(
            self.sink.trust(),
            self.policy.clone(),
            ClientAuth::Required,
            &cur.svid,
            self.alpn.clone(),
            self.sink.tls12(),
        )
        .map_err(|e| tracing::error!(error = %e, "cannot build server TLS config"))
        .ok()?;
        *slot = Some((cur, cfg.clone()));
        Some(cfg)
    }

    /// The client config for the current SVID.
    pub fn client(&self) -> Option<Arc<ClientConfig>> {
        let cur = self.current()?;
        let mut slot = self.client.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((k, cfg)) = slot.as_ref()
            && Arc::ptr_eq(k, &cur)
        {
            return Some(cfg.clone());
        }
        let cfg = build_client_config(
            self.sink.trust(),
            self.policy.clone(),
            Some(&cur.svid),
            self.alpn.clone(),
            self.sink.tls12(),
        )
        .map_err(|e| tracing::error!(error = %e, "cannot build client TLS config"))
        .ok()?;
        *slot = Some((cur, cfg.clone()));
        Some(cfg)
    }

    /// This workload's SPIFFE ID, once an SVID is held.
    pub fn own_id(&self) -> Option<ward_spiffe::SpiffeId> {
        self.current().map(|c| c.id.clone())
    }
}

/// An accepted mTLS connection: the stream, the verified peer ID and the negotiated ALPN.
#[derive(Debug)]
pub struct Accepted<IO = TcpStream> {
    /// The stream.
    pub io: tokio_rustls::server::TlsStream<IO>,
    /// The client's SPIFFE ID (the verifier required a trusted one).
    pub peer: Option<SpiffeId>,
    /// ALPN protocol, if negotiated.
    pub alpn: Option<Vec<u8>>,
}

/// Why an inbound handshake did not complete (counted by reason, logged at info).
#[derive(Debug)]
pub struct HandshakeFailed(pub &'static str);

/// Completes the server side of (m)TLS on `tcp` within [`HANDSHAKE_TIMEOUT`].
pub async fn accept<IO: AsyncRead + AsyncWrite + Unpin>(
    cfg: Arc<ServerConfig>,
    tcp: IO,
    remote: std::net::SocketAddr,
) -> Result<Accepted<IO>, HandshakeFailed> {
    match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tokio_rustls::TlsAcceptor::from(cfg).accept(tcp),
    )
    .await
    {
        Ok(Ok(io)) => {
            let (_, conn) = io.get_ref();
            let peer = ward_net::verify::peer_id(conn.peer_certificates());
            let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
            Ok(Accepted { io, peer, alpn })
        }
        Ok(Err(e)) => {
            let reason = failure_reason(&e);
            tracing::info!(%remote, reason, error = %e, "inbound TLS handshake refused");
            Err(HandshakeFailed(reason))
        }
        Err(_) => Err(HandshakeFailed("timeout")),
    }
}

/// Dials `addr` and completes mTLS with `cfg` (whose verifier checks the peer's SPIFFE ID).
/// Failed handshakes are counted under `listener`.
pub async fn connect(
    addr: &str,
    cfg: Arc<ClientConfig>,
    listener: &str,
    metrics: &crate::metrics::Metrics,
) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    tcp.set_nodelay(true)?;
    // The server name is not checked (SPIFFE verification uses the URI SAN) but rustls needs one.
    let sni = ServerName::try_from("ward-upstream").map_err(io::Error::other)?;
    match tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio_rustls::TlsConnector::from(cfg).connect(sni, tcp),
    )
    .await
    {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => {
            metrics.tls_failure(listener, failure_reason(&e));
            Err(e)
        }
        Err(_) => {
            metrics.tls_failure(listener, "timeout");
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "TLS handshake timed out",
            ))
        }
    }
}

/// The verified SPIFFE ID of a peer proxy, attached to pooled connections and so to responses.
#[derive(Debug, Clone)]
pub struct UpstreamId(pub Option<SpiffeId>);

/// The SPIFFE ID a client connection's peer presented.
pub fn upstream_id(s: &tokio_rustls::client::TlsStream<TcpStream>) -> Option<SpiffeId> {
    ward_net::verify::peer_id(s.get_ref().1.peer_certificates())
}

/// A short reason label for a failed handshake.
pub fn failure_reason(e: &std::io::Error) -> &'static str {
    if e.kind() == std::io::ErrorKind::TimedOut {
        return "timeout";
    }
    let Some(inner) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return "io";
    };
    if let Some(p) = ward_net::verify::peer_error(inner) {
        return p.reason();
    }
    match inner {
        rustls::Error::NoCertificatesPresented => "no_client_cert",
        rustls::Error::InvalidCertificate(_) => "bad_certificate",
        rustls::Error::AlertReceived(_) => "alert_received",
        rustls::Error::NoApplicationProtocol => "no_alpn",
        // A TLS 1.2 client, mesh hops being 1.3 only.
        rustls::Error::PeerIncompatible(_) => "incompatible_version",
        _ => "tls_error",
    }
}

/// A client TLS connection hyper's pool can use (it needs to know what ALPN negotiated).
#[derive(Debug)]
pub struct TlsClientIo(pub tokio_rustls::client::TlsStream<tokio::net::TcpStream>);

impl AsyncRead for TlsClientIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsClientIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

impl hyper_util::client::legacy::connect::Connection for TlsClientIo {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        let conn = self.0.get_ref().1;
        let c = hyper_util::client::legacy::connect::Connected::new()
            .extra(UpstreamId(upstream_id(&self.0)));
        if conn.alpn_protocol() == Some(b"h2") {
            c.negotiated_h2()
        } else {
            c
        }
    }
}
