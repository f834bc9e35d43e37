//! HTTP plumbing shared by the listeners: the body type, hop-by-hop header removal, denial and
//! error responses (HTTP and gRPC), and a body wrapper that counts bytes and reports when the
//! exchange ends (for the access log).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::{Body as HttpBody, Frame, SizeHint};

/// Errors carried by bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type of every request and response the proxy forwards or makes.
pub type Body = BoxBody<Bytes, BoxError>;

/// A body with fixed content.
pub fn full(b: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(b.into())
        .map_err(|never| match never {})
        .boxed()
}

/// Boxes any body.
pub fn boxed<B>(b: B) -> Body
where
    B: HttpBody<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    b.map_err(Into::into).boxed()
}

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "transfer-encoding",
    "upgrade",
];

/// Removes hop-by-hop headers (and those `Connection` names); keeps `te: trailers`, which
/// gRPC needs.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in HOP_BY_HOP {
        h.remove(*n);
    }
    if h.get(header::TE).is_some_and(|v| v != "trailers") {
        h.remove(header::TE);
    }
}

/// Carries the application's HTTP version across the proxy-to-proxy hop, which is always
/// HTTP/2: the outbound proxy sets it for HTTP/1.x requests and the inbound proxy removes it
/// and speaks HTTP/1.1 to its application (as Linkerd's `l5d-orig-proto`).
pub const ORIG_PROTO: &str = "x-ward-orig-proto";

/// True for gRPC requests.
pub fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// gRPC status codes the proxy answers with.
#[derive(Debug, Clone, Copy)]
pub enum GrpcCode {
    /// 7.
    PermissionDenied = 7,
    /// 14.
    Unavailable = 14,
    /// 3.
    InvalidArgument = 3,
    /// 4.
    DeadlineExceeded = 4,
    /// 12.
    Unimplemented = 12,
    /// 13.
    Internal = 13,
    /// 8.
    ResourceExhausted = 8,
}

/// A response the proxy makes itself: for gRPC a trailers-only response with `grpc-status`,
/// otherwise `status` with a one-line text body.
pub fn local_response(
    grpc: bool,
    status: StatusCode,
    code: GrpcCode,
    reason: &str,
) -> Response<Body> {
    let reason_line = reason.replace(['\r', '\n'], " ");
    if grpc {
        let mut r = Response::new(full(Bytes::new()));
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", HeaderValue::from(code as u16));
        if let Ok(v) = HeaderValue::from_str(&reason_line) {
            h.insert("grpc-message", v);
        }
        return r;
    }
    let mut r = Response::new(full(format!("{reason_line}\n")));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Wraps a body: counts data bytes into `counter`, and calls `done` once, when the body ends or
/// is dropped.
pub struct Counted<B> {
    inner: B,
    counter: Arc<AtomicU64>,
    done: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl<B> std::fmt::Debug for Counted<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counted").finish_non_exhaustive()
    }
}

impl<B> Counted<B> {
    /// Wraps `inner`.
    pub fn new(
        inner: B,
        counter: Arc<AtomicU64>,
        done: Option<Box<dyn FnOnce() + Send + Sync>>,
    ) -> Self {
        Self {
            inner,
            counter,
            done,
        }
    }

    fn finish(&mut self) {
        if let Some(d) = self.done.take() {
            d();
        }
    }
}

impl<B> Drop for Counted<B> {
    fn drop(&mut self) {
        self.finish();
    }
}

impl<B> HttpBody for Counted<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    self.counter.fetch_add(d.len() as u64, Ordering::Relaxed);
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => self.finish(),
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-custom"));
        h.insert("x-custom", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert!(
            h.get("connection").is_none()
                && h.get("x-custom").is_none()
                && h.get("keep-alive").is_none()
        );
        assert_eq!(h.get("te").unwrap(), "trailers");
        assert_eq!(h.get("x-keep").unwrap(), "1");
        let mut h = HeaderMap::new();
        h.insert("te", HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h);
        assert!(h.get("te").is_none());
    }

    #[test]
    fn grpc_denial_is_trailers_only() {
        let r = local_response(
            true,
            StatusCode::FORBIDDEN,
            GrpcCode::PermissionDenied,
            "denied by policy x",
        );
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "7");
        assert_eq!(r.headers()["grpc-message"], "denied by policy x");
        let r = local_response(
            false,
            StatusCode::FORBIDDEN,
            GrpcCode::PermissionDenied,
            "no",
        );
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
    }
}
