//! Redis outages under load, against a `redis-server` child each test starts on its own
//! port (`--save "" --appendonly no`) and kills, pauses (SIGSTOP) or flushes at will.
//! Skipped with a reason when `redis-server` is missing, unless
//! `PRESENCE_REQUIRE_REDIS=1`.
//!
//! - Killed Redis: every request is a `503 store_unavailable` with `Retry-After` within
//!   `PRESENCE_STORE_TIMEOUT_MS` + 200 ms, `/readyz` 503, `/healthz` 200; a restarted
//!   Redis on the same port is used again within 2 s, without restarting the server.
//! - Paused (hung) Redis: calls time out at the store timeout until the breaker opens,
//!   then fail at once; after the pause, the leases the outage ran down are given back
//!   (self-preservation), so no node drops out although the pause outlasted the TTL.
//! - A server started while Redis is down starts anyway and serves once Redis answers.
//! - Data loss (`FLUSHALL`): `keep_alive` clients are back within one heartbeat.
//!
//! Measured figures are printed (`cargo test --test redis_outage -- --nocapture`).

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use presence::client::PresenceClient;
use presence::model::{Meta, Node};
use serde_json::json;
use support::client::{get_with, http, post_with, Reply};
use support::redis::{test_redis_connection, RedisChild};
use support::server::TestServer;
use support::{metric_value, unlimited_config, within};

const STORE_TIMEOUT: Duration = Duration::from_millis(500);
/// The bound the issue sets on a `503`: the store timeout plus 200 ms.
const BOUND_503: Duration = Duration::from_millis(700);
/// How soon a Redis that is back must be used again.
const RECOVERY_BOUND: Duration = Duration::from_secs(2);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

async fn open_store(redis_uri: &str, prefix: &str) -> Arc<dyn presence::store::Store> {
    presence::store::open(Some(redis_uri), prefix)
        .await
        .expect("open is lazy: it never fails for an unreachable Redis")
}

/// Logs in `n` nodes `<name>-<i>`; returns node id -> lease id.
async fn login_nodes(
    client: &reqwest::Client,
    server: &TestServer,
    name: &str,
    n: usize,
) -> BTreeMap<String, String> {
    let mut leases = BTreeMap::new();
    for i in 0..n {
        let node = format!("{name}-{i:02}");
        let reply = post_with(
            client,
            &server.url("/presence/login"),
            &json!({ "node_id": node }),
        )
        .await;
        assert_eq!(reply.status, 200, "login {node}: {reply:?}");
        let lease = reply.json()["lease_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        leases.insert(node, lease);
    }
    leases
}

async fn list(client: &reqwest::Client, server: &TestServer) -> (Reply, Vec<Node>) {
    let reply = get_with(client, &server.url("/presence")).await;
    let nodes = if reply.status == 200 {
        serde_json::from_slice(&reply.body).expect("a node list")
    } else {
        Vec::new()
    };
    (reply, nodes)
}

/// Background heartbeaters: one task per node, a heartbeat every `every`; every reply
/// is recorded with the time it was sent.
struct Heartbeaters {
    stop: Arc<AtomicBool>,
    replies: Arc<Mutex<Vec<(Instant, Reply)>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Heartbeaters {
    fn start(server: &TestServer, leases: &BTreeMap<String, String>, every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let replies = Arc::new(Mutex::new(Vec::new()));
        let tasks = leases
            .iter()
            .map(|(node, lease)| {
                let (stop, replies) = (stop.clone(), replies.clone());
                let url = server.url("/presence/heartbeat");
                let body = json!({ "node_id": node, "lease_id": lease });
                tokio::spawn(async move {
                    let client = http();
                    while !stop.load(Ordering::Relaxed) {
                        let sent = Instant::now();
                        let reply = post_with(&client, &url, &body).await;
                        replies.lock().unwrap().push((sent, reply));
                        tokio::time::sleep(every).await;
                    }
                })
            })
            .collect();
        Heartbeaters {
            stop,
            replies,
            tasks,
        }
    }

    async fn stop(self) -> Vec<(Instant, Reply)> {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.expect("heartbeater task");
        }
        std::mem::take(&mut *self.replies.lock().unwrap())
    }
}

/// One round of probes on every kind of endpoint; asserts the outage contract for
/// each and returns the slowest `/presence*` latency.
async fn probe_outage(
    client: &reqwest::Client,
    server: &TestServer,
    node: &str,
    lease: &str,
) -> Duration {
    let (list, one, beat, login, ready, health) = tokio::join!(
        get_with(client, &server.url("/presence")),
        get_with(client, &server.url(&format!("/presence/{node}"))),
        post_with(
            client,
            &server.url("/presence/heartbeat"),
            &json!({ "node_id": node, "lease_id": lease })
        ),
        post_with(
            client,
            &server.url("/presence/login"),
            &json!({ "node_id": "probe-login" })
        ),
        get_with(client, &server.url("/readyz")),
        get_with(client, &server.url("/healthz")),
    );
    let mut slowest = Duration::ZERO;
    for (what, reply) in [
        ("GET /presence", &list),
        ("GET /presence/{id}", &one),
        ("POST heartbeat", &beat),
        ("POST login", &login),
        ("GET /readyz", &ready),
    ] {
        reply.assert_store_unavailable(what);
        assert!(
            reply.elapsed <= BOUND_503,
            "{what} took {:?}, over the store timeout + 200 ms",
            reply.elapsed
        );
        slowest = slowest.max(reply.elapsed);
    }
    assert_eq!(health.status, 200, "/healthz stays 200: {health:?}");
    slowest
}

/// Polls `GET /presence` every 20 ms until it is a 200; returns it and how long it took.
async fn wait_serving(
    client: &reqwest::Client,
    server: &TestServer,
    bound: Duration,
) -> (Duration, Vec<Node>) {
    let started = Instant::now();
    loop {
        let (reply, nodes) = list(client, server).await;
        if reply.status == 200 {
            return (started.elapsed(), nodes);
        }
        reply.assert_store_unavailable("GET /presence while recovering");
        assert!(
            started.elapsed() <= bound,
            "not serving {:?} after Redis came back (bound {bound:?})",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn circuit_state(metrics: &Reply) -> Option<f64> {
    metric_value(&metrics.text(), "presence_store_circuit_state")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_redis_gives_fast_503s_and_a_restarted_one_is_used_again() {
    let Some(mut redis) = RedisChild::start("killed_redis").await else {
        return;
    };
    within(20, async {
        let store = open_store(&redis.uri(), "killed").await;
        let server = TestServer::start(&unlimited_config(STORE_TIMEOUT), store).await;
        let client = http();
        let leases = login_nodes(&client, &server, "k", 10).await;
        let beaters = Heartbeaters::start(&server, &leases, Duration::from_millis(100));
        tokio::time::sleep(Duration::from_millis(400)).await;

        let killed_at = Instant::now();
        redis.kill();
        let (node, lease) = leases
            .iter()
            .next()
            .map(|(n, l)| (n.clone(), l.clone()))
            .unwrap();
        let first = probe_outage(&client, &server, &node, &lease).await;
        let time_to_503 = killed_at.elapsed();
        let mut slowest = first;
        let mut breaker_opened = false;
        for _ in 0..15 {
            slowest = slowest.max(probe_outage(&client, &server, &node, &lease).await);
            let metrics = get_with(&client, &server.url("/metrics")).await;
            breaker_opened |= circuit_state(&metrics) == Some(2.0);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(breaker_opened, "the store breaker opened during the outage");

        redis.restart().await;
        let (recovered, _) = wait_serving(&client, &server, RECOVERY_BOUND).await;
        let replies = beaters.stop().await;

        // Every heartbeat was answered, in time, with a reply that fits its moment:
        // 200 (Redis up), 503 (down), 404 (the restarted Redis lost the node).
        for (sent, reply) in &replies {
            assert!(
                reply.elapsed <= BOUND_503,
                "heartbeat took {:?}",
                reply.elapsed
            );
            match reply.status {
                200 => {}
                404 => assert!(*sent > killed_at, "404 before the restart: {reply:?}"),
                _ => {
                    // Sent just before the kill, a heartbeat may still be waiting on
                    // Redis when it dies: it fails too, but not one answered before.
                    assert!(
                        *sent + reply.elapsed > killed_at,
                        "failure answered before the kill: {reply:?}"
                    );
                    reply.assert_store_unavailable("heartbeat during the outage");
                }
            }
        }
        println!(
            "killed Redis: first 503 {time_to_503:?} after the kill, slowest 503 {slowest:?} \
             (bound {BOUND_503:?}); serving again {recovered:?} after the restart \
             (bound {RECOVERY_BOUND:?}); {} heartbeats checked",
            replies.len()
        );
        server.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_redis_times_out_then_fails_fast_and_leases_survive_the_outage() {
    let Some(redis) = RedisChild::start("hung_redis").await else {
        return;
    };
    within(20, async {
        let store = open_store(&redis.uri(), "hung").await;
        let mut cfg = unlimited_config(STORE_TIMEOUT);
        cfg.heartbeat = Duration::from_millis(500);
        cfg.ttl = Duration::from_millis(2000);
        let server = TestServer::start(&cfg, store).await;
        let client = http();
        let leases = login_nodes(&client, &server, "h", 20).await;
        let (_, before) = list(&client, &server).await;
        assert_eq!(before.len(), 20);
        let before: BTreeMap<String, Node> =
            before.into_iter().map(|n| (n.node_id.clone(), n)).collect();

        // The pause outlasts the TTL: without self-preservation every node would be
        // expired when Redis answers again.
        let paused_at = Instant::now();
        redis.pause();
        let (node, lease) = leases
            .iter()
            .next()
            .map(|(n, l)| (n.clone(), l.clone()))
            .unwrap();
        // Until the breaker opens, calls wait for the store timeout; never longer.
        let mut timed_out = 0;
        let mut fast_after_open = Vec::new();
        while paused_at.elapsed() < Duration::from_millis(3000) {
            let slowest = probe_outage(&client, &server, &node, &lease).await;
            if slowest >= STORE_TIMEOUT - Duration::from_millis(50) {
                timed_out += 1;
            }
            let metrics = get_with(&client, &server.url("/metrics")).await;
            if circuit_state(&metrics) == Some(2.0) && fast_after_open.is_empty() {
                // Open: ten calls in a row; at most one is the half-open trial.
                for _ in 0..10 {
                    let reply = get_with(&client, &server.url("/presence")).await;
                    reply.assert_store_unavailable("GET /presence, breaker open");
                    fast_after_open.push(reply.elapsed);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            timed_out >= 1,
            "calls to a hung Redis waited for the store timeout"
        );
        fast_after_open.sort();
        assert!(
            fast_after_open.len() == 10 && fast_after_open[8] < Duration::from_millis(50),
            "once the breaker is open calls fail at once: {fast_after_open:?}"
        );
        for node in before.values() {
            assert!(
                node.expires_at_ms < now_ms(),
                "the pause outlasted {}'s lease",
                node.node_id
            );
        }

        redis.resume();
        let resumed_at = Instant::now();
        let outage = resumed_at - paused_at;
        let (recovered, after) = wait_serving(&client, &server, RECOVERY_BOUND).await;

        // Self-preservation: all nodes still online, same session, deadline moved by
        // (at least nearly) the outage.
        // (A paused Redis runs the commands queued on its sockets when it resumes: the
        // probes' `probe-login`, answered 503, may well have happened. A 503 on a write
        // means "unknown", as with any timeout.)
        let after: BTreeMap<String, Node> = after
            .into_iter()
            .filter(|n| n.node_id != "probe-login")
            .map(|n| (n.node_id.clone(), n))
            .collect();
        assert_eq!(
            after.keys().collect::<Vec<_>>(),
            before.keys().collect::<Vec<_>>(),
            "every node survived the outage"
        );
        let mut moved_by = Vec::new();
        for (id, old) in &before {
            let new = &after[id];
            assert_eq!(
                new.online_since_ms, old.online_since_ms,
                "{id}: same session"
            );
            let shift = new.expires_at_ms.saturating_sub(old.expires_at_ms);
            moved_by.push(shift);
            assert!(
                shift + 250 >= outage.as_millis() as u64,
                "{id}: deadline moved by {shift} ms, the outage lasted {outage:?}"
            );
        }
        // The old leases still work: the nodes never had to log in again.
        for (node, lease) in &leases {
            let reply = post_with(
                &client,
                &server.url("/presence/heartbeat"),
                &json!({ "node_id": node, "lease_id": lease }),
            )
            .await;
            assert_eq!(reply.status, 200, "{node}: {reply:?}");
        }
        println!(
            "hung Redis: {timed_out} probe rounds waited for the store timeout \
             ({STORE_TIMEOUT:?}), then fail-fast 503s in {:?}..{:?}; outage {outage:?} \
             (TTL {:?}); serving again {recovered:?} after SIGCONT; deadlines moved by \
             {}..{} ms, all {} nodes kept",
            fast_after_open[0],
            fast_after_open[9],
            cfg.ttl,
            moved_by.iter().min().unwrap_or(&0),
            moved_by.iter().max().unwrap_or(&0),
            after.len()
        );
        server.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_started_while_redis_is_down_serves_once_redis_answers() {
    // Does this machine have redis-server at all? (Skip or fail as required.)
    let Some(mut probe) = RedisChild::start("redis_down_at_start").await else {
        return;
    };
    let port = probe.port;
    probe.kill();
    within(15, async {
        let store = open_store(&format!("redis://127.0.0.1:{port}"), "late").await;
        let server = TestServer::start(&unlimited_config(STORE_TIMEOUT), store).await;
        let client = http();
        for _ in 0..3 {
            probe_outage(&client, &server, "n-1", "0123456789abcdef0123456789abcdef").await;
        }
        let redis = RedisChild::start_on("redis_down_at_start", port)
            .await
            .expect("redis-server started once already");
        let (recovered, nodes) = wait_serving(&client, &server, RECOVERY_BOUND).await;
        assert!(nodes.is_empty());
        let ready = get_with(&client, &server.url("/readyz")).await;
        assert_eq!(ready.status, 200, "{ready:?}");
        println!(
            "Redis down at start: server up and 503; serving {recovered:?} after Redis started"
        );
        server.stop().await;
        drop(redis);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_clients_are_back_within_a_heartbeat_after_flushall() {
    let Some(redis) = RedisChild::start("flushall").await else {
        return;
    };
    within(15, async {
        let store = open_store(&redis.uri(), "flushed").await;
        let mut cfg = unlimited_config(STORE_TIMEOUT);
        cfg.heartbeat = Duration::from_millis(500);
        cfg.ttl = Duration::from_millis(1500);
        let server = TestServer::start(&cfg, store).await;
        let client = http();

        let pc = PresenceClient::new(&server.url("/presence")).expect("client");
        let mut keeps = Vec::new();
        for i in 0..10 {
            let mut meta = Meta::new();
            meta.insert("i".into(), i.into());
            keeps.push(pc.keep_alive(format!("ka-{i}"), meta).await.expect("keep_alive"));
        }
        let (_, nodes) = list(&client, &server).await;
        assert_eq!(nodes.len(), 10);

        assert_eq!(redis.command("FLUSHALL").await, "+OK");
        let flushed_at = Instant::now();
        let (_, empty) = list(&client, &server).await;
        assert!(empty.len() < 10, "FLUSHALL removed the nodes");
        // One heartbeat interval, spread by the client's +-10 % jitter, plus the
        // re-login round trip.
        let bound = cfg.heartbeat.mul_f64(1.1) + Duration::from_millis(250);
        let back_in = loop {
            let (_, nodes) = list(&client, &server).await;
            if nodes.len() == 10 {
                assert!(nodes.iter().all(|n| n.meta.contains_key("i")), "meta restored");
                break flushed_at.elapsed();
            }
            assert!(
                flushed_at.elapsed() <= bound,
                "only {} of 10 nodes back after {:?}",
                nodes.len(),
                flushed_at.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        for keep in keeps {
            assert_eq!(keep.stop().await.ok(), Some(true));
        }
        println!(
            "FLUSHALL: all 10 keep_alive nodes back after {back_in:?} (heartbeat {:?}, bound {bound:?})",
            cfg.heartbeat
        );
        server.stop().await;
    })
    .await;
}

/// The store half of the rule, on the shared test Redis: exactly the leases that were
/// live at the outage start and not renewed since move, by exactly the outage, across
/// several pages of the script; a second server recovering from the same outage
/// moves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extend_after_outage_moves_each_interrupted_lease_once() {
    use presence::model::{new_lease_id, NodeId};
    use presence::store::redis::test_support::redis_for_tests;
    use presence::store::Store;

    let Some(store) = redis_for_tests("extend_after_outage").await else {
        return;
    };
    within(20, async {
        const TTL: u64 = 10_000;
        const INTERRUPTED: usize = 2500; // several pages, with ties on the same ms
        let outage = Duration::from_millis(200);
        let id = |s: &str| NodeId::parse(s).unwrap();

        // Expired before the outage began: stays expired.
        store
            .login(&id("gone"), &new_lease_id(), 1, Meta::new())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Live when the outage began.
        let logins = (0..INTERRUPTED).map(|i| {
            let store = store.clone();
            async move {
                let node = id(&format!("i-{i:04}"));
                store
                    .login(&node, &new_lease_id(), 5_000, Meta::new())
                    .await
                    .unwrap()
            }
        });
        let before: Vec<u64> = futures_util::future::join_all(logins)
            .await
            .iter()
            .map(|o| o.expires_at_ms)
            .collect();
        // Renewed after the outage began (its deadline is past start + TTL).
        let renewed = store
            .login(&id("renewed"), &new_lease_id(), 20_000, Meta::new())
            .await
            .unwrap();

        let moved = store.extend_after_outage(outage, TTL).await.unwrap();
        assert_eq!(moved, INTERRUPTED as u64);
        // Another server recovering from the same outage: nothing moves twice.
        assert_eq!(store.extend_after_outage(outage, TTL).await.unwrap(), 0);

        let listed: BTreeMap<String, Node> = store
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|n| (n.node_id.clone(), n))
            .collect();
        assert!(!listed.contains_key("gone"));
        assert_eq!(listed["renewed"].expires_at_ms, renewed.expires_at_ms);
        for (i, old) in before.iter().enumerate() {
            let node = &listed[&format!("i-{i:04}")];
            assert_eq!(node.expires_at_ms, old + 200, "{}", node.node_id);
            assert_eq!(
                Store::get(&store, &id(&node.node_id))
                    .await
                    .unwrap()
                    .map(|n| n.expires_at_ms),
                Some(old + 200)
            );
        }
        assert!(store.delete_prefix().await.is_ok());
    })
    .await;
}

/// The sorted set only indexes expiries (scores lag the records by up to
/// `INDEX_GRANULARITY`): the outage rule decides by each record. Here 2 700 members
/// share one stale score across three pages; those whose record was live at the
/// outage start move, the others (expired just before it) stay where they are and
/// are neither moved nor listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extend_after_outage_decides_by_the_record_when_scores_lag() {
    use presence::model::{new_lease_id, NodeId};
    use presence::store::redis::test_support::redis_for_tests;
    use presence::store::Store;

    let Some(store) = redis_for_tests("extend_after_outage_lagging_scores").await else {
        return;
    };
    within(30, async {
        const LIVE: usize = 1500;
        const DEAD: usize = 1200;
        let outage = Duration::from_millis(200);
        let id = |s: &str| NodeId::parse(s).unwrap();
        let name = |i: usize| format!("n-{i:04}-{}", if i % 2 == 0 { "dead" } else { "live" });

        let logins = (0..LIVE + DEAD).map(|i| {
            let store = store.clone();
            async move {
                // Even: a 1 ms lease, expired well before the outage below begins.
                let ttl = if i % 2 == 0 && i / 2 < DEAD { 1 } else { 5_000 };
                let out = store
                    .login(&id(&name(i)), &new_lease_id(), ttl, Meta::new())
                    .await
                    .unwrap();
                (name(i), ttl, out.expires_at_ms)
            }
        });
        let logged: Vec<(String, u64, u64)> = futures_util::future::join_all(logins).await;
        let min_exp = logged.iter().map(|l| l.2).min().unwrap();
        // Every score 9 s behind: stale, but within the index granularity of each
        // record's expiry (never ahead of it).
        let stale = min_exp - 9_000;
        let mut raw = test_redis_connection().await;
        let mut zadd = redis::cmd("ZADD");
        zadd.arg(store.nodes_key());
        for (n, _, _) in &logged {
            zadd.arg(stale).arg(n);
        }
        let _: u64 = zadd.query_async(&mut raw).await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;

        let moved = store.extend_after_outage(outage, 10_000).await.unwrap();
        let live: Vec<&(String, u64, u64)> = logged.iter().filter(|l| l.1 == 5_000).collect();
        assert_eq!(moved, live.len() as u64);
        let listed: BTreeMap<String, Node> = store
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|n| (n.node_id.clone(), n))
            .collect();
        assert_eq!(listed.len(), live.len());
        for (n, _, exp) in &live {
            assert_eq!(listed[n.as_str()].expires_at_ms, exp + 200, "{n}");
        }
        // The dead ones stayed in the index (purged later by login) but did not move.
        let dead_score: Option<f64> = redis::cmd("ZSCORE")
            .arg(store.nodes_key())
            .arg(name(0))
            .query_async(&mut raw)
            .await
            .unwrap();
        assert_eq!(dead_score, Some(stale as f64));
        assert!(store.delete_prefix().await.is_ok());
    })
    .await;
}
