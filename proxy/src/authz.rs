//! Authorization at the proxy: the policies in force for this workload, evaluated per HTTP
//! request and per TCP connection, in enforce or dry-run mode, with policy files hot-reloaded.
//!
//! A policy source that fails to parse or validate is refused as a whole: the last good set
//! stays in force, the error is logged and counted.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use ward_spiffe::SpiffeId;
use ward_spiffe::policy::{
    DefaultPolicy, Policy, PolicyDoc, PolicySet, Request, TargetPolicies, Verdict,
};

use crate::config::{Authorization, AuthzMode};
use crate::metrics::Metrics;

/// Policies from the different sources, merged.
#[derive(Debug, Default, Clone)]
struct Sources {
    files: Vec<Policy>,
    agent: Vec<Policy>,
}

/// The authorizer.
#[derive(Debug)]
pub struct Authz {
    mode: AuthzMode,
    default: DefaultPolicy,
    sources: RwLock<Sources>,
    set: RwLock<Arc<PolicySet>>,
    /// The view of the current set for this workload, with the set it was built from: a view
    /// is only used while its set is still the current one.
    view: RwLock<Option<(Arc<PolicySet>, Arc<TargetPolicies>)>>,
    metrics: Metrics,
}

/// A decision with what the access log needs.
#[derive(Debug, Clone)]
pub struct Decision {
    /// Whether the request proceeds (always true in dry-run).
    pub proceed: bool,
    /// The policy verdict.
    pub verdict: Verdict,
    /// True if in dry-run and the verdict was a denial.
    pub dry_run_denied: bool,
}

impl Decision {
    /// `allow`, `deny` or `would-deny`.
    pub fn label(&self) -> &'static str {
        if self.dry_run_denied {
            "would-deny"
        } else if self.proceed {
            "allow"
        } else {
            "deny"
        }
    }

    /// The policy label for metrics and logs.
    pub fn policy_label(&self) -> String {
        match (&self.verdict.policy, &self.verdict.reason) {
            (Some(p), _) => p.to_string(),
            (None, ward_spiffe::policy::Reason::Default(d)) => format!("default:{d}"),
            (None, ward_spiffe::policy::Reason::InvalidPath) => "invalid-path".into(),
            (None, _) => "none".into(),
        }
    }
}

impl Authz {
    /// An authorizer with no policies yet.
    pub fn new(cfg: &Authorization, metrics: Metrics) -> Self {
        Self {
            mode: cfg.mode,
            default: cfg.default,
            sources: RwLock::new(Sources::default()),
            set: RwLock::new(Arc::new(PolicySet::default())),
            view: RwLock::new(None),
            metrics,
        }
    }

    /// The policies in force.
    pub fn policy_set(&self) -> Arc<PolicySet> {
        self.set.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The configured default.
    pub fn default_policy(&self) -> DefaultPolicy {
        self.default
    }

    fn rebuild(&self, sources: &Sources) -> Result<(), String> {
        let mut all = sources.files.clone();
        all.extend(sources.agent.iter().cloned());
        let set = PolicySet::compile(all).map_err(|e| e.to_string())?;
        self.metrics.policies.set(set.len() as i64);
        *self.set.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(set);
        *self.view.write().unwrap_or_else(|p| p.into_inner()) = None;
        Ok(())
    }

    /// Replaces the file-sourced policies; refuses the whole set on any error.
    pub fn set_file_policies(&self, policies: Vec<Policy>) -> Result<(), String> {
        let mut sources = self.sources.write().unwrap_or_else(|p| p.into_inner());
        let mut next = sources.clone();
        next.files = policies;
        self.rebuild(&next)?;
        *sources = next;
        Ok(())
    }

    /// Replaces the agent-sourced policies; refuses the whole set on any error.
    pub fn set_agent_policies(&self, policies: Vec<Policy>) -> Result<(), String> {
        let mut sources = self.sources.write().unwrap_or_else(|p| p.into_inner());
        let mut next = sources.clone();
        next.agent = policies;
        self.rebuild(&next)?;
        *sources = next;
        Ok(())
    }

    fn view_for(&self, target: &SpiffeId) -> Arc<TargetPolicies> {
        let set = self.policy_set();
        if let Some((s, v)) = self.view.read().unwrap_or_else(|p| p.into_inner()).as_ref()
            && Arc::ptr_eq(s, &set)
            && v.target() == target
        {
            return v.clone();
        }
        // Built from `set`, cached with it: if another set was installed meanwhile, the next
        // call sees the pointer differ and rebuilds, so a stale view can never stick.
        let v = Arc::new(set.for_target(target));
        *self.view.write().unwrap_or_else(|p| p.into_inner()) = Some((set, v.clone()));
        v
    }

    /// The decision for a request whose path is ambiguous: denied without consulting policy
    /// (in dry-run: reported as would-deny and let through).
    pub fn invalid_path(&self) -> Decision {
        let dry = self.mode == AuthzMode::DryRun;
        Decision {
            proceed: dry,
            dry_run_denied: dry,
            verdict: Verdict {
                allowed: false,
                reason: ward_spiffe::policy::Reason::InvalidPath,
                policy: None,
                rule: None,
                audit: None,
            },
        }
    }

    /// Decides one request.
    pub fn decide(&self, req: &Request<'_>) -> Decision {
        let verdict = self.view_for(req.target).evaluate(req, self.default);
        let dry = self.mode == AuthzMode::DryRun;
        Decision {
            proceed: verdict.allowed || dry,
            dry_run_denied: dry && !verdict.allowed,
            verdict,
        }
    }
}

/// Follows the agent's `WatchPolicies` stream for this workload until `stop`, replacing the
/// agent-sourced policies on every snapshot.
pub async fn watch_agent(
    authz: Arc<Authz>,
    egress: Option<Arc<crate::egress::Egress>>,
    socket: PathBuf,
    spiffe_id: Option<SpiffeId>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let r = tokio::select! {
            r = follow_agent(&authz, egress.as_deref(), &socket, spiffe_id.as_ref()) => r,
            _ = ward_net::process::until_set(&mut stop) => return,
        };
        match r {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(e) => tracing::warn!(error = %e, "agent policy stream failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = ward_net::process::until_set(&mut stop) => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn follow_agent(
    authz: &Authz,
    egress: Option<&crate::egress::Egress>,
    socket: &Path,
    spiffe_id: Option<&SpiffeId>,
) -> Result<(), String> {
    use ward_proto::agent::WatchPoliciesRequest;
    use ward_proto::agent::policies_client::PoliciesClient;
    let mut client = PoliciesClient::new(ward_net::process::unix_channel(socket));
    let mut req = tonic::Request::new(WatchPoliciesRequest {
        spiffe_id: spiffe_id.map(ToString::to_string).unwrap_or_default(),
    });
    req.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    let mut stream = client
        .watch_policies(req)
        .await
        .map_err(|s| s.message().to_owned())?
        .into_inner();
    while let Some(snap) = stream
        .message()
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
    {
        let result = snap
            .policies
            .iter()
            .map(ward_proto::convert::policy_from_proto)
            .collect::<Result<Vec<_>, _>>()
            .and_then(|p| authz.set_agent_policies(p));
        match result {
            Ok(()) => tracing::info!(
                for_id = %snap.spiffe_id,
                policies = snap.policies.len(),
                "policies from the agent applied"
            ),
            Err(e) => {
                authz.metrics.policy_errors.inc();
                tracing::error!(error = %e, "policies from the agent refused; keeping the last good set");
            }
        }
        if let (Some(eg), Some(m)) = (egress, &snap.egress) {
            match ward_proto::convert::egress_from_proto(m).and_then(|d| eg.replace(d)) {
                Ok(()) => tracing::info!(
                    revision = m.revision,
                    services = m.services.len(),
                    "egress configuration from the agent applied"
                ),
                Err(e) => {
                    authz.metrics.policy_errors.inc();
                    tracing::error!(error = %e,
                        "egress configuration from the agent refused; keeping the last good one");
                }
            }
        }
    }
    Ok(())
}

/// Parses one policy file (YAML `policies: [...]`).
pub fn read_policy_file(path: &Path) -> Result<Vec<Policy>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let doc: PolicyDoc =
        serde_yaml_ng::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    // Validate this file on its own so the error names it.
    PolicySet::compile(doc.policies.clone()).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(doc.policies)
}

/// Reads every policy file; the first error refuses them all.
pub fn read_policy_files(paths: &[PathBuf]) -> Result<Vec<Policy>, String> {
    let mut all = Vec::new();
    for p in paths {
        all.extend(read_policy_file(p)?);
    }
    Ok(all)
}

/// Loads the policy files now (an error here stops start-up) and then reloads them whenever
/// they change until `stop`.
pub async fn watch_files(
    authz: Arc<Authz>,
    paths: Vec<PathBuf>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let stamp = |paths: &[PathBuf]| -> Vec<Option<(SystemTime, u64)>> {
        paths
            .iter()
            .map(|p| {
                std::fs::metadata(p)
                    .ok()
                    .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()))
            })
            .collect()
    };
    let mut last = stamp(&paths);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = ward_net::process::until_set(&mut stop) => return,
        }
        let now = stamp(&paths);
        if now == last {
            continue;
        }
        last = now;
        match read_policy_files(&paths).and_then(|p| authz.set_file_policies(p)) {
            Ok(()) => tracing::info!(policies = authz.policy_set().len(), "policy files reloaded"),
            Err(e) => {
                authz.metrics.policy_errors.inc();
                tracing::error!(error = %e, "policy files refused; keeping the last good policies");
            }
        }
    }
}
