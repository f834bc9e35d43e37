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
use std::time::Duration;

use ward_spiffe::route::{
    Backend, Filter, Header, HeaderChanges, HttpRoute, Match, PathChange, PathMatch, Redirect,
    Retry, Rewrite, Routes, Rule, ValueMatch,
};

use super::gateway::{
    Condition, ParentRef, RouteParentStatus, RouteStatus, grpcroutes, httproutes,
};

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

fn duration(what: &str, v: &Option<String>) -> Result<Option<Duration>, Why> {
    match v.as_deref() {
        None => Ok(None),
        Some(s) => match ward_net::duration::parse(s) {
            // Zero disables the timeout.
            Ok(d) if d.is_zero() => Ok(None),
            Ok(d) => Ok(Some(d)),
            Err(e) => Err(unsupported(format!("{what}: {e}"))),
        },
    }
}

/// The wire name of one of the crate's enums (`PathPrefix`, `GET`, `URLRewrite`, …), so the
/// messages and matches below speak the Gateway API's own words.
fn wire<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        other => format!("{other:?}"),
    }
}

/// Parent refs as the route set keeps them (the same wire shape for every route kind).
pub fn parents<T: serde::Serialize>(refs: Option<&Vec<T>>) -> Vec<ParentRef> {
    refs.into_iter()
        .flatten()
        .filter_map(|r| serde_json::from_value(serde_json::to_value(r).ok()?).ok())
        .collect()
}

/// A route's status as the route set keeps it.
pub fn status<T: serde::Serialize>(s: Option<&T>) -> RouteStatus {
    s.and_then(|s| serde_json::from_value(serde_json::to_value(s).ok()?).ok())
        .unwrap_or_default()
}

fn retry(r: &httproutes::HttpRouteRulesRetry) -> Result<Retry, Why> {
    let codes = r
        .codes
        .iter()
        .flatten()
        .map(|c| {
            u16::try_from(*c)
                .ok()
                .filter(|c| (400..=599).contains(c))
                .ok_or_else(|| unsupported(format!("retry code {c} is not from 400 to 599")))
        })
        .collect::<Result<_, _>>()?;
    let attempts = match r.attempts {
        None => 1,
        Some(a) => u32::try_from(a)
            .ok()
            .filter(|a| *a <= ward_spiffe::route::MAX_RETRY_ATTEMPTS)
            .ok_or_else(|| {
                unsupported(format!(
                    "retry attempts {a} is not from 0 to {}",
                    ward_spiffe::route::MAX_RETRY_ATTEMPTS
                ))
            })?,
    };
    Ok(Retry {
        codes,
        attempts,
        backoff: duration("retry.backoff", &r.backoff)?,
    })
}

fn value_match<K: serde::Serialize>(
    kind: Option<&K>,
    name: &str,
    value: &str,
) -> Result<ValueMatch, Why> {
    let regex = match kind.map(wire).as_deref().unwrap_or("Exact") {
        "Exact" => false,
        "RegularExpression" => true,
        k => return Err(unsupported(format!("match type {k:?} is not supported"))),
    };
    Ok(ValueMatch {
        name: name.to_owned(),
        value: value.to_owned(),
        regex,
    })
}

/// Header changes from any of the Gateway API's header modifiers (each filter of each route
/// kind has its own generated type with the same fields).
macro_rules! header_changes {
    ($m:expr) => {{
        let m = $m;
        HeaderChanges {
            set: m
                .set
                .iter()
                .flatten()
                .map(|h| Header {
                    name: h.name.clone(),
                    value: h.value.clone(),
                })
                .collect(),
            add: m
                .add
                .iter()
                .flatten()
                .map(|h| Header {
                    name: h.name.clone(),
                    value: h.value.clone(),
                })
                .collect(),
            remove: m.remove.clone().unwrap_or_default(),
        }
    }};
}

/// A path change from a redirect's or a rewrite's path modifier.
macro_rules! path_change {
    ($p:expr) => {{
        let p = $p;
        match (
            wire(&p.r#type).as_str(),
            &p.replace_full_path,
            &p.replace_prefix_match,
        ) {
            ("ReplaceFullPath", Some(v), _) => Ok(PathChange::Full(v.clone())),
            ("ReplacePrefixMatch", _, Some(v)) => Ok(PathChange::Prefix(v.clone())),
            (k, ..) => Err(unsupported(format!(
                "path modifier {k:?} without its value is not supported"
            ))),
        }
    }};
}

fn port(what: &str, p: Option<i32>) -> Result<Option<u16>, Why> {
    p.map(|p| {
        u16::try_from(p)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| unsupported(format!("{what} {p} is not a port")))
    })
    .transpose()
}

fn not_supported(kind: &str) -> Why {
    unsupported(format!("filter {kind} is not supported by Ward's mesh"))
}

fn missing(kind: &str) -> Why {
    unsupported(format!("filter {kind} has no settings"))
}

fn http_filter(f: &httproutes::HttpRouteRulesFilters) -> Result<Filter, Why> {
    use httproutes::HttpRouteRulesFiltersType as T;
    let kind = wire(&f.r#type);
    Ok(match f.r#type {
        T::RequestHeaderModifier => Filter::RequestHeaders(header_changes!(
            f.request_header_modifier
                .as_ref()
                .ok_or_else(|| missing(&kind))?
        )),
        T::ResponseHeaderModifier => Filter::ResponseHeaders(header_changes!(
            f.response_header_modifier
                .as_ref()
                .ok_or_else(|| missing(&kind))?
        )),
        T::RequestRedirect => {
            let r = f.request_redirect.as_ref().ok_or_else(|| missing(&kind))?;
            Filter::Redirect(Redirect {
                scheme: r.scheme.as_ref().map(wire),
                hostname: r.hostname.clone(),
                port: port("redirect port", r.port)?,
                path: r.path.as_ref().map(|p| path_change!(p)).transpose()?,
                status: r
                    .status_code
                    .map(|s| u16::try_from(s).unwrap_or(0))
                    .filter(|s| *s != 0),
            })
        }
        T::UrlRewrite => {
            let r = f.url_rewrite.as_ref().ok_or_else(|| missing(&kind))?;
            Filter::Rewrite(Rewrite {
                hostname: r.hostname.clone(),
                path: r.path.as_ref().map(|p| path_change!(p)).transpose()?,
            })
        }
        _ => return Err(not_supported(&kind)),
    })
}

fn grpc_filter(f: &grpcroutes::GrpcRouteRulesFilters) -> Result<Filter, Why> {
    use grpcroutes::GrpcRouteRulesFiltersType as T;
    let kind = wire(&f.r#type);
    Ok(match f.r#type {
        T::RequestHeaderModifier => Filter::RequestHeaders(header_changes!(
            f.request_header_modifier
                .as_ref()
                .ok_or_else(|| missing(&kind))?
        )),
        T::ResponseHeaderModifier => Filter::ResponseHeaders(header_changes!(
            f.response_header_modifier
                .as_ref()
                .ok_or_else(|| missing(&kind))?
        )),
        _ => return Err(not_supported(&kind)),
    })
}

/// A backend ref of either route kind, as far as Ward reads it.
struct BackendRef<'a> {
    group: Option<&'a str>,
    kind: Option<&'a str>,
    name: &'a str,
    namespace: Option<&'a str>,
    port: Option<i32>,
    weight: Option<i32>,
    filtered: bool,
}

macro_rules! backend_ref {
    ($b:expr) => {{
        let b = $b;
        BackendRef {
            group: b.group.as_deref(),
            kind: b.kind.as_deref(),
            name: &b.name,
            namespace: b.namespace.as_deref(),
            port: b.port,
            weight: b.weight,
            filtered: b.filters.as_ref().is_some_and(|f| !f.is_empty()),
        }
    }};
}

/// The backends of a rule; refs that may not be used keep their share, refused (500).
fn backends(ns: &str, refs: &[BackendRef<'_>], t: &mut Translated) -> Result<Vec<Backend>, Why> {
    let mut out = Vec::new();
    for b in refs {
        if b.filtered {
            return Err(unsupported(
                "per-backend filters are not supported by Ward's mesh".into(),
            ));
        }
        let weight = u32::try_from(b.weight.unwrap_or(1)).unwrap_or(0);
        let group = b.group.unwrap_or("");
        let kind = b.kind.unwrap_or("Service");
        let bns = b.namespace.unwrap_or(ns);
        let service = format!("{}.{bns}", b.name);
        let refused = if !(group.is_empty() || group == "core") || kind != "Service" {
            Some(Why {
                reason: "InvalidKind",
                message: format!("backend {group}/{kind} {} is not a Service", b.name),
            })
        } else if bns != ns {
            Some(Why {
                reason: "RefNotPermitted",
                message: format!(
                    "backend Service {bns}/{} is in another namespace (ReferenceGrant is not supported)",
                    b.name
                ),
            })
        } else if port("backend port", b.port)?.is_none() {
            Some(unsupported(format!(
                "backend Service {bns}/{} needs a port",
                b.name
            )))
        } else {
            None
        };
        let port = port("backend port", b.port)?.unwrap_or(1);
        match refused {
            Some(why) => {
                out.push(Backend {
                    service,
                    port,
                    weight,
                    refused: Some(why.message.clone()),
                });
                t.backend_problems.push(why);
            }
            None => {
                t.backends.push(service.clone());
                out.push(Backend {
                    service,
                    port,
                    weight,
                    refused: None,
                });
            }
        }
    }
    Ok(out)
}

/// An `HTTPRoute` in namespace `ns` as rules.
pub fn translate_http(ns: &str, spec: &httproutes::HttpRouteSpec) -> Result<Translated, Why> {
    let mut t = Translated::default();
    // No rules: one rule matching everything, without a backend (the Gateway API's default).
    let default_rule = vec![httproutes::HttpRouteRules::default()];
    let rules = match &spec.rules {
        Some(r) if !r.is_empty() => r,
        _ => &default_rule,
    };
    for r in rules {
        let mut matches = Vec::new();
        for m in r.matches.iter().flatten() {
            let path = match &m.path {
                None => None,
                Some(p) => {
                    let v = p.value.clone().unwrap_or_else(|| "/".into());
                    Some(match p.r#type.as_ref().map(wire).as_deref() {
                        Some("Exact") => PathMatch::Exact(v),
                        None | Some("PathPrefix") => PathMatch::Prefix(v),
                        Some("RegularExpression") => PathMatch::Regex(v),
                        Some(k) => return Err(unsupported(format!("path match type {k:?}"))),
                    })
                }
            };
            matches.push(Match {
                path,
                method: m.method.as_ref().map(wire),
                headers: m
                    .headers
                    .iter()
                    .flatten()
                    .map(|h| value_match(h.r#type.as_ref(), &h.name, &h.value))
                    .collect::<Result<_, _>>()?,
                query: m
                    .query_params
                    .iter()
                    .flatten()
                    .map(|h| value_match(h.r#type.as_ref(), &h.name, &h.value))
                    .collect::<Result<_, _>>()?,
            });
        }
        let filters = r
            .filters
            .iter()
            .flatten()
            .map(http_filter)
            .collect::<Result<_, _>>()?;
        let timeouts = r.timeouts.clone().unwrap_or_default();
        let refs: Vec<_> = r
            .backend_refs
            .iter()
            .flatten()
            .map(|b| backend_ref!(b))
            .collect();
        let backends = backends(ns, &refs, &mut t)?;
        t.rules.push(Rule {
            matches,
            backends,
            filters,
            timeout: duration("timeouts.request", &timeouts.request)?,
            backend_timeout: duration("timeouts.backendRequest", &timeouts.backend_request)?,
            retry: r.retry.as_ref().map(retry).transpose()?,
        });
    }
    Ok(t)
}

/// A `GRPCRoute` in namespace `ns` as rules: a method match is a path match on
/// `/<service>/<method>`.
pub fn translate_grpc(ns: &str, spec: &grpcroutes::GrpcRouteSpec) -> Result<Translated, Why> {
    let mut t = Translated::default();
    for r in spec.rules.iter().flatten() {
        let mut matches = Vec::new();
        for m in r.matches.iter().flatten() {
            let path = match &m.method {
                None => None,
                Some(mm) => {
                    let (s, me) = (mm.service.as_deref(), mm.method.as_deref());
                    let kind = mm.r#type.as_ref().map(wire);
                    Some(match (kind.as_deref().unwrap_or("Exact"), s, me) {
                        ("Exact", Some(s), Some(me)) => PathMatch::Exact(format!("/{s}/{me}")),
                        ("Exact", Some(s), None) => PathMatch::Prefix(format!("/{s}")),
                        ("Exact", None, Some(me)) => {
                            PathMatch::Regex(format!("/[^/]+/{}", regex::escape(me)))
                        }
                        ("Exact" | "RegularExpression", None, None) => {
                            return Err(unsupported(
                                "a gRPC method match needs a service or a method".into(),
                            ));
                        }
                        ("RegularExpression", s, me) => PathMatch::Regex(format!(
                            "/{}/{}",
                            s.unwrap_or("[^/]+"),
                            me.unwrap_or("[^/]+")
                        )),
                        (k, ..) => return Err(unsupported(format!("method match type {k:?}"))),
                    })
                }
            };
            matches.push(Match {
                path,
                method: None,
                headers: m
                    .headers
                    .iter()
                    .flatten()
                    .map(|h| value_match(h.r#type.as_ref(), &h.name, &h.value))
                    .collect::<Result<_, _>>()?,
                query: Vec::new(),
            });
        }
        let filters = r
            .filters
            .iter()
            .flatten()
            .map(grpc_filter)
            .collect::<Result<_, _>>()?;
        let refs: Vec<_> = r
            .backend_refs
            .iter()
            .flatten()
            .map(|b| backend_ref!(b))
            .collect();
        let backends = backends(ns, &refs, &mut t)?;
        t.rules.push(Rule {
            matches,
            backends,
            filters,
            timeout: None,
            backend_timeout: None,
            retry: None,
        });
    }
    Ok(t)
}

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
                    _ => match &route.translated {
                        Err(w) => Err(w.clone()),
                        Ok(t) => Routes::compile(&[HttpRoute {
                            name: String::new(),
                            port: None,
                            hostnames: Vec::new(),
                            rules: t.rules.clone(),
                        }])
                        .map(|_| ())
                        .map_err(|e| unsupported(e.why)),
                    },
                },
            }
        };
        let resolved = match &route.translated {
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
        };
        ParentOutcome { accepted, resolved }
    }

    /// The routes of Service `svc`, in the order they apply on ties. Routes whose latest
    /// version is not accepted contribute their last accepted rules, if any. Also remembers
    /// what is accepted now.
    pub fn for_service(&mut self, svc: &ServiceKey, services: &dyn Services) -> Vec<HttpRoute> {
        let mut attached: Vec<(&str, &str, &str, HttpRoute, RouteKey, bool)> = Vec::new();
        for (key, r) in &self.routes {
            for p in r.parents.iter().filter(|p| is_service(p)) {
                let ns = p.namespace.as_deref().unwrap_or(&r.namespace);
                if ns != svc.0 || p.name != svc.1 {
                    continue;
                }
                let o = self.outcome(r, p, services);
                let rules = match (&o.accepted, &r.translated) {
                    (Ok(()), Ok(t)) => Some((t.rules.clone(), true)),
                    // Refused because the route itself is wrong: the last good rules stay.
                    (Err(w), _) if w.reason == "UnsupportedValue" => {
                        self.last_good.get(key).map(|g| (g.clone(), false))
                    }
                    _ => None,
                };
                if let Some((rules, fresh)) = rules {
                    attached.push((
                        &r.created,
                        &r.namespace,
                        &r.name,
                        HttpRoute {
                            name: format!("{}/{}/{}", r.kind.label(), r.namespace, r.name),
                            port: p.port.and_then(|x| u16::try_from(x).ok()),
                            hostnames: Vec::new(),
                            rules,
                        },
                        key.clone(),
                        fresh,
                    ));
                }
            }
        }
        attached.sort_by(|a, b| (a.0, a.1, a.2).cmp(&(b.0, b.1, b.2)));
        let mut out = Vec::new();
        let mut good = Vec::new();
        for (.., route, key, fresh) in attached {
            if fresh {
                good.push((key, route.rules.clone()));
            }
            out.push(route);
        }
        for (k, rules) in good {
            self.last_good.insert(k, rules);
        }
        out
    }

    /// Routes whose status (ours) should change, with the whole new status (other
    /// controllers' entries kept). `now` stamps conditions that changed.
    pub fn statuses(&self, services: &dyn Services, now: &str) -> Vec<(RouteKey, RouteStatus)> {
        let mut out = Vec::new();
        for (key, r) in &self.routes {
            let mut ours = Vec::new();
            for p in r.parents.iter().filter(|p| is_service(p)) {
                let o = self.outcome(r, p, services);
                let kept = self.last_good.contains_key(key);
                let previous = r
                    .status
                    .parents
                    .iter()
                    .find(|s| s.controller_name == CONTROLLER && s.parent_ref == *p);
                let cond = |kind: &str, res: &Result<(), Why>, ok: &str| {
                    let (status, reason, mut message) = match res {
                        Ok(()) => ("True", ok.to_owned(), String::new()),
                        Err(w) => ("False", w.reason.to_owned(), w.message.clone()),
                    };
                    if kind == "Accepted" && res.is_err() && kept && reason == "UnsupportedValue" {
                        message.push_str("; the last accepted version stays in force");
                    }
                    let old = previous.and_then(|s| s.conditions.iter().find(|c| c.kind == kind));
                    let time = match old {
                        Some(c) if c.status == status => c.last_transition_time.clone(),
                        _ => now.to_owned(),
                    };
                    Condition {
                        kind: kind.to_owned(),
                        status: status.to_owned(),
                        reason,
                        message,
                        observed_generation: r.generation,
                        last_transition_time: time,
                    }
                };
                ours.push(RouteParentStatus {
                    parent_ref: p.clone(),
                    controller_name: CONTROLLER.to_owned(),
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
                .filter(|s| s.controller_name == CONTROLLER)
                .collect();
            if current.len() == ours.len() && current.iter().zip(&ours).all(|(a, b)| *a == b) {
                continue;
            }
            let mut parents: Vec<RouteParentStatus> = r
                .status
                .parents
                .iter()
                .filter(|s| s.controller_name != CONTROLLER)
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

    fn http(spec: serde_json::Value) -> httproutes::HttpRouteSpec {
        serde_json::from_value(spec).unwrap()
    }

    #[test]
    fn http_routes_translate_to_rules() {
        let spec = http(serde_json::json!({
            "parentRefs": [ { "group": "", "kind": "Service", "name": "api", "port": 80 } ],
            "rules": [
                { "matches": [ { "path": { "type": "PathPrefix", "value": "/v2" },
                                 "headers": [ { "name": "X-Canary", "value": "yes" } ],
                                 "queryParams": [ { "type": "RegularExpression", "name": "a", "value": "[0-9]+" } ],
                                 "method": "GET" } ],
                  "filters": [ { "type": "RequestHeaderModifier", "requestHeaderModifier": { "set": [ { "name": "x-a", "value": "1" } ] } },
                               { "type": "URLRewrite", "urlRewrite": { "path": { "type": "ReplacePrefixMatch", "replacePrefixMatch": "/" } } } ],
                  "backendRefs": [ { "name": "api-v2", "port": 80, "weight": 90 }, { "name": "api-v1", "port": 80, "weight": 10 } ],
                  "timeouts": { "request": "1m30s", "backendRequest": "0s" },
                  "retry": { "codes": [ 500, 503 ], "attempts": 3, "backoff": "100ms" } },
                { "filters": [ { "type": "RequestRedirect", "requestRedirect": { "scheme": "https", "statusCode": 301 } } ] }
            ]
        }));
        let t = translate_http("shop", &spec).unwrap();
        assert!(t.backend_problems.is_empty());
        assert_eq!(t.backends, ["api-v2.shop", "api-v1.shop"]);
        let r = &t.rules[0];
        assert_eq!(r.matches[0].path, Some(PathMatch::Prefix("/v2".into())));
        assert!(r.matches[0].query[0].regex && !r.matches[0].headers[0].regex);
        assert_eq!(r.backends[0].weight, 90);
        assert_eq!(r.timeout, Some(Duration::from_secs(90)));
        assert_eq!(r.backend_timeout, None, "0s disables");
        assert_eq!(
            r.retry,
            Some(Retry {
                codes: vec![500, 503],
                attempts: 3,
                backoff: Some(Duration::from_millis(100)),
            })
        );
        assert_eq!(t.rules[1].retry, None);
        assert!(
            matches!(&r.filters[1], Filter::Rewrite(w) if w.path == Some(PathChange::Prefix("/".into())))
        );
        assert!(matches!(&t.rules[1].filters[0], Filter::Redirect(x) if x.status == Some(301)));
        Routes::compile(&[HttpRoute {
            name: "x".into(),
            port: None,
            hostnames: Vec::new(),
            rules: t.rules,
        }])
        .unwrap();

        let mirror = http(
            serde_json::json!({ "rules": [ { "filters": [ { "type": "RequestMirror" } ] } ] }),
        );
        let e = translate_http("shop", &mirror).unwrap_err();
        assert_eq!(e.reason, "UnsupportedValue");
        assert!(e.message.contains("RequestMirror"), "{}", e.message);
        for (retry, says) in [
            (serde_json::json!({ "codes": [ 200 ] }), "retry code 200"),
            (serde_json::json!({ "attempts": -1 }), "retry attempts -1"),
            (serde_json::json!({ "backoff": "soon" }), "retry.backoff"),
        ] {
            let spec = http(serde_json::json!({ "rules": [ { "retry": retry } ] }));
            let e = translate_http("shop", &spec).unwrap_err();
            assert!(e.message.contains(says), "{}", e.message);
        }
        let spec = http(serde_json::json!({ "rules": [ { "retry": { "codes": [ 503 ] } } ] }));
        let r = translate_http("shop", &spec).unwrap().rules[0]
            .retry
            .clone();
        assert_eq!(r.map(|r| r.attempts), Some(1), "one retry unless told");

        let refs = http(serde_json::json!({ "rules": [ { "backendRefs": [
            { "name": "other", "namespace": "elsewhere", "port": 80 },
            { "group": "example.com", "kind": "Bucket", "name": "b" } ] } ] }));
        let t = translate_http("shop", &refs).unwrap();
        assert_eq!(t.backend_problems[0].reason, "RefNotPermitted");
        assert_eq!(t.backend_problems[1].reason, "InvalidKind");
        assert!(
            t.rules[0].backends.iter().all(|b| b.refused.is_some()),
            "never sent there"
        );
    }

    #[test]
    fn grpc_methods_become_paths() {
        let spec: grpcroutes::GrpcRouteSpec = serde_json::from_value(serde_json::json!({
            "rules": [ { "matches": [
                { "method": { "service": "shop.Cart", "method": "Add" } },
                { "method": { "service": "shop.Cart" } },
                { "method": { "method": "Get" } },
                { "method": { "type": "RegularExpression", "service": "shop\\..*" } } ],
              "backendRefs": [ { "name": "cart", "port": 9090 } ] } ]
        }))
        .unwrap();
        let t = translate_grpc("shop", &spec).unwrap();
        let paths: Vec<_> = t.rules[0]
            .matches
            .iter()
            .map(|m| m.path.clone().unwrap())
            .collect();
        assert_eq!(
            paths,
            [
                PathMatch::Exact("/shop.Cart/Add".into()),
                PathMatch::Prefix("/shop.Cart".into()),
                PathMatch::Regex("/[^/]+/Get".into()),
                PathMatch::Regex("/shop\\..*/[^/]+".into()),
            ]
        );
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
            .statuses(&svcs, "2026-12-01T00:00:00Z")
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
        let st = set.statuses(&svcs, "now");
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
            .statuses(&svcs, "t")
            .into_iter()
            .find(|(k, _)| k.2 == "b")
            .unwrap()
            .1;
        written.generation = Some(2);
        written.translated = set.routes[&b.key()].translated.clone();
        set.apply(written.key(), Some(written));
        assert!(set.statuses(&svcs, "later").iter().all(|(k, _)| k.2 != "b"));
        // Deleting forgets the last good version.
        set.apply(b.key(), None);
        assert_eq!(set.for_service(&key, &svcs).len(), 1);
    }
}
