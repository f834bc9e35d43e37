//! Mesh routing, in the Gateway API's model (HTTPRoute and GRPCRoute whose parent is a
//! Service — GAMMA): rules with matches on path, method, headers and query; weighted backends;
//! header modifiers, redirects and URL rewrites; per-rule timeouts and retry policy.
//!
//! [`Routes::compile`] validates and compiles (regexes once); [`Routes::select`] is the pure
//! choice of a rule for a request, with the Gateway API's precedence: an exact path over a
//! regular expression over the longest prefix, then a method match, then more header matches,
//! then more query matches, then the order the routes and rules were given in.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One route (an HTTPRoute or a GRPCRoute, translated) attached to a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpRoute {
    /// `<namespace>/<name>` (or any name outside Kubernetes); ties are broken by order.
    pub name: String,
    /// The service port it applies to; none: every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The hosts it serves at the ingress gateway (`shop.example.com`, `*.example.com`);
    /// none: every host. Mesh routes ignore them, as the Gateway API says for a Service
    /// parent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    /// Its rules.
    pub rules: Vec<Rule>,
}

/// A rule: where matching requests go and what happens to them on the way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Any of these matches selects the rule; none means every request (prefix `/`).
    #[serde(default)]
    pub matches: Vec<Match>,
    /// Weighted backends (name the parent service itself to reach its own endpoints). With
    /// none, nothing is forwarded: a redirect answers, otherwise the answer is 500.
    #[serde(default)]
    pub backends: Vec<Backend>,
    /// Applied in order.
    #[serde(default)]
    pub filters: Vec<Filter>,
    /// The whole request, retries included.
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    /// Each attempt on a backend.
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub backend_timeout: Option<Duration>,
    /// Send matching requests again on these answers (the Gateway API's HTTPRoute `retry`);
    /// none: the proxy's configured retries of idempotent requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
}

/// A rule's retry policy. Requests the rule selects are explicitly retryable whatever their
/// method (a body still has to be small enough to keep); the destination's retry budget
/// still bounds them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Retry {
    /// HTTP statuses (400–599) that are retried; gRPC `UNAVAILABLE` counts as 503. Requests
    /// that could not be sent, or whose connection broke, are retried whatever the codes.
    #[serde(default)]
    pub codes: Vec<u16>,
    /// How many times a request may be sent again (0: never).
    pub attempts: u32,
    /// The least time between two attempts.
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub backoff: Option<Duration>,
}

/// The most [`Retry::attempts`] a rule may ask for.
pub const MAX_RETRY_ATTEMPTS: u32 = 10;

impl Retry {
    /// Whether an answer with `status` (and `grpc-status`, if any) is retried.
    pub fn retries(&self, status: u16, grpc_status: Option<&[u8]>) -> bool {
        self.codes.contains(&status) || (grpc_status == Some(b"14") && self.codes.contains(&503))
    }

    fn check(&self) -> Result<(), String> {
        if let Some(c) = self.codes.iter().find(|c| !(400..=599).contains(*c)) {
            return Err(format!(
                "retry code {c} is not an HTTP status from 400 to 599"
            ));
        }
        if self.attempts > MAX_RETRY_ATTEMPTS {
            return Err(format!(
                "retry attempts {} is more than {MAX_RETRY_ATTEMPTS}",
                self.attempts
            ));
        }
        Ok(())
    }
}

/// What a request must look like.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Match {
    /// The path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    /// The method, e.g. `GET`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Headers that must be present with these values (names case-insensitive).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<ValueMatch>,
    /// Query parameters that must be present with these values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query: Vec<ValueMatch>,
}

/// A path match; written `{ type: exact | prefix | regex, value: ... }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Typed", into = "Typed")]
pub enum PathMatch {
    /// The whole path.
    Exact(String),
    /// A path prefix on segment boundaries (`/api` matches `/api` and `/api/x`, not `/apix`).
    Prefix(String),
    /// A regular expression over the whole path.
    Regex(String),
}

/// A header or query parameter match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValueMatch {
    /// The name.
    pub name: String,
    /// The exact value, or a regular expression with `regex: true`.
    pub value: String,
    /// `value` is a regular expression over the whole value.
    #[serde(default)]
    pub regex: bool,
}

/// A weighted backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    /// A mesh service name (`<name>.<namespace>`).
    pub service: String,
    /// Its port.
    pub port: u16,
    /// Share of the traffic (default 1).
    #[serde(default = "one")]
    pub weight: u32,
    /// Why this backend may not be used (a reference the Gateway API does not permit): its
    /// share of the requests is answered 500 with this reason, never sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

fn one() -> u32 {
    1
}

/// What happens to a matching request on its way; written with its kind as `type`, e.g.
/// `{ type: redirect, status: 301 }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Filter {
    /// Change request headers.
    RequestHeaders(HeaderChanges),
    /// Change response headers.
    ResponseHeaders(HeaderChanges),
    /// Answer with a redirect instead of forwarding.
    Redirect(Redirect),
    /// Change the host and path before forwarding.
    Rewrite(Rewrite),
}

/// A header name and value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    /// Name (case-insensitive).
    pub name: String,
    /// Value.
    pub value: String,
}

/// Header changes: set (replace), add (append), remove.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct HeaderChanges {
    /// Replace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<Header>,
    /// Append.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<Header>,
    /// Remove.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

/// How a path is replaced; written `{ type: full | prefix, value: ... }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Typed", into = "Typed")]
pub enum PathChange {
    /// The whole path.
    Full(String),
    /// The part the rule's prefix matched (the rule must match by prefix).
    Prefix(String),
}

/// A redirect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Redirect {
    /// `http` or `https`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    /// New host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// New port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// New path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathChange>,
    /// 301 or 302 (default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
}

/// A URL rewrite.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Rewrite {
    /// New host (authority).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// New path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathChange>,
}

/// The written form of [`PathMatch`] and [`PathChange`].
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Typed {
    #[serde(rename = "type")]
    kind: String,
    value: String,
}

impl TryFrom<Typed> for PathMatch {
    type Error = String;
    fn try_from(t: Typed) -> Result<Self, String> {
        match t.kind.as_str() {
            "exact" => Ok(PathMatch::Exact(t.value)),
            "prefix" => Ok(PathMatch::Prefix(t.value)),
            "regex" => Ok(PathMatch::Regex(t.value)),
            k => Err(format!(
                "path match type {k:?}: expected exact, prefix or regex"
            )),
        }
    }
}

impl From<PathMatch> for Typed {
    fn from(p: PathMatch) -> Self {
        let (kind, value) = match p {
            PathMatch::Exact(v) => ("exact", v),
            PathMatch::Prefix(v) => ("prefix", v),
            PathMatch::Regex(v) => ("regex", v),
        };
        Typed {
            kind: kind.into(),
            value,
        }
    }
}

impl TryFrom<Typed> for PathChange {
    type Error = String;
    fn try_from(t: Typed) -> Result<Self, String> {
        match t.kind.as_str() {
            "full" => Ok(PathChange::Full(t.value)),
            "prefix" => Ok(PathChange::Prefix(t.value)),
            k => Err(format!("path change type {k:?}: expected full or prefix")),
        }
    }
}

impl From<PathChange> for Typed {
    fn from(p: PathChange) -> Self {
        let (kind, value) = match p {
            PathChange::Full(v) => ("full", v),
            PathChange::Prefix(v) => ("prefix", v),
        };
        Typed {
            kind: kind.into(),
            value,
        }
    }
}

mod opt_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_u64(d.as_millis() as u64),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_millis))
    }
}

/// Why routes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("route {route}: {why}")]
pub struct RouteError {
    /// The route.
    pub route: String,
    /// What is wrong.
    pub why: String,
}

#[derive(Debug)]
enum CPath {
    Exact(String),
    Prefix(String),
    Regex(regex::Regex),
}

#[derive(Debug)]
struct CValue {
    name: String,
    exact: Option<String>,
    regex: Option<regex::Regex>,
}

impl CValue {
    fn compile(v: &ValueMatch, lower: bool) -> Result<Self, String> {
        let name = if lower {
            v.name.to_ascii_lowercase()
        } else {
            v.name.clone()
        };
        if v.regex {
            let r = regex::Regex::new(&format!("^(?:{})$", v.value))
                .map_err(|e| format!("regular expression {:?}: {e}", v.value))?;
            Ok(Self {
                name,
                exact: None,
                regex: Some(r),
            })
        } else {
            Ok(Self {
                name,
                exact: Some(v.value.clone()),
                regex: None,
            })
        }
    }

    fn matches(&self, v: &str) -> bool {
        match (&self.exact, &self.regex) {
            (Some(e), _) => e == v,
            (None, Some(r)) => r.is_match(v),
            (None, None) => false,
        }
    }
}

#[derive(Debug)]
struct CMatch {
    path: CPath,
    method: Option<String>,
    headers: Vec<CValue>,
    query: Vec<CValue>,
}

/// The rule [`Routes::select`] chose, and which of its matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Selection {
    /// Index of the rule.
    pub rule: usize,
    /// Index of the match within it.
    pub matched: usize,
}

/// A compiled rule, with its position for tie-breaking.
#[derive(Debug)]
pub struct CompiledRule {
    /// The rule as given.
    pub rule: Rule,
    /// The route's name.
    pub route: String,
    /// Its index among the route's rules.
    pub index: usize,
    matches: Vec<CMatch>,
    order: (usize, usize),
}

/// A service's routes, compiled.
#[derive(Debug, Default)]
pub struct Routes {
    rules: Vec<CompiledRule>,
}

/// Whether any value of a header (by lowercase name) satisfies a predicate.
pub type HeaderLookup<'a> = dyn Fn(&str, &dyn Fn(&str) -> bool) -> bool + 'a;

/// What a request offers to matching.
#[derive(Clone, Copy)]
pub struct RequestFacts<'a> {
    /// Method.
    pub method: &'a str,
    /// Path (normalized).
    pub path: &'a str,
    /// The query string, without `?`.
    pub query: Option<&'a str>,
    /// Whether any value of the header with this lowercase name satisfies the predicate.
    pub header: &'a HeaderLookup<'a>,
}

impl std::fmt::Debug for RequestFacts<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestFacts")
            .field("method", &self.method)
            .field("path", &self.path)
            .field("query", &self.query)
            .finish_non_exhaustive()
    }
}

/// Precedence of a matched rule: higher is preferred.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Rank {
    kind: u8,
    prefix_len: usize,
    method: bool,
    headers: usize,
    query: usize,
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    let p = prefix.trim_end_matches('/');
    if p.is_empty() {
        return true;
    }
    path == p
        || path
            .strip_prefix(p)
            .is_some_and(|rest| rest.starts_with('/'))
}

impl CMatch {
    fn rank(&self, r: &RequestFacts<'_>) -> Option<Rank> {
        let (kind, prefix_len) = match &self.path {
            CPath::Exact(p) if p == r.path => (3, p.len()),
            CPath::Regex(re) if re.is_match(r.path) => (2, 0),
            CPath::Prefix(p) if prefix_matches(p, r.path) => (1, p.trim_end_matches('/').len()),
            _ => return None,
        };
        if let Some(m) = &self.method
            && !m.eq_ignore_ascii_case(r.method)
        {
            return None;
        }
        for h in &self.headers {
            if !(r.header)(&h.name, &|v| h.matches(v)) {
                return None;
            }
        }
        let params: Vec<(&str, &str)> = r
            .query
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| p.split_once('=').unwrap_or((p, "")))
            .collect();
        for q in &self.query {
            if !params.iter().any(|(k, v)| *k == q.name && q.matches(v)) {
                return None;
            }
        }
        Some(Rank {
            kind,
            prefix_len,
            method: self.method.is_some(),
            headers: self.headers.len(),
            query: self.query.len(),
        })
    }
}

impl Routes {
    /// Validates and compiles `routes` (in the order they apply on ties).
    pub fn compile(routes: &[HttpRoute]) -> Result<Self, RouteError> {
        let mut rules = Vec::new();
        for (ri, route) in routes.iter().enumerate() {
            let bad = |why: String| RouteError {
                route: route.name.clone(),
                why,
            };
            for (i, rule) in route.rules.iter().enumerate() {
                let mut matches = Vec::new();
                let given = if rule.matches.is_empty() {
                    vec![Match::default()]
                } else {
                    rule.matches.clone()
                };
                for m in &given {
                    let path = match &m.path {
                        None => CPath::Prefix("/".into()),
                        Some(PathMatch::Exact(p)) | Some(PathMatch::Prefix(p))
                            if !p.starts_with('/') =>
                        {
                            return Err(bad(format!("rule {i}: path {p:?} must start with '/'")));
                        }
                        Some(PathMatch::Exact(p)) => CPath::Exact(p.clone()),
                        Some(PathMatch::Prefix(p)) => CPath::Prefix(p.clone()),
                        Some(PathMatch::Regex(r)) => CPath::Regex(
                            regex::Regex::new(&format!("^(?:{r})$"))
                                .map_err(|e| bad(format!("rule {i}: path regex {r:?}: {e}")))?,
                        ),
                    };
                    let headers = m
                        .headers
                        .iter()
                        .map(|h| CValue::compile(h, true))
                        .collect::<Result<_, _>>()
                        .map_err(|e| bad(format!("rule {i}: header {e}")))?;
                    let query = m
                        .query
                        .iter()
                        .map(|q| CValue::compile(q, false))
                        .collect::<Result<_, _>>()
                        .map_err(|e| bad(format!("rule {i}: query {e}")))?;
                    matches.push(CMatch {
                        path,
                        method: m.method.clone(),
                        headers,
                        query,
                    });
                }
                for f in &rule.filters {
                    if let Filter::RequestHeaders(c) | Filter::ResponseHeaders(c) = f {
                        check_changes(c).map_err(|e| bad(format!("rule {i}: {e}")))?;
                    }
                }
                if let Some(r) = &rule.retry {
                    r.check().map_err(|e| bad(format!("rule {i}: {e}")))?;
                }
                for b in &rule.backends {
                    if b.service.is_empty() || b.port == 0 {
                        return Err(bad(format!(
                            "rule {i}: a backend needs a service and a port"
                        )));
                    }
                }
                let redirects = rule
                    .filters
                    .iter()
                    .filter(|f| matches!(f, Filter::Redirect(_)))
                    .count();
                let rewrites = rule
                    .filters
                    .iter()
                    .filter(|f| matches!(f, Filter::Rewrite(_)))
                    .count();
                if redirects > 1 || rewrites > 1 || (redirects == 1 && rewrites == 1) {
                    return Err(bad(format!(
                        "rule {i}: at most one redirect or one rewrite, not both"
                    )));
                }
                let prefix_change = rule.filters.iter().any(|f| {
                    matches!(
                        f,
                        Filter::Redirect(Redirect {
                            path: Some(PathChange::Prefix(_)),
                            ..
                        }) | Filter::Rewrite(Rewrite {
                            path: Some(PathChange::Prefix(_)),
                            ..
                        })
                    )
                });
                if prefix_change && matches.iter().any(|m| !matches!(m.path, CPath::Prefix(_))) {
                    return Err(bad(format!(
                        "rule {i}: a prefix replacement needs prefix path matches"
                    )));
                }
                if let Some(Filter::Redirect(r)) = rule
                    .filters
                    .iter()
                    .find(|f| matches!(f, Filter::Redirect(_)))
                    && r.status.is_some_and(|s| s != 301 && s != 302)
                {
                    return Err(bad(format!("rule {i}: redirect status must be 301 or 302")));
                }
                rules.push(CompiledRule {
                    rule: rule.clone(),
                    route: route.name.clone(),
                    index: i,
                    matches,
                    order: (ri, i),
                });
            }
        }
        Ok(Self { rules })
    }

    /// True when there are no rules.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rule for a request, if any matches.
    pub fn select(&self, r: &RequestFacts<'_>) -> Option<Selection> {
        let mut best: Option<(Rank, (usize, usize), Selection)> = None;
        for (ri, rule) in self.rules.iter().enumerate() {
            for (mi, m) in rule.matches.iter().enumerate() {
                let Some(rank) = m.rank(r) else { continue };
                let better = match &best {
                    None => true,
                    Some((b, order, _)) => rank > *b || (rank == *b && rule.order < *order),
                };
                if better {
                    best = Some((
                        rank,
                        rule.order,
                        Selection {
                            rule: ri,
                            matched: mi,
                        },
                    ));
                }
            }
        }
        best.map(|(.., s)| s)
    }

    /// The selected rule.
    pub fn rule(&self, s: Selection) -> &CompiledRule {
        &self.rules[s.rule]
    }

    /// The prefix the selected match used, when it matched by prefix (for prefix
    /// replacements).
    pub fn prefix(&self, s: Selection) -> Option<&str> {
        match &self.rules[s.rule].matches[s.matched].path {
            CPath::Prefix(p) => Some(p),
            _ => None,
        }
    }

    /// The rules, in the order they were given.
    pub fn rules(&self) -> impl Iterator<Item = &CompiledRule> {
        self.rules.iter()
    }

    /// How many rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }
}

/// A header name is an RFC 9110 token.
fn token(n: &str) -> bool {
    !n.is_empty()
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn check_changes(c: &HeaderChanges) -> Result<(), String> {
    let names = c
        .set
        .iter()
        .chain(&c.add)
        .map(|h| h.name.as_str())
        .chain(c.remove.iter().map(String::as_str));
    for n in names {
        if !token(n) {
            return Err(format!("header name {n:?} is not a valid name"));
        }
        if n.eq_ignore_ascii_case("host") {
            return Err("the Host header is changed with a rewrite, not a header filter".into());
        }
    }
    for h in c.set.iter().chain(&c.add) {
        if h.value.bytes().any(|b| b < 0x20 && b != b'\t' || b == 0x7f) {
            return Err(format!(
                "header {:?}: the value has control characters",
                h.name
            ));
        }
    }
    Ok(())
}

/// Picks a backend by weight; `roll` is uniform in `0..total weight`. `None` when every
/// weight is 0 (the Gateway API answers 500 then).
pub fn pick_backend<'a>(
    backends: &'a [Backend],
    roll: &mut dyn FnMut(u64) -> u64,
) -> Option<&'a Backend> {
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut x = roll(total);
    for b in backends {
        let w = u64::from(b.weight);
        if x < w {
            return Some(b);
        }
        x -= w;
    }
    None
}

/// The new path when `change` applies to `path`, matched by `prefix` (if any).
pub fn change_path(path: &str, change: &PathChange, prefix: Option<&str>) -> String {
    match change {
        PathChange::Full(p) => p.clone(),
        PathChange::Prefix(to) => {
            let from = prefix.unwrap_or("/").trim_end_matches('/');
            let rest = path.strip_prefix(from).unwrap_or(path);
            let to = to.trim_end_matches('/');
            match (to.is_empty(), rest.is_empty()) {
                (true, true) => "/".into(),
                (true, false) => rest.to_owned(),
                (false, _) => format!("{to}{rest}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, rules: Vec<Rule>) -> HttpRoute {
        HttpRoute {
            hostnames: Vec::new(),
            name: name.into(),
            port: None,
            rules,
        }
    }

    fn rule(matches: Vec<Match>, backend: &str) -> Rule {
        Rule {
            matches,
            backends: vec![Backend {
                service: backend.into(),
                port: 80,
                weight: 1,
                refused: None,
            }],
            ..Default::default()
        }
    }

    fn path(p: PathMatch) -> Match {
        Match {
            path: Some(p),
            ..Default::default()
        }
    }

    fn pick<'a>(
        rs: &'a Routes,
        method: &str,
        p: &str,
        query: Option<&str>,
        h: &[(&str, &str)],
    ) -> Option<&'a str> {
        let header = |name: &str, ok: &dyn Fn(&str) -> bool| {
            h.iter().any(|(k, v)| k.eq_ignore_ascii_case(name) && ok(v))
        };
        let facts = RequestFacts {
            method,
            path: p,
            query,
            header: &header,
        };
        rs.select(&facts)
            .map(|sel| rs.rule(sel).rule.backends[0].service.as_str())
    }

    #[test]
    fn precedence_follows_the_gateway_api() {
        let rs = Routes::compile(&[
            route(
                "a",
                vec![
                    rule(vec![path(PathMatch::Prefix("/".into()))], "root"),
                    rule(vec![path(PathMatch::Prefix("/api".into()))], "api"),
                    rule(vec![path(PathMatch::Prefix("/api/v2".into()))], "v2"),
                    rule(
                        vec![path(PathMatch::Exact("/api/v2/exact".into()))],
                        "exact",
                    ),
                    rule(
                        vec![path(PathMatch::Regex("/api/v2/[0-9]+".into()))],
                        "regex",
                    ),
                    rule(
                        vec![Match {
                            path: Some(PathMatch::Prefix("/api".into())),
                            method: Some("POST".into()),
                            ..Default::default()
                        }],
                        "post",
                    ),
                    rule(
                        vec![Match {
                            path: Some(PathMatch::Prefix("/api".into())),
                            headers: vec![ValueMatch {
                                name: "X-Canary".into(),
                                value: "yes".into(),
                                regex: false,
                            }],
                            ..Default::default()
                        }],
                        "canary",
                    ),
                    rule(
                        vec![Match {
                            path: Some(PathMatch::Prefix("/api".into())),
                            query: vec![ValueMatch {
                                name: "debug".into(),
                                value: "[01]".into(),
                                regex: true,
                            }],
                            ..Default::default()
                        }],
                        "debug",
                    ),
                ],
            ),
            route(
                "b",
                vec![rule(vec![path(PathMatch::Prefix("/api".into()))], "later")],
            ),
        ])
        .unwrap();
        assert_eq!(pick(&rs, "GET", "/", None, &[]), Some("root"));
        assert_eq!(
            pick(&rs, "GET", "/apix", None, &[]),
            Some("root"),
            "segment boundaries"
        );
        assert_eq!(
            pick(&rs, "GET", "/api/x", None, &[]),
            Some("api"),
            "earlier route wins ties"
        );
        assert_eq!(
            pick(&rs, "GET", "/api/v2/x", None, &[]),
            Some("v2"),
            "longest prefix"
        );
        assert_eq!(pick(&rs, "GET", "/api/v2/exact", None, &[]), Some("exact"));
        assert_eq!(pick(&rs, "GET", "/api/v2/42", None, &[]), Some("regex"));
        assert_eq!(
            pick(&rs, "POST", "/api/x", None, &[]),
            Some("post"),
            "method beats headers"
        );
        assert_eq!(
            pick(&rs, "GET", "/api/x", None, &[("x-canary", "yes")]),
            Some("canary")
        );
        assert_eq!(
            pick(&rs, "GET", "/api/x", None, &[("x-canary", "no")]),
            Some("api")
        );
        assert_eq!(
            pick(&rs, "GET", "/api/x", Some("a=1&debug=1"), &[]),
            Some("debug")
        );
        assert_eq!(
            pick(&rs, "GET", "/api/x", Some("debug=2"), &[]),
            Some("api")
        );
    }

    #[test]
    fn invalid_routes_are_refused_with_a_reason() {
        let bad = |r: Rule| {
            Routes::compile(&[route("r", vec![r])])
                .unwrap_err()
                .to_string()
        };
        assert!(bad(rule(vec![path(PathMatch::Regex("(".into()))], "x")).contains("regex"));
        assert!(
            bad(rule(vec![path(PathMatch::Exact("nope".into()))], "x")).contains("start with '/'")
        );
        let mut r = rule(vec![path(PathMatch::Exact("/x".into()))], "x");
        r.filters = vec![Filter::Rewrite(Rewrite {
            path: Some(PathChange::Prefix("/y".into())),
            ..Default::default()
        })];
        assert!(bad(r).contains("prefix replacement"));
        let mut r = rule(vec![], "x");
        r.filters = vec![Filter::Redirect(Redirect {
            status: Some(307),
            ..Default::default()
        })];
        assert!(bad(r).contains("301 or 302"));
        let mut r = rule(vec![], "x");
        r.retry = Some(Retry {
            codes: vec![503, 200],
            attempts: 1,
            backoff: None,
        });
        assert!(bad(r).contains("retry code 200"));
        let mut r = rule(vec![], "x");
        r.retry = Some(Retry {
            codes: vec![503],
            attempts: 11,
            backoff: None,
        });
        assert!(bad(r).contains("retry attempts 11"));
    }

    #[test]
    fn retry_codes_cover_grpc_unavailable_as_503() {
        let r = Retry {
            codes: vec![500, 503],
            attempts: 2,
            backoff: Some(Duration::from_millis(5)),
        };
        assert!(r.retries(500, None));
        assert!(!r.retries(502, None));
        assert!(r.retries(200, Some(b"14")));
        assert!(!r.retries(200, Some(b"13")));
        let only500 = Retry {
            codes: vec![500],
            ..r.clone()
        };
        assert!(!only500.retries(200, Some(b"14")));
        let y: Rule = serde_json::from_str(
            r#"{"retry": {"codes": [500, 503], "attempts": 2, "backoff": 5}}"#,
        )
        .unwrap();
        assert_eq!(y.retry, Some(r));
    }

    #[test]
    fn the_written_form_is_checked() {
        let parse = |y: &str| serde_json::from_str::<Rule>(y).map_err(|e| e.to_string());
        let ok = parse(
            r#"{"matches": [{"path": {"type": "prefix", "value": "/a"}}],
                "filters": [{"type": "redirect", "status": 301, "path": {"type": "full", "value": "/b"}}]}"#,
        )
        .unwrap();
        assert_eq!(ok.matches[0].path, Some(PathMatch::Prefix("/a".into())));
        assert!(
            parse(r#"{"filters": [{"type": "redirect", "bogus": 1}]}"#)
                .unwrap_err()
                .contains("bogus")
        );
        assert!(
            parse(r#"{"filters": [{"type": "mirror"}]}"#)
                .unwrap_err()
                .contains("mirror")
        );
        assert!(
            parse(r#"{"matches": [{"path": {"type": "glob", "value": "/a"}}]}"#)
                .unwrap_err()
                .contains("expected exact, prefix or regex")
        );
    }

    #[test]
    fn weights_and_path_changes() {
        let b = vec![
            Backend {
                service: "a".into(),
                port: 80,
                weight: 90,
                refused: None,
            },
            Backend {
                service: "b".into(),
                port: 80,
                weight: 10,
                refused: None,
            },
            Backend {
                service: "c".into(),
                port: 80,
                weight: 0,
                refused: None,
            },
        ];
        let mut seen = std::collections::HashMap::new();
        for x in 0..100u64 {
            let mut roll = |_n: u64| x;
            *seen
                .entry(pick_backend(&b, &mut roll).unwrap().service.clone())
                .or_insert(0) += 1;
        }
        assert_eq!((seen["a"], seen["b"], seen.get("c")), (90, 10, None));
        let zero = vec![Backend {
            service: "z".into(),
            port: 80,
            weight: 0,
            refused: None,
        }];
        assert!(pick_backend(&zero, &mut |_| 0).is_none());
        assert_eq!(
            change_path(
                "/api/v1/x",
                &PathChange::Prefix("/v2".into()),
                Some("/api/v1")
            ),
            "/v2/x"
        );
        assert_eq!(
            change_path("/api", &PathChange::Prefix("/".into()), Some("/api")),
            "/"
        );
        assert_eq!(
            change_path("/api/x", &PathChange::Prefix("/".into()), Some("/api")),
            "/x"
        );
        assert_eq!(
            change_path("/a", &PathChange::Full("/b".into()), None),
            "/b"
        );
    }
}
