//! OIDC discovery for JWT-SVIDs, checked by an independent verifier: PyJWT (with its JWKS
//! client) reads the CA's discovery document and keys and verifies a Ward JWT-SVID; after the
//! JWT key is rotated and the old one revoked, a token signed by the removed key is refused and
//! a new one verifies. Also: only public `sig` keys are served, `Cache-Control` is set, and
//! other paths and methods get 404 / 405.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use ward_ca::authority::{Kind, Op};
use ward_ca::entries::EntrySpec;
use ward_proto::node::NewJwtSvidRequest;

async fn get(addr: std::net::SocketAddr, method: &str, path: &str) -> (u16, String, String) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut s, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "oidc")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let r = s.send_request(req).await.unwrap();
    let status = r.status().as_u16();
    let cc = r
        .headers()
        .get("cache-control")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = r.into_body().collect().await.unwrap().to_bytes();
    (status, cc, String::from_utf8(body.to_vec()).unwrap())
}

fn pyjwt(issuer: &str, audience: &str, token: &str) -> Result<String, String> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/verify_jwt.py");
    let python = std::env::var("WARD_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&python)
        .args([script, issuer, audience, token])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python} ({e}); ./scripts/test installs PyJWT"));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !err.contains("ModuleNotFoundError"),
        "PyJWT is missing ({err}); run ./scripts/test, which installs it"
    );
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(err)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pyjwt_verifies_ward_jwt_svids_through_discovery() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let issuer = format!("http://127.0.0.1:{port}");
    let mut cfg = common::ca_config(&dir.path().join("ca"), "oidc.test");
    cfg.oidc = Some(ward_ca::config::OidcConfig {
        issuer: issuer.clone(),
        bind_address: format!("127.0.0.1:{port}").parse().unwrap(),
        max_age: Duration::from_secs(60),
    });
    let ca = common::start_ca(cfg, Arc::new(ward_spiffe::SystemClock)).await;
    let addr = ca.oidc_addr.unwrap();

    // The documents.
    let (status, cc, body) = get(addr, "GET", "/.well-known/openid-configuration").await;
    assert_eq!((status, cc.as_str()), (200, "public, max-age=60"));
    let conf: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(conf["issuer"], issuer.as_str());
    assert_eq!(conf["jwks_uri"], format!("{issuer}/keys"));
    let (status, cc, body) = get(addr, "GET", "/keys").await;
    assert_eq!((status, cc.as_str()), (200, "public, max-age=60"));
    let keys: serde_json::Value = serde_json::from_str(&body).unwrap();
    let keys = keys["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    for k in keys {
        assert_eq!(k["use"], "sig");
        assert_eq!(k["kty"], "EC");
        assert!(k.get("d").is_none(), "a private key part is served: {k}");
    }
    assert_eq!(get(addr, "GET", "/other").await.0, 404);
    assert_eq!(get(addr, "POST", "/keys").await.0, 405);

    // A JWT-SVID from the CA verifies with PyJWT through discovery.
    let agent = common::attest_agent(&ca).await;
    let entry = ward_ca::core::CaCore::new_entry_id();
    ca.core
        .entries
        .create(
            &EntrySpec {
                spiffe_id: "spiffe://oidc.test/billing".into(),
                parent_id: agent.id.to_string(),
                selectors: vec!["unix:uid:7".into()],
                ..Default::default()
            },
            "admin",
            entry.clone(),
            ca.core.clock.now(),
        )
        .await
        .unwrap();
    let mut node = common::node_client(&ca, Some(agent));
    let mint = |node: &mut ward_proto::node::node_client::NodeClient<_>| {
        let mut node = node.clone();
        let entry = entry.clone();
        async move {
            node.new_jwt_svid(NewJwtSvidRequest {
                entry_id: entry,
                audience: vec!["sts.example.com".into()],
            })
            .await
            .unwrap()
            .into_inner()
            .token
        }
    };
    let old = mint(&mut node).await;
    assert_eq!(
        pyjwt(&issuer, "sts.example.com", &old).unwrap(),
        "spiffe://oidc.test/billing"
    );
    assert!(
        pyjwt(&issuer, "someone-else", &old)
            .unwrap_err()
            .contains("InvalidAudience")
    );

    // Rotate the JWT key and revoke the old one: the old token is refused, a new one verifies.
    let a = &ca.core.authorities;
    let old_kid = ca.core.authorities.current().jwt.key_id.clone();
    a.operate(Kind::Jwt, Op::Prepare, false).await.unwrap();
    let (_, _, body) = get(addr, "GET", "/keys").await;
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["keys"]
            .as_array()
            .unwrap()
            .len(),
        2,
        "a prepared key is published before it signs"
    );
    a.operate(Kind::Jwt, Op::Activate(None), false)
        .await
        .unwrap();
    a.operate(Kind::Jwt, Op::Taint(old_kid.clone()), false)
        .await
        .unwrap();
    a.operate(Kind::Jwt, Op::Revoke(old_kid.clone()), true)
        .await
        .unwrap();
    let (_, _, body) = get(addr, "GET", "/keys").await;
    assert!(!body.contains(&old_kid));
    let e = pyjwt(&issuer, "sts.example.com", &old).unwrap_err();
    assert!(e.contains("refused"), "{e}");
    let new = mint(&mut node).await;
    assert_eq!(
        pyjwt(&issuer, "sts.example.com", &new).unwrap(),
        "spiffe://oidc.test/billing"
    );
    ca.shutdown().await;
}
