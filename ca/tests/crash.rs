//! Durability under SIGKILL: a real `ward-ca run` is killed with SIGKILL at a random moment
//! while several writers are creating entries through the admin API, then restarted on the same
//! data directory, many times. After every restart the store opens, every entry whose
//! CreateEntry call was acknowledged is there (same ID and SPIFFE ID, with its uniqueness
//! index), nothing appears that was never asked for, nothing is stored twice, revisions are
//! never reused, and whatever a restart showed is still there after the next crash. The same
//! rounds run on the etcd backend, where every other round also SIGKILLs the etcd member while
//! the writes are in flight.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rand::Rng;
use tonic::Code;
use ward_proto::admin::admin_client::AdminClient;
use ward_proto::admin::{EntrySpec, ListEntriesRequest};

const TD: &str = "crash.test";
const PARENT: &str = "spiffe://crash.test/ward/agent/join_token/crash";
const ROUNDS: usize = 20;
const WRITERS: usize = 4;

type Client = AdminClient<tonic::transport::Channel>;

/// A `ward-ca run` child process; killed (and reaped) on drop, even when an assertion fails.
struct CaProcess {
    child: Child,
    log: PathBuf,
}

impl CaProcess {
    fn start(data_dir: &Path, log: &Path, config: Option<&Path>) -> CaProcess {
        let log_file = File::options().create(true).append(true).open(log).unwrap();
        let mut cmd = Command::new(common::ca_bin());
        cmd.arg("run");
        if let Some(c) = config {
            cmd.arg("--config").arg(c);
        }
        let child = cmd
            .args(["--trust-domain", TD])
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--bind-address", "127.0.0.1:0"])
            .args(["--health-address", "127.0.0.1:0"])
            .env("WARD_CA_LOG_LEVEL", "warn")
            .env_remove("WARD_CA_ADMIN_SOCKET")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .expect("spawn ward-ca run");
        CaProcess {
            child,
            log: log.to_owned(),
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).unwrap())
    }

    /// Fails the test if the CA has exited.
    fn assert_running(&mut self, what: &str) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!(
                "{what}: ward-ca run exited with {status}; log:\n{}",
                self.log_text()
            );
        }
    }

    /// SIGKILL, then reap.
    fn sigkill(&mut self) {
        kill(self.pid(), Signal::SIGKILL).unwrap();
        let status = self.child.wait().unwrap();
        assert!(!status.success(), "{status}");
    }
}

impl Drop for CaProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until the admin socket exists and answers (after a crash the old socket file is still
/// there, so existence alone says nothing), checking all along that the CA is still running.
async fn wait_ready(ca: &mut CaProcess, socket: &Path, round: usize) -> Client {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        ca.assert_running(&format!(
            "round {round}: the CA did not start (store failed to open?)"
        ));
        if socket.exists() {
            let mut c = AdminClient::new(ward_net::process::unix_channel(socket));
            let r = tokio::time::timeout(
                Duration::from_secs(2),
                c.list_entries(ListEntriesRequest::default()),
            )
            .await;
            if let Ok(Ok(_)) = r {
                return c;
            }
        }
        assert!(
            Instant::now() < deadline,
            "round {round}: admin API not ready after 30s; log:\n{}",
            ca.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn spec(spiffe_id: &str, selectors: &[String]) -> EntrySpec {
    EntrySpec {
        spiffe_id: spiffe_id.to_owned(),
        parent_id: PARENT.to_owned(),
        selectors: selectors.to_vec(),
        ..Default::default()
    }
}

/// Everything the writers did, across rounds.
#[derive(Default)]
struct Ledger {
    /// Every SPIFFE ID ever sent, with its selectors (each attempt uses a fresh ID).
    attempted: HashMap<String, Vec<String>>,
    /// Acknowledged creates: entry ID -> SPIFFE ID.
    acked: HashMap<String, String>,
    /// Errors seen before the kill was sent (there must be none).
    early_errors: Vec<String>,
}

/// Writes entries until the first error; records attempts before sending and acks on OK.
async fn writer(
    mut client: Client,
    round: usize,
    w: usize,
    ledger: Arc<Mutex<Ledger>>,
    killed: Arc<AtomicBool>,
    acks: Arc<AtomicUsize>,
) {
    for seq in 0u64.. {
        let id = format!("spiffe://{TD}/r{round}/w{w}/e{seq}");
        let selectors = vec![
            format!("unix:uid:{}", 1000 + w),
            format!("unix:path:/bin/r{round}-e{seq}"),
        ];
        ledger
            .lock()
            .unwrap()
            .attempted
            .insert(id.clone(), selectors.clone());
        match client.create_entry(spec(&id, &selectors)).await {
            Ok(resp) => {
                let e = resp.into_inner();
                let mut l = ledger.lock().unwrap();
                assert_eq!(e.spiffe_id, id, "CreateEntry answered another entry");
                let prev = l.acked.insert(e.id.clone(), e.spiffe_id);
                assert!(prev.is_none(), "entry ID {} acknowledged twice", e.id);
                drop(l);
                acks.fetch_add(1, Ordering::SeqCst);
            }
            Err(status) => {
                if !killed.load(Ordering::SeqCst) {
                    ledger
                        .lock()
                        .unwrap()
                        .early_errors
                        .push(format!("round {round} writer {w} {id}: {status:?}"));
                }
                return;
            }
        }
    }
}

/// Checks the stored entries against the ledger; returns the set of entry IDs present.
async fn verify(
    client: &mut Client,
    ledger: &Ledger,
    seen: &HashMap<String, String>,
    round: usize,
) -> HashMap<String, String> {
    let entries = client
        .list_entries(ListEntriesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    let mut by_id: HashMap<String, String> = HashMap::new();
    let mut spiffe_ids = HashSet::new();
    let mut revisions = HashSet::new();
    for e in &entries {
        assert!(
            by_id.insert(e.id.clone(), e.spiffe_id.clone()).is_none(),
            "round {round}: entry ID {} listed twice",
            e.id
        );
        assert!(
            spiffe_ids.insert(e.spiffe_id.clone()),
            "round {round}: {} stored twice (duplicate entry)",
            e.spiffe_id
        );
        assert!(
            revisions.insert(e.revision),
            "round {round}: revision {} used by two entries (revision counter went back)",
            e.revision
        );
        let selectors = ledger.attempted.get(&e.spiffe_id).unwrap_or_else(|| {
            panic!(
                "round {round}: {} is stored but was never requested",
                e.spiffe_id
            )
        });
        assert_eq!(e.parent_id, PARENT, "round {round}: {e:?}");
        let mut got = e.selectors.clone();
        got.sort();
        let mut want = selectors.clone();
        want.sort();
        assert_eq!(got, want, "round {round}: {e:?}");
    }
    let mut lost: Vec<String> = ledger
        .acked
        .iter()
        .filter(|(id, sid)| by_id.get(*id) != Some(*sid))
        .map(|(id, sid)| format!("{id} ({sid})"))
        .collect();
    lost.sort();
    assert!(
        lost.is_empty(),
        "round {round}: {} of {} acknowledged entries are missing after the restart: {:?}",
        lost.len(),
        ledger.acked.len(),
        &lost[..lost.len().min(20)]
    );
    let mut vanished: Vec<&String> = seen
        .iter()
        .filter(|(id, sid)| by_id.get(*id) != Some(*sid))
        .map(|(_, sid)| sid)
        .collect();
    vanished.sort();
    assert!(
        vanished.is_empty(),
        "round {round}: entries present after an earlier restart vanished: {vanished:?}"
    );
    by_id
}

/// Re-creating a few acknowledged entries must be refused: their uniqueness index survived too.
async fn check_uniqueness(client: &mut Client, ledger: &Ledger, round: usize) {
    let mut rng = rand::rng();
    let acked: Vec<&String> = ledger.acked.values().collect();
    for _ in 0..acked.len().min(5) {
        let sid = acked[rng.random_range(0..acked.len())];
        let selectors = &ledger.attempted[sid];
        let e = client
            .create_entry(spec(sid, selectors))
            .await
            .expect_err("re-creating an acknowledged entry succeeded");
        assert_eq!(
            e.code(),
            Code::AlreadyExists,
            "round {round}: re-creating {sid}: {e:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_entries_survive_sigkill() {
    crash_rounds(None, ROUNDS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_entries_survive_sigkill_on_etcd() {
    let mut etcd = ward_testing::etcd::Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ca.toml");
    std::fs::write(
        &config,
        format!(
            "trust_domain = \"{TD}\"\ndata_dir = \"{}\"\n[store]\nbackend = \"etcd\"\n\
             [store.etcd]\nendpoints = [\"{}\"]\nprefix = \"/crash/\"\n",
            dir.path().join("unused").display(),
            etcd.endpoints()[0]
        ),
    )
    .unwrap();
    crash_rounds(Some((config, &mut etcd)), ROUNDS / 2).await;
}

/// `rounds` rounds of writes and a SIGKILL of the CA (and, on etcd, of the etcd member every
/// other round), each followed by a restart and a full check.
async fn crash_rounds(mut etcd: Option<(PathBuf, &mut ward_testing::etcd::Etcd)>, rounds: usize) {
    let started = Instant::now();
    let root = tempfile::tempdir().unwrap();
    let data_dir = root.path().join("data");
    let log = root.path().join("ca.log");
    let socket = data_dir.join("admin").join("api.sock");
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut seen: HashMap<String, String> = HashMap::new();
    let mut rng = rand::rng();
    let mut per_round = Vec::new();

    let config = etcd.as_ref().map(|(c, _)| c.clone());
    for round in 0..=rounds {
        let mut ca = CaProcess::start(&data_dir, &log, config.as_deref());
        let mut client = wait_ready(&mut ca, &socket, round).await;
        {
            let l = ledger.lock().unwrap().clone_view();
            seen = verify(&mut client, &l, &seen, round).await;
            check_uniqueness(&mut client, &l, round).await;
            assert!(l.early_errors.is_empty(), "{:?}", l.early_errors);
        }
        if round == rounds {
            // Last start: only verification, then a clean stop by the guard.
            ca.assert_running("after the final verification");
            break;
        }

        let killed = Arc::new(AtomicBool::new(false));
        let acks = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            // One connection per writer, so the writers are independent.
            let c = AdminClient::new(ward_net::process::unix_channel(&socket));
            tasks.push(tokio::spawn(writer(
                c,
                round,
                w,
                ledger.clone(),
                killed.clone(),
                acks.clone(),
            )));
        }
        // Let the writes flow (at least one ack), then kill at a random moment.
        let deadline = Instant::now() + Duration::from_secs(10);
        while acks.load(Ordering::SeqCst) == 0 {
            assert!(
                Instant::now() < deadline,
                "round {round}: no write acknowledged in 10s"
            );
            ca.assert_running("while writing");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let delay = Duration::from_millis(rng.random_range(50..=400));
        tokio::time::sleep(delay).await;
        ca.assert_running("before the kill");
        killed.store(true, Ordering::SeqCst);
        let kill_etcd = round % 2 == 1;
        if let Some((_, etcd)) = etcd.as_mut().filter(|_| kill_etcd) {
            etcd.kill(0); // under the CA's in-flight transactions
        }
        ca.sigkill();
        if let Some((_, etcd)) = etcd.as_mut().filter(|_| kill_etcd) {
            etcd.restart(0);
            etcd.wait_healthy(0);
        }
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .expect("a writer did not notice the CA died")
                .unwrap();
        }
        let l = ledger.lock().unwrap();
        assert!(l.early_errors.is_empty(), "{:?}", l.early_errors);
        per_round.push((delay, acks.load(Ordering::SeqCst)));
        drop(l);
        drop(ca);
    }

    let l = ledger.lock().unwrap();
    eprintln!(
        "crash test: {rounds} SIGKILLs (etcd: {}), {} acknowledged and {} attempted creates, {} entries \
         stored at the end; per round (kill delay, acks): {per_round:?}; took {:?}",
        config.is_some(),
        l.acked.len(),
        l.attempted.len(),
        seen.len(),
        started.elapsed()
    );
    assert!(l.acked.len() >= rounds, "too few writes to mean anything");
}

impl Ledger {
    /// A copy to verify against without holding the lock across awaits.
    fn clone_view(&self) -> Ledger {
        Ledger {
            attempted: self.attempted.clone(),
            acked: self.acked.clone(),
            early_errors: self.early_errors.clone(),
        }
    }
}
