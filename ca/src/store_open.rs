//! Opens the store `[store]` names: sled under the data directory, or an etcd cluster over
//! plaintext or TLS (the members' CA, and a client certificate for `--client-cert-auth`).

use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use ward_store::{EtcdOptions, EtcdStore, Limits, SledStore, Store};

use crate::config::{CaConfig, EtcdConfig, EtcdTls, StoreBackend};

/// An open store and how to name it in messages (a path, or the etcd endpoints and prefix).
pub(crate) struct Opened {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) name: String,
    /// The etcd store, for readiness (its watch must be connected).
    pub(crate) etcd: Option<Arc<EtcdStore>>,
}

/// Opens the configured backend.
pub(crate) async fn open(cfg: &CaConfig) -> Result<Opened, String> {
    match (cfg.store.backend, &cfg.store.etcd) {
        (StoreBackend::Etcd, Some(e)) => {
            let name = format!("etcd {} prefix {}", e.endpoints.join(","), e.prefix);
            let opts = options(e).map_err(|m| format!("{name}: {m}"))?;
            let store = Arc::new(EtcdStore::open(opts).await.map_err(|err| {
                // TLS 1.3 reports a missing client certificate only after the handshake, as a
                // cancelled request: say what is likely.
                match &e.tls {
                    Some(t) if t.cert.is_none() => format!(
                        "{err} (if the members run with --client-cert-auth, set \
                         store.etcd.tls.cert and store.etcd.tls.key)"
                    ),
                    _ => err.to_string(),
                }
            })?);
            Ok(Opened {
                store: store.clone(),
                name,
                etcd: Some(store),
            })
        }
        _ => {
            let path = cfg.data_dir.join("store");
            let store = SledStore::open(&path).map_err(|e| e.to_string())?;
            Ok(Opened {
                store: Arc::new(store),
                name: path.display().to_string(),
                etcd: None,
            })
        }
    }
}

fn options(e: &EtcdConfig) -> Result<EtcdOptions, String> {
    let members = match &e.tls {
        None => {
            EtcdOptions::plaintext(&e.endpoints, e.prefix.as_bytes())
                .map_err(|e| e.to_string())?
                .members
        }
        Some(tls) => {
            let cfg = Arc::new(client_config(tls)?);
            e.endpoints
                .iter()
                .map(|ep| {
                    let addr = ep.trim_start_matches("https://");
                    let cfg = cfg.clone();
                    let ch =
                        ward_net::connector::tls_channel(addr, Arc::new(move || Some(cfg.clone())))
                            .map_err(|err| err.to_string())?;
                    Ok((ep.clone(), ch))
                })
                .collect::<Result<Vec<_>, String>>()?
        }
    };
    Ok(EtcdOptions {
        members,
        prefix: e.prefix.as_bytes().to_vec(),
        request_timeout: e.request_timeout,
        limits: Limits::etcd(e.max_txn_ops, e.max_request_bytes),
        lease_ttl: std::time::Duration::from_secs(5),
    })
}

/// A webpki client config (etcd's certificates are ordinary server certificates, checked
/// against the host name of the endpoint), HTTP/2 for gRPC.
fn client_config(tls: &EtcdTls) -> Result<rustls::ClientConfig, String> {
    let ca = std::fs::read(&tls.ca).map_err(|e| format!("tls.ca {}: {e}", tls.ca.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&ca) {
        let c = c.map_err(|e| format!("tls.ca {}: {e}", tls.ca.display()))?;
        roots
            .add(c)
            .map_err(|e| format!("tls.ca {}: {e}", tls.ca.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("tls.ca {}: no certificates", tls.ca.display()));
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots);
    let mut cfg = match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("tls.cert {}: {e}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("tls.key {}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("etcd client certificate: {e}"))?
        }
        _ => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}
