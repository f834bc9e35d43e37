//! Certificates from Kubernetes: the TLS Secrets a Gateway's HTTPS listeners name in
//! `certificateRefs` (in the Gateway's namespace), read from the API server and served like
//! certificate files. The Gateway and the namespace's Secrets are watched, so a renewed
//! Secret (cert-manager, `kubectl create secret tls … | kubectl apply`) serves the next
//! handshake, a Secret no longer named stops being served, and one that cannot be used leaves
//! the certificate it replaces in force — logged and counted, as for files.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use gateway_api::experimental::gateways::Gateway as KGateway;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;

use super::Gateway;
use super::config::KubernetesCfg;
use crate::metrics::{CertLabel, Metrics};

/// The origin of Secret `ns/name` in the certificate table.
fn origin(ns: &str, name: &str) -> String {
    format!("secret:{ns}/{name}")
}

/// The Secrets (names) Gateway `g`'s HTTPS listeners take their certificates from: refs to a
/// core `Secret` in its own namespace (others are refused by the CA's status, not served).
pub fn certificate_refs(g: &KGateway) -> BTreeSet<String> {
    let ns = g.metadata.namespace.as_deref().unwrap_or_default();
    g.spec
        .listeners
        .iter()
        .filter(|l| l.protocol == "HTTPS")
        .filter_map(|l| l.tls.as_ref()?.certificate_refs.as_ref())
        .flatten()
        .filter(|r| {
            r.group
                .as_deref()
                .is_none_or(|g| g.is_empty() || g == "core")
        })
        .filter(|r| r.kind.as_deref().is_none_or(|k| k == "Secret"))
        .filter(|r| r.namespace.as_deref().is_none_or(|n| n == ns))
        .map(|r| r.name.clone())
        .collect()
}

enum Ev {
    Gateway(Option<Box<KGateway>>),
    Secret(String, Option<Box<Secret>>),
    /// A new list of the Secrets begins (after a watch could not resume): what it brings
    /// replaces what was seen once it is done.
    Relisting,
    Listed(Box<Secret>),
    Relisted,
}

/// Follows Gateway `namespace/name`'s certificate Secrets into `gw`'s table until `stop`.
pub async fn run(
    gw: Arc<Gateway>,
    cfg: KubernetesCfg,
    gateway: String,
    metrics: Metrics,
    mut stop: watch::Receiver<bool>,
) {
    let Some((ns, name)) = gateway.split_once('/') else {
        return;
    };
    let client = loop {
        match ward_net::kube_client::client(cfg.kubeconfig.as_deref()).await {
            Ok(c) => break c,
            Err(e) => {
                tracing::error!(error = %e, "gateway: cannot reach the Kubernetes API server for the Gateway's certificates; retrying");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(10)) => {}
                    _ = ward_net::process::until_set(&mut stop) => return,
                }
            }
        }
    };
    let gateways = watcher::watcher(
        Api::<KGateway>::namespaced(client.clone(), ns),
        watcher::Config::default().fields(&format!("metadata.name={name}")),
    )
    .default_backoff()
    .filter_map(|e| {
        let name = name.to_owned();
        async move {
            match e {
                Ok(Event::Apply(g) | Event::InitApply(g))
                    if g.metadata.name.as_deref() == Some(&name) =>
                {
                    Some(Ev::Gateway(Some(Box::new(g))))
                }
                Ok(Event::Delete(g)) if g.metadata.name.as_deref() == Some(&name) => {
                    Some(Ev::Gateway(None))
                }
                Ok(_) => None,
                Err(e) => {
                    tracing::warn!(error = %e, "gateway: watching the Gateway failed; retrying");
                    None
                }
            }
        }
    });
    let secrets = watcher::watcher(
        Api::<Secret>::namespaced(client, ns),
        watcher::Config::default(),
    )
    .default_backoff()
    .filter_map(|e| async move {
        match e {
            Ok(Event::Apply(s)) => Some(Ev::Secret(s.metadata.name.clone()?, Some(Box::new(s)))),
            Ok(Event::Delete(s)) => Some(Ev::Secret(s.metadata.name.clone()?, None)),
            Ok(Event::Init) => Some(Ev::Relisting),
            Ok(Event::InitApply(s)) => Some(Ev::Listed(Box::new(s))),
            Ok(Event::InitDone) => Some(Ev::Relisted),
            Err(e) => {
                tracing::warn!(error = %e, "gateway: watching certificate Secrets failed; retrying");
                None
            }
        }
    });
    let mut events = futures::stream::select(gateways.boxed(), secrets.boxed());
    let mut refs: BTreeSet<String> = BTreeSet::new();
    let mut seen: BTreeMap<String, Secret> = BTreeMap::new();
    let mut listing: BTreeMap<String, Secret> = BTreeMap::new();
    // What each served Secret held when it was last loaded (or refused), so a Secret that
    // did not change is neither reloaded nor reported again.
    let mut loaded: BTreeMap<String, Option<Vec<u8>>> = BTreeMap::new();
    loop {
        let ev = tokio::select! {
            ev = events.next() => ev,
            _ = ward_net::process::until_set(&mut stop) => return,
        };
        match ev {
            None => return,
            Some(Ev::Gateway(g)) => refs = g.map(|g| certificate_refs(&g)).unwrap_or_default(),
            Some(Ev::Secret(n, s)) => match s {
                Some(s) => {
                    seen.insert(n, *s);
                }
                None => {
                    seen.remove(&n);
                }
            },
            Some(Ev::Relisting) => {
                listing.clear();
                continue;
            }
            Some(Ev::Listed(s)) => {
                if let Some(n) = s.metadata.name.clone() {
                    listing.insert(n, *s);
                }
                continue;
            }
            Some(Ev::Relisted) => seen = std::mem::take(&mut listing),
        }
        reconcile(&gw, ns, &refs, &seen, &mut loaded, &metrics);
    }
}

/// Serves the Secrets in `refs` that can be used and stops serving those no longer named.
fn reconcile(
    gw: &Gateway,
    ns: &str,
    refs: &BTreeSet<String>,
    seen: &BTreeMap<String, Secret>,
    loaded: &mut BTreeMap<String, Option<Vec<u8>>>,
    metrics: &Metrics,
) {
    let prefix = format!("secret:{ns}/");
    gw.certs.remove_where(|o| {
        o.strip_prefix(&prefix)
            .is_some_and(|name| !refs.contains(name))
    });
    loaded.retain(|n, _| refs.contains(n));
    for name in refs {
        let data = seen.get(name).and_then(|s| s.data.as_ref());
        let pair = data.and_then(|d| Some((d.get("tls.crt")?, d.get("tls.key")?)));
        let fingerprint = pair.map(|(c, k)| [c.0.as_slice(), k.0.as_slice()].concat());
        if loaded.get(name) == Some(&fingerprint) {
            continue;
        }
        loaded.insert(name.clone(), fingerprint);
        let failed = |why: String| {
            tracing::warn!(secret = %format!("{ns}/{name}"), error = %why,
                "gateway certificate Secret cannot be used; the certificate in force (if any) keeps serving");
            metrics
                .gateway_cert_errors
                .get_or_create(&CertLabel {
                    name: format!("{ns}/{name}"),
                })
                .inc();
        };
        match pair {
            None if seen.contains_key(name) => {
                failed("not a TLS Secret: it needs tls.crt and tls.key".into());
            }
            None => failed("no such Secret".into()),
            Some((c, k)) => match super::certs::load_pem(&c.0, &k.0, &origin(ns, name)) {
                Ok(s) => {
                    tracing::info!(secret = %format!("{ns}/{name}"), names = ?s.names,
                        "gateway certificate loaded from its Secret");
                    super::record_expiry(metrics, &s);
                    gw.certs.put(s);
                }
                Err(e) => failed(e),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn only_secrets_of_https_listeners_in_the_namespace_are_followed() {
        let g: KGateway = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "web", "namespace": "edge" },
            "spec": { "gatewayClassName": "ward", "listeners": [
                { "name": "a", "port": 443, "protocol": "HTTPS",
                  "tls": { "certificateRefs": [ { "name": "one" }, { "kind": "Secret", "group": "", "name": "two" },
                                                { "name": "elsewhere", "namespace": "other" },
                                                { "kind": "ConfigMap", "name": "nope" } ] } },
                { "name": "b", "port": 80, "protocol": "HTTP",
                  "tls": { "certificateRefs": [ { "name": "plain" } ] } }
            ] }
        }))
        .unwrap();
        let refs: Vec<String> = certificate_refs(&g).into_iter().collect();
        assert_eq!(refs, ["one", "two"]);
    }
}
