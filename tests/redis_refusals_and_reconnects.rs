//! A Redis that is up but refuses writes (out of memory) keeps reads and readiness
//! up; a pooled connection that Redis dropped (idle `timeout`, `CLIENT KILL`) is
//! replaced without failing the next request. Each on a real `redis-server` child.

mod support;

use std::sync::Arc;
use std::time::Duration;

use presence::store::RedisStore;
use support::client::{get_with, http, post_with};
use support::redis::RedisChild;
use support::server::TestServer;
use support::{unlimited_config, within};

async fn server_on(redis: &RedisChild) -> TestServer {
    let store = RedisStore::connect(&redis.uri(), "refusals")
        .await
        .expect("connect to the redis child");
    TestServer::start(&unlimited_config(Duration::from_secs(1)), Arc::new(store)).await
}

fn login_body(node: &str) -> serde_json::Value {
    serde_json::json!({ "node_id": node })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_memory_refuses_writes_but_keeps_reads_and_readiness() {
    let Some(redis) = RedisChild::start("out_of_memory_refuses_writes").await else {
        return;
    };
    let server = server_on(&redis).await;
    let client = http();
    within(30, async {
        let r = post_with(&client, &server.url("/presence/login"), &login_body("n-1")).await;
        assert_eq!(r.status, 200, "{r:?}");

        assert_eq!(redis.command("CONFIG SET maxmemory 1").await, "+OK");
        // More refusals than the store breaker's failure threshold (5).
        for i in 0..8 {
            let r = post_with(
                &client,
                &server.url("/presence/login"),
                &login_body(&format!("m-{i}")),
            )
            .await;
            r.assert_store_unavailable("login while Redis is out of memory");
            let message = r.json()["message"].as_str().unwrap_or_default().to_owned();
            assert!(message.contains("refuses writes"), "{message}");
        }
        // Reads and readiness stay up: Redis answers them.
        let r = get_with(&client, &server.url("/presence")).await;
        assert_eq!(r.status, 200, "list: {r:?}");
        assert_eq!(r.json().as_array().map(Vec::len), Some(1), "{r:?}");
        let r = get_with(&client, &server.url("/presence/n-1")).await;
        assert_eq!(r.status, 200, "get: {r:?}");
        let r = get_with(&client, &server.url("/readyz")).await;
        assert_eq!(r.status, 200, "readyz: {r:?}");
        let scrape = get_with(&client, &server.url("/metrics")).await.text();
        assert!(
            scrape.contains(r#"kind="refused""#),
            "refusals are counted: {scrape}"
        );

        // Room again: writes work at once (no breaker to wait out).
        assert_eq!(redis.command("CONFIG SET maxmemory 0").await, "+OK");
        let r = post_with(&client, &server.url("/presence/login"), &login_body("n-2")).await;
        assert_eq!(r.status, 200, "{r:?}");
    })
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_connections_are_replaced_without_a_failed_request() {
    let Some(redis) = RedisChild::start("killed_connections_are_replaced").await else {
        return;
    };
    let server = server_on(&redis).await;
    let client = http();
    within(30, async {
        for round in 0..3 {
            let r = post_with(&client, &server.url("/presence/login"), &login_body("n-1")).await;
            assert_eq!(r.status, 200, "round {round}: {r:?}");
            let r = get_with(&client, &server.url("/presence")).await;
            assert_eq!(r.status, 200, "round {round}: {r:?}");
            // Every connection but the one asking: the store's command and listing
            // connections both.
            let killed = redis.command("CLIENT KILL TYPE normal").await;
            assert!(killed.starts_with(':'), "{killed}");
            let r = post_with(&client, &server.url("/presence/login"), &login_body("n-1")).await;
            assert_eq!(
                r.status, 200,
                "first login after CLIENT KILL, round {round}: {r:?}"
            );
            let r = get_with(&client, &server.url("/presence")).await;
            assert_eq!(
                r.status, 200,
                "first list after CLIENT KILL, round {round}: {r:?}"
            );
        }
    })
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_closed_by_the_redis_idle_timeout_are_replaced() {
    let Some(redis) = RedisChild::start("idle_timeout_connections_are_replaced").await else {
        return;
    };
    assert_eq!(redis.command("CONFIG SET timeout 1").await, "+OK");
    let server = server_on(&redis).await;
    let client = http();
    within(30, async {
        let r = post_with(&client, &server.url("/presence/login"), &login_body("n-1")).await;
        assert_eq!(r.status, 200, "{r:?}");
        // Real time: Redis closes clients idle for more than `timeout` seconds.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let r = post_with(&client, &server.url("/presence/login"), &login_body("n-1")).await;
        assert_eq!(r.status, 200, "login after the idle timeout: {r:?}");
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let r = get_with(&client, &server.url("/presence")).await;
        assert_eq!(r.status, 200, "list after the idle timeout: {r:?}");
    })
    .await;
    server.stop().await;
}
