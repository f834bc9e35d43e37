//! Reading CSRs from agents: only the public key and the proof of possession are used; any
//! name the CSR asks for other than the expected SPIFFE ID is refused.

use rcgen::{CertificateSigningRequestParams, PublicKeyData, SanType};
use rustls_pki_types::CertificateSigningRequestDer;
use ward_spiffe::SpiffeId;

use crate::error::ApiError;

/// Longest CSR accepted, in bytes.
pub const MAX_CSR: usize = 16 * 1024;

/// The verified public key of a CSR.
pub type CsrKey = rcgen::PublicKey;

/// Parses a DER CSR, checks its signature, and returns its key. The CSR may name no SAN or
/// exactly `expected` as its one URI SAN; anything else is an error.
pub fn parse(der: &[u8], expected: Option<&SpiffeId>) -> Result<CsrKey, ApiError> {
    let inv = |m: &str| ApiError::InvalidArgument(m.to_owned());
    if der.is_empty() {
        return Err(inv("CSR is empty"));
    }
    if der.len() > MAX_CSR {
        return Err(inv("CSR is too large"));
    }
    let parsed =
        CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(der))
            .map_err(|e| match e {
                rcgen::Error::InvalidCertificationRequestSignature => {
                    inv("CSR signature is invalid")
                }
                rcgen::Error::UnsupportedExtension => inv("CSR requests unsupported extensions"),
                rcgen::Error::UnsupportedSignatureAlgorithm => {
                    inv("CSR key algorithm is not supported")
                }
                _ => inv("CSR is malformed"),
            })?;
    let sans = &parsed.params.subject_alt_names;
    let ok = match (sans.as_slice(), expected) {
        ([], _) => true,
        ([SanType::URI(uri)], Some(id)) => uri.as_str() == id.as_str(),
        _ => false,
    };
    if !ok {
        return Err(inv("CSR carries SANs other than the entry's SPIFFE ID"));
    }
    let alg = PublicKeyData::algorithm(&parsed.public_key);
    if alg != &rcgen::PKCS_ECDSA_P256_SHA256 && alg != &rcgen::PKCS_ECDSA_P384_SHA384 {
        return Err(inv("CSR key must be ECDSA P-256 or P-384"));
    }
    Ok(parsed.public_key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair};

    fn csr(sans: Vec<SanType>) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = sans;
        p.serialize_request(&key).unwrap().der().to_vec()
    }

    #[test]
    fn accepts_plain_and_matching_csr() {
        let id = SpiffeId::new("spiffe://td/w").unwrap();
        assert!(parse(&csr(vec![]), Some(&id)).is_ok());
        assert!(
            parse(
                &csr(vec![SanType::URI("spiffe://td/w".try_into().unwrap())]),
                Some(&id)
            )
            .is_ok()
        );
    }

    #[test]
    fn refuses_bad_csrs() {
        let id = SpiffeId::new("spiffe://td/w").unwrap();
        let other = csr(vec![SanType::URI("spiffe://td/other".try_into().unwrap())]);
        assert!(
            parse(&other, Some(&id))
                .unwrap_err()
                .to_string()
                .contains("SANs")
        );
        let extra = csr(vec![
            SanType::URI("spiffe://td/w".try_into().unwrap()),
            SanType::DnsName("evil.example".try_into().unwrap()),
        ]);
        assert!(
            parse(&extra, Some(&id))
                .unwrap_err()
                .to_string()
                .contains("SANs")
        );
        assert!(
            parse(b"garbage", Some(&id))
                .unwrap_err()
                .to_string()
                .contains("malformed")
        );
        assert!(parse(&[], None).unwrap_err().to_string().contains("empty"));
        let mut tampered = csr(vec![]);
        let n = tampered.len();
        tampered[n - 5] ^= 0x55; // inside the signature
        let e = parse(&tampered, None).unwrap_err().to_string();
        assert!(e.contains("signature") || e.contains("malformed"), "{e}");
    }
}
