//! Outbound listeners: accept plaintext from the local application on loopback and carry it
//! over mutual TLS to the upstream proxy, which must present one of the expected SPIFFE IDs.
//! HTTP goes over a pooled HTTP/2 connection (one handshake serves many requests); TCP gets one
//! TLS connection per application connection.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use ward_net::PeerPolicy;
use ward_spiffe::SpiffeId;

use crate::access_log::{AccessLog, Entry};
use crate::config::{Outbound, Protocol};
use crate::http::{Body, Counted, GrpcCode, boxed, is_grpc, local_response, strip_hop_by_hop};
use crate::io::{Prefixed, Sniffed, TlsClientIo, sniff};
use crate::metrics::{ConnGuard, DecisionLabel, ListenerLabel, Metrics};
use crate::tls::{ListenerTls, failure_reason};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const SNIFF_WAIT: Duration = Duration::from_millis(500);

/// The verified SPIFFE ID of the upstream, attached to pooled connections and so to responses.
#[derive(Debug, Clone)]
pub struct UpstreamId(pub Option<SpiffeId>);

/// Opens mTLS connections to the upstream for hyper's pool.
#[derive(Clone)]
pub struct UpstreamConnector {
    addr: Arc<str>,
    tls: Arc<ListenerTls>,
    name: Arc<str>,
    metrics: Metrics,
}

impl std::fmt::Debug for UpstreamConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamConnector")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// Connects to `addr` with mTLS using `tls`'s client config.
pub async fn connect_tls(
    addr: &str,
    tls: &ListenerTls,
    name: &str,
    metrics: &Metrics,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let cfg = tls.client().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::NotConnected, "proxy has no SVID yet")
    })?;
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    tcp.set_nodelay(true)?;
    // The server name is not checked (SPIFFE verification uses the URI SAN) but rustls needs one.
    let sni = ServerName::try_from("ward-upstream").map_err(std::io::Error::other)?;
    match tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio_rustls::TlsConnector::from(cfg).connect(sni, tcp),
    )
    .await
    {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => {
            metrics.tls_failure(name, failure_reason(&e));
            Err(e)
        }
        Err(_) => {
            metrics.tls_failure(name, "timeout");
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "TLS handshake timed out",
            ))
        }
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
            let s = connect_tls(&this.addr, &this.tls, &this.name, &this.metrics).await?;
            Ok(TokioIo::new(TlsClientIo(s)))
        })
    }
}

/// The HTTP/2 client pool and the credentials and trust it was built under.
struct Pool {
    svid: Option<Arc<ward_net::TlsConfigs>>,
    trust: Arc<ward_net::verify::BundleSet>,
    client: Client<UpstreamConnector, Body>,
}

/// Everything an outbound listener's connections share.
pub struct OutboundCtx {
    cfg: Outbound,
    name: Arc<str>,
    tcp_tls: Arc<ListenerTls>,
    connector: UpstreamConnector,
    pool: std::sync::RwLock<Pool>,
    log: Option<AccessLog>,
    metrics: Metrics,
    sink: Arc<ward_net::CredentialSink>,
}

impl std::fmt::Debug for OutboundCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboundCtx")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl OutboundCtx {
    /// Context for listener `cfg`.
    pub fn new(
        cfg: Outbound,
        sink: Arc<ward_net::CredentialSink>,
        log: Option<AccessLog>,
        metrics: Metrics,
    ) -> Self {
        let policy = if cfg.expected_ids.is_empty() {
            PeerPolicy::AnyTrusted
        } else {
            PeerPolicy::OneOf(cfg.expected_ids.clone())
        };
        let http_tls = Arc::new(ListenerTls::new(
            sink.clone(),
            policy.clone(),
            vec![b"h2".to_vec()],
        ));
        let tcp_tls = Arc::new(ListenerTls::new(sink.clone(), policy, vec![]));
        let name: Arc<str> = Arc::from(cfg.name.as_str());
        let connector = UpstreamConnector {
            addr: Arc::from(cfg.upstream.as_str()),
            tls: http_tls.clone(),
            name: name.clone(),
            metrics: metrics.clone(),
        };
        let pool = std::sync::RwLock::new(Pool {
            svid: sink.current(),
            trust: sink.trust().snapshot(),
            client: new_client(connector.clone()),
        });
        Self {
            cfg,
            name,
            tcp_tls,
            connector,
            pool,
            log,
            metrics,
            sink,
        }
    }

    /// The client for the next request. When the SVID or the trusted bundles changed since the
    /// pool was built, a new pool starts: new requests go over fresh handshakes that present
    /// the new SVID and verify the upstream against the new bundle (a revoked root stops being
    /// used at once), while requests in flight finish on the old connections, which then close.
    fn client(&self) -> Client<UpstreamConnector, Body> {
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
            tracing::debug!(listener = %self.name, "credentials or trust changed; new upstream pool");
            *p = Pool {
                svid,
                trust,
                client: new_client(self.connector.clone()),
            };
        }
        p.client.clone()
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

/// Accepts connections until `stop`.
pub async fn serve(listener: TcpListener, ctx: Arc<OutboundCtx>, mut stop: watch::Receiver<bool>) {
    loop {
        let (tcp, remote) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = ward_net::process::until_set(&mut stop) => return,
        };
        let ctx = ctx.clone();
        tokio::spawn(async move { connection(ctx, tcp, remote).await });
    }
}

async fn connection(ctx: Arc<OutboundCtx>, mut tcp: TcpStream, _remote: SocketAddr) {
    let _guard = ConnGuard::new(&ctx.metrics, &ctx.name);
    let _ = tcp.set_nodelay(true);
    match ctx.cfg.protocol {
        Protocol::Http => serve_http(ctx, tcp).await,
        Protocol::Tcp => serve_tcp(ctx, tcp).await,
        Protocol::Auto => {
            let Ok((kind, prefix)) = sniff(&mut tcp, SNIFF_WAIT).await else {
                return;
            };
            let io = Prefixed::new(prefix, tcp);
            match kind {
                Sniffed::Http => serve_http(ctx, io).await,
                Sniffed::Tcp => serve_tcp(ctx, io).await,
            }
        }
    }
}

async fn serve_http<IO>(ctx: Arc<OutboundCtx>, io: IO)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, std::convert::Infallible>(handle(ctx, req).await) }
    });
    if let Err(e) = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(io), svc)
        .await
    {
        tracing::debug!(error = %e, "outbound HTTP connection ended with an error");
    }
}

/// What the access log needs to know about an outbound request.
struct ReqInfo {
    time: SystemTime,
    start: Instant,
    method: String,
    path: String,
}

fn entry(
    ctx: &OutboundCtx,
    r: &ReqInfo,
    status: u16,
    decision: &'static str,
    reason: String,
) -> Entry {
    Entry {
        time: r.time,
        listener: ctx.name.clone(),
        protocol: "http",
        src: ctx.sink.current().map(|c| c.id.to_string()),
        dst: None,
        method: Some(r.method.clone()),
        path: Some(r.path.clone()),
        status,
        decision,
        policy: "outbound".into(),
        reason,
        audit: None,
        latency: r.start.elapsed(),
        bytes_in: 0,
        bytes_out: 0,
    }
}

fn count(ctx: &OutboundCtx, decision: &str) {
    ctx.metrics
        .requests
        .get_or_create(&DecisionLabel {
            listener: ctx.name.to_string(),
            decision: decision.into(),
            policy: "outbound".into(),
        })
        .inc();
}

async fn handle(ctx: Arc<OutboundCtx>, mut req: Request<Incoming>) -> Response<Body> {
    let info = ReqInfo {
        time: SystemTime::now(),
        start: Instant::now(),
        method: req.method().as_str().to_owned(),
        path: req.uri().path().to_owned(),
    };
    let grpc = is_grpc(&req);
    // The request's authority travels as :authority; the connector always dials the upstream.
    let authority = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_else(|| ctx.cfg.upstream.clone());
    // Only a well-formed authority may become the request's :authority (a Host with '/' or
    // '?' would otherwise change the forwarded path).
    if http::uri::Authority::try_from(authority.as_str()).is_err() {
        count(&ctx, "error");
        return local_response(
            grpc,
            StatusCode::BAD_REQUEST,
            GrpcCode::InvalidArgument,
            "invalid Host header",
        );
    }
    let pq = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let uri: Uri = match format!("http://{authority}{pq}").parse() {
        Ok(u) => u,
        Err(_) => {
            count(&ctx, "error");
            return local_response(
                grpc,
                StatusCode::BAD_REQUEST,
                GrpcCode::InvalidArgument,
                "bad request target",
            );
        }
    };
    let h1 = req.version() != Version::HTTP_2;
    strip_hop_by_hop(req.headers_mut());
    req.headers_mut().remove(header::HOST);
    req.headers_mut().remove(crate::http::ORIG_PROTO);
    if h1 {
        req.headers_mut().insert(
            crate::http::ORIG_PROTO,
            HeaderValue::from_static("HTTP/1.1"),
        );
    }
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_2;
    let bytes_in = Arc::new(AtomicU64::new(0));
    let (parts, body) = req.into_parts();
    let out = Request::from_parts(parts, boxed(Counted::new(body, bytes_in.clone(), None)));
    let result = ctx.client().request(out).await;
    ctx.metrics
        .latency
        .get_or_create(&ListenerLabel {
            listener: ctx.name.to_string(),
        })
        .observe(info.start.elapsed().as_secs_f64());
    let resp = match result {
        Ok(r) => r,
        Err(e) => {
            count(&ctx, "error");
            let reason = format!(
                "upstream {} unavailable: {}",
                ctx.cfg.upstream,
                source_chain(&e)
            );
            tracing::warn!(%reason, "outbound request failed");
            if let Some(log) = &ctx.log {
                log.log(entry(&ctx, &info, 502, "error", reason.clone()));
            }
            return local_response(
                grpc,
                StatusCode::BAD_GATEWAY,
                GrpcCode::Unavailable,
                &reason,
            );
        }
    };
    count(&ctx, "allow");
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let upstream = parts
        .extensions
        .get::<UpstreamId>()
        .and_then(|u| u.0.clone());
    let bytes_out = Arc::new(AtomicU64::new(0));
    let done: Option<Box<dyn FnOnce() + Send + Sync>> = ctx.log.clone().map(|log| {
        let mut e = entry(
            &ctx,
            &info,
            parts.status.as_u16(),
            "allow",
            "forwarded".into(),
        );
        e.dst = upstream.map(|u| u.to_string());
        let (bi, bo) = (bytes_in.clone(), bytes_out.clone());
        Box::new(move || {
            e.bytes_in = bi.load(Ordering::Relaxed);
            e.bytes_out = bo.load(Ordering::Relaxed);
            log.log(e);
        }) as Box<dyn FnOnce() + Send + Sync>
    });
    if parts.headers.get(header::CONTENT_TYPE).is_none() && grpc {
        parts.headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
    }
    Response::from_parts(parts, boxed(Counted::new(body, bytes_out, done)))
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

async fn serve_tcp<IO>(ctx: Arc<OutboundCtx>, mut io: IO)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let start = Instant::now();
    let time = SystemTime::now();
    let log = |status_reason: String,
               upstream: Option<String>,
               i: u64,
               o: u64,
               decision: &'static str| {
        if let Some(log) = &ctx.log {
            log.log(Entry {
                time,
                listener: ctx.name.clone(),
                protocol: "tcp",
                src: ctx.sink.current().map(|c| c.id.to_string()),
                dst: upstream,
                method: None,
                path: None,
                status: 0,
                decision,
                policy: "outbound".into(),
                reason: status_reason,
                audit: None,
                latency: start.elapsed(),
                bytes_in: i,
                bytes_out: o,
            });
        }
    };
    let mut up = match connect_tls(&ctx.cfg.upstream, &ctx.tcp_tls, &ctx.name, &ctx.metrics).await {
        Ok(s) => s,
        Err(e) => {
            count(&ctx, "error");
            log(
                format!("upstream {} unavailable: {e}", ctx.cfg.upstream),
                None,
                0,
                0,
                "error",
            );
            return;
        }
    };
    count(&ctx, "allow");
    let upstream = up
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|l| ward_spiffe::x509::check_leaf(l, ward_spiffe::x509::Profile::Peer).ok())
        .map(|i| i.id.to_string());
    let (i, o) = tokio::io::copy_bidirectional(&mut io, &mut up)
        .await
        .unwrap_or((0, 0));
    log("forwarded".into(), upstream, i, o, "allow");
}
