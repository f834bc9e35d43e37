//! The SPIFFE Workload API on the agent's Unix socket.
//!
//! Every call must carry `workload.spiffe.io: true` (else `InvalidArgument`). Callers are
//! identified by SO_PEERCRED and attested to selectors; a caller with no matching entry gets
//! `PermissionDenied`; an agent that has not synced yet answers `Unavailable`. Streams send the
//! full current state first and again whenever it changes.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};
use ward_proto::node::NewJwtSvidRequest;
use ward_proto::workload::{self as wl, spiffe_workload_api_server::SpiffeWorkloadApi};
use ward_spiffe::{Clock, SelectorSet};

use crate::attest::{Caller, UnixAttestor};
use crate::cache::{CachedEntry, Snapshot};
use crate::identity::Identity;
use crate::metrics::Metrics;

/// How long a first response may wait for SVIDs that are being fetched.
const FIRST_SVID_WAIT: Duration = Duration::from_secs(10);

type JwtKey = (String, Vec<String>);
/// A cached JWT-SVID: token, expiry, when to fetch a new one, and its key ID.
type CachedJwt = (String, SystemTime, SystemTime, String);

/// The Workload API service.
#[derive(Debug, Clone)]
pub struct WorkloadApi {
    pub(crate) snapshots: watch::Receiver<Arc<Snapshot>>,
    attestor: UnixAttestor,
    identity: Arc<Identity>,
    clock: Arc<dyn Clock>,
    pub(crate) metrics: Metrics,
    jwts: Arc<Mutex<HashMap<JwtKey, CachedJwt>>>,
    pub(crate) stopping: watch::Receiver<bool>,
    kubelet: Option<Arc<crate::k8s::Kubelet>>,
    /// The streams each caller holds.
    pub(crate) slots: Arc<crate::limits::StreamSlots>,
}

impl WorkloadApi {
    /// A stream for the caller with `selectors` of what `render` makes of each snapshot (sent
    /// when it changes), holding one of the caller's stream places while it is open.
    pub(crate) fn watch<T, F>(
        &self,
        selectors: &SelectorSet,
        render: F,
    ) -> Result<ReceiverStream<Result<T, Status>>, Status>
    where
        T: PartialEq + Clone + Send + 'static,
        F: Fn(&Snapshot) -> Result<Option<T>, Status> + Send + 'static,
    {
        let slot = self.slots.acquire(selectors)?;
        Ok(spawn_stream(
            self.snapshots.clone(),
            self.stopping.clone(),
            self.metrics.clone(),
            slot,
            render,
        ))
    }

    /// A service over the agent's cache.
    pub fn new(
        snapshots: watch::Receiver<Arc<Snapshot>>,
        attestor: UnixAttestor,
        identity: Arc<Identity>,
        clock: Arc<dyn Clock>,
        metrics: Metrics,
        stopping: watch::Receiver<bool>,
        kubelet: Option<Arc<crate::k8s::Kubelet>>,
    ) -> Self {
        Self {
            slots: crate::limits::StreamSlots::new(
                crate::limits::LimitsConfig::default().max_streams_per_caller,
                metrics.stream_limit_refusals.clone(),
            ),
            kubelet,
            stopping,
            snapshots,
            attestor,
            identity,
            clock,
            metrics,
            jwts: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The same service with the per-caller `limits`.
    pub fn with_limits(mut self, limits: crate::limits::LimitsConfig) -> Self {
        self.slots = crate::limits::StreamSlots::new(
            limits.max_streams_per_caller,
            self.metrics.stream_limit_refusals.clone(),
        );
        self
    }

    /// Checks the security header and attests the caller.
    pub(crate) async fn caller<T>(&self, req: &Request<T>) -> Result<SelectorSet, Status> {
        let ok = req
            .metadata()
            .get("workload.spiffe.io")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == "true");
        if !ok {
            return Err(Status::invalid_argument(
                "security header missing from request",
            ));
        }
        self.attest_peer(req).await
    }

    /// Attests the process at the other end of the socket (Envoy's SDS client sends no
    /// Workload API header; the peer credentials are what count).
    pub(crate) async fn attest_peer<T>(&self, req: &Request<T>) -> Result<SelectorSet, Status> {
        let cred = req
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|c| c.peer_cred)
            .ok_or_else(|| Status::permission_denied("caller has no peer credentials"))?;
        let want_sha256 = self.snapshots.borrow().entries.values().any(|e| {
            e.selectors
                .iter()
                .any(|s| s.kind() == "unix" && s.value().starts_with("sha256:"))
        });
        let unix = self
            .attestor
            .attest(
                Caller {
                    pid: cred.pid(),
                    uid: cred.uid(),
                    gid: cred.gid(),
                },
                want_sha256,
            )
            .await
            .map_err(|e| Status::permission_denied(format!("workload attestation failed: {e}")))?;
        let (Some(kubelet), Some(pid)) = (&self.kubelet, cred.pid()) else {
            return Ok(unix);
        };
        let k8s = kubelet.attest(pid).await;
        if k8s.is_empty() {
            return Ok(unix);
        }
        let mut all: Vec<ward_spiffe::Selector> = unix.iter().cloned().collect();
        all.extend(
            k8s.iter()
                .filter_map(|s| ward_spiffe::Selector::parse(s).ok()),
        );
        Ok(SelectorSet::new(all))
    }

    pub(crate) fn synced(&self) -> Result<Arc<Snapshot>, Status> {
        let s = self.snapshots.borrow().clone();
        if !s.synced || s.bundle.is_none() {
            return Err(Status::unavailable(
                "agent is not synchronized with the CA yet",
            ));
        }
        Ok(s)
    }

    fn record<T>(&self, rpc: &str, r: &Result<T, Status>) {
        self.metrics.call(
            rpc,
            r.as_ref().map_or_else(Status::code, |_| tonic::Code::Ok),
        );
    }
}

pub(crate) fn no_identity() -> Status {
    Status::permission_denied("no identity issued")
}

fn x509_response(snap: &Snapshot, entries: &[Arc<CachedEntry>]) -> wl::X509svidResponse {
    let bundle = snap
        .bundle
        .as_ref()
        .map(|b| b.x509_der_concat())
        .unwrap_or_default();
    wl::X509svidResponse {
        svids: entries
            .iter()
            .filter_map(|e| snap.current_svid(e))
            .map(|s| wl::X509svid {
                spiffe_id: s.spiffe_id.to_string(),
                x509_svid: s.chain.concat(),
                x509_svid_key: s.key.to_vec(),
                bundle: bundle.clone(),
                hint: entries
                    .iter()
                    .find(|e| e.id == s.entry_id)
                    .map(|e| e.hint.clone())
                    .unwrap_or_default(),
            })
            .collect(),
        crl: Vec::new(),
        federated_bundles: HashMap::new(),
    }
}

/// Runs a stream task: `render` turns a snapshot into the next message (`Ok(None)` = not
/// ready yet, `Err` = end the stream with that status). Sends on every change of the message.
fn spawn_stream<T, F>(
    mut rx: watch::Receiver<Arc<Snapshot>>,
    mut stopping: watch::Receiver<bool>,
    metrics: Metrics,
    slot: crate::limits::Slot,
    render: F,
) -> ReceiverStream<Result<T, Status>>
where
    T: PartialEq + Clone + Send + 'static,
    F: Fn(&Snapshot) -> Result<Option<T>, Status> + Send + 'static,
{
    let (tx, out) = mpsc::channel(4);
    tokio::spawn(async move {
        metrics.streams.inc();
        let mut last: Option<T> = None;
        let deadline = tokio::time::Instant::now() + FIRST_SVID_WAIT;
        loop {
            let snap = rx.borrow_and_update().clone();
            match render(&snap) {
                Err(status) => {
                    let _ = tx.send(Err(status)).await;
                    break;
                }
                Ok(Some(msg)) if last.as_ref() != Some(&msg) => {
                    // Keep a copy to compare the next render against: resend only on change.
                    last = Some(msg.clone());
                    if tx.send(Ok(msg)).await.is_err() {
                        break;
                    }
                }
                Ok(_) => {}
            }
            let wait_first = last.is_none();
            tokio::select! {
                r = rx.changed() => if r.is_err() { break },
                _ = tx.closed() => break,
                _ = ward_net::process::until_set(&mut stopping) => {
                    let _ = tx.send(Err(Status::unavailable("the agent is shutting down"))).await;
                    break;
                }
                _ = tokio::time::sleep_until(deadline), if wait_first => {
                    let _ = tx.send(Err(Status::unavailable("SVIDs are not available yet"))).await;
                    break;
                }
            }
        }
        metrics.streams.dec();
        drop(slot);
    });
    ReceiverStream::new(out)
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = BoxStream<wl::X509svidResponse>;

    async fn fetch_x509svid(
        &self,
        req: Request<wl::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let r = async {
            let selectors = self.caller(&req).await?;
            self.synced()?;
            let stream = self.watch(&selectors.clone(), move |snap| {
                let entries = snap.matching(&selectors);
                if entries.is_empty() {
                    return Err(no_identity());
                }
                let resp = x509_response(snap, &entries);
                Ok((!resp.svids.is_empty()).then_some(resp))
            })?;
            Ok(Response::new(Box::pin(stream) as Self::FetchX509SVIDStream))
        }
        .await;
        self.record("FetchX509SVID", &r);
        r
    }

    type FetchX509BundlesStream = BoxStream<wl::X509BundlesResponse>;

    async fn fetch_x509_bundles(
        &self,
        req: Request<wl::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let r = async {
            let selectors = self.caller(&req).await?;
            self.synced()?;
            let stream = self.watch(&selectors.clone(), move |snap| {
                if snap.matching(&selectors).is_empty() {
                    return Err(no_identity());
                }
                Ok(snap.bundle.as_ref().map(|b| wl::X509BundlesResponse {
                    crl: Vec::new(),
                    bundles: HashMap::from([(b.trust_domain.id_string(), b.x509_der_concat())]),
                }))
            })?;
            Ok(Response::new(
                Box::pin(stream) as Self::FetchX509BundlesStream
            ))
        }
        .await;
        self.record("FetchX509Bundles", &r);
        r
    }

    async fn fetch_jwtsvid(
        &self,
        req: Request<wl::JwtsvidRequest>,
    ) -> Result<Response<wl::JwtsvidResponse>, Status> {
        let r = self.fetch_jwt(req).await;
        self.record("FetchJWTSVID", &r);
        r
    }

    type FetchJWTBundlesStream = BoxStream<wl::JwtBundlesResponse>;

    async fn fetch_jwt_bundles(
        &self,
        req: Request<wl::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        let r = async {
            let selectors = self.caller(&req).await?;
            self.synced()?;
            let stream = self.watch(&selectors.clone(), move |snap| {
                if snap.matching(&selectors).is_empty() {
                    return Err(no_identity());
                }
                let Some(b) = &snap.bundle else {
                    return Ok(None);
                };
                let jwks = b
                    .to_jwt_jwks()
                    .map_err(|e| Status::internal(format!("bundle encoding: {e}")))?;
                Ok(Some(wl::JwtBundlesResponse {
                    bundles: HashMap::from([(b.trust_domain.id_string(), jwks.into_bytes())]),
                }))
            })?;
            Ok(Response::new(
                Box::pin(stream) as Self::FetchJWTBundlesStream
            ))
        }
        .await;
        self.record("FetchJWTBundles", &r);
        r
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<wl::ValidateJwtsvidRequest>,
    ) -> Result<Response<wl::ValidateJwtsvidResponse>, Status> {
        let r = async {
            self.caller(&req).await?;
            let snap = self.synced()?;
            let r = req.get_ref();
            if r.audience.is_empty() {
                return Err(Status::invalid_argument("audience must be specified"));
            }
            if r.svid.is_empty() {
                return Err(Status::invalid_argument("svid must be specified"));
            }
            let bundle = snap
                .bundle
                .clone()
                .ok_or_else(|| Status::unavailable("no bundle yet"))?;
            let v = ward_spiffe::jwt::verify_with(
                &r.svid,
                &r.audience,
                |td| (td == &bundle.trust_domain).then_some(bundle.as_ref()),
                self.clock.now(),
            )
            .map_err(|e| Status::invalid_argument(format!("invalid JWT-SVID: {e}")))?;
            Ok(Response::new(wl::ValidateJwtsvidResponse {
                spiffe_id: v.id.to_string(),
                claims: Some(to_struct(v.claims)),
            }))
        }
        .await;
        self.record("ValidateJWTSVID", &r);
        r
    }
}

impl WorkloadApi {
    async fn fetch_jwt(
        &self,
        req: Request<wl::JwtsvidRequest>,
    ) -> Result<Response<wl::JwtsvidResponse>, Status> {
        let selectors = self.caller(&req).await?;
        let snap = self.synced()?;
        let r = req.into_inner();
        if r.audience.is_empty() || r.audience.iter().any(String::is_empty) {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        let mut entries = snap.matching(&selectors);
        if entries.is_empty() {
            return Err(no_identity());
        }
        if !r.spiffe_id.is_empty() {
            entries.retain(|e| e.spiffe_id.as_str() == r.spiffe_id);
            if entries.is_empty() {
                return Err(Status::permission_denied(format!(
                    "no identity {} issued to this caller",
                    r.spiffe_id
                )));
            }
        }
        let mut audience = r.audience.clone();
        audience.sort();
        audience.dedup();
        let mut svids = Vec::with_capacity(entries.len());
        for e in entries {
            let token = self.jwt_for(&e, &audience).await?;
            svids.push(wl::Jwtsvid {
                spiffe_id: e.spiffe_id.to_string(),
                svid: token,
                hint: e.hint.clone(),
            });
        }
        Ok(Response::new(wl::JwtsvidResponse { svids }))
    }

    /// A cached JWT-SVID for `entry` and `audience` until half its life, else a new one.
    async fn jwt_for(&self, entry: &CachedEntry, audience: &[String]) -> Result<String, Status> {
        let key = (entry.id.clone(), audience.to_vec());
        let now = self.clock.now();
        let taints = self.snapshots.borrow().taints.clone();
        {
            let mut cache = self.jwts.lock().unwrap_or_else(|p| p.into_inner());
            // Tokens signed by a tainted key are not handed out again.
            cache.retain(|_, (_, _, refresh, kid)| {
                *refresh > now && !taints.jwt_key_ids.contains(kid)
            });
            if let Some((t, _, _, _)) = cache.get(&key) {
                return Ok(t.clone());
            }
        }
        let resp = self
            .identity
            .node()
            .new_jwt_svid(NewJwtSvidRequest {
                entry_id: entry.id.clone(),
                audience: audience.to_vec(),
            })
            .await
            .map_err(|s| Status::new(s.code(), format!("CA: {}", s.message())))?
            .into_inner();
        let exp = SystemTime::UNIX_EPOCH + Duration::from_secs(resp.expires_at.max(0) as u64);
        let refresh = now + exp.duration_since(now).unwrap_or_default() / 2;
        let mut cache = self.jwts.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() > 10_000 {
            cache.clear();
        }
        let kid = ward_spiffe::jwt::check_header(&resp.token)
            .map(|(_, kid)| kid)
            .unwrap_or_default();
        cache.insert(key, (resp.token.clone(), exp, refresh, kid));
        Ok(resp.token)
    }
}

fn to_value(v: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.into_iter().map(to_value).collect(),
        }),
        serde_json::Value::Object(m) => Kind::StructValue(to_struct(m)),
    };
    prost_types::Value { kind: Some(kind) }
}

fn to_struct(m: serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: m.into_iter().map(|(k, v)| (k, to_value(v))).collect(),
    }
}
