//! What the HTTP stage does for the ingress gateway before a request is routed: the client's
//! rate and declared body size are checked, and the forwarding headers are replaced by the
//! gateway's own view.

use http::Request;
use hyper::body::Incoming;

use crate::observe::Outcome;
use crate::pipeline::{ConnInfo, ListenerCtx, RoleCfg};
use crate::plan::Refused;
use crate::refusal::Refusal;

fn limiter() -> &'static ward_net::ratelog::LogLimiter {
    static L: std::sync::OnceLock<ward_net::ratelog::LogLimiter> = std::sync::OnceLock::new();
    L.get_or_init(ward_net::ratelog::LogLimiter::for_refusals)
}

/// Refuses a request the gateway will not take from this client: over its rate (429) or
/// declaring a body larger than allowed (413). Each refusal is logged (rate-limited).
pub fn admit(l: &ListenerCtx, conn: &ConnInfo, req: &Request<Incoming>) -> Option<Refused> {
    let gw = l.shared.gateway.as_ref()?;
    let refusal = if let Some(Err(wait)) = gw.limiter.as_ref().map(|r| r.check(conn.remote.ip())) {
        Refusal::RateLimited(wait)
    } else {
        let declared = req
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        match (gw.max_body, declared) {
            (Some(max), Some(n)) if n > max => Refusal::TooLarge(format!(
                "request body of {n} bytes is over the gateway's limit of {max}"
            )),
            _ => return None,
        }
    };
    let policy = match refusal {
        Refusal::RateLimited(_) => "gateway:rate_limit",
        _ => "gateway:body_size",
    };
    if let Some(n) = limiter().admit(&l.name) {
        tracing::warn!(listener = %l.name, client = %conn.remote, reason = %refusal.log_reason(),
            suppressed = n, "gateway refused a request");
    }
    Some(Refused {
        refusal,
        outcome: Outcome::plain("deny", policy),
        path: None,
    })
}

/// Sets `X-Forwarded-For`/`-Proto`/`-Host` and `Forwarded` from the connection, replacing
/// whatever the client sent.
pub fn forwarding_headers(l: &ListenerCtx, conn: &ConnInfo, req: &mut Request<Incoming>) {
    let proto = match l.role {
        RoleCfg::Gateway { https: true, .. } => "https",
        _ => "http",
    };
    // The plan accepted this authority, so it is well-formed.
    let host = crate::forward::http::given_authority(req).map(ToOwned::to_owned);
    crate::gateway::forwarded::set(req.headers_mut(), conn.remote.ip(), proto, host.as_deref());
}

/// Answers an ACME HTTP-01 validation: the key authorization of `token` while its order is
/// being validated, 404 otherwise.
pub fn acme_answer(
    l: &ListenerCtx,
    mut rec: crate::observe::Record,
    token: &str,
) -> http::Response<crate::http::Body> {
    let answer = l
        .shared
        .gateway
        .as_ref()
        .and_then(|g| g.http01_answer(token));
    let Some(answer) = answer else {
        let r = Refused {
            refusal: Refusal::NoMatchingRoute("no ACME challenge with this token".into()),
            outcome: Outcome::plain("deny", "gateway:acme"),
            path: None,
        };
        return crate::forward::http::refuse(l, rec, r, false);
    };
    rec.decided(
        &l.shared.obs,
        Outcome::plain("allow", "gateway:acme"),
        "acme",
    );
    rec.finish(
        &l.shared.obs,
        200,
        "ACME HTTP-01 challenge answered".into(),
        0,
        answer.len() as u64,
    );
    let mut r = http::Response::new(crate::http::full(answer));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/octet-stream"),
    );
    r
}
