//! Building and signing certificates and JWTs: template → sign → re-validate.
//!
//! Every certificate leaves this module only after the shared validator in `ward_spiffe::x509`
//! accepted it against the bundle it will be verified with, and every JWT-SVID only after
//! `ward_spiffe::jwt` verified it. Time and serial randomness come from the caller.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use ward_spiffe::x509::{self, Profile, Usage};
use ward_spiffe::{Bundle, JwtAuthority, SpiffeId, TrustDomain};

use crate::keys::PrivateKey;

/// NotBefore is backdated by this much to absorb clock skew between machines.
pub const BACKDATE: Duration = Duration::from_secs(10);

/// Why issuance failed. Any of these is a bug or a bad request; nothing was issued.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// rcgen refused the parameters.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// The freshly signed certificate failed validation.
    #[error("issued certificate failed validation: {0}")]
    Validate(#[from] x509::SvidError),
    /// A DNS name is not valid.
    #[error("invalid DNS name {0:?}")]
    DnsName(String),
    /// The authority has expired or has less lifetime left than the backdate.
    #[error("signing authority {0} has expired")]
    AuthorityExpired(String),
    /// JWT encoding or self-verification failed.
    #[error("JWT-SVID: {0}")]
    Jwt(String),
}

/// A random positive serial of 128 bits (the high bit cleared so DER needs no sign byte).
pub fn random_serial(rng: &mut impl rand::RngCore) -> SerialNumber {
    let mut b = [0u8; 16];
    rng.fill_bytes(&mut b);
    b[0] &= 0x7f;
    b[0] |= 0x01; // never a short encoding: at least 121 significant bits
    SerialNumber::from_slice(&b)
}

fn subject(org: &str, cn: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, org);
    if let Some(cn) = cn {
        dn.push(DnType::CommonName, cn);
    }
    dn
}

fn uri_san(id: &str) -> Result<SanType, IssueError> {
    Ok(SanType::URI(id.try_into()?))
}

/// An X.509 signing authority: its key, its certificate chain up to (not including) the root
/// of the bundle, and the roots to publish.
pub struct X509Signer {
    /// Authority ID (also the key's ID in the key manager).
    pub id: String,
    issuer: Issuer<'static, PrivateKey>,
    /// The signing certificate followed by any upstream intermediates; empty-suffix rule: in
    /// self-signed mode this is just the root itself.
    pub signing_chain: Vec<Vec<u8>>,
    /// True if the signing certificate is the (self-signed) root published in the bundle.
    pub self_signed: bool,
    /// Roots published in the bundle for this authority.
    pub roots: Vec<Vec<u8>>,
    /// Expiry of the signing certificate.
    pub not_after: SystemTime,
    /// Earliest expiry of the signing chain up to and including its root.
    pub chain_not_after: SystemTime,
}

impl std::fmt::Debug for X509Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X509Signer")
            .field("id", &self.id)
            .field("self_signed", &self.self_signed)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

fn ca_params(
    td: &TrustDomain,
    serial: SerialNumber,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<CertificateParams, IssueError> {
    let mut p = CertificateParams::default();
    p.distinguished_name = subject("Ward", Some(&format!("Ward CA {}", td.name())));
    p.subject_alt_names = vec![uri_san(&td.id_string())?];
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.serial_number = Some(serial);
    p.not_before = not_before.into();
    p.not_after = not_after.into();
    p.use_authority_key_identifier_extension = true;
    Ok(p)
}

impl X509Signer {
    /// Creates a self-signed root for `td` valid from `now - BACKDATE` for `ttl`.
    pub fn self_signed(
        id: &str,
        key: PrivateKey,
        td: &TrustDomain,
        now: SystemTime,
        ttl: Duration,
        rng: &mut impl rand::RngCore,
    ) -> Result<Self, IssueError> {
        let mut p = ca_params(td, random_serial(rng), now - BACKDATE, now + ttl)?;
        // A self-signed root's AKI would equal its SKI; omit it as most roots do.
        p.use_authority_key_identifier_extension = false;
        let cert = p.self_signed(&key)?;
        let der = cert.der().to_vec();
        let not_after = x509::check_signing_cert(&der)?;
        Ok(Self {
            id: id.to_owned(),
            issuer: Issuer::new(p, key),
            signing_chain: vec![der.clone()],
            self_signed: true,
            roots: vec![der],
            not_after,
            chain_not_after: not_after,
        })
    }

    /// Creates an intermediate for `td` signed by an upstream CA. `upstream_chain` is the
    /// upstream signing certificate followed by any certificates between it and `roots`.
    #[allow(clippy::too_many_arguments)]
    pub fn intermediate(
        id: &str,
        key: PrivateKey,
        td: &TrustDomain,
        upstream: &Issuer<'_, rcgen::KeyPair>,
        upstream_chain: &[Vec<u8>],
        roots: Vec<Vec<u8>>,
        now: SystemTime,
        ttl: Duration,
        rng: &mut impl rand::RngCore,
    ) -> Result<Self, IssueError> {
        // Never outlive anything above us: the upstream chain and the root it reaches.
        let upstream_expiry = x509::chain_expiry(upstream_chain, &roots)?;
        let not_after = (now + ttl).min(upstream_expiry);
        if not_after <= now {
            return Err(IssueError::AuthorityExpired("upstream".into()));
        }
        let p = ca_params(td, random_serial(rng), now - BACKDATE, not_after)?;
        let cert = p.signed_by(&key, upstream)?;
        let der = cert.der().to_vec();
        let not_after = x509::check_signing_cert(&der)?;
        let mut signing_chain = vec![der];
        signing_chain.extend(
            upstream_chain
                .iter()
                .filter(|c| !roots.contains(c))
                .cloned(),
        );
        let chain_not_after = x509::chain_expiry(&signing_chain, &roots)?;
        Ok(Self {
            id: id.to_owned(),
            issuer: Issuer::new(p, key),
            signing_chain,
            self_signed: false,
            roots,
            not_after,
            chain_not_after,
        })
    }

    /// Rebuilds a signer from a stored certificate chain and its key.
    pub fn from_stored(
        id: &str,
        key: PrivateKey,
        signing_chain: Vec<Vec<u8>>,
        roots: Vec<Vec<u8>>,
    ) -> Result<Self, IssueError> {
        let first = signing_chain.first().ok_or(x509::SvidError::EmptyChain)?;
        let not_after = x509::check_signing_cert(first)?;
        let spki = x509::spki_der(first)?;
        if spki != key.public_key_der() {
            return Err(IssueError::Validate(x509::SvidError::Chain(
                "stored key does not match the authority certificate".into(),
            )));
        }
        let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(first.as_slice()), key)?;
        let self_signed = roots.contains(first);
        let chain_not_after = x509::chain_expiry(&signing_chain, &roots)?;
        Ok(Self {
            id: id.to_owned(),
            issuer,
            signing_chain,
            self_signed,
            roots,
            not_after,
            chain_not_after,
        })
    }

    /// The SPKI of the signing key.
    pub fn public_key_der(&self) -> Vec<u8> {
        self.issuer.key().public_key_der()
    }

    /// The intermediates a leaf signed by this authority must carry (none when self-signed).
    pub fn intermediates(&self) -> &[Vec<u8>] {
        if self.self_signed {
            &[]
        } else {
            &self.signing_chain
        }
    }

    /// Issues an X.509-SVID for `spki` (DER SubjectPublicKeyInfo) and returns the chain,
    /// leaf first, ready for the Workload API, with the leaf's facts. `bundle` is what peers
    /// will verify it with.
    #[allow(clippy::too_many_arguments)]
    pub fn issue_svid(
        &self,
        spki: &impl PublicKeyData,
        id: &SpiffeId,
        dns_names: &[String],
        ttl: Duration,
        bundle: &Bundle,
        now: SystemTime,
        rng: &mut impl rand::RngCore,
    ) -> Result<(Vec<Vec<u8>>, x509::LeafInfo), IssueError> {
        if self.chain_not_after <= now + BACKDATE {
            return Err(IssueError::AuthorityExpired(self.id.clone()));
        }
        let mut p = CertificateParams::default();
        p.distinguished_name = subject("Ward", None);
        let mut sans = vec![uri_san(id.as_str())?];
        for d in dns_names {
            validate_dns_name(d)?;
            sans.push(SanType::DnsName(
                d.as_str()
                    .try_into()
                    .map_err(|_| IssueError::DnsName(d.clone()))?,
            ));
        }
        p.subject_alt_names = sans;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.serial_number = Some(random_serial(rng));
        p.not_before = (now - BACKDATE).into();
        p.not_after = (now + ttl).min(self.chain_not_after).into();
        p.use_authority_key_identifier_extension = true;
        let leaf = p.signed_by(spki, &self.issuer)?.der().to_vec();

        let mut chain = vec![leaf];
        chain.extend(self.intermediates().iter().cloned());
        let info = self.validate(&chain, id, bundle, now)?;
        Ok((chain, info))
    }

    /// The re-validation every issued chain goes through.
    fn validate(
        &self,
        chain: &[Vec<u8>],
        id: &SpiffeId,
        bundle: &Bundle,
        now: SystemTime,
    ) -> Result<x509::LeafInfo, IssueError> {
        let info = x509::check_leaf(&chain[0], Profile::Issued)?;
        if &info.id != id {
            return Err(x509::SvidError::Chain(format!("issued ID {} != {id}", info.id)).into());
        }
        if info.not_after > self.chain_not_after {
            return Err(x509::SvidError::Chain("leaf outlives its signing chain".into()).into());
        }
        let chain: Vec<CertificateDer<'_>> = chain
            .iter()
            .map(|c| CertificateDer::from(c.as_slice()))
            .collect();
        let roots: Vec<CertificateDer<'_>> = bundle
            .x509_authorities
            .iter()
            .map(|c| CertificateDer::from(c.as_slice()))
            .collect();
        // One chain verification suffices: `check_leaf(Issued)` above already required the EKU
        // to hold both serverAuth and clientAuth, so the client-usage check would repeat the
        // same signature verification for nothing.
        x509::verify_path(
            &info,
            &chain,
            &roots,
            &bundle.trust_domain,
            now,
            Usage::Server,
        )?;
        Ok(info)
    }
}

/// RFC 1123 host names, optionally with a leading `*.` wildcard label.
pub fn validate_dns_name(name: &str) -> Result<(), IssueError> {
    let bad = || IssueError::DnsName(name.to_owned());
    let host = name.strip_prefix("*.").unwrap_or(name);
    if host.is_empty() || name.len() > 253 {
        return Err(bad());
    }
    for label in host.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(bad());
        }
    }
    Ok(())
}

/// A JWT signing authority.
pub struct JwtSigner {
    /// The `kid`.
    pub key_id: String,
    key: PrivateKey,
    encoding: jsonwebtoken::EncodingKey,
    /// When the key stops being used and published.
    pub not_after: SystemTime,
}

impl std::fmt::Debug for JwtSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtSigner")
            .field("key_id", &self.key_id)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl JwtSigner {
    /// Wraps a key.
    pub fn new(key_id: &str, key: PrivateKey, not_after: SystemTime) -> Self {
        let encoding = jsonwebtoken::EncodingKey::from_ec_der(key.pkcs8());
        Self {
            key_id: key_id.to_owned(),
            key,
            encoding,
            not_after,
        }
    }

    /// How this key appears in bundles.
    pub fn authority(&self) -> JwtAuthority {
        JwtAuthority {
            key_id: self.key_id.clone(),
            public_key: self.key.public_key_der(),
        }
    }

    /// The key manager ID of the private key.
    pub fn key_name(&self) -> &str {
        self.key.id()
    }

    /// Mints a JWT-SVID; `exp` never exceeds the key's own expiry; `iss` is set when the CA
    /// serves OIDC discovery. The token is verified with the shared verifier against `bundle`
    /// before it is returned.
    #[allow(clippy::too_many_arguments)]
    pub fn mint(
        &self,
        id: &SpiffeId,
        audience: &[String],
        ttl: Duration,
        issuer: Option<&str>,
        bundle: &Bundle,
        now: SystemTime,
    ) -> Result<(String, SystemTime), IssueError> {
        let first = audience
            .first()
            .ok_or_else(|| IssueError::Jwt("at least one audience is required".into()))?;
        let iat = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let exp_time = (now + ttl).min(self.not_after);
        let exp = exp_time
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        if exp <= iat {
            return Err(IssueError::AuthorityExpired(self.key_id.clone()));
        }
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(self.key_id.clone());
        header.typ = Some("JWT".into());
        let mut claims = serde_json::json!({
            "sub": id.as_str(),
            "aud": audience,
            "exp": exp,
            "iat": iat,
        });
        if let Some(iss) = issuer {
            claims["iss"] = iss.into();
        }
        let token = jsonwebtoken::encode(&header, &claims, &self.encoding)
            .map_err(|e| IssueError::Jwt(e.to_string()))?;
        ward_spiffe::jwt::verify(&token, first, bundle, now)
            .map_err(|e| IssueError::Jwt(format!("self-check failed: {e}")))?;
        Ok((token, std::time::UNIX_EPOCH + Duration::from_secs(exp)))
    }
}
