//! The authorization path normalizer: its output is idempotent and never holds `..` or `.`
//! segments, `//`, or an encoded `/` or `\` (policies must see one spelling of each path).
#![no_main]
use libfuzzer_sys::fuzz_target;
use ward_spiffe::policy::path::normalize;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(n) = normalize(s) else { return };
    if n == "*" {
        return;
    }
    assert!(n.starts_with('/'), "{s:?} -> {n:?}");
    assert_eq!(
        normalize(&n).as_deref(),
        Ok(n.as_str()),
        "not idempotent: {s:?} -> {n:?}"
    );
    assert!(!n.contains("//"), "{s:?} -> {n:?}");
    for seg in n.split('/').skip(1) {
        assert!(seg != ".." && seg != ".", "{s:?} -> {n:?}");
    }
    let lower = n.to_ascii_lowercase();
    assert!(
        !lower.contains("%2f") && !lower.contains("%5c") && !n.contains('\\'),
        "{s:?} -> {n:?}"
    );
});
