//! `ward-proxy inject`: adds the Ward sidecar to Kubernetes workloads in a YAML stream.
//!
//! For every Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet, Job and CronJob (also inside
//! `List`s) it adds a `ward-proxy` container whose configuration (in `WARD_PROXY_CONFIG_YAML`)
//! takes the pod's SVID from the agent's Workload API on the node (the host directory holding
//! the agent socket, mounted read-only).
//!
//! **Capture mode** (the default): a `ward-init` init container runs `ward-proxy init`, so every
//! TCP connection to the pod reaches the proxy's inbound capture listener and every connection
//! the application opens reaches its outbound capture listener; the application keeps its
//! ports and Services stay as they are ([`pod`]). The kubelet's HTTP probes of the application
//! are authorized. **Explicit mode** (`--mode explicit`, or `ward.dev/capture: "false"` on a
//! pod template): an inbound mTLS listener in front of each TCP port of the application — port
//! `P` is served on `P + 20000` (named `ward-P`) and forwarded to `127.0.0.1:P` — and Services
//! of the same stream that select the workload and target `P` are pointed at `ward-P`.
//! Explicit outbound listeners come from `ward.dev/outbound`
//! (`<local port>=<host>:<port>@<spiffe id>`, comma-separated) in both modes.
//!
//! Annotations on the pod template: `ward.dev/inject: "false"` skips it;
//! `ward.dev/inbound-ports: "8080,9090"` chooses the ports (explicit mode);
//! `ward.dev/mesh-routes`, `ward.dev/opaque-ports`, `ward.dev/exclude-inbound-ports`,
//! `ward.dev/exclude-outbound-ports`, `ward.dev/exclude-outbound-cidrs` (capture mode). Already
//! injected workloads, and every other document, are left exactly as they were (byte for
//! byte), so the command is idempotent.

mod annotations;
mod pod;

use std::collections::BTreeMap;

use serde_yaml_ng::{Mapping, Value};
use ward_spiffe::policy::DefaultPolicy;

use pod::pod;

pub use pod::{INBOUND_CAPTURE_PORT, INIT_CONTAINER, OUTBOUND_CAPTURE_PORT};

/// Name of the injected container.
pub const CONTAINER: &str = "ward-proxy";
/// Name of the injected volume.
pub const VOLUME: &str = "ward-agent-socket";
/// Where the agent's socket directory is mounted in the sidecar.
pub const SOCKET_MOUNT: &str = "/run/ward";
/// Offset between an application port and its inbound proxy port.
pub const PORT_OFFSET: u32 = 20_000;
/// The sidecar's admin port (`/metrics`, `/healthz`, `/readyz`).
pub const ADMIN_PORT: u16 = 15_020;
/// The uid the sidecar runs as (its connections are never captured; no application container
/// may use it).
pub const PROXY_UID: u32 = 1337;

/// How the application's traffic reaches the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Redirected by the kernel (`ward-proxy init`): no change to the application.
    #[default]
    Capture,
    /// Explicit listeners on `P + 20000`, Services re-pointed at them.
    Explicit,
}

/// What to inject.
#[derive(Debug, Clone)]
pub struct Options {
    /// Sidecar image.
    pub image: String,
    /// Decision when no ALLOW policy targets the workload.
    pub default_policy: DefaultPolicy,
    /// Host directory holding the agent's `agent.sock`.
    pub socket_dir: String,
    /// Capture or explicit.
    pub mode: Mode,
    /// The egress gateway of pods with `ward.dev/egress: enforce`, if any.
    pub egress_gateway: Option<crate::egress::GatewayRef>,
}

/// Injects into every workload of a multi-document YAML stream. Errors name the document.
pub fn inject(input: &str, o: &Options) -> Result<String, String> {
    inject_streams(&[("-", input)], o).map_err(|e| e.trim_start_matches("-: ").to_owned())
}

/// Injects into several streams (files) at once, so a Service in one file is pointed at the
/// proxy of a workload in another; the streams are written one after the other. Errors name
/// the stream and the document.
pub fn inject_streams(inputs: &[(&str, &str)], o: &Options) -> Result<String, String> {
    // (stream, document number, text, parsed)
    let mut docs: Vec<(usize, usize, String, Option<Value>)> = Vec::new();
    for (s, (name, input)) in inputs.iter().enumerate() {
        for (i, chunk) in split(input).into_iter().enumerate() {
            let v: Value = serde_yaml_ng::from_str(&chunk)
                .map_err(|e| format!("{name}: document {}: not YAML: {e}", i + 1))?;
            docs.push((s, i + 1, chunk, (!v.is_null()).then_some(v)));
        }
    }
    let at = |s: usize, n: usize| format!("{}: document {n}", inputs[s].0);
    // Workloads first, collecting the port wiring; then Services.
    let mut wired: Vec<Wiring> = Vec::new();
    let mut changed = vec![false; docs.len()];
    for (i, (s, n, _, v)) in docs.iter_mut().enumerate() {
        if let Some(v) = v {
            changed[i] = workload(v, o, &mut wired).map_err(|e| format!("{}: {e}", at(*s, *n)))?;
        }
    }
    for (i, (_, _, _, v)) in docs.iter_mut().enumerate() {
        if let Some(v) = v {
            changed[i] |= services(v, &wired);
        }
    }
    let mut out = String::new();
    for (i, (s, n, text, v)) in docs.into_iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        match (changed[i], v) {
            (true, Some(v)) => {
                out.push_str(&to_json(v).map_err(|e| format!("{}: {e}", at(s, n)))?);
                out.push('\n');
            }
            _ => {
                out.push_str(text.trim_end_matches(['\n', '\r']));
                out.push_str(if text.contains("\r\n") { "\r\n" } else { "\n" });
            }
        }
    }
    Ok(out)
}

/// A changed document, written as JSON (valid YAML): Kubernetes reads YAML 1.1, where plain
/// `yes`/`on` are booleans and `0400` is octal, while the YAML 1.2 writer would leave such
/// strings unquoted; JSON quotes every string. File modes written in YAML 1.1 octal (parsed
/// here as strings) become their numeric values again.
fn to_json(mut v: Value) -> Result<String, String> {
    fix_modes(&mut v);
    let j: serde_json::Value = serde_yaml_ng::from_value(v).map_err(|e| e.to_string())?;
    serde_json::to_string_pretty(&j).map_err(|e| e.to_string())
}

fn fix_modes(v: &mut Value) {
    match v {
        Value::Mapping(m) => {
            for (k, val) in m.iter_mut() {
                let is_mode = matches!(k.as_str(), Some("defaultMode" | "mode"));
                if is_mode
                    && let Value::String(s) = val
                    && s.len() > 1
                    && s.starts_with('0')
                    && let Ok(n) = u32::from_str_radix(&s[1..], 8)
                {
                    *val = Value::Number(n.into());
                    continue;
                }
                fix_modes(val);
            }
        }
        Value::Sequence(s) => s.iter_mut().for_each(fix_modes),
        Value::Tagged(t) => fix_modes(&mut t.value),
        _ => {}
    }
}

/// Splits a YAML stream at document markers (`---`, with anything after it on the line kept as
/// the start of the next document, and `...`), keeping line endings; drops empty documents.
fn split(input: &str) -> Vec<String> {
    let mut docs = Vec::new();
    let mut cur = String::new();
    for line in input.split_inclusive('\n') {
        let t = line.trim_end_matches(['\n', '\r']);
        if t.trim_end() == "..." {
            docs.push(std::mem::take(&mut cur));
            continue;
        }
        if let Some(rest) = t.strip_prefix("---")
            && (rest.is_empty() || rest.starts_with([' ', '\t']))
        {
            docs.push(std::mem::take(&mut cur));
            let rest = rest.trim_start();
            if !rest.is_empty() {
                cur.push_str(rest);
                cur.push('\n');
            }
            continue;
        }
        cur.push_str(line);
        if !line.ends_with('\n') {
            cur.push('\n');
        }
    }
    docs.push(cur);
    docs.into_iter().filter(|d| !d.trim().is_empty()).collect()
}

/// Where an injected workload's application ports now live.
struct Wiring {
    namespace: Option<String>,
    labels: Mapping,
    /// Application port number and name → proxy port name.
    ports: Vec<(u32, Option<String>, String)>,
}

fn str_of<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

fn workload(v: &mut Value, o: &Options, wired: &mut Vec<Wiring>) -> Result<bool, String> {
    let kind = str_of(v, "kind").unwrap_or("").to_owned();
    let namespace = v
        .get("metadata")
        .and_then(|m| str_of(m, "namespace"))
        .map(str::to_owned);
    let name = format!(
        "{kind} {}",
        v.get("metadata")
            .and_then(|m| str_of(m, "name"))
            .unwrap_or("")
    );
    let template = match kind.as_str() {
        "List" => {
            let mut any = false;
            if let Some(items) = v.get_mut("items").and_then(Value::as_sequence_mut) {
                for item in items {
                    any |= workload(item, o, wired)?;
                }
            }
            return Ok(any);
        }
        "Pod" => Some(v),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
            v.get_mut("spec").and_then(|s| s.get_mut("template"))
        }
        "CronJob" => v
            .get_mut("spec")
            .and_then(|s| s.get_mut("jobTemplate"))
            .and_then(|j| j.get_mut("spec"))
            .and_then(|s| s.get_mut("template")),
        _ => return Ok(false),
    };
    let Some(template) = template else {
        return Err(format!("{}: no pod template", name.trim()));
    };
    // Pods that must finish get a native sidecar (an init container that keeps running and is
    // stopped when the main containers end), so the proxy does not keep them alive.
    let native = matches!(kind.as_str(), "Job" | "CronJob");
    pod(template, namespace, native, o, wired).map_err(|e| format!("{}: {e}", name.trim()))
}

/// Points Services that select an injected workload at its proxy ports.
fn services(v: &mut Value, wired: &[Wiring]) -> bool {
    match str_of(v, "kind") {
        Some("List") => {
            let mut any = false;
            if let Some(items) = v.get_mut("items").and_then(Value::as_sequence_mut) {
                for item in items {
                    any |= services(item, wired);
                }
            }
            any
        }
        Some("Service") => {
            let ns = v
                .get("metadata")
                .and_then(|m| str_of(m, "namespace"))
                .map(str::to_owned);
            let selector: BTreeMap<String, String> = v
                .get("spec")
                .and_then(|s| s.get("selector"))
                .and_then(Value::as_mapping)
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, v)| Some((k.as_str()?.to_owned(), v.as_str()?.to_owned())))
                        .collect()
                })
                .unwrap_or_default();
            if selector.is_empty() {
                return false;
            }
            let Some(w) = wired.iter().find(|w| {
                w.namespace == ns
                    && selector.iter().all(|(k, val)| {
                        w.labels.get(k.as_str()).and_then(Value::as_str) == Some(val.as_str())
                    })
            }) else {
                return false;
            };
            let mut any = false;
            let ports = v
                .get_mut("spec")
                .and_then(|s| s.get_mut("ports"))
                .and_then(Value::as_sequence_mut);
            for p in ports.into_iter().flatten() {
                // targetPort defaults to port.
                let target = p.get("targetPort").or_else(|| p.get("port")).cloned();
                let hit = w.ports.iter().find(|(n, name, _)| match &target {
                    Some(Value::Number(t)) => t.as_u64() == Some(u64::from(*n)),
                    Some(Value::String(t)) => name.as_deref() == Some(t.as_str()),
                    _ => false,
                });
                if let (Some((_, _, proxy)), Some(m)) = (hit, p.as_mapping_mut()) {
                    m.insert("targetPort".into(), Value::String(proxy.clone()));
                    any = true;
                }
            }
            any
        }
        _ => false,
    }
}

fn yaml_value(s: &str) -> Value {
    serde_yaml_ng::from_str(s).unwrap_or(Value::Null)
}
