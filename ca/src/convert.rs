//! Conversions between stored records and protobuf messages.

use ward_proto::types;
use ward_spiffe::Bundle;

use crate::entries::{Entry, EntrySpec};

/// A stored entry as a message.
pub fn entry_to_proto(e: &Entry) -> types::Entry {
    types::Entry {
        id: e.id.clone(),
        spiffe_id: e.spiffe_id.to_string(),
        parent_id: e.parent_id.to_string(),
        selectors: e.selectors.iter().map(ToString::to_string).collect(),
        x509_svid_ttl: e.x509_svid_ttl,
        jwt_svid_ttl: e.jwt_svid_ttl,
        dns_names: e.dns_names.clone(),
        hint: e.hint.clone(),
        admin: e.admin,
        revision: e.revision,
        created_at: e.created_at,
        origin: e.origin.clone(),
    }
}

/// An admin spec message as a spec.
pub fn spec_from_proto(s: ward_proto::admin::EntrySpec) -> EntrySpec {
    EntrySpec {
        spiffe_id: s.spiffe_id,
        parent_id: s.parent_id,
        selectors: s.selectors,
        x509_svid_ttl: s.x509_svid_ttl,
        jwt_svid_ttl: s.jwt_svid_ttl,
        dns_names: s.dns_names,
        hint: s.hint,
        admin: s.admin,
    }
}

/// A bundle as a message.
pub fn bundle_to_proto(b: &Bundle) -> types::Bundle {
    types::Bundle {
        trust_domain: b.trust_domain.to_string(),
        x509_authorities: b.x509_authorities.clone(),
        jwt_authorities: b
            .jwt_authorities
            .iter()
            .map(|a| types::JwtKey {
                key_id: a.key_id.clone(),
                public_key: a.public_key.clone(),
                expires_at: 0,
            })
            .collect(),
        sequence: b.sequence,
        refresh_hint_seconds: b.refresh_hint_secs.unwrap_or(0) as u32,
    }
}

/// A certificate chain as an SVID message.
pub fn svid_to_proto(id: &str, chain: Vec<Vec<u8>>, expires_at: i64) -> types::X509Svid {
    types::X509Svid {
        spiffe_id: id.to_owned(),
        cert_chain: chain,
        expires_at,
    }
}

/// A bundle message as a bundle.
pub fn bundle_from_proto(b: &types::Bundle) -> Result<Bundle, String> {
    let td = ward_spiffe::TrustDomain::new(&b.trust_domain).map_err(|e| e.to_string())?;
    Ok(Bundle {
        trust_domain: td,
        x509_authorities: b.x509_authorities.clone(),
        jwt_authorities: b
            .jwt_authorities
            .iter()
            .map(|k| ward_spiffe::JwtAuthority {
                key_id: k.key_id.clone(),
                public_key: k.public_key.clone(),
            })
            .collect(),
        sequence: b.sequence,
        refresh_hint_secs: (b.refresh_hint_seconds > 0)
            .then_some(u64::from(b.refresh_hint_seconds)),
    })
}
