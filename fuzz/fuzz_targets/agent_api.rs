//! The agent's Workload API and Envoy SDS handlers on arbitrary request messages: the input
//! is decoded as the RPC's protobuf request (for StreamSecrets it is the gRPC-framed request
//! stream, through tonic's generated server) and given to the real handlers over a fixed
//! in-memory cache. The caller is this process (peer credentials of a socket pair); its
//! entries are `web` and `db`, while `admin` belongs to another uid. Time is tokio's paused
//! clock; the CA is a loopback port nothing listens on (a JWT-SVID request that gets that far
//! fails `Unavailable`).
//!
//! Checks: never a panic; every error is a tonic `Status` with a non-OK code (a stream's too,
//! and a gRPC response ends with a valid `grpc-status`); nothing sent ever holds the `admin`
//! entry's key or certificate (another workload's); the first stream message arrives within a
//! bound.
//!
//! The first byte chooses: bits 0–2 the RPC (FetchX509SVID, FetchX509Bundles, FetchJWTSVID,
//! FetchJWTBundles, ValidateJWTSVID, FetchSecrets, StreamSecrets, DeltaSecrets), bit 3 no
//! `workload.spiffe.io` header, bit 4 no peer credentials, bit 5 an agent not yet synced.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use tokio_stream::StreamExt as _;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Code, Request, Status};
use ward_agent::cache::{CachedEntry, Snapshot, WorkloadSvid};
use ward_agent::sds::SdsService;
use ward_agent::workload::WorkloadApi;
use ward_proto::envoy::service::discovery::v3::DiscoveryRequest;
use ward_proto::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use ward_proto::workload::{self as wl, spiffe_workload_api_server::SpiffeWorkloadApi};
use ward_spiffe::bundle::JwtAuthority;
use ward_spiffe::{Bundle, SelectorSet, SpiffeId, TrustDomain};

const TD: &str = "agent.test";
const BOUND: Duration = Duration::from_secs(60);
/// What only the `admin` entry's SVID holds.
const ADMIN_KEY: &[u8] = b"admin-key-not-yours";
const ADMIN_LEAF: &[u8] = b"admin-leaf-not-yours";

struct World {
    rt: tokio::runtime::Runtime,
    synced: WorkloadApi,
    unsynced: WorkloadApi,
    sds_synced: SdsService,
    sds_unsynced: SdsService,
    cred: tokio::net::unix::UCred,
    _keep: Keep,
}

/// What must live as long as the services.
#[allow(dead_code)]
struct Keep {
    dir: tempfile::TempDir,
    snaps: Vec<tokio::sync::watch::Sender<Arc<Snapshot>>>,
    stop: tokio::sync::watch::Sender<bool>,
    socket: std::os::unix::net::UnixStream,
}

fn entry(id: &str, selectors: &[String]) -> Arc<CachedEntry> {
    Arc::new(CachedEntry {
        id: id.into(),
        spiffe_id: SpiffeId::new(&format!("spiffe://{TD}/{id}")).unwrap(),
        selectors: SelectorSet::new(
            selectors
                .iter()
                .map(|s| ward_spiffe::Selector::parse(s).unwrap())
                .collect(),
        ),
        dns_names: vec![],
        hint: format!("{id}-hint"),
        revision: 1,
    })
}

fn svid(e: &CachedEntry, chain: &[u8], key: &[u8]) -> Arc<WorkloadSvid> {
    let now = SystemTime::now();
    Arc::new(WorkloadSvid {
        entry_id: e.id.clone(),
        entry_revision: e.revision,
        spiffe_id: e.spiffe_id.clone(),
        chain: vec![chain.to_vec()],
        key: Arc::new(zeroize::Zeroizing::new(key.to_vec())),
        not_before: now - Duration::from_secs(60),
        not_after: now + Duration::from_secs(3600),
        rotate_at: now + Duration::from_secs(1800),
    })
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        let (mine, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        theirs.set_nonblocking(true).unwrap();
        let (cred, uid, gid) = rt.block_on(async {
            let s = tokio::net::UnixStream::from_std(theirs).unwrap();
            let c = s.peer_cred().unwrap();
            (c, c.uid(), c.gid())
        });
        let pki = ward_testing::Pki::new(TD);
        let td = TrustDomain::new(TD).unwrap();
        let mut bundle = Bundle::new(td.clone());
        bundle.x509_authorities = vec![pki.root_der().to_vec()];
        bundle.jwt_authorities = vec![JwtAuthority {
            key_id: "k".into(),
            public_key: P256_SPKI.to_vec(),
        }];
        bundle.sequence = 1;
        let dir = tempfile::tempdir().unwrap();
        let data = ward_agent::files::DataDir::open(&dir.path().join("data")).unwrap();
        data.save_bundle(&bundle).unwrap();
        let agent = pki.svid("/ward/agent/join/node1");
        data.save_svid(&agent.chain_der, &agent.key_der).unwrap();
        // A loopback port nothing listens on: the CA is never reached.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let cfg = ward_agent::AgentConfig::new(
            td,
            closed.to_string(),
            dir.path().join("data"),
            dir.path().join("agent.sock"),
        );
        let clock: Arc<dyn ward_spiffe::Clock> = Arc::new(ward_spiffe::clock::SystemClock);
        let mut snap = Snapshot::default();
        let web = entry("web", &[format!("unix:uid:{uid}")]);
        let db = entry(
            "db",
            &[format!("unix:uid:{uid}"), format!("unix:gid:{gid}")],
        );
        let admin = entry("admin", &[format!("unix:uid:{}", uid.wrapping_add(4242))]);
        let web_leaf = pki.svid("/web");
        snap.svids.insert(
            "web".into(),
            svid(&web, &web_leaf.chain_der[0], &web_leaf.key_der),
        );
        snap.svids
            .insert("db".into(), svid(&db, b"db-leaf", b"db-key"));
        snap.svids
            .insert("admin".into(), svid(&admin, ADMIN_LEAF, ADMIN_KEY));
        for e in [web, db, admin] {
            snap.entries.insert(e.id.clone(), e);
        }
        snap.bundle = Some(Arc::new(bundle));
        snap.synced = true;
        snap.revision = 1;
        let (stop, stopping) = tokio::sync::watch::channel(false);
        let (synced, unsynced, snaps) = rt.block_on(async {
            let identity = Arc::new(
                ward_agent::identity::Identity::establish(&cfg, clock.clone())
                    .await
                    .unwrap(),
            );
            let mut snaps = Vec::new();
            let mut api = |s: Snapshot| {
                let (tx, rx) = tokio::sync::watch::channel(Arc::new(s));
                snaps.push(tx);
                WorkloadApi::new(
                    rx,
                    ward_agent::attest::UnixAttestor::new(&Default::default()),
                    identity.clone(),
                    clock.clone(),
                    ward_agent::metrics::Metrics::new(),
                    stopping.clone(),
                    None,
                )
            };
            (api(snap), api(Snapshot::default()), snaps)
        });
        World {
            rt,
            sds_synced: SdsService::new(synced.clone(), Default::default()),
            sds_unsynced: SdsService::new(unsynced.clone(), Default::default()),
            synced,
            unsynced,
            cred,
            _keep: Keep {
                dir,
                snaps,
                stop,
                socket: mine,
            },
        }
    })
}

/// `WARD_FUZZ_DEBUG=1`: print each answer (triage).
fn debug(what: &dyn std::fmt::Debug) {
    static D: OnceLock<bool> = OnceLock::new();
    if *D.get_or_init(|| std::env::var_os("WARD_FUZZ_DEBUG").is_some()) {
        eprintln!("answer: {what:?}");
    }
}

/// An error must say what went wrong: never `Ok`.
fn check_status(s: &Status) {
    debug(s);
    assert_ne!(s.code(), Code::Ok, "an error with code OK: {s:?}");
}

/// Nothing sent holds another workload's key or certificate.
fn check_sent(bytes: &[u8]) {
    for secret in [ADMIN_KEY, ADMIN_LEAF] {
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret),
            "another workload's SVID was sent"
        );
    }
}

/// A unary answer: its message, or a proper error.
fn unary<M: Message>(r: Result<tonic::Response<M>, Status>) {
    match r {
        Ok(m) => {
            let b = m.into_inner().encode_to_vec();
            debug(&String::from_utf8_lossy(&b));
            check_sent(&b);
        }
        Err(s) => check_status(&s),
    }
}

/// A server stream: the first message (they wait for changes after it), or a proper error.
async fn stream<M, S>(r: Result<tonic::Response<S>, Status>)
where
    M: Message,
    S: tokio_stream::Stream<Item = Result<M, Status>> + Unpin,
{
    let mut s = match r {
        Ok(s) => s.into_inner(),
        Err(s) => return check_status(&s),
    };
    match tokio::time::timeout(BOUND, s.next()).await {
        Ok(Some(Ok(m))) => {
            let b = m.encode_to_vec();
            debug(&String::from_utf8_lossy(&b));
            check_sent(&b);
        }
        Ok(Some(Err(st))) => check_status(&st),
        Ok(None) => {}
        Err(_) => panic!("no first stream message within {BOUND:?}"),
    }
}

fn request<T>(msg: T, header: bool, cred: Option<tokio::net::unix::UCred>) -> Request<T> {
    let mut r = Request::new(msg);
    if header {
        r.metadata_mut()
            .insert("workload.spiffe.io", "true".parse().unwrap());
    }
    r.extensions_mut().insert(UdsConnectInfo {
        peer_addr: None,
        peer_cred: cred,
    });
    r
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let w = world();
    let header = sel & 0x08 == 0;
    let cred = (sel & 0x10 == 0).then_some(w.cred);
    let (api, sds) = if sel & 0x20 == 0 {
        (&w.synced, &w.sds_synced)
    } else {
        (&w.unsynced, &w.sds_unsynced)
    };
    w.rt.block_on(async {
        tokio::time::timeout(BOUND, async {
            match sel & 7 {
                0 => {
                    let Ok(m) = wl::X509svidRequest::decode(rest) else {
                        return;
                    };
                    stream(api.fetch_x509svid(request(m, header, cred)).await).await;
                }
                1 => {
                    let Ok(m) = wl::X509BundlesRequest::decode(rest) else {
                        return;
                    };
                    stream(api.fetch_x509_bundles(request(m, header, cred)).await).await;
                }
                2 => {
                    let Ok(m) = wl::JwtsvidRequest::decode(rest) else {
                        return;
                    };
                    unary(api.fetch_jwtsvid(request(m, header, cred)).await);
                }
                3 => {
                    let Ok(m) = wl::JwtBundlesRequest::decode(rest) else {
                        return;
                    };
                    stream(api.fetch_jwt_bundles(request(m, header, cred)).await).await;
                }
                4 => {
                    let Ok(m) = wl::ValidateJwtsvidRequest::decode(rest) else {
                        return;
                    };
                    unary(api.validate_jwtsvid(request(m, header, cred)).await);
                }
                5 => {
                    let Ok(m) = DiscoveryRequest::decode(rest) else {
                        return;
                    };
                    unary(sds.fetch_secrets(request(m, header, cred)).await);
                }
                n => grpc_stream(sds, n == 6, rest, cred).await,
            }
        })
        .await
        .expect("the call did not end within the bound");
    });
});

/// StreamSecrets (or DeltaSecrets) through tonic's generated server: `body` is the gRPC-framed
/// request stream. The answer's frames never hold another workload's SVID, and it ends with a
/// valid `grpc-status`.
async fn grpc_stream(
    sds: &SdsService,
    sotw: bool,
    body: &[u8],
    cred: Option<tokio::net::unix::UCred>,
) {
    use tower_service::Service as _;
    let method = if sotw {
        "StreamSecrets"
    } else {
        "DeltaSecrets"
    };
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!(
            "/envoy.service.secret.v3.SecretDiscoveryService/{method}"
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::copy_from_slice(body)))
        .unwrap();
    req.extensions_mut().insert(UdsConnectInfo {
        peer_addr: None,
        peer_cred: cred,
    });
    let mut svc = SecretDiscoveryServiceServer::new(sds.clone());
    let resp = svc.call(req).await.unwrap_or_else(|never| match never {});
    let (parts, mut body) = resp.into_parts();
    if let Some(s) = Status::from_header_map(&parts.headers) {
        // Trailers-only: an error straight away.
        check_status(&s);
        return;
    }
    let mut data = Vec::new();
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            break;
        };
        match frame.into_data() {
            Ok(d) => data.extend_from_slice(&d),
            Err(f) => trailers = f.into_trailers().ok(),
        }
    }
    debug(&String::from_utf8_lossy(&data));
    debug(&trailers);
    check_sent(&data);
    let t = trailers.expect("a gRPC response without trailers");
    let status = Status::from_header_map(&t).expect("trailers without a valid grpc-status");
    // The stream ends when the request stream does: OK then, or an error that says why.
    if status.code() != Code::Ok {
        check_status(&status);
    }
    // Every message is a DiscoveryResponse.
    let mut rest = &data[..];
    while rest.len() >= 5 {
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        assert!(rest.len() >= 5 + len, "a cut gRPC frame");
        ward_proto::envoy::service::discovery::v3::DiscoveryResponse::decode(&rest[5..5 + len])
            .expect("a message that is not a DiscoveryResponse");
        rest = &rest[5 + len..];
    }
    assert!(rest.is_empty(), "trailing bytes after the gRPC frames");
}

/// A P-256 SubjectPublicKeyInfo (no token of the fuzzer verifies; checks run up to the
/// signature).
const P256_SPKI: [u8; 91] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00, 0x04, 0x6b, 0x17, 0xd1, 0xf2, 0xe1,
    0x2c, 0x42, 0x47, 0xf8, 0xbc, 0xe6, 0xe5, 0x63, 0xa4, 0x40, 0xf2, 0x77, 0x03, 0x7d, 0x81, 0x2d,
    0xeb, 0x33, 0xa0, 0xf4, 0xa1, 0x39, 0x45, 0xd8, 0x98, 0xc2, 0x96, 0x4f, 0xe3, 0x42, 0xe2, 0xfe,
    0x1a, 0x7f, 0x9b, 0x8e, 0xe7, 0xeb, 0x4a, 0x7c, 0x0f, 0x9e, 0x16, 0x2b, 0xce, 0x33, 0x57, 0x6b,
    0x31, 0x5e, 0xce, 0xcb, 0xb6, 0x40, 0x68, 0x37, 0xbf, 0x51, 0xf5,
];
