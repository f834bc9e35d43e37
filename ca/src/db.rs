//! The CA's key layout in the store, the schema marker, and JSON record helpers.
//!
//! Layout (all keys UTF-8):
//! - `meta/schema` — schema marker, [`SCHEMA`]
//! - `meta/revision` — entry revision counter (decimal)
//! - `entry/<id>`, `entry_parent/<parent>\0<id>`, `entry_uniq/<sha256>` — entries and indexes
//! - `change/<rev:020>` — entry change log, read by agent sync streams
//! - `agent/<spiffe-id>` — attested agents; `token/<sha256(token)>` — unused join tokens
//! - `authority/x509/<id>`, `authority/jwt/<kid>`, `bundle` — authorities and the bundle
//! - `audit/<nanos:020>-<rand>` — issuance log, kept for `[audit] retention`
//! - `live/x509/<holder>`, `live/jwt/<kid>\0<holder>` — the newest SVID of each holder, by
//!   authority; `meta/live-index` — set once the index covers the log

use serde::Serialize;
use serde::de::DeserializeOwned;
use ward_store::Store;

use crate::error::ApiError;

/// The schema this build reads and writes.
pub const SCHEMA: &str = "ward-ca/1";
/// Where the schema version is kept.
pub const SCHEMA_KEY: &[u8] = b"meta/schema";

/// Why the store cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// A schema marker from another version or program.
    #[error(
        "the store at {path} has schema {found:?}; this ward-ca understands {SCHEMA:?}. Use a \
         matching ward-ca version or a different data directory"
    )]
    Unsupported {
        /// Data directory.
        path: String,
        /// The marker found.
        found: String,
    },
    /// Data but no marker: not a Ward CA store.
    #[error("the store at {0} holds data but no Ward schema marker; it is not a ward-ca store")]
    Foreign(String),
    /// Storage failure.
    #[error("store: {0}")]
    Store(#[from] ward_store::StoreError),
}

/// Checks the schema marker, writing it into an empty store.
pub async fn check_schema(store: &dyn Store, path: &str) -> Result<(), SchemaError> {
    match store.get(SCHEMA_KEY).await? {
        Some(v) if v == SCHEMA.as_bytes() => Ok(()),
        Some(v) => Err(SchemaError::Unsupported {
            path: path.to_owned(),
            found: String::from_utf8_lossy(&v).into_owned(),
        }),
        None => {
            if !store.scan(b"", None, 1).await?.is_empty() {
                // Unless another replica on the same store initialised it meanwhile.
                if store.get(SCHEMA_KEY).await?.as_deref() == Some(SCHEMA.as_bytes()) {
                    return Ok(());
                }
                return Err(SchemaError::Foreign(path.to_owned()));
            }
            match store
                .compare_and_swap(SCHEMA_KEY, None, Some(SCHEMA.as_bytes()))
                .await
            {
                Ok(()) => Ok(()),
                // Another replica starting on the same shared store won the race: its
                // version is checked like any found one.
                Err(ward_store::StoreError::Conflict { .. }) => {
                    Box::pin(check_schema(store, path)).await
                }
                Err(e) => Err(e.into()),
            }
        }
    }
}

/// Encodes a record.
pub fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, ApiError> {
    serde_json::to_vec(v).map_err(|e| ApiError::Internal(format!("encode record: {e}")))
}

/// Decodes a record, naming the key on failure.
pub fn decode<T: DeserializeOwned>(key: &[u8], v: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(v).map_err(|e| {
        ApiError::Internal(format!(
            "corrupt record at {}: {e}",
            String::from_utf8_lossy(key)
        ))
    })
}

/// Reads and decodes one record.
pub async fn get<T: DeserializeOwned>(
    store: &dyn Store,
    key: &[u8],
) -> Result<Option<T>, ApiError> {
    match store.get(key).await? {
        Some(v) => Ok(Some(decode(key, &v)?)),
        None => Ok(None),
    }
}

/// Unix seconds of a time (0 before the epoch).
pub fn unix(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A time from Unix seconds.
pub fn from_unix(s: i64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_secs(s.max(0) as u64)
}

/// A random lowercase hex string of `bytes` random bytes.
pub fn random_hex(rng: &mut impl rand::RngCore, bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rng.fill_bytes(&mut b);
    hex::encode(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ward_store::MemStore;

    #[tokio::test]
    async fn schema_marker() {
        let s = MemStore::new();
        check_schema(&s, "x").await.unwrap();
        check_schema(&s, "x").await.unwrap();
        s.compare_and_swap(SCHEMA_KEY, Some(SCHEMA.as_bytes()), Some(b"ward-ca/99"))
            .await
            .unwrap();
        let e = check_schema(&s, "x").await.unwrap_err();
        assert!(e.to_string().contains("ward-ca/99"), "{e}");

        let foreign = MemStore::new();
        foreign
            .compare_and_swap(b"something", None, Some(b"else"))
            .await
            .unwrap();
        assert!(matches!(
            check_schema(&foreign, "y").await,
            Err(SchemaError::Foreign(_))
        ));
    }
}
