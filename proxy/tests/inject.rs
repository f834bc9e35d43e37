//! `ward-proxy inject` golden tests: every `tests/inject/*.in.yaml` through the real binary must
//! give `*.out.yaml` (set `WARD_UPDATE_GOLDEN=1` to rewrite them after a deliberate change);
//! injecting the output again changes nothing; stdin and several files work; untouched
//! documents keep their exact text; every output document passes `kubernetes-validate
//! --strict` and every injected proxy configuration passes the proxy's own loader; bad input is
//! refused with exit code 2, a message naming the document, and nothing on stdout.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_yaml_ng::Value;
use ward_proxy::config::{Listener, ProxyConfig};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ward-proxy"))
}

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/inject")
}

fn inject(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(bin())
        .arg("inject")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        input.write_all(s.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "inject failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

/// Every document, with List items taken out (kubernetes-validate has no schema for List).
fn flat_docs(text: &str) -> Vec<Value> {
    let mut out = Vec::new();
    for d in serde_yaml_ng::Deserializer::from_str(text) {
        let v: Value = serde::Deserialize::deserialize(d).unwrap();
        if v.is_null() {
            continue;
        }
        if v["kind"] == "List" {
            out.extend(v["items"].as_sequence().unwrap().iter().cloned());
        } else {
            out.push(v);
        }
    }
    out
}

fn validate(docs: &[Value]) {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("docs.yaml");
    // As JSON: a YAML 1.2 writer would leave strings like "yes" unquoted, which the YAML 1.1
    // reader of kubernetes-validate (like Kubernetes) takes for booleans.
    let text: Vec<String> = docs
        .iter()
        .map(|d| {
            let j: serde_json::Value = serde_yaml_ng::from_value(d.clone()).unwrap();
            serde_json::to_string(&j).unwrap() + "\n"
        })
        .collect();
    std::fs::write(&f, text.join("---\n")).unwrap();
    let tool =
        std::env::var("WARD_KUBERNETES_VALIDATE").unwrap_or_else(|_| "kubernetes-validate".into());
    let o = Command::new(tool)
        .args(["--strict", f.to_str().unwrap()])
        .output()
        .expect("kubernetes-validate (./scripts/test installs it)");
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{text}");
    assert_eq!(
        text.lines().filter(|l| l.contains(" passed for ")).count(),
        docs.len(),
        "{text}"
    );
}

fn sidecars(docs: &[Value]) -> Vec<Value> {
    let mut v = Vec::new();
    for d in docs {
        let spec = match d["kind"].as_str() {
            Some("Pod") => &d["spec"],
            _ => &d["spec"]["template"]["spec"],
        };
        let init = spec["initContainers"].as_sequence().into_iter().flatten();
        for c in spec["containers"]
            .as_sequence()
            .into_iter()
            .flatten()
            .chain(init)
        {
            if c["name"] == "ward-proxy" {
                v.push(c.clone());
            }
        }
    }
    v
}

#[test]
fn golden_files_idempotence_and_validity() {
    let mut cases: Vec<PathBuf> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_str().unwrap().ends_with(".in.yaml"))
        .collect();
    cases.sort();
    assert!(!cases.is_empty());
    for input in cases {
        let golden = PathBuf::from(input.to_str().unwrap().replace(".in.yaml", ".out.yaml"));
        // `explicit-*` cases run in explicit mode, the others in the default capture mode.
        let explicit = input
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("explicit-");
        let mode: &[&str] = if explicit {
            &["--mode", "explicit"]
        } else {
            &[]
        };
        let args = |f: &str| {
            let mut a = vec!["-f", f];
            a.extend_from_slice(mode);
            a.iter().map(|s| (*s).to_owned()).collect::<Vec<String>>()
        };
        let run = |f: &str| {
            let a = args(f);
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            ok(&inject(&a, None))
        };
        let got = run(input.to_str().unwrap());
        if std::env::var("WARD_UPDATE_GOLDEN").is_ok() {
            std::fs::write(&golden, &got).unwrap();
        }
        let want = std::fs::read_to_string(&golden)
            .unwrap_or_else(|_| panic!("{} missing (WARD_UPDATE_GOLDEN=1)", golden.display()));
        assert_eq!(
            got,
            want,
            "{} differs from its golden file",
            input.display()
        );

        // Idempotent, and the same through stdin.
        assert_eq!(run(golden.to_str().unwrap()), want);
        let text = std::fs::read_to_string(&input).unwrap();
        assert_eq!(ok(&inject(mode, Some(&text))), want);

        let docs = flat_docs(&want);
        validate(&docs);
        for c in sidecars(&docs) {
            let yaml = c["env"][0]["value"].as_str().unwrap();
            ProxyConfig::from_yaml(yaml, "injected").unwrap();
        }
    }
}

#[test]
fn what_gets_injected() {
    let input = dir().join("mixed.in.yaml");
    let out = ok(&inject(
        &[
            "-f",
            input.to_str().unwrap(),
            "--default-policy",
            "deny",
            "--image",
            "reg/proxy:9",
            "--socket-dir",
            "/run/spiffe",
            "--mode",
            "explicit",
        ],
        None,
    ));
    let docs = flat_docs(&out);
    let by = |kind: &str, name: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap()
            .clone()
    };
    // The Deployment: one sidecar, TCP ports wrapped (not the UDP one), the socket volume.
    let web = by("Deployment", "web");
    let pod = &web["spec"]["template"]["spec"];
    let side = &sidecars(std::slice::from_ref(&web))[0];
    assert_eq!(side["image"], "reg/proxy:9");
    let cfg = ProxyConfig::from_yaml(side["env"][0]["value"].as_str().unwrap(), "x").unwrap();
    let listens: Vec<(String, String)> = cfg
        .inbound()
        .map(|i| (i.listen.to_string(), i.forward_to.clone()))
        .collect();
    assert_eq!(
        listens,
        vec![
            ("0.0.0.0:28080".to_owned(), "127.0.0.1:8080".to_owned()),
            ("0.0.0.0:29100".to_owned(), "127.0.0.1:9100".to_owned())
        ]
    );
    assert_eq!(
        cfg.authorization.default,
        ward_spiffe::policy::DefaultPolicy::Deny
    );
    assert!(cfg.authorization.from_agent);
    let vol = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "ward-agent-socket")
        .unwrap();
    assert_eq!(vol["hostPath"]["path"], "/run/spiffe");
    // Its Service now targets the proxy ports.
    let svc = by("Service", "web");
    let targets: Vec<&str> = svc["spec"]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| p["targetPort"].as_str().unwrap())
        .collect();
    assert_eq!(targets, vec!["ward-8080", "ward-9100"]);
    // Opted out: untouched. The bare Pod: outbound only.
    assert!(sidecars(&[by("StatefulSet", "db")]).is_empty());
    let client = sidecars(&[by("Pod", "client")]);
    let cfg = ProxyConfig::from_yaml(client[0]["env"][0]["value"].as_str().unwrap(), "x").unwrap();
    assert_eq!(cfg.inbound().count(), 0);
    let outbound: Vec<_> = cfg.outbound().collect();
    assert_eq!(outbound[0].listen.to_string(), "127.0.0.1:9001");
    assert_eq!(
        outbound[0].expected_ids[0].as_str(),
        "spiffe://example.org/ns/shop/sa/web"
    );
    // The Job gets a native sidecar (an init container that keeps running), so it can finish.
    let job = by("Job", "migrate");
    let init = job["spec"]["template"]["spec"]["initContainers"][0].clone();
    assert_eq!(init["name"], "ward-proxy");
    assert_eq!(init["restartPolicy"], "Always");
    // YAML 1.1 meaning survives the rewrite: an octal file mode and a "yes" string.
    assert_eq!(pod["volumes"][0]["secret"]["defaultMode"], 256);
    assert_eq!(pod["containers"][0]["env"][0]["value"], "yes");
    // The List's DaemonSet and Service, in another namespace.
    assert_eq!(sidecars(&[by("DaemonSet", "logger")]).len(), 1);
    assert_eq!(
        by("Service", "logger")["spec"]["ports"][0]["targetPort"],
        "ward-24224"
    );
    // The unrelated ConfigMap keeps its exact text, comments included.
    assert!(out.contains(
        "# Unrelated: kept byte for byte, comments included.\napiVersion: v1\nkind: ConfigMap\nmetadata: { name: settings, namespace: shop }\ndata:\n  mode: \"fast\"   # inline comment\n"
    ));
    // A Service in another file is pointed at the proxy of a workload in this one.
    let tmp = tempfile::tempdir().unwrap();
    let svc = tmp.path().join("svc.yaml");
    std::fs::write(
        &svc,
        "apiVersion: v1\nkind: Service\nmetadata: { name: web-internal, namespace: shop }\nspec:\n  selector: { app: web }\n  ports: [ { port: 8080 } ]\n",
    )
    .unwrap();
    let out2 = ok(&inject(
        &[
            "-f",
            input.to_str().unwrap(),
            "-f",
            svc.to_str().unwrap(),
            "--mode",
            "explicit",
        ],
        None,
    ));
    let other = flat_docs(&out2)
        .into_iter()
        .find(|d| d["metadata"]["name"] == "web-internal")
        .unwrap();
    assert_eq!(other["spec"]["ports"][0]["targetPort"], "ward-8080");
    // Several files: each stream in turn.
    let both = ok(&inject(
        &["-f", input.to_str().unwrap(), "-f", input.to_str().unwrap()],
        None,
    ));
    assert_eq!(
        flat_docs(&both).len(),
        2 * flat_docs(&ok(&inject(&["-f", input.to_str().unwrap()], None))).len()
    );
}

#[test]
fn capture_mode_adds_ward_init_and_leaves_the_app_and_its_services_alone() {
    let input = dir().join("capture.in.yaml");
    let out = ok(&inject(&["-f", input.to_str().unwrap()], None));
    let docs = flat_docs(&out);
    let by = |kind: &str| docs.iter().find(|d| d["kind"] == kind).unwrap().clone();
    let api = by("Deployment");
    let spec = &api["spec"]["template"]["spec"];
    // ward-init first: root with NET_ADMIN only, the annotations' exclusions as flags.
    let init = &spec["initContainers"][0];
    assert_eq!(init["name"], "ward-init");
    let args: Vec<&str> = init["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        args,
        [
            "init",
            "--proxy-uid",
            "1337",
            "--admin-port",
            "15020",
            "--inbound-port",
            "15006",
            "--outbound-port",
            "15001",
            "--exclude-inbound-ports",
            "9100",
            "--exclude-outbound-cidrs",
            "169.254.169.254/32"
        ]
    );
    assert_eq!(init["securityContext"]["runAsUser"], 0);
    assert_eq!(
        init["securityContext"]["capabilities"]["add"][0],
        "NET_ADMIN"
    );
    assert_eq!(init["securityContext"]["capabilities"]["drop"][0], "ALL");
    // The proxy runs right after ward-init, before any other init container and the app,
    // which starts only once the proxy is ready.
    assert_eq!(spec["initContainers"][1]["name"], "ward-proxy");
    assert_eq!(spec["initContainers"][1]["restartPolicy"], "Always");
    assert_eq!(
        spec["initContainers"][1]["startupProbe"]["httpGet"]["path"],
        "/readyz"
    );
    assert_eq!(spec["containers"].as_sequence().unwrap().len(), 1);
    // The sidecar runs as the uid the rules skip and exposes only its admin port.
    let side = &sidecars(std::slice::from_ref(&api))[0];
    assert_eq!(side["securityContext"]["runAsUser"], 1337);
    let ports: Vec<u64> = side["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| p["containerPort"].as_u64().unwrap())
        .collect();
    assert_eq!(ports, [15020]);
    // The application's ports are untouched.
    assert_eq!(spec["containers"][0]["ports"][0]["containerPort"], 8080);
    let cfg = ProxyConfig::from_yaml(side["env"][0]["value"].as_str().unwrap(), "x").unwrap();
    let roles: Vec<(&str, String)> = cfg
        .listeners
        .iter()
        .map(|l| (l.role(), l.listen().to_string()))
        .collect();
    assert_eq!(
        roles,
        [
            ("inbound-capture", "[::]:15006".to_owned()),
            ("outbound-capture", "127.0.0.1:15001".to_owned()),
            ("outbound-capture", "[::1]:15001".to_owned())
        ]
    );
    assert!(
        cfg.discovery.is_some(),
        "captured pods balance Service calls"
    );
    let Listener::InboundCapture(inb) = &cfg.listeners[0] else {
        panic!()
    };
    let probes: Vec<(u16, &str)> = inb
        .probes
        .iter()
        .map(|p| (p.port, p.path.as_str()))
        .collect();
    assert_eq!(probes, [(8080, "/live"), (8080, "/ready")]);
    assert_eq!(inb.ports[&6379].protocol, ward_proxy::config::Protocol::Tcp);
    let Listener::OutboundCapture(out) = &cfg.listeners[1] else {
        panic!()
    };
    assert_eq!(out.routes.len(), 2);
    assert_eq!(out.routes[0].dst.to_string(), "10.96.0.20/32");
    assert_eq!(out.routes[0].ports, [5432]);
    assert_eq!(
        out.routes[0].expected_ids[0].as_str(),
        "spiffe://example.org/ns/shop/sa/db"
    );
    // The Service still targets the application's port.
    assert_eq!(by("Service")["spec"]["ports"][0]["targetPort"], "http");
    // The Job: ward-init, then the native sidecar, both before the job's container.
    let job = &by("Job")["spec"]["template"]["spec"];
    assert_eq!(job["initContainers"][0]["name"], "ward-init");
    assert_eq!(job["initContainers"][1]["name"], "ward-proxy");
    assert_eq!(job["initContainers"][1]["restartPolicy"], "Always");
    // A hostNetwork pod is not captured (the rules would be the node's): explicit listeners.
    let ds = by("DaemonSet");
    let ds_spec = &ds["spec"]["template"]["spec"];
    assert!(ds_spec["initContainers"].is_null(), "{ds_spec:?}");
    let side = &sidecars(std::slice::from_ref(&ds))[0];
    let cfg = ProxyConfig::from_yaml(side["env"][0]["value"].as_str().unwrap(), "x").unwrap();
    assert_eq!(cfg.listeners[0].role(), "inbound");
    assert_eq!(cfg.listeners[0].listen().port(), 29100);
}

#[test]
fn bad_input_is_refused_with_the_document() {
    for (input, want) in [
        ("a: [1,\n", "document 1: not YAML"),
        (
            "kind: ConfigMap\napiVersion: v1\nmetadata: {name: c}\n---\nkind: Deployment\napiVersion: apps/v1\nmetadata: {name: x}\nspec:\n  template:\n    metadata:\n      annotations: {ward.dev/outbound: \"abc\"}\n    spec:\n      containers: [{name: a, image: b}]\n",
            "document 2: Deployment x: ward.dev/outbound \"abc\"",
        ),
        (
            "kind: Pod\napiVersion: v1\nmetadata: {name: p}\nspec:\n  containers: [{name: a, image: b, ports: [{containerPort: 50000}]}]\n",
            "Pod p: port 50000",
        ),
        (
            "kind: Deployment\napiVersion: apps/v1\nmetadata: {name: y}\nspec: {}\n",
            "document 1: Deployment y: no pod template",
        ),
    ] {
        let o = inject(&["--mode", "explicit"], Some(input));
        assert_eq!(o.status.code(), Some(2), "{input}");
        assert!(o.stdout.is_empty());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(want), "{err} lacks {want}");
    }
    // Capture mode refuses what would make capture unsafe or wrong.
    for (input, want) in [
        (
            "kind: Pod\napiVersion: v1\nmetadata: {name: p}\nspec:\n  securityContext: {runAsUser: 1337}\n  containers: [{name: a, image: b}]\n",
            "container \"a\" runs as uid 1337, the proxy's uid",
        ),
        (
            "kind: Pod\napiVersion: v1\nmetadata: {name: p, annotations: {ward.dev/mesh-routes: \"10.0.0.1:80\"}}\nspec:\n  containers: [{name: a, image: b}]\n",
            "ward.dev/mesh-routes \"10.0.0.1:80\": no '='",
        ),
        (
            "kind: Pod\napiVersion: v1\nmetadata: {name: p, annotations: {ward.dev/exclude-inbound-ports: \"22,x\"}}\nspec:\n  containers: [{name: a, image: b}]\n",
            "ward.dev/exclude-inbound-ports: \"x\" is not a port",
        ),
    ] {
        let o = inject(&[], Some(input));
        assert_eq!(o.status.code(), Some(2), "{input}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(want), "{err} lacks {want}");
    }
    let o = inject(&["-f", "/nonexistent.yaml"], None);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn the_kubernetes_example_injects_cleanly() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/kubernetes/shop.yaml");
    let once = ok(&inject(&["-f", path.to_str().unwrap()], None));
    let dir = tempfile::tempdir().unwrap();
    let again = dir.path().join("once.yaml");
    std::fs::write(&again, &once).unwrap();
    assert_eq!(ok(&inject(&["-f", again.to_str().unwrap()], None)), once);
    let docs: Vec<Value> = flat_docs(&once)
        .into_iter()
        .filter(|d| d["apiVersion"] != "ward.dev/v1alpha1")
        .collect();
    validate(&docs);
    assert_eq!(sidecars(&docs).len(), 2, "api and web get a sidecar");
}

#[test]
fn egress_enforce_annotation_makes_the_sidecar_follow_the_cas_egress() {
    let pod = |egress: &str| {
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{ name: web, namespace: shop }}\n\
             spec:\n  selector: {{ matchLabels: {{ app: web }} }}\n  template:\n\
             \x20   metadata: {{ labels: {{ app: web }}, annotations: {{ ward.dev/egress: \"{egress}\" }} }}\n\
             \x20   spec:\n      containers: [ {{ name: web, image: example/web:1, ports: [ {{ containerPort: 8080 }} ] }} ]\n"
        )
    };
    let out = ok(&inject(&[], Some(&pod("enforce"))));
    let docs = flat_docs(&out);
    let side = &sidecars(&docs)[0];
    let cfg = ProxyConfig::from_yaml(side["env"][0]["value"].as_str().unwrap(), "x").unwrap();
    let eg = cfg.egress.expect("an egress section");
    assert!(eg.from_agent && eg.dns.is_none(), "{eg:?}");
    assert!(cfg.authorization.from_agent);
    let unknowns: Vec<_> = cfg
        .listeners
        .iter()
        .filter_map(|l| match l {
            Listener::OutboundCapture(o) => Some(o.unknown),
            _ => None,
        })
        .collect();
    assert_eq!(
        unknowns,
        [
            ward_proxy::config::UnknownDestination::Egress,
            ward_proxy::config::UnknownDestination::Egress
        ]
    );
    // The default leaves destinations outside the mesh open; a wrong value is refused.
    let out = ok(&inject(&[], Some(&pod("passthrough"))));
    let side = &sidecars(&flat_docs(&out))[0];
    let cfg = ProxyConfig::from_yaml(side["env"][0]["value"].as_str().unwrap(), "x").unwrap();
    assert!(cfg.egress.is_none());
    // With the chart's gateway, everything outside the mesh goes through it.
    let gw = "rel-ward-egress-gateway.ward-egress.svc:15008=spiffe://example.org/ns/ward-egress/sa/rel-ward-egress-gateway";
    let out = ok(&inject(&["--egress-gateway", gw], Some(&pod("enforce"))));
    let side = &sidecars(&flat_docs(&out))[0];
    let cfg = ProxyConfig::from_yaml(side["env"][0]["value"].as_str().unwrap(), "x").unwrap();
    let g = cfg.egress.unwrap().gateway.expect("a gateway");
    assert_eq!(g.address, "rel-ward-egress-gateway.ward-egress.svc:15008");
    assert_eq!(
        g.expected_ids[0].as_str(),
        "spiffe://example.org/ns/ward-egress/sa/rel-ward-egress-gateway"
    );
    let bad = inject(&["--egress-gateway", "nope"], Some(&pod("enforce")));
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--egress-gateway \"nope\""));
    let bad = inject(&[], Some(&pod("strict")));
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("ward.dev/egress \"strict\": want enforce or passthrough"),
        "{err}"
    );
}
