//! Mesh routes and their messages. The message side uses 0 / empty for "not set"; the
//! conversion back checks ports and statuses fit and names the field that does not.

use std::time::Duration;

use ward_spiffe::route::{
    Backend, Filter, Header, HeaderChanges, HttpRoute, Match, PathChange, PathMatch, Redirect,
    Retry, Rewrite, Rule, ValueMatch,
};

use crate::types;

fn ms(d: Option<Duration>) -> u32 {
    d.map_or(0, |d| {
        u32::try_from(d.as_millis()).unwrap_or(u32::MAX).max(1)
    })
}

fn headers_to(h: &HeaderChanges) -> types::HeaderChanges {
    let pairs = |v: &[Header]| {
        v.iter()
            .map(|h| types::Header {
                name: h.name.clone(),
                value: h.value.clone(),
            })
            .collect()
    };
    types::HeaderChanges {
        set: pairs(&h.set),
        add: pairs(&h.add),
        remove: h.remove.clone(),
    }
}

fn path_to(p: &Option<PathChange>) -> Option<types::PathChange> {
    use types::path_change::Kind;
    p.as_ref().map(|p| types::PathChange {
        kind: Some(match p {
            PathChange::Full(s) => Kind::Full(s.clone()),
            PathChange::Prefix(s) => Kind::Prefix(s.clone()),
        }),
    })
}

fn values_to(v: &[ValueMatch]) -> Vec<types::ValueMatch> {
    v.iter()
        .map(|v| types::ValueMatch {
            name: v.name.clone(),
            value: v.value.clone(),
            regex: v.regex,
        })
        .collect()
}

/// Routes as messages.
pub fn routes_to_proto(routes: &[HttpRoute]) -> Vec<types::HttpRoute> {
    use types::route_filter::Kind as F;
    use types::route_match::Path;
    routes
        .iter()
        .map(|r| types::HttpRoute {
            name: r.name.clone(),
            port: r.port.map_or(0, u32::from),
            hostnames: r.hostnames.clone(),
            rules: r
                .rules
                .iter()
                .map(|rule| types::RouteRule {
                    matches: rule
                        .matches
                        .iter()
                        .map(|m| types::RouteMatch {
                            path: m.path.as_ref().map(|p| match p {
                                PathMatch::Exact(s) => Path::Exact(s.clone()),
                                PathMatch::Prefix(s) => Path::Prefix(s.clone()),
                                PathMatch::Regex(s) => Path::Regex(s.clone()),
                            }),
                            method: m.method.clone().unwrap_or_default(),
                            headers: values_to(&m.headers),
                            query: values_to(&m.query),
                        })
                        .collect(),
                    backends: rule
                        .backends
                        .iter()
                        .map(|b| types::RouteBackend {
                            service: b.service.clone(),
                            port: u32::from(b.port),
                            weight: b.weight,
                            refused: b.refused.clone().unwrap_or_default(),
                        })
                        .collect(),
                    filters: rule
                        .filters
                        .iter()
                        .map(|f| types::RouteFilter {
                            kind: Some(match f {
                                Filter::RequestHeaders(h) => F::RequestHeaders(headers_to(h)),
                                Filter::ResponseHeaders(h) => F::ResponseHeaders(headers_to(h)),
                                Filter::Redirect(r) => F::Redirect(types::Redirect {
                                    scheme: r.scheme.clone().unwrap_or_default(),
                                    hostname: r.hostname.clone().unwrap_or_default(),
                                    port: r.port.map_or(0, u32::from),
                                    path: path_to(&r.path),
                                    status: r.status.map_or(0, u32::from),
                                }),
                                Filter::Rewrite(r) => F::Rewrite(types::Rewrite {
                                    hostname: r.hostname.clone().unwrap_or_default(),
                                    path: path_to(&r.path),
                                }),
                            }),
                        })
                        .collect(),
                    timeout_ms: ms(rule.timeout),
                    backend_timeout_ms: ms(rule.backend_timeout),
                    retry: rule.retry.as_ref().map(|r| types::RouteRetry {
                        codes: r.codes.iter().map(|c| u32::from(*c)).collect(),
                        attempts: r.attempts,
                        backoff_ms: ms(r.backoff),
                    }),
                })
                .collect(),
        })
        .collect()
}

fn nonempty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

fn headers_from(h: &types::HeaderChanges) -> HeaderChanges {
    let pairs = |v: &[types::Header]| {
        v.iter()
            .map(|h| Header {
                name: h.name.clone(),
                value: h.value.clone(),
            })
            .collect()
    };
    HeaderChanges {
        set: pairs(&h.set),
        add: pairs(&h.add),
        remove: h.remove.clone(),
    }
}

fn path_from(p: &Option<types::PathChange>) -> Result<Option<PathChange>, String> {
    use types::path_change::Kind;
    match p.as_ref().map(|p| &p.kind) {
        None => Ok(None),
        Some(Some(Kind::Full(s))) => Ok(Some(PathChange::Full(s.clone()))),
        Some(Some(Kind::Prefix(s))) => Ok(Some(PathChange::Prefix(s.clone()))),
        Some(None) => Err("a path change without a kind".into()),
    }
}

fn values_from(v: &[types::ValueMatch]) -> Vec<ValueMatch> {
    v.iter()
        .map(|v| ValueMatch {
            name: v.name.clone(),
            value: v.value.clone(),
            regex: v.regex,
        })
        .collect()
}

fn port16(what: &str, v: u32) -> Result<u16, String> {
    u16::try_from(v).map_err(|_| format!("{what} {v} is not a port"))
}

fn timeout(v: u32) -> Option<Duration> {
    (v > 0).then(|| Duration::from_millis(u64::from(v)))
}

/// Route messages as routes (not yet compiled: `Routes::compile` checks the rest).
pub fn routes_from_proto(m: &[types::HttpRoute]) -> Result<Vec<HttpRoute>, String> {
    use types::route_filter::Kind as F;
    use types::route_match::Path;
    m.iter()
        .map(|r| {
            let bad = |e: String| format!("route {}: {e}", r.name);
            let rules = r
                .rules
                .iter()
                .map(|rule| {
                    let filters = rule
                        .filters
                        .iter()
                        .map(|f| {
                            Ok(match &f.kind {
                                None => return Err("a filter without a kind".to_owned()),
                                Some(F::RequestHeaders(h)) => {
                                    Filter::RequestHeaders(headers_from(h))
                                }
                                Some(F::ResponseHeaders(h)) => {
                                    Filter::ResponseHeaders(headers_from(h))
                                }
                                Some(F::Redirect(x)) => Filter::Redirect(Redirect {
                                    scheme: nonempty(&x.scheme),
                                    hostname: nonempty(&x.hostname),
                                    port: match x.port {
                                        0 => None,
                                        p => Some(port16("redirect port", p)?),
                                    },
                                    path: path_from(&x.path)?,
                                    status: match x.status {
                                        0 => None,
                                        s => Some(
                                            u16::try_from(s)
                                                .map_err(|_| format!("redirect status {s}"))?,
                                        ),
                                    },
                                }),
                                Some(F::Rewrite(x)) => Filter::Rewrite(Rewrite {
                                    hostname: nonempty(&x.hostname),
                                    path: path_from(&x.path)?,
                                }),
                            })
                        })
                        .collect::<Result<_, String>>()?;
                    Ok(Rule {
                        matches: rule
                            .matches
                            .iter()
                            .map(|m| Match {
                                path: m.path.as_ref().map(|p| match p {
                                    Path::Exact(s) => PathMatch::Exact(s.clone()),
                                    Path::Prefix(s) => PathMatch::Prefix(s.clone()),
                                    Path::Regex(s) => PathMatch::Regex(s.clone()),
                                }),
                                method: nonempty(&m.method),
                                headers: values_from(&m.headers),
                                query: values_from(&m.query),
                            })
                            .collect(),
                        backends: rule
                            .backends
                            .iter()
                            .map(|b| {
                                Ok(Backend {
                                    service: b.service.clone(),
                                    port: port16("backend port", b.port)?,
                                    weight: b.weight,
                                    refused: nonempty(&b.refused),
                                })
                            })
                            .collect::<Result<_, String>>()?,
                        filters,
                        timeout: timeout(rule.timeout_ms),
                        backend_timeout: timeout(rule.backend_timeout_ms),
                        retry: rule
                            .retry
                            .as_ref()
                            .map(|r| {
                                Ok::<_, String>(Retry {
                                    codes: r
                                        .codes
                                        .iter()
                                        .map(|c| {
                                            u16::try_from(*c).map_err(|_| {
                                                format!("retry code {c} is not a status")
                                            })
                                        })
                                        .collect::<Result<_, _>>()?,
                                    attempts: r.attempts,
                                    backoff: timeout(r.backoff_ms),
                                })
                            })
                            .transpose()?,
                    })
                })
                .collect::<Result<_, String>>()
                .map_err(bad)?;
            Ok(HttpRoute {
                name: r.name.clone(),
                port: match r.port {
                    0 => None,
                    p => Some(port16("port", p).map_err(bad)?),
                },
                hostnames: r.hostnames.clone(),
                rules,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn routes_survive_the_round_trip() {
        let routes: Vec<HttpRoute> = serde_json::from_value(serde_json::json!([{
            "name": "shop/api", "port": 80,
            "rules": [
                { "matches": [ { "path": { "type": "prefix", "value": "/v1" }, "method": "GET",
                                 "headers": [ { "name": "x-canary", "value": "y.*", "regex": true } ],
                                 "query": [ { "name": "a", "value": "1" } ] } ],
                  "backends": [ { "service": "api-v1.shop", "port": 80, "weight": 90 },
                                { "service": "api-v2.shop", "port": 80, "weight": 0, "refused": "not permitted" } ],
                  "filters": [ { "type": "request_headers", "set": [{"name": "x-a", "value": "1"}], "add": [{"name": "x-b", "value": "2"}], "remove": ["x-c"] },
                               { "type": "response_headers", "set": [{"name": "x-d", "value": "4"}] },
                               { "type": "rewrite", "hostname": "h", "path": { "type": "prefix", "value": "/" } } ],
                  "timeout": 1500, "backend_timeout": 500,
                  "retry": { "codes": [500, 503], "attempts": 3, "backoff": 25 } },
                { "filters": [ { "type": "redirect", "scheme": "https", "port": 8443, "status": 301,
                                 "path": { "type": "full", "value": "/x" } } ] }
            ]
        }]))
        .unwrap();
        let back = routes_from_proto(&routes_to_proto(&routes)).unwrap();
        assert_eq!(back, routes);
        let mut m = routes_to_proto(&routes);
        m[0].rules[0].backends[0].port = 70000;
        let e = routes_from_proto(&m).unwrap_err();
        assert!(
            e.contains("shop/api") && e.contains("backend port 70000"),
            "{e}"
        );
    }
}
