//! Connection pools of the forward stage, keyed by where a plan goes: HTTP/1.1 and HTTP/2
//! clients per local application address, and per (peer proxy, expected IDs) an mTLS client
//! pool whose TLS configs check those IDs.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use ward_net::{CredentialSink, PeerPolicy};
use ward_spiffe::SpiffeId;

use crate::http::Body;
use crate::metrics::Metrics;
use crate::tls::{CONNECT_TIMEOUT, ListenerTls, TlsClientIo};

/// Distinct destinations kept; past this the map starts over (clients in use stay alive in
/// the requests holding them).
const MAX_KEYS: usize = 1024;

/// Dials a fixed address, whatever the request URI names (the URI keeps the client's
/// authority, so the application sees its original Host).
#[derive(Clone)]
pub struct AppConnector {
    addr: Arc<str>,
    memory: Option<MemoryDial>,
}

impl std::fmt::Debug for AppConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("AppConnector").field(&self.addr).finish()
    }
}

/// For the fuzzer: opens an in-memory connection to the application at an address, so the
/// HTTP stage can be driven without sockets.
#[doc(hidden)]
pub type MemoryDial = Arc<dyn Fn(&str) -> tokio::io::DuplexStream + Send + Sync>;

impl tower_service::Service<Uri> for AppConnector {
    type Response = TokioIo<AppIo>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let addr = self.addr.clone();
        if let Some(dial) = &self.memory {
            let io = dial(&addr);
            return Box::pin(async move { Ok(TokioIo::new(AppIo::Memory(io))) });
        }
        Box::pin(async move { Ok(TokioIo::new(AppIo::Tcp(dial(&addr).await?))) })
    }
}

/// A connection to an application: TCP or (only for the fuzzer) in memory.
#[derive(Debug)]
pub enum AppIo {
    /// TCP.
    Tcp(TcpStream),
    /// For the fuzzer: an in-memory stream.
    #[doc(hidden)]
    Memory(tokio::io::DuplexStream),
}

impl tokio::io::AsyncRead for AppIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            AppIo::Tcp(t) => Pin::new(t).poll_read(cx, buf),
            AppIo::Memory(m) => Pin::new(m).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for AppIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            AppIo::Tcp(t) => Pin::new(t).poll_write(cx, buf),
            AppIo::Memory(m) => Pin::new(m).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            AppIo::Tcp(t) => Pin::new(t).poll_flush(cx),
            AppIo::Memory(m) => Pin::new(m).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            AppIo::Tcp(t) => Pin::new(t).poll_shutdown(cx),
            AppIo::Memory(m) => Pin::new(m).poll_shutdown(cx),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            AppIo::Tcp(t) => Pin::new(t).poll_write_vectored(cx, bufs),
            AppIo::Memory(m) => Pin::new(m).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            AppIo::Tcp(t) => t.is_write_vectored(),
            AppIo::Memory(m) => m.is_write_vectored(),
        }
    }
}

impl hyper_util::client::legacy::connect::Connection for AppIo {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        match self {
            AppIo::Tcp(t) => t.connected(),
            AppIo::Memory(_) => hyper_util::client::legacy::connect::Connected::new(),
        }
    }
}

/// Opens a TCP connection within [`CONNECT_TIMEOUT`].
pub async fn dial(addr: &str) -> std::io::Result<TcpStream> {
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// The two clients of one application address.
#[derive(Debug, Clone)]
pub struct AppClient {
    /// HTTP/1.1.
    pub h1: Client<AppConnector, Body>,
    /// HTTP/2 with prior knowledge.
    pub h2: Client<AppConnector, Body>,
}

/// Clients per application address.
#[derive(Default)]
pub struct AppClients {
    clients: RwLock<HashMap<Arc<str>, Arc<AppClient>>>,
    memory: Option<MemoryDial>,
}

impl std::fmt::Debug for AppClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppClients")
            .field("clients", &self.clients)
            .finish_non_exhaustive()
    }
}

impl AppClients {
    /// For the fuzzer: clients whose connections to every application come from `dial`
    /// rather than TCP.
    #[doc(hidden)]
    pub fn in_memory(dial: MemoryDial) -> Self {
        Self {
            clients: RwLock::default(),
            memory: Some(dial),
        }
    }

    /// The clients for `addr`.
    pub fn get(&self, addr: &str) -> Arc<AppClient> {
        if let Some(c) = self
            .clients
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(addr)
        {
            return c.clone();
        }
        let mut map = self.clients.write().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_KEYS {
            map.clear();
        }
        let key: Arc<str> = Arc::from(addr);
        map.entry(key.clone())
            .or_insert_with(|| {
                let c = AppConnector {
                    addr: key,
                    memory: self.memory.clone(),
                };
                Arc::new(AppClient {
                    h1: Client::builder(TokioExecutor::new())
                        .timer(TokioTimer::new())
                        .pool_timer(TokioTimer::new())
                        .pool_idle_timeout(Duration::from_secs(60))
                        .build(c.clone()),
                    h2: Client::builder(TokioExecutor::new())
                        .timer(TokioTimer::new())
                        .pool_timer(TokioTimer::new())
                        .http2_only(true)
                        .build(c),
                })
            })
            .clone()
    }
}

/// Opens mTLS connections to one peer proxy for hyper's pool.
#[derive(Clone)]
pub struct UpstreamConnector {
    addr: Arc<str>,
    tls: Arc<ListenerTls>,
    listener: Arc<str>,
    metrics: Metrics,
}

impl std::fmt::Debug for UpstreamConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamConnector")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl tower_service::Service<Uri> for UpstreamConnector {
    type Response = TokioIo<TlsClientIo>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let cfg = this.tls.client().ok_or_else(no_svid)?;
            let s = crate::tls::connect(&this.addr, cfg, &this.listener, &this.metrics).await?;
            Ok(TokioIo::new(TlsClientIo(s)))
        })
    }
}

fn no_svid() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::NotConnected, "proxy has no SVID yet")
}

/// The HTTP/2 client pool and the credentials and trust it was built under.
struct Pool {
    svid: Option<Arc<ward_net::TlsConfigs>>,
    trust: Arc<ward_net::verify::BundleSet>,
    client: Client<UpstreamConnector, Body>,
}

/// One peer proxy and the IDs it must present.
pub struct Upstream {
    /// `host:port`.
    pub addr: Arc<str>,
    /// TLS for TCP connections (no ALPN).
    tcp_tls: ListenerTls,
    connector: UpstreamConnector,
    pool: RwLock<Pool>,
    sink: Arc<CredentialSink>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

fn new_client(connector: UpstreamConnector) -> Client<UpstreamConnector, Body> {
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .http2_only(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .pool_idle_timeout(Duration::from_secs(90))
        .build(connector)
}

impl Upstream {
    fn new(
        addr: &str,
        expected: &[SpiffeId],
        sink: Arc<CredentialSink>,
        listener: Arc<str>,
        metrics: Metrics,
    ) -> Self {
        let policy = if expected.is_empty() {
            PeerPolicy::AnyTrusted
        } else {
            PeerPolicy::OneOf(expected.to_vec())
        };
        let http_tls = Arc::new(ListenerTls::new(
            sink.clone(),
            policy.clone(),
            vec![b"h2".to_vec()],
        ));
        let addr: Arc<str> = Arc::from(addr);
        let connector = UpstreamConnector {
            addr: addr.clone(),
            tls: http_tls,
            listener,
            metrics,
        };
        let pool = RwLock::new(Pool {
            svid: sink.current(),
            trust: sink.trust().snapshot(),
            client: new_client(connector.clone()),
        });
        Self {
            addr,
            tcp_tls: ListenerTls::new(sink.clone(), policy, vec![]),
            connector,
            pool,
            sink,
        }
    }

    /// The HTTP/2 client for the next request. When the SVID or the trusted bundles changed
    /// since the pool was built, a new pool starts: new requests go over fresh handshakes that
    /// present the new SVID and verify the peer against the new bundle (a revoked root stops
    /// being used at once), while requests in flight finish on the old connections, which then
    /// close.
    pub fn client(&self) -> Client<UpstreamConnector, Body> {
        let svid = self.sink.current();
        let trust = self.sink.trust().snapshot();
        let same_svid =
            |p: &Pool| p.svid.as_ref().map(Arc::as_ptr) == svid.as_ref().map(Arc::as_ptr);
        {
            let p = self.pool.read().unwrap_or_else(|e| e.into_inner());
            if same_svid(&p) && Arc::ptr_eq(&p.trust, &trust) {
                return p.client.clone();
            }
        }
        let mut p = self.pool.write().unwrap_or_else(|e| e.into_inner());
        if same_svid(&p) && *p.trust == *trust {
            // The same bundles set again: remember the new snapshot, keep the pool.
            p.trust = trust;
        } else {
            tracing::debug!(upstream = %self.addr, "credentials or trust changed; new upstream pool");
            *p = Pool {
                svid,
                trust,
                client: new_client(self.connector.clone()),
            };
        }
        p.client.clone()
    }

    /// A new mTLS connection for one TCP stream.
    pub async fn connect_tcp(
        &self,
        listener: &str,
        metrics: &Metrics,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let cfg = self.tcp_tls.client().ok_or_else(no_svid)?;
        crate::tls::connect(&self.addr, cfg, listener, metrics).await
    }
}

/// A peer proxy's address and the IDs it must present.
type UpstreamKey = (Arc<str>, Vec<SpiffeId>);

/// Upstreams by (address, expected IDs).
#[derive(Debug, Default)]
pub struct Upstreams(RwLock<HashMap<UpstreamKey, Arc<Upstream>>>);

impl Upstreams {
    /// The upstream for `addr` expecting `expected`; TLS failures count under `listener`.
    pub fn get(
        &self,
        addr: &str,
        expected: &[SpiffeId],
        sink: &Arc<CredentialSink>,
        listener: &Arc<str>,
        metrics: &Metrics,
    ) -> Arc<Upstream> {
        {
            let map = self.0.read().unwrap_or_else(|p| p.into_inner());
            // A sidecar talks to few peers: a scan avoids building an owned key per request.
            let found = if map.len() <= 16 {
                map.iter()
                    .find(|((a, e), _)| &**a == addr && e.as_slice() == expected)
                    .map(|(_, u)| u.clone())
            } else {
                map.get(&(Arc::from(addr), expected.to_vec())).cloned()
            };
            if let Some(u) = found {
                return u;
            }
        }
        let mut map = self.0.write().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_KEYS {
            map.clear();
        }
        map.entry((Arc::from(addr), expected.to_vec()))
            .or_insert_with(|| {
                Arc::new(Upstream::new(
                    addr,
                    expected,
                    sink.clone(),
                    listener.clone(),
                    metrics.clone(),
                ))
            })
            .clone()
    }
}
