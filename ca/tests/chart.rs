//! The Helm chart (charts/ward): `helm lint` and `helm template` with the default values and
//! with ci/custom-values.yaml; every rendered document and CRD checked by
//! `kubernetes-validate --strict`; the rendered CA and agent configurations parsed and validated
//! by the binaries' own loaders and cross-checked against the manifests (service account,
//! audience, bundle ConfigMap, CA address), so the chart and the code cannot drift apart; the
//! CRDs in the chart equal `ward-ca crds`; wrong values fail at install time with the path.
//!
//! Tools: `helm` and `kubernetes-validate` from `WARD_HELM` / `WARD_KUBERNETES_VALIDATE` or
//! `PATH` (`./scripts/test` installs both).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml_ng::Value;

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/ward")
}

fn tool(var: &str, name: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| name.to_owned())
}

/// Runs helm with private cache/config dirs; returns (success, stdout, stderr).
fn helm(args: &[&str]) -> (bool, String, String) {
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(tool("WARD_HELM", "helm"))
        .args(args)
        .env("HELM_CACHE_HOME", home.path())
        .env("HELM_CONFIG_HOME", home.path())
        .env("HELM_DATA_HOME", home.path())
        .output()
        .unwrap_or_else(|e| panic!("cannot run helm ({e}); run ./scripts/test, which installs it"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn render(values: Option<&Path>) -> String {
    let chart = chart();
    let mut args = vec![
        "template",
        "rel",
        chart.to_str().unwrap(),
        "--namespace",
        "ward-system",
        "--include-crds",
    ];
    let v;
    if let Some(p) = values {
        v = p.to_str().unwrap().to_owned();
        args.extend(["--values", &v]);
    }
    let (ok, out, err) = helm(&args);
    assert!(ok, "helm template failed: {err}");
    out
}

fn docs(rendered: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(rendered)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v:?}"))
}

/// kubernetes-validate --strict on every document; returns how many passed.
fn validate(rendered: &str) -> usize {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("all.yaml");
    std::fs::write(&f, rendered).unwrap();
    let out = Command::new(tool("WARD_KUBERNETES_VALIDATE", "kubernetes-validate"))
        .args(["--strict", f.to_str().unwrap()])
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run kubernetes-validate ({e}); run ./scripts/test, which installs it")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "kubernetes-validate failed:\n{text}");
    for line in text.lines() {
        // Only the prometheus-operator's ServiceMonitor has no schema here.
        assert!(
            line.starts_with("INFO") || line.contains("kind ServiceMonitor"),
            "kubernetes-validate: {line}"
        );
    }
    text.lines().filter(|l| l.contains(" passed for ")).count()
}

/// Checks one rendering: every document valid, configs accepted by the loaders, manifests
/// and configs agreeing. Returns (CA config, agent config).
fn check(rendered: &str) -> (ward_ca::CaConfig, ward_agent::AgentConfig, Vec<Value>) {
    let docs = docs(rendered);
    let passed = validate(rendered);
    let monitors = docs
        .iter()
        .filter(|d| d["kind"] == "ServiceMonitor")
        .count();
    assert_eq!(passed + monitors, docs.len(), "every document validated");

    let ca_cm = find(&docs, "ConfigMap", "rel-ward-ca");
    let ca = ward_ca::CaConfig::from_toml(s(&ca_cm["data"]["ca.toml"]), "chart ca.toml")
        .unwrap_or_else(|e| panic!("{e}\n{}", s(&ca_cm["data"]["ca.toml"])));
    let agent_cm = find(&docs, "ConfigMap", "rel-ward-agent");
    let mut agent =
        ward_agent::AgentConfig::from_toml(s(&agent_cm["data"]["agent.toml"]), "chart agent.toml")
            .unwrap_or_else(|e| panic!("{e}\n{}", s(&agent_cm["data"]["agent.toml"])));
    agent
        .apply_env(&|k| (k == "WARD_AGENT_NODE_NAME").then(|| "node-1".to_owned()))
        .unwrap();
    assert_eq!(agent.k8s.as_ref().unwrap().node_name, "node-1");

    // The agent and the CA agree with each other and with the manifests.
    assert_eq!(agent.trust_domain, ca.trust_domain);
    let cluster = &ca.kubernetes.clusters[0];
    assert_eq!(agent.k8s_psat.as_ref().unwrap().cluster, cluster.name);
    let ds = find(&docs, "DaemonSet", "rel-ward-agent");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(
        cluster.service_account_allow_list,
        vec![format!("ward-system:{}", s(&pod["serviceAccountName"]))]
    );
    assert_eq!(pod["hostPID"], true);
    let vols = pod["volumes"].as_sequence().unwrap();
    let vol = |name: &str| vols.iter().find(|v| v["name"] == name).unwrap();
    let token = &vol("token")["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(s(&token["audience"]), cluster.audience);
    let mounts = pod["containers"][0]["volumeMounts"].as_sequence().unwrap();
    let mount = |name: &str| {
        PathBuf::from(s(
            &mounts.iter().find(|m| m["name"] == name).unwrap()["mountPath"],
        ))
    };
    assert_eq!(
        agent.k8s_psat.as_ref().unwrap().token_path,
        mount("token").join(s(&token["path"]))
    );
    assert_eq!(
        cluster.bundle_config_map.as_deref().unwrap(),
        format!("ward-system/{}", s(&vol("bundle")["configMap"]["name"]))
    );
    assert_eq!(
        agent.trust_bundle_path.as_deref().unwrap(),
        mount("bundle").join("bundle.pem")
    );
    assert_eq!(agent.socket_path.parent().unwrap(), mount("socket"));
    let svc = find(&docs, "Service", "rel-ward-ca");
    let port = svc["spec"]["ports"][0]["port"].as_u64().unwrap();
    assert_eq!(
        agent.server_address,
        format!("rel-ward-ca.ward-system.svc:{port}")
    );
    let health = agent.health_address.port();
    assert_eq!(
        pod["containers"][0]["ports"][0]["containerPort"].as_u64(),
        Some(u64::from(health))
    );
    // The CA's data directory is the StatefulSet's volume; its namespace is ignored.
    let sts = find(&docs, "StatefulSet", "rel-ward-ca");
    let ca_mounts = sts["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
        .as_sequence()
        .unwrap();
    assert!(
        ca_mounts
            .iter()
            .any(|m| m["name"] == "data" && Path::new(s(&m["mountPath"])) == ca.data_dir)
    );
    assert!(
        cluster
            .controller
            .ignore_namespaces
            .contains(&"ward-system".to_owned())
    );
    // Hardened: no privilege escalation, read-only root, no capabilities, everywhere.
    for c in [
        &sts["spec"]["template"]["spec"]["containers"][0],
        &pod["containers"][0],
    ] {
        let sc = &c["securityContext"];
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(sc["capabilities"]["drop"][0], "ALL");
    }
    assert_eq!(
        sts["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"],
        true
    );
    (ca, agent, docs)
}

#[test]
fn the_chart_renders_valid_manifests_and_configs_the_binaries_accept() {
    let (ok, out, err) = helm(&["lint", chart().to_str().unwrap()]);
    assert!(ok, "helm lint: {out}{err}");
    let custom = chart().join("ci/custom-values.yaml");
    let (ok, out, err) = helm(&[
        "lint",
        chart().to_str().unwrap(),
        "--values",
        custom.to_str().unwrap(),
    ]);
    assert!(ok, "helm lint with custom values: {out}{err}");

    // Defaults: self-signed root, default identities, no ServiceMonitor.
    let (ca, agent, docs) = check(&render(None));
    assert_eq!(ca.trust_domain.to_string(), "example.org");
    assert!(ca.upstream.is_none());
    assert!(ca.kubernetes.clusters[0].controller.default_policy);
    assert!(agent.k8s.as_ref().unwrap().kubelet_ca.is_some());
    assert!(!docs.iter().any(|d| d["kind"] == "ServiceMonitor"));
    assert!(
        !docs
            .iter()
            .any(|d| d["kind"] == "NetworkPolicy" || d["kind"] == "Namespace")
    );
    assert_eq!(
        docs.iter()
            .filter(|d| d["kind"] == "CustomResourceDefinition")
            .count(),
        3
    );

    // Custom values reach the configs.
    let (ca, agent, docs) = check(&render(Some(&custom)));
    assert_eq!(ca.trust_domain.to_string(), "prod.example.com");
    assert_eq!(ca.kubernetes.clusters[0].name, "eu-west-1");
    assert_eq!(ca.kubernetes.clusters[0].audience, "ward-ca-prod");
    assert_eq!(ca.ttl.ca, std::time::Duration::from_secs(7 * 86400));
    assert!(!ca.rotation.automatic);
    assert!((ca.rotation.prepare_at - 0.4).abs() < 1e-9);
    assert_eq!(
        ca.upstream.as_ref().unwrap().cert_file,
        PathBuf::from("/etc/ward/upstream/tls.crt")
    );
    assert!(!ca.kubernetes.clusters[0].controller.default_policy);
    assert_eq!(
        ca.kubernetes.clusters[0].node_label_allow_list,
        vec![
            "topology.kubernetes.io/zone",
            "node.kubernetes.io/instance-type"
        ]
    );
    assert!(agent.k8s.as_ref().unwrap().kubelet_insecure);
    assert_eq!(agent.socket_path, PathBuf::from("/run/ward/agent.sock"));
    let sts = find(&docs, "StatefulSet", "rel-ward-ca");
    assert_eq!(
        s(&sts["spec"]["template"]["spec"]["containers"][0]["image"]),
        "registry.example.com/sec/ward-ca:0.1.0-rc1"
    );
    let ds = find(&docs, "DaemonSet", "rel-ward-agent");
    let host = ds["spec"]["template"]["spec"]["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "socket")
        .unwrap();
    assert_eq!(s(&host["hostPath"]["path"]), "/run/spiffe");
    assert!(docs.iter().any(|d| d["kind"] == "ServiceMonitor"));

    // The egress gateway: a proxy config the proxy accepts, listening where the Service and
    // the container say, and a NetworkPolicy in each listed namespace.
    let cm = find(&docs, "ConfigMap", "rel-ward-egress-gateway");
    assert_eq!(cm["metadata"]["namespace"], "ward-egress");
    let text = s(&cm["data"]["proxy.yaml"]);
    let cfg = ward_proxy::ProxyConfig::from_yaml(text, "chart proxy.yaml")
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(cfg.listeners[0].role(), "egress-gateway");
    let port = cfg.listeners[0].listen().port();
    let eg = cfg.egress.as_ref().unwrap();
    assert!(eg.from_agent && cfg.authorization.from_agent);
    assert_eq!(eg.dns, Some("10.96.0.10:53".parse().unwrap()));
    let svc = find(&docs, "Service", "rel-ward-egress-gateway");
    assert_eq!(
        svc["spec"]["ports"][0]["port"].as_u64(),
        Some(u64::from(port))
    );
    let dep = find(&docs, "Deployment", "rel-ward-egress-gateway");
    assert_eq!(dep["spec"]["replicas"], 3);
    let c = &dep["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        c["ports"][0]["containerPort"].as_u64(),
        Some(u64::from(port))
    );
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        s(&c["image"]),
        "registry.example.com/sec/ward-proxy:0.1.0-rc1"
    );
    let policies: Vec<&str> = docs
        .iter()
        .filter(|d| d["kind"] == "NetworkPolicy")
        .map(|d| s(&d["metadata"]["namespace"]))
        .collect();
    assert_eq!(policies, ["shop", "blog"]);
    // The ingress gateway: a proxy config the proxy accepts (certificates from the mounted
    // Secret and ACME, the routes), the Secret and ACME state mounted where it says, and a
    // LoadBalancer Service keeping the client's address.
    let cm = find(&docs, "ConfigMap", "rel-ward-ingress-gateway");
    assert_eq!(cm["metadata"]["namespace"], "ward-gateway");
    let text = s(&cm["data"]["proxy.yaml"]);
    let cfg = ward_proxy::ProxyConfig::from_yaml(text, "chart gateway proxy.yaml")
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
    let roles: Vec<&str> = cfg.listeners.iter().map(|l| l.role()).collect();
    assert_eq!(roles, ["gateway", "gateway"]);
    for l in &cfg.listeners {
        let ward_proxy::config::Listener::Gateway(g) = l else {
            panic!("{l:?}")
        };
        assert_eq!(g.proxy_protocol_from, ["10.0.0.0/24".parse().unwrap()]);
    }
    let gw = cfg.gateway.as_ref().unwrap();
    assert_eq!(
        gw.certificates[0].cert,
        PathBuf::from("/etc/ward/tls/shop-tls/tls.crt")
    );
    let acme = gw.acme.as_ref().unwrap();
    assert_eq!(acme.state_dir, PathBuf::from("/var/lib/ward/acme"));
    assert_eq!(gw.routes[0].hostnames, ["shop.example.org"]);
    assert_eq!(gw.rate_limit.unwrap().requests_per_second, 50);
    assert_eq!(gw.max_request_body_bytes, Some(1_048_576));
    let dep = find(&docs, "Deployment", "rel-ward-ingress-gateway");
    let pod = &dep["spec"]["template"]["spec"];
    let mounts: Vec<&str> = pod["containers"][0]["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| s(&m["mountPath"]))
        .collect();
    assert!(mounts.contains(&"/etc/ward/tls/shop-tls") && mounts.contains(&"/var/lib/ward/acme"));
    let acme_vol = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "acme")
        .unwrap();
    assert_eq!(acme_vol["persistentVolumeClaim"]["claimName"], "ward-acme");
    let svc = find(&docs, "Service", "rel-ward-ingress-gateway");
    assert_eq!(svc["spec"]["type"], "LoadBalancer");
    assert_eq!(svc["spec"]["externalTrafficPolicy"], "Local");
    assert_eq!(svc["spec"]["ports"][0]["port"], 443);
    let np = docs.iter().find(|d| d["kind"] == "NetworkPolicy").unwrap();
    assert_eq!(np["spec"]["policyTypes"][0], "Egress");
    assert!(np["spec"]["egress"][0]["to"][0]["namespaceSelector"].is_mapping());
}

/// `ca.replicas: 3` on etcd over TLS: the config the CA accepts names the cluster and its TLS
/// files, the StatefulSet runs three replicas spread over nodes with the client Secret
/// mounted, and a PodDisruptionBudget lets one go at a time. The defaults have none of it.
#[test]
fn the_chart_runs_ca_replicas_on_etcd() {
    let (ca, _, docs) = check(&render(None));
    assert_eq!(ca.store.backend, ward_ca::config::StoreBackend::Sled);
    assert_eq!(
        find(&docs, "StatefulSet", "rel-ward-ca")["spec"]["replicas"],
        1
    );
    assert!(!docs.iter().any(|d| d["kind"] == "PodDisruptionBudget"));

    let (ca, _, docs) = check(&render(Some(&chart().join("ci/ha-values.yaml"))));
    assert_eq!(ca.store.backend, ward_ca::config::StoreBackend::Etcd);
    let e = ca.store.etcd.as_ref().unwrap();
    assert_eq!(e.endpoints.len(), 3);
    assert_eq!(e.prefix, "/ward/prod/");
    let tls = e.tls.as_ref().unwrap();
    assert_eq!(tls.ca, PathBuf::from("/etc/ward/etcd/ca.crt"));
    assert_eq!(
        tls.cert.as_deref(),
        Some(Path::new("/etc/ward/etcd/tls.crt"))
    );
    let sts = find(&docs, "StatefulSet", "rel-ward-ca");
    assert_eq!(sts["spec"]["replicas"], 3);
    let pod = &sts["spec"]["template"]["spec"];
    assert!(pod["affinity"]["podAntiAffinity"].is_mapping());
    let secret_vol = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "etcd-tls")
        .unwrap();
    assert_eq!(secret_vol["secret"]["secretName"], "ward-etcd-client");
    let pdb = find(&docs, "PodDisruptionBudget", "rel-ward-ca");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);

    // Replicas without etcd, or etcd without endpoints, fail at install with the reason.
    for (set, want) in [
        ("ca.replicas=2", "needs ca.store.backend: etcd"),
        ("ca.store.backend=etcd", "needs ca.store.etcd.endpoints"),
        ("ca.store.backend=mysql", "/ca/store/backend"),
    ] {
        let (ok, _, err) = helm(&["template", "rel", chart().to_str().unwrap(), "--set", set]);
        assert!(!ok, "--set {set} was accepted");
        assert!(err.contains(want), "--set {set}: {err}");
    }
}

#[test]
fn wrong_values_fail_at_install_with_the_path() {
    let chart = chart();
    for (set, want) in [
        ("trustDomain=Not_A_Domain", "/trustDomain"),
        ("agent.healthPort=high", "/agent/healthPort"),
        ("ca.ttl.ca=one day", "/ca/ttl/ca"),
        ("proxy.defaultPolicy=allow-all", "/proxy/defaultPolicy"),
        ("ca.rotation.prepareAt=1.5", "/ca/rotation/prepareAt"),
        ("egressGateway.port=0", "/egressGateway/port"),
        ("egressGateway.dns=somewhere", "/egressGateway/dns"),
        (
            "ingressGateway.acme.challenge=dns-01",
            "/ingressGateway/acme/challenge",
        ),
        (
            "ingressGateway.service.type=Ingress",
            "/ingressGateway/service/type",
        ),
        ("unknownKey=1", "unknownKey"),
    ] {
        let (ok, _, err) = helm(&["template", "rel", chart.to_str().unwrap(), "--set", set]);
        assert!(!ok, "--set {set} was accepted");
        assert!(err.contains(want), "--set {set}: {err}");
    }
}

#[test]
fn the_chart_crds_are_what_ward_ca_generates() {
    let out = Command::new(common::ca_bin()).arg("crds").output().unwrap();
    assert!(out.status.success());
    let in_chart = std::fs::read_to_string(chart().join("crds/ward.dev.yaml")).unwrap();
    assert_eq!(
        in_chart,
        String::from_utf8(out.stdout).unwrap(),
        "charts/ward/crds/ward.dev.yaml is stale: regenerate it with `ward-ca crds`"
    );
}

#[test]
fn the_kubernetes_example_holds_valid_policies_and_manifests() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/kubernetes/shop.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let docs = docs(&text);
    let mut policies = 0;
    for d in &docs {
        if d["kind"] == "AuthorizationPolicy" {
            let p: ward_ca::k8s::crd::AuthorizationPolicy =
                serde_yaml_ng::from_value(d.clone()).unwrap();
            p.to_policy().unwrap();
            policies += 1;
        }
    }
    assert_eq!(policies, 1);
    // The built-in kinds pass kubernetes-validate (the AuthorizationPolicy has no schema there:
    // the CRD check above covers it).
    let builtin: Vec<String> = docs
        .iter()
        .filter(|d| d["apiVersion"] != "ward.dev/v1alpha1")
        .map(|d| serde_yaml_ng::to_string(d).unwrap())
        .collect();
    let n = builtin.len();
    assert_eq!(validate(&builtin.join("---\n")), n);
}

/// The Gateway API schemas as the `gateway-api` crate's types describe them: the CRDs its
/// types generate, by kind.
fn gateway_api_schemas() -> serde_json::Value {
    use gateway_api::experimental::{gatewayclasses, gateways, grpcroutes, httproutes};
    use kube::CustomResourceExt;
    let mut out = serde_json::Map::new();
    for crd in [
        gatewayclasses::GatewayClass::crd(),
        gateways::Gateway::crd(),
        httproutes::HttpRoute::crd(),
        grpcroutes::GrpcRoute::crd(),
    ] {
        let schema = crd.spec.versions[0]
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .unwrap();
        out.insert(
            crd.spec.names.kind.clone(),
            serde_json::to_value(schema).unwrap(),
        );
    }
    serde_json::Value::Object(out)
}

/// Checks `docs` against the Gateway API schemas with Python's jsonschema; returns the errors.
fn gateway_api_errors(docs: &[Value]) -> Vec<serde_json::Value> {
    let req = serde_json::json!({
        "schemas": gateway_api_schemas(),
        "docs": docs.iter().map(|d| serde_json::to_value(d).unwrap()).collect::<Vec<_>>(),
    });
    let python = std::env::var("WARD_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut child = Command::new(python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/crd_validate.py"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(req.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "crd_validate.py failed");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["checked"].as_u64(), Some(docs.len() as u64));
    v["errors"].as_array().unwrap().clone()
}

#[test]
fn gateway_api_objects_follow_the_gateway_api_schemas() {
    // The example's Gateway and HTTPRoute, and the GatewayClass the chart creates.
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/kubernetes/gateway.yaml");
    let example = docs(&std::fs::read_to_string(&path).unwrap());
    let mut objects: Vec<Value> = example
        .iter()
        .filter(|d| d["apiVersion"] == "gateway.networking.k8s.io/v1")
        .cloned()
        .collect();
    assert_eq!(objects.len(), 2);
    for d in example
        .iter()
        .filter(|d| d["kind"] == "AuthorizationPolicy")
    {
        let p: ward_ca::k8s::crd::AuthorizationPolicy =
            serde_yaml_ng::from_value(d.clone()).unwrap();
        p.to_policy().unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let values = dir.path().join("values.yaml");
    std::fs::write(
        &values,
        "ingressGateway:\n  enabled: true\n  tlsSecrets: [shop-tls]\n  kubernetesGateway: ward-gateway/public\n  gatewayClass: { create: true, name: ward }\n",
    )
    .unwrap();
    let rendered = render(Some(&values));
    let rendered_docs = docs(&rendered);
    objects.push(find(&rendered_docs, "GatewayClass", "ward").clone());
    let errors = gateway_api_errors(&objects);
    assert!(errors.is_empty(), "{errors:?}");
    // The schemas do refuse what is wrong: a listener without its port, a TLS mode that does
    // not exist, a GatewayClass without a controller.
    let mut bad = objects.clone();
    bad[0]["spec"]["listeners"][1]
        .as_mapping_mut()
        .unwrap()
        .remove("port");
    bad[0]["spec"]["listeners"][0]["tls"]["mode"] = Value::from("Reencrypt");
    bad[2]["spec"]
        .as_mapping_mut()
        .unwrap()
        .remove("controllerName");
    let errors = gateway_api_errors(&bad);
    let text = format!("{errors:?}");
    assert_eq!(errors.len(), 3, "{text}");
    assert!(text.contains("'port' is a required property"), "{text}");
    assert!(text.contains("Reencrypt"), "{text}");
    assert!(text.contains("controllerName"), "{text}");

    // Ward reads them as it will in a cluster: the class is Ward's, the Gateway's listeners
    // can be served, the route attaches to the https listener.
    let class: ward_ca::k8s::gateway::GatewayClass =
        serde_yaml_ng::from_value(objects[2].clone()).unwrap();
    assert!(ward_ca::k8s::gateways::is_ours(&class));
    let gw: ward_ca::k8s::gateway::Gateway = serde_yaml_ng::from_value(objects[0].clone()).unwrap();
    let gw = ward_ca::k8s::gateways::read(&gw).unwrap();
    assert!(
        gw.listeners
            .iter()
            .all(|l| l.usable() && l.resolved.is_ok())
    );
    let route: ward_ca::k8s::gateway::HttpRoute =
        serde_yaml_ng::from_value(objects[1].clone()).unwrap();
    ward_ca::k8s::routes::translate_http("shop", &route.spec).unwrap();

    // The gateway's proxy config follows that Gateway, its listeners serving ports 443 and 80.
    let cm = find(&rendered_docs, "ConfigMap", "rel-ward-ingress-gateway");
    let text = s(&cm["data"]["proxy.yaml"]);
    let cfg = ward_proxy::ProxyConfig::from_yaml(text, "chart gateway proxy.yaml")
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
    let g = cfg.gateway.as_ref().unwrap();
    assert_eq!(g.kubernetes_gateway.as_deref(), Some("ward-gateway/public"));
    assert!(g.kubernetes.is_some() && g.routes.is_empty());
    // It reads its Gateway and the Secrets in the Gateway's namespace, and only there.
    let role = rendered_docs
        .iter()
        .find(|d| d["kind"] == "Role" && d["metadata"]["name"] == "rel-ward-ingress-gateway")
        .unwrap();
    assert_eq!(role["metadata"]["namespace"], "ward-gateway");
    let dep = find(&rendered_docs, "Deployment", "rel-ward-ingress-gateway");
    assert_eq!(
        dep["spec"]["template"]["spec"]["automountServiceAccountToken"],
        true
    );
    let ports: Vec<Option<u16>> = cfg
        .listeners
        .iter()
        .map(|l| match l {
            ward_proxy::config::Listener::Gateway(g) => g.port,
            _ => None,
        })
        .collect();
    assert_eq!(ports, [Some(443), Some(80)]);
    // And the CA may read and report on Gateway API objects.
    let role = find(&rendered_docs, "ClusterRole", "rel-ward-ca");
    let text = serde_yaml_ng::to_string(role).unwrap();
    assert!(
        text.contains("gateways/status") && text.contains("gatewayclasses"),
        "{text}"
    );
    // Both a Gateway and static routes: refused at install.
    let (ok, _, err) = helm(&[
        "template",
        "rel",
        chart().to_str().unwrap(),
        "--values",
        values.to_str().unwrap(),
        "--set-json",
        r#"ingressGateway.routes=[{"name":"r","rules":[]}]"#,
    ]);
    assert!(!ok && err.contains("kubernetesGateway or routes"), "{err}");
}
