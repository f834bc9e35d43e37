//! Refused gRPC calls, visible to operators: a tower layer for tonic servers that logs every
//! call answered with a non-OK status at warn — server, method, peer (address and SPIFFE ID, or
//! pid/uid on a Unix socket), code, the reason the caller was given, and whatever context the
//! handler added — rate-limited per method, code and peer, so a flood of bad requests cannot
//! bury the one an operator needs (see [`crate::ratelog`]).
//!
//! Handlers add context through the [`RefusalContext`] found in the request's extensions (for
//! node attestation: the attestor and the cluster). Statuses of calls that failed before a
//! response was produced are seen here too, because tonic turns them into responses.

use std::fmt::{self, Write as _};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};

use tonic::Code;
use tonic::transport::server::UdsConnectInfo;
use tower::{Layer, Service};

use crate::PeerInfo;
use crate::ratelog::LogLimiter;

/// Fields a handler adds to the log line of a refused call.
#[derive(Debug, Clone, Default)]
pub struct RefusalContext(Arc<Mutex<Vec<(&'static str, String)>>>);

impl RefusalContext {
    /// Adds `key=value` to the line logged if this call is refused.
    pub fn set(&self, key: &'static str, value: impl fmt::Display) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((key, value.to_string()));
    }

    /// Adds `key=value` to the refusal context of `req`, if it has one.
    pub fn add<T>(req: &tonic::Request<T>, key: &'static str, value: impl fmt::Display) {
        if let Some(c) = req.extensions().get::<RefusalContext>() {
            c.set(key, value);
        }
    }

    fn render(&self) -> String {
        let mut s = String::new();
        for (k, v) in self.0.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            if !s.is_empty() {
                s.push(' ');
            }
            let _ = write!(s, "{k}={v}");
        }
        s
    }
}

/// Counts a refusal: the server and the code (for a metric).
pub type RefusalCounter = Arc<dyn Fn(&'static str, Code) + Send + Sync>;

/// The layer; `server` names the server in log lines ("node API", "admin", "Workload API").
#[derive(Clone)]
pub struct RefusalLogLayer {
    server: &'static str,
    count: Option<RefusalCounter>,
}

impl fmt::Debug for RefusalLogLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefusalLogLayer")
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

impl RefusalLogLayer {
    /// Logs refusals of `server`.
    pub fn new(server: &'static str) -> Self {
        Self {
            server,
            count: None,
        }
    }

    /// Also counts every refusal (not rate-limited, unlike the log lines) with `count`.
    pub fn counted(mut self, count: RefusalCounter) -> Self {
        self.count = Some(count);
        self
    }
}

impl<S> Layer<S> for RefusalLogLayer {
    type Service = RefusalLog<S>;
    fn layer(&self, inner: S) -> RefusalLog<S> {
        RefusalLog {
            inner,
            server: self.server,
            count: self.count.clone(),
        }
    }
}

/// The service the layer builds.
#[derive(Clone)]
pub struct RefusalLog<S> {
    inner: S,
    server: &'static str,
    count: Option<RefusalCounter>,
}

impl<S> fmt::Debug for RefusalLog<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefusalLog")
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

/// Who called, as a log field: the remote address and verified SPIFFE ID over TLS, pid and uid
/// on a Unix socket.
fn describe_peer(ext: &http::Extensions) -> (String, String) {
    if let Some(p) = ext.get::<PeerInfo>() {
        let id = p
            .peer_id
            .as_ref()
            .map_or_else(|| "none".to_owned(), ToString::to_string);
        return (p.remote.to_string(), id);
    }
    if let Some(c) = ext.get::<UdsConnectInfo>().and_then(|c| c.peer_cred) {
        let pid = c.pid().map_or_else(|| "?".to_owned(), |p| p.to_string());
        return (
            format!("pid={pid} uid={} gid={}", c.uid(), c.gid()),
            "none".into(),
        );
    }
    ("unknown".into(), "none".into())
}

/// The part of a peer that keys the rate limit: the host, not the ephemeral port.
fn peer_key(peer: &str) -> &str {
    match peer.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => peer,
    }
}

fn limiter() -> &'static LogLimiter {
    static L: OnceLock<LogLimiter> = OnceLock::new();
    L.get_or_init(LogLimiter::for_refusals)
}

fn log_refusal(server: &str, rpc: &str, peer: &(String, String), st: &tonic::Status, ctx: &str) {
    let code = st.code();
    let key = format!("{server}{rpc}/{code:?}/{}", peer_key(&peer.0));
    let Some(suppressed) = limiter().admit(&key) else {
        return;
    };
    tracing::warn!(
        server,
        rpc,
        peer = %peer.0,
        peer_id = %peer.1,
        code = ?code,
        reason = %st.message(),
        context = %ctx,
        suppressed,
        "{server} refused {rpc}: {:?}: {}",
        code,
        st.message()
    );
}

impl<S, B, RB> Service<http::Request<B>> for RefusalLog<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let ctx = RefusalContext::default();
        req.extensions_mut().insert(ctx.clone());
        let rpc = req.uri().path().to_owned();
        let peer = describe_peer(req.extensions());
        let server = self.server;
        let count = self.count.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            // A refusal is a trailers-only response: the status is in the headers.
            if let Some(st) = tonic::Status::from_header_map(resp.headers())
                && st.code() != Code::Ok
            {
                if let Some(c) = &count {
                    c(server, st.code());
                }
                log_refusal(server, &rpc, &peer, &st, &ctx.render());
            }
            Ok(resp)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_keys_drop_the_port_only() {
        assert_eq!(peer_key("10.0.0.1:4433"), "10.0.0.1");
        assert_eq!(peer_key("[::1]:4433"), "[::1]");
        assert_eq!(peer_key("pid=1 uid=0 gid=0"), "pid=1 uid=0 gid=0");
    }

    #[test]
    fn context_renders_in_order() {
        let c = RefusalContext::default();
        c.set("attestor", "k8s_psat");
        c.set("cluster", "prod");
        assert_eq!(c.render(), "attestor=k8s_psat cluster=prod");
    }
}
