//! SPIFFE bundle (JWKS) JSON and PEM bundles: never panics; a bundle that parses serializes
//! and parses back to the same authorities.
#![no_main]
use libfuzzer_sys::fuzz_target;
use ward_spiffe::{Bundle, TrustDomain, bundle};

fuzz_target!(|data: &[u8]| {
    let _ = bundle::pem_certificates(data);
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let td = TrustDomain::new("example.org").unwrap();
    if let Ok(b) = Bundle::from_spiffe_json(td.clone(), s) {
        let json = b.to_spiffe_json().expect("a parsed bundle serializes");
        let again = Bundle::from_spiffe_json(td, &json).expect("and parses again");
        assert_eq!(again.x509_authorities, b.x509_authorities);
        assert_eq!(again.jwt_authorities, b.jwt_authorities);
        let _ = b.to_jwt_jwks();
    }
});
