//! Shared harness for the proxy tests: a test application, a two-proxy mesh built from a test
//! PKI, and small HTTP clients.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

pub mod pods;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use ward_proxy::Proxy;
use ward_proxy::config::{
    AccessLog, Authorization, IdentitySource, Inbound, Listener, Outbound, Protocol, ProxyConfig,
    TlsMode,
};
use ward_spiffe::TrustDomain;
use ward_testing::Pki;

pub const TD: &str = "mesh.test";
pub const HEADER: &str = "x-ward-peer-id";

/// The test application: answers every request with a JSON description of what it received.
pub async fn start_app() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let peers: Vec<String> = req
                        .headers()
                        .get_all(HEADER)
                        .iter()
                        .map(|v| v.to_str().unwrap_or("").to_owned())
                        .collect();
                    let host = req
                        .headers()
                        .get("host")
                        .map(|h| h.to_str().unwrap_or("").to_owned());
                    let method = req.method().to_string();
                    let names: Vec<String> = req
                        .headers()
                        .keys()
                        .map(|k| k.as_str().to_owned())
                        .collect();
                    let path = req
                        .uri()
                        .path_and_query()
                        .map(|p| p.to_string())
                        .unwrap_or_default();
                    let version = format!("{:?}", req.version());
                    let body = req
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let out = serde_json::json!({
                        "method": method, "path": path, "peers": peers, "version": version,
                        "host": host, "body_len": body.len(), "names": names,
                    });
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(out.to_string()))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

/// An application that speaks only HTTP/1.1 (as most do) and reports the version it got.
pub async fn start_app_h1() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let out = serde_json::json!({ "version": format!("{:?}", req.version()), "path": req.uri().path() });
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(out.to_string()))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

/// A TCP echo server.
pub async fn start_echo() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

pub const POLICIES: &str = r#"
policies:
  - name: backend-allow-frontend
    target: { spiffe_ids: ["spiffe://mesh.test/backend"] }
    action: ALLOW
    rules:
      - from: [ { principals: ["spiffe://mesh.test/frontend"] } ]
        to: [ { methods: ["GET", "POST"], paths: ["/api/*", "/grpc.*"] } ]
  - name: backend-deny-admin
    target: { spiffe_ids: ["spiffe://mesh.test/backend"] }
    action: DENY
    rules:
      - to: [ { paths: ["/api/admin/*"] } ]
"#;

/// Identity files for one workload.
pub fn identity(pki: &Pki, dir: &Path, name: &str) -> IdentitySource {
    let issued = pki.svid(&format!("/{name}"));
    let (chain, key) = issued.write(dir, name);
    IdentitySource::Files {
        chain,
        key,
        bundle: pki.write_bundle(dir),
        trust_domain: TrustDomain::new(&pki.trust_domain).unwrap(),
    }
}

/// Two proxies: `frontend` (outbound `backend`) and `backend` (inbound `public` → app).
pub struct Mesh {
    pub dir: PathBuf,
    pub pki: Pki,
    pub app: SocketAddr,
    pub backend: Proxy,
    pub frontend: Proxy,
    pub policies: PathBuf,
}

impl Mesh {
    pub async fn start(dir: &Path) -> Mesh {
        Self::start_with(dir, Protocol::Http, |_| {}, |_| {}).await
    }

    pub async fn start_with(
        dir: &Path,
        protocol: Protocol,
        tune_backend: impl FnOnce(&mut ProxyConfig),
        tune_frontend: impl FnOnce(&mut ProxyConfig),
    ) -> Mesh {
        let pki = Pki::new(TD);
        let app = if protocol == Protocol::Tcp {
            start_echo().await
        } else {
            start_app().await
        };
        let policies = dir.join("policies.yaml");
        std::fs::write(&policies, POLICIES).unwrap();
        let mut bcfg = ProxyConfig {
            identity: identity(&pki, dir, "backend"),
            admin_address: "127.0.0.1:0".parse().unwrap(),
            listeners: vec![Listener::Inbound(Inbound {
                name: "public".into(),
                listen: "127.0.0.1:0".parse().unwrap(),
                forward_to: app.to_string(),
                protocol,
                tls: TlsMode::Strict,
                app_protocol: Default::default(),
            })],
            authorization: Authorization {
                policy_files: vec![policies.clone()],
                reload_interval: Duration::from_millis(100),
                ..Default::default()
            },
            peer_id_header: HEADER.into(),
            access_log: Some(AccessLog {
                max_bytes: 1 << 30,
                queue: 1024,
                ..AccessLog::at(dir.join("backend-access.jsonl"))
            }),
            log_level: "info".into(),
            drain_timeout: std::time::Duration::from_secs(1),
            discovery: None,
            egress: None,
            http_limits: Default::default(),
            gateway: None,
            connection_limits: Default::default(),
            mesh_tls12: false,
        };
        tune_backend(&mut bcfg);
        let backend = Proxy::start(bcfg).await.unwrap();
        let up = backend.inbound_addr("public").unwrap();
        let mut fcfg = ProxyConfig {
            identity: identity(&pki, dir, "frontend"),
            admin_address: "127.0.0.1:0".parse().unwrap(),
            listeners: vec![Listener::Outbound(Outbound {
                name: "backend".into(),
                listen: "127.0.0.1:0".parse().unwrap(),
                upstream: up.to_string(),
                expected_ids: vec![
                    ward_spiffe::SpiffeId::new("spiffe://mesh.test/backend").unwrap(),
                ],
                protocol,
            })],
            authorization: Authorization::default(),
            peer_id_header: HEADER.into(),
            access_log: Some(AccessLog {
                max_bytes: 1 << 30,
                queue: 1024,
                ..AccessLog::at(dir.join("frontend-access.jsonl"))
            }),
            log_level: "info".into(),
            drain_timeout: std::time::Duration::from_secs(1),
            discovery: None,
            egress: None,
            http_limits: Default::default(),
            gateway: None,
            connection_limits: Default::default(),
            mesh_tls12: false,
        };
        tune_frontend(&mut fcfg);
        let frontend = Proxy::start(fcfg).await.unwrap();
        wait_ready(&backend).await;
        wait_ready(&frontend).await;
        Mesh {
            dir: dir.to_owned(),
            pki,
            app,
            backend,
            frontend,
            policies,
        }
    }

    pub fn outbound(&self) -> SocketAddr {
        self.frontend.outbound_addr("backend").unwrap()
    }

    pub fn inbound(&self) -> SocketAddr {
        self.backend.inbound_addr("public").unwrap()
    }

    pub async fn stop(self) {
        self.frontend.shutdown().await;
        self.backend.shutdown().await;
    }
}

pub async fn wait_ready(p: &Proxy) {
    for _ in 0..200 {
        if p.sink.current().is_some() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("proxy never got an SVID");
}

/// A response: status, headers, body text.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|_| panic!("not JSON: {}", self.body))
    }
}

/// A request over HTTP/1.1 (or HTTP/2 with prior knowledge) to `addr`.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    h2: bool,
) -> Resp {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let io = TokioIo::new(tcp);
    let mut b = Request::builder()
        .method(method)
        .uri(format!("http://svc.local{path}"));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(Full::new(Bytes::new())).unwrap();
    let resp = if h2 {
        let (mut s, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .unwrap();
        tokio::spawn(conn);
        s.send_request(req).await.unwrap()
    } else {
        let (mut s, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        let mut req = req;
        req.headers_mut()
            .insert("host", "svc.local".parse().unwrap());
        s.send_request(req).await.unwrap()
    };
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Resp {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

pub async fn get(addr: SocketAddr, path: &str) -> Resp {
    request(addr, "GET", path, &[], false).await
}

/// Reads the access log lines written so far (waits briefly for the writer).
pub async fn log_lines(path: &Path, at_least: usize) -> Vec<serde_json::Value> {
    for _ in 0..100 {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        // Access records only (the log also holds other record types, such as anchors), and
        // only once all the expected ones are written: the writer is asynchronous.
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|l| l["type"] == "access")
            .collect();
        if lines.len() >= at_least {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "access log {} has fewer than {at_least} lines",
        path.display()
    );
}

/// `GET` the proxy's admin endpoint.
pub async fn admin(addr: SocketAddr, path: &str) -> String {
    get(addr, path).await.body
}

pub fn count_by(lines: &[serde_json::Value], field: &str) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for l in lines {
        if let Some(v) = l["access"][field].as_str() {
            *m.entry(v.to_owned()).or_default() += 1;
        }
    }
    m
}
