//! Certificates from an ACME server (RFC 8555; Let's Encrypt) for the gateway's hostnames,
//! with instant-acme as the client.
//!
//! The account is created once and its credentials kept in `state_dir/account.json` (0600).
//! Each hostname gets its own certificate, kept in `state_dir/certs/` so a restart serves it at
//! once; it is renewed at two thirds of its life. Validation is HTTP-01 (answered by the
//! gateway's HTTP listeners, [`Http01Tokens`]) or TLS-ALPN-01 (RFC 8737, answered by its HTTPS
//! listeners through [`super::certs::CertStore::set_challenge`]). A new certificate serves the
//! next handshake; connections already open keep theirs. A failed issuance or renewal leaves
//! the certificate in force serving, is logged with the server's reason and counted
//! (`ward_proxy_gateway_certificate_errors{name}`), and is tried again after a back-off that
//! doubles up to `max_backoff`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use ward_net::duration::serde_str;

use super::certs::{CertStore, Served};
use crate::metrics::{CertLabel, Metrics};

/// How the ACME server is asked to validate a hostname.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChallengeKind {
    /// A token fetched over HTTP on port 80 (a gateway `http` listener answers it).
    #[default]
    #[serde(rename = "http-01")]
    Http01,
    /// A special certificate over TLS on port 443 (a gateway `https` listener answers it).
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
}

/// The `acme` part of the gateway section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeCfg {
    /// The directory URL (`https://acme-v02.api.letsencrypt.org/directory`).
    pub directory: String,
    /// Account contacts (`mailto:ops@example.com`).
    #[serde(default)]
    pub contact: Vec<String>,
    /// Hostnames to order certificates for; none: every hostname the routes name exactly.
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// The validation method.
    #[serde(default)]
    pub challenge: ChallengeKind,
    /// Where the account credentials and the certificates are kept.
    pub state_dir: PathBuf,
    /// A root certificate (PEM) to trust for the ACME server itself, for a testing PKI;
    /// none: the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_root: Option<PathBuf>,
    /// First wait after a failure; it doubles on each failure up to `max_backoff`.
    #[serde(default = "default_min_backoff", with = "serde_str")]
    pub min_backoff: Duration,
    /// Longest wait after failures.
    #[serde(default = "default_max_backoff", with = "serde_str")]
    pub max_backoff: Duration,
}

fn default_min_backoff() -> Duration {
    Duration::from_secs(60)
}

fn default_max_backoff() -> Duration {
    Duration::from_secs(3600)
}

impl AcmeCfg {
    /// Checks the settings; `route_hosts` are the routes' exact hostnames.
    pub fn validate<'a>(&self, route_hosts: impl Iterator<Item = &'a str>) -> Result<(), String> {
        if !self.directory.starts_with("https://") {
            return Err("gateway.acme.directory must be an https:// URL".into());
        }
        for h in &self.hostnames {
            ward_spiffe::vhost::check_hostname(h).map_err(|e| format!("gateway.acme: {e}"))?;
            if h.starts_with("*.") {
                return Err(format!(
                    "gateway.acme: {h}: wildcard certificates need DNS-01, which Ward does not do"
                ));
            }
        }
        if self.hostnames.is_empty() && route_hosts.count() == 0 {
            return Err(
                "gateway.acme: no hostnames, and no route names a host exactly to order for".into(),
            );
        }
        if self.min_backoff.is_zero() || self.max_backoff < self.min_backoff {
            return Err("gateway.acme: min_backoff must be > 0 and <= max_backoff".into());
        }
        Ok(())
    }
}

/// The HTTP-01 answers being served: token → key authorization.
#[derive(Debug, Default)]
pub struct Http01Tokens(RwLock<HashMap<String, String>>);

impl Http01Tokens {
    /// The answer to `token`, while its validation runs.
    pub fn get(&self, token: &str) -> Option<String> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(token)
            .cloned()
    }

    fn set(&self, token: &str, answer: Option<String>) {
        let mut m = self.0.write().unwrap_or_else(|p| p.into_inner());
        match answer {
            Some(a) => m.insert(token.to_owned(), a),
            None => m.remove(token),
        };
    }
}

/// When a certificate valid from `not_before` to `not_after` is renewed: two thirds through.
pub fn renew_at(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    let life = not_after
        .duration_since(not_before)
        .unwrap_or(Duration::ZERO);
    not_before + life * 2 / 3
}

/// The ACME manager of a gateway.
#[derive(Debug)]
pub struct Acme {
    cfg: AcmeCfg,
    hosts: Vec<String>,
    /// HTTP-01 answers.
    pub tokens: Arc<Http01Tokens>,
    status: RwLock<HashMap<String, HostStatus>>,
}

/// What an operator sees of a hostname's ACME certificate (`/gateway` on the admin endpoint).
#[derive(Debug, Clone, Default, Serialize)]
pub struct HostStatus {
    /// When the next order is placed (RFC 3339).
    pub next_attempt: Option<String>,
    /// Failures since the last success.
    pub failures: u32,
    /// Why the last attempt failed, as the ACME server or the network said.
    pub last_error: Option<String>,
    /// When the last certificate was issued (RFC 3339).
    pub last_issued: Option<String>,
}

/// A hostname's certificate as kept: its files and when it is due.
#[derive(Debug, Clone)]
struct Held {
    due: SystemTime,
    failures: u32,
}

impl Acme {
    /// A manager for `cfg`, ordering for `cfg.hostnames` or else `route_hosts`.
    pub fn new<'a>(cfg: &AcmeCfg, route_hosts: impl Iterator<Item = &'a str>) -> Self {
        let hosts = if cfg.hostnames.is_empty() {
            route_hosts.map(ToOwned::to_owned).collect()
        } else {
            cfg.hostnames.clone()
        };
        Self {
            cfg: cfg.clone(),
            hosts,
            tokens: Arc::default(),
            status: RwLock::default(),
        }
    }

    /// Each hostname's state.
    pub fn status(&self) -> HashMap<String, HostStatus> {
        self.status
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn note(&self, host: &str, held: &Held, outcome: Option<Result<(), &str>>) {
        let mut m = self.status.write().unwrap_or_else(|p| p.into_inner());
        let s = m.entry(host.to_owned()).or_default();
        s.next_attempt = Some(ward_net::process::rfc3339_millis(held.due));
        s.failures = held.failures;
        match outcome {
            Some(Ok(())) => {
                s.last_error = None;
                s.last_issued = Some(ward_net::process::rfc3339_millis(SystemTime::now()));
            }
            Some(Err(e)) => s.last_error = Some(e.to_owned()),
            None => {}
        }
    }

    /// The hostnames it orders certificates for.
    pub fn hostnames(&self) -> &[String] {
        &self.hosts
    }

    fn cert_paths(&self, host: &str) -> (PathBuf, PathBuf) {
        let d = self.cfg.state_dir.join("certs");
        (d.join(format!("{host}.pem")), d.join(format!("{host}.key")))
    }

    /// Serves the certificates kept from an earlier run, and says when each host is due.
    fn load_kept(&self, store: &CertStore, metrics: &Metrics) -> HashMap<String, Held> {
        let now = SystemTime::now();
        let mut held = HashMap::new();
        for h in &self.hosts {
            let (c, k) = self.cert_paths(h);
            let due = match super::certs::load_files(&c, &k) {
                Ok(mut s) if s.names.iter().any(|n| n == h) && s.not_after > now => {
                    s.origin = format!("acme:{h}");
                    let due = renew_at(cert_not_before(&s), s.not_after);
                    super::record_expiry(metrics, &s);
                    store.put(s);
                    due
                }
                _ => now,
            };
            let h0 = Held { due, failures: 0 };
            self.note(h, &h0, None);
            held.insert(h.clone(), h0);
        }
        held
    }

    /// Runs until `stop`: orders what is missing or due, renews, backs off on failure.
    pub async fn run(
        self: Arc<Self>,
        store: Arc<CertStore>,
        metrics: Metrics,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut held = self.load_kept(&store, &metrics);
        let mut account: Option<Account> = None;
        loop {
            let now = SystemTime::now();
            for h in &self.hosts {
                let Some(state) = held.get(h).cloned() else {
                    continue;
                };
                if state.due > now {
                    continue;
                }
                let result = match &account {
                    Some(a) => self.issue(a, h, &store).await,
                    None => match self.account().await {
                        Ok(a) => {
                            let r = self.issue(&a, h, &store).await;
                            account = Some(a);
                            r
                        }
                        Err(e) => Err(e),
                    },
                };
                let next = match result {
                    Ok(s) => {
                        tracing::info!(host = %h, not_after = ?s.not_after,
                            "gateway certificate issued by ACME");
                        super::record_expiry(&metrics, &s);
                        let due = renew_at(cert_not_before(&s), s.not_after);
                        store.put(s);
                        let next = Held { due, failures: 0 };
                        self.note(h, &next, Some(Ok(())));
                        next
                    }
                    Err(e) => {
                        let failures = state.failures + 1;
                        let wait = self.backoff(failures);
                        let serving = store.all().iter().any(|s| s.origin == format!("acme:{h}"));
                        tracing::warn!(host = %h, error = %e, retry_in = ?wait, serving_old = serving,
                            "ACME could not issue a gateway certificate; the certificate in force keeps serving");
                        metrics
                            .gateway_cert_errors
                            .get_or_create(&CertLabel { name: h.clone() })
                            .inc();
                        let next = Held {
                            due: SystemTime::now() + wait,
                            failures,
                        };
                        self.note(h, &next, Some(Err(&e)));
                        next
                    }
                };
                held.insert(h.clone(), next);
            }
            let next = held.values().map(|s| s.due).min();
            let wait = next
                .and_then(|n| n.duration_since(SystemTime::now()).ok())
                .unwrap_or(Duration::from_secs(1))
                .clamp(Duration::from_millis(200), Duration::from_secs(3600));
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = ward_net::process::until_set(&mut stop) => return,
            }
        }
    }

    fn backoff(&self, failures: u32) -> Duration {
        let f = 1u32 << failures.saturating_sub(1).min(16);
        (self.cfg.min_backoff * f).min(self.cfg.max_backoff)
    }

    /// The account: the kept credentials, or a new account whose credentials are kept.
    async fn account(&self) -> Result<Account, String> {
        let path = self.cfg.state_dir.join("account.json");
        let builder = || match &self.cfg.server_root {
            Some(root) => Account::builder_with_root(root),
            None => Account::builder(),
        };
        if let Ok(text) = std::fs::read(&path) {
            let creds: AccountCredentials =
                serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))?;
            return builder()
                .map_err(|e| e.to_string())?
                .from_credentials(creds)
                .await
                .map_err(|e| format!("ACME account from {}: {e}", path.display()));
        }
        let contact: Vec<&str> = self.cfg.contact.iter().map(String::as_str).collect();
        let (account, creds) = builder()
            .map_err(|e| e.to_string())?
            .create(
                &NewAccount {
                    contact: &contact,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                self.cfg.directory.clone(),
                None,
            )
            .await
            .map_err(|e| format!("creating the ACME account: {e}"))?;
        let json = serde_json::to_vec(&creds).map_err(|e| e.to_string())?;
        write_private(&path, &json)?;
        tracing::info!(path = %path.display(), id = account.id(), "ACME account created");
        Ok(account)
    }

    /// Orders, validates and fetches a certificate for `host`, and keeps it.
    async fn issue(
        &self,
        account: &Account,
        host: &str,
        store: &CertStore,
    ) -> Result<Served, String> {
        let ids = [Identifier::Dns(host.to_owned())];
        let mut order = account
            .new_order(&NewOrder::new(&ids))
            .await
            .map_err(|e| format!("new order: {e}"))?;
        let kind = match self.cfg.challenge {
            ChallengeKind::Http01 => ChallengeType::Http01,
            ChallengeKind::TlsAlpn01 => ChallengeType::TlsAlpn01,
        };
        let mut tokens = Vec::new();
        let result = async {
            let mut authzs = order.authorizations();
            while let Some(a) = authzs.next().await {
                let mut a = a.map_err(|e| format!("authorization: {e}"))?;
                match a.status {
                    AuthorizationStatus::Pending => {}
                    AuthorizationStatus::Valid => continue,
                    s => return Err(format!("authorization is {s:?}")),
                }
                let mut ch = a
                    .challenge(kind.clone())
                    .ok_or_else(|| format!("the ACME server offers no {kind:?} challenge"))?;
                let ka = ch.key_authorization();
                match kind {
                    ChallengeType::TlsAlpn01 => {
                        store.set_challenge(
                            host,
                            Some(alpn_certificate(host, ka.digest().as_ref())?),
                        );
                    }
                    _ => {
                        self.tokens.set(&ch.token, Some(ka.as_str().to_owned()));
                        tokens.push(ch.token.clone());
                    }
                }
                ch.set_ready()
                    .await
                    .map_err(|e| format!("challenge: {e}"))?;
            }
            let status = order
                .poll_ready(&RetryPolicy::new().timeout(Duration::from_secs(60)))
                .await
                .map_err(|e| format!("waiting for validation: {e}"))?;
            if status != OrderStatus::Ready {
                return Err(why_invalid(&mut order).await);
            }
            Ok(())
        }
        .await;
        for t in &tokens {
            self.tokens.set(t, None);
        }
        store.set_challenge(host, None);
        result?;
        let key_pem = order
            .finalize()
            .await
            .map_err(|e| format!("finalize: {e}"))?;
        let chain_pem = order
            .poll_certificate(&RetryPolicy::new().timeout(Duration::from_secs(60)))
            .await
            .map_err(|e| format!("fetching the certificate: {e}"))?;
        let served = super::certs::load_pem(
            chain_pem.as_bytes(),
            key_pem.as_bytes(),
            &format!("acme:{host}"),
        )?;
        let (c, k) = self.cert_paths(host);
        write_private(&k, key_pem.as_bytes())?;
        write_private(&c, chain_pem.as_bytes())?;
        Ok(served)
    }
}

/// The reason an order became invalid: the failed challenge's problem, as the server said it.
async fn why_invalid(order: &mut instant_acme::Order) -> String {
    let mut authzs = order.authorizations();
    while let Some(Ok(mut a)) = authzs.next().await {
        if let Ok(state) = a.refresh().await {
            for c in &state.challenges {
                if let Some(p) = &c.error {
                    return format!(
                        "validation failed: {}",
                        p.detail.clone().unwrap_or_else(|| format!("{p:?}"))
                    );
                }
            }
        }
    }
    "the order became invalid".into()
}

/// The self-signed certificate TLS-ALPN-01 validation expects (RFC 8737 §3): the hostname, and
/// the critical acmeIdentifier extension with the key authorization's SHA-256.
fn alpn_certificate(host: &str, digest: &[u8]) -> Result<Arc<rustls::sign::CertifiedKey>, String> {
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let mut p = rcgen::CertificateParams::new(vec![host.to_owned()]).map_err(|e| e.to_string())?;
    p.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let cert = p.self_signed(&key).map_err(|e| e.to_string())?;
    let der = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let signer = rustls::crypto::ring::sign::any_supported_type(&der).map_err(|e| e.to_string())?;
    Ok(Arc::new(rustls::sign::CertifiedKey::new(
        vec![cert.der().clone()],
        signer,
    )))
}

fn cert_not_before(s: &Served) -> SystemTime {
    s.key
        .end_entity_cert()
        .ok()
        .and_then(|c| ward_spiffe::x509::server_cert_info(c).ok())
        .map_or(SystemTime::now(), |i| i.not_before)
}

/// Writes `data` to `path` readable by its owner only, atomically (temporary file, fsync,
/// rename), creating the directory.
fn write_private(path: &Path, data: &[u8]) -> Result<(), String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn renewal_is_two_thirds_through_and_backoff_doubles_to_the_cap() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(
            renew_at(t0, t0 + Duration::from_secs(90 * 86400)),
            t0 + Duration::from_secs(60 * 86400)
        );
        let cfg: AcmeCfg = serde_yaml_ng::from_str(
            "{ directory: 'https://acme.test/dir', state_dir: /tmp/x, min_backoff: 1m, max_backoff: 5m }",
        )
        .unwrap();
        let a = Acme::new(&cfg, ["shop.example.com"].into_iter());
        assert_eq!(a.hostnames(), ["shop.example.com"]);
        let b: Vec<u64> = (1..=5).map(|f| a.backoff(f).as_secs()).collect();
        assert_eq!(b, [60, 120, 240, 300, 300]);
    }

    #[test]
    fn bad_acme_settings_are_refused() {
        let base = "directory: 'https://acme.test/dir'\nstate_dir: /tmp/x\n";
        for (extra, why) in [
            ("hostnames: ['*.example.com']", "DNS-01"),
            ("hostnames: ['Bad']", "lowercase"),
            ("min_backoff: 2h", "min_backoff"),
        ] {
            let cfg: AcmeCfg = serde_yaml_ng::from_str(&format!("{base}{extra}")).unwrap();
            let e = cfg.validate(["a.test"].into_iter()).unwrap_err();
            assert!(e.contains(why), "{extra}: {e}");
        }
        let cfg: AcmeCfg = serde_yaml_ng::from_str(base).unwrap();
        assert!(
            cfg.validate(std::iter::empty())
                .unwrap_err()
                .contains("no hostnames")
        );
        let http: AcmeCfg =
            serde_yaml_ng::from_str("directory: 'http://acme.test/dir'\nstate_dir: /tmp/x")
                .unwrap();
        assert!(http.validate(["a.test"].into_iter()).is_err());
    }
}
