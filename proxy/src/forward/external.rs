//! Forwarding to a destination outside the mesh that egress allowed ([`Plan::External`]): the
//! allowed name is resolved by the proxy (`crate::egress`) and that answer is dialled — a TLS
//! connection spliced as it came (ClientHello replayed, never terminated), an HTTP request
//! sent on with its Host. Every decision, allowed or refused, is one record in the access log
//! with the name asked for, the address reached and the external service that decided;
//! refusals are also a rate-limited warn line.
//!
//! [`Plan::External`]: crate::plan::Plan::External

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use http::header::HeaderValue;
use http::{Request, Response, Uri, Version};
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite};
use ward_spiffe::egress::Reach;

use crate::http::{Body, Counted, boxed, strip_hop_by_hop};
use crate::observe::{Outcome, Record};
use crate::pipeline::{ConnInfo, ListenerCtx};
use crate::plan::{External, Refused};
use crate::refusal::Refusal;

fn denied_limiter() -> &'static ward_net::ratelog::LogLimiter {
    static L: std::sync::OnceLock<ward_net::ratelog::LogLimiter> = std::sync::OnceLock::new();
    L.get_or_init(ward_net::ratelog::LogLimiter::for_refusals)
}

/// Logs an egress refusal (rate-limited) for operators; the record carries it too.
pub(crate) fn log_refusal(l: &ListenerCtx, rec: &Record, conn: &ConnInfo, r: &Refused) {
    if !r.outcome.policy.starts_with("egress:") {
        return;
    }
    if let Some(n) = denied_limiter().admit(&l.name) {
        tracing::warn!(listener = %l.name, dialled = ?conn.orig_dst, host = ?rec.host,
            policy = %r.outcome.policy, reason = %r.refusal.log_reason(), suppressed = n,
            "egress refused");
    }
}

/// Where the plan says to connect.
async fn target(l: &ListenerCtx, conn: &ConnInfo, e: &External) -> Result<SocketAddr, String> {
    match &e.reach {
        Reach::Name(name) => match &l.shared.egress {
            Some(eg) => eg.resolve(name, e.port).await,
            None => Err("egress is not configured".into()),
        },
        Reach::Dialled => conn
            .orig_dst
            .ok_or_else(|| "the connection has no original destination".to_owned()),
    }
}

/// Splices one connection (TLS as it came, or TCP) to the allowed destination.
pub async fn tcp<IO>(l: &ListenerCtx, conn: &ConnInfo, mut rec: Record, io: &mut IO, e: External)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send,
{
    let obs = &l.shared.obs;
    rec.host = e.name.clone();
    let to = match target(l, conn, &e).await {
        Ok(a) => a,
        Err(why) => {
            rec.decided(obs, Outcome::plain("error", &e.policy), "egress");
            rec.finish(obs, 0, why, 0, 0);
            return;
        }
    };
    rec.endpoint = Some(to.to_string());
    rec.decided(obs, Outcome::plain("allow", &e.policy), "egress");
    let mut up = match crate::forward::pools::dial(&to.to_string()).await {
        Ok(u) => u,
        Err(err) => {
            rec.finish(obs, 0, format!("{to} unreachable: {err}"), 0, 0);
            return;
        }
    };
    let (i, o) = super::idle::splice(io, &mut up, l.shared.idle_timeout)
        .await
        .unwrap_or((0, 0));
    rec.finish(obs, 0, e.reason, i, o);
}

/// Sends one plaintext HTTP request on to the allowed destination, its Host unchanged.
pub async fn http(
    l: &ListenerCtx,
    conn: &ConnInfo,
    mut rec: Record,
    mut req: Request<Incoming>,
    e: External,
    grpc: bool,
) -> Response<Body> {
    let obs = &l.shared.obs;
    rec.host = e.name.clone();
    let to = match target(l, conn, &e).await {
        // TLS origination: the same address, the service's HTTPS port.
        Ok(a) => e.originate_tls.map_or(a, |p| SocketAddr::new(a.ip(), p)),
        Err(why) => {
            let r = Refusal::Unavailable(why);
            rec.decided(obs, Outcome::plain("error", &e.policy), "egress");
            let (status, ..) = r.answer();
            rec.finish(obs, status.as_u16(), r.log_reason(), 0, 0);
            return r.respond(grpc);
        }
    };
    rec.endpoint = Some(to.to_string());
    rec.decided(obs, Outcome::plain("allow", &e.policy), "egress");
    strip_hop_by_hop(req.headers_mut());
    req.headers_mut().remove(crate::http::ORIG_PROTO);
    // An HTTP/2 request carries its authority in the URI: it becomes the Host.
    if req.headers().get(http::header::HOST).is_none()
        && let Some(a) = req.uri().authority()
        && let Ok(v) = HeaderValue::from_str(a.as_str())
    {
        req.headers_mut().insert(http::header::HOST, v);
    }
    let pq = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let Ok(uri) = format!("http://{to}{pq}").parse::<Uri>() else {
        let r = Refusal::BadRequest("bad request target");
        let (status, ..) = r.answer();
        rec.finish(obs, status.as_u16(), r.log_reason(), 0, 0);
        return r.respond(grpc);
    };
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    let bytes_in = Arc::new(AtomicU64::new(0));
    let (parts, body) = req.into_parts();
    let out = Request::from_parts(parts, boxed(Counted::new(body, bytes_in.clone(), None)));
    let result = match (e.originate_tls, &e.name, &l.shared.egress) {
        (Some(_), Some(name), Some(eg)) => originate(eg, name, to, out).await,
        _ => l
            .shared
            .apps
            .get(&to.to_string())
            .h1
            .request(out)
            .await
            .map_err(|err| crate::forward::source_chain(&err)),
    };
    rec.observe_latency(obs);
    match result {
        Ok(resp) => {
            let (parts, body) =
                crate::forward::http::finish_with_body(l, rec, resp, e.reason, bytes_in);
            Response::from_parts(parts, body)
        }
        Err(err) => {
            let r = Refusal::Unavailable(format!("{to} unreachable: {err}"));
            let (status, ..) = r.answer();
            rec.finish(
                obs,
                status.as_u16(),
                r.log_reason(),
                bytes_in.load(Ordering::Relaxed),
                0,
            );
            r.respond(grpc)
        }
    }
}

/// Sends `req` as HTTPS to `name` at `to`: TLS verified for `name` against the public roots
/// (and any configured ones), then HTTP/1.1. One connection per request.
async fn originate(
    eg: &crate::egress::Egress,
    name: &str,
    to: SocketAddr,
    mut req: Request<Body>,
) -> Result<Response<Incoming>, String> {
    let server = rustls_pki_types::ServerName::try_from(name.to_owned())
        .map_err(|e| format!("{name} is not a TLS server name: {e}"))?;
    let tcp = crate::forward::pools::dial(&to.to_string())
        .await
        .map_err(|e| e.to_string())?;
    let tls = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(eg.origination()).connect(server, tcp),
    )
    .await
    .map_err(|_| format!("TLS to {name} timed out"))?
    .map_err(|e| format!("TLS to {name}: {e}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP to {name}: {e}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    // Origin form on the wire; the Host header names the server.
    let pq = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    *req.uri_mut() = pq.parse().map_err(|_| "bad request target".to_owned())?;
    sender
        .send_request(req)
        .await
        .map_err(|e| crate::forward::source_chain(&e))
}

/// A sidecar with an egress gateway: the connection goes, unread, over mTLS (this workload's
/// identity; the gateway must present one of its expected IDs) to the gateway, after a PROXY
/// v2 header naming the address the application dialled. The gateway decides and records.
pub async fn tunnel(
    l: &ListenerCtx,
    mut io: tokio::net::TcpStream,
    conn: ConnInfo,
    gw: &crate::egress::GatewayRef,
) {
    use tokio::io::AsyncWriteExt as _;
    let shared = &l.shared;
    let obs = &shared.obs;
    let own = shared.own_id();
    let mut rec = Record::start(&l.name, "tcp", own.as_ref(), conn.orig_dst);
    let Some(dst) = conn.orig_dst else {
        return;
    };
    if rec.admit(obs).await.is_err() {
        // Closed unrecorded: the access log cannot take its record (`on_full: refuse`).
        return;
    }
    let up = shared.upstreams.get(
        &gw.address,
        &gw.expected_ids,
        &shared.sink,
        &l.name,
        &obs.metrics,
    );
    rec.endpoint = Some(gw.address.clone());
    let mut tls = match up.connect_tcp(&l.name, &obs.metrics).await {
        Ok(t) => t,
        Err(e) => {
            rec.decided(
                obs,
                Outcome::plain("error", "egress:gateway"),
                "egress-gateway",
            );
            rec.finish(
                obs,
                0,
                format!("egress gateway {} unavailable: {e}", gw.address),
                0,
                0,
            );
            return;
        }
    };
    rec.dst = crate::tls::upstream_id(&tls).map(|i| i.to_string());
    let header = crate::detect::proxy_header::encode(&crate::detect::proxy_header::Addresses {
        src: conn.remote,
        dst,
    });
    if let Err(e) = tls.write_all(&header).await {
        rec.decided(
            obs,
            Outcome::plain("error", "egress:gateway"),
            "egress-gateway",
        );
        rec.finish(obs, 0, format!("egress gateway {}: {e}", gw.address), 0, 0);
        return;
    }
    rec.decided(
        obs,
        Outcome::plain("allow", "egress:gateway"),
        "egress-gateway",
    );
    let (i, o) = super::idle::splice(&mut io, &mut tls, l.shared.idle_timeout)
        .await
        .unwrap_or((0, 0));
    rec.finish(obs, 0, "through the egress gateway".into(), i, o);
}
