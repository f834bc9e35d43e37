//! The proxy's configuration: one YAML file (unknown keys are an error) with `WARD_PROXY_*`
//! and `SPIFFE_ENDPOINT_SOCKET` overrides. Listeners are one list, each tagged with its
//! `role`: the role decides which stages of the one data path a connection runs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use ward_net::duration::serde_str;
use ward_spiffe::policy::DefaultPolicy;
use ward_spiffe::{SpiffeId, TrustDomain};

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// File.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Invalid YAML, wrong types or unknown keys.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// File.
        path: String,
        /// Parser message.
        message: String,
    },
    /// Out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Where the proxy's SVID comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum IdentitySource {
    /// The agent's Workload API.
    WorkloadApi {
        /// `unix:///path` (default: `SPIFFE_ENDPOINT_SOCKET`).
        #[serde(default)]
        socket: Option<String>,
        /// Which SVID to use when the workload has several (default: the first).
        #[serde(default)]
        spiffe_id: Option<SpiffeId>,
    },
    /// PEM files, watched for changes.
    Files {
        /// Certificate chain, leaf first.
        chain: PathBuf,
        /// PKCS#8 private key.
        key: PathBuf,
        /// Trust bundle (roots of `trust_domain`).
        bundle: PathBuf,
        /// Trust domain of the bundle.
        trust_domain: TrustDomain,
    },
}

/// Application protocol of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 and HTTP/2 (so gRPC); authorized per request.
    #[default]
    Http,
    /// Opaque TCP; authorized per connection.
    Tcp,
    /// Detected per connection.
    Auto,
}

/// Whether an inbound listener also accepts plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// mTLS only.
    #[default]
    Strict,
    /// mTLS, or plaintext treated as unauthenticated (for migrations).
    Permissive,
}

/// One listener and its role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "kebab-case")]
pub enum Listener {
    /// mTLS from other proxies → authorization → the local application at a fixed address.
    Inbound(Inbound),
    /// The local application's plaintext → mTLS to a fixed upstream proxy.
    Outbound(Outbound),
    /// Every TCP connection to the pod, redirected by `ward-proxy init`: mTLS from meshed
    /// callers or plaintext from unmeshed ones → authorization → the application on the port
    /// the caller dialled.
    InboundCapture(InboundCapture),
    /// Every TCP connection the application opens, redirected by `ward-proxy init`: to a peer
    /// proxy over mTLS when the mesh table names the destination, otherwise passed through or
    /// refused.
    OutboundCapture(OutboundCapture),
    /// The egress gateway: mTLS from sidecars (`egress.gateway`), each tunnel opening with the
    /// address its application dialled; the egress configuration decides by the caller's
    /// SPIFFE ID, as a sidecar would.
    EgressGateway(EgressGateway),
    /// The ingress gateway: HTTPS (or HTTP) from outside the mesh, routed by host and path to
    /// mesh services (`gateway` section) over mTLS with the gateway's own SPIFFE ID.
    Gateway(crate::gateway::config::GatewayListener),
}

/// The egress gateway listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressGateway {
    /// Name (metrics, logs).
    pub name: String,
    /// Address sidecars tunnel to (`0.0.0.0:15008`).
    pub listen: SocketAddr,
}

impl Listener {
    /// The listener's name.
    pub fn name(&self) -> &str {
        match self {
            Listener::Inbound(l) => &l.name,
            Listener::Outbound(l) => &l.name,
            Listener::InboundCapture(l) => &l.name,
            Listener::OutboundCapture(l) => &l.name,
            Listener::EgressGateway(l) => &l.name,
            Listener::Gateway(l) => &l.name,
        }
    }

    /// Where it listens.
    pub fn listen(&self) -> SocketAddr {
        match self {
            Listener::Inbound(l) => l.listen,
            Listener::Outbound(l) => l.listen,
            Listener::InboundCapture(l) => l.listen,
            Listener::OutboundCapture(l) => l.listen,
            Listener::EgressGateway(l) => l.listen,
            Listener::Gateway(l) => l.listen,
        }
    }

    /// The role as written in the file.
    pub fn role(&self) -> &'static str {
        match self {
            Listener::Inbound(_) => "inbound",
            Listener::Outbound(_) => "outbound",
            Listener::InboundCapture(_) => "inbound-capture",
            Listener::OutboundCapture(_) => "outbound-capture",
            Listener::EgressGateway(_) => "egress-gateway",
            Listener::Gateway(_) => "gateway",
        }
    }
}

/// How a captured inbound port is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortMode {
    /// HTTP (authorized per request), TCP (per connection, "opaque"), or detected.
    #[serde(default = "auto")]
    pub protocol: Protocol,
    /// `permissive`: plaintext from unmeshed callers is accepted as unauthenticated (the
    /// default policy `deny` still refuses it); `strict`: mTLS only.
    #[serde(default = "permissive")]
    pub tls: TlsMode,
    /// HTTP version spoken to the application.
    #[serde(default)]
    pub app_protocol: AppProtocol,
}

fn auto() -> Protocol {
    Protocol::Auto
}

fn permissive() -> TlsMode {
    TlsMode::Permissive
}

impl Default for PortMode {
    fn default() -> Self {
        Self {
            protocol: Protocol::Auto,
            tls: TlsMode::Permissive,
            app_protocol: AppProtocol::Auto,
        }
    }
}

/// Where the proxy reaches the application of a captured connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AppAddress {
    /// The address the caller dialled (the pod IP): for applications bound to `0.0.0.0` or the
    /// pod IP.
    #[default]
    Original,
    /// `127.0.0.1` / `::1` on the dialled port: for applications bound to loopback only.
    Loopback,
}

/// An HTTP probe of the kubelet that unauthenticated callers may reach.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Probe {
    /// The application port.
    pub port: u16,
    /// The exact path (normalized before comparison).
    pub path: String,
}

/// The inbound capture listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundCapture {
    /// Name (metrics, logs).
    pub name: String,
    /// Where `ward-proxy init` redirects inbound connections (`[::]:15006` takes IPv4 and
    /// IPv6).
    pub listen: SocketAddr,
    /// Where the application is reached.
    #[serde(default)]
    pub app_address: AppAddress,
    /// How ports not named in `ports` are served.
    #[serde(default)]
    pub default_port: PortMode,
    /// Per-port overrides (e.g. `3306: { protocol: tcp }` for a server-speaks-first protocol).
    #[serde(default)]
    pub ports: std::collections::BTreeMap<u16, PortMode>,
    /// HTTP GET/HEAD requests to these (port, path) pairs are allowed from unauthenticated
    /// callers whatever the policies say, so the kubelet's probes keep working (`inject` fills
    /// this from the pod's probes). Set `authorize_probes: false` to let policy decide.
    #[serde(default)]
    pub probes: Vec<Probe>,
    /// Allow the probes above.
    #[serde(default = "yes")]
    pub authorize_probes: bool,
}

fn yes() -> bool {
    true
}

/// What happens to an outbound connection whose destination the mesh table does not name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum UnknownDestination {
    /// Connect to it as the application asked, in plaintext (it is outside the mesh).
    #[default]
    Passthrough,
    /// Close the connection.
    Refuse,
    /// The `egress` section decides: external services by SNI, Host or address, reached at
    /// the proxy's own resolution of the allowed name; others as its default says.
    Egress,
}

/// A mesh destination: connections to it go over mTLS to the peer's proxy, which must present
/// one of `expected_ids`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshRoute {
    /// Addresses (`10.1.0.0/16`, `10.1.2.3`, `fd00::/64`).
    pub dst: ward_spiffe::cidr::Cidr,
    /// Ports (empty: every port).
    #[serde(default)]
    pub ports: Vec<u16>,
    /// SPIFFE IDs the peer may present (at least one).
    pub expected_ids: Vec<SpiffeId>,
}

/// The outbound capture listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboundCapture {
    /// Name (metrics, logs).
    pub name: String,
    /// Where `ward-proxy init` redirects outbound connections (`127.0.0.1:15001`; a second
    /// listener on `[::1]:15001` takes IPv6).
    pub listen: SocketAddr,
    /// HTTP, TCP or detected.
    #[serde(default = "auto")]
    pub protocol: Protocol,
    /// Mesh destinations, first match wins (until service discovery delivers them).
    #[serde(default)]
    pub routes: Vec<MeshRoute>,
    /// Destinations no route names.
    #[serde(default)]
    pub unknown: UnknownDestination,
}

/// Accepts mTLS from other proxies and forwards to the local application.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inbound {
    /// Name (metrics, logs).
    pub name: String,
    /// Public address.
    pub listen: SocketAddr,
    /// The application, `host:port`.
    pub forward_to: String,
    /// Protocol.
    #[serde(default)]
    pub protocol: Protocol,
    /// TLS mode.
    #[serde(default)]
    pub tls: TlsMode,
    /// HTTP version spoken to the application.
    #[serde(default)]
    pub app_protocol: AppProtocol,
}

/// The HTTP version an inbound listener speaks to its application.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    /// The version the original client used (carried across the proxy hop).
    #[default]
    Auto,
    /// Always HTTP/1.1 (HTTP/2 clients are translated).
    Http1,
    /// Always HTTP/2 with prior knowledge (gRPC applications).
    Http2,
}

/// Accepts plaintext from the local application and opens mTLS to an upstream proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outbound {
    /// Name (metrics, logs).
    pub name: String,
    /// Loopback address the application connects to.
    pub listen: SocketAddr,
    /// The upstream proxy's inbound listener, `host:port`.
    pub upstream: String,
    /// SPIFFE IDs the upstream may present; empty means any ID of a trusted trust domain.
    #[serde(default)]
    pub expected_ids: Vec<SpiffeId>,
    /// Protocol.
    #[serde(default)]
    pub protocol: Protocol,
}

/// Enforce or only report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum AuthzMode {
    /// Deny what policy denies.
    #[default]
    Enforce,
    /// Log what would be denied, deny nothing.
    DryRun,
}

/// Authorization settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Authorization {
    /// Enforce or dry-run.
    #[serde(default)]
    pub mode: AuthzMode,
    /// What applies when no ALLOW policy targets this workload.
    #[serde(default)]
    pub default: DefaultPolicy,
    /// Policy files (YAML `policies: [...]`), reloaded when they change.
    #[serde(default)]
    pub policy_files: Vec<PathBuf>,
    /// How often policy files are checked for changes.
    #[serde(default = "default_reload", with = "serde_str")]
    pub reload_interval: Duration,
    /// Also follow the policies the CA stores for this workload, streamed by the agent
    /// (requires a `workload_api` identity).
    #[serde(default)]
    pub from_agent: bool,
    /// Pass `X-HTTP-Method-Override` (and `X-HTTP-Method`, `X-Method-Override`) on to the
    /// application. Off by default: an application that honours them would run another method
    /// than the one authorized (a GET-only policy letting a DELETE through).
    #[serde(default)]
    pub forward_method_override: bool,
}

impl Default for Authorization {
    fn default() -> Self {
        Self {
            mode: AuthzMode::default(),
            default: DefaultPolicy::default(),
            policy_files: Vec::new(),
            reload_interval: default_reload(),
            from_agent: false,
            forward_method_override: false,
        }
    }
}

fn default_reload() -> Duration {
    Duration::from_secs(2)
}

/// The access log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLog {
    /// JSON-lines file.
    pub path: PathBuf,
    /// Rotate when the file exceeds this many bytes.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// Records queued for the writer. With `on_full: block` or `refuse` a slot is taken when a
    /// request or connection starts, so this also bounds requests and connections in flight.
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// What happens when the queue is full: `drop` the record (counted, and the next record
    /// says how many), `block` the request until the writer catches up, or `refuse` it (503,
    /// or the connection closed) — `refuse` is the mode for evidence.
    #[serde(default)]
    pub on_full: OnFull,
    /// When written records reach the disk: `interval` (every `fsync_interval`), or
    /// `every_record` (each batch the writer takes is synced before it takes the next).
    #[serde(default)]
    pub fsync: Fsync,
    /// How often `fsync: interval` syncs.
    #[serde(default = "default_fsync_interval", with = "serde_str")]
    pub fsync_interval: Duration,
    /// A signed anchor after this many records (0: only by time and at file start and end).
    #[serde(default = "default_anchor_every")]
    pub anchor_every: u64,
    /// A signed anchor at least this often while records are written.
    #[serde(default = "default_anchor_interval", with = "serde_str")]
    pub anchor_interval: Duration,
}

impl AccessLog {
    /// An access log at `path` with every other setting at its default.
    pub fn at(path: PathBuf) -> Self {
        Self {
            path,
            max_bytes: default_max_bytes(),
            queue: default_queue(),
            on_full: OnFull::default(),
            fsync: Fsync::default(),
            fsync_interval: default_fsync_interval(),
            anchor_every: default_anchor_every(),
            anchor_interval: default_anchor_interval(),
        }
    }
}

/// What the access log does when its queue is full.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFull {
    /// Drop the record and count it (telemetry).
    #[default]
    Drop,
    /// Make the request wait for room.
    Block,
    /// Refuse the request: 503 for HTTP, a closed connection for TCP (evidence).
    Refuse,
}

/// When the access log syncs to disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fsync {
    /// Every `fsync_interval`.
    #[default]
    Interval,
    /// After every batch of records the writer takes.
    EveryRecord,
}

fn default_fsync_interval() -> Duration {
    Duration::from_secs(1)
}

fn default_anchor_every() -> u64 {
    10_000
}

fn default_anchor_interval() -> Duration {
    Duration::from_secs(10)
}

fn default_max_bytes() -> u64 {
    100 * 1024 * 1024
}

fn default_queue() -> usize {
    16 * 1024
}

/// The whole proxy configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// Where the SVID comes from: `workload_api: {...}` or `files: {...}`.
    #[serde(with = "serde_yaml_ng::with::singleton_map")]
    pub identity: IdentitySource,
    /// `/metrics`, `/healthz`, `/readyz`.
    #[serde(default = "default_admin")]
    pub admin_address: SocketAddr,
    /// Listeners, each with its `role`.
    #[serde(default)]
    pub listeners: Vec<Listener>,
    /// Authorization.
    #[serde(default)]
    pub authorization: Authorization,
    /// Header carrying the verified peer SPIFFE ID to the application (incoming copies are
    /// removed).
    #[serde(default = "default_header")]
    pub peer_id_header: String,
    /// Access log; none if absent.
    #[serde(default)]
    pub access_log: Option<AccessLog>,
    /// `tracing` filter.
    #[serde(default = "default_log_level")]
    pub log_level: String,
    /// On shutdown, how long open connections may take to finish before they are cut.
    #[serde(default = "default_drain", with = "serde_str")]
    pub drain_timeout: Duration,
    /// Service discovery through the agent (requires a `workload_api` identity): outbound
    /// traffic to a mesh service is balanced across its endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discovery: Option<DiscoveryCfg>,
    /// External services outbound capture may reach (with `unknown: egress`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<crate::egress::EgressCfg>,
    /// What an HTTP client may send before the proxy gives up on it.
    #[serde(default)]
    pub http_limits: HttpLimits,
    /// The ingress gateway's certificates, routes and limits (gateway listeners).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<crate::gateway::config::GatewayCfg>,
    /// Also speak TLS 1.2 on mesh hops, for a non-Ward peer (an Envoy whose upstream TLS is
    /// capped at 1.2) that cannot speak 1.3. Off: under TLS 1.2 the client certificate, the
    /// caller's identity, crosses the wire in the clear.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mesh_tls12: bool,
    /// How many connections a listener holds open.
    #[serde(default, skip_serializing_if = "ConnectionLimits::is_default")]
    pub connection_limits: ConnectionLimits,
}

/// The open connections each listener may hold; more are closed as they arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionLimits {
    /// Per listener.
    #[serde(default = "default_max_connections")]
    pub per_listener: usize,
    /// Per client address (IPv6: per /64), on listeners serving callers from outside the pod
    /// (inbound, inbound capture, the gateways); outbound listeners serve only the local
    /// application.
    #[serde(default = "default_max_client_connections")]
    pub per_client: usize,
    /// An opaque TCP connection with no byte either way, or an HTTP connection with no request
    /// in flight, for this long is closed (HTTP/2 with GOAWAY).
    #[serde(default = "default_idle_timeout", with = "serde_str")]
    pub idle_timeout: Duration,
}

fn default_idle_timeout() -> Duration {
    Duration::from_secs(3600)
}

fn default_max_connections() -> usize {
    20_000
}

fn default_max_client_connections() -> usize {
    1_024
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            per_listener: default_max_connections(),
            per_client: default_max_client_connections(),
            idle_timeout: default_idle_timeout(),
        }
    }
}

impl ConnectionLimits {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// Limits on what one HTTP client may make the proxy hold (every listener).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpLimits {
    /// An HTTP/1 request's headers must have arrived within this (a client sending one byte
    /// at a time is cut off).
    #[serde(default = "default_header_read_timeout", with = "serde_str")]
    pub header_read_timeout: Duration,
    /// The most header bytes of one request (HTTP/1 read buffer; HTTP/2 header list); more:
    /// 431.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: u32,
    /// The most header fields of one HTTP/1 request; more: 431.
    #[serde(default = "default_max_headers")]
    pub max_headers: usize,
}

fn default_header_read_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_max_header_bytes() -> u32 {
    64 * 1024
}

fn default_max_headers() -> usize {
    100
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: default_header_read_timeout(),
            max_header_bytes: default_max_header_bytes(),
            max_headers: default_max_headers(),
        }
    }
}

/// Service discovery settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryCfg {
    /// `p2c` (power of two choices over peak-EWMA, the default) or `round-robin`.
    #[serde(default)]
    pub balancer: crate::balance::Balancer,
    /// Retries of requests to mesh services.
    #[serde(default)]
    pub retries: RetryCfg,
    /// The longest a request to a mesh service may take, retries included (then 504).
    #[serde(
        default,
        with = "ward_net::duration::serde_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub request_timeout: Option<Duration>,
}

/// When a request to a mesh service is sent again, to another endpoint. Only requests that
/// can be repeated are: those without a body (so nothing was consumed) whose method is
/// idempotent, or any request that was never sent (the connection failed).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryCfg {
    /// Also on 502/503/504 and gRPC UNAVAILABLE answers (not only on connection failures).
    #[serde(default = "yes")]
    pub on_5xx: bool,
    /// Retries may add at most this fraction to the requests of a destination...
    #[serde(default = "default_ratio")]
    pub budget_ratio: f32,
    /// ...plus this many per second, so retries can never multiply an outage.
    #[serde(default = "default_min_retries")]
    pub min_per_second: u32,
    /// A `Retry-After` longer than this means: do not retry.
    #[serde(default = "default_retry_after", with = "serde_str")]
    pub max_retry_after: Duration,
}

fn default_ratio() -> f32 {
    0.2
}

fn default_min_retries() -> u32 {
    10
}

fn default_retry_after() -> Duration {
    Duration::from_secs(1)
}

impl Default for RetryCfg {
    fn default() -> Self {
        Self {
            on_5xx: true,
            budget_ratio: default_ratio(),
            min_per_second: default_min_retries(),
            max_retry_after: default_retry_after(),
        }
    }
}

fn default_drain() -> Duration {
    Duration::from_secs(5)
}

fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 15000))
}

fn default_header() -> String {
    "x-ward-peer-id".into()
}

fn default_log_level() -> String {
    "info".into()
}

impl ProxyConfig {
    /// The inbound listeners.
    pub fn inbound(&self) -> impl Iterator<Item = &Inbound> {
        self.listeners.iter().filter_map(|l| match l {
            Listener::Inbound(i) => Some(i),
            _ => None,
        })
    }

    /// The inbound listeners, to change (tests, inject).
    pub fn inbound_mut(&mut self) -> Vec<&mut Inbound> {
        self.listeners
            .iter_mut()
            .filter_map(|l| match l {
                Listener::Inbound(i) => Some(i),
                _ => None,
            })
            .collect()
    }

    /// A configuration with this identity and every default (tests, inject).
    pub fn new(identity: IdentitySource) -> Self {
        Self {
            identity,
            admin_address: default_admin(),
            listeners: Vec::new(),
            authorization: Authorization::default(),
            peer_id_header: default_header(),
            access_log: None,
            log_level: default_log_level(),
            drain_timeout: default_drain(),
            discovery: None,
            egress: None,
            http_limits: HttpLimits::default(),
            gateway: None,
            connection_limits: ConnectionLimits::default(),
            mesh_tls12: false,
        }
    }

    /// The outbound listeners.
    pub fn outbound(&self) -> impl Iterator<Item = &Outbound> {
        self.listeners.iter().filter_map(|l| match l {
            Listener::Outbound(o) => Some(o),
            _ => None,
        })
    }

    /// Reads a YAML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_yaml(&text, &path.display().to_string())
    }

    /// Parses YAML text.
    pub fn from_yaml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let cfg: Self = serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Applies overrides: `WARD_PROXY_ADMIN_ADDRESS`, `WARD_PROXY_LOG_LEVEL`,
    /// `WARD_PROXY_DEFAULT_POLICY`, `WARD_PROXY_AUTHZ_MODE`, and `SPIFFE_ENDPOINT_SOCKET` for a
    /// Workload API identity without an explicit socket.
    pub fn apply_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let bad = |k: &str, e: &dyn std::fmt::Display| ConfigError::Invalid(format!("{k}: {e}"));
        if let Some(v) = env("WARD_PROXY_ADMIN_ADDRESS") {
            self.admin_address = v.parse().map_err(|e| bad("WARD_PROXY_ADMIN_ADDRESS", &e))?;
        }
        if let Some(v) = env("WARD_PROXY_LOG_LEVEL") {
            self.log_level = v;
        }
        if let Some(v) = env("WARD_PROXY_DEFAULT_POLICY") {
            self.authorization.default =
                serde_yaml_ng::from_str(&v).map_err(|e| bad("WARD_PROXY_DEFAULT_POLICY", &e))?;
        }
        if let Some(v) = env("WARD_PROXY_AUTHZ_MODE") {
            self.authorization.mode =
                serde_yaml_ng::from_str(&v).map_err(|e| bad("WARD_PROXY_AUTHZ_MODE", &e))?;
        }
        if let IdentitySource::WorkloadApi {
            socket: s @ None, ..
        } = &mut self.identity
            && let Some(v) = env("SPIFFE_ENDPOINT_SOCKET")
        {
            *s = Some(v);
        }
        self.validate()
    }

    /// Checks consistency.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let inv = |m: String| Err(ConfigError::Invalid(m));
        let mut names = std::collections::HashSet::new();
        for n in self.listeners.iter().map(Listener::name) {
            if n.is_empty() || !names.insert(n.to_owned()) {
                return inv(format!(
                    "listener names must be unique and non-empty ({n:?})"
                ));
            }
        }
        for l in self.inbound() {
            host_port(&l.forward_to).map_err(|e| {
                ConfigError::Invalid(format!("inbound {}: forward_to: {e}", l.name))
            })?;
        }
        for l in self.outbound() {
            host_port(&l.upstream)
                .map_err(|e| ConfigError::Invalid(format!("outbound {}: upstream: {e}", l.name)))?;
        }
        for l in &self.listeners {
            if let Listener::InboundCapture(i) = l {
                for p in &i.probes {
                    let ok = ward_spiffe::policy::path::normalize(&p.path)
                        .is_ok_and(|n| n == p.path)
                        && p.path != "/"
                        && !p.path.contains('?');
                    if !ok {
                        return inv(format!(
                            "inbound-capture {}: probe path {:?} must be a normalized path \
                             other than \"/\", without a query (it is reachable without \
                             authentication)",
                            i.name, p.path
                        ));
                    }
                }
            }
            if let Listener::Outbound(o) = l
                && o.expected_ids.is_empty()
            {
                return inv(format!(
                    "outbound {}: expected_ids must name at least one SPIFFE ID (any other \
                     workload could otherwise answer for the upstream)",
                    o.name
                ));
            }
            if let Listener::EgressGateway(g) = l
                && self.egress.is_none()
            {
                return inv(format!(
                    "egress-gateway {}: needs an `egress` section (the configuration it applies)",
                    g.name
                ));
            }
            if let Listener::OutboundCapture(o) = l {
                if o.unknown == UnknownDestination::Egress && self.egress.is_none() {
                    return inv(format!(
                        "outbound-capture {}: unknown: egress needs an `egress` section",
                        o.name
                    ));
                }
                for r in &o.routes {
                    if r.expected_ids.is_empty() {
                        return inv(format!(
                            "outbound-capture {}: route {}: expected_ids must name at least one \
                             SPIFFE ID",
                            o.name, r.dst
                        ));
                    }
                }
            }
        }
        let gateways: Vec<_> = self
            .listeners
            .iter()
            .filter_map(|l| match l {
                Listener::Gateway(g) => Some(g),
                _ => None,
            })
            .collect();
        match (&self.gateway, gateways.first()) {
            (None, Some(g)) => {
                return inv(format!(
                    "gateway {}: needs a `gateway` section (its certificates and routes)",
                    g.name
                ));
            }
            (Some(gw), Some(g)) => {
                gw.validate(&gateways).map_err(ConfigError::Invalid)?;
                if self.discovery.is_none() && !gw.routes.is_empty() {
                    return inv(format!(
                        "gateway {}: routes to mesh services need `discovery`",
                        g.name
                    ));
                }
            }
            _ => {}
        }
        let h = &self.peer_id_header;
        if h.is_empty()
            || http::HeaderName::from_bytes(h.as_bytes()).is_err()
            || h.bytes().any(|b| b.is_ascii_uppercase())
        {
            return inv(format!(
                "peer_id_header {h:?} must be a lowercase HTTP header name"
            ));
        }
        let c = &self.connection_limits;
        if c.per_listener == 0 || c.per_client == 0 {
            return inv("connection_limits: per_listener and per_client must be > 0".into());
        }
        if self.connection_limits.idle_timeout.is_zero() {
            return inv("connection_limits.idle_timeout must be > 0".into());
        }
        let h = &self.http_limits;
        if h.header_read_timeout.is_zero() || h.max_header_bytes < 8192 || h.max_headers < 16 {
            return inv(
                "http_limits: header_read_timeout must be > 0, max_header_bytes >= 8192 and \
                 max_headers >= 16"
                    .into(),
            );
        }
        if let Some(a) = &self.access_log
            && (a.queue == 0 || a.max_bytes < 4096)
        {
            return inv("access_log: queue must be > 0 and max_bytes >= 4096".into());
        }
        if let Some(a) = &self.access_log
            && (a.fsync_interval.is_zero() || a.anchor_interval.is_zero())
        {
            return inv("access_log: fsync_interval and anchor_interval must be > 0".into());
        }
        if let Some(e) = &self.egress {
            ward_spiffe::egress::EgressSet::compile(e.policy.clone())
                .map_err(|e| ConfigError::Invalid(format!("egress: {e}")))?;
        }
        if self.egress.as_ref().is_some_and(|e| e.from_agent) && !self.authorization.from_agent {
            return inv(
                "egress.from_agent needs authorization.from_agent (they come on one stream)".into(),
            );
        }
        if self.discovery.is_some() && !matches!(self.identity, IdentitySource::WorkloadApi { .. })
        {
            return inv("discovery needs a workload_api identity (it asks the agent)".into());
        }
        if self.authorization.from_agent
            && !matches!(self.identity, IdentitySource::WorkloadApi { .. })
        {
            return inv("authorization.from_agent needs a workload_api identity".into());
        }
        if let IdentitySource::WorkloadApi {
            socket: Some(s), ..
        } = &self.identity
            && !s.starts_with("unix:")
        {
            return inv(format!(
                "identity.workload_api.socket {s:?} must be a unix: address"
            ));
        }
        Ok(())
    }
}

/// Checks `host:port`.
pub fn host_port(s: &str) -> Result<(), String> {
    let (host, port) = s.rsplit_once(':').ok_or("must be host:port")?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err("must be host:port".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
identity:
  files: { chain: /c.pem, key: /k.pem, bundle: /b.pem, trust_domain: example.org }
admin_address: 127.0.0.1:15000
listeners:
  - role: inbound
    name: in
    listen: 0.0.0.0:15006
    forward_to: 127.0.0.1:8080
    protocol: auto
    tls: permissive
  - role: outbound
    name: backend
    listen: 127.0.0.1:15001
    upstream: backend.local:15006
    expected_ids: [spiffe://example.org/backend]
authorization:
  mode: dry-run
  default: same-trust-domain
  policy_files: [/etc/ward/policies.yaml]
access_log:
  path: /var/log/ward/access.jsonl
"#;

    #[test]
    fn full_config_parses() {
        let c = ProxyConfig::from_yaml(FULL, "t").unwrap();
        let inbound: Vec<_> = c.inbound().collect();
        assert_eq!(inbound[0].protocol, Protocol::Auto);
        assert_eq!(inbound[0].tls, TlsMode::Permissive);
        assert_eq!(c.outbound().count(), 1);
        assert_eq!(c.authorization.default, DefaultPolicy::SameTrustDomain);
        assert_eq!(c.authorization.mode, AuthzMode::DryRun);
        assert_eq!(c.peer_id_header, "x-ward-peer-id");
        assert_eq!(c.access_log.unwrap().queue, 16 * 1024);
    }

    #[test]
    fn errors_are_clear() {
        let e = ProxyConfig::from_yaml(&format!("{FULL}\nbogus: 1\n"), "f").unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        // Unknown keys inside a listener and unknown roles are refused too.
        let e = ProxyConfig::from_yaml(
            &FULL.replace("tls: permissive", "tls: permissive\n    extra: 1"),
            "f",
        )
        .unwrap_err();
        assert!(e.to_string().contains("extra"), "{e}");
        let e = ProxyConfig::from_yaml(&FULL.replace("role: outbound", "role: sideways"), "f")
            .unwrap_err();
        assert!(e.to_string().contains("sideways"), "{e}");
        let e =
            ProxyConfig::from_yaml(&FULL.replace("same-trust-domain", "maybe"), "f").unwrap_err();
        assert!(
            e.to_string().contains("maybe") || e.to_string().contains("variant"),
            "{e}"
        );
        let e =
            ProxyConfig::from_yaml(&FULL.replace("127.0.0.1:8080", "nowhere"), "f").unwrap_err();
        assert!(e.to_string().contains("forward_to"), "{e}");
        let e = ProxyConfig::from_yaml(
            &FULL.replace("spiffe://example.org/backend", "spiffe://x//y"),
            "f",
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("expected_ids") || e.to_string().contains("segment"),
            "{e}"
        );
    }

    #[test]
    fn env_overrides() {
        let mut c = ProxyConfig::from_yaml("identity:\n  workload_api: {}\n", "t").unwrap();
        c.apply_env(&|k| match k {
            "SPIFFE_ENDPOINT_SOCKET" => Some("unix:///run/agent.sock".into()),
            "WARD_PROXY_DEFAULT_POLICY" => Some("all-authenticated".into()),
            "WARD_PROXY_ADMIN_ADDRESS" => Some("127.0.0.1:9901".into()),
            "WARD_PROXY_LOG_LEVEL" => Some("debug".into()),
            "WARD_PROXY_AUTHZ_MODE" => Some("dry-run".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(
            c.identity,
            IdentitySource::WorkloadApi {
                socket: Some("unix:///run/agent.sock".into()),
                spiffe_id: None
            }
        );
        assert_eq!(c.authorization.default, DefaultPolicy::AllAuthenticated);
        assert_eq!(c.admin_address, "127.0.0.1:9901".parse().unwrap());
        assert_eq!(c.log_level, "debug");
        assert_eq!(c.authorization.mode, AuthzMode::DryRun);
        // A socket in the file wins over SPIFFE_ENDPOINT_SOCKET.
        let mut c = ProxyConfig::from_yaml(
            "identity:\n  workload_api: { socket: \"unix:///a.sock\" }\n",
            "t",
        )
        .unwrap();
        c.apply_env(&|k| (k == "SPIFFE_ENDPOINT_SOCKET").then(|| "unix:///b.sock".into()))
            .unwrap();
        assert!(matches!(
            c.identity,
            IdentitySource::WorkloadApi { socket: Some(ref s), .. } if s == "unix:///a.sock"
        ));
        // A bad value is refused, naming its variable.
        for k in [
            "WARD_PROXY_ADMIN_ADDRESS",
            "WARD_PROXY_DEFAULT_POLICY",
            "WARD_PROXY_AUTHZ_MODE",
        ] {
            let e = c
                .apply_env(&|n| (n == k).then(|| "not-a-value".into()))
                .unwrap_err();
            assert!(e.to_string().contains(k), "{e}");
        }
    }
}
