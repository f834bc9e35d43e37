//! The identity controller: keeps exactly one registration entry per pod and selecting policy,
//! from `IdentityPolicy` resources and the built-in default, and turns `AuthorizationPolicy`
//! resources into CA policies.
//!
//! Four kube-runtime watchers (pods, nodes, namespaces, identity policies; a fifth for
//! authorization policies) feed one task. Events update an in-memory [`Model`] and mark pods
//! dirty; whenever the event queue runs dry the dirty pods are planned ([`Model::plan`], pure),
//! compared with the entries the controller owns ([`diff`], pure), and the differences written
//! with [`EntryRepo::write_many`](crate::entries::EntryRepo::write_many) in large batches. A pod
//! event therefore touches only that pod's entries.
//!
//! Entry IDs are derived from (cluster, pod UID, policy), so a restarted CA finds the entries
//! it made (by origin `k8s/<cluster>/...`), and after every watcher has listed once, the first
//! full pass creates what is missing and deletes what no pod or policy wants any more: no
//! duplicates, no losses. Nothing is deleted before that first complete listing.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, ResourceExt};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};
use ward_spiffe::TrustDomain;

use super::crd::{AuthorizationPolicy, IdentityPolicy, IdentityPolicySpec};
use super::owned::{Owned, diff, pod_of};
use super::template::{self, PodFacts};
use crate::config::ControllerConfig;
use crate::core::CaCore;
use crate::entries::{self, Entry, EntryOp, EntrySpec};
use crate::error::ApiError;
use crate::metrics::ClusterLabel;

/// Writes per `write_many` call.
const WRITE_CHUNK: usize = 500;
/// Pods planned and written together.
const FLUSH_PODS: usize = 2_000;
/// Events applied before the dirty pods are flushed even if more are queued.
const MAX_EVENTS_PER_FLUSH: usize = 20_000;
/// How often changed policy statuses are written back.
const STATUS_EVERY: Duration = Duration::from_secs(1);
/// Render failures listed in a status (the count covers all).
const STATUS_FAILURES: usize = 10;
/// Wait before retrying writes that failed for a transient reason.
const RETRY_AFTER: Duration = Duration::from_millis(500);
/// The built-in default policy's template.
pub const DEFAULT_TEMPLATE: &str = "spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}";
/// Name under which the default policy appears in origins.
pub const DEFAULT_POLICY: &str = "default";
/// The default policy's key in outcomes (not a valid resource name, so no clash).
const DEFAULT_KEY: &str = "(default)";

/// What the controller keeps of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Service account (`default` when unset).
    pub service_account: String,
    /// Node it is scheduled on.
    pub node: Option<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// False once the pod has Succeeded or Failed.
    pub running: bool,
}

impl PodInfo {
    /// The facts of `pod`, keyed by UID; `None` if it has no UID, name or namespace.
    pub fn from_pod(pod: &Pod) -> Option<(String, Self)> {
        let uid = pod.metadata.uid.clone()?;
        let spec = pod.spec.as_ref();
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        Some((
            uid,
            Self {
                namespace: pod.metadata.namespace.clone()?,
                name: pod.metadata.name.clone()?,
                service_account: spec
                    .and_then(|s| s.service_account_name.clone())
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "default".into()),
                node: spec
                    .and_then(|s| s.node_name.clone())
                    .filter(|s| !s.is_empty()),
                labels: pod.metadata.labels.clone().unwrap_or_default(),
                running: !matches!(phase, Some("Succeeded" | "Failed")),
            },
        ))
    }
}

/// One entry a pod should have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    /// Deterministic entry ID.
    pub id: String,
    /// `k8s/<cluster>/identitypolicy/<name>` or `k8s/<cluster>/default`.
    pub origin: String,
    /// Fields.
    pub spec: EntrySpec,
}

/// How the policies fared for one pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// `namespace/name`.
    pub pod: String,
    /// `IdentityPolicy` resources that select the pod.
    pub selected_by: Vec<String>,
    /// (policy, error) for selecting policies that could not produce a valid entry.
    pub failures: Vec<(String, String)>,
}

/// A pod's plan: the entries it should have and the status it contributes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodPlan {
    /// Entries wanted.
    pub entries: Vec<Desired>,
    /// Status contribution.
    pub outcome: Outcome,
}

/// The watched state. Pure: no I/O.
#[derive(Debug)]
pub struct Model {
    td: TrustDomain,
    cluster: String,
    cfg: ControllerConfig,
    pods: HashMap<String, PodInfo>,
    by_ns: HashMap<String, HashSet<String>>,
    by_node: HashMap<String, HashSet<String>>,
    nodes: HashMap<String, String>,
    namespaces: HashMap<String, BTreeMap<String, String>>,
    policies: BTreeMap<String, IdentityPolicySpec>,
    dirty: HashSet<String>,
}

fn index_remove(idx: &mut HashMap<String, HashSet<String>>, key: &str, uid: &str) {
    if let Some(s) = idx.get_mut(key) {
        s.remove(uid);
        if s.is_empty() {
            idx.remove(key);
        }
    }
}

/// The deterministic entry ID for `pod_uid` under `origin` in `cluster`.
pub fn entry_id(cluster: &str, pod_uid: &str, origin: &str) -> String {
    let mut h = Sha256::new();
    for part in [cluster, pod_uid, origin] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    format!("k8s-{}", &hex::encode(h.finalize())[..40])
}

fn ttl_secs(v: Option<&str>, what: &str) -> Result<u32, String> {
    match v {
        None => Ok(0),
        Some(s) => {
            let d = ward_net::duration::parse(s).map_err(|e| format!("{what} {s:?}: {e}"))?;
            if d < Duration::from_secs(1) {
                return Err(format!("{what} {s:?} is shorter than 1s"));
            }
            u32::try_from(d.as_secs()).map_err(|_| format!("{what} {s:?} is too long"))
        }
    }
}

impl Model {
    /// An empty model for `cluster` in trust domain `td`.
    pub fn new(td: TrustDomain, cluster: &str, cfg: ControllerConfig) -> Self {
        Self {
            td,
            cluster: cluster.to_owned(),
            cfg,
            pods: HashMap::new(),
            by_ns: HashMap::new(),
            by_node: HashMap::new(),
            nodes: HashMap::new(),
            namespaces: HashMap::new(),
            policies: BTreeMap::new(),
            dirty: HashSet::new(),
        }
    }

    /// The origin prefix of every entry this controller owns.
    pub fn origin_prefix(&self) -> String {
        format!("k8s/{}/", self.cluster)
    }

    fn mark_all(&mut self) {
        self.dirty.extend(self.pods.keys().cloned());
    }

    fn mark(&mut self, uids: Option<&HashSet<String>>) {
        if let Some(u) = uids {
            self.dirty.extend(u.iter().cloned());
        }
    }

    /// A pod was added or changed.
    pub fn pod_applied(&mut self, uid: String, info: PodInfo) {
        if self.pods.get(&uid) == Some(&info) {
            return;
        }
        self.pod_deleted(&uid);
        self.by_ns
            .entry(info.namespace.clone())
            .or_default()
            .insert(uid.clone());
        if let Some(n) = &info.node {
            self.by_node
                .entry(n.clone())
                .or_default()
                .insert(uid.clone());
        }
        self.pods.insert(uid.clone(), info);
        self.dirty.insert(uid);
    }

    /// A pod is gone.
    pub fn pod_deleted(&mut self, uid: &str) {
        if let Some(old) = self.pods.remove(uid) {
            index_remove(&mut self.by_ns, &old.namespace, uid);
            if let Some(n) = &old.node {
                index_remove(&mut self.by_node, n, uid);
            }
        }
        self.dirty.insert(uid.to_owned());
    }

    /// A node was added or changed.
    pub fn node_applied(&mut self, name: String, uid: String) {
        if self.nodes.get(&name) != Some(&uid) {
            self.mark(self.by_node.get(&name).cloned().as_ref());
            self.nodes.insert(name, uid);
        }
    }

    /// A node is gone.
    pub fn node_deleted(&mut self, name: &str) {
        if self.nodes.remove(name).is_some() {
            self.mark(self.by_node.get(name).cloned().as_ref());
        }
    }

    /// A namespace was added or changed.
    pub fn namespace_applied(&mut self, name: String, labels: BTreeMap<String, String>) {
        if self.namespaces.get(&name) != Some(&labels) {
            self.mark(self.by_ns.get(&name).cloned().as_ref());
            self.namespaces.insert(name, labels);
        }
    }

    /// A namespace is gone.
    pub fn namespace_deleted(&mut self, name: &str) {
        if self.namespaces.remove(name).is_some() {
            self.mark(self.by_ns.get(name).cloned().as_ref());
        }
    }

    /// An identity policy was added or changed: every pod is re-planned.
    pub fn policy_applied(&mut self, name: String, spec: IdentityPolicySpec) {
        if self.policies.get(&name) != Some(&spec) {
            self.policies.insert(name, spec);
            self.mark_all();
        }
    }

    /// An identity policy is gone.
    pub fn policy_deleted(&mut self, name: &str) {
        if self.policies.remove(name).is_some() {
            self.mark_all();
        }
    }

    /// Marks pods for re-planning (after a failed write, or on the first full pass).
    pub fn mark_dirty(&mut self, uids: impl IntoIterator<Item = String>) {
        self.dirty.extend(uids);
    }

    /// Takes the pods to re-plan.
    pub fn take_dirty(&mut self) -> Vec<String> {
        let mut v: Vec<String> = self.dirty.drain().collect();
        v.sort();
        v
    }

    /// Whether a plan is pending.
    pub fn has_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Known keys per kind, to find what a re-list no longer has.
    fn keys(&self, kind: Kind) -> Vec<String> {
        match kind {
            Kind::Pod => self.pods.keys().cloned().collect(),
            Kind::Node => self.nodes.keys().cloned().collect(),
            Kind::Namespace => self.namespaces.keys().cloned().collect(),
            Kind::IdentityPolicy => self.policies.keys().cloned().collect(),
            Kind::AuthorizationPolicy => Vec::new(),
        }
    }

    /// Names of the identity policies.
    pub fn policy_names(&self) -> impl Iterator<Item = &String> {
        self.policies.keys()
    }

    /// Number of pods known.
    pub fn pod_count(&self) -> usize {
        self.pods.len()
    }

    /// What pod `uid` should have. A pod that is gone, finished, unscheduled, on an unknown
    /// node or in an ignored namespace should have nothing.
    pub fn plan(&self, uid: &str) -> PodPlan {
        let Some(pod) = self.pods.get(uid) else {
            return PodPlan::default();
        };
        let mut plan = PodPlan {
            entries: Vec::new(),
            outcome: Outcome {
                pod: format!("{}/{}", pod.namespace, pod.name),
                ..Default::default()
            },
        };
        if !pod.running || self.cfg.ignore_namespaces.contains(&pod.namespace) {
            return plan;
        }
        let Some(node) = &pod.node else {
            return plan;
        };
        let ns_labels = self.namespaces.get(&pod.namespace);
        let selecting: Vec<(&String, &IdentityPolicySpec)> = self
            .policies
            .iter()
            .filter(|(_, p)| {
                template::selects(p.namespace_selector.as_ref(), ns_labels)
                    && template::selects(p.pod_selector.as_ref(), Some(&pod.labels))
            })
            .collect();
        let Some(node_uid) = self.nodes.get(node) else {
            // The node is not known (yet): its agent ID cannot be formed. Not a failure of the
            // policy; the node's event will re-plan the pod.
            plan.outcome.selected_by = selecting.iter().map(|(n, _)| (*n).clone()).collect();
            return plan;
        };
        let parent = match super::psat::agent_id(&self.td, &self.cluster, node_uid) {
            Ok(p) => p.to_string(),
            Err(e) => {
                for (name, _) in &selecting {
                    plan.outcome.selected_by.push((*name).clone());
                    plan.outcome.failures.push(((*name).clone(), e.to_string()));
                }
                return plan;
            }
        };
        let facts = PodFacts {
            trust_domain: self.td.name(),
            namespace: &pod.namespace,
            service_account: &pod.service_account,
            pod_name: &pod.name,
            pod_uid: uid,
            node_name: node,
            pod_labels: Some(&pod.labels),
            namespace_labels: ns_labels,
        };
        let mut wanted: Vec<(String, Result<EntrySpec, String>)> = Vec::new();
        if selecting.is_empty() {
            if self.cfg.default_policy {
                let spec = self.render(DEFAULT_TEMPLATE, &[], None, None, &facts, &parent);
                if let Err(e) = &spec {
                    plan.outcome
                        .failures
                        .push((DEFAULT_KEY.to_owned(), e.clone()));
                }
                wanted.push((format!("{}{DEFAULT_POLICY}", self.origin_prefix()), spec));
            }
        } else {
            for (name, p) in &selecting {
                plan.outcome.selected_by.push((*name).clone());
                let spec = self.render(
                    &p.spiffe_id_template,
                    &p.dns_name_templates,
                    p.x509_svid_ttl.as_deref(),
                    p.jwt_svid_ttl.as_deref(),
                    &facts,
                    &parent,
                );
                if let Err(e) = &spec {
                    plan.outcome.failures.push(((*name).clone(), e.clone()));
                }
                wanted.push((
                    format!("{}identitypolicy/{name}", self.origin_prefix()),
                    spec,
                ));
            }
        }
        for (origin, spec) in wanted {
            if let Ok(spec) = spec {
                plan.entries.push(Desired {
                    id: entry_id(&self.cluster, uid, &origin),
                    origin,
                    spec,
                });
            }
        }
        plan
    }

    fn render(
        &self,
        id_template: &str,
        dns_templates: &[String],
        x509_ttl: Option<&str>,
        jwt_ttl: Option<&str>,
        facts: &PodFacts<'_>,
        parent: &str,
    ) -> Result<EntrySpec, String> {
        let spiffe_id = template::render(id_template, facts)?;
        let mut dns_names: Vec<String> = Vec::new();
        for t in dns_templates {
            let d = template::render(t, facts)?;
            if !dns_names.contains(&d) {
                dns_names.push(d);
            }
        }
        let spec = EntrySpec {
            spiffe_id,
            parent_id: parent.to_owned(),
            selectors: vec![format!("k8s:pod-uid:{}", facts.pod_uid)],
            x509_svid_ttl: ttl_secs(x509_ttl, "x509SvidTtl")?,
            jwt_svid_ttl: ttl_secs(jwt_ttl, "jwtSvidTtl")?,
            dns_names,
            hint: String::new(),
            admin: false,
        };
        entries::validate(&spec, &self.td).map_err(|e| match e {
            ApiError::InvalidArgument(m) => m,
            other => other.to_string(),
        })?;
        Ok(spec)
    }
}

/// Kinds watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Pods.
    Pod,
    /// Nodes.
    Node,
    /// Namespaces.
    Namespace,
    /// `IdentityPolicy`.
    IdentityPolicy,
    /// `AuthorizationPolicy`.
    AuthorizationPolicy,
}

/// One watcher event, reduced to what the controller keeps.
#[derive(Debug)]
enum Ev {
    Init(Kind),
    InitDone(Kind),
    Pod(String, PodInfo),
    PodGone(String),
    Node(String, String),
    NodeGone(String),
    Namespace(String, BTreeMap<String, String>),
    NamespaceGone(String),
    Policy(String, IdentityPolicySpec),
    PolicyGone(String),
    Authz(Box<AuthorizationPolicy>),
    AuthzGone(String),
}

impl Ev {
    /// The key of an apply event, for re-list bookkeeping.
    fn applied_key(&self) -> Option<(Kind, &str)> {
        match self {
            Ev::Pod(k, _) => Some((Kind::Pod, k)),
            Ev::Node(k, _) => Some((Kind::Node, k)),
            Ev::Namespace(k, _) => Some((Kind::Namespace, k)),
            Ev::Policy(k, _) => Some((Kind::IdentityPolicy, k)),
            Ev::Authz(a) => Some((Kind::AuthorizationPolicy, a.metadata.name.as_deref()?)),
            _ => None,
        }
    }
}

/// Runs one watcher, turning its events into [`Ev`]s.
async fn forward<K, F>(api: Api<K>, kind: Kind, tx: mpsc::Sender<Ev>, convert: F)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    F: Fn(Event<K>) -> Option<Ev>,
{
    let mut stream = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(r) = stream.next().await {
        let ev = match r {
            Ok(Event::Init) => Some(Ev::Init(kind)),
            Ok(Event::InitDone) => Some(Ev::InitDone(kind)),
            Ok(e) => convert(e),
            Err(e) => {
                tracing::warn!(kind = ?kind, error = %e, "Kubernetes watch failed; retrying");
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

fn obj<K>(e: Event<K>) -> Option<(K, bool)> {
    match e {
        Event::Apply(k) | Event::InitApply(k) => Some((k, true)),
        Event::Delete(k) => Some((k, false)),
        Event::Init | Event::InitDone => None,
    }
}

/// Per-policy status as last computed.
#[derive(Debug, Default)]
struct Stats {
    selected: HashSet<String>,
    /// pod UID → (pod, error).
    failures: HashMap<String, (String, String)>,
}

/// The controller for one cluster.
pub struct Controller {
    core: Arc<CaCore>,
    client: kube::Client,
    cluster: String,
    cfg: ControllerConfig,
    model: Model,
    /// What is kept of the entries this controller owns, per pod.
    owned: Owned,
    outcomes: HashMap<String, Outcome>,
    stats: HashMap<String, Stats>,
    status_dirty: HashSet<String>,
    status_sent: HashMap<String, Value>,
    relisting: HashMap<Kind, HashSet<String>>,
    listed: HashSet<Kind>,
    synced: bool,
    authz: HashSet<String>,
    retry_at: Option<Instant>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("cluster", &self.cluster)
            .finish_non_exhaustive()
    }
}

/// Prefix of CA policies made from `AuthorizationPolicy` resources of `cluster`.
pub fn authz_prefix(cluster: &str) -> String {
    format!("k8s:{cluster}:")
}

impl Controller {
    /// A controller for `cluster` using `client`.
    pub fn new(
        core: Arc<CaCore>,
        client: kube::Client,
        cluster: &str,
        cfg: ControllerConfig,
    ) -> Self {
        let model = Model::new(core.cfg.trust_domain.clone(), cluster, cfg.clone());
        Self {
            core,
            client,
            cluster: cluster.to_owned(),
            cfg,
            model,
            owned: Owned::default(),
            outcomes: HashMap::new(),
            stats: HashMap::new(),
            status_dirty: HashSet::new(),
            status_sent: HashMap::new(),
            relisting: HashMap::new(),
            listed: HashSet::new(),
            synced: false,
            authz: HashSet::new(),
            retry_at: None,
        }
    }

    fn label(&self) -> ClusterLabel {
        ClusterLabel {
            cluster: self.cluster.clone(),
        }
    }

    fn kinds(&self) -> Vec<Kind> {
        let mut k = vec![Kind::Pod, Kind::Node, Kind::Namespace, Kind::IdentityPolicy];
        if self.cfg.authorization_policies {
            k.push(Kind::AuthorizationPolicy);
        }
        k
    }

    /// Runs until `stop` is set.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        if let Err(e) = self.load_owned().await {
            tracing::error!(cluster = %self.cluster, error = %e, "cannot read the entries the controller owns; controller not started");
            return;
        }
        let (tx, mut rx) = mpsc::channel::<Ev>(4096);
        let mut tasks = tokio::task::JoinSet::new();
        let c = self.client.clone();
        tasks.spawn(forward(
            Api::<Pod>::all(c.clone()),
            Kind::Pod,
            tx.clone(),
            |e| {
                let (p, live) = obj(e)?;
                let (uid, info) = PodInfo::from_pod(&p)?;
                Some(if live {
                    Ev::Pod(uid, info)
                } else {
                    Ev::PodGone(uid)
                })
            },
        ));
        tasks.spawn(forward(
            Api::<Node>::all(c.clone()),
            Kind::Node,
            tx.clone(),
            |e| {
                let (n, live) = obj(e)?;
                let name = n.metadata.name.clone()?;
                Some(if live {
                    Ev::Node(name, n.metadata.uid.clone()?)
                } else {
                    Ev::NodeGone(name)
                })
            },
        ));
        tasks.spawn(forward(
            Api::<Namespace>::all(c.clone()),
            Kind::Namespace,
            tx.clone(),
            |e| {
                let (n, live) = obj(e)?;
                let name = n.metadata.name.clone()?;
                Some(if live {
                    Ev::Namespace(name, n.metadata.labels.clone().unwrap_or_default())
                } else {
                    Ev::NamespaceGone(name)
                })
            },
        ));
        tasks.spawn(forward(
            Api::<IdentityPolicy>::all(c.clone()),
            Kind::IdentityPolicy,
            tx.clone(),
            |e| {
                let (p, live) = obj(e)?;
                let name = p.metadata.name.clone()?;
                Some(if live {
                    Ev::Policy(name, p.spec)
                } else {
                    Ev::PolicyGone(name)
                })
            },
        ));
        if self.cfg.authorization_policies {
            tasks.spawn(forward(
                Api::<AuthorizationPolicy>::all(c),
                Kind::AuthorizationPolicy,
                tx.clone(),
                |e| {
                    let (p, live) = obj(e)?;
                    Some(if live {
                        Ev::Authz(Box::new(p))
                    } else {
                        Ev::AuthzGone(p.name_any())
                    })
                },
            ));
        }
        drop(tx);
        tracing::info!(cluster = %self.cluster, "identity controller started");
        let mut status_tick = tokio::time::interval(STATUS_EVERY);
        status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let retry = self.retry_at;
            tokio::select! {
                ev = rx.recv() => {
                    let Some(ev) = ev else { return };
                    self.apply(ev).await;
                    let mut n = 1;
                    while n < MAX_EVENTS_PER_FLUSH && let Ok(ev) = rx.try_recv() {
                        self.apply(ev).await;
                        n += 1;
                    }
                }
                _ = async {
                    match retry {
                        Some(at) => tokio::time::sleep_until(at.into()).await,
                        None => std::future::pending().await,
                    }
                } => { self.retry_at = None; }
                _ = status_tick.tick() => {
                    self.write_statuses().await;
                    continue;
                }
                _ = ward_net::process::until_set(&mut stop) => return,
            }
            if self.synced && self.retry_at.is_none() && self.model.has_dirty() {
                self.flush().await;
            }
        }
    }

    async fn load_owned(&mut self) -> Result<(), ApiError> {
        let prefix = self.model.origin_prefix();
        for e in self.core.entries.list(None, None).await? {
            if e.origin.starts_with(&prefix) {
                self.owned.remember(&pod_of(&e), &e);
            }
        }
        if self.cfg.authorization_policies {
            let p = authz_prefix(&self.cluster);
            for r in self.core.policies.list().await? {
                if r.policy.name.starts_with(&p) {
                    self.authz.insert(r.policy.name);
                }
            }
        }
        tracing::info!(cluster = %self.cluster, entries = self.owned.len(), "controller resumed its entries");
        Ok(())
    }

    async fn apply(&mut self, ev: Ev) {
        if let Some((kind, key)) = ev.applied_key()
            && let Some(seen) = self.relisting.get_mut(&kind)
        {
            seen.insert(key.to_owned());
        }
        match ev {
            Ev::Init(kind) => {
                self.relisting.insert(kind, HashSet::new());
            }
            Ev::InitDone(kind) => self.relisted(kind).await,
            Ev::Pod(uid, info) => self.model.pod_applied(uid, info),
            Ev::PodGone(uid) => self.model.pod_deleted(&uid),
            Ev::Node(n, uid) => self.model.node_applied(n, uid),
            Ev::NodeGone(n) => self.model.node_deleted(&n),
            Ev::Namespace(n, l) => self.model.namespace_applied(n, l),
            Ev::NamespaceGone(n) => self.model.namespace_deleted(&n),
            Ev::Policy(n, spec) => {
                self.status_dirty.insert(n.clone());
                self.model.policy_applied(n, spec);
            }
            Ev::PolicyGone(n) => {
                self.stats.remove(&n);
                self.status_sent.remove(&n);
                self.model.policy_deleted(&n);
            }
            Ev::Authz(p) => self.authz_applied(*p).await,
            Ev::AuthzGone(n) => self.authz_deleted(&n).await,
        }
    }

    /// A (re-)list ended: what it did not list is gone.
    async fn relisted(&mut self, kind: Kind) {
        let seen = self.relisting.remove(&kind).unwrap_or_default();
        if kind == Kind::AuthorizationPolicy {
            let p = authz_prefix(&self.cluster);
            let stale: Vec<String> = self
                .authz
                .iter()
                .filter(|n| !seen.contains(&n[p.len()..]))
                .cloned()
                .collect();
            for n in stale {
                self.authz_deleted(&n[p.len()..]).await;
            }
        } else {
            for key in self.model.keys(kind) {
                if !seen.contains(&key) {
                    match kind {
                        Kind::Pod => self.model.pod_deleted(&key),
                        Kind::Node => self.model.node_deleted(&key),
                        Kind::Namespace => self.model.namespace_deleted(&key),
                        Kind::IdentityPolicy => {
                            self.stats.remove(&key);
                            self.model.policy_deleted(&key);
                        }
                        Kind::AuthorizationPolicy => {}
                    }
                }
            }
        }
        self.listed.insert(kind);
        if !self.synced && self.kinds().iter().all(|k| self.listed.contains(k)) {
            self.synced = true;
            // The first full pass: every known pod, and every pod we own entries for (those
            // that disappeared while the CA was down are cleaned up now).
            let mut all: Vec<String> = self.owned.pods().cloned().collect();
            all.extend(self.model.pods.keys().cloned());
            self.model.mark_dirty(all);
            self.core
                .metrics
                .k8s_synced
                .get_or_create(&self.label())
                .set(1);
            tracing::info!(cluster = %self.cluster, pods = self.model.pod_count(), "controller listed the cluster");
        }
    }

    async fn authz_applied(&mut self, p: AuthorizationPolicy) {
        let name = p.name_any();
        let full = format!("{}{name}", authz_prefix(&self.cluster));
        let mut policy = match p.to_policy() {
            Ok(pol) => pol,
            Err(e) => {
                tracing::warn!(cluster = %self.cluster, policy = %name, error = %e, "AuthorizationPolicy refused; the previous version stays");
                return;
            }
        };
        policy.name = full.clone();
        let policies = self.core.policies.fenced(self.core.leadership.fence());
        match policies.put(vec![policy]).await {
            Ok(_) => {
                self.authz.insert(full);
            }
            Err(e) => {
                tracing::warn!(cluster = %self.cluster, policy = %name, error = %e, "AuthorizationPolicy refused; the previous version stays");
            }
        }
    }

    async fn authz_deleted(&mut self, name: &str) {
        let full = format!("{}{name}", authz_prefix(&self.cluster));
        let policies = self.core.policies.fenced(self.core.leadership.fence());
        match policies.delete(&full).await {
            Ok(()) | Err(ApiError::NotFound(_)) => {
                self.authz.remove(&full);
            }
            Err(e) => {
                tracing::warn!(cluster = %self.cluster, policy = %name, error = %e, "cannot delete policy");
            }
        }
    }

    /// Records pod `uid`'s outcome, updating the per-policy statistics.
    fn set_outcome(&mut self, uid: &str, new: Outcome) {
        let old = self.outcomes.remove(uid).unwrap_or_default();
        if old == new {
            if !new.selected_by.is_empty() || !new.failures.is_empty() {
                self.outcomes.insert(uid.to_owned(), new);
            }
            return;
        }
        for p in old
            .selected_by
            .iter()
            .chain(old.failures.iter().map(|(p, _)| p))
        {
            if let Some(s) = self.stats.get_mut(p) {
                s.selected.remove(uid);
                s.failures.remove(uid);
            }
            self.status_dirty.insert(p.clone());
        }
        for p in &new.selected_by {
            self.stats
                .entry(p.clone())
                .or_default()
                .selected
                .insert(uid.to_owned());
            self.status_dirty.insert(p.clone());
        }
        for (p, e) in &new.failures {
            if p == DEFAULT_KEY {
                tracing::warn!(cluster = %self.cluster, pod = %new.pod, error = %e, "default identity policy failed for pod");
            }
            self.stats
                .entry(p.clone())
                .or_default()
                .failures
                .insert(uid.to_owned(), (new.pod.clone(), e.clone()));
            self.status_dirty.insert(p.clone());
        }
        if !new.selected_by.is_empty() || !new.failures.is_empty() {
            self.outcomes.insert(uid.to_owned(), new);
        }
    }

    /// Plans every dirty pod and writes the differences.
    async fn flush(&mut self) {
        let dirty = self.model.take_dirty();
        // A group of pods at a time: their plans and writes are held only while they are
        // written, so a first pass over 100,000 pods does not hold 100,000 plans at once.
        let mut retry: Vec<String> = Vec::new();
        let mut groups = dirty.chunks(FLUSH_PODS);
        for group in groups.by_ref() {
            if !self.flush_group(group, &mut retry).await {
                // The store refused: the rest waits for the retry too.
                break;
            }
        }
        for group in groups {
            retry.extend(group.iter().cloned());
        }
        if !retry.is_empty() {
            self.model.mark_dirty(retry);
            self.retry_at = Some(Instant::now() + RETRY_AFTER);
        }
        let failures: usize = self.stats.values().map(|s| s.failures.len()).sum();
        self.core
            .metrics
            .k8s_entries
            .get_or_create(&self.label())
            .set(self.owned.len() as i64);
        self.core
            .metrics
            .k8s_render_failures
            .get_or_create(&self.label())
            .set(failures as i64);
    }

    /// Plans and writes the entries of `group`; pods to plan again go to `retry`. False when
    /// the store refused a write.
    async fn flush_group(&mut self, group: &[String], retry: &mut Vec<String>) -> bool {
        let mut stored = true;
        let mut ops: Vec<EntryOp> = Vec::new();
        let mut op_pod: Vec<String> = Vec::new();
        let mut plans: HashMap<String, PodPlan> = HashMap::new();
        for uid in group.iter().cloned() {
            let plan = self.model.plan(&uid);
            for op in diff(self.owned.of(&uid), &plan.entries) {
                ops.push(op);
                op_pod.push(uid.clone());
            }
            plans.insert(uid, plan);
        }
        let mut extra_failures: Vec<(String, String, String)> = Vec::new();
        let mut done = 0;
        // Within the store's transaction limit too (etcd's 128 operations).
        // Singleton work: every write carries the leadership fence.
        let entries = self.core.entries.fenced(self.core.leadership.fence());
        let chunk_size = WRITE_CHUNK.min(entries.batch_capacity());
        while done < ops.len() {
            let end = (done + chunk_size).min(ops.len());
            let chunk: Vec<EntryOp> = ops[done..end].to_vec();
            let results = match entries.write_many(chunk, self.core.clock.now()).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(cluster = %self.cluster, error = %e, "entry writes failed; retrying");
                    retry.extend(op_pod[done..].iter().cloned());
                    stored = false;
                    break;
                }
            };
            let mut writes = 0u64;
            for (i, r) in results.into_iter().enumerate() {
                let uid = &op_pod[done + i];
                let op = &ops[done + i];
                match (op, r) {
                    (EntryOp::Delete { id }, Ok(_)) => {
                        writes += 1;
                        self.forget(uid, id);
                    }
                    (EntryOp::Create { .. } | EntryOp::Update { .. }, Ok(e)) => {
                        writes += 1;
                        self.remember(uid, e);
                    }
                    (EntryOp::Delete { id }, Err(ApiError::NotFound(_))) => self.forget(uid, id),
                    (EntryOp::Update { id, .. }, Err(ApiError::NotFound(_))) => {
                        // Deleted behind our back: create it again.
                        self.forget(uid, id);
                        retry.push(uid.clone());
                    }
                    (EntryOp::Update { id, .. }, Err(ApiError::Aborted(_))) => {
                        // Changed behind our back: reload and retry.
                        self.reload(uid, id).await;
                        retry.push(uid.clone());
                    }
                    (EntryOp::Create { id, origin, .. }, Err(ApiError::AlreadyExists(m))) => {
                        match self.core.entries.get(id).await {
                            Ok(Some(e)) => {
                                self.remember(uid, e);
                                retry.push(uid.clone());
                            }
                            Ok(None) => {
                                let policy = match origin.split_once("/identitypolicy/") {
                                    Some((_, p)) => p.to_owned(),
                                    None => DEFAULT_KEY.to_owned(),
                                };
                                extra_failures.push((uid.clone(), policy, m));
                            }
                            Err(_) => retry.push(uid.clone()),
                        }
                    }
                    (_, Err(e)) => {
                        tracing::warn!(cluster = %self.cluster, pod_uid = %uid, error = %e, "entry write refused");
                        retry.push(uid.clone());
                    }
                }
            }
            self.core
                .metrics
                .k8s_entry_writes
                .get_or_create(&self.label())
                .inc_by(writes);
            done = end;
        }
        for (uid, policy, m) in extra_failures {
            if let Some(plan) = plans.get_mut(&uid) {
                plan.outcome.failures.push((policy, m));
            }
        }
        for (uid, plan) in plans {
            self.set_outcome(&uid, plan.outcome);
        }
        stored
    }

    fn remember(&mut self, uid: &str, e: Entry) {
        self.owned.remember(uid, &e);
    }

    fn forget(&mut self, uid: &str, id: &str) {
        self.owned.forget(uid, id);
    }

    async fn reload(&mut self, uid: &str, id: &str) {
        match self.core.entries.get(id).await {
            Ok(Some(e)) => self.remember(uid, e),
            Ok(None) => self.forget(uid, id),
            Err(e) => tracing::warn!(error = %e, "cannot reload entry {id}"),
        }
    }

    /// The status body of `policy`.
    fn status_of(&self, policy: &str) -> Value {
        let s = self.stats.get(policy);
        let mut failures: Vec<&(String, String)> =
            s.map(|s| s.failures.values().collect()).unwrap_or_default();
        failures.sort();
        let listed: Vec<Value> = failures
            .iter()
            .take(STATUS_FAILURES)
            .map(|(pod, error)| json!({ "pod": pod, "error": error }))
            .collect();
        json!({
            "podsSelected": s.map_or(0, |s| s.selected.len()),
            "renderFailureCount": s.map_or(0, |s| s.failures.len()),
            "renderFailures": listed,
        })
    }

    /// Writes the status of every policy whose status changed.
    async fn write_statuses(&mut self) {
        if !self.synced {
            return;
        }
        let api: Api<IdentityPolicy> = Api::all(self.client.clone());
        let names: Vec<String> = self.status_dirty.drain().collect();
        for name in names {
            if !self.model.policies.contains_key(&name) {
                continue;
            }
            let status = self.status_of(&name);
            if self.status_sent.get(&name) == Some(&status) {
                continue;
            }
            let patch = json!({ "status": status });
            match api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    self.status_sent.insert(name, status);
                }
                Err(e) => {
                    tracing::warn!(cluster = %self.cluster, policy = %name, error = %e, "cannot write policy status");
                    self.status_dirty.insert(name);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

    fn model() -> Model {
        let mut m = Model::new(
            TrustDomain::new("td").unwrap(),
            "c1",
            ControllerConfig::default(),
        );
        m.node_applied("n1".into(), "node-uid-1".into());
        m.namespace_applied("shop".into(), BTreeMap::new());
        m
    }

    fn pod(ns: &str, name: &str, sa: &str, node: Option<&str>) -> PodInfo {
        PodInfo {
            namespace: ns.into(),
            name: name.into(),
            service_account: sa.into(),
            node: node.map(str::to_owned),
            labels: [("app".to_owned(), name.to_owned())].into(),
            running: true,
        }
    }

    fn policy(template: &str, app: Option<&str>) -> IdentityPolicySpec {
        IdentityPolicySpec {
            spiffe_id_template: template.into(),
            pod_selector: app.map(|a| LabelSelector {
                match_labels: Some([("app".to_owned(), a.to_owned())].into()),
                match_expressions: None,
            }),
            namespace_selector: None,
            dns_name_templates: vec!["{pod_name}.{namespace}.svc".into()],
            x509_svid_ttl: Some("10m".into()),
            jwt_svid_ttl: None,
        }
    }

    #[test]
    fn default_policy_and_ignored_namespaces() {
        let mut m = model();
        m.pod_applied("u1".into(), pod("shop", "web", "web-sa", Some("n1")));
        m.pod_applied("u2".into(), pod("kube-system", "dns", "dns", Some("n1")));
        m.pod_applied("u3".into(), pod("shop", "pending", "x", None));
        let mut done = pod("shop", "job", "x", Some("n1"));
        done.running = false;
        m.pod_applied("u4".into(), done);
        assert_eq!(m.take_dirty(), vec!["u1", "u2", "u3", "u4"]);
        let p = m.plan("u1");
        assert_eq!(p.entries.len(), 1);
        let d = &p.entries[0];
        assert_eq!(d.spec.spiffe_id, "spiffe://td/ns/shop/sa/web-sa");
        assert_eq!(
            d.spec.parent_id,
            "spiffe://td/ward/agent/k8s_psat/c1/node-uid-1"
        );
        assert_eq!(d.spec.selectors, vec!["k8s:pod-uid:u1"]);
        assert_eq!(d.origin, "k8s/c1/default");
        assert_eq!(d.id, entry_id("c1", "u1", "k8s/c1/default"));
        assert!(d.id.len() <= 64);
        for uid in ["u2", "u3", "u4", "gone"] {
            assert!(m.plan(uid).entries.is_empty(), "{uid}");
        }
        let off = ControllerConfig {
            default_policy: false,
            ..Default::default()
        };
        let mut m2 = Model::new(TrustDomain::new("td").unwrap(), "c1", off);
        m2.node_applied("n1".into(), "nu".into());
        m2.pod_applied("u1".into(), pod("shop", "web", "web-sa", Some("n1")));
        assert!(m2.plan("u1").entries.is_empty());
    }

    #[test]
    fn policies_replace_the_default_for_the_pods_they_select() {
        let mut m = model();
        m.pod_applied("u1".into(), pod("shop", "web", "web", Some("n1")));
        m.pod_applied("u2".into(), pod("shop", "db", "db", Some("n1")));
        m.take_dirty();
        m.policy_applied(
            "web".into(),
            policy("spiffe://{trust_domain}/app/{pod_label:app}", Some("web")),
        );
        // A policy change re-plans every pod.
        assert_eq!(m.take_dirty(), vec!["u1", "u2"]);
        let p = m.plan("u1");
        assert_eq!(p.entries.len(), 1);
        assert_eq!(p.entries[0].spec.spiffe_id, "spiffe://td/app/web");
        assert_eq!(p.entries[0].spec.dns_names, vec!["web.shop.svc"]);
        assert_eq!(p.entries[0].spec.x509_svid_ttl, 600);
        assert_eq!(p.entries[0].origin, "k8s/c1/identitypolicy/web");
        assert_eq!(p.outcome.selected_by, vec!["web"]);
        assert!(p.outcome.failures.is_empty());
        assert_eq!(m.plan("u2").entries[0].origin, "k8s/c1/default");
    }

    #[test]
    fn render_failures_are_outcomes_not_entries() {
        let mut m = model();
        m.pod_applied("u1".into(), pod("shop", "web", "web", Some("n1")));
        m.policy_applied(
            "bad".into(),
            policy("spiffe://{trust_domain}/x/{pod_label:missing}", None),
        );
        m.policy_applied(
            "invalid".into(),
            policy("spiffe://{trust_domain}/a b/{pod_name}", None),
        );
        m.policy_applied(
            "other-td".into(),
            policy("spiffe://elsewhere/{pod_name}", None),
        );
        let mut ttl = policy("spiffe://{trust_domain}/{pod_name}", None);
        ttl.x509_svid_ttl = Some("forever".into());
        m.policy_applied("ttl".into(), ttl);
        let p = m.plan("u1");
        assert!(p.entries.is_empty(), "{:?}", p.entries);
        let failed: Vec<&str> = p.outcome.failures.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(failed, vec!["bad", "invalid", "other-td", "ttl"]);
        assert!(p.outcome.failures[0].1.contains("missing"));
        assert!(p.outcome.failures[2].1.contains("trust domain"));
    }

    #[test]
    fn node_and_namespace_events_replan_only_their_pods() {
        let mut m = model();
        m.namespace_applied("other".into(), BTreeMap::new());
        m.node_applied("n2".into(), "node-uid-2".into());
        m.pod_applied("u1".into(), pod("shop", "a", "a", Some("n1")));
        m.pod_applied("u2".into(), pod("other", "b", "b", Some("n2")));
        m.take_dirty();
        m.node_applied("n1".into(), "node-uid-1".into());
        assert!(m.take_dirty().is_empty(), "unchanged node");
        m.node_applied("n1".into(), "node-uid-1b".into());
        assert_eq!(m.take_dirty(), vec!["u1"]);
        assert_eq!(
            m.plan("u1").entries[0].spec.parent_id,
            "spiffe://td/ward/agent/k8s_psat/c1/node-uid-1b"
        );
        m.namespace_applied("other".into(), [("team".to_owned(), "x".to_owned())].into());
        assert_eq!(m.take_dirty(), vec!["u2"]);
        m.node_deleted("n2");
        assert_eq!(m.take_dirty(), vec!["u2"]);
        assert!(m.plan("u2").entries.is_empty(), "no node, no parent");
        // A pod moving between namespaces or nodes leaves the old indexes.
        m.pod_applied("u1".into(), pod("other", "a", "a", Some("n2")));
        m.take_dirty();
        m.node_applied("n1".into(), "node-uid-1c".into());
        assert!(m.take_dirty().is_empty());
    }

    #[test]
    fn diff_creates_updates_and_deletes_only_what_differs() {
        let mut m = model();
        m.pod_applied("u1".into(), pod("shop", "web", "web", Some("n1")));
        let plan = m.plan("u1");
        let ops = diff(&[], &plan.entries);
        assert!(matches!(&ops[..], [EntryOp::Create { .. }]));
        // What the repository would have stored.
        let d = &plan.entries[0];
        let e = Entry {
            id: d.id.clone(),
            spiffe_id: ward_spiffe::SpiffeId::new(&d.spec.spiffe_id).unwrap(),
            parent_id: ward_spiffe::SpiffeId::new(&d.spec.parent_id).unwrap(),
            selectors: vec![ward_spiffe::Selector::parse(&d.spec.selectors[0]).unwrap()],
            x509_svid_ttl: 0,
            jwt_svid_ttl: 0,
            dns_names: vec![],
            hint: String::new(),
            admin: false,
            revision: 7,
            created_at: 0,
            origin: d.origin.clone(),
        };
        let current = [super::super::owned::Held::of(&e)];
        assert!(diff(&current, &plan.entries).is_empty());
        let mut changed = plan.entries.clone();
        changed[0].spec.spiffe_id = "spiffe://td/other".into();
        match &diff(&current, &changed)[..] {
            [
                EntryOp::Update {
                    expected_revision, ..
                },
            ] => assert_eq!(*expected_revision, 7),
            other => panic!("{other:?}"),
        }
        assert!(matches!(&diff(&current, &[])[..], [EntryOp::Delete { .. }]));
        assert_eq!(pod_of(&e), "u1");
    }
}
