//! In-process tests of the presence server stack: `tower::ServiceExt::oneshot`
//! against `PresenceService` on a `MemoryStore` (or a store that fails or hangs),
//! on paused tokio time wherever time matters. No sockets, except the last test,
//! which starts a real `Server` on port 0.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use presence::config::Config;
use presence::model::Node;
use presence::server::PresenceService;
use presence::store::{FaultyStore, MemoryStore, Store};
use serde_json::{json, Value};
use tower::ServiceExt;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const PEER: ([u8; 4], u16) = ([192, 0, 2, 10], 40000);

fn config() -> Config {
    let mut c = Config::default();
    c.rate_limit_rate = 1000.0;
    c.rate_limit_capacity = 1000;
    c
}

fn service_with(store: Arc<dyn Store>, config: &Config) -> PresenceService {
    PresenceService::new(store, config).with_default_peer(PEER.into())
}

fn memory_service() -> PresenceService {
    service_with(Arc::new(MemoryStore::new()), &config())
}

fn get(path: &str) -> Request<Full<Bytes>> {
    request(Method::GET, path, None)
}

fn post(path: &str, body: Value) -> Request<Full<Bytes>> {
    request(Method::POST, path, Some(body.to_string()))
}

fn request(method: Method, path: &str, json_body: Option<String>) -> Request<Full<Bytes>> {
    let mut req = Request::new(Full::new(Bytes::from(
        json_body.clone().unwrap_or_default(),
    )));
    *req.method_mut() = method;
    *req.uri_mut() = path
        .parse()
        .unwrap_or_else(|e| panic!("bad test uri {path}: {e}"));
    if json_body.is_some() {
        req.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
    }
    req
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
    text: String,
}

async fn send<B>(svc: &PresenceService, req: Request<B>) -> Reply
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let res = match svc.clone().oneshot(req).await {
        Ok(res) => res,
        Err(never) => match never {},
    };
    let (parts, body) = res.into_parts();
    let bytes = match body.collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => panic!("the response body failed: {e}"),
    };
    let text = String::from_utf8_lossy(&bytes).into_owned();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        text,
    }
}

/// Asserts an error reply: status, code, and the `{"error","message"}` shape.
fn assert_error(reply: &Reply, status: StatusCode, code: &str) {
    assert_eq!(reply.status, status, "body: {}", reply.text);
    assert_eq!(reply.body["error"], code, "body: {}", reply.text);
    assert!(
        reply.body["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "message missing: {}",
        reply.text
    );
    assert_eq!(
        reply.body.as_object().map(|o| o.len()),
        Some(2),
        "exactly error + message: {}",
        reply.text
    );
    let content_type = reply.headers.get(http::header::CONTENT_TYPE);
    assert_eq!(
        content_type.and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
}

async fn login(svc: &PresenceService, node: &str) -> String {
    let r = send(svc, post("/presence/login", json!({"node_id": node}))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    r.body["lease_id"].as_str().unwrap_or_default().to_owned()
}

// ---------------------------------------------------------------- happy paths

#[tokio::test(start_paused = true)]
async fn login_heartbeat_get_list_logout_round_trip() {
    let svc = memory_service();

    let r = send(
        &svc,
        post(
            "/presence/login",
            json!({"node_id": "n-1", "meta": {"hp": 10}}),
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["node_id"], "n-1");
    assert_eq!(r.body["ttl_ms"], 9000);
    assert_eq!(r.body["heartbeat_ms"], 3000);
    let lease = r.body["lease_id"].as_str().unwrap_or_default().to_owned();
    assert_eq!(lease.len(), 32);
    let first_expiry = r.body["expires_at_ms"].as_u64().unwrap_or_default();
    assert!(first_expiry > 0);

    tokio::time::advance(Duration::from_secs(2)).await;
    let r = send(
        &svc,
        post(
            "/presence/heartbeat",
            json!({"node_id": "n-1", "lease_id": lease, "meta": {"hp": 7}}),
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(
        r.body,
        json!({"node_id": "n-1", "lease_id": lease, "expires_at_ms": first_expiry + 2000})
    );

    let _ = login(&svc, "a-0").await;
    let r = send(&svc, get("/presence/n-1")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let node: Node =
        serde_json::from_value(r.body.clone()).unwrap_or_else(|e| panic!("{e}: {}", r.text));
    assert_eq!(node.meta.get("hp"), Some(&json!(7)));
    assert_eq!(node.expires_at_ms, first_expiry + 2000);
    assert_eq!(node.last_seen_ms + 9000, node.expires_at_ms);

    let r = send(&svc, get("/presence")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let ids: Vec<&str> = r
        .body
        .as_array()
        .map(|a| a.iter().filter_map(|n| n["node_id"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(ids, ["a-0", "n-1"], "sorted by node_id");

    let r = send(
        &svc,
        post(
            "/presence/logout",
            json!({"node_id": "n-1", "lease_id": lease}),
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body, json!({"node_id": "n-1", "removed": true}));

    let r = send(
        &svc,
        post(
            "/presence/logout",
            json!({"node_id": "n-1", "lease_id": lease}),
        ),
    )
    .await;
    assert_eq!(r.body, json!({"node_id": "n-1", "removed": false}));

    let r = send(&svc, get("/presence/n-1")).await;
    assert_error(&r, StatusCode::NOT_FOUND, "not_found");
}

#[tokio::test(start_paused = true)]
async fn heartbeat_without_meta_keeps_it() {
    let svc = memory_service();
    let r = send(
        &svc,
        post(
            "/presence/login",
            json!({"node_id": "svc-1", "meta": {"v": "1.2"}}),
        ),
    )
    .await;
    let lease = r.body["lease_id"].as_str().unwrap_or_default().to_owned();
    let r = send(
        &svc,
        post(
            "/presence/heartbeat",
            json!({"node_id": "svc-1", "lease_id": lease}),
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = send(&svc, get("/presence/svc-1")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["meta"], json!({"v": "1.2"}));
}

#[tokio::test(start_paused = true)]
async fn a_node_expires_after_the_ttl_and_then_heartbeat_is_404() {
    let svc = memory_service();
    let lease = login(&svc, "n-1").await;
    tokio::time::advance(Duration::from_millis(9001)).await;
    let r = send(&svc, get("/presence")).await;
    assert_eq!(r.body, json!([]));
    let r = send(
        &svc,
        post(
            "/presence/heartbeat",
            json!({"node_id": "n-1", "lease_id": lease}),
        ),
    )
    .await;
    assert_error(&r, StatusCode::NOT_FOUND, "not_found");
}

#[tokio::test]
async fn healthz_and_readyz_are_200() {
    let svc = memory_service();
    assert_eq!(send(&svc, get("/healthz")).await.status, StatusCode::OK);
    assert_eq!(send(&svc, get("/readyz")).await.status, StatusCode::OK);
}

// ---------------------------------------------------------------- error table

#[tokio::test]
async fn bad_request_400_for_invalid_json_missing_fields_and_wrong_types() {
    let svc = memory_service();
    for (path, body) in [
        ("/presence/login", "{not json"),
        ("/presence/login", ""),
        ("/presence/login", "{}"),
        ("/presence/login", r#"{"node_id": 5}"#),
        ("/presence/login", r#"["n-1"]"#),
        ("/presence/heartbeat", r#"{"node_id": "n-1"}"#),
        (
            "/presence/heartbeat",
            r#"{"node_id": "n-1", "lease_id": 7}"#,
        ),
        ("/presence/logout", r#"{"lease_id": "x"}"#),
    ] {
        let r = send(&svc, request(Method::POST, path, Some(body.to_owned()))).await;
        assert_error(&r, StatusCode::BAD_REQUEST, "bad_request");
    }
}

#[tokio::test]
async fn unauthorized_401_without_or_with_a_wrong_token_and_ops_routes_stay_open() {
    let mut cfg = config();
    cfg.auth_token = Some("s3cret".to_owned());
    let svc = service_with(Arc::new(MemoryStore::new()), &cfg);

    let r = send(&svc, get("/presence")).await;
    assert_error(&r, StatusCode::UNAUTHORIZED, "unauthorized");
    assert_eq!(
        r.headers
            .get(http::header::WWW_AUTHENTICATE)
            .map(|v| v.as_bytes()),
        Some(&b"Bearer"[..])
    );

    for header in [
        "Bearer wrong",
        "Bearer s3cre",
        "Bearer s3cret2",
        "Basic s3cret",
        "s3cret",
    ] {
        let mut req = get("/presence");
        req.headers_mut().insert(
            http::header::AUTHORIZATION,
            http::HeaderValue::from_static(header),
        );
        let r = send(&svc, req).await;
        assert_error(&r, StatusCode::UNAUTHORIZED, "unauthorized");
    }

    let mut req = get("/presence");
    req.headers_mut().insert(
        http::header::AUTHORIZATION,
        http::HeaderValue::from_static("Bearer s3cret"),
    );
    assert_eq!(send(&svc, req).await.status, StatusCode::OK);

    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(send(&svc, get(path)).await.status, StatusCode::OK, "{path}");
    }
}

#[tokio::test]
async fn not_found_404_for_unknown_routes_and_offline_nodes() {
    let svc = memory_service();
    for path in [
        "/nope",
        "/presence/a/b",
        "/presencex",
        "/healthz/",
        "/ui/",
        "/ui/x.js",
    ] {
        let r = send(&svc, get(path)).await;
        assert_error(&r, StatusCode::NOT_FOUND, "not_found");
    }
    // `/` is the way to the status page.
    let root = send(&svc, get("/")).await;
    assert_eq!(root.status, StatusCode::FOUND);
    assert_eq!(root.headers["location"], "ui");
    let r = send(&svc, get("/presence/ghost")).await;
    assert_error(&r, StatusCode::NOT_FOUND, "not_found");
    assert!(r.body["message"]
        .as_str()
        .is_some_and(|m| m.contains("ghost")));
}

#[tokio::test]
async fn method_not_allowed_405_sets_allow() {
    let svc = memory_service();
    for (method, path, allow) in [
        (Method::PUT, "/presence/login", "GET, HEAD, POST"),
        (Method::DELETE, "/presence/heartbeat", "GET, HEAD, POST"),
        (Method::POST, "/presence", "GET, HEAD"),
        (Method::POST, "/presence/n-1", "GET, HEAD"),
        (Method::DELETE, "/presence/n-1", "GET, HEAD"),
        (Method::POST, "/healthz", "GET, HEAD"),
        (Method::POST, "/metrics", "GET, HEAD"),
    ] {
        let r = send(&svc, request(method.clone(), path, Some("{}".into()))).await;
        assert_error(&r, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
        assert_eq!(
            r.headers
                .get(http::header::ALLOW)
                .and_then(|v| v.to_str().ok()),
            Some(allow),
            "{method} {path}"
        );
    }
}

#[tokio::test]
async fn lease_mismatch_409_on_heartbeat_and_logout_with_an_old_lease() {
    let svc = memory_service();
    let old = login(&svc, "n-1").await;
    let new = login(&svc, "n-1").await;
    assert_ne!(old, new, "every login issues a new lease");
    for path in ["/presence/heartbeat", "/presence/logout"] {
        let r = send(&svc, post(path, json!({"node_id": "n-1", "lease_id": old}))).await;
        assert_error(&r, StatusCode::CONFLICT, "lease_mismatch");
    }
    let r = send(
        &svc,
        post(
            "/presence/heartbeat",
            json!({"node_id": "n-1", "lease_id": new}),
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn payload_too_large_413_with_and_without_content_length() {
    let svc = memory_service();
    let big = json!({"node_id": "n-1", "meta": {"pad": "x".repeat(17 * 1024)}}).to_string();

    // Declared length: rejected before the body is read.
    let mut req = request(Method::POST, "/presence/login", Some(big.clone()));
    req.headers_mut().insert(
        http::header::CONTENT_LENGTH,
        http::HeaderValue::from(big.len()),
    );
    assert_error(
        &send(&svc, req).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    );

    // No declared length (chunked): cut off while reading.
    let req = request(Method::POST, "/presence/login", Some(big));
    assert_error(
        &send(&svc, req).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    );

    // Exactly at the limit is fine as far as the size goes.
    let pad = 16 * 1024 - r#"{"node_id":"n-1","x":""}"#.len();
    let at_limit = format!(r#"{{"node_id":"n-1","x":"{}"}}"#, "y".repeat(pad));
    assert_eq!(at_limit.len(), 16 * 1024);
    let r = send(
        &svc,
        request(Method::POST, "/presence/login", Some(at_limit)),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
}

#[tokio::test]
async fn unsupported_media_type_415_without_a_json_content_type() {
    let svc = memory_service();
    let body = json!({"node_id": "n-1"}).to_string();

    let mut req = request(Method::POST, "/presence/login", Some(body.clone()));
    req.headers_mut().remove(http::header::CONTENT_TYPE);
    assert_error(
        &send(&svc, req).await,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );

    for (content_type, status) in [
        ("text/plain", StatusCode::UNSUPPORTED_MEDIA_TYPE),
        (
            "application/x-www-form-urlencoded",
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        ("application/json; charset=utf-8", StatusCode::OK),
        ("Application/JSON", StatusCode::OK),
    ] {
        let mut req = request(Method::POST, "/presence/login", Some(body.clone()));
        req.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(content_type),
        );
        assert_eq!(send(&svc, req).await.status, status, "{content_type}");
    }
}

#[tokio::test]
async fn invalid_node_id_422_in_bodies_and_paths() {
    let svc = memory_service();
    let too_long = "a".repeat(257);
    for id in ["", "a b", "a/b", "é", too_long.as_str()] {
        let r = send(&svc, post("/presence/login", json!({"node_id": id}))).await;
        assert_error(&r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_node_id");
        let r = send(
            &svc,
            post(
                "/presence/heartbeat",
                json!({"node_id": id, "lease_id": "l"}),
            ),
        )
        .await;
        assert_error(&r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_node_id");
    }
    // Path ids are percent-decoded, then validated: what decoding yields must be
    // an id (`%2F` is no path separator, `%FF` is no UTF-8).
    for path in [
        "/presence/a%20b",
        "/presence/a%2Fb",
        "/presence/a%2fb",
        "/presence/%FF",
        "/presence/",
    ] {
        let r = send(&svc, get(path)).await;
        assert_error(&r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_node_id");
    }
    // Ids that name routes are reserved, in bodies and paths alike.
    for id in ["login", "heartbeat", "logout", "watch", "stats"] {
        let r = send(&svc, post("/presence/login", json!({"node_id": id}))).await;
        assert_error(&r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_node_id");
        assert!(r.text.contains("reserved"), "{id}: {}", r.text);
        if id == "watch" || id == "stats" {
            // GET /presence/watch and /presence/stats are routes of their own.
            continue;
        }
        let r = send(&svc, get(&format!("/presence/{id}"))).await;
        assert_error(&r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_node_id");
        assert!(r.text.contains("reserved"), "GET {id}: {}", r.text);
    }
    let r = send(&svc, get("/presence/%41")).await;
    assert_error(&r, StatusCode::NOT_FOUND, "not_found");
    assert!(r.text.contains(r#"\"A\""#), "decoded id named: {}", r.text);
    // The node id is checked before meta.
    let r = send(
        &svc,
        post("/presence/login", json!({"node_id": "a b", "meta": 5})),
    )
    .await;
    assert_error(&r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_node_id");
}

#[tokio::test]
async fn invalid_meta_422_for_non_objects_and_oversized_meta() {
    let svc = memory_service();
    for meta in [json!([1]), json!("x"), json!(3), json!(true)] {
        let r = send(
            &svc,
            post("/presence/login", json!({"node_id": "n", "meta": meta})),
        )
        .await;
        assert_error(&r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_meta");
    }
    // {"p":"..."} is 8 bytes + the padding.
    let at_limit = json!({"p": "x".repeat(4096 - 8)});
    assert_eq!(at_limit.to_string().len(), 4096);
    let r = send(
        &svc,
        post("/presence/login", json!({"node_id": "n", "meta": at_limit})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let lease = r.body["lease_id"].as_str().unwrap_or_default().to_owned();
    let over = json!({"p": "x".repeat(4096 - 7)});
    let r = send(
        &svc,
        post("/presence/login", json!({"node_id": "n", "meta": over})),
    )
    .await;
    assert_error(&r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_meta");
    let r = send(
        &svc,
        post(
            "/presence/heartbeat",
            json!({"node_id": "n", "lease_id": lease, "meta": [1]}),
        ),
    )
    .await;
    assert_error(&r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_meta");
    // null meta means "none".
    let r = send(
        &svc,
        post("/presence/login", json!({"node_id": "n", "meta": null})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
}

#[tokio::test(start_paused = true)]
async fn rate_limited_429_with_retry_after_on_presence_routes_only() {
    let mut cfg = config();
    cfg.rate_limit_rate = 0.5;
    cfg.rate_limit_capacity = 2;
    let svc = service_with(Arc::new(MemoryStore::new()), &cfg);

    assert_eq!(send(&svc, get("/presence")).await.status, StatusCode::OK);
    assert_eq!(send(&svc, get("/presence")).await.status, StatusCode::OK);
    let r = send(&svc, get("/presence")).await;
    assert_error(&r, StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    let retry_after = r
        .headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    assert_eq!(retry_after, Some(2), "one token per 2 s, rounded up");

    // Ops routes are not rate limited.
    for _ in 0..20 {
        for path in ["/healthz", "/readyz", "/metrics"] {
            assert_eq!(send(&svc, get(path)).await.status, StatusCode::OK, "{path}");
        }
    }

    // Another client has its own bucket.
    let mut req = get("/presence");
    req.extensions_mut()
        .insert(SocketAddr::from(([192, 0, 2, 11], 1)));
    assert_eq!(send(&svc, req).await.status, StatusCode::OK);

    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(send(&svc, get("/presence")).await.status, StatusCode::OK);

    let metrics = send(&svc, get("/metrics")).await.text;
    assert!(
        metrics.contains("presence_rate_limited_total 1"),
        "{metrics}"
    );
}

#[tokio::test(start_paused = true)]
async fn forwarded_for_counts_only_behind_a_trusted_proxy() {
    let mut cfg = config();
    cfg.rate_limit_rate = 0.001;
    cfg.rate_limit_capacity = 1;
    cfg.trusted_proxies = vec!["10.0.0.0/8".parse().unwrap_or_else(|_| panic!("cidr"))];
    let svc = service_with(Arc::new(MemoryStore::new()), &cfg);
    let via = |peer: [u8; 4], xff: &'static str| {
        let mut req = get("/presence");
        req.extensions_mut().insert(SocketAddr::from((peer, 1)));
        req.headers_mut()
            .insert("x-forwarded-for", http::HeaderValue::from_static(xff));
        req
    };
    // Behind the proxy: two clients, two buckets.
    assert_eq!(
        send(&svc, via([10, 0, 0, 1], "198.51.100.1")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        send(&svc, via([10, 0, 0, 1], "198.51.100.2")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        send(&svc, via([10, 0, 0, 1], "198.51.100.1")).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    // An untrusted peer cannot pick a fresh bucket by spoofing the header.
    assert_eq!(
        send(&svc, via([203, 0, 113, 9], "198.51.100.3"))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        send(&svc, via([203, 0, 113, 9], "198.51.100.4"))
            .await
            .status,
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[tokio::test]
async fn a_request_without_a_peer_address_is_a_clear_500() {
    let svc = PresenceService::new(Arc::new(MemoryStore::new()), &config());
    let r = send(&svc, get("/presence")).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR, "{}", r.text);
    // The ops routes need no peer.
    assert_eq!(send(&svc, get("/healthz")).await.status, StatusCode::OK);
}

// ---------------------------------------------------------------- store failures

fn retry_after(r: &Reply) -> Option<u64> {
    r.headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(start_paused = true)]
async fn store_unavailable_503_with_retry_after_when_the_store_fails() {
    let store = Arc::new(FaultyStore::down());
    let svc = service_with(store.clone(), &config());
    let r = send(&svc, post("/presence/login", json!({"node_id": "n-1"}))).await;
    assert_error(&r, StatusCode::SERVICE_UNAVAILABLE, "store_unavailable");
    assert_eq!(retry_after(&r), Some(1));
    assert!(
        !r.text.contains("connection refused"),
        "store internals stay in the log: {}",
        r.text
    );
    let r = send(&svc, get("/readyz")).await;
    assert_error(&r, StatusCode::SERVICE_UNAVAILABLE, "store_unavailable");
    assert_eq!(send(&svc, get("/healthz")).await.status, StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn store_unavailable_503_after_the_store_timeout_when_the_store_hangs() {
    let store = Arc::new(FaultyStore::stalled());
    let svc = service_with(store.clone(), &config());
    let start = tokio::time::Instant::now();
    let r = send(&svc, get("/presence")).await;
    assert_error(&r, StatusCode::SERVICE_UNAVAILABLE, "store_unavailable");
    assert_eq!(retry_after(&r), Some(1));
    assert_eq!(
        start.elapsed(),
        Duration::from_millis(1000),
        "PRESENCE_STORE_TIMEOUT_MS"
    );

    let r = send(&svc, get("/readyz")).await;
    assert_error(&r, StatusCode::SERVICE_UNAVAILABLE, "store_unavailable");
}

#[tokio::test(start_paused = true)]
async fn the_store_breaker_opens_after_five_failures_and_then_fails_fast() {
    let store = Arc::new(FaultyStore::stalled());
    let svc = service_with(store.clone(), &config());
    for _ in 0..5 {
        let r = send(&svc, get("/presence")).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    }
    assert_eq!(store.calls.load(Ordering::SeqCst), 5);

    let start = tokio::time::Instant::now();
    let r = send(&svc, post("/presence/login", json!({"node_id": "n-1"}))).await;
    assert_error(&r, StatusCode::SERVICE_UNAVAILABLE, "store_unavailable");
    assert_eq!(start.elapsed(), Duration::ZERO, "rejected without waiting");
    assert_eq!(
        store.calls.load(Ordering::SeqCst),
        5,
        "the store was not called"
    );
    assert!(
        retry_after(&r).is_some_and(|s| (1..=2).contains(&s)),
        "{:?}",
        retry_after(&r)
    );

    // Once open_for has passed, one trial call reaches the store again.
    tokio::time::advance(Duration::from_secs(2)).await;
    let _ = send(&svc, get("/presence")).await;
    assert_eq!(store.calls.load(Ordering::SeqCst), 6);

    let metrics = send(&svc, get("/metrics")).await.text;
    assert!(
        metrics.contains(r#"presence_store_errors_total{kind="timeout"} 6"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"presence_store_errors_total{kind="circuit_open"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("presence_store_circuit_state 2"),
        "{metrics}"
    );
}

#[tokio::test(start_paused = true)]
async fn not_found_and_lease_mismatch_do_not_trip_the_breaker() {
    let svc = memory_service();
    let _ = login(&svc, "n-1").await;
    for _ in 0..10 {
        let r = send(&svc, get("/presence/ghost")).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        let r = send(
            &svc,
            post(
                "/presence/heartbeat",
                json!({"node_id": "n-1", "lease_id": "old"}),
            ),
        )
        .await;
        assert_eq!(r.status, StatusCode::CONFLICT);
    }
    assert_eq!(send(&svc, get("/presence")).await.status, StatusCode::OK);
}

/// A request body that never delivers a byte.
struct StalledBody;

impl Body for StalledBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Pending
    }
}

#[tokio::test(start_paused = true)]
async fn a_stalled_request_body_is_cut_off_by_the_request_timeout() {
    let svc = memory_service();
    let mut req = Request::new(StalledBody);
    *req.method_mut() = Method::POST;
    *req.uri_mut() = http::Uri::from_static("/presence/login");
    req.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    let start = tokio::time::Instant::now();
    let r = send(&svc, req).await;
    assert_error(&r, StatusCode::REQUEST_TIMEOUT, "request_timeout");
    assert_eq!(start.elapsed(), Duration::from_millis(10_000));
}

// ---------------------------------------------------------------- metrics

#[tokio::test]
async fn metrics_count_requests_by_route_template_and_status() {
    let svc = memory_service();
    let _ = login(&svc, "n-1").await;
    let _ = send(&svc, get("/presence/n-1")).await;
    let _ = send(&svc, get("/presence/ghost")).await;
    let _ = send(&svc, get("/presence")).await;
    let _ = send(&svc, get("/wp-login.php")).await;
    let r = send(&svc, get("/metrics")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/openmetrics-text")));
    let m = &r.text;
    for line in [
        r#"presence_http_requests_total{route="/presence/login",method="POST",status="200"} 1"#,
        r#"presence_http_requests_total{route="/presence/{node_id}",method="GET",status="200"} 1"#,
        r#"presence_http_requests_total{route="/presence/{node_id}",method="GET",status="404"} 1"#,
        r#"presence_http_requests_total{route="unmatched",method="GET",status="404"} 1"#,
        "presence_online_nodes 1",
        "# TYPE presence_http_request_duration_seconds histogram",
        "# TYPE presence_store_errors counter",
        "# TYPE presence_rate_limited counter",
    ] {
        assert!(m.contains(line), "missing {line:?} in\n{m}");
    }
    assert!(!m.contains("ghost"), "raw paths never become labels");
}

// ---------------------------------------------------------------- config

fn from(vars: &[(&str, &str)]) -> Result<Config, presence::config::ConfigError> {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    Config::from_lookup(move |name| map.get(name).cloned())
}

#[test]
fn config_defaults_follow_the_spec() {
    let c = from(&[]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.store_uri, None);
    assert_eq!(c.key_prefix, "presence");
    assert_eq!(c.http_host, "0.0.0.0");
    assert_eq!(c.http_port, 8080);
    assert_eq!(c.heartbeat, Duration::from_secs(3));
    assert_eq!(c.ttl, Duration::from_secs(9));
    assert_eq!(c.rate_limit_rate, 30.0);
    assert_eq!(c.rate_limit_capacity, 60);
    assert!(c.trusted_proxies.is_empty());
    assert_eq!(c.auth_token, None);
    assert_eq!(c.store_timeout, Duration::from_millis(1000));
    assert_eq!(c.max_meta_bytes, 4096);
    assert_eq!(c.header_timeout, Duration::from_millis(5000));
    assert_eq!(c.request_timeout, Duration::from_millis(10_000));
    assert_eq!(c.shutdown_grace, Duration::from_millis(10_000));
    assert!(c == Config::default());
}

#[test]
fn config_reads_every_variable() {
    let c = from(&[
        ("PRESENCE_REDIS_URI", "redis://:pw@127.0.0.1:6379/0"),
        ("PRESENCE_KEY_PREFIX", "staging"),
        ("PRESENCE_HTTP_HOST", "[::1]"),
        ("PRESENCE_HTTP_PORT", "0"),
        ("PRESENCE_HEARTBEAT_SEC", "5"),
        ("PRESENCE_RATE_LIMIT_RATE", "0.5"),
        ("PRESENCE_RATE_LIMIT_CAPACITY", "3"),
        ("PRESENCE_TRUSTED_PROXIES", "10.0.0.0/8, 192.168.1.1"),
        ("PRESENCE_AUTH_TOKEN", "tok"),
        ("PRESENCE_STORE_TIMEOUT_MS", "250"),
        ("PRESENCE_MAX_META_BYTES", "100"),
        ("PRESENCE_HEADER_TIMEOUT_MS", "1"),
        ("PRESENCE_REQUEST_TIMEOUT_MS", "2"),
        ("PRESENCE_SHUTDOWN_GRACE_MS", "3"),
        ("NODE_ID", "ignored-by-the-server"),
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.store_uri.as_deref(), Some("redis://:pw@127.0.0.1:6379/0"));
    assert_eq!(c.key_prefix, "staging");
    assert_eq!(c.http_host, "::1");
    assert_eq!(c.http_port, 0);
    assert_eq!(c.heartbeat, Duration::from_secs(5));
    assert_eq!(c.ttl, Duration::from_secs(15), "3 x heartbeat");
    assert_eq!(c.rate_limit_rate, 0.5);
    assert_eq!(c.rate_limit_capacity, 3);
    assert_eq!(c.trusted_proxies.len(), 2);
    // A bare address is a single host.
    assert_eq!(c.trusted_proxies[1].to_string(), "192.168.1.1/32");
    assert_eq!(c.auth_token.as_deref(), Some("tok"));
    assert_eq!(c.store_timeout, Duration::from_millis(250));
    assert_eq!(c.max_meta_bytes, 100);
    assert_eq!(c.header_timeout, Duration::from_millis(1));
    assert_eq!(c.request_timeout, Duration::from_millis(2));
    assert_eq!(c.shutdown_grace, Duration::from_millis(3));
    assert!(
        !format!("{c:?}").contains("pw@"),
        "Debug hides the Redis password"
    );
    assert!(!format!("{c:?}").contains("tok\""), "Debug hides the token");

    let c = from(&[("PRESENCE_HEARTBEAT_SEC", "2"), ("PRESENCE_TTL_SEC", "20")])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.ttl, Duration::from_secs(20), "explicit TTL wins");
    let c = from(&[("PRESENCE_REDIS_URI", ""), ("PRESENCE_HTTP_PORT", "")])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((c.store_uri, c.http_port), (None, 8080), "empty = unset");
    let c = from(&[("PRESENCE_REDIS_URI", "memory://")]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.store_uri.as_deref(), Some("memory://"));
}

#[test]
fn config_bad_values_name_the_variable_and_the_value() {
    for (var, value) in [
        ("PRESENCE_TTL_SEC", "abc"),
        ("PRESENCE_TTL_SEC", "0"),
        ("PRESENCE_TTL_SEC", "-3"),
        ("PRESENCE_HEARTBEAT_SEC", "1.5"),
        ("PRESENCE_HEARTBEAT_SEC", "18446744073709551615"),
        ("PRESENCE_TTL_SEC", "99999999999"),
        ("PRESENCE_HTTP_PORT", "65536"),
        ("PRESENCE_HTTP_PORT", "http"),
        ("PRESENCE_HTTP_HOST", "bad host!"),
        ("PRESENCE_RATE_LIMIT_RATE", "0"),
        ("PRESENCE_RATE_LIMIT_RATE", "NaN"),
        ("PRESENCE_RATE_LIMIT_RATE", "inf"),
        ("PRESENCE_RATE_LIMIT_RATE", "0.0000000001"),
        ("PRESENCE_RATE_LIMIT_CAPACITY", "0"),
        ("PRESENCE_RATE_LIMIT_CAPACITY", "5000000000"),
        ("PRESENCE_TRUSTED_PROXIES", "10.0.0.0/8,nope"),
        ("PRESENCE_TRUSTED_PROXIES", "10.0.0.1/8"),
        ("PRESENCE_REDIS_URI", "http://localhost:6379"),
        ("PRESENCE_REDIS_URI", "localhost:6379"),
        ("PRESENCE_KEY_PREFIX", "a{b}"),
        ("PRESENCE_STORE_TIMEOUT_MS", "0"),
        ("PRESENCE_MAX_META_BYTES", "lots"),
        ("PRESENCE_HEADER_TIMEOUT_MS", "5s"),
        ("PRESENCE_REQUEST_TIMEOUT_MS", "-1"),
        ("PRESENCE_SHUTDOWN_GRACE_MS", "0"),
        ("PRESENCE_RATE_LIMIT_SCOPE", "cluster"),
        // Shared buckets live in Redis: the memory store cannot share them.
        ("PRESENCE_RATE_LIMIT_SCOPE", "shared"),
    ] {
        let err = match from(&[(var, value)]) {
            Ok(_) => panic!("{var}={value:?} must be rejected"),
            Err(e) => e,
        };
        assert_eq!(err.var, var);
        assert_eq!(err.value, value);
        let line = err.to_string();
        assert!(
            line.starts_with(&format!("{var}={value:?}: ")),
            "one line naming variable and value: {line}"
        );
        assert!(!line.contains('\n'));
    }
    let err = from(&[("PRESENCE_TTL_SEC", "abc")])
        .err()
        .map(|e| e.to_string());
    assert_eq!(
        err.as_deref(),
        Some(r#"PRESENCE_TTL_SEC="abc": not a positive integer"#)
    );
}

#[test]
fn config_rate_limit_scope_is_server_by_default_and_shared_with_a_redis_store() {
    use presence::config::RateLimitScope;
    let scope = |vars: &[(&str, &str)]| from(vars).map(|c| c.rate_limit_scope);
    assert_eq!(scope(&[]), Ok(RateLimitScope::Server));
    assert_eq!(
        scope(&[("PRESENCE_RATE_LIMIT_SCOPE", "Server")]),
        Ok(RateLimitScope::Server)
    );
    assert_eq!(
        scope(&[
            ("PRESENCE_RATE_LIMIT_SCOPE", "shared"),
            ("PRESENCE_REDIS_URI", "redis://127.0.0.1:6379")
        ]),
        Ok(RateLimitScope::Shared)
    );
    let err = scope(&[
        ("PRESENCE_RATE_LIMIT_SCOPE", "shared"),
        ("PRESENCE_REDIS_URI", "memory://"),
    ])
    .err()
    .map(|e| e.to_string());
    assert!(
        err.as_deref()
            .is_some_and(|e| e.contains("PRESENCE_REDIS_URI")),
        "{err:?}"
    );
}

#[test]
fn config_never_echoes_secrets() {
    let err = from(&[("PRESENCE_AUTH_TOKEN", "")]).err();
    assert_eq!(
        err.map(|e| e.var),
        Some("PRESENCE_AUTH_TOKEN"),
        "empty token is an error"
    );
    let err = from(&[("PRESENCE_AUTH_TOKEN", "has space secret")]).err();
    assert!(err.is_some_and(|e| !e.to_string().contains("secret")));
    let err = from(&[("PRESENCE_REDIS_URI", "http://user:hunter2@h")]).err();
    assert!(err.is_some_and(|e| !e.to_string().contains("hunter2")));
}

// ---------------------------------------------------------------- real socket

#[tokio::test]
async fn server_binds_port_zero_serves_and_shuts_down_gracefully() -> TestResult {
    use presence::server::Server;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut cfg = config();
    cfg.http_host = "127.0.0.1".to_owned();
    cfg.http_port = 0;
    let server = Server::bind(&cfg, Arc::new(MemoryStore::new())).await?;
    let addr = server.local_addr();
    assert_ne!(addr.port(), 0);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(server.run(async {
        let _ = stop_rx.await;
    }));

    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /presence HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with("[]"), "{response}");

    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(5), running).await???;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no longer accepting"
    );
    Ok(())
}

async fn start_server(
    cfg: &Config,
    store: Arc<dyn Store>,
) -> Result<
    (
        SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<std::io::Result<()>>,
    ),
    std::io::Error,
> {
    let server = presence::server::Server::bind(cfg, store).await?;
    let addr = server.local_addr();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(server.run(async {
        let _ = stop_rx.await;
    }));
    Ok((addr, stop_tx, running))
}

fn local_config() -> Config {
    let mut cfg = config();
    cfg.http_host = "127.0.0.1".to_owned();
    cfg.http_port = 0;
    cfg
}

async fn raw_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response)
}

#[tokio::test]
async fn shutdown_closes_an_idle_keep_alive_connection_at_once() -> TestResult {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Neither the idle rule nor the grace period could close it within the test.
    let mut cfg = local_config();
    cfg.header_timeout = Duration::from_secs(60);
    cfg.shutdown_grace = Duration::from_secs(60);
    let (addr, stop, running) = start_server(&cfg, Arc::new(MemoryStore::new())).await?;
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await?;
    let mut buf = vec![0u8; 4096];
    let n = stream.read(&mut buf).await?;
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));

    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(5), running).await???;
    let rest = tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buf)).await?;
    assert!(
        matches!(rest, Ok(0) | Err(_)),
        "the connection is closed, not {rest:?}"
    );
    Ok(())
}

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish() -> TestResult {
    let store = Arc::new(FaultyStore::slow_list(Duration::from_millis(300)));
    let (addr, stop, running) = start_server(&local_config(), store.clone()).await?;
    let in_flight = tokio::spawn(raw_get(addr, "/presence"));
    tokio::time::timeout(Duration::from_secs(5), store.list_started.notified()).await?;
    let _ = stop.send(());
    let response = tokio::time::timeout(Duration::from_secs(5), in_flight).await???;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    tokio::time::timeout(Duration::from_secs(5), running).await???;
    Ok(())
}

#[tokio::test]
async fn shutdown_aborts_what_is_left_after_the_grace_period() -> TestResult {
    let mut cfg = local_config();
    cfg.store_timeout = Duration::from_secs(60);
    cfg.request_timeout = Duration::from_secs(60);
    cfg.shutdown_grace = Duration::from_millis(200);
    let store = Arc::new(FaultyStore::stalled());
    let (addr, stop, running) = start_server(&cfg, store.clone()).await?;
    let in_flight = tokio::spawn(raw_get(addr, "/presence"));
    // Wait until the request is in the store, so it is in flight when we stop.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while store.calls.load(Ordering::SeqCst) == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(store.calls.load(Ordering::SeqCst), 1);
    let _ = stop.send(());
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(5), running).await???;
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "waited for the grace period"
    );
    let response = tokio::time::timeout(Duration::from_secs(5), in_flight).await??;
    assert!(
        !response
            .as_deref()
            .is_ok_and(|r| r.starts_with("HTTP/1.1 200")),
        "the hanging request was cut off: {response:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_after_the_header_timeout() -> TestResult {
    use tokio::io::AsyncReadExt;
    let mut cfg = local_config();
    cfg.header_timeout = Duration::from_millis(100);
    let (addr, stop, running) = start_server(&cfg, Arc::new(MemoryStore::new())).await?;
    let mut idle = tokio::net::TcpStream::connect(addr).await?;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "server closed the silent connection: {read:?}"
    );
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(5), running).await???;
    Ok(())
}
