//! Attacks on the sidecar: clients with no, expired, foreign, rogue or malformed certificates
//! talking straight to the inbound listener; an upstream with the wrong SPIFFE ID; spoofed
//! peer-ID headers; path tricks; broken policy files after start; dry-run; permissive TLS;
//! and TCP authorization. Every refusal is checked where it shows: no HTTP response (or the
//! right status), the application never seeing the request, the metrics and the access log.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme, SupportedProtocolVersion};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use ward_proxy::config::{AuthzMode, Protocol, ProxyConfig, TlsMode};
use ward_spiffe::policy::DefaultPolicy;
use ward_testing::{Issued, LeafOpts, Pki, write_atomic};

use common::{HEADER, Mesh, POLICIES, TD, get, request};

// ---------------------------------------------------------------------------------------------
// Test applications that remember what reached them.

/// The requests (as the app saw them) that reached the recording app.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<Value>>>);

impl Seen {
    fn all(&self) -> Vec<Value> {
        self.0.lock().unwrap().clone()
    }

    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    fn paths(&self) -> Vec<String> {
        self.all()
            .iter()
            .map(|v| v["path"].as_str().unwrap_or_default().to_owned())
            .collect()
    }
}

/// Like `common::start_app` (same JSON answer), but records every request it receives.
async fn start_recording_app() -> (SocketAddr, Seen) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Seen::default();
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                return;
            };
            let s = s.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let s = s.clone();
                    async move {
                        let peers: Vec<String> = req
                            .headers()
                            .get_all(HEADER)
                            .iter()
                            .map(|v| v.to_str().unwrap_or("").to_owned())
                            .collect();
                        let method = req.method().to_string();
                        let path = req
                            .uri()
                            .path_and_query()
                            .map(|p| p.to_string())
                            .unwrap_or_default();
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let out = serde_json::json!({
                            "method": method, "path": path, "peers": peers,
                            "body_len": body.len(),
                        });
                        s.0.lock().unwrap().push(out.clone());
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(
                            out.to_string(),
                        ))))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

/// A TCP echo server that counts the connections it accepts.
async fn start_counting_echo() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = l.accept().await else {
                return;
            };
            c.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (addr, count)
}

/// A mesh (see `common::Mesh`) whose backend forwards to a recording app.
async fn mesh_with(
    dir: &Path,
    tune_backend: impl FnOnce(&mut ProxyConfig),
    tune_frontend: impl FnOnce(&mut ProxyConfig),
) -> (Mesh, Seen) {
    let (app, seen) = start_recording_app().await;
    let mesh = Mesh::start_with(
        dir,
        Protocol::Http,
        |b| {
            b.inbound_mut()[0].forward_to = app.to_string();
            tune_backend(b);
        },
        tune_frontend,
    )
    .await;
    (mesh, seen)
}

// ---------------------------------------------------------------------------------------------
// Metrics and access log.

fn tls_failures(listener: &str, reason: &str) -> String {
    format!(
        "ward_proxy_tls_handshake_failures_total{{listener=\"{listener}\",reason=\"{reason}\"}}"
    )
}

/// The value of one series in a Prometheus text exposition (0 if absent).
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let rest = l.strip_prefix(series)?.strip_prefix(' ')?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or(0.0)
}

/// Waits until `series` on the admin endpoint `admin` reaches `at_least`; returns the metrics.
async fn wait_metric(admin: SocketAddr, series: &str, at_least: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = common::admin(admin, "/metrics").await;
        if metric(&m, series) >= at_least {
            return m;
        }
        if Instant::now() > deadline {
            panic!("{series} never reached {at_least}:\n{m}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `access` objects of the log written so far (a half-flushed last line is skipped).
fn access_records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["type"] == "access")
        .map(|l| l["access"].clone())
        .collect()
}

/// Waits for an access record matching `pred`.
async fn wait_record(path: &Path, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(r) = access_records(path).into_iter().find(|r| pred(r)) {
            return r;
        }
        if Instant::now() > deadline {
            panic!(
                "no access record {what} in {}:\n{:#?}",
                path.display(),
                access_records(path)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until at least `n` access records match `pred`; returns those that do, in order.
async fn wait_matching(
    path: &Path,
    what: &str,
    n: usize,
    pred: impl Fn(&Value) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let found: Vec<Value> = access_records(path)
            .into_iter()
            .filter(|r| pred(r))
            .collect();
        if found.len() >= n {
            return found;
        }
        if Instant::now() > deadline {
            panic!(
                "fewer than {n} access records {what} in {}:\n{:#?}",
                path.display(),
                access_records(path)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn assert_chain_intact(path: &Path) {
    let report = ward_proxy::access_log::verify(path).unwrap();
    assert_eq!(report.broken, None, "{}", path.display());
}

// ---------------------------------------------------------------------------------------------
// A raw TLS client that trusts any server: the attack is on the client side.

#[derive(Debug)]
struct AnyServer(rustls::crypto::WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

fn client_config(
    version: &'static SupportedProtocolVersion,
    cert: Option<&Issued>,
) -> Arc<ClientConfig> {
    let provider = rustls::crypto::ring::default_provider();
    let algs = provider.signature_verification_algorithms;
    let builder = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[version])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(algs)));
    let cfg = match cert {
        Some(i) => builder
            .with_client_auth_cert(
                i.chain_der
                    .iter()
                    .map(|c| CertificateDer::from(c.clone()))
                    .collect(),
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(i.key_der.clone())),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    Arc::new(cfg)
}

/// Reads until the peer closes, an error, or `limit`; returns the bytes and how it ended.
async fn read_until_close<R: AsyncRead + Unpin>(r: &mut R, limit: Duration) -> (Vec<u8>, String) {
    let mut buf = Vec::new();
    let end = tokio::time::timeout(limit, async {
        let mut chunk = [0u8; 4096];
        loop {
            match r.read(&mut chunk).await {
                Ok(0) => return "eof".to_owned(),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) => return format!("read error: {e}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| "timeout".to_owned());
    (buf, end)
}

/// Opens TLS to `addr` with `cfg`, sends `req`, and returns what came back and how it ended.
async fn direct_tls(addr: SocketAddr, cfg: Arc<ClientConfig>, req: &[u8]) -> (Vec<u8>, String) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let sni = ServerName::try_from("backend.mesh.test").unwrap();
    let connect = tokio_rustls::TlsConnector::from(cfg).connect(sni, tcp);
    let mut tls = match tokio::time::timeout(Duration::from_secs(5), connect).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => return (Vec::new(), format!("handshake failed: {e}")),
        Err(_) => return (Vec::new(), "handshake timed out".to_owned()),
    };
    if let Err(e) = tls.write_all(req).await {
        return (Vec::new(), format!("write failed: {e}"));
    }
    if let Err(e) = tls.flush().await {
        return (Vec::new(), format!("flush failed: {e}"));
    }
    read_until_close(&mut tls, Duration::from_secs(5)).await
}

/// Plaintext: connects to `addr`, sends `req`, returns what came back and how it ended.
async fn plain(addr: SocketAddr, req: &[u8]) -> (Vec<u8>, String) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    if let Err(e) = tcp.write_all(req).await {
        return (Vec::new(), format!("write failed: {e}"));
    }
    read_until_close(&mut tcp, Duration::from_secs(5)).await
}

const SIMPLE_GET: &[u8] = b"GET /api/hello HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n";

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The JSON body of a raw HTTP/1.1 response from the recording app.
fn json_body(raw: &[u8]) -> Value {
    let text = String::from_utf8_lossy(raw);
    let (start, end) = (text.find('{'), text.rfind('}'));
    match (start, end) {
        (Some(s), Some(e)) if s < e => serde_json::from_str(&text[s..=e]).unwrap(),
        _ => panic!("no JSON body in response: {text}"),
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Direct TLS clients with bad or no certificates are refused at the inbound listener.

/// Starts a mesh, checks that the raw client works with a good SVID (control), then that the
/// client presenting `cert` (or none) gets no HTTP response over TLS 1.3 and TLS 1.2, that the
/// app saw nothing, and that the backend counted `reason` twice.
async fn direct_client_is_refused(cert: impl FnOnce(&Pki) -> Option<Issued>, reason: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (mesh, seen) = mesh_with(dir.path(), |_| {}, |_| {}).await;

    // Control: the same client with a valid SVID of the mesh is served.
    let good = mesh.pki.svid("/frontend");
    let (resp, end) = direct_tls(
        mesh.inbound(),
        client_config(&rustls::version::TLS13, Some(&good)),
        SIMPLE_GET,
    )
    .await;
    assert!(
        resp.starts_with(b"HTTP/1.1 200"),
        "control request failed ({end}): {}",
        String::from_utf8_lossy(&resp)
    );
    assert_eq!(seen.len(), 1);
    assert_eq!(
        json_body(&resp)["peers"],
        serde_json::json!(["spiffe://mesh.test/frontend"])
    );

    let bad = cert(&mesh.pki);
    // (Mesh hops are TLS 1.3 only; a TLS 1.2 client is refused before its certificate is
    // looked at — `tls_1_2_is_refused_on_mesh_hops_unless_allowed`.)
    for attempt in 0..2 {
        let version = &rustls::version::TLS13;
        let (resp, end) = direct_tls(
            mesh.inbound(),
            client_config(version, bad.as_ref()),
            SIMPLE_GET,
        )
        .await;
        assert!(
            !contains(&resp, b"HTTP/1.1"),
            "attempt {attempt}: got an HTTP response ({end}): {}",
            String::from_utf8_lossy(&resp)
        );
        // TLS 1.3 fails when reading after the handshake.
        assert!(
            end.contains("received fatal alert"),
            "attempt {attempt}: {end}"
        );
    }
    let m = wait_metric(
        mesh.backend.admin_addr,
        &tls_failures("public", reason),
        2.0,
    )
    .await;
    // Counted under that reason only.
    let public: f64 = m
        .lines()
        .filter(|l| l.starts_with("ward_proxy_tls_handshake_failures_total{listener=\"public\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(public, 2.0, "{reason}:\n{m}");
    assert_eq!(
        metric(&m, &tls_failures("public", reason)),
        2.0,
        "{reason}:\n{m}"
    );
    assert_eq!(
        seen.len(),
        1,
        "the app saw a refused request: {:?}",
        seen.all()
    );
    // Nothing was authorized, so nothing but the control request is in the access log.
    let log = mesh.dir.join("backend-access.jsonl");
    wait_record(&log, "for the control request", |r| {
        r["decision"] == "allow"
    })
    .await;
    // Stopped, the proxy has written every record it was given (then its close anchor): the
    // count is final, not a guess after a pause.
    mesh.stop().await;
    assert_eq!(access_records(&log).len(), 1, "{:#?}", access_records(&log));
}

/// Under TLS 1.2 the client certificate — the caller's identity — crosses the wire in the clear,
/// so mesh hops speak TLS 1.3 only: a TLS 1.2 client with a valid SVID is refused, and counted.
/// `mesh_tls12: true` lets such a (non-Ward) peer in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_2_is_refused_on_mesh_hops_unless_allowed() {
    for allow in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let (mesh, seen) = mesh_with(dir.path(), |b| b.mesh_tls12 = allow, |_| {}).await;
        let good = mesh.pki.svid("/frontend");
        let (resp, end) = direct_tls(
            mesh.inbound(),
            client_config(&rustls::version::TLS12, Some(&good)),
            SIMPLE_GET,
        )
        .await;
        if allow {
            assert!(resp.starts_with(b"HTTP/1.1 200"), "allowed: {end}");
            assert_eq!(seen.len(), 1);
        } else {
            assert!(!contains(&resp, b"HTTP/1.1"), "refused: {end}");
            assert!(end.contains("alert") || end.contains("error"), "{end}");
            wait_metric(
                mesh.backend.admin_addr,
                &tls_failures("public", "incompatible_version"),
                1.0,
            )
            .await;
            assert_eq!(seen.len(), 0);
        }
        mesh.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_client_without_certificate_is_refused() {
    direct_client_is_refused(|_| None, "no_client_cert").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_client_with_expired_certificate_is_refused() {
    let now = SystemTime::now();
    direct_client_is_refused(
        |pki| {
            Some(pki.leaf(
                "/frontend",
                &LeafOpts {
                    not_before: Some(now - Duration::from_secs(7200)),
                    not_after: Some(now - Duration::from_secs(3600)),
                    ..Default::default()
                },
            ))
        },
        "expired",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_client_with_a_not_yet_valid_certificate_is_refused() {
    let now = SystemTime::now();
    direct_client_is_refused(
        |pki| {
            Some(pki.leaf(
                "/frontend",
                &LeafOpts {
                    not_before: Some(now + Duration::from_secs(3600)),
                    not_after: Some(now + Duration::from_secs(7200)),
                    ..Default::default()
                },
            ))
        },
        "not_yet_valid",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_client_with_a_server_only_certificate_is_refused() {
    direct_client_is_refused(
        |pki| {
            Some(pki.leaf(
                "/frontend",
                &LeafOpts {
                    server_auth_only: true,
                    ..Default::default()
                },
            ))
        },
        "wrong_eku",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_client_from_another_trust_domain_is_refused() {
    direct_client_is_refused(
        |_| Some(Pki::new("other.test").svid("/frontend")),
        "unknown_trust_domain",
    )
    .await;
}

/// A second root for the mesh's trust domain with the same subject name as the real one
/// (`Pki::new` always names its root `root <td>`): the chain is built to the real root by name
/// and its signature does not verify, so the reason is `bad_chain`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_client_signed_by_a_rogue_root_of_the_same_name_is_refused() {
    direct_client_is_refused(|_| Some(Pki::new(TD).svid("/frontend")), "bad_chain").await;
}

/// A rogue root for the mesh's trust domain with a subject name of its own: no issuer in the
/// bundle at all, so the reason is `unknown_issuer`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_client_signed_by_an_unknown_root_is_refused() {
    direct_client_is_refused(|_| Some(rogue_leaf("/frontend")), "unknown_issuer").await;
}

/// An SVID-shaped leaf for `spiffe://mesh.test<path>` from a root named differently from the
/// test PKI's.
fn rogue_leaf(path: &str) -> Issued {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose, SanType,
    };
    let now = SystemTime::now();
    let root_key = KeyPair::generate().unwrap();
    let mut root = CertificateParams::default();
    root.distinguished_name = rcgen::DistinguishedName::new();
    root.distinguished_name
        .push(DnType::CommonName, "rogue root mesh.test");
    root.subject_alt_names = vec![SanType::URI(format!("spiffe://{TD}").try_into().unwrap())];
    root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    root.not_before = (now - Duration::from_secs(3600)).into();
    root.not_after = (now + Duration::from_secs(3600)).into();
    let issuer = Issuer::new(root, root_key);
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::default();
    leaf.distinguished_name = rcgen::DistinguishedName::new();
    leaf.distinguished_name
        .push(DnType::OrganizationName, "Ward test");
    leaf.subject_alt_names = vec![SanType::URI(
        format!("spiffe://{TD}{path}").try_into().unwrap(),
    )];
    leaf.is_ca = IsCa::ExplicitNoCa;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    leaf.not_before = (now - Duration::from_secs(60)).into();
    leaf.not_after = (now + Duration::from_secs(3600)).into();
    leaf.use_authority_key_identifier_extension = true;
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    Issued {
        chain_der: vec![cert.der().to_vec()],
        chain_pem: cert.pem(),
        key_der: key.serialize_der(),
        key_pem: key.serialize_pem(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_client_with_two_uri_sans_is_refused() {
    direct_client_is_refused(
        |pki| {
            Some(pki.leaf(
                "/frontend",
                &LeafOpts {
                    extra_uri: Some("spiffe://mesh.test/admin".into()),
                    ..Default::default()
                },
            ))
        },
        "multiple_uri_sans",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_client_presenting_a_ca_certificate_is_refused() {
    direct_client_is_refused(
        |pki| {
            Some(pki.leaf(
                "/frontend",
                &LeafOpts {
                    ca: true,
                    ..Default::default()
                },
            ))
        },
        "ca_as_leaf",
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// 2. An upstream that is not the expected workload.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_with_unexpected_spiffe_id_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // Both proxies need identities from one PKI, which the harness's closures cannot reach:
    // issue them here, from our own root, into a subdirectory.
    let ids = dir.path().join("ids");
    std::fs::create_dir(&ids).unwrap();
    let pki = Pki::new(TD);
    let (mesh, seen) = mesh_with(
        dir.path(),
        |b| b.identity = common::identity(&pki, &ids, "impostor"),
        |f| f.identity = common::identity(&pki, &ids, "frontend"),
    )
    .await;
    assert_eq!(
        mesh.backend.sink.current().unwrap().id.as_str(),
        "spiffe://mesh.test/impostor"
    );

    for _ in 0..2 {
        let r = get(mesh.outbound(), "/api/hello").await;
        assert_eq!(r.status, 502, "{}", r.body);
        assert!(
            r.body
                .contains("NotAuthorized(\"spiffe://mesh.test/impostor\")"),
            "{}",
            r.body
        );
    }
    let series = tls_failures("backend", "unauthorized_id");
    let m = wait_metric(mesh.frontend.admin_addr, &series, 2.0).await;
    assert!(
        m.contains("ward_proxy_requests_total{listener=\"backend\",decision=\"error\",policy=\"outbound\"} 2"),
        "{m}"
    );
    assert_eq!(seen.len(), 0, "{:?}", seen.all());
    let log = mesh.dir.join("frontend-access.jsonl");
    let r = wait_record(&log, "for the refused upstream", |r| r["status"] == 502).await;
    assert_eq!(r["decision"], "error");
    assert!(
        r["reason"].as_str().unwrap().contains("NotAuthorized"),
        "{r}"
    );
    assert!(access_records(&mesh.dir.join("backend-access.jsonl")).is_empty());
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_with_expected_id_from_a_rogue_root_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ids = dir.path().join("ids");
    std::fs::create_dir(&ids).unwrap();
    let rogue = Pki::new(TD);
    let (mesh, seen) = mesh_with(
        dir.path(),
        |b| b.identity = common::identity(&rogue, &ids, "backend"),
        |_| {},
    )
    .await;
    let r = get(mesh.outbound(), "/api/hello").await;
    assert_eq!(r.status, 502, "{}", r.body);
    // A root with the same subject name as the real one: the chain is built to the real root
    // and the signature does not verify.
    assert!(
        r.body.contains("InvalidSignatureForPublicKey"),
        "{}",
        r.body
    );
    wait_metric(
        mesh.frontend.admin_addr,
        &tls_failures("backend", "bad_chain"),
        1.0,
    )
    .await;
    assert_eq!(seen.len(), 0);
    mesh.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 3. Spoofed peer-ID headers.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_peer_id_headers_are_replaced_by_the_verified_id() {
    let dir = tempfile::tempdir().unwrap();
    let (mesh, seen) = mesh_with(dir.path(), |_| {}, |_| {}).await;
    let verified = serde_json::json!(["spiffe://mesh.test/frontend"]);
    let spoof = b"GET /api/hello HTTP/1.1\r\n\
        Host: svc.local\r\n\
        X-Ward-Peer-Id: spiffe://mesh.test/admin\r\n\
        x-ward-peer-id: spiffe://mesh.test/backend\r\n\
        X-WARD-PEER-ID: spiffe://mesh.test/root\r\n\
        x-WaRd-PeEr-Id: spiffe://mesh.test/frontend, spiffe://mesh.test/admin\r\n\
        Connection: close\r\n\r\n";

    // Through the frontend's outbound, HTTP/1.1 written by hand (header case preserved).
    let (resp, end) = plain(mesh.outbound(), spoof).await;
    assert!(
        resp.starts_with(b"HTTP/1.1 200"),
        "{end}: {}",
        String::from_utf8_lossy(&resp)
    );
    assert_eq!(json_body(&resp)["peers"], verified);

    // Through the outbound over HTTP/2, the header repeated.
    let r = request(
        mesh.outbound(),
        "GET",
        "/api/hello",
        &[
            (HEADER, "spiffe://mesh.test/admin"),
            (HEADER, "spiffe://mesh.test/root"),
        ],
        true,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["peers"], verified);

    // Straight to the backend's inbound with a valid SVID and the spoofed headers.
    let (resp, end) = direct_tls(
        mesh.inbound(),
        client_config(&rustls::version::TLS13, Some(&mesh.pki.svid("/frontend"))),
        spoof,
    )
    .await;
    assert!(
        resp.starts_with(b"HTTP/1.1 200"),
        "{end}: {}",
        String::from_utf8_lossy(&resp)
    );
    assert_eq!(json_body(&resp)["peers"], verified);

    // A `Connection` header naming the peer-ID header changes nothing either.
    let (resp, _) = plain(
        mesh.outbound(),
        b"GET /api/hello HTTP/1.1\r\nHost: svc.local\r\nConnection: close, X-Ward-Peer-Id\r\n\
          X-Ward-Peer-Id: spiffe://mesh.test/admin\r\n\r\n",
    )
    .await;
    assert_eq!(json_body(&resp)["peers"], verified);

    let all = seen.all();
    assert_eq!(all.len(), 4, "{all:?}");
    for s in &all {
        assert_eq!(s["peers"], verified, "{s}");
    }
    mesh.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 4. Path tricks.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_tricks_are_normalized_or_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (mesh, seen) = mesh_with(dir.path(), |_| {}, |_| {}).await;
    let out = mesh.outbound();
    let log = mesh.dir.join("backend-access.jsonl");

    // (raw path, status, what the body says, policy in the log, path in the log)
    let cases: &[(&str, u16, &str, &str, &str)] = &[
        // Encoded slashes are ambiguous: refused before policy, logged raw.
        (
            "/api/..%2f..%2fadmin",
            403,
            "ambiguous request path",
            "invalid-path",
            "/api/..%2f..%2fadmin",
        ),
        (
            "/api/admin%2Fx",
            403,
            "ambiguous request path",
            "invalid-path",
            "/api/admin%2Fx",
        ),
        // Encoded dots are decoded and resolved, then the policy decides on the result.
        (
            "/api/%2E%2E/admin/x",
            403,
            "no ALLOW policy matched",
            "none",
            "/admin/x",
        ),
        (
            "/api/%2E%2E/api/admin/x",
            403,
            "backend-deny-admin",
            "backend-deny-admin",
            "/api/admin/x",
        ),
        // Unreserved characters sent encoded are decoded before matching.
        (
            "/api/%61dmin/x",
            403,
            "backend-deny-admin",
            "backend-deny-admin",
            "/api/admin/x",
        ),
        // Repeated slashes are merged before matching.
        (
            "//api//admin//x",
            403,
            "backend-deny-admin",
            "backend-deny-admin",
            "/api/admin/x",
        ),
        // A raw backslash (hyper lets it through) is refused.
        (
            "/api\\admin\\x",
            403,
            "ambiguous request path",
            "invalid-path",
            "/api\\admin\\x",
        ),
        (
            "/api/hello\\..\\admin\\x",
            403,
            "ambiguous request path",
            "invalid-path",
            "/api/hello\\..\\admin\\x",
        ),
        // `..` above the root is refused, not clamped.
        (
            "/api/../../api/admin/x",
            403,
            "ambiguous request path",
            "invalid-path",
            "/api/../../api/admin/x",
        ),
        // `..` in the query does not touch the path decision.
        (
            "/api/admin/x?next=/../../api/hello",
            403,
            "backend-deny-admin",
            "backend-deny-admin",
            "/api/admin/x",
        ),
        (
            "/api/admin/x?..%2f..%2fhello",
            403,
            "backend-deny-admin",
            "backend-deny-admin",
            "/api/admin/x",
        ),
    ];
    for (i, (raw, status, body, policy, logged)) in cases.iter().enumerate() {
        let r = get(out, raw).await;
        assert_eq!(r.status, *status, "{raw}: {}", r.body);
        assert!(r.body.contains(body), "{raw}: {}", r.body);
        // Denials are logged before the response goes out, so record i is this request's.
        let rec = wait_matching(&log, "so far", i + 1, |_| true).await[i].clone();
        assert_eq!(rec["decision"], "deny", "{raw}: {rec}");
        assert_eq!(rec["path"], *logged, "{raw}: {rec}");
        assert_eq!(rec["policy"], *policy, "{raw}: {rec}");
        assert_eq!(rec["status"], *status, "{raw}: {rec}");
        assert_eq!(rec["src"], "spiffe://mesh.test/frontend", "{raw}: {rec}");
    }
    assert!(seen.all().is_empty(), "the app saw {:?}", seen.paths());

    // Allowed paths whose query holds `..`: allowed, and the app gets the query untouched.
    for (raw, logged) in [
        ("/api/hello?next=/../../api/admin/x", "/api/hello"),
        ("/api/./hello?x=..%2f..%2fadmin", "/api/hello"),
    ] {
        let r = get(out, raw).await;
        assert_eq!(r.status, 200, "{raw}: {}", r.body);
        let (_, query) = raw.split_once('?').unwrap();
        assert_eq!(r.json()["path"], format!("{logged}?{query}"), "{raw}");
    }
    let allowed = wait_matching(&log, "allowing /api/hello", 2, |r| {
        r["decision"] == "allow" && r["path"] == "/api/hello"
    })
    .await;
    assert_eq!(allowed.len(), 2, "{allowed:#?}");
    assert_eq!(
        seen.paths(),
        vec![
            "/api/hello?next=/../../api/admin/x",
            "/api/hello?x=..%2f..%2fadmin"
        ]
    );
    let records = access_records(&log);
    assert_eq!(records.len(), cases.len() + 2, "{records:#?}");
    assert_chain_intact(&log);
    mesh.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 5. Broken policy files after start.

const BAD_YAML: &str = r#"
policies:
  - name: backend-allow-everything
    target: { spiffe_ids: ["spiffe://mesh.test/backend"]
    action: ALLOW
    rules: [ {} ]
"#;

const BAD_ID_PATTERN: &str = r#"
policies:
  - name: backend-allow-frontend
    target: { spiffe_ids: ["spiffe://mesh.test/backend"] }
    action: ALLOW
    rules:
      - from: [ { principals: ["spiffe://mesh.test/frontend", "spiffe://mesh.test/front*end"] } ]
        to: [ { paths: ["/api/*", "/other"] } ]
"#;

const DUPLICATE_NAME: &str = r#"
policies:
  - name: backend-allow-frontend
    target: { spiffe_ids: ["spiffe://mesh.test/backend"] }
    action: ALLOW
    rules:
      - from: [ { principals: ["spiffe://mesh.test/frontend"] } ]
        to: [ { paths: ["/api/*"] } ]
  - name: backend-allow-frontend
    target: { spiffe_ids: ["spiffe://mesh.test/backend"] }
    action: ALLOW
    rules:
      - from: [ { principals: ["spiffe://mesh.test/frontend"] } ]
        to: [ { paths: ["/other"] } ]
"#;

const POLICY_ERRORS: &str = "ward_proxy_policy_errors_total";

/// The last good policies (from `common::POLICIES`) are in force.
async fn last_good_policies_hold(mesh: &Mesh, ctx: &str) {
    let out = mesh.outbound();
    assert_eq!(get(out, "/api/hello").await.status, 200, "{ctx}");
    assert_eq!(get(out, "/other").await.status, 403, "{ctx}");
    assert_eq!(get(out, "/api/admin/x").await.status, 403, "{ctx}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_policy_files_keep_the_last_good_policies() {
    let dir = tempfile::tempdir().unwrap();
    let (mesh, _seen) = mesh_with(dir.path(), |_| {}, |_| {}).await;
    let admin = mesh.backend.admin_addr;
    last_good_policies_hold(&mesh, "at start").await;
    let m = common::admin(admin, "/metrics").await;
    assert_eq!(metric(&m, POLICY_ERRORS), 0.0, "{m}");
    assert_eq!(metric(&m, "ward_proxy_policies"), 2.0, "{m}");

    for (n, (what, text)) in [
        ("invalid YAML", BAD_YAML),
        ("an invalid SPIFFE ID pattern", BAD_ID_PATTERN),
        ("a duplicate policy name", DUPLICATE_NAME),
    ]
    .into_iter()
    .enumerate()
    {
        write_atomic(&mesh.policies, text.as_bytes());
        // More than two reload intervals (100 ms).
        tokio::time::sleep(Duration::from_millis(300)).await;
        let m = wait_metric(admin, POLICY_ERRORS, (n + 1) as f64).await;
        assert_eq!(metric(&m, POLICY_ERRORS), (n + 1) as f64, "{what}:\n{m}");
        assert_eq!(metric(&m, "ward_proxy_policies"), 2.0, "{what}:\n{m}");
        last_good_policies_hold(&mesh, &format!("after {what}")).await;
        let names: Vec<String> = mesh
            .backend
            .authz
            .policy_set()
            .policies()
            .iter()
            .map(|p| p.name.clone())
            .collect();
        assert_eq!(
            names,
            ["backend-allow-frontend", "backend-deny-admin"],
            "{what}"
        );
    }

    // A valid change takes effect at the next reload (every 100 ms here; the bound is wide so
    // a loaded machine does not fail it — the test is that it applies, not how fast).
    let changed = POLICIES.replace(r#""/grpc.*"]"#, r#""/grpc.*", "/other"]"#);
    assert_ne!(changed, POLICIES);
    let written = Instant::now();
    write_atomic(&mesh.policies, changed.as_bytes());
    loop {
        if get(mesh.outbound(), "/other").await.status == 200 {
            break;
        }
        assert!(
            written.elapsed() < Duration::from_secs(10),
            "the valid policy change was not applied within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(get(mesh.outbound(), "/api/admin/x").await.status, 403);
    assert_eq!(get(mesh.outbound(), "/api/hello").await.status, 200);
    let m = common::admin(admin, "/metrics").await;
    assert_eq!(metric(&m, POLICY_ERRORS), 3.0, "{m}");
    mesh.stop().await;
}

/// Two policy rebuilds in quick succession (two file reloads, or a file reload and an agent
/// snapshot) while requests are being decided: the last set must be the one enforced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_changes_are_not_lost_to_a_stale_view_cache() {
    use ward_proxy::authz::Authz;
    use ward_spiffe::SpiffeId;
    use ward_spiffe::policy::{PolicyDoc, Request as AuthzRequest};

    let doc = |paths: &str| -> PolicyDoc {
        serde_yaml_ng::from_str(&format!(
            r#"
policies:
  - name: backend-allow-frontend
    target: {{ spiffe_ids: ["spiffe://mesh.test/backend"] }}
    action: ALLOW
    rules:
      - from: [ {{ principals: ["spiffe://mesh.test/frontend"] }} ]
        to: [ {{ paths: [{paths}] }} ]
"#
        ))
        .unwrap()
    };
    // [0] denies /other, [1] allows it.
    let sets = [
        doc(r#""/api/*""#).policies,
        doc(r#""/api/*", "/other""#).policies,
    ];
    let authz = Arc::new(Authz::new(
        &ward_proxy::config::Authorization::default(),
        ward_proxy::metrics::Metrics::new(),
    ));
    let stale = tokio::task::spawn_blocking(move || {
        let src = SpiffeId::new("spiffe://mesh.test/frontend").unwrap();
        let target = SpiffeId::new("spiffe://mesh.test/backend").unwrap();
        let req = AuthzRequest {
            source: Some(&src),
            target: &target,
            method: Some("GET"),
            path: Some("/other"),
            port: 15006,
        };
        let mut stale = Vec::new();
        for i in 0..2000 {
            let last = i % 2;
            std::thread::scope(|s| {
                for _ in 0..2 {
                    s.spawn(|| {
                        for _ in 0..200 {
                            authz.decide(&req);
                        }
                    });
                }
                s.spawn(|| {
                    authz.set_file_policies(sets[1 - last].clone()).unwrap();
                    authz.set_file_policies(sets[last].clone()).unwrap();
                });
            });
            // Every thread is done: only the last set may decide from now on.
            let in_force = authz.policy_set().policies()[0].rules[0].to[0].paths.len();
            assert_eq!(in_force, last + 1);
            let allowed = (0..10).map(|_| authz.decide(&req).verdict.allowed);
            if allowed.clone().any(|a| a != (last == 1)) {
                stale.push((i, allowed.collect::<Vec<_>>()));
            }
        }
        stale
    })
    .await
    .unwrap();
    assert!(
        stale.is_empty(),
        "{} of 2000 rounds kept deciding with the superseded set, e.g. {:?}",
        stale.len(),
        &stale[..stale.len().min(5)]
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Dry run.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_lets_denied_requests_through_and_logs_would_deny() {
    let dir = tempfile::tempdir().unwrap();
    let (mesh, seen) = mesh_with(
        dir.path(),
        |b| b.authorization.mode = AuthzMode::DryRun,
        |_| {},
    )
    .await;
    let out = mesh.outbound();
    let log = mesh.dir.join("backend-access.jsonl");

    // No ALLOW rule matches.
    let r = get(out, "/other").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["path"], "/other");
    let rec = wait_record(&log, "would-deny /other", |r| r["path"] == "/other").await;
    assert_eq!(rec["decision"], "would-deny", "{rec}");
    assert_eq!(rec["status"], 200, "{rec}");
    assert_eq!(rec["reason"], "no ALLOW policy matched", "{rec}");

    // A DENY policy matches.
    let r = request(out, "DELETE", "/api/admin/users", &[], false).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let rec = wait_record(&log, "would-deny /api/admin/users", |r| {
        r["path"] == "/api/admin/users"
    })
    .await;
    assert_eq!(rec["decision"], "would-deny", "{rec}");
    assert_eq!(rec["policy"], "backend-deny-admin", "{rec}");

    // Allowed requests are plain `allow`.
    assert_eq!(get(out, "/api/hello").await.status, 200);
    let rec = wait_record(&log, "allow /api/hello", |r| r["path"] == "/api/hello").await;
    assert_eq!(rec["decision"], "allow", "{rec}");

    assert_eq!(
        seen.paths(),
        vec!["/other", "/api/admin/users", "/api/hello"]
    );
    let m = common::admin(mesh.backend.admin_addr, "/metrics").await;
    assert!(
        m.contains(
            "ward_proxy_requests_total{listener=\"public\",decision=\"would-deny\",policy=\"backend-deny-admin\"} 1"
        ),
        "{m}"
    );
    assert!(
        m.contains(
            "ward_proxy_requests_total{listener=\"public\",decision=\"would-deny\",policy=\"none\"} 1"
        ),
        "{m}"
    );
    assert_chain_intact(&log);
    mesh.stop().await;
}

/// `AuthzMode::DryRun` is documented as "log what would be denied, deny nothing", but the
/// inbound refuses ambiguous paths before (and regardless of) the authorization mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_does_not_deny_ambiguous_paths() {
    let dir = tempfile::tempdir().unwrap();
    let (mesh, seen) = mesh_with(
        dir.path(),
        |b| b.authorization.mode = AuthzMode::DryRun,
        |_| {},
    )
    .await;
    let log = mesh.dir.join("backend-access.jsonl");
    let r = get(mesh.outbound(), "/api/a%2fb").await;
    let rec = wait_record(&log, "for /api/a%2fb", |r| r["path"] == "/api/a%2fb").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(rec["decision"], "would-deny", "{rec}");
    assert_eq!(seen.len(), 1);
    mesh.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Several requests on one connection: each is authorized on its own.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_and_smuggled_requests_are_authorized_one_by_one() {
    let dir = tempfile::tempdir().unwrap();
    let (mesh, seen) = mesh_with(dir.path(), |_| {}, |_| {}).await;
    let cfg = || client_config(&rustls::version::TLS13, Some(&mesh.pki.svid("/frontend")));

    // Pipelined: an allowed request, then a denied one, on one TLS connection.
    let (resp, end) = direct_tls(
        mesh.inbound(),
        cfg(),
        b"GET /api/hello HTTP/1.1\r\nHost: backend\r\n\r\n\
          GET /api/admin/x HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n",
    )
    .await;
    let text = String::from_utf8_lossy(&resp).into_owned();
    assert!(text.starts_with("HTTP/1.1 200"), "{end}: {text}");
    assert_eq!(text.matches("HTTP/1.1 ").count(), 2, "{end}: {text}");
    assert!(text.contains("HTTP/1.1 403"), "{end}: {text}");

    // CL.TE: hyper lets Transfer-Encoding win and closes the connection after such a request,
    // so the "body" after the last chunk is never a request; were it parsed as one, it would be
    // authorized (and denied) on its own. Either way it is not smuggled to the app.
    let smuggle = b"POST /api/hello HTTP/1.1\r\nHost: backend\r\nContent-Length: 60\r\n\
        Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n\
        GET /api/admin/x HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n";
    let (resp, end) = direct_tls(mesh.inbound(), cfg(), smuggle).await;
    let text = String::from_utf8_lossy(&resp).into_owned();
    let statuses: Vec<&str> = text
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &text[i + 9..i + 12])
        .collect();
    assert!(
        statuses == ["200"] || statuses == ["200", "403"],
        "{end}: {text}"
    );
    assert!(!text.contains("/api/admin"), "{end}: {text}");

    let paths = seen.paths();
    assert!(
        paths.iter().all(|p| p == "/api/hello"),
        "the app saw {paths:?}"
    );
    let log = mesh.dir.join("backend-access.jsonl");
    wait_record(&log, "deny /api/admin/x", |r| {
        r["path"] == "/api/admin/x" && r["decision"] == "deny"
    })
    .await;
    mesh.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 7. Permissive and strict TLS on the inbound listener.

const SPOOFED_PLAIN_GET: &[u8] = b"GET /anything HTTP/1.1\r\nHost: backend\r\n\
    X-Ward-Peer-Id: spiffe://mesh.test/frontend\r\nConnection: close\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissive_mode_serves_plaintext_as_unauthenticated_and_strict_does_not() {
    // Permissive, default all-unauthenticated, no policy at all.
    let dir = tempfile::tempdir().unwrap();
    let (mesh, seen) = mesh_with(
        dir.path(),
        |b| {
            b.inbound_mut()[0].tls = TlsMode::Permissive;
            b.authorization.default = DefaultPolicy::AllUnauthenticated;
            std::fs::write(&b.authorization.policy_files[0], "policies: []\n").unwrap();
        },
        |_| {},
    )
    .await;
    assert!(mesh.backend.authz.policy_set().is_empty());
    let log = mesh.dir.join("backend-access.jsonl");

    // Plaintext straight to the inbound port is served; the spoofed peer ID is removed and
    // none is added.
    let (resp, end) = plain(mesh.inbound(), SPOOFED_PLAIN_GET).await;
    assert!(
        resp.starts_with(b"HTTP/1.1 200"),
        "{end}: {}",
        String::from_utf8_lossy(&resp)
    );
    let j = json_body(&resp);
    assert_eq!(j["peers"], serde_json::json!([]), "{j}");
    assert_eq!(j["path"], "/anything");
    let rec = wait_record(&log, "allow /anything", |r| r["path"] == "/anything").await;
    assert_eq!(rec["decision"], "allow", "{rec}");
    assert_eq!(rec["src"], Value::Null, "{rec}");
    assert_eq!(rec["policy"], "default:all-unauthenticated", "{rec}");

    // mTLS still works on the same port and carries the verified ID.
    let r = get(mesh.outbound(), "/api/hello").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json()["peers"],
        serde_json::json!(["spiffe://mesh.test/frontend"])
    );

    // Once policies target the backend, plaintext cannot pass for the frontend by claiming its
    // ID in the header.
    write_atomic(&mesh.policies, POLICIES.as_bytes());
    let deadline = Instant::now() + Duration::from_secs(5);
    while mesh.backend.authz.policy_set().len() != 2 {
        assert!(Instant::now() < deadline, "policies never reloaded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let spoofed = b"GET /api/hello HTTP/1.1\r\nHost: backend\r\n\
        X-Ward-Peer-Id: spiffe://mesh.test/frontend\r\nConnection: close\r\n\r\n";
    let (resp, end) = plain(mesh.inbound(), spoofed).await;
    assert!(
        resp.starts_with(b"HTTP/1.1 403"),
        "{end}: {}",
        String::from_utf8_lossy(&resp)
    );
    let rec = wait_record(&log, "plaintext deny /api/hello", |r| {
        r["path"] == "/api/hello" && r["decision"] == "deny"
    })
    .await;
    assert_eq!(rec["src"], Value::Null, "{rec}");
    assert_eq!(seen.paths(), vec!["/anything", "/api/hello"]);
    assert_chain_intact(&log);
    mesh.stop().await;

    // Strict (the default): the same plaintext gets no HTTP response.
    let dir = tempfile::tempdir().unwrap();
    let (mesh, seen) = mesh_with(
        dir.path(),
        |b| {
            b.authorization.default = DefaultPolicy::AllUnauthenticated;
            std::fs::write(&b.authorization.policy_files[0], "policies: []\n").unwrap();
        },
        |_| {},
    )
    .await;
    let (resp, end) = plain(mesh.inbound(), SPOOFED_PLAIN_GET).await;
    assert!(
        !contains(&resp, b"HTTP/1.1"),
        "{end}: {}",
        String::from_utf8_lossy(&resp)
    );
    assert_ne!(end, "timeout", "connection left open");
    wait_metric(
        mesh.backend.admin_addr,
        &tls_failures("public", "tls_error"),
        1.0,
    )
    .await;
    assert!(seen.all().is_empty());
    mesh.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 8. TCP.

const TCP_ALLOW: &str = r#"
policies:
  - name: tcp-allow-frontend
    target: { spiffe_ids: ["spiffe://mesh.test/backend"] }
    action: ALLOW
    rules:
      - from: [ { principals: ["spiffe://mesh.test/frontend"] } ]
"#;

/// Echoes `msg` through `addr`; returns what came back and how the connection ended.
async fn echo(addr: SocketAddr, msg: &[u8]) -> (Vec<u8>, String) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(msg).await.unwrap();
    let mut got = vec![0u8; msg.len()];
    match tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut got)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return (Vec::new(), format!("read error: {e}")),
        Err(_) => return (Vec::new(), "timeout".into()),
    }
    tcp.shutdown().await.unwrap();
    let (rest, end) = read_until_close(&mut tcp, Duration::from_secs(5)).await;
    got.extend(rest);
    (got, end)
}

async fn wait_policy(mesh: &Mesh, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let set = mesh.backend.authz.policy_set();
        if set.policies().first().is_some_and(|p| p.name == name) {
            return;
        }
        assert!(Instant::now() < deadline, "policy {name} never loaded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connections_are_authorized_per_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (echo_addr, accepted) = start_counting_echo().await;
    let mesh = Mesh::start_with(
        dir.path(),
        Protocol::Tcp,
        |b| {
            b.inbound_mut()[0].forward_to = echo_addr.to_string();
            std::fs::write(&b.authorization.policy_files[0], TCP_ALLOW).unwrap();
        },
        |_| {},
    )
    .await;
    let backend_log = mesh.dir.join("backend-access.jsonl");
    let frontend_log = mesh.dir.join("frontend-access.jsonl");

    // Allowed: the echo comes back through both proxies.
    let (got, end) = echo(mesh.outbound(), b"ping through the mesh\n").await;
    assert_eq!(got, b"ping through the mesh\n", "{end}");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    let rec = wait_record(&backend_log, "tcp allow", |r| r["decision"] == "allow").await;
    assert_eq!(rec["protocol"], "tcp", "{rec}");
    assert_eq!(rec["policy"], "tcp-allow-frontend", "{rec}");
    assert_eq!(rec["src"], "spiffe://mesh.test/frontend", "{rec}");
    assert_eq!(rec["status"], 0, "{rec}");
    assert_eq!(rec["bytes_in"], 22, "{rec}");
    let rec = wait_record(&frontend_log, "tcp outbound", |r| r["protocol"] == "tcp").await;
    assert_eq!(rec["dst"], "spiffe://mesh.test/backend", "{rec}");

    // Denied three ways; the connection is closed without echo and the app sees nothing.
    let denials = [
        (
            // HTTP-only conditions never match TCP in an ALLOW policy.
            "tcp-allow-methods",
            r#"
policies:
  - name: tcp-allow-methods
    target: { spiffe_ids: ["spiffe://mesh.test/backend"] }
    action: ALLOW
    rules:
      - from: [ { principals: ["spiffe://mesh.test/frontend"] } ]
        to: [ { methods: ["GET"] } ]
"#,
            "none",
        ),
        (
            "tcp-allow-port-1",
            r#"
policies:
  - name: tcp-allow-port-1
    target: { spiffe_ids: ["spiffe://mesh.test/backend"] }
    action: ALLOW
    rules:
      - from: [ { principals: ["spiffe://mesh.test/frontend"] } ]
        to: [ { ports: [1] } ]
"#,
            "none",
        ),
        (
            // ...and always match in a DENY policy (fail closed).
            "tcp-deny-admin-paths",
            r#"
policies:
  - name: tcp-deny-admin-paths
    target: { spiffe_ids: ["spiffe://mesh.test/backend"] }
    action: DENY
    rules:
      - to: [ { paths: ["/admin/*"] } ]
  - name: tcp-allow-frontend
    target: { spiffe_ids: ["spiffe://mesh.test/backend"] }
    action: ALLOW
    rules:
      - from: [ { principals: ["spiffe://mesh.test/frontend"] } ]
"#,
            "tcp-deny-admin-paths",
        ),
    ];
    for (i, (name, text, policy)) in denials.into_iter().enumerate() {
        write_atomic(&mesh.policies, text.as_bytes());
        wait_policy(&mesh, name).await;
        let (got, end) = echo(mesh.outbound(), b"ping\n").await;
        assert!(got.is_empty(), "{name}: echoed {got:?}");
        assert_ne!(end, "timeout", "{name}: connection left open");
        let denied =
            wait_matching(&backend_log, "denying", i + 1, |r| r["decision"] == "deny").await;
        assert_eq!(denied.len(), i + 1, "{name}: {denied:#?}");
        let rec = &denied[i];
        assert_eq!(rec["policy"], policy, "{name}: {rec}");
        assert_eq!(rec["protocol"], "tcp", "{name}: {rec}");
        assert_eq!(rec["src"], "spiffe://mesh.test/frontend", "{name}: {rec}");
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "the app saw a denied connection"
    );
    let m = common::admin(mesh.backend.admin_addr, "/metrics").await;
    assert!(
        m.contains(
            "ward_proxy_requests_total{listener=\"public\",decision=\"deny\",policy=\"none\"} 2"
        ),
        "{m}"
    );
    assert_chain_intact(&backend_log);
    mesh.stop().await;
}
