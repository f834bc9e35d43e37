//! Process plumbing shared by Ward's binaries: logging set-up, shutdown signals, RFC 3339 times
//! and Unix-socket gRPC channels.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

/// Installs the global `tracing` subscriber: `filter` is an env-filter string (`info`,
/// `ward_ca=debug`), `json` selects JSON lines. Logs go to stderr so stdout stays for output.
pub fn init_logging(filter: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Resolves when the process receives SIGINT or SIGTERM.
///
/// The handlers are registered when this is called, not when the future is first polled, so a
/// signal that arrives in between is not lost; keep one future for the whole life of the
/// process (dropping it and calling again leaves a window where a signal reaches no one).
/// Must be called inside a tokio runtime.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let signals = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    );
    async move {
        let (Ok(mut int), Ok(mut term)) = signals else {
            // Without signal handlers the process can only be killed; wait forever.
            std::future::pending::<()>().await;
            return;
        };
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    }
}

/// Resolves once `flag` is (or becomes) true, or its sender is gone.
pub async fn until_set(flag: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = flag.wait_for(|s| *s).await;
}

/// Waits for `tasks` to finish for at most `deadline` in total, then aborts the rest (which
/// drops their connections).
pub async fn join_with_deadline(
    tasks: Vec<tokio::task::JoinHandle<()>>,
    deadline: std::time::Duration,
) {
    let end = tokio::time::Instant::now() + deadline;
    for mut t in tasks {
        if tokio::time::timeout_at(end, &mut t).await.is_err() {
            t.abort();
            let _ = t.await;
        }
    }
}

/// Formats a time as RFC 3339 UTC with milliseconds (`2026-11-26T10:11:07.123Z`).
pub fn rfc3339_millis(t: SystemTime) -> String {
    let base = rfc3339(t);
    let ms = t
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_millis());
    format!("{}.{ms:03}Z", base.trim_end_matches('Z'))
}

/// Formats a time as RFC 3339 UTC (`2026-11-26T10:11:07Z`).
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Parses what [`rfc3339_millis`] and [`rfc3339`] write (UTC, `Z`, optional fraction of up to
/// nine digits); `None` for anything else.
pub fn parse_rfc3339(t: &str) -> Option<SystemTime> {
    let b = t.as_bytes();
    let (head, rest) = (b.get(..19)?, b.get(19..)?);
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let s = std::str::from_utf8(head.get(r)?).ok()?;
        s.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| s.parse().ok())?
    };
    if head[4] != b'-'
        || head[7] != b'-'
        || head[10] != b'T'
        || head[13] != b':'
        || head[16] != b':'
    {
        return None;
    }
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    let nanos = match rest {
        [b'Z'] => 0,
        [b'.', frac @ .., b'Z'] if (1..=9).contains(&frac.len()) => {
            let s = std::str::from_utf8(frac).ok()?;
            if !s.bytes().all(|c| c.is_ascii_digit()) {
                return None;
            }
            s.parse::<u32>().ok()? * 10u32.pow(9 - frac.len() as u32)
        }
        _ => return None,
    };
    // Days since 1970-01-01 from the civil date (H. Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = u64::try_from(days * 86400 + hh * 3600 + mm * 60 + ss).ok()?;
    UNIX_EPOCH.checked_add(std::time::Duration::new(secs, nanos))
}

/// Dials `path` for every connection a channel makes (the URI tonic requires is unused).
fn unix_connector(
    path: &Path,
) -> impl tower::Service<
    Uri,
    Response = TokioIo<tokio::net::UnixStream>,
    Error = std::io::Error,
    Future = impl Future<Output = std::io::Result<TokioIo<tokio::net::UnixStream>>> + Send,
> + Clone
+ Send
+ 'static {
    let path: PathBuf = path.to_owned();
    tower::service_fn(move |_: Uri| {
        let path = path.clone();
        async move { Ok(TokioIo::new(tokio::net::UnixStream::connect(&path).await?)) }
    })
}

/// A gRPC channel over a Unix socket (connects lazily; each connection dials `path`).
pub fn unix_channel(path: &Path) -> Channel {
    Endpoint::from_static("http://localhost").connect_with_connector_lazy(unix_connector(path))
}

/// A gRPC channel over a Unix socket, connected (HTTP/2 handshake done) before it returns, so
/// a caller can tell "could not connect" from an error during a call.
pub async fn unix_channel_connect(path: &Path) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_static("http://localhost")
        .connect_with_connector(unix_connector(path))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rfc3339_parses_what_it_writes() {
        for secs in [0u64, 951_782_400, 1_795_688_233, 4_102_444_800, 86_399] {
            for ms in [0u32, 7, 999] {
                let t = UNIX_EPOCH + Duration::new(secs, ms * 1_000_000);
                assert_eq!(parse_rfc3339(&rfc3339_millis(t)), Some(t));
            }
            let t = UNIX_EPOCH + Duration::from_secs(secs);
            assert_eq!(parse_rfc3339(&rfc3339(t)), Some(t));
        }
        for bad in [
            "",
            "2026-11-26",
            "2026-11-26T10:11:07",
            "2026-13-26T10:11:07Z",
            "2026-11-26T10:11:07.Z",
            "2026-11-26T10:11:07+01:00",
            "2026-11-26T10:1a:07Z",
            "2026-11-26 10:11:07Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_795_688_233)),
            "2026-11-26T10:17:13Z"
        );
    }
}
