//! The proxy's HTTP stage driven in memory: the input is a client's byte stream (HTTP/1.1, or
//! HTTP/2 from its preface) or, in structured mode, one HTTP/2 request sent with hyper's
//! client; it goes to `forward::http::serve` of an inbound (enforce or dry-run policy) or an
//! outbound listener over `tokio::io::duplex`, and what the proxy delivers reaches an
//! in-memory application. No sockets; time is tokio's paused clock, so the header and idle
//! timeouts pass at once.
//!
//! Checks: never a panic (libFuzzer's hook aborts on one in any task); a client silent after
//! its bytes half-closes after `BOUND` (60 s, above the idle timeout), and the connection
//! ends within `BOUND` of that; an HTTP/1 answer starts with a status line and
//! headers that parse, an HTTP/2 one with SETTINGS and whole frames; a request that reaches
//! the application carries at most one Host header, no method override and no
//! `x-ward-orig-proto`, and of the peer-ID header's spellings (`-`/`_`) only the header itself,
//! once, with the verified ID (none for an unauthenticated caller); nothing reaches an
//! application from the outbound listener (it only talks to peer proxies).
//!
//! The first byte chooses: bits 0–1 the caller (0: inbound, verified `frontend`; 1: inbound,
//! unauthenticated; 2: inbound, verified `other`; 3: outbound), bits 2–3 the HTTP version to
//! the application (auto, 1.1, 2), bit 4 whether the client half-closes after its bytes, bit 5
//! the dry-run listener, bit 6 structured HTTP/2 mode (first line `METHOD TARGET`, then
//! `name: value` lines, a blank line, the body).
#![no_main]

use std::convert::Infallible;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use ward_proxy::config::{AppProtocol, Authorization, AuthzMode, HttpLimits, Protocol, TlsMode};
use ward_proxy::pipeline::{ConnInfo, ListenerCtx, RoleCfg, Shared};
use ward_spiffe::policy::{DefaultPolicy, PolicyDoc};
use ward_spiffe::{Bundle, SpiffeId, TrustDomain};

const TD: &str = "mesh.test";
const HEADER: &str = "x-ward-peer-id";
const IDLE: Duration = Duration::from_secs(10);
/// Virtual time a silent client waits before it half-closes, and a connection may take after
/// that: the idle timeout closes a connection with no request in flight, the application
/// answers at once, and a request whose body stalls ends when its client goes away.
const BOUND: Duration = Duration::from_secs(60);

/// The tests' policies: `frontend` may GET and POST `/api/*` and `/grpc.*` of `backend`,
/// nobody `/api/admin/*`.
const POLICIES: &str = r#"
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

/// No per-input leak check here: the runtime, its connection pools and their idle in-memory
/// connections live across inputs by design, and LeakSanitizer took a buffer parked in one
/// for a leak (the input alone does not reproduce it). Memory that grows across inputs still
/// fails the run at `-rss_limit_mb`.
#[unsafe(no_mangle)]
pub extern "C" fn __lsan_default_options() -> *const std::ffi::c_char {
    c"detect_leaks=0".as_ptr()
}

/// What the application saw of one request.
#[derive(Debug)]
struct Seen {
    names: Vec<String>,
    peer_values: Vec<String>,
    hosts: usize,
}

struct World {
    rt: tokio::runtime::Runtime,
    enforce: Arc<ListenerCtx>,
    dry_run: Arc<ListenerCtx>,
    outbound: Arc<ListenerCtx>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let pki = ward_testing::Pki::new(TD);
        let issued = pki.svid("/backend");
        let mut bundle = Bundle::new(TrustDomain::new(TD).unwrap());
        bundle.x509_authorities = vec![pki.root_der().to_vec()];
        let inbound_role = RoleCfg::Inbound {
            forward_to: "127.0.0.1:8080".into(),
            app_port: 8080,
            tls: TlsMode::Strict,
            app_protocol: AppProtocol::Auto,
        };
        let (enforce, dry_run, outbound) = rt.block_on(async {
            let shared = |mode: AuthzMode, svid: bool| {
                let sink = ward_proxy::identity::new_sink(false);
                if svid {
                    let s = ward_net::Svid::from_parts(
                        issued.chain_der.clone(),
                        issued.key_der.clone(),
                    )
                    .unwrap();
                    ward_proxy::identity::install(&sink, bundle.clone(), s).unwrap();
                }
                let metrics = ward_proxy::metrics::Metrics::new();
                let cfg = Authorization {
                    mode,
                    default: DefaultPolicy::Deny,
                    ..Default::default()
                };
                let authz = ward_proxy::authz::Authz::new(&cfg, metrics.clone());
                let doc: PolicyDoc = serde_yaml_ng::from_str(POLICIES).unwrap();
                authz.set_file_policies(doc.policies).unwrap();
                let seen = seen.clone();
                let dial: ward_proxy::forward::pools::MemoryDial = Arc::new(move |_addr: &str| {
                    let (proxy_end, app_end) = tokio::io::duplex(64 * 1024);
                    tokio::spawn(app(app_end, seen.clone()));
                    proxy_end
                });
                Arc::new(Shared {
                    server_tls: ward_proxy::pipeline::server_tls(sink.clone()),
                    sink,
                    authz: Arc::new(authz),
                    obs: ward_proxy::observe::Observer { log: None, metrics },
                    header: http::HeaderName::from_static(HEADER),
                    apps: ward_proxy::forward::pools::AppClients::in_memory(dial),
                    upstreams: Default::default(),
                    discovery: None,
                    balancer: Default::default(),
                    discovery_cfg: Default::default(),
                    egress: None,
                    forward_method_override: false,
                    http_limits: HttpLimits {
                        header_read_timeout: Duration::from_secs(5),
                        ..HttpLimits::default()
                    },
                    idle_timeout: IDLE,
                    gateway: None,
                })
            };
            let ctx = |name: &str, role: RoleCfg, shared| {
                Arc::new(ListenerCtx {
                    name: name.into(),
                    port: 4143,
                    protocol: Protocol::Http,
                    role,
                    shared,
                })
            };
            (
                ctx(
                    "public",
                    inbound_role.clone(),
                    shared(AuthzMode::Enforce, true),
                ),
                ctx("dry-run", inbound_role, shared(AuthzMode::DryRun, true)),
                // No SVID: a request planned to a peer proxy fails at the connector, before
                // any socket.
                ctx(
                    "backend",
                    RoleCfg::Outbound {
                        upstream: "127.0.0.1:4143".into(),
                        expected: vec![SpiffeId::new("spiffe://mesh.test/backend").unwrap()],
                    },
                    shared(AuthzMode::Enforce, false),
                ),
            )
        });
        World {
            rt,
            enforce,
            dry_run,
            outbound,
            seen,
        }
    })
}

/// The in-memory application: records what it got and answers 200.
async fn app(io: tokio::io::DuplexStream, seen: Arc<Mutex<Vec<Seen>>>) {
    let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let h = req.headers();
        let s = Seen {
            names: h.keys().map(|k| k.as_str().to_owned()).collect(),
            peer_values: h
                .iter()
                .filter(|(k, _)| peer_spelling(k.as_str()))
                .map(|(_, v)| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .collect(),
            hosts: h.get_all(http::header::HOST).iter().count(),
        };
        seen.lock().unwrap().push(s);
        async move {
            let _ = req.into_body().collect().await;
            Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(b"ok"))))
        }
    });
    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(io), svc)
        .await;
}

/// A name an application stack may read as the peer-ID header (`_` and `-` alike).
fn peer_spelling(n: &str) -> bool {
    n.len() == HEADER.len()
        && n.bytes()
            .zip(HEADER.bytes())
            .all(|(a, b)| a.eq_ignore_ascii_case(&b) || (a == b'_' && b == b'-'))
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let w = world();
    let (l, peer) = match sel & 3 {
        0 => (w.enforce.clone(), Some("spiffe://mesh.test/frontend")),
        1 => (w.enforce.clone(), None),
        2 => (w.enforce.clone(), Some("spiffe://mesh.test/other")),
        _ => (w.outbound.clone(), None),
    };
    let l = if sel & 0x20 != 0 && l.role.is_inbound() {
        w.dry_run.clone()
    } else {
        l
    };
    let app_protocol = match (sel >> 2) & 3 {
        1 => AppProtocol::Http1,
        2 => AppProtocol::Http2,
        _ => AppProtocol::Auto,
    };
    let inbound = l.role.is_inbound();
    let conn = ConnInfo {
        remote: "10.0.0.7:40000".parse().unwrap(),
        peer: peer.map(|p| SpiffeId::new(p).unwrap()),
        orig_dst: None,
        port: 8080,
        target: String::new(),
        app_protocol,
        hello: None,
    };
    let half_close = sel & 0x10 != 0;
    w.seen.lock().unwrap().clear();
    let (client, server) = tokio::io::duplex(64 * 1024);
    let served = ward_proxy::forward::http::serve(l, server, conn, CancellationToken::new());
    let ended = w.rt.block_on(async {
        tokio::time::timeout(2 * BOUND, async {
            if sel & 0x40 != 0 {
                tokio::join!(served, structured_h2(client, rest));
            } else {
                let ((), out) = tokio::join!(served, raw(client, rest, half_close));
                if debug() {
                    eprintln!("answer: {:?}", String::from_utf8_lossy(&out));
                }
                check_answer(rest, &out);
            }
        })
        .await
    });
    // Let what is still runnable (the application's side of a request cut off) finish.
    w.rt.block_on(async { tokio::time::sleep(Duration::from_millis(1)).await });
    let seen = std::mem::take(&mut *w.seen.lock().unwrap());
    if debug() {
        eprintln!("reached the application: {seen:?}");
    }
    assert!(
        ended.is_ok(),
        "the connection did not end within {BOUND:?} of its client going away"
    );
    if !inbound {
        assert!(
            seen.is_empty(),
            "outbound delivered to an application: {seen:?}"
        );
    }
    for s in &seen {
        assert!(
            s.hosts <= 1,
            "two Host headers reached the application: {s:?}"
        );
        assert!(
            !s.names.iter().any(|n| matches!(
                n.as_str(),
                "x-http-method-override"
                    | "x-http-method"
                    | "x-method-override"
                    | "x-ward-orig-proto"
            )),
            "a header the proxy removes reached the application: {s:?}"
        );
        let spellings: Vec<&String> = s.names.iter().filter(|n| peer_spelling(n)).collect();
        match peer {
            Some(p) => {
                assert_eq!(s.peer_values, [p], "peer-ID header: {s:?}");
                assert!(spellings.iter().all(|n| *n == HEADER), "{s:?}");
            }
            None => assert!(spellings.is_empty(), "peer-ID header without a peer: {s:?}"),
        }
    }
});

/// `WARD_FUZZ_DEBUG=1`: print what the client got and the application saw (triage).
fn debug() -> bool {
    static D: OnceLock<bool> = OnceLock::new();
    *D.get_or_init(|| std::env::var_os("WARD_FUZZ_DEBUG").is_some())
}

/// Writes `input`, half-closes (at once, or after `BOUND` of silence: a request whose body
/// never comes is in flight, and stays so while its client does), and reads the proxy's
/// answer to the end.
async fn raw(mut client: tokio::io::DuplexStream, input: &[u8], half_close: bool) -> Vec<u8> {
    let (mut r, mut wr) = tokio::io::split(&mut client);
    let write = async {
        let _ = wr.write_all(input).await;
        if !half_close {
            tokio::time::sleep(BOUND).await;
        }
        let _ = wr.shutdown().await;
        std::future::pending::<()>().await;
    };
    let mut out = Vec::new();
    tokio::select! {
        _ = r.read_to_end(&mut out) => {}
        () = write => {}
    }
    out
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// An HTTP/1 answer begins with a status line and headers that parse; an HTTP/2 one is
/// whole frames, SETTINGS first.
fn check_answer(input: &[u8], out: &[u8]) {
    if out.is_empty() {
        return;
    }
    if input.starts_with(PREFACE) {
        assert!(
            out.len() >= 9 && out[3] == 4,
            "HTTP/2 answer without SETTINGS first"
        );
        let mut rest = out;
        while !rest.is_empty() {
            assert!(rest.len() >= 9, "a cut HTTP/2 frame header");
            let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            assert!(rest.len() >= 9 + len, "a cut HTTP/2 frame");
            rest = &rest[9 + len..];
        }
        return;
    }
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(out) {
        Ok(httparse::Status::Complete(_)) => {
            let code = resp.code.unwrap_or(0);
            assert!((100..=599).contains(&code), "status {code}");
            // HTTP/1.0 or 1.1 (hyper answers a 1.0 request in 1.0).
            assert!(
                matches!(resp.version, Some(0 | 1)),
                "{:?}",
                String::from_utf8_lossy(out)
            );
        }
        other => panic!(
            "malformed HTTP/1 answer ({other:?}): {:?}",
            String::from_utf8_lossy(out)
        ),
    }
}

/// Structured mode: one HTTP/2 request built from `input` and sent with hyper's client.
async fn structured_h2(client: tokio::io::DuplexStream, input: &[u8]) {
    let (head, body) = match input.windows(2).position(|w| w == b"\n\n") {
        Some(i) => (&input[..i], &input[i + 2..]),
        None => (input, &[][..]),
    };
    let mut lines = head.split(|b| *b == b'\n');
    let first = lines.next().unwrap_or_default();
    let (method, target) = match first.iter().position(|b| *b == b' ') {
        Some(i) => (&first[..i], &first[i + 1..]),
        None => (&b"GET"[..], first),
    };
    let Ok(method) = http::Method::from_bytes(method) else {
        return;
    };
    let target = if target.starts_with(b"/") {
        [&b"http://backend.mesh.test"[..], target].concat()
    } else {
        target.to_vec()
    };
    let Ok(uri) = http::Uri::try_from(target) else {
        return;
    };
    let mut req = hyper::Request::new(Full::new(Bytes::copy_from_slice(body)));
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    for line in lines {
        let Some(i) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let value = line[i + 1..].strip_prefix(b" ").unwrap_or(&line[i + 1..]);
        if let (Ok(n), Ok(v)) = (
            http::HeaderName::from_bytes(&line[..i]),
            http::HeaderValue::from_bytes(value),
        ) {
            req.headers_mut().append(n, v);
        }
    }
    let Ok((mut send, conn)) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(client)).await
    else {
        return;
    };
    let conn = tokio::spawn(conn);
    let resp = send.send_request(req).await;
    if debug() {
        eprintln!("answer: {resp:?}");
    }
    if let Ok(resp) = resp {
        let _ = resp.into_body().collect().await;
    }
    drop(send);
    let _ = conn.await;
}
