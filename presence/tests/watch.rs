//! The watch feed end to end through the SDK, in-process (the server's service
//! injected into the client, no socket) on paused time: each event type with its
//! exact data, resuming, cursors that are garbled or too old, and the SDK's view
//! against the listing after random sequences of writes (proptest). The same feed
//! across real servers and Redis is in the workspace's `tests/watch_servers.rs`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use presence::client::{Filter, LeaveReason, PresenceClient, Watch, WatchEvent, WatchItem};
use presence::config::Config;
use presence::model::{Meta, Node};
use presence::server::PresenceService;
use presence::store::MemoryStore;
use proptest::prelude::*;
use serde_json::json;

fn config() -> Config {
    let mut c = Config::default();
    c.rate_limit_rate = 1e9;
    c.rate_limit_capacity = 1_000_000_000;
    c.ttl = Duration::from_secs(9);
    c
}

fn service(config: &Config) -> PresenceService {
    PresenceService::new(Arc::new(MemoryStore::new()), config)
        .with_default_peer(([127, 0, 0, 1], 40000).into())
}

fn client(svc: &PresenceService) -> PresenceClient {
    PresenceClient::builder("http://presence.test/presence")
        .service(svc.clone())
        .no_rate_limit()
        .build()
        .expect("client")
}

fn meta(v: serde_json::Value) -> Meta {
    match v {
        serde_json::Value::Object(m) => m,
        other => panic!("meta must be an object, got {other}"),
    }
}

async fn next(watch: &mut Watch) -> WatchItem {
    next_within(watch, 5).await
}

async fn next_within(watch: &mut Watch, secs: u64) -> WatchItem {
    tokio::time::timeout(Duration::from_secs(secs), watch.next())
        .await
        .unwrap_or_else(|_| panic!("an event within {secs} s"))
        .expect("the watch goes on")
        .expect("no watch error")
}

#[tokio::test(start_paused = true)]
async fn every_event_type_arrives_with_its_exact_data() {
    let svc = service(&config());
    let pc = client(&svc);
    let t0 = tokio::time::Instant::now();
    pc.login_with_meta("before", meta(json!({"a": 1})))
        .await
        .expect("login");
    let mut watch = pc.watch(Filter::all());
    let WatchEvent::Snapshot(nodes) = next(&mut watch).await.event else {
        panic!("a snapshot first");
    };
    assert_eq!(nodes, pc.list_nodes().await.expect("list"));

    pc.login_with_meta("n1", meta(json!({"load": 0.5})))
        .await
        .expect("login");
    let n1 = pc.get_node("n1").await.expect("get").expect("online");
    assert_eq!(next(&mut watch).await.event, WatchEvent::Join(n1));

    pc.heartbeat("n1")
        .await
        .expect("heartbeat without meta: no event");
    pc.heartbeat_with_meta("n1", meta(json!({"load": 0.5})))
        .await
        .expect("the same meta: no event");
    pc.heartbeat_with_meta("n1", meta(json!({"load": 0.9})))
        .await
        .expect("heartbeat");
    let n1 = pc.get_node("n1").await.expect("get").expect("online");
    assert_eq!(next(&mut watch).await.event, WatchEvent::Update(n1));

    pc.logout("n1").await.expect("logout");
    assert_eq!(
        next(&mut watch).await.event,
        WatchEvent::Leave {
            node_id: "n1".into(),
            reason: LeaveReason::Logout
        }
    );

    // "before" stops heartbeating: its expiry is an event within a sweep interval
    // (100 ms) of its TTL (9 s).
    assert_eq!(
        next_within(&mut watch, 15).await.event,
        WatchEvent::Leave {
            node_id: "before".into(),
            reason: LeaveReason::Expired
        }
    );
    let at = t0.elapsed();
    assert!(
        (Duration::from_secs(9)..=Duration::from_millis(9_250)).contains(&at),
        "reported {at:?} after the login"
    );
    assert!(pc.get_node("before").await.expect("get").is_none());
}

#[tokio::test(start_paused = true)]
async fn a_garbled_or_too_old_cursor_gets_a_snapshot_then_live_events() {
    let mut cfg = config();
    cfg.watch_retention = Duration::from_secs(1);
    let svc = service(&cfg);
    let pc = client(&svc);
    let mut watch = pc.watch(Filter::all());
    let start = next(&mut watch).await;
    assert!(start.event.is_snapshot());
    pc.login("a").await.expect("login");
    let joined = next(&mut watch).await;
    drop(watch);

    // A good cursor resumes: no snapshot, the next change.
    let mut resumed = pc.watch_from(Filter::all(), joined.cursor.clone());
    pc.login("b").await.expect("login");
    assert!(matches!(next(&mut resumed).await.event, WatchEvent::Join(n) if n.node_id == "b"));
    drop(resumed);

    // Changes after the snapshot's cursor age out of the feed: that cursor is too old.
    tokio::time::advance(Duration::from_secs(2)).await;
    pc.login("c").await.expect("login");
    for cursor in [start.cursor.as_str(), "garbled!", "AQAAAAAAAAAAAAE"] {
        let mut w = pc.watch_from(Filter::all(), cursor);
        let WatchEvent::Snapshot(nodes) = next(&mut w).await.event else {
            panic!("{cursor}: a snapshot first");
        };
        let ids: Vec<&str> = nodes.iter().map(|n| n.node_id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c"], "{cursor}");
        pc.logout("c").await.expect("logout");
        assert!(
            matches!(next(&mut w).await.event, WatchEvent::Leave { node_id, .. } if node_id == "c")
        );
        pc.login("c").await.expect("login again");
        assert!(matches!(next(&mut w).await.event, WatchEvent::Join(_)));
    }
}

#[tokio::test(start_paused = true)]
async fn too_many_watchers_get_503_with_retry_after() {
    let mut cfg = config();
    cfg.max_watchers = 1;
    let svc = service(&cfg);
    let pc = client(&svc);
    let mut first = pc.watch(Filter::all());
    next(&mut first).await;
    let req = http::Request::get("/presence/watch")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .expect("request");
    let res = tower::ServiceExt::oneshot(svc.clone(), req)
        .await
        .expect("infallible");
    assert_eq!(res.status(), 503);
    assert!(res.headers().contains_key(http::header::RETRY_AFTER));
    let body = http_body_util::BodyExt::collect(res.into_body())
        .await
        .expect("body")
        .to_bytes();
    let body: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(body["error"], "too_many_watchers");
    drop(first);
    tokio::task::yield_now().await;
    assert_eq!(svc.open_watches(), 0);
}

/// One step of a random history.
#[derive(Clone, Debug)]
enum Op {
    Login(u8),
    Heartbeat(u8, Option<u8>),
    Logout(u8),
    /// Lets this many seconds pass (nodes that do not heartbeat expire after 9).
    Wait(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..6).prop_map(Op::Login),
        ((0u8..6), proptest::option::of(0u8..3)).prop_map(|(n, m)| Op::Heartbeat(n, m)),
        (0u8..6).prop_map(Op::Logout),
        (1u8..6).prop_map(Op::Wait),
    ]
}

/// What the view must agree with the listing on: which nodes, their meta and
/// session. (`last_seen_ms` / `expires_at_ms` move with every heartbeat, which is no
/// event: the view has them as of each node's last change.)
fn essence(nodes: Vec<Node>) -> BTreeMap<String, (Meta, u64)> {
    nodes
        .into_iter()
        .map(|n| (n.node_id, (n.meta, n.online_since_ms)))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn the_view_equals_the_listing_after_any_history(ops in proptest::collection::vec(op(), 1..30)) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let svc = service(&config());
            let pc = client(&svc);
            let mut view = pc.view(Filter::all());
            for op in ops {
                let node = |n: u8| format!("node-{n}");
                // Answers such as 404 (not online) are part of the history too.
                match op {
                    Op::Login(n) => drop(pc.login(node(n)).await),
                    Op::Heartbeat(n, None) => drop(pc.heartbeat(node(n)).await),
                    Op::Heartbeat(n, Some(m)) => {
                        drop(pc.heartbeat_with_meta(node(n), meta(json!({"m": m}))).await)
                    }
                    Op::Logout(n) => drop(pc.logout(node(n)).await),
                    Op::Wait(s) => tokio::time::sleep(Duration::from_secs(s.into())).await,
                }
            }
            // Expiries are swept every 100 ms, then streamed.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let listed = essence(pc.list_nodes().await.expect("list"));
            while essence(view.nodes()) != listed {
                let changed = tokio::time::timeout(Duration::from_secs(5), view.changed()).await;
                assert!(matches!(changed, Ok(true)), "the view stopped short: {:?} vs {listed:?}", view.nodes());
            }
        });
    }
}

/// The raw frames of a watch response, each with when it arrived (paused time).
async fn next_frame(body: &mut presence::server::ResponseBody) -> (tokio::time::Instant, String) {
    use http_body_util::BodyExt;
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(600), body.frame())
            .await
            .expect("a frame within 600 s")
            .expect("the stream goes on")
            .expect("no error");
        if let Ok(data) = frame.into_data() {
            let text = String::from_utf8(data.to_vec()).expect("UTF-8");
            return (tokio::time::Instant::now(), text);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_keep_alive_comes_after_each_keepalive_interval_of_silence_only() {
    use tower::ServiceExt;
    let mut cfg = config();
    cfg.watch_keepalive = Duration::from_secs(15);
    cfg.ttl = Duration::from_secs(120);
    let svc = service(&cfg);
    let req = http::Request::get("/presence/watch")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .expect("request");
    let t0 = tokio::time::Instant::now();
    let res = match svc.clone().oneshot(req).await {
        Ok(res) => res,
        Err(never) => match never {},
    };
    let mut body = res.into_body();
    let mut snapshot = String::new();
    while !snapshot.ends_with("\n\n") {
        snapshot.push_str(&next_frame(&mut body).await.1);
    }
    assert!(snapshot.contains("event: snapshot"), "{snapshot}");
    // Silent: one comment every 15 s.
    for n in 1..=2 {
        let (at, text) = next_frame(&mut body).await;
        assert_eq!(text, ": keep-alive\n\n");
        assert_eq!(at - t0, Duration::from_secs(15 * n));
    }
    // An event 5 s later restarts the interval: the next comment is 15 s after it,
    // not 15 s after the last comment.
    tokio::time::sleep(Duration::from_secs(5)).await;
    client(&svc).login("n1").await.expect("login");
    let (joined, text) = next_frame(&mut body).await;
    assert!(text.contains("event: join"), "{text}");
    assert_eq!(joined - t0, Duration::from_secs(35));
    let (at, text) = next_frame(&mut body).await;
    assert_eq!(text, ": keep-alive\n\n");
    assert_eq!(at - joined, Duration::from_secs(15));
}
