//! The authority lifecycle through the admin API and CLI: the safety rails (each refusal with
//! its gRPC code and nothing changed), the journal, JWT key rotation with a live token, and the
//! upstream mode: rotating to a new upstream root by replacing the files, refusing an upstream
//! bundle that would leave no usable root, and refusing an agent whose chain goes through a
//! revoked intermediate under a root that is still trusted.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tonic::Code;
use ward_ca::CaServer;
use ward_ca::entries::EntrySpec;
use ward_proto::admin::{self, admin_client::AdminClient};
use ward_proto::node::{NewJwtSvidRequest, SyncRequest};

type Admin = AdminClient<tonic::transport::Channel>;

fn admin(ca: &CaServer) -> Admin {
    AdminClient::new(ward_net::process::unix_channel(&ca.admin_socket))
}

async fn change(
    adm: &mut Admin,
    kind: &str,
    action: &str,
    id: &str,
    force: bool,
) -> Result<admin::Authority, tonic::Status> {
    adm.change_authority(admin::ChangeAuthorityRequest {
        kind: kind.into(),
        action: action.into(),
        id: id.into(),
        force,
    })
    .await
    .map(tonic::Response::into_inner)
}

async fn list(adm: &mut Admin, kind: &str) -> Vec<admin::Authority> {
    adm.list_authorities(admin::ListAuthoritiesRequest { kind: kind.into() })
        .await
        .unwrap()
        .into_inner()
        .authorities
}

fn state_of<'a>(list: &'a [admin::Authority], id: &str) -> &'a str {
    &list.iter().find(|a| a.id == id).unwrap().state
}

/// Expects a refusal with `code` whose message contains `words`, and no change to the list.
async fn refused(adm: &mut Admin, kind: &str, action: &str, id: &str, code: Code, words: &str) {
    let before = list(adm, "x509").await;
    let before_jwt = list(adm, "jwt").await;
    let seq = adm
        .get_bundle(admin::GetBundleRequest {})
        .await
        .unwrap()
        .into_inner()
        .sequence;
    let e = change(adm, kind, action, id, false).await.unwrap_err();
    assert_eq!(e.code(), code, "{action} {id}: {}", e.message());
    assert!(
        e.message().contains(words),
        "{action} {id}: {:?} lacks {words:?}",
        e.message()
    );
    assert_eq!(
        list(adm, "x509").await,
        before,
        "{action} {id} changed state"
    );
    assert_eq!(
        list(adm, "jwt").await,
        before_jwt,
        "{action} {id} changed state"
    );
    let after = adm
        .get_bundle(admin::GetBundleRequest {})
        .await
        .unwrap()
        .into_inner()
        .sequence;
    assert_eq!(after, seq, "{action} {id} changed the bundle");
}

async fn add_entry(ca: &CaServer, parent: &str, path: &str) -> String {
    let id = ward_ca::core::CaCore::new_entry_id();
    ca.core
        .entries
        .create(
            &EntrySpec {
                spiffe_id: format!("spiffe://{}/{path}", ca.core.cfg.trust_domain),
                parent_id: parent.into(),
                selectors: vec!["unix:uid:4242".into()],
                ..Default::default()
            },
            "admin",
            id.clone(),
            ca.core.clock.now(),
        )
        .await
        .unwrap();
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rails_journal_and_jwt_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let ca = common::start_ca(
        common::ca_config(&dir.path().join("ca"), "auth.test"),
        Arc::new(ward_spiffe::SystemClock),
    )
    .await;
    let mut adm = admin(&ca);
    let first = list(&mut adm, "x509").await;
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].state, "active");
    let a = first[0].id.clone();

    // An agent and one workload SVID signed by A.
    let agent_svid = common::attest_agent(&ca).await;
    let agent_id = agent_svid.id.to_string();
    let entry = add_entry(&ca, &agent_id, "web").await;
    let (_k, csr) = common::key_and_csr(Some("spiffe://auth.test/web"));
    let mut node = common::node_client(&ca, Some(agent_svid.clone()));
    let r = node
        .batch_new_x509_svid(ward_proto::node::BatchNewX509SvidRequest {
            params: vec![ward_proto::node::NewX509SvidParams {
                entry_id: entry.clone(),
                csr,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.results[0].error_code, 0);
    let shown = list(&mut adm, "x509").await;
    assert_eq!(
        shown[0].live_svids, 2,
        "agent SVID + workload SVID: {shown:?}"
    );

    // Rails on a single active authority.
    refused(
        &mut adm,
        "x509",
        "taint",
        &a,
        Code::FailedPrecondition,
        "is active",
    )
    .await;
    refused(
        &mut adm,
        "x509",
        "revoke",
        &a,
        Code::FailedPrecondition,
        "is active",
    )
    .await;
    refused(
        &mut adm,
        "x509",
        "activate",
        "",
        Code::FailedPrecondition,
        "no prepared",
    )
    .await;
    refused(
        &mut adm,
        "x509",
        "taint",
        "x509-nope",
        Code::NotFound,
        "no x509 authority",
    )
    .await;
    refused(
        &mut adm,
        "x509",
        "explode",
        &a,
        Code::InvalidArgument,
        "expected prepare",
    )
    .await;
    refused(
        &mut adm,
        "rsa",
        "prepare",
        "",
        Code::InvalidArgument,
        "x509 or jwt",
    )
    .await;
    refused(&mut adm, "x509", "revoke", "", Code::InvalidArgument, "id").await;

    // Prepare: published at once, not signing.
    let seq0 = ca.core.bundle().sequence;
    let b = change(&mut adm, "x509", "prepare", "", false)
        .await
        .unwrap();
    assert_eq!(b.state, "prepared");
    assert_eq!(ca.core.bundle().x509_authorities.len(), 2);
    assert!(ca.core.bundle().sequence > seq0);
    assert_eq!(ca.core.authorities.current().x509.id, a);
    refused(
        &mut adm,
        "x509",
        "prepare",
        "",
        Code::FailedPrecondition,
        "already prepared",
    )
    .await;
    refused(
        &mut adm,
        "x509",
        "activate",
        &a,
        Code::FailedPrecondition,
        "only a prepared",
    )
    .await;

    // Activate: B signs, A is old and still trusted.
    let act = change(&mut adm, "x509", "activate", "", false)
        .await
        .unwrap();
    assert_eq!(
        (act.id.as_str(), act.state.as_str()),
        (b.id.as_str(), "active")
    );
    assert_eq!(ca.core.authorities.current().x509.id, b.id);
    let l = list(&mut adm, "x509").await;
    assert_eq!(state_of(&l, &a), "old");

    // Revoking A while its SVIDs are live is refused, with the count; --force is not needed
    // once they are replaced. Replace them: renew the agent SVID, re-sign the workload SVID.
    refused(
        &mut adm,
        "x509",
        "revoke",
        &a,
        Code::FailedPrecondition,
        "2 unexpired SVID(s)",
    )
    .await;
    let (k2, csr) = common::key_and_csr(Some(&agent_id));
    let renewed = node
        .renew_agent(ward_proto::node::RenewAgentRequest { csr })
        .await
        .unwrap()
        .into_inner()
        .svid
        .unwrap();
    let new_agent = ward_net::Svid::from_parts(renewed.cert_chain, k2.serialize_der()).unwrap();
    let mut node2 = common::node_client(&ca, Some(new_agent));
    let (_k, csr) = common::key_and_csr(Some("spiffe://auth.test/web"));
    let r = node2
        .batch_new_x509_svid(ward_proto::node::BatchNewX509SvidRequest {
            params: vec![ward_proto::node::NewX509SvidParams {
                entry_id: entry.clone(),
                csr,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.results[0].error_code, 0);
    let l = list(&mut adm, "x509").await;
    assert_eq!(l.iter().find(|x| x.id == a).unwrap().live_svids, 0, "{l:?}");

    // Taint, then revoke: A leaves the bundle; the old agent SVID (signed by A) is refused.
    let t = change(&mut adm, "x509", "taint", &a, false).await.unwrap();
    assert_eq!(t.state, "tainted");
    refused(
        &mut adm,
        "x509",
        "taint",
        &a,
        Code::FailedPrecondition,
        "already tainted",
    )
    .await;
    let r = change(&mut adm, "x509", "revoke", &a, false).await.unwrap();
    assert_eq!(r.state, "revoked");
    assert_eq!(ca.core.bundle().x509_authorities.len(), 1);
    let e = common::node_client(&ca, Some(agent_svid.clone()))
        .sync(SyncRequest { since_revision: 0 })
        .await
        .expect_err("an agent SVID from a revoked root must be refused");
    // TLS 1.3: the refused client certificate surfaces as a failed connection or a closed one.
    assert!(
        matches!(
            e.code(),
            Code::Unavailable | Code::Unauthenticated | Code::Unknown | Code::Cancelled
        ),
        "{e:?}"
    );

    // The journal: every change, in order, with who made it.
    let journal: Vec<(String, String, String)> = ward_ca::audit::tail(ca.core.store.as_ref(), 1000)
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.event.starts_with("authority-") && r.serial == "x509")
        .map(|r| (r.event, r.authority, r.caller))
        .collect();
    let want = [
        ("authority-active", &a, "schedule"),
        ("authority-prepared", &b.id, "admin"),
        ("authority-active", &b.id, "admin"),
        ("authority-old", &a, "admin"),
        ("authority-tainted", &a, "admin"),
        ("authority-revoked", &a, "admin"),
    ];
    let want: Vec<(String, String, String)> = want
        .iter()
        .map(|(e, id, who)| (e.to_string(), id.to_string(), who.to_string()))
        .collect();
    assert_eq!(journal, want);

    // JWT: a token minted by J1 keeps J1 from being revoked until --force; after that the
    // bundle has no J1 key and new tokens carry J2's kid.
    let j1 = list(&mut adm, "jwt").await[0].id.clone();
    let tok = node2
        .new_jwt_svid(NewJwtSvidRequest {
            entry_id: entry.clone(),
            audience: vec!["db".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ward_spiffe::jwt::check_header(&tok.token).unwrap().1, j1);
    let j2 = change(&mut adm, "jwt", "prepare", "", false).await.unwrap();
    change(&mut adm, "jwt", "activate", &j2.id, false)
        .await
        .unwrap();
    change(&mut adm, "jwt", "taint", &j1, false).await.unwrap();
    refused(
        &mut adm,
        "jwt",
        "revoke",
        &j1,
        Code::FailedPrecondition,
        "1 unexpired SVID(s)",
    )
    .await;
    let forced = change(&mut adm, "jwt", "revoke", &j1, true).await.unwrap();
    assert_eq!(forced.state, "revoked");
    let kids: Vec<String> = ca
        .core
        .bundle()
        .jwt_authorities
        .iter()
        .map(|k| k.key_id.clone())
        .collect();
    assert_eq!(kids, vec![j2.id.clone()]);
    let tok = node2
        .new_jwt_svid(NewJwtSvidRequest {
            entry_id: entry,
            audience: vec!["db".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ward_spiffe::jwt::check_header(&tok.token).unwrap().1, j2.id);

    // The CLI: JSON listing and a refusal with exit code 5 and the reason on stderr.
    let sock = ca.admin_socket.to_str().unwrap().to_owned();
    let out = std::process::Command::new(common::ca_bin())
        .args(["authority", "x509", "show", "--socket", &sock, "-o", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let states: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["state"].as_str().unwrap())
        .collect();
    assert!(
        states.contains(&"active") && states.contains(&"revoked"),
        "{v}"
    );
    let out = std::process::Command::new(common::ca_bin())
        .args(["authority", "x509", "taint", &b.id, "--socket", &sock])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is active"));

    // Metrics show each authority's state.
    let m = common::scrape(ca.health_addr).await;
    assert!(
        m.contains(&format!(
            "ward_ca_authority_state{{kind=\"x509\",id=\"{a}\",state=\"revoked\"}} 1"
        )),
        "{m}"
    );
    ca.shutdown().await;
}

/// A self-signed upstream root (also the signing certificate) written as the CA's upstream
/// files: cert, key, bundle.
fn write_upstream(dir: &Path, name: &str, bundle_extra: Option<&str>) -> String {
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, format!("Upstream {name}"));
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let now = SystemTime::now();
    p.not_before = (now - Duration::from_secs(600)).into();
    p.not_after = (now + Duration::from_secs(30 * 86400)).into();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = p.self_signed(&key).unwrap();
    std::fs::write(dir.join("up.crt"), cert.pem()).unwrap();
    std::fs::write(dir.join("up.key"), key.serialize_pem()).unwrap();
    std::fs::write(
        dir.join("up-bundle.pem"),
        bundle_extra.unwrap_or(&cert.pem()),
    )
    .unwrap();
    cert.pem()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_rotation_to_a_new_root() {
    let dir = tempfile::tempdir().unwrap();
    let up = dir.path().join("upstream");
    std::fs::create_dir_all(&up).unwrap();
    let root1 = write_upstream(&up, "one", None);
    let mut cfg = common::ca_config(&dir.path().join("ca"), "up.test");
    cfg.upstream = Some(ward_ca::config::UpstreamConfig {
        cert_file: up.join("up.crt"),
        key_file: up.join("up.key"),
        bundle_file: up.join("up-bundle.pem"),
    });
    let ca = common::start_ca(cfg, Arc::new(ward_spiffe::SystemClock)).await;
    let mut adm = admin(&ca);
    let a = list(&mut adm, "x509").await[0].id.clone();
    let r1 = ward_spiffe::bundle::pem_certificates(root1.as_bytes()).unwrap();
    assert_eq!(ca.core.bundle().x509_authorities, r1);
    let old_agent = common::attest_agent(&ca).await;
    assert_eq!(old_agent.chain.len(), 2, "leaf, Ward intermediate");

    // A new intermediate under the same root: both authorities share the root.
    let b = change(&mut adm, "x509", "prepare", "", false)
        .await
        .unwrap();
    assert!(b.upstream);
    assert_eq!(ca.core.bundle().x509_authorities, r1);
    change(&mut adm, "x509", "activate", "", false)
        .await
        .unwrap();
    change(&mut adm, "x509", "taint", &a, false).await.unwrap();
    // The old agent SVID is live: revoke needs --force. Its connection, opened before the
    // revocation, works until then.
    let mut old_node = common::node_client(&ca, Some(old_agent.clone()));
    let mut stream = old_node
        .sync(SyncRequest { since_revision: 0 })
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some());
    refused(
        &mut adm,
        "x509",
        "revoke",
        &a,
        Code::FailedPrecondition,
        "unexpired",
    )
    .await;
    change(&mut adm, "x509", "revoke", &a, true).await.unwrap();
    // The next call on that connection is refused.
    let e = old_node
        .sync(SyncRequest { since_revision: 0 })
        .await
        .expect_err("a connection from before the revocation must be refused");
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    // The root stays (B uses it), but a chain through the revoked intermediate is refused.
    assert_eq!(ca.core.bundle().x509_authorities, r1);
    let e = common::node_client(&ca, Some(old_agent))
        .sync(SyncRequest { since_revision: 0 })
        .await
        .expect_err("revoked intermediate");
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("revoked authority"), "{e:?}");
    let fresh = common::attest_agent(&ca).await;
    let mut s = common::node_client(&ca, Some(fresh))
        .sync(SyncRequest { since_revision: 0 })
        .await
        .unwrap()
        .into_inner();
    assert!(s.message().await.unwrap().is_some());

    // An upstream bundle that does not verify the upstream certificate: refused, nothing
    // stored, the bundle unchanged.
    let unrelated = {
        let d = dir.path().join("other");
        std::fs::create_dir_all(&d).unwrap();
        write_upstream(&d, "unrelated", None)
    };
    let cert_now = std::fs::read_to_string(up.join("up.crt")).unwrap();
    assert_eq!(cert_now, root1);
    std::fs::write(up.join("up-bundle.pem"), &unrelated).unwrap();
    refused(
        &mut adm,
        "x509",
        "prepare",
        "",
        Code::FailedPrecondition,
        "no usable root",
    )
    .await;

    // A new upstream root: replace the files, prepare, and both roots are published until the
    // old authority is revoked.
    let root2 = write_upstream(&up, "two", None);
    let r2 = ward_spiffe::bundle::pem_certificates(root2.as_bytes()).unwrap();
    let c = change(&mut adm, "x509", "prepare", "", false)
        .await
        .unwrap();
    let mut both = r1.clone();
    both.extend(r2.clone());
    both.sort();
    let mut published = ca.core.bundle().x509_authorities.clone();
    published.sort();
    assert_eq!(published, both);
    change(&mut adm, "x509", "activate", "", false)
        .await
        .unwrap();
    let leaf_chain = ca.core.issue_server_svid().unwrap().0;
    assert_eq!(leaf_chain.len(), 2);
    assert!(
        ward_spiffe::x509::signed_by(
            &leaf_chain[1],
            &ward_spiffe::x509::spki_der(&r2[0]).unwrap()
        ),
        "new SVIDs chain to the new upstream root"
    );
    change(&mut adm, "x509", "taint", &b.id, false)
        .await
        .unwrap();
    change(&mut adm, "x509", "revoke", &b.id, true)
        .await
        .unwrap();
    assert_eq!(ca.core.bundle().x509_authorities, r2);
    assert_eq!(state_of(&list(&mut adm, "x509").await, &c.id), "active");
    ca.shutdown().await;
}
