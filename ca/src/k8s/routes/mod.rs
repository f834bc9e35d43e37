//! Mesh routes from the Gateway API (GAMMA): an `HTTPRoute` or `GRPCRoute` whose parent is a
//! Service becomes routes of that mesh service. [`translate_http`] and [`translate_grpc`] are
//! the pure steps from a route to Ward's rules; [`RouteSet`] keeps the routes the watchers saw,
//! gives each Service its routes in the Gateway API's order (oldest first, then by
//! namespace/name), and says what each route's status should be.
//!
//! Status is reported per parent, as controller `ward.dev/mesh`: `Accepted` (or why not:
//! `UnsupportedValue`, `NoMatchingParent`) and `ResolvedRefs` (or `BackendNotFound`,
//! `RefNotPermitted`, `InvalidKind`). A route that was accepted and then changed into one
//! that is not keeps its last accepted rules in force until it is fixed or deleted.
//!
//! Supported: producer routes (the route in its Service's namespace); path, header, query and
//! method matches; header modifiers, redirects, URL rewrites; request and backend timeouts;
//! weighted Service backends in the route's namespace. Not supported (the route is not
//! accepted, with the reason): consumer routes in other namespaces, mirrors, extension refs,
//! per-backend filters.

use std::collections::{BTreeMap, HashMap};

use ward_spiffe::route::{HttpRoute, Routes, Rule};

use super::gateway::{Condition, ParentRef, RouteParentStatus, RouteStatus};
use super::gateways::{CONTROLLER as GATEWAY_CONTROLLER, From, Gw, Listener, intersect};

/// The controller name in route status.
pub const CONTROLLER: &str = "ward.dev/mesh";

/// Which kind of route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `HTTPRoute`.
    Http,
    /// `GRPCRoute`.
    Grpc,
}

impl Kind {
    /// The name used in route names and logs.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Http => "httproute",
            Kind::Grpc => "grpcroute",
        }
    }
}

/// A condition's reason and message when it is not `True`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Why {
    /// CamelCase reason.
    pub reason: &'static str,
    /// Human message.
    pub message: String,
}

fn unsupported(message: String) -> Why {
    Why {
        reason: "UnsupportedValue",
        message,
    }
}

/// A route translated: its rules, and problems with its backends (which do not stop it from
/// being accepted; the requests meant for such a backend are answered 500).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Translated {
    /// The rules.
    pub rules: Vec<Rule>,
    /// Backend problems, for `ResolvedRefs`.
    pub backend_problems: Vec<Why>,
    /// Backend Services named (`<name>.<namespace>`), to check they exist.
    pub backends: Vec<String>,
}

mod translate;

pub use translate::{parents, status, translate_grpc, translate_http};

/// `(namespace, name)` of a Service.
pub type ServiceKey = (String, String);

/// One route as the watchers last saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Its kind.
    pub kind: Kind,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// `metadata.creationTimestamp` (RFC 3339, so it sorts).
    pub created: String,
    /// Its parent refs.
    pub parents: Vec<ParentRef>,
    /// Its hostnames (used with Gateway parents).
    pub hostnames: Vec<String>,
    /// The translation, or why it was refused.
    pub translated: Result<Translated, Why>,
    /// Its status as last seen.
    pub status: RouteStatus,
}

impl Seen {
    /// The route's key.
    pub fn key(&self) -> RouteKey {
        (self.kind, self.namespace.clone(), self.name.clone())
    }

    /// The Services this route names as parents (whether it may attach or not).
    pub fn parent_services(&self) -> Vec<ServiceKey> {
        self.parents
            .iter()
            .filter(|p| is_service(p))
            .map(|p| {
                (
                    p.namespace
                        .clone()
                        .unwrap_or_else(|| self.namespace.clone()),
                    p.name.clone(),
                )
            })
            .collect()
    }
}

fn is_gateway(p: &ParentRef) -> bool {
    p.group
        .as_deref()
        .is_none_or(|g| g == super::gateway::GROUP)
        && p.kind.as_deref().is_none_or(|k| k == "Gateway")
}

/// Ward's Gateways by `(namespace, name)`.
pub type Gateways = BTreeMap<(String, String), Gw>;

fn is_service(p: &ParentRef) -> bool {
    matches!(p.group.as_deref(), Some("") | Some("core")) && p.kind.as_deref() == Some("Service")
}

/// `(kind, namespace, name)` of a route.
pub type RouteKey = (Kind, String, String);

/// What the controller knows about a Service, for attaching routes.
pub trait Services {
    /// The Service's ports, if it exists.
    fn ports(&self, key: &ServiceKey) -> Option<Vec<u16>>;
}

impl Services for HashMap<ServiceKey, Vec<u16>> {
    fn ports(&self, key: &ServiceKey) -> Option<Vec<u16>> {
        self.get(key).cloned()
    }
}

/// The routes the watchers saw, and the last accepted rules of each.
#[derive(Debug, Default)]
pub struct RouteSet {
    routes: BTreeMap<RouteKey, Seen>,
    last_good: HashMap<RouteKey, Vec<Rule>>,
}

/// A route's outcome for one parent.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ParentOutcome {
    accepted: Result<(), Why>,
    resolved: Result<(), Why>,
}

impl RouteSet {
    /// Records a route seen (`Some`) or deleted (`None`); returns the Services whose routes
    /// may have changed.
    pub fn apply(&mut self, key: RouteKey, seen: Option<Seen>) -> Vec<ServiceKey> {
        let mut touched = self
            .routes
            .get(&key)
            .map(Seen::parent_services)
            .unwrap_or_default();
        match seen {
            Some(s) => {
                touched.extend(s.parent_services());
                self.routes.insert(key, s);
            }
            None => {
                self.routes.remove(&key);
                self.last_good.remove(&key);
            }
        }
        touched
    }

    /// Records the status just written for `key`.
    pub fn set_status(&mut self, key: &RouteKey, status: RouteStatus) {
        if let Some(r) = self.routes.get_mut(key) {
            r.status = status;
        }
    }

    /// Whether the backends of `route` resolve.
    fn resolved(route: &Seen, services: &dyn Services) -> Result<(), Why> {
        match &route.translated {
            Err(_) => Ok(()),
            Ok(t) => match t.backend_problems.first() {
                Some(w) => Err(w.clone()),
                None => match t.backends.iter().find(|b| {
                    let (name, bns) = b.rsplit_once('.').unwrap_or((b, ""));
                    services.ports(&(bns.to_owned(), name.to_owned())).is_none()
                }) {
                    Some(b) => Err(Why {
                        reason: "BackendNotFound",
                        message: format!("backend Service {b} does not exist"),
                    }),
                    None => Ok(()),
                },
            },
        }
    }

    /// Whether `route`'s rules are valid (what `Accepted` says beyond the parent).
    fn valid(route: &Seen) -> Result<(), Why> {
        match &route.translated {
            Err(w) => Err(w.clone()),
            Ok(t) => Routes::compile(&[HttpRoute {
                name: String::new(),
                port: None,
                hostnames: Vec::new(),
                rules: t.rules.clone(),
            }])
            .map(|_| ())
            .map_err(|e| unsupported(e.why)),
        }
    }

    /// The listeners of `g` that `route` attaches to through parent `p`, with the hostnames
    /// it serves on each, or why none.
    fn listeners(route: &Seen, p: &ParentRef, g: &Gw) -> Result<Vec<(usize, Vec<String>)>, Why> {
        let named: Vec<(usize, &Listener)> = g
            .listeners
            .iter()
            .enumerate()
            .filter(|(_, l)| p.section_name.as_ref().is_none_or(|s| *s == l.name))
            .filter(|(_, l)| p.port.is_none_or(|x| x == i32::from(l.port)))
            .collect();
        if named.is_empty() {
            return Err(Why {
                reason: "NoMatchingParent",
                message: format!(
                    "Gateway {}/{} has no listener{}{}",
                    g.namespace,
                    g.name,
                    p.section_name
                        .as_ref()
                        .map(|s| format!(" named {s}"))
                        .unwrap_or_default(),
                    p.port.map(|x| format!(" on port {x}")).unwrap_or_default()
                ),
            });
        }
        let mut out = Vec::new();
        let mut why = None;
        for (i, l) in named {
            let refusal = if !l.usable() {
                Some((
                    "NotAllowedByListeners",
                    format!("listener {} cannot be served", l.name),
                ))
            } else if !l.kinds.contains(&route.kind) {
                Some((
                    "NotAllowedByListeners",
                    format!("listener {} does not take {}s", l.name, route.kind.label()),
                ))
            } else if match l.from {
                From::Same => route.namespace != g.namespace,
                From::All => false,
                From::Selector => true,
            } {
                Some((
                    "NotAllowedByListeners",
                    format!(
                        "listener {} does not take routes from namespace {}{}",
                        l.name,
                        route.namespace,
                        if l.from == From::Selector {
                            " (namespace selectors are not supported)"
                        } else {
                            ""
                        }
                    ),
                ))
            } else {
                match intersect(l.hostname.as_deref(), &route.hostnames) {
                    Some(h) => {
                        out.push((i, h));
                        None
                    }
                    None => Some((
                        "NoMatchingListenerHostname",
                        format!(
                            "listener {} serves {}, which none of the route's hostnames match",
                            l.name,
                            l.hostname.as_deref().unwrap_or_default()
                        ),
                    )),
                }
            };
            if let Some((reason, message)) = refusal {
                // A hostname mismatch says more than a refusal by another listener.
                if why.is_none() || reason == "NoMatchingListenerHostname" {
                    why = Some(Why { reason, message });
                }
            }
        }
        if out.is_empty() {
            return Err(why.unwrap_or(Why {
                reason: "NotAllowedByListeners",
                message: "no listener takes the route".into(),
            }));
        }
        Ok(out)
    }

    /// The outcome of `route` for Gateway parent `p` (Gateway `g`).
    fn gateway_outcome(
        route: &Seen,
        p: &ParentRef,
        g: &Gw,
        services: &dyn Services,
    ) -> ParentOutcome {
        let accepted = Self::listeners(route, p, g).and_then(|_| Self::valid(route));
        ParentOutcome {
            accepted,
            resolved: Self::resolved(route, services),
        }
    }

    /// The outcome of `route` for parent `p`.
    fn outcome(&self, route: &Seen, p: &ParentRef, services: &dyn Services) -> ParentOutcome {
        let ns = p
            .namespace
            .clone()
            .unwrap_or_else(|| route.namespace.clone());
        let sk = (ns.clone(), p.name.clone());
        let accepted = if ns != route.namespace {
            Err(unsupported(format!(
                "Service {ns}/{} is in another namespace: consumer routes are not supported; put the route in namespace {ns}",
                p.name
            )))
        } else {
            match services.ports(&sk) {
                None => Err(Why {
                    reason: "NoMatchingParent",
                    message: format!("Service {ns}/{} does not exist", p.name),
                }),
                Some(ports) => match p.port {
                    Some(port) if !ports.iter().any(|x| i32::from(*x) == port) => Err(Why {
                        reason: "NoMatchingParent",
                        message: format!("Service {ns}/{} has no port {port}", p.name),
                    }),
                    _ => Self::valid(route),
                },
            }
        };
        let resolved = Self::resolved(route, services);
        ParentOutcome { accepted, resolved }
    }

    /// The routes of Service `svc`, in the order they apply on ties. Routes whose latest
    /// version is not accepted contribute their last accepted rules, if any. Also remembers
    /// what is accepted now.
    pub fn for_service(&mut self, svc: &ServiceKey, services: &dyn Services) -> Vec<HttpRoute> {
        let mut found = Vec::new();
        for (key, r) in &self.routes {
            for p in r.parents.iter().filter(|p| is_service(p)) {
                let ns = p.namespace.as_deref().unwrap_or(&r.namespace);
                if ns != svc.0 || p.name != svc.1 {
                    continue;
                }
                let o = self.outcome(r, p, services);
                let port = p.port.and_then(|x| u16::try_from(x).ok());
                found.push((key.clone(), o.accepted, vec![(port, Vec::new())]));
            }
        }
        self.attach(found).into_iter().map(|(r, _)| r).collect()
    }

    /// The routes of Gateway `g`, one per route and listener it attaches to (with that
    /// listener's port and the hostnames they have in common), in the order they apply on
    /// ties; and how many routes attach to each listener.
    pub fn for_gateway(&mut self, g: &Gw) -> (Vec<HttpRoute>, Vec<i32>) {
        let mut found = Vec::new();
        // The listeners each route (key) was matched to, for the counts.
        let mut matched: Vec<(RouteKey, usize)> = Vec::new();
        for (key, r) in &self.routes {
            for p in r.parents.iter().filter(|p| is_gateway(p)) {
                let ns = p.namespace.as_deref().unwrap_or(&r.namespace);
                if ns != g.namespace || p.name != g.name {
                    continue;
                }
                let (accepted, on) = match Self::listeners(r, p, g) {
                    Ok(on) => (Self::valid(r), on),
                    Err(w) => (Err(w), Vec::new()),
                };
                matched.extend(on.iter().map(|(i, _)| (key.clone(), *i)));
                let on = on
                    .into_iter()
                    .map(|(i, h)| (Some(g.listeners[i].port), h))
                    .collect();
                found.push((key.clone(), accepted, on));
            }
        }
        let routes = self.attach(found);
        let served: std::collections::HashSet<&RouteKey> = routes.iter().map(|(_, k)| k).collect();
        let mut counted = std::collections::HashSet::new();
        let mut attached = vec![0; g.listeners.len()];
        for (key, i) in &matched {
            if served.contains(key) && counted.insert((key, *i)) {
                attached[*i] += 1;
            }
        }
        (routes.into_iter().map(|(r, _)| r).collect(), attached)
    }

    /// The routes `found` (route, whether accepted, and where it goes: port and hostnames)
    /// as Ward's routes, oldest first. A route refused because it is wrong itself
    /// (`UnsupportedValue`) contributes its last accepted rules; accepted rules are
    /// remembered as the last good ones.
    #[allow(clippy::type_complexity)]
    fn attach(
        &mut self,
        found: Vec<(RouteKey, Result<(), Why>, Vec<(Option<u16>, Vec<String>)>)>,
    ) -> Vec<(HttpRoute, RouteKey)> {
        let mut attached = Vec::new();
        for (key, accepted, on) in found {
            let Some(r) = self.routes.get(&key) else {
                continue;
            };
            let rules = match (&accepted, &r.translated) {
                (Ok(()), Ok(t)) => Some((t.rules.clone(), true)),
                (Err(w), _) if w.reason == "UnsupportedValue" => {
                    self.last_good.get(&key).map(|g| (g.clone(), false))
                }
                _ => None,
            };
            let Some((rules, fresh)) = rules else {
                continue;
            };
            for (port, hostnames) in on {
                attached.push((
                    (r.created.clone(), r.namespace.clone(), r.name.clone()),
                    HttpRoute {
                        name: format!("{}/{}/{}", r.kind.label(), r.namespace, r.name),
                        port,
                        hostnames,
                        rules: rules.clone(),
                    },
                    key.clone(),
                    fresh,
                ));
            }
        }
        attached.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out = Vec::new();
        for (_, route, key, fresh) in attached {
            if fresh {
                self.last_good.insert(key.clone(), route.rules.clone());
            }
            out.push((route, key));
        }
        out
    }

    /// Routes whose status (ours) should change, with the whole new status (other
    /// controllers' entries kept): an entry per Service parent (controller [`CONTROLLER`])
    /// and per parent that is one of Ward's `gateways` (controller
    /// [`super::gateways::CONTROLLER`]). `now` stamps conditions that changed.
    pub fn statuses(
        &self,
        services: &dyn Services,
        gateways: &Gateways,
        now: &str,
    ) -> Vec<(RouteKey, RouteStatus)> {
        let ours_by = |c: &str| c == CONTROLLER || c == GATEWAY_CONTROLLER;
        let mut out = Vec::new();
        for (key, r) in &self.routes {
            let mut ours = Vec::new();
            for p in &r.parents {
                let (o, controller) = if is_service(p) {
                    (self.outcome(r, p, services), CONTROLLER)
                } else if is_gateway(p) {
                    let ns = p.namespace.clone().unwrap_or_else(|| r.namespace.clone());
                    match gateways.get(&(ns, p.name.clone())) {
                        Some(g) => (Self::gateway_outcome(r, p, g, services), GATEWAY_CONTROLLER),
                        // Not one of Ward's: another controller's to report on.
                        None => continue,
                    }
                } else {
                    continue;
                };
                let kept = self.last_good.contains_key(key);
                let previous = r
                    .status
                    .parents
                    .iter()
                    .find(|s| s.controller_name == controller && s.parent_ref == *p);
                let none = Vec::new();
                let previous = previous.map_or(&none, |s| &s.conditions);
                let cond = |kind: &str, res: &Result<(), Why>, ok: &str| {
                    let mut c = Condition::next(kind, res, ok, previous, r.generation, now);
                    if kind == "Accepted" && res.is_err() && kept && c.reason == "UnsupportedValue"
                    {
                        c.message
                            .push_str("; the last accepted version stays in force");
                    }
                    c
                };
                ours.push(RouteParentStatus {
                    parent_ref: p.clone(),
                    controller_name: controller.to_owned(),
                    conditions: vec![
                        cond("Accepted", &o.accepted, "Accepted"),
                        cond("ResolvedRefs", &o.resolved, "ResolvedRefs"),
                    ],
                });
            }
            let current: Vec<&RouteParentStatus> = r
                .status
                .parents
                .iter()
                .filter(|s| ours_by(&s.controller_name))
                .collect();
            if current.len() == ours.len() && current.iter().zip(&ours).all(|(a, b)| *a == b) {
                continue;
            }
            let mut parents: Vec<RouteParentStatus> = r
                .status
                .parents
                .iter()
                .filter(|s| !ours_by(&s.controller_name))
                .cloned()
                .collect();
            parents.extend(ours);
            out.push((key.clone(), RouteStatus { parents }));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn http(spec: serde_json::Value) -> super::super::gateway::httproutes::HttpRouteSpec {
        serde_json::from_value(spec).unwrap()
    }

    fn seen(name: &str, created: &str, spec: serde_json::Value) -> Seen {
        let spec = http(spec);
        Seen {
            kind: Kind::Http,
            namespace: "shop".into(),
            name: name.into(),
            generation: Some(1),
            created: created.into(),
            parents: parents(spec.parent_refs.as_ref()),
            hostnames: spec.hostnames.clone().unwrap_or_default(),
            translated: translate_http("shop", &spec),
            status: RouteStatus::default(),
        }
    }

    #[test]
    fn routes_attach_in_order_report_status_and_keep_the_last_good_version() {
        let svcs: HashMap<ServiceKey, Vec<u16>> = [
            (("shop".into(), "api".into()), vec![80]),
            (("shop".into(), "api-v1".into()), vec![80]),
        ]
        .into_iter()
        .collect();
        let parent = serde_json::json!([ { "group": "", "kind": "Service", "name": "api" } ]);
        let mut set = RouteSet::default();
        let b = seen(
            "b",
            "2026-01-01T00:00:00Z",
            serde_json::json!({ "parentRefs": parent,
            "rules": [ { "backendRefs": [ { "name": "api-v1", "port": 80 } ] } ] }),
        );
        let a = seen(
            "a",
            "2026-01-02T00:00:00Z",
            serde_json::json!({ "parentRefs": parent,
            "rules": [ { "backendRefs": [ { "name": "missing", "port": 80 } ] } ] }),
        );
        let gw = seen(
            "gw",
            "2026-01-01T00:00:00Z",
            serde_json::json!({
            "parentRefs": [ { "name": "some-gateway" } ], "rules": [] }),
        );
        let wrong_port = seen(
            "p",
            "2026-01-03T00:00:00Z",
            serde_json::json!({
            "parentRefs": [ { "group": "", "kind": "Service", "name": "api", "port": 81 } ], "rules": [] }),
        );
        for s in [b.clone(), a, gw, wrong_port] {
            set.apply(s.key(), Some(s));
        }
        let key = ("shop".to_owned(), "api".to_owned());
        let routes = set.for_service(&key, &svcs);
        let names: Vec<&str> = routes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            ["httproute/shop/b", "httproute/shop/a"],
            "oldest first; the port-81 one does not attach"
        );
        let st: HashMap<String, RouteStatus> = set
            .statuses(&svcs, &Gateways::new(), "2026-12-01T00:00:00Z")
            .into_iter()
            .map(|((_, _, n), s)| (n, s))
            .collect();
        assert!(!st.contains_key("gw"), "routes on Gateways are not ours");
        let c = |n: &str, t: &str| {
            st[n].parents[0]
                .conditions
                .iter()
                .find(|c| c.kind == t)
                .unwrap()
                .clone()
        };
        assert_eq!(
            (
                c("b", "Accepted").status.as_str(),
                c("b", "ResolvedRefs").status.as_str()
            ),
            ("True", "True")
        );
        assert_eq!(c("a", "ResolvedRefs").reason, "BackendNotFound");
        assert_eq!(c("p", "Accepted").reason, "NoMatchingParent");
        assert!(c("p", "Accepted").message.contains("no port 81"));

        // b changes into something unsupported: its last accepted rules stay, and it says so.
        let mut bad = seen(
            "b",
            "2026-01-01T00:00:00Z",
            serde_json::json!({ "parentRefs": parent,
            "rules": [ { "filters": [ { "type": "RequestMirror" } ] } ] }),
        );
        bad.generation = Some(2);
        set.apply(bad.key(), Some(bad));
        let routes = set.for_service(&key, &svcs);
        assert_eq!(routes[0].name, "httproute/shop/b");
        assert_eq!(routes[0].rules[0].backends[0].service, "api-v1.shop");
        let st = set.statuses(&svcs, &Gateways::new(), "now");
        let (_, b_st) = st.iter().find(|(k, _)| k.2 == "b").unwrap();
        let acc = &b_st.parents[0].conditions[0];
        assert_eq!(
            (acc.status.as_str(), acc.reason.as_str()),
            ("False", "UnsupportedValue")
        );
        assert!(
            acc.message.contains("stays in force") && acc.observed_generation == Some(2),
            "{acc:?}"
        );

        // Statuses already written are not written again.
        let mut written = b.clone();
        written.status = set
            .statuses(&svcs, &Gateways::new(), "t")
            .into_iter()
            .find(|(k, _)| k.2 == "b")
            .unwrap()
            .1;
        written.generation = Some(2);
        written.translated = set.routes[&b.key()].translated.clone();
        set.apply(written.key(), Some(written));
        assert!(
            set.statuses(&svcs, &Gateways::new(), "later")
                .iter()
                .all(|(k, _)| k.2 != "b")
        );
        // Deleting forgets the last good version.
        set.apply(b.key(), None);
        assert_eq!(set.for_service(&key, &svcs).len(), 1);
    }

    #[test]
    fn routes_attach_to_gateway_listeners_by_section_port_namespace_and_hostname() {
        let g: super::super::gateway::Gateway = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "web", "namespace": "shop", "generation": 1 },
            "spec": { "gatewayClassName": "ward", "listeners": [
                { "name": "https", "port": 443, "protocol": "HTTPS", "hostname": "*.example.com" },
                { "name": "http", "port": 80, "protocol": "HTTP",
                  "allowedRoutes": { "namespaces": { "from": "All" } } } ] }
        }))
        .unwrap();
        let gw = super::super::gateways::read(&g).unwrap();
        let gateways: Gateways = [(("shop".to_owned(), "web".to_owned()), gw.clone())]
            .into_iter()
            .collect();
        let svcs: HashMap<ServiceKey, Vec<u16>> = [(("shop".into(), "api".into()), vec![80])]
            .into_iter()
            .collect();
        let rule = serde_json::json!([ { "backendRefs": [ { "name": "api", "port": 80 } ] } ]);
        let mut set = RouteSet::default();
        let add = |name: &str, ns: &str, created: &str, spec: serde_json::Value| {
            let mut s = seen(name, created, spec);
            s.namespace = ns.into();
            s
        };
        let mut routes = Vec::new();
        for (name, ns, created, parent, hostnames) in [
            (
                "both",
                "shop",
                "2026-01-01T00:00:00Z",
                serde_json::json!({ "name": "web" }),
                vec!["shop.example.com"],
            ),
            (
                "tls-only",
                "shop",
                "2026-01-02T00:00:00Z",
                serde_json::json!({ "name": "web", "sectionName": "https" }),
                vec![],
            ),
            (
                "elsewhere",
                "shop",
                "2026-01-03T00:00:00Z",
                serde_json::json!({ "name": "web", "sectionName": "https" }),
                vec!["other.org"],
            ),
            (
                "other-ns",
                "blog",
                "2026-01-04T00:00:00Z",
                serde_json::json!({ "name": "web", "namespace": "shop" }),
                vec![],
            ),
            (
                "no-listener",
                "shop",
                "2026-01-05T00:00:00Z",
                serde_json::json!({ "name": "web", "port": 8080 }),
                vec![],
            ),
            (
                "not-ours",
                "shop",
                "2026-01-06T00:00:00Z",
                serde_json::json!({ "name": "istio" }),
                vec![],
            ),
        ] {
            let mut s = add(
                name,
                ns,
                created,
                serde_json::json!({ "parentRefs": [parent], "rules": rule }),
            );
            s.hostnames = hostnames.into_iter().map(String::from).collect();
            routes.push(s);
        }
        for s in routes {
            set.apply(s.key(), Some(s));
        }
        let (rs, attached) = set.for_gateway(&gw);
        let got: Vec<(&str, Option<u16>, Vec<String>)> = rs
            .iter()
            .map(|r| (r.name.as_str(), r.port, r.hostnames.clone()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "httproute/shop/both",
                    Some(443),
                    vec!["shop.example.com".to_owned()]
                ),
                (
                    "httproute/shop/both",
                    Some(80),
                    vec!["shop.example.com".to_owned()]
                ),
                (
                    "httproute/shop/tls-only",
                    Some(443),
                    vec!["*.example.com".to_owned()]
                ),
                ("httproute/blog/other-ns", Some(80), vec![]),
            ]
        );
        assert_eq!(attached, [2, 2]);
        let st: HashMap<String, RouteStatus> = set
            .statuses(&svcs, &gateways, "2026-12-02T00:00:00Z")
            .into_iter()
            .map(|(k, s)| (k.2, s))
            .collect();
        let reason = |n: &str| {
            let p = &st[n].parents[0];
            assert_eq!(p.controller_name, "ward.dev/gateway");
            p.conditions[0].reason.clone()
        };
        assert_eq!(reason("both"), "Accepted");
        assert_eq!(reason("elsewhere"), "NoMatchingListenerHostname");
        assert_eq!(reason("no-listener"), "NoMatchingParent");
        assert!(
            !st.contains_key("not-ours"),
            "another controller's Gateway: no status from Ward"
        );
        assert_eq!(
            reason("other-ns"),
            "Accepted",
            "the http listener takes every namespace"
        );
    }
}
