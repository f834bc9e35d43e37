//! A TLS accept loop for tonic servers: handshakes run concurrently (one slow client cannot
//! stall others), each with a deadline, and every accepted connection carries the verified
//! peer's SPIFFE ID into the request extensions as [`PeerInfo`].

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use ward_spiffe::SpiffeId;

use crate::credentials::TlsConfigs;

/// How long a client has to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the server knows about the peer of a request.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// Remote socket address.
    pub remote: SocketAddr,
    /// The verified SPIFFE ID of the client certificate, if one was presented.
    pub peer_id: Option<SpiffeId>,
    /// The client's certificate chain as presented (leaf first).
    pub peer_chain: Arc<Vec<CertificateDer<'static>>>,
}

/// An accepted, handshaken TLS connection.
#[derive(Debug)]
pub struct TlsConn {
    io: TlsStream<TcpStream>,
    info: PeerInfo,
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Called with the error of every failed handshake (for logs and metrics).
pub type HandshakeErrorHook = Arc<dyn Fn(&io::Error) + Send + Sync>;

/// Accepts on `listener` and yields handshaken connections using the newest config from
/// `configs`. Connections arriving before the first config are closed. The loop ends when the
/// returned stream is dropped.
pub fn tls_incoming(
    listener: TcpListener,
    configs: watch::Receiver<Option<Arc<TlsConfigs>>>,
    on_error: Option<HandshakeErrorHook>,
) -> ReceiverStream<Result<TlsConn, io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = tx.closed() => return,
            };
            let (tcp, remote) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(cfg) = configs.borrow().clone() else {
                continue; // no identity yet: refuse by closing
            };
            let tx = tx.clone();
            let on_error = on_error.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let acceptor = tokio_rustls::TlsAcceptor::from(cfg.server.clone());
                let res = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                let io = match res {
                    Ok(Ok(io)) => io,
                    Ok(Err(e)) => {
                        tracing::debug!(%remote, error = %e, "TLS handshake failed");
                        if let Some(h) = &on_error {
                            h(&e);
                        }
                        return;
                    }
                    Err(_) => {
                        let e = io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out");
                        if let Some(h) = &on_error {
                            h(&e);
                        }
                        return;
                    }
                };
                let chain: Vec<CertificateDer<'static>> = io
                    .get_ref()
                    .1
                    .peer_certificates()
                    .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
                    .unwrap_or_default();
                // The verifier already checked the chain; here we only read the ID back.
                let peer_id = crate::verify::peer_id(Some(&chain));
                let info = PeerInfo {
                    remote,
                    peer_id,
                    peer_chain: Arc::new(chain),
                };
                let _ = tx.send(Ok(TlsConn { io, info })).await;
            });
        }
    });
    ReceiverStream::new(rx)
}
