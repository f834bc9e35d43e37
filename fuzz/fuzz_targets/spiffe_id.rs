//! SPIFFE ID and trust domain parsing: never panics; what parses prints back as itself and
//! parses again to the same value.
#![no_main]
use libfuzzer_sys::fuzz_target;
use ward_spiffe::{SpiffeId, TrustDomain};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = SpiffeId::new(s) {
        let again = SpiffeId::new(id.as_str()).expect("a parsed ID parses again");
        assert_eq!(again, id);
        let td = id.trust_domain();
        assert!(id.is_member_of(&td));
        assert_eq!(
            TrustDomain::new(&td.id_string()).expect("its trust domain parses"),
            td
        );
        assert!(!id.path().contains("//") && !id.path().ends_with('/'));
    }
    if let Ok(td) = TrustDomain::new(s) {
        assert_eq!(TrustDomain::new(&td.id_string()).expect("round trip"), td);
    }
    let _ = SpiffeId::new_with_path(s);
});
