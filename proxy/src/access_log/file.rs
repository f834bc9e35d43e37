//! The log's file format and its writer: one JSON object per line, each with a sequence
//! number and the SHA-256 of the line before it (`prev`), and anchor lines where a file starts,
//! restarts, rotates or closes (and every `anchor_every` records or `anchor_interval`), which
//! the proxy signs with its SVID key when it has one.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use ward_net::Svid;

use super::Entry;

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
    /// For anchors: why it was written (`start`, `restart`, `rotate`, `interval`, `close`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// For signed anchors: the SPIFFE ID whose key signed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signer: Option<String>,
    /// For signed anchors: the signer's certificate chain, leaf first (base64 DER).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x5c: Option<Vec<String>>,
    /// For signed anchors: the signature scheme (rustls' name, e.g. `ECDSA_NISTP256_SHA256`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
    /// For signed anchors: the signature (base64) over [`super::anchor::message`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sig: Option<String>,
}

impl Line {
    /// An anchor line's reason (older logs have none: their first line is the start).
    pub fn anchor_reason(&self) -> Option<&str> {
        if self.kind != "anchor" {
            return None;
        }
        Some(match (&self.reason, &self.continues) {
            (Some(r), _) => r.as_str(),
            (None, Some(_)) => "rotate",
            (None, None) => "start",
        })
    }
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

pub(super) const ZERO: &str = "0000000000000000000000000000000000000000000000000000000000000000";

pub(super) fn hash(line: &str) -> String {
    let mut out = String::with_capacity(64);
    hash_into(&mut out, line.as_bytes());
    out
}

/// The hex SHA-256 of `line` into `out` (replacing what it held, without allocating once it
/// has room). ring's SHA-256 (assembly, with the CPU's SHA extensions where present): the
/// writer hashes every line.
fn hash_into(out: &mut String, line: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let d = ring::digest::digest(&ring::digest::SHA256, line);
    out.clear();
    for b in d.as_ref() {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
}

/// An access line as it is written: the same fields as [`Line`] and [`AccessFields`], borrowed
/// from the entry, so writing a record allocates nothing but its time.
#[derive(Serialize)]
struct AccessLineOut<'a> {
    seq: u64,
    prev: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    time: &'a str,
    #[serde(skip_serializing_if = "is_zero")]
    dropped: u64,
    access: AccessOut<'a>,
}

#[derive(Serialize)]
struct AccessOut<'a> {
    listener: &'a str,
    protocol: &'a str,
    src: Option<&'a str>,
    dst: Option<&'a str>,
    method: Option<&'a str>,
    path: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    orig_dst: Option<&'a str>,
    #[serde(skip_serializing_if = "str::is_empty")]
    plan: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    endpoint: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    route: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    host: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client: Option<&'a str>,
    status: u16,
    decision: &'a str,
    policy: &'a str,
    reason: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    audit: Option<&'a str>,
    latency_us: u64,
    bytes_in: u64,
    bytes_out: u64,
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

/// Writes lines to the current file, rotating by size.
pub(super) struct Writer {
    path: PathBuf,
    max_bytes: u64,
    pub(super) file: BufWriter<File>,
    size: u64,
    seq: u64,
    prev: String,
    /// Where anchors get their signing key: the proxy's current SVID, if it has one.
    signer: Box<dyn Fn() -> Option<Svid> + Send>,
    /// Lines written since the last signed anchor.
    pub(super) unproven: u64,
    /// The line being written (reused).
    buf: Vec<u8>,
}

impl Writer {
    /// Opens `path`, continuing its chain if it has one (with a `restart` anchor) or starting
    /// one (with a `start` anchor).
    pub(super) fn open(
        path: &Path,
        max_bytes: u64,
        signer: Box<dyn Fn() -> Option<Svid> + Send>,
    ) -> std::io::Result<Self> {
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
            signer,
            unproven: 0,
            buf: Vec::with_capacity(1024),
        };
        if size == 0 && seq == 0 {
            w.anchor("start", None)?;
        } else {
            w.anchor("restart", None)?;
        }
        Ok(w)
    }

    fn write_line<T: Serialize>(&mut self, line: &T) -> std::io::Result<()> {
        self.buf.clear();
        serde_json::to_writer(&mut self.buf, line).map_err(std::io::Error::other)?;
        self.file.write_all(&self.buf)?;
        self.file.write_all(b"\n")?;
        self.size += self.buf.len() as u64 + 1;
        hash_into(&mut self.prev, &self.buf);
        self.seq += 1;
        self.unproven += 1;
        Ok(())
    }

    /// Writes an anchor, signed with the SVID's key when there is one.
    pub(super) fn anchor(
        &mut self,
        reason: &str,
        continues: Option<String>,
    ) -> std::io::Result<()> {
        let mut line = Line {
            seq: self.seq,
            prev: self.prev.clone(),
            kind: "anchor".into(),
            time: ward_net::process::rfc3339_millis(SystemTime::now()),
            dropped: 0,
            access: None,
            continues,
            reason: Some(reason.to_owned()),
            signer: None,
            x5c: None,
            alg: None,
            sig: None,
        };
        let signed = match (self.signer)() {
            Some(svid) => match super::anchor::sign(&mut line, &svid) {
                Ok(()) => true,
                Err(e) => {
                    tracing::error!(error = %e, "access log anchor could not be signed");
                    false
                }
            },
            None => false,
        };
        self.write_line(&line)?;
        if signed {
            self.unproven = 0;
        }
        tracing::info!(
            file = %self.path.display(),
            seq = line.seq,
            reason,
            signed,
            anchor_prev = %line.prev,
            anchor_hash = %self.prev,
            "access log anchor"
        );
        Ok(())
    }

    /// Syncs what was written to the disk.
    pub(super) fn sync(&mut self) -> std::io::Result<()> {
        self.file.flush()?;
        self.file.get_ref().sync_data()
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.anchor("close", None)?;
        self.sync()?;
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
        self.anchor(
            "rotate",
            Some(
                rotated
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            ),
        )
    }

    pub(super) fn write(&mut self, e: Entry, dropped: u64) -> std::io::Result<()> {
        let time = ward_net::process::rfc3339_millis(e.time);
        let prev = std::mem::take(&mut self.prev);
        let line = AccessLineOut {
            seq: self.seq,
            prev: &prev,
            kind: "access",
            time: &time,
            dropped,
            access: AccessOut {
                listener: &e.listener,
                protocol: e.protocol,
                src: e.src.as_deref(),
                dst: e.dst.as_deref(),
                method: e.method.as_deref(),
                path: e.path.as_deref(),
                orig_dst: e.orig_dst.as_deref(),
                plan: e.plan,
                endpoint: e.endpoint.as_deref(),
                route: e.route.as_deref(),
                host: e.host.as_deref(),
                client: e.client.as_deref(),
                status: e.status,
                decision: e.decision,
                policy: &e.policy,
                reason: &e.reason,
                audit: e.audit.as_deref(),
                latency_us: e.latency.as_micros() as u64,
                bytes_in: e.bytes_in,
                bytes_out: e.bytes_out,
            },
        };
        // The line borrows the chain head while write_line sets the next one; on a failed
        // write the head stays what it was.
        let written = self.write_line(&line);
        if written.is_err() {
            self.prev = prev;
        }
        written?;
        if self.size >= self.max_bytes {
            self.rotate()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access_log::{test_entry, verify};

    #[test]
    fn chain_verifies_and_tampering_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jsonl");
        {
            let mut w = Writer::open(&p, 1 << 30, Box::new(|| None)).unwrap();
            for i in 0..10 {
                w.write(test_entry(i), if i == 5 { 3 } else { 0 }).unwrap();
            }
            w.file.flush().unwrap();
        }
        // Reopen continues the chain.
        {
            let mut w = Writer::open(&p, 1 << 30, Box::new(|| None)).unwrap();
            w.write(test_entry(10), 0).unwrap();
            w.file.flush().unwrap();
        }
        let r = verify(&p).unwrap();
        assert_eq!(r.broken, None);
        assert_eq!(r.lines, 13, "start, 10 records, restart, 1 record");
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
        let mut w = Writer::open(&p, 4096, Box::new(|| None)).unwrap();
        for i in 0..40 {
            w.write(test_entry(i), 0).unwrap();
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

    /// What one record costs the writer thread (a measurement, not a check; run with
    /// `cargo test --release -p ward-proxy --lib writer_cost -- --ignored --nocapture`).
    #[test]
    #[ignore = "a measurement"]
    fn writer_cost() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jsonl");
        let mut w = Writer::open(&p, 1 << 40, Box::new(|| None)).unwrap();
        let entries: Vec<Entry> = (0..200_000).map(test_entry).collect();
        let t = std::time::Instant::now();
        for e in entries {
            w.write(e, 0).unwrap();
        }
        w.file.flush().unwrap();
        let per = t.elapsed() / 200_000;
        println!("writer: {per:?} per record");
    }
}
