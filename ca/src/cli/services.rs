//! `ward-ca service`: mesh services for hosts without Kubernetes (in a cluster the controller
//! keeps them from Services and EndpointSlices).

use std::path::PathBuf;

use clap::Subcommand;
use serde::{Deserialize, Serialize};
use ward_proto::admin;
use ward_spiffe::service::Service;

use super::{Call, CliError, Conn, Output, client, json, print};

/// A services file: `services: [...]`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServicesDoc {
    services: Vec<Service>,
}

#[derive(Debug, Subcommand)]
pub(super) enum ServiceCmd {
    /// Create or replace the services of a YAML file (`services: [...]`), all or none.
    Apply {
        #[command(flatten)]
        conn: Conn,
        /// The services file.
        #[arg(long, short)]
        file: PathBuf,
    },
    /// List services (YAML, or JSON with -o json).
    List {
        #[command(flatten)]
        conn: Conn,
    },
    /// Delete a service.
    Delete {
        #[command(flatten)]
        conn: Conn,
        /// Service name.
        name: String,
    },
}

fn doc(list: &[ward_proto::types::Service]) -> Result<serde_json::Value, CliError> {
    let services: Vec<serde_json::Value> = list
        .iter()
        .map(|m| {
            let s = ward_proto::convert::service_from_proto(m).map_err(|e| CliError::new(1, e))?;
            let mut v = serde_json::to_value(&s).map_err(|e| CliError::new(1, e.to_string()))?;
            v["revision"] = m.revision.into();
            v["origin"] = m.origin.clone().into();
            Ok(v)
        })
        .collect::<Result<_, CliError>>()?;
    Ok(serde_json::json!({ "services": services }))
}

fn show(output: Output, list: &[ward_proto::types::Service]) -> Result<(), CliError> {
    let d = doc(list)?;
    match output {
        Output::Json => json(d),
        Output::Text => {
            let y = serde_yaml_ng::to_string(&d).map_err(|e| CliError::new(1, e.to_string()))?;
            print(y.trim_end());
            Ok(())
        }
    }
}

pub(super) async fn service(cmd: ServiceCmd) -> Result<(), CliError> {
    match cmd {
        ServiceCmd::Apply { conn, file } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| CliError::new(2, format!("{}: {e}", file.display())))?;
            let d: ServicesDoc = serde_yaml_ng::from_str(&text)
                .map_err(|e| CliError::new(2, format!("{}: {e}", file.display())))?;
            for s in &d.services {
                s.validate()
                    .map_err(|e| CliError::new(2, format!("{}: {e}", file.display())))?;
            }
            let services = d
                .services
                .iter()
                .map(|s| ward_proto::convert::service_to_proto(s, 0, ""))
                .collect();
            let r = client(&conn, Call::Change)
                .await?
                .put_services(admin::PutServicesRequest { services })
                .await?
                .into_inner();
            match conn.output {
                Output::Json => show(Output::Json, &r.services),
                Output::Text => {
                    for s in &r.services {
                        print(&format!(
                            "Applied service {} (revision {}, {} endpoints)",
                            s.name,
                            s.revision,
                            s.endpoints.len()
                        ));
                    }
                    Ok(())
                }
            }
        }
        ServiceCmd::List { conn } => {
            let r = client(&conn, Call::Read)
                .await?
                .list_services(admin::ListServicesRequest {})
                .await?
                .into_inner();
            show(conn.output, &r.services)
        }
        ServiceCmd::Delete { conn, name } => {
            client(&conn, Call::Change)
                .await?
                .delete_service(admin::DeleteServiceRequest { name: name.clone() })
                .await?;
            match conn.output {
                Output::Json => json(serde_json::json!({ "deleted": name })),
                Output::Text => {
                    print(&format!("Deleted service {name}"));
                    Ok(())
                }
            }
        }
    }
}
