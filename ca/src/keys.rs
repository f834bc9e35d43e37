//! Private keys of the CA's authorities, behind a small key-manager interface.
//!
//! The default manager keeps one PKCS#8 PEM file per key, mode 0600, in a 0700 directory under
//! the data directory. Keys never go into the store and are never logged; the in-memory copies
//! are wiped when a [`PrivateKey`] is dropped (ring's own expanded key state is ring's to keep).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PublicKeyData};
use rustls_pki_types::PrivatePkcs8KeyDer;
use zeroize::{Zeroize, Zeroizing};

/// Key-manager failures.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Key ID has characters outside `[a-z0-9._-]`.
    #[error("invalid key id {0:?}")]
    BadId(String),
    /// No key with that ID.
    #[error("key {0} not found")]
    NotFound(String),
    /// Filesystem failure.
    #[error("key {id}: {source}")]
    Io {
        /// Key ID.
        id: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The key material is unusable.
    #[error("key {id}: {reason}")]
    Invalid {
        /// Key ID.
        id: String,
        /// Why.
        reason: String,
    },
}

/// A signing key held in memory.
pub struct PrivateKey {
    id: String,
    pkcs8: Zeroizing<Vec<u8>>,
    pair: KeyPair,
}

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrivateKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Drop for PrivateKey {
    fn drop(&mut self) {
        self.pair.zeroize();
    }
}

impl PrivateKey {
    /// Wraps PKCS#8 DER (ECDSA P-256).
    pub fn from_pkcs8(id: &str, pkcs8: Vec<u8>) -> Result<Self, KeyError> {
        let pkcs8 = Zeroizing::new(pkcs8);
        let pair = KeyPair::from_pkcs8_der_and_sign_algo(
            &PrivatePkcs8KeyDer::from(pkcs8.as_slice()),
            &PKCS_ECDSA_P256_SHA256,
        )
        .map_err(|e| KeyError::Invalid {
            id: id.to_owned(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            id: id.to_owned(),
            pkcs8,
            pair,
        })
    }

    /// A fresh ECDSA P-256 key (not persisted).
    pub fn generate(id: &str) -> Result<Self, KeyError> {
        let pair =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| KeyError::Invalid {
                id: id.to_owned(),
                reason: e.to_string(),
            })?;
        Self::from_pkcs8(id, pair.serialize_der())
    }

    /// The key's ID.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The rcgen key pair, for signing certificates.
    pub fn key_pair(&self) -> &KeyPair {
        &self.pair
    }

    /// PKCS#8 DER.
    pub fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    /// DER SubjectPublicKeyInfo.
    pub fn public_key_der(&self) -> Vec<u8> {
        self.pair.subject_public_key_info()
    }
}

/// Where authority keys live.
pub trait KeyManager: Send + Sync + std::fmt::Debug {
    /// Creates, persists and returns a new ECDSA P-256 key under `id`.
    fn generate(&self, id: &str) -> Result<PrivateKey, KeyError>;
    /// Loads the key `id`.
    fn load(&self, id: &str) -> Result<PrivateKey, KeyError>;
    /// Deletes the key `id` (no error if absent).
    fn remove(&self, id: &str) -> Result<(), KeyError>;
    /// The name of this key store, stable across restarts. Authorities are recorded under the
    /// holder of their private key: with several CA replicas on one store, each replica signs
    /// with, rotates and reports its own (SPIRE's model; keys never enter the shared store).
    fn holder(&self) -> &str;
}

/// One 0600 PEM file per key in a 0700 directory.
#[derive(Debug, Clone)]
pub struct DiskKeyManager {
    dir: PathBuf,
    holder: String,
}

/// The file in the key directory that names its holder.
const HOLDER_FILE: &str = "holder";

fn check_id(id: &str) -> Result<(), KeyError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id.bytes().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'-' | b'_')
        })
        && !id.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(KeyError::BadId(id.to_owned()))
    }
}

impl DiskKeyManager {
    /// Uses (and creates, 0700) `dir`.
    pub fn open(dir: &Path) -> Result<Self, KeyError> {
        let io = |source| KeyError::Io {
            id: dir.display().to_string(),
            source,
        };
        fs::create_dir_all(dir).map_err(io)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io)?;
        let holder = Self::holder_name(dir).map_err(io)?;
        Ok(Self {
            dir: dir.to_owned(),
            holder,
        })
    }

    /// Reads `<dir>/holder`, or names a new key store (`ca-` and 12 random hex digits) and
    /// writes it durably before any key is made.
    fn holder_name(dir: &Path) -> std::io::Result<String> {
        let path = dir.join(HOLDER_FILE);
        match fs::read_to_string(&path) {
            Ok(s) => {
                let name = s.trim().to_owned();
                let ok = !name.is_empty()
                    && name.len() <= 63
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
                if ok {
                    Ok(name)
                } else {
                    Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{} does not hold a key store name", path.display()),
                    ))
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                use rand::Rng;
                let mut rng = rand::rng();
                let name = format!(
                    "ca-{}",
                    (0..6)
                        .map(|_| format!("{:02x}", rng.random::<u8>()))
                        .collect::<String>()
                );
                let tmp = dir.join(".holder.tmp");
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)?;
                f.write_all(format!("{name}\n").as_bytes())?;
                f.sync_all()?;
                drop(f);
                fs::rename(&tmp, &path)?;
                fs::File::open(dir)?.sync_all()?;
                Ok(name)
            }
            Err(e) => Err(e),
        }
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.key"))
    }
}

impl KeyManager for DiskKeyManager {
    fn holder(&self) -> &str {
        &self.holder
    }

    fn generate(&self, id: &str) -> Result<PrivateKey, KeyError> {
        check_id(id)?;
        let key = PrivateKey::generate(id)?;
        let io = |source| KeyError::Io {
            id: id.to_owned(),
            source,
        };
        let pem = Zeroizing::new(ward_spiffe::bundle::pem_encode("PRIVATE KEY", key.pkcs8()));
        let tmp = self.dir.join(format!(".{id}.tmp"));
        let _ = fs::remove_file(&tmp);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        f.write_all(pem.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        drop(f);
        fs::rename(&tmp, self.path(id)).map_err(io)?;
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        Ok(key)
    }

    fn load(&self, id: &str) -> Result<PrivateKey, KeyError> {
        use rustls_pki_types::pem::PemObject;
        check_id(id)?;
        let path = self.path(id);
        let meta = match fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(KeyError::NotFound(id.to_owned()));
            }
            Err(source) => {
                return Err(KeyError::Io {
                    id: id.to_owned(),
                    source,
                });
            }
        };
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(KeyError::Invalid {
                id: id.to_owned(),
                reason: format!(
                    "{} is readable by group or others; expected mode 0600",
                    path.display()
                ),
            });
        }
        let pem = Zeroizing::new(fs::read(&path).map_err(|source| KeyError::Io {
            id: id.to_owned(),
            source,
        })?);
        let der = PrivatePkcs8KeyDer::from_pem_slice(&pem).map_err(|e| KeyError::Invalid {
            id: id.to_owned(),
            reason: e.to_string(),
        })?;
        PrivateKey::from_pkcs8(id, der.secret_pkcs8_der().to_vec())
    }

    fn remove(&self, id: &str) -> Result<(), KeyError> {
        check_id(id)?;
        match fs::remove_file(self.path(id)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(KeyError::Io {
                id: id.to_owned(),
                source,
            }),
        }
    }
}

impl rcgen::PublicKeyData for PrivateKey {
    fn der_bytes(&self) -> &[u8] {
        self.pair.der_bytes()
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.pair.algorithm()
    }
}

impl rcgen::SigningKey for PrivateKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.pair.sign(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_persist_load() {
        let dir = tempfile::tempdir().unwrap();
        let km = DiskKeyManager::open(&dir.path().join("keys")).unwrap();
        let k = km.generate("x509-1").unwrap();
        let path = dir.path().join("keys/x509-1.key");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            fs::metadata(dir.path().join("keys"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o700
        );
        let loaded = km.load("x509-1").unwrap();
        assert_eq!(loaded.public_key_der(), k.public_key_der());
        assert!(!format!("{loaded:?}").contains("PRIVATE"));
        assert!(matches!(km.load("nope"), Err(KeyError::NotFound(_))));
        assert!(matches!(km.generate("../evil"), Err(KeyError::BadId(_))));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(km.load("x509-1"), Err(KeyError::Invalid { .. })));
        km.remove("x509-1").unwrap();
        km.remove("x509-1").unwrap();
    }
}
