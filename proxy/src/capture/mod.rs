//! Traffic capture: the redirection rules `ward-proxy init` installs in the pod's network
//! namespace ([`rules`], installed with the `nft` binary), and the original destination of a
//! redirected connection (`SO_ORIGINAL_DST`, read through `nix` without unsafe code).

pub mod rules;

use std::io::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::process::{Command, Stdio};

use nix::sys::socket::{getsockopt, sockopt};
use tokio::net::TcpStream;

/// The address a redirected connection was dialled to. `None` if the kernel has none (the
/// connection was not redirected, or conntrack has no entry).
pub fn original_dst(tcp: &TcpStream) -> Option<SocketAddr> {
    let local = tcp.local_addr().ok()?;
    let v4 = match local {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(a) => a.ip().to_ipv4_mapped().is_some(),
    };
    if v4 {
        let sa = getsockopt(tcp, sockopt::OriginalDst).ok()?;
        let ip = Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr));
        Some(SocketAddr::V4(SocketAddrV4::new(
            ip,
            u16::from_be(sa.sin_port),
        )))
    } else {
        let sa = getsockopt(tcp, sockopt::Ip6tOriginalDst).ok()?;
        let ip = Ipv6Addr::from(sa.sin6_addr.s6_addr);
        Some(SocketAddr::V6(SocketAddrV6::new(
            ip,
            u16::from_be(sa.sin6_port),
            0,
            0,
        )))
    }
}

/// Why `init` failed.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// `nft` is not installed.
    #[error(
        "cannot run {nft}: {source} (install nftables: Debian `apt-get install nftables`, Alpine \
         `apk add nftables`; the ward-proxy image ships it)"
    )]
    NoNft {
        /// The binary tried.
        nft: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The caller may not change the network namespace's rules.
    #[error(
        "ward-proxy init needs CAP_NET_ADMIN in the pod's network namespace (run it as root in an \
         init container with `securityContext.capabilities.add: [NET_ADMIN]`, or by hand with \
         sudo): nft said: {0}"
    )]
    Permission(String),
    /// nft refused the rules.
    #[error("nft refused the rules: {0}")]
    Nft(String),
}

impl InitError {
    /// The exit code: 4 for a missing capability, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            InitError::Permission(_) => 4,
            _ => 1,
        }
    }
}

/// Runs `nft -f -` with `script`.
pub fn apply(nft: &str, script: &str) -> Result<(), InitError> {
    let mut child = Command::new(nft)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| InitError::NoNft {
            nft: nft.to_owned(),
            source,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| InitError::Nft(e.to_string()))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| InitError::Nft(e.to_string()))?;
    if out.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if err.contains("Operation not permitted") || err.contains("Permission denied") {
        Err(InitError::Permission(err))
    } else {
        Err(InitError::Nft(err))
    }
}
