//! The HTTP forward stage: serves one connection with hyper (HTTP/1.1 or HTTP/2), plans every
//! request, answers refusals through [`crate::refusal`], and carries allowed requests to the
//! local application (deliver) or to a peer proxy over pooled HTTP/2 mTLS (mesh).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use http::header::{self, HeaderValue};
use http::{Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use crate::config::AppProtocol;
use crate::http::{Body, Counted, boxed, is_grpc, strip_hop_by_hop};
use crate::observe::{Outcome, Record};
use crate::pipeline::{ConnInfo, ListenerCtx};
use crate::plan::{Head, Knows, Plan, Refused, plan};
use crate::refusal::Refusal;
use crate::tls::UpstreamId;

/// Serves HTTP on `io` until the client closes or `drain` asks for a graceful close.
pub async fn serve<IO>(l: Arc<ListenerCtx>, io: IO, conn: ConnInfo, drain: CancellationToken)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = Arc::new(conn);
    let ctx = l.clone();
    let activity = Arc::new(super::idle::Activity::default());
    let act = activity.clone();
    let svc = hyper::service::service_fn(move |req| {
        let (l, conn) = (ctx.clone(), conn.clone());
        let busy = act.begin();
        async move {
            let resp = handle(&l, &conn, req).await;
            drop(busy);
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // A client trickling its headers cannot hold a connection for long, nor make the proxy
    // hold large or many headers (431).
    let limits = l.shared.http_limits;
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size((limits.max_header_bytes as usize).max(8192))
        .max_headers(limits.max_headers);
    // HTTP/2 decodes up to twice the limit, so a request over it is answered 431 (below, per
    // request) rather than ending the connection; beyond that, h2 ends it (and caps the
    // CONTINUATION frames by the same size).
    builder
        .http2()
        .max_header_list_size(limits.max_header_bytes.saturating_mul(2));
    if l.role.is_inbound() || l.role.is_gateway() {
        // Streams a client may open at once, and (CVE-2023-44487, "rapid reset") streams it
        // may reset before they are served: past 20 pending, the connection ends with GOAWAY
        // ENHANCE_YOUR_CALM. A header block is capped by max_header_list_size, CONTINUATION
        // frames with it.
        builder
            .http2()
            .max_concurrent_streams(1024)
            .max_pending_accept_reset_streams(20)
            .max_local_error_reset_streams(1024);
    }
    let served = builder.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(served);
    let r = tokio::select! {
        r = served.as_mut() => r,
        () = drain.cancelled() => {
            // Finish what is in flight, take nothing new.
            served.as_mut().graceful_shutdown();
            served.await
        }
        () = activity.until_idle(l.shared.idle_timeout) => {
            // No request for a while: HTTP/2 says GOAWAY, HTTP/1 closes between requests.
            l.shared.obs.metrics.http_limit(&l.name, "idle_timeout");
            tracing::debug!(listener = %l.name, "idle HTTP connection closed");
            served.as_mut().graceful_shutdown();
            // HTTP/2's graceful close waits for the client to answer a PING, with no limit of
            // its own: a client that stays silent would keep the connection (and its place
            // under the caps) for ever. Idle for another period after GOAWAY: cut.
            tokio::select! {
                r = served.as_mut() => r,
                () = activity.until_idle(l.shared.idle_timeout) => Ok(()),
            }
        }
    };
    if let Err(e) = r {
        let limit = e.downcast_ref::<hyper::Error>().and_then(|h| {
            if h.is_parse_too_large() {
                Some("header_size")
            } else if h.is_timeout() {
                Some("header_read_timeout")
            } else {
                None
            }
        });
        match limit {
            Some(limit) => {
                l.shared.obs.metrics.http_limit(&l.name, limit);
                if let Some(n) = limits_limiter().admit(&l.name) {
                    tracing::warn!(listener = %l.name, limit, suppressed = n,
                        "HTTP client over a limit; connection closed");
                }
            }
            None => tracing::debug!(listener = %l.name, error = %e,
                "HTTP connection ended with an error"),
        }
    }
}

fn limits_limiter() -> &'static ward_net::ratelog::LogLimiter {
    static L: std::sync::OnceLock<ward_net::ratelog::LogLimiter> = std::sync::OnceLock::new();
    L.get_or_init(ward_net::ratelog::LogLimiter::for_refusals)
}

/// The request's authority as the client gave it: Host, or the URI's (HTTP/2).
pub(crate) fn given_authority<B>(req: &Request<B>) -> Option<&str> {
    match req.headers().get(header::HOST) {
        // A Host that is not text is given, and malformed.
        Some(h) => Some(h.to_str().unwrap_or("\u{0}")),
        None => req.uri().authority().map(http::uri::Authority::as_str),
    }
}

pub(crate) fn refuse(l: &ListenerCtx, mut rec: Record, r: Refused, grpc: bool) -> Response<Body> {
    if let Some(p) = &r.path {
        rec.set_path(p);
    }
    let (status, ..) = r.refusal.answer();
    rec.decided(&l.shared.obs, r.outcome, "refuse");
    rec.finish(&l.shared.obs, status.as_u16(), r.refusal.log_reason(), 0, 0);
    r.refusal.respond(grpc)
}

async fn handle(l: &ListenerCtx, conn: &ConnInfo, req: Request<Incoming>) -> Response<Body> {
    let head = req.method() == http::Method::HEAD;
    let mut resp = handle_request(l, conn, req).await;
    if let (crate::pipeline::RoleCfg::Gateway { https: true, .. }, Some(gw)) =
        (&l.role, &l.shared.gateway)
        && let Some(v) = gw.hsts()
    {
        resp.headers_mut()
            .entry(header::STRICT_TRANSPORT_SECURITY)
            .or_insert_with(|| v.clone());
    }
    if head {
        // No body to a HEAD, whoever answered (an HTTP/2 client treats one as a protocol error).
        *resp.body_mut() = crate::http::full(bytes::Bytes::new());
    }
    resp
}

async fn handle_request(
    l: &ListenerCtx,
    conn: &ConnInfo,
    req: Request<Incoming>,
) -> Response<Body> {
    let grpc = is_grpc(&req);
    let own = l.shared.own_id();
    let gateway = l.role.is_gateway();
    let src = if l.role.is_inbound() {
        conn.peer.as_ref()
    } else if gateway {
        // A client outside the mesh: its address is what is known of it.
        None
    } else {
        own.as_ref()
    };
    let mut rec = Record::start(&l.name, "http", src, conn.orig_dst)
        .request(req.method().as_str(), req.uri().path());
    if rec.admit(&l.shared.obs).await.is_err() {
        let r = Refused {
            refusal: Refusal::LogFull,
            outcome: Outcome::plain("error", "access_log"),
            path: None,
        };
        return refuse(l, rec, r, grpc);
    }
    if gateway {
        rec.client = Some(conn.remote);
        rec.host = given_authority(&req).map(ToOwned::to_owned);
        if let Some(r) = crate::forward::gateway::admit(l, conn, &req) {
            return refuse(l, rec, r, grpc);
        }
    }
    if req.version() == Version::HTTP_2
        && header_list_size(&req) > l.shared.http_limits.max_header_bytes as usize
    {
        l.shared.obs.metrics.http_limit(&l.name, "header_size");
        let r = Refused {
            refusal: Refusal::HeadersTooLarge,
            outcome: Outcome::plain("error", "none"),
            path: None,
        };
        return refuse(l, rec, r, grpc);
    }
    if req.headers().get_all(header::HOST).iter().count() > 1 {
        let r = Refused {
            refusal: Refusal::BadRequest("more than one Host header"),
            outcome: Outcome::plain("error", "none"),
            path: None,
        };
        return refuse(l, rec, r, grpc);
    }
    let arrived = l.arrived(
        conn,
        Some(Head {
            method: req.method().as_str(),
            path: req.uri().path(),
            authority: given_authority(&req),
            query: req.uri().query(),
            headers: Some(req.headers()),
        }),
    );
    let destination = l.destination(conn).await;
    let egress_set = l.shared.egress.as_ref().map(|e| e.set());
    let hosts = match (&l.shared.gateway, &l.role) {
        (Some(g), crate::pipeline::RoleCfg::Gateway { serves_port, .. }) => {
            Some(g.hosts(*serves_port))
        }
        _ => None,
    };
    let knows = Knows {
        own_id: own.as_ref(),
        authz: &l.shared.authz,
        destination: destination.as_ref(),
        egress: egress_set.as_deref(),
        gateway: hosts.as_deref(),
    };
    // The plan borrows the request; what it takes from it (the authority) is made owned so
    // the request can move on.
    let planned = plan(&arrived, &knows).and_then(|p| match p {
        Plan::Deliver {
            app,
            authority,
            path,
            outcome,
            reason,
            dry_run_denied,
        } => Ok(Target::Deliver {
            app,
            authority: authority.into_owned(),
            path: path.unwrap_or_default(),
            outcome,
            reason,
            dry_run_denied,
        }),
        Plan::Mesh {
            upstream,
            expected,
            authority,
        } => Ok(Target::Mesh {
            upstream,
            expected,
            authority: authority.into_owned(),
        }),
        Plan::Balanced {
            destination,
            authority,
            route,
        } => Ok(Target::Balanced {
            destination,
            authority: authority.into_owned(),
            route,
        }),
        Plan::External(e) => Ok(Target::External(e)),
        Plan::Routed { authority, route } => Ok(Target::Routed {
            authority: authority.into_owned(),
            route,
        }),
        Plan::Redirect { location, status } => Ok(Target::Redirect { location, status }),
        Plan::AcmeChallenge { token } => Ok(Target::AcmeChallenge(token.to_owned())),
        // Passthrough is decided per connection, before any byte is read as HTTP.
        Plan::Passthrough { to } => Err(Refused {
            refusal: Refusal::NoRoute(format!("{to} is outside the mesh")),
            outcome: Outcome::plain("error", "passthrough"),
            path: None,
        }),
    });
    match planned {
        Err(r) => {
            if r.outcome.policy.starts_with("egress:") {
                rec.host = given_authority(&req).map(ToOwned::to_owned);
                crate::forward::external::log_refusal(l, &rec, conn, &r);
            }
            refuse(l, rec, r, grpc)
        }
        Ok(Target::External(e)) => crate::forward::external::http(l, conn, rec, req, e, grpc).await,
        Ok(Target::Deliver {
            app,
            authority,
            path,
            outcome,
            reason,
            dry_run_denied,
        }) => {
            rec.dst = own.as_ref().map(ToString::to_string);
            rec.set_path(&path);
            if dry_run_denied {
                tracing::info!(src = ?conn.peer.as_ref().map(ToString::to_string), %path, %reason,
                    "dry run: would deny");
            }
            deliver(
                l, conn, rec, req, app, &authority, &path, outcome, reason, grpc,
            )
            .await
        }
        Ok(Target::Mesh {
            upstream,
            expected,
            authority,
        }) => mesh(l, rec, req, upstream, expected, &authority, grpc).await,
        Ok(Target::Balanced {
            destination,
            authority,
            route: None,
        }) => {
            let t = crate::forward::balanced::RequestPolicy::configured(l);
            crate::forward::balanced::http(l, rec, req, &destination, &authority, grpc, t).await
        }
        Ok(Target::Balanced {
            destination: _,
            authority,
            route: Some(routed),
        }) => crate::forward::routed::http(l, rec, req, authority, routed, grpc).await,
        Ok(Target::Routed { authority, route }) => {
            let mut req = req;
            if gateway {
                crate::forward::gateway::forwarding_headers(l, conn, &mut req);
            }
            crate::forward::routed::http(l, rec, req, authority, route, grpc).await
        }
        Ok(Target::Redirect { location, status }) => {
            crate::forward::routed::answer_redirect(l, rec, status, &location, &[])
        }
        Ok(Target::AcmeChallenge(token)) => crate::forward::gateway::acme_answer(l, rec, &token),
    }
}

/// The size of a request's header list as HTTP/2 counts it (RFC 9113 §6.5.2: name, value and
/// 32 bytes per field, pseudo-headers included).
fn header_list_size<B>(req: &Request<B>) -> usize {
    let pseudo = [
        req.method().as_str().len() + 7,
        req.uri().path_and_query().map_or(1, |p| p.as_str().len()) + 5,
        req.uri().authority().map_or(0, |a| a.as_str().len() + 10),
        req.uri().scheme_str().map_or(0, |s| s.len() + 7),
    ];
    pseudo.iter().map(|n| n + 32).sum::<usize>()
        + req
            .headers()
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 32)
            .sum::<usize>()
}

/// A plan with what it borrowed from the request made owned, so the request can be moved.
enum Target<'r> {
    Deliver {
        app: &'r str,
        authority: String,
        path: String,
        outcome: Outcome,
        reason: String,
        dry_run_denied: bool,
    },
    Mesh {
        upstream: &'r str,
        expected: &'r [ward_spiffe::SpiffeId],
        authority: String,
    },
    Balanced {
        destination: Arc<crate::discover::Destination>,
        authority: String,
        route: Option<crate::plan::Routed>,
    },
    External(crate::plan::External),
    Routed {
        authority: String,
        route: crate::plan::Routed,
    },
    Redirect {
        location: String,
        status: u16,
    },
    AcmeChallenge(String),
}

/// Wraps a response body so the record is written when the exchange ends.
pub(crate) fn finish_with_body(
    l: &ListenerCtx,
    rec: Record,
    resp: Response<Incoming>,
    reason: String,
    bytes_in: Arc<AtomicU64>,
) -> (http::response::Parts, Body) {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let bytes_out = Arc::new(AtomicU64::new(0));
    let done: Option<Box<dyn FnOnce() + Send + Sync>> = l.shared.obs.log.as_ref().map(|_| {
        let obs = l.shared.obs.clone();
        let status = parts.status.as_u16();
        let bo = bytes_out.clone();
        Box::new(move || {
            rec.finish(
                &obs,
                status,
                reason,
                bytes_in.load(Ordering::Relaxed),
                bo.load(Ordering::Relaxed),
            );
        }) as Box<dyn FnOnce() + Send + Sync>
    });
    (parts, boxed(Counted::new(body, bytes_out, done)))
}

#[allow(clippy::too_many_arguments)]
async fn deliver(
    l: &ListenerCtx,
    conn: &ConnInfo,
    mut rec: Record,
    mut req: Request<Incoming>,
    app: &str,
    authority: &str,
    path: &str,
    outcome: Outcome,
    reason: String,
    grpc: bool,
) -> Response<Body> {
    let app_protocol = conn.app_protocol;
    let shared = &l.shared;
    let headers = req.headers_mut();
    strip_hop_by_hop(headers);
    // Every spelling stacks may read as the peer-ID header (`x_ward_peer_id` maps to the same
    // CGI variable), and the method overrides policy never saw.
    let peer_header = shared.header.as_str();
    let forged: Vec<http::HeaderName> = headers
        .keys()
        .filter(|k| {
            let n = k.as_str();
            n.len() == peer_header.len()
                && n.bytes()
                    .zip(peer_header.bytes())
                    .all(|(a, b)| a == b || (a == b'_' && b == b'-'))
                || (!shared.forward_method_override
                    && matches!(
                        n,
                        "x-http-method-override" | "x-http-method" | "x-method-override"
                    ))
        })
        .cloned()
        .collect();
    for k in forged {
        headers.remove(&k);
    }
    if let Some(p) = &conn.peer
        && let Ok(v) = HeaderValue::from_str(p.as_str())
    {
        headers.insert(shared.header.clone(), v);
    }
    // HTTP/2 to the application only if the original client spoke it (see ORIG_PROTO).
    let orig_h1 = req.headers_mut().remove(crate::http::ORIG_PROTO).is_some();
    let h2 = match app_protocol {
        AppProtocol::Auto => req.version() == Version::HTTP_2 && !orig_h1,
        AppProtocol::Http1 => false,
        AppProtocol::Http2 => true,
    };
    // The request keeps its original authority (Host for HTTP/1.1, :authority for HTTP/2);
    // the connector dials the application whatever the URI says. For HTTP/1.1 the URI names
    // the application, so the pool keeps one set of connections per application rather than
    // one per Host a caller chooses.
    let uri_authority = if h2 { authority } else { app };
    let target = match req.uri().query() {
        Some(q) => format!("http://{uri_authority}{path}?{q}"),
        None => format!("http://{uri_authority}{path}"),
    };
    let Ok(uri) = target.parse::<Uri>() else {
        let r = Refused {
            refusal: Refusal::BadRequest("bad request target"),
            outcome,
            path: None,
        };
        return refuse(l, rec, r, grpc);
    };
    rec.decided(&shared.obs, outcome, "deliver");
    if h2 {
        req.headers_mut().remove(header::HOST);
    } else if let Ok(v) = HeaderValue::from_str(authority) {
        req.headers_mut().insert(header::HOST, v);
    }
    *req.uri_mut() = uri;
    let bytes_in = Arc::new(AtomicU64::new(0));
    let (parts, body) = req.into_parts();
    let mut out = Request::from_parts(parts, boxed(Counted::new(body, bytes_in.clone(), None)));
    let clients = shared.apps.get(app);
    let result = if h2 {
        clients.h2.request(out).await
    } else {
        *out.version_mut() = Version::HTTP_11;
        clients.h1.request(out).await
    };
    rec.observe_latency(&shared.obs);
    match result {
        Ok(resp) => {
            let (parts, body) = finish_with_body(l, rec, resp, reason, bytes_in);
            Response::from_parts(parts, body)
        }
        Err(e) => {
            tracing::warn!(error = %e, app, "application unreachable");
            let r = Refusal::AppUnreachable(e.to_string());
            let (status, ..) = r.answer();
            rec.finish(
                &shared.obs,
                status.as_u16(),
                r.log_reason(),
                bytes_in.load(Ordering::Relaxed),
                0,
            );
            r.respond(grpc)
        }
    }
}

/// Readies a request for a peer proxy: its authority in the URI (it travels as :authority;
/// the connector dials the peer whatever it says), hop-by-hop headers gone, HTTP/2, and the
/// application's HTTP version in ORIG_PROTO.
pub(crate) fn to_peer(req: &mut Request<Incoming>, authority: &str) -> Result<(), Refusal> {
    let pq = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let uri = format!("http://{authority}{pq}")
        .parse::<Uri>()
        .map_err(|_| Refusal::BadRequest("bad request target"))?;
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
    Ok(())
}

/// The response of a peer proxy, on its way back: the record names the peer (and endpoint),
/// is written when the body ends.
pub(crate) fn from_peer(
    l: &ListenerCtx,
    mut rec: Record,
    resp: Response<Incoming>,
    plan: &'static str,
    bytes_in: Arc<AtomicU64>,
    grpc: bool,
) -> Response<Body> {
    rec.decided(&l.shared.obs, Outcome::plain("allow", "outbound"), plan);
    rec.dst = resp
        .extensions()
        .get::<UpstreamId>()
        .and_then(|u| u.0.as_ref())
        .map(ToString::to_string);
    let (mut parts, body) = finish_with_body(l, rec, resp, "forwarded".into(), bytes_in);
    if parts.headers.get(header::CONTENT_TYPE).is_none() && grpc {
        parts.headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
    }
    Response::from_parts(parts, body)
}

/// A request that reached no peer: 502 with the reason, recorded.
fn failed_limiter() -> &'static ward_net::ratelog::LogLimiter {
    static L: std::sync::OnceLock<ward_net::ratelog::LogLimiter> = std::sync::OnceLock::new();
    L.get_or_init(ward_net::ratelog::LogLimiter::for_refusals)
}

pub(crate) fn peer_failed(
    l: &ListenerCtx,
    mut rec: Record,
    plan: &'static str,
    r: Refusal,
    grpc: bool,
) -> Response<Body> {
    if let Some(n) = failed_limiter().admit(&l.name) {
        tracing::warn!(listener = %l.name, reason = %r.log_reason(), suppressed = n,
            "outbound request failed");
    }
    rec.decided(&l.shared.obs, Outcome::plain("error", "outbound"), plan);
    let (status, ..) = r.answer();
    rec.finish(&l.shared.obs, status.as_u16(), r.log_reason(), 0, 0);
    r.respond(grpc)
}

async fn mesh(
    l: &ListenerCtx,
    rec: Record,
    mut req: Request<Incoming>,
    upstream: &str,
    expected: &[ward_spiffe::SpiffeId],
    authority: &str,
    grpc: bool,
) -> Response<Body> {
    let shared = &l.shared;
    if let Err(refusal) = to_peer(&mut req, authority) {
        let r = Refused {
            refusal,
            outcome: Outcome::plain("error", "outbound"),
            path: None,
        };
        return refuse(l, rec, r, grpc);
    }
    let bytes_in = Arc::new(AtomicU64::new(0));
    let (parts, body) = req.into_parts();
    let out = Request::from_parts(parts, boxed(Counted::new(body, bytes_in.clone(), None)));
    let up = shared.upstreams.get(
        upstream,
        expected,
        &shared.sink,
        &l.name,
        &shared.obs.metrics,
    );
    let result = up.client().request(out).await;
    rec.observe_latency(&shared.obs);
    match result {
        Ok(resp) => from_peer(l, rec, resp, "mesh", bytes_in, grpc),
        Err(e) => {
            let r = Refusal::Unavailable(format!(
                "upstream {upstream} unavailable: {}",
                crate::forward::source_chain(&e)
            ));
            peer_failed(l, rec, "mesh", r, grpc)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::pipeline::{RoleCfg, Shared};

    fn listener(idle_timeout: Duration) -> Arc<ListenerCtx> {
        let sink = crate::identity::new_sink(false);
        let metrics = crate::metrics::Metrics::new();
        let shared = Arc::new(Shared {
            server_tls: crate::pipeline::server_tls(sink.clone()),
            sink,
            authz: Arc::new(crate::authz::Authz::new(
                &Default::default(),
                metrics.clone(),
            )),
            obs: crate::observe::Observer { log: None, metrics },
            header: http::HeaderName::from_static("x-ward-peer-id"),
            apps: Default::default(),
            upstreams: Default::default(),
            discovery: None,
            balancer: Default::default(),
            discovery_cfg: Default::default(),
            egress: None,
            forward_method_override: false,
            http_limits: Default::default(),
            idle_timeout,
            gateway: None,
        });
        Arc::new(ListenerCtx {
            name: "out".into(),
            port: 4140,
            protocol: crate::config::Protocol::Http,
            role: RoleCfg::Outbound {
                upstream: "127.0.0.1:1".into(),
                expected: vec![],
            },
            shared,
        })
    }

    /// Found by the `proxy_http` fuzzer: an HTTP/2 client that never acknowledges the PING of
    /// the graceful close kept an idle connection open for ever.
    #[tokio::test(start_paused = true)]
    async fn an_idle_http2_client_that_stays_silent_is_cut() {
        let idle = Duration::from_secs(10);
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let conn = ConnInfo {
            remote: "127.0.0.1:40000".parse().unwrap(),
            peer: None,
            orig_dst: None,
            port: 4140,
            target: String::new(),
            app_protocol: AppProtocol::Auto,
            hello: None,
        };
        let served = tokio::spawn(serve(
            listener(idle),
            server,
            conn,
            CancellationToken::new(),
        ));
        // The preface and an empty SETTINGS, then silence (no SETTINGS or PING ACK).
        client
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await
            .unwrap();
        let mut out = Vec::new();
        let read = tokio::time::timeout(idle * 3, client.read_to_end(&mut out)).await;
        assert!(
            read.is_ok(),
            "the connection was still open after {:?}",
            idle * 3
        );
        tokio::time::timeout(idle, served).await.unwrap().unwrap();
        // It was told: GOAWAY (type 7) before the cut.
        let mut rest = &out[..];
        let mut types = Vec::new();
        while rest.len() >= 9 {
            let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            types.push(rest[3]);
            rest = &rest[(9 + len).min(rest.len())..];
        }
        assert!(types.contains(&7), "frames {types:?}");
    }
}
