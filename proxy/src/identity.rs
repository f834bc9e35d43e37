//! Where the proxy's SVID comes from: the agent's Workload API stream, or PEM files. Both feed
//! the one [`CredentialSink`], which checks each new chain against the bundle before anything
//! uses it; a refused update is logged and counted and the last good identity stays.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use ward_net::{ClientAuth, CredentialSink, PeerPolicy, Svid, TlsSettings, TrustStore};
use ward_proto::workload::X509svidRequest;
use ward_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use ward_spiffe::{Bundle, SpiffeId, TrustDomain};

use crate::config::IdentitySource;
use crate::metrics::Metrics;

/// The proxy's credential sink (the listeners build their TLS configs from what it publishes);
/// mesh hops speak TLS 1.3 only unless `tls12`.
pub fn new_sink(tls12: bool) -> Arc<CredentialSink> {
    Arc::new(CredentialSink::new(
        Arc::new(TrustStore::new()),
        TlsSettings {
            accept_clients: PeerPolicy::AnyTrusted,
            client_auth: ClientAuth::Required,
            accept_servers: PeerPolicy::AnyTrusted,
            alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            tls12,
        },
    ))
}

/// Installs a bundle and an SVID; returns a description of the failure, if any.
pub fn install(sink: &CredentialSink, bundle: Bundle, svid: Svid) -> Result<(), String> {
    if !svid.id.is_member_of(&bundle.trust_domain) {
        return Err(format!(
            "SVID {} is not in trust domain {}",
            svid.id, bundle.trust_domain
        ));
    }
    sink.update_bundle(bundle).map_err(|e| e.to_string())?;
    sink.update_svid(svid, SystemTime::now())
        .map_err(|e| e.to_string())
}

/// Runs the identity source until the process ends.
pub async fn run(
    source: IdentitySource,
    sink: Arc<CredentialSink>,
    metrics: Metrics,
    stop: watch::Receiver<bool>,
) {
    match source {
        IdentitySource::WorkloadApi { socket, spiffe_id } => {
            let socket = socket.unwrap_or_default();
            let path = PathBuf::from(
                socket
                    .trim_start_matches("unix://")
                    .trim_start_matches("unix:"),
            );
            workload_api(path, spiffe_id, sink, metrics, stop).await;
        }
        IdentitySource::Files {
            chain,
            key,
            bundle,
            trust_domain,
        } => {
            files(chain, key, bundle, trust_domain, sink, metrics, stop).await;
        }
    }
}

async fn workload_api(
    socket: PathBuf,
    want: Option<SpiffeId>,
    sink: Arc<CredentialSink>,
    metrics: Metrics,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let result = tokio::select! {
            r = follow(&socket, want.as_ref(), &sink, &metrics) => r,
            _ = ward_net::process::until_set(&mut stop) => return,
        };
        match result {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(e) => {
                tracing::warn!(error = %e, socket = %socket.display(), "Workload API stream failed")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = ward_net::process::until_set(&mut stop) => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn follow(
    socket: &Path,
    want: Option<&SpiffeId>,
    sink: &CredentialSink,
    metrics: &Metrics,
) -> Result<(), String> {
    let mut client = SpiffeWorkloadApiClient::new(ward_net::process::unix_channel(socket));
    let mut req = tonic::Request::new(X509svidRequest {});
    req.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    let mut stream = client
        .fetch_x509svid(req)
        .await
        .map_err(|s| s.message().to_owned())?
        .into_inner();
    while let Some(msg) = stream
        .message()
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
    {
        let chosen = match want {
            Some(id) => msg.svids.iter().find(|s| s.spiffe_id == id.as_str()),
            None => msg.svids.first(),
        };
        let Some(s) = chosen else {
            // Normal right after the entry is created: the agent is still fetching it.
            tracing::debug!(wanted = ?want.map(ToString::to_string), "Workload API sent no matching SVID yet");
            continue;
        };
        let r = (|| {
            let chain = ward_spiffe::x509::split_der(&s.x509_svid).map_err(|e| e.to_string())?;
            let svid =
                Svid::from_parts(chain, s.x509_svid_key.clone()).map_err(|e| e.to_string())?;
            let mut bundle = Bundle::new(svid.id.trust_domain());
            bundle.x509_authorities =
                ward_spiffe::x509::split_der(&s.bundle).map_err(|e| e.to_string())?;
            let expiry = svid.not_after;
            install(sink, bundle, svid)?;
            Ok::<_, String>(expiry)
        })();
        match r {
            Ok(expiry) => {
                metrics.svid_expiry.set(unix(expiry));
                tracing::info!(id = %s.spiffe_id, "SVID installed from the Workload API");
            }
            Err(e) => {
                metrics.identity_errors.inc();
                tracing::error!(error = %e, "SVID from the Workload API refused; keeping the previous one");
            }
        }
    }
    Ok(())
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Reads the three PEM files into an SVID and a bundle.
pub fn read_files(
    chain: &Path,
    key: &Path,
    bundle: &Path,
    td: &TrustDomain,
) -> Result<(Svid, Bundle), String> {
    use rustls_pki_types::PrivatePkcs8KeyDer;
    use rustls_pki_types::pem::PemObject;
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let certs = ward_spiffe::bundle::pem_certificates(&read(chain)?)
        .map_err(|e| format!("{}: {e}", chain.display()))?;
    let key_pem = zeroize::Zeroizing::new(read(key)?);
    let key = PrivatePkcs8KeyDer::from_pem_slice(&key_pem)
        .map_err(|e| format!("{}: {e}", key.display()))?;
    let svid =
        Svid::from_parts(certs, key.secret_pkcs8_der().to_vec()).map_err(|e| e.to_string())?;
    let mut b = Bundle::new(td.clone());
    b.x509_authorities = ward_spiffe::bundle::pem_certificates(&read(bundle)?)
        .map_err(|e| format!("{}: {e}", bundle.display()))?;
    Ok((svid, b))
}

/// What tells whether files changed since last looked at: each one's modification time and
/// size (`None`: missing).
pub(crate) fn fingerprint(paths: &[&Path]) -> Vec<Option<(SystemTime, u64)>> {
    paths
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()))
        })
        .collect()
}

async fn files(
    chain: PathBuf,
    key: PathBuf,
    bundle: PathBuf,
    td: TrustDomain,
    sink: Arc<CredentialSink>,
    metrics: Metrics,
    mut stop: watch::Receiver<bool>,
) {
    let mut last = None;
    loop {
        let fp = fingerprint(&[&chain, &key, &bundle]);
        if last.as_ref() != Some(&fp) {
            last = Some(fp);
            match read_files(&chain, &key, &bundle, &td).and_then(|(s, b)| {
                let exp = s.not_after;
                install(&sink, b, s).map(|()| exp)
            }) {
                Ok(exp) => {
                    metrics.svid_expiry.set(unix(exp));
                    tracing::info!(chain = %chain.display(), "SVID installed from files");
                }
                Err(e) => {
                    metrics.identity_errors.inc();
                    tracing::error!(error = %e, "SVID files refused; keeping the previous identity");
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = ward_net::process::until_set(&mut stop) => return,
        }
    }
}
