//! Concurrency against Redis (`PRESENCE_TEST_REDIS_URI`, default 127.0.0.1:6379;
//! skipped when unreachable unless `PRESENCE_REQUIRE_REDIS=1`), and the same against the
//! in-memory store: 2 000 logins released
//! at once from as many tasks, half on distinct node ids and half as 20 rivals on each
//! of 50 shared ids, then 2 000 heartbeats the same way. No update is lost (every node
//! is listed with the deadline and meta of its last heartbeat), and for every shared id
//! exactly one lease, the last one issued, works: a rival login always fences the
//! loser.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use presence::model::Node;
use presence::server::PresenceService;
use presence::store::redis::test_support::redis_for_tests;
use presence::store::{MemoryStore, Store};
use serde_json::{json, Value};
use support::in_process::call;
use support::{unlimited_config, within};
use tokio::sync::Barrier;

const DISTINCT: usize = 1000;
const SHARED_IDS: usize = 50;
const RIVALS: usize = 20;

/// One task's work.
type Job<T> = futures_util::future::BoxFuture<'static, T>;

/// Runs `jobs` concurrently, each in its own task, all released by one barrier.
async fn all_at_once<T: Send + 'static>(jobs: Vec<Job<T>>) -> Vec<T> {
    let barrier = Arc::new(Barrier::new(jobs.len()));
    let tasks: Vec<_> = jobs
        .into_iter()
        .map(|job| {
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                job.await
            })
        })
        .collect();
    let mut out = Vec::with_capacity(tasks.len());
    for task in tasks {
        out.push(task.await.expect("task"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_two_thousand_concurrent_logins_and_heartbeats_lose_nothing_and_fence_rivals() {
    let Some(store) = redis_for_tests("concurrent_writers").await else {
        return;
    };
    scenario("redis", Arc::new(store.clone())).await;
    assert!(store.delete_prefix().await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_two_thousand_concurrent_logins_and_heartbeats_lose_nothing_and_fence_rivals() {
    scenario("memory", Arc::new(MemoryStore::new())).await;
}

async fn scenario(name: &str, store: Arc<dyn Store>) {
    within(30, async {
        // Generous: 2 000 calls queue on one connection; a 503 here would be a false alarm.
        let mut config = unlimited_config(Duration::from_secs(10));
        config.ttl = Duration::from_secs(60);
        let peer: SocketAddr = ([127, 0, 0, 1], 40_000).into();
        let service = PresenceService::new(store, &config).with_default_peer(peer);

        // 1. 2 000 logins at once: 1 000 distinct ids, 50 ids x 20 rivals.
        let mut jobs: Vec<Job<(String, u16, Value)>> =
            Vec::new();
        for i in 0..DISTINCT {
            let service = service.clone();
            let id = format!("d-{i:04}");
            jobs.push(Box::pin(async move {
                let (s, v) = call(&service, "POST", "/presence/login", Some(json!({ "node_id": id, "meta": {"v": 0} }))).await;
                (id, s, v)
            }));
        }
        for j in 0..SHARED_IDS * RIVALS {
            let service = service.clone();
            let id = format!("s-{:02}", j % SHARED_IDS);
            jobs.push(Box::pin(async move {
                let (s, v) = call(&service, "POST", "/presence/login", Some(json!({ "node_id": id }))).await;
                (id, s, v)
            }));
        }
        let started = Instant::now();
        let logins = all_at_once(jobs).await;
        let login_time = started.elapsed();
        let mut leases: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (id, status, body) in &logins {
            assert_eq!(*status, 200, "login {id}: {body}");
            leases
                .entry(id.clone())
                .or_default()
                .push(body["lease_id"].as_str().unwrap_or_default().to_owned());
        }
        let all_leases: BTreeSet<&String> = leases.values().flatten().collect();
        assert_eq!(all_leases.len(), 2000, "every login got its own lease");

        // 2. 2 000 heartbeats at once: each distinct node twice (new meta each time),
        //    each rival once with its own lease.
        let mut jobs: Vec<Job<(String, String, u16, Value)>> =
            Vec::new();
        for (id, ls) in &leases {
            let shared = id.starts_with("s-");
            let beats = if shared { 1 } else { 2 };
            for lease in ls {
                for n in 0..beats {
                    let (service, id, lease) = (service.clone(), id.clone(), lease.clone());
                    jobs.push(Box::pin(async move {
                        let body = if shared {
                            json!({ "node_id": id, "lease_id": lease })
                        } else {
                            json!({ "node_id": id, "lease_id": lease, "meta": {"v": n + 1} })
                        };
                        let (s, v) = call(&service, "POST", "/presence/heartbeat", Some(body)).await;
                        (id, lease, s, v)
                    }));
                }
            }
        }
        let started = Instant::now();
        let beats = all_at_once(jobs).await;
        let beat_time = started.elapsed();

        // The last expires_at each distinct node was given, and who won each shared id.
        let mut last_exp: BTreeMap<String, u64> = BTreeMap::new();
        let mut winners: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (id, lease, status, body) in &beats {
            if id.starts_with("d-") {
                assert_eq!(*status, 200, "heartbeat {id}: {body}");
                let exp = body["expires_at_ms"].as_u64().unwrap_or(0);
                let e = last_exp.entry(id.clone()).or_default();
                *e = (*e).max(exp);
            } else if *status == 200 {
                winners.entry(id.clone()).or_default().push(lease.clone());
            } else {
                assert_eq!(*status, 409, "a fenced rival gets 409: {body}");
                assert_eq!(body["error"], "lease_mismatch");
            }
        }

        // No lost update: every node listed, each with its last deadline; the distinct
        // ones with a meta from one of their two heartbeats (both were accepted).
        let (status, list) = call(&service, "GET", "/presence", None).await;
        assert_eq!(status, 200);
        let nodes: Vec<Node> = serde_json::from_value(list).expect("node list");
        assert_eq!(nodes.len(), DISTINCT + SHARED_IDS, "every node is listed");
        for node in &nodes {
            if let Some(exp) = last_exp.get(&node.node_id) {
                assert_eq!(node.expires_at_ms, *exp, "{}: the last heartbeat's deadline", node.node_id);
                assert!(matches!(node.meta["v"].as_u64(), Some(1 | 2)), "{node:?}");
            }
        }

        // Fencing: for every shared id exactly one lease works now, the same one that
        // won the heartbeat round; every other lease gets 409 for heartbeat and logout.
        for (id, ls) in leases.iter().filter(|(id, _)| id.starts_with("s-")) {
            let won = winners.get(id).cloned().unwrap_or_default();
            assert_eq!(won.len(), 1, "{id}: exactly one of {RIVALS} rivals holds the lease: {won:?}");
            // Losers first: the winner's logout ends the session.
            let losers_then_winner = ls.iter().filter(|l| **l != won[0]).chain(&won[..1]);
            for lease in losers_then_winner {
                let body = json!({ "node_id": id, "lease_id": lease });
                let (s, _) = call(&service, "POST", "/presence/heartbeat", Some(body.clone())).await;
                let (l, out) = call(&service, "POST", "/presence/logout", Some(body)).await;
                if *lease == won[0] {
                    assert_eq!((s, l), (200, 200), "{id}: the winner keeps its lease");
                    assert_eq!(out["removed"], true);
                } else {
                    assert_eq!((s, l), (409, 409), "{id}: a loser is fenced off");
                }
            }
        }
        println!(
            "concurrency ({name}): 2000 logins at once in {login_time:?}, 2000 heartbeats at once in \
             {beat_time:?}; {} nodes listed with their last deadline, {SHARED_IDS} shared ids \
             with exactly one live lease each",
            nodes.len()
        );
    })
    .await;
}
