//! Web PKI for gateway tests: a root and leaf made with rcgen, and Let's Encrypt's Pebble ACME
//! server (Debian's `pebble`, with `pebble-challtestsrv` as its DNS) run on loopback.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A root and a leaf for `names` signed by it, written to `dir`: (chain, key, root) files.
pub fn web_pki(dir: &Path, names: &[&str]) -> (PathBuf, PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "Gateway Test Root");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let root_key = rcgen::KeyPair::generate().unwrap();
    let root = p.self_signed(&root_key).unwrap();
    let issuer = rcgen::Issuer::new(p, root_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf =
        rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
    let (c, k, r) = (
        dir.join("web.pem"),
        dir.join("web.key"),
        dir.join("root.pem"),
    );
    std::fs::write(&c, leaf.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    std::fs::write(&r, root.pem()).unwrap();
    (c, k, r)
}

/// A port free on loopback now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running Pebble and its mock DNS; both stop when dropped.
pub struct Pebble {
    pebble: Child,
    dns: Child,
    /// The ACME directory URL.
    pub directory: String,
    /// The root Pebble's own HTTPS listener is signed by (trusted by the ACME client).
    pub server_root: PathBuf,
    /// The management port of the mock DNS (`/add-a`, `/clear-a`).
    pub dns_management: u16,
    management: u16,
    dir: PathBuf,
}

impl Drop for Pebble {
    fn drop(&mut self) {
        let _ = self.pebble.kill();
        let _ = self.dns.kill();
        let _ = self.pebble.wait();
        let _ = self.dns.wait();
    }
}

fn wait_port(port: u16, what: &str) {
    let until = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < until,
            "{what} did not start on port {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Pebble {
    /// Starts Pebble validating HTTP-01 on `http_port` and TLS-ALPN-01 on `tls_port` of
    /// 127.0.0.1 (every name resolves there), issuing certificates valid for `validity`.
    pub fn start(dir: &Path, http_port: u16, tls_port: u16, validity: Duration) -> Self {
        let dir = dir.join("pebble");
        let (cert, key, server_root) = web_pki(&dir, &["localhost", "127.0.0.1"]);
        let (listen, management, dns_port, dns_management) =
            (free_port(), free_port(), free_port(), free_port());
        let config = serde_json::json!({ "pebble": {
            "listenAddress": format!("127.0.0.1:{listen}"),
            "managementListenAddress": format!("127.0.0.1:{management}"),
            "certificate": cert, "privateKey": key,
            "httpPort": http_port, "tlsPort": tls_port,
            "ocspResponderURL": "", "externalAccountBindingRequired": false,
            "certificateValidityPeriod": validity.as_secs(),
        }});
        let config_path = dir.join("pebble.json");
        std::fs::write(&config_path, config.to_string()).unwrap();
        let log = |name: &str| std::fs::File::create(dir.join(name)).unwrap();
        let dns = Command::new("pebble-challtestsrv")
            .args(["-management", &format!("127.0.0.1:{dns_management}")])
            .args(["-dns01", &format!("127.0.0.1:{dns_port}")])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .stdout(log("challtestsrv.log"))
            .stderr(Stdio::inherit())
            .spawn()
            .expect("pebble-challtestsrv (apt-get install pebble)");
        let pebble = Command::new("pebble")
            .arg("-config")
            .arg(&config_path)
            .args(["-dnsserver", &format!("127.0.0.1:{dns_port}")])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdout(log("pebble.log"))
            .stderr(log("pebble.err"))
            .spawn()
            .expect("pebble (apt-get install pebble)");
        let p = Self {
            pebble,
            dns,
            directory: format!("https://127.0.0.1:{listen}/dir"),
            server_root,
            dns_management,
            management,
            dir,
        };
        wait_port(dns_management, "pebble-challtestsrv");
        wait_port(listen, "pebble");
        wait_port(management, "pebble management");
        p
    }

    /// The root Pebble issues under (a new one on every start), as a PEM file.
    pub fn issuing_root(&self) -> PathBuf {
        let path = self.dir.join("issuing-root.pem");
        let out = Command::new("curl")
            .args(["-sSf", "--cacert"])
            .arg(&self.server_root)
            .arg(format!("https://127.0.0.1:{}/roots/0", self.management))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(&path, &out.stdout).unwrap();
        path
    }

    /// Makes `host` resolve to `ip` for the validation authority (until cleared).
    pub fn set_a(&self, host: &str, ip: &str) {
        self.dns_call(
            "add-a",
            serde_json::json!({ "host": format!("{host}."), "addresses": [ip] }),
        );
    }

    /// Back to the default (127.0.0.1).
    pub fn clear_a(&self, host: &str) {
        self.dns_call("clear-a", serde_json::json!({ "host": format!("{host}.") }));
    }

    fn dns_call(&self, path: &str, body: serde_json::Value) {
        let out = Command::new("curl")
            .args(["-sSf", "-X", "POST", "-d", &body.to_string()])
            .arg(format!("http://127.0.0.1:{}/{path}", self.dns_management))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
