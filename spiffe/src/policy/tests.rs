use super::*;

fn id(s: &str) -> SpiffeId {
    SpiffeId::new(s).unwrap()
}

fn doc(yaml_like_json: serde_json::Value) -> PolicySet {
    let d: PolicyDoc = serde_json::from_value(yaml_like_json).unwrap();
    PolicySet::from_doc(d).unwrap()
}

fn req<'a>(
    src: Option<&'a SpiffeId>,
    dst: &'a SpiffeId,
    m: Option<&'a str>,
    p: Option<&'a str>,
    port: u16,
) -> Request<'a> {
    Request {
        source: src,
        target: dst,
        method: m,
        path: p,
        port,
    }
}

#[test]
fn deny_then_allow_then_default() {
    let set = doc(serde_json::json!({ "policies": [
        { "name": "deny-admin", "target": { "spiffe_ids": ["spiffe://td/backend"] }, "action": "DENY",
          "rules": [ { "to": [ { "paths": ["/admin/*"] } ] } ] },
        { "name": "allow-frontend", "target": { "spiffe_ids": ["spiffe://td/backend"] }, "action": "ALLOW",
          "rules": [ { "from": [ { "principals": ["spiffe://td/frontend"] } ], "to": [ { "methods": ["GET", "POST"] } ] } ] },
        { "name": "audit-all", "target": { "spiffe_ids": ["*"] }, "action": "AUDIT", "rules": [ {} ] },
    ]}));
    let (fe, other, be, lone) = (
        id("spiffe://td/frontend"),
        id("spiffe://td/other"),
        id("spiffe://td/backend"),
        id("spiffe://td/lone"),
    );
    let cases: Vec<(Request<'_>, bool, Reason, Option<&str>)> = vec![
        (
            req(Some(&fe), &be, Some("GET"), Some("/api/x"), 80),
            true,
            Reason::AllowedByPolicy,
            Some("allow-frontend"),
        ),
        (
            req(Some(&fe), &be, Some("DELETE"), Some("/api/x"), 80),
            false,
            Reason::NoAllowMatched,
            None,
        ),
        (
            req(Some(&fe), &be, Some("GET"), Some("/admin/users"), 80),
            false,
            Reason::DeniedByPolicy,
            Some("deny-admin"),
        ),
        (
            req(Some(&other), &be, Some("GET"), Some("/api"), 80),
            false,
            Reason::NoAllowMatched,
            None,
        ),
        (
            req(None, &be, Some("GET"), Some("/api"), 80),
            false,
            Reason::NoAllowMatched,
            None,
        ),
        (
            req(Some(&fe), &lone, Some("GET"), Some("/"), 80),
            false,
            Reason::Default(DefaultPolicy::Deny),
            None,
        ),
    ];
    for (i, (r, allowed, reason, policy)) in cases.into_iter().enumerate() {
        let v = set.evaluate(&r, DefaultPolicy::Deny);
        assert_eq!(v.allowed, allowed, "case {i}");
        assert_eq!(v.reason, reason, "case {i}");
        assert_eq!(v.policy.as_deref(), policy, "case {i}");
        assert_eq!(v.audit.as_deref(), Some("audit-all"), "case {i}");
    }
}

#[test]
fn defaults() {
    let set = PolicySet::default();
    let (a, b, x) = (
        id("spiffe://td/a"),
        id("spiffe://td/b"),
        id("spiffe://other/x"),
    );
    let cases = [
        (DefaultPolicy::Deny, Some(&a), false),
        (DefaultPolicy::AllAuthenticated, Some(&x), true),
        (DefaultPolicy::AllAuthenticated, None, false),
        (DefaultPolicy::SameTrustDomain, Some(&a), true),
        (DefaultPolicy::SameTrustDomain, Some(&x), false),
        (DefaultPolicy::AllUnauthenticated, None, true),
    ];
    for (d, src, want) in cases {
        assert_eq!(
            set.evaluate(&req(src, &b, Some("GET"), Some("/"), 1), d)
                .allowed,
            want,
            "{d:?} {src:?}"
        );
    }
}

#[test]
fn patterns_trust_domains_namespaces() {
    let set = doc(serde_json::json!({ "policies": [
        { "name": "p", "target": { "spiffe_ids": ["spiffe://td/ns/prod/*"] }, "action": "ALLOW", "rules": [
            { "from": [ { "principals": ["*/sa/gateway"] } ] },
            { "from": [ { "namespaces": ["prod"], "not_principals": ["spiffe://td/ns/prod/sa/evil"] } ] },
            { "from": [ { "trust_domains": ["partner.org"] } ], "to": [ { "ports": [8443] } ] },
        ]},
    ]}));
    let dst = id("spiffe://td/ns/prod/sa/api");
    let ok = |s: &str, port| {
        set.evaluate(
            &req(Some(&id(s)), &dst, Some("GET"), Some("/"), port),
            DefaultPolicy::Deny,
        )
        .allowed
    };
    assert!(ok("spiffe://td/ns/edge/sa/gateway", 80));
    assert!(ok("spiffe://td/ns/prod/sa/web", 80));
    assert!(!ok("spiffe://td/ns/prod/sa/evil", 80));
    assert!(!ok("spiffe://td/ns/dev/sa/web", 80));
    assert!(ok("spiffe://partner.org/anything", 8443));
    assert!(!ok("spiffe://partner.org/anything", 80));
    // Not targeted: the default.
    let other = id("spiffe://td/ns/dev/sa/api");
    let v = set.evaluate(
        &req(
            Some(&id("spiffe://td/ns/prod/sa/web")),
            &other,
            None,
            None,
            1,
        ),
        DefaultPolicy::SameTrustDomain,
    );
    assert_eq!(v.reason, Reason::Default(DefaultPolicy::SameTrustDomain));
    assert!(v.allowed);
}

#[test]
fn http_fields_on_tcp_fail_closed() {
    let set = doc(serde_json::json!({ "policies": [
        { "name": "deny-post", "target": { "spiffe_ids": ["spiffe://td/db"] }, "action": "DENY",
          "rules": [ { "to": [ { "methods": ["POST"] } ] } ] },
        { "name": "allow-get", "target": { "spiffe_ids": ["spiffe://td/db2"] }, "action": "ALLOW",
          "rules": [ { "to": [ { "methods": ["GET"] } ] } ] },
    ]}));
    let src = id("spiffe://td/app");
    let v = set.evaluate(
        &req(Some(&src), &id("spiffe://td/db"), None, None, 5432),
        DefaultPolicy::AllUnauthenticated,
    );
    assert!(!v.allowed, "DENY with HTTP fields must deny TCP");
    let v = set.evaluate(
        &req(Some(&src), &id("spiffe://td/db2"), None, None, 5432),
        DefaultPolicy::AllUnauthenticated,
    );
    assert!(!v.allowed, "ALLOW with HTTP fields must not allow TCP");
}

#[test]
fn empty_rules_and_empty_rule() {
    let set = doc(serde_json::json!({ "policies": [
        { "name": "nothing", "target": { "spiffe_ids": ["spiffe://td/a"] }, "action": "ALLOW" },
        { "name": "everything", "target": { "spiffe_ids": ["spiffe://td/b"] }, "action": "ALLOW", "rules": [ {} ] },
    ]}));
    assert!(
        !set.evaluate(
            &req(None, &id("spiffe://td/a"), Some("GET"), Some("/"), 1),
            DefaultPolicy::AllUnauthenticated
        )
        .allowed
    );
    assert!(
        set.evaluate(
            &req(None, &id("spiffe://td/b"), Some("GET"), Some("/"), 1),
            DefaultPolicy::Deny
        )
        .allowed
    );
}

#[test]
fn validation_errors_name_the_field() {
    let bad = [
        (
            serde_json::json!({ "name": "a", "target": { "spiffe_ids": [] }, "action": "ALLOW" }),
            "target.spiffe_ids",
        ),
        (
            serde_json::json!({ "name": "a", "target": { "spiffe_ids": ["spiffe://td/a//b"] }, "action": "ALLOW" }),
            "target.spiffe_ids",
        ),
        (
            serde_json::json!({ "name": "a", "target": { "spiffe_ids": ["*"] }, "action": "ALLOW", "rules": [ { "from": [ { "principals": ["spi*ffe"] } ] } ] }),
            "rules[0].from[0]",
        ),
        (
            serde_json::json!({ "name": "a", "target": { "spiffe_ids": ["*"] }, "action": "ALLOW", "rules": [ { "to": [ { "methods": ["get"] } ] } ] }),
            "rules[0].to[0]",
        ),
        (
            serde_json::json!({ "name": "a", "target": { "spiffe_ids": ["*"] }, "action": "ALLOW", "rules": [ { "to": [ { "paths": ["api"] } ] } ] }),
            "rules[0].to[0]",
        ),
        (
            serde_json::json!({ "name": "a", "target": { "spiffe_ids": ["*"] }, "action": "ALLOW", "rules": [ { "from": [ { "namespaces": ["Prod"] } ] } ] }),
            "namespace",
        ),
        (
            serde_json::json!({ "name": "", "target": { "spiffe_ids": ["*"] }, "action": "ALLOW" }),
            "name",
        ),
    ];
    for (p, want) in bad {
        let policy: Policy = serde_json::from_value(p).unwrap();
        let e = PolicySet::compile(vec![policy]).unwrap_err();
        assert!(e.to_string().contains(want), "{e} should mention {want}");
    }
    let dup: Vec<Policy> = serde_json::from_value(serde_json::json!([
        { "name": "a", "target": { "spiffe_ids": ["*"] }, "action": "ALLOW" },
        { "name": "a", "target": { "spiffe_ids": ["*"] }, "action": "DENY" },
    ]))
    .unwrap();
    assert!(
        PolicySet::compile(dup)
            .unwrap_err()
            .to_string()
            .contains("duplicate")
    );
    let unknown = serde_json::from_value::<Policy>(
        serde_json::json!({ "name": "a", "target": { "spiffe_ids": ["*"] }, "action": "ALLOW", "rulez": [] }),
    );
    assert!(unknown.is_err());
}

#[test]
fn explanation_lists_every_policy() {
    let set = doc(serde_json::json!({ "policies": [
        { "name": "allow-fe", "target": { "spiffe_ids": ["spiffe://td/be"] }, "action": "ALLOW",
          "rules": [ { "from": [ { "principals": ["spiffe://td/fe"] } ] }, { "to": [ { "paths": ["/public/*"] } ] } ] },
    ]}));
    let (x, be) = (id("spiffe://td/x"), id("spiffe://td/be"));
    let e = set.explain(
        &req(Some(&x), &be, Some("GET"), Some("/private"), 80),
        DefaultPolicy::Deny,
    );
    assert!(!e.verdict.allowed);
    assert_eq!(
        e.policies[0].rules,
        vec![
            Some(Mismatch::From("principals")),
            Some(Mismatch::To("paths"))
        ]
    );
    let text = e.to_string();
    assert!(text.contains("decision: DENY"), "{text}");
    assert!(
        text.contains("rule 0: did not match: no source matched (`principals`)"),
        "{text}"
    );
    assert!(
        text.contains("rule 1: did not match: no operation matched (`paths`)"),
        "{text}"
    );
}
