//! Public keys as JSON Web Keys (RFC 7517/7518), converted from and to DER
//! SubjectPublicKeyInfo. Used for SPIFFE bundles and JWT-SVID verification.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use const_oid::ObjectIdentifier;
use der::asn1::{BitString, UintRef};
use der::{Decode, Encode};
use x509_cert::spki::{
    AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned, SubjectPublicKeyInfoRef,
};

const EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const P256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const P384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");
const RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
const ED25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");

/// Why a key could not be converted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The SPKI or JWK does not parse.
    #[error("public key does not parse: {0}")]
    Parse(String),
    /// Key type or curve not supported.
    #[error("unsupported key type: {0}")]
    Unsupported(String),
}

/// A public key in one of the supported algorithms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicKey {
    /// ECDSA; `curve` is `P-256` or `P-384`; `point` is the SEC1 uncompressed point.
    Ec {
        /// JOSE curve name.
        curve: &'static str,
        /// Uncompressed point 0x04 || X || Y.
        point: Vec<u8>,
    },
    /// RSA modulus and exponent, big-endian without leading zeros.
    Rsa {
        /// Modulus.
        n: Vec<u8>,
        /// Public exponent.
        e: Vec<u8>,
    },
    /// Ed25519 raw key.
    Ed25519(Vec<u8>),
}

impl PublicKey {
    /// Parses a DER SubjectPublicKeyInfo.
    pub fn from_spki_der(der: &[u8]) -> Result<Self, KeyError> {
        let spki =
            SubjectPublicKeyInfoRef::from_der(der).map_err(|e| KeyError::Parse(e.to_string()))?;
        let bits = spki
            .subject_public_key
            .as_bytes()
            .ok_or_else(|| KeyError::Parse("unaligned key bits".into()))?;
        let oid = spki.algorithm.oid;
        if oid == EC_PUBLIC_KEY {
            let curve_oid: ObjectIdentifier = spki
                .algorithm
                .parameters
                .ok_or_else(|| KeyError::Parse("EC key without curve".into()))?
                .decode_as()
                .map_err(|e| KeyError::Parse(e.to_string()))?;
            let (curve, len) = if curve_oid == P256 {
                ("P-256", 65)
            } else if curve_oid == P384 {
                ("P-384", 97)
            } else {
                return Err(KeyError::Unsupported(format!("EC curve {curve_oid}")));
            };
            if bits.len() != len || bits[0] != 4 {
                return Err(KeyError::Parse("EC point is not uncompressed".into()));
            }
            Ok(PublicKey::Ec {
                curve,
                point: bits.to_vec(),
            })
        } else if oid == RSA {
            let (n, e) = decode_rsa(bits)?;
            Ok(PublicKey::Rsa { n, e })
        } else if oid == ED25519 {
            Ok(PublicKey::Ed25519(bits.to_vec()))
        } else {
            Err(KeyError::Unsupported(format!("algorithm {oid}")))
        }
    }

    /// Encodes as DER SubjectPublicKeyInfo.
    pub fn to_spki_der(&self) -> Result<Vec<u8>, KeyError> {
        let enc = |e: der::Error| KeyError::Parse(e.to_string());
        let (algorithm, bits) = match self {
            PublicKey::Ec { curve, point } => {
                let curve_oid = if *curve == "P-256" { P256 } else { P384 };
                (
                    AlgorithmIdentifierOwned {
                        oid: EC_PUBLIC_KEY,
                        parameters: Some(der::Any::encode_from(&curve_oid).map_err(enc)?),
                    },
                    point.clone(),
                )
            }
            PublicKey::Rsa { n, e } => {
                let seq = RsaPublicKey {
                    n: UintRef::new(n).map_err(enc)?,
                    e: UintRef::new(e).map_err(enc)?,
                };
                (
                    AlgorithmIdentifierOwned {
                        oid: RSA,
                        parameters: Some(der::asn1::Null.into()),
                    },
                    seq.to_der().map_err(enc)?,
                )
            }
            PublicKey::Ed25519(k) => (
                AlgorithmIdentifierOwned {
                    oid: ED25519,
                    parameters: None,
                },
                k.clone(),
            ),
        };
        SubjectPublicKeyInfoOwned {
            algorithm,
            subject_public_key: BitString::from_bytes(&bits).map_err(enc)?,
        }
        .to_der()
        .map_err(enc)
    }

    /// The JWK members describing the key (`kty`, `crv`, `x`, `y`, `n`, `e`).
    pub fn to_jwk_members(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        let b64 = |b: &[u8]| serde_json::Value::String(URL_SAFE_NO_PAD.encode(b));
        match self {
            PublicKey::Ec { curve, point } => {
                let half = (point.len() - 1) / 2;
                m.insert("kty".into(), "EC".into());
                m.insert("crv".into(), (*curve).into());
                m.insert("x".into(), b64(&point[1..1 + half]));
                m.insert("y".into(), b64(&point[1 + half..]));
            }
            PublicKey::Rsa { n, e } => {
                m.insert("kty".into(), "RSA".into());
                m.insert("n".into(), b64(n));
                m.insert("e".into(), b64(e));
            }
            PublicKey::Ed25519(k) => {
                m.insert("kty".into(), "OKP".into());
                m.insert("crv".into(), "Ed25519".into());
                m.insert("x".into(), b64(k));
            }
        }
        m
    }

    /// Reads the key members of a JWK object.
    pub fn from_jwk_members(
        m: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Self, KeyError> {
        let s = |k: &str| -> Result<&str, KeyError> {
            m.get(k)
                .and_then(|v| v.as_str())
                .ok_or_else(|| KeyError::Parse(format!("JWK member `{k}` missing")))
        };
        let b = |k: &str| -> Result<Vec<u8>, KeyError> {
            URL_SAFE_NO_PAD
                .decode(s(k)?)
                .map_err(|e| KeyError::Parse(format!("JWK member `{k}`: {e}")))
        };
        match s("kty")? {
            "EC" => {
                let (curve, len) = match s("crv")? {
                    "P-256" => ("P-256", 32),
                    "P-384" => ("P-384", 48),
                    other => return Err(KeyError::Unsupported(format!("curve {other}"))),
                };
                let (x, y) = (b("x")?, b("y")?);
                if x.len() != len || y.len() != len {
                    return Err(KeyError::Parse("EC coordinate has the wrong length".into()));
                }
                let mut point = vec![4];
                point.extend_from_slice(&x);
                point.extend_from_slice(&y);
                Ok(PublicKey::Ec { curve, point })
            }
            "RSA" => Ok(PublicKey::Rsa {
                n: b("n")?,
                e: b("e")?,
            }),
            "OKP" if s("crv")? == "Ed25519" => Ok(PublicKey::Ed25519(b("x")?)),
            other => Err(KeyError::Unsupported(format!("kty {other}"))),
        }
    }
}

#[derive(der::Sequence)]
struct RsaPublicKey<'a> {
    n: UintRef<'a>,
    e: UintRef<'a>,
}

fn decode_rsa(bits: &[u8]) -> Result<(Vec<u8>, Vec<u8>), KeyError> {
    let k = RsaPublicKey::from_der(bits).map_err(|e| KeyError::Parse(e.to_string()))?;
    Ok((k.n.as_bytes().to_vec(), k.e.as_bytes().to_vec()))
}
