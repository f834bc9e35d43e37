//! `ward-proxy inject`: adds the Ward sidecar to Kubernetes workloads in a YAML stream.
//!
//! For every Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet, Job and CronJob (also inside
//! `List`s) it adds a `ward-proxy` container whose configuration (in `WARD_PROXY_CONFIG_YAML`)
//! takes the pod's SVID from the agent's Workload API on the node (the host directory holding
//! the agent socket, mounted read-only) and puts an inbound mTLS listener in front of each TCP
//! port of the application: port `P` is served on `P + 20000` (named `ward-P`) and forwarded to
//! `127.0.0.1:P`. Services of the same stream that select the workload and target `P` are
//! pointed at `ward-P`, so in-mesh callers reach the application only through the proxy.
//! Outbound listeners come from the annotation `ward.dev/outbound`
//! (`<local port>=<host>:<port>@<spiffe id>`, comma-separated).
//!
//! Annotations on the pod template: `ward.dev/inject: "false"` skips it,
//! `ward.dev/inbound-ports: "8080,9090"` chooses the ports. Already injected workloads, and every
//! other document, are left exactly as they were (byte for byte), so the command is idempotent.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde_yaml_ng::{Mapping, Value};
use ward_spiffe::SpiffeId;
use ward_spiffe::policy::DefaultPolicy;

use crate::config::{
    AppProtocol, Authorization, IdentitySource, Inbound, Listener, Outbound, Protocol, ProxyConfig,
    TlsMode,
};

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

/// What to inject.
#[derive(Debug, Clone)]
pub struct Options {
    /// Sidecar image.
    pub image: String,
    /// Decision when no ALLOW policy targets the workload.
    pub default_policy: DefaultPolicy,
    /// Host directory holding the agent's `agent.sock`.
    pub socket_dir: String,
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

fn annotation<'a>(template: &'a Value, key: &str) -> Option<&'a str> {
    template
        .get("metadata")
        .and_then(|m| m.get("annotations"))
        .and_then(|a| str_of(a, key))
}

fn pod(
    template: &mut Value,
    namespace: Option<String>,
    native: bool,
    o: &Options,
    wired: &mut Vec<Wiring>,
) -> Result<bool, String> {
    if annotation(template, "ward.dev/inject") == Some("false") {
        return Ok(false);
    }
    let spec = template
        .get("spec")
        .ok_or("pod template without spec")?
        .clone();
    let containers = spec
        .get("containers")
        .and_then(Value::as_sequence)
        .ok_or("pod without containers")?;
    let labels = template
        .get("metadata")
        .and_then(|m| m.get("labels"))
        .and_then(Value::as_mapping)
        .cloned()
        .unwrap_or_default();

    // Application ports (TCP), or the chosen ones.
    let mut app: Vec<(u32, Option<String>)> = Vec::new();
    let init = spec
        .get("initContainers")
        .and_then(Value::as_sequence)
        .cloned()
        .unwrap_or_default();
    for c in containers
        .iter()
        .chain(init.iter().filter(|c| str_of(c, "name") == Some(CONTAINER)))
    {
        if str_of(c, "name") == Some(CONTAINER) {
            // Already injected: record the wiring for Services, change nothing.
            let ports = c
                .get("ports")
                .and_then(Value::as_sequence)
                .map(|ps| {
                    ps.iter()
                        .filter_map(|p| {
                            let n = p.get("containerPort")?.as_u64()? as u32;
                            let name = str_of(p, "name")?;
                            (n > PORT_OFFSET).then(|| (n - PORT_OFFSET, None, name.to_owned()))
                        })
                        .collect()
                })
                .unwrap_or_default();
            wired.push(Wiring {
                namespace,
                labels,
                ports,
            });
            return Ok(false);
        }
        for p in c
            .get("ports")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            let tcp = str_of(p, "protocol").is_none_or(|p| p == "TCP");
            if let Some(n) = p.get("containerPort").and_then(Value::as_u64)
                && tcp
            {
                let n = u16::try_from(n).map_err(|_| format!("containerPort {n} is not a port"))?;
                app.push((u32::from(n), str_of(p, "name").map(str::to_owned)));
            }
        }
    }
    if let Some(list) = annotation(template, "ward.dev/inbound-ports") {
        let mut chosen = Vec::new();
        for p in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let n: u32 = p
                .parse::<u16>()
                .map_err(|_| format!("ward.dev/inbound-ports: {p:?} is not a port"))?
                .into();
            let name = app
                .iter()
                .find(|(a, _)| *a == n)
                .and_then(|(_, n)| n.clone());
            chosen.push((n, name));
        }
        app = chosen;
    }
    app.sort();
    app.dedup_by_key(|(n, _)| *n);
    let mut inbound = Vec::new();
    let mut ports = Vec::new();
    for (p, name) in &app {
        let proxy_port = p + PORT_OFFSET;
        if *p == 0 || proxy_port > 65_535 {
            return Err(format!(
                "port {p}: the proxy serves port P on P+{PORT_OFFSET}, which must be at most \
                 65535; choose ports with ward.dev/inbound-ports"
            ));
        }
        inbound.push(Inbound {
            name: format!("in-{p}"),
            listen: SocketAddr::from(([0, 0, 0, 0], proxy_port as u16)),
            forward_to: format!("127.0.0.1:{p}"),
            protocol: Protocol::Auto,
            tls: TlsMode::Strict,
            app_protocol: AppProtocol::Auto,
        });
        ports.push((*p, name.clone(), format!("ward-{p}")));
    }
    let outbound = match annotation(template, "ward.dev/outbound") {
        Some(a) => outbound(a)?,
        None => Vec::new(),
    };
    let cfg = ProxyConfig {
        identity: IdentitySource::WorkloadApi {
            socket: Some(format!("unix://{SOCKET_MOUNT}/agent.sock")),
            spiffe_id: None,
        },
        admin_address: SocketAddr::from(([0, 0, 0, 0], ADMIN_PORT)),
        listeners: inbound
            .into_iter()
            .map(Listener::Inbound)
            .chain(outbound.into_iter().map(Listener::Outbound))
            .collect(),
        authorization: Authorization {
            default: o.default_policy,
            from_agent: true,
            ..Default::default()
        },
        peer_id_header: "x-ward-peer-id".into(),
        access_log: None,
        log_level: "info".into(),
        drain_timeout: std::time::Duration::from_secs(5),
    };
    let yaml = serde_yaml_ng::to_string(&cfg).map_err(|e| e.to_string())?;
    // The same loader `ward-proxy run` uses must accept it.
    ProxyConfig::from_yaml(&yaml, "injected config").map_err(|e| e.to_string())?;

    let mut container_ports: Vec<Value> = ports
        .iter()
        .map(|(p, _, name)| {
            yaml_value(&format!(
                "{{name: {name}, containerPort: {}, protocol: TCP}}",
                p + PORT_OFFSET
            ))
        })
        .collect();
    container_ports.push(yaml_value(&format!(
        "{{name: ward-admin, containerPort: {ADMIN_PORT}, protocol: TCP}}"
    )));
    let mut sidecar = yaml_value(&format!(
        r#"
name: {CONTAINER}
image: {image}
args: [run]
env:
  - name: WARD_PROXY_CONFIG_YAML
    value: ""
readinessProbe:
  httpGet: {{path: /readyz, port: ward-admin}}
  periodSeconds: 5
livenessProbe:
  httpGet: {{path: /healthz, port: ward-admin}}
  periodSeconds: 10
resources:
  requests: {{cpu: 10m, memory: 16Mi}}
  limits: {{memory: 128Mi}}
securityContext:
  runAsNonRoot: true
  runAsUser: 65532
  runAsGroup: 65532
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities: {{drop: [ALL]}}
volumeMounts:
  - {{name: {VOLUME}, mountPath: {SOCKET_MOUNT}, readOnly: true}}
"#,
        image = serde_json::to_string(&o.image).map_err(|e| e.to_string())?,
    ));
    sidecar["env"][0]["value"] = Value::String(yaml);
    let m = sidecar
        .as_mapping_mut()
        .ok_or("internal: sidecar is not a mapping")?;
    m.insert("ports".into(), Value::Sequence(container_ports));
    if native {
        m.insert("restartPolicy".into(), "Always".into());
    }

    let spec = template
        .get_mut("spec")
        .and_then(Value::as_mapping_mut)
        .ok_or("pod template spec is not a mapping")?;
    let list = if native {
        "initContainers"
    } else {
        "containers"
    };
    spec.entry(list.into())
        .or_insert_with(|| Value::Sequence(Vec::new()))
        .as_sequence_mut()
        .ok_or(format!("{list} is not a list"))?
        .push(sidecar);
    let volumes = spec
        .entry("volumes".into())
        .or_insert_with(|| Value::Sequence(Vec::new()));
    let volumes = volumes.as_sequence_mut().ok_or("volumes is not a list")?;
    if !volumes.iter().any(|v| str_of(v, "name") == Some(VOLUME)) {
        let mut vol = yaml_value(&format!(
            "{{name: {VOLUME}, hostPath: {{type: Directory}}}}"
        ));
        vol["hostPath"]["path"] = Value::String(o.socket_dir.clone());
        volumes.push(vol);
    }
    let meta = template
        .as_mapping_mut()
        .ok_or("pod template is not a mapping")?
        .entry("metadata".into())
        .or_insert_with(|| Value::Mapping(Mapping::new()));
    let annotations = meta
        .as_mapping_mut()
        .ok_or("metadata is not a mapping")?
        .entry("annotations".into())
        .or_insert_with(|| Value::Mapping(Mapping::new()));
    annotations
        .as_mapping_mut()
        .ok_or("annotations is not a mapping")?
        .insert("ward.dev/injected".into(), "true".into());
    wired.push(Wiring {
        namespace,
        labels,
        ports,
    });
    Ok(true)
}

fn yaml_value(s: &str) -> Value {
    serde_yaml_ng::from_str(s).unwrap_or(Value::Null)
}

/// Parses `ward.dev/outbound`: `<local port>=<host>:<port>@<spiffe id>`, comma-separated.
fn outbound(annotation: &str) -> Result<Vec<Outbound>, String> {
    let mut out = Vec::new();
    for item in annotation
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let bad = |why: &str| {
            format!(
                "ward.dev/outbound {item:?}: {why} (want <local port>=<host>:<port>@<spiffe id>)"
            )
        };
        let (local, rest) = item.split_once('=').ok_or_else(|| bad("no '='"))?;
        let (upstream, id) = rest.split_once('@').ok_or_else(|| bad("no '@'"))?;
        let local: u16 = local.trim().parse().map_err(|_| bad("bad local port"))?;
        let (host, port) = upstream
            .rsplit_once(':')
            .ok_or_else(|| bad("no upstream port"))?;
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(bad("bad upstream"));
        }
        let id = SpiffeId::new(id.trim()).map_err(|e| bad(&e.to_string()))?;
        out.push(Outbound {
            name: format!("out-{local}"),
            listen: SocketAddr::from(([127, 0, 0, 1], local)),
            upstream: upstream.to_owned(),
            expected_ids: vec![id],
            protocol: Protocol::Http,
        });
    }
    Ok(out)
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
