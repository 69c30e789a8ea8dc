//! A Redis Cluster master killed under heartbeat load: a server on a local cluster of
//! three masters with one replica each (`PRESENCE_REDIS_MODE=cluster`,
//! `PRESENCE_SHARDS=16`) keeps every node online. The replica takes over, heartbeats
//! succeed again within 5 s of the failover, the outage is given back to the leases
//! of the shards it hit (self-preservation), and the watch reports no `expired`.
//!
//! Each shard has its own circuit breaker and outage, so the nodes of the masters
//! that live on are served meanwhile (but for the moments the cluster reports
//! `CLUSTERDOWN`), and the outage is given back to the killed master's shards.
//!
//! Skipped with a reason when `redis-server` or `redis-cli` is missing, unless
//! `PRESENCE_REQUIRE_REDIS=1`. Figures are printed
//! (`cargo test --test redis_cluster_failover -- --nocapture`).

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use presence::store::redis::test_support::LocalCluster;
use presence::store::redis::{RedisOptions, RedisStore};
use serde_json::json;
use support::client::{get_with, http, post_with};
use support::server::TestServer;
use support::{unlimited_config, within};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_fails_over_without_expiring_any_node() {
    let cluster = match tokio::task::spawn_blocking(LocalCluster::start).await {
        Ok(Ok(cluster)) => cluster,
        Ok(Err(e)) if support::redis::redis_required() => {
            panic!("PRESENCE_REQUIRE_REDIS=1 but no Redis Cluster: {e}")
        }
        other => {
            eprintln!("skipping a_killed_master_fails_over: no Redis Cluster ({other:?})");
            return;
        }
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("presence=info"))
        .try_init();
    within(60, async {
        let options = RedisOptions::default()
            .cluster(true)
            .shards(16)
            .lazy(true)
            .response_timeout(Duration::from_millis(400));
        let store = RedisStore::connect_with(&cluster.seeds(), "failover", options)
            .await
            .expect("store");
        let mut cfg = unlimited_config(Duration::from_millis(500));
        cfg.heartbeat = Duration::from_millis(300);
        cfg.ttl = Duration::from_millis(3000);
        let server = TestServer::start(&cfg, Arc::new(store.clone())).await;
        let client = http();

        let mut leases = BTreeMap::new();
        for i in 0..48 {
            let node = format!("node-{i:02}");
            let reply = post_with(
                &client,
                &server.url("/presence/login"),
                &json!({ "node_id": node }),
            )
            .await;
            let lease = reply.ok_json()["lease_id"]
                .as_str()
                .expect("lease")
                .to_owned();
            leases.insert(node, lease);
        }

        // The watch, counting `expired` leaves.
        let expired = Arc::new(AtomicUsize::new(0));
        let watch = {
            let mut response = client
                .get(server.url("/presence/watch"))
                .send()
                .await
                .expect("watch");
            assert_eq!(response.status(), 200);
            let expired = expired.clone();
            tokio::spawn(async move {
                while let Ok(Some(chunk)) = response.chunk().await {
                    let text = String::from_utf8_lossy(&chunk);
                    expired.fetch_add(text.matches(r#""reason":"expired""#).count(), Ordering::SeqCst);
                }
            })
        };

        // Heartbeats every 300 ms; failures are noted with their time.
        let failures: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
        let started = Instant::now();
        let load = {
            let (client, failures, url) = (client.clone(), failures.clone(), server.url("/presence/heartbeat"));
            let leases = leases.clone();
            tokio::spawn(async move {
                let mut sent = 0u64;
                while started.elapsed() < Duration::from_secs(14) {
                    let round = leases.iter().map(|(node, lease)| {
                        post_with(&client, &url, &json!({ "node_id": node, "lease_id": lease }))
                    });
                    for reply in futures_util::future::join_all(round).await {
                        sent += 1;
                        if reply.status != 200 {
                            let why = format!("{} {}", reply.status, reply.text());
                            failures.lock().unwrap().push((Instant::now(), why));
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                sent
            })
        };

        tokio::time::sleep(Duration::from_secs(2)).await;
        let masters = cluster.masters();
        assert_eq!(masters.len(), 3, "{masters:?}");
        let victim = masters[0];
        let killed_at = Instant::now();
        cluster.kill(victim);
        // Until a replica has taken the dead master's slots.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let masters = tokio::task::block_in_place(|| cluster.masters());
            if masters.len() == 3 && !masters.contains(&victim) {
                break;
            }
            assert!(Instant::now() < deadline, "no failover within 20 s: {masters:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::task::block_in_place(|| cluster.wait_until_ok(Duration::from_secs(20)))
            .expect("the cluster fails over");
        let failed_over = Instant::now();

        let sent = load.await.expect("load");
        let failures = failures.lock().unwrap().clone();
        let last_failure = failures.iter().map(|(at, _)| *at).max();
        let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
        for (at, why) in &failures {
            let when = at.saturating_duration_since(killed_at).as_secs();
            *reasons.entry(format!("{when:02}s {}", &why[..why.len().min(90)])).or_default() += 1;
        }
        println!("failures by second after the kill: {reasons:#?}");
        let back_after = last_failure.map(|f| f.saturating_duration_since(failed_over));
        println!(
            "cluster failover: master {victim} killed; failed over {:?} later; {} of {sent} \
             heartbeats failed, the last {:?} after the failover",
            failed_over - killed_at,
            failures.len(),
            back_after
        );
        assert!(
            back_after.is_none_or(|d| d <= Duration::from_secs(5)),
            "heartbeats succeed again within 5 s of the failover: last failure {back_after:?} after it"
        );

        // Every node is still online, and no `expired` was reported.
        let listing = get_with(&client, &server.url("/presence")).await;
        let online: Vec<String> = serde_json::from_slice::<Vec<presence::model::Node>>(&listing.body)
            .expect("a node list")
            .into_iter()
            .map(|n| n.node_id)
            .collect();
        assert_eq!(online, leases.keys().cloned().collect::<Vec<_>>());
        assert_eq!(expired.load(Ordering::SeqCst), 0, "no spurious expired events");
        watch.abort();
        server.stop().await;
        let _ = store.delete_prefix().await;
    })
    .await;
}
