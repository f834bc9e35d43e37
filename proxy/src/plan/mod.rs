//! The plan stage: a pure function from what arrived (role, peer, the HTTP head if any) and
//! what the proxy knows (its own ID, the policies in force) to where it goes — or why not.
//! No socket is touched here; `forward` carries the plan out.

use std::borrow::Cow;
use std::net::SocketAddr;

use ward_spiffe::SpiffeId;
use ward_spiffe::policy::{Request as AuthzRequest, path::normalize};

use crate::authz::Authz;
use crate::config::{MeshRoute, Probe, UnknownDestination};
use ward_spiffe::route::{RequestFacts, Routes, Selection};

use crate::discover::{Destination, Resolution, RouteTable};
use crate::observe::Outcome;
use crate::refusal::Refusal;

mod gateway;

/// The listener's role, as far as planning needs it.
#[derive(Debug, Clone, Copy)]
pub enum Role<'a> {
    /// Authorize, then deliver to the local application at `app`.
    Inbound {
        /// `host:port` of the application.
        app: &'a str,
        /// Kubelet probes unauthenticated callers may reach.
        probes: &'a [Probe],
    },
    /// Carry to the peer proxy at `upstream`, which must present one of `expected`.
    Outbound {
        /// `host:port` of the peer proxy.
        upstream: &'a str,
        /// Accepted IDs (empty: any ID of a trusted trust domain).
        expected: &'a [SpiffeId],
    },
    /// A tunnel at the egress gateway: the egress configuration decides, for the peer.
    EgressGateway,
    /// A request from outside the mesh at the ingress gateway: its host and path decide.
    Gateway {
        /// Arrived over TLS.
        https: bool,
        /// Answer with a redirect to HTTPS on this port instead of routing.
        redirect_to_https: Option<u16>,
    },
    /// A captured outbound connection to `dst`: the mesh table decides.
    OutboundCapture {
        /// Mesh destinations, first match wins.
        routes: &'a [MeshRoute],
        /// What happens to other destinations.
        unknown: UnknownDestination,
        /// The original destination as text (what is dialled).
        dst: &'a str,
    },
}

/// An HTTP request's head, as planning needs it.
#[derive(Debug, Clone, Copy)]
pub struct Head<'a> {
    /// Method.
    pub method: &'a str,
    /// Path as received (not yet normalized).
    pub path: &'a str,
    /// The Host header, or the URI's authority (HTTP/2).
    pub authority: Option<&'a str>,
    /// The query string, without `?`.
    pub query: Option<&'a str>,
    /// The request headers (route matches).
    pub headers: Option<&'a http::HeaderMap>,
}

/// What arrived: the role (borrowed from the listener, `'r`) and the request head (borrowed
/// from the request, `'h`).
#[derive(Debug, Clone, Copy)]
pub struct Arrived<'r, 'h> {
    /// The listener's role.
    pub role: Role<'r>,
    /// The port authorization sees: the listener's own, or for captured traffic the port the
    /// caller dialled.
    pub port: u16,
    /// The address the caller dialled, for captured connections.
    pub orig_dst: Option<SocketAddr>,
    /// The verified peer (`None`: unauthenticated, or the local application).
    pub peer: Option<&'h SpiffeId>,
    /// The request head; `None` for a TCP connection.
    pub request: Option<Head<'h>>,
    /// The server name of the TLS ClientHello a captured connection opened with (`Some(None)`:
    /// TLS without one); `None`: not TLS, or not looked at.
    pub hello: Option<Option<&'h str>>,
}

/// What the proxy knows when it plans.
#[derive(Debug, Clone, Copy)]
pub struct Knows<'a> {
    /// This workload's SPIFFE ID, once an SVID is held.
    pub own_id: Option<&'a SpiffeId>,
    /// The policies in force.
    pub authz: &'a Authz,
    /// What service discovery says about the destination (outbound roles with discovery).
    pub destination: Option<&'a Resolution>,
    /// The external services in force (outbound capture with `unknown: egress`).
    pub egress: Option<&'a ward_spiffe::egress::EgressSet>,
    /// The ingress gateway's routes (gateway listeners).
    pub gateway: Option<&'a ward_spiffe::vhost::VirtualHosts>,
}

/// Where an allowed request or connection goes.
#[derive(Debug, Clone)]
pub enum Plan<'r, 'h> {
    /// To the local application.
    Deliver {
        /// `host:port` to dial.
        app: &'r str,
        /// The authority the request keeps (HTTP).
        authority: Cow<'h, str>,
        /// The normalized path (HTTP).
        path: Option<String>,
        /// The authorization outcome.
        outcome: Outcome,
        /// Why it was allowed (or, in dry-run, would have been denied).
        reason: String,
        /// Dry-run: policy would have denied it.
        dry_run_denied: bool,
    },
    /// To a peer proxy over mTLS.
    Mesh {
        /// `host:port` to dial.
        upstream: &'r str,
        /// IDs the peer may present.
        expected: &'r [SpiffeId],
        /// The authority the request keeps (HTTP).
        authority: Cow<'h, str>,
    },
    /// A mesh service: balanced across its endpoints, each checked for its own IDs.
    Balanced {
        /// The service's endpoints.
        destination: std::sync::Arc<Destination>,
        /// The authority the request keeps (HTTP).
        authority: Cow<'h, str>,
        /// The route rule that decides where an HTTP request goes, when the service has
        /// routes.
        route: Option<Routed>,
    },
    /// Outside the mesh: to the destination as the application asked, unchanged.
    Passthrough {
        /// `host:port` to dial.
        to: &'r str,
    },
    /// Outside the mesh, allowed by egress: to the proxy's own resolution of the allowed name,
    /// or (a service by address, the `allow` default) to the dialled address.
    External(External),
    /// Where a route rule that is not a service's own says (the ingress gateway's routes).
    Routed {
        /// The authority the request keeps.
        authority: Cow<'h, str>,
        /// The rule.
        route: Routed,
    },
    /// Answered by the proxy: the ACME HTTP-01 challenge with this token (gateway HTTP
    /// listeners).
    AcmeChallenge {
        /// The token asked for.
        token: &'h str,
    },
    /// Answered by the proxy with a redirect (HTTP to HTTPS at the gateway).
    Redirect {
        /// The `Location`.
        location: String,
        /// 301, or 308 for a method a 301 would turn into GET.
        status: u16,
    },
}

/// An egress destination egress allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct External {
    /// Where to connect.
    pub reach: ward_spiffe::egress::Reach,
    /// The port.
    pub port: u16,
    /// The name asked for (SNI or Host), as matched.
    pub name: Option<String>,
    /// The policy label: `egress:<service>` or `egress:default`.
    pub policy: String,
    /// Why it was allowed.
    pub reason: String,
    /// HTTP sent on as HTTPS to this port (TLS origination).
    pub originate_tls: Option<u16>,
}

impl Plan<'_, '_> {
    /// The plan's name in the access log.
    pub fn label(&self) -> &'static str {
        match self {
            Plan::Deliver { .. } => "deliver",
            Plan::Mesh { .. } => "mesh",
            Plan::Balanced { .. } => "balanced",
            Plan::Passthrough { .. } => "passthrough",
            Plan::External(_) => "egress",
            Plan::Routed { .. } => "routed",
            Plan::Redirect { .. } => "redirect",
            Plan::AcmeChallenge { .. } => "acme",
        }
    }
}

/// The route rule a request matched, and the normalized path it matched on.
#[derive(Debug, Clone)]
pub struct Routed {
    /// The routes the rule is one of.
    pub routes: std::sync::Arc<Routes>,
    /// Which rule.
    pub selection: Selection,
    /// The normalized path.
    pub path: String,
}

/// A refused request: why, the outcome to record, and the path to log (normalized when it
/// could be).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// What the caller is told.
    pub refusal: Refusal,
    /// What the record says.
    pub outcome: Outcome,
    /// The normalized path, when there is one.
    pub path: Option<String>,
}

/// The request's authority: the given one if it is well-formed, `default` if there is none.
/// A malformed one is refused: it would otherwise change the forwarded target (a Host with
/// `/` or `?`), and guessing hides the client's bug.
fn authority<'h>(given: Option<&'h str>, default: &'h str) -> Result<Cow<'h, str>, Refusal> {
    match given {
        None => Ok(Cow::Borrowed(default)),
        Some(a) if http::uri::Authority::try_from(a).is_ok() => Ok(Cow::Borrowed(a)),
        Some(_) => Err(Refusal::BadRequest("invalid Host header")),
    }
}

/// Plans one request (or TCP connection).
pub fn plan<'r: 'h, 'h>(a: &Arrived<'r, 'h>, k: &Knows<'_>) -> Result<Plan<'r, 'h>, Refused> {
    match (a.role, k.destination) {
        (
            Role::Outbound { upstream, .. } | Role::OutboundCapture { dst: upstream, .. },
            Some(d),
        ) if !matches!(d, Resolution::NoSuchService) => balanced(a, d, upstream),
        _ => plan_static(a, k),
    }
}

/// A destination discovery knows: its endpoints (or, for HTTP to a service with routes, the
/// matching rule), or a refusal.
fn balanced<'r: 'h, 'h>(
    a: &Arrived<'r, 'h>,
    d: &Resolution,
    default: &'r str,
) -> Result<Plan<'r, 'h>, Refused> {
    let refuse = |refusal| Refused {
        refusal,
        outcome: Outcome::plain("error", "outbound"),
        path: None,
    };
    let destination = match d {
        Resolution::Endpoints(dest) => dest.clone(),
        Resolution::NoEndpoints(service) => {
            return Err(refuse(no_endpoints(service)));
        }
        Resolution::NoSuchService => unreachable!("handled by the caller"),
    };
    let Some(h) = &a.request else {
        // Routes are for HTTP; a connection goes to the service's own endpoints.
        if destination.endpoints.is_empty() {
            return Err(refuse(no_endpoints(&destination.service)));
        }
        return Ok(Plan::Balanced {
            destination,
            authority: Cow::Borrowed(default),
            route: None,
        });
    };
    let authority = authority(h.authority, default).map_err(refuse)?;
    let route = match &destination.routes {
        RouteTable::None => None,
        RouteTable::Invalid(why) => return Err(refuse(Refusal::RouteFailed(why.clone()))),
        RouteTable::Routes(routes) => Some(route(h, routes, &destination.service)?),
    };
    Ok(Plan::Balanced {
        destination,
        authority,
        route,
    })
}

fn no_endpoints(service: &str) -> Refusal {
    Refusal::Unavailable(format!("service {service} has no endpoint ready"))
}

/// The rule of `routes` for request `h`; matching sees the normalized path.
fn route(h: &Head<'_>, routes: &std::sync::Arc<Routes>, service: &str) -> Result<Routed, Refused> {
    let path = normalized(h, "outbound")?;
    match with_facts(h, &path, |f| routes.select(f)) {
        Some(selection) => Ok(Routed {
            routes: routes.clone(),
            selection,
            path,
        }),
        None => Err(Refused {
            refusal: Refusal::NoMatchingRoute(format!(
                "no route rule of {service} matches {} {path}",
                h.method
            )),
            outcome: Outcome::plain("deny", "route"),
            path: Some(path),
        }),
    }
}

/// The request's path, normalized as routes and policies see it; an ambiguous one is refused.
fn normalized(h: &Head<'_>, policy: &str) -> Result<String, Refused> {
    normalize(h.path).map_err(|_| Refused {
        refusal: Refusal::BadRequest("ambiguous request path"),
        outcome: Outcome::plain("error", policy),
        path: Some(h.path.to_owned()),
    })
}

/// Runs `f` on what route matching sees of request `h` with normalized `path`.
fn with_facts<T>(h: &Head<'_>, path: &str, f: impl FnOnce(&RequestFacts<'_>) -> T) -> T {
    let empty = http::HeaderMap::new();
    let headers = h.headers.unwrap_or(&empty);
    let header = |name: &str, ok: &dyn Fn(&str) -> bool| {
        headers
            .get_all(name)
            .iter()
            .any(|v| v.to_str().is_ok_and(ok))
    };
    f(&RequestFacts {
        method: h.method,
        path,
        query: h.query,
        header: &header,
    })
}

/// Plans without discovery: fixed upstreams, the static mesh table, inbound authorization.
fn plan_static<'r: 'h, 'h>(a: &Arrived<'r, 'h>, k: &Knows<'_>) -> Result<Plan<'r, 'h>, Refused> {
    match a.role {
        Role::Inbound { app, probes } => inbound(a, k, app, probes),
        Role::Outbound { upstream, expected } => mesh(a, upstream, expected),
        Role::Gateway {
            https,
            redirect_to_https,
        } => gateway::plan(a, k, https, redirect_to_https),
        Role::EgressGateway => match a.orig_dst {
            Some(orig) => egress(a, k, orig, a.peer),
            None => Err(Refused {
                refusal: Refusal::EgressDenied("the tunnel named no destination".into()),
                outcome: Outcome::plain("deny", "egress:default"),
                path: None,
            }),
        },
        Role::OutboundCapture {
            routes,
            unknown,
            dst,
        } => {
            let refuse = |why: String| Refused {
                refusal: Refusal::NoRoute(why),
                outcome: Outcome::plain("deny", "outbound"),
                path: None,
            };
            let Some(orig) = a.orig_dst else {
                return Err(refuse(
                    "the connection was not redirected: it has no original destination".into(),
                ));
            };
            let route = routes.iter().find(|r| {
                r.dst.contains(orig.ip()) && (r.ports.is_empty() || r.ports.contains(&orig.port()))
            });
            match (route, unknown) {
                (Some(r), _) => mesh(a, dst, &r.expected_ids),
                (None, UnknownDestination::Passthrough) => Ok(Plan::Passthrough { to: dst }),
                (None, UnknownDestination::Egress) => egress(a, k, orig, k.own_id),
                (None, UnknownDestination::Refuse) => Err(refuse(format!(
                    "{orig} is not a mesh destination and unknown destinations are refused"
                ))),
            }
        }
    }
}

/// A destination outside the mesh, under egress: by the ClientHello's server name, the
/// request's Host, or (anything else) the dialled address.
fn egress<'r: 'h, 'h>(
    a: &Arrived<'r, 'h>,
    k: &Knows<'_>,
    orig: SocketAddr,
    source: Option<&SpiffeId>,
) -> Result<Plan<'r, 'h>, Refused> {
    use ward_spiffe::egress::{Ask, Seen};
    let path = a.request.as_ref().map(|h| h.path.to_owned());
    let Some(set) = k.egress else {
        return Err(Refused {
            refusal: Refusal::EgressDenied("egress is not configured".into()),
            outcome: Outcome::plain("deny", "egress:default"),
            path,
        });
    };
    let seen = match (&a.request, a.hello) {
        (Some(h), _) => Seen::Http(h.authority.map(|au| {
            http::uri::Authority::try_from(au).map_or(au, |p| {
                // The host without its port (an IPv6 literal keeps its brackets, so it is
                // no DNS name).
                let host = p.host();
                &au[..host.len().min(au.len())]
            })
        })),
        (None, Some(sni)) => Seen::Tls(sni),
        (None, None) => Seen::Tcp,
    };
    let d = set.decide(&Ask {
        source,
        seen,
        dialled: orig.ip(),
        port: orig.port(),
    });
    let policy = format!("egress:{}", d.service.as_deref().unwrap_or("default"));
    if !d.allowed {
        return Err(Refused {
            refusal: Refusal::EgressDenied(d.reason),
            outcome: Outcome::plain("deny", &policy),
            path,
        });
    }
    let name = match seen {
        Seen::Tls(n) | Seen::Http(n) => n.and_then(ward_spiffe::egress::requested_name),
        Seen::Tcp => None,
    };
    Ok(Plan::External(External {
        reach: d.reach,
        port: orig.port(),
        name,
        policy,
        reason: d.reason,
        originate_tls: d.originate_tls,
    }))
}

fn mesh<'r: 'h, 'h>(
    a: &Arrived<'r, 'h>,
    upstream: &'r str,
    expected: &'r [SpiffeId],
) -> Result<Plan<'r, 'h>, Refused> {
    let authority = match &a.request {
        Some(h) => authority(h.authority, upstream).map_err(|refusal| Refused {
            refusal,
            outcome: Outcome::plain("error", "outbound"),
            path: None,
        })?,
        None => Cow::Borrowed(upstream),
    };
    Ok(Plan::Mesh {
        upstream,
        expected,
        authority,
    })
}

fn inbound<'r: 'h, 'h>(
    a: &Arrived<'r, 'h>,
    k: &Knows<'_>,
    app: &'r str,
    probes: &[Probe],
) -> Result<Plan<'r, 'h>, Refused> {
    let Some(own) = k.own_id else {
        return Err(Refused {
            refusal: Refusal::NoIdentity,
            outcome: Outcome::plain("error", "none"),
            path: None,
        });
    };
    let (decision, reason, path) = match &a.request {
        None => {
            let d = k.authz.decide(&AuthzRequest {
                source: a.peer,
                target: own,
                method: None,
                path: None,
                port: a.port,
            });
            let r = d.verdict.describe();
            (d, r, None)
        }
        // Normalize before matching; ambiguous paths are refused, not guessed.
        Some(h) => match normalize(h.path) {
            Ok(p) => {
                let d = k.authz.decide(&AuthzRequest {
                    source: a.peer,
                    target: own,
                    method: Some(h.method),
                    path: Some(&p),
                    port: a.port,
                });
                let r = d.verdict.describe();
                (d, r, Some(p))
            }
            // Logged (and, in dry-run, forwarded) as it came.
            Err(e) => (
                k.authz.invalid_path(),
                format!("ambiguous request path: {e}"),
                Some(h.path.to_owned()),
            ),
        },
    };
    // The kubelet's probes carry no identity; they reach exactly the probed paths, unless a
    // DENY policy says otherwise.
    if !decision.proceed
        && a.peer.is_none()
        && decision.verdict.reason != ward_spiffe::policy::Reason::DeniedByPolicy
        && let (Some(h), Some(p)) = (&a.request, &path)
        && matches!(h.method, "GET" | "HEAD")
        && probes.iter().any(|pr| pr.port == a.port && pr.path == *p)
    {
        return Ok(Plan::Deliver {
            app,
            authority: authority(h.authority, app).map_err(|refusal| Refused {
                refusal,
                outcome: Outcome::plain("allow", "probe"),
                path: path.clone(),
            })?,
            path: path.clone(),
            outcome: Outcome::plain("allow", "probe"),
            reason: "kubelet probe (authorize_probes)".into(),
            dry_run_denied: false,
        });
    }
    let outcome = Outcome::of(&decision);
    if !decision.proceed {
        return Err(Refused {
            refusal: Refusal::Forbidden(reason),
            outcome,
            path,
        });
    }
    let authority = match &a.request {
        Some(h) => authority(h.authority, app).map_err(|refusal| Refused {
            refusal,
            outcome: outcome.clone(),
            path: path.clone(),
        })?,
        None => Cow::Borrowed(app),
    };
    Ok(Plan::Deliver {
        app,
        authority,
        path,
        outcome,
        reason,
        dry_run_denied: decision.dry_run_denied,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::{Authorization, AuthzMode, MeshRoute, Probe, UnknownDestination};
    use ward_spiffe::policy::{DefaultPolicy, PolicyDoc};

    fn authz(mode: AuthzMode) -> Authz {
        let a = Authz::new(
            &Authorization {
                mode,
                default: DefaultPolicy::Deny,
                ..Default::default()
            },
            crate::metrics::Metrics::new(),
        );
        let doc: PolicyDoc = serde_yaml_ng::from_str(
            r#"
policies:
  - name: b-allow-a-get
    target: { spiffe_ids: ["spiffe://t/b"] }
    action: ALLOW
    rules: [ { from: [ { principals: ["spiffe://t/a"] } ], to: [ { methods: [GET] } ] } ]
  - name: b-allow-a-tcp
    target: { spiffe_ids: ["spiffe://t/b"] }
    action: ALLOW
    rules: [ { from: [ { principals: ["spiffe://t/a"] } ], to: [ { ports: [7000] } ] } ]
"#,
        )
        .unwrap();
        a.set_file_policies(doc.policies).unwrap();
        a
    }

    fn id(s: &str) -> SpiffeId {
        SpiffeId::new(s).unwrap()
    }

    fn head<'a>(method: &'a str, path: &'a str, authority: Option<&'a str>) -> Option<Head<'a>> {
        Some(Head {
            method,
            path,
            authority,
            query: None,
            headers: None,
        })
    }

    #[test]
    fn inbound_table() {
        let (a, b, c) = (id("spiffe://t/a"), id("spiffe://t/b"), id("spiffe://t/c"));
        let enforce = authz(AuthzMode::Enforce);
        let dry = authz(AuthzMode::DryRun);
        let app = "127.0.0.1:8080";
        let probes = [Probe {
            port: 8080,
            path: "/healthz".into(),
        }];
        let inbound = |peer, port, request| Arrived {
            role: Role::Inbound {
                app,
                probes: &probes,
            },
            port,
            orig_dst: None,
            peer,
            request,
            hello: None,
        };
        let k = Knows {
            own_id: Some(&b),
            authz: &enforce,
            destination: None,
            egress: None,
            gateway: None,
        };
        // (arrived, knows, expected plan label or refusal, log path)
        type Want = Result<(&'static str, Option<&'static str>), Refusal>;
        let cases: Vec<(Arrived<'_, '_>, Knows<'_>, Want)> = vec![
            (
                inbound(Some(&a), 15006, head("GET", "/x/../y", Some("b.svc"))),
                k,
                Ok(("b.svc", Some("/y"))),
            ),
            (
                inbound(Some(&a), 15006, head("GET", "/y", None)),
                k,
                Ok((app, Some("/y"))),
            ),
            (
                inbound(Some(&a), 15006, head("POST", "/y", None)),
                k,
                Err(Refusal::Forbidden("no ALLOW policy matched".into())),
            ),
            (
                inbound(Some(&c), 15006, head("GET", "/y", None)),
                k,
                Err(Refusal::Forbidden("no ALLOW policy matched".into())),
            ),
            (
                inbound(None, 15006, head("GET", "/y", None)),
                k,
                Err(Refusal::Forbidden("no ALLOW policy matched".into())),
            ),
            (
                inbound(Some(&a), 15006, head("GET", "/a%2fb", None)),
                k,
                Err(Refusal::Forbidden(String::new())),
            ),
            (
                inbound(Some(&a), 15006, head("GET", "/y", Some("b.svc/evil?"))),
                k,
                Err(Refusal::BadRequest("invalid Host header")),
            ),
            (inbound(Some(&a), 7000, None), k, Ok((app, None))),
            (
                inbound(Some(&a), 7001, None),
                k,
                Err(Refusal::Forbidden("no ALLOW policy matched".into())),
            ),
            (
                inbound(Some(&a), 15006, head("GET", "/y", None)),
                Knows {
                    own_id: None,
                    authz: &enforce,
                    destination: None,
                    egress: None,
                    gateway: None,
                },
                Err(Refusal::NoIdentity),
            ),
            (
                inbound(Some(&c), 15006, head("DELETE", "/y", None)),
                Knows {
                    own_id: Some(&b),
                    authz: &dry,
                    destination: None,
                    egress: None,
                    gateway: None,
                },
                Ok((app, Some("/y"))),
            ),
            // Probes: unauthenticated GET of the probed path on the probed port only.
            (
                inbound(None, 8080, head("GET", "/healthz", None)),
                k,
                Ok((app, Some("/healthz"))),
            ),
            (
                inbound(None, 8080, head("GET", "/./healthz", None)),
                k,
                Ok((app, Some("/healthz"))),
            ),
            (
                inbound(None, 8080, head("POST", "/healthz", None)),
                k,
                Err(Refusal::Forbidden("no ALLOW policy matched".into())),
            ),
            (
                inbound(None, 8080, head("GET", "/healthz/x", None)),
                k,
                Err(Refusal::Forbidden("no ALLOW policy matched".into())),
            ),
            (
                inbound(None, 8081, head("GET", "/healthz", None)),
                k,
                Err(Refusal::Forbidden("no ALLOW policy matched".into())),
            ),
            (
                inbound(Some(&c), 8080, head("GET", "/healthz", None)),
                k,
                Err(Refusal::Forbidden("no ALLOW policy matched".into())),
            ),
        ];
        for (i, (arrived, knows, want)) in cases.into_iter().enumerate() {
            let got = plan(&arrived, &knows);
            match (got, want) {
                (
                    Ok(Plan::Deliver {
                        authority, path, ..
                    }),
                    Ok((wa, wp)),
                ) => {
                    assert_eq!(authority, wa, "case {i}");
                    assert_eq!(path.as_deref(), wp, "case {i}");
                }
                (Err(r), Err(Refusal::Forbidden(w))) if w.is_empty() => {
                    assert!(
                        matches!(&r.refusal, Refusal::Forbidden(m) if m.starts_with("ambiguous request path")),
                        "case {i}: {r:?}"
                    );
                    assert_eq!(r.outcome.policy, "invalid-path");
                }
                (Err(r), Err(w)) => assert_eq!(r.refusal, w, "case {i}"),
                (g, w) => panic!("case {i}: got {g:?}, want {w:?}"),
            }
        }
        // Dry run: allowed through, reported as would-deny.
        let Ok(Plan::Deliver {
            outcome,
            dry_run_denied,
            ..
        }) = plan(
            &inbound(Some(&c), 15006, head("GET", "/y", None)),
            &Knows {
                own_id: Some(&b),
                authz: &dry,
                destination: None,
                egress: None,
                gateway: None,
            },
        )
        else {
            panic!()
        };
        assert!(dry_run_denied);
        assert_eq!(outcome.decision, "would-deny");
    }

    #[test]
    fn outbound_table() {
        let b = id("spiffe://t/b");
        let enforce = authz(AuthzMode::Enforce);
        let expected = [b.clone()];
        let out = |request| Arrived {
            role: Role::Outbound {
                upstream: "10.0.0.2:15006",
                expected: &expected,
            },
            port: 15001,
            orig_dst: None,
            peer: None,
            request,
            hello: None,
        };
        // Outbound needs no own ID to plan (the connect step needs the SVID).
        let k = Knows {
            own_id: None,
            authz: &enforce,
            destination: None,
            egress: None,
            gateway: None,
        };
        let Ok(Plan::Mesh {
            upstream,
            expected: e,
            authority,
        }) = plan(&out(head("GET", "/", Some("b.svc:80"))), &k)
        else {
            panic!()
        };
        assert_eq!(
            (upstream, e, &*authority),
            ("10.0.0.2:15006", &expected[..], "b.svc:80")
        );
        let Ok(Plan::Mesh { authority, .. }) = plan(&out(head("GET", "/", None)), &k) else {
            panic!()
        };
        assert_eq!(authority, "10.0.0.2:15006");
        let e = plan(&out(head("GET", "/", Some("a b"))), &k).unwrap_err();
        assert_eq!(e.refusal, Refusal::BadRequest("invalid Host header"));
        assert_eq!(e.outcome.decision, "error");
        assert!(matches!(plan(&out(None), &k), Ok(Plan::Mesh { .. })));
    }

    #[test]
    fn egress_decides_by_server_name_host_or_address() {
        let enforce = authz(AuthzMode::Enforce);
        let set = ward_spiffe::egress::EgressSet::compile(
            serde_json::from_str(
                r#"{ "services": [
                { "name": "stripe", "protocol": "tls", "hosts": ["api.stripe.com"], "ports": [443],
                  "from": [ { "principals": ["spiffe://t/web"] } ] },
                { "name": "status", "protocol": "http", "hosts": ["status.example.com"], "ports": [80],
                  "from": [ { "principals": ["spiffe://t/web"] } ] } ] }"#,
            )
            .unwrap(),
        )
        .unwrap();
        let web = id("spiffe://t/web");
        let k = Knows {
            own_id: Some(&web),
            authz: &enforce,
            destination: None,
            egress: Some(&set),
            gateway: None,
        };
        let plan_for = |dst: &str, hello: Option<Option<&str>>, host: Option<&str>| {
            let orig: SocketAddr = dst.parse().unwrap();
            let text = orig.to_string();
            let a = Arrived {
                role: Role::OutboundCapture {
                    routes: &[],
                    unknown: UnknownDestination::Egress,
                    dst: &text,
                },
                port: orig.port(),
                orig_dst: Some(orig),
                peer: None,
                request: host.map(|h| Head {
                    method: "GET",
                    path: "/",
                    authority: Some(h),
                    query: None,
                    headers: None,
                }),
                hello,
            };
            match plan(&a, &k) {
                Ok(Plan::External(e)) => Ok(e),
                Ok(p) => panic!("{}", p.label()),
                Err(r) => Err(r),
            }
        };
        // The SNI decides and the name is what gets resolved, whatever address was dialled.
        let e = plan_for("203.0.113.9:443", Some(Some("api.stripe.com")), None).unwrap();
        assert_eq!(
            e.reach,
            ward_spiffe::egress::Reach::Name("api.stripe.com".into())
        );
        assert_eq!(e.policy, "egress:stripe");
        // The Host (its port dropped) for HTTP.
        let e = plan_for("203.0.113.9:80", None, Some("status.example.com:80")).unwrap();
        assert_eq!(e.name.as_deref(), Some("status.example.com"));
        // Refused: another name, no name, an IP literal Host, plain TCP.
        for (dst, hello, host) in [
            ("203.0.113.9:443", Some(Some("evil.example")), None),
            ("203.0.113.9:443", Some(None), None),
            ("203.0.113.9:80", None, Some("203.0.113.9")),
            ("203.0.113.9:80", None, Some("[2001:db8::1]:80")),
            ("203.0.113.9:5432", None, None),
        ] {
            let r = plan_for(dst, hello, host).unwrap_err();
            assert!(matches!(r.refusal, Refusal::EgressDenied(_)), "{r:?}");
            assert_eq!(
                (r.outcome.decision, r.outcome.policy.as_str()),
                ("deny", "egress:default")
            );
        }
    }

    #[test]
    fn outbound_capture_table() {
        let enforce = authz(AuthzMode::Enforce);
        let k = Knows {
            own_id: None,
            authz: &enforce,
            destination: None,
            egress: None,
            gateway: None,
        };
        let routes = vec![
            MeshRoute {
                dst: "10.250.2.0/24".parse().unwrap(),
                ports: vec![8080],
                expected_ids: vec![id("spiffe://t/b")],
            },
            MeshRoute {
                dst: "fd00:250:2::/64".parse().unwrap(),
                ports: vec![],
                expected_ids: vec![id("spiffe://t/b6")],
            },
        ];
        let cases: Vec<(&str, UnknownDestination, Result<&str, ()>)> = vec![
            (
                "10.250.2.2:8080",
                UnknownDestination::Passthrough,
                Ok("mesh spiffe://t/b"),
            ),
            (
                "10.250.2.2:9090",
                UnknownDestination::Passthrough,
                Ok("passthrough"),
            ),
            ("10.250.2.2:9090", UnknownDestination::Refuse, Err(())),
            (
                "10.9.9.9:8080",
                UnknownDestination::Passthrough,
                Ok("passthrough"),
            ),
            (
                "[fd00:250:2::2]:8080",
                UnknownDestination::Refuse,
                Ok("mesh spiffe://t/b6"),
            ),
            (
                "[fd00:250:2::2]:1",
                UnknownDestination::Refuse,
                Ok("mesh spiffe://t/b6"),
            ),
            (
                "[::ffff:10.250.2.9]:8080",
                UnknownDestination::Refuse,
                Ok("mesh spiffe://t/b"),
            ),
        ];
        for (dst, unknown, want) in cases {
            let orig: SocketAddr = dst.parse().unwrap();
            let text = orig.to_string();
            let a = Arrived {
                role: Role::OutboundCapture {
                    routes: &routes,
                    unknown,
                    dst: &text,
                },
                port: orig.port(),
                orig_dst: Some(orig),
                peer: None,
                request: None,
                hello: None,
            };
            let got = match plan(&a, &k) {
                Ok(Plan::Mesh {
                    upstream, expected, ..
                }) => {
                    assert_eq!(upstream, text);
                    Ok(format!("mesh {}", expected[0]))
                }
                Ok(p) => Ok(p.label().to_owned()),
                Err(r) => {
                    assert!(matches!(r.refusal, Refusal::NoRoute(_)), "{r:?}");
                    Err(())
                }
            };
            assert_eq!(got, want.map(str::to_owned), "{dst} {unknown:?}");
        }
        // Not redirected: refused whatever the table says.
        let a = Arrived {
            role: Role::OutboundCapture {
                routes: &routes,
                unknown: UnknownDestination::Passthrough,
                dst: "",
            },
            port: 15001,
            orig_dst: None,
            peer: None,
            request: None,
            hello: None,
        };
        assert!(plan(&a, &k).is_err());
    }
}
