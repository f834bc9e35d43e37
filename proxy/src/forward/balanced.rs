//! Forwarding to a mesh service: each request (HTTP) or connection (TCP) goes to the endpoint
//! the balancer picks, over mTLS that requires that endpoint's own SPIFFE IDs. A request that
//! can be built again (no body, or a small buffered one) is retried on another endpoint: when
//! it could not be sent (connection refused, handshake failed) whatever its method; when the
//! connection broke or the answer was 502/503/504/`UNAVAILABLE`, if it is idempotent; or as
//! its route rule's retry policy says. Every retry is drawn from the destination's budget.
//! Failures count against the endpoint (failure accrual ejects it).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::{Body as _, Incoming};
use rand::Rng;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::balance::{EndpointState, pick};
use crate::discover::Destination;
use crate::forward::http::{from_peer, peer_failed, refuse, to_peer};
use crate::http::{Body, Counted, boxed};
use crate::metrics::{EndpointLabel, EndpointOutcome, ServiceLabel};
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

/// Methods whose requests may be repeated after an answer (RFC 9110 §9.2.2).
fn idempotent(m: &http::Method) -> bool {
    matches!(
        *m,
        http::Method::GET
            | http::Method::HEAD
            | http::Method::OPTIONS
            | http::Method::PUT
            | http::Method::DELETE
            | http::Method::TRACE
    )
}

/// An answer that says the endpoint could not serve: 502/503/504, or gRPC UNAVAILABLE. It
/// counts as a failure of the endpoint (failure accrual) and may be retried elsewhere.
fn unavailable<B>(resp: &Response<B>) -> bool {
    matches!(resp.status().as_u16(), 502..=504)
        || resp
            .headers()
            .get("grpc-status")
            .is_some_and(|v| v.as_bytes() == b"14")
}

/// How long to wait before sending a request again after `resp` (from `Retry-After`, seconds
/// only); `None` when it must not be (a longer wait than `max`, or one that cannot be read).
fn retry_after<B>(resp: &Response<B>, max: Duration) -> Option<Duration> {
    let wait = match resp.headers().get(http::header::RETRY_AFTER) {
        None => Duration::ZERO,
        Some(v) => Duration::from_secs(v.to_str().ok()?.trim().parse().ok()?),
    };
    (wait <= max).then_some(wait)
}

/// Request bodies up to this size (declared by `Content-Length`) are buffered so the request
/// can be sent again; larger ones stream and are not retried (Linkerd's limit).
pub const RETRY_BODY_LIMIT: u64 = 64 * 1024;

/// A request as it can be built again: one without a body, or with a small buffered one.
struct Again {
    method: http::Method,
    uri: http::Uri,
    version: http::Version,
    headers: http::HeaderMap,
    body: bytes::Bytes,
}

impl Again {
    fn build(&self) -> Request<Body> {
        let mut r = Request::new(crate::http::full(self.body.clone()));
        *r.method_mut() = self.method.clone();
        *r.uri_mut() = self.uri.clone();
        *r.version_mut() = self.version;
        *r.headers_mut() = self.headers.clone();
        r
    }
}

/// How long a request may take and when it is sent again: the listener's configuration, or a
/// route rule's.
#[derive(Debug, Clone, Default)]
pub struct RequestPolicy {
    /// The whole request, retries included.
    pub request: Option<Duration>,
    /// Each attempt on an endpoint (an attempt that takes longer counts as a failure of the
    /// endpoint and may be retried like a 504).
    pub attempt: Option<Duration>,
    /// The route rule's retry policy; none: the configured retries of idempotent requests.
    pub retry: Option<ward_spiffe::route::Retry>,
}

impl RequestPolicy {
    /// The listener's configured request timeout and retries.
    pub fn configured(l: &ListenerCtx) -> Self {
        Self {
            request: l.shared.discovery_cfg.request_timeout,
            ..Default::default()
        }
    }
}

/// Whether an attempt may be followed by another, and after how long.
struct Retrying<'a> {
    route: Option<&'a ward_spiffe::route::Retry>,
    cfg: crate::config::RetryCfg,
    /// The request is idempotent and can be built again.
    idempotent: bool,
}

impl Retrying<'_> {
    /// How many endpoints (or, with a route policy, attempts) one request may try.
    fn tries(&self) -> usize {
        self.route.map_or(MAX_TRIES, |r| 1 + r.attempts as usize)
    }

    /// After the connection failed (`connect`: the request was never sent) or broke.
    fn after_error(&self, connect: bool) -> Option<Duration> {
        (connect || self.idempotent || self.route.is_some()).then(|| self.backoff())
    }

    /// After an attempt took longer than its timeout (like a 504).
    fn after_timeout(&self) -> Option<Duration> {
        match self.route {
            Some(r) => r.retries(504, None).then(|| self.backoff()),
            None => (self.cfg.on_5xx && self.idempotent).then_some(Duration::ZERO),
        }
    }

    /// After an answer.
    fn after_answer<B>(&self, resp: &Response<B>) -> Option<Duration> {
        let retried = match self.route {
            Some(r) => r.retries(
                resp.status().as_u16(),
                resp.headers().get("grpc-status").map(|v| v.as_bytes()),
            ),
            None => self.cfg.on_5xx && self.idempotent && unavailable(resp),
        };
        if !retried {
            return None;
        }
        retry_after(resp, self.cfg.max_retry_after).map(|w| w.max(self.backoff()))
    }

    fn backoff(&self) -> Duration {
        self.route.and_then(|r| r.backoff).unwrap_or_default()
    }
}

/// Sends one HTTP request to an endpoint of `dest`, with retries, within `timeouts`.
pub async fn http(
    l: &ListenerCtx,
    mut rec: Record,
    mut req: Request<Incoming>,
    dest: &Destination,
    authority: &str,
    grpc: bool,
    policy: RequestPolicy,
) -> Response<Body> {
    if let Err(refusal) = to_peer(&mut req, authority) {
        let r = Refused {
            refusal,
            outcome: Outcome::plain("error", "outbound"),
            path: None,
        };
        return refuse(l, rec, r, grpc);
    }
    let timeout = policy.request;
    let attempts = attempts(l, &mut rec, req, dest, grpc, &policy);
    match timeout {
        None => attempts.await,
        Some(t) => match tokio::time::timeout(t, attempts).await {
            Ok(resp) => resp,
            Err(_) => {
                let r = Refusal::Timeout(format!(
                    "request to {} timed out after {}",
                    dest.service,
                    ward_net::duration::format(t)
                ));
                rec.observe_latency(&l.shared.obs);
                peer_failed(l, rec, "balanced", r, grpc)
            }
        },
    }
}

/// Records a failure of `ep` (no answer, an "unavailable" answer, a timeout); logs and counts
/// an ejection.
fn failed(l: &ListenerCtx, dest: &Destination, ep: &EndpointState, outcome: &str) {
    let m = &l.shared.obs.metrics;
    count(l, dest, ep, outcome);
    if ep.failed(Instant::now()) {
        m.ejections
            .get_or_create(&EndpointLabel {
                service: dest.service.clone(),
                endpoint: ep.addr_text.clone(),
            })
            .inc();
        tracing::warn!(listener = %l.name, service = %dest.service, endpoint = %ep.addr,
            pod = ?ep.pod, "endpoint ejected after consecutive failures");
    }
}

/// Counts one request or connection to `ep` by outcome.
fn count(l: &ListenerCtx, dest: &Destination, ep: &EndpointState, outcome: &str) {
    l.shared
        .obs
        .metrics
        .endpoint_requests
        .get_or_create(&EndpointOutcome {
            service: dest.service.clone(),
            endpoint: ep.addr_text.clone(),
            outcome: outcome.to_owned(),
        })
        .inc();
}

/// Records an answer from `ep` after `rtt`: latency, the new estimate.
fn answered(l: &ListenerCtx, dest: &Destination, ep: &EndpointState, rtt: Duration) {
    let now = Instant::now();
    ep.succeeded(rtt, now);
    let m = &l.shared.obs.metrics;
    let label = EndpointLabel {
        service: dest.service.clone(),
        endpoint: ep.addr_text.clone(),
    };
    m.endpoint_latency
        .get_or_create(&label)
        .observe(rtt.as_secs_f64());
    m.endpoint_ewma
        .get_or_create(&label)
        .set(ep.ewma_ns(now) / 1e9);
}

/// The request's body, and what is needed to send it again: with no body, or a declared
/// length up to [`RETRY_BODY_LIMIT`] (buffered), it can be; otherwise it streams once — cut
/// off at `max_body` bytes when there is a limit (the gateway's: a body without a declared
/// length is counted as it streams).
async fn prepare(
    req: Request<Incoming>,
    bytes_in: &Arc<AtomicU64>,
    max_body: Option<u64>,
) -> Result<(Request<Body>, Option<Again>), Refusal> {
    let small = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .is_some_and(|n| n <= RETRY_BODY_LIMIT);
    let (parts, body) = req.into_parts();
    let again = |body: bytes::Bytes| Again {
        method: parts.method.clone(),
        uri: parts.uri.clone(),
        version: parts.version,
        headers: parts.headers.clone(),
        body,
    };
    if body.is_end_stream() {
        let a = again(bytes::Bytes::new());
        return Ok((
            Request::from_parts(parts, crate::http::full(bytes::Bytes::new())),
            Some(a),
        ));
    }
    if small {
        use http_body_util::BodyExt as _;
        let limited = http_body_util::Limited::new(body, RETRY_BODY_LIMIT as usize);
        let b = limited
            .collect()
            .await
            .map_err(|_| Refusal::BadRequest("the request body could not be read"))?
            .to_bytes();
        bytes_in.store(b.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let a = again(b.clone());
        return Ok((Request::from_parts(parts, crate::http::full(b)), Some(a)));
    }
    let counted = Counted::new(body, bytes_in.clone(), None);
    let streamed = match max_body {
        Some(max) => boxed(http_body_util::Limited::new(
            counted,
            usize::try_from(max).unwrap_or(usize::MAX),
        )),
        None => boxed(counted),
    };
    Ok((Request::from_parts(parts, streamed), None))
}

async fn attempts(
    l: &ListenerCtx,
    rec: &mut Record,
    req: Request<Incoming>,
    dest: &Destination,
    grpc: bool,
    policy: &RequestPolicy,
) -> Response<Body> {
    use tower::retry::budget::Budget as _;
    let shared = &l.shared;
    let per_attempt = policy.attempt;
    dest.budget.deposit();
    let bytes_in = Arc::new(AtomicU64::new(0));
    let max_body = if l.role.is_gateway() {
        shared.gateway.as_ref().and_then(|g| g.max_body)
    } else {
        None
    };
    let (first, again) = match prepare(req, &bytes_in, max_body).await {
        Ok(x) => x,
        Err(refusal) => {
            let r = Refused {
                refusal,
                outcome: Outcome::plain("error", "outbound"),
                path: None,
            };
            return refuse(l, rec.clone(), r, grpc);
        }
    };
    let retrying = Retrying {
        route: policy.retry.as_ref(),
        cfg: shared.discovery_cfg.retries,
        idempotent: again.as_ref().is_some_and(|a| idempotent(&a.method)),
    };
    let mut next = Some(first);
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut last_error = String::new();
    let mut retried = 0u64;
    let count_retries = |retried: u64| {
        if retried > 0 {
            shared
                .obs
                .metrics
                .retries
                .get_or_create(&ServiceLabel {
                    service: dest.service.clone(),
                })
                .inc_by(retried);
        }
    };
    while let Some(out) = next.take() {
        // A route's retries may go back to an endpoint already tried when no other is left.
        let ep = choose(l, dest, &tried).or_else(|| {
            (retrying.route.is_some() && !tried.is_empty())
                .then(|| choose(l, dest, &[]))
                .flatten()
        });
        let Some(ep) = ep else {
            break;
        };
        // Counted when sent: a retry decided on may find no endpoint left to go to.
        if !tried.is_empty() {
            retried += 1;
        }
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
        let sent = up.client().request(out);
        let result = match per_attempt {
            None => Ok(sent.await),
            Some(t) => tokio::time::timeout(t, sent).await,
        };
        drop(inflight);
        let may_retry = tried.len() < retrying.tries() && again.is_some();
        // Takes from the budget only when a retry is otherwise allowed.
        let retry = |wait: Option<Duration>| wait.filter(|_| may_retry && dest.budget.withdraw());
        match result {
            // The attempt took too long: a failure of the endpoint, retried like a 504.
            Err(_) => {
                failed(l, dest, &ep, "timeout");
                last_error = format!(
                    "endpoint {} of {} did not answer within {}",
                    ep.addr,
                    dest.service,
                    ward_net::duration::format(per_attempt.unwrap_or_default())
                );
                if let Some(wait) = retry(retrying.after_timeout()) {
                    tokio::time::sleep(wait).await;
                    next = again.as_ref().map(Again::build);
                    continue;
                }
                rec.observe_latency(&shared.obs);
                count_retries(retried);
                return peer_failed(
                    l,
                    rec.clone(),
                    "balanced",
                    Refusal::Timeout(last_error),
                    grpc,
                );
            }
            Ok(Ok(resp)) => {
                let class = crate::metrics::status_class(resp.status().as_u16());
                if unavailable(&resp) {
                    failed(l, dest, &ep, &class);
                } else {
                    count(l, dest, &ep, &class);
                    answered(l, dest, &ep, started.elapsed());
                }
                if let Some(wait) = retry(retrying.after_answer(&resp)) {
                    tracing::debug!(service = %dest.service, endpoint = %ep.addr,
                        status = resp.status().as_u16(), "retrying on another endpoint");
                    tokio::time::sleep(wait).await;
                    next = again.as_ref().map(Again::build);
                    continue;
                }
                rec.observe_latency(&shared.obs);
                count_retries(retried);
                return from_peer(l, rec.clone(), resp, "balanced", bytes_in, grpc);
            }
            // The body went over the limit (what streamed through is counted before the limit
            // is checked; HTTP/2 does not pass the body's error on as the send's cause): the
            // client's body, not the endpoint, failed: 413, and no retry.
            Ok(Err(_))
                if max_body
                    .is_some_and(|m| bytes_in.load(std::sync::atomic::Ordering::Relaxed) > m) =>
            {
                rec.observe_latency(&shared.obs);
                count_retries(retried);
                let r = Refused {
                    refusal: Refusal::TooLarge(format!(
                        "request body over the gateway's limit of {} bytes",
                        max_body.unwrap_or_default()
                    )),
                    outcome: Outcome::plain("deny", "gateway:body_size"),
                    path: None,
                };
                return refuse(l, rec.clone(), r, grpc);
            }
            Ok(Err(e)) => {
                failed(l, dest, &ep, "error");
                last_error = format!(
                    "endpoint {} of {} unavailable: {}",
                    ep.addr,
                    dest.service,
                    crate::forward::source_chain(&e)
                );
                // Never sent (connect failed): safe to send again whatever the method; the
                // connection broke mid-request: safe for idempotent or route-retried requests.
                if let Some(wait) = retry(retrying.after_error(e.is_connect())) {
                    tokio::time::sleep(wait).await;
                    next = again.as_ref().map(Again::build);
                }
            }
        }
    }
    rec.observe_latency(&shared.obs);
    count_retries(retried);
    if last_error.is_empty() {
        last_error = format!("no endpoint of {} is available", dest.service);
    }
    peer_failed(
        l,
        rec.clone(),
        "balanced",
        Refusal::Unavailable(last_error),
        grpc,
    )
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
                count(l, dest, &ep, "connected");
                answered(l, dest, &ep, started.elapsed());
                rec.endpoint = Some(ep.addr_text.clone());
                rec.dst = crate::tls::upstream_id(&tls).map(|i| i.to_string());
                rec.decided(&shared.obs, Outcome::plain("allow", "outbound"), "balanced");
                let (i, o) = super::idle::splice(io, &mut tls, l.shared.idle_timeout)
                    .await
                    .unwrap_or((0, 0));
                drop(inflight);
                rec.finish(&shared.obs, 0, "forwarded".into(), i, o);
                return;
            }
            Err(e) => {
                drop(inflight);
                failed(l, dest, &ep, "error");
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
