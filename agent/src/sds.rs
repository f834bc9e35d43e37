//! Envoy's Secret Discovery Service (SDS v3) on the Workload API socket, so Envoy gets Ward
//! identities with no certificate files.
//!
//! Callers are attested exactly like Workload API callers (peer credentials; Envoy sends no
//! Workload API header) and get only what their entries entitle them to. Resources by name:
//! a SPIFFE ID the caller holds, or the default name (`default`), gives a `tls_certificate`;
//! `spiffe://<trust domain>` or the default bundle name (`ROOTCA`) gives a `validation_context`
//! with the bundle; the all-bundles name (`ALL`) gives the validation context for every trust
//! domain (one today: Ward has no federation yet). A name the caller is not entitled to is
//! left out of the response and logged — never another workload's key.
//!
//! State-of-the-world xDS: every response carries a version (a digest of its resources) and a
//! nonce. A request whose nonce is not the latest is stale and ignored; an ACK changes nothing;
//! a NACK is logged and the same content is not sent again, and pushes after a NACK wait a
//! growing back-off (1 s doubling to 30 s) until the client ACKs. Rotations and bundle changes
//! push at once; unchanged resources are never pushed.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use ward_proto::envoy::config::core::v3::{DataSource, data_source::Specifier};
use ward_proto::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, TlsCertificate, secret,
};
use ward_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use ward_proto::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryService;
use ward_spiffe::{SelectorSet, SpiffeId};

use crate::cache::Snapshot;
use crate::workload::WorkloadApi;

/// The type URL of SDS resources.
pub const SECRET_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// Resource names with special meanings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SdsConfig {
    /// Name meaning "the caller's (first) SVID".
    pub default_svid_name: String,
    /// Name meaning "the bundle of the agent's trust domain".
    pub default_bundle_name: String,
    /// Name meaning "the bundles of every trust domain".
    pub default_all_bundles_name: String,
}

impl Default for SdsConfig {
    fn default() -> Self {
        Self {
            default_svid_name: "default".into(),
            default_bundle_name: "ROOTCA".into(),
            default_all_bundles_name: "ALL".into(),
        }
    }
}

fn inline(bytes: Vec<u8>) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(Specifier::InlineBytes(bytes)),
    })
}

/// The secrets `names` resolve to for a caller with `selectors`. Pure.
pub fn render(
    snap: &Snapshot,
    selectors: &SelectorSet,
    names: &[String],
    cfg: &SdsConfig,
) -> Vec<Secret> {
    let entitled = snap.matching(selectors);
    let Some(bundle) = &snap.bundle else {
        return Vec::new();
    };
    let td_name = format!("spiffe://{}", bundle.trust_domain);
    let mut wanted: Vec<String> = names.to_vec();
    if wanted.is_empty() {
        // No names: everything the caller may have.
        wanted = entitled.iter().map(|e| e.spiffe_id.to_string()).collect();
        wanted.push(cfg.default_bundle_name.clone());
    }
    let mut out = Vec::new();
    for name in wanted {
        let svid_for = |id: Option<&str>| {
            entitled
                .iter()
                .filter(|e| id.is_none_or(|id| e.spiffe_id.as_str() == id))
                .find_map(|e| snap.current_svid(e))
                .cloned()
        };
        let secret = if name == cfg.default_svid_name
            || SpiffeId::new(&name).is_ok_and(|id| !id.path().is_empty())
        {
            let id = (name != cfg.default_svid_name).then_some(name.as_str());
            match svid_for(id) {
                Some(s) => {
                    let chain: String = s
                        .chain
                        .iter()
                        .map(|c| ward_spiffe::bundle::pem_encode("CERTIFICATE", c))
                        .collect();
                    let key = ward_spiffe::bundle::pem_encode("PRIVATE KEY", &s.key);
                    secret::Type::TlsCertificate(TlsCertificate {
                        certificate_chain: inline(chain.into_bytes()),
                        private_key: inline(key.into_bytes()),
                    })
                }
                None => {
                    if id.is_some_and(|id| !entitled.iter().any(|e| e.spiffe_id.as_str() == id)) {
                        tracing::warn!(resource = %name, "SDS: caller is not entitled to this SVID; not sent");
                    }
                    continue;
                }
            }
        } else if name == cfg.default_bundle_name
            || name == td_name
            || name == cfg.default_all_bundles_name
        {
            secret::Type::ValidationContext(CertificateValidationContext {
                trusted_ca: inline(bundle.x509_pem().into_bytes()),
                custom_validator_config: None,
            })
        } else {
            tracing::warn!(resource = %name, "SDS: unknown resource name; not sent");
            continue;
        };
        out.push(Secret {
            name,
            r#type: Some(secret),
        });
    }
    out
}

/// A response's version: a digest of its resources, so identical content has one version.
fn version(resources: &[prost_types::Any]) -> String {
    let mut h = DefaultHasher::new();
    for r in resources {
        r.value.hash(&mut h);
    }
    format!("{:016x}", h.finish())
}

fn encode(secrets: Vec<Secret>) -> Vec<prost_types::Any> {
    secrets
        .into_iter()
        .map(|s| prost_types::Any {
            type_url: SECRET_TYPE.into(),
            value: prost::Message::encode_to_vec(&s),
        })
        .collect()
}

/// The SDS service.
#[derive(Debug, Clone)]
pub struct SdsService {
    api: WorkloadApi,
    cfg: Arc<SdsConfig>,
}

impl SdsService {
    /// Serves SDS from the Workload API's cache and attestation.
    pub fn new(api: WorkloadApi, cfg: SdsConfig) -> Self {
        Self {
            api,
            cfg: Arc::new(cfg),
        }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

const NACK_BACKOFF_MIN: Duration = Duration::from_secs(1);
const NACK_BACKOFF_MAX: Duration = Duration::from_secs(30);

#[tonic::async_trait]
impl SecretDiscoveryService for SdsService {
    type DeltaSecretsStream = BoxStream<DeltaDiscoveryResponse>;
    type StreamSecretsStream = BoxStream<DiscoveryResponse>;

    async fn delta_secrets(
        &self,
        _req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Err(Status::unimplemented(
            "delta SDS is not supported; use StreamSecrets",
        ))
    }

    async fn fetch_secrets(
        &self,
        req: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let selectors = self.api.attest_peer(&req).await?;
        let r = req.into_inner();
        if !r.type_url.is_empty() && r.type_url != SECRET_TYPE {
            return Err(Status::invalid_argument(format!(
                "type_url {:?} is not {SECRET_TYPE}",
                r.type_url
            )));
        }
        let snap = self.api.synced()?;
        if snap.matching(&selectors).is_empty() {
            return Err(crate::workload::no_identity());
        }
        let resources = encode(render(&snap, &selectors, &r.resource_names, &self.cfg));
        self.api.metrics.call("FetchSecrets", tonic::Code::Ok);
        Ok(Response::new(DiscoveryResponse {
            version_info: version(&resources),
            resources,
            canary: false,
            type_url: SECRET_TYPE.into(),
            nonce: String::new(),
        }))
    }

    async fn stream_secrets(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let selectors = self.api.attest_peer(&req).await?;
        let slot = self.api.slots.acquire(&selectors)?;
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let mut snaps = self.api.snapshots.clone();
        let mut stopping = self.api.stopping.clone();
        let cfg = self.cfg.clone();
        let metrics = self.api.metrics.clone();
        metrics.call("StreamSecrets", tonic::Code::Ok);
        tokio::spawn(async move {
            // The caller's stream place, given back when this stream ends.
            let _slot = slot;
            let mut names: Option<Vec<String>> = None;
            let mut last: Option<(String, String)> = None; // (version, nonce) sent
            let mut nonce = 0u64;
            let mut backoff: Option<Duration> = None;
            loop {
                let mut must_send = false;
                tokio::select! {
                    m = inbound.message() => {
                        let r = match m {
                            Ok(Some(r)) => r,
                            _ => return,
                        };
                        if !r.type_url.is_empty() && r.type_url != SECRET_TYPE {
                            let _ = tx.send(Err(Status::invalid_argument(format!(
                                "type_url {:?} is not {SECRET_TYPE}", r.type_url
                            )))).await;
                            return;
                        }
                        let latest = last.as_ref().map(|(_, n)| n.as_str());
                        if !r.response_nonce.is_empty() && Some(r.response_nonce.as_str()) != latest {
                            continue; // a reply to an older response
                        }
                        let same_names = names.as_ref() == Some(&r.resource_names);
                        if let Some(e) = &r.error_detail {
                            let b = backoff.map_or(NACK_BACKOFF_MIN, |b| (b * 2).min(NACK_BACKOFF_MAX));
                            tracing::warn!(error = %e.message, version = %r.version_info, retry_after = ?b, "SDS: client rejected the secrets (NACK)");
                            backoff = Some(b);
                            if same_names {
                                continue; // the same content would be rejected again
                            }
                        } else if !r.response_nonce.is_empty() {
                            backoff = None; // ACK
                            if same_names {
                                continue;
                            }
                        }
                        must_send = !same_names || last.is_none();
                        names = Some(r.resource_names);
                    }
                    r = snaps.changed() => if r.is_err() { return },
                    _ = ward_net::process::until_set(&mut stopping) => return,
                }
                let Some(n) = &names else { continue };
                let snap = snaps.borrow_and_update().clone();
                let mut resources = encode(render(&snap, &selectors, n, &cfg));
                let mut v = version(&resources);
                if !must_send && last.as_ref().is_some_and(|(lv, _)| *lv == v) {
                    continue; // nothing changed for this client
                }
                if !must_send && let Some(b) = backoff {
                    // After a NACK, wait before pushing again, then send what is current then.
                    tokio::select! {
                        _ = tokio::time::sleep(b) => {}
                        _ = ward_net::process::until_set(&mut stopping) => return,
                    }
                    let snap = snaps.borrow_and_update().clone();
                    resources = encode(render(&snap, &selectors, n, &cfg));
                    v = version(&resources);
                }
                nonce += 1;
                let resp = DiscoveryResponse {
                    version_info: v.clone(),
                    resources,
                    canary: false,
                    type_url: SECRET_TYPE.into(),
                    nonce: nonce.to_string(),
                };
                if tx.send(Ok(resp)).await.is_err() {
                    return;
                }
                last = Some((v, nonce.to_string()));
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::SystemTime;

    use ward_spiffe::bundle::pem_encode;
    use ward_spiffe::{Bundle, TrustDomain};

    use super::*;
    use crate::cache::fixtures::{caller, entry, svid};

    /// Entries `web` and `db` for the caller (uid 1, gid 5), `admin` for uid 0 only; an SVID
    /// for each (chain `<id>-leaf`, key `<id>-key`); a bundle for `td`.
    fn snapshot() -> Snapshot {
        let mut s = Snapshot::default();
        for (id, sel) in [
            ("web", &["unix:uid:1"][..]),
            ("db", &["unix:uid:1", "unix:gid:5"][..]),
            ("admin", &["unix:uid:0"][..]),
        ] {
            let e = entry(id, sel, 1);
            let chain = vec![format!("{id}-leaf").into_bytes()];
            s.svids
                .insert(e.id.clone(), svid(&e, chain, SystemTime::UNIX_EPOCH));
            s.entries.insert(e.id.clone(), e);
        }
        let mut b = Bundle::new(TrustDomain::new("td").unwrap());
        b.x509_authorities = vec![b"root-one".to_vec(), b"root-two".to_vec()];
        s.bundle = Some(Arc::new(b));
        s
    }

    fn me() -> SelectorSet {
        caller(&["unix:uid:1", "unix:gid:5", "unix:user:app"])
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    fn bytes(d: &Option<DataSource>) -> String {
        match d.as_ref().and_then(|d| d.specifier.as_ref()) {
            Some(Specifier::InlineBytes(b)) => String::from_utf8(b.clone()).unwrap(),
            other => panic!("want inline bytes, got {other:?}"),
        }
    }

    /// Each secret as (name, "cert:<chain>|<key>" or "ca:<bundle>").
    fn summary(secrets: &[Secret]) -> Vec<(String, String)> {
        secrets
            .iter()
            .map(|s| {
                let body = match &s.r#type {
                    Some(secret::Type::TlsCertificate(c)) => format!(
                        "cert:{}|{}",
                        bytes(&c.certificate_chain),
                        bytes(&c.private_key)
                    ),
                    Some(secret::Type::ValidationContext(v)) => {
                        format!("ca:{}", bytes(&v.trusted_ca))
                    }
                    other => panic!("unexpected secret type {other:?}"),
                };
                (s.name.clone(), body)
            })
            .collect()
    }

    fn cert(id: &str) -> String {
        format!(
            "cert:{}|{}",
            pem_encode("CERTIFICATE", format!("{id}-leaf").as_bytes()),
            pem_encode("PRIVATE KEY", format!("{id}-key").as_bytes())
        )
    }

    fn ca() -> String {
        format!(
            "ca:{}{}",
            pem_encode("CERTIFICATE", b"root-one"),
            pem_encode("CERTIFICATE", b"root-two")
        )
    }

    fn render_names(s: &Snapshot, want: &[&str]) -> Vec<(String, String)> {
        summary(&render(s, &me(), &names(want), &SdsConfig::default()))
    }

    #[test]
    fn a_named_svid_is_the_callers_certificate_and_key() {
        let s = snapshot();
        assert_eq!(
            render_names(&s, &["spiffe://td/web"]),
            vec![("spiffe://td/web".to_owned(), cert("web"))]
        );
        // The default SVID name: the first entitled entry (by SPIFFE ID) with a current SVID.
        assert_eq!(
            render_names(&s, &["default"]),
            vec![("default".to_owned(), cert("db"))]
        );
    }

    #[test]
    fn bundle_names_give_the_validation_context() {
        let s = snapshot();
        assert_eq!(
            render_names(&s, &["ROOTCA", "spiffe://td", "ALL"]),
            vec![
                ("ROOTCA".to_owned(), ca()),
                ("spiffe://td".to_owned(), ca()),
                ("ALL".to_owned(), ca()),
            ]
        );
        // Configured names replace the defaults.
        let cfg = SdsConfig {
            default_svid_name: "mine".into(),
            default_bundle_name: "trust".into(),
            default_all_bundles_name: "everyone".into(),
        };
        let got = summary(&render(
            &s,
            &me(),
            &names(&["trust", "mine", "ROOTCA", "default"]),
            &cfg,
        ));
        assert_eq!(
            got,
            vec![("trust".to_owned(), ca()), ("mine".to_owned(), cert("db"))]
        );
    }

    #[test]
    fn no_names_means_everything_the_caller_is_entitled_to() {
        let s = snapshot();
        assert_eq!(
            render_names(&s, &[]),
            vec![
                ("spiffe://td/db".to_owned(), cert("db")),
                ("spiffe://td/web".to_owned(), cert("web")),
                ("ROOTCA".to_owned(), ca()),
            ]
        );
        // A caller entitled to nothing gets the bundle only.
        let stranger = render(&s, &caller(&["unix:uid:9"]), &[], &SdsConfig::default());
        assert_eq!(summary(&stranger), vec![("ROOTCA".to_owned(), ca())]);
    }

    #[test]
    fn another_workloads_svid_is_never_sent() {
        let s = snapshot();
        assert_eq!(render_names(&s, &["spiffe://td/admin"]), vec![]);
        // Nor with other names around it, nor unknown names.
        assert_eq!(
            render_names(&s, &["spiffe://td/admin", "nonsense", "spiffe://td/web"]),
            vec![("spiffe://td/web".to_owned(), cert("web"))]
        );
        // Asking for everything does not reach it either.
        let all = summary(&render(&s, &me(), &[], &SdsConfig::default()));
        assert!(
            all.iter().all(|(_, body)| *body != cert("admin")),
            "{all:?}"
        );
    }

    #[test]
    fn an_svid_of_an_older_entry_version_is_not_sent() {
        let mut s = snapshot();
        // `db` changed (revision 2) and has not been re-issued yet.
        let db = entry("db", &["unix:uid:1", "unix:gid:5"], 2);
        s.entries.insert("db".into(), db);
        assert_eq!(render_names(&s, &["spiffe://td/db"]), vec![]);
        assert_eq!(
            render_names(&s, &["default"]),
            vec![("default".to_owned(), cert("web"))]
        );
    }

    #[test]
    fn without_a_bundle_nothing_is_sent() {
        let mut s = snapshot();
        s.bundle = None;
        assert!(render(&s, &me(), &[], &SdsConfig::default()).is_empty());
        assert!(
            render(
                &s,
                &me(),
                &names(&["spiffe://td/web", "ROOTCA"]),
                &SdsConfig::default()
            )
            .is_empty()
        );
    }
}
