//! The rotation proof: continuous HTTP load through two Ward proxies that take their SVIDs and
//! bundles from a real agent, while the CA goes through prepare → (CA restart) → activate →
//! taint → revoke of its X.509 authority. Not one request may fail. After the revocation no
//! fresh handshake (proxy or CA) presents a chain to the old key, and the old SVIDs are
//! refused by the proxy and by the CA.
//!
//! Knobs for the longer recorded run (BENCHMARKS.md): `WARD_ROTATION_RATE` (requests/s,
//! default 300) and `WARD_ROTATION_STEP_MS` (pause between steps, default 1000).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ward_ca::CaServer;
use ward_ca::entries::EntrySpec;
use ward_net::verify::TrustStore;
use ward_net::{PeerPolicy, Svid};
use ward_proto::admin::{self, admin_client::AdminClient};
use ward_proxy::config::{
    Authorization, IdentitySource, Inbound, Listener, Outbound, Protocol, ProxyConfig, TlsMode,
};
use ward_spiffe::policy::DefaultPolicy;
use ward_spiffe::{Bundle, SpiffeId};

const TD: &str = "rot.test";

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn proxy_cfg(socket: &std::path::Path, id: &str) -> ProxyConfig {
    ProxyConfig {
        identity: IdentitySource::WorkloadApi {
            socket: Some(format!("unix://{}", socket.display())),
            spiffe_id: Some(SpiffeId::new(id).unwrap()),
        },
        admin_address: "127.0.0.1:0".parse().unwrap(),
        authorization: Authorization {
            default: DefaultPolicy::SameTrustDomain,
            ..Default::default()
        },
        peer_id_header: "x-ward-peer-id".into(),
        access_log: None,
        log_level: "info".into(),
        listeners: vec![],
        drain_timeout: std::time::Duration::from_secs(1),
        discovery: None,
        egress: None,
        http_limits: Default::default(),
        gateway: None,
        connection_limits: Default::default(),
        mesh_tls12: false,
    }
}

/// Counts of the load loop.
#[derive(Default)]
struct Load {
    ok: AtomicU64,
    failed: AtomicU64,
    connections: AtomicU64,
    failures: std::sync::Mutex<Vec<String>>,
    stop: AtomicBool,
}

impl Load {
    fn fail(&self, why: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut f = self.failures.lock().unwrap();
        if f.len() < 20 {
            f.push(why);
        }
    }
}

/// One load task: `rate` requests/s through the outbound listener at `addr`, a new client
/// connection every 50 requests, until `stop` (or a hard cap of 10 minutes).
async fn load_task(addr: SocketAddr, rate: u64, load: Arc<Load>) {
    let period = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut next = tokio::time::Instant::now();
    'outer: while !load.stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let tcp = match tokio::net::TcpStream::connect(addr).await {
            Ok(t) => t,
            Err(e) => {
                load.fail(format!("connect: {e}"));
                tokio::time::sleep(period).await;
                continue;
            }
        };
        load.connections.fetch_add(1, Ordering::Relaxed);
        let (mut s, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await {
            Ok(x) => x,
            Err(e) => {
                load.fail(format!("handshake: {e}"));
                continue;
            }
        };
        tokio::spawn(conn);
        for _ in 0..50 {
            if load.stop.load(Ordering::Relaxed) {
                break 'outer;
            }
            next += period;
            tokio::time::sleep_until(next).await;
            let req = hyper::Request::get("/api/data")
                .header("host", "backend")
                .body(Full::new(Bytes::new()))
                .unwrap();
            match s.send_request(req).await {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let body = r.into_body().collect().await.map(|b| b.to_bytes());
                    match body {
                        Ok(b) if status == 200 && b == format!("spiffe://{TD}/frontend") => {
                            load.ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(b) => {
                            load.fail(format!("{status}: {}", String::from_utf8_lossy(&b)));
                        }
                        Err(e) => load.fail(format!("body: {e}")),
                    }
                }
                Err(e) => {
                    load.fail(format!("request: {e}"));
                    continue 'outer;
                }
            }
        }
    }
}

async fn change(
    adm: &mut AdminClient<tonic::transport::Channel>,
    action: &str,
    id: &str,
) -> admin::Authority {
    adm.change_authority(admin::ChangeAuthorityRequest {
        kind: "x509".into(),
        action: action.into(),
        id: id.into(),
        force: false,
    })
    .await
    .unwrap_or_else(|e| panic!("{action} {id}: {e:?}"))
    .into_inner()
}

/// Waits (up to 30 s) until `f` holds; returns the time since `t0`.
async fn until(what: &str, t0: Instant, f: impl Fn() -> bool) -> Duration {
    while !f() {
        assert!(t0.elapsed() < Duration::from_secs(30), "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    t0.elapsed()
}

fn roots(p: &ward_proxy::Proxy) -> Vec<Vec<u8>> {
    p.sink
        .trust()
        .snapshot()
        .get(&ward_spiffe::TrustDomain::new(TD).unwrap())
        .map(|b| b.x509_authorities.clone())
        .unwrap_or_default()
}

fn leaf(p: &ward_proxy::Proxy) -> Vec<u8> {
    p.sink.current().unwrap().svid.chain[0].to_vec()
}

/// A TLS client to `addr` presenting `svid` and trusting `bundle`; returns the server's leaf
/// after the handshake and whether the server then speaks (HTTP/2 settings) or hangs up.
async fn handshake(
    addr: SocketAddr,
    svid: &Svid,
    bundle: Bundle,
) -> Result<(Vec<u8>, bool), String> {
    let trust = Arc::new(TrustStore::new());
    trust.set(bundle);
    let cfg = ward_net::credentials::build_client_config(
        trust,
        PeerPolicy::AnyTrusted,
        Some(svid),
        vec![b"h2".to_vec()],
        false,
    )
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let sni = rustls_pki_types::ServerName::try_from("ward").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(sni, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let server_leaf = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    // TLS 1.3: a refused client certificate shows as an alert on the first read.
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .ok();
    let mut buf = [0u8; 64];
    let spoke = matches!(
        tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await,
        Ok(Ok(n)) if n > 0
    );
    Ok((server_leaf, spoke))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_load_fails_no_request() {
    let rate = env_num("WARD_ROTATION_RATE", 300);
    let step = Duration::from_millis(env_num("WARD_ROTATION_STEP_MS", 1000));
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::ca_config(&dir.path().join("ca"), TD);
    let mut ca: CaServer = common::start_ca(cfg.clone(), Arc::new(ward_spiffe::SystemClock)).await;
    // The restarted CA must come back on the same address.
    cfg.bind_address = ca.node_addr;
    let agent = common::start_agent(common::agent_config(&ca, dir.path()).await).await;
    let parent = agent.identity.id().unwrap().to_string();
    for name in ["frontend", "backend"] {
        ca.core
            .entries
            .create(
                &EntrySpec {
                    spiffe_id: format!("spiffe://{TD}/{name}"),
                    parent_id: parent.clone(),
                    selectors: vec![common::my_uid_selector()],
                    ..Default::default()
                },
                "admin",
                ward_ca::core::CaCore::new_entry_id(),
                ca.core.clock.now(),
            )
            .await
            .unwrap();
    }
    let app = common::peer_id_app().await;
    let mut bcfg = proxy_cfg(&agent.socket_path, &format!("spiffe://{TD}/backend"));
    bcfg.listeners = vec![Listener::Inbound(Inbound {
        name: "public".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        forward_to: app.to_string(),
        protocol: Protocol::Http,
        tls: TlsMode::Strict,
        app_protocol: Default::default(),
    })];
    let backend = ward_proxy::Proxy::start(bcfg).await.unwrap();
    let inbound = backend.inbound_addr("public").unwrap();
    let mut fcfg = proxy_cfg(&agent.socket_path, &format!("spiffe://{TD}/frontend"));
    fcfg.listeners = vec![Listener::Outbound(Outbound {
        name: "backend".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        upstream: inbound.to_string(),
        expected_ids: vec![SpiffeId::new(&format!("spiffe://{TD}/backend")).unwrap()],
        protocol: Protocol::Http,
    })];
    let frontend = ward_proxy::Proxy::start(fcfg).await.unwrap();
    let out = frontend.outbound_addr("backend").unwrap();
    until("proxies hold SVIDs", Instant::now(), || {
        backend.sink.current().is_some() && frontend.sink.current().is_some()
    })
    .await;

    let mut adm = AdminClient::new(ward_net::process::unix_channel(&ca.admin_socket));
    let set = ca.core.authorities.current();
    let a = set.x509.id.clone();
    let a_key = set.x509.public_key_der();
    let old_bundle = (*set.bundle).clone();
    let signed_by_a = |der: &[u8]| ward_spiffe::x509::signed_by(der, &a_key);
    assert!(signed_by_a(&leaf(&frontend)) && signed_by_a(&leaf(&backend)));

    // Load: two tasks.
    let started = Instant::now();
    let load = Arc::new(Load::default());
    let tasks: Vec<_> = (0..2)
        .map(|_| tokio::spawn(load_task(out, rate / 2, load.clone())))
        .collect();
    tokio::time::sleep(step).await;
    assert!(load.ok.load(Ordering::Relaxed) > 0, "load does not flow");

    // prepare: every subscriber holds the new root.
    let t0 = Instant::now();
    let b = change(&mut adm, "prepare", "").await;
    let t_prepare = until("proxies trust the prepared root", t0, || {
        roots(&frontend).len() == 2 && roots(&backend).len() == 2
    })
    .await;
    tokio::time::sleep(step).await;

    // CA restart in the middle of the rotation: the prepared authority is still prepared.
    ca.shutdown().await;
    ca = common::start_ca(cfg.clone(), Arc::new(ward_spiffe::SystemClock)).await;
    adm = AdminClient::new(ward_net::process::unix_channel(&ca.admin_socket));
    let states: Vec<(String, String)> = adm
        .list_authorities(admin::ListAuthoritiesRequest {
            kind: "x509".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .authorities
        .into_iter()
        .map(|x| (x.id, x.state))
        .collect();
    assert!(states.contains(&(a.clone(), "active".into())), "{states:?}");
    assert!(
        states.contains(&(b.id.clone(), "prepared".into())),
        "{states:?}"
    );
    tokio::time::sleep(step).await;

    // activate: B signs.
    change(&mut adm, "activate", &b.id).await;
    tokio::time::sleep(step).await;

    // taint: every SVID A signed is replaced at once, the agent's own included.
    let old_frontend = frontend.sink.current().unwrap().svid.clone();
    let old_agent = agent.identity.svid().unwrap();
    assert!(signed_by_a(&old_agent.chain[0]));
    let t0 = Instant::now();
    change(&mut adm, "taint", &a).await;
    let t_taint = until("every SVID re-issued by the new authority", t0, || {
        !signed_by_a(&leaf(&frontend))
            && !signed_by_a(&leaf(&backend))
            && agent
                .identity
                .svid()
                .is_some_and(|s| !signed_by_a(&s.chain[0]))
    })
    .await;
    tokio::time::sleep(step).await;

    // revoke: allowed without --force (nothing live chains to A any more); A leaves every
    // bundle.
    let t0 = Instant::now();
    change(&mut adm, "revoke", &a).await;
    let t_revoke = until("proxies dropped the revoked root", t0, || {
        roots(&frontend).len() == 1 && roots(&backend).len() == 1
    })
    .await;
    tokio::time::sleep(step).await;

    load.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed();
    let ok = load.ok.load(Ordering::Relaxed);
    let failed = load.failed.load(Ordering::Relaxed);
    println!(
        "rotation under load: {ok} requests ok, {failed} failed, {} client connections, {:.0} req/s \
         over {:.1}s; prepare→all proxies trust the new root {:.1}ms; taint→all SVIDs re-issued \
         {:.1}ms; revoke→all proxies dropped the root {:.1}ms",
        load.connections.load(Ordering::Relaxed),
        ok as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64(),
        t_prepare.as_secs_f64() * 1e3,
        t_taint.as_secs_f64() * 1e3,
        t_revoke.as_secs_f64() * 1e3,
    );
    assert_eq!(
        failed,
        0,
        "failed requests: {:?}",
        load.failures.lock().unwrap()
    );
    assert!(ok > rate, "too little load went through: {ok}");

    // After the revocation: a fresh handshake with the backend proxy presents a chain to the
    // new root only...
    let new_bundle = (*ca.core.bundle()).clone();
    assert_eq!(new_bundle.x509_authorities.len(), 1);
    let now_frontend = frontend.sink.current().unwrap().svid.clone();
    let (server_leaf, spoke) = handshake(inbound, &now_frontend, new_bundle.clone())
        .await
        .expect("handshake with the current SVID and bundle");
    assert!(spoke, "the backend proxy must accept the current SVID");
    assert!(!signed_by_a(&server_leaf));
    // ...and refuses the old frontend SVID (its root is gone) even to a client that still
    // trusts the old root.
    let mut both = old_bundle.clone();
    both.x509_authorities
        .extend(new_bundle.x509_authorities.clone());
    if let Ok((_, spoke)) = handshake(inbound, &old_frontend, both).await {
        assert!(!spoke, "the backend proxy accepted a revoked SVID");
    }
    // The CA: fresh handshakes present the new chain (the client trusts only the new root) and
    // the old agent SVID is refused.
    let fresh = common::attest_agent(&ca).await;
    assert!(!signed_by_a(&fresh.chain[0]));
    let mut s = common::node_client(&ca, Some(fresh))
        .sync(ward_proto::node::SyncRequest { since_revision: 0 })
        .await
        .expect("the CA presents a chain to the new root")
        .into_inner();
    assert!(s.message().await.unwrap().is_some());
    common::node_client(&ca, Some(old_agent))
        .sync(ward_proto::node::SyncRequest { since_revision: 0 })
        .await
        .expect_err("an agent SVID from the revoked authority must be refused");

    drop(frontend);
    drop(backend);
    ca.shutdown().await;
}
