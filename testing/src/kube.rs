//! A fake Kubernetes API server and kubelet for tests: real JSON (k8s-openapi types), real
//! RS256-signed projected service-account tokens, list and watch with resource versions,
//! TokenReview, JWKS and OIDC discovery, and merge-patched status subresources. The code under
//! test uses the real `kube` client against it through a kubeconfig.
//!
//! Not a conformant API server: no admission, no field or label selectors, no pagination
//! (everything comes in one page), no RBAC. What it answers, it answers as Kubernetes does.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::StreamExt;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::sync::broadcast;

type Body = BoxBody<Bytes, Infallible>;

fn full(v: impl Into<Bytes>) -> Body {
    Full::new(v.into()).boxed()
}

fn json_response(code: StatusCode, v: &Value) -> Response<Body> {
    let mut r = Response::new(full(serde_json::to_vec(v).unwrap()));
    *r.status_mut() = code;
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_response(
        code,
        &json!({ "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                 "message": message, "reason": reason, "code": code.as_u16() }),
    )
}

/// Key of a stored object: (plural, namespace, name).
type Key = (String, Option<String>, String);

#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    plural: String,
    namespace: Option<String>,
    kind: &'static str,
    object: Value,
}

#[derive(Debug, Default)]
struct State {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    history: Vec<Change>,
    /// Resources the server does not serve (a CRD not installed): 404 for every request.
    absent: std::collections::BTreeSet<String>,
}

/// An RSA signing key with its JWKS.
struct Signer {
    key: jsonwebtoken::EncodingKey,
    kid: String,
    jwks: Value,
}

fn openssl(args: &[&str], stdin: Option<&[u8]>) -> Vec<u8> {
    use std::io::Write;
    let mut child = std::process::Command::new("openssl")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("openssl is installed (./scripts/test installs it)");
    if let Some(i) = stdin {
        child.stdin.take().unwrap().write_all(i).unwrap();
    } else {
        drop(child.stdin.take());
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

impl Signer {
    fn new(kid: &str) -> Self {
        // RSA key generation is openssl's job; no keys are checked in.
        let pem = openssl(
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
            ],
            None,
        );
        let spki = openssl(&["pkey", "-pubout", "-outform", "DER"], Some(&pem));
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(&pem).unwrap();
        let mut jwk = ward_spiffe::jwk::PublicKey::from_spki_der(&spki)
            .unwrap()
            .to_jwk_members();
        jwk.insert("kid".into(), kid.into());
        jwk.insert("use".into(), "sig".into());
        jwk.insert("alg".into(), "RS256".into());
        Self {
            key,
            kid: kid.to_owned(),
            jwks: json!({ "keys": [Value::Object(jwk)] }),
        }
    }
}

/// Claims of a projected service-account token.
#[derive(Debug, Clone)]
pub struct TokenSpec {
    /// Namespace.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
    /// Bound pod (name, uid).
    pub pod: (String, String),
    /// Node (name, uid), as Kubernetes ≥ 1.30 adds.
    pub node: Option<(String, String)>,
    /// Audiences.
    pub audiences: Vec<String>,
    /// Lifetime from `not_before`.
    pub ttl: Duration,
    /// Start of validity (default: now - 10s).
    pub not_before: Option<SystemTime>,
}

impl TokenSpec {
    /// A token for `namespace/service_account` bound to a pod, for audience `aud`.
    pub fn new(namespace: &str, sa: &str, pod: (&str, &str), aud: &str) -> Self {
        Self {
            namespace: namespace.into(),
            service_account: sa.into(),
            pod: (pod.0.into(), pod.1.into()),
            node: None,
            audiences: vec![aud.into()],
            ttl: Duration::from_secs(3600),
            not_before: None,
        }
    }
}

struct Inner {
    state: Mutex<State>,
    events: broadcast::Sender<Change>,
    signer: Signer,
    issuer: String,
    requests: Mutex<Vec<String>>,
    token_reviews: AtomicU64,
    watch_bytes: AtomicU64,
}

/// A fake API server on loopback.
#[derive(Clone)]
pub struct FakeKube {
    inner: Arc<Inner>,
    /// Where it listens (plain HTTP).
    pub addr: SocketAddr,
}

impl std::fmt::Debug for FakeKube {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeKube")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn rfc3339(secs: u64) -> String {
    // Enough precision for creationTimestamp.
    let days = secs / 86400;
    let rem = secs % 86400;
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

impl FakeKube {
    /// Starts a fake cluster.
    pub async fn start() -> Self {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (events, _) = broadcast::channel(1 << 16);
        let inner = Arc::new(Inner {
            state: Mutex::new(State::default()),
            events,
            signer: Signer::new(&format!("key-{}", addr.port())),
            issuer: format!("http://{addr}"),
            requests: Mutex::new(Vec::new()),
            token_reviews: AtomicU64::new(0),
            watch_bytes: AtomicU64::new(0),
        });
        let i = inner.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = l.accept().await else {
                    return;
                };
                let i = i.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let i = i.clone();
                        async move { Ok::<_, Infallible>(handle(i, req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Self { inner, addr }
    }

    /// The token issuer (`iss`), which also serves discovery and JWKS.
    pub fn issuer(&self) -> &str {
        &self.inner.issuer
    }

    /// The JWKS of the service-account signing key.
    pub fn jwks(&self) -> Value {
        self.inner.signer.jwks.clone()
    }

    /// Writes a kubeconfig pointing at this server; returns its path.
    pub fn write_kubeconfig(&self, dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(format!("{name}.kubeconfig"));
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: {name}\n  cluster:\n    server: http://{}\n\
             users:\n- name: ward-ca\n  user:\n    token: ward-ca-token\ncontexts:\n- name: {name}\n  context:\n    cluster: {name}\n    user: ward-ca\n\
             current-context: {name}\n",
            self.addr
        );
        std::fs::write(&p, text).unwrap();
        p
    }

    /// Signs a projected service-account token.
    pub fn token(&self, t: &TokenSpec) -> String {
        let nbf = t
            .not_before
            .unwrap_or_else(|| SystemTime::now() - Duration::from_secs(10));
        let nbf_s = nbf.duration_since(UNIX_EPOCH).unwrap().as_secs();
        let mut k8s = json!({
            "namespace": t.namespace,
            "pod": { "name": t.pod.0, "uid": t.pod.1 },
            "serviceaccount": { "name": t.service_account, "uid": format!("sa-uid-{}", t.service_account) },
        });
        if let Some((n, u)) = &t.node {
            k8s["node"] = json!({ "name": n, "uid": u });
        }
        let claims = json!({
            "aud": t.audiences,
            "exp": nbf_s + t.ttl.as_secs(),
            "iat": nbf_s,
            "nbf": nbf_s,
            "iss": self.inner.issuer,
            "sub": format!("system:serviceaccount:{}:{}", t.namespace, t.service_account),
            "kubernetes.io": k8s,
        });
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        h.kid = Some(self.inner.signer.kid.clone());
        jsonwebtoken::encode(&h, &claims, &self.inner.signer.key).unwrap()
    }

    fn stamp(&self, st: &mut State, mut v: Value) -> Value {
        st.rv += 1;
        let meta = v["metadata"].as_object_mut().expect("object has metadata");
        meta.insert("resourceVersion".into(), st.rv.to_string().into());
        if !meta.contains_key("uid") {
            meta.insert("uid".into(), format!("uid-{}", st.rv).into());
        }
        if !meta.contains_key("creationTimestamp") {
            meta.insert("creationTimestamp".into(), rfc3339(now_secs()).into());
        }
        v
    }

    /// Creates or replaces an object (JSON with apiVersion, kind and metadata).
    pub fn put_json(&self, plural: &str, v: Value) -> Value {
        let ns = v["metadata"]["namespace"].as_str().map(str::to_owned);
        let name = v["metadata"]["name"].as_str().expect("name").to_owned();
        let mut st = self.inner.state.lock().unwrap();
        let key = (plural.to_owned(), ns.clone(), name);
        let kind = if st.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let v = self.stamp(&mut st, v);
        st.objects.insert(key, v.clone());
        let c = Change {
            rv: st.rv,
            plural: plural.into(),
            namespace: ns,
            kind,
            object: v.clone(),
        };
        st.history.push(c.clone());
        let _ = self.inner.events.send(c);
        v
    }

    /// Creates or replaces a k8s-openapi object.
    pub fn put<K: k8s_openapi::Resource + serde::Serialize>(&self, obj: &K) -> Value {
        let mut v = serde_json::to_value(obj).unwrap();
        v["apiVersion"] = K::API_VERSION.into();
        v["kind"] = K::KIND.into();
        self.put_json(K::URL_PATH_SEGMENT, v)
    }

    /// Deletes an object.
    pub fn delete(&self, plural: &str, ns: Option<&str>, name: &str) -> bool {
        let mut st = self.inner.state.lock().unwrap();
        let key = (plural.to_owned(), ns.map(str::to_owned), name.to_owned());
        let Some(mut v) = st.objects.remove(&key) else {
            return false;
        };
        st.rv += 1;
        v["metadata"]["resourceVersion"] = st.rv.to_string().into();
        let c = Change {
            rv: st.rv,
            plural: plural.into(),
            namespace: ns.map(str::to_owned),
            kind: "DELETED",
            object: v,
        };
        st.history.push(c.clone());
        let _ = self.inner.events.send(c);
        true
    }

    /// Reads an object.
    pub fn get(&self, plural: &str, ns: Option<&str>, name: &str) -> Option<Value> {
        let st = self.inner.state.lock().unwrap();
        st.objects
            .get(&(plural.to_owned(), ns.map(str::to_owned), name.to_owned()))
            .cloned()
    }

    /// All objects of a kind.
    pub fn list(&self, plural: &str) -> Vec<Value> {
        let st = self.inner.state.lock().unwrap();
        st.objects
            .iter()
            .filter(|((p, _, _), _)| p == plural)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Serves `plural` or not (as when its CRD is or is not installed).
    pub fn set_served(&self, plural: &str, served: bool) {
        let mut st = self.inner.state.lock().unwrap();
        if served {
            st.absent.remove(plural);
        } else {
            st.absent.insert(plural.to_owned());
        }
    }

    /// `METHOD path` of every request so far.
    pub fn requests(&self) -> Vec<String> {
        self.inner.requests.lock().unwrap().clone()
    }

    /// TokenReviews answered.
    pub fn token_reviews(&self) -> u64 {
        self.inner.token_reviews.load(Ordering::Relaxed)
    }

    /// Bytes sent on watch streams so far.
    pub fn watch_bytes(&self) -> u64 {
        self.inner.watch_bytes.load(Ordering::Relaxed)
    }

    /// Serves this cluster's kubelet `/pods` for `node` over TLS, requiring `token`.
    pub async fn kubelet(&self, node: &str, token: &str) -> FakeKubelet {
        FakeKubelet::start(self.clone(), node.to_owned(), token.to_owned()).await
    }

    /// A fake cluster-wide pod list for `node` (what the kubelet returns).
    pub fn pods_on(&self, node: &str) -> Vec<Value> {
        let st = self.inner.state.lock().unwrap();
        st.objects
            .iter()
            .filter(|((p, _, _), v)| p == "pods" && v["spec"]["nodeName"].as_str() == Some(node))
            .map(|(_, v)| v.clone())
            .collect()
    }
}

/// Path parts of a REST request.
#[derive(Debug)]
struct Target {
    api_version: String,
    namespace: Option<String>,
    plural: String,
    name: Option<String>,
    sub: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (api_version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ((*v).to_owned(), rest),
        ["apis", g, v, rest @ ..] => (format!("{g}/{v}"), rest),
        _ => return None,
    };
    let own = |s: &&str| (*s).to_owned();
    Some(match rest {
        ["namespaces", ns, plural, tail @ ..] => Target {
            api_version,
            namespace: Some((*ns).into()),
            plural: (*plural).into(),
            name: tail.first().map(own),
            sub: tail.get(1).map(own),
        },
        [plural, tail @ ..] => Target {
            api_version,
            namespace: None,
            plural: (*plural).into(),
            name: tail.first().map(own),
            sub: tail.get(1).map(own),
        },
        [] => return None,
    })
}

fn query(req: &Request<Incoming>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn list_kind(v: &Value) -> String {
    format!("{}List", v["kind"].as_str().unwrap_or("Object"))
}

async fn handle(i: Arc<Inner>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    i.requests
        .lock()
        .unwrap()
        .push(format!("{} {}", req.method(), req.uri()));
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/.well-known/openid-configuration") => {
            return json_response(
                StatusCode::OK,
                &json!({ "issuer": i.issuer, "jwks_uri": format!("{}/openid/v1/jwks", i.issuer),
                         "response_types_supported": ["id_token"], "subject_types_supported": ["public"],
                         "id_token_signing_alg_values_supported": ["RS256"] }),
            );
        }
        (Method::GET, "/openid/v1/jwks") => return json_response(StatusCode::OK, &i.signer.jwks),
        (Method::POST, "/apis/authentication.k8s.io/v1/tokenreviews") => {
            return token_review(&i, req).await;
        }
        _ => {}
    }
    let Some(t) = parse_path(&path) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("no route for {path}"),
        );
    };
    if i.state.lock().unwrap().absent.contains(&t.plural) {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        );
    }
    let q = query(&req);
    match (req.method().clone(), &t.name, t.sub.as_deref()) {
        (Method::GET, None, _) if q.get("watch").is_some_and(|w| w == "true" || w == "1") => {
            watch(i, t, q)
        }
        (Method::GET, None, _) => {
            // Pages as the API server does: `limit` items, then a `continue` token (here the
            // offset, with the list's resourceVersion so later pages stay consistent enough).
            let limit: usize = q
                .get("limit")
                .and_then(|l| l.parse().ok())
                .filter(|l| *l > 0)
                .unwrap_or(usize::MAX);
            let (skip, rv) = match q.get("continue").and_then(|c| c.split_once('-')) {
                Some((off, rv)) => (off.parse().unwrap_or(0), rv.to_owned()),
                None => (0, String::new()),
            };
            let st = i.state.lock().unwrap();
            let rv = if rv.is_empty() { st.rv.to_string() } else { rv };
            let mut matching = st.objects.iter().filter(|((p, ns, _), _)| {
                *p == t.plural && (t.namespace.is_none() || *ns == t.namespace)
            });
            let items: Vec<Value> = matching
                .by_ref()
                .skip(skip)
                .take(limit)
                .map(|(_, v)| v.clone())
                .collect();
            let more = matching.next().is_some();
            let kind = items
                .first()
                .map(list_kind)
                .unwrap_or_else(|| "List".into());
            let mut meta = json!({ "resourceVersion": rv });
            if more {
                meta["continue"] = format!("{}-{rv}", skip + items.len()).into();
            }
            json_response(
                StatusCode::OK,
                &json!({ "apiVersion": t.api_version, "kind": kind, "metadata": meta, "items": items }),
            )
        }
        (Method::GET, Some(name), None) => {
            let st = i.state.lock().unwrap();
            match st
                .objects
                .get(&(t.plural.clone(), t.namespace.clone(), name.clone()))
            {
                Some(v) => json_response(StatusCode::OK, v),
                None => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("{} \"{name}\" not found", t.plural),
                ),
            }
        }
        (Method::PATCH | Method::PUT, Some(name), Some("status")) => {
            let patch: Value = match req.into_body().collect().await {
                Ok(b) => serde_json::from_slice(&b.to_bytes()).unwrap_or(Value::Null),
                Err(_) => Value::Null,
            };
            let fk = FakeKube {
                inner: i.clone(),
                addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            };
            let current = fk.get(&t.plural, t.namespace.as_deref(), name);
            let Some(mut current) = current else {
                return status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("{} \"{name}\" not found", t.plural),
                );
            };
            let new_status = patch.get("status").cloned().unwrap_or(Value::Null);
            merge(&mut current["status"], &new_status);
            let v = fk.put_json(&t.plural, current);
            json_response(StatusCode::OK, &v)
        }
        (Method::PATCH, Some(name), None) => {
            // Server-side apply creates or updates; a merge patch needs the object to exist.
            let ct = req
                .headers()
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let name = name.clone();
            let body: Value = match req.into_body().collect().await {
                Ok(b) => match serde_json::from_slice(&b.to_bytes()) {
                    Ok(v) => v,
                    Err(e) => {
                        return status(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string());
                    }
                },
                Err(_) => Value::Null,
            };
            let fk = FakeKube {
                inner: i.clone(),
                addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            };
            let current = fk.get(&t.plural, t.namespace.as_deref(), &name);
            let mut obj = match (ct.as_str(), current) {
                ("application/apply-patch+yaml", None) => Value::Object(Default::default()),
                ("application/apply-patch+yaml" | "application/merge-patch+json", Some(c)) => c,
                ("application/merge-patch+json", None) => {
                    return status(
                        StatusCode::NOT_FOUND,
                        "NotFound",
                        &format!("{} \"{name}\" not found", t.plural),
                    );
                }
                _ => {
                    return status(
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        "UnsupportedMediaType",
                        &format!("the fake does not support {ct:?} patches"),
                    );
                }
            };
            merge(&mut obj, &body);
            obj["metadata"]["name"] = name.into();
            if let Some(ns) = &t.namespace {
                obj["metadata"]["namespace"] = ns.clone().into();
            }
            let v = fk.put_json(&t.plural, obj);
            json_response(StatusCode::OK, &v)
        }
        _ => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "not supported by the fake",
        ),
    }
}

/// JSON merge patch (RFC 7386).
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn watch(i: Arc<Inner>, t: Target, q: BTreeMap<String, String>) -> Response<Body> {
    let since: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let (backlog, mut rx) = {
        let st = i.state.lock().unwrap();
        let rx = i.events.subscribe();
        let backlog: Vec<Change> = st
            .history
            .iter()
            .filter(|c| c.rv > since)
            .cloned()
            .collect();
        (backlog, rx)
    };
    let matches = move |c: &Change| {
        c.plural == t.plural && (t.namespace.is_none() || c.namespace == t.namespace)
    };
    let m2 = matches.clone();
    let (tx, out) = tokio::sync::mpsc::channel::<Bytes>(1024);
    let bytes = i.clone();
    tokio::spawn(async move {
        let send = |c: &Change| {
            let line = format!("{}\n", json!({ "type": c.kind, "object": c.object }));
            bytes
                .watch_bytes
                .fetch_add(line.len() as u64, Ordering::Relaxed);
            Bytes::from(line)
        };
        for c in backlog.iter().filter(|c| m2(c)) {
            if tx.send(send(c)).await.is_err() {
                return;
            }
        }
        let last = backlog.last().map_or(since, |c| c.rv);
        loop {
            match rx.recv().await {
                Ok(c) if c.rv > last && matches(&c) => {
                    if tx.send(send(&c)).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // Tell the client to relist, as an API server does for an expired version.
                    let gone = json!({ "type": "ERROR", "object": { "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Expired", "code": 410, "message": "too old resource version" } });
                    let _ = tx.send(Bytes::from(format!("{gone}\n"))).await;
                    return;
                }
                Err(_) => return,
            }
        }
    });
    let stream = tokio_stream_from(out).map(|b| Ok::<_, Infallible>(Frame::data(b)));
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Bytes>,
) -> impl futures::Stream<Item = Bytes> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

async fn token_review(i: &Inner, req: Request<Incoming>) -> Response<Body> {
    i.token_reviews.fetch_add(1, Ordering::Relaxed);
    let body: Value = match req.into_body().collect().await {
        Ok(b) => serde_json::from_slice(&b.to_bytes()).unwrap_or(Value::Null),
        Err(_) => Value::Null,
    };
    let token = body["spec"]["token"].as_str().unwrap_or("").to_owned();
    let wanted: Vec<String> = body["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let fail = |msg: &str| {
        json_response(
            StatusCode::CREATED,
            &json!({ "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": body["spec"],
                     "status": { "authenticated": false, "error": msg } }),
        )
    };
    // Verify as the API server does: signature with its key, issuer, time, audience, and that
    // the bound pod still exists with the same UID.
    let jwk = &i.signer.jwks["keys"][0];
    let Ok(key) = jsonwebtoken::DecodingKey::from_rsa_components(
        jwk["n"].as_str().unwrap(),
        jwk["e"].as_str().unwrap(),
    ) else {
        return fail("bad key");
    };
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    v.validate_aud = false;
    v.validate_nbf = true;
    v.leeway = 0;
    v.set_issuer(&[&i.issuer]);
    let claims = match jsonwebtoken::decode::<Value>(&token, &key, &v) {
        Ok(d) => d.claims,
        Err(e) => return fail(&format!("invalid bearer token: {e}")),
    };
    let aud: Vec<String> = claims["aud"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let granted: Vec<String> = if wanted.is_empty() {
        aud.clone()
    } else {
        aud.iter().filter(|a| wanted.contains(a)).cloned().collect()
    };
    if granted.is_empty() {
        return fail("token audiences are invalid for the target audiences");
    }
    let k = &claims["kubernetes.io"];
    let (ns, pod, pod_uid) = (
        k["namespace"].as_str().unwrap_or(""),
        k["pod"]["name"].as_str().unwrap_or(""),
        k["pod"]["uid"].as_str().unwrap_or(""),
    );
    let bound = {
        let st = i.state.lock().unwrap();
        st.objects
            .get(&("pods".into(), Some(ns.to_owned()), pod.to_owned()))
            .cloned()
    };
    match bound {
        Some(p) if p["metadata"]["uid"].as_str() == Some(pod_uid) => {}
        _ => return fail(&format!("pod {ns}/{pod} with uid {pod_uid} does not exist")),
    }
    let mut extra = json!({
        "authentication.kubernetes.io/pod-name": [pod],
        "authentication.kubernetes.io/pod-uid": [pod_uid],
    });
    if let Some(n) = k["node"]["name"].as_str() {
        extra["authentication.kubernetes.io/node-name"] = json!([n]);
        extra["authentication.kubernetes.io/node-uid"] = json!([k["node"]["uid"]]);
    }
    json_response(
        StatusCode::CREATED,
        &json!({ "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": body["spec"],
                 "status": { "authenticated": true, "audiences": granted,
                             "user": { "username": claims["sub"], "uid": k["serviceaccount"]["uid"],
                                       "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{ns}"), "system:authenticated"],
                                       "extra": extra } } }),
    )
}

/// A fake kubelet: HTTPS `/pods` listing the pods bound to one node, bearer token required.
#[derive(Debug, Clone)]
pub struct FakeKubelet {
    /// Where it listens.
    pub addr: SocketAddr,
    /// PEM of the CA that signed its serving certificate.
    pub ca_pem: String,
    /// Requests answered.
    pub hits: Arc<AtomicU64>,
}

impl FakeKubelet {
    async fn start(kube: FakeKube, node: String, token: String) -> Self {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec![]).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "kubelet-ca");
        let ca = p.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(p, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let mut lp =
            rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .unwrap();
        lp.distinguished_name.push(rcgen::DnType::CommonName, &node);
        let leaf = lp.signed_by(&key, &issuer).unwrap();
        let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let hits = Arc::new(AtomicU64::new(0));
        let h = hits.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = l.accept().await else {
                    return;
                };
                let (acceptor, kube, node, token, h) = (
                    acceptor.clone(),
                    kube.clone(),
                    node.clone(),
                    token.clone(),
                    h.clone(),
                );
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (kube, node, token, h) =
                            (kube.clone(), node.clone(), token.clone(), h.clone());
                        async move {
                            h.fetch_add(1, Ordering::Relaxed);
                            let auth = req
                                .headers()
                                .get("authorization")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("");
                            if auth != format!("Bearer {token}") {
                                return Ok::<_, Infallible>(status(
                                    StatusCode::UNAUTHORIZED,
                                    "Unauthorized",
                                    "Unauthorized",
                                ));
                            }
                            if req.uri().path() != "/pods" {
                                return Ok(status(StatusCode::NOT_FOUND, "NotFound", "not found"));
                            }
                            let items = kube.pods_on(&node);
                            Ok(json_response(
                                StatusCode::OK,
                                &json!({ "kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items }),
                            ))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            ca_pem: ca.pem(),
            hits,
        }
    }
}
