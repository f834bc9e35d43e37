//! The SPIFFE X.509-SVID rules, checked on certificates issued by `ward_ca::issuer` with an
//! independent parser (`x509-cert`), not with `ward_spiffe::x509` (which is the code under
//! test: the issuer re-validates every certificate with it).
//!
//! Covered: the self-signed root, an intermediate signed by an upstream CA, leaves issued by
//! either, a signer rebuilt from its stored chain, lifetimes capped by the signing chain, and
//! the refusal of invalid DNS names.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use der::oid::db::rfc5280::{ID_KP_CLIENT_AUTH, ID_KP_SERVER_AUTH};
use der::oid::{AssociatedOid, ObjectIdentifier};
use der::{Decode, Encode};
use rcgen::PublicKeyData;
use ring::signature::{ECDSA_P256_SHA256_ASN1, UnparsedPublicKey};
use ward_ca::issuer::{IssueError, X509Signer};
use ward_ca::keys::PrivateKey;
use ward_spiffe::{Bundle, SpiffeId, TrustDomain};
use x509_cert::Certificate;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAltName,
    SubjectKeyIdentifier,
};

/// ecdsa-with-SHA256 (RFC 5758).
const ECDSA_WITH_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");

const TD: &str = "example.org";
const TD_ID: &str = "spiffe://example.org";
const HOUR: Duration = Duration::from_secs(3600);

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

fn td() -> TrustDomain {
    TrustDomain::new(TD).unwrap()
}

fn root_signer(now: SystemTime, ttl: Duration) -> X509Signer {
    X509Signer::self_signed(
        "x509-root",
        PrivateKey::generate("x509-root").unwrap(),
        &td(),
        now,
        ttl,
        &mut rand::rng(),
    )
    .unwrap()
}

fn bundle_for(signer: &X509Signer) -> Bundle {
    let mut bundle = Bundle::new(td());
    bundle.x509_authorities = signer.roots.clone();
    bundle
}

/// An upstream CA made with rcgen directly: a self-signed root valid until `now + ttl`.
fn upstream_root(
    now: SystemTime,
    ttl: Duration,
) -> (rcgen::Issuer<'static, rcgen::KeyPair>, Vec<u8>) {
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(rcgen::DnType::OrganizationName, "Upstream Corp");
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "Upstream Root CA");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    p.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x51; 16]));
    p.not_before = (now - Duration::from_secs(600)).into();
    p.not_after = (now + ttl).into();
    let key = rcgen::KeyPair::generate().unwrap();
    let der = p.self_signed(&key).unwrap().der().to_vec();
    (rcgen::Issuer::new(p, key), der)
}

/// A Ward intermediate signed by `upstream` (whose certificate is `upstream_der`, also the root).
fn intermediate_signer(
    upstream: &rcgen::Issuer<'static, rcgen::KeyPair>,
    upstream_der: &[u8],
    now: SystemTime,
    ttl: Duration,
) -> X509Signer {
    X509Signer::intermediate(
        "x509-int",
        PrivateKey::generate("x509-int").unwrap(),
        &td(),
        upstream,
        &[upstream_der.to_vec()],
        vec![upstream_der.to_vec()],
        now,
        ttl,
        &mut rand::rng(),
    )
    .unwrap()
}

fn workload_id() -> SpiffeId {
    SpiffeId::new("spiffe://example.org/ns/prod/sa/web").unwrap()
}

fn dns_names() -> Vec<String> {
    vec![
        "web.example.org".to_owned(),
        "*.web.prod.example.org".to_owned(),
    ]
}

fn issue(
    signer: &X509Signer,
    key: &rcgen::KeyPair,
    id: &SpiffeId,
    dns: &[String],
    ttl: Duration,
    now: SystemTime,
) -> Vec<Vec<u8>> {
    signer
        .issue_svid(
            key,
            id,
            dns,
            ttl,
            &bundle_for(signer),
            now,
            &mut rand::rng(),
        )
        .unwrap()
        .0
}

// ---------------------------------------------------------------------------------------------
// Independent parsing helpers (x509-cert / der / ring only)
// ---------------------------------------------------------------------------------------------

/// Parses with x509-cert and checks that the parse is faithful (re-encoding gives the input).
fn parse(der: &[u8]) -> Certificate {
    let cert = Certificate::from_der(der).expect("certificate parses with x509-cert");
    assert_eq!(
        cert.to_der().unwrap(),
        der,
        "x509-cert re-encoding differs from the issued DER (not DER, or lossy parse)"
    );
    cert
}

/// The single extension of type `T` as (critical, value); panics on a duplicate or bad value.
fn ext<'a, T>(cert: &'a Certificate) -> Option<(bool, T)>
where
    T: Decode<'a> + AssociatedOid,
{
    cert.tbs_certificate
        .get::<T>()
        .unwrap_or_else(|e| panic!("extension {} duplicated or malformed: {e}", T::OID))
}

fn assert_extensions_unique(cert: &Certificate) {
    let exts = cert.tbs_certificate.extensions.as_deref().unwrap_or(&[]);
    let mut seen = HashSet::new();
    for e in exts {
        assert!(
            seen.insert(e.extn_id),
            "extension {} appears twice",
            e.extn_id
        );
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn not_before(cert: &Certificate) -> u64 {
    cert.tbs_certificate
        .validity
        .not_before
        .to_unix_duration()
        .as_secs()
}

fn not_after(cert: &Certificate) -> u64 {
    cert.tbs_certificate
        .validity
        .not_after
        .to_unix_duration()
        .as_secs()
}

/// (critical, URI SANs, DNS SANs, number of SANs of any other type). `None` if there is no SAN.
fn sans(cert: &Certificate) -> Option<(bool, Vec<String>, Vec<String>, usize)> {
    let (critical, san) = ext::<SubjectAltName>(cert)?;
    let mut uris = Vec::new();
    let mut dns = Vec::new();
    let mut other = 0;
    for name in san.0 {
        match name {
            GeneralName::UniformResourceIdentifier(u) => uris.push(u.as_str().to_owned()),
            GeneralName::DnsName(d) => dns.push(d.as_str().to_owned()),
            _ => other += 1,
        }
    }
    Some((critical, uris, dns, other))
}

/// The subjectKeyIdentifier (asserted present, non-critical, non-empty).
fn ski(cert: &Certificate) -> Vec<u8> {
    let (critical, ski) =
        ext::<SubjectKeyIdentifier>(cert).expect("subjectKeyIdentifier is present");
    assert!(
        !critical,
        "subjectKeyIdentifier must not be critical (RFC 5280)"
    );
    let ski = ski.0.as_bytes().to_vec();
    assert!(!ski.is_empty(), "subjectKeyIdentifier is empty");
    ski
}

/// The keyIdentifier of the authorityKeyIdentifier, if the extension is present.
fn aki(cert: &Certificate) -> Option<Vec<u8>> {
    let (critical, aki) = ext::<AuthorityKeyIdentifier>(cert)?;
    assert!(
        !critical,
        "authorityKeyIdentifier must not be critical (RFC 5280)"
    );
    Some(
        aki.key_identifier
            .expect("authorityKeyIdentifier carries a keyIdentifier")
            .as_bytes()
            .to_vec(),
    )
}

/// Does `cert`'s signature verify with the public key of `signer` (ECDSA P-256 / SHA-256)?
fn signature_verifies(cert: &Certificate, signer: &Certificate) -> bool {
    let tbs = cert.tbs_certificate.to_der().unwrap();
    let public_key = signer
        .tbs_certificate
        .subject_public_key_info
        .subject_public_key
        .raw_bytes();
    let signature = cert.signature.raw_bytes();
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, public_key)
        .verify(&tbs, signature)
        .is_ok()
}

/// Serial number: positive and with at least 64 significant bits (8 bytes); returns it.
fn assert_serial(cert: &Certificate) -> Vec<u8> {
    let raw = cert.tbs_certificate.serial_number.as_bytes();
    assert!(!raw.is_empty(), "serial is empty");
    assert_eq!(raw[0] & 0x80, 0, "serial is negative: {raw:02x?}");
    let significant: Vec<u8> = raw.iter().copied().skip_while(|b| *b == 0).collect();
    assert!(!significant.is_empty(), "serial is zero");
    assert!(
        significant.len() >= 8,
        "serial has only {} significant bytes (< 64 bits): {raw:02x?}",
        significant.len()
    );
    significant
}

/// `cert` is signed by `issuing`: algorithm, signature, issuer name, authority key identifier.
fn assert_issued_by(cert: &Certificate, issuing: &Certificate) {
    assert_eq!(cert.signature_algorithm.oid, ECDSA_WITH_SHA256);
    assert!(cert.signature_algorithm.parameters.is_none());
    assert_eq!(
        cert.tbs_certificate.signature, cert.signature_algorithm,
        "TBS signature algorithm differs from the outer one"
    );
    assert!(
        signature_verifies(cert, issuing),
        "signature does not verify with the issuing certificate's key"
    );
    assert_eq!(
        cert.tbs_certificate.issuer, issuing.tbs_certificate.subject,
        "issuer name differs from the issuing certificate's subject"
    );
    assert_eq!(
        cert.tbs_certificate.issuer.to_der().unwrap(),
        issuing.tbs_certificate.subject.to_der().unwrap(),
        "issuer name bytes differ from the issuing certificate's subject bytes"
    );
}

/// The SPIFFE signing-certificate rules (root or intermediate). Returns the parsed cert.
fn assert_signing_cert(der: &[u8]) -> Certificate {
    let cert = parse(der);
    assert_eq!(cert.tbs_certificate.version, x509_cert::Version::V3);
    assert_extensions_unique(&cert);
    assert!(
        !cert.tbs_certificate.subject.0.is_empty(),
        "signing certificate has an empty subject"
    );

    let (critical, bc) = ext::<BasicConstraints>(&cert).expect("basicConstraints is present");
    assert!(critical, "basicConstraints must be critical");
    assert!(bc.ca, "signing certificate must have cA=true");

    let (critical, ku) = ext::<KeyUsage>(&cert).expect("keyUsage is present");
    assert!(critical, "keyUsage must be critical");
    assert!(ku.key_cert_sign(), "signing certificate lacks keyCertSign");
    assert!(ku.crl_sign(), "signing certificate lacks cRLSign");

    if let Some((critical, uris, dns, other)) = sans(&cert) {
        assert!(
            uris.len() <= 1,
            "signing certificate has several URI SANs: {uris:?}"
        );
        for uri in &uris {
            assert_eq!(
                uri, TD_ID,
                "signing certificate's SPIFFE ID must have no path"
            );
        }
        assert!(dns.is_empty(), "signing certificate has DNS SANs: {dns:?}");
        assert_eq!(other, 0, "signing certificate has unexpected SAN types");
        assert!(
            !critical,
            "SAN must not be critical when the subject is non-empty"
        );
    }
    ski(&cert);
    assert_serial(&cert);
    cert
}

/// Everything a leaf must satisfy, against its issuing certificate.
struct LeafExpect<'a> {
    id: &'a SpiffeId,
    dns: &'a [String],
    key: &'a rcgen::KeyPair,
    now: SystemTime,
    /// Expected notAfter, seconds since the epoch.
    not_after: u64,
}

/// The SPIFFE X.509-SVID leaf rules. Returns the parsed leaf.
fn assert_leaf(der: &[u8], issuing: &Certificate, want: &LeafExpect<'_>) -> Certificate {
    let cert = parse(der);
    let tbs = &cert.tbs_certificate;
    assert_eq!(tbs.version, x509_cert::Version::V3);
    assert_extensions_unique(&cert);

    // The certified key is the requested one.
    assert_eq!(
        tbs.subject_public_key_info.to_der().unwrap(),
        want.key.subject_public_key_info(),
        "leaf certifies a different key"
    );

    // SAN: exactly one URI (the requested ID, with a path) plus the requested DNS names.
    let (san_critical, uris, dns, other) = sans(&cert).expect("leaf has a SAN extension");
    assert_eq!(uris, vec![want.id.as_str().to_owned()], "URI SANs");
    let path = uris[0]
        .strip_prefix("spiffe://")
        .and_then(|rest| rest.split_once('/'))
        .map(|(_, path)| path)
        .unwrap_or_default();
    assert!(!path.is_empty(), "leaf SPIFFE ID {} has no path", uris[0]);
    assert_eq!(dns, want.dns, "DNS SANs");
    assert_eq!(other, 0, "leaf has SANs other than URI and DNS");

    // Non-empty subject, therefore the SAN is not critical.
    assert!(!tbs.subject.0.is_empty(), "leaf subject is empty");
    assert!(
        !san_critical,
        "SAN extension is critical although the subject is non-empty"
    );

    let (critical, bc) = ext::<BasicConstraints>(&cert).expect("basicConstraints is present");
    assert!(critical, "basicConstraints must be critical");
    assert!(!bc.ca, "leaf has cA=true");
    assert_eq!(bc.path_len_constraint, None);

    let (critical, ku) = ext::<KeyUsage>(&cert).expect("keyUsage is present");
    assert!(critical, "keyUsage must be critical");
    assert!(
        ku.digital_signature(),
        "leaf keyUsage lacks digitalSignature"
    );
    assert!(!ku.key_cert_sign(), "leaf keyUsage has keyCertSign");
    assert!(!ku.crl_sign(), "leaf keyUsage has cRLSign");

    let (_, eku) = ext::<ExtendedKeyUsage>(&cert).expect("extendedKeyUsage is present");
    assert!(eku.0.contains(&ID_KP_SERVER_AUTH), "EKU lacks serverAuth");
    assert!(eku.0.contains(&ID_KP_CLIENT_AUTH), "EKU lacks clientAuth");

    assert_serial(&cert);

    let leaf_ski = ski(&cert);
    let issuing_ski = ski(issuing);
    assert_eq!(
        aki(&cert).expect("authorityKeyIdentifier is present"),
        issuing_ski,
        "leaf AKI differs from the issuing certificate's SKI"
    );
    assert_ne!(leaf_ski, issuing_ski, "leaf SKI equals its issuer's");

    assert_issued_by(&cert, issuing);

    // Validity: backdated a little, ends exactly where expected, within the issuer's.
    let now = unix_secs(want.now);
    let nb = not_before(&cert);
    assert!(nb <= now, "notBefore {nb} is after now {now}");
    assert!(
        nb + 60 >= now,
        "notBefore {nb} is backdated more than 60s before {now}"
    );
    assert_eq!(not_after(&cert), want.not_after, "notAfter");
    assert!(
        not_after(&cert) <= not_after(issuing),
        "leaf outlives its issuing certificate"
    );
    cert
}

// ---------------------------------------------------------------------------------------------
// Self-signed mode
// ---------------------------------------------------------------------------------------------

#[test]
fn root_follows_signing_cert_rules() {
    let now = SystemTime::now();
    let signer = root_signer(now, 24 * HOUR);
    assert!(signer.self_signed);
    assert_eq!(signer.roots.len(), 1);
    assert_eq!(signer.signing_chain, signer.roots);
    assert!(signer.intermediates().is_empty());

    let root = assert_signing_cert(&signer.roots[0]);
    // The ID of the root, if any, is the trust domain's.
    let (_, uris, _, _) = sans(&root).expect("Ward roots carry the trust domain ID");
    assert_eq!(uris, vec![TD_ID.to_owned()]);
    // Self-signed: issuer == subject, signature verifies with its own key, AKI (if any) == SKI.
    assert_issued_by(&root, &root);
    if let Some(aki) = aki(&root) {
        assert_eq!(aki, ski(&root));
    }
    // Its SPKI is the authority key's.
    assert_eq!(
        root.tbs_certificate
            .subject_public_key_info
            .to_der()
            .unwrap(),
        signer.public_key_der()
    );
    // Validity: backdated a little, ends at now + ttl.
    let n = unix_secs(now);
    assert!(not_before(&root) <= n && not_before(&root) + 60 >= n);
    assert_eq!(not_after(&root), unix_secs(now + 24 * HOUR));
    assert_eq!(unix_secs(signer.not_after), not_after(&root));
}

#[test]
fn leaf_from_root_follows_svid_rules() {
    let now = SystemTime::now();
    let signer = root_signer(now, 24 * HOUR);
    let root = parse(&signer.roots[0]);
    let id = workload_id();
    let key = rcgen::KeyPair::generate().unwrap();

    // With DNS names.
    let dns = dns_names();
    let chain = issue(&signer, &key, &id, &dns, HOUR, now);
    assert_eq!(
        chain.len(),
        1,
        "a leaf from a self-signed root carries no intermediates"
    );
    let want = LeafExpect {
        id: &id,
        dns: &dns,
        key: &key,
        now,
        not_after: unix_secs(now + HOUR),
    };
    assert_leaf(&chain[0], &root, &want);

    // Without DNS names: the SAN holds only the URI.
    let chain = issue(&signer, &key, &id, &[], HOUR, now);
    assert_eq!(chain.len(), 1);
    assert_leaf(&chain[0], &root, &LeafExpect { dns: &[], ..want });
}

#[test]
fn leaf_serials_differ() {
    let now = SystemTime::now();
    let signer = root_signer(now, 24 * HOUR);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut serials = HashSet::new();
    for _ in 0..16 {
        let chain = issue(&signer, &key, &workload_id(), &[], HOUR, now);
        let serial = assert_serial(&parse(&chain[0]));
        assert!(serials.insert(serial), "two leaves share a serial number");
    }
    let root_serial = assert_serial(&parse(&signer.roots[0]));
    assert!(!serials.contains(&root_serial));
}

#[test]
fn leaf_never_outlives_root() {
    let now = SystemTime::now();
    let signer = root_signer(now, 2 * HOUR);
    let root = parse(&signer.roots[0]);
    let id = workload_id();
    let key = rcgen::KeyPair::generate().unwrap();
    // Asked for 48h from a root with 2h left: capped at the root's notAfter.
    let chain = issue(&signer, &key, &id, &[], 48 * HOUR, now);
    let want = LeafExpect {
        id: &id,
        dns: &[],
        key: &key,
        now,
        not_after: not_after(&root),
    };
    assert_leaf(&chain[0], &root, &want);
    // Later in the root's life, a 1h leaf is still capped.
    let later = now + HOUR + Duration::from_secs(30 * 60);
    let chain = issue(&signer, &key, &id, &[], HOUR, later);
    assert_leaf(&chain[0], &root, &LeafExpect { now: later, ..want });
}

// ---------------------------------------------------------------------------------------------
// Upstream mode
// ---------------------------------------------------------------------------------------------

#[test]
fn intermediate_follows_signing_cert_rules() {
    let now = SystemTime::now();
    let (upstream, upstream_der) = upstream_root(now, 7 * 24 * HOUR);
    let upstream_cert = parse(&upstream_der);
    let signer = intermediate_signer(&upstream, &upstream_der, now, 24 * HOUR);
    assert!(!signer.self_signed);
    assert_eq!(signer.roots, vec![upstream_der.clone()]);
    assert_eq!(
        signer.signing_chain.len(),
        1,
        "the upstream root is published in the bundle, not carried in the chain"
    );

    let int = assert_signing_cert(&signer.signing_chain[0]);
    let (_, uris, _, _) = sans(&int).expect("Ward intermediates carry the trust domain ID");
    assert_eq!(uris, vec![TD_ID.to_owned()]);
    assert_issued_by(&int, &upstream_cert);
    assert_eq!(
        aki(&int).expect("intermediate has an authorityKeyIdentifier"),
        ski(&upstream_cert),
        "intermediate AKI differs from the upstream root's SKI"
    );
    assert_eq!(
        int.tbs_certificate
            .subject_public_key_info
            .to_der()
            .unwrap(),
        signer.public_key_der()
    );
    let n = unix_secs(now);
    assert!(not_before(&int) <= n && not_before(&int) + 60 >= n);
    assert_eq!(not_after(&int), unix_secs(now + 24 * HOUR));
    assert!(not_after(&int) <= not_after(&upstream_cert));
}

#[test]
fn intermediate_never_outlives_upstream_root() {
    let now = SystemTime::now();
    let (upstream, upstream_der) = upstream_root(now, 2 * HOUR);
    let upstream_cert = parse(&upstream_der);
    // Asked for 24h from an upstream with 2h left.
    let signer = intermediate_signer(&upstream, &upstream_der, now, 24 * HOUR);
    let int = assert_signing_cert(&signer.signing_chain[0]);
    assert_eq!(not_after(&int), not_after(&upstream_cert));
    assert_eq!(unix_secs(signer.not_after), not_after(&upstream_cert));
}

#[test]
fn leaf_from_intermediate_follows_svid_rules() {
    let now = SystemTime::now();
    let (upstream, upstream_der) = upstream_root(now, 7 * 24 * HOUR);
    let upstream_cert = parse(&upstream_der);
    let signer = intermediate_signer(&upstream, &upstream_der, now, 24 * HOUR);
    let id = workload_id();
    let dns = dns_names();
    let key = rcgen::KeyPair::generate().unwrap();

    let chain = issue(&signer, &key, &id, &dns, HOUR, now);
    assert_eq!(chain.len(), 2, "chain is [leaf, intermediate]");
    assert_eq!(chain[1], signer.signing_chain[0]);
    let int = assert_signing_cert(&chain[1]);
    let leaf = assert_leaf(
        &chain[0],
        &int,
        &LeafExpect {
            id: &id,
            dns: &dns,
            key: &key,
            now,
            not_after: unix_secs(now + HOUR),
        },
    );
    // Not signed by the upstream root directly, and the chain stays within it.
    assert!(!signature_verifies(&leaf, &upstream_cert));
    assert!(not_after(&leaf) <= not_after(&upstream_cert));
}

#[test]
fn leaf_from_intermediate_never_outlives_chain() {
    let now = SystemTime::now();
    let (upstream, upstream_der) = upstream_root(now, 3 * HOUR);
    let upstream_cert = parse(&upstream_der);
    // The intermediate is capped by the upstream (3h), the leaf by the intermediate.
    let signer = intermediate_signer(&upstream, &upstream_der, now, 24 * HOUR);
    let int = parse(&signer.signing_chain[0]);
    let id = workload_id();
    let key = rcgen::KeyPair::generate().unwrap();
    let chain = issue(&signer, &key, &id, &[], 48 * HOUR, now);
    let leaf = assert_leaf(
        &chain[0],
        &int,
        &LeafExpect {
            id: &id,
            dns: &[],
            key: &key,
            now,
            not_after: not_after(&int),
        },
    );
    assert_eq!(not_after(&leaf), not_after(&upstream_cert));
}

/// Beyond the one-certificate upstream: the upstream hands Ward an upstream intermediate whose
/// own validity extends past the upstream root's (RFC 5280 does not forbid this, and rcgen
/// signs it). "A leaf never outlives its signing chain" then requires capping at the
/// earliest expiry in the whole chain up to the bundle root, not only at the first
/// certificate of `upstream_chain`.
#[test]
fn leaf_never_outlives_upstream_root_behind_upstream_intermediate() {
    let now = SystemTime::now();
    let (root_issuer, root_der) = upstream_root(now, 2 * HOUR);
    let root_cert = parse(&root_der);

    // Upstream intermediate, valid 24h, signed by the 2h root.
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "Upstream Issuing CA");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    p.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x52; 16]));
    p.not_before = (now - Duration::from_secs(600)).into();
    p.not_after = (now + 24 * HOUR).into();
    p.use_authority_key_identifier_extension = true;
    let up_key = rcgen::KeyPair::generate().unwrap();
    let up_der = p.signed_by(&up_key, &root_issuer).unwrap().der().to_vec();
    let up_issuer = rcgen::Issuer::new(p, up_key);

    let signer = X509Signer::intermediate(
        "x509-int",
        PrivateKey::generate("x509-int").unwrap(),
        &td(),
        &up_issuer,
        &[up_der.clone(), root_der.clone()],
        vec![root_der.clone()],
        now,
        12 * HOUR,
        &mut rand::rng(),
    )
    .unwrap();
    let int = assert_signing_cert(&signer.signing_chain[0]);
    let key = rcgen::KeyPair::generate().unwrap();
    let chain = issue(&signer, &key, &workload_id(), &[], 6 * HOUR, now);
    assert_eq!(
        chain.len(),
        3,
        "chain is [leaf, Ward intermediate, upstream intermediate]"
    );
    let leaf = parse(&chain[0]);
    assert!(
        not_after(&int) <= not_after(&root_cert),
        "Ward intermediate (notAfter {}) outlives the upstream root (notAfter {})",
        not_after(&int),
        not_after(&root_cert)
    );
    assert!(
        not_after(&leaf) <= not_after(&root_cert),
        "leaf (notAfter {}) outlives the upstream root (notAfter {})",
        not_after(&leaf),
        not_after(&root_cert)
    );
}

// ---------------------------------------------------------------------------------------------
// Signers rebuilt from storage
// ---------------------------------------------------------------------------------------------

#[test]
fn stored_signers_issue_the_same_profile() {
    let now = SystemTime::now();
    let id = workload_id();
    let dns = dns_names();
    let leaf_key = rcgen::KeyPair::generate().unwrap();

    // Self-signed root, rebuilt from its chain and key.
    let key = PrivateKey::generate("x509-root").unwrap();
    let pkcs8 = key.pkcs8().to_vec();
    let original =
        X509Signer::self_signed("x509-root", key, &td(), now, 24 * HOUR, &mut rand::rng()).unwrap();
    let stored = X509Signer::from_stored(
        "x509-root",
        PrivateKey::from_pkcs8("x509-root", pkcs8).unwrap(),
        original.signing_chain.clone(),
        original.roots.clone(),
    )
    .unwrap();
    assert!(stored.self_signed);
    let root = parse(&stored.roots[0]);
    let chain = issue(&stored, &leaf_key, &id, &dns, HOUR, now);
    assert_eq!(chain.len(), 1);
    assert_leaf(
        &chain[0],
        &root,
        &LeafExpect {
            id: &id,
            dns: &dns,
            key: &leaf_key,
            now,
            not_after: unix_secs(now + HOUR),
        },
    );

    // Intermediate, rebuilt from its chain and key.
    let (upstream, upstream_der) = upstream_root(now, 7 * 24 * HOUR);
    let key = PrivateKey::generate("x509-int").unwrap();
    let pkcs8 = key.pkcs8().to_vec();
    let original = X509Signer::intermediate(
        "x509-int",
        key,
        &td(),
        &upstream,
        std::slice::from_ref(&upstream_der),
        vec![upstream_der.clone()],
        now,
        24 * HOUR,
        &mut rand::rng(),
    )
    .unwrap();
    let stored = X509Signer::from_stored(
        "x509-int",
        PrivateKey::from_pkcs8("x509-int", pkcs8).unwrap(),
        original.signing_chain.clone(),
        original.roots.clone(),
    )
    .unwrap();
    assert!(!stored.self_signed);
    let int = parse(&stored.signing_chain[0]);
    let chain = issue(&stored, &leaf_key, &id, &dns, 48 * HOUR, now);
    assert_eq!(chain.len(), 2);
    assert_leaf(
        &chain[0],
        &int,
        &LeafExpect {
            id: &id,
            dns: &dns,
            key: &leaf_key,
            now,
            not_after: not_after(&int),
        },
    );
}

// ---------------------------------------------------------------------------------------------
// Refusals
// ---------------------------------------------------------------------------------------------

#[test]
fn invalid_dns_names_are_refused() {
    let now = SystemTime::now();
    let signer = root_signer(now, 24 * HOUR);
    let bundle = bundle_for(&signer);
    let key = rcgen::KeyPair::generate().unwrap();
    for bad in [
        "bad..name",
        "",
        ".leading.dot",
        "trailing.dot.",
        "-dash.example.org",
        "dash-.example.org",
        "under_score.example.org",
        "spa ce.example.org",
        "a.*.example.org",
        "*",
    ] {
        let result = signer.issue_svid(
            &key,
            &workload_id(),
            &["ok.example.org".to_owned(), bad.to_owned()],
            HOUR,
            &bundle,
            now,
            &mut rand::rng(),
        );
        match result {
            Err(IssueError::DnsName(name)) => assert_eq!(name, bad),
            other => panic!("DNS name {bad:?} was not refused: {other:?}"),
        }
    }
}
