//! Policy documents (YAML) and their evaluation: never panics; a document that compiles
//! evaluates any request to a verdict, the same one twice.
#![no_main]
use libfuzzer_sys::fuzz_target;
use ward_spiffe::SpiffeId;
use ward_spiffe::policy::{DefaultPolicy, PolicyDoc, PolicySet, Request};

fuzz_target!(|data: &[u8]| {
    // The first line is the request (`source method path port`), the rest the document.
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let (req, doc) = s.split_once('\n').unwrap_or((s, ""));
    let Ok(doc) = serde_yaml_ng::from_str::<PolicyDoc>(doc) else {
        return;
    };
    let Ok(set) = PolicySet::from_doc(doc) else {
        return;
    };
    let mut f = req.split(' ');
    let source = f.next().and_then(|x| SpiffeId::new(x).ok());
    let method = f.next();
    let path = f
        .next()
        .and_then(|p| ward_spiffe::policy::path::normalize(p).ok());
    let port = f.next().and_then(|p| p.parse().ok()).unwrap_or(80);
    let target = SpiffeId::new("spiffe://example.org/backend").unwrap();
    let r = Request {
        source: source.as_ref(),
        target: &target,
        method,
        path: path.as_deref(),
        port,
    };
    for d in [
        DefaultPolicy::Deny,
        DefaultPolicy::AllAuthenticated,
        DefaultPolicy::SameTrustDomain,
    ] {
        let a = set.evaluate(&r, d);
        assert_eq!(a, set.evaluate(&r, d), "evaluation is deterministic");
        let _ = set.explain(&r, d);
    }
});
