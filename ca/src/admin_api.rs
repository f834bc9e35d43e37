//! The admin API service, served on a Unix socket whose directory is 0700: being able to
//! connect is the authorization.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use ward_proto::admin::{self, admin_server::Admin};
use ward_proto::types;
use ward_spiffe::SpiffeId;

use crate::audit::AuditRecord;
use crate::authority::{Kind, Live, Op, View};
use crate::convert::{bundle_to_proto, entry_to_proto, spec_from_proto};
use crate::core::CaCore;
use crate::error::ApiError;

/// The service.
#[derive(Debug, Clone)]
pub struct AdminService {
    core: Arc<CaCore>,
}

impl AdminService {
    /// Serves `core`.
    pub fn new(core: Arc<CaCore>) -> Self {
        Self { core }
    }

    async fn audit(&self, event: &str, spiffe_id: &str, entry_id: &str) -> Result<(), ApiError> {
        let mut rec = AuditRecord::new(self.core.clock.now(), event, "admin", spiffe_id);
        rec.entry_id = entry_id.to_owned();
        let mut b = ward_store::Batch::new();
        rec.add_to(&mut b)?;
        self.core.store.commit(b).await?;
        Ok(())
    }
}

/// Policies named `k8s:...` mirror `AuthorizationPolicy` resources; only the controller
/// writes them.
fn reserved_policy(name: &str) -> Result<(), ApiError> {
    if name.starts_with("k8s:") {
        return Err(ApiError::FailedPrecondition(format!(
            "policy {name} is managed by the Kubernetes controller; change the AuthorizationPolicy resource instead"
        )));
    }
    Ok(())
}

fn authority_to_proto(kind: Kind, v: &View, live: Live) -> admin::Authority {
    admin::Authority {
        kind: kind.as_str().into(),
        id: v.id.clone(),
        state: v.state.as_str().into(),
        not_before: crate::db::unix(v.not_before),
        not_after: crate::db::unix(v.not_after),
        upstream: v.upstream,
        live_svids: live.count,
        live_until: live.until.map_or(0, crate::db::unix),
        holder: v.holder.clone(),
    }
}

fn service_msg(r: &crate::services::ServiceRecord) -> types::Service {
    ward_proto::convert::service_to_proto(&r.service, r.revision, &r.origin)
}

fn required<'a>(field: &str, v: &'a str) -> Result<&'a str, ApiError> {
    if v.is_empty() {
        Err(ApiError::InvalidArgument(format!("{field} is required")))
    } else {
        Ok(v)
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_join_token(
        &self,
        req: Request<admin::CreateJoinTokenRequest>,
    ) -> Result<Response<admin::JoinToken>, Status> {
        let ttl = match req.into_inner().ttl_seconds {
            0 => self.core.cfg.ttl.join_token,
            s if s > 7 * 86400 => {
                return Err(
                    ApiError::InvalidArgument("join token TTL is at most 7 days".into()).into(),
                );
            }
            s => std::time::Duration::from_secs(u64::from(s)),
        };
        let (token, rec) = self
            .core
            .agents
            .create_join_token(ttl, self.core.clock.now())
            .await?;
        let agent_id = self.core.agents.join_token_agent_id(&rec.id)?;
        self.audit("token-create", agent_id.as_str(), "").await?;
        Ok(Response::new(admin::JoinToken {
            token,
            agent_id: agent_id.to_string(),
            expires_at: rec.expires_at,
        }))
    }

    async fn create_entry(
        &self,
        req: Request<admin::EntrySpec>,
    ) -> Result<Response<types::Entry>, Status> {
        let spec = spec_from_proto(req.into_inner());
        let entry = self
            .core
            .entries
            .create(
                &spec,
                "admin",
                CaCore::new_entry_id(),
                self.core.clock.now(),
            )
            .await?;
        self.audit("entry-create", entry.spiffe_id.as_str(), &entry.id)
            .await?;
        Ok(Response::new(entry_to_proto(&entry)))
    }

    async fn get_entry(
        &self,
        req: Request<admin::GetEntryRequest>,
    ) -> Result<Response<types::Entry>, Status> {
        let id = req.into_inner().id;
        let e = self
            .core
            .entries
            .get(required("id", &id)?)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("entry {id} not found")))?;
        Ok(Response::new(entry_to_proto(&e)))
    }

    async fn list_entries(
        &self,
        req: Request<admin::ListEntriesRequest>,
    ) -> Result<Response<admin::ListEntriesResponse>, Status> {
        let r = req.into_inner();
        let parent = (!r.parent_id.is_empty()).then_some(r.parent_id.as_str());
        let id = (!r.spiffe_id.is_empty()).then_some(r.spiffe_id.as_str());
        let entries = self.core.entries.list(parent, id).await?;
        Ok(Response::new(admin::ListEntriesResponse {
            entries: entries.iter().map(entry_to_proto).collect(),
        }))
    }

    async fn update_entry(
        &self,
        req: Request<admin::UpdateEntryRequest>,
    ) -> Result<Response<types::Entry>, Status> {
        let r = req.into_inner();
        let spec = r
            .spec
            .map(spec_from_proto)
            .ok_or_else(|| ApiError::InvalidArgument("spec is required".into()))?;
        let e = self
            .core
            .entries
            .update(required("id", &r.id)?, &spec, r.expected_revision)
            .await?;
        self.audit("entry-update", e.spiffe_id.as_str(), &e.id)
            .await?;
        Ok(Response::new(entry_to_proto(&e)))
    }

    async fn delete_entry(
        &self,
        req: Request<admin::DeleteEntryRequest>,
    ) -> Result<Response<admin::DeleteEntryResponse>, Status> {
        let id = req.into_inner().id;
        let e = self.core.entries.delete(required("id", &id)?).await?;
        self.audit("entry-delete", e.spiffe_id.as_str(), &e.id)
            .await?;
        Ok(Response::new(admin::DeleteEntryResponse {}))
    }

    async fn list_agents(
        &self,
        _req: Request<admin::ListAgentsRequest>,
    ) -> Result<Response<admin::ListAgentsResponse>, Status> {
        let agents = self.core.agents.list().await?;
        Ok(Response::new(admin::ListAgentsResponse {
            agents: agents
                .into_iter()
                .map(|a| admin::Agent {
                    spiffe_id: a.id.to_string(),
                    attestation_type: a.attestation_type,
                    selectors: a.selectors,
                    serial: a.serial,
                    expires_at: a.expires_at,
                    attested_at: a.attested_at,
                    evicted: a.evicted,
                })
                .collect(),
        }))
    }

    async fn evict_agent(
        &self,
        req: Request<admin::EvictAgentRequest>,
    ) -> Result<Response<admin::EvictAgentResponse>, Status> {
        let raw = req.into_inner().spiffe_id;
        let id = SpiffeId::new(required("spiffe_id", &raw)?)
            .map_err(|e| ApiError::InvalidArgument(format!("spiffe_id {raw:?}: {e}")))?;
        self.core.agents.evict(&id).await?;
        self.audit("evict", id.as_str(), "").await?;
        tracing::info!(agent = %id, "agent evicted");
        Ok(Response::new(admin::EvictAgentResponse {}))
    }

    async fn put_policies(
        &self,
        req: Request<admin::PutPoliciesRequest>,
    ) -> Result<Response<admin::PutPoliciesResponse>, Status> {
        let policies = req
            .into_inner()
            .policies
            .iter()
            .map(ward_proto::convert::policy_from_proto)
            .collect::<Result<Vec<_>, _>>()
            .map_err(ApiError::InvalidArgument)?;
        for p in &policies {
            reserved_policy(&p.name)?;
        }
        let stored = self.core.policies.put(policies).await?;
        for r in &stored {
            self.audit("policy-put", &r.policy.name, "").await?;
        }
        Ok(Response::new(admin::PutPoliciesResponse {
            policies: stored
                .iter()
                .map(|r| ward_proto::convert::policy_to_proto(&r.policy, r.revision))
                .collect(),
        }))
    }

    async fn put_services(
        &self,
        req: Request<admin::PutServicesRequest>,
    ) -> Result<Response<admin::PutServicesResponse>, Status> {
        let services = req
            .into_inner()
            .services
            .iter()
            .map(ward_proto::convert::service_from_proto)
            .collect::<Result<Vec<_>, _>>()
            .map_err(ApiError::InvalidArgument)?;
        if services.is_empty() {
            return Err(ApiError::InvalidArgument("no services given".into()).into());
        }
        let ops = services
            .into_iter()
            .map(crate::services::ServiceOp::Put)
            .collect();
        let stored = self.core.services.write(ops, "admin").await?;
        for r in &stored {
            self.audit("service-put", &r.service.name, "").await?;
        }
        Ok(Response::new(admin::PutServicesResponse {
            services: stored.iter().map(service_msg).collect(),
        }))
    }

    async fn put_egress(
        &self,
        req: Request<ward_proto::types::EgressConfig>,
    ) -> Result<Response<ward_proto::types::EgressConfig>, Status> {
        let doc = ward_proto::convert::egress_from_proto(&req.into_inner())
            .map_err(ApiError::InvalidArgument)?;
        let rec = self.core.egress.put(doc).await?;
        self.audit(
            "egress-put",
            "egress",
            &format!("revision {}", rec.revision),
        )
        .await?;
        Ok(Response::new(ward_proto::convert::egress_to_proto(
            &rec.doc,
            rec.revision,
        )))
    }

    async fn get_egress(
        &self,
        _req: Request<admin::GetEgressRequest>,
    ) -> Result<Response<ward_proto::types::EgressConfig>, Status> {
        let rec = self.core.egress.get().await?;
        Ok(Response::new(ward_proto::convert::egress_to_proto(
            &rec.doc,
            rec.revision,
        )))
    }

    async fn explain_egress(
        &self,
        req: Request<admin::ExplainEgressRequest>,
    ) -> Result<Response<admin::ExplainEgressResponse>, Status> {
        use ward_spiffe::egress::{Ask, Reach, Seen};
        let r = req.into_inner();
        let inv = |m: String| ApiError::InvalidArgument(m);
        let source = if r.source.is_empty() {
            None
        } else {
            Some(SpiffeId::new(&r.source).map_err(|e| inv(format!("source: {e}")))?)
        };
        let port = u16::try_from(r.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| inv(format!("port {} is not a port", r.port)))?;
        let dialled: std::net::IpAddr = if r.address.is_empty() {
            std::net::Ipv4Addr::UNSPECIFIED.into()
        } else {
            r.address
                .parse()
                .map_err(|_| inv(format!("address {:?} is not an IP address", r.address)))?
        };
        let host = (!r.host.is_empty()).then_some(r.host.as_str());
        let seen = match r.protocol.as_str() {
            "" | "tls" => Seen::Tls(host),
            "http" => Seen::Http(host),
            "tcp" => Seen::Tcp,
            other => {
                return Err(inv(format!("protocol {other:?} is not tls, http or tcp")).into());
            }
        };
        let d = self.core.egress.set().await?.decide(&Ask {
            source: source.as_ref(),
            seen,
            dialled,
            port,
        });
        Ok(Response::new(admin::ExplainEgressResponse {
            allowed: d.allowed,
            service: d.service.unwrap_or_default(),
            reason: d.reason,
            resolves: match d.reach {
                Reach::Name(n) if d.allowed => n,
                _ => String::new(),
            },
        }))
    }

    async fn list_services(
        &self,
        _req: Request<admin::ListServicesRequest>,
    ) -> Result<Response<admin::ListServicesResponse>, Status> {
        let all = self.core.services.list().await?;
        Ok(Response::new(admin::ListServicesResponse {
            services: all.iter().map(service_msg).collect(),
        }))
    }

    async fn delete_service(
        &self,
        req: Request<admin::DeleteServiceRequest>,
    ) -> Result<Response<admin::DeleteServiceResponse>, Status> {
        let name = req.into_inner().name;
        self.core.services.delete(&name, "admin").await?;
        self.audit("service-delete", &name, "").await?;
        Ok(Response::new(admin::DeleteServiceResponse {}))
    }

    async fn get_policy(
        &self,
        req: Request<admin::GetPolicyRequest>,
    ) -> Result<Response<types::AuthzPolicy>, Status> {
        let name = req.into_inner().name;
        let r = self
            .core
            .policies
            .get(required("name", &name)?)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("policy {name} not found")))?;
        Ok(Response::new(ward_proto::convert::policy_to_proto(
            &r.policy, r.revision,
        )))
    }

    async fn list_policies(
        &self,
        _req: Request<admin::ListPoliciesRequest>,
    ) -> Result<Response<admin::ListPoliciesResponse>, Status> {
        let list = self.core.policies.list().await?;
        Ok(Response::new(admin::ListPoliciesResponse {
            policies: list
                .iter()
                .map(|r| ward_proto::convert::policy_to_proto(&r.policy, r.revision))
                .collect(),
        }))
    }

    async fn delete_policy(
        &self,
        req: Request<admin::DeletePolicyRequest>,
    ) -> Result<Response<admin::DeletePolicyResponse>, Status> {
        let name = req.into_inner().name;
        reserved_policy(&name)?;
        self.core.policies.delete(required("name", &name)?).await?;
        self.audit("policy-delete", &name, "").await?;
        Ok(Response::new(admin::DeletePolicyResponse {}))
    }

    async fn explain_policy(
        &self,
        req: Request<admin::ExplainPolicyRequest>,
    ) -> Result<Response<admin::ExplainPolicyResponse>, Status> {
        use ward_spiffe::policy::{DefaultPolicy, Request as AuthzRequest, path::normalize};
        let r = req.into_inner();
        let inv = |m: String| ApiError::InvalidArgument(m);
        let source = if r.source.is_empty() {
            None
        } else {
            Some(SpiffeId::new(&r.source).map_err(|e| inv(format!("source: {e}")))?)
        };
        let target = SpiffeId::new(required("target", &r.target)?)
            .map_err(|e| inv(format!("target: {e}")))?;
        let default = match r.default_policy.as_str() {
            "" | "deny" => DefaultPolicy::Deny,
            "all-authenticated" => DefaultPolicy::AllAuthenticated,
            "same-trust-domain" => DefaultPolicy::SameTrustDomain,
            "all-unauthenticated" => DefaultPolicy::AllUnauthenticated,
            other => return Err(inv(format!("default_policy {other:?} is not one of deny, all-authenticated, same-trust-domain, all-unauthenticated")).into()),
        };
        let port = u16::try_from(r.port).map_err(|_| inv("port out of range".into()))?;
        let (method, path) = if r.method.is_empty() && r.path.is_empty() {
            (None, None)
        } else {
            let p = if r.path.is_empty() {
                "/".to_owned()
            } else {
                r.path.clone()
            };
            match normalize(&p) {
                Ok(p) => (
                    Some(if r.method.is_empty() {
                        "GET".to_owned()
                    } else {
                        r.method.clone()
                    }),
                    Some(p),
                ),
                Err(e) => {
                    return Ok(Response::new(admin::ExplainPolicyResponse {
                        allowed: false,
                        reason: format!("ambiguous request path: {e}"),
                        policy: String::new(),
                        rule: -1,
                        audit: String::new(),
                        text: format!("decision: DENY\nreason:   ambiguous request path: {e}\n"),
                    }));
                }
            }
        };
        let set = self.core.policies.set().await?;
        let e = set.explain(
            &AuthzRequest {
                source: source.as_ref(),
                target: &target,
                method: method.as_deref(),
                path: path.as_deref(),
                port,
            },
            default,
        );
        Ok(Response::new(admin::ExplainPolicyResponse {
            allowed: e.verdict.allowed,
            reason: e.verdict.describe(),
            policy: e.verdict.policy.as_deref().unwrap_or_default().to_owned(),
            rule: e.verdict.rule.map_or(-1, |r| r as i32),
            audit: e.verdict.audit.as_deref().unwrap_or_default().to_owned(),
            text: e.to_string(),
        }))
    }

    async fn get_bundle(
        &self,
        _req: Request<admin::GetBundleRequest>,
    ) -> Result<Response<types::Bundle>, Status> {
        Ok(Response::new(bundle_to_proto(&self.core.bundle())))
    }

    async fn list_authorities(
        &self,
        req: Request<admin::ListAuthoritiesRequest>,
    ) -> Result<Response<admin::ListAuthoritiesResponse>, Status> {
        let kind = Kind::parse(&req.into_inner().kind)?;
        let authorities = self
            .core
            .authorities
            .show(kind)
            .await?
            .into_iter()
            .map(|(v, live)| authority_to_proto(kind, &v, live))
            .collect();
        Ok(Response::new(admin::ListAuthoritiesResponse {
            authorities,
        }))
    }

    async fn change_authority(
        &self,
        req: Request<admin::ChangeAuthorityRequest>,
    ) -> Result<Response<admin::Authority>, Status> {
        let r = req.into_inner();
        let kind = Kind::parse(&r.kind)?;
        let id = || required("id", &r.id).map(str::to_owned);
        let op = match r.action.as_str() {
            "prepare" => Op::Prepare,
            "activate" => Op::Activate((!r.id.is_empty()).then(|| r.id.clone())),
            "taint" => Op::Taint(id()?),
            "revoke" => Op::Revoke(id()?),
            other => {
                return Err(ApiError::InvalidArgument(format!(
                    "action {other:?}: expected prepare, activate, taint or revoke"
                ))
                .into());
            }
        };
        let v = self.core.authorities.operate(kind, op, r.force).await?;
        self.core.update_gauges();
        let live = self.core.authorities.live(kind, &v).await?;
        Ok(Response::new(authority_to_proto(kind, &v, live)))
    }
}
