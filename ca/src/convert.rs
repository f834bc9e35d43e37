//! Conversions between stored records and protobuf messages.

pub use ward_proto::convert::{bundle_from_proto, bundle_to_proto};
use ward_proto::types;

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

/// A certificate chain as an SVID message.
pub fn svid_to_proto(id: &str, chain: Vec<Vec<u8>>, expires_at: i64) -> types::X509Svid {
    types::X509Svid {
        spiffe_id: id.to_owned(),
        cert_chain: chain,
        expires_at,
    }
}
