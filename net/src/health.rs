//! The admin HTTP endpoint every Ward process serves: `/metrics` (OpenMetrics text from a
//! prometheus-client registry), `/healthz` (the process is up), `/readyz` (it can do its job),
//! and any JSON views the process adds (the proxy's `/destinations`).

use std::convert::Infallible;
use std::sync::Arc;

use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Readiness: `Ok(())` when ready, `Err(reason)` otherwise.
pub type Readiness = watch::Receiver<Result<(), String>>;

/// A JSON view served at a path: called on each request.
pub type View = Arc<dyn Fn() -> String + Send + Sync>;

/// Views by path.
pub type Views = Arc<Vec<(&'static str, View)>>;

/// Serves the admin endpoint until `shutdown` resolves.
pub async fn serve_admin(
    listener: TcpListener,
    registry: Arc<Registry>,
    ready: Readiness,
    views: Views,
    shutdown: impl std::future::Future<Output = ()> + Send,
) {
    tokio::pin!(shutdown);
    loop {
        let (tcp, _) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(_) => continue,
            },
            _ = &mut shutdown => return,
        };
        let registry = registry.clone();
        let ready = ready.clone();
        let views = views.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let registry = registry.clone();
                let ready = ready.clone();
                let views = views.clone();
                async move { Ok::<_, Infallible>(route(&req, &registry, &ready, &views)) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    resp
}

/// Converts OpenMetrics text (what prometheus-client writes) to the Prometheus text format
/// 0.0.4 for scrapers that do not ask for OpenMetrics: counter families are named with their
/// `_total` suffix in `# HELP`/`# TYPE`, `info` becomes `gauge`, and `# UNIT`/`# EOF` go.
pub fn openmetrics_to_text(om: &str) -> String {
    let counters: std::collections::HashSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let rewritten = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            let name = if counters.contains(name) {
                format!("{name}_total")
            } else {
                name.to_owned()
            };
            let tail = if *prefix == "# TYPE " && tail == "info" {
                "gauge"
            } else {
                tail
            };
            Some(format!("{prefix}{name} {tail}"))
        });
        out.push_str(rewritten.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

fn route(
    req: &Request<Incoming>,
    registry: &Registry,
    ready: &Readiness,
    views: &Views,
) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    if req.method() != http::Method::GET && req.method() != http::Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, PLAIN, "only GET\n".into());
    }
    match req.uri().path() {
        "/metrics" => {
            let mut out = String::new();
            if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
                return text(StatusCode::INTERNAL_SERVER_ERROR, PLAIN, format!("{e}\n"));
            }
            let wants_openmetrics = req
                .headers()
                .get_all(header::ACCEPT)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| v.contains("application/openmetrics-text"));
            if wants_openmetrics {
                text(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    out,
                )
            } else {
                text(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    openmetrics_to_text(&out),
                )
            }
        }
        "/healthz" => text(StatusCode::OK, PLAIN, "ok\n".into()),
        "/readyz" => match &*ready.borrow() {
            Ok(()) => text(StatusCode::OK, PLAIN, "ready\n".into()),
            Err(reason) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                PLAIN,
                format!("{reason}\n"),
            ),
        },
        path => match views.iter().find(|(p, _)| *p == path) {
            Some((_, view)) => text(StatusCode::OK, "application/json", view()),
            None => text(StatusCode::NOT_FOUND, PLAIN, "not found\n".into()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_counters_get_total_names() {
        let om = "# HELP a_b Things.\n# TYPE a_b counter\na_b_total{k=\"v\"} 1\n\
                  # HELP g Gauge.\n# TYPE g gauge\n# UNIT g seconds\ng 2\n# EOF\n";
        assert_eq!(
            openmetrics_to_text(om),
            "# HELP a_b_total Things.\n# TYPE a_b_total counter\na_b_total{k=\"v\"} 1\n\
             # HELP g Gauge.\n# TYPE g gauge\ng 2\n"
        );
    }
}
