//! `ward-ca egress`: the mesh's egress configuration — which external services workloads may
//! reach (`apply -f`, `show`) and "may X reach api.stripe.com:443?" (`explain`).

use std::path::PathBuf;

use clap::Subcommand;
use serde::{Deserialize, Serialize};
use ward_proto::admin;
use ward_spiffe::egress::{EgressDoc, EgressSet};

use super::{Call, CliError, Conn, Output, client, json, print};

/// An egress file: `egress: { default, namespaces, services }`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EgressFile {
    egress: EgressDoc,
}

#[derive(Debug, Subcommand)]
pub(super) enum EgressCmd {
    /// Replace the egress configuration with a YAML file's (`egress: {...}`); checked first, a
    /// refused file changes nothing.
    Apply {
        #[command(flatten)]
        conn: Conn,
        /// The egress file.
        #[arg(long, short)]
        file: PathBuf,
    },
    /// Show the configuration in force (YAML, or JSON with -o json).
    Show {
        #[command(flatten)]
        conn: Conn,
    },
    /// Whether a workload may reach a destination outside the mesh (exit 8 when not).
    Explain {
        #[command(flatten)]
        conn: Conn,
        /// The workload's SPIFFE ID; omit for an unidentified one.
        #[arg(long)]
        source: Option<String>,
        /// What it sends: tls (the host is the SNI), http (the Host) or tcp.
        #[arg(long, default_value = "tls")]
        protocol: String,
        /// The name asked for.
        #[arg(long)]
        host: Option<String>,
        /// The address dialled (for services by address).
        #[arg(long)]
        address: Option<String>,
        /// The port.
        #[arg(long)]
        port: u16,
    },
}

fn to_doc(m: &ward_proto::types::EgressConfig) -> Result<serde_json::Value, CliError> {
    let d = ward_proto::convert::egress_from_proto(m).map_err(|e| CliError::new(1, e))?;
    let mut v = serde_json::to_value(&d).map_err(|e| CliError::new(1, e.to_string()))?;
    v["revision"] = m.revision.into();
    Ok(serde_json::json!({ "egress": v }))
}

fn show(output: Output, m: &ward_proto::types::EgressConfig) -> Result<(), CliError> {
    let d = to_doc(m)?;
    match output {
        Output::Json => json(d),
        Output::Text => {
            let y = serde_yaml_ng::to_string(&d).map_err(|e| CliError::new(1, e.to_string()))?;
            print(y.trim_end());
            Ok(())
        }
    }
}

pub(super) async fn egress(cmd: EgressCmd) -> Result<(), CliError> {
    match cmd {
        EgressCmd::Apply { conn, file } => {
            let bad = |e: String| CliError::new(2, format!("{}: {e}", file.display()));
            let text = std::fs::read_to_string(&file).map_err(|e| bad(e.to_string()))?;
            let f: EgressFile = serde_yaml_ng::from_str(&text).map_err(|e| bad(e.to_string()))?;
            EgressSet::compile(f.egress.clone()).map_err(|e| bad(e.to_string()))?;
            let r = client(&conn, Call::Change)
                .await?
                .put_egress(ward_proto::convert::egress_to_proto(&f.egress, 0))
                .await?
                .into_inner();
            match conn.output {
                Output::Json => show(Output::Json, &r),
                Output::Text => {
                    print(&format!(
                        "Applied egress (revision {}, {} external services, default {})",
                        r.revision,
                        r.services.len(),
                        r.default_mode
                    ));
                    Ok(())
                }
            }
        }
        EgressCmd::Show { conn } => {
            let r = client(&conn, Call::Read)
                .await?
                .get_egress(admin::GetEgressRequest {})
                .await?
                .into_inner();
            show(conn.output, &r)
        }
        EgressCmd::Explain {
            conn,
            source,
            protocol,
            host,
            address,
            port,
        } => {
            let r = client(&conn, Call::Read)
                .await?
                .explain_egress(admin::ExplainEgressRequest {
                    source: source.unwrap_or_default(),
                    protocol,
                    host: host.unwrap_or_default(),
                    address: address.unwrap_or_default(),
                    port: u32::from(port),
                })
                .await?
                .into_inner();
            match conn.output {
                Output::Json => json(serde_json::json!({
                    "decision": if r.allowed { "ALLOW" } else { "DENY" },
                    "service": r.service,
                    "reason": r.reason,
                    "resolves": r.resolves,
                }))?,
                Output::Text => {
                    let mut t = format!(
                        "decision: {}\nreason:   {}",
                        if r.allowed { "ALLOW" } else { "DENY" },
                        r.reason
                    );
                    if !r.service.is_empty() {
                        t.push_str(&format!("\nservice:  {}", r.service));
                    }
                    if !r.resolves.is_empty() {
                        t.push_str(&format!(
                            "\nreached:  at the proxy's own resolution of {}",
                            r.resolves
                        ));
                    }
                    print(&t);
                }
            }
            if r.allowed {
                Ok(())
            } else {
                Err(CliError::new(8, String::new()))
            }
        }
    }
}
