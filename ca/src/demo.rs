//! `ward-ca dev --demo`: two workloads behind two real `ward-proxy` processes on the local trust
//! domain. A demo backend application sits behind the backend proxy, declared as the static
//! mesh service `backend.demo` (what `ward-ca service apply` writes); the frontend proxy's
//! outbound listener resolves that service through the agent and carries requests to its
//! endpoint over mutual TLS. A CA-stored policy lets the frontend `GET /api/*` and nothing
//! else; one allowed and one denied request are made and printed with the access-log lines
//! that record them.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::core::CaCore;
use crate::entries::EntrySpec;

/// The running demo; dropping it stops the proxies.
#[derive(Debug)]
pub struct Demo {
    children: Vec<tokio::process::Child>,
    app: tokio::task::JoinHandle<()>,
}

impl Demo {
    /// Stops the proxies and the demo application.
    pub async fn stop(mut self) {
        for c in &mut self.children {
            crate::dev::stop_child(c).await;
        }
        self.app.abort();
    }
}

/// The demo backend's mesh service.
const SERVICE: &str = "backend.demo";

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| e.to_string())
}

async fn backend_app() -> Result<(SocketAddr, tokio::task::JoinHandle<()>), String> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let addr = l.local_addr().map_err(|e| e.to_string())?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let peer = req
                            .headers()
                            .get("x-ward-peer-id")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("nobody")
                            .to_owned();
                        let body = format!("hello from the backend, {peer}");
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(body))))
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    Ok((addr, task))
}

async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header("host", "backend.demo")
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let r = s.send_request(req).await.map_err(|e| e.to_string())?;
    let status = r.status().as_u16();
    let body = r
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).trim_end().to_owned()))
}

async fn wait_ready(admin: SocketAddr) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if http_get(admin, "/readyz")
            .await
            .is_ok_and(|(s, _)| s == 200)
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!("proxy with admin address {admin} not ready in 30s"))
}

fn spawn_proxy(bin: &Path, config: &Path) -> Result<tokio::process::Child, String> {
    tokio::process::Command::new(bin)
        .arg("run")
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            format!(
                "cannot start {}: {e} (build it with `cargo build`, or pass --proxy-bin)",
                bin.display()
            )
        })
}

/// Sets up and runs the demo; prints what happens to stdout, lines prefixed `demo:`.
pub async fn run(
    core: &CaCore,
    agent_id: &str,
    socket: &Path,
    dir: &Path,
    proxy_bin: &Path,
) -> Result<Demo, String> {
    let td = core.cfg.trust_domain.name().to_owned();
    let uid = nix::unistd::getuid().as_raw();
    let (fe, be) = (
        format!("spiffe://{td}/demo/frontend"),
        format!("spiffe://{td}/demo/backend"),
    );
    for (id, hint) in [(&fe, "frontend"), (&be, "backend")] {
        let spec = EntrySpec {
            spiffe_id: id.clone(),
            parent_id: agent_id.to_owned(),
            selectors: vec![format!("unix:uid:{uid}")],
            hint: hint.into(),
            ..Default::default()
        };
        let exists = core
            .entries
            .list(Some(agent_id), Some(id))
            .await
            .map_err(|e| e.to_string())?;
        if exists.is_empty() {
            core.entries
                .create(&spec, "admin", CaCore::new_entry_id(), core.clock.now())
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    let policy: ward_spiffe::policy::Policy = serde_json::from_value(serde_json::json!({
        "name": "demo-backend-allow-frontend",
        "target": { "spiffe_ids": [be] },
        "action": "ALLOW",
        "rules": [ { "from": [ { "principals": [fe] } ], "to": [ { "methods": ["GET"], "paths": ["/api/*"] } ] } ],
    }))
    .map_err(|e| e.to_string())?;
    core.policies
        .put(vec![policy])
        .await
        .map_err(|e| e.to_string())?;

    let (app, app_task) = backend_app().await?;
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let (inbound, outbound, badmin, fadmin) =
        (free_port()?, free_port()?, free_port()?, free_port()?);
    let log = dir.join("backend-access.jsonl");
    let _ = std::fs::remove_file(&log);
    let sock = format!("unix://{}", socket.display());
    let backend_cfg = format!(
        "identity:\n  workload_api: {{ socket: \"{sock}\", spiffe_id: \"{be}\" }}\n\
         admin_address: 127.0.0.1:{badmin}\n\
         listeners:\n  - {{ role: inbound, name: public, listen: 127.0.0.1:{inbound}, forward_to: \"{app}\", protocol: http }}\n\
         authorization:\n  default: deny\n  from_agent: true\n\
         access_log:\n  path: \"{}\"\nlog_level: warn\n",
        log.display()
    );
    // The backend as a static mesh service: its one endpoint is the backend proxy, which
    // must present the backend's ID.
    let service: ward_spiffe::service::Service = serde_json::from_value(serde_json::json!({
        "name": SERVICE, "ports": [ { "name": "http", "port": 80 } ],
        "endpoints": [ { "address": "127.0.0.1", "ports": { "http": inbound }, "ids": [be], "pod": "demo-backend" } ],
    }))
    .map_err(|e| e.to_string())?;
    core.services
        .write(vec![crate::services::ServiceOp::Put(service)], "admin")
        .await
        .map_err(|e| e.to_string())?;
    let frontend_cfg = format!(
        "identity:\n  workload_api: {{ socket: \"{sock}\", spiffe_id: \"{fe}\" }}\n\
         admin_address: 127.0.0.1:{fadmin}\n\
         discovery: {{}}\n\
         listeners:\n  - {{ role: outbound, name: backend, listen: 127.0.0.1:{outbound}, upstream: \"{SERVICE}:80\", expected_ids: [\"{be}\"], protocol: http }}\n\
         log_level: warn\n"
    );
    let (bpath, fpath): (PathBuf, PathBuf) = (
        dir.join("backend-proxy.yaml"),
        dir.join("frontend-proxy.yaml"),
    );
    std::fs::write(&bpath, backend_cfg).map_err(|e| e.to_string())?;
    std::fs::write(&fpath, frontend_cfg).map_err(|e| e.to_string())?;
    let mut demo = Demo {
        children: vec![
            spawn_proxy(proxy_bin, &bpath)?,
            spawn_proxy(proxy_bin, &fpath)?,
        ],
        app: app_task,
    };
    let r = async {
        wait_ready(SocketAddr::from(([127, 0, 0, 1], badmin))).await?;
        wait_ready(SocketAddr::from(([127, 0, 0, 1], fadmin))).await?;
        // The backend proxy learns the CA's policy from the agent; wait until it enforces it.
        let out = SocketAddr::from(([127, 0, 0, 1], outbound));
        let deadline = Instant::now() + Duration::from_secs(15);
        let allowed = loop {
            let r = http_get(out, "/api/hello").await?;
            if r.0 == 200 || Instant::now() > deadline {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let denied = http_get(out, "/admin").await?;
        let mut lines = Vec::new();
        for _ in 0..100 {
            lines = std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains("\"type\":\"access\""))
                .map(str::to_owned)
                .collect();
            if lines.len() >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        use std::io::Write;
        let mut o = std::io::stdout().lock();
        let w = |o: &mut std::io::StdoutLock<'_>, s: String| writeln!(o, "{s}").map_err(|e| e.to_string());
        w(&mut o, format!("demo: frontend proxy 127.0.0.1:{outbound} -> service {SERVICE}:80 -> backend proxy 127.0.0.1:{inbound} -> backend app {app}"))?;
        // What the frontend proxy resolved the service to (its admin view).
        let view = http_get(SocketAddr::from(([127, 0, 0, 1], fadmin)), "/destinations").await?.1;
        let v: serde_json::Value = serde_json::from_str(&view).map_err(|e| e.to_string())?;
        for d in v["destinations"].as_array().into_iter().flatten() {
            let eps: Vec<String> = d["endpoints"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| format!("{} ({})", e["address"].as_str().unwrap_or(""), e["spiffe_ids"][0].as_str().unwrap_or("")))
                .collect();
            w(&mut o, format!("demo: destination {} -> {}", d["authority"].as_str().unwrap_or(""), eps.join(", ")))?;
        }
        w(&mut o, format!("demo: GET /api/hello -> {} {}", allowed.0, allowed.1))?;
        w(&mut o, format!("demo: GET /admin -> {} {}", denied.0, denied.1))?;
        for l in lines.iter().rev().take(2).rev() {
            w(&mut o, format!("demo: log {l}"))?;
        }
        w(&mut o, format!("demo: access log {}", log.display()))?;
        o.flush().map_err(|e| e.to_string())
    }
    .await;
    if let Err(e) = r {
        std::mem::take(&mut demo.children);
        return Err(e);
    }
    Ok(demo)
}
