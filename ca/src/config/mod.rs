//! The CA's configuration: one struct, loaded from a TOML file (unknown keys are an error),
//! then overridden by `WARD_CA_*` environment variables, then by command-line flags.
//! Tests build values directly and never touch the process environment.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod store;

pub use store::{EtcdConfig, EtcdTls, StoreBackend, StoreConfig};

use serde::{Deserialize, Serialize};
use ward_net::duration::serde_str;
use ward_spiffe::TrustDomain;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// File.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The TOML is invalid or has unknown keys.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// File.
        path: String,
        /// Parser message (names the offending key).
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Upstream authority: the CA signs with an intermediate certified by this key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// PEM certificate of the upstream CA whose key is `key_file`.
    pub cert_file: PathBuf,
    /// PEM PKCS#8 private key of the upstream CA.
    pub key_file: PathBuf,
    /// PEM roots to publish in the bundle (the upstream root, and the chain from
    /// `cert_file` to it if `cert_file` is itself an intermediate).
    pub bundle_file: PathBuf,
}

/// How the CA checks a cluster's service-account tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PsatMode {
    /// Ask the API server (TokenReview), then read the pod and node.
    #[default]
    TokenReview,
    /// Verify the token's signature against the cluster's JWKS, without TokenReview.
    Offline,
}

/// One Kubernetes cluster whose agents attest with projected service-account tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Cluster name, part of agent IDs.
    pub name: String,
    /// Kubeconfig file; absent means in-cluster configuration.
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    /// `namespace:serviceaccount` pairs allowed to attest as agents.
    pub service_account_allow_list: Vec<String>,
    /// Audience the agents' tokens must carry.
    #[serde(default = "default_audience")]
    pub audience: String,
    /// TokenReview or offline verification.
    #[serde(default)]
    pub mode: PsatMode,
    /// Offline: the token issuer (`iss`).
    #[serde(default)]
    pub issuer: Option<String>,
    /// Offline: JWKS file.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// Offline: fetch keys from the issuer's OIDC discovery document (when no file is given).
    #[serde(default)]
    pub jwks_discovery: bool,
    /// Offline: CA bundle for HTTPS discovery (default: the system bundle).
    #[serde(default)]
    pub jwks_ca_file: Option<PathBuf>,
    /// Offline: a token with an unknown key makes the CA fetch the JWKS again at most this
    /// often (so unauthenticated callers cannot multiply load on the cluster's OIDC endpoint);
    /// keys unknown after a fetch are refused until the next one may happen.
    #[serde(
        default = "default_jwks_refresh",
        with = "ward_net::duration::serde_str"
    )]
    pub jwks_min_refresh_interval: std::time::Duration,
    /// Node labels that become agent selectors.
    #[serde(default)]
    pub node_label_allow_list: Vec<String>,
    /// Pod labels (of the agent pod) that become agent selectors.
    #[serde(default)]
    pub pod_label_allow_list: Vec<String>,
    /// The identity controller for this cluster.
    #[serde(default)]
    pub controller: ControllerConfig,
    /// `<namespace>/<name>` of a ConfigMap the CA keeps holding the trust bundle
    /// (`bundle.pem`, `bundle.spiffe`), so agents in the cluster can trust the CA before they
    /// first attest. Needs API access.
    #[serde(default)]
    pub bundle_config_map: Option<String>,
}

impl ClusterConfig {
    /// Whether the CA talks to this cluster's API server (TokenReview, or a kubeconfig given).
    pub fn has_api(&self) -> bool {
        self.mode == PsatMode::TokenReview || self.kubeconfig.is_some()
    }

    /// Whether the identity controller runs for this cluster.
    pub fn controller_enabled(&self) -> bool {
        self.controller.enabled.unwrap_or_else(|| self.has_api())
    }
}

/// The identity controller: one registration entry per selected pod, from `IdentityPolicy`
/// resources and the built-in default; `AuthorizationPolicy` resources become CA policies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerConfig {
    /// On or off; by default on whenever the CA has API access to the cluster.
    #[serde(default)]
    pub enabled: Option<bool>,
    /// The built-in policy `spiffe://<td>/ns/<namespace>/sa/<service-account>` for every pod
    /// no `IdentityPolicy` selects.
    #[serde(default = "yes")]
    pub default_policy: bool,
    /// Namespaces whose pods never get identities (add the namespace Ward runs in).
    #[serde(default = "default_ignore_namespaces")]
    pub ignore_namespaces: Vec<String>,
    /// Turn `AuthorizationPolicy` resources into CA policies.
    #[serde(default = "yes")]
    pub authorization_policies: bool,
    /// Keep mesh services from Services and EndpointSlices (service discovery).
    #[serde(default = "yes")]
    pub services: bool,
    /// Turn `ExternalService` resources into the mesh's external services (egress).
    #[serde(default = "yes")]
    pub egress: bool,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            enabled: None,
            default_policy: true,
            ignore_namespaces: default_ignore_namespaces(),
            authorization_policies: true,
            services: true,
            egress: true,
        }
    }
}

fn yes() -> bool {
    true
}

fn default_ignore_namespaces() -> Vec<String> {
    vec!["kube-system".into(), "kube-public".into(), "ward".into()]
}

fn default_jwks_refresh() -> std::time::Duration {
    std::time::Duration::from_secs(10)
}

fn default_audience() -> String {
    "ward-ca".into()
}

/// Kubernetes integration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// Clusters agents attest from.
    #[serde(default)]
    pub clusters: Vec<ClusterConfig>,
}

/// TTLs and lifetimes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Ttls {
    /// Lifetime of a signing authority (self-signed root or intermediate).
    #[serde(with = "serde_str")]
    pub ca: Duration,
    /// Default workload X.509-SVID TTL.
    #[serde(with = "serde_str")]
    pub x509_svid: Duration,
    /// Default JWT-SVID TTL.
    #[serde(with = "serde_str")]
    pub jwt_svid: Duration,
    /// Agent SVID TTL.
    #[serde(with = "serde_str")]
    pub agent_svid: Duration,
    /// Default join-token lifetime.
    #[serde(with = "serde_str")]
    pub join_token: Duration,
}

impl Default for Ttls {
    fn default() -> Self {
        Self {
            ca: Duration::from_secs(24 * 3600),
            x509_svid: Duration::from_secs(3600),
            jwt_svid: Duration::from_secs(300),
            agent_svid: Duration::from_secs(3600),
            join_token: Duration::from_secs(600),
        }
    }
}

/// Log output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// When authorities rotate on their own, as fractions of the active authority's lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RotationConfig {
    /// Rotate on the schedule (false: only `ward-ca authority ...` changes states, except that
    /// an empty store still gets its first authorities and expired ones are still removed).
    pub automatic: bool,
    /// Fraction of the active authority's lifetime at which a successor is prepared.
    pub prepare_at: f64,
    /// Fraction at which the prepared successor becomes active.
    pub activate_at: f64,
}

impl Default for RotationConfig {
    fn default() -> Self {
        Self {
            automatic: true,
            prepare_at: 0.5,
            activate_at: 5.0 / 6.0,
        }
    }
}

/// OIDC discovery for JWT-SVIDs: `/.well-known/openid-configuration` and `/keys` (the public
/// JWT authorities) over HTTP, for serving behind a TLS-terminating proxy at `issuer`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    /// The public issuer URL (https://…, no trailing slash); also the `iss` of every JWT-SVID.
    pub issuer: String,
    /// Where the discovery endpoints listen.
    #[serde(default = "default_oidc_bind")]
    pub bind_address: SocketAddr,
    /// `Cache-Control: max-age` of the responses. Keys are published from `prepare` on, long
    /// before they sign, so a cache shorter than the prepare → activate interval never misses.
    #[serde(default = "default_oidc_max_age", with = "serde_str")]
    pub max_age: Duration,
}

fn default_oidc_bind() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8084))
}

fn default_oidc_max_age() -> Duration {
    Duration::from_secs(300)
}

/// The whole CA configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaConfig {
    /// The trust domain this CA issues for.
    pub trust_domain: TrustDomain,
    /// Directory for the store (with the default backend), keys and the admin socket.
    pub data_dir: PathBuf,
    /// Where the CA's state lives: sled under `data_dir` (default) or a shared etcd.
    #[serde(default)]
    pub store: StoreConfig,
    /// Address of the node API (TLS).
    #[serde(default = "default_bind")]
    pub bind_address: SocketAddr,
    /// Address of `/metrics`, `/healthz`, `/readyz`.
    #[serde(default = "default_health")]
    pub health_address: SocketAddr,
    /// Admin API socket; default `<data_dir>/admin/api.sock`.
    #[serde(default)]
    pub admin_socket: Option<PathBuf>,
    /// Lifetimes.
    #[serde(default)]
    pub ttl: Ttls,
    /// Optional upstream authority.
    #[serde(default)]
    pub upstream: Option<UpstreamConfig>,
    /// The rotation schedule.
    #[serde(default)]
    pub rotation: RotationConfig,
    /// OIDC discovery for JWT-SVIDs; off if absent.
    #[serde(default)]
    pub oidc: Option<OidcConfig>,
    /// Kubernetes node attestation and identity controller.
    #[serde(default)]
    pub kubernetes: KubernetesConfig,
    /// `tracing` filter, e.g. `info` or `ward_ca=debug`.
    #[serde(default = "default_log_level")]
    pub log_level: String,
    /// Log format.
    #[serde(default)]
    pub log_format: LogFormat,
    /// What one agent may ask of the node API.
    #[serde(default)]
    pub limits: Limits,
    /// The issuance log.
    #[serde(default)]
    pub audit: AuditConfig,
}

/// The issuance and attestation log (`ward-ca audit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// How long records are kept; the leader drops older ones. On etcd, records/s × this ×
    /// about 500 bytes must fit the cluster's `--quota-backend-bytes` with room to spare.
    #[serde(with = "serde_str")]
    pub retention: Duration,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            retention: Duration::from_secs(30 * 86400),
        }
    }
}

/// Per-agent limits on the node API (SPIRE caps signing per caller too): an agent over them
/// gets `RESOURCE_EXHAUSTED` and tries again later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Sustained SVID signings (X.509 CSRs and JWT-SVIDs) per second, per agent.
    #[serde(default = "default_signing_rate")]
    pub signing_per_second: u32,
    /// Signings allowed at once above the rate (a node starting many workloads; a batch
    /// larger than this is refused whole).
    #[serde(default = "default_signing_burst")]
    pub signing_burst: u32,
    /// The largest message an agent may send the node API (a batch of CSRs); more:
    /// `OUT_OF_RANGE` ("decoded message length too large").
    #[serde(default = "default_node_message")]
    pub node_api_max_message_bytes: usize,
    /// The largest message the admin API takes (an entry, policy or service batch); more:
    /// `OUT_OF_RANGE`.
    #[serde(default = "default_admin_message")]
    pub admin_api_max_message_bytes: usize,
}

fn default_node_message() -> usize {
    16 * 1024 * 1024
}

fn default_admin_message() -> usize {
    4 * 1024 * 1024
}

fn default_signing_rate() -> u32 {
    500
}

fn default_signing_burst() -> u32 {
    5_000
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            signing_per_second: default_signing_rate(),
            signing_burst: default_signing_burst(),
            node_api_max_message_bytes: default_node_message(),
            admin_api_max_message_bytes: default_admin_message(),
        }
    }
}

fn default_bind() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8081))
}

fn default_health() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8082))
}

fn default_log_level() -> String {
    "info".into()
}

impl CaConfig {
    /// What is valid but weaker than an operator may think (printed by `check-config`, logged
    /// at start).
    pub fn warnings(&self) -> Vec<String> {
        self.kubernetes
            .clusters
            .iter()
            .filter(|c| c.mode == PsatMode::Offline && !c.has_api())
            .map(|c| {
                format!(
                    "cluster {}: offline mode without API access trusts the token's signed claims \
                     alone — a token of a pod that no longer exists keeps attesting until it \
                     expires; keep the agents' projected token lifetime short \
                     (expirationSeconds: 600, the least Kubernetes allows) or give the CA a \
                     kubeconfig",
                    c.name
                )
            })
            .collect()
    }

    /// A configuration with defaults for everything but the trust domain and data directory.
    pub fn new(trust_domain: TrustDomain, data_dir: PathBuf) -> Self {
        Self {
            trust_domain,
            data_dir,
            store: StoreConfig::default(),
            bind_address: default_bind(),
            health_address: default_health(),
            admin_socket: None,
            ttl: Ttls::default(),
            upstream: None,
            rotation: RotationConfig::default(),
            oidc: None,
            kubernetes: KubernetesConfig::default(),
            log_level: default_log_level(),
            log_format: LogFormat::default(),
            limits: Limits::default(),
            audit: AuditConfig::default(),
        }
    }

    /// Reads a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Parses TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let cfg: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Applies `WARD_CA_*` overrides read through `env` (the process environment in `main`).
    pub fn apply_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let bad = |k: &str, e: &dyn std::fmt::Display| ConfigError::Invalid(format!("{k}: {e}"));
        if let Some(v) = env("WARD_CA_TRUST_DOMAIN") {
            self.trust_domain =
                TrustDomain::new(&v).map_err(|e| bad("WARD_CA_TRUST_DOMAIN", &e))?;
        }
        if let Some(v) = env("WARD_CA_DATA_DIR") {
            self.data_dir = PathBuf::from(v);
        }
        if let Some(v) = env("WARD_CA_BIND_ADDRESS") {
            self.bind_address = v.parse().map_err(|e| bad("WARD_CA_BIND_ADDRESS", &e))?;
        }
        if let Some(v) = env("WARD_CA_HEALTH_ADDRESS") {
            self.health_address = v.parse().map_err(|e| bad("WARD_CA_HEALTH_ADDRESS", &e))?;
        }
        if let Some(v) = env("WARD_CA_ADMIN_SOCKET") {
            self.admin_socket = Some(PathBuf::from(v));
        }
        if let Some(v) = env("WARD_CA_LOG_LEVEL") {
            self.log_level = v;
        }
        self.validate()
    }

    /// Checks ranges and consistency.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let t = &self.ttl;
        let min = Duration::from_secs(1);
        for (name, d) in [
            ("ttl.ca", t.ca),
            ("ttl.x509_svid", t.x509_svid),
            ("ttl.jwt_svid", t.jwt_svid),
            ("ttl.agent_svid", t.agent_svid),
            ("ttl.join_token", t.join_token),
        ] {
            if d < min {
                return Err(ConfigError::Invalid(format!("{name} must be at least 1s")));
            }
        }
        let l = &self.limits;
        for (name, v) in [
            (
                "limits.node_api_max_message_bytes",
                l.node_api_max_message_bytes,
            ),
            (
                "limits.admin_api_max_message_bytes",
                l.admin_api_max_message_bytes,
            ),
        ] {
            if v < 64 * 1024 {
                return Err(ConfigError::Invalid(format!(
                    "{name} must be at least 65536 (a CSR batch or an entry would not fit)"
                )));
            }
        }
        if self.audit.retention < Duration::from_secs(3600) {
            return Err(ConfigError::Invalid(
                "audit.retention must be at least 1h".into(),
            ));
        }
        if l.signing_per_second == 0 || l.signing_burst == 0 {
            return Err(ConfigError::Invalid(
                "limits.signing_per_second and limits.signing_burst must be > 0".into(),
            ));
        }
        if t.x509_svid >= t.ca || t.agent_svid >= t.ca {
            return Err(ConfigError::Invalid(
                "ttl.x509_svid and ttl.agent_svid must be shorter than ttl.ca".into(),
            ));
        }
        if let Some(o) = &self.oidc {
            let ok = (o.issuer.starts_with("https://") || o.issuer.starts_with("http://"))
                && !o.issuer.ends_with('/')
                && !o.issuer.contains(['?', '#', ' '])
                && o.issuer.len() > "https://".len();
            if !ok {
                return Err(ConfigError::Invalid(format!(
                    "oidc.issuer {:?} must be an http(s) URL without a trailing '/', query or \
                     fragment",
                    o.issuer
                )));
            }
        }
        let r = &self.rotation;
        if !(r.prepare_at > 0.0 && r.prepare_at < r.activate_at && r.activate_at < 1.0) {
            return Err(ConfigError::Invalid(format!(
                "rotation: need 0 < prepare_at < activate_at < 1, got prepare_at = {} and \
                 activate_at = {}",
                r.prepare_at, r.activate_at
            )));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::Invalid("data_dir must be set".into()));
        }
        self.store.validate()?;
        let mut names = std::collections::HashSet::new();
        for c in &self.kubernetes.clusters {
            let inv = |m: String| {
                Err(ConfigError::Invalid(format!(
                    "kubernetes cluster {:?}: {m}",
                    c.name
                )))
            };
            let name_ok = !c.name.is_empty()
                && c.name.len() <= 63
                && c.name.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'
                });
            if !name_ok {
                return inv("name must be 1-63 characters of a-z, 0-9, '-' and '.'".into());
            }
            if !names.insert(c.name.clone()) {
                return inv("duplicate cluster name".into());
            }
            if c.service_account_allow_list.is_empty() {
                return inv(
                    "service_account_allow_list must name at least one namespace:serviceaccount"
                        .into(),
                );
            }
            for sa in &c.service_account_allow_list {
                if sa.split(':').count() != 2 || sa.starts_with(':') || sa.ends_with(':') {
                    return inv(format!("service account {sa:?} must be namespace:name"));
                }
            }
            if c.audience.is_empty() {
                return inv("audience must not be empty".into());
            }
            if let Some(cm) = &c.bundle_config_map {
                let ok = cm.split_once('/').is_some_and(|(ns, name)| {
                    let dns = |s: &str| {
                        !s.is_empty()
                            && s.len() <= 253
                            && s.chars().all(|ch| {
                                ch.is_ascii_lowercase()
                                    || ch.is_ascii_digit()
                                    || ch == '-'
                                    || ch == '.'
                            })
                    };
                    dns(ns) && dns(name)
                });
                if !ok {
                    return inv(format!(
                        "bundle_config_map {cm:?} must be <namespace>/<name> (lower-case DNS names)"
                    ));
                }
                if !c.has_api() {
                    return inv(
                        "bundle_config_map needs API access: a kubeconfig, or mode = \"token_review\""
                            .into(),
                    );
                }
            }
            if c.controller.enabled == Some(true) && !c.has_api() {
                return inv(
                    "controller.enabled needs API access: a kubeconfig, or mode = \"token_review\""
                        .into(),
                );
            }
            if c.mode == PsatMode::Offline {
                if c.issuer.as_deref().unwrap_or("").is_empty() {
                    return inv("offline mode needs issuer".into());
                }
                if c.jwks_file.is_none() && !c.jwks_discovery {
                    return inv("offline mode needs jwks_file or jwks_discovery = true".into());
                }
            }
        }
        Ok(())
    }

    /// Where the admin socket lives.
    pub fn admin_socket_path(&self) -> PathBuf {
        self.admin_socket
            .clone()
            .unwrap_or_else(|| self.data_dir.join("admin").join("api.sock"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_file_gets_defaults() {
        let c = CaConfig::from_toml(
            "trust_domain = \"example.org\"\ndata_dir = \"/tmp/x\"\n",
            "t",
        )
        .unwrap();
        assert_eq!(c.bind_address.to_string(), "127.0.0.1:8081");
        assert_eq!(c.ttl.x509_svid, Duration::from_secs(3600));
        assert_eq!(c.rotation, RotationConfig::default());
        assert_eq!(
            c.admin_socket_path(),
            PathBuf::from("/tmp/x/admin/api.sock")
        );
    }

    #[test]
    fn audit_retention_is_parsed_and_bounded() {
        let base = "trust_domain = \"td\"\ndata_dir = \"/x\"\n[audit]\n";
        let c = CaConfig::from_toml(&format!("{base}retention = \"7d\"\n"), "f").unwrap();
        assert_eq!(c.audit.retention, Duration::from_secs(7 * 86400));
        let e = CaConfig::from_toml(&format!("{base}retention = \"10m\"\n"), "f").unwrap_err();
        assert!(e.to_string().contains("audit.retention"), "{e}");
        let e = CaConfig::from_toml(&format!("{base}keep = \"1d\"\n"), "f").unwrap_err();
        assert!(e.to_string().contains("keep"), "{e}");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let e = CaConfig::from_toml("trust_domain = \"td\"\ndata_dir = \"/x\"\nbogus = 1\n", "f")
            .unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let e =
            CaConfig::from_toml("trust_domain = \"TD!\"\ndata_dir = \"/x\"\n", "f").unwrap_err();
        assert!(e.to_string().contains("trust domain"), "{e}");
        let e = CaConfig::from_toml(
            "trust_domain = \"td\"\ndata_dir = \"/x\"\n[ttl]\nx509_svid = \"48h\"\n",
            "f",
        )
        .unwrap_err();
        assert!(e.to_string().contains("shorter"), "{e}");
        let e = CaConfig::from_toml(
            "trust_domain = \"td\"\ndata_dir = \"/x\"\n[ttl]\nx509_svid = \"1 hour\"\n",
            "f",
        )
        .unwrap_err();
        assert!(e.to_string().contains("duration"), "{e}");
        let e = CaConfig::from_toml(
            "trust_domain = \"td\"\ndata_dir = \"/x\"\n[rotation]\nprepare_at = 0.9\nactivate_at = 0.5\n",
            "f",
        )
        .unwrap_err();
        assert!(e.to_string().contains("prepare_at < activate_at"), "{e}");
        let e = CaConfig::from_toml(
            "trust_domain = \"td\"\ndata_dir = \"/x\"\n[oidc]\nissuer = \"https://o.example/\"\n",
            "f",
        )
        .unwrap_err();
        assert!(e.to_string().contains("oidc.issuer"), "{e}");
        let c = CaConfig::from_toml(
            "trust_domain = \"td\"\ndata_dir = \"/x\"\n[rotation]\nautomatic = false\n",
            "f",
        )
        .unwrap();
        assert!(!c.rotation.automatic);
    }

    #[test]
    fn env_overrides_apply_and_validate() {
        let mut c = CaConfig::new(TrustDomain::new("a").unwrap(), "/x".into());
        let vars = [
            ("WARD_CA_TRUST_DOMAIN", "b.example"),
            ("WARD_CA_DATA_DIR", "/data"),
            ("WARD_CA_BIND_ADDRESS", "127.0.0.1:9999"),
            ("WARD_CA_HEALTH_ADDRESS", "127.0.0.1:9998"),
            ("WARD_CA_ADMIN_SOCKET", "/run/admin.sock"),
            ("WARD_CA_LOG_LEVEL", "debug"),
        ];
        c.apply_env(&|k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| (*v).to_owned())
        })
        .unwrap();
        assert_eq!(c.trust_domain.name(), "b.example");
        assert_eq!(c.data_dir, PathBuf::from("/data"));
        assert_eq!(c.bind_address, "127.0.0.1:9999".parse().unwrap());
        assert_eq!(c.health_address, "127.0.0.1:9998".parse().unwrap());
        assert_eq!(c.admin_socket, Some(PathBuf::from("/run/admin.sock")));
        assert_eq!(c.log_level, "debug");
        // A bad value is refused, naming its variable.
        for (k, v) in [
            ("WARD_CA_TRUST_DOMAIN", "Not A Domain"),
            ("WARD_CA_BIND_ADDRESS", "nope"),
            ("WARD_CA_HEALTH_ADDRESS", "nope"),
        ] {
            let e = c
                .apply_env(&|n| (n == k).then(|| v.to_owned()))
                .unwrap_err();
            assert!(e.to_string().contains(k), "{e}");
        }
    }
}
