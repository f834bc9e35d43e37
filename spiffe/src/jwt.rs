//! JWT-SVID rules: header profile, claims, and verification against JWT authorities.
//!
//! Expiry is checked here against the caller's `now`, never against the system clock inside
//! the JWT library.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use crate::bundle::Bundle;
use crate::id::{SpiffeId, TrustDomain};
use crate::jwk::PublicKey;

/// Why a JWT-SVID was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// Not three base64url parts of JSON.
    #[error("token is malformed: {0}")]
    Malformed(String),
    /// Header has a member other than `alg`, `kid`, `typ`, or a bad `typ`.
    #[error("header is not a JWT-SVID header: {0}")]
    Header(String),
    /// `alg` is not one the SPIFFE JWT-SVID profile allows.
    #[error("algorithm {0} is not allowed")]
    Algorithm(String),
    /// `sub` missing or not a SPIFFE ID with a path.
    #[error("subject is not a valid SPIFFE ID: {0}")]
    Subject(String),
    /// No bundle for the subject's trust domain.
    #[error("no JWT authorities for trust domain {0}")]
    NoBundle(String),
    /// No authority with the token's `kid`.
    #[error("no JWT authority with key ID {0:?}")]
    UnknownKey(String),
    /// Key type does not fit the algorithm.
    #[error("key {0:?} does not fit algorithm {1}")]
    KeyMismatch(String, String),
    /// Signature does not verify.
    #[error("signature is invalid")]
    Signature,
    /// `exp` missing or in the past.
    #[error("token has expired or has no exp")]
    Expired,
    /// `aud` missing, or the expected audience is not in it.
    #[error("audience {0:?} is not in the token")]
    Audience(String),
}

/// Claims of a verified JWT-SVID.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedJwt {
    /// The `sub` claim.
    pub id: SpiffeId,
    /// Every claim, as JSON.
    pub claims: Map<String, Value>,
    /// `exp` as a time.
    pub expiry: SystemTime,
}

fn part(token: &str, idx: usize) -> Result<Map<String, Value>, JwtError> {
    let p = token
        .split('.')
        .nth(idx)
        .ok_or_else(|| JwtError::Malformed("not three parts".into()))?;
    let bytes = URL_SAFE_NO_PAD
        .decode(p)
        .map_err(|e| JwtError::Malformed(e.to_string()))?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(JwtError::Malformed("part is not a JSON object".into())),
        Err(e) => Err(JwtError::Malformed(e.to_string())),
    }
}

fn allowed_alg(alg: &str) -> Option<Algorithm> {
    Some(match alg {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        _ => return None,
    })
}

/// Reads the header, enforcing the JWT-SVID header profile; returns `(alg, kid)`.
pub fn check_header(token: &str) -> Result<(Algorithm, String), JwtError> {
    if token.split('.').count() != 3 {
        return Err(JwtError::Malformed("not three parts".into()));
    }
    let header = part(token, 0)?;
    if let Some(k) = header
        .keys()
        .find(|k| !matches!(k.as_str(), "alg" | "kid" | "typ"))
    {
        return Err(JwtError::Header(format!("unexpected member `{k}`")));
    }
    match header.get("typ") {
        None => {}
        Some(Value::String(t)) if t == "JWT" || t == "JOSE" => {}
        Some(t) => return Err(JwtError::Header(format!("typ {t}"))),
    }
    let alg_s = header
        .get("alg")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let alg = allowed_alg(alg_s).ok_or_else(|| JwtError::Algorithm(alg_s.to_owned()))?;
    let kid = header
        .get("kid")
        .and_then(Value::as_str)
        .ok_or_else(|| JwtError::Header("kid missing".into()))?;
    Ok((alg, kid.to_owned()))
}

/// The `sub` of a token, without verifying anything else (to choose the bundle).
pub fn unverified_subject(token: &str) -> Result<SpiffeId, JwtError> {
    let claims = part(token, 1)?;
    let sub = claims
        .get("sub")
        .and_then(Value::as_str)
        .unwrap_or_default();
    SpiffeId::new_with_path(sub).map_err(|e| JwtError::Subject(e.to_string()))
}

/// The `exp` of a token, without verifying anything (to schedule a refresh of a token the
/// issuer already verified).
pub fn unverified_expiry(token: &str) -> Result<std::time::SystemTime, JwtError> {
    let claims = part(token, 1)?;
    let exp = claims
        .get("exp")
        .and_then(Value::as_u64)
        .ok_or(JwtError::Expired)?;
    // Found by fuzzing (fuzz/jwt_svid): an `exp` past what SystemTime holds panicked.
    std::time::UNIX_EPOCH
        .checked_add(std::time::Duration::from_secs(exp))
        .ok_or(JwtError::Expired)
}

fn decoding_key(kid: &str, alg: Algorithm, spki: &[u8]) -> Result<DecodingKey, JwtError> {
    let mismatch = || JwtError::KeyMismatch(kid.to_owned(), format!("{alg:?}"));
    let key = PublicKey::from_spki_der(spki).map_err(|_| mismatch())?;
    match (alg, key) {
        (
            Algorithm::ES256,
            PublicKey::Ec {
                curve: "P-256",
                point,
            },
        )
        | (
            Algorithm::ES384,
            PublicKey::Ec {
                curve: "P-384",
                point,
            },
        ) => Ok(DecodingKey::from_ec_der(&point)),
        (
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512,
            PublicKey::Rsa { n, e },
        ) => Ok(DecodingKey::from_rsa_raw_components(&n, &e)),
        _ => Err(mismatch()),
    }
}

/// Verifies a JWT-SVID for `audience` with the JWT authorities in `bundle` at time `now`.
///
/// `bundle` must be the bundle of the subject's trust domain; use
/// [`unverified_subject`] to choose it.
pub fn verify(
    token: &str,
    audience: &str,
    bundle: &Bundle,
    now: SystemTime,
) -> Result<VerifiedJwt, JwtError> {
    let (alg, kid) = check_header(token)?;
    let id = unverified_subject(token)?;
    if !id.is_member_of(&bundle.trust_domain) {
        return Err(JwtError::NoBundle(id.trust_domain_name().to_owned()));
    }
    let authority = bundle
        .jwt_authorities
        .iter()
        .find(|a| a.key_id == kid)
        .ok_or_else(|| JwtError::UnknownKey(kid.clone()))?;
    let key = decoding_key(&kid, alg, &authority.public_key)?;
    let mut validation = Validation::new(alg);
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key, &validation)
        .map_err(|_| JwtError::Signature)?;
    let claims = data.claims;
    let exp = claims
        .get("exp")
        .and_then(Value::as_u64)
        .ok_or(JwtError::Expired)?;
    let expiry = UNIX_EPOCH + std::time::Duration::from_secs(exp);
    if expiry <= now {
        return Err(JwtError::Expired);
    }
    let has_aud = match claims.get("aud") {
        Some(Value::String(a)) => a == audience,
        Some(Value::Array(a)) => a.iter().any(|v| v.as_str() == Some(audience)),
        _ => false,
    };
    if !has_aud {
        return Err(JwtError::Audience(audience.to_owned()));
    }
    Ok(VerifiedJwt { id, claims, expiry })
}

/// Chooses the bundle for a token's subject from several trust domains, then verifies.
pub fn verify_with<'a>(
    token: &str,
    audience: &str,
    bundles: impl Fn(&TrustDomain) -> Option<&'a Bundle>,
    now: SystemTime,
) -> Result<VerifiedJwt, JwtError> {
    let id = unverified_subject(token)?;
    let td = id.trust_domain();
    let bundle = bundles(&td).ok_or_else(|| JwtError::NoBundle(td.to_string()))?;
    verify(token, audience, bundle, now)
}

#[cfg(test)]
mod fuzz_regressions {
    #![allow(clippy::unwrap_used)]

    #[test]
    fn an_expiry_past_what_time_holds_is_refused_not_a_panic() {
        use base64::Engine as _;
        let b = |j: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(j);
        let t = format!(
            "{}.{}.sig",
            b(r#"{"alg":"ES256","kid":"k"}"#),
            b(r#"{"sub":"spiffe://example.org/w","exp":18446744073709551615}"#)
        );
        assert!(super::unverified_expiry(&t).is_err());
    }
}
