//! X.509-SVID rules: the leaf profile, the signing-certificate profile, and chain verification
//! against a trust bundle.
//!
//! This is the one validator in Ward: the CA runs every certificate it issues through it before
//! the certificate leaves the CA, and the agent and proxy verify peers with it. It does no I/O.

use std::time::{Duration, SystemTime};

use const_oid::db::rfc5280::{ID_KP_CLIENT_AUTH, ID_KP_SERVER_AUTH};
use der::Decode;
use rustls_pki_types::{CertificateDer, UnixTime};
use x509_cert::Certificate;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAltName};

use crate::id::{IdError, SpiffeId};

/// Why a certificate or chain is not an acceptable SVID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    /// The DER does not parse as an X.509 certificate.
    #[error("certificate does not parse: {0}")]
    Parse(String),
    /// An empty chain was given.
    #[error("certificate chain is empty")]
    EmptyChain,
    /// The leaf has no URI SAN.
    #[error("leaf has no URI SAN")]
    NoUriSan,
    /// The leaf has more than one URI SAN.
    #[error("leaf has more than one URI SAN")]
    MultipleUriSans,
    /// The URI SAN is not a valid SPIFFE ID.
    #[error("URI SAN is not a valid SPIFFE ID: {0}")]
    BadId(IdError),
    /// The leaf ID has no path (IDs with no path belong to signing certificates).
    #[error("leaf SPIFFE ID has no path")]
    RootPathId,
    /// The SAN extension's criticality contradicts the subject (critical iff subject empty).
    #[error("SAN extension must be critical exactly when the subject is empty")]
    SanCriticality,
    /// The leaf is a CA certificate.
    #[error("leaf has basicConstraints cA=true")]
    LeafIsCa,
    /// keyUsage missing or not critical.
    #[error("keyUsage extension is missing or not critical")]
    KeyUsageMissing,
    /// keyUsage lacks digitalSignature.
    #[error("leaf keyUsage lacks digitalSignature")]
    NoDigitalSignature,
    /// Leaf keyUsage has keyCertSign or cRLSign.
    #[error("leaf keyUsage has keyCertSign or cRLSign")]
    LeafCanSign,
    /// EKU present but without both serverAuth and clientAuth.
    #[error("extendedKeyUsage must contain both serverAuth and clientAuth")]
    ExtendedKeyUsage,
    /// A signing certificate is not a CA.
    #[error("signing certificate is not a CA (basicConstraints cA must be true)")]
    NotCa,
    /// A signing certificate lacks keyCertSign.
    #[error("signing certificate keyUsage lacks keyCertSign")]
    NoKeyCertSign,
    /// A signing certificate's SPIFFE ID has a path.
    #[error("signing certificate SPIFFE ID must have no path")]
    SigningIdHasPath,
    /// The leaf is in a different trust domain from the bundle.
    #[error("SPIFFE ID {id} is not in trust domain {expected}")]
    WrongTrustDomain {
        /// The peer's ID.
        id: String,
        /// The bundle's trust domain.
        expected: String,
    },
    /// Cryptographic chain verification failed (signature, validity, unknown issuer...).
    #[error("chain verification failed: {0}")]
    Chain(String),
    /// An extension is duplicated or malformed.
    #[error("malformed extension: {0}")]
    Extension(String),
}

fn parse(der: &[u8]) -> Result<Certificate, SvidError> {
    Certificate::from_der(der).map_err(|e| SvidError::Parse(e.to_string()))
}

fn ext<'a, T>(cert: &'a Certificate) -> Result<Option<(bool, T)>, SvidError>
where
    T: der::Decode<'a> + const_oid::AssociatedOid,
{
    cert.tbs_certificate
        .get::<T>()
        .map_err(|e| SvidError::Extension(format!("{}: {e}", T::OID)))
}

fn uri_sans(cert: &Certificate) -> Result<(bool, Vec<String>), SvidError> {
    let Some((critical, san)) = ext::<SubjectAltName>(cert)? else {
        return Ok((false, Vec::new()));
    };
    let uris = san
        .0
        .iter()
        .filter_map(|n| match n {
            GeneralName::UniformResourceIdentifier(u) => Some(u.as_str().to_owned()),
            _ => None,
        })
        .collect();
    Ok((critical, uris))
}

/// Validity period and identity of a parsed leaf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafInfo {
    /// The SPIFFE ID from the URI SAN.
    pub id: SpiffeId,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// Serial number bytes (big-endian, as encoded).
    pub serial: Vec<u8>,
    /// DNS SANs.
    pub dns_names: Vec<String>,
}

/// How strictly the leaf profile is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// What Ward issues: additionally requires EKU (if present) to hold both serverAuth and
    /// clientAuth and the SAN criticality to follow the subject.
    Issued,
    /// What Ward accepts from peers: the SPIFFE MUSTs only.
    Peer,
}

/// Checks the SPIFFE X.509-SVID leaf rules and returns the leaf's identity and validity.
pub fn check_leaf(der: &[u8], profile: Profile) -> Result<LeafInfo, SvidError> {
    let cert = parse(der)?;
    let (san_critical, uris) = uri_sans(&cert)?;
    let uri = match uris.as_slice() {
        [] => return Err(SvidError::NoUriSan),
        [one] => one,
        _ => return Err(SvidError::MultipleUriSans),
    };
    let id = SpiffeId::new(uri).map_err(SvidError::BadId)?;
    if id.path().is_empty() {
        return Err(SvidError::RootPathId);
    }
    let subject_empty = cert.tbs_certificate.subject.0.is_empty();
    if subject_empty && !san_critical
        || profile == Profile::Issued && !subject_empty && san_critical
    {
        return Err(SvidError::SanCriticality);
    }
    if let Some((_, bc)) = ext::<BasicConstraints>(&cert)?
        && bc.ca
    {
        return Err(SvidError::LeafIsCa);
    }
    let Some((true, ku)) = ext::<KeyUsage>(&cert)? else {
        return Err(SvidError::KeyUsageMissing);
    };
    if !ku.digital_signature() {
        return Err(SvidError::NoDigitalSignature);
    }
    if ku.key_cert_sign() || ku.crl_sign() {
        return Err(SvidError::LeafCanSign);
    }
    if profile == Profile::Issued
        && let Some((_, eku)) = ext::<ExtendedKeyUsage>(&cert)?
        && !(eku.0.contains(&ID_KP_SERVER_AUTH) && eku.0.contains(&ID_KP_CLIENT_AUTH))
    {
        return Err(SvidError::ExtendedKeyUsage);
    }
    let dns_names = match ext::<SubjectAltName>(&cert)? {
        Some((_, san)) => san
            .0
            .iter()
            .filter_map(|n| match n {
                GeneralName::DnsName(d) => Some(d.as_str().to_owned()),
                _ => None,
            })
            .collect(),
        None => Vec::new(),
    };
    let validity = &cert.tbs_certificate.validity;
    Ok(LeafInfo {
        id,
        not_before: validity.not_before.to_system_time(),
        not_after: validity.not_after.to_system_time(),
        serial: cert.tbs_certificate.serial_number.as_bytes().to_vec(),
        dns_names,
    })
}

/// What a web server certificate (a gateway's, from ACME or a file) is for: its DNS names and
/// validity. No SPIFFE rules apply to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerCertInfo {
    /// The DNS names of the subject alternative names (wildcards as written).
    pub dns_names: Vec<String>,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

/// Reads a server certificate's DNS names and validity.
pub fn server_cert_info(der: &[u8]) -> Result<ServerCertInfo, SvidError> {
    let cert = parse(der)?;
    let dns_names = match ext::<SubjectAltName>(&cert)? {
        Some((_, san)) => san
            .0
            .iter()
            .filter_map(|n| match n {
                GeneralName::DnsName(d) => Some(d.as_str().to_ascii_lowercase()),
                _ => None,
            })
            .collect(),
        None => Vec::new(),
    };
    let validity = &cert.tbs_certificate.validity;
    Ok(ServerCertInfo {
        dns_names,
        not_before: validity.not_before.to_system_time(),
        not_after: validity.not_after.to_system_time(),
    })
}

/// Checks the signing-certificate rules (CA flag, keyCertSign, ID without path) and returns
/// its expiry.
pub fn check_signing_cert(der: &[u8]) -> Result<SystemTime, SvidError> {
    let cert = parse(der)?;
    match ext::<BasicConstraints>(&cert)? {
        Some((_, bc)) if bc.ca => {}
        _ => return Err(SvidError::NotCa),
    }
    match ext::<KeyUsage>(&cert)? {
        Some((_, ku)) if ku.key_cert_sign() => {}
        _ => return Err(SvidError::NoKeyCertSign),
    }
    let (_, uris) = uri_sans(&cert)?;
    for uri in uris {
        let id = SpiffeId::new(&uri).map_err(SvidError::BadId)?;
        if !id.path().is_empty() {
            return Err(SvidError::SigningIdHasPath);
        }
    }
    Ok(cert.tbs_certificate.validity.not_after.to_system_time())
}

/// Validity window of any certificate.
pub fn validity(der: &[u8]) -> Result<(SystemTime, SystemTime), SvidError> {
    let cert = parse(der)?;
    let v = &cert.tbs_certificate.validity;
    Ok((v.not_before.to_system_time(), v.not_after.to_system_time()))
}

/// The earliest expiry along a chain: every certificate of `chain` and the root(s) in `roots`
/// that issued its last certificate (all roots if none matches by name). A certificate signed
/// through this chain must not outlive it.
pub fn chain_expiry(chain: &[Vec<u8>], roots: &[Vec<u8>]) -> Result<SystemTime, SvidError> {
    let parsed = chain
        .iter()
        .map(|c| parse(c))
        .collect::<Result<Vec<_>, _>>()?;
    let roots = roots
        .iter()
        .map(|c| parse(c))
        .collect::<Result<Vec<_>, _>>()?;
    let mut end = None::<SystemTime>;
    let mut take = |c: &Certificate| {
        let t = c.tbs_certificate.validity.not_after.to_system_time();
        end = Some(end.map_or(t, |e| e.min(t)));
    };
    parsed.iter().for_each(&mut take);
    let last_issuer = parsed.last().map(|c| &c.tbs_certificate.issuer);
    let issuing: Vec<&Certificate> = roots
        .iter()
        .filter(|r| Some(&r.tbs_certificate.subject) == last_issuer)
        .collect();
    if issuing.is_empty() {
        roots.iter().for_each(&mut take);
    } else {
        issuing.into_iter().for_each(&mut take);
    }
    end.ok_or(SvidError::EmptyChain)
}

/// Splits concatenated DER certificates (as the Workload API carries chains and bundles).
pub fn split_der(mut bytes: &[u8]) -> Result<Vec<Vec<u8>>, SvidError> {
    let bad = |m: &str| SvidError::Parse(format!("concatenated DER: {m}"));
    let mut out = Vec::new();
    while !bytes.is_empty() {
        if bytes[0] != 0x30 || bytes.len() < 2 {
            return Err(bad("not a SEQUENCE"));
        }
        let (len, hdr) = match bytes[1] {
            l if l < 0x80 => (usize::from(l), 2),
            0x81 => (
                usize::from(*bytes.get(2).ok_or_else(|| bad("truncated length"))?),
                3,
            ),
            0x82 => {
                let b = bytes.get(2..4).ok_or_else(|| bad("truncated length"))?;
                (usize::from(b[0]) << 8 | usize::from(b[1]), 4)
            }
            0x83 => {
                let b = bytes.get(2..5).ok_or_else(|| bad("truncated length"))?;
                (
                    usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]),
                    5,
                )
            }
            _ => return Err(bad("unsupported length")),
        };
        let total = hdr + len;
        if bytes.len() < total {
            return Err(bad("truncated certificate"));
        }
        out.push(bytes[..total].to_vec());
        bytes = &bytes[total..];
    }
    Ok(out)
}

/// The DER SubjectPublicKeyInfo of a certificate.
pub fn spki_der(der: &[u8]) -> Result<Vec<u8>, SvidError> {
    use der::Encode;
    let cert = parse(der)?;
    cert.tbs_certificate
        .subject_public_key_info
        .to_der()
        .map_err(|e| SvidError::Parse(e.to_string()))
}

/// True if `cert` (DER) carries a valid signature by the key in `spki` (DER
/// SubjectPublicKeyInfo). ECDSA P-256/P-384 keys, the only kinds Ward's authorities use; any
/// other key or algorithm, or unparsable input, gives `false`.
pub fn signed_by(cert: &[u8], spki: &[u8]) -> bool {
    use der::Encode;
    use ring::signature::{
        ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA384_ASN1, ECDSA_P384_SHA256_ASN1,
        ECDSA_P384_SHA384_ASN1, UnparsedPublicKey, VerificationAlgorithm,
    };
    const SHA256: &str = "1.2.840.10045.4.3.2";
    const SHA384: &str = "1.2.840.10045.4.3.3";
    const P256: &str = "1.2.840.10045.3.1.7";
    const P384: &str = "1.3.132.0.34";
    let Ok(c) = parse(cert) else { return false };
    let Ok(key) = x509_cert::spki::SubjectPublicKeyInfoOwned::from_der(spki) else {
        return false;
    };
    let curve = key
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.decode_as::<const_oid::ObjectIdentifier>().ok())
        .map(|o| o.to_string());
    let alg: &'static dyn VerificationAlgorithm = match (
        curve.as_deref(),
        c.signature_algorithm.oid.to_string().as_str(),
    ) {
        (Some(P256), SHA256) => &ECDSA_P256_SHA256_ASN1,
        (Some(P256), SHA384) => &ECDSA_P256_SHA384_ASN1,
        (Some(P384), SHA256) => &ECDSA_P384_SHA256_ASN1,
        (Some(P384), SHA384) => &ECDSA_P384_SHA384_ASN1,
        _ => return false,
    };
    let (Ok(tbs), Some(sig), Some(pk)) = (
        c.tbs_certificate.to_der(),
        c.signature.as_bytes(),
        key.subject_public_key.as_bytes(),
    ) else {
        return false;
    };
    UnparsedPublicKey::new(alg, pk).verify(&tbs, sig).is_ok()
}

/// Which side of a TLS connection the leaf is used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// The leaf authenticates a TLS client.
    Client,
    /// The leaf authenticates a TLS server.
    Server,
}

static SIG_ALGS: &[&dyn rustls_pki_types::SignatureVerificationAlgorithm] = &[
    webpki::ring::ECDSA_P256_SHA256,
    webpki::ring::ECDSA_P256_SHA384,
    webpki::ring::ECDSA_P384_SHA256,
    webpki::ring::ECDSA_P384_SHA384,
    webpki::ring::ED25519,
    webpki::ring::RSA_PKCS1_2048_8192_SHA256,
    webpki::ring::RSA_PKCS1_2048_8192_SHA384,
    webpki::ring::RSA_PKCS1_2048_8192_SHA512,
    webpki::ring::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
    webpki::ring::RSA_PSS_2048_8192_SHA384_LEGACY_KEY,
    webpki::ring::RSA_PSS_2048_8192_SHA512_LEGACY_KEY,
];

/// Verifies that `signature` over `msg` was made with the key of certificate `leaf`, by the
/// TLS signature scheme named `scheme` (rustls' spelling, e.g. `ECDSA_NISTP256_SHA256`): how
/// something an SVID's key signed outside a handshake (an access-log anchor) is checked. Only
/// the schemes Ward's SVIDs can use are known; any other name is refused.
pub fn verify_signature(
    leaf: &CertificateDer<'_>,
    scheme: &str,
    msg: &[u8],
    signature: &[u8],
) -> Result<(), SvidError> {
    let alg: &dyn rustls_pki_types::SignatureVerificationAlgorithm = match scheme {
        "ECDSA_NISTP256_SHA256" => webpki::ring::ECDSA_P256_SHA256,
        "ECDSA_NISTP384_SHA384" => webpki::ring::ECDSA_P384_SHA384,
        "ED25519" => webpki::ring::ED25519,
        "RSA_PSS_SHA256" => webpki::ring::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
        "RSA_PKCS1_SHA256" => webpki::ring::RSA_PKCS1_2048_8192_SHA256,
        other => {
            return Err(SvidError::Chain(format!(
                "unknown signature scheme {other:?}"
            )));
        }
    };
    let ee = webpki::EndEntityCert::try_from(leaf).map_err(|e| SvidError::Parse(e.to_string()))?;
    ee.verify_signature(alg, msg, signature)
        .map_err(|e| SvidError::Chain(format!("signature does not verify: {e}")))
}

/// Verifies an X.509-SVID chain (leaf first) against the X.509 authorities of the leaf's
/// trust domain at time `now`, and returns the leaf's identity.
///
/// `roots` are the DER certificates of the bundle for `trust_domain`. Intermediates come from
/// the chain. The leaf must satisfy the SPIFFE leaf rules ([`Profile::Peer`]).
pub fn verify_chain(
    chain: &[CertificateDer<'_>],
    roots: &[CertificateDer<'_>],
    trust_domain: &crate::TrustDomain,
    now: SystemTime,
    usage: Usage,
) -> Result<LeafInfo, SvidError> {
    let leaf = chain.first().ok_or(SvidError::EmptyChain)?;
    let info = check_leaf(leaf, Profile::Peer)?;
    verify_path(&info, chain, roots, trust_domain, now, usage)?;
    Ok(info)
}

/// The chain half of [`verify_chain`], for a leaf whose rules were already checked with
/// [`check_leaf`] (`info`): trust domain membership, intermediate rules, and the signature path
/// to one of `roots` at `now` for `usage`. Separate so callers that already parsed the leaf do
/// not parse it again.
pub fn verify_path(
    info: &LeafInfo,
    chain: &[CertificateDer<'_>],
    roots: &[CertificateDer<'_>],
    trust_domain: &crate::TrustDomain,
    now: SystemTime,
    usage: Usage,
) -> Result<(), SvidError> {
    let leaf = chain.first().ok_or(SvidError::EmptyChain)?;
    if !info.id.is_member_of(trust_domain) {
        return Err(SvidError::WrongTrustDomain {
            id: info.id.to_string(),
            expected: trust_domain.to_string(),
        });
    }
    for intermediate in &chain[1..] {
        check_signing_cert(intermediate)?;
    }
    let anchors = roots
        .iter()
        .map(|r| webpki::anchor_from_trusted_cert(r).map(|a| a.to_owned()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| SvidError::Chain(format!("bad bundle certificate: {e}")))?;
    let ee = webpki::EndEntityCert::try_from(leaf).map_err(|e| SvidError::Chain(e.to_string()))?;
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    let ku = match usage {
        Usage::Client => webpki::KeyUsage::client_auth(),
        Usage::Server => webpki::KeyUsage::server_auth(),
    };
    ee.verify_for_usage(
        SIG_ALGS,
        &anchors,
        &chain[1..],
        UnixTime::since_unix_epoch(secs),
        ku,
        None,
        None,
    )
    .map_err(|e| SvidError::Chain(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests;
