//! End-to-end tests of the presence service over real sockets on 127.0.0.1.
//!
//! - The client SDK against an in-process [`Server`](presence::server::Server) bound to
//!   port 0: the login / list / heartbeat / get / logout round trip, re-login after
//!   expiry, `keep_alive`.
//! - Raw HTTP (reqwest, and hand-written requests where reqwest cannot produce the
//!   case): every row of the error table in docs/http-api.md with its status, JSON
//!   error shape and headers, plus the `200`s of `/healthz`, `/readyz` and `/metrics`.
//! - Two servers sharing one Redis prefix, and a real Redis going away and coming back
//!   (these skip when Redis is unavailable, unless `PRESENCE_REQUIRE_REDIS=1`).
//! - The `presence_server` example binary: bad configuration exits 2 with one line,
//!   port 0 is logged, SIGTERM exits 0 (skipped when the binary has not been built).
//!
//! Every test is bounded by a timeout and ends everything it started.

mod support;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use presence::client::{ClientError, Heartbeat, PresenceClient};
use presence::model::{Meta, Node, NodeId};
use presence::server::MAX_BODY_BYTES;
use presence::store::redis::test_support::{redis_for_tests, sharded_redis_for_tests};
use presence::store::redis::{RedisOptions, RedisStore};
use presence::store::{FaultyStore, Store};
use serde_json::{json, Value};

use support::client::{get, http, login, post_json, Reply};
use support::process::{clean_command, example_binary_or_skip, parse_listen_addr, ChildGuard};
use support::raw_http::raw_request;
use support::redis::{test_redis_uri, RedisChild};
use support::server::TestServer;
use support::{config, metric_value, within};

fn meta(value: Value) -> Meta {
    match value {
        Value::Object(map) => map,
        other => panic!("meta must be an object, got {other}"),
    }
}

fn node_ids(nodes: &[Node]) -> Vec<&str> {
    nodes.iter().map(|n| n.node_id.as_str()).collect()
}

fn listed_ids(reply: &Reply) -> Vec<String> {
    let body = reply.ok_json();
    body.as_array()
        .unwrap_or_else(|| panic!("GET /presence is not an array: {body}"))
        .iter()
        .map(|n| n["node_id"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Polls `probe` every 20 ms until it returns `true`; panics after `secs`.
async fn eventually<F, Fut>(secs: u64, what: &str, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if probe().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {secs} s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Client SDK over the socket
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn client_sdk_login_list_heartbeat_get_logout_round_trip() {
    within(30, async {
        let server = TestServer::memory(&config(&[])).await;
        let pc = PresenceClient::new(&server.base()).expect("client");

        let b = pc
            .login_with_meta("node-b", meta(json!({"hp": 100, "load": 0.5})))
            .await
            .expect("login node-b");
        let a = pc.login("node-a").await.expect("login node-a");
        assert_eq!(b.node_id, "node-b");
        assert_eq!(b.ttl_ms, 9_000, "the default TTL is 3 x the heartbeat");
        assert_eq!(b.heartbeat_ms, 3_000);
        assert_ne!(a.lease_id, b.lease_id);
        assert_eq!(
            pc.lease("node-b").map(|l| l.lease_id),
            Some(b.lease_id.clone())
        );

        let nodes = pc.list_nodes().await.expect("list");
        assert_eq!(node_ids(&nodes), ["node-a", "node-b"], "sorted by node_id");
        assert_eq!(nodes[1].meta, meta(json!({"hp": 100, "load": 0.5})));
        assert!(nodes[0].meta.is_empty());
        assert_eq!(nodes[1].expires_at_ms, b.expires_at_ms);
        assert_eq!(nodes[1].online_since_ms, nodes[1].last_seen_ms);

        // A heartbeat without meta extends the same lease and keeps the meta.
        let beat = pc.heartbeat("node-b").await.expect("heartbeat");
        let Heartbeat::Extended(ext) = &beat else {
            panic!("expected Extended, got {beat:?}");
        };
        assert_eq!(ext.lease_id, b.lease_id);
        assert!(ext.expires_at_ms >= b.expires_at_ms);
        let got = pc.get_node("node-b").await.expect("get").expect("online");
        assert_eq!(got.meta, meta(json!({"hp": 100, "load": 0.5})));
        assert_eq!(got.expires_at_ms, ext.expires_at_ms);
        assert!(got.last_seen_ms >= got.online_since_ms);

        // With meta it replaces it (no merge).
        pc.heartbeat_with_meta("node-b", meta(json!({"hp": 42})))
            .await
            .expect("heartbeat with meta");
        let got = pc.get_node("node-b").await.expect("get").expect("online");
        assert_eq!(got.meta, meta(json!({"hp": 42})));

        // The same data over plain HTTP: GET /presence/{id} is the Node shape.
        let raw = get(&server.url("/presence/node-b")).await.ok_json();
        for field in [
            "node_id",
            "meta",
            "online_since_ms",
            "last_seen_ms",
            "expires_at_ms",
        ] {
            assert!(raw.get(field).is_some(), "Node lacks {field}: {raw}");
        }

        assert!(pc.logout("node-b").await.expect("logout"), "was online");
        assert_eq!(pc.get_node("node-b").await.expect("get"), None);
        assert_eq!(pc.lease("node-b"), None, "the lease is forgotten");
        assert!(!pc.logout("node-b").await.expect("second logout"));
        let nodes = pc.list_nodes().await.expect("list");
        assert_eq!(node_ids(&nodes), ["node-a"]);

        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn client_heartbeat_logs_in_again_after_the_node_expired() {
    within(30, async {
        let mut cfg = config(&[]);
        cfg.ttl = Duration::from_millis(300);
        let server = TestServer::memory(&cfg).await;
        let pc = PresenceClient::new(&server.base()).expect("client");

        let first = pc
            .login_with_meta("expiring-1", meta(json!({"v": 1})))
            .await
            .expect("login");
        assert_eq!(first.ttl_ms, 300);
        eventually(5, "node expires after its TTL", || async {
            !listed_ids(&get(&server.base()).await).contains(&"expiring-1".to_owned())
        })
        .await;
        get(&server.url("/presence/expiring-1"))
            .await
            .assert_error(404, "not_found");

        // The raw heartbeat of an expired node is a 404 ...
        post_json(
            &server.url("/presence/heartbeat"),
            json!({"node_id": "expiring-1", "lease_id": first.lease_id}).to_string(),
        )
        .await
        .assert_error(404, "not_found");

        // ... which the SDK answers by logging in again, with the last meta.
        let beat = pc.heartbeat("expiring-1").await.expect("heartbeat");
        let Heartbeat::Relogged(lease) = &beat else {
            panic!("expected Relogged, got {beat:?}");
        };
        assert_ne!(
            lease.lease_id, first.lease_id,
            "a re-login issues a new lease"
        );
        let node = pc
            .get_node("expiring-1")
            .await
            .expect("get")
            .expect("online again");
        assert_eq!(node.meta, meta(json!({"v": 1})));

        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn keep_alive_keeps_the_node_listed_past_its_ttl_and_stop_logs_out() {
    within(30, async {
        let mut cfg = config(&[]);
        cfg.heartbeat = Duration::from_millis(100);
        cfg.ttl = Duration::from_millis(500);
        let server = TestServer::memory(&cfg).await;
        let pc = PresenceClient::new(&server.base()).expect("client");
        let observer = PresenceClient::new(&server.base()).expect("client");

        let keep = pc
            .keep_alive("kept-1", meta(json!({"load": 1})))
            .await
            .expect("keep_alive");
        assert_eq!(keep.node_id(), "kept-1");
        let first = keep.lease().expect("lease");
        assert_eq!(first.heartbeat_ms, 100);

        // Three TTLs later the node is still online, under the same lease, and its
        // expiry has moved: only heartbeats can have done that.
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let node = observer
            .get_node("kept-1")
            .await
            .expect("get")
            .expect("still online after 3 x TTL");
        assert!(
            node.expires_at_ms > first.expires_at_ms + 1_000,
            "{node:?} vs {first:?}"
        );
        assert!(node.last_seen_ms > node.online_since_ms);
        assert_eq!(
            keep.lease().map(|l| l.lease_id),
            Some(first.lease_id.clone())
        );
        assert!(!keep.is_finished());

        // New meta goes out with a following heartbeat.
        keep.set_meta(meta(json!({"load": 2})));
        eventually(5, "meta from set_meta reaches the server", || async {
            observer
                .get_node("kept-1")
                .await
                .ok()
                .flatten()
                .is_some_and(|n| n.meta == meta(json!({"load": 2})))
        })
        .await;

        assert!(
            keep.stop().await.expect("stop"),
            "stop logs out an online node"
        );
        assert_eq!(observer.get_node("kept-1").await.expect("get"), None);
        assert!(observer.list_nodes().await.expect("list").is_empty());

        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn keep_alive_stops_when_another_login_fences_its_lease() {
    within(30, async {
        let mut cfg = config(&[]);
        cfg.heartbeat = Duration::from_millis(100);
        cfg.ttl = Duration::from_millis(2_000);
        let server = TestServer::memory(&cfg).await;
        let pc = PresenceClient::new(&server.base()).expect("client");
        let keep = pc
            .keep_alive("fenced-1", Meta::new())
            .await
            .expect("keep_alive");

        // Another process takes the node id over.
        let other = PresenceClient::new(&server.base()).expect("client");
        let theirs = other.login("fenced-1").await.expect("login elsewhere");

        eventually(5, "keep-alive stops on 409", || async {
            keep.is_finished()
        })
        .await;
        let err = keep.stop().await.expect_err("stopped by a lease mismatch");
        assert!(matches!(err, ClientError::LeaseMismatch), "{err:?}");
        // It did not take the node back, and did not log the new owner out.
        let node = other
            .get_node("fenced-1")
            .await
            .expect("get")
            .expect("online");
        assert_eq!(
            other.lease("fenced-1").map(|l| l.lease_id),
            Some(theirs.lease_id)
        );
        assert!(node.expires_at_ms >= theirs.expires_at_ms);

        server.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Raw HTTP: the 200s
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn healthz_readyz_and_metrics_answer_200() {
    within(30, async {
        let server = TestServer::memory(&config(&[])).await;

        assert_eq!(
            get(&server.url("/healthz")).await.ok_json(),
            json!({"status": "ok"})
        );
        assert_eq!(
            get(&server.url("/readyz")).await.ok_json(),
            json!({"status": "ready"})
        );

        // Some traffic for the counters, including a 404 on a node path.
        login(&server, "metrics-node").await;
        listed_ids(&get(&server.base()).await);
        get(&server.url("/presence/ghost-node"))
            .await
            .assert_error(404, "not_found");
        get(&server.url("/wp-admin"))
            .await
            .assert_error(404, "not_found");

        let scrape = get(&server.url("/metrics")).await;
        assert_eq!(scrape.status, 200);
        let ct = scrape.header("content-type").unwrap_or_default();
        assert!(
            ct.starts_with("text/plain") || ct.starts_with("application/openmetrics-text"),
            "not a Prometheus text content type: {ct:?}"
        );
        let text = scrape.text();
        for name in [
            "presence_http_requests_total",
            "presence_http_request_duration_seconds",
            "presence_rate_limited_total",
            "presence_store_errors_total",
            "presence_online_nodes",
            "presence_store_circuit_state",
        ] {
            assert!(text.contains(name), "metric {name} missing from:\n{text}");
        }
        assert!(
            text.contains(r#"route="/presence/login",method="POST",status="200""#),
            "{text}"
        );
        assert!(
            text.contains(r#"route="/presence/{node_id}",method="GET",status="404""#),
            "{text}"
        );
        assert!(text.contains(r#"route="unmatched""#), "{text}");
        assert!(
            !text.contains("ghost-node") && !text.contains("wp-admin"),
            "raw paths leak into labels"
        );
        assert_eq!(
            metric_value(&text, "presence_online_nodes"),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            metric_value(&text, "presence_store_circuit_state"),
            Some(0.0),
            "{text}"
        );
        assert!(
            text.trim_end().ends_with("# EOF"),
            "OpenMetrics text ends with # EOF"
        );

        server.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Raw HTTP: the error table, row by row
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn bad_request_400_for_malformed_json_wrong_types_and_missing_fields() {
    within(30, async {
        let server = TestServer::memory(&config(&[])).await;
        let login_url = server.url("/presence/login");
        let heartbeat_url = server.url("/presence/heartbeat");
        let logout_url = server.url("/presence/logout");

        for (url, body, why) in [
            (&login_url, r#"{"node_id": "n1""#, "truncated JSON"),
            (&login_url, "node_id=n1", "not JSON at all"),
            (&login_url, "", "empty body"),
            (&login_url, r#"{"node_id": 5}"#, "node_id is a number"),
            (&login_url, r#"{"node_id": null}"#, "node_id is null"),
            (&login_url, r#"{}"#, "node_id missing"),
            (&login_url, r#"["n1"]"#, "an array, not an object"),
            (&heartbeat_url, r#"{"node_id": "n1"}"#, "lease_id missing"),
            (
                &heartbeat_url,
                r#"{"node_id": "n1", "lease_id": 7}"#,
                "lease_id is a number",
            ),
            (&logout_url, r#"{"lease_id": "x"}"#, "node_id missing"),
        ] {
            let reply = post_json(url, body).await;
            assert_eq!(reply.status, 400, "{why}: {body:?} -> {reply:?}");
            reply.assert_error(400, "bad_request");
        }
        // Nothing was logged in by any of them.
        assert!(listed_ids(&get(&server.base()).await).is_empty());

        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn unauthorized_401_with_a_token_configured_and_probes_need_none() {
    within(30, async {
        let server = TestServer::memory(&config(&[("PRESENCE_AUTH_TOKEN", "s3cret-token")])).await;
        let http = http();

        let no_token = Reply::send(http.get(server.base())).await;
        no_token.assert_error(401, "unauthorized");
        assert_eq!(no_token.header("www-authenticate"), Some("Bearer"));

        for auth in [
            "Bearer wrong-token",
            "Bearer s3cret-toke",
            "Basic czNjcmV0LXRva2Vu",
            "s3cret-token",
        ] {
            Reply::send(http.get(server.base()).header("authorization", auth))
                .await
                .assert_error(401, "unauthorized");
        }
        Reply::send(
            http.post(server.url("/presence/login"))
                .header("content-type", "application/json")
                .body(r#"{"node_id":"n1"}"#),
        )
        .await
        .assert_error(401, "unauthorized");

        // The right token works for every /presence route.
        let ok = Reply::send(
            http.post(server.url("/presence/login"))
                .header("authorization", "Bearer s3cret-token")
                .header("content-type", "application/json")
                .body(r#"{"node_id":"n1"}"#),
        )
        .await;
        assert_eq!(ok.ok_json()["node_id"], "n1");
        let listed = Reply::send(http.get(server.base()).bearer_auth("s3cret-token")).await;
        assert_eq!(listed_ids(&listed), ["n1"]);

        // Probes and metrics need no token.
        for path in ["/healthz", "/readyz", "/metrics"] {
            assert_eq!(get(&server.url(path)).await.status, 200, "{path}");
        }

        // The SDK: without a token it is Unauthorized; with one it works.
        let anonymous = PresenceClient::new(&server.base()).expect("client");
        let err = anonymous.list_nodes().await.expect_err("401");
        assert!(matches!(err, ClientError::Unauthorized), "{err:?}");
        let authed = PresenceClient::builder(server.base())
            .bearer_token("s3cret-token")
            .build()
            .expect("client");
        assert_eq!(node_ids(&authed.list_nodes().await.expect("list")), ["n1"]);

        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn not_found_404_for_unknown_routes_and_nodes_that_are_not_online() {
    within(30, async {
        let server = TestServer::memory(&config(&[])).await;

        for path in ["/ui/", "/nope", "/presence/a/b", "/presencex", "/healthz/x"] {
            let message = get(&server.url(path)).await.assert_error(404, "not_found");
            assert!(message.contains(path), "{path}: {message}");
        }
        get(&server.url("/presence/never-seen"))
            .await
            .assert_error(404, "not_found");
        post_json(
            &server.url("/presence/heartbeat"),
            r#"{"node_id":"never-seen","lease_id":"0123456789abcdef0123456789abcdef"}"#,
        )
        .await
        .assert_error(404, "not_found");

        // Logged out: not online any more.
        let lease = login(&server, "gone-1").await;
        let out = post_json(
            &server.url("/presence/logout"),
            json!({"node_id": "gone-1", "lease_id": lease["lease_id"]}).to_string(),
        )
        .await
        .ok_json();
        assert_eq!(out, json!({"node_id": "gone-1", "removed": true}));
        get(&server.url("/presence/gone-1"))
            .await
            .assert_error(404, "not_found");
        post_json(
            &server.url("/presence/heartbeat"),
            json!({"node_id": "gone-1", "lease_id": lease["lease_id"]}).to_string(),
        )
        .await
        .assert_error(404, "not_found");

        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn method_not_allowed_405_with_allow_header() {
    within(30, async {
        let server = TestServer::memory(&config(&[])).await;
        let http = http();
        use reqwest::Method;

        for (method, path, allow) in [
            (Method::DELETE, "/presence/login", "GET, HEAD, POST"),
            (Method::PUT, "/presence/heartbeat", "GET, HEAD, POST"),
            (Method::PATCH, "/presence/logout", "GET, HEAD, POST"),
            (Method::POST, "/presence", "GET, HEAD"),
            (Method::DELETE, "/presence/node-1", "GET, HEAD"),
            (Method::POST, "/presence/node-1", "GET, HEAD"),
            (Method::POST, "/healthz", "GET, HEAD"),
            (Method::PUT, "/readyz", "GET, HEAD"),
            (Method::DELETE, "/metrics", "GET, HEAD"),
        ] {
            let reply = Reply::send(http.request(method.clone(), server.url(path))).await;
            reply.assert_error(405, "method_not_allowed");
            assert_eq!(reply.header("allow"), Some(allow), "{method} {path}");
        }

        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn lease_mismatch_409_for_a_lease_that_is_not_current() {
    within(30, async {
        let server = TestServer::memory(&config(&[])).await;
        let heartbeat = server.url("/presence/heartbeat");
        let logout = server.url("/presence/logout");

        let old = login(&server, "fenced-2").await;
        let new = login(&server, "fenced-2").await; // a restart: the old lease is dead
        let (old_id, new_id) = (old["lease_id"].clone(), new["lease_id"].clone());
        assert_ne!(old_id, new_id);

        let hb = |lease: &Value| json!({"node_id": "fenced-2", "lease_id": lease}).to_string();
        post_json(&heartbeat, hb(&old_id))
            .await
            .assert_error(409, "lease_mismatch");
        post_json(&heartbeat, hb(&json!("not-a-lease")))
            .await
            .assert_error(409, "lease_mismatch");
        post_json(&logout, hb(&old_id))
            .await
            .assert_error(409, "lease_mismatch");

        // The current lease still works, and the failed calls removed nothing.
        let beat = post_json(&heartbeat, hb(&new_id)).await.ok_json();
        assert_eq!(beat["lease_id"], new_id);
        assert_eq!(beat["node_id"], "fenced-2");
        assert!(beat["expires_at_ms"].as_u64() >= new["expires_at_ms"].as_u64());
        let out = post_json(&logout, hb(&new_id)).await.ok_json();
        assert_eq!(out, json!({"node_id": "fenced-2", "removed": true}));
        // Logging out a node that is not online is not an error, whatever the lease.
        let again = post_json(&logout, hb(&old_id)).await.ok_json();
        assert_eq!(again, json!({"node_id": "fenced-2", "removed": false}));

        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn payload_too_large_413_over_16_kib_with_or_without_content_length() {
    within(30, async {
        let server = TestServer::memory(&config(&[])).await;
        assert_eq!(MAX_BODY_BYTES, 16 * 1024);

        // Exactly 16 KiB is read (and then judged on its meta: 422, not 413).
        let at_limit = padded_login_body(MAX_BODY_BYTES);
        assert_eq!(at_limit.len(), MAX_BODY_BYTES);
        post_json(&server.url("/presence/login"), at_limit)
            .await
            .assert_error(422, "invalid_meta");

        // One byte more, announced by Content-Length.
        let over = padded_login_body(MAX_BODY_BYTES + 1);
        post_json(&server.url("/presence/login"), over.clone())
            .await
            .assert_error(413, "payload_too_large");

        // Chunked: no length up front, the limit trips while reading.
        let mut request = b"POST /presence/login HTTP/1.1\r\nHost: e2e\r\n\
            Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\
            Connection: close\r\n\r\n"
            .to_vec();
        for chunk in over.as_bytes().chunks(1024) {
            request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            request.extend_from_slice(chunk);
            request.extend_from_slice(b"\r\n");
        }
        request.extend_from_slice(b"0\r\n\r\n");
        raw_request(server.addr, &request)
            .await
            .assert_error(413, "payload_too_large");

        assert!(listed_ids(&get(&server.base()).await).is_empty());
        server.stop().await;
    })
    .await;
}

/// A login body of exactly `len` bytes, padded inside `meta`.
fn padded_login_body(len: usize) -> String {
    let empty = json!({"node_id": "big-1", "meta": {"pad": ""}}).to_string();
    let pad = "x".repeat(len - empty.len());
    json!({"node_id": "big-1", "meta": {"pad": pad}}).to_string()
}

#[tokio::test]
async fn unsupported_media_type_415_without_a_json_content_type() {
    within(30, async {
        let server = TestServer::memory(&config(&[])).await;
        let http = http();
        let body = r#"{"node_id":"typed-1"}"#;

        for ct in [
            Some("text/plain"),
            Some("application/x-www-form-urlencoded"),
            Some("application/jsonx"),
            None,
        ] {
            let mut req = http.post(server.url("/presence/login")).body(body);
            if let Some(ct) = ct {
                req = req.header("content-type", ct);
            }
            Reply::send(req)
                .await
                .assert_error(415, "unsupported_media_type");
        }
        for path in ["/presence/heartbeat", "/presence/logout"] {
            Reply::send(
                http.post(server.url(path))
                    .header("content-type", "text/plain")
                    .body(body),
            )
            .await
            .assert_error(415, "unsupported_media_type");
        }
        // JSON with parameters, in any case, is JSON.
        let ok = Reply::send(
            http.post(server.url("/presence/login"))
                .header("content-type", "Application/JSON; charset=utf-8")
                .body(body),
        )
        .await;
        assert_eq!(ok.ok_json()["node_id"], "typed-1");

        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn unprocessable_422_invalid_node_id_and_invalid_meta() {
    within(30, async {
        let server = TestServer::memory(&config(&[("PRESENCE_MAX_META_BYTES", "64")])).await;
        let login_url = server.url("/presence/login");

        let too_long = "n".repeat(257);
        for bad in [
            "",
            "has space",
            "semi;colon",
            "slash/y",
            "ümlaut",
            "{tag}",
            "*",
            too_long.as_str(),
        ] {
            post_json(&login_url, json!({"node_id": bad}).to_string())
                .await
                .assert_error(422, "invalid_node_id");
        }
        // Also on the other routes, and in the path.
        post_json(
            &server.url("/presence/heartbeat"),
            json!({"node_id": "a b", "lease_id": "x"}).to_string(),
        )
        .await
        .assert_error(422, "invalid_node_id");
        get(&server.url("/presence/bad%20id"))
            .await
            .assert_error(422, "invalid_node_id");
        // The full alphabet and the maximum length are accepted.
        let longest = "n".repeat(256);
        for good in ["A-Za-z0-9._~:@+=-", longest.as_str()] {
            assert_eq!(login(&server, good).await["node_id"], good);
        }

        for bad_meta in [json!([1, 2]), json!("text"), json!(5), json!(true)] {
            let message = post_json(
                &login_url,
                json!({"node_id": "m1", "meta": bad_meta}).to_string(),
            )
            .await
            .assert_error(422, "invalid_meta");
            assert!(message.contains("object"), "{message}");
        }
        let big = json!({"node_id": "m1", "meta": {"blob": "y".repeat(64)}}).to_string();
        post_json(&login_url, big)
            .await
            .assert_error(422, "invalid_meta");
        // At the limit (64 bytes serialized) it is fine; heartbeat meta is checked too.
        let exact = json!({"k": "z".repeat(56)});
        assert_eq!(exact.to_string().len(), 64);
        let lease = post_json(
            &login_url,
            json!({"node_id": "m1", "meta": exact}).to_string(),
        )
        .await
        .ok_json();
        post_json(
            &server.url("/presence/heartbeat"),
            json!({"node_id": "m1", "lease_id": lease["lease_id"], "meta": ["x"]}).to_string(),
        )
        .await
        .assert_error(422, "invalid_meta");
        let node = get(&server.url("/presence/m1")).await.ok_json();
        assert_eq!(
            node["meta"], exact,
            "a rejected heartbeat leaves the meta alone"
        );

        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn filtered_pages_follow_link_and_stats_count_statuses_over_a_socket() {
    within(30, async {
        let cfg = support::unlimited_config(Duration::from_secs(1));
        let server = TestServer::start(&cfg, Arc::new(presence::store::MemoryStore::new())).await;
        let login_url = server.url("/presence/login");
        for i in 0..25 {
            let status = ["up", "degraded", "draining"][i % 3];
            let body =
                json!({"node_id": format!("s-{i:02}"), "status": status, "meta": {"zone": "a b"}});
            post_json(&login_url, body.to_string()).await.ok_json();
        }
        post_json(
            &login_url,
            json!({"node_id": "t-1", "status": "sleeping"}).to_string(),
        )
        .await
        .assert_error(422, "invalid_status");

        // Up or draining, in zone "a b", pages of 5: 17 nodes, four pages.
        let mut path = "/presence?prefix=s-&status=up,draining&meta.zone=a+b&limit=5".to_owned();
        let mut seen = Vec::new();
        for page in 0.. {
            assert!(page < 10, "the paging does not end");
            let reply = get(&server.url(&path)).await;
            assert!(
                reply.header("presence-cursor").is_some(),
                "{path}: no cursor"
            );
            seen.extend(listed_ids(&reply));
            let Some(link) = reply.header("link") else {
                break;
            };
            path = link
                .strip_prefix('<')
                .and_then(|l| l.strip_suffix(">; rel=\"next\""))
                .unwrap_or_else(|| panic!("malformed Link {link:?}"))
                .to_owned();
            assert!(
                path.starts_with(
                    "/presence?prefix=s-&status=up,draining&meta.zone=a+b&limit=5&after="
                ),
                "{path}"
            );
        }
        let expected: Vec<String> = (0..25)
            .filter(|i| i % 3 != 1)
            .map(|i| format!("s-{i:02}"))
            .collect();
        assert_eq!(seen, expected);
        get(&server.url("/presence?limit=0"))
            .await
            .assert_error(400, "bad_request");

        let stats = get(&server.url("/presence/stats")).await.ok_json();
        assert_eq!(
            stats,
            json!({"online": 25, "by_status": {"up": 9, "degraded": 8, "draining": 8}})
        );
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn rate_limited_429_with_retry_after_on_presence_routes_only() {
    within(30, async {
        // Three requests of burst; a refill far slower than the test.
        let server = TestServer::memory(&config(&[
            ("PRESENCE_RATE_LIMIT_CAPACITY", "3"),
            ("PRESENCE_RATE_LIMIT_RATE", "0.01"),
        ]))
        .await;
        let http = http();

        for _ in 0..3 {
            assert_eq!(get(&server.base()).await.status, 200);
        }
        let limited = get(&server.base()).await;
        limited.assert_error(429, "rate_limited");
        let secs = limited.retry_after_secs();
        assert!(secs <= 100, "one token at 0.01/s is 100 s away, got {secs}");
        let policy = limited.header("ratelimit-policy").unwrap_or_default();
        assert!(policy.contains("q=3"), "RateLimit-Policy {policy:?}");
        let state = limited.header("ratelimit").unwrap_or_default();
        assert!(state.contains("r=0"), "RateLimit {state:?}");

        // Every /presence route shares the bucket; a spoofed X-Forwarded-For from an
        // untrusted peer changes nothing.
        post_json(&server.url("/presence/login"), r#"{"node_id":"n1"}"#)
            .await
            .assert_error(429, "rate_limited");
        Reply::send(
            http.get(server.base())
                .header("x-forwarded-for", "203.0.113.9"),
        )
        .await
        .assert_error(429, "rate_limited");

        // Probes and metrics are not rate limited.
        for path in ["/healthz", "/readyz", "/metrics", "/healthz", "/readyz"] {
            assert_eq!(get(&server.url(path)).await.status, 200, "{path}");
        }
        let scrape = get(&server.url("/metrics")).await.text();
        assert_eq!(
            metric_value(&scrape, "presence_rate_limited_total"),
            Some(3.0),
            "{scrape}"
        );

        // The SDK reports the server's 429 as RateLimited with its Retry-After.
        let pc = PresenceClient::builder(server.base())
            .no_retry()
            .build()
            .expect("client");
        let err = pc.list_nodes().await.expect_err("429");
        assert!(matches!(err, ClientError::RateLimited(_)), "{err:?}");
        assert!(
            err.retry_after()
                .is_some_and(|d| d >= Duration::from_secs(1)),
            "{err:?}"
        );

        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn rate_limit_keys_on_forwarded_for_only_behind_a_trusted_proxy() {
    within(30, async {
        // The test client (127.0.0.1) is the trusted proxy here.
        let server = TestServer::memory(&config(&[
            ("PRESENCE_RATE_LIMIT_CAPACITY", "1"),
            ("PRESENCE_RATE_LIMIT_RATE", "0.01"),
            ("PRESENCE_TRUSTED_PROXIES", "127.0.0.1/32, ::1/128"),
        ]))
        .await;
        let http = http();
        let from = |ip: &str| {
            http.get(server.base())
                .header("x-forwarded-for", ip.to_owned())
        };

        assert_eq!(Reply::send(from("203.0.113.1")).await.status, 200);
        Reply::send(from("203.0.113.1"))
            .await
            .assert_error(429, "rate_limited");
        // Another client behind the proxy has its own bucket ...
        assert_eq!(Reply::send(from("203.0.113.2")).await.status, 200);
        // ... and the rightmost untrusted address is the client.
        Reply::send(from("198.51.100.7, 203.0.113.2"))
            .await
            .assert_error(429, "rate_limited");
        // Without the header the proxy itself is the client.
        assert_eq!(get(&server.base()).await.status, 200);
        get(&server.base()).await.assert_error(429, "rate_limited");

        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn one_failing_shard_opens_its_own_breaker_while_the_other_shards_serve() {
    within(30, async {
        // Shard 1 of 2 is down, like one dead master of a cluster.
        let store = Arc::new(FaultyStore::shard_down(2, 1));
        let (up, down) = ("n2", "n1");
        assert_eq!(store.shard_of(&NodeId::parse(up).expect("id")), 0);
        assert_eq!(store.shard_of(&NodeId::parse(down).expect("id")), 1);
        let server = TestServer::start(&config(&[]), store.clone()).await;
        let lease = login(&server, up).await["lease_id"].clone();

        // Five failures about the down shard's node open that shard's breaker ...
        for _ in 0..5 {
            post_json(
                &server.url("/presence/login"),
                json!({"node_id": down}).to_string(),
            )
            .await
            .assert_error(503, "store_unavailable");
        }
        let reached = store.calls.load(Ordering::SeqCst);
        post_json(
            &server.url("/presence/login"),
            json!({"node_id": down}).to_string(),
        )
        .await
        .assert_error(503, "store_unavailable");
        // ... a listing needs every shard, so it fails fast too ...
        get(&server.base())
            .await
            .assert_error(503, "store_unavailable");
        assert_eq!(
            store.calls.load(Ordering::SeqCst),
            reached,
            "the open breaker kept them out"
        );
        let scrape = get(&server.url("/metrics")).await.text();
        assert_eq!(
            metric_value(&scrape, "presence_store_circuit_state"),
            Some(2.0),
            "{scrape}"
        );

        // ... and the node of the other shard heartbeats on.
        for _ in 0..3 {
            let beat = post_json(
                &server.url("/presence/heartbeat"),
                json!({"node_id": up, "lease_id": lease}).to_string(),
            )
            .await
            .ok_json();
            assert_eq!(beat["lease_id"], lease);
        }
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn store_unavailable_503_with_retry_after_when_the_store_is_down() {
    within(30, async {
        // A store that refuses every call, deterministically (a closed Redis port is
        // covered by the next test).
        let store = Arc::new(FaultyStore::down());
        let server = TestServer::start(&config(&[]), store.clone()).await;

        let ready = get(&server.url("/readyz")).await;
        ready.assert_error(503, "store_unavailable");
        ready.retry_after_secs();
        assert_eq!(get(&server.url("/healthz")).await.status, 200, "liveness is not readiness");

        let lease = "0123456789abcdef0123456789abcdef";
        let calls = [
            get(&server.base()).await,
            post_json(&server.url("/presence/login"), r#"{"node_id":"n1"}"#).await,
            get(&server.url("/presence/n1")).await,
            post_json(
                &server.url("/presence/heartbeat"),
                json!({"node_id": "n1", "lease_id": lease}).to_string(),
            )
            .await,
        ];
        for reply in &calls {
            reply.assert_error(503, "store_unavailable");
            reply.retry_after_secs();
        }
        // Five consecutive failures opened the store breaker: the next calls fail fast
        // with the same 503, without reaching the store. (The expiry sweep may have
        // tried to give the outage back meanwhile: pings outside the breaker.)
        let reached = store.calls.load(Ordering::SeqCst);
        assert!(reached >= 5, "{reached} calls reached the store");
        let fast = post_json(
            &server.url("/presence/logout"),
            json!({"node_id": "n1", "lease_id": lease}).to_string(),
        )
        .await;
        fast.assert_error(503, "store_unavailable");
        assert!(fast.retry_after_secs() <= 5, "{fast:?}");
        get(&server.url("/readyz")).await.assert_error(503, "store_unavailable");
        assert_eq!(store.calls.load(Ordering::SeqCst), reached, "the breaker kept the store out");

        let scrape = get(&server.url("/metrics")).await.text();
        assert_eq!(
            metric_value(&scrape, r#"presence_store_errors_total{kind="unavailable"}"#),
            Some(5.0),
            "{scrape}"
        );
        assert_eq!(
            metric_value(&scrape, r#"presence_store_errors_total{kind="circuit_open"}"#),
            Some(2.0),
            "{scrape}"
        );
        assert_eq!(metric_value(&scrape, "presence_store_circuit_state"), Some(2.0), "{scrape}");

        // The SDK surfaces it as a server error with the code.
        let pc = PresenceClient::builder(server.base()).no_retry().build().expect("client");
        let err = pc.list_nodes().await.expect_err("503");
        assert!(
            matches!(&err, ClientError::Server { status: 503, code, .. } if code == "store_unavailable"),
            "{err:?}"
        );

        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn store_unavailable_503_when_redis_uri_points_at_a_closed_port() {
    within(30, async {
        // `store::open` connects lazily, so a server starts while Redis is down and
        // answers 503 until it is up.
        let store = within(
            10,
            presence::store::open(Some("redis://127.0.0.1:1"), "e2e-closed"),
        )
        .await
        .unwrap_or_else(|e| panic!("store::open must not fail on an unreachable Redis: {e}"));
        assert!(
            store.describe().contains("127.0.0.1:1"),
            "{}",
            store.describe()
        );
        let server =
            TestServer::start(&config(&[("PRESENCE_STORE_TIMEOUT_MS", "500")]), store).await;

        assert_eq!(get(&server.url("/healthz")).await.status, 200);
        let ready = get(&server.url("/readyz")).await;
        ready.assert_error(503, "store_unavailable");
        ready.retry_after_secs();
        for reply in [
            get(&server.base()).await,
            post_json(&server.url("/presence/login"), r#"{"node_id":"n1"}"#).await,
        ] {
            reply.assert_error(503, "store_unavailable");
            reply.retry_after_secs();
        }

        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn store_unavailable_503_when_the_store_does_not_answer_in_time() {
    within(30, async {
        let server = TestServer::start(
            &config(&[("PRESENCE_STORE_TIMEOUT_MS", "150")]),
            Arc::new(FaultyStore::stalled()),
        )
        .await;

        let started = tokio::time::Instant::now();
        let reply = get(&server.base()).await;
        let took = started.elapsed();
        reply.assert_error(503, "store_unavailable");
        reply.retry_after_secs();
        assert!(
            took >= Duration::from_millis(150) && took < Duration::from_secs(5),
            "answered after {took:?}, store timeout 150 ms"
        );
        get(&server.url("/readyz"))
            .await
            .assert_error(503, "store_unavailable");
        post_json(&server.url("/presence/login"), r#"{"node_id":"n1"}"#)
            .await
            .assert_error(503, "store_unavailable");

        let scrape = get(&server.url("/metrics")).await.text();
        assert_eq!(
            metric_value(&scrape, r#"presence_store_errors_total{kind="timeout"}"#),
            Some(3.0),
            "{scrape}"
        );

        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn request_timeout_408_for_a_body_that_never_arrives() {
    within(30, async {
        let server = TestServer::memory(&config(&[("PRESENCE_REQUEST_TIMEOUT_MS", "300")])).await;
        // Announces 100 bytes, sends 12, then waits.
        let request = b"POST /presence/login HTTP/1.1\r\nHost: e2e\r\n\
            Content-Type: application/json\r\nContent-Length: 100\r\nConnection: close\r\n\r\n\
            {\"node_id\":";
        raw_request(server.addr, request)
            .await
            .assert_error(408, "request_timeout");
        server.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Lifecycle
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn shutdown_drains_in_flight_requests_and_stops_listening() {
    within(30, async {
        let store = Arc::new(FaultyStore::slow_list(Duration::from_millis(400)));
        let mut server = TestServer::start(&config(&[]), store.clone()).await;
        let url = server.base();
        let in_flight = tokio::spawn(async move { get(&url).await });

        // Shut down while the list call is inside the store.
        within(10, store.list_started.notified()).await;
        server.signal_shutdown();
        server.join().await;

        let reply = within(10, in_flight).await.expect("request task");
        assert!(
            listed_ids(&reply).is_empty(),
            "the in-flight request completed"
        );
        let refused = tokio::net::TcpStream::connect(server.addr).await;
        assert!(
            refused.is_err(),
            "still accepting connections after shutdown"
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Redis: two servers on one prefix, and an outage
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn two_servers_on_one_redis_prefix_share_presence() {
    let Some(admin) = redis_for_tests("e2e_two_servers").await else {
        return;
    };
    let prefix = admin.prefix().to_owned();

    // The assertions run in their own task so the prefix is cleaned up even when one
    // of them fails.
    let outcome = tokio::spawn(within(60, async move {
        let uri = test_redis_uri();
        let store_a = RedisStore::connect(&uri, &prefix).await.expect("connect A");
        let store_b = RedisStore::connect(&uri, &prefix).await.expect("connect B");
        assert_eq!(store_b.describe(), store_a.describe());
        let a = TestServer::start(&config(&[]), Arc::new(store_a)).await;
        let b = TestServer::start(&config(&[]), Arc::new(store_b)).await;
        assert_ne!(a.addr, b.addr);
        assert_eq!(get(&b.url("/readyz")).await.status, 200);

        // Logged in via A, listed by B.
        let pc_a = PresenceClient::new(&a.base()).expect("client A");
        let lease = pc_a
            .login_with_meta("shared-1", meta(json!({"via": "a"})))
            .await
            .expect("login via A");
        let on_b = get(&b.base()).await;
        assert_eq!(listed_ids(&on_b), ["shared-1"]);
        assert_eq!(on_b.json()[0]["meta"], json!({"via": "a"}));
        let node_b = get(&b.url("/presence/shared-1")).await.ok_json();
        assert_eq!(node_b["expires_at_ms"].as_u64(), Some(lease.expires_at_ms));

        // A's lease is good on B; a made-up one is fenced off on B too.
        let hb = |lease_id: &str| json!({"node_id": "shared-1", "lease_id": lease_id}).to_string();
        let beat = post_json(&b.url("/presence/heartbeat"), hb(&lease.lease_id))
            .await
            .ok_json();
        assert_eq!(beat["lease_id"], lease.lease_id.as_str());
        assert!(beat["expires_at_ms"].as_u64() >= Some(lease.expires_at_ms));
        post_json(
            &b.url("/presence/heartbeat"),
            hb("ffffffffffffffffffffffffffffffff"),
        )
        .await
        .assert_error(409, "lease_mismatch");
        // The heartbeat on B is visible on A (same record, same clock).
        let node_a = pc_a
            .get_node("shared-1")
            .await
            .expect("get")
            .expect("online");
        assert_eq!(
            node_a.expires_at_ms,
            beat["expires_at_ms"].as_u64().unwrap_or_default()
        );

        // Logout via B removes it for A.
        let out = post_json(&b.url("/presence/logout"), hb(&lease.lease_id))
            .await
            .ok_json();
        assert_eq!(out, json!({"node_id": "shared-1", "removed": true}));
        assert!(pc_a.list_nodes().await.expect("list via A").is_empty());
        assert_eq!(pc_a.get_node("shared-1").await.expect("get via A"), None);

        // A login via B fences the lease A's client holds.
        let pc_b = PresenceClient::new(&b.base()).expect("client B");
        let relogin = pc_a.login("shared-2").await.expect("login via A");
        let taken = pc_b.login("shared-2").await.expect("login via B");
        assert_ne!(relogin.lease_id, taken.lease_id);
        let err = pc_a.heartbeat("shared-2").await.expect_err("fenced");
        assert!(matches!(err, ClientError::LeaseMismatch), "{err:?}");
        assert!(pc_b.logout("shared-2").await.expect("logout via B"));

        a.stop().await;
        b.stop().await;
    }))
    .await;

    let cleaned = within(10, admin.delete_prefix()).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic.into_panic());
    }
    cleaned.expect("delete_prefix");
    let left = within(10, admin.delete_prefix())
        .await
        .expect("delete_prefix");
    assert_eq!(left, 0, "keys left under the test prefix after cleanup");
}

#[tokio::test]
async fn redis_outage_gives_503_and_the_server_recovers_when_redis_is_back() {
    within(60, async {
        let Some(mut redis) = RedisChild::start("redis_outage_gives_503").await else {
            return;
        };
        let uri = redis.uri();
        let options = RedisOptions::default()
            .connection_timeout(Duration::from_millis(300))
            .response_timeout(Duration::from_millis(300))
            .reconnect_retries(1);
        let store = RedisStore::connect_with(&uri, "e2e-outage", options)
            .await
            .expect("connect to our redis-server");
        let server = TestServer::start(
            &config(&[("PRESENCE_STORE_TIMEOUT_MS", "500")]),
            Arc::new(store),
        )
        .await;
        let pc = PresenceClient::builder(server.base())
            .no_retry()
            .build()
            .expect("client");
        let first = pc.login("survivor-1").await.expect("login");
        assert_eq!(get(&server.url("/readyz")).await.status, 200);

        redis.kill();
        let ready = get(&server.url("/readyz")).await;
        ready.assert_error(503, "store_unavailable");
        ready.retry_after_secs();
        let list = get(&server.base()).await;
        list.assert_error(503, "store_unavailable");
        list.retry_after_secs();
        assert_eq!(get(&server.url("/healthz")).await.status, 200);

        // A new, empty Redis on the same port: readiness comes back by itself.
        redis.restart().await;
        eventually(30, "readyz is 200 again after Redis came back", || async {
            get(&server.url("/readyz")).await.status == 200
        })
        .await;
        // The new Redis has forgotten the node: the SDK's heartbeat logs in again.
        let beat = pc.heartbeat("survivor-1").await.expect("heartbeat");
        assert!(beat.relogged(), "{beat:?}");
        assert_ne!(beat.lease_id(), first.lease_id);
        assert_eq!(
            node_ids(&pc.list_nodes().await.expect("list")),
            ["survivor-1"]
        );

        server.stop().await;
    })
    .await;
}

#[cfg(unix)]
#[tokio::test]
async fn a_redis_pause_longer_than_the_ttl_is_given_back_to_the_leases() {
    within(60, async {
        let Some(redis) = RedisChild::start("a_redis_pause_longer_than_the_ttl").await else {
            return;
        };
        let uri = redis.uri();
        let options = RedisOptions::default()
            .connection_timeout(Duration::from_millis(300))
            .response_timeout(Duration::from_millis(300));
        let store = RedisStore::connect_with(&uri, "e2e-pause", options)
            .await
            .expect("connect to our redis-server");
        let mut cfg = config(&[("PRESENCE_STORE_TIMEOUT_MS", "400")]);
        cfg.ttl = Duration::from_millis(1_500);
        let server = TestServer::start(&cfg, Arc::new(store)).await;
        let lease = login(&server, "paused-1").await;
        let first_expiry = lease["expires_at_ms"].as_u64().expect("expires_at_ms");

        // Redis stops answering (no data lost): the server notices on its next call.
        redis.pause();
        get(&server.base())
            .await
            .assert_error(503, "store_unavailable");
        tokio::time::sleep(Duration::from_millis(2_500)).await; // > TTL
        redis.resume();

        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let listed = loop {
            let reply = get(&server.base()).await;
            if reply.status == 200 {
                break reply.json().as_array().cloned().unwrap_or_default();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "still {reply:?} 20 s after Redis resumed"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        // Without self-preservation the node would have expired during the pause.
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(listed[0]["node_id"], "paused-1");
        let moved = listed[0]["expires_at_ms"].as_u64().unwrap_or_default();
        assert!(
            moved >= first_expiry + 2_000,
            "lease moved by {} ms for a pause of >= 2500 ms",
            moved.saturating_sub(first_expiry)
        );
        // And the node's own lease still works.
        let beat = post_json(
            &server.url("/presence/heartbeat"),
            json!({"node_id": "paused-1", "lease_id": lease["lease_id"]}).to_string(),
        )
        .await
        .ok_json();
        assert_eq!(beat["lease_id"], lease["lease_id"]);

        server.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// The presence_server example binary
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn binary_exits_2_with_one_line_naming_a_bad_variable() {
    let Some(bin) = example_binary_or_skip("presence_server") else {
        return;
    };
    within(60, async {
        for (var, value, shown) in [
            ("PRESENCE_TTL_SEC", "abc", "abc"),
            ("PRESENCE_HTTP_PORT", "70000", "70000"),
            ("PRESENCE_RATE_LIMIT_CAPACITY", "-1", "-1"),
            ("PRESENCE_STORE_TIMEOUT_MS", "0", "0"),
            (
                "PRESENCE_REDIS_URI",
                "ftp://user:hunter2@example.com",
                "ftp://",
            ),
        ] {
            let mut cmd = clean_command(&bin);
            cmd.env("PRESENCE_HTTP_PORT", "0").env(var, value);
            let mut child = ChildGuard::spawn(cmd).expect("spawn presence_server");
            let status = child
                .wait_exit(Duration::from_secs(15))
                .await
                .unwrap_or_else(|| panic!("{var}={value}: still running"));
            assert_eq!(status.code(), Some(2), "{var}={value}: {status:?}");
            let lines = child.remaining_lines();
            let errors: Vec<&String> = lines.iter().filter(|l| !l.trim().is_empty()).collect();
            assert_eq!(
                errors.len(),
                1,
                "{var}={value}: expected one line, got {lines:#?}"
            );
            let line = errors[0];
            assert!(
                line.contains(var) && line.contains(shown),
                "{var}={value}: {line:?}"
            );
            assert!(!line.contains("hunter2"), "a password leaked: {line:?}");
        }
    })
    .await;
}

#[tokio::test]
async fn binary_exits_2_naming_both_counts_when_the_deployment_has_another_shard_count() {
    let Some(bin) = example_binary_or_skip("presence_server") else {
        return;
    };
    // A deployment made with 4 shards (it records the count on its first check).
    let Some(store) = sharded_redis_for_tests("binary_shard_count", 4).await else {
        return;
    };
    within(60, async {
        store
            .check_deployment()
            .await
            .expect("a new deployment takes the count");
        for (shards, stored) in [("16", "4"), ("1", "4")] {
            let mut cmd = clean_command(&bin);
            cmd.env("PRESENCE_HTTP_PORT", "0")
                .env("PRESENCE_REDIS_URI", test_redis_uri())
                .env("PRESENCE_KEY_PREFIX", store.prefix())
                .env("PRESENCE_SHARDS", shards);
            let mut child = ChildGuard::spawn(cmd).expect("spawn presence_server");
            let status = child
                .wait_exit(Duration::from_secs(15))
                .await
                .unwrap_or_else(|| panic!("PRESENCE_SHARDS={shards}: still running"));
            assert_eq!(
                status.code(),
                Some(2),
                "PRESENCE_SHARDS={shards}: {status:?}"
            );
            let lines = child.remaining_lines();
            let line = lines
                .iter()
                .find(|l| l.starts_with("error:"))
                .unwrap_or_else(|| panic!("no error line in {lines:#?}"));
            assert!(
                line.contains(&format!("has {stored} shards"))
                    && line.contains(&format!("runs with {shards}"))
                    && line.contains("PRESENCE_SHARDS"),
                "{line:?}"
            );
        }
        // The same count starts (and the deployment is untouched by the refusals).
        let mut cmd = clean_command(&bin);
        cmd.env("PRESENCE_HTTP_HOST", "127.0.0.1")
            .env("PRESENCE_HTTP_PORT", "0")
            .env("PRESENCE_REDIS_URI", test_redis_uri())
            .env("PRESENCE_KEY_PREFIX", store.prefix())
            .env("PRESENCE_SHARDS", "4");
        let child = ChildGuard::spawn(cmd).expect("spawn presence_server");
        let (addr, log) = child.find_line(Duration::from_secs(15), parse_listen_addr);
        assert!(addr.is_some(), "PRESENCE_SHARDS=4 serves: {log:#?}");
        drop(child);
        let _ = store.delete_prefix().await;
    })
    .await;
}

#[cfg(unix)]
#[tokio::test]
async fn binary_logs_its_port_0_address_serves_and_exits_0_on_sigterm() {
    let Some(bin) = example_binary_or_skip("presence_server") else {
        return;
    };
    within(60, async {
        let mut cmd = clean_command(&bin);
        cmd.env("PRESENCE_HTTP_HOST", "127.0.0.1")
            .env("PRESENCE_HTTP_PORT", "0");
        let mut child = ChildGuard::spawn(cmd).expect("spawn presence_server");

        let (addr, log) = child.find_line(Duration::from_secs(15), parse_listen_addr);
        let addr = addr.unwrap_or_else(|| panic!("no `listening on http://...` line in {log:#?}"));
        assert!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");
        let startup = log.join("\n");
        assert!(
            startup.contains("memory") && startup.contains("single server"),
            "the start-up log names the in-memory store and its limit:\n{startup}"
        );

        assert_eq!(get(&format!("http://{addr}/healthz")).await.status, 200);
        let pc = PresenceClient::new(&format!("http://{addr}/presence")).expect("client");
        pc.login("bin-node").await.expect("login");
        assert_eq!(
            node_ids(&pc.list_nodes().await.expect("list")),
            ["bin-node"]
        );

        child.signal("TERM");
        let status = child
            .wait_exit(Duration::from_secs(15))
            .await
            .expect("exits within 15 s of SIGTERM");
        assert_eq!(status.code(), Some(0), "{status:?}");
        let refused = tokio::net::TcpStream::connect(addr).await;
        assert!(refused.is_err(), "port still open after exit");
    })
    .await;
}

#[cfg(unix)]
#[tokio::test]
async fn binary_starts_while_redis_is_down_and_answers_503() {
    let Some(bin) = example_binary_or_skip("presence_server") else {
        return;
    };
    within(60, async {
        let mut cmd = clean_command(&bin);
        cmd.env("PRESENCE_HTTP_HOST", "127.0.0.1")
            .env("PRESENCE_HTTP_PORT", "0")
            .env("PRESENCE_REDIS_URI", "redis://127.0.0.1:1")
            .env("PRESENCE_STORE_TIMEOUT_MS", "300");
        let mut child = ChildGuard::spawn(cmd).expect("spawn presence_server");

        let (addr, log) = child.find_line(Duration::from_secs(15), parse_listen_addr);
        let addr = addr.unwrap_or_else(|| panic!("no `listening on http://...` line in {log:#?}"));
        let startup = log.join("\n");
        assert!(
            startup.contains("redis://127.0.0.1:1"),
            "the start-up log names the store:\n{startup}"
        );

        assert_eq!(get(&format!("http://{addr}/healthz")).await.status, 200);
        let ready = get(&format!("http://{addr}/readyz")).await;
        ready.assert_error(503, "store_unavailable");
        ready.retry_after_secs();
        get(&format!("http://{addr}/presence"))
            .await
            .assert_error(503, "store_unavailable");

        child.signal("TERM");
        let status = child
            .wait_exit(Duration::from_secs(15))
            .await
            .expect("exits within 15 s of SIGTERM");
        assert_eq!(status.code(), Some(0), "{status:?}");
    })
    .await;
}
