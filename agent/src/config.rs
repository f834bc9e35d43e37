//! The agent's configuration: one struct, from a TOML file (unknown keys are an error), then
//! `WARD_AGENT_*` environment overrides, then flags. Tests build values directly.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
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
    /// Invalid TOML or unknown keys.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// File.
        path: String,
        /// Parser message.
        message: String,
    },
    /// Out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Unix workload attestation settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UnixConfig {
    /// Where `/proc` is (tests point this at a fake tree).
    pub proc_root: PathBuf,
    /// Binaries larger than this are not hashed (no `unix:sha256` selector); 0 disables hashing.
    pub max_hash_bytes: u64,
}

impl Default for UnixConfig {
    fn default() -> Self {
        Self {
            proc_root: PathBuf::from("/proc"),
            max_hash_bytes: 256 * 1024 * 1024,
        }
    }
}

/// Node attestation with the agent pod's projected service-account token (Kubernetes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PsatConfig {
    /// The cluster name configured in the CA.
    pub cluster: String,
    /// The projected token file (re-read at every attestation; the kubelet rotates it).
    #[serde(default = "default_token_path")]
    pub token_path: PathBuf,
}

fn default_token_path() -> PathBuf {
    PathBuf::from("/var/run/secrets/tokens/ward-agent")
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable.
    #[default]
    Text,
    /// JSON lines.
    Json,
}

/// The whole agent configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Trust domain of the CA.
    pub trust_domain: TrustDomain,
    /// The CA's node API, `host:port`; with several CA replicas, a comma-separated list (or
    /// one name with several addresses): the agent stays with the one that answers and moves
    /// to the next when it cannot be reached, without attesting again.
    pub server_address: String,
    /// Where the agent keeps its SVID, key and bundle.
    pub data_dir: PathBuf,
    /// The Workload API socket.
    pub socket_path: PathBuf,
    /// PEM bundle to trust the CA with before the first attestation.
    #[serde(default)]
    pub trust_bundle_path: Option<PathBuf>,
    /// Address of `/metrics`, `/healthz`, `/readyz`.
    #[serde(default = "default_health")]
    pub health_address: SocketAddr,
    /// Join token (prefer the `WARD_AGENT_JOIN_TOKEN` variable: files and command lines leak).
    #[serde(default)]
    pub join_token: Option<String>,
    /// Attest with a Kubernetes service-account token instead of a join token.
    #[serde(default)]
    pub k8s_psat: Option<PsatConfig>,
    /// Attest workloads as Kubernetes pods (cgroups + kubelet).
    #[serde(default)]
    pub k8s: Option<crate::k8s::K8sConfig>,
    /// Unix attestation.
    #[serde(default)]
    pub unix: UnixConfig,
    /// Envoy SDS on the Workload API socket.
    #[serde(default)]
    pub sds: crate::sds::SdsConfig,
    /// What one caller of the socket may hold.
    #[serde(default)]
    pub limits: crate::limits::LimitsConfig,
    /// `tracing` filter.
    #[serde(default = "default_log_level")]
    pub log_level: String,
    /// Log format.
    #[serde(default)]
    pub log_format: LogFormat,
}

fn default_health() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8083))
}

fn default_log_level() -> String {
    "info".into()
}

impl AgentConfig {
    /// Defaults for everything but the essentials.
    pub fn new(
        trust_domain: TrustDomain,
        server_address: String,
        data_dir: PathBuf,
        socket_path: PathBuf,
    ) -> Self {
        Self {
            trust_domain,
            server_address,
            data_dir,
            socket_path,
            trust_bundle_path: None,
            health_address: default_health(),
            join_token: None,
            k8s_psat: None,
            k8s: None,
            unix: UnixConfig::default(),
            sds: crate::sds::SdsConfig::default(),
            limits: crate::limits::LimitsConfig::default(),
            log_level: default_log_level(),
            log_format: LogFormat::default(),
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

    /// Parses TOML text.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let cfg: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Applies `WARD_AGENT_*` overrides read through `env`.
    pub fn apply_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let bad = |k: &str, e: &dyn std::fmt::Display| ConfigError::Invalid(format!("{k}: {e}"));
        if let Some(v) = env("WARD_AGENT_TRUST_DOMAIN") {
            self.trust_domain =
                TrustDomain::new(&v).map_err(|e| bad("WARD_AGENT_TRUST_DOMAIN", &e))?;
        }
        if let Some(v) = env("WARD_AGENT_SERVER_ADDRESS") {
            self.server_address = v;
        }
        if let Some(v) = env("WARD_AGENT_DATA_DIR") {
            self.data_dir = PathBuf::from(v);
        }
        if let Some(v) = env("WARD_AGENT_SOCKET_PATH") {
            self.socket_path = PathBuf::from(v);
        }
        if let Some(v) = env("WARD_AGENT_HEALTH_ADDRESS") {
            self.health_address = v
                .parse()
                .map_err(|e| bad("WARD_AGENT_HEALTH_ADDRESS", &e))?;
        }
        if let Some(v) = env("WARD_AGENT_JOIN_TOKEN") {
            self.join_token = Some(v);
        }
        if let Some(v) = env("WARD_AGENT_LOG_LEVEL") {
            self.log_level = v;
        }
        if let Some(v) = env("WARD_AGENT_NODE_NAME")
            && let Some(k) = &mut self.k8s
        {
            k.node_name = v;
        }
        self.validate()
    }

    /// The CA addresses in `server_address`, in order.
    pub fn server_addresses(&self) -> Vec<String> {
        self.server_address
            .split(',')
            .map(|a| a.trim().to_owned())
            .collect()
    }

    /// Checks consistency.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.limits.max_streams_per_caller == 0 {
            return Err(ConfigError::Invalid(
                "limits.max_streams_per_caller must be > 0".into(),
            ));
        }
        for a in self.server_addresses() {
            let ok = a
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !ok {
                return Err(ConfigError::Invalid(format!(
                    "server_address {a:?} must be host:port (several: comma-separated)"
                )));
            }
        }
        if !self.socket_path.is_absolute() {
            return Err(ConfigError::Invalid(
                "socket_path must be an absolute path".into(),
            ));
        }
        // sun_path holds 108 bytes including the terminating NUL.
        if self.socket_path.as_os_str().len() > 107 {
            return Err(ConfigError::Invalid(
                "socket_path is longer than 107 bytes".into(),
            ));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::Invalid("data_dir must be set".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = "trust_domain = \"td\"\nserver_address = \"127.0.0.1:8081\"\n\
                       data_dir = \"/d\"\nsocket_path = \"/run/a.sock\"\n";

    #[test]
    fn parses_with_defaults() {
        let c = AgentConfig::from_toml(MIN, "t").unwrap();
        assert_eq!(c.unix.proc_root, PathBuf::from("/proc"));
        assert_eq!(c.health_address.port(), 8083);
    }

    #[test]
    fn rejects_unknown_and_invalid() {
        let e = AgentConfig::from_toml(&format!("{MIN}extra = 1\n"), "t").unwrap_err();
        assert!(e.to_string().contains("extra"), "{e}");
        let e = AgentConfig::from_toml(&MIN.replace("/run/a.sock", "rel.sock"), "t").unwrap_err();
        assert!(e.to_string().contains("absolute"), "{e}");
        let e = AgentConfig::from_toml(&MIN.replace("127.0.0.1:8081", "nohost"), "t").unwrap_err();
        assert!(e.to_string().contains("host:port"), "{e}");
        let long = format!("/{}", "a".repeat(120));
        let e = AgentConfig::from_toml(&MIN.replace("/run/a.sock", &long), "t").unwrap_err();
        assert!(e.to_string().contains("107"), "{e}");
    }

    #[test]
    fn env_overrides() {
        let mut c =
            AgentConfig::from_toml(&format!("{MIN}[k8s]\nnode_name = \"n0\"\n"), "t").unwrap();
        let vars = [
            ("WARD_AGENT_TRUST_DOMAIN", "other.td"),
            ("WARD_AGENT_SERVER_ADDRESS", "ca.example:8081"),
            ("WARD_AGENT_DATA_DIR", "/data"),
            ("WARD_AGENT_SOCKET_PATH", "/run/b.sock"),
            ("WARD_AGENT_HEALTH_ADDRESS", "127.0.0.1:9000"),
            ("WARD_AGENT_JOIN_TOKEN", "tok"),
            ("WARD_AGENT_LOG_LEVEL", "debug"),
            ("WARD_AGENT_NODE_NAME", "n1"),
        ];
        c.apply_env(&|k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| (*v).to_owned())
        })
        .unwrap();
        assert_eq!(c.trust_domain.name(), "other.td");
        assert_eq!(c.server_address, "ca.example:8081");
        assert_eq!(c.data_dir, PathBuf::from("/data"));
        assert_eq!(c.socket_path, PathBuf::from("/run/b.sock"));
        assert_eq!(c.health_address, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(c.join_token.as_deref(), Some("tok"));
        assert_eq!(c.log_level, "debug");
        assert_eq!(c.k8s.as_ref().unwrap().node_name, "n1");
        // A bad value is refused, naming its variable.
        for (k, v) in [
            ("WARD_AGENT_TRUST_DOMAIN", "Not A Domain"),
            ("WARD_AGENT_HEALTH_ADDRESS", "nope"),
        ] {
            let e = c
                .apply_env(&|n| (n == k).then(|| v.to_owned()))
                .unwrap_err();
            assert!(e.to_string().contains(k), "{e}");
        }
    }
}
