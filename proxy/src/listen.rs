//! The listen stage: the one accept loop of every listener, the connection caps it enforces
//! (per listener, and per client address where callers come from outside the pod), and the
//! tracking of connection tasks so shutdown can drain them — stop accepting, let HTTP
//! connections finish what is in flight (graceful close), then cut whatever is left at the
//! deadline.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
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

/// The key connections are counted by: IPv4 as is, IPv6 by /64 (the smallest block one
/// subscriber usually holds: by full address, one client could take a fresh key at will), an
/// IPv4-mapped address as IPv4.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut o = v6.octets();
                o[8..].fill(0);
                IpAddr::V6(o.into())
            }
        },
    }
}

/// The open connections a listener may hold: in all, and (for listeners serving callers from
/// outside the pod) per client address.
#[derive(Debug)]
pub struct ConnLimits {
    max: usize,
    per_client: Option<usize>,
    open: AtomicUsize,
    clients: Mutex<HashMap<IpAddr, usize>>,
}

/// Which cap a connection hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitHit {
    /// The listener's.
    Listener,
    /// Its client's.
    Client,
}

impl LimitHit {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            LimitHit::Listener => "listener_connections",
            LimitHit::Client => "client_connections",
        }
    }
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct ConnPermit {
    limits: Arc<ConnLimits>,
    client: Option<IpAddr>,
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        self.limits.open.fetch_sub(1, Ordering::AcqRel);
        if let Some(ip) = self.client {
            let mut m = self
                .limits
                .clients
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(n) = m.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&ip);
                }
            }
        }
    }
}

impl ConnLimits {
    /// At most `max` open connections, and `per_client` per client address if given.
    pub fn new(max: usize, per_client: Option<usize>) -> Arc<Self> {
        Arc::new(Self {
            max,
            per_client,
            open: AtomicUsize::new(0),
            clients: Mutex::default(),
        })
    }

    /// Admits a connection from `remote`, or says which cap it is over.
    pub fn admit(self: &Arc<Self>, remote: IpAddr) -> Result<ConnPermit, LimitHit> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(LimitHit::Listener);
        }
        let client = match self.per_client {
            None => None,
            Some(cap) => {
                let key = client_key(remote);
                let mut m = self.clients.lock().unwrap_or_else(|p| p.into_inner());
                let n = m.entry(key).or_insert(0);
                if *n >= cap {
                    drop(m);
                    self.open.fetch_sub(1, Ordering::AcqRel);
                    return Err(LimitHit::Client);
                }
                *n += 1;
                Some(key)
            }
        };
        Ok(ConnPermit {
            limits: self.clone(),
            client,
        })
    }

    /// Open connections now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

fn limit_log() -> &'static ward_net::ratelog::LogLimiter {
    static L: std::sync::OnceLock<ward_net::ratelog::LogLimiter> = std::sync::OnceLock::new();
    L.get_or_init(ward_net::ratelog::LogLimiter::for_refusals)
}

/// Accepts on `listener` until `stop`, running `on_conn` for each connection as a tracked task;
/// a connection over `limits` is closed at once, counted and logged (rate-limited).
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    name: Arc<str>,
    conns: Arc<Conns>,
    limits: Arc<ConnLimits>,
    metrics: crate::metrics::Metrics,
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
        match limits.admit(remote.ip()) {
            Ok(permit) => {
                let fut = on_conn(tcp, remote);
                conns.spawn(async move {
                    let _permit = permit;
                    fut.await;
                });
            }
            Err(hit) => {
                drop(tcp);
                metrics.http_limit(&name, hit.label());
                if let Some(n) = limit_log().admit(&name) {
                    tracing::warn!(listener = %name, %remote, limit = hit.label(), suppressed = n,
                        "connection over the listener's connection limit; closed");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn connection_caps_per_listener_and_per_client_free_their_place_on_drop() {
        let l = ConnLimits::new(3, Some(2));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let a1 = l.admit(a).unwrap();
        let _a2 = l.admit(a).unwrap();
        assert_eq!(l.admit(a).unwrap_err(), LimitHit::Client);
        let _b1 = l.admit(b).unwrap();
        assert_eq!(l.admit(b).unwrap_err(), LimitHit::Listener);
        assert_eq!(l.open(), 3);
        drop(a1);
        assert_eq!(l.open(), 2);
        let _a3 = l.admit(a).unwrap();
        // IPv6 clients share their /64.
        let v6 = ConnLimits::new(10, Some(1));
        let _x = v6.admit("2001:db8::1".parse().unwrap()).unwrap();
        assert_eq!(
            v6.admit("2001:db8::2".parse().unwrap()).unwrap_err(),
            LimitHit::Client
        );
        v6.admit("2001:db8:0:1::1".parse().unwrap()).unwrap();
        // Without a per-client cap only the listener's counts.
        let open = ConnLimits::new(2, None);
        let _p = open.admit(a).unwrap();
        let _q = open.admit(a).unwrap();
        assert_eq!(open.admit(b).unwrap_err(), LimitHit::Listener);
    }

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
