//! `ward-bench issuance`: X.509-SVIDs per second through the node API of one CA or of several
//! replicas on one etcd, against a raw ring verify+sign loop measured in the same run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use ward_proto::{admin, node};

use crate::procs::{StoreKind, Ward};
use crate::{csr, percentile};

pub(crate) async fn issuance(
    agents: usize,
    batch: usize,
    batches: usize,
    store: StoreKind,
    replicas: usize,
) -> Result<()> {
    if replicas == 0 || (replicas > 1 && store == StoreKind::Sled) {
        bail!("--replicas must be 1, or more on an etcd store (--store etcd or etcd3)");
    }
    let etcd = match store {
        StoreKind::Sled => None,
        StoreKind::Etcd => Some(ward_testing::etcd::Etcd::start()),
        StoreKind::Etcd3 => Some(ward_testing::etcd::Etcd::cluster(3)),
    };
    let mut cas = Vec::new();
    for _ in 0..replicas {
        cas.push(Ward::start_replica("bench.test", etcd.as_ref(), "").await?);
    }
    let mut admin = cas[0].admin();
    // Attest the simulated agents and give each `batch` entries.
    let mut clients = Vec::new();
    for i in 0..agents {
        let token = admin
            .create_join_token(admin::CreateJoinTokenRequest { ttl_seconds: 0 })
            .await?
            .into_inner();
        // Agent i talks to replica i mod R; its entries are written at the first replica.
        let (client, _svid) = cas[i % replicas].attested_node_client(&token.token).await?;
        let mut entries = Vec::new();
        for j in 0..batch {
            let id = format!("spiffe://bench.test/agent{i}/w{j}");
            let e = admin
                .create_entry(admin::EntrySpec {
                    spiffe_id: id.clone(),
                    parent_id: token.agent_id.clone(),
                    selectors: vec![format!("unix:uid:{j}")],
                    ..Default::default()
                })
                .await?
                .into_inner();
            entries.push((e.id, id));
        }
        clients.push((client, entries));
    }
    // CSRs are made before the clock starts: key generation is the agents' cost, not the CA's.
    let mut work = Vec::new();
    for (client, entries) in clients {
        let mut reqs = Vec::new();
        for _ in 0..batches {
            let mut params = Vec::new();
            for (eid, id) in &entries {
                let key = rcgen::KeyPair::generate()?;
                params.push(node::NewX509SvidParams {
                    entry_id: eid.clone(),
                    csr: csr(&key, id)?,
                });
            }
            reqs.push(node::BatchNewX509SvidRequest { params });
        }
        work.push((client, reqs));
    }
    // Warm-up: one batch per agent (TLS handshakes, caches). Another replica may not have
    // seen the entries yet (they reach it through its store watch): retried, bounded.
    for (client, reqs) in &mut work {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = client
                .batch_new_x509_svid(reqs[0].clone())
                .await?
                .into_inner();
            let Some(failed) = r.results.iter().find(|r| r.error_code != 0) else {
                break;
            };
            if Instant::now() > deadline {
                bail!("warm-up batch failed: {failed:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let start = Instant::now();
    let tasks: Vec<_> = work
        .into_iter()
        .map(|(mut client, reqs)| {
            tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut ok = 0usize;
                for req in reqs {
                    let t = Instant::now();
                    let r = client.batch_new_x509_svid(req).await?.into_inner();
                    lat.push(t.elapsed());
                    ok += r.results.iter().filter(|r| r.error_code == 0).count();
                }
                Ok::<_, anyhow::Error>((ok, lat))
            })
        })
        .collect();
    let mut total = 0;
    let mut lat = Vec::new();
    for t in tasks {
        let (ok, l) = t.await??;
        total += ok;
        lat.extend(l);
    }
    let elapsed = start.elapsed();
    for ca in cas {
        ca.stop().await;
    }
    let rate = total as f64 / elapsed.as_secs_f64();
    lat.sort();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let base1 = ring_baseline(20_000, 1)?;
    let base_n = ring_baseline(20_000, threads)?;
    println!(
        "issuance ({store:?} store, {replicas} CA replica(s)): {total} SVIDs in {elapsed:.2?} by {agents} agents x {batches} batches of {batch}"
    );
    println!("  end-to-end rate           : {rate:.0} SVIDs/s");
    println!(
        "  batch latency p50/p99/max : {:.1?} / {:.1?} / {:.1?}",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or_default()
    );
    println!("  ring verify+sign, 1 thread: {base1:.0} /s");
    println!("  ring verify+sign, {threads} threads: {base_n:.0} /s");
    println!("  ratio vs {threads}-thread baseline: {:.2}", rate / base_n);
    println!("  ratio vs 1-thread baseline: {:.2}", rate / base1);
    Ok(())
}

/// ECDSA P-256 verify + sign per item on `threads` threads for `n` items in total.
fn ring_baseline(n: usize, threads: usize) -> Result<f64> {
    use ring::rand::SystemRandom;
    use ring::signature::{self, EcdsaKeyPair, KeyPair};
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
        .map_err(|_| anyhow::anyhow!("keygen"))?;
    let kp = Arc::new(
        EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            pkcs8.as_ref(),
            &rng,
        )
        .map_err(|_| anyhow::anyhow!("key"))?,
    );
    let msg = vec![7u8; 400];
    let sig = kp.sign(&rng, &msg).map_err(|_| anyhow::anyhow!("sign"))?;
    let public = kp.public_key().as_ref().to_vec();
    let start = Instant::now();
    let per = n / threads;
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (kp, msg, sig, public) = (
                kp.clone(),
                msg.clone(),
                sig.as_ref().to_vec(),
                public.clone(),
            );
            std::thread::spawn(move || {
                let rng = SystemRandom::new();
                let vk =
                    signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, &public);
                for _ in 0..per {
                    vk.verify(&msg, &sig).expect("verify");
                    let s = kp.sign(&rng, &msg).expect("sign");
                    std::hint::black_box(s);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().map_err(|_| anyhow::anyhow!("baseline thread"))?;
    }
    Ok((per * threads) as f64 / start.elapsed().as_secs_f64())
}
