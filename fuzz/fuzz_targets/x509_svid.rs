//! X.509-SVID parsing and chain validation on arbitrary DER: never panics. The first bytes pick
//! how the rest is used (one certificate, a concatenated chain verified against the same
//! bytes as roots).
#![no_main]
use libfuzzer_sys::fuzz_target;
use rustls_pki_types::CertificateDer;
use ward_spiffe::x509::{self, Profile, Usage};

fuzz_target!(|data: &[u8]| {
    let _ = x509::check_leaf(data, Profile::Peer);
    let _ = x509::check_leaf(data, Profile::Issued);
    let _ = x509::server_cert_info(data);
    let _ = x509::check_signing_cert(data);
    let _ = x509::validity(data);
    let _ = x509::spki_der(data);
    if let Ok(parts) = x509::split_der(data) {
        let chain: Vec<CertificateDer<'_>> = parts
            .iter()
            .map(|p| CertificateDer::from(p.as_slice()))
            .collect();
        let td = ward_spiffe::TrustDomain::new("example.org").unwrap();
        let now = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        for usage in [Usage::Client, Usage::Server] {
            let _ = x509::verify_chain(&chain, &chain, &td, now, usage);
        }
        let _ = x509::chain_expiry(&parts, &parts);
        if parts.len() >= 2 {
            let _ = x509::signed_by(&parts[0], &parts[1]);
        }
    }
});
