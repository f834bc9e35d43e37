//! Idle connections end: an opaque TCP stream with no byte either way, or an HTTP connection
//! with no request in flight, for `connection_limits.idle_timeout` is closed (HTTP
//! gracefully: HTTP/2 with GOAWAY, so a client opening a stream at that moment is told to
//! retry elsewhere). Without it a peer could hold a connection — and its place under the
//! connection caps — for ever by doing nothing.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// When a connection was last busy, and how much is in flight on it.
#[derive(Debug)]
pub struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        }
    }
}

impl Activity {
    /// Marks the connection busy now.
    pub fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// A request begins; the guard ends it.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.touch();
        InFlight(self.clone())
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }

    /// Resolves once nothing has been in flight and nothing moved for `idle`.
    pub async fn until_idle(&self, idle: Duration) {
        loop {
            let quiet = self.idle_for();
            if self.in_flight.load(Ordering::Relaxed) == 0 && quiet >= idle {
                return;
            }
            let wait = idle
                .saturating_sub(quiet)
                .max(idle / 8)
                .max(Duration::from_millis(10));
            tokio::time::sleep(wait).await;
        }
    }
}

/// One request in flight (ends when dropped).
#[derive(Debug)]
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A stream that marks `Activity` whenever bytes move.
struct Tracked<'a, T> {
    inner: &'a mut T,
    act: &'a Activity,
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut *self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.act.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut *self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.act.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

/// Copies between `a` and `b` both ways until both ends close (as
/// `tokio::io::copy_bidirectional`), or until no byte moved either way for `idle`: then a
/// `TimedOut` error.
pub async fn splice<A, B>(a: &mut A, b: &mut B, idle: Duration) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let act = Activity::default();
    act.touch();
    let mut ta = Tracked {
        inner: a,
        act: &act,
    };
    let mut tb = Tracked {
        inner: b,
        act: &act,
    };
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut ta, &mut tb) => r,
        () = act.until_idle(idle) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("idle for {idle:?}: no byte either way"),
        )),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_quiet_splice_ends_and_a_busy_one_does_not() {
        let (mut a, mut a_peer) = tokio::io::duplex(64);
        let (mut b, mut b_peer) = tokio::io::duplex(64);
        let task =
            tokio::spawn(async move { splice(&mut a, &mut b, Duration::from_millis(200)).await });
        // Busy for 600 ms (three idle periods): still open.
        for _ in 0..6 {
            a_peer.write_all(b"x").await.unwrap();
            let mut buf = [0u8; 1];
            b_peer.read_exact(&mut buf).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!task.is_finished());
        // Quiet: it ends.
        let r = tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn in_flight_work_is_never_idle() {
        let act = Arc::new(Activity::default());
        let guard = act.begin();
        let waited = tokio::time::timeout(
            Duration::from_millis(150),
            act.until_idle(Duration::from_millis(50)),
        )
        .await;
        assert!(waited.is_err(), "busy while a request is in flight");
        drop(guard);
        tokio::time::timeout(
            Duration::from_millis(500),
            act.until_idle(Duration::from_millis(50)),
        )
        .await
        .unwrap();
    }
}
