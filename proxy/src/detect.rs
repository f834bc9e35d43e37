//! Protocol detection (the "detect" stage): whether a connection opens with a TLS
//! ClientHello, whether its first bytes are HTTP, and replaying what was read. Pure
//! classification over bytes ([`classify`]) plus bounded waits for the first bytes.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// A stream whose first bytes were already read (for detection) and are replayed first.
#[derive(Debug)]
pub struct Prefixed<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Prefixed<T> {
    /// Replays `prefix` before reading from `inner`.
    pub fn new(prefix: Bytes, inner: T) -> Self {
        Self { prefix, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.has_remaining() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// What the first bytes of a connection say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniffed {
    /// HTTP/1.x request line or the HTTP/2 preface.
    Http,
    /// Anything else (or silence).
    Tcp,
}

const METHODS: &[&[u8]] = &[
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
    b"PRI * HTTP/2",
];

/// Classifies a prefix. `None` means "need more bytes".
pub fn classify(buf: &[u8]) -> Option<Sniffed> {
    let mut undecided = false;
    for m in METHODS {
        let n = buf.len().min(m.len());
        if buf[..n] == m[..n] {
            if n == m.len() {
                return Some(Sniffed::Http);
            }
            undecided = true;
        }
    }
    if undecided { None } else { Some(Sniffed::Tcp) }
}

/// Reads up to 16 bytes (waiting at most `wait` for the client to speak) and classifies them.
/// Returns the bytes read so they can be replayed.
pub async fn sniff<T: AsyncRead + Unpin>(
    io: &mut T,
    wait: Duration,
) -> io::Result<(Sniffed, Bytes)> {
    let mut buf = vec![0u8; 16];
    let mut have = 0;
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if let Some(s) = classify(&buf[..have]).filter(|_| have > 0) {
            buf.truncate(have);
            return Ok((s, Bytes::from(buf)));
        }
        if have == buf.len() {
            buf.truncate(have);
            return Ok((Sniffed::Tcp, Bytes::from(buf)));
        }
        match tokio::time::timeout_at(deadline, io.read(&mut buf[have..])).await {
            Ok(Ok(0)) | Err(_) => {
                // EOF or silence: a server-speaks-first protocol, or nothing at all.
                buf.truncate(have);
                return Ok((Sniffed::Tcp, Bytes::from(buf)));
            }
            Ok(Ok(n)) => have += n,
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// How a connection to an inbound listener opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opening {
    /// A TLS record (ClientHello): a meshed caller.
    Tls,
    /// Anything else, including silence until the wait ran out (a server-speaks-first
    /// protocol): a plaintext caller.
    Plain,
    /// The caller closed without sending anything.
    Closed,
}

/// Peeks (without consuming) at the first byte of `tcp`, waiting at most `wait`.
pub async fn opening(tcp: &tokio::net::TcpStream, wait: Duration) -> io::Result<Opening> {
    let mut first = [0u8; 1];
    match tokio::time::timeout(wait, tcp.peek(&mut first)).await {
        Ok(Ok(0)) => Ok(Opening::Closed),
        Ok(Ok(_)) if first[0] == 0x16 => Ok(Opening::Tls),
        Ok(Ok(_)) | Err(_) => Ok(Opening::Plain),
        Ok(Err(e)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Sniffed::Http));
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n"), Some(Sniffed::Http));
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"\x16\x03\x01"), Some(Sniffed::Tcp));
        assert_eq!(
            classify(b"\x00\x00\x00\x08\x04\xd2\x16\x2f"),
            Some(Sniffed::Tcp)
        );
        assert_eq!(classify(b"GETX"), Some(Sniffed::Tcp));
    }

    #[tokio::test]
    async fn sniff_replays_bytes() {
        let (mut a, b) = tokio::io::duplex(64);
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            a.write_all(b"POST /x HTTP/1.1\r\n").await.unwrap();
            a.shutdown().await.unwrap();
        });
        let mut b = b;
        let (s, prefix) = sniff(&mut b, Duration::from_secs(1)).await.unwrap();
        assert_eq!(s, Sniffed::Http);
        let mut all = Vec::new();
        Prefixed::new(prefix, b)
            .read_to_end(&mut all)
            .await
            .unwrap();
        assert_eq!(all, b"POST /x HTTP/1.1\r\n");
    }
}
