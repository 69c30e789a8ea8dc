//! `GET /presence` through the whole server stack: concurrent listings share one
//! store call yet never serve a listing that started before the request, the body
//! is what `Store::list` serializes to (with a `Content-Length`), and a node that
//! stops heartbeating is gone from the list within TTL + 50 ms (memory store on
//! paused time, exact; Redis in real time with a short TTL).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use presence::config::Config;
use presence::model::Node;
use presence::server::PresenceService;
use presence::store::redis::test_support::redis_for_tests;
use presence::store::{FaultyStore, MemoryStore, Store};
use serde_json::{json, Value};
use tower::ServiceExt;

const PEER: ([u8; 4], u16) = ([192, 0, 2, 10], 40000);

fn service(store: Arc<dyn Store>, ttl: Duration) -> PresenceService {
    let mut config = Config::default();
    config.rate_limit_rate = 100_000.0;
    config.rate_limit_capacity = 100_000;
    config.ttl = ttl;
    PresenceService::new(store, &config).with_default_peer(PEER.into())
}

struct Reply {
    status: StatusCode,
    content_length: Option<u64>,
    bytes: Bytes,
}

async fn send(svc: &PresenceService, method: Method, path: &str, body: Option<Value>) -> Reply {
    let mut req = Request::new(Full::new(Bytes::from(
        body.as_ref().map(Value::to_string).unwrap_or_default(),
    )));
    *req.method_mut() = method;
    *req.uri_mut() = path.parse().expect("test uri");
    if body.is_some() {
        req.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
    }
    let res = match svc.clone().oneshot(req).await {
        Ok(res) => res,
        Err(never) => match never {},
    };
    let content_length = res
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .or_else(|| http_body::Body::size_hint(res.body()).exact());
    let status = res.status();
    let bytes = match res.into_body().collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => panic!("the response body failed: {e}"),
    };
    Reply {
        status,
        content_length,
        bytes,
    }
}

async fn login(svc: &PresenceService, node: &str, meta: Value) -> Value {
    let r = send(
        svc,
        Method::POST,
        "/presence/login",
        Some(json!({"node_id": node, "meta": meta})),
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.bytes)
    );
    serde_json::from_slice(&r.bytes).expect("login reply")
}

async fn listed(svc: &PresenceService) -> Vec<String> {
    let r = send(svc, Method::GET, "/presence", None).await;
    assert_eq!(r.status, StatusCode::OK);
    let nodes: Vec<Node> = serde_json::from_slice(&r.bytes).expect("a JSON array of nodes");
    nodes.into_iter().map(|n| n.node_id).collect()
}

#[tokio::test(start_paused = true)]
async fn body_is_the_serialized_list_with_a_content_length() {
    let store = Arc::new(MemoryStore::new());
    let svc = service(store.clone(), Duration::from_secs(60));
    for i in (0..2_000).rev() {
        login(&svc, &format!("n-{i:04}"), json!({"i": i, "s": "x\"y"})).await;
    }
    let r = send(&svc, Method::GET, "/presence", None).await;
    let expected = serde_json::to_vec(&store.list().await.expect("list")).expect("serialize");
    assert!(r.bytes == expected, "GET /presence differs from list()");
    assert_eq!(r.content_length, Some(expected.len() as u64));
}

#[tokio::test(start_paused = true)]
async fn memory_node_is_gone_from_the_list_at_its_ttl() {
    let ttl = Duration::from_millis(1_000);
    let svc = service(Arc::new(MemoryStore::new()), ttl);
    login(&svc, "quiet", json!({})).await;
    let lease = login(&svc, "busy", json!({}))
        .await
        .get("lease_id")
        .cloned()
        .expect("lease");
    tokio::time::advance(ttl - Duration::from_millis(1)).await;
    assert_eq!(listed(&svc).await, ["busy", "quiet"]);
    let r = send(
        &svc,
        Method::POST,
        "/presence/heartbeat",
        Some(json!({"node_id": "busy", "lease_id": lease})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    // Exactly TTL after its last heartbeat (well within TTL + 50 ms) it is gone.
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(listed(&svc).await, ["busy"]);
}

#[tokio::test]
async fn redis_node_is_gone_from_the_list_within_ttl_plus_50ms() {
    let Some(redis) = redis_for_tests("listing_expiry").await else {
        return;
    };
    let ttl = Duration::from_millis(400);
    let svc = service(Arc::new(redis.clone()), ttl);
    let before_login = tokio::time::Instant::now();
    login(&svc, "n-1", json!({"load": 0.5})).await;
    assert_eq!(listed(&svc).await, ["n-1"]);
    // The lease started no earlier than `before_login`; 50 ms past its TTL every
    // listing must leave the node out.
    tokio::time::sleep_until(before_login + ttl + Duration::from_millis(50)).await;
    assert_eq!(listed(&svc).await, Vec::<String>::new());
    let deleted = redis.delete_prefix().await;
    assert!(deleted.is_ok(), "{deleted:?}");
}

#[tokio::test(start_paused = true)]
async fn concurrent_listings_share_store_calls_but_are_never_stale() {
    let store = Arc::new(FaultyStore::slow_list(Duration::from_millis(100)));
    let svc = service(store.clone(), Duration::from_secs(60));
    login(&svc, "early", json!({})).await;

    // A listing is running when "late" logs in...
    let first = tokio::spawn({
        let svc = svc.clone();
        async move { listed(&svc).await }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(store.calls.load(Ordering::SeqCst), 1);
    login(&svc, "late", json!({})).await;

    // ...so the requests made after the login must not get that listing: they share
    // the next one.
    let later: Vec<_> = (0..20)
        .map(|_| {
            let svc = svc.clone();
            tokio::spawn(async move { listed(&svc).await })
        })
        .collect();
    assert_eq!(first.await.expect("first listing"), ["early"]);
    for listing in later {
        assert_eq!(listing.await.expect("later listing"), ["early", "late"]);
    }
    assert_eq!(
        store.calls.load(Ordering::SeqCst),
        2,
        "21 requests, 2 store listings"
    );
}
