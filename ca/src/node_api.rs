//! The node API service (gRPC over TLS) that agents call.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tonic::{Request, Response, Status};
use ward_net::PeerInfo;
use ward_net::refusal::RefusalContext;
use ward_proto::node::{self, node_server::Node};

use crate::convert::{bundle_to_proto, svid_to_proto};
use crate::core::{CaCore, Issued};
use crate::db::unix;
use crate::error::ApiError;
use crate::metrics::AttestLabel;

/// The service.
#[derive(Debug, Clone)]
pub struct NodeService {
    core: Arc<CaCore>,
}

impl NodeService {
    /// Serves `core`.
    pub fn new(core: Arc<CaCore>) -> Self {
        Self { core }
    }
}

fn peer<T>(req: &Request<T>) -> Option<PeerInfo> {
    req.extensions().get::<PeerInfo>().cloned()
}

fn svid_msg(i: &Issued) -> ward_proto::types::X509Svid {
    svid_to_proto(i.id.as_str(), i.chain.clone(), unix(i.not_after))
}

impl NodeService {
    /// Counts `n` signings of `kind` against the agent's rate; refused ones are counted too.
    fn admit_signing(
        &self,
        agent: &crate::agents::AgentRecord,
        kind: &str,
        n: usize,
    ) -> Result<(), ApiError> {
        self.core
            .signing
            .admit(agent.id.as_str(), n)
            .inspect_err(|_| {
                self.core
                    .metrics
                    .rate_limited
                    .get_or_create(&crate::metrics::KindLabel { kind: kind.into() })
                    .inc();
            })
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn attest(
        &self,
        req: Request<node::AttestRequest>,
    ) -> Result<Response<node::AttestResponse>, Status> {
        let ctx = req.extensions().get::<RefusalContext>().cloned();
        let note = |k: &'static str, v: &str| {
            if let Some(c) = &ctx {
                c.set(k, v);
            }
        };
        let req = req.into_inner();
        let (method, result) = match req.method {
            Some(node::attest_request::Method::JoinToken(jt)) => {
                note("attestor", "join_token");
                (
                    "join_token",
                    self.core.attest_join_token(&jt.token, &req.csr).await,
                )
            }
            Some(node::attest_request::Method::K8sPsat(p)) => {
                note("attestor", "k8s_psat");
                note("cluster", &p.cluster);
                (
                    "k8s_psat",
                    self.core
                        .attest_k8s_psat(&p.cluster, &p.token, &req.csr)
                        .await,
                )
            }
            None => (
                "none",
                Err(ApiError::InvalidArgument(
                    "an attestation method is required".into(),
                )),
            ),
        };
        let label = AttestLabel {
            method: method.into(),
            result: match &result {
                Ok(_) => "ok".into(),
                Err(e) => format!("{:?}", e.code()),
            },
        };
        self.core.metrics.attestations.get_or_create(&label).inc();
        let iss = result?;
        Ok(Response::new(node::AttestResponse {
            svid: Some(svid_msg(&iss)),
            bundle: Some(bundle_to_proto(&self.core.bundle())),
        }))
    }

    async fn renew_agent(
        &self,
        req: Request<node::RenewAgentRequest>,
    ) -> Result<Response<node::RenewAgentResponse>, Status> {
        let p = peer(&req);
        let iss = self
            .core
            .renew_agent(p.as_ref(), &req.into_inner().csr)
            .await?;
        Ok(Response::new(node::RenewAgentResponse {
            svid: Some(svid_msg(&iss)),
        }))
    }

    async fn batch_new_x509_svid(
        &self,
        req: Request<node::BatchNewX509SvidRequest>,
    ) -> Result<Response<node::BatchNewX509SvidResponse>, Status> {
        let agent = self.core.authorize_agent(peer(&req).as_ref()).await?;
        let n = req.get_ref().params.len();
        self.admit_signing(&agent, "x509", n)?;
        let params: Vec<(String, Vec<u8>)> = req
            .into_inner()
            .params
            .into_iter()
            .map(|p| (p.entry_id, p.csr))
            .collect();
        let ids: Vec<String> = params.iter().map(|p| p.0.clone()).collect();
        let results = self.core.sign_batch(&agent, params).await?;
        let results = ids
            .into_iter()
            .zip(results)
            .map(|(entry_id, r)| match r {
                Ok(iss) => node::SvidResult {
                    entry_id,
                    svid: Some(svid_msg(&iss)),
                    error_code: 0,
                    error_message: String::new(),
                },
                Err(e) => {
                    let st = e.into_status();
                    node::SvidResult {
                        entry_id,
                        svid: None,
                        error_code: st.code() as i32,
                        error_message: st.message().to_owned(),
                    }
                }
            })
            .collect();
        Ok(Response::new(node::BatchNewX509SvidResponse { results }))
    }

    async fn new_jwt_svid(
        &self,
        req: Request<node::NewJwtSvidRequest>,
    ) -> Result<Response<node::NewJwtSvidResponse>, Status> {
        let agent = self.core.authorize_agent(peer(&req).as_ref()).await?;
        self.admit_signing(&agent, "jwt", 1)?;
        let r = req.into_inner();
        let (id, token, exp) = self.core.mint_jwt(&agent, &r.entry_id, &r.audience).await?;
        Ok(Response::new(node::NewJwtSvidResponse {
            spiffe_id: id.to_string(),
            token,
            expires_at: unix(exp),
        }))
    }

    type SyncStream = Pin<Box<dyn Stream<Item = Result<node::SyncUpdate, Status>> + Send>>;

    async fn sync(
        &self,
        req: Request<node::SyncRequest>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let p = peer(&req);
        let agent = self.core.authorize_agent(p.as_ref()).await?;
        let since = req.into_inner().since_revision;
        let stream = crate::sync::stream(self.core.clone(), agent, p, since);
        Ok(Response::new(Box::pin(stream)))
    }
}
