//! The discover stage: what an authority (`service:port`, or a virtual IP and port) resolves
//! to, from the agent's `Destinations` service. The proxy subscribes on first use of an
//! authority and keeps the answer current; unused subscriptions end after a while, so memory
//! follows the destinations this workload uses, not the size of the mesh.
//!
//! Endpoint state (latency estimate, failures) is kept across updates for endpoints that stay
//! listed; requests in flight on an endpoint that goes away finish on it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use ward_proto::agent::destination_update::Kind;
use ward_proto::agent::destinations_client::DestinationsClient;
use ward_spiffe::SpiffeId;

use crate::balance::EndpointState;

/// How long a request waits for the first answer about a new authority.
pub const FIRST_ANSWER: Duration = Duration::from_secs(2);
/// Subscriptions unused for this long are dropped.
const IDLE: Duration = Duration::from_secs(600);
/// At most this many authorities are followed at once.
const MAX_SUBSCRIPTIONS: usize = 4096;

/// A service's current endpoints.
#[derive(Debug)]
pub struct Destination {
    /// The service name.
    pub service: String,
    /// The endpoints.
    pub endpoints: Vec<Arc<EndpointState>>,
    /// Round-robin counter.
    pub turn: AtomicUsize,
    /// Retries allowed to this destination (shared across its updates).
    pub budget: Arc<tower::retry::budget::TpsBudget>,
    /// Routes attached to the service for this port.
    pub routes: RouteTable,
}

/// A destination's routes.
#[derive(Debug, Default)]
pub enum RouteTable {
    /// None: requests go to the service's endpoints.
    #[default]
    None,
    /// HTTP requests go where the matching rule says.
    Routes(std::sync::Arc<ward_spiffe::route::Routes>),
    /// The routes sent could not be used; HTTP requests are refused (500) rather than sent
    /// somewhere the routes did not say.
    Invalid(String),
}

impl RouteTable {
    fn from_proto(service: &str, m: &[ward_proto::types::HttpRoute]) -> Self {
        if m.is_empty() {
            return RouteTable::None;
        }
        let compiled = ward_proto::convert::routes_from_proto(m)
            .and_then(|r| ward_spiffe::route::Routes::compile(&r).map_err(|e| e.to_string()));
        match compiled {
            Ok(r) => RouteTable::Routes(std::sync::Arc::new(r)),
            Err(e) => {
                tracing::warn!(%service, error = %e, "routes from the agent cannot be used; requests to the service are refused");
                RouteTable::Invalid(format!("routes of {service} are invalid: {e}"))
            }
        }
    }
}

/// What an authority resolves to.
#[derive(Debug, Clone)]
pub enum Resolution {
    /// A service with endpoints.
    Endpoints(Arc<Destination>),
    /// The mesh knows no such service (not a mesh destination).
    NoSuchService,
    /// The service exists but has no endpoint ready.
    NoEndpoints(String),
}

struct Sub {
    rx: watch::Receiver<Option<Resolution>>,
    used: Instant,
    task: tokio::task::JoinHandle<()>,
}

/// The proxy's destination subscriptions.
pub struct Discovery {
    socket: PathBuf,
    own_id: Option<SpiffeId>,
    retries: crate::config::RetryCfg,
    metrics: crate::metrics::Metrics,
    subs: Mutex<HashMap<String, Sub>>,
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovery")
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        for s in self
            .subs
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            s.task.abort();
        }
    }
}

impl Discovery {
    /// Discovery through the agent socket at `socket`, as `own_id` (which of the workload's
    /// identities to present; default its first).
    pub fn new(
        socket: PathBuf,
        own_id: Option<SpiffeId>,
        retries: crate::config::RetryCfg,
        metrics: crate::metrics::Metrics,
    ) -> Self {
        Self {
            socket,
            own_id,
            retries,
            metrics,
            subs: Mutex::new(HashMap::new()),
        }
    }

    /// The current view of every destination followed, for the admin endpoint: its state,
    /// endpoints with what the balancer knows of them, and routes.
    pub fn view(&self) -> serde_json::Value {
        use serde_json::json;
        let now = Instant::now();
        let destinations: Vec<serde_json::Value> = self
            .followed()
            .into_iter()
            .map(|(authority, r)| match r {
                None => json!({ "authority": authority, "state": "waiting" }),
                Some(Resolution::NoSuchService) => {
                    json!({ "authority": authority, "state": "no_such_service" })
                }
                Some(Resolution::NoEndpoints(s)) => {
                    json!({ "authority": authority, "state": "no_endpoints", "service": s })
                }
                Some(Resolution::Endpoints(d)) => {
                    let endpoints: Vec<serde_json::Value> = d
                        .endpoints
                        .iter()
                        .map(|e| {
                            json!({
                                "address": e.addr_text,
                                "pod": e.pod,
                                "spiffe_ids": e.ids.iter().map(ToString::to_string).collect::<Vec<_>>(),
                                "ewma_ms": e.ewma_ns(now) / 1e6,
                                "in_flight": e.pending(),
                                "consecutive_failures": e.consecutive_failures(),
                                "ejected": e.ejected(now),
                                "draining": e.draining(),
                            })
                        })
                        .collect();
                    let routes = match &d.routes {
                        RouteTable::None => json!([]),
                        RouteTable::Invalid(why) => json!({ "invalid": why }),
                        RouteTable::Routes(r) => r
                            .rules()
                            .map(|c| {
                                json!({
                                    "rule": format!("{}#{}", c.route, c.index),
                                    "backends": c.rule.backends,
                                    "timeout_ms": c.rule.timeout.map(|t| t.as_millis() as u64),
                                })
                            })
                            .collect(),
                    };
                    json!({ "authority": authority, "state": "endpoints", "service": d.service,
                            "endpoints": endpoints, "routes": routes })
                }
            })
            .collect();
        json!({ "destinations": destinations })
    }

    /// Authorities followed now (tests, admin view).
    pub fn followed(&self) -> Vec<(String, Option<Resolution>)> {
        let subs = self.subs.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = subs
            .iter()
            .map(|(a, s)| (a.clone(), s.rx.borrow().clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// What `authority` resolves to, waiting up to [`FIRST_ANSWER`] for the first answer of a
    /// new subscription. `None`: no answer (the agent is unreachable).
    pub async fn resolve(&self, authority: &str) -> Option<Resolution> {
        let mut rx = {
            let mut subs = self.subs.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            if let Some(s) = subs.get_mut(authority) {
                s.used = now;
                s.rx.clone()
            } else {
                if subs.len() >= MAX_SUBSCRIPTIONS {
                    subs.retain(|_, s| {
                        let keep = now.duration_since(s.used) < IDLE;
                        if !keep {
                            s.task.abort();
                        }
                        keep
                    });
                }
                let (tx, rx) = watch::channel(None);
                let budget = Arc::new(tower::retry::budget::TpsBudget::new(
                    Duration::from_secs(10),
                    self.retries.min_per_second,
                    self.retries.budget_ratio,
                ));
                let task = tokio::spawn(follow(
                    self.socket.clone(),
                    authority.to_owned(),
                    self.own_id.clone(),
                    budget,
                    self.metrics.clone(),
                    tx,
                ));
                subs.insert(
                    authority.to_owned(),
                    Sub {
                        rx: rx.clone(),
                        used: now,
                        task,
                    },
                );
                rx
            }
        };
        if let Some(r) = rx.borrow().clone() {
            return Some(r);
        }
        let got = tokio::time::timeout(FIRST_ANSWER, rx.wait_for(Option::is_some)).await;
        got.ok()?.ok().and_then(|r| r.clone())
    }

    /// Drops subscriptions unused for a while (called periodically).
    pub fn sweep(&self) {
        let now = Instant::now();
        self.subs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, s| {
                let keep = now.duration_since(s.used) < IDLE;
                if !keep {
                    s.task.abort();
                }
                keep
            });
    }
}

/// Turns an update into a resolution, reusing the state of endpoints still listed; the
/// metric series of endpoints no longer listed are dropped.
fn convert(
    update: ward_proto::agent::DestinationUpdate,
    known: &mut HashMap<SocketAddr, Arc<EndpointState>>,
    budget: &Arc<tower::retry::budget::TpsBudget>,
    metrics: &crate::metrics::Metrics,
    service: &mut String,
) -> Resolution {
    let before: Vec<String> = known.values().map(|e| e.addr_text.clone()).collect();
    let r = convert_inner(update, known, budget);
    for gone in before
        .iter()
        .filter(|a| !known.values().any(|e| e.addr_text == **a))
    {
        metrics.forget_endpoint(service, gone);
    }
    if let Resolution::Endpoints(d) = &r {
        service.clone_from(&d.service);
    }
    r
}

fn convert_inner(
    update: ward_proto::agent::DestinationUpdate,
    known: &mut HashMap<SocketAddr, Arc<EndpointState>>,
    budget: &Arc<tower::retry::budget::TpsBudget>,
) -> Resolution {
    match update.kind {
        Some(Kind::Endpoints(e)) => {
            let now = Instant::now();
            // New endpoints start as good as the best endpoint that stays, so they get their
            // share at once instead of waiting for the default estimate to decay (the requests
            // in flight keep them from being flooded).
            let staying: Vec<f64> = e
                .endpoints
                .iter()
                .filter_map(|ep| ep.address.parse::<SocketAddr>().ok())
                .filter_map(|a| known.get(&a))
                .map(|s| s.ewma_ns(now))
                .collect();
            let initial = staying
                .iter()
                .copied()
                .reduce(f64::min)
                .map_or(crate::balance::DEFAULT_RTT, |ns| {
                    Duration::from_nanos(ns as u64)
                });
            let mut next = HashMap::new();
            let mut endpoints = Vec::new();
            for ep in e.endpoints {
                let Ok(addr) = ep.address.parse::<SocketAddr>() else {
                    tracing::warn!(address = %ep.address, "agent sent an endpoint that is not ip:port; ignored");
                    continue;
                };
                let ids: Vec<SpiffeId> = ep
                    .spiffe_ids
                    .iter()
                    .filter_map(|i| SpiffeId::new(i).ok())
                    .collect();
                if ids.is_empty() {
                    // An endpoint whose identity cannot be checked is never used.
                    continue;
                }
                let state = match known.get(&addr) {
                    Some(s) if s.ids == ids => s.clone(),
                    _ => Arc::new(EndpointState::new(
                        addr,
                        ids,
                        (!ep.pod.is_empty()).then_some(ep.pod),
                        now,
                        initial,
                    )),
                };
                state.set_draining(ep.draining);
                next.insert(addr, state.clone());
                endpoints.push(state);
            }
            *known = next;
            let routes = RouteTable::from_proto(&e.service, &e.routes);
            if endpoints.is_empty() && matches!(routes, RouteTable::None) {
                return Resolution::NoEndpoints(e.service);
            }
            Resolution::Endpoints(Arc::new(Destination {
                service: e.service,
                endpoints,
                turn: AtomicUsize::new(0),
                budget: budget.clone(),
                routes,
            }))
        }
        Some(Kind::NoEndpoints(n)) => {
            known.clear();
            match RouteTable::from_proto(&n.service, &n.routes) {
                // Routes may send requests elsewhere.
                routes @ (RouteTable::Routes(_) | RouteTable::Invalid(_)) => {
                    Resolution::Endpoints(Arc::new(Destination {
                        service: n.service,
                        endpoints: Vec::new(),
                        turn: AtomicUsize::new(0),
                        budget: budget.clone(),
                        routes,
                    }))
                }
                RouteTable::None => Resolution::NoEndpoints(n.service),
            }
        }
        Some(Kind::NoSuchService(_)) | None => {
            known.clear();
            Resolution::NoSuchService
        }
    }
}

/// Follows one authority until the subscription is dropped; reconnects with back-off and
/// keeps the last answer meanwhile.
async fn follow(
    socket: PathBuf,
    authority: String,
    own_id: Option<SpiffeId>,
    budget: Arc<tower::retry::budget::TpsBudget>,
    metrics: crate::metrics::Metrics,
    tx: watch::Sender<Option<Resolution>>,
) {
    let _ = own_id;
    let mut known = HashMap::new();
    let mut service = String::new();
    updates(&socket, &authority, |u| {
        let r = convert(u, &mut known, &budget, &metrics, &mut service);
        tx.send(Some(r)).is_ok()
    })
    .await;
}

/// Streams the agent's updates for `authority` to `on` until it returns `false`; reconnects
/// with back-off (up to 5 s) when the stream fails or ends.
pub async fn updates(
    socket: &std::path::Path,
    authority: &str,
    mut on: impl FnMut(ward_proto::agent::DestinationUpdate) -> bool,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut client = DestinationsClient::new(ward_net::process::unix_channel(socket));
        let mut req = tonic::Request::new(ward_proto::agent::GetDestinationRequest {
            authority: authority.to_owned(),
        });
        req.metadata_mut().insert(
            "workload.spiffe.io",
            tonic::metadata::MetadataValue::from_static("true"),
        );
        match client.get(req).await {
            Ok(resp) => {
                let mut stream = resp.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(u)) => {
                            backoff = Duration::from_millis(100);
                            if !on(u) {
                                return;
                            }
                        }
                        Ok(None) => break,
                        Err(s) => {
                            tracing::warn!(%authority, code = ?s.code(), error = %s.message(),
                                "destination stream failed");
                            break;
                        }
                    }
                }
            }
            Err(s) => {
                tracing::warn!(%authority, code = ?s.code(), error = %s.message(),
                    "cannot follow destination; retrying");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ward_proto::agent::{DestinationEndpoint, DestinationUpdate, Endpoints};

    fn update(addrs: &[(&str, &str, bool)]) -> DestinationUpdate {
        DestinationUpdate {
            kind: Some(Kind::Endpoints(Endpoints {
                service: "api.shop".into(),
                port: 80,
                endpoints: addrs
                    .iter()
                    .map(|(a, id, d)| DestinationEndpoint {
                        address: (*a).into(),
                        spiffe_ids: if id.is_empty() {
                            vec![]
                        } else {
                            vec![(*id).into()]
                        },
                        draining: *d,
                        pod: String::new(),
                    })
                    .collect(),
                routes: vec![],
            })),
        }
    }

    #[test]
    fn endpoint_state_survives_updates_and_unverifiable_endpoints_are_dropped() {
        let mut known = HashMap::new();
        let budget = Arc::new(tower::retry::budget::TpsBudget::default());
        let m = crate::metrics::Metrics::new();
        let mut svc = String::new();
        let Resolution::Endpoints(d1) = convert(
            update(&[
                ("10.0.0.1:80", "spiffe://t/a", false),
                ("10.0.0.2:80", "", false),
            ]),
            &mut known,
            &budget,
            &m,
            &mut svc,
        ) else {
            panic!()
        };
        assert_eq!(d1.endpoints.len(), 1, "no ID, never used");
        let first = d1.endpoints[0].clone();
        let Resolution::Endpoints(d2) = convert(
            update(&[
                ("10.0.0.1:80", "spiffe://t/a", true),
                ("10.0.0.3:80", "spiffe://t/a", false),
            ]),
            &mut known,
            &budget,
            &m,
            &mut svc,
        ) else {
            panic!()
        };
        assert!(
            Arc::ptr_eq(&first, &d2.endpoints[0]),
            "same endpoint, same state"
        );
        assert!(first.draining());
        // An endpoint gone from the list takes its metric series with it.
        let label = crate::metrics::EndpointLabel {
            service: "api.shop".into(),
            endpoint: "10.0.0.1:80".into(),
        };
        m.endpoint_ewma.get_or_create(&label).set(0.5);
        // Another ID at the same address is another endpoint.
        let Resolution::Endpoints(d3) = convert(
            update(&[("10.0.0.1:80", "spiffe://t/b", false)]),
            &mut known,
            &budget,
            &m,
            &mut svc,
        ) else {
            panic!()
        };
        assert!(!Arc::ptr_eq(&first, &d3.endpoints[0]));
        let _ = convert(update(&[]), &mut known, &budget, &m, &mut svc);
        assert!(
            !m.endpoint_ewma.remove(&label),
            "the series of a removed endpoint is dropped"
        );
        assert!(matches!(
            convert(update(&[]), &mut known, &budget, &m, &mut svc),
            Resolution::NoEndpoints(_)
        ));
        assert!(matches!(
            convert(
                DestinationUpdate { kind: None },
                &mut known,
                &budget,
                &m,
                &mut svc
            ),
            Resolution::NoSuchService
        ));
    }
}
