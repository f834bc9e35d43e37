//! Trust bundles: the X.509 and JWT authorities of one trust domain, and their SPIFFE bundle
//! (JWKS) and PEM encodings.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Map, Value, json};

use crate::id::TrustDomain;
use crate::jwk::{KeyError, PublicKey};

/// Why a bundle document was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    /// The JSON does not parse or has the wrong shape.
    #[error("bundle JSON: {0}")]
    Json(String),
    /// A key member is wrong.
    #[error("bundle key: {0}")]
    Key(#[from] KeyError),
    /// An `x509-svid` key does not have exactly one certificate in `x5c`.
    #[error("x509-svid key must have exactly one certificate in x5c")]
    X5c,
    /// A `jwt-svid` key has no `kid`.
    #[error("jwt-svid key must have a kid")]
    MissingKid,
    /// The PEM input is malformed.
    #[error("PEM: {0}")]
    Pem(String),
}

/// One JWT signing key as published in a bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtAuthority {
    /// The `kid` that JWT-SVIDs name in their header.
    pub key_id: String,
    /// DER SubjectPublicKeyInfo.
    pub public_key: Vec<u8>,
}

/// The authorities of one trust domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// Whose bundle this is.
    pub trust_domain: TrustDomain,
    /// Root (or upstream root) certificates, DER.
    pub x509_authorities: Vec<Vec<u8>>,
    /// JWT signing keys.
    pub jwt_authorities: Vec<JwtAuthority>,
    /// `spiffe_sequence`: increases on every change.
    pub sequence: u64,
    /// `spiffe_refresh_hint` in seconds.
    pub refresh_hint_secs: Option<u64>,
}

impl Bundle {
    /// An empty bundle.
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            x509_authorities: Vec::new(),
            jwt_authorities: Vec::new(),
            sequence: 0,
            refresh_hint_secs: None,
        }
    }

    /// X.509 authorities concatenated as DER, as the Workload API carries them.
    pub fn x509_der_concat(&self) -> Vec<u8> {
        self.x509_authorities.concat()
    }

    /// X.509 authorities as PEM.
    pub fn x509_pem(&self) -> String {
        self.x509_authorities
            .iter()
            .map(|c| pem_encode("CERTIFICATE", c))
            .collect()
    }

    /// The SPIFFE bundle document (a JWKS with `spiffe_sequence` and `spiffe_refresh_hint`).
    pub fn to_spiffe_json(&self) -> Result<String, BundleError> {
        let mut keys = Vec::new();
        for cert in &self.x509_authorities {
            let spki = crate::x509::spki_der(cert).map_err(|e| BundleError::Json(e.to_string()))?;
            let mut m = PublicKey::from_spki_der(&spki)?.to_jwk_members();
            m.insert("use".into(), "x509-svid".into());
            m.insert("x5c".into(), json!([STANDARD.encode(cert)]));
            keys.push(Value::Object(m));
        }
        keys.extend(self.jwt_keys()?);
        let mut doc = Map::new();
        doc.insert("keys".into(), Value::Array(keys));
        doc.insert("spiffe_sequence".into(), self.sequence.into());
        if let Some(h) = self.refresh_hint_secs {
            doc.insert("spiffe_refresh_hint".into(), h.into());
        }
        serde_json::to_string_pretty(&Value::Object(doc))
            .map_err(|e| BundleError::Json(e.to_string()))
    }

    /// A JWKS with only the JWT authorities, as `FetchJWTBundles` returns.
    pub fn to_jwt_jwks(&self) -> Result<String, BundleError> {
        let doc = json!({ "keys": self.jwt_keys()? });
        serde_json::to_string(&doc).map_err(|e| BundleError::Json(e.to_string()))
    }

    fn jwt_keys(&self) -> Result<Vec<Value>, BundleError> {
        self.jwt_authorities
            .iter()
            .map(|a| {
                let mut m = PublicKey::from_spki_der(&a.public_key)?.to_jwk_members();
                m.insert("use".into(), "jwt-svid".into());
                m.insert("kid".into(), a.key_id.clone().into());
                Ok(Value::Object(m))
            })
            .collect()
    }

    /// Parses a SPIFFE bundle document (also accepts a plain JWKS of JWT keys).
    pub fn from_spiffe_json(trust_domain: TrustDomain, json: &str) -> Result<Self, BundleError> {
        let doc: Value =
            serde_json::from_str(json).map_err(|e| BundleError::Json(e.to_string()))?;
        let keys = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or_else(|| BundleError::Json("`keys` array missing".into()))?;
        let mut bundle = Bundle::new(trust_domain);
        bundle.sequence = doc
            .get("spiffe_sequence")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        bundle.refresh_hint_secs = doc.get("spiffe_refresh_hint").and_then(Value::as_u64);
        for key in keys {
            let m = key
                .as_object()
                .ok_or_else(|| BundleError::Json("key is not an object".into()))?;
            match m.get("use").and_then(Value::as_str) {
                Some("x509-svid") => {
                    let x5c = m
                        .get("x5c")
                        .and_then(Value::as_array)
                        .ok_or(BundleError::X5c)?;
                    let [cert] = x5c.as_slice() else {
                        return Err(BundleError::X5c);
                    };
                    let der = STANDARD
                        .decode(cert.as_str().ok_or(BundleError::X5c)?)
                        .map_err(|e| BundleError::Json(format!("x5c: {e}")))?;
                    crate::x509::check_signing_cert(&der)
                        .map_err(|e| BundleError::Json(format!("x5c certificate: {e}")))?;
                    // Its key must be one Ward can publish again (a bundle is served on as
                    // it was received).
                    let spki = crate::x509::spki_der(&der)
                        .map_err(|e| BundleError::Json(format!("x5c certificate: {e}")))?;
                    PublicKey::from_spki_der(&spki)?;
                    bundle.x509_authorities.push(der);
                }
                Some("jwt-svid") => {
                    let kid = m
                        .get("kid")
                        .and_then(Value::as_str)
                        .ok_or(BundleError::MissingKid)?;
                    let public_key = PublicKey::from_jwk_members(m)?.to_spki_der()?;
                    bundle.jwt_authorities.push(JwtAuthority {
                        key_id: kid.to_owned(),
                        public_key,
                    });
                }
                // Keys for other uses are ignored, as the SPIFFE bundle format requires.
                _ => {}
            }
        }
        Ok(bundle)
    }
}

/// Encodes DER bytes as one PEM block.
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Reads every `CERTIFICATE` block of a PEM document as DER.
pub fn pem_certificates(pem: &[u8]) -> Result<Vec<Vec<u8>>, BundleError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem)
        .map(|c| {
            c.map(|c| c.to_vec())
                .map_err(|e| BundleError::Pem(e.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Found by fuzzing (fuzz/bundle): an x509-svid authority whose certificate carries a key
    /// Ward cannot publish (an unknown EC curve) was accepted, and serving the bundle on then
    /// failed. It is refused when the bundle is read.
    #[test]
    fn an_authority_that_cannot_be_published_again_is_refused_on_read() {
        let json = include_str!("../testdata/bundle-unsupported-curve.json");
        let td = TrustDomain::new("example.org").unwrap();
        let e = Bundle::from_spiffe_json(td, json).unwrap_err();
        assert!(e.to_string().to_lowercase().contains("curve"), "{e}");
    }
}
