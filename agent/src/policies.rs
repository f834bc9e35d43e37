//! Ward's `Policies` service on the agent socket: a local proxy asks for the authorization
//! policies that target its workload and gets them streamed, in full and again on every change.
//! Callers are identified exactly as on the Workload API.

use std::pin::Pin;

use futures::Stream;
use tonic::{Request, Response, Status};
use ward_proto::agent::{PolicySnapshot, WatchPoliciesRequest, policies_server::Policies};

use crate::workload::{WorkloadApi, no_identity};

/// The service; it shares the Workload API's caller attestation.
#[derive(Debug, Clone)]
pub struct PolicyService {
    api: WorkloadApi,
}

impl PolicyService {
    /// A service answering for the same cache and attestor as `api`.
    pub fn new(api: WorkloadApi) -> Self {
        Self { api }
    }
}

#[tonic::async_trait]
impl Policies for PolicyService {
    type WatchPoliciesStream = Pin<Box<dyn Stream<Item = Result<PolicySnapshot, Status>> + Send>>;

    async fn watch_policies(
        &self,
        req: Request<WatchPoliciesRequest>,
    ) -> Result<Response<Self::WatchPoliciesStream>, Status> {
        let r = async {
            let selectors = self.api.caller(&req).await?;
            self.api.synced()?;
            let want = req.into_inner().spiffe_id;
            let stream = self.api.watch(&selectors.clone(), move |snap| {
                let entries = snap.matching(&selectors);
                let entry = if want.is_empty() {
                    entries.first()
                } else {
                    entries.iter().find(|e| e.spiffe_id.as_str() == want)
                };
                let Some(e) = entry else {
                    return Err(if entries.is_empty() {
                        no_identity()
                    } else {
                        Status::permission_denied(format!(
                            "no identity {want} issued to this caller"
                        ))
                    });
                };
                Ok(Some(PolicySnapshot {
                    spiffe_id: e.spiffe_id.to_string(),
                    policies: snap
                        .policies
                        .policies_targeting(&e.spiffe_id)
                        .iter()
                        .map(|p| ward_proto::convert::policy_to_proto(p, 0))
                        .collect(),
                    egress: snap.egress.as_deref().cloned(),
                }))
            })?;
            Ok(Response::new(Box::pin(stream) as Self::WatchPoliciesStream))
        }
        .await;
        self.api.metrics.call(
            "WatchPolicies",
            r.as_ref().map_or_else(Status::code, |_| tonic::Code::Ok),
        );
        r
    }
}
