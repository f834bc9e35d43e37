//! Signed anchors: the proxy signs the chain head (an anchor's sequence number and the hash of
//! the line before it) with its SVID key, and puts the signer's chain beside the signature, so
//! a verifier holding the trust bundle knows who vouched for every line up to the anchor.
//! Without the key, nobody can cut the end of the log, rewrite a suffix or append a record and
//! still end in a valid signed anchor.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use rustls::SignatureScheme;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use ward_net::Svid;
use ward_spiffe::SpiffeId;
use ward_spiffe::x509::{self, Usage};

use super::file::Line;

/// The schemes an anchor is signed with, by preference (whichever the SVID's key supports).
const SCHEMES: [SignatureScheme; 4] = [
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::ED25519,
    SignatureScheme::RSA_PSS_SHA256,
];

/// The bytes an anchor's signature covers: a fixed label, then its sequence number, the hash
/// of the line before it, its time, reason, the file it continues and the signer, one per line.
pub(super) fn message(l: &Line) -> Vec<u8> {
    format!(
        "ward-access-log-anchor/v1\n{}\n{}\n{}\n{}\n{}\n{}",
        l.seq,
        l.prev,
        l.time,
        l.reason.as_deref().unwrap_or_default(),
        l.continues.as_deref().unwrap_or_default(),
        l.signer.as_deref().unwrap_or_default(),
    )
    .into_bytes()
}

/// Signs `line` (an anchor) with `svid`'s key: sets its signer, chain, scheme and signature.
pub(super) fn sign(line: &mut Line, svid: &Svid) -> Result<(), String> {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(svid.key.as_slice().to_vec()));
    let key = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| e.to_string())?;
    let signer = key
        .choose_scheme(&SCHEMES)
        .ok_or("the SVID's key supports none of the anchor signature schemes")?;
    line.signer = Some(svid.id.to_string());
    line.x5c = Some(svid.chain.iter().map(|c| B64.encode(c)).collect());
    line.alg = Some(format!("{:?}", signer.scheme()));
    let sig = signer.sign(&message(line)).map_err(|e| e.to_string())?;
    line.sig = Some(B64.encode(sig));
    Ok(())
}

/// What the verifier trusts: the X.509 authorities of a trust bundle (DER).
#[derive(Debug, Clone)]
pub struct Trust {
    /// Root certificates.
    pub roots: Vec<CertificateDer<'static>>,
}

/// Checks a signed anchor: the signature against the leaf of its chain, the leaf's SPIFFE ID
/// against the signer it names, and, with `trust`, the chain against the bundle at the time
/// the anchor was written. Returns the signer, or why the anchor cannot be believed.
pub(super) fn check(line: &Line, trust: Option<&Trust>) -> Result<SpiffeId, String> {
    let (Some(signer), Some(x5c), Some(alg), Some(sig)) =
        (&line.signer, &line.x5c, &line.alg, &line.sig)
    else {
        return Err("anchor is partly signed".into());
    };
    let chain = x5c
        .iter()
        .map(|c| B64.decode(c).map(CertificateDer::from))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("anchor chain is not base64: {e}"))?;
    let leaf = chain.first().ok_or("anchor chain is empty")?;
    let info = x509::check_leaf(leaf, x509::Profile::Peer).map_err(|e| e.to_string())?;
    if info.id.to_string() != *signer {
        return Err(format!(
            "anchor names signer {signer} but its certificate is {}",
            info.id
        ));
    }
    let sig = B64
        .decode(sig)
        .map_err(|e| format!("anchor signature is not base64: {e}"))?;
    x509::verify_signature(leaf, alg, &message(line), &sig)
        .map_err(|e| format!("anchor signature: {e}"))?;
    if let Some(t) = trust {
        let at = ward_net::process::parse_rfc3339(&line.time)
            .ok_or_else(|| format!("anchor time {:?} is not RFC 3339", line.time))?;
        x509::verify_path(
            &info,
            &chain,
            &t.roots,
            &info.id.trust_domain(),
            at,
            Usage::Client,
        )
        .map_err(|e| format!("anchor signer {signer} is not trusted by the bundle: {e}"))?;
    }
    Ok(info.id)
}
