//! Authorization policies: the model (as written in policy files, CA records and CRDs), its
//! validation, and evaluation of one request. Pure and allocation-free on the allow path.
//!
//! Semantics (after Istio's AuthorizationPolicy): among the policies that target the
//! destination workload, any matching `DENY` denies; otherwise, if any `ALLOW` policy targets
//! the workload, the request is allowed iff one of them matches; if none does, the configured
//! default applies. `AUDIT` policies never change the decision; a match is reported so the
//! access log can flag the request. A rule matches when one of its `from` sources (or none
//! given) and one of its `to` operations (or none given) match. HTTP-only conditions (methods,
//! paths) never match a TCP connection in `ALLOW`/`AUDIT` policies and always do in `DENY`
//! policies, so a policy written for HTTP fails closed when applied to TCP.

pub mod path;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::id::{SpiffeId, TrustDomain};

/// What a policy does when it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    /// Allow matching requests (and deny the rest, unless another ALLOW matches).
    Allow,
    /// Deny matching requests.
    Deny,
    /// Flag matching requests in the access log.
    Audit,
}

/// The workloads a policy applies to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// SPIFFE ID patterns of the destination workloads.
    pub spiffe_ids: Vec<String>,
}

/// Who a request comes from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Source {
    /// SPIFFE ID patterns (exact, `prefix*`, `*suffix`, `*`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    /// Patterns the source must not match.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<String>,
    /// Trust domains.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub trust_domains: Vec<String>,
    /// Trust domains the source must not be in.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_trust_domains: Vec<String>,
    /// Kubernetes namespaces (from IDs shaped `.../ns/<namespace>/...`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Namespaces the source must not be in.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
}

/// What a request does.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Operation {
    /// HTTP methods.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Methods excluded.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<String>,
    /// Path patterns (exact, `/prefix/*`, `*suffix`, `*`), matched on the normalized path.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// Paths excluded.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<String>,
    /// Destination ports.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    /// Ports excluded.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<u16>,
}

/// One rule.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Rule {
    /// Sources; empty matches every source, authenticated or not.
    pub from: Vec<Source>,
    /// Operations; empty matches every operation.
    pub to: Vec<Operation>,
}

/// A policy as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Unique name.
    pub name: String,
    /// Destination workloads.
    pub target: Target,
    /// ALLOW, DENY or AUDIT.
    pub action: Action,
    /// Rules; a policy with no rules matches nothing.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// A policy file: `policies: [...]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyDoc {
    /// The policies.
    #[serde(default)]
    pub policies: Vec<Policy>,
}

/// What applies when no ALLOW policy targets a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum DefaultPolicy {
    /// Deny everything.
    #[default]
    Deny,
    /// Allow any peer with a verified SVID of a trusted trust domain.
    AllAuthenticated,
    /// Allow peers of the destination's trust domain.
    SameTrustDomain,
    /// Allow everyone, including unauthenticated peers (permissive mode).
    AllUnauthenticated,
}

/// Why a policy set was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("policy {policy:?}: {message}")]
pub struct PolicyError {
    /// The policy's name (or index if unnamed).
    pub policy: String,
    /// What is wrong, naming the field.
    pub message: String,
}

/// A string pattern: `*`, exact, `prefix*` or `*suffix`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pat {
    Any,
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl Pat {
    fn parse(s: &str) -> Result<Pat, String> {
        if s.is_empty() {
            return Err("empty pattern".into());
        }
        if s == "*" {
            return Ok(Pat::Any);
        }
        let inner = s.trim_start_matches('*').trim_end_matches('*');
        if inner.contains('*') || (s.starts_with('*') && s.ends_with('*')) {
            return Err(format!(
                "pattern {s:?}: `*` only as the whole pattern, a prefix or a suffix"
            ));
        }
        Ok(if let Some(p) = s.strip_suffix('*') {
            Pat::Prefix(p.to_owned())
        } else if let Some(p) = s.strip_prefix('*') {
            Pat::Suffix(p.to_owned())
        } else {
            Pat::Exact(s.to_owned())
        })
    }

    fn matches(&self, s: &str) -> bool {
        match self {
            Pat::Any => true,
            Pat::Exact(e) => s == e,
            Pat::Prefix(p) => s.starts_with(p.as_str()),
            Pat::Suffix(p) => s.ends_with(p.as_str()),
        }
    }
}

fn id_pattern(s: &str) -> Result<Pat, String> {
    let p = Pat::parse(s)?;
    match &p {
        Pat::Exact(e) => {
            SpiffeId::new(e).map_err(|err| format!("{e:?} is not a SPIFFE ID: {err}"))?;
        }
        Pat::Prefix(e) if !e.starts_with("spiffe://") => {
            return Err(format!("prefix pattern {s:?} must start with spiffe://"));
        }
        _ => {}
    }
    Ok(p)
}

fn path_pattern(s: &str) -> Result<Pat, String> {
    let p = Pat::parse(s)?;
    if let Pat::Exact(e) | Pat::Prefix(e) = &p
        && !e.starts_with('/')
    {
        return Err(format!("path pattern {s:?} must start with `/`"));
    }
    Ok(p)
}

fn method(s: &str) -> Result<String, String> {
    if s.is_empty()
        || !s
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_')
    {
        return Err(format!("method {s:?} must be an uppercase HTTP method"));
    }
    Ok(s.to_owned())
}

fn namespace(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!("namespace {s:?} is not a valid Kubernetes name"))
    }
}

fn trust_domain(s: &str) -> Result<String, String> {
    TrustDomain::new(s)
        .map(|td| td.name().to_owned())
        .map_err(|e| format!("trust domain {s:?}: {e}"))
}

fn all<T>(v: &[String], f: impl Fn(&str) -> Result<T, String>) -> Result<Vec<T>, String> {
    v.iter().map(|s| f(s)).collect()
}

#[derive(Debug, Clone)]
struct CSource {
    principals: Vec<Pat>,
    not_principals: Vec<Pat>,
    trust_domains: Vec<String>,
    not_trust_domains: Vec<String>,
    namespaces: Vec<String>,
    not_namespaces: Vec<String>,
}

#[derive(Debug, Clone)]
struct COperation {
    methods: Vec<String>,
    not_methods: Vec<String>,
    paths: Vec<Pat>,
    not_paths: Vec<Pat>,
    ports: Vec<u16>,
    not_ports: Vec<u16>,
}

#[derive(Debug, Clone)]
struct CRule {
    from: Vec<CSource>,
    to: Vec<COperation>,
}

#[derive(Debug, Clone)]
struct CPolicy {
    name: Arc<str>,
    action: Action,
    targets: Vec<Pat>,
    rules: Vec<CRule>,
}

fn compile_policy(p: &Policy) -> Result<CPolicy, String> {
    if p.target.spiffe_ids.is_empty() {
        return Err("target.spiffe_ids must name at least one workload (use \"*\" for all)".into());
    }
    let targets =
        all(&p.target.spiffe_ids, id_pattern).map_err(|e| format!("target.spiffe_ids: {e}"))?;
    let mut rules = Vec::new();
    for (ri, r) in p.rules.iter().enumerate() {
        let mut from = Vec::new();
        for (si, s) in r.from.iter().enumerate() {
            let ctx = |e: String| format!("rules[{ri}].from[{si}]: {e}");
            from.push(SourceMatcher::compile(s).map_err(ctx)?.0);
        }
        let mut to = Vec::new();
        for (oi, o) in r.to.iter().enumerate() {
            let ctx = |e: String| format!("rules[{ri}].to[{oi}]: {e}");
            to.push(COperation {
                methods: all(&o.methods, method).map_err(ctx)?,
                not_methods: all(&o.not_methods, method).map_err(ctx)?,
                paths: all(&o.paths, path_pattern).map_err(ctx)?,
                not_paths: all(&o.not_paths, path_pattern).map_err(ctx)?,
                ports: o.ports.clone(),
                not_ports: o.not_ports.clone(),
            });
        }
        rules.push(CRule { from, to });
    }
    Ok(CPolicy {
        name: Arc::from(p.name.as_str()),
        action: p.action,
        targets,
        rules,
    })
}

/// A [`Source`], checked and compiled, to match callers with outside policies (egress grants
/// use the same `from` semantics as authorization rules).
#[derive(Debug, Clone)]
pub struct SourceMatcher(CSource);

impl SourceMatcher {
    /// Checks `s` (patterns, trust domains, namespaces) and compiles it.
    pub fn compile(s: &Source) -> Result<Self, String> {
        Ok(Self(CSource {
            principals: all(&s.principals, id_pattern)?,
            not_principals: all(&s.not_principals, id_pattern)?,
            trust_domains: all(&s.trust_domains, trust_domain)?,
            not_trust_domains: all(&s.not_trust_domains, trust_domain)?,
            namespaces: all(&s.namespaces, namespace)?,
            not_namespaces: all(&s.not_namespaces, namespace)?,
        }))
    }

    /// Whether `src` matches (an unidentified caller matches only a source with no positive
    /// conditions).
    pub fn matches(&self, src: Option<&SpiffeId>) -> bool {
        source_matches(&self.0, src).is_ok()
    }
}

/// The attributes of one request (or TCP connection) to authorize.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The verified peer; `None` if unauthenticated.
    pub source: Option<&'a SpiffeId>,
    /// The destination workload.
    pub target: &'a SpiffeId,
    /// HTTP method (`None` for TCP).
    pub method: Option<&'a str>,
    /// Normalized HTTP path without query (`None` for TCP).
    pub path: Option<&'a str>,
    /// Destination port.
    pub port: u16,
}

/// Why a decision was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// A DENY policy matched.
    DeniedByPolicy,
    /// An ALLOW policy matched.
    AllowedByPolicy,
    /// ALLOW policies target the workload and none matched.
    NoAllowMatched,
    /// No ALLOW policy targets the workload; the default decided.
    Default(DefaultPolicy),
    /// The request path is ambiguous (see [`path::normalize`]); no policy was consulted.
    InvalidPath,
}

/// The outcome of evaluating a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Whether the request may proceed.
    pub allowed: bool,
    /// Why.
    pub reason: Reason,
    /// The deciding policy, if a policy decided.
    pub policy: Option<Arc<str>>,
    /// The deciding rule's index within that policy.
    pub rule: Option<usize>,
    /// The first AUDIT policy that matched, if any.
    pub audit: Option<Arc<str>>,
}

impl Verdict {
    /// A short reason for logs and 403 bodies.
    pub fn describe(&self) -> String {
        match (&self.reason, &self.policy) {
            (Reason::DeniedByPolicy, Some(p)) => format!("denied by policy {p}"),
            (Reason::AllowedByPolicy, Some(p)) => format!("allowed by policy {p}"),
            (Reason::NoAllowMatched, _) => "no ALLOW policy matched".into(),
            (Reason::Default(d), _) => format!("default policy {}", default_name(*d)),
            (Reason::InvalidPath, _) => "ambiguous request path".into(),
            _ => "unknown".into(),
        }
    }
}

fn default_name(d: DefaultPolicy) -> &'static str {
    match d {
        DefaultPolicy::Deny => "deny",
        DefaultPolicy::AllAuthenticated => "all-authenticated",
        DefaultPolicy::SameTrustDomain => "same-trust-domain",
        DefaultPolicy::AllUnauthenticated => "all-unauthenticated",
    }
}

impl fmt::Display for DefaultPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(default_name(*self))
    }
}

/// Why a rule did not match (for `explain`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mismatch {
    /// No `from` source matched; the field of the last source checked.
    From(&'static str),
    /// No `to` operation matched; the field of the last operation checked.
    To(&'static str),
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mismatch::From(field) => write!(f, "no source matched (`{field}`)"),
            Mismatch::To(field) => write!(f, "no operation matched (`{field}`)"),
        }
    }
}

/// The Kubernetes namespace an ID names (`.../ns/<namespace>/...`), if any.
pub fn namespace_of(id: &SpiffeId) -> Option<&str> {
    let mut segs = id.path().split('/').skip(1);
    while let Some(s) = segs.next() {
        if s == "ns" {
            return segs.next();
        }
    }
    None
}

fn source_matches(s: &CSource, src: Option<&SpiffeId>) -> Result<(), &'static str> {
    let id = src.map(SpiffeId::as_str);
    let td = src.map(SpiffeId::trust_domain_name);
    let ns = src.and_then(namespace_of);
    let pos = |field, pats: &[Pat]| {
        if pats.is_empty() || id.is_some_and(|id| pats.iter().any(|p| p.matches(id))) {
            Ok(())
        } else {
            Err(field)
        }
    };
    let neg = |field, pats: &[Pat]| {
        if id.is_some_and(|id| pats.iter().any(|p| p.matches(id))) {
            Err(field)
        } else {
            Ok(())
        }
    };
    let pos_s = |field, vals: &[String], v: Option<&str>| {
        if vals.is_empty() || v.is_some_and(|v| vals.iter().any(|x| x == v)) {
            Ok(())
        } else {
            Err(field)
        }
    };
    let neg_s = |field, vals: &[String], v: Option<&str>| {
        if v.is_some_and(|v| vals.iter().any(|x| x == v)) {
            Err(field)
        } else {
            Ok(())
        }
    };
    pos("principals", &s.principals)?;
    neg("not_principals", &s.not_principals)?;
    pos_s("trust_domains", &s.trust_domains, td)?;
    neg_s("not_trust_domains", &s.not_trust_domains, td)?;
    pos_s("namespaces", &s.namespaces, ns)?;
    neg_s("not_namespaces", &s.not_namespaces, ns)?;
    Ok(())
}

fn operation_matches(
    o: &COperation,
    req: &Request<'_>,
    action: Action,
) -> Result<(), &'static str> {
    // HTTP-only conditions on a TCP connection: fail closed (DENY matches, ALLOW/AUDIT don't).
    let http_field = |field, present: bool| -> Option<Result<(), &'static str>> {
        if present && req.method.is_none() {
            Some(if action == Action::Deny {
                Ok(())
            } else {
                Err(field)
            })
        } else {
            None
        }
    };
    let check_methods = http_field(
        "methods",
        !o.methods.is_empty() || !o.not_methods.is_empty(),
    );
    match check_methods {
        Some(r) => r?,
        None => {
            if let Some(m) = req.method {
                if !o.methods.is_empty() && !o.methods.iter().any(|x| x == m) {
                    return Err("methods");
                }
                if o.not_methods.iter().any(|x| x == m) {
                    return Err("not_methods");
                }
            }
        }
    }
    match http_field("paths", !o.paths.is_empty() || !o.not_paths.is_empty()) {
        Some(r) => r?,
        None => {
            if let Some(p) = req.path {
                if !o.paths.is_empty() && !o.paths.iter().any(|x| x.matches(p)) {
                    return Err("paths");
                }
                if o.not_paths.iter().any(|x| x.matches(p)) {
                    return Err("not_paths");
                }
            }
        }
    }
    if !o.ports.is_empty() && !o.ports.contains(&req.port) {
        return Err("ports");
    }
    if o.not_ports.contains(&req.port) {
        return Err("not_ports");
    }
    Ok(())
}

fn rule_matches(r: &CRule, req: &Request<'_>, action: Action) -> Result<(), Mismatch> {
    if !r.from.is_empty() {
        let mut last = "principals";
        if !r.from.iter().any(|s| match source_matches(s, req.source) {
            Ok(()) => true,
            Err(f) => {
                last = f;
                false
            }
        }) {
            return Err(Mismatch::From(last));
        }
    }
    if !r.to.is_empty() {
        let mut last = "methods";
        if !r
            .to
            .iter()
            .any(|o| match operation_matches(o, req, action) {
                Ok(()) => true,
                Err(f) => {
                    last = f;
                    false
                }
            })
        {
            return Err(Mismatch::To(last));
        }
    }
    Ok(())
}

/// A validated, indexed set of policies.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    policies: Vec<CPolicy>,
    by_target: HashMap<String, Vec<usize>>,
    wildcard: Vec<usize>,
    source: Vec<Policy>,
}

impl PolicySet {
    /// Validates and indexes policies. Names must be unique.
    pub fn compile(policies: Vec<Policy>) -> Result<Self, PolicyError> {
        let mut set = PolicySet::default();
        let mut names = std::collections::HashSet::new();
        for (i, p) in policies.iter().enumerate() {
            let label = if p.name.is_empty() {
                format!("#{i}")
            } else {
                p.name.clone()
            };
            let err = |message: String| PolicyError {
                policy: label.clone(),
                message,
            };
            if p.name.is_empty()
                || p.name.len() > 253
                || p.name.chars().any(|c| c.is_control() || c.is_whitespace())
            {
                return Err(err("name must be 1-253 characters without spaces".into()));
            }
            if !names.insert(p.name.clone()) {
                return Err(err("duplicate policy name".into()));
            }
            let c = compile_policy(p).map_err(err)?;
            let idx = set.policies.len();
            let mut exact_only = true;
            for t in &c.targets {
                match t {
                    Pat::Exact(id) => set.by_target.entry(id.clone()).or_default().push(idx),
                    _ => exact_only = false,
                }
            }
            if !exact_only {
                set.wildcard.push(idx);
            }
            set.policies.push(c);
        }
        set.source = policies;
        Ok(set)
    }

    /// Parses a YAML or JSON policy document (`policies: [...]`) and compiles it.
    pub fn from_doc(doc: PolicyDoc) -> Result<Self, PolicyError> {
        Self::compile(doc.policies)
    }

    /// The policies as written.
    pub fn policies(&self) -> &[Policy] {
        &self.source
    }

    /// Number of policies.
    pub fn len(&self) -> usize {
        self.policies.len()
    }

    /// True if there are none.
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// The policies (as written) that target `target`, in definition order.
    pub fn policies_targeting(&self, target: &SpiffeId) -> Vec<Policy> {
        self.targeting_idx(target)
            .into_iter()
            .map(|i| self.source[i].clone())
            .collect()
    }

    fn targeting_idx(&self, target: &SpiffeId) -> Vec<usize> {
        let exact = self
            .by_target
            .get(target.as_str())
            .map(Vec::as_slice)
            .unwrap_or_default();
        let wild = self.wildcard.iter().filter(|i| {
            self.policies[**i]
                .targets
                .iter()
                .any(|t| t.matches(target.as_str()))
        });
        let mut idx: Vec<usize> = exact.iter().copied().chain(wild.copied()).collect();
        idx.sort_unstable();
        idx.dedup();
        idx
    }

    /// The compiled policies targeting `target`, in definition order.
    fn targeting(&self, target: &SpiffeId) -> impl Iterator<Item = &CPolicy> {
        self.targeting_idx(target)
            .into_iter()
            .map(|i| &self.policies[i])
    }

    /// Evaluates `req` with `default` applying when no ALLOW policy targets the destination.
    pub fn evaluate(&self, req: &Request<'_>, default: DefaultPolicy) -> Verdict {
        decide(self.targeting(req.target), req, default)
    }

    /// The policies that target `target`, ready for repeated evaluation without lookups (a
    /// proxy evaluates every request against its own workload's view).
    pub fn for_target(&self, target: &SpiffeId) -> TargetPolicies {
        TargetPolicies {
            target: target.clone(),
            policies: self.targeting(target).cloned().collect(),
        }
    }

    /// Evaluates `req` and explains it: the verdict, and for every policy targeting the
    /// destination, whether each rule matched and if not, why.
    pub fn explain(&self, req: &Request<'_>, default: DefaultPolicy) -> Explanation {
        let verdict = self.evaluate(req, default);
        let mut policies = Vec::new();
        for p in self.targeting(req.target) {
            let rules = p
                .rules
                .iter()
                .map(|r| rule_matches(r, req, p.action).err())
                .collect();
            policies.push(PolicyExplanation {
                name: p.name.to_string(),
                action: p.action,
                rules,
            });
        }
        Explanation { verdict, policies }
    }
}

/// The policies targeting one workload (see [`PolicySet::for_target`]).
#[derive(Debug, Clone)]
pub struct TargetPolicies {
    target: SpiffeId,
    policies: Vec<CPolicy>,
}

impl TargetPolicies {
    /// The workload these policies were selected for.
    pub fn target(&self) -> &SpiffeId {
        &self.target
    }

    /// True if no policy targets the workload.
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// Evaluates `req` (whose target must be [`Self::target`]).
    pub fn evaluate(&self, req: &Request<'_>, default: DefaultPolicy) -> Verdict {
        decide(self.policies.iter(), req, default)
    }
}

fn decide<'p>(
    policies: impl Iterator<Item = &'p CPolicy>,
    req: &Request<'_>,
    default: DefaultPolicy,
) -> Verdict {
    let mut allow_targeting = false;
    let mut allowed_by = None;
    let mut denied_by = None;
    let mut audit = None;
    for p in policies {
        match p.action {
            Action::Deny => {
                if denied_by.is_none()
                    && let Some(ri) = p
                        .rules
                        .iter()
                        .position(|r| rule_matches(r, req, p.action).is_ok())
                {
                    denied_by = Some((p.name.clone(), ri));
                }
            }
            Action::Allow => {
                allow_targeting = true;
                if allowed_by.is_none()
                    && let Some(ri) = p
                        .rules
                        .iter()
                        .position(|r| rule_matches(r, req, p.action).is_ok())
                {
                    allowed_by = Some((p.name.clone(), ri));
                }
            }
            Action::Audit => {
                if audit.is_none()
                    && p.rules
                        .iter()
                        .any(|r| rule_matches(r, req, p.action).is_ok())
                {
                    audit = Some(p.name.clone());
                }
            }
        }
    }
    if let Some((name, ri)) = denied_by {
        return Verdict {
            allowed: false,
            reason: Reason::DeniedByPolicy,
            policy: Some(name),
            rule: Some(ri),
            audit,
        };
    }
    if let Some((name, ri)) = allowed_by {
        return Verdict {
            allowed: true,
            reason: Reason::AllowedByPolicy,
            policy: Some(name),
            rule: Some(ri),
            audit,
        };
    }
    if allow_targeting {
        return Verdict {
            allowed: false,
            reason: Reason::NoAllowMatched,
            policy: None,
            rule: None,
            audit,
        };
    }
    let allowed = match default {
        DefaultPolicy::Deny => false,
        DefaultPolicy::AllAuthenticated => req.source.is_some(),
        DefaultPolicy::SameTrustDomain => req
            .source
            .is_some_and(|s| s.trust_domain_name() == req.target.trust_domain_name()),
        DefaultPolicy::AllUnauthenticated => true,
    };
    Verdict {
        allowed,
        reason: Reason::Default(default),
        policy: None,
        rule: None,
        audit,
    }
}

/// How one policy fared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyExplanation {
    /// Policy name.
    pub name: String,
    /// Its action.
    pub action: Action,
    /// Per rule: `None` if it matched, else why not.
    pub rules: Vec<Option<Mismatch>>,
}

/// The answer to "can A call B?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// The decision.
    pub verdict: Verdict,
    /// Every policy targeting the destination.
    pub policies: Vec<PolicyExplanation>,
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = &self.verdict;
        writeln!(f, "decision: {}", if v.allowed { "ALLOW" } else { "DENY" })?;
        write!(f, "reason:   {}", v.describe())?;
        if let Some(r) = v.rule {
            write!(f, " (rule {r})")?;
        }
        writeln!(f)?;
        if let Some(a) = &v.audit {
            writeln!(f, "audited:  by policy {a}")?;
        }
        if self.policies.is_empty() {
            writeln!(f, "no policy targets the destination")?;
        }
        for p in &self.policies {
            let action = match p.action {
                Action::Allow => "ALLOW",
                Action::Deny => "DENY",
                Action::Audit => "AUDIT",
            };
            writeln!(f, "policy {} ({action}):", p.name)?;
            if p.rules.is_empty() {
                writeln!(f, "  no rules: matches nothing")?;
            }
            for (i, r) in p.rules.iter().enumerate() {
                match r {
                    None => writeln!(f, "  rule {i}: matched")?,
                    Some(m) => writeln!(f, "  rule {i}: did not match: {m}")?,
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
