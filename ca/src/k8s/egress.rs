//! The `ExternalService` controller: each resource of a cluster becomes one external service
//! of the mesh's egress configuration (`crate::egress`, origin `k8s/<cluster>`), checked
//! against the whole configuration before it is written. A resource that is refused — a bad
//! wildcard, an IP as a host, overlapping ranges with another grant, a name the operator
//! already uses — gets `Accepted: False` with the reason in its status, and the version in
//! force before (if any) stays; an accepted one gets `Accepted: True`. Resources gone from the
//! cluster (also while the CA was down: found when the list completes) are removed. A cluster
//! without the CRD is watched as empty until it is installed.

use std::collections::HashSet;
use std::sync::Arc;

use futures::StreamExt;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;

use super::crd::ExternalService;
use super::gateway::Condition;
use crate::core::CaCore;

/// Runs until `stop`.
pub async fn run(
    core: Arc<CaCore>,
    client: kube::Client,
    cluster: String,
    mut stop: watch::Receiver<bool>,
) {
    let api = Api::<ExternalService>::all(client);
    let mut stream = watcher::watcher(api.clone(), watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut listed: HashSet<String> = HashSet::new();
    let mut absent = false;
    loop {
        let ev = tokio::select! {
            ev = stream.next() => ev,
            _ = ward_net::process::until_set(&mut stop) => return,
        };
        match ev {
            None => return,
            Some(Ok(Event::Init)) => listed.clear(),
            Some(Ok(Event::InitApply(o))) => {
                listed.insert(o.name_any());
                applied(&core, &api, &cluster, &o).await;
            }
            Some(Ok(Event::Apply(o))) => applied(&core, &api, &cluster, &o).await,
            Some(Ok(Event::Delete(o))) => deleted(&core, &cluster, &o.name_any()).await,
            Some(Ok(Event::InitDone)) => {
                absent = false;
                forget_unlisted(&core, &cluster, &listed).await;
            }
            Some(Err(watcher::Error::InitialListFailed(kube::Error::Api(s))))
                if s.is_not_found() =>
            {
                if !absent {
                    absent = true;
                    tracing::info!(%cluster,
                        "ExternalService CRD not installed (`ward-ca crds`); no external services from this cluster until it is");
                    forget_unlisted(&core, &cluster, &HashSet::new()).await;
                }
            }
            Some(Err(e)) => {
                tracing::warn!(%cluster, error = %e, "ExternalService watch failed; retrying");
            }
        }
    }
}

async fn forget_unlisted(core: &CaCore, cluster: &str, listed: &HashSet<String>) {
    match core.egress.k8s_names(cluster).await {
        Ok(names) => {
            for n in names.into_iter().filter(|n| !listed.contains(n)) {
                deleted(core, cluster, &n).await;
            }
        }
        Err(e) => tracing::warn!(%cluster, error = %e, "cannot read external services"),
    }
}

async fn deleted(core: &CaCore, cluster: &str, name: &str) {
    let egress = core.egress.fenced(core.leadership.fence());
    if let Err(e) = egress.delete_k8s(cluster, name).await {
        tracing::warn!(%cluster, service = name, error = %e, "cannot remove external service");
    }
}

/// Writes `o` (if it is valid with the rest) and its `Accepted` condition.
async fn applied(core: &CaCore, api: &Api<ExternalService>, cluster: &str, o: &ExternalService) {
    let name = o.name_any();
    let result = match o.to_service() {
        Ok(svc) => core
            .egress
            .fenced(core.leadership.fence())
            .put_k8s(cluster, svc)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    let kept = match &result {
        Ok(()) => false,
        Err(_) => core
            .egress
            .k8s_names(cluster)
            .await
            .is_ok_and(|n| n.contains(&name)),
    };
    let (status, reason, message) = match &result {
        Ok(()) => ("True", "Accepted", "in force".to_owned()),
        Err(e) => {
            tracing::warn!(%cluster, service = %name, error = %e, kept,
                "ExternalService refused");
            let tail = if kept {
                "; the last accepted version stays in force"
            } else {
                "; not in force"
            };
            ("False", "Invalid", format!("{e}{tail}"))
        }
    };
    let previous = o
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.kind == "Accepted"));
    let generation = o.metadata.generation;
    if previous.is_some_and(|c| {
        c.status == status
            && c.reason == reason
            && c.message == message
            && c.observed_generation == generation
    }) {
        return;
    }
    let time = match previous {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => ward_net::process::rfc3339(std::time::SystemTime::now()),
    };
    let cond = Condition {
        kind: "Accepted".into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: time,
    };
    let patch = serde_json::json!({ "status": { "conditions": [cond] } });
    if let Err(e) = api
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        tracing::warn!(%cluster, service = %name, error = %e, "cannot write ExternalService status");
    }
}
