//! The `ward-ca` command line: `run`, `dev`, `check-config`, and the admin subcommands that
//! talk to a running CA over its admin socket.
//!
//! Exit codes ([`EXIT_CODES`], printed by `--help`): 0 success; 1 internal or unexpected
//! error; 2 invalid usage or argument; 3 not found; 4 already exists or concurrent change; 5
//! permission denied; 6 CA unreachable; 7 cannot listen; 8 `policy explain`: the request would
//! be denied; 9 the connection was lost during a change.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use clap::{Args, Parser, Subcommand, ValueEnum};
use tonic::Code;
use ward_net::process::rfc3339;
use ward_proto::admin::{self, admin_client::AdminClient};
use ward_proto::types;
use ward_spiffe::TrustDomain;

use crate::config::{CaConfig, LogFormat};

mod egress;
mod services;

/// ward-ca: the certificate authority of a Ward trust domain.
#[derive(Debug, Parser)]
#[command(name = "ward-ca", version, about, after_help = EXIT_CODES)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the CA.
    Run(RunArgs),
    /// Run a local trust domain: a CA, an agent, and an SVID for the current user.
    Dev(crate::dev::DevArgs),
    /// Validate a configuration file and print it with defaults filled in.
    CheckConfig {
        /// TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Join tokens for node attestation.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// Registration entries.
    Entry {
        #[command(subcommand)]
        cmd: EntryCmd,
    },
    /// Attested agents.
    Agent {
        #[command(subcommand)]
        cmd: AgentCmd,
    },
    /// The trust bundle.
    Bundle {
        #[command(subcommand)]
        cmd: BundleCmd,
    },
    /// Authorization policies stored in the CA and streamed to agents and proxies.
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// Signing authorities: show them and move them through prepare, activate, taint, revoke.
    Authority {
        /// Which authority: the X.509 signing authority or the JWT signing key.
        #[arg(value_enum)]
        kind: AuthorityKind,
        #[command(subcommand)]
        cmd: AuthorityCmd,
    },
    /// Mesh services for hosts without Kubernetes: names, ports, endpoints and their IDs.
    Service {
        #[command(subcommand)]
        cmd: services::ServiceCmd,
    },
    /// The mesh's egress: which external services workloads may reach.
    Egress {
        #[command(subcommand)]
        cmd: egress::EgressCmd,
    },
    /// Print the Kubernetes CustomResourceDefinitions (IdentityPolicy, AuthorizationPolicy,
    /// ExternalService) as YAML, for `kubectl apply -f -`.
    Crds,
}

#[derive(Debug, Subcommand)]
enum PolicyCmd {
    /// Create or replace the policies of a YAML file (`policies: [...]`), all or none.
    Apply {
        #[command(flatten)]
        conn: Conn,
        /// The policy file.
        #[arg(long, short)]
        file: PathBuf,
    },
    /// List policies.
    List {
        #[command(flatten)]
        conn: Conn,
    },
    /// Show one policy (YAML, or JSON with -o json).
    Show {
        #[command(flatten)]
        conn: Conn,
        /// Policy name.
        name: String,
    },
    /// Delete a policy.
    Delete {
        #[command(flatten)]
        conn: Conn,
        /// Policy name.
        name: String,
    },
    /// Can SOURCE call TARGET? Exit 0 if allowed, 8 if denied.
    Explain {
        #[command(flatten)]
        conn: Conn,
        /// Caller SPIFFE ID; omit for an unauthenticated caller.
        #[arg(long)]
        source: Option<String>,
        /// Destination SPIFFE ID.
        #[arg(long)]
        target: String,
        /// HTTP method; omit together with --path for a TCP connection.
        #[arg(long)]
        method: Option<String>,
        /// Request path.
        #[arg(long)]
        path: Option<String>,
        /// Destination port.
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// Default when no ALLOW policy targets the destination: deny, all-authenticated,
        /// same-trust-domain, all-unauthenticated.
        #[arg(long, default_value = "deny")]
        default: String,
    },
}

/// Flags of `ward-ca run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// TOML configuration file.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Trust domain (overrides the file).
    #[arg(long)]
    trust_domain: Option<String>,
    /// Data directory (overrides the file).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Node API address (overrides the file).
    #[arg(long)]
    bind_address: Option<std::net::SocketAddr>,
    /// Health/metrics address (overrides the file).
    #[arg(long)]
    health_address: Option<std::net::SocketAddr>,
    /// Admin socket path (overrides the file).
    #[arg(long)]
    admin_socket: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    Text,
    Json,
}

#[derive(Debug, Args)]
struct Conn {
    /// Admin socket of the CA [default: <data-dir>/admin/api.sock].
    #[arg(long, env = "WARD_CA_ADMIN_SOCKET")]
    socket: Option<PathBuf>,
    /// Data directory of the CA, used to find the admin socket.
    #[arg(long, default_value = ".ward")]
    data_dir: PathBuf,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    output: Output,
}

#[derive(Debug, Subcommand)]
enum TokenCmd {
    /// Create a single-use join token.
    Create {
        #[command(flatten)]
        conn: Conn,
        /// Lifetime, e.g. `10m` [default: the CA's ttl.join_token].
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
    },
}

#[derive(Debug, Args)]
struct SpecArgs {
    /// SPIFFE ID to issue.
    #[arg(long)]
    spiffe_id: String,
    /// Agent ID that may serve the entry.
    #[arg(long)]
    parent_id: String,
    /// Selector `type:value` (repeat for several; all must match).
    #[arg(long = "selector", short = 's', required = true)]
    selectors: Vec<String>,
    /// X.509-SVID TTL, e.g. `1h` [default: the CA's].
    #[arg(long, value_parser = parse_duration)]
    x509_svid_ttl: Option<Duration>,
    /// JWT-SVID TTL, e.g. `5m` [default: the CA's].
    #[arg(long, value_parser = parse_duration)]
    jwt_svid_ttl: Option<Duration>,
    /// DNS name SAN (repeat for several).
    #[arg(long = "dns-name")]
    dns_names: Vec<String>,
    /// Hint for workloads with several SVIDs.
    #[arg(long, default_value = "")]
    hint: String,
    /// Mark the entry as admin.
    #[arg(long)]
    admin: bool,
}

#[derive(Debug, Subcommand)]
enum EntryCmd {
    /// Create an entry.
    Create {
        #[command(flatten)]
        conn: Conn,
        #[command(flatten)]
        spec: SpecArgs,
    },
    /// List entries.
    List {
        #[command(flatten)]
        conn: Conn,
        /// Only entries of this parent.
        #[arg(long)]
        parent_id: Option<String>,
        /// Only entries with this SPIFFE ID.
        #[arg(long)]
        spiffe_id: Option<String>,
    },
    /// Show one entry.
    Show {
        #[command(flatten)]
        conn: Conn,
        /// Entry ID.
        id: String,
    },
    /// Replace an entry's fields.
    Update {
        #[command(flatten)]
        conn: Conn,
        /// Entry ID.
        id: String,
        #[command(flatten)]
        spec: SpecArgs,
        /// Apply only if the entry is still at this revision.
        #[arg(long, default_value_t = 0)]
        revision: u64,
    },
    /// Delete an entry.
    Delete {
        #[command(flatten)]
        conn: Conn,
        /// Entry ID.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum AgentCmd {
    /// List attested agents.
    List {
        #[command(flatten)]
        conn: Conn,
    },
    /// Evict an agent: it is refused everything from now on.
    Evict {
        #[command(flatten)]
        conn: Conn,
        /// Agent SPIFFE ID.
        spiffe_id: String,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum AuthorityKind {
    X509,
    Jwt,
}

#[derive(Debug, Subcommand)]
enum AuthorityCmd {
    /// List the authorities with their state, validity and the SVIDs still chained to each.
    Show {
        #[command(flatten)]
        conn: Conn,
    },
    /// Create a successor: published in the bundle at once, not signing yet.
    Prepare {
        #[command(flatten)]
        conn: Conn,
    },
    /// Make the prepared authority sign; the active one becomes old (still trusted).
    Activate {
        #[command(flatten)]
        conn: Conn,
        /// Authority ID [default: the prepared one].
        id: Option<String>,
    },
    /// Have every agent replace, at once, each SVID this (non-active) authority signed.
    Taint {
        #[command(flatten)]
        conn: Conn,
        /// Authority ID.
        id: String,
    },
    /// Remove a (non-active) authority from the bundle: SVIDs chained to it stop working.
    Revoke {
        #[command(flatten)]
        conn: Conn,
        /// Authority ID.
        id: String,
        /// Revoke even though unexpired SVIDs still chain to it.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum BundleFormat {
    Spiffe,
    Pem,
}

#[derive(Debug, Subcommand)]
enum BundleCmd {
    /// Print the trust bundle.
    Show {
        #[command(flatten)]
        conn: Conn,
        /// `spiffe` (JWKS) or `pem`.
        #[arg(long, value_enum, default_value = "spiffe")]
        format: BundleFormat,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    ward_net::duration::parse(s)
}

/// A CLI failure: message and exit code.
#[derive(Debug)]
pub struct CliError {
    /// Exit code.
    pub code: u8,
    /// Message for stderr.
    pub message: String,
}

impl CliError {
    pub(crate) fn new(code: u8, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// Exit code: a listener could not be bound (address in use, or not permitted).
pub const EXIT_CANNOT_LISTEN: u8 = 7;
/// Exit code: the connection was lost during a call that changes state; it may have applied.
pub const EXIT_OUTCOME_UNKNOWN: u8 = 9;

/// What `--help` says about exit codes.
const EXIT_CODES: &str = "Exit codes:
  0  success
  1  internal or unexpected error
  2  invalid argument or usage (the message names the flag or field)
  3  not found
  4  already exists (an identical entry, a used token) or concurrent change
  5  permission denied or not allowed in the current state
  6  CA unreachable: nothing was sent, or a read was cut off
  7  cannot listen: an address or socket is in use or not permitted
  8  policy explain, egress explain: the request would be denied
  9  connection lost during a change: it may have been applied";

/// Maps a gRPC status to the CLI's exit code.
pub fn exit_code(code: Code) -> u8 {
    match code {
        Code::Ok => 0,
        Code::InvalidArgument | Code::OutOfRange => 2,
        Code::NotFound => 3,
        Code::AlreadyExists | Code::Aborted => 4,
        Code::PermissionDenied | Code::Unauthenticated | Code::FailedPrecondition => 5,
        Code::Unavailable => 6,
        _ => 1,
    }
}

/// The admin socket this CLI invocation talks to, for error messages.
static SOCKET: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> Self {
        // A status with a source was made by this client's transport, not sent by the CA: the
        // connection (made before the call) broke while the call was in flight.
        if std::error::Error::source(&s).is_some()
            && matches!(
                s.code(),
                Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal
            )
        {
            let why = error_chain(&s);
            return match CALL.get() {
                Some(Call::Change) => CliError::new(
                    EXIT_OUTCOME_UNKNOWN,
                    format!(
                        "the connection to the CA was lost during the call ({why}); the outcome \
                         is unknown: the change may already have been applied. Check (e.g. \
                         `ward-ca entry list`) before repeating it; a repeated `entry create` \
                         is refused with exit 4 and the ID of the entry that exists"
                    ),
                ),
                _ => CliError::new(
                    6,
                    format!(
                        "the connection to the CA was lost during the call ({why}); nothing was \
                         changed, try again"
                    ),
                ),
            };
        }
        let hint = match (s.code(), SOCKET.get()) {
            (Code::Unavailable, Some(p)) => format!(
                " (cannot reach the CA on admin socket {}: is ward-ca running? set --socket or \
                 --data-dir)",
                p.display()
            ),
            (Code::Unavailable, None) => " (is ward-ca running? set --socket or --data-dir)".into(),
            _ => String::new(),
        };
        CliError::new(exit_code(s.code()), format!("{}{hint}", s.message()))
    }
}

/// Runs the CLI; returns the process exit code.
pub async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if !e.message.is_empty() {
                eprintln!("ward-ca: {}", e.message);
            }
            ExitCode::from(e.code)
        }
    }
}

fn env(k: &str) -> Option<String> {
    std::env::var(k).ok()
}

fn build_config(a: &RunArgs) -> Result<CaConfig, CliError> {
    let bad = |e: &dyn std::fmt::Display| CliError::new(2, e.to_string());
    let mut cfg = match &a.config {
        Some(p) => CaConfig::from_file(p).map_err(|e| bad(&e))?,
        None => {
            let td = a
                .trust_domain
                .clone()
                .or_else(|| env("WARD_CA_TRUST_DOMAIN"))
                .ok_or_else(|| CliError::new(2, "--config or --trust-domain is required"))?;
            let td = TrustDomain::new(&td).map_err(|e| bad(&e))?;
            let dd = a.data_dir.clone().unwrap_or_else(|| PathBuf::from(".ward"));
            CaConfig::new(td, dd)
        }
    };
    cfg.apply_env(&env).map_err(|e| bad(&e))?;
    if let Some(td) = &a.trust_domain {
        cfg.trust_domain = TrustDomain::new(td).map_err(|e| bad(&e))?;
    }
    if let Some(d) = &a.data_dir {
        cfg.data_dir = d.clone();
    }
    if let Some(b) = a.bind_address {
        cfg.bind_address = b;
    }
    if let Some(h) = a.health_address {
        cfg.health_address = h;
    }
    if let Some(s) = &a.admin_socket {
        cfg.admin_socket = Some(s.clone());
    }
    cfg.validate().map_err(|e| bad(&e))?;
    Ok(cfg)
}

async fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Run(a) => {
            let cfg = build_config(&a)?;
            ward_net::process::init_logging(&cfg.log_level, cfg.log_format == LogFormat::Json);
            let server = crate::CaServer::start(cfg)
                .await
                .map_err(|e| CliError::new(e.exit_code(), e.to_string()))?;
            ward_net::process::shutdown_signal().await;
            tracing::info!("shutting down");
            server.shutdown().await;
            Ok(())
        }
        Command::Dev(a) => crate::dev::run(a).await,
        Command::CheckConfig { config } => {
            let cfg = CaConfig::from_file(&config).map_err(|e| CliError::new(2, e.to_string()))?;
            let text = toml::to_string_pretty(&cfg).map_err(|e| CliError::new(1, e.to_string()))?;
            print(&text);
            for w in cfg.warnings() {
                #[allow(clippy::print_stderr)]
                {
                    eprintln!("ward-ca: warning: {w}");
                }
            }
            Ok(())
        }
        Command::Token { cmd } => token(cmd).await,
        Command::Entry { cmd } => entry(cmd).await,
        Command::Agent { cmd } => agent(cmd).await,
        Command::Bundle { cmd } => bundle(cmd).await,
        Command::Policy { cmd } => policy(cmd).await,
        Command::Service { cmd } => services::service(cmd).await,
        Command::Egress { cmd } => egress::egress(cmd).await,
        Command::Authority { kind, cmd } => authority(kind, cmd).await,
        Command::Crds => {
            let yaml = crate::k8s::crd::definitions_yaml().map_err(|e| CliError::new(1, e))?;
            print(&yaml);
            Ok(())
        }
    }
}

fn policy_doc(
    list: &[ward_proto::types::AuthzPolicy],
) -> Result<ward_spiffe::policy::PolicyDoc, CliError> {
    let policies = list
        .iter()
        .map(ward_proto::convert::policy_from_proto)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CliError::new(1, e))?;
    Ok(ward_spiffe::policy::PolicyDoc { policies })
}

fn print_policies(output: Output, list: &[ward_proto::types::AuthzPolicy]) -> Result<(), CliError> {
    let doc = policy_doc(list)?;
    match output {
        Output::Json => {
            json(serde_json::to_value(&doc).map_err(|e| CliError::new(1, e.to_string()))?)
        }
        Output::Text => {
            let y = serde_yaml_ng::to_string(&doc).map_err(|e| CliError::new(1, e.to_string()))?;
            print(y.trim_end());
            Ok(())
        }
    }
}

async fn policy(cmd: PolicyCmd) -> Result<(), CliError> {
    match cmd {
        PolicyCmd::Apply { conn, file } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| CliError::new(2, format!("{}: {e}", file.display())))?;
            let doc: ward_spiffe::policy::PolicyDoc = serde_yaml_ng::from_str(&text)
                .map_err(|e| CliError::new(2, format!("{}: {e}", file.display())))?;
            let policies = doc
                .policies
                .iter()
                .map(|p| ward_proto::convert::policy_to_proto(p, 0))
                .collect();
            let r = client(&conn, Call::Change)
                .await?
                .put_policies(admin::PutPoliciesRequest { policies })
                .await?
                .into_inner();
            match conn.output {
                Output::Json => print_policies(Output::Json, &r.policies),
                Output::Text => {
                    for p in &r.policies {
                        print(&format!(
                            "Applied policy {} (revision {})",
                            p.name, p.revision
                        ));
                    }
                    Ok(())
                }
            }
        }
        PolicyCmd::List { conn } => {
            let r = client(&conn, Call::Read)
                .await?
                .list_policies(admin::ListPoliciesRequest {})
                .await?
                .into_inner();
            print_policies(conn.output, &r.policies)
        }
        PolicyCmd::Show { conn, name } => {
            let p = client(&conn, Call::Read)
                .await?
                .get_policy(admin::GetPolicyRequest { name })
                .await?
                .into_inner();
            print_policies(conn.output, &[p])
        }
        PolicyCmd::Delete { conn, name } => {
            client(&conn, Call::Change)
                .await?
                .delete_policy(admin::DeletePolicyRequest { name: name.clone() })
                .await?;
            match conn.output {
                Output::Json => json(serde_json::json!({ "deleted": name })),
                Output::Text => {
                    print(&format!("Deleted policy {name}"));
                    Ok(())
                }
            }
        }
        PolicyCmd::Explain {
            conn,
            source,
            target,
            method,
            path,
            port,
            default,
        } => {
            let r = client(&conn, Call::Read)
                .await?
                .explain_policy(admin::ExplainPolicyRequest {
                    source: source.unwrap_or_default(),
                    target,
                    method: method.unwrap_or_default(),
                    path: path.unwrap_or_default(),
                    port: u32::from(port),
                    default_policy: default,
                })
                .await?
                .into_inner();
            match conn.output {
                Output::Json => json(serde_json::json!({
                    "decision": if r.allowed { "ALLOW" } else { "DENY" },
                    "reason": r.reason,
                    "policy": r.policy,
                    "rule": r.rule,
                    "audit": r.audit,
                }))?,
                Output::Text => print(r.text.trim_end()),
            }
            if r.allowed {
                Ok(())
            } else {
                Err(CliError::new(8, String::new()))
            }
        }
    }
}

#[allow(clippy::print_stdout)]
fn print(s: &str) {
    println!("{s}");
}

/// Whether an admin call changes the CA's state: decides what a caller is told when the
/// connection is lost during it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Read,
    Change,
}

/// The kind of call this invocation makes, for the message of a call cut off.
static CALL: std::sync::OnceLock<Call> = std::sync::OnceLock::new();

/// Connects to the admin socket before the call, so "could not connect" (nothing sent, exit 6)
/// is told apart from "connection lost during the call" (exit 9 for a change).
async fn client(
    conn: &Conn,
    call: Call,
) -> Result<AdminClient<tonic::transport::Channel>, CliError> {
    let path = conn
        .socket
        .clone()
        .unwrap_or_else(|| conn.data_dir.join("admin").join("api.sock"));
    let _ = SOCKET.set(path.clone());
    let _ = CALL.set(call);
    if !path.exists() {
        return Err(CliError::new(
            6,
            format!(
                "no admin socket at {} (is ward-ca running? set --socket or --data-dir)",
                path.display()
            ),
        ));
    }
    let channel = ward_net::process::unix_channel_connect(&path)
        .await
        .map_err(|e| {
            CliError::new(
                6,
                format!(
                    "cannot connect to the CA on admin socket {}: {} (is ward-ca running? \
                     set --socket or --data-dir); nothing was sent",
                    path.display(),
                    error_chain(&e)
                ),
            )
        })?;
    Ok(AdminClient::new(channel))
}

/// An error with its sources, `a: b: c`.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

fn time(secs: i64) -> String {
    rfc3339(UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64))
}

fn json(v: serde_json::Value) -> Result<(), CliError> {
    let s = serde_json::to_string_pretty(&v).map_err(|e| CliError::new(1, e.to_string()))?;
    print(&s);
    Ok(())
}

async fn token(cmd: TokenCmd) -> Result<(), CliError> {
    let TokenCmd::Create { conn, ttl } = cmd;
    let ttl_seconds = ttl.map_or(0, |d| d.as_secs().clamp(1, u64::from(u32::MAX)) as u32);
    let t = client(&conn, Call::Change)
        .await?
        .create_join_token(admin::CreateJoinTokenRequest { ttl_seconds })
        .await?
        .into_inner();
    match conn.output {
        Output::Json => json(serde_json::json!({
            "token": t.token, "agent_id": t.agent_id, "expires_at": time(t.expires_at),
        })),
        Output::Text => {
            print(&format!(
                "Token:      {}\nAgent ID:   {}\nExpires at: {}",
                t.token,
                t.agent_id,
                time(t.expires_at)
            ));
            Ok(())
        }
    }
}

fn spec(a: SpecArgs) -> admin::EntrySpec {
    let secs =
        |d: Option<Duration>| d.map_or(0, |d| d.as_secs().clamp(1, u64::from(u32::MAX)) as u32);
    admin::EntrySpec {
        spiffe_id: a.spiffe_id,
        parent_id: a.parent_id,
        selectors: a.selectors,
        x509_svid_ttl: secs(a.x509_svid_ttl),
        jwt_svid_ttl: secs(a.jwt_svid_ttl),
        dns_names: a.dns_names,
        hint: a.hint,
        admin: a.admin,
    }
}

fn entry_json(e: &types::Entry) -> serde_json::Value {
    serde_json::json!({
        "id": e.id,
        "spiffe_id": e.spiffe_id,
        "parent_id": e.parent_id,
        "selectors": e.selectors,
        "x509_svid_ttl": e.x509_svid_ttl,
        "jwt_svid_ttl": e.jwt_svid_ttl,
        "dns_names": e.dns_names,
        "hint": e.hint,
        "admin": e.admin,
        "revision": e.revision,
        "created_at": time(e.created_at),
        "origin": e.origin,
    })
}

fn entry_text(e: &types::Entry) -> String {
    let ttl = |s: u32| {
        if s == 0 {
            "default".to_owned()
        } else {
            ward_net::duration::format(Duration::from_secs(u64::from(s)))
        }
    };
    let mut out = format!(
        "Entry ID      : {}\nSPIFFE ID     : {}\nParent ID     : {}\nRevision      : {}\n\
         X509-SVID TTL : {}\nJWT-SVID TTL  : {}\nOrigin        : {}\nCreated at    : {}\n",
        e.id,
        e.spiffe_id,
        e.parent_id,
        e.revision,
        ttl(e.x509_svid_ttl),
        ttl(e.jwt_svid_ttl),
        e.origin,
        time(e.created_at)
    );
    for s in &e.selectors {
        out.push_str(&format!("Selector      : {s}\n"));
    }
    for d in &e.dns_names {
        out.push_str(&format!("DNS name      : {d}\n"));
    }
    if !e.hint.is_empty() {
        out.push_str(&format!("Hint          : {}\n", e.hint));
    }
    if e.admin {
        out.push_str("Admin         : true\n");
    }
    out
}

fn show_entry(output: Output, e: &types::Entry) -> Result<(), CliError> {
    match output {
        Output::Json => json(entry_json(e)),
        Output::Text => {
            print(entry_text(e).trim_end());
            Ok(())
        }
    }
}

async fn entry(cmd: EntryCmd) -> Result<(), CliError> {
    match cmd {
        EntryCmd::Create { conn, spec: s } => {
            let e = client(&conn, Call::Change)
                .await?
                .create_entry(spec(s))
                .await?
                .into_inner();
            show_entry(conn.output, &e)
        }
        EntryCmd::List {
            conn,
            parent_id,
            spiffe_id,
        } => {
            let r = client(&conn, Call::Read)
                .await?
                .list_entries(admin::ListEntriesRequest {
                    parent_id: parent_id.unwrap_or_default(),
                    spiffe_id: spiffe_id.unwrap_or_default(),
                })
                .await?
                .into_inner();
            match conn.output {
                Output::Json => json(serde_json::Value::Array(
                    r.entries.iter().map(entry_json).collect(),
                )),
                Output::Text => {
                    let n = r.entries.len();
                    let body: Vec<String> = r.entries.iter().map(entry_text).collect();
                    print(
                        format!(
                            "Found {n} entr{}\n\n{}",
                            if n == 1 { "y" } else { "ies" },
                            body.join("\n")
                        )
                        .trim_end(),
                    );
                    Ok(())
                }
            }
        }
        EntryCmd::Show { conn, id } => {
            let e = client(&conn, Call::Read)
                .await?
                .get_entry(admin::GetEntryRequest { id })
                .await?
                .into_inner();
            show_entry(conn.output, &e)
        }
        EntryCmd::Update {
            conn,
            id,
            spec: s,
            revision,
        } => {
            let e = client(&conn, Call::Change)
                .await?
                .update_entry(admin::UpdateEntryRequest {
                    id,
                    spec: Some(spec(s)),
                    expected_revision: revision,
                })
                .await?
                .into_inner();
            show_entry(conn.output, &e)
        }
        EntryCmd::Delete { conn, id } => {
            client(&conn, Call::Change)
                .await?
                .delete_entry(admin::DeleteEntryRequest { id: id.clone() })
                .await?;
            match conn.output {
                Output::Json => json(serde_json::json!({ "deleted": id })),
                Output::Text => {
                    print(&format!("Deleted entry {id}"));
                    Ok(())
                }
            }
        }
    }
}

async fn agent(cmd: AgentCmd) -> Result<(), CliError> {
    match cmd {
        AgentCmd::List { conn } => {
            let r = client(&conn, Call::Read)
                .await?
                .list_agents(admin::ListAgentsRequest {})
                .await?
                .into_inner();
            match conn.output {
                Output::Json => json(serde_json::Value::Array(
                    r.agents
                        .iter()
                        .map(|a| {
                            serde_json::json!({
                                "spiffe_id": a.spiffe_id,
                                "attestation_type": a.attestation_type,
                                "selectors": a.selectors,
                                "serial": a.serial,
                                "expires_at": time(a.expires_at),
                                "attested_at": time(a.attested_at),
                                "evicted": a.evicted,
                            })
                        })
                        .collect(),
                )),
                Output::Text => {
                    let mut out = format!("Found {} agent(s)\n", r.agents.len());
                    for a in &r.agents {
                        out.push_str(&format!(
                            "\nSPIFFE ID        : {}\nAttestation type : {}\nSVID serial      : {}\n\
                             SVID expires at  : {}\nAttested at      : {}\nEvicted          : {}\n",
                            a.spiffe_id,
                            a.attestation_type,
                            a.serial,
                            time(a.expires_at),
                            time(a.attested_at),
                            a.evicted
                        ));
                        for s in &a.selectors {
                            out.push_str(&format!("Selector         : {s}\n"));
                        }
                    }
                    print(out.trim_end());
                    Ok(())
                }
            }
        }
        AgentCmd::Evict { conn, spiffe_id } => {
            client(&conn, Call::Change)
                .await?
                .evict_agent(admin::EvictAgentRequest {
                    spiffe_id: spiffe_id.clone(),
                })
                .await?;
            match conn.output {
                Output::Json => json(serde_json::json!({ "evicted": spiffe_id })),
                Output::Text => {
                    print(&format!("Evicted agent {spiffe_id}"));
                    Ok(())
                }
            }
        }
    }
}

fn authority_json(a: &admin::Authority) -> serde_json::Value {
    serde_json::json!({
        "kind": a.kind,
        "id": a.id,
        "state": a.state,
        "not_before": time(a.not_before),
        "not_after": time(a.not_after),
        "upstream": a.upstream,
        "holder": a.holder,
        "live_svids": a.live_svids,
        "live_until": (a.live_until != 0).then(|| time(a.live_until)),
    })
}

fn authority_text(a: &admin::Authority) -> String {
    let live = match a.live_svids {
        0 => "none".to_owned(),
        n => format!("{n} (until {})", time(a.live_until)),
    };
    format!(
        "ID               : {}\nState            : {}\nValid            : {} .. {}\n\
         Upstream         : {}\nHeld by          : {}\nLive SVIDs       : {live}\n",
        a.id,
        a.state,
        time(a.not_before),
        time(a.not_after),
        a.upstream,
        a.holder
    )
}

async fn authority(kind: AuthorityKind, cmd: AuthorityCmd) -> Result<(), CliError> {
    let kind = match kind {
        AuthorityKind::X509 => "x509",
        AuthorityKind::Jwt => "jwt",
    };
    let (conn, action, id, force) = match cmd {
        AuthorityCmd::Show { conn } => {
            let r = client(&conn, Call::Read)
                .await?
                .list_authorities(admin::ListAuthoritiesRequest { kind: kind.into() })
                .await?
                .into_inner();
            return match conn.output {
                Output::Json => json(serde_json::Value::Array(
                    r.authorities.iter().map(authority_json).collect(),
                )),
                Output::Text => {
                    let mut out = format!("Found {} {kind} authorities\n", r.authorities.len());
                    for a in &r.authorities {
                        out.push('\n');
                        out.push_str(&authority_text(a));
                    }
                    print(out.trim_end());
                    Ok(())
                }
            };
        }
        AuthorityCmd::Prepare { conn } => (conn, "prepare", String::new(), false),
        AuthorityCmd::Activate { conn, id } => (conn, "activate", id.unwrap_or_default(), false),
        AuthorityCmd::Taint { conn, id } => (conn, "taint", id, false),
        AuthorityCmd::Revoke { conn, id, force } => (conn, "revoke", id, force),
    };
    let a = client(&conn, Call::Change)
        .await?
        .change_authority(admin::ChangeAuthorityRequest {
            kind: kind.into(),
            action: action.into(),
            id,
            force,
        })
        .await?
        .into_inner();
    match conn.output {
        Output::Json => json(authority_json(&a)),
        Output::Text => {
            print(authority_text(&a).trim_end());
            Ok(())
        }
    }
}

async fn bundle(cmd: BundleCmd) -> Result<(), CliError> {
    let BundleCmd::Show { conn, format } = cmd;
    let b = client(&conn, Call::Read)
        .await?
        .get_bundle(admin::GetBundleRequest {})
        .await?
        .into_inner();
    let bundle = crate::convert::bundle_from_proto(&b).map_err(|e| CliError::new(1, e))?;
    match (format, conn.output) {
        (BundleFormat::Pem, _) => {
            print(bundle.x509_pem().trim_end());
            Ok(())
        }
        (BundleFormat::Spiffe, _) => {
            let s = bundle
                .to_spiffe_json()
                .map_err(|e| CliError::new(1, e.to_string()))?;
            print(&s);
            Ok(())
        }
    }
}
