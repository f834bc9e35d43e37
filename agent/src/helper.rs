//! `ward-agent files`: writes a workload's SVID and bundle as PEM files for software that cannot
//! call the Workload API (nginx, PostgreSQL, ...), like spiffe-helper.
//!
//! It is a Workload API client (attested like any workload) that follows `FetchX509SVID` and
//! writes `svid.pem` (chain, leaf first), `svid_key.pem` (PKCS#8, mode 0600) and `bundle.pem`,
//! each written to a temporary file in the same directory, synced and renamed over the old one,
//! so readers never see a partial file. Optionally `jwt_svid.token` (0600) for one audience,
//! refreshed at half its life. After every update it runs a command and/or signals a process
//! (e.g. `nginx -s reload`, or SIGHUP to nginx's pid). `--once` writes once and exits (init
//! containers).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use ward_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use ward_proto::workload::{JwtsvidRequest, X509svidRequest, X509svidResponse};

/// What the helper does.
#[derive(Debug, Clone)]
pub struct Options {
    /// Workload API socket path.
    pub socket: PathBuf,
    /// Output directory (must exist).
    pub dir: PathBuf,
    /// Which SVID when the workload has several (default: the first).
    pub spiffe_id: Option<String>,
    /// Also write a JWT-SVID for this audience.
    pub jwt_audience: Option<String>,
    /// Write once and exit.
    pub once: bool,
    /// Command run (through `sh -c`) after every update.
    pub cmd: Option<String>,
    /// Signal sent after every update, to `pid` or the pid in `pid_file`.
    pub signal: Option<nix::sys::signal::Signal>,
    /// Process to signal.
    pub pid: Option<i32>,
    /// File holding the pid to signal (read at each update, as daemons rewrite it).
    pub pid_file: Option<PathBuf>,
}

/// Why the helper stopped.
#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    /// Bad options or an unusable directory; nothing was written.
    #[error("{0}")]
    Usage(String),
    /// The Workload API or the files failed.
    #[error("{0}")]
    Failed(String),
}

/// The files of one update, as bytes.
struct Files {
    chain: String,
    key: String,
    bundle: String,
}

fn pem_files(m: &X509svidResponse, want: Option<&str>) -> Result<Option<(String, Files)>, String> {
    let chosen = match want {
        Some(id) => m.svids.iter().find(|s| s.spiffe_id == id),
        None => m.svids.first(),
    };
    let Some(s) = chosen else { return Ok(None) };
    let pem = |label: &str, ders: Vec<Vec<u8>>| {
        ders.iter()
            .map(|d| ward_spiffe::bundle::pem_encode(label, d))
            .collect::<String>()
    };
    let chain = ward_spiffe::x509::split_der(&s.x509_svid).map_err(|e| e.to_string())?;
    let bundle = ward_spiffe::x509::split_der(&s.bundle).map_err(|e| e.to_string())?;
    if chain.is_empty() || bundle.is_empty() || s.x509_svid_key.is_empty() {
        return Err("the Workload API sent an empty SVID, key or bundle".into());
    }
    Ok(Some((
        s.spiffe_id.clone(),
        Files {
            chain: pem("CERTIFICATE", chain),
            key: ward_spiffe::bundle::pem_encode("PRIVATE KEY", &s.x509_svid_key),
            bundle: pem("CERTIFICATE", bundle),
        },
    )))
}

/// Writes `data` to `dir/name` atomically: a temporary file in the same directory (created with
/// `mode`), synced, then renamed over the target. On error the old file is untouched.
pub fn write_atomic(dir: &Path, name: &str, data: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp-{:016x}", rand::random::<u64>()));
    let result = (|| {
        // A fresh name that must not exist yet, and never through a symlink: in a directory
        // others can write, a planted file or link cannot receive the key.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .mode(mode)
            .open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, dir.join(name))?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn write_set(dir: &Path, files: &[(&str, &[u8], u32)]) -> Result<(), String> {
    for (name, data, mode) in files {
        write_atomic(dir, name, data, *mode)
            .map_err(|e| format!("cannot write {}: {e}", dir.join(name).display()))?;
    }
    Ok(())
}

/// Checks that `dir` is a directory this process can write, without touching existing files.
fn check_dir(dir: &Path) -> Result<(), HelperError> {
    let meta = std::fs::metadata(dir)
        .map_err(|e| HelperError::Usage(format!("output directory {}: {e}", dir.display())))?;
    if !meta.is_dir() {
        return Err(HelperError::Usage(format!(
            "output directory {} is not a directory",
            dir.display()
        )));
    }
    let probe = dir.join(format!(".ward-probe-{:016x}", rand::random::<u64>()));
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .mode(0o600)
        .open(&probe)
    {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(HelperError::Usage(format!(
            "output directory {} is not writable: {e}",
            dir.display()
        ))),
    }
}

fn notify(o: &Options) {
    if let Some(cmd) = &o.cmd {
        match std::process::Command::new("sh").args(["-c", cmd]).status() {
            Ok(s) if s.success() => {}
            Ok(s) => tracing::warn!(%cmd, status = %s, "update command failed"),
            Err(e) => tracing::warn!(%cmd, error = %e, "cannot run the update command"),
        }
    }
    if let Some(sig) = o.signal {
        let pid = match (&o.pid, &o.pid_file) {
            (Some(p), _) => Some(*p),
            (None, Some(f)) => std::fs::read_to_string(f)
                .ok()
                .and_then(|s| s.trim().parse().ok()),
            (None, None) => None,
        };
        match pid {
            Some(p) if p <= 0 => {
                tracing::warn!(pid = p, "refusing to signal pid <= 0 (a process group)");
            }
            Some(p) => {
                if let Err(e) = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), sig) {
                    tracing::warn!(pid = p, signal = %sig, error = %e, "cannot signal");
                }
            }
            None => tracing::warn!("no pid to signal (pid file unreadable?)"),
        }
    }
}

fn with_header<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    r
}

/// Fetches and writes the JWT-SVID; returns when to refresh it.
async fn write_jwt(
    client: &mut SpiffeWorkloadApiClient<tonic::transport::Channel>,
    o: &Options,
    audience: &str,
) -> Result<SystemTime, String> {
    let r = client
        .fetch_jwtsvid(with_header(JwtsvidRequest {
            audience: vec![audience.to_owned()],
            spiffe_id: o.spiffe_id.clone().unwrap_or_default(),
        }))
        .await
        .map_err(|s| format!("FetchJWTSVID: {}", s.message()))?
        .into_inner();
    let s = r.svids.first().ok_or("FetchJWTSVID returned no token")?;
    write_set(&o.dir, &[("jwt_svid.token", s.svid.as_bytes(), 0o600)])?;
    let exp = ward_spiffe::jwt::unverified_expiry(&s.svid).map_err(|e| e.to_string())?;
    let now = SystemTime::now();
    Ok(now + exp.duration_since(now).unwrap_or_default() / 2)
}

/// Runs the helper until the stream ends for good (or once).
pub async fn run(o: Options) -> Result<(), HelperError> {
    if o.signal.is_some() && o.pid.is_none() && o.pid_file.is_none() {
        return Err(HelperError::Usage(
            "--signal needs --pid or --pid-file".into(),
        ));
    }
    check_dir(&o.dir)?;
    let mut backoff = Duration::from_millis(200);
    loop {
        match follow(&o).await {
            Ok(()) if o.once => return Ok(()),
            Ok(()) => tracing::info!("Workload API stream ended; reconnecting"),
            Err(HelperError::Failed(e)) if !o.once => {
                tracing::warn!(error = %e, retry_in = ?backoff, "Workload API stream failed")
            }
            Err(e) => return Err(e),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

async fn follow(o: &Options) -> Result<(), HelperError> {
    let failed = HelperError::Failed;
    let mut client = SpiffeWorkloadApiClient::new(ward_net::process::unix_channel(&o.socket));
    let mut stream = client
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .map_err(|s| failed(format!("FetchX509SVID: {:?}: {}", s.code(), s.message())))?
        .into_inner();
    let mut jwt_refresh: Option<SystemTime> = None;
    loop {
        let sleep = jwt_refresh
            .map(|t| t.duration_since(SystemTime::now()).unwrap_or_default())
            .unwrap_or(Duration::from_secs(3600));
        let msg = tokio::select! {
            m = stream.message() => m.map_err(|s| failed(format!("{:?}: {}", s.code(), s.message())))?,
            _ = tokio::time::sleep(sleep), if jwt_refresh.is_some() => {
                if let Some(aud) = &o.jwt_audience {
                    jwt_refresh = Some(write_jwt(&mut client, o, aud).await.map_err(failed)?);
                    notify(o);
                }
                continue;
            }
        };
        let Some(msg) = msg else {
            if o.once {
                return Err(failed(
                    "the Workload API stream ended before an SVID arrived".into(),
                ));
            }
            return Ok(());
        };
        let Some((id, files)) = pem_files(&msg, o.spiffe_id.as_deref()).map_err(failed)? else {
            tracing::debug!("no matching SVID in this update yet");
            continue;
        };
        // Key first, chain next, bundle last: a reader that sees the new chain finds its key.
        write_set(
            &o.dir,
            &[
                ("svid_key.pem", files.key.as_bytes(), 0o600),
                ("svid.pem", files.chain.as_bytes(), 0o644),
                ("bundle.pem", files.bundle.as_bytes(), 0o644),
            ],
        )
        .map_err(failed)?;
        tracing::info!(id = %id, dir = %o.dir.display(), "SVID files written");
        // The certificate files changed: tell the server even if the JWT below fails.
        let jwt = match &o.jwt_audience {
            Some(aud) => Some(write_jwt(&mut client, o, aud).await),
            None => None,
        };
        notify(o);
        if let Some(j) = jwt {
            jwt_refresh = Some(j.map_err(failed)?);
        }
        if o.once {
            return Ok(());
        }
    }
}
