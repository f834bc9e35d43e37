//! The ingress gateway end to end: a real CA and agent, two mesh services behind real proxies,
//! and a gateway proxy with HTTPS certificates, host and path routes, HSTS, a redirecting HTTP
//! listener and limits — driven by curl, a client that is not ours.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use common::mesh::{TD, app, backend, cfg, mesh};
use common::web::web_pki;
use ward_ca::services::ServiceOp;
use ward_proxy::config::{AccessLog, Authorization, DiscoveryCfg, Listener, Outbound, Protocol};
use ward_proxy::gateway::config::{GatewayCfg, GatewayListener, GatewayProtocol};
use ward_spiffe::SpiffeId;
use ward_spiffe::service::Service;

fn svc(name: &str, endpoint: std::net::SocketAddr, id: &str) -> Service {
    serde_json::from_value(serde_json::json!({
        "name": name, "ports": [ { "name": "http", "port": 80 } ],
        "endpoints": [ {
            "address": endpoint.ip().to_string(), "ports": { "http": endpoint.port() },
            "ids": [format!("spiffe://{TD}/{id}")],
        } ],
    }))
    .unwrap()
}

/// Runs the Python client `tests/py/<script>` (with `WARD_PYTHON`, which has grpcio and h2)
/// and returns the JSON object it prints; fails the test if it fails.
fn py(script: &str, args: &[&str]) -> serde_json::Value {
    let python = std::env::var("WARD_PYTHON").unwrap_or_else(|_| "python3".into());
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/py")
        .join(script);
    let out = Command::new(python).arg(&path).args(args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{script} {args:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{script}: {e}: {text}"))
}

/// What curl got: status, headers (lowercase names), body.
#[derive(Debug)]
struct Curl {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Curl {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Runs curl with `args`, printing the response headers and the body.
fn curl(args: &[&str]) -> Curl {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-D", "-"])
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Curl {
        status,
        headers,
        body: body.to_owned() + &String::from_utf8_lossy(&out.stderr),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_routes_by_host_and_path_to_mesh_services_as_its_own_identity() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, agent) = mesh(dir.path(), &["gateway", "shop", "api", "client", "grpc"]).await;
    let sock = agent.socket_path.clone();
    let hits = || Arc::new(AtomicUsize::new(0));

    // The storefront's proxy allows the gateway only; the API's any mesh workload.
    let policy = dir.path().join("shop-policies.yaml");
    std::fs::write(
        &policy,
        format!(
            r#"
policies:
  - name: only-the-gateway
    target: {{ spiffe_ids: ["spiffe://{TD}/shop"] }}
    action: ALLOW
    rules: [ {{ from: [ {{ principals: ["spiffe://{TD}/gateway"] }} ] }} ]
"#
        ),
    )
    .unwrap();
    let shop_app = app("shop", Duration::ZERO, hits()).await;
    let shop = {
        let mut c = cfg(&sock, "shop");
        c.authorization = Authorization {
            default: ward_spiffe::policy::DefaultPolicy::Deny,
            policy_files: vec![policy],
            ..Default::default()
        };
        c.listeners = vec![Listener::Inbound(ward_proxy::config::Inbound {
            name: "in".into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            forward_to: shop_app.to_string(),
            protocol: Protocol::Http,
            tls: ward_proxy::config::TlsMode::Strict,
            app_protocol: Default::default(),
        })];
        let p = ward_proxy::Proxy::start(c).await.unwrap();
        while p.sink.current().is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        p
    };
    let api = backend(&sock, "api", app("api", Duration::ZERO, hits()).await).await;
    let grpc_app = ward_testing::grpc::start_grpc_app(Default::default()).await;
    let grpc = backend(&sock, "grpc", grpc_app).await;
    ca.core
        .services
        .write(
            vec![
                ServiceOp::Put(svc("shop.web", shop.inbound_addr("in").unwrap(), "shop")),
                ServiceOp::Put(svc("api.web", api.inbound_addr("in").unwrap(), "api")),
                ServiceOp::Put(svc("grpc.web", grpc.inbound_addr("in").unwrap(), "grpc")),
            ],
            "admin",
        )
        .await
        .unwrap();

    let (cert, key, root) = web_pki(dir.path(), &["shop.example.com", "*.example.com"]);
    let log = dir.path().join("gateway.log");
    let mut g = cfg(&sock, "gateway");
    g.discovery = Some(DiscoveryCfg::default());
    g.http_limits.max_header_bytes = 32 * 1024;
    g.access_log = Some(AccessLog {
        max_bytes: 1 << 30,
        queue: 4096,
        ..AccessLog::at(log.clone())
    });
    g.listeners = vec![
        Listener::Gateway(GatewayListener {
            name: "https".into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            protocol: GatewayProtocol::Https,
            redirect_to_https: None,
            proxy_protocol_from: vec![],
            port: None,
        }),
        Listener::Gateway(GatewayListener {
            name: "http".into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            protocol: GatewayProtocol::Http,
            redirect_to_https: Some(8443),
            proxy_protocol_from: vec![],
            port: None,
        }),
        // Behind a load balancer (127.0.0.5) that names the client in a PROXY v2 header.
        Listener::Gateway(GatewayListener {
            name: "lb".into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            protocol: GatewayProtocol::Https,
            redirect_to_https: None,
            proxy_protocol_from: vec!["127.0.0.5/32".parse().unwrap()],
            port: None,
        }),
    ];
    g.gateway = Some(
        serde_yaml_ng::from_str::<GatewayCfg>(&format!(
            r#"
certificates: [ {{ cert: {}, key: {} }} ]
hsts: {{ max_age: 1d, include_subdomains: true }}
rate_limit: {{ requests_per_second: 1, burst: 40 }}
max_request_body_bytes: 1024
routes:
  - name: shop
    hostnames: [shop.example.com]
    rules: [ {{ backends: [ {{ service: shop.web, port: 80 }} ] }} ]
  - name: grpc
    hostnames: [grpc.example.com]
    rules: [ {{ backends: [ {{ service: grpc.web, port: 80 }} ] }} ]
  - name: api
    hostnames: ["*.example.com"]
    rules:
      - matches: [ {{ path: {{ type: prefix, value: /v1 }} }} ]
        backends: [ {{ service: api.web, port: 80 }} ]
"#,
            cert.display(),
            key.display()
        ))
        .unwrap(),
    );
    g.validate().unwrap();
    let gw = ward_proxy::Proxy::start(g).await.unwrap();
    while gw.sink.current().is_none() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let port = |name: &str| {
        gw.listeners
            .iter()
            .find(|(n, ..)| n == name)
            .unwrap()
            .2
            .port()
    };
    let (https, http) = (port("https"), port("http"));
    let root_s = root.display().to_string();
    let resolve = |host: &str| format!("{host}:{https}:127.0.0.1");
    let url = |host: &str, path: &str| format!("https://{host}:{https}{path}");
    let get = |host: &str, path: &str, extra: &[&str]| {
        let r = resolve(host);
        let u = url(host, path);
        let mut a = vec!["--cacert", &root_s, "--resolve", &r];
        a.extend_from_slice(extra);
        a.push(&u);
        curl(&a)
    };
    let get = &get;

    // Host and path choose the service, over HTTP/2 and HTTP/1.1; the backend sees the
    // gateway's SPIFFE ID, the client's Host, and the forwarding headers the gateway set — not
    // the ones the client sent.
    let r = get(
        "shop.example.com",
        "/cart?x=1",
        &[
            "-H",
            "X-Forwarded-For: 6.6.6.6",
            "-H",
            "Forwarded: for=6.6.6.6",
        ],
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.starts_with("shop"), "{r:?}");
    assert_eq!(
        r.header("x-echo-x-ward-peer-id"),
        Some(format!("spiffe://{TD}/gateway").as_str())
    );
    assert_eq!(
        r.header("x-echo-host"),
        Some("shop.example.com:".to_owned() + &https.to_string()).as_deref()
    );
    assert_eq!(r.header("x-echo-x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(r.header("x-echo-x-forwarded-proto"), Some("https"));
    assert_eq!(r.header("x-echo-path"), Some("/cart?x=1"));
    assert_eq!(
        r.header("strict-transport-security"),
        Some("max-age=86400; includeSubDomains")
    );
    let r = get("api.example.com", "/v1/items", &["--http1.1"]);
    assert_eq!((r.status, r.body.starts_with("api")), (200, true), "{r:?}");
    // The wildcard certificate serves the API's host; curl checked it against the root.
    let r = get("api.example.com", "/v2", &[]);
    assert_eq!(r.status, 404, "no rule for the path: {r:?}");
    let r = get("evil.example.com", "/v1/x", &[]);
    assert_eq!(
        (r.status, r.body.starts_with("api")),
        (200, true),
        "*.example.com: {r:?}"
    );
    // A host no route serves: 404, and the name in the log.
    let other = format!("other.test:{https}:127.0.0.1");
    let r = curl(&[
        "-k",
        "--resolve",
        &other,
        &format!("https://other.test:{https}/"),
    ]);
    assert_eq!(r.status, 404, "{r:?}");

    // gRPC through the gateway with grpcio (gRPC's C core): routed by host to the gRPC service,
    // which sees the gateway's SPIFFE ID; a path no rule of the host matches is UNIMPLEMENTED.
    let grpc_call = |authority: &str| {
        py(
            "grpc_gateway.py",
            &[&format!("127.0.0.1:{https}"), authority, &root_s],
        )
    };
    let r = grpc_call("grpc.example.com");
    assert_eq!(r["code"], "OK", "{r}");
    let strings: Vec<&str> = r["strings"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(strings.contains(&"gw"), "{r}");
    assert!(
        strings
            .iter()
            .any(|s| s.ends_with(&format!("spiffe://{TD}/gateway"))),
        "{r}"
    );
    let r = grpc_call("nope.example.com");
    assert_eq!(r["code"], "UNIMPLEMENTED", "{r}");

    // Behind a load balancer: its PROXY v2 header names the client, which is what the backend
    // sees; a balancer connection without one is closed; other callers are served as they are.
    let lb_port = port("lb").to_string();
    let via_lb = |source: &str, client: &str| {
        py(
            "proxy_protocol.py",
            &[source, &lb_port, "shop.example.com", &root_s, client],
        )
    };
    let r = via_lb("127.0.0.5", "203.0.113.9");
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["headers"]["x-echo-x-forwarded-for"], "203.0.113.9", "{r}");
    assert_eq!(
        via_lb("127.0.0.5", "none")["status"],
        0,
        "no header from the balancer"
    );
    let r = via_lb("127.0.0.6", "none");
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["headers"]["x-echo-x-forwarded-for"], "127.0.0.6", "{r}");

    // The storefront refuses every mesh caller but the gateway.
    let mut oc = cfg(&sock, "client");
    oc.discovery = Some(DiscoveryCfg::default());
    oc.listeners = vec![Listener::Outbound(Outbound {
        name: "shop".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        upstream: "shop.web:80".into(),
        expected_ids: vec![SpiffeId::new(&format!("spiffe://{TD}/shop")).unwrap()],
        protocol: Protocol::Http,
    })];
    let client = ward_proxy::Proxy::start(oc).await.unwrap();
    while client.sink.current().is_none() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let direct = format!("http://{}/cart", client.outbound_addr("shop").unwrap());
    let r = curl(&[&direct]);
    assert_eq!(
        r.status, 403,
        "a mesh client that is not the gateway: {r:?}"
    );

    // The HTTP listener only redirects, keeping path and query; a POST keeps its method.
    let plain = format!("http://127.0.0.1:{http}/cart?x=1");
    let r = curl(&["-H", "Host: shop.example.com", &plain]);
    assert_eq!(r.status, 301, "{r:?}");
    assert_eq!(
        r.header("location"),
        Some("https://shop.example.com:8443/cart?x=1")
    );
    let r = curl(&["-X", "POST", "-H", "Host: shop.example.com", &plain]);
    assert_eq!(r.status, 308, "{r:?}");

    // Limits: headers over the limit (431) on either protocol; a body over 1 KiB (413).
    // Six fields of 7 KiB, over the 32 KiB limit (curl's nghttp2 sends no header block over
    // 64 KiB).
    let big: Vec<String> = (0..6)
        .map(|i| format!("x-big-{i}: {}", "a".repeat(7 * 1024)))
        .collect();
    for proto in ["--http1.1", "--http2"] {
        let mut a = vec![proto];
        for h in &big {
            a.extend(["-H", h.as_str()]);
        }
        let r = get("shop.example.com", "/", &a);
        assert_eq!(
            r.status,
            431,
            "{proto}: {:?}",
            (&r.headers, &r.body[r.body.len().saturating_sub(300)..])
        );
    }
    let body = "b".repeat(2048);
    // (Over HTTP/1.1: curl's HTTP/2 sometimes reports the early answer's RST_STREAM NO_ERROR,
    // which cuts off the rest of its body, as a framing error.)
    let r = get(
        "shop.example.com",
        "/",
        &["--http1.1", "--data-binary", &body],
    );
    assert_eq!(r.status, 413, "{r:?}");
    // The same body sent chunked (no Content-Length to refuse up front): cut off as it
    // streams, still a 413.
    let r = get(
        "shop.example.com",
        "/",
        &[
            "--http1.1",
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            &body,
        ],
    );
    assert_eq!(r.status, 413, "chunked: {r:?}");

    // A client over its rate gets 429 with Retry-After; another client is not affected.
    let urls: Vec<String> = (0..60).map(|_| url("shop.example.com", "/")).collect();
    let r9 = resolve("shop.example.com");
    let mut a = vec![
        "-sS",
        "--cacert",
        &root_s,
        "--resolve",
        &r9,
        "--interface",
        "127.0.0.9",
        "-w",
        "%{http_code}\n",
    ];
    for u in &urls {
        a.extend(["-o", "/dev/null", u.as_str()]);
    }
    let out = Command::new("curl").args(&a).output().unwrap();
    let codes = String::from_utf8_lossy(&out.stdout);
    let ok = codes.lines().filter(|c| *c == "200").count();
    let limited = codes.lines().filter(|c| *c == "429").count();
    assert!(
        (40..=44).contains(&ok) && ok + limited == 60,
        "burst 40 at 1/s: {ok} ok, {limited} limited: {codes}"
    );
    let r = get("shop.example.com", "/", &["--interface", "127.0.0.9"]);
    assert_eq!(r.status, 429);
    assert!(r.header("retry-after").is_some(), "{r:?}");
    assert_eq!(get("shop.example.com", "/", &[]).status, 200);

    // Every request is in the hash-chained log: client, host, route, backend identity, status.
    // The writer is asynchronous: wait (bounded) for the burst's refusals and the one after it,
    // the last records checked below.
    let mut lines: Vec<serde_json::Value> = Vec::new();
    for _ in 0..200 {
        let text = std::fs::read_to_string(&log).unwrap();
        lines = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let refused = lines
            .iter()
            .filter_map(|l| l.get("access"))
            .filter(|a| a["status"] == 429)
            .count();
        if refused > limited {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cart = lines
        .iter()
        .filter_map(|l| l.get("access"))
        .find(|a| a["path"] == "/cart" && a["status"] == 200)
        .expect("the request to /cart is logged");
    assert_eq!(
        cart["client"].as_str().unwrap().split(':').next(),
        Some("127.0.0.1")
    );
    assert_eq!(cart["host"], format!("shop.example.com:{https}"));
    assert_eq!(cart["route"], "shop#0");
    assert_eq!(cart["dst"], format!("spiffe://{TD}/shop"));
    assert!(cart["src"].is_null(), "a client outside the mesh has no ID");
    let refused: Vec<_> = lines
        .iter()
        .filter_map(|l| l.get("access"))
        .filter(|a| a["status"] == 429)
        .collect();
    assert!(!refused.is_empty());
    assert_eq!(refused[0]["policy"], "gateway:rate_limit");
    let st = Command::new(common::proxy_bin())
        .args(["log", "verify"])
        .arg(&log)
        .status()
        .unwrap();
    assert!(st.success(), "the chain verifies");

    // New certificate files (a renewed Secret) serve the next handshake; a broken pair is
    // refused and the certificate in force keeps serving.
    std::fs::write(&cert, "not a certificate").unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(get("shop.example.com", "/", &[]).status, 200);
    let errors = || {
        gw.metrics
            .gateway_cert_errors
            .get_or_create(&ward_proxy::metrics::CertLabel {
                name: cert.display().to_string(),
            })
            .get()
    };
    assert_eq!(errors(), 1);
    let renewed = dir.path().join("renewed");
    std::fs::create_dir(&renewed).unwrap();
    let (c2, k2, root2) = web_pki(&renewed, &["shop.example.com"]);
    std::fs::copy(&k2, &key).unwrap();
    std::fs::copy(&c2, &cert).unwrap();
    let root2 = root2.display().to_string();
    let mut served_new = false;
    for _ in 0..40 {
        let r = get("shop.example.com", "/", &["--cacert", &root2]);
        if r.status == 200 {
            served_new = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(served_new, "the renewed certificate is served");

    // HTTP/2 abuse from outside: a burst of streams reset as soon as opened (CVE-2023-44487)
    // and a header block that never ends (CONTINUATION flood) each end their connection with
    // GOAWAY; the gateway goes on serving (from another address: this one spent its rate).
    let https_s = https.to_string();
    let abuse = |attack: &str, source: &str| {
        py(
            "h2_abuse.py",
            &[
                "127.0.0.1",
                &https_s,
                "shop.example.com",
                &root2,
                attack,
                source,
            ],
        )
    };
    let r = abuse("rapid-reset", "127.0.0.20");
    assert_eq!(r["goaway"], 11, "ENHANCE_YOUR_CALM: {r}");
    let r = abuse("continuation", "127.0.0.21");
    assert!(
        r["goaway"].as_u64().is_some_and(|c| c != 0) || r["closed"] == true,
        "the flood ends the connection: {r}"
    );
    assert!(
        r["sent"].as_u64().unwrap() < 20000 * 80,
        "cut off before the whole flood was taken: {r}"
    );
    let r = abuse("normal", "127.0.0.22");
    assert_eq!(r["status"], "200", "{r}");

    drop((ca, agent));
}

/// A kubernetes.io/tls Secret in namespace shop holding `cert` and `key` (PEM files).
fn tls_secret(name: &str, cert: &std::path::Path, key: &std::path::Path) -> serde_json::Value {
    use base64::Engine as _;
    let b64 = |p: &std::path::Path| {
        base64::engine::general_purpose::STANDARD.encode(std::fs::read(p).unwrap())
    };
    serde_json::json!({ "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": { "name": name, "namespace": "shop" },
        "data": { "tls.crt": b64(cert), "tls.key": b64(key) } })
}

/// The Gateway API as the gateway's configuration: a GatewayClass, Gateway and HTTPRoute in
/// the (fake) cluster become the routes a real gateway proxy serves — the CA attaches the route
/// to the Gateway's listeners and sends the Gateway's record through the agent — and the TLS
/// Secret the Gateway's HTTPS listener names is the certificate it serves. Changes to the
/// route and the Secret reach the gateway without a restart; a broken Secret keeps the
/// certificate in force; a deleted route serves nothing, a deleted Gateway no certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubernetes_gateway_and_its_routes_configure_the_gateway() {
    use common::k8s::eventually;
    use serde_json::json;
    let dir = tempfile::tempdir().unwrap();
    let fake = ward_testing::kube::FakeKube::start().await;
    let (cert1, key1, root1) = web_pki(&dir.path().join("pki1"), &["*.example.com"]);
    let (cert2, key2, root2) = web_pki(&dir.path().join("pki2"), &["*.example.com"]);
    fake.put_json(
        "gatewayclasses",
        json!({ "apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
                "metadata": { "name": "ward" }, "spec": { "controllerName": "ward.dev/gateway" } }),
    );
    fake.put_json(
        "gateways",
        json!({ "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                "metadata": { "name": "web", "namespace": "shop", "generation": 1 },
                "spec": { "gatewayClassName": "ward", "listeners": [
                    { "name": "https", "port": 443, "protocol": "HTTPS", "hostname": "*.example.com",
                      "tls": { "mode": "Terminate", "certificateRefs": [ { "kind": "Secret", "name": "web-tls" } ] } },
                    { "name": "http", "port": 80, "protocol": "HTTP" } ] } }),
    );
    fake.put_json("secrets", tls_secret("web-tls", &cert1, &key1));
    let route = |prefix: &str, generation: i64| {
        json!({ "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                "metadata": { "name": "store", "namespace": "shop", "generation": generation },
                "spec": { "parentRefs": [ { "name": "web" } ], "hostnames": ["store.example.com"],
                          "rules": [ { "matches": [ { "path": { "type": "PathPrefix", "value": prefix } } ],
                                       "backendRefs": [ { "name": "api", "port": 80 } ] } ] } })
    };
    fake.put_json("httproutes", route("/v1", 1));
    let kube_dir = dir.path().to_owned();
    let (ca, agent) = common::mesh::mesh_with(dir.path(), &["gateway", "api"], |c| {
        c.kubernetes.clusters = vec![common::k8s::cluster(&fake, &kube_dir)];
    })
    .await;
    let sock = agent.socket_path.clone();
    let api = backend(
        &sock,
        "api",
        app("api", Duration::ZERO, Arc::new(AtomicUsize::new(0))).await,
    )
    .await;
    // The route's backend `api` (namespace shop) is the mesh service api.shop.
    ca.core
        .services
        .write(
            vec![ServiceOp::Put(svc(
                "api.shop",
                api.inbound_addr("in").unwrap(),
                "api",
            ))],
            "admin",
        )
        .await
        .unwrap();

    let mut g = cfg(&sock, "gateway");
    g.discovery = Some(DiscoveryCfg::default());
    g.listeners = [
        ("https", GatewayProtocol::Https, 443),
        ("http", GatewayProtocol::Http, 80),
    ]
    .into_iter()
    .map(|(name, protocol, port)| {
        Listener::Gateway(GatewayListener {
            name: name.into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            protocol,
            redirect_to_https: None,
            proxy_protocol_from: vec![],
            port: Some(port),
        })
    })
    .collect();
    let kubeconfig = fake.write_kubeconfig(dir.path(), "gateway");
    g.gateway = Some(
        serde_yaml_ng::from_str::<GatewayCfg>(&format!(
            "kubernetes_gateway: shop/web\nkubernetes: {{ kubeconfig: {} }}\n",
            kubeconfig.display()
        ))
        .unwrap(),
    );
    g.validate().unwrap();
    let gw = ward_proxy::Proxy::start(g).await.unwrap();
    let port = |name: &str| {
        gw.listeners
            .iter()
            .find(|(n, ..)| n == name)
            .unwrap()
            .2
            .port()
    };
    let (https, http) = (port("https"), port("http"));
    let get = |root: &std::path::Path, host: &str, path: &str| {
        let r = format!("{host}:{https}:127.0.0.1");
        let u = format!("https://{host}:{https}{path}");
        let root = root.display().to_string();
        curl(&["--cacert", &root, "--resolve", &r, &u])
    };
    let status_eventually =
        |root: std::path::PathBuf, host: &'static str, path: &'static str, want: u16| {
            let get = &get;
            async move {
                eventually(&format!("{host}{path} answers {want}"), || {
                    let root = root.clone();
                    async move {
                        let r = get(&root, host, path);
                        if r.status == want {
                            Ok(())
                        } else {
                            Err(format!("{r:?}"))
                        }
                    }
                })
                .await;
            }
        };

    status_eventually(root1.clone(), "store.example.com", "/v1/items", 200).await;
    let r = get(&root1, "store.example.com", "/v1/items");
    assert!(r.body.starts_with("api"), "{r:?}");
    assert_eq!(
        r.header("x-echo-x-ward-peer-id"),
        Some(format!("spiffe://{TD}/gateway").as_str()),
        "the backend sees the gateway's own identity"
    );
    // The http listener (port 80 of the Gateway) has the route too.
    let r = curl(&[
        "-H",
        "Host: store.example.com",
        &format!("http://127.0.0.1:{http}/v1/items"),
    ]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(get(&root1, "other.example.com", "/v1/items").status, 404);
    assert_eq!(get(&root1, "store.example.com", "/elsewhere").status, 404);

    // The route changes in the cluster; the gateway follows without a restart.
    fake.put_json("httproutes", route("/v2", 2));
    status_eventually(root1.clone(), "store.example.com", "/v2/items", 200).await;
    assert_eq!(get(&root1, "store.example.com", "/v1/items").status, 404);

    // The Secret is renewed (another issuer): the next handshake gets the new certificate.
    assert_eq!(get(&root2, "store.example.com", "/v2/items").status, 0);
    fake.put_json("secrets", tls_secret("web-tls", &cert2, &key2));
    status_eventually(root2.clone(), "store.example.com", "/v2/items", 200).await;
    // A broken Secret leaves the certificate in force, and is counted.
    let errors = || {
        gw.metrics
            .gateway_cert_errors
            .get_or_create(&ward_proxy::metrics::CertLabel {
                name: "shop/web-tls".into(),
            })
            .get()
    };
    let mut broken = tls_secret("web-tls", &cert1, &key1);
    broken["data"]["tls.key"] = json!("bm90IGEga2V5");
    fake.put_json("secrets", broken);
    eventually("the broken Secret counted", || async {
        if errors() >= 1 {
            Ok(())
        } else {
            Err("not yet".into())
        }
    })
    .await;
    assert_eq!(get(&root2, "store.example.com", "/v2/items").status, 200);

    // The route deleted: nothing is routed; the Gateway deleted: no certificate is served.
    fake.delete("httproutes", Some("shop"), "store");
    status_eventually(root2.clone(), "store.example.com", "/v2/items", 404).await;
    fake.delete("gateways", Some("shop"), "web");
    status_eventually(root2.clone(), "store.example.com", "/v2/items", 0).await;
    drop(gw);
    ca.shutdown().await;
}
