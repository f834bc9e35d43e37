//! The service controller: kube-runtime watchers on Services and EndpointSlices keep one mesh
//! service per Kubernetes Service (`<name>.<namespace>`, its ClusterIPs, ports and ready
//! endpoints), each endpoint with the SPIFFE IDs the identity controller gave its pod. Slices
//! of one service are merged and duplicates counted once; `ready`, `serving` and
//! `terminating` are kept (terminating-but-serving endpoints drain); named target ports come
//! from the slices.
//!
//! An endpoint whose pod has no identity (not meshed) cannot be checked and is left out; a
//! Service with no meshed endpoint at all is not published, so callers reach it as an
//! outside destination. Services it made are found again by origin `k8s/<cluster>`; nothing is
//! deleted before every watcher has listed once. [`build`] is the pure step.
//!
//! Gateway API routes (`HTTPRoute`, `GRPCRoute`) whose parent is a Service are watched too
//! ([`super::routes`]): they become the mesh service's routes (a Service with routes is
//! published even without endpoints of its own), and their status says whether they were
//! accepted. Clusters without the Gateway API CRDs simply have no routes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service as KService;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::sync::{mpsc, watch};
use ward_spiffe::SpiffeId;
use ward_spiffe::service::{Endpoint, Service, ServicePort};

use super::gateway::{Gateway, GatewayClass, GrpcRoute as GRPCRoute, HttpRoute as HTTPRoute};
use super::gateway_controller::GatewayState;
use super::routes::{Kind as RouteKind, RouteKey, RouteSet, Seen};
use crate::core::CaCore;
use crate::services::ServiceOp;

/// The label EndpointSlices carry with their Service's name.
const SERVICE_LABEL: &str = "kubernetes.io/service-name";
/// Pauses between batches of changes, so a burst of events becomes one write.
const SETTLE: Duration = Duration::from_millis(50);

type Key = (String, String);

enum Ev {
    Service(Box<KService>, bool),
    Slice(Box<EndpointSlice>, bool),
    Route(RouteKey, Option<Box<Seen>>),
    Class(Box<GatewayClass>, bool),
    Gateway(Box<Gateway>, bool),
    Listed(&'static str),
}

/// The watchers that must list before anything is written.
const KINDS: usize = 6;

/// The mesh service for Kubernetes Service `svc` with `slices`, its endpoints' IDs from
/// `ids` (pod UID → SPIFFE IDs). `None`: nothing to publish (no ports, or no endpoint that
/// can be checked). Pure.
pub fn build(
    svc: &KService,
    slices: &[&EndpointSlice],
    ids: &HashMap<String, Vec<SpiffeId>>,
    routes: Vec<ward_spiffe::route::HttpRoute>,
) -> Option<Service> {
    let ns = svc.metadata.namespace.as_deref()?;
    let name = svc.metadata.name.as_deref()?;
    let spec = svc.spec.as_ref()?;
    let addresses = spec
        .cluster_ips
        .clone()
        .or_else(|| spec.cluster_ip.clone().map(|c| vec![c]))
        .unwrap_or_default()
        .iter()
        .filter_map(|a| a.parse().ok())
        .collect();
    let ports: Vec<ServicePort> = spec
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().is_none_or(|p| p == "TCP"))
        .filter_map(|p| {
            let port = u16::try_from(p.port).ok().filter(|p| *p != 0)?;
            let target_port = match &p.target_port {
                Some(IntOrString::Int(t)) => u16::try_from(*t).ok(),
                // A named target port is resolved per endpoint, from the slices.
                _ => None,
            };
            Some(ServicePort {
                name: p.name.clone().unwrap_or_default(),
                port,
                target_port,
            })
        })
        .collect();
    if ports.is_empty() {
        return None;
    }
    let mut endpoints: Vec<Endpoint> = Vec::new();
    let mut seen = HashSet::new();
    for slice in slices {
        let slice_ports: BTreeMap<String, u16> = slice
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                let n = u16::try_from(p.port?).ok()?;
                Some((p.name.clone().unwrap_or_default(), n))
            })
            .filter(|(n, _)| ports.iter().any(|sp| sp.name == *n))
            .collect();
        for ep in &slice.endpoints {
            let Some(uid) = ep
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| r.uid.as_deref())
            else {
                continue;
            };
            let Some(pod_ids) = ids.get(uid).filter(|v| !v.is_empty()) else {
                continue;
            };
            let c = ep.conditions.as_ref();
            let ready = c.and_then(|c| c.ready).unwrap_or(true);
            let serving = c.and_then(|c| c.serving).unwrap_or(ready);
            let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
            for a in &ep.addresses {
                let Ok(address) = a.parse() else { continue };
                if !seen.insert(address) {
                    continue;
                }
                endpoints.push(Endpoint {
                    address,
                    ports: slice_ports.clone(),
                    ids: pod_ids.clone(),
                    ready,
                    serving,
                    terminating,
                    pod: ep.target_ref.as_ref().and_then(|r| r.name.clone()),
                });
            }
        }
    }
    // A Service with routes is a mesh destination even with no endpoint of its own.
    if endpoints.is_empty() && routes.is_empty() {
        return None;
    }
    endpoints.sort_by_key(|e| e.address);
    Some(Service {
        name: format!("{name}.{ns}"),
        addresses,
        ports,
        endpoints,
        routes,
    })
}

/// Forwards one watcher's events. For an `optional` kind (a CRD that may not be installed),
/// "not found" counts as listed and empty, and is logged once.
async fn forward<K>(
    api: Api<K>,
    tx: mpsc::Sender<Ev>,
    kind: &'static str,
    optional: bool,
    f: fn(K, bool) -> Ev,
) where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let mut stream = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut absent = false;
    while let Some(r) = stream.next().await {
        let ev = match r {
            Ok(Event::Apply(k) | Event::InitApply(k)) => Some(f(k, true)),
            Ok(Event::Delete(k)) => Some(f(k, false)),
            Ok(Event::InitDone) => {
                if absent {
                    tracing::info!(kind, "now served by the API server; watching it");
                    absent = false;
                }
                Some(Ev::Listed(kind))
            }
            Ok(Event::Init) => None,
            Err(watcher::Error::InitialListFailed(kube::Error::Api(s)))
                if optional && s.is_not_found() =>
            {
                if absent {
                    None
                } else {
                    absent = true;
                    tracing::info!(
                        kind,
                        "not served by the API server (Gateway API CRDs not installed); no routes of this kind until it is"
                    );
                    Some(Ev::Listed(kind))
                }
            }
            Err(e) => {
                tracing::warn!(kind, error = %e, "Kubernetes watch failed; retrying");
                None
            }
        };
        if let Some(ev) = ev
            && tx.send(ev).await.is_err()
        {
            return;
        }
    }
}

/// A route object as the route set keeps it.
fn seen(
    kind: RouteKind,
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    parents: Vec<super::gateway::ParentRef>,
    hostnames: Vec<String>,
    translated: Result<super::routes::Translated, super::routes::Why>,
    status: super::gateway::RouteStatus,
) -> Option<(RouteKey, Seen)> {
    let (namespace, name) = key_of(meta)?;
    let s = Seen {
        kind,
        namespace,
        name,
        generation: meta.generation,
        created: meta
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.to_string())
            .unwrap_or_default(),
        parents,
        hostnames,
        translated,
        status,
    };
    Some((s.key(), s))
}

fn http_route_event(r: HTTPRoute, up: bool) -> Ev {
    let ns = r.metadata.namespace.clone().unwrap_or_default();
    let translated = super::routes::translate_http(&ns, &r.spec);
    match seen(
        RouteKind::Http,
        &r.metadata,
        super::routes::parents(r.spec.parent_refs.as_ref()),
        r.spec.hostnames.clone().unwrap_or_default(),
        translated,
        super::routes::status(r.status.as_ref()),
    ) {
        Some((k, s)) => Ev::Route(k, up.then(|| Box::new(s))),
        None => Ev::Listed("httproutes"),
    }
}

fn grpc_route_event(r: GRPCRoute, up: bool) -> Ev {
    let ns = r.metadata.namespace.clone().unwrap_or_default();
    let translated = super::routes::translate_grpc(&ns, &r.spec);
    match seen(
        RouteKind::Grpc,
        &r.metadata,
        super::routes::parents(r.spec.parent_refs.as_ref()),
        r.spec.hostnames.clone().unwrap_or_default(),
        translated,
        super::routes::status(r.status.as_ref()),
    ) {
        Some((k, s)) => Ev::Route(k, up.then(|| Box::new(s))),
        None => Ev::Listed("grpcroutes"),
    }
}

/// The TCP ports of every Service, for attaching routes.
fn service_ports(services: &HashMap<Key, KService>) -> HashMap<Key, Vec<u16>> {
    services
        .iter()
        .map(|(k, s)| {
            let ports = s
                .spec
                .iter()
                .flat_map(|sp| sp.ports.iter().flatten())
                .filter_map(|p| u16::try_from(p.port).ok())
                .collect();
            (k.clone(), ports)
        })
        .collect()
}

/// Writes the status of routes whose status changed.
async fn write_route_statuses(
    client: &kube::Client,
    routes: &mut RouteSet,
    ports: &HashMap<Key, Vec<u16>>,
    gateways: &super::routes::Gateways,
    now: &str,
) {
    for (key, status) in routes.statuses(ports, gateways, now) {
        let (kind, ns, name) = &key;
        let patch = serde_json::json!({ "status": status });
        let pp = kube::api::PatchParams::default();
        let r = match kind {
            RouteKind::Http => Api::<HTTPRoute>::namespaced(client.clone(), ns)
                .patch_status(name, &pp, &kube::api::Patch::Merge(&patch))
                .await
                .map(|_| ()),
            RouteKind::Grpc => Api::<GRPCRoute>::namespaced(client.clone(), ns)
                .patch_status(name, &pp, &kube::api::Patch::Merge(&patch))
                .await
                .map(|_| ()),
        };
        match r {
            Ok(()) => routes.set_status(&key, status),
            Err(e) => {
                tracing::warn!(route = %format!("{}/{ns}/{name}", kind.label()), error = %e,
                    "cannot write route status; will retry on the next change");
            }
        }
    }
}

fn key_of(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Option<Key> {
    Some((m.namespace.clone()?, m.name.clone()?))
}

/// Pod UID → the SPIFFE IDs the identity controller of `cluster` gave it.
async fn pod_ids(core: &CaCore, cluster: &str) -> HashMap<String, Vec<SpiffeId>> {
    let prefix = format!("k8s/{cluster}/");
    let mut out: HashMap<String, Vec<SpiffeId>> = HashMap::new();
    let Ok(entries) = core.entries.list(None, None).await else {
        return out;
    };
    for e in entries.iter().filter(|e| e.origin.starts_with(&prefix)) {
        for s in &e.selectors {
            if s.kind() == "k8s"
                && let Some(uid) = s.value().strip_prefix("pod-uid:")
            {
                out.entry(uid.to_owned())
                    .or_default()
                    .push(e.spiffe_id.clone());
            }
        }
    }
    for v in out.values_mut() {
        v.sort();
        v.dedup();
    }
    out
}

/// Runs the service controller for `cluster` until `stop`.
pub async fn run(
    core: Arc<CaCore>,
    client: kube::Client,
    cluster: String,
    mut stop: watch::Receiver<bool>,
) {
    let origin = format!("k8s/{cluster}");
    let (tx, mut rx) = mpsc::channel(1024);
    let tasks = [
        tokio::spawn(forward(
            Api::<KService>::all(client.clone()),
            tx.clone(),
            "services",
            false,
            |s, up| Ev::Service(Box::new(s), up),
        )),
        tokio::spawn(forward(
            Api::<EndpointSlice>::all(client.clone()),
            tx.clone(),
            "endpointslices",
            false,
            |s, up| Ev::Slice(Box::new(s), up),
        )),
        tokio::spawn(forward(
            Api::<HTTPRoute>::all(client.clone()),
            tx.clone(),
            "httproutes",
            true,
            http_route_event,
        )),
        tokio::spawn(forward(
            Api::<GRPCRoute>::all(client.clone()),
            tx.clone(),
            "grpcroutes",
            true,
            grpc_route_event,
        )),
        tokio::spawn(forward(
            Api::<GatewayClass>::all(client.clone()),
            tx.clone(),
            "gatewayclasses",
            true,
            |c, up| Ev::Class(Box::new(c), up),
        )),
        tokio::spawn(forward(
            Api::<Gateway>::all(client.clone()),
            tx,
            "gateways",
            true,
            |g, up| Ev::Gateway(Box::new(g), up),
        )),
    ];
    let mut gws = GatewayState::default();
    let mut gateways_dirty = true;
    let mut routes = RouteSet::default();
    let mut entries = core.entries.watch();
    let mut services: HashMap<Key, KService> = HashMap::new();
    let mut slices: HashMap<Key, EndpointSlice> = HashMap::new();
    let mut dirty: HashSet<Key> = HashSet::new();
    let mut listed: HashSet<&'static str> = HashSet::new();
    let mut collected = false;
    loop {
        tokio::select! {
            ev = rx.recv() => {
                let Some(ev) = ev else { break };
                match ev {
                    Ev::Service(s, up) => if let Some(k) = key_of(&s.metadata) {
                        dirty.insert(k.clone());
                        if up { services.insert(k, *s); } else { services.remove(&k); }
                    },
                    Ev::Slice(s, up) => if let Some(k) = key_of(&s.metadata) {
                        if let Some(svc) = s.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_LABEL)) {
                            dirty.insert((k.0.clone(), svc.clone()));
                        }
                        if let Some(old) = slices.get(&k).and_then(|o| o.metadata.labels.as_ref()?.get(SERVICE_LABEL).cloned()) {
                            dirty.insert((k.0.clone(), old));
                        }
                        if up { slices.insert(k, *s); } else { slices.remove(&k); }
                    },
                    Ev::Route(key, seen) => {
                        dirty.extend(routes.apply(key, seen.map(|b| *b)));
                        gateways_dirty = true;
                    }
                    Ev::Class(c, up) => { gws.class(*c, up); gateways_dirty = true; }
                    Ev::Gateway(g, up) => { gws.gateway(*g, up); gateways_dirty = true; }
                    Ev::Listed(kind) => { listed.insert(kind); }
                }
                // Take what else is queued before writing.
                if !rx.is_empty() { continue; }
            }
            ok = entries.changed() => {
                if !ok { break }
                // Identities changed: every service may have gained or lost endpoints.
                dirty.extend(services.keys().cloned());
                tokio::time::sleep(SETTLE).await;
            }
            _ = ward_net::process::until_set(&mut stop) => break,
        }
        // Nothing is written before every watcher has listed: a Service seen before its
        // slices (or routes) would otherwise vanish or change for a moment after a restart.
        if listed.len() < KINDS || (dirty.is_empty() && !gateways_dirty && collected) {
            continue;
        }
        let ports = service_ports(&services);
        let ids = pod_ids(&core, &cluster).await;
        let mut ops = Vec::new();
        for k in dirty.drain() {
            let name = format!("{}.{}", k.1, k.0);
            let want = services.get(&k).and_then(|svc| {
                let mine: Vec<&EndpointSlice> = slices
                    .values()
                    .filter(|s| {
                        s.metadata.namespace.as_deref() == Some(k.0.as_str())
                            && s.metadata
                                .labels
                                .as_ref()
                                .and_then(|l| l.get(SERVICE_LABEL))
                                == Some(&k.1)
                    })
                    .collect();
                build(svc, &mine, &ids, routes.for_service(&k, &ports))
            });
            let have = core.services.get(&name).await.ok().flatten();
            match (want, have) {
                (Some(w), Some(h)) if h.origin == origin && h.service == w => {}
                (Some(w), Some(h)) if h.origin != origin => {
                    tracing::warn!(service = %name, other = %h.origin,
                        "a service of that name is kept by another origin; not replaced");
                    let _ = w;
                }
                (Some(w), _) => ops.push(ServiceOp::Put(w)),
                (None, Some(h)) if h.origin == origin => ops.push(ServiceOp::Delete(name)),
                (None, _) => {}
            }
        }
        // Gateways are few: their records are recomputed whenever a route or Gateway changed
        // (backend Services changing does not change a Gateway's routes, only their status).
        let ours = gws.ours();
        let now = ward_net::process::rfc3339(std::time::SystemTime::now());
        let mut records = Vec::new();
        if gateways_dirty || !collected {
            gateways_dirty = false;
            records = GatewayState::records(&mut routes, &ours);
            let mut live = HashSet::new();
            for (_, want, _) in &records {
                let Some(w) = want else { continue };
                live.insert(w.name.clone());
                let have = core.services.get(&w.name).await.ok().flatten();
                match have {
                    Some(h) if h.origin == origin && h.service == *w => {}
                    Some(h) if h.origin != origin => {
                        tracing::warn!(service = %w.name, other = %h.origin,
                            "a service of that name is kept by another origin; not replaced");
                    }
                    _ => ops.push(ServiceOp::Put(w.clone())),
                }
            }
            // Records of Gateways that are gone (or no longer Ward's, or have nothing to serve).
            if let Ok(all) = core.services.list().await {
                for r in all.iter().filter(|r| {
                    r.origin == origin
                        && r.service.name.ends_with(".gateway")
                        && !live.contains(&r.service.name)
                }) {
                    ops.push(ServiceOp::Delete(r.service.name.clone()));
                }
            }
        }
        write_route_statuses(&client, &mut routes, &ports, &ours, &now).await;
        gws.write_statuses(&client, &records, &now).await;
        // Once every watcher has listed, services of ours that no longer exist go.
        if !collected && listed.len() == KINDS {
            collected = true;
            if let Ok(all) = core.services.list().await {
                let live: HashSet<String> =
                    services.keys().map(|(ns, n)| format!("{n}.{ns}")).collect();
                for r in all
                    .iter()
                    .filter(|r| r.origin == origin && !r.service.name.ends_with(".gateway"))
                {
                    if !live.contains(&r.service.name)
                        && !ops
                            .iter()
                            .any(|o| matches!(o, ServiceOp::Delete(n) if *n == r.service.name))
                    {
                        ops.push(ServiceOp::Delete(r.service.name.clone()));
                    }
                }
            }
        }
        if ops.is_empty() {
            continue;
        }
        let n = ops.len();
        // Singleton work: every write carries the leadership fence. Each commit fits the
        // store's transaction limits (etcd: 128 operations, 1.5 MiB).
        let services = core.services.fenced(core.leadership.fence());
        let mut failed = false;
        for group in services.groups(ops) {
            let r = match services.write(group.clone(), &origin).await {
                // Over the store's size limit after all (the records replaced were much larger
                // than their successors): one service per commit.
                Err(crate::error::ApiError::InvalidArgument(_)) if group.len() > 1 => {
                    let mut r = Ok(Vec::new());
                    for op in group {
                        r = services.write(vec![op], &origin).await;
                        if r.is_err() {
                            break;
                        }
                    }
                    r
                }
                r => r,
            };
            if let Err(e) = r {
                tracing::error!(cluster = %cluster, error = %e, "cannot write services");
                failed = true;
                break;
            }
        }
        if !failed {
            tracing::debug!(cluster = %cluster, services = n, "services updated");
        }
    }
    for t in tasks {
        t.abort();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn svc() -> KService {
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": "api", "namespace": "shop" },
            "spec": { "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00::10"],
                      "ports": [ { "name": "http", "port": 80, "targetPort": "web" },
                                 { "name": "grpc", "port": 9090, "targetPort": 9091 },
                                 { "name": "dns", "port": 53, "protocol": "UDP" } ] }
        }))
        .unwrap()
    }

    fn slice(name: &str, eps: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": name, "namespace": "shop", "labels": { SERVICE_LABEL: "api" } },
            "addressType": "IPv4",
            "ports": [ { "name": "http", "port": 8080 }, { "name": "grpc", "port": 9091 } ],
            "endpoints": eps
        }))
        .unwrap()
    }

    fn ep(
        addr: &str,
        uid: &str,
        ready: Option<bool>,
        serving: Option<bool>,
        term: Option<bool>,
    ) -> serde_json::Value {
        serde_json::json!({
            "addresses": [addr],
            "conditions": { "ready": ready, "serving": serving, "terminating": term },
            "targetRef": { "kind": "Pod", "name": format!("pod-{uid}"), "namespace": "shop", "uid": uid }
        })
    }

    #[test]
    fn builds_services_from_slices_and_identities() {
        let mut ids = HashMap::new();
        for uid in ["u1", "u2", "u3", "u4"] {
            ids.insert(
                uid.to_owned(),
                vec![SpiffeId::new("spiffe://t/ns/shop/sa/api").unwrap()],
            );
        }
        let a = slice(
            "api-a",
            serde_json::json!([
                ep("10.0.0.1", "u1", Some(true), None, None),
                ep("10.0.0.2", "u2", Some(false), Some(true), Some(true)),
                ep("10.0.0.9", "unmeshed", Some(true), None, None),
            ]),
        );
        // The same endpoint in a second slice, and one more.
        let b = slice(
            "api-b",
            serde_json::json!([
                ep("10.0.0.1", "u1", Some(true), None, None),
                ep("10.0.0.3", "u3", None, None, None),
            ]),
        );
        let s = build(&svc(), &[&a, &b], &ids, vec![]).unwrap();
        s.validate().unwrap();
        assert_eq!(s.name, "api.shop");
        assert_eq!(s.addresses.len(), 2);
        assert_eq!(s.ports.len(), 2, "UDP ports are not served");
        let http = ward_spiffe::service::resolve(&s, 80).unwrap();
        let got: Vec<(String, bool)> = http
            .iter()
            .map(|t| (t.addr.to_string(), t.draining))
            .collect();
        assert_eq!(
            got,
            [
                ("10.0.0.1:8080".to_owned(), false),
                ("10.0.0.2:8080".to_owned(), true),
                ("10.0.0.3:8080".to_owned(), false)
            ],
            "named target port from the slice; duplicates once; unmeshed left out; nil = ready"
        );
        assert_eq!(
            ward_spiffe::service::resolve(&s, 9090).unwrap()[0]
                .addr
                .port(),
            9091
        );
        // No meshed endpoint: nothing to publish.
        let only = slice(
            "x",
            serde_json::json!([ep("10.0.0.9", "unmeshed", Some(true), None, None)]),
        );
        assert!(build(&svc(), &[&only], &ids, vec![]).is_none());
        assert!(build(&svc(), &[], &ids, vec![]).is_none());
        // With routes, published all the same: the routes say where requests go.
        let route = ward_spiffe::route::HttpRoute {
            name: "httproute/shop/api".into(),
            port: None,
            hostnames: vec![],
            rules: vec![],
        };
        let s = build(&svc(), &[], &ids, vec![route]).unwrap();
        assert!(s.endpoints.is_empty() && s.routes.len() == 1);
    }
}
