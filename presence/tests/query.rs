//! Statuses, filters, pages and counts through the whole service, in-process: the
//! `status` of login and heartbeat (kept when absent, `422 invalid_status`), every
//! filter of `GET /presence` and their AND, how meta values match, paging through
//! `Link` headers to the end, every malformed parameter as a `400` naming it,
//! `GET /presence/stats`, and a filtered watch (snapshot filtered, `unmatched`
//! leaves, non-matching updates not sent). Paging and stats run on both stores
//! (Redis is skipped with a printed reason when it is not running, unless
//! `PRESENCE_REQUIRE_REDIS=1`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use presence::config::Config;
use presence::server::{PresenceService, ResponseBody};
use presence::store::redis::test_support::redis_for_tests;
use presence::store::{MemoryStore, Store};
use serde_json::{json, Value};
use tower::ServiceExt;

fn service(store: Arc<dyn Store>) -> PresenceService {
    let mut config = Config::default();
    config.rate_limit_rate = 1e9;
    config.rate_limit_capacity = 1_000_000_000;
    config.ttl = Duration::from_secs(60);
    PresenceService::new(store, &config).with_default_peer(([192, 0, 2, 10], 40000).into())
}

fn memory() -> PresenceService {
    service(Arc::new(MemoryStore::new()))
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    bytes: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.bytes)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.bytes)))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

async fn call(
    svc: &PresenceService,
    method: Method,
    path: &str,
    body: Option<String>,
) -> http::Response<ResponseBody> {
    let has_body = body.is_some();
    let mut req = Request::new(Full::new(Bytes::from(body.unwrap_or_default())));
    *req.method_mut() = method;
    *req.uri_mut() = path.parse().expect("test uri");
    if has_body {
        req.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
    }
    match svc.clone().oneshot(req).await {
        Ok(res) => res,
        Err(never) => match never {},
    }
}

async fn send(svc: &PresenceService, method: Method, path: &str, body: Option<String>) -> Reply {
    let res = call(svc, method, path, body).await;
    let status = res.status();
    let headers = res.headers().clone();
    let bytes = match res.into_body().collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => panic!("the response body failed: {e}"),
    };
    Reply {
        status,
        headers,
        bytes,
    }
}

async fn get(svc: &PresenceService, path: &str) -> Reply {
    send(svc, Method::GET, path, None).await
}

async fn post(svc: &PresenceService, path: &str, body: impl Into<String>) -> Reply {
    send(svc, Method::POST, path, Some(body.into())).await
}

/// Logs `node` in with `body`'s other fields; returns the lease.
async fn login(svc: &PresenceService, node: &str, extra: Value) -> String {
    let mut body = json!({ "node_id": node });
    if let (Some(body), Value::Object(extra)) = (body.as_object_mut(), extra) {
        body.extend(extra);
    }
    let r = post(svc, "/presence/login", body.to_string()).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.bytes)
    );
    r.json()["lease_id"].as_str().expect("a lease").to_owned()
}

async fn node(svc: &PresenceService, node: &str) -> Value {
    let r = get(svc, &format!("/presence/{node}")).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.bytes)
    );
    r.json()
}

/// The ids a listing at `path` answers with (asserting a `200`).
async fn ids(svc: &PresenceService, path: &str) -> Vec<String> {
    let r = get(svc, path).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{path}: {}",
        String::from_utf8_lossy(&r.bytes)
    );
    ids_of(&r.json())
}

fn ids_of(list: &Value) -> Vec<String> {
    list.as_array()
        .expect("an array")
        .iter()
        .map(|n| n["node_id"].as_str().expect("an id").to_owned())
        .collect()
}

fn assert_error(r: &Reply, status: StatusCode, code: &str, needle: &str) {
    assert_eq!(r.status, status, "{}", String::from_utf8_lossy(&r.bytes));
    let body = r.json();
    assert_eq!(body["error"], code, "{body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(needle),
        "{message:?} should name {needle:?}"
    );
}

#[tokio::test]
async fn status_is_set_at_login_kept_by_heartbeats_without_one_and_changed_by_those_with_one() {
    let svc = memory();
    login(&svc, "plain", json!({})).await;
    assert_eq!(node(&svc, "plain").await["status"], "up");
    let lease = login(&svc, "n", json!({"status": "draining"})).await;
    assert_eq!(node(&svc, "n").await["status"], "draining");
    // The exact body the SDK sends (the server's hand-made fast path) keeps it...
    let plain = format!(r#"{{"node_id":"n","lease_id":"{lease}"}}"#);
    assert_eq!(
        post(&svc, "/presence/heartbeat", plain).await.status,
        StatusCode::OK
    );
    assert_eq!(node(&svc, "n").await["status"], "draining");
    // ... so does a null status; a compact body with a status changes it.
    let null = json!({"node_id": "n", "lease_id": lease, "status": null}).to_string();
    assert_eq!(
        post(&svc, "/presence/heartbeat", null).await.status,
        StatusCode::OK
    );
    assert_eq!(node(&svc, "n").await["status"], "draining");
    let degraded = format!(r#"{{"node_id":"n","lease_id":"{lease}","status":"degraded"}}"#);
    assert_eq!(
        post(&svc, "/presence/heartbeat", degraded).await.status,
        StatusCode::OK
    );
    assert_eq!(node(&svc, "n").await["status"], "degraded");
    // A login starts over: up unless it says otherwise.
    login(&svc, "n", json!({})).await;
    assert_eq!(node(&svc, "n").await["status"], "up");
}

#[tokio::test]
async fn an_unknown_status_is_422_invalid_status_naming_it() {
    let svc = memory();
    for (status, named) in [
        (json!("down"), "down"),
        (json!("UP"), "UP"),
        (json!(""), "\"\""),
        (json!(42), "42"),
        (json!(true), "true"),
        (json!(["up"]), "up"),
        (json!({"s": "up"}), "up"),
    ] {
        let body = json!({"node_id": "n", "status": status}).to_string();
        let r = post(&svc, "/presence/login", body).await;
        assert_error(
            &r,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_status",
            named,
        );
    }
    let lease = login(&svc, "n", json!({"status": "degraded"})).await;
    let body = json!({"node_id": "n", "lease_id": lease, "status": "sleeping"}).to_string();
    let r = post(&svc, "/presence/heartbeat", body).await;
    assert_error(
        &r,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_status",
        "sleeping",
    );
    // Refused before the store: the node keeps its status.
    assert_eq!(node(&svc, "n").await["status"], "degraded");
}

/// Six nodes whose ids, statuses and meta tell the filters apart.
async fn fleet(svc: &PresenceService) {
    for (id, status, meta) in [
        (
            "eu-1",
            "up",
            json!({"region": "eu", "gpu": true, "load": 0.5}),
        ),
        (
            "eu-2",
            "degraded",
            json!({"region": "eu", "gpu": false, "load": 5}),
        ),
        (
            "eu-3",
            "draining",
            json!({"region": "eu west", "zone": "a+b"}),
        ),
        ("us-1", "up", json!({"region": "us", "gpu": true, "n": "5"})),
        (
            "us-2",
            "degraded",
            json!({"region": "us", "nested": {"region": "eu"}}),
        ),
        ("x", "up", json!({})),
    ] {
        login(svc, id, json!({"status": status, "meta": meta})).await;
    }
}

#[tokio::test]
async fn every_filter_selects_its_nodes_and_they_are_anded() {
    let svc = memory();
    fleet(&svc).await;
    for (query, expected) in [
        ("prefix=eu-", &["eu-1", "eu-2", "eu-3"][..]),
        ("prefix=u", &["us-1", "us-2"]),
        ("prefix=eu-1", &["eu-1"]),
        ("prefix=z", &[]),
        ("status=up", &["eu-1", "us-1", "x"]),
        ("status=degraded,draining", &["eu-2", "eu-3", "us-2"]),
        (
            "status=up,degraded,draining",
            &["eu-1", "eu-2", "eu-3", "us-1", "us-2", "x"],
        ),
        ("meta.region=eu", &["eu-1", "eu-2"]),
        ("meta.gpu=true", &["eu-1", "us-1"]),
        ("prefix=eu-&status=up,draining", &["eu-1", "eu-3"]),
        ("prefix=eu-&meta.gpu=false", &["eu-2"]),
        ("status=up&meta.gpu=true&meta.region=us", &["us-1"]),
        ("meta.region=eu&meta.region=us", &[]),
        ("prefix=us-&status=draining", &[]),
        // Unknown parameters are ignored next to known ones.
        ("prefix=us-&color=red", &["us-1", "us-2"]),
    ] {
        assert_eq!(
            ids(&svc, &format!("/presence?{query}")).await,
            expected,
            "{query}"
        );
    }
    // Only unknown parameters: the plain listing.
    assert_eq!(ids(&svc, "/presence?color=red").await.len(), 6);
}

#[tokio::test]
async fn meta_values_match_strings_as_themselves_and_numbers_and_booleans_by_their_json_text() {
    let svc = memory();
    fleet(&svc).await;
    for (query, expected) in [
        // Strings: equal, decoded from the query (`+` is a space, `%2B` a plus).
        ("meta.region=eu+west", &["eu-3"][..]),
        ("meta.region=eu%20west", &["eu-3"]),
        ("meta.zone=a%2Bb", &["eu-3"]),
        ("meta.zone=a+b", &[]),
        ("meta.region=EU", &[]),
        // Numbers and booleans: their JSON text as stored.
        ("meta.load=0.5", &["eu-1"]),
        ("meta.load=.5", &[]),
        ("meta.load=0.50", &[]),
        ("meta.load=5", &["eu-2"]),
        ("meta.gpu=false", &["eu-2"]),
        ("meta.gpu=TRUE", &[]),
        // The string "5" is a string equal to 5.
        ("meta.n=5", &["us-1"]),
        // Keys are top-level only: nested keys do not match, objects match nothing.
        ("meta.nested.region=eu", &[]),
        ("meta.nested=%7B%22region%22%3A%22eu%22%7D", &[]),
        ("meta.missing=x", &[]),
    ] {
        assert_eq!(
            ids(&svc, &format!("/presence?{query}")).await,
            expected,
            "{query}"
        );
    }
}

/// The target of a `Link: <...>; rel="next"` header.
fn next_target(r: &Reply) -> Option<String> {
    let link = r.header("link")?;
    let target = link
        .strip_prefix('<')
        .and_then(|l| l.split_once(">; rel=\"next\""))
        .map(|(target, _)| target.to_owned());
    assert!(target.is_some(), "malformed Link {link:?}");
    target
}

/// Follows `Link` from `first` to the last page; every page's ids in order, and
/// checks each page carries a `Presence-Cursor`.
async fn pages(svc: &PresenceService, first: &str) -> Vec<Vec<String>> {
    let mut pages = Vec::new();
    let mut target = Some(first.to_owned());
    while let Some(path) = target {
        assert!(pages.len() < 100, "the paging does not end");
        let r = get(svc, &path).await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "{path}: {}",
            String::from_utf8_lossy(&r.bytes)
        );
        assert!(
            r.header("presence-cursor").is_some(),
            "{path}: no Presence-Cursor"
        );
        pages.push(ids_of(&r.json()));
        target = next_target(&r);
    }
    pages
}

async fn paging_through_250_nodes(svc: &PresenceService) {
    for i in (0..250).rev() {
        let status = if i % 3 == 0 { "degraded" } else { "up" };
        login(
            svc,
            &format!("n-{i:03}"),
            json!({"status": status, "meta": {"i": i}}),
        )
        .await;
    }
    login(svc, "other", json!({})).await;
    let all: Vec<String> = (0..250).map(|i| format!("n-{i:03}")).collect();
    let got = pages(svc, "/presence?prefix=n-&limit=100").await;
    assert_eq!(got.iter().map(Vec::len).collect::<Vec<_>>(), [100, 100, 50]);
    assert_eq!(got.concat(), all, "every node once, in order");
    // The first page's link carries the filter, the size and the last id.
    let r = get(svc, "/presence?prefix=n-&limit=100").await;
    assert_eq!(
        r.header("link"),
        Some("</presence?prefix=n-&limit=100&after=n-099>; rel=\"next\"")
    );
    // A filter the link keeps: every third node, pages of 40.
    let degraded: Vec<String> = (0..250).step_by(3).map(|i| format!("n-{i:03}")).collect();
    let got = pages(svc, "/presence?status=degraded&limit=40").await;
    assert_eq!(got.iter().map(Vec::len).collect::<Vec<_>>(), [40, 40, 4]);
    assert_eq!(got.concat(), degraded);
    // A page that ends exactly at the last match has no link.
    let r = get(svc, "/presence?prefix=n-&limit=250").await;
    assert_eq!(ids_of(&r.json()), all);
    assert_eq!(r.header("link"), None);
    // `after` alone, and a limit alone.
    assert_eq!(
        ids(svc, "/presence?after=n-247").await,
        ["n-248", "n-249", "other"]
    );
    let r = get(svc, "/presence?limit=1").await;
    assert_eq!(ids_of(&r.json()), ["n-000"]);
    assert_eq!(
        r.header("link"),
        Some("</presence?limit=1&after=n-000>; rel=\"next\"")
    );
    // HEAD answers the same headers.
    let head = send(svc, Method::HEAD, "/presence?limit=1", None).await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(head.header("link"), r.header("link"));
    assert!(head.bytes.is_empty());
}

#[tokio::test]
async fn memory_pages_through_250_nodes_following_link() {
    paging_through_250_nodes(&memory()).await;
}

#[tokio::test]
async fn redis_pages_through_250_nodes_following_link() {
    let Some(redis) = redis_for_tests("query_paging").await else {
        return;
    };
    paging_through_250_nodes(&service(Arc::new(redis.clone()))).await;
    let deleted = redis.delete_prefix().await;
    assert!(deleted.is_ok(), "{deleted:?}");
}

#[tokio::test]
async fn every_malformed_parameter_is_400_naming_it() {
    let svc = memory();
    login(&svc, "n", json!({})).await;
    for (query, named) in [
        ("limit=0", "limit"),
        ("limit=10001", "limit"),
        ("limit=ten", "limit"),
        ("limit=1.5", "limit"),
        ("limit=", "limit"),
        ("prefix=", "prefix"),
        ("status=down", "status"),
        ("status=", "status"),
        ("status=up,,draining", "status"),
        ("meta.=x", "meta."),
        ("after=", "after"),
        ("prefix=a&prefix=b", "prefix"),
        ("status=up&status=degraded", "status"),
        ("limit=1&limit=1", "limit"),
        ("after=a&after=b", "after"),
    ] {
        let r = get(&svc, &format!("/presence?{query}")).await;
        assert_error(
            &r,
            StatusCode::BAD_REQUEST,
            "bad_request",
            &format!("`{named}`"),
        );
        let head = send(&svc, Method::HEAD, &format!("/presence?{query}"), None).await;
        assert_eq!(head.status, StatusCode::BAD_REQUEST, "HEAD {query}");
    }
    // The bounds themselves are fine.
    assert_eq!(get(&svc, "/presence?limit=1").await.status, StatusCode::OK);
    assert_eq!(
        get(&svc, "/presence?limit=10000").await.status,
        StatusCode::OK
    );
    // A watch has no pages, and checks its filter before it opens.
    for (query, named) in [
        ("limit=5", "limit"),
        ("after=a", "after"),
        ("status=x", "status"),
    ] {
        let r = get(&svc, &format!("/presence/watch?{query}")).await;
        assert_error(
            &r,
            StatusCode::BAD_REQUEST,
            "bad_request",
            &format!("`{named}`"),
        );
    }
}

async fn stats(svc: &PresenceService) -> Value {
    let r = get(svc, "/presence/stats").await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.bytes)
    );
    assert_eq!(r.header("content-type"), Some("application/json"));
    r.json()
}

async fn stats_follow_logins_status_changes_and_logouts(svc: &PresenceService) {
    assert_eq!(
        stats(svc).await,
        json!({"online": 0, "by_status": {"up": 0, "degraded": 0, "draining": 0}})
    );
    let a = login(svc, "a", json!({})).await;
    login(svc, "b", json!({"status": "degraded"})).await;
    let c = login(svc, "c", json!({"status": "draining"})).await;
    login(svc, "d", json!({"status": "up"})).await;
    assert_eq!(
        stats(svc).await,
        json!({"online": 4, "by_status": {"up": 2, "degraded": 1, "draining": 1}})
    );
    let to_draining = json!({"node_id": "a", "lease_id": a, "status": "draining"});
    assert_eq!(
        post(svc, "/presence/heartbeat", to_draining.to_string())
            .await
            .status,
        StatusCode::OK
    );
    // A heartbeat without a status changes no count.
    let keep = json!({"node_id": "c", "lease_id": c});
    assert_eq!(
        post(svc, "/presence/heartbeat", keep.to_string())
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        stats(svc).await,
        json!({"online": 4, "by_status": {"up": 1, "degraded": 1, "draining": 2}})
    );
    // A re-login with another status moves the node, it does not add one.
    login(svc, "b", json!({"status": "up"})).await;
    let logout = json!({"node_id": "c", "lease_id": c});
    let r = post(svc, "/presence/logout", logout.to_string()).await;
    assert_eq!(r.json()["removed"], true);
    assert_eq!(
        stats(svc).await,
        json!({"online": 3, "by_status": {"up": 2, "degraded": 0, "draining": 1}})
    );
    let head = send(svc, Method::HEAD, "/presence/stats", None).await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.bytes.is_empty());
    let post_stats = post(svc, "/presence/stats", "{}").await;
    assert_eq!(post_stats.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(post_stats.header("allow"), Some("GET, HEAD"));
}

#[tokio::test]
async fn memory_stats_follow_logins_status_changes_and_logouts() {
    stats_follow_logins_status_changes_and_logouts(&memory()).await;
}

#[tokio::test]
async fn redis_stats_follow_logins_status_changes_and_logouts() {
    let Some(redis) = redis_for_tests("query_stats").await else {
        return;
    };
    stats_follow_logins_status_changes_and_logouts(&service(Arc::new(redis.clone()))).await;
    let deleted = redis.delete_prefix().await;
    assert!(deleted.is_ok(), "{deleted:?}");
}

/// One SSE event: its `id`, `event` and `data`.
#[derive(Debug)]
struct Event {
    id: String,
    event: String,
    data: Value,
}

/// Reads SSE events off a watch response's body.
struct Sse {
    body: ResponseBody,
    buf: String,
}

impl Sse {
    async fn open(svc: &PresenceService, path: &str) -> Sse {
        let res = call(svc, Method::GET, path, None).await;
        assert_eq!(res.status(), StatusCode::OK, "{path}");
        Sse {
            body: res.into_body(),
            buf: String::new(),
        }
    }

    /// The next event (keep-alive comments skipped), within 5 s.
    async fn next(&mut self) -> Event {
        tokio::time::timeout(Duration::from_secs(5), self.read())
            .await
            .expect("an event within 5 s")
    }

    /// `None` if no event comes within `wait`.
    async fn quiet_for(&mut self, wait: Duration) -> Option<Event> {
        tokio::time::timeout(wait, self.read()).await.ok()
    }

    async fn read(&mut self) -> Event {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                if let Some(event) = parse_event(&block) {
                    return event;
                }
                continue;
            }
            let frame = self
                .body
                .frame()
                .await
                .expect("the stream goes on")
                .expect("no error");
            if let Ok(data) = frame.into_data() {
                self.buf
                    .push_str(std::str::from_utf8(&data).expect("UTF-8"));
            }
        }
    }
}

fn parse_event(block: &str) -> Option<Event> {
    let (mut id, mut event, mut data) = (String::new(), String::new(), String::new());
    for line in block.lines() {
        if let Some(v) = line.strip_prefix("id: ") {
            id = v.to_owned();
        } else if let Some(v) = line.strip_prefix("event: ") {
            event = v.to_owned();
        } else if let Some(v) = line.strip_prefix("data: ") {
            data.push_str(v);
        }
    }
    (!event.is_empty()).then(|| Event {
        id,
        event,
        data: serde_json::from_str(&data).expect("JSON data"),
    })
}

async fn heartbeat(svc: &PresenceService, node: &str, lease: &str, extra: Value) {
    let mut body = json!({"node_id": node, "lease_id": lease});
    if let (Some(body), Value::Object(extra)) = (body.as_object_mut(), extra) {
        body.extend(extra);
    }
    let r = post(svc, "/presence/heartbeat", body.to_string()).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.bytes)
    );
}

#[tokio::test]
async fn a_filtered_watch_sends_matching_nodes_and_unmatched_leaves_only() {
    let svc = memory();
    let a = login(&svc, "eu-a", json!({"meta": {"gpu": true}})).await;
    let b = login(
        &svc,
        "eu-b",
        json!({"status": "draining", "meta": {"gpu": true}}),
    )
    .await;
    let c = login(&svc, "us-c", json!({"meta": {"gpu": true}})).await;
    login(&svc, "eu-d", json!({"meta": {"gpu": false}})).await;
    let mut watch = Sse::open(
        &svc,
        "/presence/watch?prefix=eu-&status=up,degraded&meta.gpu=true",
    )
    .await;

    let snapshot = watch.next().await;
    assert_eq!(snapshot.event, "snapshot");
    assert_eq!(
        ids_of(&snapshot.data["nodes"]),
        ["eu-a"],
        "the snapshot is filtered"
    );

    // Changes of nodes that do not match are not sent...
    heartbeat(&svc, "eu-b", &b, json!({"meta": {"gpu": true, "x": 1}})).await;
    heartbeat(&svc, "us-c", &c, json!({"status": "degraded"})).await;
    login(&svc, "us-e", json!({})).await;
    // ... a matching one is.
    heartbeat(&svc, "eu-a", &a, json!({"status": "degraded"})).await;
    let update = watch.next().await;
    assert_eq!(
        (update.event.as_str(), &update.data["node_id"]),
        ("update", &json!("eu-a"))
    );
    assert_eq!(update.data["status"], "degraded");

    // A held node that stops matching leaves as `unmatched`, at its change's cursor.
    heartbeat(&svc, "eu-a", &a, json!({"status": "draining"})).await;
    let leave = watch.next().await;
    assert_eq!(leave.event, "leave");
    assert_eq!(
        leave.data,
        json!({"node_id": "eu-a", "reason": "unmatched"})
    );
    assert!(
        !leave.id.is_empty() && leave.id != update.id,
        "its own cursor"
    );
    // Replaying from just before it gives the same cursor for that change.
    let mut replay = Sse::open(
        &svc,
        &format!("/presence/watch?since={}&prefix=eu-", update.id),
    )
    .await;
    assert_eq!(replay.next().await.id, leave.id);

    // Not held any more: its next non-matching change and its logout are not sent.
    heartbeat(&svc, "eu-a", &a, json!({"meta": {"gpu": true, "y": 2}})).await;
    // A node that comes to match joins the watcher's view as an update.
    heartbeat(&svc, "eu-b", &b, json!({"status": "up"})).await;
    let join_b = watch.next().await;
    assert_eq!(
        (join_b.event.as_str(), &join_b.data["node_id"]),
        ("update", &json!("eu-b"))
    );
    let logout_a = json!({"node_id": "eu-a", "lease_id": a}).to_string();
    assert_eq!(
        post(&svc, "/presence/logout", logout_a).await.json()["removed"],
        true
    );
    // A held node's logout is sent as it is.
    let logout_b = json!({"node_id": "eu-b", "lease_id": b}).to_string();
    assert_eq!(
        post(&svc, "/presence/logout", logout_b).await.json()["removed"],
        true
    );
    let leave_b = watch.next().await;
    assert_eq!(leave_b.event, "leave");
    assert_eq!(leave_b.data, json!({"node_id": "eu-b", "reason": "logout"}));
    // A new matching login is a join.
    login(&svc, "eu-f", json!({"meta": {"gpu": true}})).await;
    let join = watch.next().await;
    assert_eq!(
        (join.event.as_str(), &join.data["node_id"]),
        ("join", &json!("eu-f"))
    );
    assert_eq!(
        watch
            .quiet_for(Duration::from_millis(200))
            .await
            .map(|e| e.event),
        None
    );
}

#[tokio::test]
async fn an_unfiltered_watch_still_sends_every_change() {
    let svc = memory();
    let a = login(&svc, "a", json!({})).await;
    let mut watch = Sse::open(&svc, "/presence/watch?color=red").await;
    assert_eq!(ids_of(&watch.next().await.data["nodes"]), ["a"]);
    heartbeat(&svc, "a", &a, json!({"status": "draining"})).await;
    let update = watch.next().await;
    assert_eq!(
        (update.event.as_str(), &update.data["status"]),
        ("update", &json!("draining"))
    );
}
