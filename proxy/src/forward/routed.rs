//! The route stage: an HTTP request to a service with routes goes where its rule says. The
//! rule's filters change request headers, rewrite the host and path, or answer with a
//! redirect; a backend is picked by weight and looked up as a destination of its own (its
//! endpoints, its retry budget — never its routes, so routes do not chain); the rule's
//! timeouts replace the configured one; response header changes apply to the answer.

use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode};
use hyper::body::Incoming;
use rand::Rng;
use ward_spiffe::route::{Filter, HeaderChanges, Redirect, Rewrite, change_path, pick_backend};

use crate::discover::Resolution;
use crate::forward::balanced::{self, RequestPolicy};
use crate::forward::http::refuse;
use crate::http::Body;
use crate::metrics::{RouteLabel, RouteOutcome};
use crate::observe::{Outcome, Record};
use crate::pipeline::ListenerCtx;
use crate::plan::{Refused, Routed};
use crate::refusal::Refusal;

/// Applies header changes: set replaces, add appends, remove removes. Names and values were
/// checked when the routes compiled.
pub fn change_headers(h: &mut HeaderMap, c: &HeaderChanges) {
    for x in &c.set {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(x.name.as_bytes()),
            HeaderValue::from_str(&x.value),
        ) {
            h.insert(n, v);
        }
    }
    for x in &c.add {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(x.name.as_bytes()),
            HeaderValue::from_str(&x.value),
        ) {
            h.append(n, v);
        }
    }
    for n in &c.remove {
        if let Ok(n) = HeaderName::from_bytes(n.as_bytes()) {
            h.remove(n);
        }
    }
}

/// The `Location` of a redirect, by the Gateway API's rules: the scheme, host and path are
/// the request's unless the filter replaces them; with a new scheme and no port the port is
/// the scheme's own (and, like 80 for http and 443 for https, left out); the query stays.
pub fn location(
    r: &Redirect,
    authority: &str,
    path: &str,
    query: Option<&str>,
    prefix: Option<&str>,
) -> String {
    let (host, given_port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => match p.parse::<u16>() {
            Ok(p) => (h, Some(p)),
            Err(_) => (authority, None),
        },
        _ => (authority, None),
    };
    let scheme = r.scheme.as_deref().unwrap_or("http");
    let host = r.hostname.as_deref().unwrap_or(host);
    let port = match (r.port, &r.scheme) {
        (Some(p), _) => Some(p),
        (None, Some(_)) => None,
        (None, None) => given_port,
    };
    let port = port.filter(|p| !matches!((scheme, *p), ("http", 80) | ("https", 443)));
    let path = match &r.path {
        Some(c) => change_path(path, c, prefix),
        None => path.to_owned(),
    };
    let mut out = format!("{scheme}://{host}");
    if let Some(p) = port {
        out.push_str(&format!(":{p}"));
    }
    out.push_str(&path);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

fn route_failed(l: &ListenerCtx, rec: Record, why: String, grpc: bool) -> Response<Body> {
    if let Some(n) = limiter().admit(&l.name) {
        tracing::warn!(listener = %l.name, reason = %why, suppressed = n, "route cannot forward");
    }
    let r = Refused {
        refusal: Refusal::RouteFailed(why),
        outcome: Outcome::plain("error", "route"),
        path: None,
    };
    refuse(l, rec, r, grpc)
}

fn limiter() -> &'static ward_net::ratelog::LogLimiter {
    static L: std::sync::OnceLock<ward_net::ratelog::LogLimiter> = std::sync::OnceLock::new();
    L.get_or_init(ward_net::ratelog::LogLimiter::for_refusals)
}

/// Carries out the rule `routed` for `req`, and counts it for the rule.
pub async fn http(
    l: &ListenerCtx,
    rec: Record,
    req: Request<Incoming>,
    authority: String,
    routed: Routed,
    grpc: bool,
) -> Response<Body> {
    let routes = routed.routes.clone();
    let rule = routes.rule(routed.selection);
    let name = format!("{}#{}", rule.route, rule.index);
    let started = std::time::Instant::now();
    let resp = run(l, rec, req, &routes, authority, routed, grpc, &name).await;
    let m = &l.shared.obs.metrics;
    m.route_requests
        .get_or_create(&RouteOutcome {
            route: name.clone(),
            outcome: crate::metrics::status_class(resp.status().as_u16()),
        })
        .inc();
    m.route_latency
        .get_or_create(&RouteLabel { route: name })
        .observe(started.elapsed().as_secs_f64());
    resp
}

#[allow(clippy::too_many_arguments)]
async fn run(
    l: &ListenerCtx,
    mut rec: Record,
    mut req: Request<Incoming>,
    routes: &ward_spiffe::route::Routes,
    mut authority: String,
    routed: Routed,
    grpc: bool,
    name: &str,
) -> Response<Body> {
    let rule = routes.rule(routed.selection);
    let prefix = routes.prefix(routed.selection);
    let name = name.to_owned();
    rec.set_path(&routed.path);
    rec.route = Some(name.clone());
    let mut response_changes: Vec<&HeaderChanges> = Vec::new();
    for f in &rule.rule.filters {
        match f {
            Filter::RequestHeaders(c) => change_headers(req.headers_mut(), c),
            Filter::ResponseHeaders(c) => response_changes.push(c),
            Filter::Redirect(r) => {
                let to = location(r, &authority, &routed.path, req.uri().query(), prefix);
                let status = match r.status {
                    Some(301) => 301,
                    _ => 302,
                };
                return answer_redirect(l, rec, status, &to, &response_changes);
            }
            Filter::Rewrite(Rewrite { hostname, path }) => {
                if let Some(h) = hostname {
                    authority = h.clone();
                }
                if let Some(c) = path {
                    let mut pq = change_path(&routed.path, c, prefix);
                    if let Some(q) = req.uri().query() {
                        pq.push('?');
                        pq.push_str(q);
                    }
                    let mut parts = req.uri().clone().into_parts();
                    match pq.parse() {
                        Ok(pq) => parts.path_and_query = Some(pq),
                        Err(_) => {
                            let why = format!(
                                "route rule {name} rewrote the path to {pq:?}, which is not a path"
                            );
                            return route_failed(l, rec, why, grpc);
                        }
                    }
                    if let Ok(u) = http::Uri::from_parts(parts) {
                        *req.uri_mut() = u;
                    }
                }
            }
        }
    }
    if rule.rule.backends.is_empty() {
        return route_failed(l, rec, format!("route rule {name} has no backend"), grpc);
    }
    let backend = {
        let mut rng = rand::rng();
        match pick_backend(&rule.rule.backends, &mut |n| rng.random_range(0..n)) {
            Some(b) => b.clone(),
            None => {
                let why = format!("every backend of route rule {name} has weight 0");
                return route_failed(l, rec, why, grpc);
            }
        }
    };
    if let Some(why) = &backend.refused {
        let why = format!(
            "backend {} of route rule {name} may not be used: {why}",
            backend.service
        );
        return route_failed(l, rec, why, grpc);
    }
    let target = format!("{}:{}", backend.service, backend.port);
    let Some(discovery) = &l.shared.discovery else {
        return route_failed(l, rec, "service discovery is off".into(), grpc);
    };
    let d = match discovery.resolve(&target).await {
        Some(Resolution::Endpoints(d)) if !d.endpoints.is_empty() => d,
        Some(Resolution::Endpoints(_) | Resolution::NoEndpoints(_)) => {
            let r = Refused {
                refusal: Refusal::Unavailable(format!(
                    "backend {target} of route rule {name} has no endpoint ready"
                )),
                outcome: Outcome::plain("error", "route"),
                path: None,
            };
            return refuse(l, rec, r, grpc);
        }
        Some(Resolution::NoSuchService) => {
            let why = format!("backend {target} of route rule {name} is not a mesh service");
            return route_failed(l, rec, why, grpc);
        }
        None => {
            let r = Refused {
                refusal: Refusal::Unavailable(format!(
                    "no answer from discovery about backend {target}"
                )),
                outcome: Outcome::plain("error", "route"),
                path: None,
            };
            return refuse(l, rec, r, grpc);
        }
    };
    let configured = RequestPolicy::configured(l);
    let policy = RequestPolicy {
        request: rule.rule.timeout.or(configured.request),
        attempt: rule.rule.backend_timeout,
        retry: rule.rule.retry.clone(),
    };
    let mut resp = balanced::http(l, rec, req, &d, &authority, grpc, policy).await;
    for c in response_changes {
        change_headers(resp.headers_mut(), c);
    }
    resp
}

/// Answers with a redirect to `to` (`status` 301, 302 or 308), recorded.
pub fn answer_redirect(
    l: &ListenerCtx,
    mut rec: Record,
    status: u16,
    to: &str,
    response_changes: &[&HeaderChanges],
) -> Response<Body> {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::FOUND);
    rec.decided(&l.shared.obs, Outcome::plain("allow", "route"), "redirect");
    rec.finish(
        &l.shared.obs,
        status.as_u16(),
        format!("redirect to {to}"),
        0,
        0,
    );
    let mut resp = Response::new(crate::http::full(bytes::Bytes::new()));
    *resp.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(to) {
        resp.headers_mut().insert(http::header::LOCATION, v);
    }
    for c in response_changes {
        change_headers(resp.headers_mut(), c);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use ward_spiffe::route::PathChange;

    #[test]
    fn redirect_locations_follow_the_gateway_api() {
        let r = |scheme: Option<&str>, port: Option<u16>, path: Option<PathChange>| Redirect {
            scheme: scheme.map(Into::into),
            hostname: None,
            port,
            path,
            status: None,
        };
        let loc = |r: &Redirect, a: &str| location(r, a, "/api/x", Some("q=1"), Some("/api"));
        assert_eq!(
            loc(&r(None, None, None), "web:8080"),
            "http://web:8080/api/x?q=1"
        );
        assert_eq!(
            loc(&r(Some("https"), None, None), "web:8080"),
            "https://web/api/x?q=1"
        );
        assert_eq!(
            loc(&r(Some("https"), Some(443), None), "web"),
            "https://web/api/x?q=1"
        );
        assert_eq!(
            loc(&r(None, Some(80), None), "web:8080"),
            "http://web/api/x?q=1"
        );
        assert_eq!(
            loc(
                &r(None, None, Some(PathChange::Prefix("/v2".into()))),
                "[fd00::1]:80"
            ),
            "http://[fd00::1]/v2/x?q=1"
        );
        let mut h = r(None, None, Some(PathChange::Full("/".into())));
        h.hostname = Some("other".into());
        assert_eq!(loc(&h, "web:8080"), "http://other:8080/?q=1");
    }

    #[test]
    fn header_changes_set_add_remove() {
        use ward_spiffe::route::Header;
        let mut h = HeaderMap::new();
        h.insert("x-a", HeaderValue::from_static("old"));
        h.insert("x-gone", HeaderValue::from_static("1"));
        let hd = |n: &str, v: &str| Header {
            name: n.into(),
            value: v.into(),
        };
        change_headers(
            &mut h,
            &HeaderChanges {
                set: vec![hd("X-A", "new")],
                add: vec![hd("x-a", "more"), hd("x-b", "1")],
                remove: vec!["X-Gone".into()],
            },
        );
        let a: Vec<_> = h.get_all("x-a").iter().collect();
        assert_eq!(a, ["new", "more"]);
        assert_eq!(h["x-b"], "1");
        assert!(h.get("x-gone").is_none());
    }
}
