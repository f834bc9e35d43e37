//! The `ward-ca` command line as a child process: a `ward-ca run` CA, one CLI run with its exit
//! code and output, and a child that is killed if a test fails.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The trust domain of [`CaProcess`].
pub const TD: &str = "cli.test";

/// A `ward-ca run` child process; killed (and reaped) on drop, even when an assertion fails.
pub struct CaProcess {
    pub child: Child,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    // Holds the data directory and the log file; dropped after the child is killed.
    pub root: tempfile::TempDir,
}

impl CaProcess {
    /// Starts `ward-ca run` on a fresh data directory and waits for its admin socket.
    pub fn start() -> CaProcess {
        let root = tempfile::tempdir().unwrap();
        let data_dir = root.path().join("data");
        let log = root.path().join("ca.log");
        let log_file = File::create(&log).unwrap();
        let child = Command::new(super::ca_bin())
            .arg("run")
            .args(["--trust-domain", TD])
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--bind-address", "127.0.0.1:0"])
            .args(["--health-address", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .expect("spawn ward-ca run");
        let mut ca = CaProcess {
            child,
            data_dir,
            log,
            root,
        };
        ca.wait_ready();
        ca
    }

    pub fn socket(&self) -> PathBuf {
        self.data_dir.join("admin").join("api.sock")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.socket().exists() {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "ward-ca run exited with {status} before creating its admin socket; log:\n{}",
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no admin socket after 30s; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `ward-ca <args> --data-dir <this CA's data dir>`.
    pub fn cli(&self, args: &[&str]) -> Out {
        cli_in(&self.data_dir, args)
    }

    /// `entry list -o json` as a JSON array.
    pub fn entries(&self) -> Vec<Value> {
        let out = self.cli(&["entry", "list", "-o", "json"]);
        out.ok();
        match out.json() {
            Value::Array(a) => a,
            other => panic!("entry list -o json is not an array: {other}"),
        }
    }
}

impl Drop for CaProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The result of one CLI run.
pub struct Out {
    pub args: Vec<String>,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl std::fmt::Debug for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Out")
            .field("args", &self.args)
            .field("code", &self.code)
            .field("stdout", &self.stdout)
            .field("stderr", &self.stderr)
            .finish()
    }
}

impl Out {
    /// Asserts success: exit 0, nothing on stderr.
    pub fn ok(&self) -> &Self {
        assert_eq!(self.code, Some(0), "{self:#?}");
        assert!(self.stderr.is_empty(), "stderr on success: {self:#?}");
        self
    }

    /// Asserts failure with `code`: one `ward-ca: ` message on stderr, nothing on stdout.
    pub fn fails(&self, code: i32) -> &Self {
        assert_eq!(self.code, Some(code), "{self:#?}");
        assert!(self.stdout.is_empty(), "stdout on failure: {self:#?}");
        assert!(
            self.stderr.starts_with("ward-ca: "),
            "stderr is not a `ward-ca: ` message: {self:#?}"
        );
        self
    }

    /// Asserts that stderr contains `needle`.
    pub fn stderr_has(&self, needle: &str) -> &Self {
        assert!(
            self.stderr.contains(needle),
            "stderr lacks {needle:?}: {self:#?}"
        );
        self
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:#?}"))
    }
}

/// Runs `ward-ca <args> --data-dir <data_dir>` to completion (at most 30 s).
pub fn cli_in(data_dir: &Path, args: &[&str]) -> Out {
    let mut all: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    all.push("--data-dir".into());
    all.push(data_dir.display().to_string());
    run_bin(&all)
}

/// Runs `ward-ca <args>`, killing it if it takes more than 30 s.
pub fn run_bin(args: &[String]) -> Out {
    let child = Command::new(super::ca_bin())
        .args(args)
        .env_remove("WARD_CA_ADMIN_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ward-ca");
    let guard = KillOnDrop(Some(child));
    let out = wait_output(guard, Duration::from_secs(30));
    Out {
        args: args.to_vec(),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Kills (and reaps) a child that is still owned when dropped.
pub struct KillOnDrop(pub Option<Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits for the child (reading its piped output) for at most `limit`; kills it after that.
pub fn wait_output(mut guard: KillOnDrop, limit: Duration) -> std::process::Output {
    use std::io::Read;
    let child = guard.0.as_mut().unwrap();
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(s) = stdout.as_mut() {
            let _ = s.read_to_end(&mut buf);
        }
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(s) = stderr.as_mut() {
            let _ = s.read_to_end(&mut buf);
        }
        buf
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "ward-ca did not exit within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    guard.0 = None;
    std::process::Output {
        status,
        stdout: out_reader.join().unwrap(),
        stderr: err_reader.join().unwrap(),
    }
}
