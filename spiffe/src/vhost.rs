//! The ingress gateway's routes: the same [`HttpRoute`] model as mesh routing, chosen first by
//! the request's host. Routes naming a host exactly are tried first, then those naming a
//! wildcard that covers it (the longest suffix first), then those naming no host; within one
//! group the Gateway API's rule precedence ([`Routes::select`]) decides. A group without a
//! matching rule passes the request on to the next, so a wildcard route still serves the paths
//! an exact one does not have — the Gateway API's "most specific hostname first" ordering.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::route::{HttpRoute, RequestFacts, RouteError, Routes, Selection};

/// Routes grouped by the hosts they serve, compiled.
#[derive(Debug, Default)]
pub struct VirtualHosts {
    exact: BTreeMap<String, Arc<Routes>>,
    /// `(".example.com", routes)`, longest suffix first.
    wildcard: Vec<(String, Arc<Routes>)>,
    any: Option<Arc<Routes>>,
}

/// A rule chosen for a request: the group it belongs to and the rule in it.
#[derive(Debug, Clone)]
pub struct HostSelection {
    /// The routes of the host group the rule is in.
    pub routes: Arc<Routes>,
    /// The rule.
    pub selection: Selection,
}

/// Checks a route hostname: a lowercase DNS name, or `*.` and one; no port, no IP address.
pub fn check_hostname(h: &str) -> Result<(), String> {
    let name = h.strip_prefix("*.").unwrap_or(h);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(format!(
            "hostname {h:?} must be a lowercase DNS name, optionally starting with \"*.\""
        ));
    }
    if name.parse::<std::net::Ipv4Addr>().is_ok() {
        return Err(format!("hostname {h:?} is an IP address, not a name"));
    }
    Ok(())
}

/// The host a request names, as routes match it: lowercase, without its port or a final dot.
/// `None` for an IPv6 literal, which no route names.
pub fn request_host(authority: &str) -> Option<String> {
    if authority.starts_with('[') {
        return None;
    }
    let host = match authority.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

impl VirtualHosts {
    /// Validates and compiles `routes`, grouping them by hostname.
    pub fn compile(routes: &[HttpRoute]) -> Result<Self, RouteError> {
        let mut exact: BTreeMap<String, Vec<HttpRoute>> = BTreeMap::new();
        let mut wildcard: BTreeMap<String, Vec<HttpRoute>> = BTreeMap::new();
        let mut any = Vec::new();
        for r in routes {
            for h in &r.hostnames {
                check_hostname(h).map_err(|why| RouteError {
                    route: r.name.clone(),
                    why,
                })?;
                match h.strip_prefix('*') {
                    Some(suffix) => wildcard.entry(suffix.to_owned()).or_default(),
                    None => exact.entry(h.clone()).or_default(),
                }
                .push(r.clone());
            }
            if r.hostnames.is_empty() {
                any.push(r.clone());
            }
            // Every rule is checked even when the route's group is compiled elsewhere.
            Routes::compile(std::slice::from_ref(r))?;
        }
        let compile = |rs: Vec<HttpRoute>| Routes::compile(&rs).map(Arc::new);
        let mut out = Self::default();
        for (h, rs) in exact {
            out.exact.insert(h, compile(rs)?);
        }
        for (s, rs) in wildcard {
            out.wildcard.push((s, compile(rs)?));
        }
        out.wildcard
            .sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        if !any.is_empty() {
            out.any = Some(compile(any)?);
        }
        Ok(out)
    }

    /// The groups whose routes serve `host` (from [`request_host`]), most specific first.
    pub fn groups<'a>(&'a self, host: &'a str) -> impl Iterator<Item = &'a Arc<Routes>> + 'a {
        let exact = self.exact.get(host);
        let wild = self.wildcard.iter().filter_map(move |(suffix, r)| {
            (host.len() > suffix.len() && host.ends_with(suffix.as_str())).then_some(r)
        });
        exact.into_iter().chain(wild).chain(self.any.iter())
    }

    /// Whether any route serves `host`.
    pub fn serves(&self, host: &str) -> bool {
        self.groups(host).next().is_some()
    }

    /// The rule for a request to `host`, if a route serving the host has one that matches.
    pub fn select(&self, host: &str, facts: &RequestFacts<'_>) -> Option<HostSelection> {
        self.groups(host).find_map(|routes| {
            routes.select(facts).map(|selection| HostSelection {
                routes: routes.clone(),
                selection,
            })
        })
    }

    /// The hostnames named exactly (the ones a certificate can be ordered for).
    pub fn exact_hostnames(&self) -> impl Iterator<Item = &str> {
        self.exact.keys().map(String::as_str)
    }

    /// True when there are no routes.
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wildcard.is_empty() && self.any.is_none()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn routes(yaml: &str) -> Vec<HttpRoute> {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    fn pick(v: &VirtualHosts, host: &str, path: &str) -> Option<String> {
        let header = |_: &str, _: &dyn Fn(&str) -> bool| false;
        let facts = RequestFacts {
            method: "GET",
            path,
            query: None,
            header: &header,
        };
        v.select(host, &facts).map(|s| {
            let r = s.routes.rule(s.selection);
            r.rule.backends[0].service.clone()
        })
    }

    #[test]
    fn hosts_choose_the_group_most_specific_first() {
        let v = VirtualHosts::compile(&routes(
            r#"
- name: shop
  hostnames: [shop.example.com]
  rules:
    - matches: [ { path: { type: prefix, value: /api } } ]
      backends: [ { service: api.shop, port: 80 } ]
- name: wild
  hostnames: ["*.example.com"]
  rules:
    - backends: [ { service: wild.shop, port: 80 } ]
- name: deeper
  hostnames: ["*.eu.example.com"]
  rules:
    - backends: [ { service: eu.shop, port: 80 } ]
- name: fallback
  rules:
    - matches: [ { path: { type: exact, value: /healthz } } ]
      backends: [ { service: health.shop, port: 80 } ]
"#,
        ))
        .unwrap();
        assert_eq!(pick(&v, "shop.example.com", "/api/x").unwrap(), "api.shop");
        // The exact route has no rule for `/`: the wildcard one serves it.
        assert_eq!(pick(&v, "shop.example.com", "/").unwrap(), "wild.shop");
        assert_eq!(pick(&v, "a.b.example.com", "/").unwrap(), "wild.shop");
        assert_eq!(pick(&v, "x.eu.example.com", "/").unwrap(), "eu.shop");
        // A wildcard covers at least one more label.
        assert_eq!(pick(&v, "example.com", "/"), None);
        assert_eq!(pick(&v, "example.com", "/healthz").unwrap(), "health.shop");
        assert_eq!(pick(&v, "other.test", "/"), None);
        assert!(
            v.serves("other.test"),
            "the route without hosts serves every host"
        );
        assert_eq!(
            v.exact_hostnames().collect::<Vec<_>>(),
            ["shop.example.com"]
        );
    }

    #[test]
    fn without_a_catch_all_unknown_hosts_are_served_by_nothing() {
        let v = VirtualHosts::compile(&routes(
            r#"
- name: shop
  hostnames: [shop.example.com]
  rules: [ { backends: [ { service: api.shop, port: 80 } ] } ]
"#,
        ))
        .unwrap();
        assert!(!v.serves("evil.example.com"));
        assert!(v.serves("shop.example.com"));
    }

    #[test]
    fn bad_hostnames_and_rules_are_refused() {
        for (h, why) in [
            ("Shop.example.com", "lowercase"),
            ("shop.example.com:443", "lowercase DNS"),
            ("*", "lowercase DNS"),
            ("a.*.com", "lowercase DNS"),
            ("10.0.0.1", "IP address"),
            ("-x.com", "lowercase DNS"),
        ] {
            let r = routes(&format!(
                "- name: r\n  hostnames: [\"{h}\"]\n  rules: [ {{ backends: [ {{ service: a, port: 80 }} ] }} ]"
            ));
            let e = VirtualHosts::compile(&r).unwrap_err();
            assert!(e.why.contains(why), "{h}: {e:?}");
        }
        let r = routes(
            "- name: r\n  hostnames: [a.com]\n  rules: [ { matches: [ { path: { type: prefix, value: nope } } ] } ]",
        );
        assert!(VirtualHosts::compile(&r).is_err());
    }

    #[test]
    fn request_hosts_are_normalized() {
        assert_eq!(
            request_host("Shop.Example.COM:443").unwrap(),
            "shop.example.com"
        );
        assert_eq!(
            request_host("shop.example.com.").unwrap(),
            "shop.example.com"
        );
        assert_eq!(
            request_host("shop.example.com").unwrap(),
            "shop.example.com"
        );
        assert_eq!(request_host("[::1]:443"), None);
        assert_eq!(request_host(""), None);
    }
}
