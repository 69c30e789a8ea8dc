//! Drives the concurrency-limit and retry examples over real sockets on 127.0.0.1:
//! `examples/axum_concurrency.rs` (its router on a real `TcpListener`, hit past its
//! limit by concurrent `reqwest` calls) and `examples/reqwest_retry.rs` (its layered
//! `reqwest::Client` against its real upstream, which answers `503 Retry-After: 1`
//! twice). Every test is bounded by a timeout, and what it spawns ends with its runtime.

use std::{
    future::Future,
    net::SocketAddr,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use resilience::CircuitState;
use tokio::net::TcpListener;

#[allow(dead_code)]
#[path = "../examples/axum_concurrency.rs"]
mod axum_concurrency;

#[allow(dead_code)]
#[path = "../examples/reqwest_retry.rs"]
mod reqwest_retry;

/// Fails the test if `f` takes more than `secs` seconds.
async fn within<T>(secs: u64, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("the test took too long")
}

async fn local_listener() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

// ---------------------------------------------------------------------------------------
// axum_concurrency
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_concurrency_rejects_past_its_limit_with_503_retry_after_and_json() {
    within(20, async {
        let limits = axum_concurrency::Limits {
            max_slow: 2,
            slow_for: Duration::from_millis(1500),
            retry_after: Duration::from_millis(1500),
        };
        let (router, state) = axum_concurrency::app(&limits);
        let (listener, addr) = local_listener().await;
        tokio::spawn(axum_concurrency::serve(listener, router));
        let client = http();
        let url = format!("http://{addr}/slow");

        // Two calls fill the limit of `/slow`...
        let first: Vec<_> = (0..2)
            .map(|_| tokio::spawn(client.get(&url).send()))
            .collect();
        let deadline = Instant::now() + Duration::from_secs(5);
        while state.slow_hits.load(Ordering::SeqCst) < 2 {
            assert!(Instant::now() < deadline, "the first two never arrived");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        // ...so a third is answered 503 at once, without reaching the handler.
        let started = Instant::now();
        let res = client.get(&url).send().await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(1), "no queueing");
        assert_eq!(res.status(), 503);
        assert_eq!(res.headers()["retry-after"], "2"); // 1.5 s, rounded up
        assert_eq!(res.headers()["content-type"], "application/json");
        let body: serde_json::Value = res.json().await.unwrap();
        assert_eq!(
            body,
            serde_json::json!({"error": "overloaded", "message": "overloaded; retry after 2 s"})
        );
        assert_eq!(state.slow_hits.load(Ordering::SeqCst), 2);

        for call in first {
            let res = call.await.unwrap().unwrap();
            assert_eq!(res.status(), 200);
            assert_eq!(res.text().await.unwrap(), "done\n");
        }

        // Slots free when calls end: the next one is admitted.
        let res = client.get(&url).send().await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(state.slow_hits.load(Ordering::SeqCst), 3);

        // The adaptive limit around the router: reported, within its bounds, and nothing
        // rejected by it at this load.
        let limit: serde_json::Value = client
            .get(format!("http://{addr}/limit"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            (limit["min"].as_u64(), limit["max"].as_u64()),
            (Some(4), Some(256))
        );
        let now = limit["limit"].as_u64().unwrap();
        assert!((4..=256).contains(&now), "{now}");
        assert_eq!(limit["rejections"], 0);
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// reqwest_retry
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reqwest_retry_waits_out_two_503s_then_succeeds_and_never_retries_a_post() {
    within(30, async {
        let (listener, addr) = local_listener().await;
        let hits = reqwest_retry::Hits::default();
        reqwest_retry::spawn_upstream(listener, hits.clone(), 2);
        let breaker = resilience::CircuitBreaker::builder()
            .consecutive_failures(2)
            .build();
        let budget = reqwest_retry::budget();
        let mut client = reqwest_retry::layered(http(), breaker.clone(), budget.clone());
        let url = format!("http://{addr}/flaky");

        // GET: 503, wait 1 s, 503, wait 1 s, 200; the caller sees the 200.
        let started = Instant::now();
        let res = reqwest_retry::send(&mut client, reqwest::Method::GET, &url)
            .await
            .unwrap();
        let took = started.elapsed();
        assert_eq!(res.status(), 200);
        assert_eq!(res.text().await.unwrap(), "ok\n");
        assert_eq!(hits.get(), 3, "two retries");
        assert!(
            took >= Duration::from_secs(2) && took < Duration::from_secs(5),
            "each retry waited its Retry-After of 1 s: {took:?}"
        );
        // The start-up allowance paid for them (one call's 0.2 of credit is not a retry).
        let stats = budget.stats();
        assert_eq!((stats.requests, stats.retries, stats.denied), (1, 2, 0));
        // The breaker outside the retry saw one call, a success.
        assert_eq!(breaker.state(), CircuitState::Closed);
        assert_eq!(breaker.stats().failures, 0);

        // POST to a fresh flaky upstream: sent once, its 503 handed back at once.
        let (listener, addr) = local_listener().await;
        let posts = reqwest_retry::Hits::default();
        reqwest_retry::spawn_upstream(listener, posts.clone(), 2);
        let started = Instant::now();
        let res = reqwest_retry::send(
            &mut client,
            reqwest::Method::POST,
            &format!("http://{addr}/flaky"),
        )
        .await
        .unwrap();
        assert_eq!(res.status(), 503);
        assert_eq!(res.headers()["retry-after"], "1");
        assert_eq!(posts.get(), 1, "a POST is never retried");
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(budget.stats().retries, 2);
    })
    .await;
}
