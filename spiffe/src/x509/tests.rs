//! Unit tests of the X.509-SVID rules, on certificates from `ward_testing::Pki`.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, SystemTime};

use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
use ward_testing::{Issued, LeafOpts, Pki};

use super::*;
use crate::TrustDomain;

const TD: &str = "example.org";

fn leaf_of(i: &Issued) -> &[u8] {
    &i.chain_der[0]
}

fn check(i: &Issued) -> Result<LeafInfo, SvidError> {
    check_leaf(leaf_of(i), Profile::Peer)
}

#[test]
fn a_good_leaf_gives_its_id_and_validity() {
    let now = SystemTime::now();
    let pki = Pki::new(TD);
    let info = check(&pki.svid("/web")).unwrap();
    assert_eq!(info.id.as_str(), "spiffe://example.org/web");
    assert!(info.dns_names.is_empty());
    assert!(info.not_before < now && now < info.not_after, "{info:?}");
    let life = info.not_after.duration_since(info.not_before).unwrap();
    // LeafOpts default: now - 60 s .. now + 1 h (second precision).
    assert!(life.abs_diff(Duration::from_secs(3660)) <= Duration::from_secs(2));
    assert!(!info.serial.is_empty());
    // Ward issues both EKUs and a non-critical SAN with a subject: the strict profile agrees.
    assert_eq!(
        check_leaf(leaf_of(&pki.svid("/web")), Profile::Issued)
            .unwrap()
            .id,
        info.id
    );
}

#[test]
fn leaf_rule_violations_name_the_rule() {
    let pki = Pki::new(TD);
    let leaf = |opts: LeafOpts| check(&pki.leaf("/w", &opts));
    assert_eq!(
        leaf(LeafOpts {
            no_uri_san: true,
            ..Default::default()
        }),
        Err(SvidError::NoUriSan)
    );
    assert_eq!(
        leaf(LeafOpts {
            extra_uri: Some("spiffe://example.org/admin".into()),
            ..Default::default()
        }),
        Err(SvidError::MultipleUriSans)
    );
    assert_eq!(
        leaf(LeafOpts {
            ca: true,
            ..Default::default()
        }),
        Err(SvidError::LeafIsCa)
    );
    assert_eq!(
        leaf(LeafOpts {
            no_digital_signature: true,
            ..Default::default()
        }),
        Err(SvidError::NoDigitalSignature)
    );
    assert_eq!(
        leaf(LeafOpts {
            key_cert_sign: true,
            ..Default::default()
        }),
        Err(SvidError::LeafCanSign)
    );
    // The one URI SAN is not a SPIFFE ID.
    assert!(matches!(
        leaf(LeafOpts {
            no_uri_san: true,
            extra_uri: Some("https://example.org/w".into()),
            ..Default::default()
        }),
        Err(SvidError::BadId(_))
    ));
    // An ID without a path names a trust domain, not a workload.
    assert_eq!(check(&pki.svid("")), Err(SvidError::RootPathId));
    assert!(matches!(
        check_leaf(b"not a certificate", Profile::Peer),
        Err(SvidError::Parse(_))
    ));
}

#[test]
fn the_issued_profile_also_requires_both_ekus() {
    let pki = Pki::new(TD);
    let server_only = pki.leaf(
        "/w",
        &LeafOpts {
            server_auth_only: true,
            ..Default::default()
        },
    );
    assert_eq!(
        check_leaf(leaf_of(&server_only), Profile::Issued),
        Err(SvidError::ExtendedKeyUsage)
    );
    // A peer's SVID only has to meet the SPIFFE MUSTs.
    assert_eq!(
        check(&server_only).unwrap().id.as_str(),
        "spiffe://example.org/w"
    );
}

#[test]
fn signing_certificate_rules() {
    let pki = Pki::new(TD);
    let root_expiry = check_signing_cert(pki.root_der()).unwrap();
    assert_eq!(root_expiry, validity(pki.root_der()).unwrap().1);
    assert_eq!(
        check_signing_cert(leaf_of(&pki.svid("/w"))),
        Err(SvidError::NotCa)
    );
}

fn der(i: &Issued) -> Vec<CertificateDer<'static>> {
    i.chain_der
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect()
}

fn roots(pki: &Pki) -> Vec<CertificateDer<'static>> {
    vec![CertificateDer::from(pki.root_der().to_vec())]
}

fn td() -> TrustDomain {
    TrustDomain::new(TD).unwrap()
}

#[test]
fn a_good_chain_verifies_for_both_usages() {
    let pki = Pki::new(TD);
    let svid = pki.svid("/api");
    let now = SystemTime::now();
    for usage in [Usage::Client, Usage::Server] {
        let info = verify_chain(&der(&svid), &roots(&pki), &td(), now, usage).unwrap();
        assert_eq!(info.id.as_str(), "spiffe://example.org/api");
    }
}

#[test]
fn a_leaf_of_another_trust_domain_is_refused() {
    let ours = Pki::new(TD);
    let theirs = Pki::new("other.test");
    let svid = theirs.svid("/api");
    // Even with their root among the roots: membership is checked before any signature.
    let mut all = roots(&ours);
    all.extend(roots(&theirs));
    assert_eq!(
        verify_chain(&der(&svid), &all, &td(), SystemTime::now(), Usage::Client),
        Err(SvidError::WrongTrustDomain {
            id: "spiffe://other.test/api".into(),
            expected: "example.org".into(),
        })
    );
}

fn chain_error(r: Result<LeafInfo, SvidError>) -> String {
    match r {
        Err(SvidError::Chain(m)) => m,
        other => panic!("want a chain error, got {other:?}"),
    }
}

#[test]
fn validity_is_checked_at_the_given_time() {
    let pki = Pki::new(TD);
    let svid = pki.svid("/api");
    let now = SystemTime::now();
    let at = |t| verify_chain(&der(&svid), &roots(&pki), &td(), t, Usage::Client);
    assert!(at(now).is_ok());
    let e = chain_error(at(now + Duration::from_secs(2 * 3600)));
    assert!(e.contains("CertExpired"), "{e}");
    let e = chain_error(at(now - Duration::from_secs(3600)));
    assert!(e.contains("CertNotValidYet"), "{e}");
}

#[test]
fn an_expired_leaf_is_refused() {
    let pki = Pki::new(TD);
    let now = SystemTime::now();
    let expired = pki.leaf(
        "/api",
        &LeafOpts {
            not_before: Some(now - Duration::from_secs(7200)),
            not_after: Some(now - Duration::from_secs(3600)),
            ..Default::default()
        },
    );
    let e = chain_error(verify_chain(
        &der(&expired),
        &roots(&pki),
        &td(),
        now,
        Usage::Server,
    ));
    assert!(e.contains("CertExpired"), "{e}");
}

#[test]
fn a_leaf_not_signed_by_a_bundle_root_is_refused() {
    let real = Pki::new(TD);
    // Same trust domain and the same issuer name as the real root, another key.
    let forged = Pki::new(TD);
    let e = chain_error(verify_chain(
        &der(&forged.svid("/api")),
        &roots(&real),
        &td(),
        SystemTime::now(),
        Usage::Client,
    ));
    assert!(e.contains("InvalidSignatureForPublicKey"), "{e}");
    // No root of the issuer's name at all.
    let unrelated = Pki::new("other.test");
    let e = chain_error(verify_chain(
        &der(&real.svid("/api")),
        &roots(&unrelated),
        &td(),
        SystemTime::now(),
        Usage::Client,
    ));
    assert!(e.contains("UnknownIssuer"), "{e}");
}

#[test]
fn chain_rule_and_usage_failures() {
    let pki = Pki::new(TD);
    let now = SystemTime::now();
    assert_eq!(
        verify_chain(&[], &roots(&pki), &td(), now, Usage::Client),
        Err(SvidError::EmptyChain)
    );
    // Leaf rules apply before the chain is looked at.
    let ca_leaf = pki.leaf(
        "/api",
        &LeafOpts {
            ca: true,
            ..Default::default()
        },
    );
    assert_eq!(
        verify_chain(&der(&ca_leaf), &roots(&pki), &td(), now, Usage::Client),
        Err(SvidError::LeafIsCa)
    );
    // A workload leaf passed as an intermediate is not a signing certificate.
    let mut chain = der(&pki.svid("/api"));
    chain.extend(der(&pki.svid("/other")));
    assert_eq!(
        verify_chain(&chain, &roots(&pki), &td(), now, Usage::Client),
        Err(SvidError::NotCa)
    );
    // serverAuth only: good for a server, not for a client.
    let server_only = pki.leaf(
        "/api",
        &LeafOpts {
            server_auth_only: true,
            ..Default::default()
        },
    );
    assert!(verify_chain(&der(&server_only), &roots(&pki), &td(), now, Usage::Server).is_ok());
    let e = chain_error(verify_chain(
        &der(&server_only),
        &roots(&pki),
        &td(),
        now,
        Usage::Client,
    ));
    assert!(e.contains("Eku"), "{e}");
}

fn sign(key_pkcs8: &[u8], msg: &[u8]) -> Vec<u8> {
    let rng = SystemRandom::new();
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, key_pkcs8, &rng).unwrap();
    key.sign(&rng, msg).unwrap().as_ref().to_vec()
}

#[test]
fn a_signature_by_the_leaf_key_verifies_and_nothing_else_does() {
    let pki = Pki::new(TD);
    let svid = pki.svid("/logger");
    let other = pki.svid("/other");
    let leaf = CertificateDer::from(svid.chain_der[0].clone());
    let msg = b"anchor 42 sha256:abcd";
    let sig = sign(&svid.key_der, msg);
    assert_eq!(
        verify_signature(&leaf, "ECDSA_NISTP256_SHA256", msg, &sig),
        Ok(())
    );
    let refused = |r: Result<(), SvidError>| match r {
        Err(SvidError::Chain(m)) => m,
        other => panic!("want a refusal, got {other:?}"),
    };
    let m = refused(verify_signature(
        &leaf,
        "ECDSA_NISTP256_SHA256",
        b"anchor 43 sha256:abcd",
        &sig,
    ));
    assert!(m.starts_with("signature does not verify"), "{m}");
    // Signed by another SVID's key.
    let m = refused(verify_signature(
        &leaf,
        "ECDSA_NISTP256_SHA256",
        msg,
        &sign(&other.key_der, msg),
    ));
    assert!(m.starts_with("signature does not verify"), "{m}");
    // A known scheme that does not fit the key.
    let m = refused(verify_signature(&leaf, "ED25519", msg, &sig));
    assert!(m.starts_with("signature does not verify"), "{m}");
    assert_eq!(
        verify_signature(&leaf, "ECDSA_NISTP521_SHA512", msg, &sig),
        Err(SvidError::Chain(
            "unknown signature scheme \"ECDSA_NISTP521_SHA512\"".into()
        ))
    );
    assert!(matches!(
        verify_signature(
            &CertificateDer::from(b"junk".to_vec()),
            "ECDSA_NISTP256_SHA256",
            msg,
            &sig
        ),
        Err(SvidError::Parse(_))
    ));
}

#[test]
fn signed_by_and_spki() {
    let pki = Pki::new(TD);
    let other = Pki::new(TD);
    let leaf = pki.svid("/w");
    let spki = spki_der(pki.root_der()).unwrap();
    assert!(signed_by(leaf_of(&leaf), &spki));
    assert!(!signed_by(
        leaf_of(&leaf),
        &spki_der(other.root_der()).unwrap()
    ));
    assert!(!signed_by(b"junk", &spki));
}

#[test]
fn split_der_splits_concatenated_certificates() {
    let pki = Pki::new(TD);
    let a = pki.svid("/a").chain_der[0].clone();
    let b = pki.root_der().to_vec();
    let both = [a.clone(), b.clone()].concat();
    assert_eq!(split_der(&both).unwrap(), vec![a.clone(), b]);
    assert_eq!(split_der(&[]).unwrap(), Vec::<Vec<u8>>::new());
    assert!(matches!(
        split_der(&a[..a.len() - 1]),
        Err(SvidError::Parse(m)) if m.contains("truncated certificate")
    ));
}
