//! `ward-bench discovery`: service discovery under change, with a real `ward-ca`, `ward-agent`
//! and `ward-proxy` processes. Four measurements, each against a baseline in the same run:
//!
//! 1. An endpoint added in the CA → the first request it serves, under steady load (aim 1 s).
//! 2. An endpoint's proxy killed (SIGKILL) under 1,000 req/s: failed requests, and time until
//!    the frontend ejects it (from its metrics).
//! 3. Added latency of the balanced path (a service of one endpoint) versus the static
//!    single-upstream path to the same backend proxy, with oha at a fixed rate.
//! 4. Frontend RSS using 10 services in a mesh of 10 versus in a mesh of 10,000 services × 10
//!    endpoints (aim ≤ 12 MB).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};
use ward_proto::types;

use crate::lbbench::{app_named, median, oha_at, proxy_yaml, ready, spawn};
use crate::procs::{Ward, bin, free_port, status_kib};

pub(crate) const TD: &str = "disc.bench";

/// Options from the command line.
#[derive(Debug, Clone)]
pub(crate) struct Opts {
    pub(crate) oha: PathBuf,
    pub(crate) rate: u32,
    pub(crate) duration: Duration,
    pub(crate) rounds: usize,
    pub(crate) services: usize,
    pub(crate) endpoints: usize,
}

pub(crate) fn endpoint(addr: &str, port: u16) -> types::ServiceEndpoint {
    types::ServiceEndpoint {
        address: addr.into(),
        ports: [("http".to_owned(), u32::from(port))].into_iter().collect(),
        spiffe_ids: vec![format!("spiffe://{TD}/api")],
        ready: true,
        serving: true,
        ..Default::default()
    }
}

pub(crate) fn service(name: &str, endpoints: Vec<types::ServiceEndpoint>) -> types::Service {
    types::Service {
        name: name.into(),
        ports: vec![types::ServicePort {
            name: "http".into(),
            port: 80,
            target_port: 0,
        }],
        endpoints,
        ..Default::default()
    }
}

pub(crate) async fn put(ward: &Ward, services: Vec<types::Service>) -> Result<()> {
    ward.admin()
        .put_services(ward_proto::admin::PutServicesRequest { services })
        .await?;
    Ok(())
}

/// A proxy process with `listeners` (and discovery unless `static_only`).
pub(crate) fn proxy(
    ward: &Ward,
    dir: &std::path::Path,
    name: &str,
    id: &str,
    listeners: &str,
    discovery: bool,
) -> Result<(Child, u16)> {
    let admin = free_port()?;
    let yaml = proxy_yaml(
        TD,
        &ward.agent_socket(),
        id,
        admin,
        listeners,
        if discovery { "discovery: {}\n" } else { "" },
    );
    let f = dir.join(format!("{name}.yaml"));
    std::fs::write(&f, yaml)?;
    let c = spawn(
        Command::new(bin("ward-proxy")?)
            .env("WARD_PROXY_WORKER_THREADS", "1")
            .args(["run", "--config"])
            .arg(&f),
    )?;
    Ok((c, admin))
}

pub(crate) fn inbound(port: u16, app: std::net::SocketAddr) -> String {
    format!("  - {{ role: inbound, name: in, listen: 127.0.0.1:{port}, forward_to: \"{app}\" }}\n")
}

fn outbound(name: &str, port: u16, upstream: &str) -> String {
    format!(
        "  - {{ role: outbound, name: {name}, listen: 127.0.0.1:{port}, upstream: \"{upstream}\", expected_ids: [\"spiffe://{TD}/api\"] }}\n"
    )
}

/// One answer of the open-loop load.
struct Answer {
    sent: Instant,
    done: Instant,
    status: u16,
    body: Bytes,
}

/// Sends `rate` requests per second to `port` until `stop` is set, each on its own task so a
/// slow answer does not hold back the next (open loop); every request gives up after 10 s.
fn load(
    port: u16,
    rate: u32,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<Vec<Answer>> {
    tokio::spawn(async move {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_max_idle_per_host(512)
                .build_http::<Full<Bytes>>();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let (client, tx) = (client.clone(), tx.clone());
                    tokio::spawn(async move {
                        let sent = Instant::now();
                        let req = hyper::Request::builder()
                            .uri(format!("http://127.0.0.1:{port}/"))
                            .body(Full::new(Bytes::new()));
                        let Ok(req) = req else { return };
                        let got = tokio::time::timeout(Duration::from_secs(10), async {
                            let r = client.request(req).await.ok()?;
                            let status = r.status().as_u16();
                            let body = r.into_body().collect().await.ok()?.to_bytes();
                            Some((status, body))
                        })
                        .await
                        .ok()
                        .flatten();
                        let (status, body) = got.unwrap_or((0, Bytes::new()));
                        let _ = tx.send(Answer { sent, done: Instant::now(), status, body });
                    });
                }
                _ = stop.changed() => break,
            }
        }
        drop(tx);
        let mut out = Vec::new();
        while let Ok(Some(a)) = tokio::time::timeout(Duration::from_secs(15), rx.recv()).await {
            out.push(a);
        }
        out
    })
}

pub(crate) async fn metric(admin: u16, line_prefix: &str) -> Option<f64> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let r = client
        .get(format!("http://127.0.0.1:{admin}/metrics").parse().ok()?)
        .await
        .ok()?;
    let b = r.into_body().collect().await.ok()?.to_bytes();
    String::from_utf8_lossy(&b)
        .lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

fn rss_kib(c: &Child) -> Result<u64> {
    status_kib(c.id().context("exited")?, "VmRSS")
}

pub(crate) async fn requests(port: u16, n: usize) -> Result<usize> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let mut ok = 0;
    for _ in 0..n {
        let r = client
            .get(format!("http://127.0.0.1:{port}/").parse()?)
            .await;
        if r.is_ok_and(|r| r.status() == 200) {
            ok += 1;
        }
    }
    Ok(ok)
}

/// Runs the benchmark and prints the tables.
pub(crate) async fn run(o: Opts) -> Result<()> {
    let ward = crate::lbbench::api_and_client(TD).await?;
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let mut procs: Vec<Child> = Vec::new();
    // Three backend proxies, each in front of an app that names itself.
    let mut backends = Vec::new();
    for (i, name) in ["b0\n", "b1\n", "b2\n"].into_iter().enumerate() {
        let a = app_named(Duration::from_millis(1), name).await?;
        let port = free_port()?;
        let (c, _) = proxy(
            &ward,
            d,
            &format!("backend{i}"),
            "api",
            &inbound(port, a),
            false,
        )?;
        backends.push((c, port));
    }
    let ports: Vec<u16> = backends.iter().map(|b| b.1).collect();
    let bport = |i: usize| ports[i];
    put(
        &ward,
        vec![service(
            "api.disc",
            vec![
                endpoint("127.0.0.1", bport(0)),
                endpoint("127.0.0.1", bport(1)),
            ],
        )],
    )
    .await?;
    let front_port = free_port()?;
    let (front, front_admin) = proxy(
        &ward,
        d,
        "front",
        "client",
        &outbound("api", front_port, "api.disc:80"),
        true,
    )?;
    procs.push(front);
    ready(front_port).await?;

    // 1. An endpoint added → the first request it serves, under load.
    let (stop_tx, stop_rx) = watch::channel(false);
    let running = load(front_port, o.rate, stop_rx);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let added = Instant::now();
    put(
        &ward,
        vec![service(
            "api.disc",
            (0..3).map(|i| endpoint("127.0.0.1", bport(i))).collect(),
        )],
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;

    // 2. An endpoint's proxy killed under load.
    let killed_port = bport(1);
    let killed = Instant::now();
    backends[1].0.start_kill()?;
    let ejection_metric = format!(
        "ward_proxy_endpoint_ejections_total{{service=\"api.disc\",endpoint=\"127.0.0.1:{killed_port}\"}}"
    );
    let error_metric = format!(
        "ward_proxy_endpoint_requests_total{{service=\"api.disc\",endpoint=\"127.0.0.1:{killed_port}\",outcome=\"error\"}}"
    );
    // For 10 s: when the frontend ejects it, and every attempt it still makes on it.
    let mut ejected = None;
    let (mut attempts, mut last_attempt) = (0.0, None);
    let deadline = killed + Duration::from_secs(10);
    while Instant::now() < deadline {
        if ejected.is_none()
            && metric(front_admin, &ejection_metric)
                .await
                .is_some_and(|v| v >= 1.0)
        {
            ejected = Some(killed.elapsed());
        }
        if let Some(v) = metric(front_admin, &error_metric).await
            && v > attempts
        {
            attempts = v;
            last_attempt = Some(killed.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _ = stop_tx.send(true);
    let answers = running.await?;
    let first_new = answers
        .iter()
        .filter(|a| a.sent >= added && a.body.as_ref() == b"b2\n")
        .map(|a| a.sent.duration_since(added))
        .min();
    // Requests still open at the kill count with it: they were the ones it could break.
    let failed_before = answers
        .iter()
        .filter(|a| a.done < killed && a.status != 200)
        .count();
    let after_kill: Vec<&Answer> = answers.iter().filter(|a| a.done >= killed).collect();
    let failed_after = after_kill.iter().filter(|a| a.status != 200).count();
    let retries = metric(
        front_admin,
        "ward_proxy_retries_total{service=\"api.disc\"}",
    )
    .await
    .unwrap_or(0.0);
    println!(
        "Discovery under change, {} req/s open loop through one frontend (P2C):\n",
        o.rate
    );
    println!("| measurement | value | baseline / aim |\n|---|---|---|");
    match first_new {
        Some(t) => println!(
            "| endpoint added in the CA → first request it serves | {:.0} ms | aim 1000 ms: {:.3}× |",
            t.as_secs_f64() * 1e3,
            t.as_secs_f64()
        ),
        None => println!(
            "| endpoint added in the CA → first request it serves | never (in 5 s) | aim 1000 ms |"
        ),
    }
    println!(
        "| failed requests open at or sent after a kill (SIGKILL, endpoint still listed) | {failed_after} of {} | {failed_before} of {} before the kill |",
        after_kill.len(),
        answers.len() - after_kill.len()
    );
    let window = answers
        .iter()
        .filter(|a| a.sent >= killed && a.sent < killed + Duration::from_secs(10))
        .count();
    println!(
        "| attempts on the dead endpoint in the 10 s after the kill | {attempts} | {window} requests sent meanwhile |"
    );
    match last_attempt {
        Some(t) => println!(
            "| kill → last attempt on it | {:.0} ms | |",
            t.as_secs_f64() * 1e3
        ),
        None => println!("| kill → last attempt on it | none seen | |"),
    }
    match ejected {
        Some(t) => println!(
            "| kill → ejected (3 failures in a row) | {:.0} ms | |",
            t.as_secs_f64() * 1e3
        ),
        None => println!(
            "| kill → ejected (3 failures in a row) | not in 10 s: the failure penalty keeps it unpicked | |"
        ),
    }
    println!("| retries during the run | {retries} | budget: 20 % of requests + 10/s |");

    // 3. The balanced path versus the static single-upstream path to the same backend proxy.
    put(
        &ward,
        vec![service("one.disc", vec![endpoint("127.0.0.1", bport(0))])],
    )
    .await?;
    let (sp, bp) = (free_port()?, free_port()?);
    let listeners = outbound("static", sp, &format!("127.0.0.1:{}", bport(0)))
        + &outbound("balanced", bp, "one.disc:80");
    let (both, _) = proxy(&ward, d, "paths", "client", &listeners, true)?;
    procs.push(both);
    ready(sp).await?;
    ready(bp).await?;
    let paths = [
        ("static single upstream", sp),
        ("balanced (service of one endpoint)", bp),
    ];
    let mut p50 = vec![Vec::new(); 2];
    let mut p99 = vec![Vec::new(); 2];
    for (_, port) in paths {
        oha_at(&o.oha, 16, o.rate, Duration::from_secs(3), port).await?;
    }
    for round in 0..o.rounds.max(1) {
        for k in 0..2 {
            let i = (k + round) % 2;
            let pt = oha_at(&o.oha, 16, o.rate, o.duration, paths[i].1).await?;
            if pt.ok < 0.999 {
                bail!("{}: success rate {}", paths[i].0, pt.ok);
            }
            p50[i].push(pt.p50);
            p99[i].push(pt.p99);
        }
    }
    let (s50, s99, b50, b99) = (
        median(&mut p50[0]),
        median(&mut p99[0]),
        median(&mut p50[1]),
        median(&mut p99[1]),
    );
    println!(
        "\nBalanced vs static path, {} req/s, 16 connections, {} s per point, median of {} rounds:\n",
        o.rate,
        o.duration.as_secs(),
        o.rounds
    );
    println!("| path | p50 ms | p99 ms |\n|---|---|---|");
    println!("| {} | {s50:.3} | {s99:.3} |", paths[0].0);
    println!("| {} | {b50:.3} | {b99:.3} |", paths[1].0);
    println!(
        "\nbalanced / static: p50 {:.3}×, p99 {:.3}×",
        b50 / s50,
        b99 / s99
    );

    // 4. RSS: a frontend using 10 services, in a mesh of 10 and in a mesh of N × M.
    let used = 10;
    // The used services' endpoints: one backend proxy with an inbound listener per endpoint,
    // so every endpoint answers.
    let pool_ports: Vec<u16> = (0..o.endpoints)
        .map(|_| free_port())
        .collect::<Result<_>>()?;
    let pool_app = app_named(Duration::from_millis(1), "pool\n").await?;
    let pool_listeners: String = pool_ports
        .iter()
        .enumerate()
        .map(|(i, p)| inbound(*p, pool_app).replace("name: in,", &format!("name: in{i},")))
        .collect();
    let (pool, _) = proxy(&ward, d, "pool", "api", &pool_listeners, false)?;
    procs.push(pool);
    let used_services: Vec<types::Service> = (0..used)
        .map(|i| {
            let eps = pool_ports
                .iter()
                .map(|p| endpoint("127.0.0.1", *p))
                .collect();
            service(&format!("used-{i}.disc"), eps)
        })
        .collect();
    put(&ward, used_services.clone()).await?;
    let rss_proxy = |name: &str| -> Result<(Child, Vec<u16>)> {
        let ports: Vec<u16> = (0..used).map(|_| free_port()).collect::<Result<_>>()?;
        let listeners: String = ports
            .iter()
            .enumerate()
            .map(|(i, p)| outbound(&format!("u{i}"), *p, &format!("used-{i}.disc:80")))
            .collect();
        let (c, _) = proxy(&ward, d, name, "client", &listeners, true)?;
        Ok((c, ports))
    };
    let use_all = |ports: Vec<u16>| async move {
        let mut ok = 0;
        for p in &ports {
            ready(*p).await?;
            ok += requests(*p, 50).await?;
        }
        anyhow::Ok(ok)
    };
    let (small, ports) = rss_proxy("rss-small")?;
    ready(ports[0]).await?;
    let rss_started = rss_kib(&small)?;
    let ok_small = use_all(ports).await?;
    let rss_small = rss_kib(&small)?;
    let t = Instant::now();
    let others = o.services.saturating_sub(used);
    for chunk in (0..others).collect::<Vec<_>>().chunks(500) {
        let batch = chunk
            .iter()
            .map(|i| {
                let eps = (0..o.endpoints)
                    .map(|j| endpoint(&format!("10.{}.{}.{}", i / 250 % 250, i % 250, j + 1), 8080))
                    .collect();
                service(&format!("svc-{i}.disc"), eps)
            })
            .collect();
        put(&ward, batch).await?;
    }
    // Written after the others, so once it resolves with its new endpoint the agent has them all.
    let mut last = used_services[used - 1].clone();
    last.endpoints.push(endpoint("127.0.0.1", bport(2)));
    put(&ward, vec![last]).await?;
    let (big, ports) = rss_proxy("rss-big")?;
    let ok_big = use_all(ports).await?;
    let written = t.elapsed();
    let rss_big = rss_kib(&big)?;
    let rss_small_after = rss_kib(&small)?;
    let agent_rss = ward.agent_rss()?;
    println!(
        "\nFrontend proxy RSS using {used} services ({} endpoints each, {} requests answered of {}):\n",
        o.endpoints,
        ok_small + ok_big,
        2 * used * 50
    );
    println!("| mesh | proxy RSS | |\n|---|---|---|");
    println!(
        "| (the same proxy started, before it used them) | {:.1} MiB | |",
        rss_started as f64 / 1024.0
    );
    println!(
        "| {used} services | {:.1} MiB | baseline |",
        rss_small as f64 / 1024.0
    );
    println!(
        "| {} services × {} endpoints (written in {:.1} s) | {:.1} MiB | {:.3}× baseline; aim 12 MB: {:.3}× |",
        o.services,
        o.endpoints,
        written.as_secs_f64(),
        rss_big as f64 / 1024.0,
        rss_big as f64 / rss_small as f64,
        rss_big as f64 * 1024.0 / 12e6
    );
    println!(
        "| the {used}-service proxy after the mesh grew | {:.1} MiB | {:.3}× |",
        rss_small_after as f64 / 1024.0,
        rss_small_after as f64 / rss_small as f64
    );
    println!(
        "\n(agent RSS holding the whole mesh: {:.1} MiB)",
        agent_rss as f64 / 1024.0
    );
    procs.push(small);
    procs.push(big);
    for (c, _) in backends {
        procs.push(c);
    }
    for mut c in procs {
        let _ = c.kill().await;
    }
    ward.stop().await;
    Ok(())
}
