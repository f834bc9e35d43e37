//! Planning at the ingress gateway: a request from outside the mesh goes where the route
//! serving its host says — or, on an HTTP listener that only redirects, to HTTPS.

use std::borrow::Cow;

use ward_spiffe::vhost::request_host;

use super::{Arrived, Knows, Plan, Refused, Routed, normalized, with_facts};
use crate::observe::Outcome;
use crate::refusal::Refusal;

/// Where ACME HTTP-01 challenges are fetched (RFC 8555 §8.3).
const ACME_CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

pub(super) fn plan<'r: 'h, 'h>(
    a: &Arrived<'r, 'h>,
    k: &Knows<'_>,
    https: bool,
    redirect_to_https: Option<u16>,
) -> Result<Plan<'r, 'h>, Refused> {
    let refuse = |refusal, outcome: Outcome, path: Option<String>| Refused {
        refusal,
        outcome,
        path,
    };
    let Some(h) = &a.request else {
        return Err(refuse(
            Refusal::BadRequest("the gateway serves HTTP only"),
            Outcome::plain("error", "gateway"),
            None,
        ));
    };
    let authority = match h.authority {
        Some(au) if http::uri::Authority::try_from(au).is_ok() => au,
        Some(_) => {
            return Err(refuse(
                Refusal::BadRequest("invalid Host header"),
                Outcome::plain("error", "gateway"),
                None,
            ));
        }
        None => {
            return Err(refuse(
                Refusal::BadRequest("a Host header is required"),
                Outcome::plain("error", "gateway"),
                None,
            ));
        }
    };
    if !https && let Some(token) = h.path.strip_prefix(ACME_CHALLENGE_PREFIX) {
        return Ok(Plan::AcmeChallenge { token });
    }
    let host = request_host(authority);
    if let Some(port) = redirect_to_https.filter(|_| !https) {
        let Some(host) = host else {
            return Err(refuse(
                Refusal::BadRequest("the Host names no DNS name to redirect to"),
                Outcome::plain("error", "gateway"),
                None,
            ));
        };
        let mut location = match port {
            443 => format!("https://{host}{}", h.path),
            p => format!("https://{host}:{p}{}", h.path),
        };
        if let Some(q) = h.query {
            location.push('?');
            location.push_str(q);
        }
        // A 301 lets clients turn a POST into a GET; 308 keeps the method.
        let status = if matches!(h.method, "GET" | "HEAD") {
            301
        } else {
            308
        };
        return Ok(Plan::Redirect { location, status });
    }
    let path = normalized(h, "gateway")?;
    let no_route = |why: String, path: String| {
        refuse(
            Refusal::NoMatchingRoute(why),
            Outcome::plain("deny", "route"),
            Some(path),
        )
    };
    let (Some(hosts), Some(host)) = (k.gateway, host) else {
        return Err(no_route(format!("no route serves {authority}"), path));
    };
    match with_facts(h, &path, |f| hosts.select(&host, f)) {
        Some(s) => Ok(Plan::Routed {
            authority: Cow::Borrowed(authority),
            route: Routed {
                routes: s.routes,
                selection: s.selection,
                path,
            },
        }),
        None if hosts.serves(&host) => Err(no_route(
            format!("no route rule for {host} matches {} {path}", h.method),
            path,
        )),
        None => Err(no_route(format!("no route serves {host}"), path)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::authz::Authz;
    use crate::plan::{Head, Role, plan};

    fn arrive<'a>(
        role: Role<'a>,
        method: &'a str,
        host: Option<&'a str>,
        path: &'a str,
    ) -> Arrived<'a, 'a> {
        Arrived {
            role,
            port: 443,
            orig_dst: None,
            peer: None,
            request: Some(Head {
                method,
                path,
                authority: host,
                query: Some("a=1"),
                headers: None,
            }),
            hello: None,
        }
    }

    #[test]
    fn hosts_and_paths_choose_a_rule_and_others_are_404_or_400() {
        let hosts = ward_spiffe::vhost::VirtualHosts::compile(
            &serde_yaml_ng::from_str::<Vec<_>>(
                r#"
- name: shop
  hostnames: [shop.example.com]
  rules:
    - matches: [ { path: { type: prefix, value: /api } } ]
      backends: [ { service: api.shop, port: 80 } ]
"#,
            )
            .unwrap(),
        )
        .unwrap();
        let authz = Authz::new(&Default::default(), crate::metrics::Metrics::new());
        let k = Knows {
            own_id: None,
            authz: &authz,
            destination: None,
            egress: None,
            gateway: Some(&hosts),
        };
        let role = Role::Gateway {
            https: true,
            redirect_to_https: None,
        };
        let p = plan(
            &arrive(role, "GET", Some("Shop.Example.com:443"), "/api/./x"),
            &k,
        )
        .unwrap();
        let Plan::Routed { authority, route } = p else {
            panic!("{p:?}")
        };
        assert_eq!(
            authority, "Shop.Example.com:443",
            "the client's Host travels on"
        );
        assert_eq!(route.path, "/api/x");
        let status = |host: Option<&str>, path: &str| {
            plan(&arrive(role, "GET", host, path), &k)
                .map(|_| 200)
                .unwrap_err()
                .refusal
                .answer()
                .0
                .as_u16()
        };
        assert_eq!(status(Some("shop.example.com"), "/other"), 404);
        assert_eq!(status(Some("evil.example.com"), "/api"), 404);
        assert_eq!(status(None, "/api"), 400);
        assert_eq!(status(Some("a/b"), "/api"), 400);
        assert_eq!(
            status(Some("shop.example.com"), "/api/%2e%2e/%2e%2e/x"),
            400
        );
    }

    #[test]
    fn an_http_listener_redirects_keeping_path_query_and_method() {
        let authz = Authz::new(&Default::default(), crate::metrics::Metrics::new());
        let k = Knows {
            own_id: None,
            authz: &authz,
            destination: None,
            egress: None,
            gateway: None,
        };
        let role = |port| Role::Gateway {
            https: false,
            redirect_to_https: Some(port),
        };
        let loc = |port, method, host| match plan(&arrive(role(port), method, Some(host), "/x"), &k)
        {
            Ok(Plan::Redirect { location, status }) => (location, status),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            loc(443, "GET", "shop.example.com:80"),
            ("https://shop.example.com/x?a=1".to_owned(), 301)
        );
        assert_eq!(
            loc(8443, "POST", "shop.example.com"),
            ("https://shop.example.com:8443/x?a=1".to_owned(), 308)
        );
    }
}
