//! OIDC discovery for JWT-SVIDs: `/.well-known/openid-configuration` and `/keys`, so cloud IAM,
//! Vault and any OIDC library can verify Ward JWT-SVIDs. Only the public parts of the JWT
//! authorities that are published (prepared, active, old, tainted — not revoked) are served,
//! with `Cache-Control` so that consumers pick up rotations.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::config::OidcConfig;
use crate::core::CaCore;

/// The discovery document for `issuer`.
pub fn discovery(issuer: &str) -> Value {
    json!({
        "issuer": issuer,
        "jwks_uri": format!("{issuer}/keys"),
        // JWT-SVIDs are obtained from the Workload API, not through an OAuth flow.
        "authorization_endpoint": "",
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["ES256"],
    })
}

/// The JWKS of the published JWT authorities, as OIDC consumers expect (`use: sig`).
pub fn jwks(bundle: &ward_spiffe::Bundle) -> Result<Value, String> {
    let doc: Value = serde_json::from_str(&bundle.to_jwt_jwks().map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    let mut keys = Vec::new();
    for k in doc["keys"].as_array().cloned().unwrap_or_default() {
        let mut k = k;
        k["use"] = "sig".into();
        k["alg"] = "ES256".into();
        keys.push(k);
    }
    Ok(json!({ "keys": keys }))
}

fn respond(status: StatusCode, body: String, max_age: Option<u64>) -> Response<Full<Bytes>> {
    let mut b = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json");
    b = match max_age {
        Some(s) => b.header(header::CACHE_CONTROL, format!("public, max-age={s}")),
        None => b.header(header::CACHE_CONTROL, "no-store"),
    };
    b.body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn route(req: &Request<Incoming>, core: &CaCore, cfg: &OidcConfig) -> Response<Full<Bytes>> {
    let err =
        |status: StatusCode, msg: &str| respond(status, json!({ "error": msg }).to_string(), None);
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return err(StatusCode::METHOD_NOT_ALLOWED, "only GET");
    }
    let max_age = Some(cfg.max_age.as_secs());
    match req.uri().path() {
        "/.well-known/openid-configuration" => {
            respond(StatusCode::OK, discovery(&cfg.issuer).to_string(), max_age)
        }
        "/keys" => match jwks(&core.bundle()) {
            Ok(v) => respond(StatusCode::OK, v.to_string(), max_age),
            Err(e) => {
                tracing::error!(error = %e, "cannot render the JWKS");
                err(StatusCode::INTERNAL_SERVER_ERROR, "cannot render the keys")
            }
        },
        _ => err(StatusCode::NOT_FOUND, "not found"),
    }
}

/// Serves the discovery endpoints on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    core: Arc<CaCore>,
    cfg: OidcConfig,
    shutdown: impl std::future::Future<Output = ()> + Send,
) {
    tokio::pin!(shutdown);
    let cfg = Arc::new(cfg);
    loop {
        let (tcp, _) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(_) => continue,
            },
            _ = &mut shutdown => return,
        };
        let (core, cfg) = (core.clone(), cfg.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (core, cfg) = (core.clone(), cfg.clone());
                async move { Ok::<_, Infallible>(route(&req, &core, &cfg)) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}
