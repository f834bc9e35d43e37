//! Start-up against bad state: a corrupted sled directory, a foreign sled database, an unknown
//! schema, a missing authority key. Each is refused with a clear error and nothing is changed.
//! Plus upstream mode: an intermediate under an operator's root, kept across restarts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use ward_ca::CaServer;
use ward_spiffe::SystemClock;
use ward_store::Store;

async fn start_err(cfg: ward_ca::CaConfig) -> String {
    match CaServer::start_with_clock(cfg, Arc::new(SystemClock)).await {
        Ok(s) => {
            s.shutdown().await;
            panic!("CA started on bad state")
        }
        Err(e) => e.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_store_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::ca_config(dir.path(), "st.test");
    let ca = common::start_ca(cfg.clone(), Arc::new(SystemClock)).await;
    ca.shutdown().await;
    // Overwrite every sled file with garbage of the same size.
    let store = dir.path().join("store");
    for entry in walk(&store) {
        let len = std::fs::metadata(&entry).unwrap().len() as usize;
        std::fs::write(&entry, vec![0x5a; len.max(64)]).unwrap();
    }
    let e = start_err(cfg).await;
    // The refusal says what failed and why, not merely a path that holds "store".
    assert!(e.starts_with("cannot open store at "), "{e}");
    assert!(e.to_lowercase().contains("corrupt"), "{e}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_and_future_stores_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::ca_config(dir.path(), "st.test");
    std::fs::create_dir_all(dir.path()).unwrap();
    {
        let s = ward_store::SledStore::open(&dir.path().join("store")).unwrap();
        s.compare_and_swap(b"users/alice", None, Some(b"{}"))
            .await
            .unwrap();
    }
    let e = start_err(cfg.clone()).await;
    assert!(e.contains("not a ward-ca store"), "{e}");
    // Nothing was written into it.
    {
        let s = ward_store::SledStore::open(&dir.path().join("store")).unwrap();
        assert_eq!(ward_store::scan_all(&s, b"").await.unwrap().len(), 1);
    }

    let dir = tempfile::tempdir().unwrap();
    let cfg = common::ca_config(dir.path(), "st.test");
    let ca = common::start_ca(cfg.clone(), Arc::new(SystemClock)).await;
    ca.shutdown().await;
    {
        let s = ward_store::SledStore::open(&dir.path().join("store")).unwrap();
        s.compare_and_swap(b"meta/schema", Some(b"ward-ca/1"), Some(b"ward-ca/2"))
            .await
            .unwrap();
    }
    let e = start_err(cfg).await;
    assert!(e.contains("ward-ca/2") && e.contains("ward-ca/1"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_authority_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::ca_config(dir.path(), "st.test");
    let ca = common::start_ca(cfg.clone(), Arc::new(SystemClock)).await;
    ca.shutdown().await;
    for k in std::fs::read_dir(dir.path().join("keys")).unwrap() {
        let p = k.unwrap().path();
        if p.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("x509-")
        {
            std::fs::remove_file(p).unwrap();
        }
    }
    let e = start_err(cfg).await;
    assert!(e.contains("cannot be loaded"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_intermediate_chains_to_the_operator_root() {
    let dir = tempfile::tempdir().unwrap();
    // The operator's root CA.
    let root_key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "Operator Root");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let root = p.self_signed(&root_key).unwrap();
    let up = dir.path().join("upstream");
    std::fs::create_dir_all(&up).unwrap();
    std::fs::write(up.join("root.pem"), root.pem()).unwrap();
    std::fs::write(up.join("root.key"), root_key.serialize_pem()).unwrap();

    let mut cfg = common::ca_config(&dir.path().join("ca"), "up.test");
    cfg.upstream = Some(ward_ca::config::UpstreamConfig {
        cert_file: up.join("root.pem"),
        key_file: up.join("root.key"),
        bundle_file: up.join("root.pem"),
    });
    let ca = common::start_ca(cfg.clone(), Arc::new(SystemClock)).await;
    let bundle = ca.core.bundle();
    assert_eq!(
        bundle.x509_authorities,
        vec![root.der().to_vec()],
        "bundle holds the operator root only"
    );
    let agent = common::attest_agent(&ca).await;
    assert_eq!(agent.chain.len(), 2, "leaf + Ward intermediate");
    let info = ward_spiffe::x509::verify_chain(
        &agent.chain,
        &[rustls_pki_types::CertificateDer::from(root.der().to_vec())],
        &ward_spiffe::TrustDomain::new("up.test").unwrap(),
        std::time::SystemTime::now(),
        ward_spiffe::x509::Usage::Client,
    )
    .unwrap();
    assert_eq!(info.id, agent.id);
    let intermediate = agent.chain[1].to_vec();
    ca.shutdown().await;

    // Restart: same intermediate, same bundle.
    let ca = common::start_ca(cfg.clone(), Arc::new(SystemClock)).await;
    assert_eq!(ca.core.bundle().x509_authorities, vec![root.der().to_vec()]);
    assert_eq!(
        ca.core.authorities.current().x509.signing_chain[0],
        intermediate
    );
    ca.shutdown().await;

    // A key that does not match the upstream certificate is refused at start.
    let other = rcgen::KeyPair::generate().unwrap();
    std::fs::write(up.join("root.key"), other.serialize_pem()).unwrap();
    let e = start_err(
        common::ca_config(&dir.path().join("ca2"), "up.test").tap(|c| {
            c.upstream = cfg.upstream.clone();
        }),
    )
    .await;
    assert!(e.contains("does not match"), "{e}");
}

trait Tap: Sized {
    fn tap(mut self, f: impl FnOnce(&mut Self)) -> Self {
        f(&mut self);
        self
    }
}

impl Tap for ward_ca::CaConfig {}
