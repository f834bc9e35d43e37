//! The tamper-evident access log: one JSON object per line for every authorization decision,
//! each carrying the SHA-256 of the line before it (`prev`) and a sequence number. Rotation
//! starts a new file with an anchor record holding the hash of the previous file's last line;
//! the anchor is also written to the process log, so a deleted or replaced file is detectable.
//!
//! Writing never blocks the data path: records go through a bounded queue; when it is full the
//! record is dropped and counted, and the next written record says how many were dropped.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::metrics::Metrics;

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

/// A line of the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Line {
    /// Sequence number, +1 per line across rotations.
    pub seq: u64,
    /// Hex SHA-256 of the previous line (zeros for the very first).
    pub prev: String,
    /// `access` or `anchor`.
    #[serde(rename = "type")]
    pub kind: String,
    /// RFC 3339 time.
    pub time: String,
    /// Records dropped since the previous line.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dropped: u64,
    /// The decision (access lines).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<AccessFields>,
    /// For anchors: the file this one continues.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub continues: Option<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The fields of an access line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccessFields {
    /// Listener.
    pub listener: String,
    /// Protocol.
    pub protocol: String,
    /// Source SPIFFE ID.
    pub src: Option<String>,
    /// Destination SPIFFE ID.
    pub dst: Option<String>,
    /// Method.
    pub method: Option<String>,
    /// Path.
    pub path: Option<String>,
    /// Original destination of a captured connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orig_dst: Option<String>,
    /// Plan taken.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub plan: String,
    /// Endpoint chosen by the balancer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Route rule that applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// Egress: the name asked for (SNI or Host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The gateway's client address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// Status.
    pub status: u16,
    /// Decision.
    pub decision: String,
    /// Policy.
    pub policy: String,
    /// Reason.
    pub reason: String,
    /// Audit policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<String>,
    /// Latency in microseconds.
    pub latency_us: u64,
    /// Request bytes.
    pub bytes_in: u64,
    /// Response bytes.
    pub bytes_out: u64,
}

const ZERO: &str = "0000000000000000000000000000000000000000000000000000000000000000";

fn hash(line: &str) -> String {
    hex::encode(Sha256::digest(line.as_bytes()))
}

/// The handle the data path logs through.
#[derive(Debug, Clone)]
pub struct AccessLog {
    tx: mpsc::Sender<Entry>,
    dropped: Arc<AtomicU64>,
    metrics: Metrics,
}

impl AccessLog {
    /// Queues an entry; never waits. A full queue drops and counts it.
    pub fn log(&self, e: Entry) {
        if self.tx.try_send(e).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            self.metrics.log_dropped.inc();
        }
    }
}

struct Writer {
    path: PathBuf,
    max_bytes: u64,
    file: BufWriter<File>,
    size: u64,
    seq: u64,
    prev: String,
}

/// The last line of an existing log, to continue its chain.
fn last_line(path: &Path) -> std::io::Result<Option<String>> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut last = None;
    for line in BufReader::new(f).lines() {
        let line = line?;
        if !line.is_empty() {
            last = Some(line);
        }
    }
    Ok(last)
}

impl Writer {
    fn open(path: &Path, max_bytes: u64) -> std::io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let (seq, prev) = match last_line(path)? {
            Some(l) => {
                let parsed: Line = serde_json::from_str(&l).map_err(|e| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{}: last line: {e}", path.display()),
                    )
                })?;
                (parsed.seq + 1, hash(&l))
            }
            None => (0, ZERO.to_owned()),
        };
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        let mut w = Self {
            path: path.to_owned(),
            max_bytes,
            file: BufWriter::new(file),
            size,
            seq,
            prev,
        };
        if size == 0 && seq == 0 {
            w.anchor(None)?;
        }
        Ok(w)
    }

    fn write_line(&mut self, line: &Line) -> std::io::Result<()> {
        let text = serde_json::to_string(line).map_err(std::io::Error::other)?;
        self.file.write_all(text.as_bytes())?;
        self.file.write_all(b"\n")?;
        self.size += text.len() as u64 + 1;
        self.prev = hash(&text);
        self.seq += 1;
        Ok(())
    }

    fn anchor(&mut self, continues: Option<String>) -> std::io::Result<()> {
        let line = Line {
            seq: self.seq,
            prev: self.prev.clone(),
            kind: "anchor".into(),
            time: ward_net::process::rfc3339_millis(SystemTime::now()),
            dropped: 0,
            access: None,
            continues,
        };
        self.write_line(&line)?;
        tracing::info!(
            file = %self.path.display(),
            seq = line.seq,
            anchor_prev = %line.prev,
            anchor_hash = %self.prev,
            "access log anchor"
        );
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.file.flush()?;
        let stamp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let rotated = self.path.with_extension(format!("{stamp}.jsonl"));
        std::fs::rename(&self.path, &rotated)?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.file = BufWriter::new(file);
        self.size = 0;
        self.anchor(Some(
            rotated
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        ))
    }

    fn write(&mut self, e: Entry, dropped: u64) -> std::io::Result<()> {
        let line = Line {
            seq: self.seq,
            prev: self.prev.clone(),
            kind: "access".into(),
            time: ward_net::process::rfc3339_millis(e.time),
            dropped,
            access: Some(AccessFields {
                listener: e.listener.to_string(),
                protocol: e.protocol.to_owned(),
                src: e.src,
                dst: e.dst,
                method: e.method,
                path: e.path,
                orig_dst: e.orig_dst,
                plan: e.plan.to_owned(),
                endpoint: e.endpoint,
                route: e.route,
                host: e.host,
                client: e.client,
                status: e.status,
                decision: e.decision.to_owned(),
                policy: e.policy,
                reason: e.reason,
                audit: e.audit,
                latency_us: e.latency.as_micros() as u64,
                bytes_in: e.bytes_in,
                bytes_out: e.bytes_out,
            }),
            continues: None,
        };
        self.write_line(&line)?;
        if self.size >= self.max_bytes {
            self.rotate()?;
        }
        Ok(())
    }
}

/// Opens (continuing an existing chain) and starts the writer; returns the handle.
pub fn start(
    path: &Path,
    max_bytes: u64,
    queue: usize,
    metrics: Metrics,
) -> std::io::Result<AccessLog> {
    let mut writer = Writer::open(path, max_bytes)?;
    let (tx, mut rx) = mpsc::channel::<Entry>(queue);
    let dropped = Arc::new(AtomicU64::new(0));
    let d = dropped.clone();
    // A dedicated thread: file I/O must not occupy the proxy's async workers.
    std::thread::Builder::new()
        .name("ward-access-log".into())
        .spawn(move || {
            while let Some(e) = rx.blocking_recv() {
                let n = d.swap(0, Ordering::Relaxed);
                if let Err(err) = writer.write(e, n) {
                    tracing::error!(error = %err, "access log write failed");
                }
                // Drain what is queued, then flush once.
                while let Ok(e) = rx.try_recv() {
                    let n = d.swap(0, Ordering::Relaxed);
                    if let Err(err) = writer.write(e, n) {
                        tracing::error!(error = %err, "access log write failed");
                    }
                }
                if let Err(err) = writer.file.flush() {
                    tracing::error!(error = %err, "access log flush failed");
                }
            }
            let _ = writer.file.flush();
        })?;
    Ok(AccessLog {
        tx,
        dropped,
        metrics,
    })
}

/// The result of verifying a log file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Lines read.
    pub lines: u64,
    /// Records the proxy reported as dropped (not tampering).
    pub dropped: u64,
    /// The hash the first line says precedes it (the previous file's last line).
    pub starts_after: Option<String>,
    /// Hash of the last line (to compare with the next file's anchor).
    pub last_hash: Option<String>,
    /// The first problem: (1-based line number, description).
    pub broken: Option<(u64, String)>,
}

/// Verifies the chain of one file.
pub fn verify(path: &Path) -> std::io::Result<Report> {
    let f = File::open(path)?;
    let mut report = Report {
        lines: 0,
        dropped: 0,
        starts_after: None,
        last_hash: None,
        broken: None,
    };
    let mut prev: Option<(u64, String)> = None;
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let n = i as u64 + 1;
        let line = line?;
        report.lines = n;
        let parsed: Line = match serde_json::from_str(&line) {
            Ok(l) => l,
            Err(e) => {
                report.broken = Some((n, format!("not a log record: {e}")));
                return Ok(report);
            }
        };
        match &prev {
            None => report.starts_after = Some(parsed.prev.clone()),
            Some((seq, h)) => {
                if parsed.seq != seq + 1 {
                    report.broken = Some((
                        n,
                        format!(
                            "sequence jumps from {seq} to {}: records missing",
                            parsed.seq
                        ),
                    ));
                    return Ok(report);
                }
                if &parsed.prev != h {
                    report.broken = Some((
                        n,
                        "hash chain broken: the previous line was altered, removed or inserted"
                            .into(),
                    ));
                    return Ok(report);
                }
            }
        }
        report.dropped += parsed.dropped;
        let h = hash(&line);
        report.last_hash = Some(h.clone());
        prev = Some((parsed.seq, h));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: u64) -> Entry {
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

    #[test]
    fn chain_verifies_and_tampering_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jsonl");
        {
            let mut w = Writer::open(&p, 1 << 30).unwrap();
            for i in 0..10 {
                w.write(entry(i), if i == 5 { 3 } else { 0 }).unwrap();
            }
            w.file.flush().unwrap();
        }
        // Reopen continues the chain.
        {
            let mut w = Writer::open(&p, 1 << 30).unwrap();
            w.write(entry(10), 0).unwrap();
            w.file.flush().unwrap();
        }
        let r = verify(&p).unwrap();
        assert_eq!(r.broken, None);
        assert_eq!(r.lines, 12);
        assert_eq!(r.dropped, 3);
        assert_eq!(r.starts_after.as_deref(), Some(ZERO));

        let text = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        // Alter a field of line 4.
        let altered = lines[3].replace("\"status\":200", "\"status\":500");
        let mut t = lines.clone();
        t[3] = &altered;
        std::fs::write(&p, t.join("\n") + "\n").unwrap();
        assert_eq!(verify(&p).unwrap().broken.unwrap().0, 5);
        // Remove line 6.
        let mut t = lines.clone();
        t.remove(5);
        std::fs::write(&p, t.join("\n") + "\n").unwrap();
        let b = verify(&p).unwrap().broken.unwrap();
        assert_eq!(b.0, 6);
        assert!(b.1.contains("missing"), "{}", b.1);
    }

    #[test]
    fn rotation_anchors_to_the_previous_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jsonl");
        let mut w = Writer::open(&p, 4096).unwrap();
        for i in 0..40 {
            w.write(entry(i), 0).unwrap();
        }
        w.file.flush().unwrap();
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert!(files.len() >= 2, "{files:?}");
        let current = verify(&p).unwrap();
        assert_eq!(current.broken, None);
        // The current file's anchor names the hash of the previous file's last line.
        let rotated: Vec<&PathBuf> = files.iter().filter(|f| **f != p).collect();
        let last_rotated = rotated.iter().max().unwrap();
        let prev = verify(last_rotated).unwrap();
        assert_eq!(prev.broken, None);
        assert_eq!(current.starts_after, prev.last_hash);
    }
}
