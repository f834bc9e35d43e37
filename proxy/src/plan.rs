//! The plan stage: a pure function from what arrived (role, peer, the HTTP head if any) and
//! what the proxy knows (its own ID, the policies in force) to where it goes — or why not.
//! No socket is touched here; `forward` carries the plan out.

use std::borrow::Cow;

use ward_spiffe::SpiffeId;
use ward_spiffe::policy::{Request as AuthzRequest, path::normalize};

use crate::authz::Authz;
use crate::observe::Outcome;
use crate::refusal::Refusal;

/// The listener's role, as far as planning needs it.
#[derive(Debug, Clone, Copy)]
pub enum Role<'a> {
    /// Authorize, then deliver to the local application at `app`.
    Inbound {
        /// `host:port` of the application.
        app: &'a str,
    },
    /// Carry to the peer proxy at `upstream`, which must present one of `expected`.
    Outbound {
        /// `host:port` of the peer proxy.
        upstream: &'a str,
        /// Accepted IDs (empty: any ID of a trusted trust domain).
        expected: &'a [SpiffeId],
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
}

/// What arrived: the role (borrowed from the listener, `'r`) and the request head (borrowed
/// from the request, `'h`).
#[derive(Debug, Clone, Copy)]
pub struct Arrived<'r, 'h> {
    /// The listener's role.
    pub role: Role<'r>,
    /// The port authorization sees (the listener's own port).
    pub port: u16,
    /// The verified peer (`None`: unauthenticated, or the local application).
    pub peer: Option<&'h SpiffeId>,
    /// The request head; `None` for a TCP connection.
    pub request: Option<Head<'h>>,
}

/// What the proxy knows when it plans.
#[derive(Debug, Clone, Copy)]
pub struct Knows<'a> {
    /// This workload's SPIFFE ID, once an SVID is held.
    pub own_id: Option<&'a SpiffeId>,
    /// The policies in force.
    pub authz: &'a Authz,
}

/// Where an allowed request or connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
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
}

impl Plan<'_, '_> {
    /// The plan's name in the access log.
    pub fn label(&self) -> &'static str {
        match self {
            Plan::Deliver { .. } => "deliver",
            Plan::Mesh { .. } => "mesh",
        }
    }
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
    match a.role {
        Role::Inbound { app } => inbound(a, k, app),
        Role::Outbound { upstream, expected } => {
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
    }
}

fn inbound<'r: 'h, 'h>(
    a: &Arrived<'r, 'h>,
    k: &Knows<'_>,
    app: &'r str,
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
    use crate::config::{Authorization, AuthzMode};
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
        })
    }

    #[test]
    fn inbound_table() {
        let (a, b, c) = (id("spiffe://t/a"), id("spiffe://t/b"), id("spiffe://t/c"));
        let enforce = authz(AuthzMode::Enforce);
        let dry = authz(AuthzMode::DryRun);
        let app = "127.0.0.1:8080";
        let inbound = |peer, port, request| Arrived {
            role: Role::Inbound { app },
            port,
            peer,
            request,
        };
        let k = Knows {
            own_id: Some(&b),
            authz: &enforce,
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
                },
                Err(Refusal::NoIdentity),
            ),
            (
                inbound(Some(&c), 15006, head("DELETE", "/y", None)),
                Knows {
                    own_id: Some(&b),
                    authz: &dry,
                },
                Ok((app, Some("/y"))),
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
            peer: None,
            request,
        };
        // Outbound needs no own ID to plan (the connect step needs the SVID).
        let k = Knows {
            own_id: None,
            authz: &enforce,
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
}
