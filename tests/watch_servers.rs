//! `GET /presence/watch` across real servers and sockets: several servers on one
//! Redis prefix, a watcher resuming on another server after its server died, the
//! expiry sweep of several servers, a Redis outage longer than the TTL, a watcher
//! that stops reading, the watcher limit, and SIGTERM on the `presence_server`
//! binary.
//!
//! - `a_watcher_on_server_a_sees_changes_made_through_server_b`: the exact event
//!   sequence (login, meta change, heartbeat without change, logout, expiry).
//! - `a_client_resumes_on_server_b_with_its_cursor_after_server_a_dies`: the event log
//!   before and after the resume (`Last-Event-ID`) is exactly the sequence of writes.
//! - `two_then_three_servers_sweeping_report_each_expiry_once`: 200 expiries, 200
//!   `leave`/`expired` events, with 2 and with 3 sweeping servers.
//! - `a_redis_outage_longer_than_the_ttl_expires_no_node_that_heartbeats_again`:
//!   self-preservation seen from a watcher (SDK feed, reconnecting by itself).
//! - `a_slow_watcher_is_disconnected_and_others_are_unaffected`: backlog 16, a client
//!   that never reads is dropped (its socket closed), a reading one gets everything,
//!   memory stays bounded.
//! - `max_watchers_plus_one_is_503_too_many_watchers_with_retry_after`.
//! - `sigterm_ends_every_watch_stream_cleanly_and_the_process_exits_within_the_grace`.
//!
//! The first three use the shared test Redis (`PRESENCE_TEST_REDIS_URI`, default
//! `redis://127.0.0.1:6379`) on a unique key prefix each, deleted at the end; the
//! outage test starts its own `redis-server` child. Without Redis (or the
//! `redis-server` binary) those tests print why and pass as skipped, unless
//! `PRESENCE_REQUIRE_REDIS=1`, which makes a missing Redis a failure. The SIGTERM
//! test skips (with the reason) when `target/<profile>/examples/presence_server` is
//! missing: `cargo build --example presence_server` builds it.
//!
//! SSE is read from reqwest's body chunk by chunk (`Response::chunk`), parsed here, so
//! the tests see exactly what went over the wire: every `id`, every comment, and
//! whether the body ended cleanly or broke.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use presence::client::{Filter, LeaveReason, PresenceClient, WatchEvent, WatchItem};
use presence::store::redis::test_support::redis_for_tests;
use presence::store::redis::RedisStore;
use presence::store::Store;
use serde_json::{json, Value};
use support::client::{get_with, http, post_with, Reply};
use support::process::{clean_command, example_binary_or_skip, parse_listen_addr, ChildGuard};
use support::raw_http::read_to_close;
use support::redis::{test_redis_uri, RedisChild};
use support::server::TestServer;
use support::{metric_value, rss_bytes, unlimited_config, within};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------------------
// SSE over reqwest
// ---------------------------------------------------------------------------------------

/// A client for watch streams: no proxy, and no overall timeout (a stream lasts as
/// long as the test wants; every read is bounded by the test instead).
fn sse_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(5))
        .build()
        .unwrap_or_else(|e| panic!("reqwest client: {e}"))
}

/// One server-sent event.
#[derive(Clone, Debug)]
struct Event {
    id: String,
    event: String,
    data: String,
}

impl Event {
    fn json(&self) -> Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("event data is not JSON ({e}): {self:?}"))
    }

    fn node_id(&self) -> String {
        self.json()["node_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// `join <id> <meta>`, `update <id> <meta>`, `leave <id> <reason>`,
    /// `snapshot [<ids>]`: what the tests compare.
    fn summary(&self) -> String {
        let data = self.json();
        match self.event.as_str() {
            "join" | "update" => format!("{} {} {}", self.event, self.node_id(), data["meta"]),
            "leave" => format!(
                "leave {} {}",
                self.node_id(),
                data["reason"].as_str().unwrap_or("?")
            ),
            "snapshot" => {
                let ids: Vec<&str> = data["nodes"]
                    .as_array()
                    .map(|nodes| nodes.iter().filter_map(|n| n["node_id"].as_str()).collect())
                    .unwrap_or_default();
                format!("snapshot {ids:?}")
            }
            other => format!("{other} {}", self.data),
        }
    }
}

/// What a read of the stream gave.
#[derive(Debug)]
enum Next {
    Event(Event),
    /// The body ended cleanly (HTTP/1.1: the last chunk arrived).
    End,
    /// The body broke (reset, closed mid-chunk, ...); shown in failure messages.
    Broken(#[allow(dead_code)] String),
}

/// A watch stream read chunk by chunk.
struct Sse {
    response: reqwest::Response,
    buf: Vec<u8>,
    comments: usize,
}

impl Sse {
    /// `GET url` with `Last-Event-ID` when given; asserts `200 text/event-stream`.
    async fn open(client: &reqwest::Client, url: &str, last_event_id: Option<&str>) -> Sse {
        let mut request = client.get(url).header("accept", "text/event-stream");
        if let Some(cursor) = last_event_id {
            request = request.header("last-event-id", cursor);
        }
        let response = within(10, request.send())
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        assert_eq!(response.status().as_u16(), 200, "GET {url}: {response:?}");
        let ct = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        assert!(ct.starts_with("text/event-stream"), "content type {ct:?}");
        Sse {
            response,
            buf: Vec::new(),
            comments: 0,
        }
    }

    /// The next event (comments are counted and skipped), the clean end of the body,
    /// or the error that broke it. Not bounded: wrap it in a timeout.
    async fn next(&mut self) -> Next {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..end + 2).collect();
                let text = String::from_utf8_lossy(&block[..end]).into_owned();
                let mut event = Event {
                    id: String::new(),
                    event: "message".to_owned(),
                    data: String::new(),
                };
                let mut fields = 0;
                for line in text.lines() {
                    let (name, value) = line.split_once(':').unwrap_or((line, ""));
                    let value = value.strip_prefix(' ').unwrap_or(value);
                    match name {
                        "" => continue, // a comment
                        "id" => event.id = value.to_owned(),
                        "event" => event.event = value.to_owned(),
                        "data" => {
                            if !event.data.is_empty() {
                                event.data.push('\n');
                            }
                            event.data.push_str(value);
                        }
                        _ => {}
                    }
                    fields += 1;
                }
                if fields == 0 {
                    self.comments += 1;
                    continue;
                }
                return Next::Event(event);
            }
            match self.response.chunk().await {
                Ok(Some(bytes)) => self.buf.extend_from_slice(&bytes),
                Ok(None) => return Next::End,
                Err(e) => return Next::Broken(format!("{e:?}")),
            }
        }
    }

    /// The next event within `secs`; panics on a timeout, an end or an error.
    async fn event(&mut self, secs: u64) -> Event {
        match tokio::time::timeout(Duration::from_secs(secs), self.next()).await {
            Ok(Next::Event(e)) => e,
            Ok(other) => panic!("expected an event, got {other:?}"),
            Err(_) => panic!("no event within {secs} s"),
        }
    }

    /// The next event if one comes within `limit`; panics on an end or an error.
    async fn event_within(&mut self, limit: Duration) -> Option<Event> {
        match tokio::time::timeout(limit, self.next()).await {
            Ok(Next::Event(e)) => Some(e),
            Ok(other) => panic!("expected an event, got {other:?}"),
            Err(_) => None,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// Runs `body(redis uri, prefix)` against the shared test Redis on a fresh prefix,
/// bounded by `secs`, deleting the prefix afterwards even when `body` panics. Skips
/// (returns) when Redis is unavailable, unless `PRESENCE_REQUIRE_REDIS=1`.
async fn on_shared_redis<F, Fut>(name: &str, secs: u64, body: F)
where
    F: FnOnce(String, String) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some(admin) = redis_for_tests(name).await else {
        return;
    };
    let prefix = admin.prefix().to_owned();
    let outcome = tokio::spawn(within(secs, body(test_redis_uri(), prefix))).await;
    let _ = admin.delete_prefix().await;
    if let Err(e) = outcome {
        if e.is_panic() {
            std::panic::resume_unwind(e.into_panic());
        }
        panic!("test task failed: {e}");
    }
}

/// A store on `prefix` of the Redis at `uri`, for one server.
async fn redis_store(uri: &str, prefix: &str) -> Arc<dyn Store> {
    Arc::new(
        RedisStore::connect(uri, prefix)
            .await
            .unwrap_or_else(|e| panic!("connect to {uri}: {e}")),
    )
}

/// `POST /presence/login`; asserts 200; returns the lease id.
async fn login(client: &reqwest::Client, server: &TestServer, node: &str, meta: Value) -> String {
    let reply = post_with(
        client,
        &server.url("/presence/login"),
        &json!({ "node_id": node, "meta": meta }),
    )
    .await;
    let body = reply.ok_json();
    body["lease_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no lease in {body}"))
        .to_owned()
}

/// `POST /presence/heartbeat` (with `meta` unless it is `null`); asserts 200.
async fn heartbeat(
    client: &reqwest::Client,
    server: &TestServer,
    node: &str,
    lease: &str,
    meta: Value,
) {
    let mut body = json!({ "node_id": node, "lease_id": lease });
    if !meta.is_null() {
        body["meta"] = meta;
    }
    post_with(client, &server.url("/presence/heartbeat"), &body)
        .await
        .ok_json();
}

/// `POST /presence/logout`; asserts `removed: true`.
async fn logout(client: &reqwest::Client, server: &TestServer, node: &str, lease: &str) {
    let reply = post_with(
        client,
        &server.url("/presence/logout"),
        &json!({ "node_id": node, "lease_id": lease }),
    )
    .await
    .ok_json();
    assert_eq!(reply["removed"], true, "logout {node}: {reply}");
}

async fn scrape(client: &reqwest::Client, server: &TestServer) -> String {
    let reply = get_with(client, &server.url("/metrics")).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    reply.text()
}

// ---------------------------------------------------------------------------------------
// 1. Two servers, one prefix: the exact sequence
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_on_server_a_sees_changes_made_through_server_b() {
    on_shared_redis("watch_a_sees_b", 30, |uri, prefix| async move {
        let a = TestServer::start(
            &unlimited_config(Duration::from_secs(2)),
            redis_store(&uri, &prefix).await,
        )
        .await;
        // B logs nodes in for 1 s: every step below renews well within it, and the
        // last node is left to expire.
        let mut cfg_b = unlimited_config(Duration::from_secs(2));
        cfg_b.ttl = Duration::from_secs(1);
        let b = TestServer::start(&cfg_b, redis_store(&uri, &prefix).await).await;
        let client = http();

        let mut watch = Sse::open(&sse_client(), &a.url("/presence/watch"), None).await;
        let snapshot = watch.event(5).await;
        assert_eq!(snapshot.summary(), "snapshot []", "{snapshot:?}");

        let lease = login(&client, &b, "n-1", json!({"v": 1})).await;
        heartbeat(&client, &b, "n-1", &lease, json!({"v": 2})).await;
        heartbeat(&client, &b, "n-1", &lease, json!({"v": 2})).await; // no change
        heartbeat(&client, &b, "n-1", &lease, Value::Null).await; // no change either
        logout(&client, &b, "n-1", &lease).await;
        let started = Instant::now();
        login(&client, &b, "n-2", json!({"short": true})).await;

        let mut events = Vec::new();
        for _ in 0..5 {
            events.push(watch.event(10).await);
        }
        let expired_after = started.elapsed();
        // Nothing else (a second `expired`, a late update) comes before a marker
        // written after the expiry had every chance to be reported twice.
        tokio::time::sleep(Duration::from_millis(700)).await;
        login(&client, &b, "marker", json!({})).await;
        events.push(watch.event(5).await);

        let summaries: Vec<String> = events.iter().map(Event::summary).collect();
        assert_eq!(
            summaries,
            [
                r#"join n-1 {"v":1}"#,
                r#"update n-1 {"v":2}"#,
                "leave n-1 logout",
                r#"join n-2 {"short":true}"#,
                "leave n-2 expired",
                "join marker {}",
            ],
            "events after the snapshot: {events:#?}"
        );
        // Records as B wrote them: B's TTL, a later last_seen for the update.
        let (join, update) = (events[0].json(), events[1].json());
        for node in [&join, &update, &events[3].json()] {
            let ttl =
                node["expires_at_ms"].as_u64().unwrap() - node["last_seen_ms"].as_u64().unwrap();
            assert_eq!(ttl, 1000, "expires_at_ms - last_seen_ms in {node}");
        }
        assert_eq!(join["online_since_ms"], update["online_since_ms"]);
        assert!(update["last_seen_ms"].as_u64() >= join["last_seen_ms"].as_u64());
        // Cursors: present, all different.
        let ids: BTreeSet<&str> = std::iter::once(&snapshot)
            .chain(&events)
            .map(|e| e.id.as_str())
            .collect();
        assert_eq!(ids.len(), events.len() + 1, "distinct cursors: {events:#?}");
        assert!(!ids.contains(""), "every event has an id");
        assert!(
            expired_after >= Duration::from_millis(950),
            "n-2 expired {expired_after:?} after its login (TTL 1 s)"
        );
        println!("n-2's expiry reported {expired_after:?} after its login (TTL 1 s)");
        drop(watch);
        a.stop().await;
        b.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 2. Resume on B with the cursor after A died
// ---------------------------------------------------------------------------------------

/// Nodes of the numbered write sequence.
const WRITE_NODES: usize = 8;
/// Writes in the sequence.
const WRITES: usize = 240;

/// Write `i` as the summary of the event it must cause: node `w-<i % 8>`, in rounds
/// of 8: login with `{"seq": i}`, heartbeat with `{"seq": i}`, logout.
fn expected_event(i: usize) -> String {
    let node = format!("w-{}", i % WRITE_NODES);
    match (i / WRITE_NODES) % 3 {
        0 => format!(r#"join {node} {{"seq":{i}}}"#),
        1 => format!(r#"update {node} {{"seq":{i}}}"#),
        _ => format!("leave {node} logout"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resumes_on_server_b_with_its_cursor_after_server_a_dies() {
    on_shared_redis("watch_resume_on_b", 60, |uri, prefix| async move {
        let cfg = unlimited_config(Duration::from_secs(2));
        let a = TestServer::start(&cfg, redis_store(&uri, &prefix).await).await;
        let b = TestServer::start(&cfg, redis_store(&uri, &prefix).await).await;
        let b_url = b.url("/presence/watch");
        let b = Arc::new(b);

        let sse = sse_client();
        let mut watch = Sse::open(&sse, &a.url("/presence/watch"), None).await;
        assert_eq!(watch.event(5).await.summary(), "snapshot []");

        let progress = Arc::new(AtomicUsize::new(0));
        let writer = {
            let (b, progress) = (b.clone(), progress.clone());
            tokio::spawn(async move {
                let client = http();
                let mut leases: BTreeMap<String, String> = BTreeMap::new();
                for i in 0..WRITES {
                    let node = format!("w-{}", i % WRITE_NODES);
                    match (i / WRITE_NODES) % 3 {
                        0 => {
                            let lease = login(&client, &b, &node, json!({"seq": i})).await;
                            leases.insert(node, lease);
                        }
                        1 => heartbeat(&client, &b, &node, &leases[&node], json!({"seq": i})).await,
                        _ => logout(&client, &b, &node, &leases[&node]).await,
                    }
                    progress.store(i + 1, Ordering::Release);
                    tokio::time::sleep(Duration::from_millis(3)).await;
                }
            })
        };

        // Read A until a third of the writes came through, then kill A.
        let mut before: Vec<Event> = Vec::new();
        while before.len() < WRITES / 3 {
            before.push(watch.event(10).await);
        }
        let written_at_kill = progress.load(Ordering::Acquire);
        drop(a);
        // What A had sent before it died is still readable; then the body breaks.
        let ending = loop {
            match tokio::time::timeout(Duration::from_secs(10), watch.next()).await {
                Ok(Next::Event(e)) => before.push(e),
                Ok(other) => break other,
                Err(_) => panic!("A's stream did not end within 10 s of A's death"),
            }
        };
        let cursor = before.last().expect("events before the kill").id.clone();
        assert!(
            written_at_kill < WRITES,
            "A died mid-way ({written_at_kill} of {WRITES} writes done)"
        );

        let mut resumed = Sse::open(&sse, &b_url, Some(&cursor)).await;
        let mut after: Vec<Event> = Vec::new();
        while before.len() + after.len() < WRITES {
            let e = resumed.event(10).await;
            assert_ne!(e.event, "snapshot", "B resumed from the cursor: {e:?}");
            after.push(e);
        }
        within(30, writer).await.expect("writer task");
        // Nothing after the last write either.
        if let Some(extra) = resumed.event_within(Duration::from_millis(500)).await {
            panic!("an event after the last write: {extra:?}");
        }

        let log: Vec<String> = before.iter().chain(&after).map(Event::summary).collect();
        let expected: Vec<String> = (0..WRITES).map(expected_event).collect();
        assert_eq!(
            after.first().map(Event::summary),
            Some(expected_event(before.len())),
            "the first event after the resume is the write after the last one seen"
        );
        assert_eq!(log, expected, "the event log is the write sequence");
        let ids: BTreeSet<&str> = before.iter().chain(&after).map(|e| e.id.as_str()).collect();
        assert_eq!(ids.len(), WRITES, "distinct cursors");
        println!(
            "A killed after {written_at_kill} writes; {} events read from A (stream ended: \
             {ending:?}), {} from B after Last-Event-ID",
            before.len(),
            after.len()
        );
        drop(resumed);
        if let Ok(b) = Arc::try_unwrap(b) {
            b.stop().await;
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 3. Several sweepers: one `expired` per expiry
// ---------------------------------------------------------------------------------------

const EXPIRING: usize = 200;

/// `servers` servers on `prefix` with a 1 s TTL; `EXPIRING` nodes logged in round
/// robin through them; counts the `expired` leaves a watcher on the first one sees.
async fn expire_through(uri: String, prefix: String, servers: usize) {
    let mut cfg = unlimited_config(Duration::from_secs(2));
    cfg.ttl = Duration::from_secs(1);
    let mut all = Vec::new();
    for _ in 0..servers {
        all.push(Arc::new(
            TestServer::start(&cfg, redis_store(&uri, &prefix).await).await,
        ));
    }
    let mut watch = Sse::open(&sse_client(), &all[0].url("/presence/watch"), None).await;
    assert_eq!(watch.event(5).await.summary(), "snapshot []");

    let started = Instant::now();
    let client = http();
    let mut logins = Vec::new();
    for worker in 0..10 {
        let (client, all) = (client.clone(), all.clone());
        logins.push(tokio::spawn(async move {
            for i in (worker..EXPIRING).step_by(10) {
                let server = &all[i % all.len()];
                login(&client, server, &format!("x-{i:03}"), json!({})).await;
            }
        }));
    }
    for task in logins {
        task.await.expect("login task");
    }
    let logged_in = started.elapsed();

    let mut joins = BTreeSet::new();
    let mut expired: Vec<String> = Vec::new();
    let mut other = Vec::new();
    while expired.len() < EXPIRING {
        let e = watch.event(15).await;
        match e.event.as_str() {
            "join" => {
                joins.insert(e.node_id());
            }
            "leave" if e.json()["reason"] == "expired" => expired.push(e.node_id()),
            _ => other.push(e.summary()),
        }
    }
    let all_expired = started.elapsed();
    // Duplicates would come within a few sweeps; give them 1.5 s.
    while let Some(e) = watch.event_within(Duration::from_millis(1500)).await {
        match e.event.as_str() {
            "leave" if e.json()["reason"] == "expired" => expired.push(e.node_id()),
            _ => other.push(e.summary()),
        }
    }
    let distinct: BTreeSet<&String> = expired.iter().collect();
    assert_eq!(joins.len(), EXPIRING, "joins seen");
    assert!(other.is_empty(), "unexpected events: {other:?}");
    assert_eq!(
        distinct.len(),
        EXPIRING,
        "{servers} servers: distinct nodes expired"
    );
    assert_eq!(
        expired.len(),
        EXPIRING,
        "{servers} servers: one expired leave per expiry"
    );
    println!(
        "{servers} servers: {EXPIRING} logins in {logged_in:?}, all {EXPIRING} expiries \
         reported once by {all_expired:?}"
    );
    drop(watch);
    for server in all {
        if let Ok(server) = Arc::try_unwrap(server) {
            server.stop().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_then_three_servers_sweeping_report_each_expiry_once() {
    on_shared_redis("watch_sweep_two", 40, |uri, prefix| {
        expire_through(uri, prefix, 2)
    })
    .await;
    on_shared_redis("watch_sweep_three", 40, |uri, prefix| {
        expire_through(uri, prefix, 3)
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 4. A Redis outage longer than the TTL
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_longer_than_the_ttl_expires_no_node_that_heartbeats_again() {
    // `WATCH_TEST_LOG=1` shows the server's log (breaker, outage recovery, feed).
    if std::env::var_os("WATCH_TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("presence=debug")
            .with_test_writer()
            .try_init();
    }
    let Some(redis) = RedisChild::start("watch_outage").await else {
        return;
    };
    within(45, async {
        let store = presence::store::open(Some(&redis.uri()), "watch-outage")
            .await
            .expect("open is lazy");
        let mut cfg = unlimited_config(Duration::from_millis(500));
        cfg.ttl = Duration::from_secs(2);
        cfg.heartbeat = Duration::from_millis(300);
        cfg.watch_keepalive = Duration::from_secs(1);
        let server = TestServer::start(&cfg, store).await;
        let client = http();
        let nodes: Vec<String> = (0..10).map(|i| format!("o-{i}")).collect();
        let mut leases = BTreeMap::new();
        for node in &nodes {
            leases.insert(node.clone(), login(&client, &server, node, json!({})).await);
        }

        // The SDK's feed: reconnects (with its cursor) by itself. Every item is kept
        // with the time it arrived.
        let pc = PresenceClient::builder(server.base())
            .timeout(Duration::from_secs(2))
            .watch_backoff(Duration::from_millis(50), Duration::from_millis(500))
            .watch_idle_timeout(Some(Duration::from_secs(3)))
            .build()
            .expect("client");
        type Items = Arc<Mutex<Vec<(Instant, WatchItem)>>>;
        let items: Items = Arc::default();
        let fatal: Arc<Mutex<Vec<String>>> = Arc::default();
        let watcher = {
            let (items, fatal) = (items.clone(), fatal.clone());
            let mut feed = pc.watch(Filter::all());
            tokio::spawn(async move {
                while let Some(item) = feed.next().await {
                    match item {
                        Ok(item) => items.lock().unwrap().push((Instant::now(), item)),
                        Err(e) => fatal.lock().unwrap().push(e.to_string()),
                    }
                }
            })
        };
        let seen = |items: &Items, f: &dyn Fn(&WatchEvent) -> bool| {
            items.lock().unwrap().iter().any(|(_, i)| f(&i.event))
        };
        let wait_for = |what: &'static str, f: &'static (dyn Fn(&WatchEvent) -> bool + Sync)| {
            let items = items.clone();
            async move {
                let deadline = Instant::now() + Duration::from_secs(10);
                while !seen(&items, f) {
                    assert!(Instant::now() < deadline, "watcher: {what} within 10 s");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        wait_for(
            "a snapshot of the 10 nodes",
            &|e| matches!(e, WatchEvent::Snapshot(n) if n.len() == 10),
        )
        .await;

        // One heartbeater per node, every 300 ms, through the outage; errors ignored
        // (status 0 for a transport error).
        let stop = Arc::new(AtomicBool::new(false));
        let statuses: Arc<Mutex<Vec<(Instant, String, u16)>>> = Arc::default();
        let mut beaters = Vec::new();
        for (node, lease) in &leases {
            let (stop, statuses) = (stop.clone(), statuses.clone());
            let url = server.url("/presence/heartbeat");
            let body = json!({ "node_id": node, "lease_id": lease }).to_string();
            let node = node.clone();
            beaters.push(tokio::spawn(async move {
                let client = reqwest::Client::builder()
                    .no_proxy()
                    .timeout(Duration::from_secs(2))
                    .build()
                    .expect("client");
                while !stop.load(Ordering::Relaxed) {
                    let sent = Instant::now();
                    let status = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await
                        .map(|r| r.status().as_u16())
                        .unwrap_or(0);
                    statuses.lock().unwrap().push((sent, node.clone(), status));
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;

        redis.pause();
        let paused_at = Instant::now();
        tokio::time::sleep(Duration::from_secs(3)).await;
        redis.resume();
        let resumed_at = Instant::now();
        tokio::time::sleep(Duration::from_secs(3)).await;

        // The watcher is live again: a login after the outage reaches it.
        login(&client, &server, "after-outage", json!({})).await;
        wait_for(
            "the join of a node logged in after the outage",
            &|e| matches!(e, WatchEvent::Join(n) if n.node_id == "after-outage"),
        )
        .await;
        stop.store(true, Ordering::Relaxed);
        for beater in beaters {
            beater.await.expect("heartbeater");
        }
        watcher.abort();
        assert!(
            fatal.lock().unwrap().is_empty(),
            "{:?}",
            fatal.lock().unwrap()
        );

        // Gather everything first: the failure message says what the server did.
        let items = items.lock().unwrap().clone();
        let statuses = statuses.lock().unwrap().clone();
        let failed_during = statuses
            .iter()
            .filter(|(sent, _, status)| *sent > paused_at && *sent < resumed_at && *status != 200)
            .count();
        let last_status: BTreeMap<&str, u16> = nodes
            .iter()
            .map(|node| {
                let last = statuses.iter().rev().find(|(_, n, _)| n == node);
                (node.as_str(), last.map_or(0, |(_, _, s)| *s))
            })
            .collect();
        let listed = get_with(&client, &server.url("/presence")).await.ok_json();
        let listed: BTreeSet<String> = listed
            .as_array()
            .expect("a node list")
            .iter()
            .filter_map(|n| n["node_id"].as_str().map(str::to_owned))
            .collect();
        let ms_after_resume = |at: Instant| {
            if at >= resumed_at {
                format!("+{} ms", (at - resumed_at).as_millis())
            } else {
                format!("-{} ms", (resumed_at - at).as_millis())
            }
        };
        let leaves: Vec<String> = items
            .iter()
            .filter_map(|(at, i)| match &i.event {
                WatchEvent::Leave { node_id, reason } => Some(format!(
                    "{node_id} {reason:?} at {} from SIGCONT",
                    ms_after_resume(*at)
                )),
                _ => None,
            })
            .collect();
        let rejoined: Vec<String> = items
            .iter()
            .filter_map(|(at, i)| match &i.event {
                WatchEvent::Join(n) if nodes.contains(&n.node_id) => Some(format!(
                    "{} at {} from SIGCONT",
                    n.node_id,
                    ms_after_resume(*at)
                )),
                _ => None,
            })
            .collect();
        let snapshots: Vec<usize> = items
            .iter()
            .filter_map(|(_, i)| match &i.event {
                WatchEvent::Snapshot(n) => {
                    Some(n.iter().filter(|n| nodes.contains(&n.node_id)).count())
                }
                _ => None,
            })
            .collect();
        let expired = items
            .iter()
            .filter(|(_, i)| {
                matches!(&i.event, WatchEvent::Leave { node_id, reason: LeaveReason::Expired }
                    if nodes.contains(node_id))
            })
            .count();
        let report = format!(
            "outage {:?} (TTL 2 s); leaves seen: {leaves:?}; joins of those nodes after: \
             {rejoined:?}; snapshots (nodes of the 10 in each): {snapshots:?}; last heartbeat \
             status per node: {last_status:?}; listed at the end: {listed:?}",
            resumed_at - paused_at
        );
        assert!(
            failed_during > 0,
            "the outage was visible to the heartbeats"
        );
        assert_eq!(expired, 0, "nodes expired by the outage: {report}");
        assert!(leaves.is_empty(), "no node left: {report}");
        assert!(
            snapshots.iter().all(|&n| n == nodes.len()),
            "snapshots lost nodes: {report}"
        );
        assert!(
            last_status.values().all(|&s| s == 200),
            "every node heartbeats fine after the outage: {report}"
        );
        assert!(
            nodes.iter().all(|n| listed.contains(n)),
            "every node listed after the outage: {report}"
        );
        println!(
            "{report}; {failed_during} heartbeats failed during the outage, {} watch items",
            items.len()
        );
        server.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 5. A watcher that stops reading
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_watcher_is_disconnected_and_others_are_unaffected() {
    within(90, async {
        let cfg = support::config(&[
            ("PRESENCE_WATCH_BACKLOG", "16"),
            ("PRESENCE_RATE_LIMIT_RATE", "1000000"),
            ("PRESENCE_RATE_LIMIT_CAPACITY", "1000000"),
        ]);
        assert_eq!(cfg.watch_backlog, 16);
        let server = TestServer::memory(&cfg).await;
        let client = http();
        let rss_before = rss_bytes();

        // The slow one: asks for the stream and never reads.
        let mut slow = TcpStream::connect(server.addr).await.expect("connect");
        slow.write_all(b"GET /presence/watch HTTP/1.1\r\nHost: presence.test\r\n\r\n")
            .await
            .expect("request");

        // The normal one, reading in a task: the seq of every update, in order.
        let mut normal = Sse::open(&sse_client(), &server.url("/presence/watch"), None).await;
        assert_eq!(normal.event(5).await.summary(), "snapshot []");
        let seen: Arc<Mutex<Vec<i64>>> = Arc::default();
        let reader = {
            let seen = seen.clone();
            tokio::spawn(async move {
                loop {
                    match normal.next().await {
                        Next::Event(e) => {
                            let data = e.json();
                            assert!(
                                matches!(e.event.as_str(), "join" | "update"),
                                "normal watcher got {}",
                                e.summary()
                            );
                            seen.lock()
                                .unwrap()
                                .push(data["meta"]["seq"].as_i64().unwrap());
                        }
                        other => panic!("the normal watcher's stream stopped: {other:?}"),
                    }
                }
            })
        };
        // Both watchers are in.
        let deadline = Instant::now() + Duration::from_secs(5);
        while metric_value(&scrape(&client, &server).await, "presence_watchers") != Some(2.0) {
            assert!(Instant::now() < deadline, "two watchers open");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        let pad = "x".repeat(3000);
        let meta = |seq: usize| json!({ "seq": seq, "pad": pad });
        let lease = login(&client, &server, "chatty", meta(0)).await;
        let mut peak_rss = rss_before;
        let mut sent = 0;
        let mut dropped_at = None;
        const MAX_UPDATES: usize = 8000;
        const AFTER_DROP: usize = 300;
        for seq in 1..=MAX_UPDATES {
            heartbeat(&client, &server, "chatty", &lease, meta(seq)).await;
            sent = seq;
            if seq % 100 == 0 {
                peak_rss = peak_rss.max(rss_bytes());
                if dropped_at.is_none() {
                    let metrics = scrape(&client, &server).await;
                    if metric_value(&metrics, "presence_watchers_dropped_slow_total") == Some(1.0) {
                        dropped_at = Some(seq);
                    }
                }
            }
            if dropped_at.is_some_and(|d| seq >= d + AFTER_DROP) {
                break;
            }
        }
        let dropped_at = dropped_at.unwrap_or_else(|| {
            panic!("the slow watcher was not dropped after {MAX_UPDATES} updates of ~3 KB")
        });

        // The slow socket: whatever is buffered, then the server's close.
        let drain_started = Instant::now();
        let drained = within(20, read_to_close(&mut slow)).await;
        let drain_took = drain_started.elapsed();
        let head = String::from_utf8_lossy(&drained[..drained.len().min(200)]).into_owned();
        assert!(
            head.starts_with("HTTP/1.1 200"),
            "the slow watcher got {head:?}"
        );

        // The normal one got every event, in order.
        let deadline = Instant::now() + Duration::from_secs(20);
        while seen.lock().unwrap().len() < sent + 1 {
            assert!(
                Instant::now() < deadline,
                "normal watcher: {} of {} events",
                seen.lock().unwrap().len(),
                sent + 1
            );
            assert!(!reader.is_finished(), "the normal watcher's reader stopped");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Still open (the reader holds it): the normal watcher, and only it.
        let metrics = scrape(&client, &server).await;
        assert_eq!(
            metric_value(&metrics, "presence_watchers"),
            Some(1.0),
            "only the normal watcher is left: {metrics}"
        );
        reader.abort();
        let seen = seen.lock().unwrap().clone();
        let expected: Vec<i64> = (0..=sent as i64).collect();
        assert!(
            seen == expected,
            "normal watcher: {} events, not 0..={sent} in order",
            seen.len()
        );

        let metrics = scrape(&client, &server).await;
        assert_eq!(
            metric_value(&metrics, "presence_watchers_dropped_slow_total"),
            Some(1.0),
            "exactly one watcher dropped"
        );
        let rss_after = rss_bytes();
        peak_rss = peak_rss.max(rss_after);
        if let (Some(before), Some(peak)) = (rss_before, peak_rss) {
            let grew = peak.saturating_sub(before);
            assert!(
                grew < 64 * 1024 * 1024,
                "RSS grew by {} MB (from {} MB)",
                grew >> 20,
                before >> 20
            );
            println!(
                "slow watcher dropped after ~{dropped_at} updates of ~3 KB \
                 ({:.1} MB produced in all, {sent} updates); {} KB drained from its socket \
                 before the close ({drain_took:?}); normal watcher got all {} events; RSS \
                 peak +{} MB",
                (sent * 3060) as f64 / 1e6,
                drained.len() / 1024,
                seen.len(),
                grew >> 20
            );
        }
        server.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 6. The watcher limit
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_watchers_plus_one_is_503_too_many_watchers_with_retry_after() {
    within(30, async {
        let cfg = support::config(&[
            ("PRESENCE_MAX_WATCHERS", "2"),
            ("PRESENCE_WATCH_KEEPALIVE_SEC", "1"),
        ]);
        let server = TestServer::memory(&cfg).await;
        let url = server.url("/presence/watch");
        let sse = sse_client();
        let mut first = Sse::open(&sse, &url, None).await;
        let mut second = Sse::open(&sse_client(), &url, None).await;
        first.event(5).await;
        second.event(5).await;

        let third = Reply::send(http().get(&url)).await;
        third.assert_error(503, "too_many_watchers");
        let retry_after = third.retry_after_secs();

        // The two open ones are untouched.
        login(&http(), &server, "still-there", json!({})).await;
        assert_eq!(first.event(5).await.summary(), "join still-there {}");
        assert_eq!(second.event(5).await.summary(), "join still-there {}");

        // One closes: a new one gets in (once the server has noticed the close).
        drop(first);
        let closed_at = Instant::now();
        let mut refused = 0;
        let mut fourth = loop {
            let response = http().get(&url).send().await.expect("GET /presence/watch");
            if response.status() == 200 {
                break response;
            }
            assert_eq!(response.status(), 503, "{response:?}");
            refused += 1;
            assert!(
                closed_at.elapsed() < Duration::from_secs(10),
                "no watcher accepted within 10 s of one closing"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let accepted_after = closed_at.elapsed();
        let chunk = within(5, fourth.chunk())
            .await
            .expect("a chunk")
            .expect("data");
        assert!(
            String::from_utf8_lossy(&chunk).contains("event: snapshot"),
            "{chunk:?}"
        );
        println!(
            "third watcher: 503 too_many_watchers, Retry-After {retry_after} s; after one \
             closed, a new one was accepted {accepted_after:?} later ({refused} refused before)"
        );
        drop((second, fourth));
        server.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 7. SIGTERM on the binary
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_every_watch_stream_cleanly_and_the_process_exits_within_the_grace() {
    let Some(binary) = example_binary_or_skip("presence_server") else {
        return;
    };
    const GRACE: Duration = Duration::from_millis(3000);
    within(30, async {
        let mut cmd = clean_command(&binary);
        cmd.env("PRESENCE_HTTP_HOST", "127.0.0.1")
            .env("PRESENCE_HTTP_PORT", "0")
            .env("PRESENCE_SHUTDOWN_GRACE_MS", GRACE.as_millis().to_string());
        let mut child = ChildGuard::spawn(cmd).expect("spawn presence_server");
        let (addr, log) = child.find_line(Duration::from_secs(10), parse_listen_addr);
        let addr: SocketAddr =
            addr.unwrap_or_else(|| panic!("the server logs its address within 10 s: {log:#?}"));
        let url = format!("http://{addr}/presence/watch");

        let mut streams = Vec::new();
        for _ in 0..3 {
            let mut s = Sse::open(&sse_client(), &url, None).await;
            assert_eq!(s.event(5).await.event, "snapshot");
            streams.push(s);
        }

        child.signal("TERM");
        let signalled = Instant::now();
        let ends = futures_util::future::join_all(streams.iter_mut().map(|s| async {
            let end = tokio::time::timeout(GRACE + Duration::from_secs(1), s.next()).await;
            (end, signalled.elapsed())
        }))
        .await;
        for (i, (end, at)) in ends.iter().enumerate() {
            match end {
                Ok(Next::End) => {}
                other => panic!("stream {i}: expected a clean end, got {other:?} after {at:?}"),
            }
        }
        let bound = GRACE + Duration::from_secs(1);
        let status = child
            .wait_exit(bound.saturating_sub(signalled.elapsed()))
            .await
            .unwrap_or_else(|| panic!("still running {bound:?} after SIGTERM"));
        let exited_after = signalled.elapsed();
        assert!(status.success(), "exit status {status}");
        println!(
            "SIGTERM: streams ended cleanly after {:?}; exit {status} after {exited_after:?} \
             (grace {GRACE:?})",
            ends.iter().map(|(_, at)| *at).collect::<Vec<_>>()
        );
    })
    .await;
}
