//! Network namespaces as "pods" and a "node" on one machine, for tests and benchmarks that
//! need real kernel networking (capture rules, routing). Needs root and `ip` (iproute2).
//!
//! [`TwoPods`] builds pod `a` (10.250.1.2, fd00:250:1::2) and pod `b` (10.250.2.2,
//! fd00:250:2::2), each joined by a veth pair to a node namespace that routes between them.
//! Names carry a per-process tag so parallel runs do not collide; everything is deleted on
//! drop.

use std::process::{Command, Output};

/// Runs a command to completion.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs a command that must succeed; returns its stdout.
pub fn must(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace, deleted (with everything in it) on drop.
#[derive(Debug)]
pub struct Netns(pub String);

impl Netns {
    /// Creates namespace `name` (replacing a stale one) with `lo` up.
    pub fn new(name: String) -> Self {
        let _ = run(Command::new("ip").args(["netns", "del", &name]));
        must(Command::new("ip").args(["netns", "add", &name]));
        must(Command::new("ip").args(["-n", &name, "link", "set", "lo", "up"]));
        Netns(name)
    }

    /// `prog` run inside the namespace (as the caller's user).
    pub fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0, prog]);
        c
    }

    /// `prog` run inside the namespace as `uid` (and gid `uid`), with no capabilities.
    pub fn as_user(&self, uid: u32, prog: &str) -> Command {
        let mut c = self.cmd("setpriv");
        c.args([
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--",
            prog,
        ]);
        c
    }

    /// `ip -n <ns> <args>`, which must succeed.
    pub fn ip(&self, args: &[&str]) {
        must(Command::new("ip").args(["-n", &self.0]).args(args));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run(Command::new("ip").args(["netns", "del", &self.0]));
    }
}

/// One pod's namespace and addresses.
#[derive(Debug)]
pub struct PodNet {
    /// The namespace.
    pub ns: Netns,
    /// Its IPv4 address.
    pub v4: String,
    /// Its IPv6 address.
    pub v6: String,
}

/// Two pods behind a routing node.
#[derive(Debug)]
pub struct TwoPods {
    /// Pod a.
    pub a: PodNet,
    /// Pod b.
    pub b: PodNet,
    /// The node (no proxy, routes between the pods).
    pub node: Netns,
}

fn tag() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{:x}", (std::process::id() << 12) ^ (nanos >> 10))
        .chars()
        .take(8)
        .collect()
}

impl TwoPods {
    /// Builds the topology (root and `ip` required).
    pub fn new() -> Self {
        let t = tag();
        let node = Netns::new(format!("wn{t}"));
        let mut pods = Vec::new();
        for (i, name) in [(1, "a"), (2, "b")] {
            let ns = Netns::new(format!("w{name}{t}"));
            let (host_if, pod_if) = (format!("n{name}{t}"), format!("p{name}{t}"));
            must(Command::new("ip").args([
                "link", "add", &host_if, "netns", &node.0, "type", "veth", "peer", "name", &pod_if,
                "netns", &ns.0,
            ]));
            node.ip(&["addr", "add", &format!("10.250.{i}.1/24"), "dev", &host_if]);
            node.ip(&[
                "addr",
                "add",
                &format!("fd00:250:{i}::1/64"),
                "dev",
                &host_if,
                "nodad",
            ]);
            node.ip(&["link", "set", &host_if, "up"]);
            ns.ip(&["addr", "add", &format!("10.250.{i}.2/24"), "dev", &pod_if]);
            ns.ip(&[
                "addr",
                "add",
                &format!("fd00:250:{i}::2/64"),
                "dev",
                &pod_if,
                "nodad",
            ]);
            ns.ip(&["link", "set", &pod_if, "up"]);
            ns.ip(&["route", "add", "default", "via", &format!("10.250.{i}.1")]);
            ns.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &format!("fd00:250:{i}::1"),
            ]);
            pods.push(PodNet {
                ns,
                v4: format!("10.250.{i}.2"),
                v6: format!("fd00:250:{i}::2"),
            });
        }
        must(
            node.cmd("sysctl")
                .args(["-q", "-w", "net.ipv4.ip_forward=1"]),
        );
        must(
            node.cmd("sysctl")
                .args(["-q", "-w", "net.ipv6.conf.all.forwarding=1"]),
        );
        let b = pods.pop().expect("two pods");
        let a = pods.pop().expect("two pods");
        TwoPods { a, b, node }
    }
}

impl Default for TwoPods {
    fn default() -> Self {
        Self::new()
    }
}
