//! Pods as network namespaces for the tests that need real kernel rules (capture, egress):
//! two "pods" and a "node" joined by veth pairs, a plain application and a real `ward-proxy`
//! (as its own uid, after `ward-proxy init`) in each. Needs root, `ip`, `nft`, `setpriv`,
//! `curl` and `python3`; a missing one fails the test with the reason (nothing is skipped).

#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use ward_proxy::config::{
    AccessLog, IdentitySource, InboundCapture, Listener, MeshRoute, OutboundCapture, ProxyConfig,
    UnknownDestination,
};
use ward_spiffe::SpiffeId;
use ward_testing::Pki;
use ward_testing::netns::{Netns, PodNet, TwoPods, run};

pub const TD: &str = "capture.test";
pub const PROXY_UID: u32 = 1337;
pub const APP_UID: u32 = 4000;
/// The applications run as an unprivileged uid, which cannot use a per-user Python install.
pub const SYSTEM_PYTHON: &str = "/usr/bin/python3";

pub fn proxy_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ward-proxy"))
}

/// Fails (never skips) when the machine cannot run these tests, naming what is missing.
pub fn require_tools() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the capture tests need root (network namespaces and nftables); CI runs them as root"
    );
    for tool in ["ip", "nft", "setpriv", "curl", SYSTEM_PYTHON] {
        let ok = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "{tool} is missing (scripts/test-tools.sh installs iproute2, nftables, util-linux, curl)"
        );
    }
}

/// A child process killed on drop.
pub struct Proc(pub Child, pub String);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One pod: its namespace, addresses, and what runs in it.
pub struct Pod {
    pub ns: Netns,
    pub v4: String,
    pub v6: String,
    pub procs: Vec<Proc>,
    pub dir: PathBuf,
}

/// Two pods (a, b) behind a node namespace that routes between them.
pub struct Topology {
    pub a: Pod,
    pub b: Pod,
    pub node: Netns,
    pub pki: Pki,
    pub _root: tempfile::TempDir,
}

impl Topology {
    pub fn new() -> Topology {
        require_tools();
        let root = tempfile::tempdir().unwrap();
        // The proxy and the applications run as other uids: they must reach their files.
        std::fs::set_permissions(
            root.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let net = TwoPods::new();
        let pod = |p: PodNet, name: &str| {
            // The proxy (uid 1337) reads its identity and writes its log here.
            let dir = root.path().join(name);
            std::fs::create_dir(&dir).unwrap();
            std::os::unix::fs::chown(&dir, Some(PROXY_UID), Some(PROXY_UID)).unwrap();
            Pod {
                ns: p.ns,
                v4: p.v4,
                v6: p.v6,
                procs: Vec::new(),
                dir,
            }
        };
        Topology {
            a: pod(net.a, "a"),
            b: pod(net.b, "b"),
            node: net.node,
            pki: Pki::new(TD),
            _root: root,
        }
    }
}

impl Pod {
    pub fn start_app(&mut self, name: &str) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/netns/app.py");
        let mut cmd = self.ns.as_user(APP_UID, SYSTEM_PYTHON);
        cmd.args([script, name]);
        self.start_ready(cmd, &format!("app {name}"));
    }

    /// Starts `cmd`, which prints `ready` once it serves, and keeps it until the pod goes.
    pub fn start_ready(&mut self, mut cmd: Command, what: &str) {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "ready", "{what} did not start");
        self.procs.push(Proc(child, what.to_owned()));
    }

    /// `ward-proxy init` in this pod, with extra flags.
    pub fn init(&self, extra: &[&str]) -> Output {
        run(self
            .ns
            .cmd(proxy_bin().to_str().unwrap())
            .arg("init")
            .args(["--proxy-uid", &PROXY_UID.to_string()])
            .args(extra))
    }

    pub fn start_proxy(&mut self, pki: &Pki, name: &str, tune: impl FnOnce(&mut ProxyConfig)) {
        let issued = pki.svid(&format!("/{name}"));
        let (chain, key) = issued.write(&self.dir, name);
        let bundle = pki.write_bundle(&self.dir);
        for f in [&chain, &key, &bundle] {
            std::os::unix::fs::chown(f, Some(PROXY_UID), Some(PROXY_UID)).unwrap();
        }
        let mut cfg = ProxyConfig::new(IdentitySource::Files {
            chain,
            key,
            bundle,
            trust_domain: ward_spiffe::TrustDomain::new(TD).unwrap(),
        });
        cfg.admin_address = "127.0.0.1:15020".parse().unwrap();
        cfg.access_log = Some(AccessLog {
            max_bytes: 1 << 30,
            queue: 1024,
            ..AccessLog::at(self.dir.join("access.jsonl"))
        });
        cfg.drain_timeout = Duration::from_secs(1);
        cfg.listeners = vec![
            Listener::InboundCapture(InboundCapture {
                name: "capture-in".into(),
                listen: "[::]:15006".parse().unwrap(),
                app_address: Default::default(),
                default_port: Default::default(),
                ports: Default::default(),
                probes: vec![],
                authorize_probes: true,
            }),
            Listener::OutboundCapture(OutboundCapture {
                name: "capture-out".into(),
                listen: "127.0.0.1:15001".parse().unwrap(),
                protocol: Default::default(),
                routes: mesh_routes(),
                unknown: UnknownDestination::Passthrough,
            }),
            Listener::OutboundCapture(OutboundCapture {
                name: "capture-out6".into(),
                listen: "[::1]:15001".parse().unwrap(),
                protocol: Default::default(),
                routes: mesh_routes(),
                unknown: UnknownDestination::Passthrough,
            }),
        ];
        tune(&mut cfg);
        let path = self.dir.join("proxy.yaml");
        std::fs::write(&path, serde_yaml_ng::to_string(&cfg).unwrap()).unwrap();
        let child = self
            .ns
            .as_user(PROXY_UID, proxy_bin().to_str().unwrap())
            .args(["run", "--config"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        self.procs.push(Proc(child, format!("proxy {name}")));
        // Ready once it holds its SVID.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = run(self.ns.cmd("curl").args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "http://127.0.0.1:15020/readyz",
            ]));
            if String::from_utf8_lossy(&out.stdout) == "200" {
                break;
            }
            assert!(Instant::now() < deadline, "proxy {name} not ready");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `curl` from this pod as the application's uid: (HTTP status, body).
    pub fn curl(&self, url: &str) -> (u16, String) {
        curl(self.ns.as_user(APP_UID, "curl"), url)
    }

    /// [`Pod::curl`] with more curl arguments.
    pub fn curl_with(&self, url: &str, extra: &[&str]) -> (u16, String) {
        let mut c = self.ns.as_user(APP_UID, "curl");
        c.args(extra);
        curl(c, url)
    }

    pub fn log(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.join("access.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|l| l.get("access").cloned())
            .collect()
    }

    /// Waits for an access record matching `f`.
    pub fn wait_record(&self, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(r) = self.log().into_iter().find(|r| f(r)) {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "no access record {what} in {:#?}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

pub fn curl(mut c: Command, url: &str) -> (u16, String) {
    let out = run(c.args(["-s", "-m", "10", "-g", "-w", "\n%{http_code}", url]));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

pub fn id(p: &str) -> SpiffeId {
    SpiffeId::new(&format!("spiffe://{TD}/{p}")).unwrap()
}

pub fn mesh_routes() -> Vec<MeshRoute> {
    let route = |dst: &str, who: &str| MeshRoute {
        dst: dst.parse().unwrap(),
        ports: vec![8080],
        expected_ids: vec![id(who)],
    };
    vec![
        route("10.250.1.2", "a"),
        route("10.250.2.2", "b"),
        route("fd00:250:1::2", "a"),
        route("fd00:250:2::2", "b"),
    ]
}
