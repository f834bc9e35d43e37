//! The proxy's Prometheus metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of a request decision.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabel {
    /// Listener name.
    pub listener: String,
    /// `allow`, `deny`, `would-deny` (dry run).
    pub decision: String,
    /// Deciding policy, or `default:<mode>` / `none`.
    pub policy: String,
}

/// A listener.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    /// Listener name.
    pub listener: String,
}

/// A TLS failure.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsFailureLabel {
    /// Listener name.
    pub listener: String,
    /// Short reason: `expired`, `not_yet_valid`, `wrong_eku`, `unknown_issuer`, `bad_chain`
    /// (a signature that does not verify, ...), `no_client_cert`, `unknown_trust_domain`, ...
    pub reason: String,
}

/// A mesh service.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabel {
    /// Service name.
    pub service: String,
}

/// An endpoint of a mesh service.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabel {
    /// Service name.
    pub service: String,
    /// `ip:port`.
    pub endpoint: String,
}

/// What came of a request (or connection) to an endpoint.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointOutcome {
    /// Service name.
    pub service: String,
    /// `ip:port`.
    pub endpoint: String,
    /// `2xx`..`5xx`, `error` (no answer), `timeout`, or `connected` (TCP).
    pub outcome: String,
}

/// A route rule.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    /// `<route>#<rule index>`.
    pub route: String,
}

/// What came of a request a route rule decided.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteOutcome {
    /// `<route>#<rule index>`.
    pub route: String,
    /// The answer's status class, `2xx`..`5xx`.
    pub outcome: String,
}

/// A certificate the gateway serves, by its first DNS name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertLabel {
    /// The certificate's first DNS name.
    pub name: String,
}

/// The outcomes counted per endpoint (for removing an endpoint's series).
pub const ENDPOINT_OUTCOMES: [&str; 8] = [
    "1xx",
    "2xx",
    "3xx",
    "4xx",
    "5xx",
    "error",
    "timeout",
    "connected",
];

/// `2xx` for 204, and so on.
pub fn status_class(status: u16) -> String {
    format!("{}xx", (status / 100).clamp(1, 5))
}

/// Every proxy metric, behind one `Arc`: a clone (one per request record) is one atomic
/// increment rather than one per family.
#[derive(Debug, Clone)]
pub struct Metrics(std::sync::Arc<MetricSet>);

impl std::ops::Deref for Metrics {
    type Target = MetricSet;
    fn deref(&self) -> &MetricSet {
        &self.0
    }
}

/// The proxy's metric families.
#[derive(Debug)]
pub struct MetricSet {
    /// Requests and TCP connections by decision and policy.
    pub requests: Family<DecisionLabel, Counter>,
    /// Request latency through the proxy (to response headers), per listener.
    pub latency: Family<ListenerLabel, Histogram, fn() -> Histogram>,
    /// TLS handshake failures by reason.
    pub tls_failures: Family<TlsFailureLabel, Counter>,
    /// HTTP connections closed for going over a limit (`header_size`, `header_read_timeout`).
    pub http_limits: Family<TlsFailureLabel, Counter>,
    /// Open connections per listener.
    pub open_connections: Family<ListenerLabel, Gauge>,
    /// Expiry of the current SVID (Unix seconds).
    pub svid_expiry: Gauge,
    /// Policies in force.
    pub policies: Gauge,
    /// Policy sources refused (the last good set stays).
    pub policy_errors: Counter,
    /// Access-log records dropped because the writer fell behind.
    pub log_dropped: Counter,
    /// Requests and connections refused because the access log could not take their record
    /// (`access_log.on_full: refuse`, or a stopped writer).
    pub log_refused: Counter,
    /// Identity updates refused.
    pub identity_errors: Counter,
    /// Requests to mesh services sent again to another endpoint, per service.
    pub retries: Family<ServiceLabel, Counter>,
    /// Ejections by failure accrual, per endpoint.
    pub ejections: Family<EndpointLabel, Counter>,
    /// Requests and connections per endpoint, by outcome.
    pub endpoint_requests: Family<EndpointOutcome, Counter>,
    /// Time to response headers per endpoint.
    pub endpoint_latency: Family<EndpointLabel, Histogram, fn() -> Histogram>,
    /// The balancer's latency estimate (peak EWMA) per endpoint, in seconds.
    pub endpoint_ewma: Family<EndpointLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Requests per route rule, by the answer's status class.
    pub route_requests: Family<RouteOutcome, Counter>,
    /// Time to response headers per route rule.
    pub route_latency: Family<RouteLabel, Histogram, fn() -> Histogram>,
    /// Expiry of each certificate the gateway serves (Unix seconds).
    pub gateway_cert_expiry: Family<CertLabel, Gauge>,
    /// Certificate loads and renewals that failed (the old certificate stays), by name.
    pub gateway_cert_errors: Family<CertLabel, Counter>,
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 18))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Fresh metrics.
    pub fn new() -> Self {
        Self(std::sync::Arc::new(MetricSet {
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            tls_failures: Family::default(),
            http_limits: Family::default(),
            open_connections: Family::default(),
            svid_expiry: Gauge::default(),
            policies: Gauge::default(),
            policy_errors: Counter::default(),
            log_dropped: Counter::default(),
            log_refused: Counter::default(),
            identity_errors: Counter::default(),
            retries: Family::default(),
            ejections: Family::default(),
            endpoint_requests: Family::default(),
            endpoint_latency: Family::new_with_constructor(latency_histogram),
            endpoint_ewma: Family::default(),
            route_requests: Family::default(),
            route_latency: Family::new_with_constructor(latency_histogram),
            gateway_cert_expiry: Family::default(),
            gateway_cert_errors: Family::default(),
        }))
    }

    /// Registers under `ward_proxy`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("ward_proxy");
        r.register(
            "requests",
            "Requests and TCP connections by decision",
            self.requests.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Time to response headers",
            self.latency.clone(),
        );
        r.register(
            "tls_handshake_failures",
            "TLS handshake failures",
            self.tls_failures.clone(),
        );
        r.register(
            "http_limit_hits",
            "Connections closed and requests refused for going over a limit, by limit (label reason)",
            self.http_limits.clone(),
        );
        r.register(
            "open_connections",
            "Open connections",
            self.open_connections.clone(),
        );
        r.register(
            "svid_expiry_timestamp_seconds",
            "Expiry of the current SVID",
            self.svid_expiry.clone(),
        );
        r.register(
            "policies",
            "Authorization policies in force",
            self.policies.clone(),
        );
        r.register(
            "retries",
            "Requests to mesh services sent again to another endpoint (within the retry budget)",
            self.retries.clone(),
        );
        r.register(
            "endpoint_ejections",
            "Endpoints taken out of rotation after consecutive failures",
            self.ejections.clone(),
        );
        r.register(
            "endpoint_requests",
            "Requests (HTTP) and connections (TCP) to mesh endpoints, by outcome",
            self.endpoint_requests.clone(),
        );
        r.register(
            "endpoint_request_duration_seconds",
            "Time to response headers from a mesh endpoint",
            self.endpoint_latency.clone(),
        );
        r.register(
            "endpoint_ewma_seconds",
            "The balancer's peak-EWMA latency estimate of a mesh endpoint",
            self.endpoint_ewma.clone(),
        );
        r.register(
            "route_requests",
            "Requests decided by a route rule, by answer status class",
            self.route_requests.clone(),
        );
        r.register(
            "route_request_duration_seconds",
            "Time to response headers of requests decided by a route rule",
            self.route_latency.clone(),
        );
        r.register(
            "gateway_certificate_expiry_timestamp_seconds",
            "Expiry of a certificate the gateway serves",
            self.gateway_cert_expiry.clone(),
        );
        r.register(
            "gateway_certificate_errors",
            "Gateway certificate loads or renewals that failed (the old certificate keeps serving)",
            self.gateway_cert_errors.clone(),
        );
        r.register(
            "policy_errors",
            "Policy sources refused",
            self.policy_errors.clone(),
        );
        r.register(
            "access_log_dropped",
            "Access-log records dropped",
            self.log_dropped.clone(),
        );
        r.register(
            "access_log_refused",
            "Requests and connections refused because the access log could not record them",
            self.log_refused.clone(),
        );
        r.register(
            "identity_errors",
            "SVID or bundle updates refused",
            self.identity_errors.clone(),
        );
    }

    /// Forgets the series of an endpoint no longer listed (so series follow the endpoints in
    /// use, not every endpoint ever seen).
    pub fn forget_endpoint(&self, service: &str, endpoint: &str) {
        let l = EndpointLabel {
            service: service.into(),
            endpoint: endpoint.into(),
        };
        self.endpoint_latency.remove(&l);
        self.endpoint_ewma.remove(&l);
        self.ejections.remove(&l);
        for o in ENDPOINT_OUTCOMES {
            self.endpoint_requests.remove(&EndpointOutcome {
                service: service.into(),
                endpoint: endpoint.into(),
                outcome: o.into(),
            });
        }
    }

    /// Counts a TLS failure.
    pub fn http_limit(&self, listener: &str, limit: &str) {
        self.http_limits
            .get_or_create(&TlsFailureLabel {
                listener: listener.into(),
                reason: limit.into(),
            })
            .inc();
    }

    /// Counts one TLS handshake failure of `listener` by `reason`.
    pub fn tls_failure(&self, listener: &str, reason: &str) {
        self.tls_failures
            .get_or_create(&TlsFailureLabel {
                listener: listener.into(),
                reason: reason.into(),
            })
            .inc();
    }
}

/// Holds an open-connection gauge up while alive.
#[derive(Debug)]
pub struct ConnGuard(Gauge);

impl ConnGuard {
    /// Increments `listener`'s gauge until dropped.
    pub fn new(m: &Metrics, listener: &str) -> Self {
        let g = m
            .open_connections
            .get_or_create(&ListenerLabel {
                listener: listener.into(),
            })
            .clone();
        g.inc();
        Self(g)
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
