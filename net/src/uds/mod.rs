//! gRPC servers on Unix sockets (the agent's Workload API socket, the CA's admin socket): the
//! connection type every such server accepts.
//!
//! On a Unix socket `:authority` means nothing, but gRPC's C core (Python, C++, Ruby, PHP) and
//! grpc-java send the socket path there, percent-encoded (`tmp%2Fward%2Fapi.sock`;
//! grpc/grpc#38142), and the h2 server under tonic resets such a stream with PROTOCOL_ERROR
//! (hyperium/h2#487, open). [`UnixConn`] sits between the socket and h2 and replaces such an
//! authority with a same-length one h2 accepts ([`frames`], [`hpack`]), so every gRPC client
//! works with every service on the socket, without patching h2. It also reports protocol
//! errors — a client that is not HTTP/2, a header block that does not decode, the error frames
//! h2 sends back — at warn with the caller's pid and uid, rate-limited.
//!
//! The connection info is tonic's own [`UdsConnectInfo`], so services read peer credentials
//! exactly as with a plain `UnixStream`.

pub mod frames;
pub mod hpack;
mod tables;

use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};

use bytes::BytesMut;
use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tonic::transport::server::{Connected, UdsConnectInfo};

use crate::ratelog::LogLimiter;
use frames::{ClientEvent, ClientFrames, ServerEvent, ServerFrames, error_name};

/// How much is read from the socket at a time while header blocks are being followed.
const READ_CHUNK: usize = 8 * 1024;
/// Pause after a failed accept.
const ACCEPT_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

/// An accepted connection on a gRPC Unix socket.
#[derive(Debug)]
pub struct UnixConn {
    io: UnixStream,
    info: UdsConnectInfo,
    service: &'static str,
    client: ClientFrames,
    server: ServerFrames,
    out: BytesMut,
    eof: bool,
    rewrote: bool,
}

/// The connections of `listener`, for `serve_with_incoming`; `service` names the socket in log
/// lines (e.g. "Workload API", "admin"). An accept error (out of file descriptors) is logged
/// and retried after a pause instead of ending the server.
pub fn incoming(
    listener: UnixListener,
    service: &'static str,
) -> impl Stream<Item = io::Result<UnixConn>> + Send + 'static {
    futures::stream::unfold(listener, move |l| async move {
        loop {
            match l.accept().await {
                Ok((io, _)) => return Some((Ok(UnixConn::new(io, service)), l)),
                Err(e) => {
                    if let Some(suppressed) = limiter().admit(service) {
                        tracing::warn!(socket = service, error = %e, suppressed,
                            "cannot accept a connection on the {service} socket; retrying");
                    }
                    tokio::time::sleep(ACCEPT_RETRY).await;
                }
            }
        }
    })
}

impl UnixConn {
    /// Wraps an accepted stream.
    pub fn new(io: UnixStream, service: &'static str) -> Self {
        let info = UdsConnectInfo {
            peer_addr: io.peer_addr().ok().map(Arc::new),
            peer_cred: io.peer_cred().ok(),
        };
        Self {
            io,
            info,
            service,
            client: ClientFrames::default(),
            server: ServerFrames::default(),
            out: BytesMut::new(),
            eof: false,
            rewrote: false,
        }
    }

    fn who(&self) -> (String, String) {
        match &self.info.peer_cred {
            Some(c) => (
                c.pid().map_or_else(|| "?".into(), |p| p.to_string()),
                c.uid().to_string(),
            ),
            None => ("?".into(), "?".into()),
        }
    }

    fn protocol_error(&self, what: &str) {
        let (pid, uid) = self.who();
        let key = format!("{}/{uid}/{what}", self.service);
        if let Some(suppressed) = limiter().admit(&key) {
            tracing::warn!(
                socket = self.service,
                pid = %pid,
                uid = %uid,
                suppressed,
                "HTTP/2 protocol error on the {} socket: {what}",
                self.service
            );
        }
    }

    fn client_event(&mut self, e: ClientEvent) {
        match e {
            ClientEvent::Rewrote { stream } => {
                if !self.rewrote {
                    self.rewrote = true;
                    let (pid, uid) = self.who();
                    tracing::debug!(socket = self.service, pid = %pid, uid = %uid, stream,
                        "replaced a client's :authority that h2 refuses (a gRPC C-core or Java client)");
                }
            }
            ClientEvent::NotHttp2 => {
                self.protocol_error("the client did not send the HTTP/2 connection preface")
            }
            ClientEvent::BadBlock { stream, error } => {
                self.protocol_error(&format!("stream {stream}: malformed header block: {error}"))
            }
            ClientEvent::GaveUp(why) => self.protocol_error(&format!("client sent {why}")),
        }
    }

    fn server_event(&self, e: ServerEvent) {
        match e {
            // NO_ERROR and CANCEL are how streams end normally.
            ServerEvent::Reset { code: 0 | 8, .. } | ServerEvent::GoAway { code: 0, .. } => {}
            ServerEvent::Reset { stream, code } => self.protocol_error(&format!(
                "stream {stream} reset with {} (malformed headers or frames from the client)",
                error_name(code)
            )),
            ServerEvent::GoAway { last_stream, code } => self.protocol_error(&format!(
                "connection closed with {} after stream {last_stream}",
                error_name(code)
            )),
        }
    }

    fn observe_written(&mut self, written: &[u8]) {
        let mut events = Vec::new();
        self.server.observe(written, &mut |e| events.push(e));
        for e in events {
            self.server_event(e);
        }
    }
}

fn limiter() -> &'static LogLimiter {
    static L: OnceLock<LogLimiter> = OnceLock::new();
    L.get_or_init(LogLimiter::for_refusals)
}

impl Connected for UnixConn {
    type ConnectInfo = UdsConnectInfo;
    fn connect_info(&self) -> UdsConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for UnixConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.out.is_empty() {
                let n = this.out.len().min(buf.remaining());
                buf.put_slice(&this.out.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            if this.client.passthrough() {
                return Pin::new(&mut this.io).poll_read(cx, buf);
            }
            let mut chunk = [0u8; READ_CHUNK];
            let mut rb = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                this.eof = true;
                this.client.finish(&mut this.out);
                continue;
            }
            let mut events = Vec::new();
            this.client
                .feed(rb.filled(), &mut this.out, &mut |e| events.push(e));
            for e in events {
                this.client_event(e);
            }
        }
    }
}

impl AsyncWrite for UnixConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.io).poll_write(cx, buf))?;
        this.observe_written(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.io).poll_write_vectored(cx, bufs))?;
        let mut left = n;
        for b in bufs {
            if left == 0 {
                break;
            }
            let take = left.min(b.len());
            this.observe_written(&b[..take]);
            left -= take;
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
