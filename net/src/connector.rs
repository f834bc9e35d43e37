//! Client side: a tonic [`Channel`] whose connections are TLS with a config chosen at connect
//! time, so a rotated SVID or bundle is used by the next connection.

use std::sync::Arc;

use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tonic::transport::{Channel, Endpoint, Uri};

/// Bound on reaching one server: TCP connect and TLS handshake. A server that is cut off
/// (packets dropped) or stalls after accepting costs this much before the next is tried.
pub const SERVER_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);
/// HTTP/2 PING interval on an established channel, and how long a PING may go unanswered
/// before the connection is dropped and the channel reconnects (to the next server when this
/// one is gone): a server that vanishes without a reset is noticed within their sum.
pub const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
/// See [`KEEPALIVE_INTERVAL`].
pub const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

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
    tls_channel_any(&[addr.to_owned()], configs)
}

/// Like [`tls_channel`], over several equivalent servers (CA replicas): a connection goes to
/// the one that answered last, and when it cannot be reached to the next, in order, so a
/// client fails over when the channel reconnects. A host name with several addresses is
/// tried address by address as well.
pub fn tls_channel_any(addrs: &[String], configs: ConfigSource) -> Result<Channel, ConnectError> {
    let first = addrs
        .first()
        .ok_or_else(|| ConnectError::Address(String::new()))?;
    for a in addrs {
        if a.rsplit_once(':')
            .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        {
            return Err(ConnectError::Address(a.clone()));
        }
    }
    // tonic applies the endpoint's connect timeout to the whole connector below, which tries
    // every server in turn: it must cover all of them, or a dead first server would use it up
    // and the next would never be tried.
    let servers = u32::try_from(addrs.len()).unwrap_or(u32::MAX);
    let endpoint = Endpoint::from_shared(format!("http://{first}"))
        .map_err(|_| ConnectError::Address(first.clone()))?
        .connect_timeout(
            SERVER_CONNECT_TIMEOUT.saturating_mul(servers) + std::time::Duration::from_secs(1),
        )
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    let targets: Arc<Vec<String>> = Arc::new(addrs.to_vec());
    let last_good = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let connector = tower::service_fn(move |_uri: Uri| {
        let configs = configs.clone();
        let targets = targets.clone();
        let last_good = last_good.clone();
        async move {
            let cfg = configs().ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::NotConnected, "no TLS credentials yet")
            })?;
            let n = targets.len();
            let start = last_good.load(std::sync::atomic::Ordering::Relaxed) % n;
            let mut errors = Vec::new();
            for i in 0..n {
                let idx = (start + i) % n;
                match connect_one(&targets[idx], cfg.clone()).await {
                    Ok(tls) => {
                        if idx != start {
                            tracing::info!(server = %targets[idx], "connected to the next server");
                        }
                        last_good.store(idx, std::sync::atomic::Ordering::Relaxed);
                        return Ok(TokioIo::new(tls));
                    }
                    Err(e) => errors.push(format!("{}: {e}", targets[idx])),
                }
            }
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                errors.join("; "),
            ))
        }
    });
    Ok(endpoint.connect_with_connector_lazy(connector))
}

/// TCP connect and TLS handshake to one server, within [`SERVER_CONNECT_TIMEOUT`].
async fn connect_one(
    target: &str,
    cfg: Arc<ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    tokio::time::timeout(SERVER_CONNECT_TIMEOUT, handshake(target, cfg))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no TLS session within {SERVER_CONNECT_TIMEOUT:?}"),
            )
        })?
}

async fn handshake(
    target: &str,
    cfg: Arc<ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(target).await?;
    tcp.set_nodelay(true)?;
    // SPIFFE verification ignores the server name; rustls needs one to build the
    // ClientHello. IP literals are never sent as SNI.
    let host = target.rsplit_once(':').map_or(target, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let name = ServerName::try_from(host.to_owned())
        .unwrap_or_else(|_| ServerName::try_from("ward").expect("static name is valid"));
    tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
}
