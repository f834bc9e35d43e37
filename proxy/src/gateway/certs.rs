//! The gateway's certificates: chosen per handshake by the client's server name (exact name,
//! then a wildcard covering one label, then the first certificate), replaceable at any time —
//! a renewed certificate serves the next handshake while connections already open keep theirs.
//! ACME TLS-ALPN-01 answers (RFC 8737) are served from here too, only to a client offering
//! `acme-tls/1`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The ALPN protocol of TLS-ALPN-01 validation.
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// One certificate, as served.
#[derive(Debug, Clone)]
pub struct Served {
    /// Chain and key.
    pub key: Arc<CertifiedKey>,
    /// The DNS names it is served for.
    pub names: Vec<String>,
    /// End of validity.
    pub not_after: SystemTime,
    /// Where it came from (`file:<path>`, `acme`).
    pub origin: String,
}

/// Parses a PEM chain and key into a certificate to serve.
pub fn load_pem(chain_pem: &[u8], key_pem: &[u8], origin: &str) -> Result<Served, String> {
    use rustls_pki_types::pem::PemObject as _;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{origin}: certificate chain: {e}"))?;
    let Some(leaf) = chain.first() else {
        return Err(format!("{origin}: no certificate in the chain"));
    };
    let info = ward_spiffe::x509::server_cert_info(leaf)
        .map_err(|e| format!("{origin}: certificate: {e}"))?;
    if info.dns_names.is_empty() {
        return Err(format!("{origin}: the certificate names no DNS name"));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("{origin}: key: {e}"))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| format!("{origin}: key: {e}"))?;
    let ck = CertifiedKey::new(chain, signer);
    ck.keys_match()
        .map_err(|e| format!("{origin}: the key does not belong to the certificate: {e}"))?;
    Ok(Served {
        key: Arc::new(ck),
        names: info.dns_names,
        not_after: info.not_after,
        origin: origin.to_owned(),
    })
}

/// Reads a chain and key from PEM files.
pub fn load_files(cert: &Path, key: &Path) -> Result<Served, String> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let key_pem = zeroize::Zeroizing::new(read(key)?);
    load_pem(&read(cert)?, &key_pem, &format!("file:{}", cert.display()))
}

#[derive(Debug, Default)]
struct Table {
    /// In configuration order; the first is the default.
    served: Vec<Served>,
    exact: HashMap<String, usize>,
    /// `"example.com"` for `*.example.com`.
    wildcard: HashMap<String, usize>,
    /// TLS-ALPN-01 answers by name.
    challenges: HashMap<String, Arc<CertifiedKey>>,
}

impl Table {
    fn index(&mut self) {
        self.exact.clear();
        self.wildcard.clear();
        for (i, s) in self.served.iter().enumerate() {
            for n in &s.names {
                match n.strip_prefix("*.") {
                    Some(parent) => self.wildcard.entry(parent.to_owned()).or_insert(i),
                    None => self.exact.entry(n.clone()).or_insert(i),
                };
            }
        }
    }

    fn lookup(&self, name: Option<&str>) -> Option<&Served> {
        let Some(name) = name else {
            return self.served.first();
        };
        let name = name.to_ascii_lowercase();
        let i = self.exact.get(&name).or_else(|| {
            // A wildcard covers exactly one label (RFC 6125 §6.4.3).
            name.split_once('.')
                .and_then(|(_, parent)| self.wildcard.get(parent))
        });
        i.and_then(|&i| self.served.get(i))
            .or_else(|| self.served.first())
    }
}

/// The certificates a gateway serves.
#[derive(Debug, Default)]
pub struct CertStore {
    table: RwLock<Table>,
}

impl CertStore {
    /// Replaces the certificate of `origin` (or adds it at the end).
    pub fn put(&self, s: Served) {
        let mut t = self.table.write().unwrap_or_else(|p| p.into_inner());
        match t.served.iter_mut().find(|x| x.origin == s.origin) {
            Some(x) => *x = s,
            None => t.served.push(s),
        }
        t.index();
    }

    /// Stops serving the certificates whose origin `gone` says goes.
    pub fn remove_where(&self, gone: impl Fn(&str) -> bool) {
        let mut t = self.table.write().unwrap_or_else(|p| p.into_inner());
        t.served.retain(|x| !gone(&x.origin));
        t.index();
    }

    /// The certificate served for `name` (`None`: a client without a server name).
    pub fn lookup(&self, name: Option<&str>) -> Option<Served> {
        let t = self.table.read().unwrap_or_else(|p| p.into_inner());
        t.lookup(name).cloned()
    }

    /// Every certificate, in order.
    pub fn all(&self) -> Vec<Served> {
        let t = self.table.read().unwrap_or_else(|p| p.into_inner());
        t.served.clone()
    }

    /// Serves `key` to TLS-ALPN-01 validation of `name` (`None`: stop).
    pub fn set_challenge(&self, name: &str, key: Option<Arc<CertifiedKey>>) {
        let mut t = self.table.write().unwrap_or_else(|p| p.into_inner());
        match key {
            Some(k) => t.challenges.insert(name.to_owned(), k),
            None => t.challenges.remove(name),
        };
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let t = self.table.read().unwrap_or_else(|p| p.into_inner());
        let acme = hello
            .alpn()
            .is_some_and(|mut a| a.any(|p| p == ACME_TLS_ALPN));
        if acme {
            // Only the validation answer, never a real certificate, to a validator.
            return hello
                .server_name()
                .and_then(|n| t.challenges.get(&n.to_ascii_lowercase()).cloned());
        }
        t.lookup(hello.server_name()).map(|s| s.key.clone())
    }
}

/// The server config of HTTPS gateway listeners: any TLS version a browser speaks, HTTP/2 and
/// HTTP/1.1, and `acme-tls/1` for validation.
pub fn server_config(store: Arc<CertStore>) -> Arc<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // The default protocol versions of this build of rustls are valid with its own provider.
    #[allow(clippy::expect_used)]
    let builder = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("rustls defaults");
    let mut cfg = builder.with_no_client_auth().with_cert_resolver(store);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec(), ACME_TLS_ALPN.to_vec()];
    Arc::new(cfg)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cert(names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let c = params.self_signed(&key).unwrap();
        (c.pem(), key.serialize_pem())
    }

    fn served(names: &[&str], origin: &str) -> Served {
        let (c, k) = cert(names);
        load_pem(c.as_bytes(), k.as_bytes(), origin).unwrap()
    }

    #[test]
    fn names_pick_exact_then_one_label_wildcard_then_the_first() {
        let s = CertStore::default();
        s.put(served(&["default.test"], "a"));
        s.put(served(&["shop.example.com"], "b"));
        s.put(served(&["*.example.com"], "c"));
        let o = |n: Option<&str>| s.lookup(n).unwrap().origin;
        assert_eq!(o(Some("shop.example.com")), "b");
        assert_eq!(o(Some("SHOP.example.com")), "b");
        assert_eq!(o(Some("api.example.com")), "c");
        assert_eq!(
            o(Some("a.b.example.com")),
            "a",
            "a wildcard covers one label"
        );
        assert_eq!(o(Some("other.test")), "a");
        assert_eq!(o(None), "a");
        // Replacing keeps the order and the default.
        s.put(served(&["default.test", "more.test"], "a"));
        assert_eq!(o(Some("more.test")), "a");
        assert_eq!(s.all().len(), 3);
    }

    #[test]
    fn bad_pem_is_refused_with_the_reason() {
        let (c, _) = cert(&["a.test"]);
        let (_, other_key) = cert(&["a.test"]);
        let e = load_pem(c.as_bytes(), other_key.as_bytes(), "x").unwrap_err();
        assert!(e.contains("does not belong"), "{e}");
        let e = load_pem(b"", other_key.as_bytes(), "x").unwrap_err();
        assert!(e.contains("no certificate"), "{e}");
        let e = load_pem(c.as_bytes(), b"junk", "x").unwrap_err();
        assert!(e.contains("key"), "{e}");
    }
}
