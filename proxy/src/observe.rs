//! The observe stage: one [`Record`] per HTTP request or TCP connection, started from what
//! arrived, given the decision and the plan, and finished with what happened. It is the one
//! place that builds access-log entries and counts decisions and latency, whatever the role.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ward_spiffe::SpiffeId;

use crate::access_log::{AccessLog, Entry, LogFull, Slot};
use crate::authz::Decision;
use crate::metrics::{DecisionLabel, ListenerLabel, Metrics};

/// Where records go.
#[derive(Debug, Clone)]
pub struct Observer {
    /// The access log, if configured.
    pub log: Option<AccessLog>,
    /// The metrics.
    pub metrics: Metrics,
}

/// What a decision contributes to a record: its label, the deciding policy, an AUDIT match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// `allow`, `deny`, `would-deny`, `error`.
    pub decision: &'static str,
    /// Deciding policy, `default:<mode>`, `outbound`, ...
    pub policy: String,
    /// AUDIT policy that matched.
    pub audit: Option<String>,
}

impl Outcome {
    /// The outcome of an authorization decision.
    pub fn of(d: &Decision) -> Self {
        Self {
            decision: d.label(),
            policy: d.policy_label(),
            audit: d.verdict.audit.as_ref().map(ToString::to_string),
        }
    }

    /// A non-authorization outcome (outbound forwarding, errors).
    pub fn plain(decision: &'static str, policy: &str) -> Self {
        Self {
            decision,
            policy: policy.to_owned(),
            audit: None,
        }
    }
}

/// One request or connection on its way through the proxy.
#[derive(Debug, Clone)]
pub struct Record {
    time: SystemTime,
    start: Instant,
    listener: Arc<str>,
    protocol: &'static str,
    src: Option<String>,
    /// This workload (inbound) or the peer proxy (outbound).
    pub dst: Option<String>,
    method: Option<String>,
    path: Option<String>,
    orig_dst: Option<SocketAddr>,
    plan: &'static str,
    /// The endpoint a balanced plan chose.
    pub endpoint: Option<String>,
    /// The route rule that applied.
    pub route: Option<String>,
    /// Egress: the name the application asked for (SNI or Host).
    pub host: Option<String>,
    /// The gateway's client.
    pub client: Option<SocketAddr>,
    outcome: Outcome,
    /// Room in the access log's queue, when it was taken at the start.
    slot: Option<Arc<std::sync::Mutex<Option<Slot>>>>,
}

impl Record {
    /// Starts a record for a connection or request that arrived now.
    pub fn start(
        listener: &Arc<str>,
        protocol: &'static str,
        src: Option<&SpiffeId>,
        orig_dst: Option<SocketAddr>,
    ) -> Self {
        Self {
            time: SystemTime::now(),
            start: Instant::now(),
            listener: listener.clone(),
            protocol,
            src: src.map(ToString::to_string),
            dst: None,
            method: None,
            path: None,
            orig_dst,
            plan: "refuse",
            endpoint: None,
            route: None,
            host: None,
            client: None,
            outcome: Outcome::plain("error", "none"),
            slot: None,
        }
    }

    /// Takes room in the access log for this record before anything is served
    /// (`access_log.on_full: block` waits for it, `refuse` fails when there is none).
    pub async fn admit(&mut self, obs: &Observer) -> Result<(), LogFull> {
        if let Some(log) = &obs.log
            && let Some(slot) = log.reserve().await?
        {
            self.slot = Some(Arc::new(std::sync::Mutex::new(Some(slot))));
        }
        Ok(())
    }

    /// Adds an HTTP request's method and (raw) path.
    pub fn request(mut self, method: &str, path: &str) -> Self {
        self.method = Some(method.to_owned());
        self.path = Some(path.to_owned());
        self
    }

    /// Replaces the path (with the normalized one).
    pub fn set_path(&mut self, path: &str) {
        self.path = Some(path.to_owned());
    }

    /// Records the decision and the plan, and counts the decision.
    pub fn decided(&mut self, obs: &Observer, outcome: Outcome, plan: &'static str) {
        obs.metrics
            .requests
            .get_or_create(&DecisionLabel {
                listener: self.listener.to_string(),
                decision: outcome.decision.into(),
                policy: outcome.policy.clone(),
            })
            .inc();
        self.outcome = outcome;
        self.plan = plan;
    }

    /// Time since arrival.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Observes the latency to response headers (HTTP).
    pub fn observe_latency(&self, obs: &Observer) {
        obs.metrics
            .latency
            .get_or_create(&ListenerLabel {
                listener: self.listener.to_string(),
            })
            .observe(self.elapsed().as_secs_f64());
    }

    /// Writes the record: `status` (0 for TCP), a human reason, and the bytes each way.
    pub fn finish(
        self,
        obs: &Observer,
        status: u16,
        reason: String,
        bytes_in: u64,
        bytes_out: u64,
    ) {
        let Some(log) = &obs.log else { return };
        let slot = self
            .slot
            .and_then(|s| s.lock().ok().and_then(|mut s| s.take()));
        log.log(
            slot,
            Entry {
                time: self.time,
                listener: self.listener,
                protocol: self.protocol,
                src: self.src,
                dst: self.dst,
                method: self.method,
                path: self.path,
                orig_dst: self.orig_dst.map(|a| a.to_string()),
                plan: self.plan,
                endpoint: self.endpoint,
                route: self.route,
                host: self.host,
                client: self.client.map(|c| c.to_string()),
                status,
                decision: self.outcome.decision,
                policy: self.outcome.policy,
                reason,
                audit: self.outcome.audit,
                latency: self.start.elapsed(),
                bytes_in,
                bytes_out,
            },
        );
    }
}
