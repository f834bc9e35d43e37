//! Workload attestation: from a caller's kernel-verified peer credentials to its selectors.
//!
//! Unix selectors: `unix:uid`, `unix:gid`, `unix:user`, `unix:group` from SO_PEERCRED and the
//! user database, `unix:path` from `/proc/<pid>/exe`, and `unix:sha256` of that binary (opened
//! through `/proc/<pid>/exe`, so a binary replaced on disk is still the one hashed; hashing is
//! bounded in size and cached by file identity). The process start time is read before and
//! after, so a PID reused mid-attestation is detected and refused.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use ward_spiffe::{Selector, SelectorSet};

use crate::config::UnixConfig;

/// Why a caller could not be attested.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttestError {
    /// The connection carried no peer credentials.
    #[error("caller has no peer credentials")]
    NoCredentials,
    /// The process went away or its PID was reused during attestation.
    #[error("caller process {0} changed during attestation")]
    ProcessChanged(i32),
    /// A selector value could not be formed.
    #[error("selector: {0}")]
    Selector(String),
}

/// Peer credentials of a Unix-socket caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    /// Process ID (from the kernel, at connect time).
    pub pid: Option<i32>,
    /// User ID.
    pub uid: u32,
    /// Group ID.
    pub gid: u32,
}

type FileKey = (u64, u64, u64, i64, i64);

/// The Unix workload attestor.
#[derive(Debug, Clone)]
pub struct UnixAttestor {
    proc_root: PathBuf,
    max_hash_bytes: u64,
    hashes: Arc<Mutex<HashMap<FileKey, String>>>,
}

fn sel(kind: &str, value: String) -> Result<Selector, AttestError> {
    Selector::new(kind, &value).map_err(|e| AttestError::Selector(e.to_string()))
}

impl UnixAttestor {
    /// An attestor reading `cfg.proc_root`.
    pub fn new(cfg: &UnixConfig) -> Self {
        Self {
            proc_root: cfg.proc_root.clone(),
            max_hash_bytes: cfg.max_hash_bytes,
            hashes: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    fn start_time(&self, pid: i32) -> Option<String> {
        let stat =
            std::fs::read_to_string(self.proc_root.join(pid.to_string()).join("stat")).ok()?;
        // Fields after the command name (which may contain spaces) start at field 3.
        let rest = &stat[stat.rfind(')')? + 1..];
        rest.split_whitespace().nth(19).map(str::to_owned)
    }

    /// Attests `caller`; blocking work runs off the async runtime. The binary is hashed only
    /// if `want_sha256` (some entry uses a `unix:sha256` selector): hashing a large binary is
    /// the one expensive step, and without such an entry it cannot change the outcome.
    pub async fn attest(
        &self,
        caller: Caller,
        want_sha256: bool,
    ) -> Result<SelectorSet, AttestError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.attest_blocking(caller, want_sha256))
            .await
            .map_err(|_| AttestError::NoCredentials)?
    }

    fn attest_blocking(
        &self,
        caller: Caller,
        want_sha256: bool,
    ) -> Result<SelectorSet, AttestError> {
        let mut out = vec![
            sel("unix", format!("uid:{}", caller.uid))?,
            sel("unix", format!("gid:{}", caller.gid))?,
        ];
        if let Ok(Some(u)) = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(caller.uid)) {
            out.push(sel("unix", format!("user:{}", u.name))?);
        }
        if let Ok(Some(g)) = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(caller.gid)) {
            out.push(sel("unix", format!("group:{}", g.name))?);
        }
        if let Some(pid) = caller.pid.filter(|p| *p > 0) {
            let before = self.start_time(pid);
            let exe = self.proc_root.join(pid.to_string()).join("exe");
            if let Ok(path) = std::fs::read_link(&exe) {
                let shown = path.to_string_lossy();
                // A binary deleted after start shows as "<path> (deleted)"; keep the path.
                let shown = shown.strip_suffix(" (deleted)").unwrap_or(&shown);
                out.push(sel("unix", format!("path:{shown}"))?);
                if want_sha256 && let Some(h) = self.hash(&exe) {
                    out.push(sel("unix", format!("sha256:{h}"))?);
                }
            }
            if before.is_none() || self.start_time(pid) != before {
                return Err(AttestError::ProcessChanged(pid));
            }
        }
        Ok(SelectorSet::new(out))
    }

    fn hash(&self, exe: &std::path::Path) -> Option<String> {
        if self.max_hash_bytes == 0 {
            return None;
        }
        let mut f = std::fs::File::open(exe).ok()?;
        let m = f.metadata().ok()?;
        if m.len() > self.max_hash_bytes {
            tracing::debug!(
                size = m.len(),
                "binary too large to hash; no unix:sha256 selector"
            );
            return None;
        }
        let key = (m.dev(), m.ino(), m.len(), m.mtime(), m.mtime_nsec());
        if let Some(h) = self
            .hashes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return Some(h.clone());
        }
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = f.read(&mut buf).ok()?;
            if n == 0 {
                break;
            }
            total += n as u64;
            if total > self.max_hash_bytes {
                return None;
            }
            hasher.update(&buf[..n]);
        }
        let h = hex::encode(hasher.finalize());
        let mut cache = self.hashes.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() > 4096 {
            cache.clear();
        }
        cache.insert(key, h.clone());
        Some(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn attests_this_process() {
        let a = UnixAttestor::new(&UnixConfig::default());
        let me = Caller {
            pid: Some(std::process::id() as i32),
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
        };
        let s = a.attest(me, true).await.unwrap();
        let strs: Vec<String> = s.iter().map(ToString::to_string).collect();
        assert!(strs.contains(&format!("unix:uid:{}", me.uid)), "{strs:?}");
        assert!(strs.contains(&format!("unix:gid:{}", me.gid)), "{strs:?}");
        let exe = std::env::current_exe().unwrap();
        assert!(
            strs.contains(&format!("unix:path:{}", exe.display())),
            "{strs:?}"
        );
        let want = hex::encode(Sha256::digest(std::fs::read(&exe).unwrap()));
        assert!(strs.contains(&format!("unix:sha256:{want}")), "{strs:?}");
        let s = a.attest(me, false).await.unwrap();
        assert!(s.iter().all(|s| !s.value().starts_with("sha256:")));
    }

    #[tokio::test]
    async fn bounded_hashing_and_vanished_process() {
        let a = UnixAttestor::new(&UnixConfig {
            max_hash_bytes: 10,
            ..UnixConfig::default()
        });
        let me = Caller {
            pid: Some(std::process::id() as i32),
            uid: 0,
            gid: 0,
        };
        let s = a.attest(me, true).await.unwrap();
        assert!(s.iter().all(|s| !s.value().starts_with("sha256:")));
        // A fake proc tree whose process has no stat file: refused, not guessed.
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("42")).unwrap();
        let a = UnixAttestor::new(&UnixConfig {
            proc_root: dir.path().to_owned(),
            ..UnixConfig::default()
        });
        let e = a
            .attest(
                Caller {
                    pid: Some(42),
                    uid: 0,
                    gid: 0,
                },
                true,
            )
            .await
            .unwrap_err();
        assert_eq!(e, AttestError::ProcessChanged(42));
    }
}
