//! Keeps a ConfigMap in the cluster holding the trust bundle (`bundle.pem` and the SPIFFE
//! bundle JSON `bundle.spiffe`), so agents deployed there can trust the CA before their first
//! attestation — the trust-on-first-contact gap every node agent has. Updated with server-side
//! apply on start and whenever the bundle sequence changes; failures are retried with backoff.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;
use tokio::sync::watch;
use ward_spiffe::Bundle;

use crate::core::CaCore;

/// Field manager name for server-side apply.
const MANAGER: &str = "ward-ca";

/// Applies the ConfigMap `name` in `api`'s namespace with `bundle`.
pub async fn apply(api: &Api<ConfigMap>, name: &str, bundle: &Bundle) -> Result<(), String> {
    let spiffe = bundle.to_spiffe_json().map_err(|e| e.to_string())?;
    let cm = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "labels": { "app.kubernetes.io/managed-by": "ward-ca" },
        },
        "data": { "bundle.pem": bundle.x509_pem(), "bundle.spiffe": spiffe },
    });
    api.patch(
        name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&cm),
    )
    .await
    .map(|_| ())
    .map_err(|e| e.to_string())
}

/// Publishes the bundle to `target` (`<namespace>/<name>`) until `stop` is set.
pub async fn run(
    core: Arc<CaCore>,
    client: kube::Client,
    cluster: String,
    target: String,
    mut stop: watch::Receiver<bool>,
) {
    let Some((ns, name)) = target.split_once('/') else {
        tracing::error!(%cluster, %target, "bundle_config_map must be <namespace>/<name>");
        return;
    };
    let api: Api<ConfigMap> = Api::namespaced(client, ns);
    let mut sets = core.authorities.watch();
    let mut published = None;
    let mut backoff = Duration::from_secs(1);
    loop {
        let bundle = sets.borrow_and_update().bundle.clone();
        if published != Some(bundle.sequence) {
            match apply(&api, name, &bundle).await {
                Ok(()) => {
                    published = Some(bundle.sequence);
                    backoff = Duration::from_secs(1);
                    tracing::info!(%cluster, configmap = %target, sequence = bundle.sequence, "bundle published");
                }
                Err(e) => {
                    tracing::warn!(%cluster, configmap = %target, error = %e, retry_in = ?backoff, "cannot publish the bundle");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = ward_net::process::until_set(&mut stop) => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    continue;
                }
            }
        }
        tokio::select! {
            r = sets.changed() => if r.is_err() { return },
            _ = ward_net::process::until_set(&mut stop) => return,
        }
    }
}
