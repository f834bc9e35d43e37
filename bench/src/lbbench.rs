//! `ward-bench balance`: three endpoints, one 10× slower, behind three Ward inbound proxies;
//! the same load through a Ward frontend with P2C over peak-EWMA, one with round-robin, and
//! Envoy 1.40 with `LEAST_REQUEST` over the same three endpoints (mTLS to the same proxies,
//! with an SVID the agent wrote as PEM files). A real `ward-ca` and `ward-agent` serve the
//! identities and the service; oha drives a fixed rate; rounds rotate the order and medians
//! are reported.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::Full;
use tokio::process::{Child, Command};

use crate::procs::{Ward, bin, free_port};

const TD: &str = "lb.test";

/// Options from the command line.
#[derive(Debug, Clone)]
pub(crate) struct Opts {
    pub(crate) envoy: PathBuf,
    pub(crate) oha: PathBuf,
    pub(crate) duration: Duration,
    pub(crate) rate: u32,
    pub(crate) connections: u32,
    pub(crate) rounds: usize,
    pub(crate) fast: Duration,
}

async fn app(delay: Duration) -> Result<SocketAddr> {
    app_named(delay, "ok\n").await
}

/// An HTTP app on loopback answering `body` after `delay`.
pub(crate) async fn app_named(delay: Duration, body: &'static str) -> Result<SocketAddr> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| async move {
                    tokio::time::sleep(delay).await;
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                        Bytes::from_static(body.as_bytes()),
                    )))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                .await;
            });
        }
    });
    Ok(addr)
}

pub(crate) fn spawn(cmd: &mut Command) -> Result<Child> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("spawn")
}

pub(crate) fn proxy_yaml(
    td: &str,
    socket: &Path,
    id: &str,
    admin: u16,
    listeners: &str,
    discovery: &str,
) -> String {
    format!(
        "identity:\n  workload_api: {{ socket: \"unix://{}\", spiffe_id: \"spiffe://{td}/{id}\" }}\n\
         admin_address: 127.0.0.1:{admin}\nlog_level: warn\n\
         authorization:\n  default: all-authenticated\n{discovery}listeners:\n{listeners}",
        socket.display()
    )
}

fn envoy_yaml(dir: &Path, admin: u16, listen: u16, endpoints: &[u16]) -> String {
    let d = dir.display();
    let eps: Vec<String> = endpoints
        .iter()
        .map(|p| {
            format!(
                "{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {p} }} }} }} }}"
            )
        })
        .collect();
    format!(
        "admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }} }}\n\
static_resources:\n  listeners:\n  - name: out\n    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {listen} }} }}\n    filter_chains:\n    - filters:\n      - name: envoy.filters.network.http_connection_manager\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager\n          stat_prefix: out\n          codec_type: AUTO\n          route_config: {{ virtual_hosts: [ {{ name: all, domains: [\"*\"], routes: [ {{ match: {{ prefix: \"/\" }}, route: {{ cluster: api }} }} ] }} ] }}\n          http_filters:\n          - name: envoy.filters.http.router\n            typed_config: {{ \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}\n\
\x20 clusters:\n  - name: api\n    type: STATIC\n    lb_policy: LEAST_REQUEST\n    connect_timeout: 5s\n    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        explicit_http_config: {{ http2_protocol_options: {{}} }}\n    load_assignment: {{ cluster_name: api, endpoints: [ {{ lb_endpoints: [ {} ] }} ] }}\n    transport_socket:\n      name: envoy.transport_sockets.tls\n      typed_config:\n        \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext\n        common_tls_context:\n          tls_params: {{ tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3 }}\n          alpn_protocols: [\"h2\"]\n          tls_certificates: [ {{ certificate_chain: {{ filename: \"{d}/svid.pem\" }}, private_key: {{ filename: \"{d}/svid_key.pem\" }} }} ]\n          validation_context:\n            trusted_ca: {{ filename: \"{d}/bundle.pem\" }}\n            match_typed_subject_alt_names: [ {{ san_type: URI, matcher: {{ exact: \"spiffe://{TD}/api\" }} }} ]\n",
        eps.join(", ")
    )
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Point {
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) ok: f64,
}

async fn oha(o: &Opts, port: u16) -> Result<Point> {
    oha_at(&o.oha, o.connections, o.rate, o.duration, port).await
}

/// oha at `rate` req/s over `connections` for `duration` against `port`.
pub(crate) async fn oha_at(
    oha: &Path,
    connections: u32,
    rate: u32,
    duration: Duration,
    port: u16,
) -> Result<Point> {
    let out = Command::new(oha)
        .args([
            "--no-tui",
            "--output-format",
            "json",
            "-c",
            &connections.to_string(),
            "-q",
            &rate.to_string(),
            "--latency-correction",
            "-z",
            &format!("{}s", duration.as_secs()),
            &format!("http://127.0.0.1:{port}/"),
        ])
        .output()
        .await
        .context("run oha")?;
    if !out.status.success() {
        bail!("oha: {}", String::from_utf8_lossy(&out.stderr));
    }
    let j: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let p = &j["latencyPercentiles"];
    let ms = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN) * 1000.0;
    Ok(Point {
        p50: ms(&p["p50"]),
        p99: ms(&p["p99"]),
        ok: j["summary"]["successRate"].as_f64().unwrap_or(0.0),
    })
}

/// Waits until `port` answers 200.
pub(crate) async fn ready(port: u16) -> Result<()> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    for _ in 0..600 {
        let req = hyper::Request::builder()
            .uri(format!("http://127.0.0.1:{port}/"))
            .body(Full::new(Bytes::new()))?;
        if let Ok(r) = client.request(req).await
            && r.status() == 200
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("nothing answers 200 on port {port}")
}

pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A CA of trust domain `td` and an agent with entries `api` and `client` for this process's
/// uid (the backends and the frontends of the discovery benchmarks).
pub(crate) async fn api_and_client(td: &str) -> Result<Ward> {
    let ward = Ward::start_ca(td).await?;
    let agent_id = ward.start_agent().await?;
    let uid = nix::unistd::getuid().as_raw();
    for name in ["api", "client"] {
        ward.admin()
            .create_entry(ward_proto::admin::EntrySpec {
                spiffe_id: format!("spiffe://{td}/{name}"),
                parent_id: agent_id.clone(),
                selectors: vec![format!("unix:uid:{uid}")],
                ..Default::default()
            })
            .await?;
    }
    Ok(ward)
}

/// Runs the benchmark and prints the table.
pub(crate) async fn run(o: Opts) -> Result<()> {
    let ward = api_and_client(TD).await?;
    let sock = ward.agent_socket();
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let mut procs: Vec<Child> = Vec::new();
    let slow = o.fast * 10;
    let mut backend_ports = Vec::new();
    for (i, delay) in [o.fast, o.fast, slow].into_iter().enumerate() {
        let a = app(delay).await?;
        let port = free_port()?;
        let yaml = proxy_yaml(
            TD,
            &sock,
            "api",
            free_port()?,
            &format!(
                "  - {{ role: inbound, name: in, listen: 127.0.0.1:{port}, forward_to: \"{a}\" }}\n"
            ),
            "",
        );
        let f = d.join(format!("backend{i}.yaml"));
        std::fs::write(&f, yaml)?;
        procs.push(spawn(
            Command::new(bin("ward-proxy")?)
                .env("WARD_PROXY_WORKER_THREADS", "1")
                .args(["run", "--config"])
                .arg(&f),
        )?);
        backend_ports.push(port);
    }
    let service = ward_proto::types::Service {
        name: "api.lb".into(),
        ports: vec![ward_proto::types::ServicePort {
            name: "http".into(),
            port: 80,
            target_port: 0,
        }],
        endpoints: backend_ports
            .iter()
            .map(|p| ward_proto::types::ServiceEndpoint {
                address: "127.0.0.1".into(),
                ports: [("http".to_owned(), u32::from(*p))].into_iter().collect(),
                spiffe_ids: vec![format!("spiffe://{TD}/api")],
                ready: true,
                serving: true,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    ward.admin()
        .put_services(ward_proto::admin::PutServicesRequest {
            services: vec![service],
        })
        .await?;
    // Ward frontends: P2C and round-robin.
    let mut fronts = Vec::new();
    for balancer in ["p2c", "round-robin"] {
        let port = free_port()?;
        let yaml = proxy_yaml(
            TD,
            &sock,
            "client",
            free_port()?,
            &format!(
                "  - {{ role: outbound, name: api, listen: 127.0.0.1:{port}, upstream: \"api.lb:80\", expected_ids: [\"spiffe://{TD}/api\"] }}\n"
            ),
            &format!("discovery: {{ balancer: {balancer} }}\n"),
        );
        let f = d.join(format!("front-{balancer}.yaml"));
        std::fs::write(&f, yaml)?;
        procs.push(spawn(
            Command::new(bin("ward-proxy")?)
                .env("WARD_PROXY_WORKER_THREADS", "1")
                .args(["run", "--config"])
                .arg(&f),
        )?);
        fronts.push((format!("Ward {balancer}"), port));
    }
    // Envoy with the client's SVID as files.
    let pem = d.join("pem");
    std::fs::create_dir_all(&pem)?;
    let st = Command::new(bin("ward-agent")?)
        .args([
            "files",
            "--once",
            "--spiffe-id",
            &format!("spiffe://{TD}/client"),
        ])
        .arg("--socket")
        .arg(format!("unix://{}", sock.display()))
        .arg("--dir")
        .arg(&pem)
        .status()
        .await?;
    if !st.success() {
        bail!("ward-agent files failed");
    }
    let eport = free_port()?;
    std::fs::write(
        d.join("envoy.yaml"),
        envoy_yaml(&pem, free_port()?, eport, &backend_ports),
    )?;
    procs.push(spawn(
        Command::new(&o.envoy)
            .args(["--concurrency", "1", "--log-level", "error", "--base-id"])
            .arg((std::process::id() % 60000 + 7).to_string())
            .arg("-c")
            .arg(d.join("envoy.yaml")),
    )?);
    fronts.push(("Envoy LEAST_REQUEST".into(), eport));
    for (_, p) in &fronts {
        ready(*p).await?;
    }
    // Warm-up, then rounds in rotating order.
    for (_, p) in &fronts {
        let mut w = o.clone();
        w.duration = Duration::from_secs(3);
        oha(&w, *p).await?;
    }
    let mut p50s = vec![Vec::new(); fronts.len()];
    let mut p99s = vec![Vec::new(); fronts.len()];
    let mut oks = vec![Vec::new(); fronts.len()];
    for round in 0..o.rounds.max(1) {
        for k in 0..fronts.len() {
            let i = (k + round) % fronts.len();
            let pt = oha(&o, fronts[i].1).await?;
            p50s[i].push(pt.p50);
            p99s[i].push(pt.p99);
            oks[i].push(pt.ok);
        }
    }
    println!(
        "Three endpoints ({} ms, {} ms, {} ms), {} req/s, {} connections, {} s per point, median of {} rounds:\n",
        o.fast.as_millis(),
        o.fast.as_millis(),
        slow.as_millis(),
        o.rate,
        o.connections,
        o.duration.as_secs(),
        o.rounds
    );
    println!("| balancer | p50 ms | p99 ms | success |\n|---|---|---|---|");
    let mut p99 = Vec::new();
    for (i, (name, _)) in fronts.iter().enumerate() {
        let (a, b, c) = (
            median(&mut p50s[i]),
            median(&mut p99s[i]),
            median(&mut oks[i]),
        );
        p99.push(b);
        println!("| {name} | {a:.2} | {b:.2} | {c:.4} |");
    }
    println!(
        "\nWard P2C p99 / round-robin p99 = {:.3}; / Envoy LEAST_REQUEST p99 = {:.3}",
        p99[0] / p99[1],
        p99[0] / p99[2]
    );
    for mut c in procs {
        let _ = c.kill().await;
    }
    ward.stop().await;
    Ok(())
}
