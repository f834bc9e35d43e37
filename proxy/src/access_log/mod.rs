//! The tamper-evident access log: one JSON object per line for every authorization decision,
//! each carrying the SHA-256 of the line before it (`prev`) and a sequence number, with anchor
//! lines signed by the proxy's SVID key at file start, restart, rotation and close and every
//! `anchor_every` records or `anchor_interval` ([`file`], [`anchor`]); `log verify` checks
//! all of it ([`verify`]).
//!
//! The data path hands records to a writer thread through a bounded queue. When it is full,
//! `on_full` decides: `drop` (counted; the next record says how many), `block` (the request
//! waits for room) or `refuse` (the request is refused). In `block` and `refuse` a request
//! takes its slot when it starts, so no request is served without room for its record.
//!
//! The writer takes what is queued in batches — one write per batch, and after a batch it
//! pauses [`BATCH_PAUSE`] before looking again, so a busy proxy wakes it a few hundred times a
//! second rather than once per request — and syncs by `fsync`.

mod anchor;
mod file;
mod verify;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, oneshot, watch};
use ward_net::CredentialSink;

pub use anchor::Trust;
pub use file::{AccessFields, Line};
pub use verify::{Report, verify, verify_lines, verify_with};

use crate::config::{Fsync, OnFull};
use crate::metrics::Metrics;

/// How long the writer waits after a batch before it takes the next: records reach the file
/// within about this long, and a busy proxy wakes the writer at most ~1/BATCH_PAUSE a second.
pub const BATCH_PAUSE: Duration = Duration::from_millis(5);

/// One decision, as the data path hands it over.
#[derive(Debug, Clone)]
pub struct Entry {
    /// When the request arrived.
    pub time: SystemTime,
    /// Listener name.
    pub listener: Arc<str>,
    /// `http` or `tcp`.
    pub protocol: &'static str,
    /// Verified peer ID (`None` = unauthenticated).
    pub src: Option<String>,
    /// This workload (inbound) or the upstream (outbound).
    pub dst: Option<String>,
    /// HTTP method.
    pub method: Option<String>,
    /// Normalized path (or the raw one if it was refused).
    pub path: Option<String>,
    /// The address the caller dialled, when the connection was captured.
    pub orig_dst: Option<String>,
    /// The plan taken: `deliver` (to the local application), `mesh` (to a peer proxy),
    /// `balanced` (to an endpoint of a mesh service), `passthrough`, or `refuse`.
    pub plan: &'static str,
    /// The endpoint a balanced plan chose (`ip:port`).
    pub endpoint: Option<String>,
    /// The route rule that decided where the request went (`<route>#<rule index>`).
    pub route: Option<String>,
    /// The name asked for: at egress the application's TLS SNI or HTTP Host, at the gateway
    /// the client's Host.
    pub host: Option<String>,
    /// The ingress gateway's client: its address (`ip:port`).
    pub client: Option<String>,
    /// HTTP status returned (0 for TCP).
    pub status: u16,
    /// `allow`, `deny`, `would-deny`.
    pub decision: &'static str,
    /// Deciding policy or default.
    pub policy: String,
    /// Human reason.
    pub reason: String,
    /// AUDIT policy that matched.
    pub audit: Option<String>,
    /// Time until response headers (HTTP) or connection end (TCP).
    pub latency: Duration,
    /// Request bytes.
    pub bytes_in: u64,
    /// Response bytes.
    pub bytes_out: u64,
}

/// Room in the queue, taken when a request starts (`on_full: block | refuse`).
#[derive(Debug)]
pub struct Slot(mpsc::OwnedPermit<Entry>);

/// The log cannot take the request's record: it must not be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogFull;

/// The handle the data path logs through.
#[derive(Debug, Clone)]
pub struct AccessLog {
    tx: mpsc::Sender<Entry>,
    dropped: Arc<AtomicU64>,
    metrics: Metrics,
    on_full: OnFull,
    closer: Arc<Closer>,
}

#[derive(Debug)]
struct Closer {
    stop: watch::Sender<bool>,
    done: std::sync::Mutex<Option<oneshot::Receiver<()>>>,
}

fn full_limiter() -> &'static ward_net::ratelog::LogLimiter {
    static L: std::sync::OnceLock<ward_net::ratelog::LogLimiter> = std::sync::OnceLock::new();
    L.get_or_init(ward_net::ratelog::LogLimiter::for_refusals)
}

impl AccessLog {
    /// Takes room for a request's record before it is served: none needed with `drop`; with
    /// `block` waits for it; with `refuse` fails at once when the queue is full (counted and
    /// logged). A writer that has stopped fails both (closed, not open).
    pub async fn reserve(&self) -> Result<Option<Slot>, LogFull> {
        let got = match self.on_full {
            OnFull::Drop => return Ok(None),
            OnFull::Block => self.tx.clone().reserve_owned().await.map_err(|_| "stopped"),
            OnFull::Refuse => self.tx.clone().try_reserve_owned().map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => "full",
                mpsc::error::TrySendError::Closed(_) => "stopped",
            }),
        };
        got.map(|p| Some(Slot(p))).map_err(|why| {
            self.metrics.log_refused.inc();
            if let Some(suppressed) = full_limiter().admit(why) {
                tracing::warn!(
                    on_full = ?self.on_full,
                    suppressed,
                    "access log {why}: request refused, it could not be recorded"
                );
            }
            LogFull
        })
    }

    /// Writes an entry into its slot, or (without one) queues it if there is room, dropping
    /// and counting it if not.
    pub fn log(&self, slot: Option<Slot>, e: Entry) {
        match slot {
            Some(Slot(p)) => {
                p.send(e);
            }
            None => {
                if self.tx.try_send(e).is_err() {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    self.metrics.log_dropped.inc();
                }
            }
        }
    }

    /// Writes what is queued, a signed `close` anchor, syncs, and stops the writer (at most
    /// `deadline`). Records logged afterwards are dropped.
    pub async fn close(&self, deadline: Duration) {
        let _ = self.closer.stop.send(true);
        let done = self.closer.done.lock().ok().and_then(|mut d| d.take());
        if let Some(done) = done
            && tokio::time::timeout(deadline, done).await.is_err()
        {
            tracing::error!("access log writer did not finish within {deadline:?}");
        }
    }
}

/// What the writer thread needs to know.
struct Opts {
    fsync: Fsync,
    fsync_interval: Duration,
    anchor_every: u64,
    anchor_interval: Duration,
}

/// Opens (continuing an existing chain) and starts the writer; returns the handle. Anchors are
/// signed with the SVID `sink` holds whenever it holds one.
pub fn start(
    cfg: &crate::config::AccessLog,
    sink: Option<Arc<CredentialSink>>,
    metrics: Metrics,
) -> std::io::Result<AccessLog> {
    open(&cfg.path, cfg, sink, metrics)
}

fn open(
    path: &Path,
    cfg: &crate::config::AccessLog,
    sink: Option<Arc<CredentialSink>>,
    metrics: Metrics,
) -> std::io::Result<AccessLog> {
    let signer = Box::new(move || sink.as_ref()?.current().map(|c| c.svid.clone()));
    let writer = file::Writer::open(path, cfg.max_bytes, signer)?;
    let (tx, rx) = mpsc::channel::<Entry>(cfg.queue);
    let dropped = Arc::new(AtomicU64::new(0));
    let (stop, stop_rx) = watch::channel(false);
    let (done_tx, done) = oneshot::channel();
    let opts = Opts {
        fsync: cfg.fsync,
        fsync_interval: cfg.fsync_interval,
        anchor_every: cfg.anchor_every,
        anchor_interval: cfg.anchor_interval,
    };
    let d = dropped.clone();
    // A dedicated thread: file I/O and fsync must not occupy the proxy's async workers. It
    // runs a one-thread runtime only to wait on the queue and its timers.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    std::thread::Builder::new()
        .name("ward-access-log".into())
        .spawn(move || {
            rt.block_on(run(writer, rx, d, stop_rx, opts));
            let _ = done_tx.send(());
        })?;
    Ok(AccessLog {
        tx,
        dropped,
        metrics,
        on_full: cfg.on_full,
        closer: Arc::new(Closer {
            stop,
            done: std::sync::Mutex::new(Some(done)),
        }),
    })
}

fn report(what: &str, r: std::io::Result<()>) {
    if let Err(e) = r {
        tracing::error!(error = %e, "access log {what} failed");
    }
}

async fn run(
    mut w: file::Writer,
    mut rx: mpsc::Receiver<Entry>,
    dropped: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
    o: Opts,
) {
    let mut last_anchor = Instant::now();
    let mut last_sync = Instant::now();
    let mut dirty = true;
    let mut closing = false;
    while !closing {
        // Wake for a record, for the next signed anchor or sync that is due, or to close.
        let anchor_at = last_anchor + o.anchor_interval;
        let sync_at = last_sync + o.fsync_interval;
        let wake = match (w.unproven > 0, dirty && o.fsync == Fsync::Interval) {
            (true, true) => Some(anchor_at.min(sync_at)),
            (true, false) => Some(anchor_at),
            (false, true) => Some(sync_at),
            (false, false) => None,
        };
        let first = tokio::select! {
            e = rx.recv() => match e {
                Some(e) => Some(e),
                None => { closing = true; None }
            },
            _ = sleep_until(wake) => None,
            _ = ward_net::process::until_set(&mut stop) => { closing = true; None }
        };
        let mut batch = first.into_iter().collect::<Vec<_>>();
        if closing {
            // Whatever is still queued goes in before the close anchor.
            rx.close();
        }
        while let Ok(e) = rx.try_recv() {
            batch.push(e);
        }
        for e in batch {
            let n = dropped.swap(0, Ordering::Relaxed);
            report("write", w.write(e, n));
            dirty = true;
            if o.anchor_every > 0 && w.unproven >= o.anchor_every {
                report("anchor", w.anchor("interval", None));
                last_anchor = Instant::now();
            }
        }
        if !closing && w.unproven > 0 && last_anchor.elapsed() >= o.anchor_interval {
            report("anchor", w.anchor("interval", None));
            last_anchor = Instant::now();
        }
        report("flush", std::io::Write::flush(&mut w.file));
        if dirty && (o.fsync == Fsync::EveryRecord || last_sync.elapsed() >= o.fsync_interval) {
            report("fsync", w.sync());
            last_sync = Instant::now();
            dirty = false;
        }
        if !closing {
            tokio::time::sleep(BATCH_PAUSE).await;
        }
    }
    report("anchor", w.anchor("close", None));
    report("fsync", w.sync());
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// A record for tests.
#[cfg(test)]
pub(crate) fn test_entry(i: u64) -> Entry {
    Entry {
        time: SystemTime::now(),
        listener: Arc::from("in"),
        protocol: "http",
        src: Some("spiffe://td/a".into()),
        dst: Some("spiffe://td/b".into()),
        method: Some("GET".into()),
        path: Some(format!("/{i}")),
        orig_dst: None,
        plan: "deliver",
        endpoint: None,
        route: None,
        host: None,
        client: None,
        status: 200,
        decision: "allow",
        policy: "p".into(),
        reason: "allowed by policy p".into(),
        audit: None,
        latency: Duration::from_micros(5),
        bytes_in: 0,
        bytes_out: 2,
    }
}
