//! Client side: a tonic [`Channel`] whose connections are TLS with a config chosen at connect
//! time, so a rotated SVID or bundle is used by the next connection.

use std::sync::Arc;

use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tonic::transport::{Channel, Endpoint, Uri};

/// Supplies the client config for each new connection.
pub type ConfigSource = Arc<dyn Fn() -> Option<Arc<ClientConfig>> + Send + Sync>;

/// Why a channel could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The address is not `host:port`.
    #[error("invalid address {0:?}")]
    Address(String),
    /// Connecting failed.
    #[error("cannot connect to {addr}: {source}")]
    Transport {
        /// Where.
        addr: String,
        /// Why.
        source: tonic::transport::Error,
    },
}

/// A lazily-connecting channel to `addr` (`host:port`) over TLS. Each (re)connection asks
/// `configs` for the client config to use.
pub fn tls_channel(addr: &str, configs: ConfigSource) -> Result<Channel, ConnectError> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|_| ConnectError::Address(addr.to_owned()))?
        .connect_timeout(std::time::Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(std::time::Duration::from_secs(30))
        .keep_alive_while_idle(true);
    let target = addr.to_owned();
    let connector = tower::service_fn(move |_uri: Uri| {
        let configs = configs.clone();
        let target = target.clone();
        async move {
            let cfg = configs().ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::NotConnected, "no TLS credentials yet")
            })?;
            let tcp = tokio::net::TcpStream::connect(&target).await?;
            tcp.set_nodelay(true)?;
            // SPIFFE verification ignores the server name; rustls needs one to build the
            // ClientHello. IP literals are never sent as SNI.
            let host = target.rsplit_once(':').map_or(target.as_str(), |(h, _)| h);
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let name = ServerName::try_from(host.to_owned())
                .unwrap_or_else(|_| ServerName::try_from("ward").expect("static name is valid"));
            let tls = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    Ok(endpoint.connect_with_connector_lazy(connector))
}
