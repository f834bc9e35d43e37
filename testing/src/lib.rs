//! Test support: a PKI generator for SPIFFE trust domains that can also make the broken
//! certificates attack tests need (two URI SANs, a CA as leaf, expired, foreign roots).
//! Keys and certificates are generated per test run; nothing is checked in.

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod etcd;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// A root CA for one trust domain.
pub struct Pki {
    /// Trust domain name.
    pub trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    root_der: Vec<u8>,
    root_pem: String,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

/// What is wrong (or right) with a leaf.
#[derive(Debug, Clone, Default)]
pub struct LeafOpts {
    /// A second URI SAN.
    pub extra_uri: Option<String>,
    /// Make it a CA certificate.
    pub ca: bool,
    /// Validity start (default: now - 60s).
    pub not_before: Option<SystemTime>,
    /// Validity end (default: now + 1h).
    pub not_after: Option<SystemTime>,
    /// Only the serverAuth extended key usage (no clientAuth).
    pub server_auth_only: bool,
    /// Leave out the SPIFFE ID URI SAN (only `extra_uri`, if set, remains).
    pub no_uri_san: bool,
    /// A keyUsage without digitalSignature (keyEncipherment only).
    pub no_digital_signature: bool,
    /// A leaf (not a CA) whose keyUsage also has keyCertSign.
    pub key_cert_sign: bool,
    /// IP address SANs (a server certificate for loopback, e.g. etcd's).
    pub ip_sans: Vec<std::net::IpAddr>,
}

/// An issued certificate with its key.
#[derive(Debug, Clone)]
pub struct Issued {
    /// DER certificate chain, leaf first.
    pub chain_der: Vec<Vec<u8>>,
    /// PEM chain.
    pub chain_pem: String,
    /// PKCS#8 DER key.
    pub key_der: Vec<u8>,
    /// PKCS#8 PEM key.
    pub key_pem: String,
}

impl Issued {
    /// Writes `<stem>.pem` and `<stem>.key` into `dir`; returns their paths.
    pub fn write(&self, dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
        let c = dir.join(format!("{stem}.pem"));
        let k = dir.join(format!("{stem}.key"));
        write_atomic(&c, self.chain_pem.as_bytes());
        write_atomic(&k, self.key_pem.as_bytes());
        (c, k)
    }
}

/// Writes a file via rename, so watchers never see a half-written file.
pub fn write_atomic(path: &Path, data: &[u8]) {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, data).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

impl Pki {
    /// A new root for `trust_domain`.
    pub fn new(trust_domain: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name
            .push(DnType::OrganizationName, "Ward test");
        p.distinguished_name
            .push(DnType::CommonName, format!("root {trust_domain}"));
        p.subject_alt_names = vec![SanType::URI(
            format!("spiffe://{trust_domain}").try_into().unwrap(),
        )];
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = SystemTime::now();
        p.not_before = (now - Duration::from_secs(3600)).into();
        p.not_after = (now + Duration::from_secs(24 * 3600)).into();
        let cert = p.self_signed(&key).unwrap();
        Self {
            trust_domain: trust_domain.to_owned(),
            root_der: cert.der().to_vec(),
            root_pem: cert.pem(),
            issuer: Issuer::new(p, key),
        }
    }

    /// The root certificate, DER.
    pub fn root_der(&self) -> &[u8] {
        &self.root_der
    }

    /// The root certificate, PEM (the bundle).
    pub fn bundle_pem(&self) -> &str {
        &self.root_pem
    }

    /// A valid X.509-SVID for `spiffe://<td><path>`, valid for an hour.
    pub fn svid(&self, path: &str) -> Issued {
        self.leaf(path, &LeafOpts::default())
    }

    /// A leaf for `spiffe://<td><path>` shaped by `opts`.
    pub fn leaf(&self, path: &str, opts: &LeafOpts) -> Issued {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name
            .push(DnType::OrganizationName, "Ward test");
        let mut sans = Vec::new();
        if !opts.no_uri_san {
            sans.push(SanType::URI(
                format!("spiffe://{}{path}", self.trust_domain)
                    .try_into()
                    .unwrap(),
            ));
        }
        if let Some(u) = &opts.extra_uri {
            sans.push(SanType::URI(u.as_str().try_into().unwrap()));
        }
        sans.extend(opts.ip_sans.iter().map(|ip| SanType::IpAddress(*ip)));
        p.subject_alt_names = sans;
        if opts.ca {
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::DigitalSignature,
            ];
        } else {
            p.is_ca = IsCa::ExplicitNoCa;
            p.key_usages = if opts.no_digital_signature {
                vec![KeyUsagePurpose::KeyEncipherment]
            } else {
                vec![KeyUsagePurpose::DigitalSignature]
            };
            if opts.key_cert_sign {
                p.key_usages.push(KeyUsagePurpose::KeyCertSign);
            }
            p.extended_key_usages = if opts.server_auth_only {
                vec![ExtendedKeyUsagePurpose::ServerAuth]
            } else {
                vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ]
            };
        }
        let now = SystemTime::now();
        p.not_before = opts
            .not_before
            .unwrap_or(now - Duration::from_secs(60))
            .into();
        p.not_after = opts
            .not_after
            .unwrap_or(now + Duration::from_secs(3600))
            .into();
        p.use_authority_key_identifier_extension = true;
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        Issued {
            chain_der: vec![cert.der().to_vec()],
            chain_pem: cert.pem(),
            key_der: key.serialize_der(),
            key_pem: key.serialize_pem(),
        }
    }

    /// Writes the bundle as `<dir>/bundle.pem`.
    pub fn write_bundle(&self, dir: &Path) -> PathBuf {
        let p = dir.join("bundle.pem");
        write_atomic(&p, self.root_pem.as_bytes());
        p
    }
}
pub mod grpc;
pub mod kube;
pub mod logs;
pub mod netns;

/// Runs Prometheus' `promtool check metrics` on an exposition `text`; panics with its findings
/// if it refuses it.
pub fn promtool_check(text: &str) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (./scripts/test installs it)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool runs");
    assert!(
        out.status.success(),
        "promtool refused the metrics:\n{}\n{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
