//! A small mesh for end-to-end tests: a real CA and agent, apps on loopback behind real
//! inbound proxies, and a frontend proxy with discovery.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use ward_ca::entries::EntrySpec;
use ward_proxy::config::{
    Authorization, DiscoveryCfg, IdentitySource, Inbound, Listener, Outbound, Protocol,
    ProxyConfig, TlsMode,
};
use ward_spiffe::SpiffeId;
use ward_spiffe::policy::DefaultPolicy;

/// The trust domain of the mesh.
pub const TD: &str = "disc.test";

/// An app answering with its name, after `delay`, counting its requests.
pub async fn app(name: &'static str, delay: Duration, hits: Arc<AtomicUsize>) -> SocketAddr {
    app_with(name, delay, 200, hits).await
}

/// An app answering `status` with its name, after `delay`, counting its requests.
pub async fn app_with(
    name: &'static str,
    delay: Duration,
    status: u16,
    hits: Arc<AtomicUsize>,
) -> SocketAddr {
    app_by(name, delay, Arc::new(move |_| status), hits).await
}

/// The status of the n-th request (from 0).
pub type StatusOf = Arc<dyn Fn(usize) -> u16 + Send + Sync>;

/// An app answering with its name, after `delay`, with the status `status` gives its n-th
/// request, counting its requests.
pub async fn app_by(
    name: &'static str,
    delay: Duration,
    status: StatusOf,
    hits: Arc<AtomicUsize>,
) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                return;
            };
            let hits = hits.clone();
            let status = status.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let hits = hits.clone();
                        let status = status.clone();
                        async move {
                            let status = status(hits.fetch_add(1, Ordering::Relaxed));
                            tokio::time::sleep(delay).await;
                            let (parts, body) = req.into_parts();
                            let got = body.collect().await.map_or(0, |b| b.to_bytes().len());
                            let req = hyper::Request::from_parts(parts, ());
                            let mut r = hyper::Response::new(Full::new(Bytes::from(name)));
                            *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                            // What arrived, for routing tests: the target, the Host and x- headers.
                            let h = r.headers_mut();
                            let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
                            h.insert("x-echo-path", pq.parse().unwrap());
                            h.insert("x-echo-body-len", got.into());
                            let host = req.headers().get("host").cloned().or_else(|| {
                                req.uri().authority().map(|a| a.as_str().parse().unwrap())
                            });
                            if let Some(host) = host {
                                h.insert("x-echo-host", host);
                            }
                            for (k, v) in req.headers() {
                                if k.as_str().starts_with("x-") {
                                    let n = format!("x-echo-{}", k.as_str());
                                    h.append(
                                        hyper::header::HeaderName::from_bytes(n.as_bytes())
                                            .unwrap(),
                                        v.clone(),
                                    );
                                }
                            }
                            Ok::<_, std::convert::Infallible>(r)
                        }
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                .await;
            });
        }
    });
    addr
}

pub fn cfg(socket: &std::path::Path, id: &str) -> ProxyConfig {
    let mut c = ProxyConfig::new(IdentitySource::WorkloadApi {
        socket: Some(format!("unix://{}", socket.display())),
        spiffe_id: Some(SpiffeId::new(&format!("spiffe://{TD}/{id}")).unwrap()),
    });
    c.admin_address = "127.0.0.1:0".parse().unwrap();
    c.drain_timeout = Duration::from_secs(1);
    c.authorization = Authorization {
        default: DefaultPolicy::AllAuthenticated,
        ..Default::default()
    };
    c
}

pub async fn backend(socket: &std::path::Path, id: &str, app: SocketAddr) -> ward_proxy::Proxy {
    let mut c = cfg(socket, id);
    c.listeners = vec![Listener::Inbound(Inbound {
        name: "in".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        forward_to: app.to_string(),
        protocol: Protocol::Http,
        tls: TlsMode::Strict,
        app_protocol: Default::default(),
    })];
    let p = ward_proxy::Proxy::start(c).await.unwrap();
    for _ in 0..200 {
        if p.sink.current().is_some() {
            return p;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("backend {id} got no SVID");
}

/// A response as tests look at it.
#[derive(Debug)]
pub struct Got {
    /// Status (0: the request failed).
    pub status: u16,
    /// Headers.
    pub headers: hyper::HeaderMap,
    /// Body (or the error).
    pub body: String,
}

/// Sends `method path` with `headers` through the frontend at `out`, as `host`.
pub async fn send(
    client: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Full<Bytes>,
    >,
    out: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Got {
    send_body(client, out, method, path, headers, Bytes::new()).await
}

/// [`send`] with a body.
pub async fn send_body(
    client: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Full<Bytes>,
    >,
    out: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Got {
    let mut b = hyper::Request::builder()
        .method(method)
        .uri(format!("http://{out}{path}"))
        .header("host", "api.shop");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    match client.request(b.body(Full::new(body)).unwrap()).await {
        Ok(r) => {
            let status = r.status().as_u16();
            let headers = r.headers().clone();
            let b = r.into_body().collect().await.unwrap().to_bytes();
            Got {
                status,
                headers,
                body: String::from_utf8_lossy(&b).into_owned(),
            }
        }
        Err(e) => Got {
            status: 0,
            headers: Default::default(),
            body: e.to_string(),
        },
    }
}

pub async fn get(
    client: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Full<Bytes>,
    >,
    out: SocketAddr,
) -> (u16, String) {
    let req = hyper::Request::builder()
        .uri(format!("http://{out}/x"))
        .header("host", "api.shop")
        .body(Full::new(Bytes::new()))
        .unwrap();
    match client.request(req).await {
        Ok(r) => {
            let s = r.status().as_u16();
            let b = r.into_body().collect().await.unwrap().to_bytes();
            (s, String::from_utf8_lossy(&b).into_owned())
        }
        Err(e) => (0, e.to_string()),
    }
}

/// Sets up a CA, an agent and the entries of `names`; returns them and the agent socket.
pub async fn mesh(dir: &std::path::Path, names: &[&str]) -> (ward_ca::CaServer, ward_agent::Agent) {
    mesh_with(dir, names, |_| {}).await
}

/// [`mesh`] with the CA's configuration changed by `tweak` first.
pub async fn mesh_with(
    dir: &std::path::Path,
    names: &[&str],
    tweak: impl FnOnce(&mut ward_ca::CaConfig),
) -> (ward_ca::CaServer, ward_agent::Agent) {
    let mut cfg = super::ca_config(&dir.join("ca"), TD);
    tweak(&mut cfg);
    let ca = super::start_ca(cfg, Arc::new(ward_spiffe::SystemClock)).await;
    let agent = super::start_agent(super::agent_config(&ca, dir).await).await;
    let parent = agent.identity.id().unwrap().to_string();
    for name in names {
        ca.core
            .entries
            .create(
                &EntrySpec {
                    spiffe_id: format!("spiffe://{TD}/{name}"),
                    parent_id: parent.clone(),
                    selectors: vec![super::my_uid_selector()],
                    ..Default::default()
                },
                "admin",
                (*name).into(),
                ca.core.clock.now(),
            )
            .await
            .unwrap();
    }
    let mut rx = agent.cache.subscribe();
    let n = names.len();
    tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|s| s.svids.len() == n))
        .await
        .unwrap()
        .unwrap();
    (ca, agent)
}

/// The client's proxy: an outbound listener for `api.shop:80`, with discovery.
pub async fn frontend(sock: &std::path::Path, d: DiscoveryCfg) -> (ward_proxy::Proxy, SocketAddr) {
    frontend_logged(sock, d, None).await
}

/// [`frontend`], writing its access log to `log`.
pub async fn frontend_logged(
    sock: &std::path::Path,
    d: DiscoveryCfg,
    log: Option<&std::path::Path>,
) -> (ward_proxy::Proxy, SocketAddr) {
    let mut fc = cfg(sock, "client");
    fc.discovery = Some(d);
    fc.access_log = log.map(|path| ward_proxy::config::AccessLog {
        max_bytes: 1 << 30,
        queue: 4096,
        ..ward_proxy::config::AccessLog::at(path.to_owned())
    });
    fc.listeners = vec![Listener::Outbound(Outbound {
        name: "api".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        upstream: "api.shop:80".into(),
        expected_ids: vec![SpiffeId::new(&format!("spiffe://{TD}/api")).unwrap()],
        protocol: Protocol::Http,
    })];
    let p = ward_proxy::Proxy::start(fc).await.unwrap();
    let out = p.outbound_addr("api").unwrap();
    // Measurements start once it can send: before its SVID it answers 503 itself.
    for _ in 0..200 {
        if p.sink.current().is_some() {
            return (p, out);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the frontend got no SVID");
}

/// Retries the proxy made to `api.shop`.
pub fn retries(p: &ward_proxy::Proxy) -> u64 {
    retries_of(p, "api.shop")
}

/// Retries the proxy sent to `service`.
pub fn retries_of(p: &ward_proxy::Proxy, service: &str) -> u64 {
    p.metrics
        .retries
        .get_or_create(&ward_proxy::metrics::ServiceLabel {
            service: service.into(),
        })
        .get()
}

/// GET `path` on the proxy's admin endpoint: status and body.
pub async fn admin_get(p: &ward_proxy::Proxy, path: &str) -> (u16, String) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let r = client
        .get(format!("http://{}{path}", p.admin_addr).parse().unwrap())
        .await
        .unwrap();
    let s = r.status().as_u16();
    let b = r.into_body().collect().await.unwrap().to_bytes();
    (s, String::from_utf8_lossy(&b).into_owned())
}
