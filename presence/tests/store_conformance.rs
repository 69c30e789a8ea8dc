//! One behavioural suite for every [`Store`]: each generic test below runs against
//! [`MemoryStore`] (on paused tokio time, so expiry is exact and instant) and against
//! [`RedisStore`] (real time, short TTLs; skipped with a message when Redis is
//! unreachable unless `PRESENCE_REQUIRE_REDIS=1`). Backend-specific tests follow.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use presence::model::{new_lease_id, Meta, Node, NodeId, Stats, Status};
use presence::store::feed::{
    Change, ChangeKind, Changes, Cursor, LeaveReason, WatchOptions, WatchStart,
};
use presence::store::query::{Filter, Query};
use presence::store::redis::test_support::{
    cluster_for_tests, redis_for_tests, sharded_redis_for_tests, shared_cluster, unique_prefix,
};
use presence::store::redis::RedisOptions;
use presence::store::{MemoryStore, RedisStore, Store, StoreError};
use serde_json::json;

/// Long enough that nothing expires during a test unless the test waits for it.
const TTL: u64 = 60_000;

struct Harness {
    store: Arc<dyn Store>,
    /// `Some` for Redis: cleaned up by `finish`.
    redis: Option<RedisStore>,
}

impl Harness {
    fn memory() -> Harness {
        Harness {
            store: Arc::new(MemoryStore::new()),
            redis: None,
        }
    }

    async fn redis(name: &str) -> Option<Harness> {
        Some(Self::of(redis_for_tests(name).await?))
    }

    /// Four shards on the test Redis.
    async fn sharded(name: &str) -> Option<Harness> {
        Some(Self::of(sharded_redis_for_tests(name, 4).await?))
    }

    /// Sixteen shards on a local Redis Cluster of three masters.
    async fn cluster(name: &str) -> Option<Harness> {
        Some(Self::of(cluster_for_tests(name, 16).await?))
    }

    fn of(redis: RedisStore) -> Harness {
        Harness {
            store: Arc::new(redis.clone()),
            redis: Some(redis),
        }
    }

    /// Lets `d` pass on the store's clock: instantly on paused time (memory), for real
    /// against Redis.
    async fn elapse(&self, d: Duration) {
        if self.redis.is_some() {
            tokio::time::sleep(d).await;
        } else {
            tokio::time::advance(d).await;
        }
    }

    async fn finish(self) {
        if let Some(redis) = self.redis {
            let deleted = redis.delete_prefix().await;
            assert!(deleted.is_ok(), "cleanup failed: {deleted:?}");
        }
    }
}

/// Runs each named generic test against a Redis store that `Harness::$open` opens,
/// in module `$module`, under the test attribute `$test`.
macro_rules! redis_suite {
    ($module:ident, $open:ident, #[$test:meta], $($name:ident),*) => {
        mod $module {
            $(
                #[$test]
                async fn $name() {
                    let Some(h) = super::Harness::$open(stringify!($name)).await else {
                        return;
                    };
                    super::$name(&h).await;
                    h.finish().await;
                }
            )*
        }
    };
}

/// Runs each named generic test against every store: memory, Redis, Redis in four
/// shards, and a Redis Cluster in sixteen.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod memory_store {
            $(
                #[tokio::test(start_paused = true)]
                async fn $name() {
                    let h = super::Harness::memory();
                    super::$name(&h).await;
                    h.finish().await;
                }
            )*
        }
        redis_suite!(redis_store, redis, #[tokio::test], $($name),*);
        redis_suite!(sharded_redis_store, sharded, #[tokio::test], $($name),*);
        redis_suite!(
            cluster_store,
            cluster,
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)],
            $($name),*
        );
    };
}

conformance!(
    login_then_get_and_list,
    login_times_come_from_the_store_clock,
    get_of_unknown_node_is_none,
    heartbeat_extends_expiry_and_keeps_online_since,
    heartbeat_with_meta_replaces_it_without_keeps_it,
    heartbeat_with_another_lease_is_lease_mismatch_and_changes_nothing,
    heartbeat_of_unknown_node_is_not_found,
    login_again_fences_the_old_lease_and_starts_a_new_session,
    logout_removes_the_node,
    logout_with_another_lease_is_lease_mismatch_and_keeps_the_node,
    logout_of_unknown_node_returns_false,
    expired_node_is_invisible_and_cannot_heartbeat,
    heartbeats_keep_a_node_online_past_its_first_ttl,
    list_is_sorted_by_node_id,
    meta_round_trips_nested_json,
    thousand_concurrent_logins_are_all_listed,
    ping_answers,
    feed_reports_joins_meta_changes_and_logouts_with_their_data,
    feed_resumes_after_a_cursor_and_snapshots_without_one,
    feed_reports_each_expiry_once,
    login_status_defaults_to_up_and_login_with_sets_it,
    heartbeat_with_status_changes_it_as_an_update_and_none_keeps_it,
    query_filters_by_prefix_status_and_meta,
    query_pages_250_nodes_by_100,
    query_after_is_exclusive_and_combines_with_prefix,
    query_pages_skip_expired_nodes,
    stats_follow_logins_status_changes_logouts_and_expiry,
    random_workload_keeps_stats_equal_to_the_listing,
    label_queries_follow_logins_meta_changes_logouts_and_expiry,
);

fn id(s: &str) -> NodeId {
    NodeId::parse(s).expect("test node ids are valid")
}

fn meta(v: serde_json::Value) -> Meta {
    match v {
        serde_json::Value::Object(m) => m,
        other => panic!("test meta must be an object, got {other}"),
    }
}

fn ids(nodes: &[Node]) -> Vec<&str> {
    nodes.iter().map(|n| n.node_id.as_str()).collect()
}

fn wall_ms() -> u64 {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    u64::try_from(d.as_millis()).expect("fits in u64")
}

/// The listing, checked both ways a store offers it: [`Store::list_json`] (what
/// `GET /presence` sends) must be exactly [`Store::list`] serialized.
async fn list(h: &Harness) -> Vec<Node> {
    let nodes = h.store.list().await.expect("list");
    let json = h.store.list_json().await.expect("list_json");
    let expected = serde_json::to_vec(&nodes).expect("nodes serialize");
    assert_eq!(
        String::from_utf8_lossy(&json.to_bytes()),
        String::from_utf8_lossy(&expected),
        "list_json differs from list"
    );
    assert_eq!(json.count, nodes.len());
    assert_eq!(json.len(), expected.len());
    nodes
}

async fn get(h: &Harness, node: &str) -> Option<Node> {
    h.store.get(&id(node)).await.expect("get")
}

async fn login_then_get_and_list(h: &Harness) {
    let s = &h.store;
    let lease = new_lease_id();
    let m = meta(json!({"hp": 10, "addr": "10.0.0.1:7000"}));
    let out = s
        .login(&id("n1"), &lease, TTL, m.clone())
        .await
        .expect("login");
    assert_eq!(out.expires_at_ms, out.online_since_ms + TTL);

    let node = get(h, "n1").await.expect("n1 is online");
    assert_eq!(
        node,
        Node {
            node_id: "n1".into(),
            status: presence::model::Status::Up,
            meta: m,
            online_since_ms: out.online_since_ms,
            last_seen_ms: out.online_since_ms,
            expires_at_ms: out.expires_at_ms,
        }
    );
    assert_eq!(list(h).await, vec![node]);

    // No meta at login is an empty object, not null.
    s.login(&id("n2"), &new_lease_id(), TTL, Meta::new())
        .await
        .expect("login");
    assert_eq!(get(h, "n2").await.map(|n| n.meta), Some(Meta::new()));
}

async fn login_times_come_from_the_store_clock(h: &Harness) {
    let before = h.store.now_ms().await.expect("now");
    let out = h
        .store
        .login(&id("n"), &new_lease_id(), TTL, Meta::new())
        .await
        .expect("login");
    let after = h.store.now_ms().await.expect("now");
    assert!(before <= out.online_since_ms && out.online_since_ms <= after);
    // The store clock is epoch milliseconds (same host here: within a minute).
    assert!(out.online_since_ms.abs_diff(wall_ms()) < 60_000);
}

async fn get_of_unknown_node_is_none(h: &Harness) {
    assert_eq!(get(h, "nobody").await, None);
    assert!(list(h).await.is_empty());
}

async fn heartbeat_extends_expiry_and_keeps_online_since(h: &Harness) {
    let s = &h.store;
    let lease = new_lease_id();
    let out = s
        .login(&id("n"), &lease, TTL, Meta::new())
        .await
        .expect("login");
    h.elapse(Duration::from_millis(50)).await;
    let exp = s
        .heartbeat(&id("n"), &lease, TTL, None)
        .await
        .expect("heartbeat");
    assert!(
        exp >= out.expires_at_ms + 50,
        "{exp} vs {}",
        out.expires_at_ms
    );

    let node = get(h, "n").await.expect("online");
    assert_eq!(node.online_since_ms, out.online_since_ms);
    assert_eq!(node.expires_at_ms, exp);
    assert_eq!(node.last_seen_ms + TTL, exp);
    assert!(node.last_seen_ms >= out.online_since_ms + 50);

    // A heartbeat may carry another TTL; expiry is always last heartbeat + ttl.
    let exp2 = s
        .heartbeat(&id("n"), &lease, 5 * TTL, None)
        .await
        .expect("heartbeat");
    let node = get(h, "n").await.expect("online");
    assert_eq!(node.last_seen_ms + 5 * TTL, exp2);
}

async fn heartbeat_with_meta_replaces_it_without_keeps_it(h: &Harness) {
    let s = &h.store;
    let lease = new_lease_id();
    let n = id("n");
    s.login(&n, &lease, TTL, meta(json!({"hp": 1, "zone": "a"})))
        .await
        .expect("login");

    s.heartbeat(&n, &lease, TTL, None).await.expect("heartbeat");
    assert_eq!(
        get(h, "n").await.map(|n| n.meta),
        Some(meta(json!({"hp": 1, "zone": "a"})))
    );

    // Replaced, not merged: "zone" is gone.
    s.heartbeat(&n, &lease, TTL, Some(meta(json!({"hp": 2}))))
        .await
        .expect("heartbeat");
    assert_eq!(
        get(h, "n").await.map(|n| n.meta),
        Some(meta(json!({"hp": 2})))
    );

    s.heartbeat(&n, &lease, TTL, Some(Meta::new()))
        .await
        .expect("heartbeat");
    assert_eq!(get(h, "n").await.map(|n| n.meta), Some(Meta::new()));
}

async fn heartbeat_with_another_lease_is_lease_mismatch_and_changes_nothing(h: &Harness) {
    let s = &h.store;
    let lease = "0123456789abcdef0123456789abcdef";
    s.login(&id("n"), lease, TTL, meta(json!({"v": 1})))
        .await
        .expect("login");
    let before = get(h, "n").await;
    h.elapse(Duration::from_millis(20)).await;
    // Exact comparison: case, prefixes and extensions of the lease are other leases.
    for other in [
        "0123456789ABCDEF0123456789ABCDEF",
        "0123456789abcdef",
        "0123456789abcdef0123456789abcdef0",
        "",
    ] {
        let r = s
            .heartbeat(&id("n"), other, TTL, Some(meta(json!({"v": 2}))))
            .await;
        assert_eq!(r, Err(StoreError::LeaseMismatch), "lease {other:?}");
    }
    assert_eq!(get(h, "n").await, before);
}

async fn heartbeat_of_unknown_node_is_not_found(h: &Harness) {
    let r = h
        .store
        .heartbeat(&id("ghost"), &new_lease_id(), TTL, None)
        .await;
    assert_eq!(r, Err(StoreError::NotFound));
    assert_eq!(
        get(h, "ghost").await,
        None,
        "a failed heartbeat creates nothing"
    );
}

async fn login_again_fences_the_old_lease_and_starts_a_new_session(h: &Harness) {
    let s = &h.store;
    let (old, new) = (new_lease_id(), new_lease_id());
    let first = s
        .login(&id("n"), &old, TTL, meta(json!({"boot": 1})))
        .await
        .expect("login");
    h.elapse(Duration::from_millis(20)).await;
    let second = s
        .login(&id("n"), &new, TTL, Meta::new())
        .await
        .expect("re-login");

    assert_eq!(
        s.heartbeat(&id("n"), &old, TTL, None).await,
        Err(StoreError::LeaseMismatch)
    );
    assert_eq!(
        s.logout(&id("n"), &old).await,
        Err(StoreError::LeaseMismatch)
    );
    assert!(s.heartbeat(&id("n"), &new, TTL, None).await.is_ok());

    let node = get(h, "n").await.expect("online");
    assert!(second.online_since_ms >= first.online_since_ms + 20);
    assert_eq!(
        node.online_since_ms, second.online_since_ms,
        "a login starts a new session"
    );
    assert_eq!(node.meta, Meta::new(), "login replaces the meta");
    assert_eq!(list(h).await.len(), 1);
}

async fn logout_removes_the_node(h: &Harness) {
    let s = &h.store;
    let lease = new_lease_id();
    s.login(&id("a"), &lease, TTL, Meta::new())
        .await
        .expect("login");
    s.login(&id("b"), &new_lease_id(), TTL, Meta::new())
        .await
        .expect("login");

    assert_eq!(s.logout(&id("a"), &lease).await, Ok(true));
    assert_eq!(get(h, "a").await, None);
    assert_eq!(ids(&list(h).await), ["b"]);
    assert_eq!(s.logout(&id("a"), &lease).await, Ok(false), "second logout");
    assert_eq!(
        s.heartbeat(&id("a"), &lease, TTL, None).await,
        Err(StoreError::NotFound)
    );
}

async fn logout_with_another_lease_is_lease_mismatch_and_keeps_the_node(h: &Harness) {
    let s = &h.store;
    let lease = new_lease_id();
    s.login(&id("n"), &lease, TTL, Meta::new())
        .await
        .expect("login");
    assert_eq!(
        s.logout(&id("n"), &new_lease_id()).await,
        Err(StoreError::LeaseMismatch)
    );
    assert!(get(h, "n").await.is_some());
    assert_eq!(s.logout(&id("n"), &lease).await, Ok(true));
}

async fn logout_of_unknown_node_returns_false(h: &Harness) {
    assert_eq!(
        h.store.logout(&id("ghost"), &new_lease_id()).await,
        Ok(false)
    );
}

async fn expired_node_is_invisible_and_cannot_heartbeat(h: &Harness) {
    let s = &h.store;
    let ttl = 1_000;
    let lease = new_lease_id();
    s.login(&id("short"), &lease, ttl, Meta::new())
        .await
        .expect("login");
    s.login(&id("long"), &new_lease_id(), TTL, Meta::new())
        .await
        .expect("login");
    assert_eq!(ids(&list(h).await), ["long", "short"]);

    h.elapse(Duration::from_millis(ttl + 200)).await;
    assert_eq!(ids(&list(h).await), ["long"]);
    assert_eq!(get(h, "short").await, None);
    assert_eq!(
        s.heartbeat(&id("short"), &lease, ttl, None).await,
        Err(StoreError::NotFound)
    );
    assert_eq!(s.logout(&id("short"), &lease).await, Ok(false));
    // Even with a wrong lease, a node that is not online is just "not removed".
    assert_eq!(s.logout(&id("short"), &new_lease_id()).await, Ok(false));

    // It can come back at once.
    let lease2 = new_lease_id();
    s.login(&id("short"), &lease2, TTL, Meta::new())
        .await
        .expect("login");
    assert!(s.heartbeat(&id("short"), &lease2, TTL, None).await.is_ok());
    assert_eq!(ids(&list(h).await), ["long", "short"]);
}

async fn heartbeats_keep_a_node_online_past_its_first_ttl(h: &Harness) {
    let s = &h.store;
    let ttl = 1_500;
    let lease = new_lease_id();
    s.login(&id("n"), &lease, ttl, Meta::new())
        .await
        .expect("login");
    for _ in 0..3 {
        h.elapse(Duration::from_millis(700)).await;
        s.heartbeat(&id("n"), &lease, ttl, None)
            .await
            .expect("still online");
    }
    // 2.1 s after login, beyond the first TTL of 1.5 s.
    assert_eq!(ids(&list(h).await), ["n"]);
}

async fn list_is_sorted_by_node_id(h: &Harness) {
    let long = "z".repeat(256);
    let names = [
        "b", "a", "C", "a-1", "a.1", "a_1", "a~1", "a:1", "a@1", "a+1", "a=1", "0", "Z", "aa",
        &long,
    ];
    for name in names {
        h.store
            .login(&id(name), &new_lease_id(), TTL, Meta::new())
            .await
            .expect("login");
    }
    let listed = list(h).await;
    let mut expected: Vec<&str> = names.to_vec();
    expected.sort_unstable(); // byte order
    assert_eq!(ids(&listed), expected);
}

async fn meta_round_trips_nested_json(h: &Harness) {
    let m = meta(json!({
        "hp": 97, "load": 0.25, "neg": -3, "big": 9_007_199_254_740_993u64,
        "ok": true, "none": null, "tags": ["a", "b"], "nested": {"k": {"deep": [1, {"x": "y"}]}},
        "unicode": "żółw 🐢 \"quoted\" \\ \n", "": "empty key"
    }));
    h.store
        .login(&id("n"), &new_lease_id(), TTL, m.clone())
        .await
        .expect("login");
    assert_eq!(get(h, "n").await.map(|n| n.meta), Some(m.clone()));
    assert_eq!(list(h).await.first().map(|n| &n.meta), Some(&m));
}

async fn thousand_concurrent_logins_are_all_listed(h: &Harness) {
    let tasks: Vec<_> = (0..1000)
        .map(|i| {
            let store = Arc::clone(&h.store);
            tokio::spawn(async move {
                let node = id(&format!("node-{i:04}"));
                store
                    .login(&node, &new_lease_id(), TTL, meta(json!({ "i": i })))
                    .await
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("task").expect("login");
    }
    let listed = list(h).await;
    assert_eq!(listed.len(), 1000);
    let expected: Vec<String> = (0..1000).map(|i| format!("node-{i:04}")).collect();
    assert_eq!(ids(&listed), expected);
    assert!(listed.iter().enumerate().all(|(i, n)| n.meta["i"] == i));
}

async fn ping_answers(h: &Harness) {
    assert_eq!(h.store.ping().await, Ok(()));
    assert!(!h.store.describe().is_empty());
}

// ---------------------------------------------------------------------------------
// MemoryStore only

#[tokio::test(start_paused = true)]
async fn memory_expiry_is_exact_to_the_millisecond() {
    let s = MemoryStore::new();
    let lease = new_lease_id();
    let out = s
        .login(&id("n"), &lease, 1_000, Meta::new())
        .await
        .expect("login");
    tokio::time::advance(Duration::from_millis(999)).await;
    assert_eq!(s.now_ms(), out.expires_at_ms - 1);
    assert!(Store::get(&s, &id("n")).await.expect("get").is_some());
    tokio::time::advance(Duration::from_millis(1)).await;
    // Online while now < expires_at: at now == expires_at it is gone.
    assert_eq!(s.now_ms(), out.expires_at_ms);
    assert_eq!(Store::get(&s, &id("n")).await, Ok(None));
    assert_eq!(s.list().await, Ok(vec![]));
    assert_eq!(
        s.heartbeat(&id("n"), &lease, 1_000, None).await,
        Err(StoreError::NotFound)
    );
}

#[tokio::test(start_paused = true)]
async fn memory_sweeps_expired_records_out() {
    let s = MemoryStore::new();
    for i in 0..100 {
        s.login(&id(&format!("n{i}")), &new_lease_id(), 500, Meta::new())
            .await
            .expect("login");
    }
    assert_eq!(s.len(), 100);
    tokio::time::advance(Duration::from_millis(1_500)).await;
    // Invisible at once, held until the next sweep, which a write triggers.
    assert_eq!(s.list().await.map(|l| l.len()), Ok(0));
    s.login(&id("fresh"), &new_lease_id(), TTL, Meta::new())
        .await
        .expect("login");
    assert_eq!(s.len(), 1, "expired records are swept by writes");
    tokio::time::advance(Duration::from_millis(TTL)).await;
    assert_eq!(s.purge_expired(), 1);
    assert!(s.is_empty());
}

#[tokio::test(start_paused = true)]
async fn memory_futures_act_when_polled_not_when_created() {
    let s = MemoryStore::new();
    drop(s.login(&id("n"), &new_lease_id(), TTL, Meta::new()));
    assert_eq!(Store::get(&s, &id("n")).await, Ok(None));
}

#[tokio::test(start_paused = true)]
async fn memory_holds_100k_nodes() {
    let s = MemoryStore::new();
    let m = meta(json!({"hp": 100, "load": 0.5}));
    for i in 0..100_000 {
        s.login(
            &id(&format!("node-{i:06}")),
            &new_lease_id(),
            TTL,
            m.clone(),
        )
        .await
        .expect("login");
    }
    let listed = s.list().await.expect("list");
    assert_eq!(listed.len(), 100_000);
    assert!(listed.windows(2).all(|w| w[0].node_id < w[1].node_id));
    assert_eq!(listed[99_999].meta, m);
}

#[tokio::test]
async fn memory_describes_itself_as_single_server() {
    assert!(MemoryStore::new().describe().contains("single server"));
}

// ---------------------------------------------------------------------------------
// RedisStore only

/// A plain connection for inspecting what the store wrote.
async fn raw() -> redis::aio::MultiplexedConnection {
    let uri = std::env::var("PRESENCE_TEST_REDIS_URI")
        .unwrap_or_else(|_| presence::store::redis::test_support::DEFAULT_TEST_REDIS_URI.into());
    let client = redis::Client::open(uri).expect("uri");
    client
        .get_multiplexed_async_connection()
        .await
        .expect("raw connection")
}

#[tokio::test]
async fn redis_keys_follow_the_data_model_and_expire() {
    let Some(store) = redis_for_tests("redis_keys_follow_the_data_model_and_expire").await else {
        return;
    };
    let mut conn = raw().await;
    let lease = new_lease_id();
    let n = id("n:1@x");
    let out = store
        .login(&n, &lease, 5_000, meta(json!({"hp": 3})))
        .await
        .expect("login");

    let prefix = store.prefix().to_owned();
    assert_eq!(store.nodes_key(), format!("{{{prefix}}}:nodes"));
    assert_eq!(store.records_key(), format!("{{{prefix}}}:records"));

    let score: Option<u64> = redis::cmd("ZSCORE")
        .arg(store.nodes_key())
        .arg("n:1@x")
        .query_async(&mut conn)
        .await
        .expect("zscore");
    assert_eq!(score, Some(out.expires_at_ms));
    // <expires_at><last_seen><online_since>, 15 digits each, <lease length> in 5,
    // then <lease><meta>.
    let record = |conn: redis::aio::MultiplexedConnection| {
        let key = store.records_key().to_owned();
        async move {
            let rec: String = redis::cmd("HGET")
                .arg(key)
                .arg("n:1@x")
                .query_async(&mut conn.clone())
                .await
                .expect("hget");
            rec
        }
    };
    let since = out.online_since_ms;
    assert_eq!(
        record(conn.clone()).await,
        format!(
            r#"{:015}{since:015}{since:015}{:05}{lease}{{"hp":3}}"#,
            out.expires_at_ms,
            lease.len()
        )
    );
    // A heartbeat renews the times and keeps lease and meta.
    let exp = store
        .heartbeat(&n, &lease, 5_000, None)
        .await
        .expect("heartbeat");
    let seen = exp - 5_000;
    assert_eq!(
        record(conn.clone()).await,
        format!(
            r#"{exp:015}{seen:015}{since:015}{:05}{lease}{{"hp":3}}"#,
            lease.len()
        )
    );
    // One with meta replaces it.
    let exp = store
        .heartbeat(&n, &lease, 5_000, Some(meta(json!({"hp": 2}))))
        .await
        .expect("heartbeat");
    let seen = exp - 5_000;
    assert_eq!(
        record(conn.clone()).await,
        format!(
            r#"{exp:015}{seen:015}{since:015}{:05}{lease}{{"hp":2}}"#,
            lease.len()
        )
    );
    // Garbage collection comes MAX_PRESERVED_OUTAGE after expiry (expired records are
    // kept that long so that an outage can be given back to them); the keys live
    // KEY_SLACK beyond the newest record's.
    let grace = presence::store::MAX_PRESERVED_OUTAGE.as_millis() as i64;
    let slack = presence::store::redis::KEY_SLACK.as_millis() as i64;
    for k in [store.records_key(), store.nodes_key()] {
        let pttl: i64 = redis::cmd("PTTL")
            .arg(k)
            .query_async(&mut conn)
            .await
            .expect("pttl");
        assert!(
            (grace + 1..=grace + slack + 5_000).contains(&pttl),
            "{k} has PTTL {pttl}"
        );
    }

    // Logging the last node out leaves only the change feed (its stream and epoch)
    // and the counters (all zero, and `l`: the label index is built), which expire
    // by themselves.
    assert_eq!(store.logout(&n, &lease).await, Ok(true));
    let counts: Vec<(String, i64)> = redis::cmd("HGETALL")
        .arg(format!("{{{}}}:counts", store.prefix()))
        .query_async(&mut conn)
        .await
        .expect("hgetall");
    assert!(
        counts.iter().all(|(k, n)| *n == 0 || (k == "l" && *n == 1)),
        "{counts:?}"
    );
    for k in ["feed", "feed-epoch", "counts"] {
        let pttl: i64 = redis::cmd("PTTL")
            .arg(format!("{{{}}}:{k}", store.prefix()))
            .query_async(&mut conn)
            .await
            .expect("pttl");
        assert!(pttl > 0, "{k} has PTTL {pttl}");
    }
    // Those three and the deployment's shard count, `{prefix}:shards`.
    assert_eq!(store.delete_prefix().await, Ok(4));
}

#[tokio::test]
async fn redis_index_scores_lag_expiries_by_less_than_the_granularity() {
    let Some(store) = redis_for_tests("redis_index_scores_lag").await else {
        return;
    };
    let mut conn = raw().await;
    let granularity = presence::store::redis::INDEX_GRANULARITY.as_millis() as u64;
    let score = |conn: redis::aio::MultiplexedConnection, member: &'static str| {
        let key = store.nodes_key().to_owned();
        async move {
            let s: Option<u64> = redis::cmd("ZSCORE")
                .arg(key)
                .arg(member)
                .query_async(&mut conn.clone())
                .await
                .expect("zscore");
            s
        }
    };
    let lease = new_lease_id();
    let out = store
        .login(&id("n"), &lease, 60_000, Meta::new())
        .await
        .expect("login");
    assert_eq!(score(conn.clone(), "n").await, Some(out.expires_at_ms));
    let mut last_score = out.expires_at_ms;
    for _ in 0..20 {
        let exp = store
            .heartbeat(&id("n"), &lease, 60_000, None)
            .await
            .expect("heartbeat");
        let s = score(conn.clone(), "n").await.expect("a member");
        // Written only when the expiry enters another slot; never ahead, never far behind.
        assert!(s <= exp && exp - s < granularity, "score {s}, expiry {exp}");
        assert!(s == last_score || s == exp, "score {s} moved to neither");
        assert_eq!(s / granularity == last_score / granularity, s == last_score);
        last_score = s;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // A node whose score is already in the past is still listed while its record says
    // it is online (also once a first listing has taught the store the Redis clock,
    // which bounds the range it reads).
    assert_eq!(store.list().await.map(|l| l.len()), Ok(1));
    let m = store
        .login(&id("m"), &new_lease_id(), 3_000, Meta::new())
        .await
        .expect("login");
    let _: u64 = redis::cmd("ZADD")
        .arg(store.nodes_key())
        .arg(m.expires_at_ms - (granularity - 1))
        .arg("m")
        .query_async(&mut conn)
        .await
        .expect("zadd");
    let listed = store.list().await.expect("list");
    assert_eq!(ids(&listed), vec!["m", "n"]);
    assert_eq!(
        Store::get(&store, &id("m"))
            .await
            .map(|n| n.map(|n| n.expires_at_ms)),
        Ok(Some(m.expires_at_ms))
    );
    assert!(store.delete_prefix().await.is_ok());
}

#[tokio::test]
async fn redis_prefixes_are_isolated() {
    let Some(a) = redis_for_tests("redis_prefixes_are_isolated_a").await else {
        return;
    };
    let Some(b) = redis_for_tests("redis_prefixes_are_isolated_b").await else {
        return;
    };
    a.login(&id("only-in-a"), &new_lease_id(), TTL, Meta::new())
        .await
        .expect("login");
    assert_eq!(b.list().await, Ok(vec![]));
    assert_eq!(Store::get(&b, &id("only-in-a")).await, Ok(None));
    assert_eq!(a.list().await.map(|l| l.len()), Ok(1));
    assert!(a.delete_prefix().await.is_ok_and(|n| n >= 2));
    assert!(b.delete_prefix().await.is_ok());
}

#[tokio::test]
async fn redis_list_fetches_in_pages_and_skips_vanished_records() {
    let Some(probe) = redis_for_tests("redis_list_pages").await else {
        return;
    };
    let uri = std::env::var("PRESENCE_TEST_REDIS_URI")
        .unwrap_or_else(|_| presence::store::redis::test_support::DEFAULT_TEST_REDIS_URI.into());
    let options = presence::store::redis::RedisOptions::default()
        .page_size(7)
        .page_concurrency(3);
    let store = RedisStore::connect_with(&uri, probe.prefix(), options)
        .await
        .expect("connect");
    let names: BTreeSet<String> = (0..300).map(|i| format!("p{i:03}")).collect();
    for name in &names {
        store
            .login(
                &id(name),
                &new_lease_id(),
                TTL,
                meta(json!({ "name": name })),
            )
            .await
            .expect("login");
    }
    // A member whose record vanished (e.g. deleted by hand) is skipped, not an error,
    // and so is one whose record does not parse.
    let mut conn = raw().await;
    let _: i64 = redis::cmd("HDEL")
        .arg(store.records_key())
        .arg("p013")
        .query_async(&mut conn)
        .await
        .expect("hdel");
    let _: i64 = redis::cmd("HSET")
        .arg(store.records_key())
        .arg("p014")
        .arg("garbage")
        .query_async(&mut conn)
        .await
        .expect("hset");

    let listed = store.list().await.expect("list");
    let expected: Vec<&str> = names
        .iter()
        .map(String::as_str)
        .filter(|n| *n != "p013" && *n != "p014")
        .collect();
    assert_eq!(ids(&listed), expected);
    assert!(listed.iter().all(|n| n.meta["name"] == n.node_id.as_str()));
    assert!(store.delete_prefix().await.is_ok());
}

#[tokio::test]
async fn redis_scripts_are_reloaded_after_script_flush() {
    let Some(store) = redis_for_tests("redis_scripts_reloaded").await else {
        return;
    };
    let lease = new_lease_id();
    store
        .login(&id("n"), &lease, TTL, Meta::new())
        .await
        .expect("login");
    let mut conn = raw().await;
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .expect("script flush");
    assert!(store.heartbeat(&id("n"), &lease, TTL, None).await.is_ok());
    assert_eq!(store.list().await.map(|l| l.len()), Ok(1));
    assert_eq!(store.logout(&id("n"), &lease).await, Ok(true));
    assert!(store.delete_prefix().await.is_ok());
}

#[tokio::test]
async fn redis_describe_hides_credentials() {
    let Some(store) = redis_for_tests("redis_describe").await else {
        return;
    };
    let d = store.describe();
    assert!(d.starts_with("redis ") && d.contains(store.prefix()), "{d}");
    // A URI with a password is rejected by the server or not, but never echoed.
    let uri = "redis://user:s3cret-pw@127.0.0.1:1/0";
    let err = RedisStore::connect(uri, "p")
        .await
        .err()
        .map(|e| e.to_string());
    assert!(
        err.as_deref().is_some_and(|e| !e.contains("s3cret")),
        "{err:?}"
    );
}

#[tokio::test]
async fn redis_unreachable_fails_fast() {
    let started = std::time::Instant::now();
    // Port 1 on localhost: nothing listens, the connection is refused.
    let r = RedisStore::connect("redis://127.0.0.1:1", "p").await;
    assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn redis_rejects_bad_prefixes_and_schemes() {
    for prefix in ["", "a{b}", "has space"] {
        let r = RedisStore::connect("redis://127.0.0.1:6379", prefix).await;
        assert!(
            matches!(r, Err(StoreError::Unavailable(_))),
            "{prefix:?}: {r:?}"
        );
    }
    let r = presence::store::open(Some("mysql://x"), "p").await;
    assert!(r.is_err());
    let unique = unique_prefix("x");
    assert!(unique.starts_with("test-") && unique.ends_with("-x"));
}

/// The next change, or `None` if none comes within a second (store time for memory).
async fn next_change(changes: &mut Changes) -> Option<Arc<Change>> {
    tokio::time::timeout(Duration::from_secs(1), changes.recv())
        .await
        .ok()
        .flatten()
}

/// The kind, node and data of a change, for comparing whole changes at once.
fn described(change: &Change) -> (ChangeKind, String, serde_json::Value) {
    let data = serde_json::from_slice(&change.data).expect("change data is JSON");
    (change.kind, change.node_id.to_string(), data)
}

async fn feed_reports_joins_meta_changes_and_logouts_with_their_data(h: &Harness) {
    let s = &h.store;
    let mut watch = s.watch(None, WatchOptions::default()).await.expect("watch");
    assert!(matches!(watch.start, WatchStart::Snapshot));
    let lease = new_lease_id();
    s.login(&id("n1"), &lease, TTL, meta(json!({"load": 0.5})))
        .await
        .expect("login");
    let joined = next_change(&mut watch.changes).await.expect("join");
    let node = serde_json::to_value(get(h, "n1").await.expect("online")).expect("node");
    assert_eq!(described(&joined), (ChangeKind::Join, "n1".into(), node));

    // Time only, or the same meta again: no change.
    s.heartbeat(&id("n1"), &lease, TTL, None).await.expect("hb");
    s.heartbeat(&id("n1"), &lease, TTL, Some(meta(json!({"load": 0.5}))))
        .await
        .expect("hb");
    s.heartbeat(&id("n1"), &lease, TTL, Some(meta(json!({"load": 0.9}))))
        .await
        .expect("hb");
    let updated = next_change(&mut watch.changes).await.expect("update");
    let node = serde_json::to_value(get(h, "n1").await.expect("online")).expect("node");
    assert_eq!(described(&updated), (ChangeKind::Update, "n1".into(), node));
    assert!(updated.position > joined.position);

    assert_eq!(s.logout(&id("n1"), &lease).await, Ok(true));
    let left = next_change(&mut watch.changes).await.expect("leave");
    assert_eq!(
        described(&left),
        (
            ChangeKind::Leave(LeaveReason::Logout),
            "n1".into(),
            json!({"node_id": "n1", "reason": "logout"})
        )
    );
    assert_eq!(s.logout(&id("n1"), &lease).await, Ok(false));
    assert!(
        next_change(&mut watch.changes).await.is_none(),
        "a no-op logout is no change"
    );
}

async fn feed_resumes_after_a_cursor_and_snapshots_without_one(h: &Harness) {
    let s = &h.store;
    let mut watch = s.watch(None, WatchOptions::default()).await.expect("watch");
    for n in ["a", "b", "c"] {
        s.login(&id(n), &new_lease_id(), TTL, Meta::new())
            .await
            .expect("login");
    }
    let first = next_change(&mut watch.changes).await.expect("a");
    let mut resumed = s
        .watch(Some(&first.cursor()), WatchOptions::default())
        .await
        .expect("watch");
    let WatchStart::Resumed(replay) = resumed.start else {
        panic!("a fresh cursor resumes");
    };
    // What the feed held when the watch began is replayed; the rest (Redis: what
    // its reader had not read yet) follows live, with nothing twice.
    let mut after: Vec<String> = replay.iter().map(|c| c.node_id.to_string()).collect();
    while after.len() < 2 {
        let change = next_change(&mut resumed.changes)
            .await
            .expect("live change");
        after.push(change.node_id.to_string());
    }
    // Nodes of different shards may come in any order.
    let mut rest: Vec<&str> = ["a", "b", "c"]
        .into_iter()
        .filter(|n| *n != &*first.node_id)
        .collect();
    rest.sort_unstable();
    after.sort_unstable();
    assert_eq!(after, rest);
    assert!(next_change(&mut resumed.changes).await.is_none());

    // Another feed's cursor, or one from the future: a snapshot.
    let foreign = Cursor::new(
        first.cursor().epoch() ^ 1,
        first.cursor().positions().to_vec(),
    );
    let later = first.cursor().positions()[0];
    let future = Cursor::new(
        first.cursor().epoch(),
        vec![presence::store::feed::Position {
            ms: later.ms + 1_000_000,
            seq: 0,
        }],
    );
    for cursor in [foreign, future] {
        let w = s
            .watch(Some(&cursor), WatchOptions::default())
            .await
            .expect("watch");
        assert!(matches!(w.start, WatchStart::Snapshot), "{cursor:?}");
    }
}

async fn feed_reports_each_expiry_once(h: &Harness) {
    let s = &h.store;
    let mut watch = s.watch(None, WatchOptions::default()).await.expect("watch");
    let ttl = 500;
    s.login(&id("gone"), &new_lease_id(), ttl, Meta::new())
        .await
        .expect("login");
    s.login(&id("back"), &new_lease_id(), ttl, Meta::new())
        .await
        .expect("login");
    s.login(&id("stays"), &new_lease_id(), TTL, Meta::new())
        .await
        .expect("login");
    for _ in 0..3 {
        next_change(&mut watch.changes).await.expect("join");
    }
    h.elapse(Duration::from_millis(ttl + 100)).await;
    // "back" logs in again before any sweep: its expiry is reported by the login.
    s.login(&id("back"), &new_lease_id(), TTL, Meta::new())
        .await
        .expect("login");
    let mut expired = 0;
    for _ in 0..3 {
        expired += s.sweep_expired().await.expect("sweep").expired;
    }
    let mut seen = Vec::new();
    while let Some(change) = next_change(&mut watch.changes).await {
        seen.push((change.kind, change.node_id.to_string()));
    }
    let leave = ChangeKind::Leave(LeaveReason::Expired);
    // Each node's changes are in order; nodes of different shards may interleave.
    let of = |node: &str| -> Vec<ChangeKind> {
        seen.iter()
            .filter(|(_, n)| n == node)
            .map(|(kind, _)| *kind)
            .collect()
    };
    assert_eq!(of("back"), [leave, ChangeKind::Join], "{seen:?}");
    assert_eq!(of("gone"), [leave], "{seen:?}");
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(expired, 1, "the sweeps report the one expiry left, once");
    assert_eq!(ids(&list(h).await), ["back", "stays"]);
}

#[tokio::test]
async fn redis_servers_sweeping_one_deployment_report_each_expiry_once() {
    let Some(first) = redis_for_tests("sweepers").await else {
        return;
    };
    let uri = std::env::var("PRESENCE_TEST_REDIS_URI")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let mut servers = vec![first.clone()];
    for _ in 0..2 {
        servers.push(
            RedisStore::connect(&uri, first.prefix())
                .await
                .expect("connect"),
        );
    }
    let mut watch = first
        .watch(None, WatchOptions::default())
        .await
        .expect("watch");
    let ttl = 300;
    for n in 0..200 {
        first
            .login(&id(&format!("n{n}")), &new_lease_id(), ttl, Meta::new())
            .await
            .expect("login");
    }
    tokio::time::sleep(Duration::from_millis(ttl + 100)).await;
    // Three servers sweep at once, several times each.
    let sweeps = servers.iter().map(|s| async move {
        let mut n = 0;
        for _ in 0..5 {
            n += s.sweep_expired().await.expect("sweep").expired;
        }
        n
    });
    let reported: u64 = futures_util::future::join_all(sweeps)
        .await
        .into_iter()
        .sum();
    assert_eq!(reported, 200);
    let mut leaves = BTreeSet::new();
    let mut events = 0;
    while let Some(change) = next_change(&mut watch.changes).await {
        if change.kind == ChangeKind::Leave(LeaveReason::Expired) {
            events += 1;
            leaves.insert(change.node_id.to_string());
        }
    }
    assert_eq!((events, leaves.len()), (200, 200));
    assert!(first.delete_prefix().await.is_ok());
}

// ---------------------------------------------------------------------------------
// Statuses, queries and stats (both stores)

/// One page of `q`: its nodes (the page's JSON decoded) and `next_after`.
async fn page(h: &Harness, q: &Query) -> (Vec<Node>, Option<String>) {
    let page = h.store.query_json(q).await.expect("query_json");
    let nodes: Vec<Node> =
        serde_json::from_slice(&page.json.to_bytes()).expect("a page is a JSON node list");
    assert_eq!(page.json.count, nodes.len(), "count of {q:?}");
    (nodes, page.next_after)
}

/// The ids of one page of `q`, and `next_after`.
async fn page_ids(h: &Harness, q: &Query) -> (Vec<String>, Option<String>) {
    let (nodes, next) = page(h, q).await;
    (nodes.into_iter().map(|n| n.node_id).collect(), next)
}

/// Every page of `filter` by `limit`, each page's ids with its `next_after`; checks
/// that `next_after` is the page's last id whenever it is set.
async fn walk(h: &Harness, filter: Filter, limit: usize) -> Vec<(Vec<String>, Option<String>)> {
    let mut pages = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut q = Query::new(filter.clone()).limit(limit);
        if let Some(a) = &after {
            q = q.after(a.clone());
        }
        let (ids, next) = page_ids(h, &q).await;
        if let Some(n) = &next {
            assert_eq!(ids.last(), Some(n), "next_after is the last id of the page");
        }
        pages.push((ids, next.clone()));
        match next {
            Some(n) => after = Some(n),
            None => return pages,
        }
        assert!(pages.len() < 100, "paging does not end");
    }
}

fn strings(ids: &[&str]) -> Vec<String> {
    ids.iter().map(|s| (*s).to_owned()).collect()
}

/// The stats a listing implies.
fn counted(nodes: &[Node]) -> Stats {
    let mut counts = [0u64; 3];
    for n in nodes {
        counts[n.status.index()] += 1;
    }
    Stats::from_counts(counts)
}

async fn stats(h: &Harness) -> Stats {
    h.store.stats().await.expect("stats")
}

/// Sweeps until nothing is left to report; returns how many expiries were reported.
async fn sweep_all(h: &Harness) -> u64 {
    let mut reported = 0;
    for _ in 0..1_000 {
        let sweep = h.store.sweep_expired().await.expect("sweep");
        reported += sweep.expired;
        if sweep.expired == 0 && !sweep.more {
            return reported;
        }
    }
    panic!("sweeping does not end");
}

async fn status_of(h: &Harness, node: &str) -> Option<Status> {
    get(h, node).await.map(|n| n.status)
}

async fn login_status_defaults_to_up_and_login_with_sets_it(h: &Harness) {
    let s = &h.store;
    s.login(&id("plain"), &new_lease_id(), TTL, Meta::new())
        .await
        .expect("login");
    for (n, status) in [
        ("deg", Status::Degraded),
        ("drn", Status::Draining),
        ("up", Status::Up),
    ] {
        s.login_with(&id(n), &new_lease_id(), TTL, meta(json!({"n": n})), status)
            .await
            .expect("login");
    }
    assert_eq!(status_of(h, "plain").await, Some(Status::Up));
    assert_eq!(status_of(h, "deg").await, Some(Status::Degraded));
    assert_eq!(status_of(h, "drn").await, Some(Status::Draining));
    assert_eq!(status_of(h, "up").await, Some(Status::Up));
    // `list` checks that `list_json` is exactly the listing serialized.
    let listed = list(h).await;
    let statuses: Vec<(&str, Status)> = listed
        .iter()
        .map(|n| (n.node_id.as_str(), n.status))
        .collect();
    assert_eq!(
        statuses,
        [
            ("deg", Status::Degraded),
            ("drn", Status::Draining),
            ("plain", Status::Up),
            ("up", Status::Up)
        ]
    );
    let text = h.store.list_json().await.expect("list_json").to_bytes();
    let text = String::from_utf8_lossy(&text);
    for st in ["up", "degraded", "draining"] {
        assert!(text.contains(&format!(r#""status":"{st}""#)), "{text}");
    }
    // A login replaces the status with its own (default up).
    s.login(&id("deg"), &new_lease_id(), TTL, Meta::new())
        .await
        .expect("login");
    assert_eq!(status_of(h, "deg").await, Some(Status::Up));
    s.login_with(
        &id("up"),
        &new_lease_id(),
        TTL,
        Meta::new(),
        Status::Draining,
    )
    .await
    .expect("login");
    assert_eq!(status_of(h, "up").await, Some(Status::Draining));
}

async fn heartbeat_with_status_changes_it_as_an_update_and_none_keeps_it(h: &Harness) {
    let s = &h.store;
    let mut watch = s.watch(None, WatchOptions::default()).await.expect("watch");
    let (n, lease) = (id("n"), new_lease_id());
    s.login(&n, &lease, TTL, meta(json!({"load": 0.5})))
        .await
        .expect("login");
    let joined = next_change(&mut watch.changes).await.expect("join");
    assert_eq!(described(&joined).2["status"], "up");

    // No status keeps it, the same status again is no change, and neither is an event.
    s.heartbeat_with(&n, &lease, TTL, None, None)
        .await
        .expect("hb");
    s.heartbeat_with(&n, &lease, TTL, None, Some(Status::Up))
        .await
        .expect("hb");
    assert_eq!(status_of(h, "n").await, Some(Status::Up));
    s.heartbeat_with(&n, &lease, TTL, None, Some(Status::Draining))
        .await
        .expect("hb");
    let update = next_change(&mut watch.changes).await.expect("update");
    let node = get(h, "n").await.expect("online");
    assert_eq!(node.status, Status::Draining);
    assert_eq!(node.meta, meta(json!({"load": 0.5})), "the meta is kept");
    let as_json = serde_json::to_value(&node).expect("node");
    assert_eq!(
        described(&update),
        (ChangeKind::Update, "n".into(), as_json)
    );

    // Kept by a heartbeat without status, with or without meta; the same status and
    // meta again is no event.
    s.heartbeat_with(&n, &lease, TTL, None, None)
        .await
        .expect("hb");
    s.heartbeat_with(
        &n,
        &lease,
        TTL,
        Some(meta(json!({"load": 0.5}))),
        Some(Status::Draining),
    )
    .await
    .expect("hb");
    assert_eq!(status_of(h, "n").await, Some(Status::Draining));
    s.heartbeat(&n, &lease, TTL, Some(meta(json!({"load": 0.7}))))
        .await
        .expect("hb");
    let update = next_change(&mut watch.changes).await.expect("meta update");
    let data = described(&update).2;
    assert_eq!(update.kind, ChangeKind::Update);
    assert_eq!(
        (data["status"].clone(), data["meta"].clone()),
        (json!("draining"), json!({"load": 0.7}))
    );

    // Status and meta at once: one update.
    s.heartbeat_with(
        &n,
        &lease,
        TTL,
        Some(meta(json!({"load": 0.1}))),
        Some(Status::Degraded),
    )
    .await
    .expect("hb");
    let update = next_change(&mut watch.changes).await.expect("update");
    let node = serde_json::to_value(get(h, "n").await.expect("online")).expect("node");
    assert_eq!(node["status"], "degraded");
    assert_eq!(described(&update), (ChangeKind::Update, "n".into(), node));

    // A heartbeat under another lease changes nothing.
    assert_eq!(
        s.heartbeat_with(&n, &new_lease_id(), TTL, None, Some(Status::Up))
            .await,
        Err(StoreError::LeaseMismatch)
    );
    assert_eq!(status_of(h, "n").await, Some(Status::Degraded));

    // Back to up.
    s.heartbeat_with(&n, &lease, TTL, None, Some(Status::Up))
        .await
        .expect("hb");
    let update = next_change(&mut watch.changes).await.expect("update");
    assert_eq!(
        (update.kind, described(&update).2["status"].clone()),
        (ChangeKind::Update, json!("up"))
    );
    assert!(
        next_change(&mut watch.changes).await.is_none(),
        "nothing else is a change"
    );
    let listed = list(h).await;
    assert_eq!(
        listed.iter().map(|n| n.status).collect::<Vec<_>>(),
        [Status::Up]
    );
}

async fn query_filters_by_prefix_status_and_meta(h: &Harness) {
    let nodes = [
        (
            "eu-1",
            Status::Up,
            json!({"region": "eu", "load": 0.5, "gpu": true}),
        ),
        (
            "eu-2",
            Status::Degraded,
            json!({"region": "eu", "load": 0.25, "gpu": false}),
        ),
        (
            "eu-3",
            Status::Draining,
            json!({"region": "eu", "load": 0.5}),
        ),
        (
            "us-1",
            Status::Up,
            json!({"region": "us", "load": 0.5, "gpu": true}),
        ),
        ("us-2", Status::Degraded, json!({"region": "us", "load": 1})),
        // Nested keys do not match, nor does null, an array, a missing key or no meta.
        (
            "x-1",
            Status::Up,
            json!({"nested": {"region": "eu", "load": 0.5, "gpu": true}}),
        ),
        ("x-2", Status::Up, json!({})),
        (
            "x-3",
            Status::Draining,
            json!({"region": null, "load": [0.5], "gpu": {"v": true}}),
        ),
    ];
    for (n, status, m) in &nodes {
        h.store
            .login_with(&id(n), &new_lease_id(), TTL, meta(m.clone()), *status)
            .await
            .expect("login");
    }
    let all = list(h).await;
    let f = Filter::default;
    let cases: Vec<(Filter, Vec<&str>)> = vec![
        (
            f(),
            vec!["eu-1", "eu-2", "eu-3", "us-1", "us-2", "x-1", "x-2", "x-3"],
        ),
        (
            f().prefix(""),
            vec!["eu-1", "eu-2", "eu-3", "us-1", "us-2", "x-1", "x-2", "x-3"],
        ),
        (f().prefix("eu-"), vec!["eu-1", "eu-2", "eu-3"]),
        (f().prefix("u"), vec!["us-1", "us-2"]),
        (f().prefix("x-3"), vec!["x-3"]),
        (f().prefix("zz"), vec![]),
        (f().prefix("eu-10"), vec![]),
        (f().statuses([Status::Degraded]), vec!["eu-2", "us-2"]),
        (
            f().statuses([Status::Up, Status::Draining]),
            vec!["eu-1", "eu-3", "us-1", "x-1", "x-2", "x-3"],
        ),
        (
            f().statuses(Status::ALL),
            vec!["eu-1", "eu-2", "eu-3", "us-1", "us-2", "x-1", "x-2", "x-3"],
        ),
        (f().meta("region", "eu"), vec!["eu-1", "eu-2", "eu-3"]),
        (f().meta("region", "us"), vec!["us-1", "us-2"]),
        (f().meta("region", "EU"), vec![]),
        (f().meta("load", "0.5"), vec!["eu-1", "eu-3", "us-1"]),
        (f().meta("load", "1"), vec!["us-2"]),
        // By JSON text: 0.50 is not how 0.5 is written.
        (f().meta("load", "0.50"), vec![]),
        (f().meta("gpu", "true"), vec!["eu-1", "us-1"]),
        (f().meta("gpu", "false"), vec!["eu-2"]),
        (f().meta("region", "null"), vec![]),
        (f().meta("zone", "eu"), vec![]),
        (f().meta("region", "eu").meta("gpu", "true"), vec!["eu-1"]),
        (f().meta("region", "eu").meta("region", "us"), vec![]),
        (
            f().prefix("eu-")
                .statuses([Status::Up, Status::Draining])
                .meta("load", "0.5"),
            vec!["eu-1", "eu-3"],
        ),
        (
            f().prefix("eu-")
                .statuses([Status::Up, Status::Draining])
                .meta("load", "0.5")
                .meta("gpu", "true"),
            vec!["eu-1"],
        ),
        (f().prefix("us-").statuses([Status::Draining]), vec![]),
        (
            f().statuses([Status::Degraded]).meta("gpu", "false"),
            vec!["eu-2"],
        ),
    ];
    for (filter, expected) in cases {
        for q in [
            Query::new(filter.clone()),
            Query::new(filter.clone()).limit(100),
        ] {
            let (got, next) = page(h, &q).await;
            let want: Vec<&Node> = all
                .iter()
                .filter(|n| expected.contains(&n.node_id.as_str()))
                .collect();
            assert_eq!(got.iter().collect::<Vec<_>>(), want, "{q:?}");
            assert_eq!(next, None, "{q:?}");
        }
        // The same by pages of one: every match once, in order, and no next after the
        // last.
        let pages = walk(h, filter.clone(), 1).await;
        let mut nexts: Vec<Option<String>> =
            expected.iter().map(|n| Some((*n).to_owned())).collect();
        if let Some(last) = nexts.last_mut() {
            *last = None;
        }
        if expected.is_empty() {
            nexts.push(None);
        }
        let walked: Vec<String> = pages.iter().flat_map(|(ids, _)| ids.clone()).collect();
        assert_eq!(walked, strings(&expected), "{filter:?} by pages of 1");
        assert_eq!(
            pages.into_iter().map(|(_, n)| n).collect::<Vec<_>>(),
            nexts,
            "{filter:?} by pages of 1"
        );
    }
}

/// The ids a filter selects, read through the query (unpaged, and by pages of 1)
/// and, as the reference, from the full listing.
async fn selected(h: &Harness, filter: Filter) -> Vec<String> {
    let listed: Vec<String> = list(h)
        .await
        .into_iter()
        .filter(|n| {
            let meta = serde_json::to_vec(&n.meta).expect("meta");
            filter.matches(&n.node_id, n.status, Some(&meta))
        })
        .map(|n| n.node_id)
        .collect();
    let (ids, next) = page_ids(h, &Query::new(filter.clone())).await;
    assert_eq!((&ids, next), (&listed, None), "{filter:?}");
    let walked: Vec<String> = walk(h, filter.clone(), 1)
        .await
        .into_iter()
        .flat_map(|(ids, _)| ids)
        .collect();
    assert_eq!(walked, listed, "{filter:?} by pages of 1");
    ids
}

async fn label_queries_follow_logins_meta_changes_logouts_and_expiry(h: &Harness) {
    let s = &h.store;
    let eu = || Filter::default().meta("region", "eu");
    let mut leases = std::collections::HashMap::new();
    for (n, m) in [
        ("a", json!({"region": "eu", "load": 1})),
        ("b", json!({"region": "us"})),
        ("c", json!({"region": "eu", "gpu": true})),
        ("d", json!({"nested": {"region": "eu"}})),
    ] {
        let lease = new_lease_id();
        s.login(&id(n), &lease, TTL, meta(m)).await.expect("login");
        leases.insert(n, lease);
    }
    assert_eq!(selected(h, eu()).await, strings(&["a", "c"]));
    assert_eq!(selected(h, eu().meta("gpu", "true")).await, strings(&["c"]));
    assert_eq!(selected(h, eu().prefix("c")).await, strings(&["c"]));
    assert_eq!(
        page_ids(h, &Query::new(eu()).after("a")).await,
        (strings(&["c"]), None)
    );
    // A meta change moves a node between labels; a change of a number alone keeps
    // its labels.
    s.heartbeat(
        &id("b"),
        &leases["b"],
        TTL,
        Some(meta(json!({"region": "eu"}))),
    )
    .await
    .expect("heartbeat");
    s.heartbeat(
        &id("a"),
        &leases["a"],
        TTL,
        Some(meta(json!({"region": "us"}))),
    )
    .await
    .expect("heartbeat");
    s.heartbeat(
        &id("c"),
        &leases["c"],
        TTL,
        Some(meta(json!({"region": "eu", "gpu": true, "load": 7}))),
    )
    .await
    .expect("heartbeat");
    assert_eq!(selected(h, eu()).await, strings(&["b", "c"]));
    assert_eq!(
        selected(h, Filter::default().meta("region", "us")).await,
        strings(&["a"])
    );
    // A heartbeat without meta keeps the labels.
    s.heartbeat(&id("b"), &leases["b"], TTL, None)
        .await
        .expect("heartbeat");
    assert_eq!(selected(h, eu()).await, strings(&["b", "c"]));
    // A logout and a re-login with other meta take the labels away.
    assert_eq!(s.logout(&id("c"), &leases["c"]).await, Ok(true));
    let lease = new_lease_id();
    s.login(&id("a"), &lease, 1_000, meta(json!({"region": "eu"})))
        .await
        .expect("login");
    assert_eq!(selected(h, eu()).await, strings(&["a", "b"]));
    assert_eq!(
        selected(h, Filter::default().meta("region", "us")).await,
        strings(&[])
    );
    assert_eq!(
        selected(h, Filter::default().meta("gpu", "true")).await,
        strings(&[])
    );
    // An expired node leaves the label's answers at once, and its labels go with
    // its record.
    h.elapse(Duration::from_millis(1_200)).await;
    assert_eq!(selected(h, eu()).await, strings(&["b"]));
    sweep_all(h).await;
    assert_eq!(selected(h, eu()).await, strings(&["b"]));
    s.login(
        &id("a"),
        &new_lease_id(),
        TTL,
        meta(json!({"region": "eu"})),
    )
    .await
    .expect("login");
    assert_eq!(selected(h, eu()).await, strings(&["a", "b"]));
}

async fn query_pages_250_nodes_by_100(h: &Harness) {
    let tasks: Vec<_> = (0..250)
        .map(|i| {
            let store = Arc::clone(&h.store);
            tokio::spawn(async move {
                let status = Status::ALL[i % 3];
                store
                    .login_with(
                        &id(&format!("p{i:03}")),
                        &new_lease_id(),
                        TTL,
                        meta(json!({ "i": i })),
                        status,
                    )
                    .await
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("task").expect("login");
    }
    let mut after: Option<String> = None;
    let mut sizes = Vec::new();
    let mut nexts = Vec::new();
    let mut paged = Vec::new();
    loop {
        let mut q = Query::new(Filter::default()).limit(100);
        if let Some(a) = &after {
            q = q.after(a.clone());
        }
        let (nodes, next) = page(h, &q).await;
        sizes.push(nodes.len());
        nexts.push(next.clone());
        paged.extend(nodes);
        match next {
            Some(n) => after = Some(n),
            None => break,
        }
        assert!(sizes.len() < 10, "paging does not end");
    }
    assert_eq!(sizes, [100, 100, 50]);
    assert_eq!(
        nexts,
        [Some("p099".to_owned()), Some("p199".to_owned()), None]
    );
    assert_eq!(paged, list(h).await, "every node once, in order, as listed");
    // Filtered pages: the degraded ones (i % 3 == 1: 83 of them) by 40.
    let pages = walk(h, Filter::default().statuses([Status::Degraded]), 40).await;
    let sizes: Vec<usize> = pages.iter().map(|(ids, _)| ids.len()).collect();
    assert_eq!(sizes, [40, 40, 3]);
    let walked: Vec<String> = pages.into_iter().flat_map(|(ids, _)| ids).collect();
    let expected: Vec<String> = (0..250)
        .filter(|i| i % 3 == 1)
        .map(|i| format!("p{i:03}"))
        .collect();
    assert_eq!(walked, expected);
}

async fn query_after_is_exclusive_and_combines_with_prefix(h: &Harness) {
    for n in [
        "a1", "a2", "a3", "a4", "a5", "b1", "b2", "b3", "b4", "b5", "c1",
    ] {
        h.store
            .login(&id(n), &new_lease_id(), TTL, Meta::new())
            .await
            .expect("login");
    }
    let q = |f: Filter| Query::new(f);
    let all = Filter::default;
    let b = || Filter::default().prefix("b");
    let cases: Vec<(Query, Vec<&str>, Option<&str>)> = vec![
        (
            q(all()).after("a3"),
            vec!["a4", "a5", "b1", "b2", "b3", "b4", "b5", "c1"],
            None,
        ),
        (q(all()).after("a3").limit(2), vec!["a4", "a5"], Some("a5")),
        (q(all()).after("a5").limit(2), vec!["b1", "b2"], Some("b2")),
        // An id that is not a node's: what sorts after it.
        (
            q(all()).after("a35").limit(3),
            vec!["a4", "a5", "b1"],
            Some("b1"),
        ),
        (
            q(all()).after("0"),
            vec![
                "a1", "a2", "a3", "a4", "a5", "b1", "b2", "b3", "b4", "b5", "c1",
            ],
            None,
        ),
        (q(all()).after("c1"), vec![], None),
        (q(all()).after("c1").limit(5), vec![], None),
        (q(all()).after("b5").limit(1), vec!["c1"], None),
        // With a prefix: `after` before the prefix's ids, inside them, after them.
        (q(b()).after("a3"), vec!["b1", "b2", "b3", "b4", "b5"], None),
        (q(b()).after("a3").limit(2), vec!["b1", "b2"], Some("b2")),
        (q(b()).after("b2"), vec!["b3", "b4", "b5"], None),
        (q(b()).after("b"), vec!["b1", "b2", "b3", "b4", "b5"], None),
        // Exactly as many matches as the limit: no next page.
        (q(b()).after("b2").limit(3), vec!["b3", "b4", "b5"], None),
        (q(b()).limit(5), vec!["b1", "b2", "b3", "b4", "b5"], None),
        (q(b()).limit(4), vec!["b1", "b2", "b3", "b4"], Some("b4")),
        (q(b()).after("b5"), vec![], None),
        (q(b()).after("b5").limit(1), vec![], None),
        (q(b()).after("c"), vec![], None),
        // A limit larger than the matches: all of them, no next page.
        (
            q(all()).limit(100),
            vec![
                "a1", "a2", "a3", "a4", "a5", "b1", "b2", "b3", "b4", "b5", "c1",
            ],
            None,
        ),
        (
            q(b()).after("b1").limit(10_000),
            vec!["b2", "b3", "b4", "b5"],
            None,
        ),
    ];
    for (query, ids, next) in cases {
        assert_eq!(
            page_ids(h, &query).await,
            (strings(&ids), next.map(str::to_owned)),
            "{query:?}"
        );
    }
}

async fn query_pages_skip_expired_nodes(h: &Harness) {
    let short = 1_000;
    // Every odd node expires; the last one (e19) too.
    for i in 0..20 {
        let ttl = if i % 2 == 0 { TTL } else { short };
        let status = if i % 4 < 2 {
            Status::Up
        } else {
            Status::Degraded
        };
        h.store
            .login_with(
                &id(&format!("e{i:02}")),
                &new_lease_id(),
                ttl,
                Meta::new(),
                status,
            )
            .await
            .expect("login");
    }
    assert_eq!(
        page_ids(h, &Query::new(Filter::default()).limit(3)).await.0,
        ["e00", "e01", "e02"]
    );
    h.elapse(Duration::from_millis(short + 200)).await;
    let even = |from: usize, to: usize| -> Vec<String> {
        (from..to)
            .filter(|i| i % 2 == 0)
            .map(|i| format!("e{i:02}"))
            .collect()
    };
    let all = || Query::new(Filter::default());
    assert_eq!(
        page_ids(h, &all().limit(5)).await,
        (even(0, 10), Some("e08".into()))
    );
    assert_eq!(
        page_ids(h, &all().limit(5).after("e08")).await,
        (even(10, 20), None)
    );
    // Ten online nodes, the expired e19 after the last: a page of ten is all of it.
    assert_eq!(page_ids(h, &all().limit(10)).await, (even(0, 20), None));
    assert_eq!(page_ids(h, &all().limit(11)).await, (even(0, 20), None));
    assert_eq!(page_ids(h, &all()).await, (even(0, 20), None));
    assert_eq!(
        page_ids(h, &all().after("e17").limit(1)).await,
        (vec!["e18".to_owned()], None)
    );
    assert_eq!(
        page_ids(h, &all().after("e18").limit(1)).await,
        (vec![], None)
    );
    // Filtered: the degraded online ones are e02, e06, e10, e14, e18.
    let degraded = Query::new(Filter::default().statuses([Status::Degraded]));
    assert_eq!(
        page_ids(h, &degraded.clone().limit(2)).await,
        (strings(&["e02", "e06"]), Some("e06".into()))
    );
    assert_eq!(
        page_ids(h, &degraded.clone().limit(3).after("e06")).await,
        (strings(&["e10", "e14", "e18"]), None)
    );
    let prefixed = Query::new(Filter::default().prefix("e1")).limit(2);
    assert_eq!(
        page_ids(h, &prefixed).await,
        (strings(&["e10", "e12"]), Some("e12".into()))
    );
}

async fn stats_follow_logins_status_changes_logouts_and_expiry(h: &Harness) {
    let s = &h.store;
    let short = 1_000;
    assert_eq!(stats(h).await, Stats::default());
    let mut leases = std::collections::HashMap::new();
    for (n, status, ttl) in [
        ("a", Status::Up, TTL),
        ("b", Status::Degraded, TTL),
        ("c", Status::Draining, TTL),
        ("d", Status::Degraded, TTL),
        ("e", Status::Draining, short),
        ("f", Status::Up, short),
    ] {
        let lease = new_lease_id();
        s.login_with(&id(n), &lease, ttl, Meta::new(), status)
            .await
            .expect("login");
        leases.insert(n, lease);
    }
    assert_eq!(stats(h).await, Stats::from_counts([2, 2, 2]));
    assert_eq!(stats(h).await.online, 6);

    let hb = |n: &'static str, status: Option<Status>| {
        let lease = leases[n].clone();
        async move { s.heartbeat_with(&id(n), &lease, TTL, None, status).await }
    };
    hb("b", Some(Status::Up)).await.expect("hb");
    assert_eq!(stats(h).await, Stats::from_counts([3, 1, 2]));
    hb("b", None).await.expect("hb");
    hb("b", Some(Status::Up)).await.expect("hb");
    assert_eq!(stats(h).await, Stats::from_counts([3, 1, 2]));
    assert_eq!(
        s.heartbeat_with(&id("a"), &new_lease_id(), TTL, None, Some(Status::Draining))
            .await,
        Err(StoreError::LeaseMismatch)
    );
    assert_eq!(stats(h).await, Stats::from_counts([3, 1, 2]));

    // A node online logs in again with another status: moved, not counted twice.
    let lease = new_lease_id();
    s.login_with(&id("c"), &lease, TTL, Meta::new(), Status::Degraded)
        .await
        .expect("login");
    leases.insert("c", lease);
    assert_eq!(stats(h).await, Stats::from_counts([3, 2, 1]));
    s.login_with(&id("c"), &leases["c"], TTL, Meta::new(), Status::Degraded)
        .await
        .expect("login");
    assert_eq!(stats(h).await, Stats::from_counts([3, 2, 1]));

    assert_eq!(s.logout(&id("d"), &leases["d"]).await, Ok(true));
    assert_eq!(stats(h).await, Stats::from_counts([3, 1, 1]));
    assert_eq!(s.logout(&id("d"), &leases["d"]).await, Ok(false));
    assert_eq!(
        s.logout(&id("a"), &new_lease_id()).await,
        Err(StoreError::LeaseMismatch)
    );
    assert_eq!(stats(h).await, Stats::from_counts([3, 1, 1]));
    assert_eq!(stats(h).await, counted(&list(h).await));

    // e (draining) and f (up) expire; f logs in again (degraded) before any sweep.
    h.elapse(Duration::from_millis(short + 200)).await;
    assert_eq!(
        s.heartbeat_with(&id("e"), &leases["e"], TTL, None, Some(Status::Up))
            .await,
        Err(StoreError::NotFound)
    );
    s.login_with(
        &id("f"),
        &new_lease_id(),
        TTL,
        Meta::new(),
        Status::Degraded,
    )
    .await
    .expect("login");
    // Reported once: by the sweep, or (memory) already by the failed heartbeat.
    assert!(sweep_all(h).await <= 1, "e's expiry, once");
    // a, b up; c, f degraded; none draining.
    assert_eq!(stats(h).await, Stats::from_counts([2, 2, 0]));
    assert_eq!(stats(h).await, counted(&list(h).await));
    assert_eq!(sweep_all(h).await, 0);
    assert_eq!(stats(h).await, Stats::from_counts([2, 2, 0]));
    // The expired e comes back.
    s.login_with(
        &id("e"),
        &new_lease_id(),
        TTL,
        Meta::new(),
        Status::Draining,
    )
    .await
    .expect("login");
    assert_eq!(stats(h).await, Stats::from_counts([2, 2, 1]));
    assert_eq!(stats(h).await, counted(&list(h).await));
}

/// xorshift64*: enough randomness for a workload, reproducible from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn status(&mut self) -> Status {
        Status::ALL[self.below(3) as usize]
    }
}

/// `PRESENCE_TEST_SEED` or the clock; printed, so that a failure can be replayed.
fn workload_seed() -> u64 {
    let seed = std::env::var("PRESENCE_TEST_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| wall_ms() ^ u64::from(std::process::id()) << 32);
    eprintln!("random workload seed {seed} (set PRESENCE_TEST_SEED to replay)");
    seed | 1
}

const WORKLOAD_IDS: usize = 8;

/// `tasks` tasks doing `ops` random logins (random status), heartbeats (random
/// status and meta changes, sometimes under a stale lease) and logouts each, on
/// [`WORKLOAD_IDS`] ids, so that they race; `ttl(i)` is node `i`'s TTL. Every call
/// must answer (a `NotFound` or `LeaseMismatch` is part of the race).
async fn workload(h: &Harness, seed: u64, tasks: u64, ops: usize, ttl: fn(usize) -> u64) {
    let leases: Arc<std::sync::Mutex<Vec<String>>> =
        Arc::new(std::sync::Mutex::new(vec![new_lease_id(); WORKLOAD_IDS]));
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let store = Arc::clone(&h.store);
            let leases = Arc::clone(&leases);
            tokio::spawn(async move {
                let mut rng = Rng(seed.wrapping_add(t.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1);
                for _ in 0..ops {
                    let i = rng.below(WORKLOAD_IDS as u64) as usize;
                    let node = id(&format!("w{i}"));
                    let lease = leases.lock().expect("leases")[i].clone();
                    match rng.below(20) {
                        0..=6 => {
                            let fresh = new_lease_id();
                            let m = meta(json!({ "v": rng.below(3), "tag": format!("t{}", rng.below(3)) }));
                            store
                                .login_with(&node, &fresh, ttl(i), m, rng.status())
                                .await
                                .expect("login");
                            leases.lock().expect("leases")[i] = fresh;
                        }
                        7..=14 => {
                            let status = (rng.below(2) == 0).then(|| rng.status());
                            let m = (rng.below(4) == 0).then(|| {
                                meta(json!({ "v": rng.below(3), "tag": format!("t{}", rng.below(3)) }))
                            });
                            let r = store.heartbeat_with(&node, &lease, ttl(i), m, status).await;
                            assert!(
                                matches!(
                                    r,
                                    Ok(_) | Err(StoreError::NotFound | StoreError::LeaseMismatch)
                                ),
                                "heartbeat: {r:?}"
                            );
                        }
                        15..=17 => {
                            let r = store.logout(&node, &lease).await;
                            assert!(
                                matches!(r, Ok(_) | Err(StoreError::LeaseMismatch)),
                                "logout: {r:?}"
                            );
                        }
                        _ => tokio::time::sleep(Duration::from_millis(1 + rng.below(3))).await,
                    }
                }
            })
        })
        .collect();
    for handle in handles {
        handle.await.expect("workload task");
    }
}

async fn random_workload_keeps_stats_equal_to_the_listing(h: &Harness) {
    let seed = workload_seed();
    // Phase one: nothing expires. At the quiescent point the counters are the listing.
    workload(h, seed, 6, 300, |_| TTL).await;
    let listed = list(h).await;
    assert_eq!(stats(h).await, counted(&listed), "seed {seed}");
    for tag in ["t0", "t1", "t2"] {
        selected(h, Filter::default().meta("tag", tag)).await;
    }
    assert_eq!(stats(h).await.online, listed.len() as u64, "seed {seed}");
    assert_eq!(sweep_all(h).await, 0, "seed {seed}");
    assert_eq!(stats(h).await, counted(&listed), "seed {seed}");

    // Phase two: half the ids have a short TTL, and a sweeper runs all along (as the
    // server does), racing the logins that replace expired records.
    const SHORT: u64 = 300;
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sweeper = {
        let store = Arc::clone(&h.store);
        let done = Arc::clone(&done);
        tokio::spawn(async move {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                store.sweep_expired().await.expect("sweep");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    workload(h, seed ^ 0x5555, 6, 300, |i| {
        if i % 2 == 0 {
            TTL
        } else {
            SHORT
        }
    })
    .await;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    sweeper.await.expect("sweeper");
    // Every short-lived node runs out; once the sweeps have reported them all, the
    // counters are the listing again.
    h.elapse(Duration::from_millis(SHORT + 300)).await;
    sweep_all(h).await;
    let listed = list(h).await;
    assert_eq!(stats(h).await, counted(&listed), "seed {seed}");
    assert_eq!(stats(h).await.online, listed.len() as u64, "seed {seed}");
    assert!(
        listed
            .iter()
            .all(|n| n.node_id.ends_with(['0', '2', '4', '6'])),
        "only long-lived nodes are left: {:?} (seed {seed})",
        ids(&listed)
    );
    for tag in ["t0", "t1", "t2"] {
        selected(h, Filter::default().meta("tag", tag)).await;
    }
}

// ---------------------------------------------------------------------------------
// RedisStore: the id index and counters of a deployment written before them

/// A record as an older server wrote it (no status mark unless `mark` gives one).
fn v1_record(exp: u64, seen: u64, lease: &str, mark: &str, meta: &str) -> String {
    format!(
        "{exp:015}{seen:015}{seen:015}{:05}{lease}{mark}{meta}",
        lease.len()
    )
}

/// Writes records directly, as a server older than the id index and the counters
/// did: the records hash and the nodes sorted set only.
async fn write_v1(store: &RedisStore, records: &[(&str, u64, String)]) {
    let mut conn = raw().await;
    for (node, exp, rec) in records {
        let _: () = redis::pipe()
            .cmd("HSET")
            .arg(store.records_key())
            .arg(*node)
            .arg(rec)
            .ignore()
            .cmd("ZADD")
            .arg(store.nodes_key())
            .arg(*exp)
            .arg(*node)
            .ignore()
            .query_async(&mut conn)
            .await
            .expect("write a v1 record");
    }
    for key in [store.records_key(), store.nodes_key()] {
        let _: () = redis::cmd("PEXPIRE")
            .arg(key)
            .arg(3_600_000)
            .query_async(&mut conn)
            .await
            .expect("pexpire");
    }
}

async fn key_exists(key: String) -> bool {
    let n: u64 = redis::cmd("EXISTS")
        .arg(key)
        .query_async(&mut raw().await)
        .await
        .expect("exists");
    n == 1
}

#[tokio::test]
async fn redis_index_build_indexes_and_counts_the_records_of_an_older_server() {
    let Some(store) = redis_for_tests("redis_index_build").await else {
        return;
    };
    let now = Store::now_ms(&store).await.expect("now");
    let lease = new_lease_id();
    let online = now + TTL;
    write_v1(
        &store,
        &[
            (
                "v1-a",
                online,
                v1_record(online, now, &lease, "", r#"{"region":"eu"}"#),
            ),
            (
                "v1-b",
                online,
                v1_record(online, now, &lease, "d", r#"{"region":"us"}"#),
            ),
            ("v1-c", online, v1_record(online, now, &lease, "", "")),
            (
                "v1-old",
                now - 5_000,
                v1_record(now - 5_000, now - 6_000, &lease, "", ""),
            ),
        ],
    )
    .await;
    let prefix = store.prefix().to_owned();
    assert!(!key_exists(format!("{{{prefix}}}:ids")).await);
    assert!(!key_exists(format!("{{{prefix}}}:counts")).await);

    // The first sweep builds them; the older server had no feed, so its expired
    // node has nothing to report.
    let sweep = store.sweep_expired().await.expect("sweep");
    assert_eq!(sweep.expired, 0);
    assert!(key_exists(format!("{{{prefix}}}:ids")).await);
    assert_eq!(store.stats().await, Ok(Stats::from_counts([2, 1, 0])));
    let h = Harness {
        store: Arc::new(store.clone()),
        redis: None,
    };
    assert_eq!(
        page_ids(&h, &Query::new(Filter::default())).await,
        (strings(&["v1-a", "v1-b", "v1-c"]), None)
    );
    assert_eq!(
        page_ids(&h, &Query::new(Filter::default().prefix("v1-")).limit(2)).await,
        (strings(&["v1-a", "v1-b"]), Some("v1-b".into()))
    );
    assert_eq!(
        page_ids(&h, &Query::new(Filter::default().meta("region", "eu"))).await,
        (strings(&["v1-a"]), None)
    );
    assert_eq!(
        page_ids(
            &h,
            &Query::new(Filter::default().statuses([Status::Degraded]))
        )
        .await,
        (strings(&["v1-b"]), None)
    );
    assert_eq!(stats(&h).await, counted(&list(&h).await));

    // The migrated nodes live on under their leases.
    store
        .heartbeat_with(&id("v1-a"), &lease, TTL, None, Some(Status::Draining))
        .await
        .expect("heartbeat");
    assert_eq!(store.logout(&id("v1-b"), &lease).await, Ok(true));
    assert_eq!(store.stats().await, Ok(Stats::from_counts([1, 0, 1])));
    // Another server's first sweep finds the work done.
    let uri = std::env::var("PRESENCE_TEST_REDIS_URI")
        .unwrap_or_else(|_| presence::store::redis::test_support::DEFAULT_TEST_REDIS_URI.into());
    let other = RedisStore::connect(&uri, store.prefix())
        .await
        .expect("connect");
    assert_eq!(other.sweep_expired().await.map(|s| s.expired), Ok(0));
    assert_eq!(other.stats().await, Ok(Stats::from_counts([1, 0, 1])));
    other
        .login(&id("v2-a"), &new_lease_id(), TTL, Meta::new())
        .await
        .expect("login");
    assert_eq!(
        page_ids(&h, &Query::new(Filter::default())).await,
        (strings(&["v1-a", "v1-c", "v2-a"]), None)
    );
    assert_eq!(store.stats().await, Ok(Stats::from_counts([2, 0, 1])));
    assert!(store.delete_prefix().await.is_ok());
}

#[tokio::test]
async fn redis_index_build_counts_an_older_servers_records_after_a_first_write() {
    // A server that starts on an older deployment may take a request before its
    // first sweep: the records of the older server must be indexed and counted all
    // the same.
    let Some(store) = redis_for_tests("redis_index_build_after_write").await else {
        return;
    };
    let now = Store::now_ms(&store).await.expect("now");
    let lease = new_lease_id();
    let online = now + TTL;
    write_v1(
        &store,
        &[
            ("v1-a", online, v1_record(online, now, &lease, "", "")),
            ("v1-b", online, v1_record(online, now, &lease, "", "")),
        ],
    )
    .await;
    store
        .login_with(
            &id("v2-a"),
            &new_lease_id(),
            TTL,
            Meta::new(),
            Status::Degraded,
        )
        .await
        .expect("login");
    // Logged in again by the new server before its first sweep: still one node.
    store
        .login(&id("v1-b"), &lease, TTL, Meta::new())
        .await
        .expect("login");
    store.sweep_expired().await.expect("sweep");
    let h = Harness {
        store: Arc::new(store.clone()),
        redis: None,
    };
    assert_eq!(
        page_ids(&h, &Query::new(Filter::default())).await,
        (strings(&["v1-a", "v1-b", "v2-a"]), None)
    );
    assert_eq!(store.stats().await, Ok(Stats::from_counts([2, 1, 0])));
    assert!(store.delete_prefix().await.is_ok());
}

// ---------------------------------------------------------------------------------
// RedisStore: the label index

async fn labels_in(store: &RedisStore) -> (Vec<String>, Vec<(String, String)>) {
    let mut conn = raw().await;
    let prefix = store.prefix();
    let members: Vec<String> = redis::cmd("ZRANGE")
        .arg(format!("{{{prefix}}}:labels"))
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .expect("zrange");
    let mut of: Vec<(String, String)> = redis::cmd("HGETALL")
        .arg(format!("{{{prefix}}}:labels-of"))
        .query_async(&mut conn)
        .await
        .expect("hgetall");
    of.sort();
    (members, of)
}

#[tokio::test]
async fn redis_labels_follow_the_data_model_and_leave_nothing_behind() {
    let Some(store) = redis_for_tests("redis_labels_data_model").await else {
        return;
    };
    let lease = new_lease_id();
    store
        .login(
            &id("n"),
            &lease,
            TTL,
            meta(json!({"region": "eu", "gpu": true, "load": 1, "tags": ["x"]})),
        )
        .await
        .expect("login");
    // Members `<key>\0<value>\0<id>`; the node's labels joined by \x01.
    assert_eq!(
        labels_in(&store).await,
        (
            strings(&["gpu\0true\0n", "region\0eu\0n"]),
            vec![("n".to_owned(), "gpu\0true\u{1}region\0eu".to_owned())]
        )
    );
    let prefix = store.prefix().to_owned();
    for k in ["labels", "labels-of"] {
        let pttl: i64 = redis::cmd("PTTL")
            .arg(format!("{{{prefix}}}:{k}"))
            .query_async(&mut raw().await)
            .await
            .expect("pttl");
        assert!(pttl > 0, "{k} has PTTL {pttl}");
    }
    store
        .heartbeat(&id("n"), &lease, TTL, Some(meta(json!({"region": "us"}))))
        .await
        .expect("heartbeat");
    assert_eq!(
        labels_in(&store).await,
        (
            strings(&["region\0us\0n"]),
            vec![("n".to_owned(), "region\0us".to_owned())]
        )
    );
    assert_eq!(store.logout(&id("n"), &lease).await, Ok(true));
    assert_eq!(labels_in(&store).await, (vec![], vec![]));
    for k in ["labels", "labels-of"] {
        assert!(
            !key_exists(format!("{{{prefix}}}:{k}")).await,
            "{k} is gone"
        );
    }
    assert!(store.delete_prefix().await.is_ok());
}

#[tokio::test]
async fn redis_index_build_labels_an_older_servers_records_as_rust_does() {
    // The build works the labels out in Lua; everything else in Rust: they agree.
    let Some(store) = redis_for_tests("redis_index_build_labels").await else {
        return;
    };
    let now = Store::now_ms(&store).await.expect("now");
    let lease = new_lease_id();
    let online = now + TTL;
    let metas = [
        json!({"b": true, "f": false, "s": "x y", "n": 1, "z": null, "o": {"a": "b"}, "l": ["c"]}),
        json!({"u": "é\u{1}", "nul": "a\u{0}b", "q": "\"quoted\"", "e": ""}),
        json!({"long": "v".repeat(251), "longer": "v".repeat(250)}),
        json!({}),
    ];
    let records: Vec<(String, u64, String)> = metas
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let json = serde_json::to_string(m).expect("meta");
            let mark = if i == 1 { "d" } else { "" };
            (
                format!("v1-{i}"),
                online,
                v1_record(online, now, &lease, mark, &json),
            )
        })
        .collect();
    let borrowed: Vec<(&str, u64, String)> = records
        .iter()
        .map(|(n, e, r)| (n.as_str(), *e, r.clone()))
        .collect();
    write_v1(&store, &borrowed).await;
    store.sweep_expired().await.expect("sweep");
    let (_, of) = labels_in(&store).await;
    let want: Vec<(String, String)> = metas
        .iter()
        .enumerate()
        .filter_map(|(i, m)| {
            let labels = presence::store::query::labels_of(m.as_object()?).join("\u{1}");
            (!labels.is_empty()).then(|| (format!("v1-{i}"), labels))
        })
        .collect();
    assert_eq!(of, want);
    let h = Harness {
        store: Arc::new(store.clone()),
        redis: None,
    };
    assert_eq!(
        selected(&h, Filter::default().meta("b", "true")).await,
        strings(&["v1-0"])
    );
    assert_eq!(
        selected(&h, Filter::default().meta("e", "")).await,
        strings(&["v1-1"])
    );
    assert!(store.delete_prefix().await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_shards_spread_a_deployment_over_every_master() {
    let Some(cluster) = shared_cluster("cluster_spread") else {
        return;
    };
    let Some(store) = cluster_for_tests("cluster_spread", 16).await else {
        return;
    };
    for i in 0..64 {
        store
            .login(&id(&format!("n{i}")), &new_lease_id(), TTL, Meta::new())
            .await
            .expect("login");
    }
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3, "{masters:?}");
    // Every master holds some of the deployment's shards (16 tags over 3 masters).
    let prefix = format!("{{{}.", store.prefix());
    for &port in &masters {
        let keys = cluster.keys_starting(port, &prefix);
        assert!(keys > 0, "master {port} holds none of {prefix}*");
    }
    assert_eq!(store.list().await.expect("list").len(), 64);
    assert_eq!(store.stats().await.expect("stats").online, 64);
    store.delete_prefix().await.expect("cleanup");
}

#[tokio::test]
async fn redis_a_deployment_keeps_its_shard_count() {
    let Some(single) = redis_for_tests("shard_count").await else {
        return;
    };
    single
        .login(&id("n1"), &new_lease_id(), TTL, Meta::new())
        .await
        .expect("login");
    let uri = presence::store::redis::test_support::DEFAULT_TEST_REDIS_URI;
    let uri = std::env::var("PRESENCE_TEST_REDIS_URI").unwrap_or_else(|_| uri.to_owned());
    // A deployment of one shard written before shard counts were recorded is one too.
    let four =
        RedisStore::connect_with(&uri, single.prefix(), RedisOptions::default().shards(4)).await;
    let Err(StoreError::Refused(why)) = four else {
        panic!("four shards over a deployment of one: {four:?}");
    };
    assert!(
        why.contains("has 1 shards") && why.contains("runs with 4"),
        "{why}"
    );
    // A lazy store refuses its calls instead, and the check says why.
    let lazy = RedisStore::connect_with(
        &uri,
        single.prefix(),
        RedisOptions::default().shards(4).lazy(true),
    )
    .await
    .expect("lazy");
    assert!(matches!(lazy.stats().await, Err(StoreError::Refused(_))));
    assert!(matches!(
        lazy.check_deployment().await,
        Err(StoreError::Refused(_))
    ));
    single.delete_prefix().await.expect("cleanup");

    let Some(sixteen) = sharded_redis_for_tests("shard_count_16", 16).await else {
        return;
    };
    let one = RedisStore::connect(&uri, sixteen.prefix()).await;
    assert!(
        matches!(&one, Err(StoreError::Refused(why)) if why.contains("has 16 shards")),
        "{one:?}"
    );
    sixteen.delete_prefix().await.expect("cleanup");
}
