//! The listen stage: the one accept loop of every listener, and the tracking of connection
//! tasks so shutdown can drain them — stop accepting, let HTTP connections finish what is in
//! flight (graceful close), then cut whatever is left at the deadline.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Pause after a failed accept (out of file descriptors), so the loop does not spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(20);

/// The connection tasks of a proxy.
#[derive(Debug, Default)]
pub struct Conns {
    tracker: TaskTracker,
    drain: CancellationToken,
    kill: CancellationToken,
}

impl Conns {
    /// Runs `fut` as a tracked connection task; it is cut if still running at the drain
    /// deadline.
    pub fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        let kill = self.kill.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                () = fut => {}
                () = kill.cancelled() => {}
            }
        });
    }

    /// Cancelled when draining starts: HTTP connections close gracefully.
    pub fn draining(&self) -> CancellationToken {
        self.drain.clone()
    }

    /// Connection tasks still running.
    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    /// True when none run.
    pub fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }

    /// Asks every connection to finish and waits up to `grace`; cuts the rest. Returns how
    /// many had to be cut.
    pub async fn drain(&self, grace: Duration) -> usize {
        self.tracker.close();
        self.drain.cancel();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok()
        {
            return 0;
        }
        let cut = self.tracker.len();
        self.kill.cancel();
        self.tracker.wait().await;
        cut
    }
}

/// Accepts on `listener` until `stop`, running `on_conn` for each connection as a tracked task.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    name: Arc<str>,
    conns: Arc<Conns>,
    mut stop: watch::Receiver<bool>,
    on_conn: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let (tcp, remote) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(listener = %name, error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                    continue;
                }
            },
            _ = ward_net::process::until_set(&mut stop) => return,
        };
        conns.spawn(on_conn(tcp, remote));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_finishing_tasks_and_cuts_the_rest() {
        let conns = Conns::default();
        let drain = conns.draining();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        // Finishes 1 s after draining starts (a graceful close).
        conns.spawn(async move {
            drain.cancelled().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let _ = done_tx.send(());
        });
        // Never finishes on its own.
        conns.spawn(std::future::pending());
        assert_eq!(conns.len(), 2);
        let cut = conns.drain(Duration::from_secs(5)).await;
        assert_eq!(cut, 1);
        assert!(done_rx.await.is_ok(), "the graceful one finished");
        assert!(conns.is_empty());
        // Nothing left: drain returns at once.
        let conns = Conns::default();
        conns.spawn(async {});
        assert_eq!(conns.drain(Duration::from_secs(5)).await, 0);
    }
}
