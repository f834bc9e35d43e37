//! Protocol detection (the "detect" stage): whether a connection opens with a TLS
//! ClientHello, whether its first bytes are HTTP, and replaying what was read. Pure
//! classification over bytes ([`classify`]) plus bounded waits for the first bytes.

pub mod hello;
pub mod proxy_header;

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

/// How many bytes detection reads at most before deciding.
const SNIFF_MAX: usize = 64;

/// RFC 9110 token characters (what a method is made of).
fn tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Classifies a prefix. `None` means "need more bytes".
///
/// HTTP is anything an HTTP/1 parser could take as the start of a request line — optional
/// empty lines, then a token and a space — or the HTTP/2 preface; TCP is anything else. The
/// rule errs towards HTTP on purpose: bytes classified as TCP reach the application unparsed,
/// so an HTTP application must never see a request that skipped the HTTP stage (its
/// authorization per request and its peer-identity header). A text protocol whose lines start
/// with a word and a space (memcached, Redis inline commands) is therefore taken for HTTP:
/// mark such ports opaque.
pub fn classify(buf: &[u8]) -> Option<Sniffed> {
    let start = buf
        .iter()
        .position(|b| !matches!(b, b'\r' | b'\n'))
        .unwrap_or(buf.len());
    let rest = &buf[start..];
    match rest.iter().position(|b| !tchar(*b)) {
        // A token so far and nothing else: could still become a method.
        None => None,
        Some(0) => Some(Sniffed::Tcp),
        Some(i) if rest[i] == b' ' => Some(Sniffed::Http),
        Some(_) => Some(Sniffed::Tcp),
    }
}

/// Reads up to [`SNIFF_MAX`] bytes (waiting at most `wait` for the client to speak) and
/// classifies them. Silence (nothing at all) is a server-speaks-first protocol: TCP. Bytes
/// that are still undecided when the wait or the buffer runs out go to HTTP, whose parser
/// refuses what is not a request. Returns the bytes read so they can be replayed.
pub async fn sniff<T: AsyncRead + Unpin>(
    io: &mut T,
    wait: Duration,
) -> io::Result<(Sniffed, Bytes)> {
    let mut buf = vec![0u8; SNIFF_MAX];
    let mut have = 0;
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if let Some(s) = classify(&buf[..have]).filter(|_| have > 0) {
            buf.truncate(have);
            return Ok((s, Bytes::from(buf)));
        }
        if have == buf.len() {
            return Ok((Sniffed::Http, Bytes::from(buf)));
        }
        match tokio::time::timeout_at(deadline, io.read(&mut buf[have..])).await {
            Ok(Ok(0)) | Err(_) => {
                buf.truncate(have);
                let kind = if have == 0 {
                    Sniffed::Tcp
                } else {
                    Sniffed::Http
                };
                return Ok((kind, Bytes::from(buf)));
            }
            Ok(Ok(n)) => have += n,
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// Reads the ClientHello a connection opens with (`read` already read from it; waiting at
/// most `wait` for all of it) and its server name; returns the bytes read so they can be
/// replayed to the destination.
pub async fn client_hello<T: AsyncRead + Unpin>(
    io: &mut T,
    read: Vec<u8>,
    wait: Duration,
) -> io::Result<(hello::Hello, Bytes)> {
    let mut buf = read;
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let h = hello::server_name(&buf);
        if h != hello::Hello::More {
            return Ok((h, Bytes::from(buf)));
        }
        if buf.len() > hello::MAX_HELLO + 64 {
            return Ok((
                hello::Hello::Invalid("ClientHello larger than 16 KiB"),
                Bytes::from(buf),
            ));
        }
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout_at(deadline, io.read(&mut chunk)).await {
            Ok(Ok(0)) => {
                return Ok((
                    hello::Hello::Invalid("closed before the ClientHello ended"),
                    Bytes::from(buf),
                ));
            }
            Err(_) => {
                return Ok((
                    hello::Hello::Invalid("no whole ClientHello in time"),
                    Bytes::from(buf),
                ));
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// Reads the PROXY v2 header a tunnel opens with (waiting at most `wait`); returns its
/// addresses and the bytes read after it.
pub async fn proxy_header<T: AsyncRead + Unpin>(
    io: &mut T,
    wait: Duration,
) -> io::Result<Result<(proxy_header::Addresses, Bytes), &'static str>> {
    let mut buf = Vec::with_capacity(64);
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match proxy_header::decode(&buf) {
            proxy_header::Parsed::Header(a, used) => {
                return Ok(Ok((a, Bytes::from(buf).slice(used..))));
            }
            proxy_header::Parsed::Invalid(e) => return Ok(Err(e)),
            proxy_header::Parsed::More => {}
        }
        if buf.len() > 512 {
            return Ok(Err("PROXY header too long"));
        }
        let mut chunk = [0u8; 256];
        match tokio::time::timeout_at(deadline, io.read(&mut chunk)).await {
            Ok(Ok(0)) => return Ok(Err("closed before the PROXY header ended")),
            Err(_) => return Ok(Err("no PROXY header in time")),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
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
        // What HTTP/1 parsers accept must never pass as TCP: leading empty lines, any token
        // method (httparse skips the former and takes the latter).
        assert_eq!(classify(b"\r\nGET /admin HTTP/1.1"), Some(Sniffed::Http));
        assert_eq!(classify(b"\n\n\nPOST /"), Some(Sniffed::Http));
        assert_eq!(classify(b"PROPFIND /x"), Some(Sniffed::Http));
        assert_eq!(classify(b"X-CUSTOM! /"), Some(Sniffed::Http));
        assert_eq!(classify(b"\r\n"), None);
        assert_eq!(classify(b"GETX"), None);
        // Binary and line protocols without a word and a space are TCP.
        assert_eq!(classify(b"*3\r\n$3\r\nSET"), Some(Sniffed::Tcp));
        assert_eq!(classify(b"PING\r\n"), Some(Sniffed::Tcp));
        assert_eq!(classify(b"{\"a\":1}"), Some(Sniffed::Tcp));
    }

    #[tokio::test]
    async fn undecided_bytes_go_to_http_and_silence_to_tcp() {
        let (mut a, mut b) = tokio::io::duplex(64);
        use tokio::io::AsyncWriteExt;
        a.write_all(b"GET").await.unwrap();
        let (s, prefix) = sniff(&mut b, Duration::from_millis(50)).await.unwrap();
        assert_eq!((s, &prefix[..]), (Sniffed::Http, &b"GET"[..]));
        let (_a2, mut b2) = tokio::io::duplex(64);
        let (s, prefix) = sniff(&mut b2, Duration::from_millis(50)).await.unwrap();
        assert_eq!((s, prefix.len()), (Sniffed::Tcp, 0));
        let (mut a3, mut b3) = tokio::io::duplex(256);
        a3.write_all(&[b'A'; 100]).await.unwrap();
        let (s, prefix) = sniff(&mut b3, Duration::from_millis(50)).await.unwrap();
        assert_eq!((s, prefix.len()), (Sniffed::Http, SNIFF_MAX));
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
