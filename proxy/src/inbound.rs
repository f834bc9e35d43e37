//! Inbound listeners: accept mTLS (or, in permissive mode, plaintext) from other proxies,
//! authorize every HTTP request or TCP connection against this workload's policies, and
//! forward what is allowed to the local application with the verified peer ID in a header.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use ward_net::PeerPolicy;
use ward_spiffe::SpiffeId;
use ward_spiffe::policy::{Request as AuthzRequest, path::normalize};

use crate::access_log::{AccessLog, Entry};
use crate::authz::{Authz, Decision};
use crate::config::{AppProtocol, Inbound, Protocol, TlsMode};
use crate::http::{Body, Counted, GrpcCode, boxed, is_grpc, local_response, strip_hop_by_hop};
use crate::io::{Prefixed, Sniffed, sniff};
use crate::metrics::{ConnGuard, DecisionLabel, ListenerLabel, Metrics};
use crate::tls::{ListenerTls, failure_reason};

/// How long a client has to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `auto` waits for the first bytes before deciding the stream is opaque TCP.
const SNIFF_WAIT: Duration = Duration::from_millis(500);

/// Everything an inbound listener's connections share.
pub struct InboundCtx {
    cfg: Inbound,
    name: Arc<str>,
    port: u16,
    tls: ListenerTls,
    authz: Arc<Authz>,
    log: Option<AccessLog>,
    metrics: Metrics,
    header: HeaderName,
    app_h1: Client<AppConnector, Body>,
    app_h2: Client<AppConnector, Body>,
}

impl std::fmt::Debug for InboundCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundCtx")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Dials the application at a fixed address, whatever the request URI names (the URI keeps the
/// client's authority so the application sees its original Host).
#[derive(Debug, Clone)]
pub struct AppConnector(Arc<str>);

impl tower_service::Service<Uri> for AppConnector {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = std::io::Result<Self::Response>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let addr = self.0.clone();
        Box::pin(async move {
            let tcp = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&*addr))
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
                })??;
            tcp.set_nodelay(true)?;
            Ok(TokioIo::new(tcp))
        })
    }
}

impl InboundCtx {
    /// Context for listener `cfg` bound on `port`.
    pub fn new(
        cfg: Inbound,
        port: u16,
        sink: Arc<ward_net::CredentialSink>,
        authz: Arc<Authz>,
        log: Option<AccessLog>,
        metrics: Metrics,
        header: &str,
    ) -> Result<Self, String> {
        let header = HeaderName::from_bytes(header.as_bytes()).map_err(|e| e.to_string())?;
        let app_h1 = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(AppConnector(Arc::from(cfg.forward_to.as_str())));
        let app_h2 = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .http2_only(true)
            .build(AppConnector(Arc::from(cfg.forward_to.as_str())));
        Ok(Self {
            name: Arc::from(cfg.name.as_str()),
            port,
            tls: ListenerTls::new(
                sink,
                PeerPolicy::AnyTrusted,
                vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            ),
            cfg,
            authz,
            log,
            metrics,
            header,
            app_h1,
            app_h2,
        })
    }
}

/// Accepts connections until `stop`.
pub async fn serve(listener: TcpListener, ctx: Arc<InboundCtx>, mut stop: watch::Receiver<bool>) {
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

async fn connection(ctx: Arc<InboundCtx>, tcp: TcpStream, remote: SocketAddr) {
    let _guard = ConnGuard::new(&ctx.metrics, &ctx.name);
    let _ = tcp.set_nodelay(true);
    if ctx.cfg.tls == TlsMode::Permissive {
        let mut first = [0u8; 1];
        match tokio::time::timeout(SNIFF_WAIT, tcp.peek(&mut first)).await {
            Ok(Ok(1)) if first[0] != 0x16 => {
                // Plaintext: unauthenticated peer.
                return dispatch(ctx, tcp, None, None).await;
            }
            Ok(Ok(1)) => {}
            _ => return,
        }
    }
    let Some(cfg) = ctx.tls.server() else {
        tracing::debug!(%remote, "no SVID yet; refusing connection");
        return;
    };
    let tls = match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tokio_rustls::TlsAcceptor::from(cfg).accept(tcp),
    )
    .await
    {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            let reason = failure_reason(&e);
            ctx.metrics.tls_failure(&ctx.name, reason);
            tracing::info!(%remote, reason, error = %e, "inbound TLS handshake refused");
            return;
        }
        Err(_) => {
            ctx.metrics.tls_failure(&ctx.name, "timeout");
            return;
        }
    };
    let (_, conn) = tls.get_ref();
    let peer = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|leaf| {
            ward_spiffe::x509::check_leaf(leaf, ward_spiffe::x509::Profile::Peer)
                .ok()
                .map(|i| i.id)
        });
    let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
    dispatch(ctx, tls, peer, alpn).await;
}

async fn dispatch<IO>(
    ctx: Arc<InboundCtx>,
    mut io: IO,
    peer: Option<SpiffeId>,
    alpn: Option<Vec<u8>>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let http = match (ctx.cfg.protocol, alpn.as_deref()) {
        (Protocol::Http, _) => true,
        (Protocol::Tcp, _) => false,
        (Protocol::Auto, Some(b"h2" | b"http/1.1")) => true,
        (Protocol::Auto, _) => {
            let (kind, prefix) = match sniff(&mut io, SNIFF_WAIT).await {
                Ok(s) => s,
                Err(_) => return,
            };
            let io = Prefixed::new(prefix, io);
            match kind {
                Sniffed::Http => serve_http(ctx, io, peer).await,
                Sniffed::Tcp => serve_tcp(ctx, io, peer).await,
            }
            return;
        }
    };
    if http {
        serve_http(ctx, io, peer).await;
    } else {
        serve_tcp(ctx, io, peer).await;
    }
}

async fn serve_http<IO>(ctx: Arc<InboundCtx>, io: IO, peer: Option<SpiffeId>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let peer = Arc::new(peer);
    let svc = hyper::service::service_fn(move |req| {
        let (ctx, peer) = (ctx.clone(), peer.clone());
        async move { Ok::<_, std::convert::Infallible>(handle(ctx, peer, req).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http2().max_concurrent_streams(1024);
    if let Err(e) = builder.serve_connection(TokioIo::new(io), svc).await {
        tracing::debug!(error = %e, "inbound HTTP connection ended with an error");
    }
}

struct Ctx<'a> {
    ctx: &'a InboundCtx,
    start: Instant,
    time: SystemTime,
    src: Option<String>,
    dst: Option<String>,
    method: String,
    path: String,
}

/// What the access log and metrics record about a decision.
struct Outcome {
    decision: &'static str,
    policy: String,
    audit: Option<String>,
}

impl From<&Decision> for Outcome {
    fn from(d: &Decision) -> Self {
        Self {
            decision: d.label(),
            policy: d.policy_label(),
            audit: d.verdict.audit.as_ref().map(ToString::to_string),
        }
    }
}

impl Ctx<'_> {
    fn entry(
        &self,
        status: u16,
        o: &Outcome,
        reason: String,
        bytes_in: u64,
        bytes_out: u64,
    ) -> Entry {
        Entry {
            time: self.time,
            listener: self.ctx.name.clone(),
            protocol: "http",
            src: self.src.clone(),
            dst: self.dst.clone(),
            method: Some(self.method.clone()),
            path: Some(self.path.clone()),
            status,
            decision: o.decision,
            policy: o.policy.clone(),
            reason,
            audit: o.audit.clone(),
            latency: self.start.elapsed(),
            bytes_in,
            bytes_out,
        }
    }
}

async fn handle(
    ctx: Arc<InboundCtx>,
    peer: Arc<Option<SpiffeId>>,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let start = Instant::now();
    let grpc = is_grpc(&req);
    let own = ctx.tls.own_id();
    let raw_path = req.uri().path().to_owned();
    let lc = Ctx {
        ctx: &ctx,
        start,
        time: SystemTime::now(),
        src: peer.as_ref().as_ref().map(ToString::to_string),
        dst: own.as_ref().map(ToString::to_string),
        method: req.method().as_str().to_owned(),
        path: raw_path.clone(),
    };
    let Some(own) = own else {
        return local_response(
            grpc,
            StatusCode::SERVICE_UNAVAILABLE,
            GrpcCode::Unavailable,
            "proxy has no identity yet",
        );
    };
    // Normalize before matching; ambiguous paths are refused, not guessed.
    let (path, d, reason) = match normalize(&raw_path) {
        Ok(p) => {
            let d = ctx.authz.decide(&AuthzRequest {
                source: peer.as_ref().as_ref(),
                target: &own,
                method: Some(req.method().as_str()),
                path: Some(&p),
                port: ctx.port,
            });
            let r = d.verdict.describe();
            (p, d, r)
        }
        Err(e) => (
            raw_path.clone(),
            ctx.authz.invalid_path(),
            format!("ambiguous request path: {e}"),
        ),
    };
    let o = Outcome::from(&d);
    record(&ctx, &o);
    let lc = Ctx {
        path: path.clone(),
        ..lc
    };
    if !d.proceed {
        if let Some(log) = &ctx.log {
            log.log(lc.entry(403, &o, reason.clone(), 0, 0));
        }
        return local_response(
            grpc,
            StatusCode::FORBIDDEN,
            GrpcCode::PermissionDenied,
            &format!("forbidden: {reason}"),
        );
    }
    if d.dry_run_denied {
        tracing::info!(src = ?lc.src, path = %path, %reason, "dry run: would deny");
    }

    // Forward to the application.
    let headers = req.headers_mut();
    strip_hop_by_hop(headers);
    headers.remove(&ctx.header);
    if let Some(p) = peer.as_ref()
        && let Ok(v) = HeaderValue::from_str(p.as_str())
    {
        headers.insert(ctx.header.clone(), v);
    }
    // HTTP/2 to the application only if the original client spoke it (see ORIG_PROTO).
    let orig_h1 = req.headers_mut().remove(crate::http::ORIG_PROTO).is_some();
    let h2 = match ctx.cfg.app_protocol {
        AppProtocol::Auto => req.version() == Version::HTTP_2 && !orig_h1,
        AppProtocol::Http1 => false,
        AppProtocol::Http2 => true,
    };
    // The request keeps its original authority (Host for HTTP/1.1, :authority for HTTP/2);
    // the connector dials the application whatever the URI says.
    let authority = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .filter(|a| http::uri::Authority::try_from(a.as_str()).is_ok())
        .unwrap_or_else(|| ctx.cfg.forward_to.clone());
    let pq = match req.uri().query() {
        Some(q) => format!("{path}?{q}"),
        None => path.clone(),
    };
    let uri: Uri = match format!("http://{authority}{pq}").parse() {
        Ok(u) => u,
        Err(_) => {
            return local_response(
                grpc,
                StatusCode::BAD_REQUEST,
                GrpcCode::InvalidArgument,
                "bad request target",
            );
        }
    };
    if h2 {
        req.headers_mut().remove(header::HOST);
    } else if let Ok(v) = HeaderValue::from_str(&authority) {
        req.headers_mut().insert(header::HOST, v);
    }
    *req.uri_mut() = uri;
    let bytes_in = Arc::new(AtomicU64::new(0));
    let (parts, body) = req.into_parts();
    let mut out = Request::from_parts(parts, boxed(Counted::new(body, bytes_in.clone(), None)));
    let result = if h2 {
        ctx.app_h2.request(out).await
    } else {
        *out.version_mut() = Version::HTTP_11;
        ctx.app_h1.request(out).await
    };
    let elapsed = start.elapsed();
    ctx.metrics
        .latency
        .get_or_create(&ListenerLabel {
            listener: ctx.name.to_string(),
        })
        .observe(elapsed.as_secs_f64());
    let resp = match result {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, app = %ctx.cfg.forward_to, "application unreachable");
            if let Some(log) = &ctx.log {
                log.log(lc.entry(
                    502,
                    &o,
                    format!("application unreachable: {e}"),
                    bytes_in.load(Ordering::Relaxed),
                    0,
                ));
            }
            return local_response(
                grpc,
                StatusCode::BAD_GATEWAY,
                GrpcCode::Unavailable,
                "application unreachable",
            );
        }
    };
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let bytes_out = Arc::new(AtomicU64::new(0));
    let done: Option<Box<dyn FnOnce() + Send + Sync>> = ctx.log.clone().map(|log| {
        let entry = lc.entry(parts.status.as_u16(), &o, reason.clone(), 0, 0);
        let (bi, bo) = (bytes_in.clone(), bytes_out.clone());
        Box::new(move || {
            let mut e = entry;
            e.bytes_in = bi.load(Ordering::Relaxed);
            e.bytes_out = bo.load(Ordering::Relaxed);
            log.log(e);
        }) as Box<dyn FnOnce() + Send + Sync>
    });
    Response::from_parts(parts, boxed(Counted::new(body, bytes_out, done)))
}

fn record(ctx: &InboundCtx, o: &Outcome) {
    ctx.metrics
        .requests
        .get_or_create(&DecisionLabel {
            listener: ctx.name.to_string(),
            decision: o.decision.into(),
            policy: o.policy.clone(),
        })
        .inc();
}

async fn serve_tcp<IO>(ctx: Arc<InboundCtx>, mut io: IO, peer: Option<SpiffeId>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let start = Instant::now();
    let time = SystemTime::now();
    let Some(own) = ctx.tls.own_id() else { return };
    let d = ctx.authz.decide(&AuthzRequest {
        source: peer.as_ref(),
        target: &own,
        method: None,
        path: None,
        port: ctx.port,
    });
    record(&ctx, &Outcome::from(&d));
    let entry = |bytes_in, bytes_out, reason: String| Entry {
        time,
        listener: ctx.name.clone(),
        protocol: "tcp",
        src: peer.as_ref().map(ToString::to_string),
        dst: Some(own.to_string()),
        method: None,
        path: None,
        status: 0,
        decision: d.label(),
        policy: d.policy_label(),
        reason,
        audit: d.verdict.audit.as_ref().map(ToString::to_string),
        latency: start.elapsed(),
        bytes_in,
        bytes_out,
    };
    if !d.proceed {
        if let Some(log) = &ctx.log {
            log.log(entry(0, 0, d.verdict.describe()));
        }
        return; // closing the connection is the TCP denial
    }
    let mut app = match TcpStream::connect(&ctx.cfg.forward_to).await {
        Ok(a) => a,
        Err(e) => {
            if let Some(log) = &ctx.log {
                log.log(entry(0, 0, format!("application unreachable: {e}")));
            }
            return;
        }
    };
    let _ = app.set_nodelay(true);
    let (i, o) = tokio::io::copy_bidirectional(&mut io, &mut app)
        .await
        .unwrap_or((0, 0));
    if let Some(log) = &ctx.log {
        log.log(entry(i, o, d.verdict.describe()));
    }
}
