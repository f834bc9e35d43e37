//! Ward's `Destinations` service on the agent socket: a local proxy asks what an authority
//! (`name:port` or `virtual IP:port`) resolves to and gets the endpoints — each with the SPIFFE
//! IDs it must present — at once and again on every change. It subscribes only to what it
//! uses, so a sidecar's memory and traffic do not grow with the mesh. Callers are identified
//! exactly as on the Workload API.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tonic::{Request, Response, Status};
use ward_proto::agent::destination_update::Kind;
use ward_proto::agent::destinations_server::Destinations;
use ward_proto::agent::{
    DestinationEndpoint, DestinationUpdate, Endpoints, GetDestinationRequest, NoEndpoints,
    NoSuchService,
};
use ward_proto::convert::routes_to_proto;
use ward_spiffe::service::{Service, resolve};

use crate::workload::WorkloadApi;

/// The services the agent holds, by name and by virtual address.
#[derive(Debug, Clone, Default)]
pub struct ServiceIndex {
    by_name: HashMap<String, Arc<Service>>,
    by_addr: HashMap<IpAddr, String>,
}

impl ServiceIndex {
    /// Replaces or adds services and removes names; rebuilds the address index.
    pub fn apply(&mut self, full: bool, upserted: Vec<Service>, removed: &[String]) {
        if full {
            self.by_name.clear();
        }
        for s in upserted {
            self.by_name.insert(s.name.clone(), Arc::new(s));
        }
        for n in removed {
            self.by_name.remove(n);
        }
        self.by_addr = self
            .by_name
            .values()
            .flat_map(|s| s.addresses.iter().map(|a| (*a, s.name.clone())))
            .collect();
    }

    /// How many services.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// The service `host` names: a virtual address, the service name, or the name with a
    /// `.svc[.<domain>]` suffix.
    pub fn find(&self, host: &str) -> Option<&Arc<Service>> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = host.parse::<IpAddr>() {
            return self.by_addr.get(&ip).and_then(|n| self.by_name.get(n));
        }
        let host = host.trim_end_matches('.');
        if let Some(s) = self.by_name.get(host) {
            return Some(s);
        }
        let base = host.split_once(".svc").map(|(b, _)| b)?;
        self.by_name.get(base).filter(|s| s.named(host))
    }
}

/// Splits `host:port` (IPv6 in brackets).
fn split_authority(a: &str) -> Option<(&str, u16)> {
    let (host, port) = a.rsplit_once(':')?;
    if host.is_empty() || (host.contains(':') && !host.starts_with('[')) {
        return None;
    }
    Some((host, port.parse().ok()?))
}

/// What `authority` resolves to in `index`. Pure.
pub fn answer(index: &ServiceIndex, authority: &str) -> DestinationUpdate {
    let kind = match split_authority(authority)
        .and_then(|(host, port)| index.find(host).map(|s| (s, port)))
    {
        None => Kind::NoSuchService(NoSuchService {}),
        Some((svc, port)) => match resolve(svc, port) {
            None => Kind::NoSuchService(NoSuchService {}),
            Some(targets) if targets.is_empty() => Kind::NoEndpoints(NoEndpoints {
                service: svc.name.clone(),
                routes: routes_to_proto(&svc.routes_for(port)),
            }),
            Some(targets) => Kind::Endpoints(Endpoints {
                service: svc.name.clone(),
                port: u32::from(port),
                routes: routes_to_proto(&svc.routes_for(port)),
                endpoints: targets
                    .into_iter()
                    .map(|t| DestinationEndpoint {
                        address: t.addr.to_string(),
                        spiffe_ids: t.ids.iter().map(ToString::to_string).collect(),
                        draining: t.draining,
                        pod: t.pod.unwrap_or_default(),
                    })
                    .collect(),
            }),
        },
    };
    DestinationUpdate { kind: Some(kind) }
}

/// The service; it shares the Workload API's caller attestation.
#[derive(Debug, Clone)]
pub struct DestinationService {
    api: WorkloadApi,
}

impl DestinationService {
    /// A service answering from the same cache as `api`.
    pub fn new(api: WorkloadApi) -> Self {
        Self { api }
    }
}

#[tonic::async_trait]
impl Destinations for DestinationService {
    type GetStream = Pin<Box<dyn Stream<Item = Result<DestinationUpdate, Status>> + Send>>;

    async fn get(
        &self,
        req: Request<GetDestinationRequest>,
    ) -> Result<Response<Self::GetStream>, Status> {
        let r = async {
            // Any workload with an identity may look up destinations (as it may dial them).
            let selectors = self.api.caller(&req).await?;
            let snap = self.api.synced()?;
            if snap.matching(&selectors).is_empty() {
                return Err(crate::workload::no_identity());
            }
            let authority = req.into_inner().authority;
            if split_authority(&authority).is_none() {
                return Err(Status::invalid_argument(format!(
                    "authority {authority:?} is not host:port"
                )));
            }
            let stream = self.api.watch(&selectors.clone(), move |snap| {
                Ok(Some(answer(&snap.services, &authority)))
            })?;
            Ok(Response::new(Box::pin(stream) as Self::GetStream))
        }
        .await;
        self.api.metrics.call(
            "GetDestination",
            r.as_ref().map_or_else(Status::code, |_| tonic::Code::Ok),
        );
        r
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn index() -> ServiceIndex {
        let svc: Service = serde_json::from_value(serde_json::json!({
            "name": "api.shop", "addresses": ["10.96.0.10", "fd00::10"],
            "ports": [ { "name": "http", "port": 80, "target_port": 8080 } ],
            "endpoints": [
                { "address": "10.0.0.1", "ids": ["spiffe://t/api"] },
                { "address": "10.0.0.2", "ids": ["spiffe://t/api"], "ready": false, "serving": true, "terminating": true }
            ]
        }))
        .unwrap();
        let empty: Service = serde_json::from_value(serde_json::json!({
            "name": "db.shop", "ports": [ { "port": 5432 } ], "endpoints": []
        }))
        .unwrap();
        let mut i = ServiceIndex::default();
        i.apply(true, vec![svc, empty], &[]);
        i
    }

    fn kind(u: DestinationUpdate) -> Kind {
        u.kind.unwrap()
    }

    #[test]
    fn answers_by_name_address_and_port() {
        let i = index();
        for a in [
            "api.shop:80",
            "api.shop.svc:80",
            "api.shop.svc.cluster.local:80",
            "10.96.0.10:80",
            "[fd00::10]:80",
        ] {
            let Kind::Endpoints(e) = kind(answer(&i, a)) else {
                panic!("{a}")
            };
            assert_eq!(e.service, "api.shop");
            let got: Vec<(&str, bool)> = e
                .endpoints
                .iter()
                .map(|e| (e.address.as_str(), e.draining))
                .collect();
            assert_eq!(
                got,
                [("10.0.0.1:8080", false), ("10.0.0.2:8080", true)],
                "{a}"
            );
        }
        for a in [
            "api.shop:81",
            "web.shop:80",
            "10.96.0.11:80",
            "api.shopx:80",
        ] {
            assert!(matches!(kind(answer(&i, a)), Kind::NoSuchService(_)), "{a}");
        }
        assert!(matches!(
            kind(answer(&i, "db.shop:5432")),
            Kind::NoEndpoints(_)
        ));
        // Removal and full replacement.
        let mut i = i;
        i.apply(false, vec![], &["api.shop".into()]);
        assert!(matches!(
            kind(answer(&i, "10.96.0.10:80")),
            Kind::NoSuchService(_)
        ));
        assert_eq!(i.len(), 1);
        i.apply(true, vec![], &[]);
        assert!(i.is_empty());
        assert!(split_authority("fd00::1:80").is_none());
    }
}
