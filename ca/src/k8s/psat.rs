//! Node attestation with projected service-account tokens (`k8s_psat`): TokenReview through
//! the real kube client, or offline verification against the cluster's JWKS; then the pod and
//! node are read (or, offline, taken from the token's claims) and the agent ID is derived from
//! the node's UID, so a restarted agent gets the same ID.
//!
//! The checks on what the API server or the token says are plain functions, table-tested.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;
use serde_json::Value;
use ward_net::process::rfc3339;
use ward_spiffe::{SpiffeId, TrustDomain};

use crate::config::{ClusterConfig, PsatMode};
use crate::error::ApiError;

/// Longest token accepted.
pub const MAX_TOKEN: usize = 16 * 1024;
/// Clock skew tolerated on `exp`/`nbf` in offline mode.
const LEEWAY: Duration = Duration::from_secs(30);

/// Who the token says the agent is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSubject {
    /// Namespace of the agent's service account.
    pub namespace: String,
    /// Service account name.
    pub service_account: String,
    /// The agent's pod.
    pub pod_name: String,
    /// Its UID.
    pub pod_uid: String,
    /// The node, when the token carries it (Kubernetes ≥ 1.30, offline mode).
    pub node: Option<(String, String)>,
}

/// An attested node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestedNode {
    /// `spiffe://<td>/ward/agent/k8s_psat/<cluster>/<node-uid>`.
    pub agent_id: SpiffeId,
    /// Agent selectors.
    pub selectors: Vec<String>,
}

fn denied(m: impl Into<String>) -> ApiError {
    ApiError::PermissionDenied(m.into())
}

fn allowed(allow: &[String], ns: &str, sa: &str) -> bool {
    allow.iter().any(|a| a == &format!("{ns}:{sa}"))
}

fn one(
    extra: Option<&std::collections::BTreeMap<String, Vec<String>>>,
    key: &str,
) -> Result<String, ApiError> {
    match extra.and_then(|e| e.get(key)).map(Vec::as_slice) {
        Some([v]) if !v.is_empty() => Ok(v.clone()),
        Some([]) | None => Err(denied(format!("token review has no {key}"))),
        Some(_) => Err(denied(format!("token review has more than one {key}"))),
    }
}

/// An optional single-valued extra: absent is `None`; empty or several values are refused.
fn optional(
    extra: Option<&std::collections::BTreeMap<String, Vec<String>>>,
    key: &str,
) -> Result<Option<String>, ApiError> {
    match extra.and_then(|e| e.get(key)) {
        None => Ok(None),
        Some(_) => one(extra, key).map(Some),
    }
}

/// Checks a TokenReview answer. Pure.
pub fn check_review(
    status: &TokenReviewStatus,
    audience: &str,
    allow: &[String],
) -> Result<TokenSubject, ApiError> {
    if status.authenticated != Some(true) {
        return Err(denied(format!(
            "token not authenticated: {}",
            status.error.as_deref().unwrap_or("no reason given")
        )));
    }
    if let Some(auds) = &status.audiences
        && !auds.iter().any(|a| a == audience)
    {
        return Err(denied(format!(
            "token is not for audience {audience:?} (the API server says its audiences are {auds:?})"
        )));
    }
    let user = status
        .user
        .as_ref()
        .ok_or_else(|| denied("token review has no user"))?;
    let name = user.username.as_deref().unwrap_or("");
    let (ns, sa) = name
        .strip_prefix("system:serviceaccount:")
        .and_then(|r| r.split_once(':'))
        .ok_or_else(|| denied(format!("{name:?} is not a service account")))?;
    if !allowed(allow, ns, sa) {
        return Err(denied(format!(
            "service account {ns}:{sa} is not allowed to attest agents"
        )));
    }
    // Kubernetes ≥ 1.30 binds the node too: checked against the pod's node as in offline mode.
    let node_name = optional(
        user.extra.as_ref(),
        "authentication.kubernetes.io/node-name",
    )?;
    let node_uid = optional(user.extra.as_ref(), "authentication.kubernetes.io/node-uid")?;
    let node = match (node_name, node_uid) {
        (Some(n), Some(u)) => Some((n, u)),
        (None, None) => None,
        _ => {
            return Err(denied(
                "token review names a node name without its UID, or a UID without its name",
            ));
        }
    };
    Ok(TokenSubject {
        namespace: ns.into(),
        service_account: sa.into(),
        pod_name: one(user.extra.as_ref(), "authentication.kubernetes.io/pod-name")?,
        pod_uid: one(user.extra.as_ref(), "authentication.kubernetes.io/pod-uid")?,
        node,
    })
}

/// Checks the claims of a token whose signature was verified. Pure.
pub fn check_claims(
    claims: &Value,
    issuer: &str,
    audience: &str,
    allow: &[String],
    now: SystemTime,
) -> Result<TokenSubject, ApiError> {
    match claims["iss"].as_str() {
        Some(i) if i == issuer => {}
        Some(i) => {
            return Err(denied(format!(
                "token issuer {i:?} is not the cluster's issuer {issuer:?}"
            )));
        }
        None => {
            return Err(denied(format!(
                "token has no issuer (iss); the cluster's issuer is {issuer:?}"
            )));
        }
    }
    let auds: Vec<&str> = match &claims["aud"] {
        Value::String(a) => vec![a.as_str()],
        Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    if !auds.contains(&audience) {
        return Err(denied(format!(
            "token is not for audience {audience:?} (its audiences are {auds:?})"
        )));
    }
    let at = |k: &str| -> Result<Option<SystemTime>, ApiError> {
        match &claims[k] {
            Value::Null => Ok(None),
            v => v
                .as_u64()
                .and_then(|s| UNIX_EPOCH.checked_add(Duration::from_secs(s)))
                .map(Some)
                .ok_or_else(|| denied(format!("token claim {k} is not a time: {v}"))),
        }
    };
    let exp = at("exp")?.ok_or_else(|| denied("token has no expiry (exp)"))?;
    if exp.checked_add(LEEWAY).is_some_and(|e| e <= now) {
        return Err(denied(format!(
            "token expired at {} (CA clock {}, leeway {}s)",
            rfc3339(exp),
            rfc3339(now),
            LEEWAY.as_secs()
        )));
    }
    if let Some(nbf) = at("nbf")?
        && now.checked_add(LEEWAY).is_some_and(|n| nbf > n)
    {
        return Err(denied(format!(
            "token is not valid before {} (CA clock {}, leeway {}s)",
            rfc3339(nbf),
            rfc3339(now),
            LEEWAY.as_secs()
        )));
    }
    let k = &claims["kubernetes.io"];
    let s = |v: &Value, what: &str| {
        v.as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| denied(format!("token has no {what}")))
    };
    let ns = s(&k["namespace"], "namespace")?;
    let sa = s(&k["serviceaccount"]["name"], "service account")?;
    if claims["sub"].as_str() != Some(format!("system:serviceaccount:{ns}:{sa}").as_str()) {
        return Err(denied("token subject does not match its service account"));
    }
    if !allowed(allow, &ns, &sa) {
        return Err(denied(format!(
            "service account {ns}:{sa} is not allowed to attest agents"
        )));
    }
    let node = match (k["node"]["name"].as_str(), k["node"]["uid"].as_str()) {
        (Some(n), Some(u)) if !n.is_empty() && !u.is_empty() => Some((n.to_owned(), u.to_owned())),
        _ => None,
    };
    Ok(TokenSubject {
        namespace: ns,
        service_account: sa,
        pod_name: s(&k["pod"]["name"], "pod name")?,
        pod_uid: s(&k["pod"]["uid"], "pod uid")?,
        node,
    })
}

/// Reads the token's `alg` before anything else parses the header, so `none` and other
/// algorithms are refused by name (jsonwebtoken would call `none` a JSON error). Pure.
pub fn check_algorithm(token: &str) -> Result<(), ApiError> {
    use base64::Engine as _;
    let head = token.split('.').next().unwrap_or("");
    let alg = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(head.trim_end_matches('='))
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .ok_or_else(|| denied("token is not a JWT: its header is not base64url JSON"))?;
    match alg["alg"].as_str() {
        Some("RS256") => Ok(()),
        Some(a) if a.eq_ignore_ascii_case("none") => Err(denied(
            "token algorithm none is not allowed (RS256 is required)",
        )),
        Some(a) => Err(denied(format!(
            "token algorithm {a:?} is not allowed (RS256 is required)"
        ))),
        None => Err(denied("token header has no algorithm (alg)")),
    }
}

/// The agent ID for a node. Node UIDs and cluster names are valid path segments; anything else
/// is refused rather than mangled.
pub fn agent_id(td: &TrustDomain, cluster: &str, node_uid: &str) -> Result<SpiffeId, ApiError> {
    td.id_from_segments(["ward", "agent", "k8s_psat", cluster, node_uid])
        .map_err(|e| {
            denied(format!(
                "node uid {node_uid:?} cannot form an agent ID: {e}"
            ))
        })
}

/// The agent's selectors. Pure.
pub fn selectors(
    cluster: &str,
    subject: &TokenSubject,
    node: (&str, &str),
    node_labels: &[(String, String)],
    pod_labels: &[(String, String)],
) -> Vec<String> {
    let mut v = vec![
        format!("k8s_psat:cluster:{cluster}"),
        format!("k8s_psat:agent_ns:{}", subject.namespace),
        format!("k8s_psat:agent_sa:{}", subject.service_account),
        format!("k8s_psat:agent_pod_name:{}", subject.pod_name),
        format!("k8s_psat:agent_pod_uid:{}", subject.pod_uid),
        format!("k8s_psat:agent_node_name:{}", node.0),
        format!("k8s_psat:agent_node_uid:{}", node.1),
    ];
    v.extend(
        node_labels
            .iter()
            .map(|(k, val)| format!("k8s_psat:agent_node_label:{k}:{val}")),
    );
    v.extend(
        pod_labels
            .iter()
            .map(|(k, val)| format!("k8s_psat:agent_pod_label:{k}:{val}")),
    );
    v
}

fn labels(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    allow: &[String],
) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = meta
        .labels
        .iter()
        .flatten()
        .filter(|(k, _)| allow.contains(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    out.sort();
    out
}

/// One configured cluster.
pub struct Cluster {
    cfg: ClusterConfig,
    client: Option<kube::Client>,
    keys: Mutex<HashMap<String, jsonwebtoken::DecodingKey>>,
    /// When the JWKS was last fetched for an unknown key (one fetch at a time).
    last_refresh: tokio::sync::Mutex<Option<std::time::Instant>>,
    refresh_suppressed: prometheus_client::metrics::counter::Counter,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("name", &self.cfg.name)
            .finish_non_exhaustive()
    }
}

pub use ward_net::kube_client::client;

fn unavailable(what: &str, e: impl std::fmt::Display) -> ApiError {
    ApiError::Unavailable(format!("{what}: {e}"))
}

impl Cluster {
    /// Connects (lazily) to the cluster `cfg` describes.
    pub async fn new(
        cfg: ClusterConfig,
        suppressed: prometheus_client::metrics::counter::Counter,
    ) -> Result<Self, String> {
        let client = if cfg.has_api() {
            Some(client(cfg.kubeconfig.as_deref()).await?)
        } else {
            None
        };
        let this = Self {
            cfg,
            client,
            keys: Mutex::new(HashMap::new()),
            last_refresh: tokio::sync::Mutex::new(None),
            refresh_suppressed: suppressed,
        };
        if let Some(f) = &this.cfg.jwks_file {
            let text = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
            this.load_jwks(&text)
                .map_err(|e| format!("{}: {e}", f.display()))?;
        }
        Ok(this)
    }

    /// The cluster's name.
    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// The cluster's configuration.
    pub fn config(&self) -> &ClusterConfig {
        &self.cfg
    }

    /// The kube client, if the cluster has API access.
    pub fn client(&self) -> Option<&kube::Client> {
        self.client.as_ref()
    }

    fn load_jwks(&self, text: &str) -> Result<usize, String> {
        let doc: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let keys = doc["keys"].as_array().ok_or("JWKS has no keys")?;
        let mut map = HashMap::new();
        for k in keys {
            let (Some(kid), Ok(key)) = (
                k["kid"].as_str(),
                serde_json::from_value::<jsonwebtoken::jwk::Jwk>(k.clone()),
            ) else {
                continue;
            };
            if let Ok(dk) = jsonwebtoken::DecodingKey::from_jwk(&key) {
                map.insert(kid.to_owned(), dk);
            }
        }
        let n = map.len();
        *self.keys.lock().unwrap_or_else(|p| p.into_inner()) = map;
        Ok(n)
    }

    async fn refresh_jwks(&self) -> Result<(), ApiError> {
        if let Some(f) = &self.cfg.jwks_file {
            let text = std::fs::read_to_string(f).map_err(|e| unavailable("JWKS file", e))?;
            return self
                .load_jwks(&text)
                .map(|_| ())
                .map_err(|e| unavailable("JWKS file", e));
        }
        let issuer = self.cfg.issuer.clone().unwrap_or_default();
        let disc = crate::k8s::http::get_json(
            &format!(
                "{}/.well-known/openid-configuration",
                issuer.trim_end_matches('/')
            ),
            self.cfg.jwks_ca_file.as_deref(),
        )
        .await
        .map_err(|e| unavailable("OIDC discovery", e))?;
        let uri = disc["jwks_uri"]
            .as_str()
            .ok_or_else(|| unavailable("OIDC discovery", "no jwks_uri"))?;
        let jwks = crate::k8s::http::get_json(uri, self.cfg.jwks_ca_file.as_deref())
            .await
            .map_err(|e| unavailable("JWKS", e))?;
        self.load_jwks(&jwks.to_string())
            .map(|_| ())
            .map_err(|e| unavailable("JWKS", e))
    }

    async fn verify_offline(&self, token: &str, now: SystemTime) -> Result<TokenSubject, ApiError> {
        check_algorithm(token)?;
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| denied(format!("token header is malformed: {e}")))?;
        let kid = header.kid.unwrap_or_default();
        let lookup = |kid: &str| {
            self.keys
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(kid)
                .cloned()
        };
        let key = match lookup(&kid) {
            Some(k) => k,
            None => {
                // Unknown key: the cluster may have rotated. Fetch again — one fetch at a time
                // and at most once per interval, so a flood of made-up keys costs the
                // cluster's OIDC endpoint one request per interval.
                let mut last = self.last_refresh.lock().await;
                match lookup(&kid) {
                    Some(k) => k,
                    None => {
                        let now = std::time::Instant::now();
                        let recent = last.is_some_and(|t| {
                            now.duration_since(t) < self.cfg.jwks_min_refresh_interval
                        });
                        if recent {
                            self.refresh_suppressed.inc();
                        } else {
                            *last = Some(now);
                            self.refresh_jwks().await?;
                        }
                        drop(last);
                        lookup(&kid).ok_or_else(|| {
                            denied(format!(
                                "token key {kid:?} is not a key of cluster {}",
                                self.cfg.name
                            ))
                        })?
                    }
                }
            }
        };
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
        v.validate_exp = false;
        v.validate_nbf = false;
        v.validate_aud = false;
        v.required_spec_claims.clear();
        let data = jsonwebtoken::decode::<Value>(token, &key, &v)
            .map_err(|_| denied("token signature is invalid"))?;
        check_claims(
            &data.claims,
            self.cfg.issuer.as_deref().unwrap_or(""),
            &self.cfg.audience,
            &self.cfg.service_account_allow_list,
            now,
        )
    }

    async fn review(&self, client: &kube::Client, token: &str) -> Result<TokenSubject, ApiError> {
        let tr = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.cfg.audience.clone()]),
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(client.clone());
        let r = api
            .create(&Default::default(), &tr)
            .await
            .map_err(|e| unavailable("TokenReview", e))?;
        let status = r
            .status
            .ok_or_else(|| denied("token review has no status"))?;
        check_review(
            &status,
            &self.cfg.audience,
            &self.cfg.service_account_allow_list,
        )
    }

    /// Attests a node from its agent's token.
    pub async fn attest(
        &self,
        td: &TrustDomain,
        token: &str,
        now: SystemTime,
    ) -> Result<AttestedNode, ApiError> {
        if token.is_empty() {
            return Err(ApiError::InvalidArgument("token is empty".into()));
        }
        if token.len() > MAX_TOKEN {
            return Err(ApiError::InvalidArgument(format!(
                "token is {} bytes, above the limit of {MAX_TOKEN} bytes",
                token.len()
            )));
        }
        let subject = match (self.cfg.mode, &self.client) {
            (PsatMode::TokenReview, Some(c)) => self.review(c, token).await?,
            (PsatMode::TokenReview, None) => {
                return Err(ApiError::Internal("no kube client".into()));
            }
            (PsatMode::Offline, _) => self.verify_offline(token, now).await?,
        };
        let (mut pod_labels, mut node_labels) = (Vec::new(), Vec::new());
        let (node_name, node_uid) = match &self.client {
            Some(c) => {
                let pods: Api<Pod> = Api::namespaced(c.clone(), &subject.namespace);
                let pod = pods
                    .get_opt(&subject.pod_name)
                    .await
                    .map_err(|e| unavailable("reading the agent pod", e))?
                    .ok_or_else(|| denied(format!("pod {}/{} does not exist", subject.namespace, subject.pod_name)))?;
                if pod.metadata.uid.as_deref() != Some(subject.pod_uid.as_str()) {
                    return Err(denied(format!(
                        "pod {}/{} has UID {:?}, the token names UID {:?}",
                        subject.namespace,
                        subject.pod_name,
                        pod.metadata.uid.as_deref().unwrap_or(""),
                        subject.pod_uid
                    )));
                }
                let node_name = pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.node_name.clone())
                    .ok_or_else(|| denied("the agent pod is not scheduled on a node"))?;
                if let Some((n, _)) = &subject.node
                    && *n != node_name
                {
                    return Err(denied(format!(
                        "the token's node {n:?} is not the agent pod's node {node_name:?}"
                    )));
                }
                pod_labels = labels(&pod.metadata, &self.cfg.pod_label_allow_list);
                let nodes: Api<Node> = Api::all(c.clone());
                let node = nodes
                    .get_opt(&node_name)
                    .await
                    .map_err(|e| unavailable("reading the node", e))?
                    .ok_or_else(|| denied(format!("node {node_name} does not exist")))?;
                let uid = node.metadata.uid.clone().ok_or_else(|| denied("node has no UID"))?;
                if let Some((_, u)) = &subject.node
                    && *u != uid
                {
                    return Err(denied(format!(
                        "the token's node UID {u:?} is not node {node_name}'s UID {uid:?}"
                    )));
                }
                node_labels = labels(&node.metadata, &self.cfg.node_label_allow_list);
                (node_name, uid)
            }
            None => subject.node.clone().ok_or_else(|| {
                denied("the token has no node claim (Kubernetes < 1.30) and the CA has no API access to find the node")
            })?,
        };
        Ok(AttestedNode {
            agent_id: agent_id(td, &self.cfg.name, &node_uid)?,
            selectors: selectors(
                &self.cfg.name,
                &subject,
                (&node_name, &node_uid),
                &node_labels,
                &pod_labels,
            ),
        })
    }
}

/// Every configured cluster by name.
#[derive(Debug, Default)]
pub struct Clusters {
    by_name: HashMap<String, Arc<Cluster>>,
}

impl Clusters {
    /// Builds clients for every configured cluster.
    pub async fn new(
        cfgs: &[ClusterConfig],
        suppressed: &prometheus_client::metrics::family::Family<
            crate::metrics::ClusterLabel,
            prometheus_client::metrics::counter::Counter,
        >,
    ) -> Result<Self, String> {
        let mut by_name = HashMap::new();
        for c in cfgs {
            let counter = suppressed
                .get_or_create(&crate::metrics::ClusterLabel {
                    cluster: c.name.clone(),
                })
                .clone();
            let cluster = Cluster::new(c.clone(), counter)
                .await
                .map_err(|e| format!("cluster {}: {e}", c.name))?;
            by_name.insert(c.name.clone(), Arc::new(cluster));
        }
        Ok(Self { by_name })
    }

    /// A cluster by name.
    pub fn get(&self, name: &str) -> Option<Arc<Cluster>> {
        self.by_name.get(name).cloned()
    }

    /// Every cluster.
    pub fn all(&self) -> impl Iterator<Item = &Arc<Cluster>> {
        self.by_name.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::UserInfo;
    use std::collections::BTreeMap;

    fn status(
        auth: bool,
        user: &str,
        auds: Option<Vec<&str>>,
        pods: Vec<&str>,
        uids: Vec<&str>,
    ) -> TokenReviewStatus {
        let mut extra = BTreeMap::new();
        extra.insert(
            "authentication.kubernetes.io/pod-name".to_owned(),
            pods.iter().map(|s| s.to_string()).collect(),
        );
        extra.insert(
            "authentication.kubernetes.io/pod-uid".to_owned(),
            uids.iter().map(|s| s.to_string()).collect(),
        );
        TokenReviewStatus {
            authenticated: Some(auth),
            audiences: auds.map(|a| a.iter().map(|s| s.to_string()).collect()),
            error: (!auth).then(|| "nope".into()),
            user: Some(UserInfo {
                username: Some(user.into()),
                extra: Some(extra),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn review_table() {
        let allow = vec!["ward:agent".to_owned()];
        let ok = status(
            true,
            "system:serviceaccount:ward:agent",
            Some(vec!["ward-ca"]),
            vec!["p"],
            vec!["u"],
        );
        let s = check_review(&ok, "ward-ca", &allow).unwrap();
        assert_eq!((s.namespace.as_str(), s.pod_uid.as_str()), ("ward", "u"));
        let cases = [
            (
                status(
                    false,
                    "system:serviceaccount:ward:agent",
                    None,
                    vec!["p"],
                    vec!["u"],
                ),
                "not authenticated",
            ),
            (
                status(
                    true,
                    "system:serviceaccount:ward:agent",
                    Some(vec!["other"]),
                    vec!["p"],
                    vec!["u"],
                ),
                "audience",
            ),
            (
                status(
                    true,
                    "system:serviceaccount:ward:other",
                    None,
                    vec!["p"],
                    vec!["u"],
                ),
                "not allowed",
            ),
            (
                status(true, "alice", None, vec!["p"], vec!["u"]),
                "not a service account",
            ),
            (
                status(
                    true,
                    "system:serviceaccount:ward:agent",
                    None,
                    vec![],
                    vec!["u"],
                ),
                "pod-name",
            ),
            (
                status(
                    true,
                    "system:serviceaccount:ward:agent",
                    None,
                    vec!["p", "q"],
                    vec!["u"],
                ),
                "more than one",
            ),
            (
                status(
                    true,
                    "system:serviceaccount:ward:agent",
                    None,
                    vec!["p"],
                    vec![],
                ),
                "pod-uid",
            ),
        ];
        for (st, want) in cases {
            let e = check_review(&st, "ward-ca", &allow).unwrap_err();
            assert!(matches!(e, ApiError::PermissionDenied(_)));
            assert!(e.to_string().contains(want), "{e} should mention {want}");
        }
    }

    #[test]
    fn algorithms_are_refused_by_name() {
        use base64::Engine as _;
        let tok = |h: &str| {
            format!(
                "{}.e30.sig",
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(h)
            )
        };
        assert!(check_algorithm(&tok(r#"{"alg":"RS256","kid":"k"}"#)).is_ok());
        let cases = [
            (
                tok(r#"{"alg":"none"}"#),
                "token algorithm none is not allowed",
            ),
            (
                tok(r#"{"alg":"NONE"}"#),
                "token algorithm none is not allowed",
            ),
            (
                tok(r#"{"alg":"HS256"}"#),
                r#"token algorithm "HS256" is not allowed"#,
            ),
            (tok(r#"{"typ":"JWT"}"#), "no algorithm"),
            ("garbage".to_owned(), "not a JWT"),
        ];
        for (t, want) in cases {
            let e = check_algorithm(&t).unwrap_err().to_string();
            assert!(e.contains(want), "{e} should mention {want}");
        }
    }

    #[test]
    fn claims_table() {
        let allow = vec!["ward:agent".to_owned()];
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let base = serde_json::json!({
            "iss": "https://k8s", "aud": ["ward-ca"], "exp": 1_000_600, "nbf": 999_990, "iat": 999_990,
            "sub": "system:serviceaccount:ward:agent",
            "kubernetes.io": { "namespace": "ward", "serviceaccount": { "name": "agent", "uid": "sa" },
                               "pod": { "name": "p", "uid": "u" }, "node": { "name": "n", "uid": "nu" } }
        });
        let s = check_claims(&base, "https://k8s", "ward-ca", &allow, now).unwrap();
        assert_eq!(s.node, Some(("n".into(), "nu".into())));
        let with = |path: &[&str], v: Value| {
            let mut c = base.clone();
            let mut cur = &mut c;
            for p in &path[..path.len() - 1] {
                cur = &mut cur[*p];
            }
            cur[*path.last().unwrap()] = v;
            c
        };
        let cases = [
            (
                with(&["iss"], "https://evil".into()),
                r#"token issuer "https://evil" is not the cluster's issuer "https://k8s""#,
            ),
            (with(&["iss"], Value::Null), "token has no issuer"),
            (
                with(&["aud"], serde_json::json!(["other", "more"])),
                r#"not for audience "ward-ca" (its audiences are ["other", "more"])"#,
            ),
            (
                with(&["exp"], 999_000u64.into()),
                "token expired at 1970-01-12T13:30:00Z (CA clock 1970-01-12T13:46:40Z, leeway 30s)",
            ),
            (
                with(&["nbf"], 1_000_100u64.into()),
                "not valid before 1970-01-12T13:48:20Z (CA clock 1970-01-12T13:46:40Z",
            ),
            (
                with(&["exp"], "soon".into()),
                "token claim exp is not a time",
            ),
            (with(&["exp"], Value::Null), "token has no expiry"),
            (
                with(&["sub"], "system:serviceaccount:ward:x".into()),
                "subject",
            ),
            (
                with(&["kubernetes.io", "serviceaccount", "name"], "x".into()),
                "subject",
            ),
            (with(&["kubernetes.io", "pod", "uid"], "".into()), "pod uid"),
        ];
        for (c, want) in cases {
            let e = check_claims(&c, "https://k8s", "ward-ca", &allow, now).unwrap_err();
            assert!(e.to_string().contains(want), "{e} should mention {want}");
        }
        let other_sa = with(&["sub"], "system:serviceaccount:ward:x".into());
        let other_sa = {
            let mut c = other_sa;
            c["kubernetes.io"]["serviceaccount"]["name"] = "x".into();
            c
        };
        assert!(
            check_claims(&other_sa, "https://k8s", "ward-ca", &allow, now)
                .unwrap_err()
                .to_string()
                .contains("not allowed")
        );
        // An expiry beyond the clock's range is refused by name, not a panic.
        let far = with(&["exp"], u64::MAX.into());
        let e = check_claims(&far, "https://k8s", "ward-ca", &allow, now).unwrap_err();
        assert!(
            e.to_string()
                .contains("exp is not a time: 18446744073709551615"),
            "{e}"
        );
        let no_node = with(&["kubernetes.io", "node"], Value::Null);
        assert_eq!(
            check_claims(&no_node, "https://k8s", "ward-ca", &allow, now)
                .unwrap()
                .node,
            None
        );
    }

    #[test]
    fn agent_ids_and_selectors() {
        let td = TrustDomain::new("td").unwrap();
        assert_eq!(
            agent_id(&td, "c1", "abc-123").unwrap().as_str(),
            "spiffe://td/ward/agent/k8s_psat/c1/abc-123"
        );
        assert!(agent_id(&td, "c1", "a/b").is_err());
        let s = TokenSubject {
            namespace: "ward".into(),
            service_account: "agent".into(),
            pod_name: "p".into(),
            pod_uid: "u".into(),
            node: None,
        };
        let sel = selectors("c1", &s, ("n", "nu"), &[("zone".into(), "a".into())], &[]);
        assert!(sel.contains(&"k8s_psat:agent_node_uid:nu".to_owned()));
        assert!(sel.contains(&"k8s_psat:agent_node_label:zone:a".to_owned()));
        for x in &sel {
            ward_spiffe::Selector::parse(x).unwrap();
        }
    }
}
