//! The agent's Prometheus metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of a Workload API call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabel {
    /// RPC name.
    pub rpc: String,
    /// `OK` or the gRPC code.
    pub code: String,
}

/// Labels of a re-issued SVID.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReissueLabel {
    /// `workload` or `agent`.
    pub svid: String,
    /// `new`, `entry_changed`, `rotation`, `tainted`.
    pub reason: String,
}

/// Every agent metric.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Workload API calls by RPC and result.
    pub calls: Family<CallLabel, Counter>,
    /// Entries the agent serves.
    pub entries: Gauge,
    /// Workload SVIDs signed.
    pub svids_signed: Counter,
    /// SVIDs requested from the CA, by SVID kind and reason.
    pub reissued: Family<ReissueLabel, Counter>,
    /// Sync updates applied.
    pub sync_updates: Counter,
    /// Protobuf bytes of the sync updates received.
    pub sync_bytes: Counter,
    /// 1 while the sync stream is connected.
    pub sync_connected: Gauge,
    /// Open Workload API streams.
    pub streams: Gauge,
    /// Streams refused for going over `limits.max_streams_per_caller`.
    pub stream_limit_refusals: Counter,
    /// Round trip of one signing batch.
    pub sign_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Fresh metrics.
    pub fn new() -> Self {
        Self {
            calls: Family::default(),
            entries: Gauge::default(),
            svids_signed: Counter::default(),
            reissued: Family::default(),
            sync_updates: Counter::default(),
            sync_bytes: Counter::default(),
            sync_connected: Gauge::default(),
            streams: Gauge::default(),
            stream_limit_refusals: Counter::default(),
            sign_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
        }
    }

    /// Registers under `ward_agent`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("ward_agent");
        r.register(
            "workload_api_calls",
            "Workload API calls",
            self.calls.clone(),
        );
        r.register("entries", "Entries served", self.entries.clone());
        r.register(
            "svids_reissued",
            "SVIDs requested from the CA by kind (workload, agent) and reason",
            self.reissued.clone(),
        );
        r.register(
            "svids_signed",
            "Workload X.509-SVIDs obtained",
            self.svids_signed.clone(),
        );
        r.register(
            "sync_bytes",
            "Protobuf bytes of sync updates received from the CA",
            self.sync_bytes.clone(),
        );
        r.register(
            "sync_updates",
            "Sync updates applied",
            self.sync_updates.clone(),
        );
        r.register(
            "sync_connected",
            "Sync stream connected",
            self.sync_connected.clone(),
        );
        r.register(
            "workload_api_streams",
            "Open Workload API streams",
            self.streams.clone(),
        );
        r.register(
            "stream_limit_refusals",
            "Streams refused for going over limits.max_streams_per_caller",
            self.stream_limit_refusals.clone(),
        );
        r.register(
            "sign_batch_duration_seconds",
            "Signing batch round trip",
            self.sign_seconds.clone(),
        );
    }

    /// Counts a call.
    pub fn reissued(&self, svid: &str, reason: &str, n: u64) {
        self.reissued
            .get_or_create(&ReissueLabel {
                svid: svid.into(),
                reason: reason.into(),
            })
            .inc_by(n);
    }

    /// Counts one Workload API call.
    pub fn call(&self, rpc: &str, code: tonic::Code) {
        let code = if code == tonic::Code::Ok {
            "OK".to_owned()
        } else {
            format!("{code:?}")
        };
        self.calls
            .get_or_create(&CallLabel {
                rpc: rpc.into(),
                code,
            })
            .inc();
    }
}
