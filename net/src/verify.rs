//! rustls certificate verifiers for SPIFFE peers, both sides.
//!
//! They check the peer chain against the *current* bundle of the peer's trust domain (read at
//! handshake time from a [`TrustStore`], so bundle changes apply to the next handshake without
//! rebuilding any config), the SPIFFE leaf rules, and a [`PeerPolicy`]. There is no hostname
//! check: a SPIFFE peer is named by its URI SAN only.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};
use ward_spiffe::x509::{self, SvidError, Usage};
use ward_spiffe::{Bundle, SpiffeId, TrustDomain};

/// Bundles by trust domain.
pub type BundleSet = HashMap<TrustDomain, Bundle>;

/// The trust bundles currently in force, shared by every verifier of a process.
#[derive(Debug, Default)]
pub struct TrustStore {
    inner: RwLock<Arc<BundleSet>>,
}

impl TrustStore {
    /// An empty store (trusts nothing).
    pub fn new() -> Self {
        Self::default()
    }

    /// A snapshot of all bundles.
    pub fn snapshot(&self) -> Arc<BundleSet> {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the bundle of one trust domain; `false` when it held that bundle already
    /// (nothing changes, so configs and pools built under it stay).
    pub fn set(&self, bundle: Bundle) -> bool {
        let mut guard = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if guard.get(&bundle.trust_domain) == Some(&bundle) {
            return false;
        }
        let mut next = (**guard).clone();
        next.insert(bundle.trust_domain.clone(), bundle);
        *guard = Arc::new(next);
        true
    }

    /// The bundle of one trust domain.
    pub fn get(&self, td: &TrustDomain) -> Option<Bundle> {
        self.snapshot().get(td).cloned()
    }
}

/// Which authenticated peers a verifier accepts.
#[derive(Clone)]
pub enum PeerPolicy {
    /// Any SPIFFE ID in this trust domain.
    TrustDomain(TrustDomain),
    /// Any SPIFFE ID of a trust domain we hold a bundle for.
    AnyTrusted,
    /// Exactly one of these IDs.
    OneOf(Vec<SpiffeId>),
    /// A caller-supplied predicate.
    Custom(Arc<dyn Fn(&SpiffeId) -> bool + Send + Sync>),
}

impl std::fmt::Debug for PeerPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerPolicy::TrustDomain(td) => write!(f, "TrustDomain({td})"),
            PeerPolicy::AnyTrusted => f.write_str("AnyTrusted"),
            PeerPolicy::OneOf(ids) => write!(f, "OneOf({ids:?})"),
            PeerPolicy::Custom(_) => f.write_str("Custom"),
        }
    }
}

impl PeerPolicy {
    fn allows(&self, id: &SpiffeId) -> bool {
        match self {
            PeerPolicy::TrustDomain(td) => id.is_member_of(td),
            PeerPolicy::AnyTrusted => true,
            PeerPolicy::OneOf(ids) => ids.contains(id),
            PeerPolicy::Custom(f) => f(id),
        }
    }
}

/// Why a peer was refused, carried inside the rustls error so callers can count reasons.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// The chain breaks a SPIFFE rule or does not verify.
    #[error(transparent)]
    Svid(#[from] SvidError),
    /// No bundle for the peer's trust domain.
    #[error("no trust bundle for trust domain {0}")]
    UnknownTrustDomain(String),
    /// Authenticated, but not a peer this side accepts.
    #[error("peer {0} is not authorized")]
    NotAuthorized(String),
}

impl PeerError {
    /// A short, stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            PeerError::Svid(SvidError::Chain(msg)) if msg.contains("Expired") => "expired",
            PeerError::Svid(SvidError::Chain(msg)) if msg.contains("UnknownIssuer") => {
                "unknown_issuer"
            }
            PeerError::Svid(SvidError::Chain(msg)) if msg.contains("NotValidYet") => {
                "not_yet_valid"
            }
            PeerError::Svid(SvidError::Chain(msg)) if msg.contains("Eku") => "wrong_eku",
            PeerError::Svid(SvidError::Chain(_)) => "bad_chain",
            PeerError::Svid(SvidError::MultipleUriSans) => "multiple_uri_sans",
            PeerError::Svid(SvidError::LeafIsCa) => "ca_as_leaf",
            PeerError::Svid(_) => "not_an_svid",
            PeerError::UnknownTrustDomain(_) => "unknown_trust_domain",
            PeerError::NotAuthorized(_) => "unauthorized_id",
        }
    }
}

/// Verifies a peer chain: SPIFFE leaf rules, chain to the current bundle of the leaf's trust
/// domain, then the policy. Returns the peer's ID.
pub fn verify_peer(
    trust: &TrustStore,
    policy: &PeerPolicy,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: Usage,
) -> Result<SpiffeId, PeerError> {
    let leaf = x509::check_leaf(end_entity, x509::Profile::Peer)?;
    let td = leaf.id.trust_domain();
    let bundles = trust.snapshot();
    let bundle = bundles
        .get(&td)
        .ok_or_else(|| PeerError::UnknownTrustDomain(td.to_string()))?;
    let mut chain = Vec::with_capacity(1 + intermediates.len());
    chain.push(end_entity.clone());
    chain.extend(intermediates.iter().cloned());
    let roots: Vec<CertificateDer<'_>> = bundle
        .x509_authorities
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    let now = UNIX_EPOCH + Duration::from_secs(now.as_secs());
    x509::verify_path(&leaf, &chain, &roots, &td, now, usage)?;
    if !policy.allows(&leaf.id) {
        return Err(PeerError::NotAuthorized(leaf.id.to_string()));
    }
    Ok(leaf.id)
}

/// The SPIFFE ID of a peer whose chain a verifier of this module already accepted (read back
/// from the leaf of `rustls`' `peer_certificates()`); `None` when no certificate was presented.
pub fn peer_id(certs: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    let leaf = certs?.first()?;
    x509::check_leaf(leaf, x509::Profile::Peer)
        .ok()
        .map(|i| i.id)
}

fn to_rustls(e: PeerError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// Recovers the [`PeerError`] from a rustls handshake error, if it came from these verifiers.
pub fn peer_error(e: &rustls::Error) -> Option<&PeerError> {
    match e {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
            inner.downcast_ref::<PeerError>()
        }
        _ => None,
    }
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

/// Verifies servers (used in client configs).
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    trust: Arc<TrustStore>,
    policy: PeerPolicy,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    /// Accepts servers allowed by `policy` whose chains verify against `trust`.
    pub fn new(trust: Arc<TrustStore>, policy: PeerPolicy) -> Self {
        Self {
            trust,
            policy,
            algs: algorithms(),
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        verify_peer(
            &self.trust,
            &self.policy,
            end_entity,
            intermediates,
            now,
            Usage::Server,
        )
        .map_err(to_rustls)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Verifies clients (used in server configs).
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    trust: Arc<TrustStore>,
    policy: PeerPolicy,
    mandatory: bool,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeClientVerifier {
    /// Accepts clients allowed by `policy`. With `mandatory == false` a client may connect
    /// without a certificate (the application then decides, e.g. node attestation).
    pub fn new(trust: Arc<TrustStore>, policy: PeerPolicy, mandatory: bool) -> Self {
        Self {
            trust,
            policy,
            mandatory,
            algs: algorithms(),
        }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        verify_peer(
            &self.trust,
            &self.policy,
            end_entity,
            intermediates,
            now,
            Usage::Client,
        )
        .map_err(to_rustls)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::SystemTime;

    use ward_testing::{Issued, LeafOpts, Pki};

    use super::*;

    fn td(name: &str) -> TrustDomain {
        TrustDomain::new(name).unwrap()
    }

    fn id(s: &str) -> SpiffeId {
        SpiffeId::new(s).unwrap()
    }

    fn bundle_of(pki: &Pki) -> Bundle {
        let mut b = Bundle::new(td(&pki.trust_domain));
        b.x509_authorities = vec![pki.root_der().to_vec()];
        b
    }

    fn store(pkis: &[&Pki]) -> TrustStore {
        let t = TrustStore::new();
        for p in pkis {
            assert!(t.set(bundle_of(p)));
        }
        t
    }

    fn now() -> UnixTime {
        UnixTime::since_unix_epoch(
            SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap(),
        )
    }

    fn leaf(i: &Issued) -> CertificateDer<'static> {
        CertificateDer::from(i.chain_der[0].clone())
    }

    fn check(
        trust: &TrustStore,
        policy: &PeerPolicy,
        i: &Issued,
        usage: Usage,
    ) -> Result<SpiffeId, PeerError> {
        verify_peer(trust, policy, &leaf(i), &[], now(), usage)
    }

    #[test]
    fn a_good_peer_is_accepted_by_each_policy() {
        let pki = Pki::new("mesh.test");
        let trust = store(&[&pki]);
        let svid = pki.svid("/api");
        let want = id("spiffe://mesh.test/api");
        for policy in [
            PeerPolicy::TrustDomain(td("mesh.test")),
            PeerPolicy::AnyTrusted,
            PeerPolicy::OneOf(vec![id("spiffe://mesh.test/web"), want.clone()]),
            PeerPolicy::Custom(Arc::new(|i: &SpiffeId| i.path() == "/api")),
        ] {
            for usage in [Usage::Client, Usage::Server] {
                assert_eq!(
                    check(&trust, &policy, &svid, usage),
                    Ok(want.clone()),
                    "{policy:?}"
                );
            }
        }
    }

    #[test]
    fn a_peer_outside_the_allowed_set_is_refused() {
        let pki = Pki::new("mesh.test");
        let trust = store(&[&pki]);
        let svid = pki.svid("/api");
        let e = check(
            &trust,
            &PeerPolicy::OneOf(vec![id("spiffe://mesh.test/web")]),
            &svid,
            Usage::Client,
        )
        .unwrap_err();
        assert_eq!(e, PeerError::NotAuthorized("spiffe://mesh.test/api".into()));
        assert_eq!(e.reason(), "unauthorized_id");
        assert_eq!(
            check(&trust, &PeerPolicy::OneOf(vec![]), &svid, Usage::Client),
            Err(PeerError::NotAuthorized("spiffe://mesh.test/api".into()))
        );
        assert_eq!(
            check(
                &trust,
                &PeerPolicy::Custom(Arc::new(|_: &SpiffeId| false)),
                &svid,
                Usage::Client
            ),
            Err(PeerError::NotAuthorized("spiffe://mesh.test/api".into()))
        );
    }

    #[test]
    fn trust_domain_mismatches_are_refused() {
        let ours = Pki::new("mesh.test");
        let theirs = Pki::new("other.test");
        // A peer of a trust domain we hold no bundle for.
        let e = check(
            &store(&[&ours]),
            &PeerPolicy::AnyTrusted,
            &theirs.svid("/api"),
            Usage::Client,
        )
        .unwrap_err();
        assert_eq!(e, PeerError::UnknownTrustDomain("other.test".into()));
        assert_eq!(e.reason(), "unknown_trust_domain");
        // Trusted (we hold its bundle), but the policy names our trust domain only.
        let both = store(&[&ours, &theirs]);
        assert_eq!(
            check(
                &both,
                &PeerPolicy::TrustDomain(td("mesh.test")),
                &theirs.svid("/api"),
                Usage::Client
            ),
            Err(PeerError::NotAuthorized("spiffe://other.test/api".into()))
        );
        // Claims our trust domain but chains to another root of that name: the chain decides.
        let forged = Pki::new("mesh.test");
        let e = check(
            &both,
            &PeerPolicy::AnyTrusted,
            &forged.svid("/api"),
            Usage::Client,
        )
        .unwrap_err();
        assert!(
            matches!(&e, PeerError::Svid(SvidError::Chain(m))
                if m.contains("InvalidSignatureForPublicKey")),
            "{e:?}"
        );
        assert_eq!(e.reason(), "bad_chain");
    }

    #[test]
    fn refusals_carry_their_reason() {
        let pki = Pki::new("mesh.test");
        let trust = store(&[&pki]);
        let refused = |opts: LeafOpts, usage| {
            check(
                &trust,
                &PeerPolicy::AnyTrusted,
                &pki.leaf("/api", &opts),
                usage,
            )
            .unwrap_err()
            .reason()
        };
        let now = SystemTime::now();
        assert_eq!(
            refused(
                LeafOpts {
                    not_before: Some(now - std::time::Duration::from_secs(7200)),
                    not_after: Some(now - std::time::Duration::from_secs(3600)),
                    ..Default::default()
                },
                Usage::Client
            ),
            "expired"
        );
        assert_eq!(
            refused(
                LeafOpts {
                    extra_uri: Some("spiffe://mesh.test/admin".into()),
                    ..Default::default()
                },
                Usage::Client
            ),
            "multiple_uri_sans"
        );
        assert_eq!(
            refused(
                LeafOpts {
                    ca: true,
                    ..Default::default()
                },
                Usage::Client
            ),
            "ca_as_leaf"
        );
        assert_eq!(
            refused(
                LeafOpts {
                    server_auth_only: true,
                    ..Default::default()
                },
                Usage::Client
            ),
            "wrong_eku"
        );
    }

    #[test]
    fn the_rustls_verifiers_apply_the_policy_and_report_why() {
        let pki = Pki::new("mesh.test");
        let trust = Arc::new(store(&[&pki]));
        let svid = pki.svid("/api");
        let server = SpiffeServerVerifier::new(
            trust.clone(),
            PeerPolicy::OneOf(vec![id("spiffe://mesh.test/api")]),
        );
        let name = ServerName::try_from("ignored.example").unwrap();
        assert!(
            server
                .verify_server_cert(&leaf(&svid), &[], &name, &[], now())
                .is_ok()
        );
        let e = server
            .verify_server_cert(&leaf(&pki.svid("/web")), &[], &name, &[], now())
            .unwrap_err();
        assert_eq!(
            peer_error(&e),
            Some(&PeerError::NotAuthorized("spiffe://mesh.test/web".into()))
        );

        // A server-only certificate passes as a server but not as a client.
        let server_only = pki.leaf(
            "/api",
            &LeafOpts {
                server_auth_only: true,
                ..Default::default()
            },
        );
        assert!(
            server
                .verify_server_cert(&leaf(&server_only), &[], &name, &[], now())
                .is_ok()
        );
        let client = SpiffeClientVerifier::new(trust.clone(), PeerPolicy::AnyTrusted, true);
        assert!(client.client_auth_mandatory());
        assert!(
            !SpiffeClientVerifier::new(trust, PeerPolicy::AnyTrusted, false)
                .client_auth_mandatory()
        );
        assert!(client.verify_client_cert(&leaf(&svid), &[], now()).is_ok());
        let e = client
            .verify_client_cert(&leaf(&server_only), &[], now())
            .unwrap_err();
        assert_eq!(peer_error(&e).map(PeerError::reason), Some("wrong_eku"));
        // Errors not made by these verifiers carry no PeerError.
        assert_eq!(peer_error(&rustls::Error::DecryptError), None);
    }

    #[test]
    fn a_bundle_change_applies_to_the_next_verification() {
        let old = Pki::new("mesh.test");
        let new = Pki::new("mesh.test");
        let trust = store(&[&old]);
        let svid = new.svid("/api");
        assert_eq!(
            check(&trust, &PeerPolicy::AnyTrusted, &svid, Usage::Client)
                .unwrap_err()
                .reason(),
            "bad_chain"
        );
        assert!(trust.set(bundle_of(&new)));
        // Setting the same bundle again changes nothing.
        assert!(!trust.set(bundle_of(&new)));
        assert_eq!(trust.get(&td("mesh.test")), Some(bundle_of(&new)));
        assert_eq!(
            check(&trust, &PeerPolicy::AnyTrusted, &svid, Usage::Client),
            Ok(id("spiffe://mesh.test/api"))
        );
    }

    #[test]
    fn peer_id_reads_the_leaf() {
        let pki = Pki::new("mesh.test");
        let certs = [leaf(&pki.svid("/api"))];
        assert_eq!(
            peer_id(Some(&certs[..])),
            Some(id("spiffe://mesh.test/api"))
        );
        assert_eq!(peer_id(Some(&certs[..0])), None);
        assert_eq!(peer_id(None), None);
    }
}
