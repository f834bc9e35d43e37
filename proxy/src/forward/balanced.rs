//! Forwarding to a mesh service: each request (HTTP) or connection (TCP) goes to the endpoint
//! the balancer picks, over mTLS that requires that endpoint's own SPIFFE IDs. A request that
//! could not even be sent (the endpoint refused the connection or failed the handshake) is
//! tried once more on another endpoint when it can be repeated: no body, so nothing was
//! consumed. Failures count against the endpoint (failure accrual ejects it).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use http::{Request, Response};
use hyper::body::{Body as _, Incoming};
use rand::Rng;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::balance::{EndpointState, pick};
use crate::discover::Destination;
use crate::forward::http::{from_peer, peer_failed, refuse, to_peer};
use crate::http::{Body, Counted, boxed};
use crate::observe::{Outcome, Record};
use crate::pipeline::ListenerCtx;
use crate::plan::Refused;
use crate::refusal::Refusal;

/// How many endpoints one request or connection tries at most.
const MAX_TRIES: usize = 2;

fn choose(l: &ListenerCtx, dest: &Destination, tried: &[SocketAddr]) -> Option<Arc<EndpointState>> {
    let mut rng = rand::rng();
    let i = pick(
        l.shared.balancer,
        &dest.endpoints,
        Instant::now(),
        tried,
        &dest.turn,
        &mut |n| rng.random_range(0..n),
    )?;
    Some(dest.endpoints[i].clone())
}

/// Sends one HTTP request to an endpoint of `dest`.
pub async fn http(
    l: &ListenerCtx,
    mut rec: Record,
    mut req: Request<Incoming>,
    dest: &Destination,
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
    // What is needed to send the request again: only for requests without a body.
    let again = req.body().is_end_stream().then(|| {
        (
            req.method().clone(),
            req.uri().clone(),
            req.version(),
            req.headers().clone(),
        )
    });
    let bytes_in = Arc::new(AtomicU64::new(0));
    let (parts, body) = req.into_parts();
    let mut next = Some(Request::from_parts(
        parts,
        boxed(Counted::new(body, bytes_in.clone(), None)),
    ));
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut last_error = String::new();
    while let Some(out) = next.take() {
        let Some(ep) = choose(l, dest, &tried) else {
            break;
        };
        tried.push(ep.addr);
        rec.endpoint = Some(ep.addr_text.clone());
        let up = shared.upstreams.get(
            &ep.addr_text,
            &ep.ids,
            &shared.sink,
            &l.name,
            &shared.obs.metrics,
        );
        let inflight = ep.start();
        let started = Instant::now();
        let result = up.client().request(out).await;
        drop(inflight);
        match result {
            Ok(resp) => {
                ep.succeeded(started.elapsed(), Instant::now());
                rec.observe_latency(&shared.obs);
                return from_peer(l, rec, resp, "balanced", bytes_in, grpc);
            }
            Err(e) => {
                if ep.failed(Instant::now()) {
                    tracing::warn!(listener = %l.name, service = %dest.service,
                        endpoint = %ep.addr, "endpoint ejected after consecutive failures");
                }
                last_error = format!(
                    "endpoint {} of {} unavailable: {}",
                    ep.addr,
                    dest.service,
                    crate::forward::source_chain(&e)
                );
                // Never sent: safe to send again elsewhere, if it has no body.
                if e.is_connect() && tried.len() < MAX_TRIES {
                    next = again.as_ref().map(|(method, uri, version, headers)| {
                        let mut fresh = Request::new(crate::http::full(bytes::Bytes::new()));
                        *fresh.method_mut() = method.clone();
                        *fresh.uri_mut() = uri.clone();
                        *fresh.version_mut() = *version;
                        *fresh.headers_mut() = headers.clone();
                        fresh
                    });
                }
            }
        }
    }
    rec.observe_latency(&shared.obs);
    if last_error.is_empty() {
        last_error = format!("no endpoint of {} is available", dest.service);
    }
    peer_failed(l, rec, "balanced", Refusal::Unavailable(last_error), grpc)
}

/// Connects one TCP stream to an endpoint of `dest` and splices it; tries another endpoint
/// when the connection or handshake fails.
pub async fn tcp<IO>(l: &ListenerCtx, mut rec: Record, io: &mut IO, dest: &Destination)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send,
{
    let shared = &l.shared;
    let mut tried = Vec::new();
    let mut last_error = String::new();
    while tried.len() < MAX_TRIES {
        let Some(ep) = choose(l, dest, &tried) else {
            break;
        };
        tried.push(ep.addr);
        let up = shared.upstreams.get(
            &ep.addr_text,
            &ep.ids,
            &shared.sink,
            &l.name,
            &shared.obs.metrics,
        );
        let started = Instant::now();
        let inflight = ep.start();
        match up.connect_tcp(&l.name, &shared.obs.metrics).await {
            Ok(mut tls) => {
                ep.succeeded(started.elapsed(), Instant::now());
                rec.endpoint = Some(ep.addr_text.clone());
                rec.dst = crate::tls::upstream_id(&tls).map(|i| i.to_string());
                rec.decided(&shared.obs, Outcome::plain("allow", "outbound"), "balanced");
                let (i, o) = tokio::io::copy_bidirectional(io, &mut tls)
                    .await
                    .unwrap_or((0, 0));
                drop(inflight);
                rec.finish(&shared.obs, 0, "forwarded".into(), i, o);
                return;
            }
            Err(e) => {
                drop(inflight);
                if ep.failed(Instant::now()) {
                    tracing::warn!(listener = %l.name, service = %dest.service,
                        endpoint = %ep.addr, "endpoint ejected after consecutive failures");
                }
                last_error = format!("endpoint {} of {} unavailable: {e}", ep.addr, dest.service);
            }
        }
    }
    if last_error.is_empty() {
        last_error = format!("no endpoint of {} is available", dest.service);
    }
    rec.decided(&shared.obs, Outcome::plain("error", "outbound"), "balanced");
    rec.finish(&shared.obs, 0, last_error, 0, 0);
}
