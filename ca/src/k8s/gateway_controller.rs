//! The Gateway side of the service controller: what the watchers saw of `GatewayClass` and
//! `Gateway` objects, the mesh service record of each of Ward's Gateways (its routes, see
//! [`super::gateways`]), and the status written back on Gateways and GatewayClasses.

use std::collections::{BTreeMap, HashMap};

use kube::Api;
use ward_spiffe::service::{Service, ServicePort};

use super::gateway::{Gateway, GatewayClass};
use super::gateways::{self, GatewayStatus, Gw};
use super::routes::{Gateways, RouteSet};

type Key = (String, String);

/// Classes and Gateways as last seen, and the status last written.
#[derive(Debug, Default)]
pub struct GatewayState {
    classes: BTreeMap<String, GatewayClass>,
    gateways: BTreeMap<Key, Gateway>,
    written: HashMap<Key, GatewayStatus>,
}

fn key(g: &Gateway) -> Option<Key> {
    Some((g.metadata.namespace.clone()?, g.metadata.name.clone()?))
}

impl GatewayState {
    /// Records a GatewayClass seen (`up`) or deleted.
    pub fn class(&mut self, c: GatewayClass, up: bool) {
        let Some(name) = c.metadata.name.clone() else {
            return;
        };
        if up {
            self.classes.insert(name, c);
        } else {
            self.classes.remove(&name);
        }
    }

    /// Records a Gateway seen (`up`) or deleted.
    pub fn gateway(&mut self, g: Gateway, up: bool) {
        let Some(k) = key(&g) else { return };
        if up {
            self.gateways.insert(k, g);
        } else {
            self.written.remove(&k);
            self.gateways.remove(&k);
        }
    }

    /// Ward's Gateways: those whose class is one of Ward's.
    pub fn ours(&self) -> Gateways {
        self.gateways
            .iter()
            .filter(|(_, g)| {
                self.classes
                    .get(&g.spec.gateway_class_name)
                    .is_some_and(gateways::is_ours)
            })
            .filter_map(|(k, g)| Some((k.clone(), gateways::read(g)?)))
            .collect()
    }

    /// The record of each of Ward's Gateways that has a listener to serve, with its listeners'
    /// attached route counts.
    pub fn records(routes: &mut RouteSet, ours: &Gateways) -> Vec<(Gw, Option<Service>, Vec<i32>)> {
        ours.values()
            .map(|g| {
                let (rs, attached) = routes.for_gateway(g);
                let mut ports: Vec<ServicePort> = Vec::new();
                for l in g.listeners.iter().filter(|l| l.usable()) {
                    if !ports.iter().any(|p| p.port == l.port) {
                        ports.push(ServicePort {
                            name: l.name.clone(),
                            port: l.port,
                            target_port: None,
                        });
                    }
                }
                let record = (!ports.is_empty()).then(|| Service {
                    name: gateways::record_name(&g.namespace, &g.name),
                    addresses: Vec::new(),
                    ports,
                    endpoints: Vec::new(),
                    // Routes attach only to usable listeners, so each port is one of these.
                    routes: rs,
                });
                (g.clone(), record, attached)
            })
            .collect()
    }

    /// Writes the status of Ward's GatewayClasses and of the Gateways in `records` where it
    /// changed.
    pub async fn write_statuses(
        &mut self,
        client: &kube::Client,
        records: &[(Gw, Option<Service>, Vec<i32>)],
        now: &str,
    ) {
        let pp = kube::api::PatchParams::default();
        for c in self.classes.values().filter(|c| gateways::is_ours(c)) {
            let (Some(name), Some(status)) = (&c.metadata.name, gateways::class_status(c, now))
            else {
                continue;
            };
            let patch = serde_json::json!({ "status": status });
            if let Err(e) = Api::<GatewayClass>::all(client.clone())
                .patch_status(name, &pp, &kube::api::Patch::Merge(&patch))
                .await
            {
                tracing::warn!(gatewayclass = %name, error = %e, "cannot write GatewayClass status; will retry on the next change");
            }
        }
        for (g, _, attached) in records {
            let k = (g.namespace.clone(), g.name.clone());
            let status = gateways::status(g, attached, now);
            let seen = self.gateways.get(&k).map(gateways::current_status);
            if self.written.get(&k) == Some(&untimed(&status)) || seen.as_ref() == Some(&status) {
                continue;
            }
            let patch = serde_json::json!({ "status": status });
            match Api::<Gateway>::namespaced(client.clone(), &g.namespace)
                .patch_status(&g.name, &pp, &kube::api::Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    self.written.insert(k, untimed(&status));
                }
                Err(e) => {
                    tracing::warn!(gateway = %format!("{}/{}", g.namespace, g.name), error = %e,
                        "cannot write Gateway status; will retry on the next change");
                }
            }
        }
    }
}

/// `s` without transition times, to tell a status already written from a new one while the
/// watch has not yet brought back the written one.
fn untimed(s: &GatewayStatus) -> GatewayStatus {
    let mut s = s.clone();
    for c in s
        .conditions
        .iter_mut()
        .chain(s.listeners.iter_mut().flat_map(|l| l.conditions.iter_mut()))
    {
        c.last_transition_time.clear();
    }
    s
}
