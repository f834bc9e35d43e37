//! Every way the proxy refuses or fails a request, and the one mapping to what the caller
//! sees: an HTTP status with a one-line reason, a gRPC status (trailers-only), or — for TCP — a
//! closed connection.

use http::{Response, StatusCode};

use crate::http::{Body, GrpcCode, local_response};

/// Why a request or connection does not reach its destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The proxy holds no SVID yet, so it cannot authorize anyone.
    NoIdentity,
    /// Authorization denied it; the reason names the policy or default.
    Forbidden(String),
    /// The request is malformed: its Host, or its target.
    BadRequest(&'static str),
    /// The local application did not answer.
    AppUnreachable(String),
    /// The peer proxy (or the destination) could not be reached; the reason says why.
    Unavailable(String),
    /// A captured outbound connection to a destination the proxy may not reach.
    NoRoute(String),
    /// The request took longer than its timeout allows.
    Timeout(String),
    /// The service has routes and none matches the request (the Gateway API's 404; gRPC
    /// UNIMPLEMENTED, as for a method the server does not have).
    NoMatchingRoute(String),
    /// The matching route rule cannot forward: no backend, zero weights, a backend that is
    /// not a mesh service, or routes that did not compile (the Gateway API's 500).
    RouteFailed(String),
    /// Egress refused the destination (HTTP 403; TLS and TCP: closed).
    EgressDenied(String),
    /// The client is over its rate at the gateway; it may try again after this long (429 with
    /// `Retry-After`).
    RateLimited(std::time::Duration),
    /// The request body is larger than the gateway accepts (413).
    TooLarge(String),
    /// The request's headers are over `http_limits.max_header_bytes` (431; HTTP/1 requests
    /// over it are answered by the HTTP server itself).
    HeadersTooLarge,
    /// The access log cannot take the request's record (`access_log.on_full: refuse`): it is
    /// not served unrecorded (503, gRPC UNAVAILABLE).
    LogFull,
}

impl Refusal {
    /// The HTTP status, gRPC code and message a caller gets.
    pub fn answer(&self) -> (StatusCode, GrpcCode, String) {
        match self {
            Refusal::NoIdentity => (
                StatusCode::SERVICE_UNAVAILABLE,
                GrpcCode::Unavailable,
                "proxy has no identity yet".into(),
            ),
            Refusal::Forbidden(reason) => (
                StatusCode::FORBIDDEN,
                GrpcCode::PermissionDenied,
                format!("forbidden: {reason}"),
            ),
            Refusal::BadRequest(what) => (
                StatusCode::BAD_REQUEST,
                GrpcCode::InvalidArgument,
                (*what).to_owned(),
            ),
            Refusal::AppUnreachable(_) => (
                StatusCode::BAD_GATEWAY,
                GrpcCode::Unavailable,
                "application unreachable".into(),
            ),
            Refusal::Unavailable(reason) => (
                StatusCode::BAD_GATEWAY,
                GrpcCode::Unavailable,
                reason.clone(),
            ),
            Refusal::NoRoute(reason) => (
                StatusCode::FORBIDDEN,
                GrpcCode::PermissionDenied,
                reason.clone(),
            ),
            Refusal::Timeout(reason) => (
                StatusCode::GATEWAY_TIMEOUT,
                GrpcCode::DeadlineExceeded,
                reason.clone(),
            ),
            Refusal::NoMatchingRoute(reason) => (
                StatusCode::NOT_FOUND,
                GrpcCode::Unimplemented,
                reason.clone(),
            ),
            Refusal::RouteFailed(reason) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                GrpcCode::Internal,
                reason.clone(),
            ),
            Refusal::EgressDenied(reason) => (
                StatusCode::FORBIDDEN,
                GrpcCode::PermissionDenied,
                format!("egress denied: {reason}"),
            ),
            Refusal::RateLimited(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                GrpcCode::ResourceExhausted,
                "too many requests".into(),
            ),
            Refusal::TooLarge(reason) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                GrpcCode::ResourceExhausted,
                reason.clone(),
            ),
            Refusal::HeadersTooLarge => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                GrpcCode::ResourceExhausted,
                "request headers too large".into(),
            ),
            Refusal::LogFull => (
                StatusCode::SERVICE_UNAVAILABLE,
                GrpcCode::Unavailable,
                "the proxy cannot record the request now; try again".into(),
            ),
        }
    }

    /// The reason written to the access log (more than the caller is told).
    pub fn log_reason(&self) -> String {
        match self {
            Refusal::NoIdentity => "proxy has no identity yet".into(),
            Refusal::Forbidden(r) => r.clone(),
            Refusal::BadRequest(r) => (*r).to_owned(),
            Refusal::AppUnreachable(e) => format!("application unreachable: {e}"),
            Refusal::Unavailable(r)
            | Refusal::NoRoute(r)
            | Refusal::Timeout(r)
            | Refusal::NoMatchingRoute(r)
            | Refusal::RouteFailed(r)
            | Refusal::EgressDenied(r)
            | Refusal::TooLarge(r) => r.clone(),
            Refusal::HeadersTooLarge => "request headers over the limit".into(),
            Refusal::LogFull => "access log full".into(),
            Refusal::RateLimited(wait) => {
                format!("client over its rate limit; next request in {wait:?}")
            }
        }
    }

    /// The response for an HTTP or gRPC caller.
    pub fn respond(&self, grpc: bool) -> Response<Body> {
        let (status, code, msg) = self.answer();
        let mut r = local_response(grpc, status, code, &msg);
        if let Refusal::RateLimited(wait) = self {
            // Whole seconds, rounded up (RFC 9110 §10.2.3).
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            r.headers_mut()
                .insert(http::header::RETRY_AFTER, secs.max(1).into());
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_refusal_has_one_answer() {
        let cases = [
            (Refusal::NoIdentity, 503, 14),
            (Refusal::Forbidden("no ALLOW policy matched".into()), 403, 7),
            (Refusal::BadRequest("invalid Host header"), 400, 3),
            (Refusal::AppUnreachable("refused".into()), 502, 14),
            (Refusal::NoRoute("not a mesh destination".into()), 403, 7),
            (Refusal::Timeout("timed out".into()), 504, 4),
            (Refusal::NoMatchingRoute("no rule".into()), 404, 12),
            (Refusal::RouteFailed("no backend".into()), 500, 13),
            (Refusal::EgressDenied("not allowed".into()), 403, 7),
            (
                Refusal::RateLimited(std::time::Duration::from_millis(1500)),
                429,
                8,
            ),
            (Refusal::TooLarge("body over 1 MiB".into()), 413, 8),
            (Refusal::HeadersTooLarge, 431, 8),
            (Refusal::LogFull, 503, 14),
            (
                Refusal::Unavailable("upstream x unavailable".into()),
                502,
                14,
            ),
        ];
        for (r, status, code) in cases {
            let (s, c, _) = r.answer();
            assert_eq!((s.as_u16(), c as u16), (status, code), "{r:?}");
            let grpc = r.respond(true);
            assert_eq!(grpc.status(), 200);
            assert_eq!(grpc.headers()["grpc-status"], code.to_string().as_str());
            assert_eq!(r.respond(false).status().as_u16(), status);
        }
        assert_eq!(
            Refusal::RateLimited(std::time::Duration::from_millis(1500))
                .respond(false)
                .headers()["retry-after"],
            "2"
        );
        assert_eq!(
            Refusal::Forbidden("x".into()).answer().2,
            "forbidden: x",
            "the caller sees the reason"
        );
        assert_eq!(
            Refusal::AppUnreachable("connection refused".into())
                .answer()
                .2,
            "application unreachable",
            "but not the application's address or error"
        );
    }
}
