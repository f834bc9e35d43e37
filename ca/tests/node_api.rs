//! The node API under attack, over real TLS against an in-process CA: join tokens (unknown,
//! reused, expired), bad CSRs, entries of other agents, foreign and expired agent SVIDs,
//! superseded SVIDs after renewal, evicted agents. Every refusal has the right code and leaves
//! nothing behind.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tonic::Code;
use ward_ca::entries::EntrySpec;
use ward_proto::node::{
    AttestRequest, BatchNewX509SvidRequest, JoinTokenAttestation, NewJwtSvidRequest,
    NewX509SvidParams, RenewAgentRequest, SyncRequest, attest_request::Method,
};
use ward_spiffe::{Clock, ManualClock};

fn attest_req(token: &str, csr: Vec<u8>) -> AttestRequest {
    AttestRequest {
        method: Some(Method::JoinToken(JoinTokenAttestation {
            token: token.to_owned(),
        })),
        csr,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_tokens_are_single_use_and_expire() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(SystemTime::now());
    let ca = common::start_ca(
        common::ca_config(dir.path(), "td.test"),
        Arc::new(clock.clone()),
    )
    .await;
    let mut client = common::node_client(&ca, None);

    // Unknown token.
    let (_, csr) = common::key_and_csr(None);
    let e = client
        .attest(attest_req("no-such-token", csr.clone()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // No method.
    let e = client
        .attest(AttestRequest {
            method: None,
            csr: csr.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    let (token, _) = ca
        .core
        .agents
        .create_join_token(Duration::from_secs(600), clock.now())
        .await
        .unwrap();
    // A bad CSR is refused and does not burn the token.
    let e = client
        .attest(attest_req(&token, b"not a csr".to_vec()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let (_, wrong_id) = common::key_and_csr(Some("spiffe://td.test/somebody/else"));
    let e = client
        .attest(attest_req(&token, wrong_id))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(ca.core.agents.list().await.unwrap().is_empty());

    // First use works; another key is refused.
    let ok = client
        .attest(attest_req(&token, csr.clone()))
        .await
        .unwrap()
        .into_inner();
    let first = ok.svid.unwrap();
    assert!(
        first
            .spiffe_id
            .starts_with("spiffe://td.test/ward/agent/join_token/")
    );
    assert_eq!(ok.bundle.unwrap().x509_authorities.len(), 1);
    let (_, other_key) = common::key_and_csr(None);
    let e = client
        .attest(attest_req(&token, other_key))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("already been used"), "{}", e.message());
    let before = ca.core.agents.list().await.unwrap();
    assert_eq!(before.len(), 1);
    // The same key again: an agent retrying an attestation whose answer it lost (the commit
    // was durable, the reply timed out) becomes the same agent, with a new SVID that
    // supersedes the first.
    let again = client
        .attest(attest_req(&token, csr.clone()))
        .await
        .unwrap()
        .into_inner()
        .svid
        .unwrap();
    assert_eq!(again.spiffe_id, first.spiffe_id);
    assert_ne!(again.cert_chain[0], first.cert_chain[0]);
    let agents = ca.core.agents.list().await.unwrap();
    assert_eq!(agents.len(), 1);
    assert_ne!(
        agents[0].serial, before[0].serial,
        "the first SVID is not superseded"
    );
    // Evicted: not even the same key gets back in.
    ca.core.agents.evict(&agents[0].id).await.unwrap();
    let e = client
        .attest(attest_req(&token, csr.clone()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("evicted"), "{}", e.message());

    // Expired token.
    let (late, _) = ca
        .core
        .agents
        .create_join_token(Duration::from_secs(600), clock.now())
        .await
        .unwrap();
    clock.advance(Duration::from_secs(601));
    let e = client
        .attest(attest_req(&late, csr.clone()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("expired"), "{}", e.message());
    assert_eq!(ca.core.agents.list().await.unwrap().len(), 1);
    // Expired tokens, used or not, are removed by the leader's pruning.
    assert_eq!(ca.core.agents.prune_tokens(clock.now()).await.unwrap(), 2);
    let e = client.attest(attest_req(&token, csr)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    ca.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_get_only_their_own_entries_signed() {
    let dir = tempfile::tempdir().unwrap();
    let ca = common::start_ca(
        common::ca_config(dir.path(), "td.test"),
        Arc::new(ward_spiffe::SystemClock),
    )
    .await;
    let agent = common::attest_agent(&ca).await;
    let other = common::attest_agent(&ca).await;
    let now = ca.core.clock.now();
    let mine = ca
        .core
        .entries
        .create(
            &EntrySpec {
                spiffe_id: "spiffe://td.test/web".into(),
                parent_id: agent.id.to_string(),
                selectors: vec!["unix:uid:1000".into()],
                dns_names: vec!["web.td.test".into()],
                ..Default::default()
            },
            "admin",
            "e-mine".into(),
            now,
        )
        .await
        .unwrap();
    let theirs = ca
        .core
        .entries
        .create(
            &EntrySpec {
                spiffe_id: "spiffe://td.test/db".into(),
                parent_id: other.id.to_string(),
                selectors: vec!["unix:uid:1000".into()],
                ..Default::default()
            },
            "admin",
            "e-theirs".into(),
            now,
        )
        .await
        .unwrap();
    let audit_before = ward_ca::audit::tail(ca.core.store.as_ref(), 10_000)
        .await
        .unwrap()
        .len();

    let mut client = common::node_client(&ca, Some(agent.clone()));
    let (_, good) = common::key_and_csr(None);
    let (_, named) = common::key_and_csr(Some("spiffe://td.test/web"));
    let (_, extra_san) = {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.subject_alt_names = vec![
            rcgen::SanType::URI("spiffe://td.test/web".try_into().unwrap()),
            rcgen::SanType::DnsName("evil.example".try_into().unwrap()),
        ];
        let csr = p.serialize_request(&key).unwrap().der().to_vec();
        (key, csr)
    };
    let (_, other_name) = common::key_and_csr(Some("spiffe://td.test/db"));
    let mut bad_sig = good.clone();
    let n = bad_sig.len();
    bad_sig[n - 3] ^= 0xff;
    let params = vec![
        (mine.id.clone(), good.clone()),
        (mine.id.clone(), named),
        (theirs.id.clone(), good.clone()),
        ("no-such-entry".to_owned(), good.clone()),
        (mine.id.clone(), extra_san),
        (mine.id.clone(), other_name),
        (mine.id.clone(), bad_sig),
        (mine.id.clone(), b"garbage".to_vec()),
        ("../../etc".to_owned(), good.clone()),
    ];
    let resp = client
        .batch_new_x509_svid(BatchNewX509SvidRequest {
            params: params
                .into_iter()
                .map(|(entry_id, csr)| NewX509SvidParams { entry_id, csr })
                .collect(),
        })
        .await
        .unwrap()
        .into_inner();
    let codes: Vec<i32> = resp.results.iter().map(|r| r.error_code).collect();
    let (ok, inv, denied) = (
        Code::Ok as i32,
        Code::InvalidArgument as i32,
        Code::PermissionDenied as i32,
    );
    assert_eq!(
        codes,
        vec![ok, ok, denied, denied, inv, inv, inv, inv, denied],
        "{resp:?}"
    );
    for r in &resp.results[..2] {
        let svid = r.svid.as_ref().unwrap();
        assert_eq!(svid.spiffe_id, "spiffe://td.test/web");
        let info =
            ward_spiffe::x509::check_leaf(&svid.cert_chain[0], ward_spiffe::x509::Profile::Issued)
                .unwrap();
        assert_eq!(info.dns_names, vec!["web.td.test".to_owned()]);
    }
    // Only the two successes were logged.
    let audit_after = ward_ca::audit::tail(ca.core.store.as_ref(), 10_000)
        .await
        .unwrap();
    let new: Vec<_> = audit_after[audit_before..]
        .iter()
        .filter(|r| r.event == "x509-svid")
        .collect();
    assert_eq!(new.len(), 2);
    assert!(
        new.iter()
            .all(|r| r.caller == agent.id.as_str() && r.entry_id == mine.id)
    );

    // JWT-SVIDs likewise.
    let jwt = client
        .new_jwt_svid(NewJwtSvidRequest {
            entry_id: mine.id.clone(),
            audience: vec!["a".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(jwt.spiffe_id, "spiffe://td.test/web");
    let e = client
        .new_jwt_svid(NewJwtSvidRequest {
            entry_id: theirs.id.clone(),
            audience: vec!["a".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = client
        .new_jwt_svid(NewJwtSvidRequest {
            entry_id: mine.id.clone(),
            audience: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // Without a client certificate nothing but Attest works.
    let mut anon = common::node_client(&ca, None);
    let e = anon
        .batch_new_x509_svid(BatchNewX509SvidRequest {
            params: vec![NewX509SvidParams {
                entry_id: mine.id.clone(),
                csr: good,
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    ca.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_expired_superseded_and_evicted_agents_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(SystemTime::now());
    let ca = common::start_ca(
        common::ca_config(dir.path(), "td.test"),
        Arc::new(clock.clone()),
    )
    .await;
    let agent = common::attest_agent(&ca).await;

    // An SVID with the same ID from another CA of the same trust domain name: TLS refuses it.
    let dir2 = tempfile::tempdir().unwrap();
    let ca2 = common::start_ca(
        common::ca_config(dir2.path(), "td.test"),
        Arc::new(ward_spiffe::SystemClock),
    )
    .await;
    let key = rcgen::KeyPair::generate().unwrap();
    let set = ca2.core.authorities.current();
    let forged = set
        .x509
        .issue_svid(
            &key,
            &agent.id,
            &[],
            Duration::from_secs(600),
            &set.bundle,
            SystemTime::now(),
            &mut rand::rng(),
        )
        .unwrap()
        .0;
    let forged = ward_net::Svid::from_parts(forged, key.serialize_der()).unwrap();
    let (_, csr) = common::key_and_csr(None);
    let e = common::node_client(&ca, Some(forged))
        .renew_agent(RenewAgentRequest { csr: csr.clone() })
        .await
        .unwrap_err();
    assert_ne!(e.code(), Code::Ok);
    ca2.shutdown().await;

    // Renewal: the old SVID keeps working until the new one is used, then it is superseded.
    let mut old_client = common::node_client(&ca, Some(agent.clone()));
    let (new_key, new_csr) = common::key_and_csr(Some(agent.id.as_str()));
    let renewed = old_client
        .renew_agent(RenewAgentRequest { csr: new_csr })
        .await
        .unwrap()
        .into_inner();
    let new_svid =
        ward_net::Svid::from_parts(renewed.svid.unwrap().cert_chain, new_key.serialize_der())
            .unwrap();
    let mut stream = old_client
        .sync(SyncRequest { since_revision: 0 })
        .await
        .unwrap()
        .into_inner();
    assert!(
        stream.message().await.unwrap().is_some(),
        "old SVID still accepted before first use of the new one"
    );
    drop(stream);
    let mut new_client = common::node_client(&ca, Some(new_svid.clone()));
    new_client
        .sync(SyncRequest { since_revision: 0 })
        .await
        .unwrap();
    let mut old_again = common::node_client(&ca, Some(agent.clone()));
    let e = old_again
        .sync(SyncRequest { since_revision: 0 })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("superseded"));

    // Expired: the CA's clock passes the SVID's expiry.
    clock.advance(Duration::from_secs(2 * 3600));
    let (_, csr2) = common::key_and_csr(None);
    let e = common::node_client(&ca, Some(new_svid.clone()))
        .renew_agent(RenewAgentRequest { csr: csr2 })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");

    // Evicted: refused everything, including an open sync stream.
    let dir3 = tempfile::tempdir().unwrap();
    let ca3 = common::start_ca(
        common::ca_config(dir3.path(), "td.test"),
        Arc::new(ward_spiffe::SystemClock),
    )
    .await;
    let a3 = common::attest_agent(&ca3).await;
    let mut c3 = common::node_client(&ca3, Some(a3.clone()));
    let mut live = c3
        .sync(SyncRequest { since_revision: 0 })
        .await
        .unwrap()
        .into_inner();
    live.message().await.unwrap().unwrap();
    ca3.core.agents.evict(&a3.id).await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), live.message())
        .await
        .unwrap();
    assert_eq!(end.unwrap_err().code(), Code::PermissionDenied);
    let e = c3
        .sync(SyncRequest { since_revision: 0 })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("evicted"));
    let (_, csr3) = common::key_and_csr(None);
    let e = c3
        .renew_agent(RenewAgentRequest { csr: csr3 })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    ca3.shutdown().await;
    ca.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_streams_full_then_incremental_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let ca = common::start_ca(
        common::ca_config(dir.path(), "td.test"),
        Arc::new(ward_spiffe::SystemClock),
    )
    .await;
    let agent = common::attest_agent(&ca).await;
    let other = common::attest_agent(&ca).await;
    let spec = |id: &str, parent: &str| EntrySpec {
        spiffe_id: format!("spiffe://td.test/{id}"),
        parent_id: parent.to_owned(),
        selectors: vec!["unix:uid:1".into()],
        ..Default::default()
    };
    let now = SystemTime::now();
    ca.core
        .entries
        .create(&spec("a", agent.id.as_str()), "admin", "ea".into(), now)
        .await
        .unwrap();
    ca.core
        .entries
        .create(&spec("x", other.id.as_str()), "admin", "ex".into(), now)
        .await
        .unwrap();

    let mut client = common::node_client(&ca, Some(agent.clone()));
    let mut s = client
        .sync(SyncRequest { since_revision: 0 })
        .await
        .unwrap()
        .into_inner();
    let first = s.message().await.unwrap().unwrap();
    assert!(first.full);
    assert_eq!(
        first
            .upserted
            .iter()
            .map(|e| e.id.as_str())
            .collect::<Vec<_>>(),
        vec!["ea"]
    );
    assert!(first.bundle.is_some());

    // Another agent's entry produces nothing here; ours arrives as an increment.
    ca.core
        .entries
        .create(&spec("y", other.id.as_str()), "admin", "ey".into(), now)
        .await
        .unwrap();
    ca.core
        .entries
        .create(&spec("b", agent.id.as_str()), "admin", "eb".into(), now)
        .await
        .unwrap();
    let u = tokio::time::timeout(Duration::from_secs(5), s.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(!u.full);
    assert_eq!(
        u.upserted.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
        vec!["eb"]
    );
    assert!(u.removed.is_empty());
    assert!(u.bundle.is_none());
    let rev = u.revision;

    // Moving an entry away is a removal.
    ca.core
        .entries
        .update("ea", &spec("a", other.id.as_str()), 0)
        .await
        .unwrap();
    let u = tokio::time::timeout(Duration::from_secs(5), s.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(u.removed, vec!["ea".to_owned()]);
    drop(s);

    // Resuming from `rev` replays only what changed since.
    ca.core.entries.delete("eb").await.unwrap();
    let mut s = client
        .sync(SyncRequest {
            since_revision: rev,
        })
        .await
        .unwrap()
        .into_inner();
    let u = s.message().await.unwrap().unwrap();
    assert!(!u.full);
    assert!(u.upserted.is_empty());
    let mut removed = u.removed.clone();
    removed.sort();
    assert_eq!(removed, vec!["ea".to_owned(), "eb".to_owned()]);
    ca.shutdown().await;
}

/// An agent over its signing rate (`limits.signing_*`) gets RESOURCE_EXHAUSTED with the wait,
/// counted; a batch larger than the burst is refused whole; other agents are not affected.
#[tokio::test]
async fn signing_is_rate_limited_per_agent() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::ca_config(&dir.path().join("ca"), "td.test");
    cfg.limits = ward_ca::config::Limits {
        signing_per_second: 1,
        signing_burst: 3,
        ..Default::default()
    };
    let ca = common::start_ca(cfg, Arc::new(ward_spiffe::SystemClock)).await;
    let mut clients = Vec::new();
    for name in ["a", "b"] {
        let agent = common::attest_agent(&ca).await;
        let e = ca
            .core
            .entries
            .create(
                &EntrySpec {
                    spiffe_id: format!("spiffe://td.test/{name}"),
                    parent_id: agent.id.to_string(),
                    selectors: vec!["unix:uid:1000".into()],
                    ..Default::default()
                },
                "admin",
                format!("e-{name}"),
                ca.core.clock.now(),
            )
            .await
            .unwrap();
        clients.push((common::node_client(&ca, Some(agent)), e.id));
    }
    let batch = |entry: &str, n: usize| BatchNewX509SvidRequest {
        params: (0..n)
            .map(|_| NewX509SvidParams {
                entry_id: entry.to_owned(),
                csr: common::key_and_csr(None).1,
            })
            .collect(),
    };
    let (a, a_entry) = &mut clients[0];
    let e = a.batch_new_x509_svid(batch(a_entry, 4)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(e.message().contains("larger than the burst of 3"), "{e:?}");
    let ok = a.batch_new_x509_svid(batch(a_entry, 3)).await.unwrap();
    assert!(ok.into_inner().results.iter().all(|r| r.svid.is_some()));
    let e = a.batch_new_x509_svid(batch(a_entry, 2)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(e.message().contains("over its signing rate"), "{e:?}");
    let e = a
        .new_jwt_svid(NewJwtSvidRequest {
            entry_id: a_entry.clone(),
            audience: vec!["x".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    let (b, b_entry) = &mut clients[1];
    b.batch_new_x509_svid(batch(b_entry, 3)).await.unwrap();
    let refused = |kind: &str| {
        ca.core
            .metrics
            .rate_limited
            .get_or_create(&ward_ca::metrics::KindLabel { kind: kind.into() })
            .get()
    };
    assert_eq!((refused("x509"), refused("jwt")), (2, 1));
    // The rate refills: a second later one more signing is allowed.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (a, a_entry) = &mut clients[0];
    a.batch_new_x509_svid(batch(a_entry, 1)).await.unwrap();
}

/// Messages over `limits.node_api_max_message_bytes` / `admin_api_max_message_bytes` are
/// refused (tonic answers `OUT_OF_RANGE`, "decoded message length too large") before anything
/// is done with them, counted per API and code; messages within the limits still work.
#[tokio::test]
async fn oversized_messages_are_refused_on_both_apis() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::ca_config(&dir.path().join("ca"), "td.test");
    cfg.limits.node_api_max_message_bytes = 64 * 1024;
    cfg.limits.admin_api_max_message_bytes = 64 * 1024;
    let ca = common::start_ca(cfg, Arc::new(ward_spiffe::SystemClock)).await;
    let agent = common::attest_agent(&ca).await;
    let mut node = common::node_client(&ca, Some(agent));
    // 600 CSRs of ~300 bytes: over 64 KiB.
    let big = BatchNewX509SvidRequest {
        params: (0..600)
            .map(|_| NewX509SvidParams {
                entry_id: "e".into(),
                csr: common::key_and_csr(None).1,
            })
            .collect(),
    };
    let code = node.batch_new_x509_svid(big).await.err().map(|e| e.code());
    assert_eq!(code, Some(Code::OutOfRange));
    let mut admin = ward_proto::admin::admin_client::AdminClient::new(
        ward_net::process::unix_channel(&ca.admin_socket),
    );
    let e = admin
        .create_entry(ward_proto::admin::EntrySpec {
            spiffe_id: "spiffe://td.test/big".into(),
            parent_id: "spiffe://td.test/x".into(),
            selectors: vec!["unix:uid:1".into()],
            hint: "h".repeat(100 * 1024),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    let refused = |api: &str| {
        ca.core
            .metrics
            .api_refusals
            .get_or_create(&ward_ca::metrics::RefusalLabel {
                api: api.into(),
                code: "OutOfRange".into(),
            })
            .get()
    };
    assert_eq!((refused("node"), refused("admin")), (1, 1));
    // Within the limits, both APIs answer.
    admin
        .get_bundle(ward_proto::admin::GetBundleRequest::default())
        .await
        .unwrap();
    let mut s = node
        .sync(SyncRequest { since_revision: 0 })
        .await
        .unwrap()
        .into_inner();
    assert!(s.message().await.unwrap().is_some());
    // A limit too small for the CA to work is refused at start.
    let mut bad = common::ca_config(&dir.path().join("ca2"), "td.test");
    bad.limits.admin_api_max_message_bytes = 1000;
    let e = bad.validate().unwrap_err().to_string();
    assert!(e.contains("limits.admin_api_max_message_bytes"), "{e}");
}

/// An agent whose attestation committed at the CA but whose answer was lost (it crashed, or
/// the call timed out) starts again with the same join token: it kept the key it attested
/// with, so the CA recognises it and it becomes the agent it already was, instead of being
/// locked out by "join token already used".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_attestation_answer_was_lost_attests_again_with_its_token() {
    let dir = tempfile::tempdir().unwrap();
    let ca = common::start_ca(
        common::ca_config(&dir.path().join("ca"), "td.test"),
        Arc::new(ward_spiffe::SystemClock),
    )
    .await;
    let cfg = common::agent_config(&ca, dir.path()).await;
    let token = cfg.join_token.clone().unwrap();
    // The first attempt: the agent saved its key, the CA committed, the answer never came.
    let (key, csr) = common::key_and_csr(None);
    std::fs::create_dir_all(&cfg.data_dir).unwrap();
    std::fs::write(cfg.data_dir.join("attestation.key"), key.serialize_pem()).unwrap();
    let mut client = common::node_client(&ca, None);
    let lost = client
        .attest(attest_req(&token, csr))
        .await
        .unwrap()
        .into_inner()
        .svid
        .unwrap();
    let agent = common::start_agent(cfg.clone()).await;
    assert_eq!(agent.identity.id().unwrap().to_string(), lost.spiffe_id);
    assert_eq!(ca.core.agents.list().await.unwrap().len(), 1);
    assert!(
        !cfg.data_dir.join("attestation.key").exists(),
        "the attestation key outlived its SVID"
    );
    agent.shutdown().await;
    ca.shutdown().await;
}
