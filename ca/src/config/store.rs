//! `[store]`: where the CA keeps its state — the embedded sled database under `data_dir`
//! (the default, one replica), or an etcd cluster shared by several replicas.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use ward_net::duration::serde_str;

use super::ConfigError;

/// Which backend holds the CA's state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// sled under `<data_dir>/store` (one replica).
    #[default]
    Sled,
    /// An etcd v3 cluster (`[store.etcd]`), shared by every replica.
    Etcd,
}

/// `[store]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `sled` (default) or `etcd`.
    #[serde(default)]
    pub backend: StoreBackend,
    /// The etcd cluster, for `backend = "etcd"`.
    #[serde(default)]
    pub etcd: Option<EtcdConfig>,
}

/// `[store.etcd]`: a dedicated etcd cluster (never the Kubernetes API server's own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// Client URLs of the members (`https://etcd-0.etcd:2379`, …; `http://` only without
    /// `tls`). Requests go to one member at a time and move on when it cannot be reached.
    pub endpoints: Vec<String>,
    /// Every key of this trust domain is stored under this prefix.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Deadline of one request to one member.
    #[serde(default = "default_timeout", with = "serde_str")]
    pub request_timeout: Duration,
    /// The cluster's `--max-txn-ops` (etcd's default 128): larger batches are refused, not split.
    #[serde(default = "default_max_txn_ops")]
    pub max_txn_ops: usize,
    /// The cluster's `--max-request-bytes` (etcd's default 1.5 MiB).
    #[serde(default = "default_max_request_bytes")]
    pub max_request_bytes: usize,
    /// TLS to the members; required for `https://` endpoints.
    #[serde(default)]
    pub tls: Option<EtcdTls>,
}

/// PEM files for TLS to etcd (`--trusted-ca-file`, and a client certificate when the members
/// run with `--client-cert-auth`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdTls {
    /// CA certificates that sign the members' serving certificates.
    pub ca: PathBuf,
    /// Client certificate chain.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// Its private key.
    #[serde(default)]
    pub key: Option<PathBuf>,
}

fn default_prefix() -> String {
    "/ward/".into()
}

fn default_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_max_txn_ops() -> usize {
    128
}

fn default_max_request_bytes() -> usize {
    1_572_864
}

impl EtcdConfig {
    /// A cluster at `endpoints` with every other setting at its default.
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            prefix: default_prefix(),
            request_timeout: default_timeout(),
            max_txn_ops: default_max_txn_ops(),
            max_request_bytes: default_max_request_bytes(),
            tls: None,
        }
    }
}

impl StoreConfig {
    /// Checks that the chosen backend is fully described.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let inv = |m: String| Err(ConfigError::Invalid(format!("store: {m}")));
        let Some(e) = &self.etcd else {
            return match self.backend {
                StoreBackend::Etcd => inv("backend = \"etcd\" needs [store.etcd] endpoints".into()),
                StoreBackend::Sled => Ok(()),
            };
        };
        if self.backend != StoreBackend::Etcd {
            return inv("[store.etcd] is set but backend is not \"etcd\"".into());
        }
        if e.endpoints.is_empty() {
            return inv("etcd.endpoints must name at least one member".into());
        }
        for ep in &e.endpoints {
            let (scheme, rest) = ep.split_once("://").unwrap_or(("", ep));
            let hostport_ok = !rest.is_empty()
                && !rest.contains('/')
                && rest
                    .rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
            if !hostport_ok {
                return inv(format!(
                    "etcd endpoint {ep:?} must be http://host:port or https://host:port"
                ));
            }
            match (scheme, e.tls.is_some()) {
                ("https", true) | ("http", false) => {}
                ("https", false) => {
                    return inv(format!(
                        "etcd endpoint {ep:?} is https but [store.etcd.tls] is not set"
                    ));
                }
                ("http", true) => {
                    return inv(format!(
                        "etcd endpoint {ep:?} is http but [store.etcd.tls] is set: use https://"
                    ));
                }
                _ => {
                    return inv(format!(
                        "etcd endpoint {ep:?} must be http://host:port or https://host:port"
                    ));
                }
            }
        }
        if e.prefix.is_empty() || !e.prefix.ends_with('/') {
            return inv(format!(
                "etcd.prefix {:?} must be non-empty and end with '/' (e.g. \"/ward/\")",
                e.prefix
            ));
        }
        if e.request_timeout < Duration::from_millis(100) {
            return inv("etcd.request_timeout must be at least 100ms".into());
        }
        if e.max_txn_ops < 16 {
            return inv("etcd.max_txn_ops must be at least 16".into());
        }
        if e.max_request_bytes < 256 * 1024 {
            return inv("etcd.max_request_bytes must be at least 262144".into());
        }
        if let Some(t) = &e.tls
            && t.cert.is_some() != t.key.is_some()
        {
            return inv("etcd.tls.cert and etcd.tls.key go together".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<StoreConfig, String> {
        let c: StoreConfig = toml::from_str(s).map_err(|e| e.to_string())?;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    #[test]
    fn sled_is_the_default_and_etcd_needs_endpoints() {
        assert_eq!(parse("").unwrap().backend, StoreBackend::Sled);
        let e = parse("backend = \"etcd\"").unwrap_err();
        assert!(e.contains("needs [store.etcd]"), "{e}");
        let c =
            parse("backend = \"etcd\"\n[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\n").unwrap();
        let e = c.etcd.unwrap();
        assert_eq!(e.prefix, "/ward/");
        assert_eq!(e.max_txn_ops, 128);
        assert_eq!(e.request_timeout, Duration::from_secs(5));
    }

    #[test]
    fn bad_etcd_settings_are_named() {
        for (toml, want) in [
            ("[etcd]\nendpoints = [\"http://a:1\"]\n", "backend is not"),
            (
                "backend = \"etcd\"\n[etcd]\nendpoints = []\n",
                "at least one",
            ),
            (
                "backend = \"etcd\"\n[etcd]\nendpoints = [\"a:1\"]\n",
                "http://host:port",
            ),
            (
                "backend = \"etcd\"\n[etcd]\nendpoints = [\"http://a\"]\n",
                "http://host:port",
            ),
            (
                "backend = \"etcd\"\n[etcd]\nendpoints = [\"https://a:1\"]\n",
                "tls] is not set",
            ),
            (
                "backend = \"etcd\"\n[etcd]\nendpoints = [\"http://a:1\"]\n[etcd.tls]\nca = \"/c\"\n",
                "use https",
            ),
            (
                "backend = \"etcd\"\n[etcd]\nendpoints = [\"https://a:1\"]\n[etcd.tls]\nca = \"/c\"\ncert = \"/x\"\n",
                "go together",
            ),
            (
                "backend = \"etcd\"\n[etcd]\nendpoints = [\"http://a:1\"]\nprefix = \"ward\"\n",
                "end with '/'",
            ),
            (
                "backend = \"etcd\"\n[etcd]\nendpoints = [\"http://a:1\"]\nmax_txn_ops = 1\n",
                "max_txn_ops",
            ),
            ("backend = \"mysql\"\n", "unknown variant"),
        ] {
            let e = parse(toml).unwrap_err();
            assert!(e.contains(want), "{toml}: {e}");
        }
    }
}
