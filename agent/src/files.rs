//! The agent's files in its data directory: its SVID chain and key (0600) and the last bundle,
//! each written atomically (temporary file, fsync, rename, fsync of the directory).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ward_spiffe::bundle::{pem_certificates, pem_encode};
use ward_spiffe::{Bundle, TrustDomain};

/// A saved SVID: DER chain and PKCS#8 key.
pub type SavedSvid = (Vec<Vec<u8>>, Vec<u8>);

/// The agent's files.
#[derive(Debug, Clone)]
pub struct DataDir {
    dir: PathBuf,
}

const ATTESTATION_KEY: &str = "attestation.key";

impl DataDir {
    /// Creates (0700) and wraps `dir`.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        fs::create_dir_all(dir)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    fn write(&self, name: &str, data: &[u8], mode: u32) -> std::io::Result<()> {
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let _ = fs::remove_file(&tmp);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, self.dir.join(name))?;
        fs::File::open(&self.dir)?.sync_all()
    }

    /// The key of an attestation not known to have succeeded (PKCS#8), if one is saved.
    pub fn attestation_key(&self) -> Result<Option<zeroize::Zeroizing<Vec<u8>>>, String> {
        use rustls_pki_types::PrivatePkcs8KeyDer;
        use rustls_pki_types::pem::PemObject;
        let p = self.dir.join(ATTESTATION_KEY);
        let pem = match fs::read(&p) {
            Ok(b) => zeroize::Zeroizing::new(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{}: {e}", p.display())),
        };
        let key = PrivatePkcs8KeyDer::from_pem_slice(&pem)
            .map_err(|e| format!("{}: {e}", p.display()))?;
        Ok(Some(zeroize::Zeroizing::new(
            key.secret_pkcs8_der().to_vec(),
        )))
    }

    /// Keeps the key of an attestation about to be sent, so that a retry — after a lost answer,
    /// or a crash — presents the same key, which the CA recognises for a token it already took.
    pub fn save_attestation_key(&self, key_pkcs8: &[u8]) -> std::io::Result<()> {
        let pem = zeroize::Zeroizing::new(pem_encode("PRIVATE KEY", key_pkcs8));
        self.write(ATTESTATION_KEY, pem.as_bytes(), 0o600)
    }

    /// Forgets the attestation key once its SVID is saved.
    pub fn clear_attestation_key(&self) -> std::io::Result<()> {
        match fs::remove_file(self.dir.join(ATTESTATION_KEY)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Saves the agent SVID chain and its PKCS#8 key.
    pub fn save_svid(&self, chain: &[Vec<u8>], key_pkcs8: &[u8]) -> std::io::Result<()> {
        let key = zeroize::Zeroizing::new(pem_encode("PRIVATE KEY", key_pkcs8));
        self.write("agent-svid.key", key.as_bytes(), 0o600)?;
        let pem: String = chain.iter().map(|c| pem_encode("CERTIFICATE", c)).collect();
        self.write("agent-svid.pem", pem.as_bytes(), 0o600)
    }

    /// Loads the saved SVID chain and key, if both exist.
    pub fn load_svid(&self) -> Result<Option<SavedSvid>, String> {
        use rustls_pki_types::PrivatePkcs8KeyDer;
        use rustls_pki_types::pem::PemObject;
        let (cp, kp) = (
            self.dir.join("agent-svid.pem"),
            self.dir.join("agent-svid.key"),
        );
        if !cp.exists() || !kp.exists() {
            return Ok(None);
        }
        let chain = pem_certificates(&fs::read(&cp).map_err(|e| format!("{}: {e}", cp.display()))?)
            .map_err(|e| format!("{}: {e}", cp.display()))?;
        let key_pem =
            zeroize::Zeroizing::new(fs::read(&kp).map_err(|e| format!("{}: {e}", kp.display()))?);
        let key = PrivatePkcs8KeyDer::from_pem_slice(&key_pem)
            .map_err(|e| format!("{}: {e}", kp.display()))?;
        Ok(Some((chain, key.secret_pkcs8_der().to_vec())))
    }

    /// Saves the bundle (SPIFFE JSON).
    pub fn save_bundle(&self, b: &Bundle) -> std::io::Result<()> {
        let json = b
            .to_spiffe_json()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
        self.write("bundle.json", json.as_bytes(), 0o644)
    }

    /// Loads the saved bundle, if any.
    pub fn load_bundle(&self, td: &TrustDomain) -> Result<Option<Bundle>, String> {
        let p = self.dir.join("bundle.json");
        if !p.exists() {
            return Ok(None);
        }
        let text = fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        Bundle::from_spiffe_json(td.clone(), &text)
            .map(Some)
            .map_err(|e| format!("{}: {e}", p.display()))
    }
}

/// Reads a PEM bootstrap bundle.
pub fn read_pem_bundle(path: &Path, td: &TrustDomain) -> Result<Bundle, String> {
    let data = fs::read(path).map_err(|e| format!("trust bundle {}: {e}", path.display()))?;
    let certs =
        pem_certificates(&data).map_err(|e| format!("trust bundle {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "trust bundle {} holds no certificate",
            path.display()
        ));
    }
    let mut b = Bundle::new(td.clone());
    b.x509_authorities = certs;
    Ok(b)
}
