//! Kubernetes workload attestation: from a caller's PID to its pod and container, through
//! `/proc/<pid>/cgroup` (kernel-maintained; `mountinfo` can be spoofed and is not used) and the
//! kubelet's `/pods` (this node's pods only), to `k8s:` selectors.
//!
//! The kubelet's pod list is cached and shared by all callers; a pod the cache does not know is
//! looked up again a bounded number of times (a container that just started may not be listed
//! yet). A pod the kubelet of this node does not list yields no `k8s:` selectors at all.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use serde::{Deserialize, Serialize};

/// Kubernetes attestation settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct K8sConfig {
    /// This node's name; usually left out of the file and set from the downward API through
    /// `WARD_AGENT_NODE_NAME`. Required by the time the agent starts.
    #[serde(default)]
    pub node_name: String,
    /// The kubelet's secure port.
    #[serde(default = "default_kubelet")]
    pub kubelet_url: String,
    /// CA of the kubelet's serving certificate.
    #[serde(default)]
    pub kubelet_ca: Option<PathBuf>,
    /// Skip verifying the kubelet's certificate (explicit opt-in).
    #[serde(default)]
    pub kubelet_insecure: bool,
    /// Bearer token for the kubelet (the agent's service-account token).
    #[serde(default = "default_sa_token")]
    pub token_path: PathBuf,
    /// How many times an unknown pod is looked up again.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Pause between those lookups.
    #[serde(
        default = "default_retry_interval",
        with = "ward_net::duration::serde_str"
    )]
    pub retry_interval: Duration,
}

fn default_kubelet() -> String {
    "https://127.0.0.1:10250".into()
}

fn default_sa_token() -> PathBuf {
    PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/token")
}

fn default_retries() -> u32 {
    10
}

fn default_retry_interval() -> Duration {
    Duration::from_millis(200)
}

/// Pod UID and container ID found in a cgroup file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodContainer {
    /// Pod UID (with dashes).
    pub pod_uid: String,
    /// 64-hex container ID, if the process is in a container's cgroup.
    pub container_id: Option<String>,
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn pod_uid_in(seg: &str) -> Option<String> {
    // cgroupfs: "pod<uid>"; systemd: "kubepods-burstable-pod<uid_with_underscores>.slice".
    let (seg, sep) = match seg.strip_suffix(".slice") {
        Some(s) => (s, b'_'),
        None => (seg, b'-'),
    };
    let i = seg.rfind("pod")?;
    let raw = &seg[i + 3..];
    // One spelling per driver: the systemd one writes every dash as '_', cgroupfs none.
    if raw.bytes().any(|b| (b == b'-' || b == b'_') && b != sep) {
        return None;
    }
    let uid = raw.replace('_', "-");
    let ok = uid.len() == 36
        && uid.bytes().enumerate().all(|(n, b)| {
            if [8, 13, 18, 23].contains(&n) {
                b == b'-'
            } else {
                b.is_ascii_hexdigit()
            }
        });
    ok.then_some(uid)
}

fn container_id_in(seg: &str) -> Option<String> {
    let seg = seg.strip_suffix(".scope").unwrap_or(seg);
    let id = [
        "cri-containerd-",
        "containerd-",
        "docker-",
        "crio-",
        "cri-o-",
    ]
    .iter()
    .find_map(|p| seg.strip_prefix(p))
    .unwrap_or(seg);
    is_hex64(id).then(|| id.to_ascii_lowercase())
}

/// Finds the pod UID and container ID in the text of `/proc/<pid>/cgroup` (cgroup v1 or v2,
/// cgroupfs or systemd driver, containerd, CRI-O or Docker naming). Pure.
pub fn parse_cgroup(text: &str) -> Option<PodContainer> {
    for line in text.lines() {
        // hierarchy-ID:controller-list:cgroup-path
        let path = line.splitn(3, ':').nth(2)?;
        let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        if let Some(i) = segs.iter().position(|s| pod_uid_in(s).is_some()) {
            let pod_uid = pod_uid_in(segs[i])?;
            let container_id = segs.get(i + 1).and_then(|s| container_id_in(s));
            return Some(PodContainer {
                pod_uid,
                container_id,
            });
        }
    }
    None
}

/// The caller's pod, found through the kubelet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    /// `k8s:` selectors.
    pub selectors: Vec<String>,
}

/// Selectors for a pod (and the caller's container in it). Pure.
pub fn pod_selectors(pod: &Pod, container_id: Option<&str>) -> Vec<String> {
    let m = &pod.metadata;
    let spec = pod.spec.as_ref();
    let mut v = Vec::new();
    if let Some(ns) = &m.namespace {
        v.push(format!("k8s:ns:{ns}"));
    }
    let sa = spec
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    v.push(format!("k8s:sa:{sa}"));
    if let Some(n) = &m.name {
        v.push(format!("k8s:pod-name:{n}"));
    }
    if let Some(u) = &m.uid {
        v.push(format!("k8s:pod-uid:{u}"));
    }
    if let Some(node) = spec.and_then(|s| s.node_name.as_ref()) {
        v.push(format!("k8s:node-name:{node}"));
    }
    for (k, val) in m.labels.iter().flatten() {
        v.push(format!("k8s:pod-label:{k}:{val}"));
    }
    if let Some(cid) = container_id {
        let statuses = pod.status.as_ref().into_iter().flat_map(|s| {
            s.container_statuses
                .iter()
                .flatten()
                .chain(s.init_container_statuses.iter().flatten())
        });
        for c in statuses {
            let id = c
                .container_id
                .as_deref()
                .and_then(|i| i.split_once("://"))
                .map(|(_, id)| id);
            if id == Some(cid) {
                v.push(format!("k8s:container-name:{}", c.name));
                v.push(format!("k8s:container-image:{}", c.image));
            }
        }
    }
    v.retain(|s| ward_spiffe::Selector::parse(s).is_ok());
    v
}

/// Pods by UID, and when the list was last fetched.
type PodCache = (HashMap<String, Arc<Pod>>, Option<Instant>);

/// The kubelet client with its shared pod cache.
#[derive(Debug)]
pub struct Kubelet {
    cfg: K8sConfig,
    proc_root: PathBuf,
    tls: Arc<rustls::ClientConfig>,
    cache: Mutex<PodCache>,
    refresh: tokio::sync::Mutex<()>,
}

/// Accepts any kubelet certificate (only with `kubelet_insecure`).
#[derive(Debug)]
struct Insecure(rustls::crypto::WebPkiSupportedAlgorithms);

impl rustls::client::danger::ServerCertVerifier for Insecure {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// Smallest pause between two refreshes of the pod list.
const MIN_REFRESH: Duration = Duration::from_millis(100);

impl Kubelet {
    /// A client for the kubelet `cfg` names; `proc_root` is where `/proc` is.
    pub fn new(cfg: K8sConfig, proc_root: &Path) -> Result<Self, String> {
        if cfg.node_name.is_empty() {
            return Err(
                "k8s.node_name is not set: set it in the file or WARD_AGENT_NODE_NAME".into(),
            );
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let tls = if cfg.kubelet_insecure {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Insecure(
                    provider.signature_verification_algorithms,
                )))
                .with_no_client_auth()
        } else {
            let ca = cfg
                .kubelet_ca
                .as_ref()
                .ok_or("k8s.kubelet_ca is required unless k8s.kubelet_insecure is set")?;
            let pem = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
            let mut roots = rustls::RootCertStore::empty();
            for c in ward_spiffe::bundle::pem_certificates(&pem).map_err(|e| e.to_string())? {
                roots
                    .add(c.into())
                    .map_err(|e| format!("{}: {e}", ca.display()))?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        };
        Ok(Self {
            cfg,
            proc_root: proc_root.to_owned(),
            tls: Arc::new(tls),
            cache: Mutex::new((HashMap::new(), None)),
            refresh: tokio::sync::Mutex::new(()),
        })
    }

    async fn fetch(&self) -> Result<Vec<Pod>, String> {
        let uri: http::Uri = format!("{}/pods", self.cfg.kubelet_url.trim_end_matches('/'))
            .parse()
            .map_err(|e| format!("kubelet_url: {e}"))?;
        let host = uri.host().ok_or("kubelet_url has no host")?.to_owned();
        let port = uri.port_u16().unwrap_or(10250);
        let token = std::fs::read_to_string(&self.cfg.token_path)
            .map_err(|e| format!("{}: {e}", self.cfg.token_path.display()))?;
        let tcp = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect((host.as_str(), port)),
        )
        .await
        .map_err(|_| "kubelet connect timed out".to_owned())?
        .map_err(|e| format!("kubelet: {e}"))?;
        let name =
            rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("kubelet TLS: {e}"))?;
        let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = http::Request::get("/pods")
            .header("host", &host)
            .header("authorization", format!("Bearer {}", token.trim()))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = s
            .send_request(req)
            .await
            .map_err(|e| format!("kubelet: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("kubelet answered HTTP {}", resp.status()));
        }
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        let list: k8s_openapi::List<Pod> =
            serde_json::from_slice(&body).map_err(|e| format!("kubelet pod list: {e}"))?;
        Ok(list.items)
    }

    fn cached(&self, uid: &str) -> Option<Arc<Pod>> {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .get(uid)
            .cloned()
    }

    /// Refreshes the shared cache (one refresh at a time; callers arriving during a refresh
    /// use its result).
    async fn refresh(&self) -> Result<(), String> {
        let started = Instant::now();
        let _g = self.refresh.lock().await;
        let last = self.cache.lock().unwrap_or_else(|p| p.into_inner()).1;
        if last.is_some_and(|t| t >= started || t.elapsed() < MIN_REFRESH) {
            return Ok(());
        }
        let pods = self.fetch().await?;
        let map = pods
            .into_iter()
            .filter_map(|p| p.metadata.uid.clone().map(|u| (u, Arc::new(p))))
            .collect();
        *self.cache.lock().unwrap_or_else(|p| p.into_inner()) = (map, Some(Instant::now()));
        Ok(())
    }

    /// The pod with `uid` on this node, waiting a bounded time for a just-started one.
    pub async fn pod(&self, uid: &str) -> Option<Arc<Pod>> {
        for attempt in 0..=self.cfg.retries {
            if let Some(p) = self.cached(uid) {
                return Some(p);
            }
            if let Err(e) = self.refresh().await {
                tracing::warn!(error = %e, "kubelet pod list failed");
            }
            if let Some(p) = self.cached(uid) {
                return Some(p);
            }
            if attempt < self.cfg.retries {
                tokio::time::sleep(self.cfg.retry_interval).await;
            }
        }
        None
    }

    /// `k8s:` selectors for the process `pid` (empty if it is not in a pod of this node).
    pub async fn attest(&self, pid: i32) -> Vec<String> {
        let path = self.proc_root.join(pid.to_string()).join("cgroup");
        let Ok(text) = tokio::fs::read_to_string(&path).await else {
            return Vec::new();
        };
        let Some(pc) = parse_cgroup(&text) else {
            return Vec::new();
        };
        let Some(pod) = self.pod(&pc.pod_uid).await else {
            tracing::warn!(pod_uid = %pc.pod_uid, pid, "caller's pod is not listed by this node's kubelet");
            return Vec::new();
        };
        if pod.spec.as_ref().and_then(|s| s.node_name.as_deref())
            != Some(self.cfg.node_name.as_str())
        {
            tracing::warn!(pod_uid = %pc.pod_uid, "kubelet listed a pod of another node; ignored");
            return Vec::new();
        }
        pod_selectors(&pod, pc.container_id.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "2c1f5d6e-8b7a-4c3d-9e0f-1a2b3c4d5e6f";
    const CID: &str = "7a3c9f0e1d2b4a5c6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5";

    #[test]
    fn cgroup_formats() {
        let u = UID.replace('-', "_");
        let cases = [
            // cgroup v2, systemd driver, containerd
            (
                format!(
                    "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{CID}.scope\n"
                ),
                true,
            ),
            // cgroup v2, cgroupfs driver
            (format!("0::/kubepods/besteffort/pod{UID}/{CID}\n"), true),
            // cgroup v1, cgroupfs, guaranteed QoS
            (
                format!("12:pids:/kubepods/pod{UID}/{CID}\n11:memory:/kubepods/pod{UID}/{CID}\n"),
                true,
            ),
            // cgroup v1, systemd, CRI-O
            (
                format!("5:cpu,cpuacct:/kubepods.slice/kubepods-pod{u}.slice/crio-{CID}.scope\n"),
                true,
            ),
            // Docker under systemd
            (
                format!(
                    "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/docker-{CID}.scope\n"
                ),
                true,
            ),
            // Pod-level cgroup only (e.g. the pause process): pod, no container.
            (format!("0::/kubepods/besteffort/pod{UID}\n"), false),
        ];
        for (text, with_container) in cases {
            let pc = parse_cgroup(&text).unwrap_or_else(|| panic!("no pod in {text}"));
            assert_eq!(pc.pod_uid, UID, "{text}");
            assert_eq!(
                pc.container_id.as_deref(),
                with_container.then_some(CID),
                "{text}"
            );
        }
        for text in [
            "0::/user.slice/user-1000.slice/session-2.scope\n",
            "0::/\n",
            "12:memory:/docker/abc\n",
            "0::/kubepods/podnot-a-uid/x\n",
            "",
        ] {
            assert_eq!(parse_cgroup(text), None, "{text}");
        }
        // Found by fuzzing (fuzz/cgroup): a UID spelled half with '_' and half with '-' is no
        // driver's spelling and is not taken.
        let mixed = UID.replacen('-', "_", 1);
        assert_eq!(
            parse_cgroup(&format!("0::/kubepods/besteffort/pod{mixed}/\n")),
            None
        );
        assert_eq!(
            parse_cgroup(&format!("0::/kubepods.slice/kubepods-pod{UID}.slice/\n")),
            None,
            "the systemd driver never writes dashes in the UID"
        );
    }

    #[test]
    fn selectors_of_a_pod() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "web-1", "namespace": "shop", "uid": UID, "labels": { "app": "web" } },
            "spec": { "nodeName": "n1", "serviceAccountName": "web", "containers": [ { "name": "app", "image": "shop/web:1" } ] },
            "status": { "containerStatuses": [ { "name": "app", "image": "shop/web:1", "imageID": "x", "containerID": format!("containerd://{CID}"),
                                                 "ready": true, "restartCount": 0 } ] }
        }))
        .unwrap();
        let s = pod_selectors(&pod, Some(CID));
        for want in [
            "k8s:ns:shop",
            "k8s:sa:web",
            "k8s:pod-name:web-1",
            &format!("k8s:pod-uid:{UID}"),
            "k8s:node-name:n1",
            "k8s:pod-label:app:web",
            "k8s:container-name:app",
            "k8s:container-image:shop/web:1",
        ] {
            assert!(s.contains(&want.to_owned()), "{want} missing from {s:?}");
        }
        assert!(
            !pod_selectors(&pod, None)
                .iter()
                .any(|s| s.starts_with("k8s:container"))
        );
    }
}
