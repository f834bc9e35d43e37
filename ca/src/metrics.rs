//! The CA's Prometheus metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label: what was issued.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// `x509`, `jwt`, `agent`.
    pub kind: String,
}

/// Labels: attestation method and outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttestLabel {
    /// e.g. `join_token`.
    pub method: String,
    /// `ok` or the gRPC code name.
    pub result: String,
}

/// Labels: an API and the gRPC code a call was refused with.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabel {
    /// `node` or `admin`.
    pub api: String,
    /// The code, e.g. `ResourceExhausted`.
    pub code: String,
}

/// Label: a Kubernetes cluster.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabel {
    /// Cluster name.
    pub cluster: String,
}

/// Labels: one signing authority.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthorityLabel {
    /// `x509` or `jwt`.
    pub kind: String,
    /// Authority ID or JWT key ID.
    pub id: String,
}

/// Labels: one signing authority in one state.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthorityStateLabel {
    /// `x509` or `jwt`.
    pub kind: String,
    /// Authority ID or JWT key ID.
    pub id: String,
    /// `prepared`, `active`, `old`, `tainted`, `revoked`.
    pub state: String,
}

/// Every CA metric.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// SVIDs issued by kind.
    pub issued: Family<KindLabel, Counter>,
    /// Issuance requests refused, by kind.
    pub refused: Family<KindLabel, Counter>,
    /// Node attestations by method and result.
    pub attestations: Family<AttestLabel, Counter>,
    /// Open agent sync streams.
    pub sync_streams: Gauge,
    /// 1 while this replica leads (runs the singleton work), else 0.
    pub leader: Gauge,
    /// Current bundle sequence.
    pub bundle_sequence: Gauge,
    /// Unix time at which the active X.509 authority expires.
    pub x509_authority_expiry: Gauge,
    /// 1 for the state each authority is in, 0 for the others.
    pub authority_state: Family<AuthorityStateLabel, Gauge>,
    /// Expiry of each authority (Unix seconds).
    pub authority_expiry: Family<AuthorityLabel, Gauge>,
    /// Time to sign one batch of X.509-SVIDs, including the durable audit write.
    pub batch_seconds: Histogram,
    /// Entries the identity controller manages, by cluster.
    pub k8s_entries: Family<ClusterLabel, Gauge>,
    /// Selected pods whose identity could not be rendered, by cluster.
    pub k8s_render_failures: Family<ClusterLabel, Gauge>,
    /// 1 once the controller has listed everything it watches, by cluster.
    pub k8s_synced: Family<ClusterLabel, Gauge>,
    /// Entry writes (creates, updates, deletes) by the controller, by cluster.
    pub k8s_entry_writes: Family<ClusterLabel, Counter>,
    /// Tokens with an unknown key answered without fetching the JWKS again (the last fetch
    /// was too recent), by cluster.
    pub jwks_refresh_suppressed: Family<ClusterLabel, Counter>,
    /// Signing requests refused for going over the per-agent rate, by kind.
    pub rate_limited: Family<KindLabel, Counter>,
    /// Calls refused, by API and code (oversized messages: `ResourceExhausted`).
    pub api_refusals: Family<RefusalLabel, Counter>,
    /// Times the etcd watch resumed past a compaction and every cache re-read the store.
    pub store_watch_rereads: Counter,
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
            issued: Family::default(),
            refused: Family::default(),
            attestations: Family::default(),
            sync_streams: Gauge::default(),
            leader: Gauge::default(),
            bundle_sequence: Gauge::default(),
            x509_authority_expiry: Gauge::default(),
            authority_state: Family::default(),
            authority_expiry: Family::default(),
            batch_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            k8s_entries: Family::default(),
            k8s_render_failures: Family::default(),
            k8s_synced: Family::default(),
            k8s_entry_writes: Family::default(),
            jwks_refresh_suppressed: Family::default(),
            rate_limited: Family::default(),
            api_refusals: Family::default(),
            store_watch_rereads: Counter::default(),
        }
    }

    /// Registers everything under the `ward_ca` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("ward_ca");
        r.register("svids_issued", "SVIDs issued", self.issued.clone());
        r.register(
            "svid_requests_refused",
            "SVID requests refused",
            self.refused.clone(),
        );
        r.register(
            "attestations",
            "Node attestations",
            self.attestations.clone(),
        );
        r.register(
            "sync_streams",
            "Open agent sync streams",
            self.sync_streams.clone(),
        );
        r.register(
            "store_watch_rereads",
            "Times the etcd watch resumed past a compaction and every cache re-read the store",
            self.store_watch_rereads.clone(),
        );
        r.register(
            "leader",
            "1 while this replica leads and runs the singleton work (Kubernetes controllers, bundle ConfigMap, change-log compaction)",
            self.leader.clone(),
        );
        r.register(
            "bundle_sequence",
            "Trust bundle sequence",
            self.bundle_sequence.clone(),
        );
        r.register(
            "x509_authority_expiry_timestamp_seconds",
            "Expiry of the active X.509 authority (Unix seconds)",
            self.x509_authority_expiry.clone(),
        );
        r.register(
            "authority_state",
            "Signing authorities: 1 for the state each is in",
            self.authority_state.clone(),
        );
        r.register(
            "authority_expiry_timestamp_seconds",
            "Expiry of each signing authority (Unix seconds)",
            self.authority_expiry.clone(),
        );
        r.register(
            "sign_batch_duration_seconds",
            "Time to sign and durably log one batch of X.509-SVIDs",
            self.batch_seconds.clone(),
        );
        r.register(
            "k8s_managed_entries",
            "Registration entries the Kubernetes identity controller manages",
            self.k8s_entries.clone(),
        );
        r.register(
            "k8s_render_failures",
            "Selected pods whose identity templates did not render a valid entry",
            self.k8s_render_failures.clone(),
        );
        r.register(
            "k8s_synced",
            "1 once the identity controller has listed all it watches",
            self.k8s_synced.clone(),
        );
        r.register(
            "k8s_entry_writes",
            "Entry creates, updates and deletes by the identity controller",
            self.k8s_entry_writes.clone(),
        );
        r.register(
            "jwks_refresh_suppressed",
            "Tokens with an unknown key refused without fetching the cluster's JWKS again",
            self.jwks_refresh_suppressed.clone(),
        );
        r.register(
            "signing_rate_limited",
            "Signing requests refused for going over the per-agent rate (limits.signing_*)",
            self.rate_limited.clone(),
        );
        r.register(
            "api_refusals",
            "Node and admin API calls refused, by gRPC code (over limits.*_max_message_bytes: OutOfRange)",
            self.api_refusals.clone(),
        );
    }

    /// Counts one issued SVID of `kind`.
    pub fn issued(&self, kind: &str, n: u64) {
        self.issued
            .get_or_create(&KindLabel { kind: kind.into() })
            .inc_by(n);
    }

    /// Counts one refused request of `kind`.
    pub fn refused(&self, kind: &str) {
        self.refused
            .get_or_create(&KindLabel { kind: kind.into() })
            .inc();
    }
}
