//! What `inject` adds to one pod template: the sidecar container and its configuration, and
//! in capture mode (the default) the `ward-init` init container that installs the redirection
//! rules, so the application needs no change and is reachable only through its proxy.

use std::net::SocketAddr;

use serde_yaml_ng::{Mapping, Value};

use super::annotations::{self, annotation};
use super::{
    ADMIN_PORT, CONTAINER, Mode, Options, PORT_OFFSET, PROXY_UID, SOCKET_MOUNT, VOLUME, Wiring,
    str_of, yaml_value,
};
use crate::config::{
    AppProtocol, Authorization, IdentitySource, Inbound, InboundCapture, Listener, OutboundCapture,
    PortMode, Probe, Protocol, ProxyConfig, TlsMode, UnknownDestination,
};

/// The inbound capture port.
pub const INBOUND_CAPTURE_PORT: u16 = 15_006;
/// The outbound capture port.
pub const OUTBOUND_CAPTURE_PORT: u16 = 15_001;
/// Name of the init container.
pub const INIT_CONTAINER: &str = "ward-init";

/// Adds the sidecar (and, in capture mode, the init container) to one pod template.
pub(super) fn pod(
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
    // A hostNetwork pod shares the node's network namespace: rules installed there would
    // capture the node's own traffic (the kubelet's, sshd's) and outlive the pod. Such pods
    // get explicit listeners instead.
    let host_network = spec.get("hostNetwork").and_then(Value::as_bool) == Some(true);
    let capture = o.mode == Mode::Capture
        && annotation(template, "ward.dev/capture") != Some("false")
        && !host_network;
    // Captured pods always get a native sidecar (an init container that keeps running, started
    // right after ward-init): their own init containers' connections are redirected too, so
    // the proxy must run before them, and the application starts only once it is ready.
    let native = native || capture;
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
    for (p, name) in app.iter().filter(|_| !capture) {
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
        Some(a) => annotations::outbound(a)?,
        None => Vec::new(),
    };
    let mut listeners: Vec<Listener> = inbound.into_iter().map(Listener::Inbound).collect();
    if capture {
        refuse_proxy_uid(&spec)?;
        listeners.extend(capture_listeners(template, &spec)?);
    }
    listeners.extend(outbound.into_iter().map(Listener::Outbound));
    let cfg = ProxyConfig {
        identity: IdentitySource::WorkloadApi {
            socket: Some(format!("unix://{SOCKET_MOUNT}/agent.sock")),
            spiffe_id: None,
        },
        admin_address: SocketAddr::from(([0, 0, 0, 0], ADMIN_PORT)),
        listeners,
        authorization: Authorization {
            default: o.default_policy,
            from_agent: true,
            ..Default::default()
        },
        peer_id_header: "x-ward-peer-id".into(),
        access_log: None,
        log_level: "info".into(),
        drain_timeout: std::time::Duration::from_secs(5),
        // Captured pods call Services by ClusterIP or name: balanced through discovery.
        discovery: capture.then(crate::config::DiscoveryCfg::default),
        // Enforced egress follows the CA's configuration; names resolve with the pod's DNS.
        egress: (capture && egress_enforced(template)?).then(|| crate::egress::EgressCfg {
            dns: None,
            policy: Default::default(),
            from_agent: true,
            gateway: o.egress_gateway.clone(),
            origination_roots: None,
        }),
        http_limits: Default::default(),
        gateway: None,
        connection_limits: Default::default(),
        mesh_tls12: false,
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
  runAsUser: {PROXY_UID}
  runAsGroup: {PROXY_UID}
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
    if capture {
        m.insert(
            "startupProbe".into(),
            yaml_value(
                "{httpGet: {path: /readyz, port: ward-admin}, periodSeconds: 1, failureThreshold: 120}",
            ),
        );
    }

    let init = if capture {
        Some(init_container(template_annotations(template), &o.image)?)
    } else {
        None
    };
    let spec = template
        .get_mut("spec")
        .and_then(Value::as_mapping_mut)
        .ok_or("pod template spec is not a mapping")?;
    let list = if native {
        "initContainers"
    } else {
        "containers"
    };
    let seq = spec
        .entry(list.into())
        .or_insert_with(|| Value::Sequence(Vec::new()))
        .as_sequence_mut()
        .ok_or(format!("{list} is not a list"))?;
    match init {
        // The rules exist before any other container starts (init containers run first, in
        // order, and ward-init goes in front), and the proxy runs right after them.
        Some(init) => {
            seq.insert(0, init);
            seq.insert(1, sidecar);
        }
        None => seq.push(sidecar),
    }
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
    // Captured pods are reached on their own ports: Services stay as they are.
    if !capture {
        wired.push(Wiring {
            namespace,
            labels,
            ports,
        });
    }
    Ok(true)
}

fn template_annotations(template: &Value) -> Mapping {
    template
        .get("metadata")
        .and_then(|m| m.get("annotations"))
        .and_then(Value::as_mapping)
        .cloned()
        .unwrap_or_default()
}

/// A pod whose containers run as the proxy's uid would not be captured: refused.
fn refuse_proxy_uid(spec: &Value) -> Result<(), String> {
    let uid = |v: &Value| {
        v.get("securityContext")
            .and_then(|s| s.get("runAsUser"))
            .and_then(Value::as_u64)
    };
    let pod_uid = uid(spec);
    for c in ["initContainers", "containers"]
        .iter()
        .filter_map(|k| spec.get(*k).and_then(Value::as_sequence))
        .flatten()
    {
        if uid(c).or(pod_uid) == Some(u64::from(PROXY_UID)) {
            return Err(format!(
                "container {:?} runs as uid {PROXY_UID}, the proxy's uid: its connections would \
                 not be captured; run it as another uid",
                str_of(c, "name").unwrap_or("?")
            ));
        }
    }
    Ok(())
}

/// The HTTP probes of the application's containers, so the kubelet keeps reaching them.
fn probes(spec: &Value) -> Vec<Probe> {
    let mut out = Vec::new();
    for c in spec
        .get("containers")
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
    {
        for kind in ["livenessProbe", "readinessProbe", "startupProbe"] {
            let Some(get) = c.get(kind).and_then(|p| p.get("httpGet")) else {
                continue;
            };
            let port = match get.get("port") {
                Some(Value::Number(n)) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
                Some(Value::String(name)) => c
                    .get("ports")
                    .and_then(Value::as_sequence)
                    .into_iter()
                    .flatten()
                    .find(|p| str_of(p, "name") == Some(name.as_str()))
                    .and_then(|p| p.get("containerPort")?.as_u64())
                    .and_then(|n| u16::try_from(n).ok()),
                _ => None,
            };
            // Only a specific path is let through without authentication: the default "/"
            // (the whole application) and paths with a query are left to policy.
            let Some(path) = str_of(get, "path")
                .and_then(|p| ward_spiffe::policy::path::normalize(p).ok())
                .filter(|p| p != "/" && !p.contains('?'))
            else {
                continue;
            };
            if let Some(port) = port {
                let p = Probe { port, path };
                if !out.contains(&p) {
                    out.push(p);
                }
            }
        }
    }
    out
}

/// `ward.dev/egress: enforce`: destinations outside the mesh only as the CA's egress
/// configuration allows (`passthrough`, the default, leaves them open).
fn egress_enforced(template: &Value) -> Result<bool, String> {
    match annotation(template, "ward.dev/egress") {
        None | Some("passthrough") => Ok(false),
        Some("enforce") => Ok(true),
        Some(other) => Err(format!(
            "ward.dev/egress {other:?}: want enforce or passthrough"
        )),
    }
}

/// The capture listeners of a pod: inbound on `[::]:15006`, outbound on loopback (IPv4 and
/// IPv6) with the mesh routes of `ward.dev/mesh-routes`.
fn capture_listeners(template: &Value, spec: &Value) -> Result<Vec<Listener>, String> {
    let mut ports = std::collections::BTreeMap::new();
    if let Some(a) = annotation(template, "ward.dev/opaque-ports") {
        for p in annotations::ports("ward.dev/opaque-ports", a)? {
            ports.insert(
                p,
                PortMode {
                    protocol: Protocol::Tcp,
                    ..PortMode::default()
                },
            );
        }
    }
    let routes = match annotation(template, "ward.dev/mesh-routes") {
        Some(a) => annotations::mesh_routes(a)?,
        None => Vec::new(),
    };
    let unknown = if egress_enforced(template)? {
        UnknownDestination::Egress
    } else {
        UnknownDestination::Passthrough
    };
    let out = |name: &str, listen: SocketAddr| {
        Listener::OutboundCapture(OutboundCapture {
            name: name.into(),
            listen,
            protocol: Protocol::Auto,
            routes: routes.clone(),
            unknown,
        })
    };
    Ok(vec![
        Listener::InboundCapture(InboundCapture {
            name: "capture-in".into(),
            listen: SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, INBOUND_CAPTURE_PORT)),
            app_address: Default::default(),
            default_port: PortMode::default(),
            ports,
            probes: probes(spec),
            authorize_probes: true,
        }),
        out(
            "capture-out",
            SocketAddr::from(([127, 0, 0, 1], OUTBOUND_CAPTURE_PORT)),
        ),
        out(
            "capture-out6",
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, OUTBOUND_CAPTURE_PORT)),
        ),
    ])
}

/// The `ward-init` container: `ward-proxy init` as root with NET_ADMIN only.
fn init_container(annotations: Mapping, image: &str) -> Result<Value, String> {
    let get = |k: &str| annotations.get(k).and_then(Value::as_str);
    let mut args = vec![
        "init".to_owned(),
        "--proxy-uid".into(),
        PROXY_UID.to_string(),
        "--admin-port".into(),
        ADMIN_PORT.to_string(),
        "--inbound-port".into(),
        INBOUND_CAPTURE_PORT.to_string(),
        "--outbound-port".into(),
        OUTBOUND_CAPTURE_PORT.to_string(),
    ];
    for (key, flag) in [
        ("ward.dev/exclude-inbound-ports", "--exclude-inbound-ports"),
        (
            "ward.dev/exclude-outbound-ports",
            "--exclude-outbound-ports",
        ),
    ] {
        if let Some(a) = get(key) {
            let ports = annotations::ports(key, a)?;
            if !ports.is_empty() {
                args.push(flag.into());
                args.push(
                    ports
                        .iter()
                        .map(u16::to_string)
                        .collect::<Vec<_>>()
                        .join(","),
                );
            }
        }
    }
    if let Some(a) = get("ward.dev/exclude-outbound-cidrs") {
        let c = annotations::cidrs("ward.dev/exclude-outbound-cidrs", a)?;
        if !c.is_empty() {
            args.push("--exclude-outbound-cidrs".into());
            args.push(
                c.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            );
        }
    }
    let mut init = yaml_value(&format!(
        r#"
name: {INIT_CONTAINER}
image: {image}
args: []
resources:
  requests: {{cpu: 10m, memory: 8Mi}}
  limits: {{memory: 32Mi}}
securityContext:
  runAsUser: 0
  runAsNonRoot: false
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities: {{add: [NET_ADMIN], drop: [ALL]}}
"#,
        image = serde_json::to_string(image).map_err(|e| e.to_string())?,
    ));
    init["args"] = Value::Sequence(args.into_iter().map(Value::String).collect());
    Ok(init)
}
