//! The pure step from a Gateway API route to Ward's rules.

use std::time::Duration;

use ward_spiffe::route::{
    Backend, Filter, Header, HeaderChanges, Match, PathChange, PathMatch, Redirect, Retry, Rewrite,
    Rule, ValueMatch,
};

use super::super::gateway::{ParentRef, RouteStatus, grpcroutes, httproutes};
use super::{Translated, Why, unsupported};

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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ward_spiffe::route::{HttpRoute, Routes};

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
}
