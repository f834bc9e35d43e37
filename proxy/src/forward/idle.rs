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
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Whether a connection is busy: a count of things that happened on it (bytes moved,
/// requests begun and ended) and how much is in flight. Marking is one relaxed add — no clock
/// on the data path; [`Activity::until_idle`] compares counts over time.
#[derive(Debug, Default)]
pub struct Activity {
    moves: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    /// Marks the connection busy now.
    pub fn touch(&self) {
        self.moves.fetch_add(1, Ordering::Relaxed);
    }

    /// A request begins; the guard ends it.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.touch();
        InFlight(self.clone())
    }

    /// Resolves once nothing was in flight and nothing moved for `idle` (checked every
    /// quarter of it, so it resolves between `idle` and 1¼ `idle` after the last activity).
    pub async fn until_idle(&self, idle: Duration) {
        const CHECKS: u32 = 4;
        let tick = (idle / CHECKS).max(Duration::from_millis(5));
        let mut last = self.moves.load(Ordering::Relaxed);
        let mut quiet = 0;
        loop {
            tokio::time::sleep(tick).await;
            let now = self.moves.load(Ordering::Relaxed);
            if now != last || self.in_flight.load(Ordering::Relaxed) != 0 {
                last = now;
                quiet = 0;
                continue;
            }
            quiet += 1;
            if quiet >= CHECKS {
                return;
            }
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
