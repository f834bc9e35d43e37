//! Revocation is not bypassed by TLS session resumption. A client whose SVID chains to a root
//! that a new bundle drops (an emergency `authority x509 revoke --force`) must not get back in
//! by resuming a session made before the bundle changed — even though the proxy's own SVID
//! (from another root) stays valid, so no new SVID is published. Real sockets and real TLS,
//! through the proxy's TLS stage (`ListenerTls`), with the bundle update the agent's Workload
//! API stream makes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ward_net::credentials::{ClientAuth, CredentialSink, Svid, TlsSettings, build_client_config};
use ward_net::verify::{PeerPolicy, TrustStore};
use ward_proxy::tls::ListenerTls;
use ward_spiffe::{Bundle, TrustDomain};
use ward_testing::Pki;

const TD: &str = "mesh.test";

fn bundle(roots: &[&Pki]) -> Bundle {
    let mut b = Bundle::new(TrustDomain::new(TD).unwrap());
    b.x509_authorities = roots.iter().map(|p| p.root_der().to_vec()).collect();
    b
}

fn svid(pki: &Pki, path: &str) -> Svid {
    let i = pki.svid(path);
    Svid::from_parts(i.chain_der, i.key_der).unwrap()
}

/// Accepts mTLS connections with `tls` (a fresh server config per handshake, as the proxy's
/// listeners take it) and answers each with one byte.
async fn server(tls: Arc<ListenerTls>) -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = l.accept().await.unwrap();
            let cfg = tls.server().unwrap();
            tokio::spawn(async move {
                if let Ok(mut s) = tokio_rustls::TlsAcceptor::from(cfg).accept(tcp).await {
                    let _ = s.write_all(b"!").await;
                    let _ = s.flush().await;
                    let mut b = [0u8; 1];
                    let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut b)).await;
                }
            });
        }
    });
    addr
}

/// Connects with `cfg`; returns whether the server answered and whether the session was
/// resumed.
async fn connect(addr: std::net::SocketAddr, cfg: Arc<rustls::ClientConfig>) -> (bool, bool) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let sni = rustls_pki_types::ServerName::try_from("ward").unwrap();
    let Ok(mut s) = tokio_rustls::TlsConnector::from(cfg)
        .connect(sni, tcp)
        .await
    else {
        return (false, false);
    };
    let resumed = s.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    let mut b = [0u8; 1];
    // Reading also takes in the session tickets the server sends after the handshake.
    let answered = matches!(
        tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await,
        Ok(Ok(1))
    );
    let _ = s.write_all(b".").await;
    (answered, resumed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_session_does_not_outlive_the_root_it_was_made_with() {
    let (old, new) = (Pki::new(TD), Pki::new(TD));
    let trust = Arc::new(TrustStore::new());
    trust.set(bundle(&[&old, &new]));
    let sink = Arc::new(CredentialSink::new(
        trust,
        TlsSettings {
            accept_clients: PeerPolicy::AnyTrusted,
            client_auth: ClientAuth::Required,
            accept_servers: PeerPolicy::AnyTrusted,
            alpn: vec![],
            tls12: false,
        },
    ));
    // The proxy's own SVID is from the root that stays.
    sink.update_svid(svid(&new, "/backend"), SystemTime::now())
        .unwrap();
    let tls = Arc::new(ListenerTls::new(
        sink.clone(),
        PeerPolicy::AnyTrusted,
        vec![],
    ));
    let addr = server(tls).await;

    // A client from the root about to be revoked, keeping its sessions in its config.
    let client_trust = Arc::new(TrustStore::new());
    client_trust.set(bundle(&[&old, &new]));
    let client = build_client_config(
        client_trust,
        PeerPolicy::AnyTrusted,
        Some(&svid(&old, "/frontend")),
        vec![],
        false,
    )
    .unwrap();
    assert_eq!(connect(addr, client.clone()).await, (true, false));
    assert_eq!(
        connect(addr, client.clone()).await,
        (true, true),
        "the test exercises resumption: the second connection resumes"
    );

    // The emergency revoke: the old root leaves the bundle (only the bundle changes).
    sink.update_bundle(bundle(&[&new])).unwrap();
    let (answered, resumed) = connect(addr, client.clone()).await;
    assert!(
        !answered && !resumed,
        "a session made under the revoked root must not resume (answered {answered}, resumed {resumed})"
    );
    // Nor does a full handshake get in, and a client of the remaining root still does — and
    // resumes again.
    let fresh = build_client_config(
        Arc::new({
            let t = TrustStore::new();
            t.set(bundle(&[&old, &new]));
            t
        }),
        PeerPolicy::AnyTrusted,
        Some(&svid(&old, "/frontend")),
        vec![],
        false,
    )
    .unwrap();
    assert_eq!(connect(addr, fresh).await, (false, false));
    let good = build_client_config(
        Arc::new({
            let t = TrustStore::new();
            t.set(bundle(&[&new]));
            t
        }),
        PeerPolicy::AnyTrusted,
        Some(&svid(&new, "/frontend")),
        vec![],
        false,
    )
    .unwrap();
    assert_eq!(connect(addr, good.clone()).await, (true, false));
    assert_eq!(connect(addr, good).await, (true, true));
}
