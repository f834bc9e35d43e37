//! CSR parsing and acceptance on arbitrary DER: never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ward_ca::csr::parse(data, None);
    let id = ward_spiffe::SpiffeId::new("spiffe://example.org/w").unwrap();
    let _ = ward_ca::csr::parse(data, Some(&id));
});
