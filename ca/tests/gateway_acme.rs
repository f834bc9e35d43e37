//! The gateway's certificates from a real ACME server — Let's Encrypt's Pebble with its mock
//! DNS, on loopback: issued over HTTP-01 and over TLS-ALPN-01 and checked by curl against
//! Pebble's root; renewed at two thirds of a short life and swapped while a connection made
//! with the old one stays up; a renewal whose validation fails leaves the old certificate
//! serving and says why; a restart serves the kept certificate without a new order.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use common::mesh::{TD, admin_get, app, backend, cfg, mesh};
use common::web::{Pebble, free_port};
use ward_ca::services::ServiceOp;
use ward_proxy::config::{DiscoveryCfg, Listener};
use ward_proxy::gateway::config::{GatewayCfg, GatewayListener, GatewayProtocol};

const HOST: &str = "shop.acme.test";

/// The gateway config: HTTPS on `https`, HTTP (redirect + HTTP-01) on `http`, ACME from
/// `pebble` with `challenge`, one route to `shop.web`.
fn gateway_cfg(
    sock: &Path,
    state: &Path,
    pebble: &Pebble,
    https: u16,
    http: u16,
    challenge: &str,
) -> ward_proxy::ProxyConfig {
    let mut g = cfg(sock, "gateway");
    g.discovery = Some(DiscoveryCfg::default());
    g.listeners = vec![
        Listener::Gateway(GatewayListener {
            name: "https".into(),
            listen: format!("127.0.0.1:{https}").parse().unwrap(),
            protocol: GatewayProtocol::Https,
            redirect_to_https: None,
            proxy_protocol_from: vec![],
            port: None,
        }),
        Listener::Gateway(GatewayListener {
            name: "http".into(),
            listen: format!("127.0.0.1:{http}").parse().unwrap(),
            protocol: GatewayProtocol::Http,
            redirect_to_https: Some(https),
            proxy_protocol_from: vec![],
            port: None,
        }),
    ];
    g.gateway = Some(
        serde_yaml_ng::from_str::<GatewayCfg>(&format!(
            r#"
acme:
  directory: {}
  server_root: {}
  state_dir: {}
  challenge: {challenge}
  contact: [ "mailto:ops@acme.test" ]
  min_backoff: 1s
  max_backoff: 2s
routes:
  - name: shop
    hostnames: [{HOST}]
    rules: [ {{ backends: [ {{ service: shop.web, port: 80 }} ] }} ]
"#,
            pebble.directory,
            pebble.server_root.display(),
            state.display()
        ))
        .unwrap(),
    );
    g.validate().unwrap();
    g
}

/// The mesh with `shop.web` behind a backend proxy: (ca, agent, shop proxy).
async fn shop_mesh(dir: &Path) -> (ward_ca::CaServer, ward_agent::Agent, ward_proxy::Proxy) {
    let (ca, agent) = mesh(dir, &["gateway", "shop"]).await;
    let shop = backend(
        &agent.socket_path,
        "shop",
        app("shop", Duration::ZERO, Arc::new(AtomicUsize::new(0))).await,
    )
    .await;
    let ep = shop.inbound_addr("in").unwrap();
    let svc = serde_json::from_value(serde_json::json!({
        "name": "shop.web", "ports": [ { "name": "http", "port": 80 } ],
        "endpoints": [ { "address": ep.ip().to_string(), "ports": { "http": ep.port() },
                         "ids": [format!("spiffe://{TD}/shop")] } ],
    }))
    .unwrap();
    ca.core
        .services
        .write(vec![ServiceOp::Put(svc)], "admin")
        .await
        .unwrap();
    (ca, agent, shop)
}

/// curl over HTTPS to the gateway, trusting only `root`: the status (0: failed) and the served
/// certificate's serial as curl printed it.
fn curl_https(port: u16, root: &Path) -> (u16, String) {
    let out = Command::new("curl")
        .args([
            "-sS",
            "-v",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg("--cacert")
        .arg(root)
        .args(["--resolve", &format!("{HOST}:{port}:127.0.0.1")])
        .arg(format!("https://{HOST}:{port}/"))
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&out.stdout).parse().unwrap_or(0);
    (status, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The serial of the certificate the gateway serves for HOST now, on a new connection.
async fn served_serial(port: u16, root: &Path) -> Option<Vec<u8>> {
    let c = Client::connect(port, root).await.ok()?;
    Some(c.serial)
}

/// A kept-alive HTTP/1.1 connection to the gateway over TLS.
struct Client {
    send: hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    serial: Vec<u8>,
}

impl Client {
    async fn connect(port: u16, root: &Path) -> Result<Self, String> {
        let mut roots = rustls::RootCertStore::empty();
        for c in ward_spiffe::bundle::pem_certificates(&std::fs::read(root).unwrap()).unwrap() {
            roots.add(c.into()).unwrap();
        }
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(HOST.try_into().unwrap(), tcp)
            .await
            .map_err(|e| e.to_string())?;
        let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
        let serial = x509_serial(&leaf);
        let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        Ok(Self { send, serial })
    }

    async fn get(&mut self) -> u16 {
        let req = hyper::Request::builder()
            .uri("/")
            .header("host", HOST)
            .body(http_body_util::Empty::new())
            .unwrap();
        match self.send.send_request(req).await {
            Ok(r) => {
                let s = r.status().as_u16();
                let _ = http_body_util::BodyExt::collect(r.into_body()).await;
                s
            }
            Err(_) => 0,
        }
    }
}

fn x509_serial(der: &[u8]) -> Vec<u8> {
    use x509_cert::der::Decode as _;
    x509_cert::Certificate::from_der(der)
        .unwrap()
        .tbs_certificate
        .serial_number
        .as_bytes()
        .to_vec()
}

async fn wait_until<F: AsyncFnMut() -> bool>(what: &str, limit: Duration, mut f: F) {
    let until = Instant::now() + limit;
    while !f().await {
        assert!(Instant::now() < until, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn errors(gw: &ward_proxy::Proxy) -> u64 {
    gw.metrics
        .gateway_cert_errors
        .get_or_create(&ward_proxy::metrics::CertLabel { name: HOST.into() })
        .get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http01_issues_renews_under_a_live_connection_and_a_failed_renewal_keeps_the_old() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, agent, _shop) = shop_mesh(dir.path()).await;
    let (https, http) = (free_port(), free_port());
    // Certificates live 24 s: renewed 16 s after issuance.
    let pebble = Pebble::start(dir.path(), http, https, Duration::from_secs(24));
    let state = dir.path().join("acme");
    let gw = ward_proxy::Proxy::start(gateway_cfg(
        &agent.socket_path,
        &state,
        &pebble,
        https,
        http,
        "http-01",
    ))
    .await
    .unwrap();
    let root = pebble.issuing_root();

    // Issued over HTTP-01 (answered by the gateway's HTTP listener), trusted by curl through
    // Pebble's root, and the request goes on to the mesh service.
    wait_until(
        "curl accepts the ACME certificate",
        Duration::from_secs(30),
        async || curl_https(https, &root).0 == 200,
    )
    .await;
    let account = state.join("account.json");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&account).unwrap().permissions().mode() & 0o777,
        0o600,
        "the account key is the owner's only"
    );
    let mut live = Client::connect(https, &root).await.unwrap();
    assert_eq!(live.get().await, 200);
    let first = live.serial.clone();

    // The renewal's validation fails (the name now resolves where nothing answers): the old
    // certificate keeps serving, the failure is counted and its reason shown.
    pebble.set_a(HOST, "127.0.0.2");
    // (The live connection is used all along: an idle one is closed after the header read
    // timeout.)
    wait_until("the renewal fails", Duration::from_secs(30), async || {
        assert_eq!(live.get().await, 200);
        errors(&gw) >= 1
    })
    .await;
    assert_eq!(served_serial(https, &root).await.unwrap(), first);
    assert_eq!(
        curl_https(https, &root).0,
        200,
        "the old certificate serves"
    );
    let (_, view) = admin_get(&gw, "/gateway").await;
    let v: serde_json::Value = serde_json::from_str(&view).unwrap();
    let why = v["acme"][HOST]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        why.contains("validation failed") || why.contains("127.0.0.2"),
        "{view}"
    );

    // Validation works again: the next attempt (after the back-off) renews, the new
    // certificate serves new connections, and the connection made before still works.
    pebble.clear_a(HOST);
    wait_until(
        "a renewed certificate is served",
        Duration::from_secs(30),
        async || {
            assert_eq!(live.get().await, 200);
            served_serial(https, &root)
                .await
                .is_some_and(|s| s != first)
        },
    )
    .await;
    assert_eq!(
        live.get().await,
        200,
        "the old connection survived the swap"
    );
    assert_eq!(live.serial, first);
    let (_, view) = admin_get(&gw, "/gateway").await;
    let v: serde_json::Value = serde_json::from_str(&view).unwrap();
    assert!(v["acme"][HOST]["last_error"].is_null(), "{view}");
    assert_eq!(v["acme"][HOST]["failures"], 0);
    drop((gw, ca));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn01_issues_and_a_restart_serves_the_kept_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, agent, _shop) = shop_mesh(dir.path()).await;
    let (https, http) = (free_port(), free_port());
    let pebble = Pebble::start(dir.path(), http, https, Duration::from_secs(3600));
    let state = dir.path().join("acme");
    let cfg = gateway_cfg(
        &agent.socket_path,
        &state,
        &pebble,
        https,
        http,
        "tls-alpn-01",
    );
    let gw = ward_proxy::Proxy::start(cfg.clone()).await.unwrap();
    let root = pebble.issuing_root();
    wait_until(
        "curl accepts the ACME certificate",
        Duration::from_secs(30),
        async || curl_https(https, &root).0 == 200,
    )
    .await;
    let first = served_serial(https, &root).await.unwrap();
    gw.shutdown().await;

    // A restart serves the kept certificate at once, and orders nothing new.
    let gw = ward_proxy::Proxy::start(cfg).await.unwrap();
    let (status, _) = curl_https(https, &root);
    assert_eq!(status, 200);
    assert_eq!(served_serial(https, &root).await.unwrap(), first);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(served_serial(https, &root).await.unwrap(), first);
    assert_eq!(errors(&gw), 0);
    drop((gw, ca, agent));
}
