//! An agent started from the identity it saved earlier, with its CA unreachable: it starts
//! (a node must come back after a reboot while the CA is down), serves the Workload API on its
//! socket, enforces the security header there before anything else, answers `Unavailable`
//! until it has synced, and reports not ready. A saved SVID that is expired or does not chain
//! to the saved bundle is not used.
//!
//! No CA runs here: the saved files are made with `ward_testing::Pki`, and the CA address is
//! a loopback port nothing listens on.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use ward_agent::files::DataDir;
use ward_agent::{Agent, AgentConfig};
use ward_proto::workload as wl;
use ward_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use ward_spiffe::{Bundle, SpiffeId, TrustDomain};
use ward_testing::{Issued, LeafOpts, Pki};

const TD: &str = "agent.test";
const AGENT_PATH: &str = "/ward/agent/join/node1";
const NOT_SYNCED: &str = "agent is not synchronized with the CA yet";

/// A loopback address nothing listens on.
fn closed_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn bundle_of(pki: &Pki) -> Bundle {
    let mut b = Bundle::new(TrustDomain::new(TD).unwrap());
    b.x509_authorities = vec![pki.root_der().to_vec()];
    b.sequence = 1;
    b
}

/// An agent config on `dir` whose data directory holds `bundle` and `svid`, without a join
/// token, pointing at an unreachable CA.
fn config(dir: &Path, bundle: &Bundle, svid: &Issued) -> AgentConfig {
    let data = DataDir::open(&dir.join("data")).unwrap();
    data.save_bundle(bundle).unwrap();
    data.save_svid(&svid.chain_der, &svid.key_der).unwrap();
    let mut cfg = AgentConfig::new(
        TrustDomain::new(TD).unwrap(),
        closed_port().to_string(),
        dir.join("data"),
        dir.join("agent.sock"),
    );
    cfg.health_address = "127.0.0.1:0".parse().unwrap();
    cfg
}

/// A request, with the Workload API security header if `header`.
fn req<T>(msg: T, header: bool) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if header {
        r.metadata_mut().insert(
            "workload.spiffe.io",
            tonic::metadata::MetadataValue::from_static("true"),
        );
    }
    r
}

/// `GET path` over HTTP/1.1; the status code and body.
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("an HTTP status line");
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_owned())
}

/// Every Workload API RPC of `c`, with or without the security header; the status each ends
/// with.
async fn statuses(
    c: &mut SpiffeWorkloadApiClient<tonic::transport::Channel>,
    header: bool,
) -> Vec<(&'static str, tonic::Status)> {
    let x509 = c.fetch_x509svid(req(wl::X509svidRequest {}, header)).await;
    let bundles = c
        .fetch_x509_bundles(req(wl::X509BundlesRequest {}, header))
        .await;
    let jwt = c
        .fetch_jwtsvid(req(
            wl::JwtsvidRequest {
                audience: vec!["db".into()],
                spiffe_id: String::new(),
            },
            header,
        ))
        .await;
    let jwt_bundles = c
        .fetch_jwt_bundles(req(wl::JwtBundlesRequest {}, header))
        .await;
    let validate = c
        .validate_jwtsvid(req(
            wl::ValidateJwtsvidRequest {
                audience: "db".into(),
                svid: "not.a.token".into(),
            },
            header,
        ))
        .await;
    vec![
        ("FetchX509SVID", x509.map(|_| ()).unwrap_err()),
        ("FetchX509Bundles", bundles.map(|_| ()).unwrap_err()),
        ("FetchJWTSVID", jwt.map(|_| ()).unwrap_err()),
        ("FetchJWTBundles", jwt_bundles.map(|_| ()).unwrap_err()),
        ("ValidateJWTSVID", validate.map(|_| ()).unwrap_err()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saved_identity_starts_the_agent_while_the_ca_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(TD);
    let cfg = config(dir.path(), &bundle_of(&pki), &pki.svid(AGENT_PATH));
    let agent = Agent::start(cfg).await.expect("starts from the saved SVID");
    assert_eq!(
        agent.identity.id(),
        Some(SpiffeId::new(&format!("spiffe://{TD}{AGENT_PATH}")).unwrap())
    );
    assert!(!agent.cache.snapshot().synced);

    let mut c = SpiffeWorkloadApiClient::new(ward_net::process::unix_channel(&agent.socket_path));
    // Without the header every RPC is refused for that reason...
    for (rpc, e) in statuses(&mut c, false).await {
        assert_eq!(e.code(), Code::InvalidArgument, "{rpc}: {e:?}");
        assert_eq!(e.message(), "security header missing from request", "{rpc}");
    }
    // ...and with it the same calls get past the header check (the caller is attested) to
    // the next one: not synced yet. So the header alone decided the refusals above.
    for (rpc, e) in statuses(&mut c, true).await {
        assert_eq!(e.code(), Code::Unavailable, "{rpc}: {e:?}");
        assert_eq!(e.message(), NOT_SYNCED, "{rpc}");
    }

    assert_eq!(get(agent.health_addr, "/healthz").await.0, 200);
    let (status, body) = get(agent.health_addr, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("not synchronized with the CA yet"), "{body}");

    let socket = agent.socket_path.clone();
    agent.shutdown().await;
    assert!(!socket.exists(), "shutdown removes the socket");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saved_svid_that_does_not_verify_is_not_used() {
    let pki = Pki::new(TD);
    let now = SystemTime::now();
    let cases = [
        (
            "signed by another root of the trust domain",
            Pki::new(TD).svid(AGENT_PATH),
        ),
        (
            "expired",
            pki.leaf(
                AGENT_PATH,
                &LeafOpts {
                    not_before: Some(now - Duration::from_secs(7200)),
                    not_after: Some(now - Duration::from_secs(60)),
                    ..Default::default()
                },
            ),
        ),
        (
            "a CA certificate",
            pki.leaf(
                AGENT_PATH,
                &LeafOpts {
                    ca: true,
                    ..Default::default()
                },
            ),
        ),
    ];
    for (what, svid) in cases {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), &bundle_of(&pki), &svid);
        // Not used, so the agent must attest again, and it has no join token to do so.
        let e = Agent::start(cfg.clone()).await.unwrap_err();
        assert!(
            e.to_string()
                .starts_with("the agent has no valid SVID and no join token"),
            "{what}: {e}"
        );
        assert_eq!(e.exit_code(), 1, "{what}");
        assert!(
            !cfg.socket_path.exists(),
            "{what}: no socket without identity"
        );
        // The same directory with a good SVID starts: the SVID was the only problem.
        let cfg = config(dir.path(), &bundle_of(&pki), &pki.svid(AGENT_PATH));
        Agent::start(cfg)
            .await
            .unwrap_or_else(|e| panic!("{what}: good SVID refused: {e}"))
            .shutdown()
            .await;
    }
}
