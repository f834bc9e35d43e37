//! The `ward-proxy` command line: `run`, `init`, `check-config`, `inject`, `policy explain`,
//! `log verify`.
//!
//! Exit codes: 0 success (for `policy explain`: the request would be allowed); 1 runtime
//! failure, or `log verify` found a broken chain; 2 invalid configuration, policy file or
//! arguments; 4 `init` lacks CAP_NET_ADMIN; 8 `policy explain`: the request would be denied
//! (as `ward-ca policy explain`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use ward_spiffe::SpiffeId;
use ward_spiffe::policy::{DefaultPolicy, PolicySet, Request};

use crate::config::ProxyConfig;

/// ward-proxy: Ward's mutual-TLS sidecar.
#[derive(Debug, Parser)]
#[command(name = "ward-proxy", version, about, after_help = EXIT_CODES)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// What `--help` says about exit codes.
const EXIT_CODES: &str = "Exit codes:
  0  success (policy explain: allowed)
  1  runtime failure; log verify: the chain is broken
  2  invalid configuration, policy file or arguments
  4  init: no CAP_NET_ADMIN in this network namespace
  8  policy explain: denied";

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum InjectMode {
    Capture,
    Explicit,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Default {
    Deny,
    AllAuthenticated,
    SameTrustDomain,
    AllUnauthenticated,
}

impl From<Default> for DefaultPolicy {
    fn from(d: Default) -> Self {
        match d {
            Default::Deny => DefaultPolicy::Deny,
            Default::AllAuthenticated => DefaultPolicy::AllAuthenticated,
            Default::SameTrustDomain => DefaultPolicy::SameTrustDomain,
            Default::AllUnauthenticated => DefaultPolicy::AllUnauthenticated,
        }
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        /// YAML configuration file.
        #[arg(long, short, required_unless_present = "config_yaml")]
        config: Option<PathBuf>,
        /// The configuration itself, as YAML (what `inject` sets).
        #[arg(long, env = "WARD_PROXY_CONFIG_YAML", hide_env_values = true)]
        config_yaml: Option<String>,
    },
    /// Add the Ward sidecar to the Kubernetes workloads of YAML streams (files or stdin) and
    /// print the result; other documents and already injected workloads are left as they were.
    Inject {
        /// Input files ('-' or none: stdin).
        #[arg(long = "filename", short = 'f')]
        files: Vec<PathBuf>,
        /// Sidecar image.
        #[arg(long, default_value = concat!("ghcr.io/ward-dev/ward-proxy:", env!("CARGO_PKG_VERSION")))]
        image: String,
        /// Decision when no ALLOW policy targets the workload.
        #[arg(long, value_enum, default_value = "same-trust-domain")]
        default_policy: Default,
        /// Host directory holding the agent socket (the chart's agent.socketDir).
        #[arg(long, default_value = "/run/ward")]
        socket_dir: String,
        /// capture: a ward-init container redirects all traffic through the proxy (the app and
        /// its Services stay as they are); explicit: listeners on P+20000 and Services pointed
        /// at them (a pod can also opt out with ward.dev/capture: "false").
        #[arg(long, value_enum, default_value = "capture")]
        mode: InjectMode,
        /// Pods with ward.dev/egress: enforce send every destination outside the mesh through
        /// this egress gateway: `<host:port>=<gateway SPIFFE ID>`.
        #[arg(long)]
        egress_gateway: Option<String>,
    },
    /// Install (or with --remove, remove) the rules that send every TCP connection of this
    /// network namespace through the proxy: inbound to the inbound capture port, outbound
    /// (except the proxy's own, loopback and exclusions) to the outbound capture port. Run once
    /// per pod, as root with NET_ADMIN (an init container). Running it again changes nothing.
    Init(InitArgs),
    /// Validate a configuration file (and its policy files) and print it with defaults.
    CheckConfig {
        /// YAML configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Authorization policies.
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// The access log.
    Log {
        #[command(subcommand)]
        cmd: LogCmd,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCmd {
    /// Can SOURCE call TARGET? Prints the decision, the deciding policy and rule, and why the
    /// other rules did not match.
    Explain {
        /// Proxy config whose policy files and default to use.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Policy files (in addition to the config's).
        #[arg(long = "policies")]
        policies: Vec<PathBuf>,
        /// Default when no ALLOW policy targets the workload [default: the config's, or deny].
        #[arg(long, value_enum)]
        default: Option<Default>,
        /// Caller SPIFFE ID; omit for an unauthenticated caller.
        #[arg(long)]
        source: Option<String>,
        /// Destination workload SPIFFE ID.
        #[arg(long)]
        target: String,
        /// HTTP method; omit (with --path) for a TCP connection.
        #[arg(long)]
        method: Option<String>,
        /// Request path.
        #[arg(long)]
        path: Option<String>,
        /// Destination port.
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
}

/// Flags of `ward-proxy init`.
#[derive(Debug, clap::Args)]
struct InitArgs {
    /// Print the nftables script instead of installing it.
    #[arg(long)]
    dry_run: bool,
    /// Remove the rules (the pod is reachable around the proxy again).
    #[arg(long)]
    remove: bool,
    /// The proxy's inbound capture port.
    #[arg(long, default_value_t = 15006)]
    inbound_port: u16,
    /// The proxy's outbound capture port.
    #[arg(long, default_value_t = 15001)]
    outbound_port: u16,
    /// The uid the proxy runs as; its own connections are never captured. No application
    /// container may run as this uid.
    #[arg(long, default_value_t = 1337)]
    proxy_uid: u32,
    /// The proxy's admin port (probes of the proxy itself, metrics): never captured.
    #[arg(long, default_value_t = 15020)]
    admin_port: u16,
    /// Inbound ports that reach the application directly, e.g. 22,9090.
    #[arg(long, value_delimiter = ',')]
    exclude_inbound_ports: Vec<u16>,
    /// Outbound destination ports left alone, e.g. 53.
    #[arg(long, value_delimiter = ',')]
    exclude_outbound_ports: Vec<u16>,
    /// Outbound destinations left alone, e.g. 169.254.169.254/32,10.96.0.1.
    #[arg(long, value_delimiter = ',')]
    exclude_outbound_cidrs: Vec<ward_spiffe::cidr::Cidr>,
    /// Do not capture inbound connections.
    #[arg(long)]
    no_inbound: bool,
    /// Do not capture outbound connections.
    #[arg(long)]
    no_outbound: bool,
    /// The nft binary.
    #[arg(long, default_value = "nft")]
    nft: String,
}

fn init(a: InitArgs) -> ExitCode {
    use crate::capture::rules;
    let script = if a.remove {
        rules::remove_script()
    } else {
        rules::install_script(&rules::Options {
            inbound_port: a.inbound_port,
            outbound_port: a.outbound_port,
            proxy_uid: a.proxy_uid,
            inbound: !a.no_inbound,
            outbound: !a.no_outbound,
            exclude_inbound_ports: a.exclude_inbound_ports,
            exclude_outbound_ports: a.exclude_outbound_ports,
            exclude_outbound_cidrs: a.exclude_outbound_cidrs,
            admin_port: a.admin_port,
        })
    };
    if a.dry_run {
        #[allow(clippy::print_stdout)]
        {
            print!("{script}");
        }
        return ExitCode::SUCCESS;
    }
    match crate::capture::apply(&a.nft, &script) {
        Ok(()) => {
            eprintln!(
                "ward-proxy: {} (nft list table inet {} shows them)",
                if a.remove {
                    "capture rules removed"
                } else {
                    "capture rules installed"
                },
                rules::TABLE
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(e.exit_code(), &e),
    }
}

#[derive(Debug, Subcommand)]
enum LogCmd {
    /// Check an access-log file: its hash chain, where it begins and ends, and its signed
    /// anchors; reports the first broken or missing record and how many records after the
    /// last signed anchor are unproven.
    Verify {
        /// The JSON-lines files, oldest first: a rotated file and the ones after it (each
        /// must continue the one before).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The trust bundle (PEM X.509 authorities) the anchors' signers must chain to.
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// Also fail (exit 1) unless the file ends with a signed close anchor, every record
        /// is covered by a signed anchor and (with --bundle) the signers are trusted.
        #[arg(long)]
        strict: bool,
    },
}

/// `--egress-gateway <host:port>=<spiffe id>`.
fn parse_gateway(s: &str) -> Result<crate::egress::GatewayRef, String> {
    let bad = |why: &str| format!("--egress-gateway {s:?}: {why} (want <host:port>=<spiffe id>)");
    let (addr, id) = s.split_once('=').ok_or_else(|| bad("no '='"))?;
    crate::config::host_port(addr).map_err(|e| bad(&e))?;
    let id = ward_spiffe::SpiffeId::new(id.trim()).map_err(|e| bad(&e.to_string()))?;
    Ok(crate::egress::GatewayRef {
        address: addr.trim().to_owned(),
        expected_ids: vec![id],
    })
}

fn read_stdin() -> String {
    let mut s = String::new();
    let _ = std::io::Read::read_to_string(&mut std::io::stdin(), &mut s);
    s
}

fn env(k: &str) -> Option<String> {
    std::env::var(k).ok()
}

#[allow(clippy::print_stdout)]
fn out(s: &str) {
    println!("{s}");
}

fn fail(code: u8, e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("ward-proxy: {e}");
    ExitCode::from(code)
}

/// Runs the CLI.
pub async fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Run {
            config,
            config_yaml,
        } => {
            let loaded = match (&config, &config_yaml) {
                (Some(path), _) => ProxyConfig::from_file(path),
                (None, Some(text)) => ProxyConfig::from_yaml(text, "WARD_PROXY_CONFIG_YAML"),
                (None, None) => return fail(2, &"--config or WARD_PROXY_CONFIG_YAML is required"),
            };
            let mut cfg = match loaded {
                Ok(c) => c,
                Err(e) => return fail(2, &e),
            };
            if let Err(e) = cfg.apply_env(&env) {
                return fail(2, &e);
            }
            ward_net::process::init_logging(&cfg.log_level, false);
            let proxy = match crate::Proxy::start(cfg).await {
                Ok(p) => p,
                Err(e @ crate::server::StartError::Policy(_)) => return fail(2, &e),
                Err(e) => return fail(1, &e),
            };
            ward_net::process::shutdown_signal().await;
            tracing::info!("shutting down");
            proxy.shutdown().await;
            ExitCode::SUCCESS
        }
        Command::Inject {
            files,
            image,
            default_policy,
            socket_dir,
            mode,
            egress_gateway,
        } => {
            let egress_gateway = match egress_gateway.as_deref().map(parse_gateway).transpose() {
                Ok(g) => g,
                Err(e) => return fail(2, &e),
            };
            let opts = crate::inject::Options {
                egress_gateway,
                image,
                default_policy: default_policy.into(),
                socket_dir,
                mode: match mode {
                    InjectMode::Capture => crate::inject::Mode::Capture,
                    InjectMode::Explicit => crate::inject::Mode::Explicit,
                },
            };
            let inputs: Vec<(String, String)> = if files.is_empty() {
                vec![("-".into(), read_stdin())]
            } else {
                let mut v = Vec::new();
                for f in &files {
                    if f.as_os_str() == "-" {
                        v.push(("-".into(), read_stdin()));
                        continue;
                    }
                    match std::fs::read_to_string(f) {
                        Ok(t) => v.push((f.display().to_string(), t)),
                        Err(e) => return fail(2, &format!("{}: {e}", f.display())),
                    }
                }
                v
            };
            let streams: Vec<(&str, &str)> = inputs
                .iter()
                .map(|(n, t)| (n.as_str(), t.as_str()))
                .collect();
            match crate::inject::inject_streams(&streams, &opts) {
                Ok(out) => {
                    #[allow(clippy::print_stdout)]
                    {
                        print!("{out}");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(2, &e),
            }
        }
        Command::Init(a) => init(a),
        Command::CheckConfig { config } => {
            let cfg = match ProxyConfig::from_file(&config) {
                Ok(c) => c,
                Err(e) => return fail(2, &e),
            };
            if let Err(e) = crate::authz::read_policy_files(&cfg.authorization.policy_files)
                .and_then(|p| PolicySet::compile(p).map_err(|e| e.to_string()))
            {
                return fail(2, &e);
            }
            match serde_yaml_ng::to_string(&cfg) {
                Ok(t) => {
                    out(t.trim_end());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(1, &e),
            }
        }
        Command::Policy { cmd } => explain(cmd),
        Command::Log {
            cmd:
                LogCmd::Verify {
                    files,
                    bundle,
                    strict,
                },
        } => verify(&files, bundle.as_deref(), strict),
    }
}

fn explain(cmd: PolicyCmd) -> ExitCode {
    let PolicyCmd::Explain {
        config,
        policies,
        default,
        source,
        target,
        method,
        path,
        port,
        output,
    } = cmd;
    let mut files = policies;
    let mut dflt = DefaultPolicy::Deny;
    if let Some(c) = &config {
        match ProxyConfig::from_file(c) {
            Ok(cfg) => {
                files.splice(0..0, cfg.authorization.policy_files.clone());
                dflt = cfg.authorization.default;
            }
            Err(e) => return fail(2, &e),
        }
    }
    if let Some(d) = default {
        dflt = d.into();
    }
    let set = match crate::authz::read_policy_files(&files)
        .and_then(|p| PolicySet::compile(p).map_err(|e| e.to_string()))
    {
        Ok(s) => s,
        Err(e) => return fail(2, &e),
    };
    let src = match source.as_deref().map(SpiffeId::new).transpose() {
        Ok(s) => s,
        Err(e) => return fail(2, &format!("--source: {e}")),
    };
    let dst = match SpiffeId::new(&target) {
        Ok(t) => t,
        Err(e) => return fail(2, &format!("--target: {e}")),
    };
    let norm = match path
        .as_deref()
        .map(ward_spiffe::policy::path::normalize)
        .transpose()
    {
        Ok(p) => p,
        Err(e) => {
            let msg = format!("decision: DENY\nreason:   ambiguous request path: {e}");
            return report(
                output,
                false,
                &msg,
                serde_json::json!({ "decision": "DENY", "reason": format!("ambiguous request path: {e}") }),
            );
        }
    };
    let req = Request {
        source: src.as_ref(),
        target: &dst,
        method: method.as_deref(),
        path: norm.as_deref().or(method.as_ref().map(|_| "/")),
        port,
    };
    let e = set.explain(&req, dflt);
    let json = serde_json::json!({
        "decision": if e.verdict.allowed { "ALLOW" } else { "DENY" },
        "reason": e.verdict.describe(),
        "policy": e.verdict.policy.as_deref(),
        "rule": e.verdict.rule,
        "audit": e.verdict.audit.as_deref(),
        "policies": e.policies.iter().map(|p| serde_json::json!({
            "name": p.name,
            "action": format!("{:?}", p.action).to_uppercase(),
            "rules": p.rules.iter().map(|r| r.map_or("matched".to_owned(), |m| m.to_string())).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    });
    report(output, e.verdict.allowed, e.to_string().trim_end(), json)
}

fn report(output: Output, allowed: bool, text: &str, json: serde_json::Value) -> ExitCode {
    match output {
        Output::Text => out(text),
        Output::Json => out(&serde_json::to_string_pretty(&json).unwrap_or_default()),
    }
    if allowed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(8)
    }
}

fn verify(files: &[PathBuf], bundle: Option<&std::path::Path>, strict: bool) -> ExitCode {
    let trust = match bundle {
        None => None,
        Some(b) => match std::fs::read(b)
            .map_err(|e| e.to_string())
            .and_then(|pem| ward_spiffe::bundle::pem_certificates(&pem).map_err(|e| e.to_string()))
        {
            Ok(roots) if !roots.is_empty() => Some(crate::access_log::Trust {
                roots: roots
                    .into_iter()
                    .map(rustls_pki_types::CertificateDer::from)
                    .collect(),
            }),
            Ok(_) => return fail(2, &format!("{}: no certificates", b.display())),
            Err(e) => return fail(2, &format!("{}: {e}", b.display())),
        },
    };
    let mut after: Option<String> = None;
    for file in files {
        match verify_file(file, trust.as_ref(), strict, after.as_deref()) {
            Ok(last) => after = last,
            Err(code) => return code,
        }
    }
    ExitCode::SUCCESS
}

/// Verifies one file (which must continue the file whose last line hashes to `after`, when
/// given) and prints what it found; the hash of its last line, or the exit code to stop with.
fn verify_file(
    file: &std::path::Path,
    trust: Option<&crate::access_log::Trust>,
    strict: bool,
    after: Option<&str>,
) -> Result<Option<String>, ExitCode> {
    let r = match crate::access_log::verify_with(file, trust) {
        Ok(r) => r,
        Err(e) => return Err(fail(2, &format!("{}: {e}", file.display()))),
    };
    let mut text = format!("{}: {} records", file.display(), r.lines);
    if r.dropped > 0 {
        text.push_str(&format!(
            ", {} dropped by the proxy (reported in the log)",
            r.dropped
        ));
    }
    if let Some(h) = &r.starts_after {
        text.push_str(&format!("\nchain starts after: {h}"));
    }
    if let Some(h) = &r.last_hash {
        text.push_str(&format!("\nlast record hash:   {h}"));
    }
    text.push_str(&format!(
        "\nsigned anchors:     {} by {} ({})",
        r.signed_anchors,
        if r.signers.is_empty() {
            "nobody".to_owned()
        } else {
            r.signers.join(", ")
        },
        if r.bundle_checked {
            "signers chain to the bundle"
        } else {
            "signatures checked, signers not checked against a bundle: give --bundle"
        }
    ));
    if let Some((line, why)) = &r.broken {
        out(&format!("{text}\nBROKEN at line {line}: {why}"));
        return Err(ExitCode::from(1));
    }
    if let Some(prev) = after
        && r.starts_after.as_deref() != Some(prev)
    {
        out(&format!(
            "{text}\nBROKEN at line 1: the file does not continue the one before it \
             (a file between them is missing, or one was replaced)"
        ));
        return Err(ExitCode::from(1));
    }
    let mut proven = true;
    if r.unproven > 0 {
        proven = false;
        text.push_str(&format!(
            "\nUNPROVEN: {} records after the last signed anchor (the proxy is still writing \
             or stopped without closing, or the end was cut, replaced or appended to)",
            r.unproven
        ));
    }
    if r.closed {
        text.push_str("\nclosed: the file ends with a signed close anchor");
    } else {
        proven = false;
        text.push_str("\nnot closed: no signed close anchor at the end");
    }
    if strict && (!proven || !r.bundle_checked) {
        out(&format!(
            "{text}\nFAILED (--strict): {}",
            if r.bundle_checked {
                "not every record is proven by a signed anchor"
            } else {
                "--strict needs --bundle"
            }
        ));
        return Err(ExitCode::from(1));
    }
    out(&format!("{text}\nOK: hash chain intact"));
    Ok(r.last_hash)
}
