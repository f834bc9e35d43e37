//! The append-only issuance and attestation log: who was issued what, when, by which authority.
//!
//! Records are added to the same atomic batch as the state change they describe where there is
//! one, so an issued SVID is acknowledged only after its record is durable. There is no API that
//! deletes or rewrites a record.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use ward_store::{Batch, Store};

use crate::db;
use crate::error::ApiError;

/// One audit record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Unix nanoseconds.
    pub time_ns: u128,
    /// What happened: `attest`, `agent-svid`, `x509-svid`, `jwt-svid`, `entry-*`, `evict`, ...
    pub event: String,
    /// The caller (agent ID, or `admin`).
    pub caller: String,
    /// The identity concerned.
    pub spiffe_id: String,
    /// Certificate serial (hex) or JWT expiry, when relevant.
    pub serial: String,
    /// Expiry, Unix seconds (0 if none).
    pub not_after: i64,
    /// Signing authority ID or key ID.
    pub authority: String,
    /// Entry ID, when relevant.
    pub entry_id: String,
}

impl AuditRecord {
    /// A record of `event` by `caller` about `spiffe_id` at `now`.
    pub fn new(now: SystemTime, event: &str, caller: &str, spiffe_id: &str) -> Self {
        Self {
            time_ns: now
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
            event: event.to_owned(),
            caller: caller.to_owned(),
            spiffe_id: spiffe_id.to_owned(),
            serial: String::new(),
            not_after: 0,
            authority: String::new(),
            entry_id: String::new(),
        }
    }

    /// Adds this record to `batch`. Keys sort by time; a random suffix keeps them unique.
    pub fn add_to(&self, batch: &mut Batch) -> Result<(), ApiError> {
        let key = format!(
            "audit/{:020}-{}",
            self.time_ns,
            db::random_hex(&mut rand::rng(), 4)
        );
        batch.require(key.clone().into_bytes(), None);
        batch.put(key.into_bytes(), db::encode(self)?);
        Ok(())
    }
}

/// Reads the newest `limit` records (oldest first), for the admin API and tests.
pub async fn tail(store: &dyn Store, limit: usize) -> Result<Vec<AuditRecord>, ApiError> {
    let all = ward_store::scan_all(store, b"audit/").await?;
    let skip = all.len().saturating_sub(limit);
    all[skip..].iter().map(|(k, v)| db::decode(k, v)).collect()
}
