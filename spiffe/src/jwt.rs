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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use jsonwebtoken::{EncodingKey, Header};
    use ring::rand::SystemRandom;
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
    use serde_json::json;

    use super::*;
    use crate::bundle::JwtAuthority;

    /// Time is injected: every check runs at this instant, never the system clock.
    const NOW: u64 = 1_700_000_000;

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(NOW)
    }

    /// A P-256 JWT authority: PKCS#8 key for signing, SPKI for the bundle.
    struct Authority {
        kid: String,
        pkcs8: Vec<u8>,
        spki: Vec<u8>,
    }

    fn authority(kid: &str) -> Authority {
        let rng = SystemRandom::new();
        let alg = &ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
        let spki = PublicKey::Ec {
            curve: "P-256",
            point: pair.public_key().as_ref().to_vec(),
        }
        .to_spki_der()
        .unwrap();
        Authority {
            kid: kid.to_owned(),
            pkcs8: pkcs8.as_ref().to_vec(),
            spki,
        }
    }

    fn bundle(authorities: &[&Authority]) -> Bundle {
        let mut b = Bundle::new(TrustDomain::new("example.org").unwrap());
        b.jwt_authorities = authorities
            .iter()
            .map(|a| JwtAuthority {
                key_id: a.kid.clone(),
                public_key: a.spki.clone(),
            })
            .collect();
        b
    }

    fn sign(a: &Authority, kid: &str, claims: &Value) -> String {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&h, claims, &EncodingKey::from_ec_der(&a.pkcs8)).unwrap()
    }

    fn claims(aud: Value, exp: u64) -> Value {
        json!({"sub": "spiffe://example.org/web", "aud": aud, "exp": exp, "iat": NOW - 10})
    }

    fn b64(s: &str) -> String {
        URL_SAFE_NO_PAD.encode(s)
    }

    #[test]
    fn a_good_token_verifies() {
        let a = authority("k1");
        let other = authority("k0");
        let b = bundle(&[&other, &a]);
        let t = sign(&a, "k1", &claims(json!("db"), NOW + 300));
        let v = verify(&t, "db", &b, now()).unwrap();
        assert_eq!(v.id.as_str(), "spiffe://example.org/web");
        assert_eq!(v.expiry, UNIX_EPOCH + Duration::from_secs(NOW + 300));
        assert_eq!(v.claims["aud"], json!("db"));
        // An audience list holding ours.
        let t = sign(&a, "k1", &claims(json!(["cache", "db"]), NOW + 300));
        assert_eq!(
            verify(&t, "db", &b, now()).unwrap().id.as_str(),
            "spiffe://example.org/web"
        );
    }

    #[test]
    fn wrong_audience_is_refused() {
        let a = authority("k1");
        let b = bundle(&[&a]);
        let t = sign(&a, "k1", &claims(json!(["cache", "db"]), NOW + 300));
        assert_eq!(
            verify(&t, "web", &b, now()),
            Err(JwtError::Audience("web".into()))
        );
        let no_aud = json!({"sub": "spiffe://example.org/web", "exp": NOW + 300});
        assert_eq!(
            verify(&sign(&a, "k1", &no_aud), "db", &b, now()),
            Err(JwtError::Audience("db".into()))
        );
    }

    #[test]
    fn expiry_is_checked_against_the_given_time() {
        let a = authority("k1");
        let b = bundle(&[&a]);
        let t = sign(&a, "k1", &claims(json!("db"), NOW + 60));
        assert!(verify(&t, "db", &b, now()).is_ok());
        let at = |secs: u64| verify(&t, "db", &b, UNIX_EPOCH + Duration::from_secs(secs));
        assert!(at(NOW + 59).is_ok());
        // At exp the token is no longer valid.
        assert_eq!(at(NOW + 60), Err(JwtError::Expired));
        assert_eq!(at(NOW + 3600), Err(JwtError::Expired));
        let no_exp = json!({"sub": "spiffe://example.org/web", "aud": "db"});
        assert_eq!(
            verify(&sign(&a, "k1", &no_exp), "db", &b, now()),
            Err(JwtError::Expired)
        );
    }

    #[test]
    fn unknown_key_and_wrong_key_are_refused() {
        let a = authority("k1");
        let b = bundle(&[&a]);
        let t = sign(&a, "k9", &claims(json!("db"), NOW + 300));
        assert_eq!(
            verify(&t, "db", &b, now()),
            Err(JwtError::UnknownKey("k9".into()))
        );
        // Signed by another key under a known kid.
        let mallory = authority("k1");
        let t = sign(&mallory, "k1", &claims(json!("db"), NOW + 300));
        assert_eq!(verify(&t, "db", &b, now()), Err(JwtError::Signature));
        // A payload changed after signing.
        let good = sign(&a, "k1", &claims(json!("db"), NOW + 300));
        let parts: Vec<&str> = good.split('.').collect();
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            b64(&claims(json!("admin"), NOW + 300).to_string()),
            parts[2]
        );
        assert_eq!(
            verify(&forged, "admin", &b, now()),
            Err(JwtError::Signature)
        );
    }

    #[test]
    fn alg_none_and_hmac_are_refused() {
        let a = authority("k1");
        let b = bundle(&[&a]);
        let body = b64(&claims(json!("db"), NOW + 300).to_string());
        let none = format!(
            "{}.{body}.",
            b64(r#"{"alg":"none","kid":"k1","typ":"JWT"}"#)
        );
        assert_eq!(
            verify(&none, "db", &b, now()),
            Err(JwtError::Algorithm("none".into()))
        );
        // HS256 keyed with the public key (the classic key-confusion forgery).
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("k1".into());
        let hs = jsonwebtoken::encode(
            &h,
            &claims(json!("db"), NOW + 300),
            &EncodingKey::from_secret(&a.spki),
        )
        .unwrap();
        assert_eq!(
            verify(&hs, "db", &b, now()),
            Err(JwtError::Algorithm("HS256".into()))
        );
        // ES384 named for a P-256 key.
        let es384 = format!(
            "{}.{body}.AAAA",
            b64(r#"{"alg":"ES384","kid":"k1","typ":"JWT"}"#)
        );
        assert_eq!(
            verify(&es384, "db", &b, now()),
            Err(JwtError::KeyMismatch("k1".into(), "ES384".into()))
        );
    }

    #[test]
    fn header_and_subject_rules() {
        let a = authority("k1");
        let b = bundle(&[&a]);
        let body = b64(&claims(json!("db"), NOW + 300).to_string());
        let jku = format!(
            "{}.{body}.AAAA",
            b64(r#"{"alg":"ES256","kid":"k1","jku":"https://evil"}"#)
        );
        assert_eq!(
            verify(&jku, "db", &b, now()),
            Err(JwtError::Header("unexpected member `jku`".into()))
        );
        let no_kid = format!("{}.{body}.AAAA", b64(r#"{"alg":"ES256"}"#));
        assert_eq!(
            verify(&no_kid, "db", &b, now()),
            Err(JwtError::Header("kid missing".into()))
        );
        assert!(matches!(
            verify("a.b", "db", &b, now()),
            Err(JwtError::Malformed(_))
        ));
        // A subject of another trust domain is not verified with this bundle.
        let foreign = json!({"sub": "spiffe://other.test/web", "aud": "db", "exp": NOW + 300});
        assert_eq!(
            verify(&sign(&a, "k1", &foreign), "db", &b, now()),
            Err(JwtError::NoBundle("other.test".into()))
        );
        let rootish = json!({"sub": "spiffe://example.org", "aud": "db", "exp": NOW + 300});
        assert!(matches!(
            verify(&sign(&a, "k1", &rootish), "db", &b, now()),
            Err(JwtError::Subject(_))
        ));
    }

    #[test]
    fn verify_with_chooses_the_bundle_of_the_subject() {
        let a = authority("k1");
        let b = bundle(&[&a]);
        let t = sign(&a, "k1", &claims(json!("db"), NOW + 300));
        let pick = |td: &TrustDomain| (td == &b.trust_domain).then_some(&b);
        assert!(verify_with(&t, "db", pick, now()).is_ok());
        assert_eq!(
            verify_with(&t, "db", |_| None, now()),
            Err(JwtError::NoBundle("example.org".into()))
        );
    }
}
