//! A Kubernetes API client from a kubeconfig file or the in-cluster environment (the pod's
//! service account), for the binaries that talk to an API server.

/// Builds a kube client from the kubeconfig file at `kubeconfig`, or the in-cluster
/// environment when `None`.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client, String> {
    let cfg = match kubeconfig {
        Some(p) => {
            let kc = kube::config::Kubeconfig::read_from(p)
                .map_err(|e| format!("{}: {e}", p.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| format!("{}: {e}", p.display()))?
        }
        None => kube::Config::incluster().map_err(|e| format!("in-cluster configuration: {e}"))?,
    };
    kube::Client::try_from(cfg).map_err(|e| e.to_string())
}
