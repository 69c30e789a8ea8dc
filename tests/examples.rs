//! Drives the layer examples over real sockets on 127.0.0.1: each example's reusable part
//! (the router, the server, the client stack) is included with `#[path]`, started on port
//! 0, and checked by status codes, headers and hit counts. Every test is bounded by
//! `within`, and everything it spawns ends with its runtime.

mod support;

use std::{net::SocketAddr, sync::atomic::Ordering, time::Duration};

use resilience::CircuitState;
use support::client::{http, Reply};
use support::within;
use tokio::net::TcpListener;

#[allow(dead_code)]
#[path = "../examples/resilience_demo.rs"]
mod resilience_demo;

#[allow(dead_code)]
#[path = "../examples/axum_layers.rs"]
mod axum_layers;

#[allow(dead_code)]
#[path = "../examples/tonic_layers.rs"]
mod tonic_layers;

#[allow(dead_code)]
#[path = "../examples/reqwest_breaker.rs"]
mod reqwest_breaker;

/// A rate so slow that no token comes back during a test: exactly `burst` calls pass.
const NO_REFILL: f64 = 0.001;

async fn local_listener() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

// ---------------------------------------------------------------------------------------
// resilience_demo (hyper 1 + hyper-util)
// ---------------------------------------------------------------------------------------

fn demo_config() -> resilience_demo::DemoConfig {
    resilience_demo::DemoConfig {
        failure_probability: 1.0,
        seed: 7,
        breaker_failures: 3,
        open_for: Duration::from_secs(60),
        rate_per_sec: NO_REFILL,
        burst: 10,
    }
}

async fn start_demo(config: &resilience_demo::DemoConfig) -> (SocketAddr, resilience_demo::Demo) {
    let (listener, addr) = local_listener().await;
    let demo = resilience_demo::app(config);
    tokio::spawn(resilience_demo::serve(listener, demo.service.clone()));
    (addr, demo)
}

#[tokio::test]
async fn demo_unstable_opens_the_breaker_then_503_with_retry_after() {
    within(10, async {
        let (addr, demo) = start_demo(&demo_config()).await;
        let client = http();
        let url = format!("http://{addr}/unstable");

        for i in 0..3 {
            let res = client.get(&url).send().await.unwrap();
            assert_eq!(res.status(), 500, "call {i} fails (probability 1.0)");
        }
        for _ in 0..3 {
            let reply = Reply::send(client.get(&url)).await;
            assert_eq!(reply.status, 503);
            let secs = reply.retry_after_secs();
            assert!(secs <= 60, "Retry-After {secs} is within open_for");
            assert_eq!(reply.json()["error"], "circuit_open");
        }
        assert_eq!(
            demo.unstable_hits.load(Ordering::Relaxed),
            3,
            "rejected calls never reach the handler"
        );
        assert_eq!(demo.breaker.state(), CircuitState::Open);
    })
    .await;
}

#[tokio::test]
async fn demo_unstable_never_fails_with_probability_zero() {
    within(10, async {
        let config = resilience_demo::DemoConfig {
            failure_probability: 0.0,
            ..demo_config()
        };
        let (addr, demo) = start_demo(&config).await;
        let client = http();
        for _ in 0..10 {
            let res = client
                .get(format!("http://{addr}/unstable"))
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 200);
        }
        assert_eq!(demo.unstable_hits.load(Ordering::Relaxed), 10);
        assert_eq!(demo.breaker.state(), CircuitState::Closed);
    })
    .await;
}

#[tokio::test]
async fn demo_limited_allows_the_burst_then_429() {
    within(10, async {
        let (addr, _demo) = start_demo(&demo_config()).await;
        let client = http();
        let url = format!("http://{addr}/limited");

        for i in 0..10 {
            let res = client.get(&url).send().await.unwrap();
            assert_eq!(res.status(), 200, "call {i} is within the burst of 10");
        }
        let reply = Reply::send(client.get(&url)).await;
        assert_eq!(reply.status, 429);
        reply.retry_after_secs();

        // Other routes are not limited, and unknown ones are a plain 404.
        let res = client
            .get(format!("http://{addr}/nope"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 404);
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// axum_layers
// ---------------------------------------------------------------------------------------

async fn start_axum(limits: &axum_layers::Limits) -> (SocketAddr, axum_layers::AppState) {
    let (listener, addr) = local_listener().await;
    let state = axum_layers::AppState::default();
    let router = axum_layers::app(limits, state.clone());
    tokio::spawn(axum_layers::serve(listener, router));
    (addr, state)
}

#[tokio::test]
async fn axum_burst_then_429_with_retry_after_and_ratelimit_headers() {
    within(10, async {
        let limits = axum_layers::Limits {
            rate_per_sec: NO_REFILL,
            burst: 3,
            ..Default::default()
        };
        let (addr, _state) = start_axum(&limits).await;
        let client = http();
        let url = format!("http://{addr}/");

        for i in 0..3 {
            let res = client.get(&url).send().await.unwrap();
            assert_eq!(res.status(), 200, "call {i} is within the burst of 3");
        }
        let reply = Reply::send(client.get(&url)).await;
        assert_eq!(reply.status, 429);
        reply.retry_after_secs();
        let policy = reply
            .header("ratelimit-policy")
            .expect("RateLimit-Policy header");
        assert!(policy.contains("q=3"), "policy names the burst: {policy}");
        let limit = reply.header("ratelimit").expect("RateLimit header");
        assert!(limit.contains("r=0"), "no tokens remaining: {limit}");
        assert_eq!(reply.json()["error"], "rate_limited");
    })
    .await;
}

/// The bucket is per client IP (`PeerIp` via `ConnectInfo`): another loopback address has
/// its own burst. 127.0.0.2 is a loopback address out of the box on Linux only.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn axum_buckets_are_per_client_ip() {
    within(10, async {
        let limits = axum_layers::Limits {
            rate_per_sec: NO_REFILL,
            burst: 1,
            ..Default::default()
        };
        let (addr, _state) = start_axum(&limits).await;
        let url = format!("http://{addr}/");
        let first = http();
        let second = reqwest::Client::builder()
            .no_proxy()
            .local_address("127.0.0.2".parse::<std::net::IpAddr>().unwrap())
            .build()
            .unwrap();

        assert_eq!(first.get(&url).send().await.unwrap().status(), 200);
        assert_eq!(first.get(&url).send().await.unwrap().status(), 429);
        assert_eq!(second.get(&url).send().await.unwrap().status(), 200);
        assert_eq!(second.get(&url).send().await.unwrap().status(), 429);
    })
    .await;
}

#[tokio::test]
async fn axum_breaker_route_503_after_failures() {
    within(10, async {
        let limits = axum_layers::Limits {
            rate_per_sec: NO_REFILL,
            burst: 100,
            breaker_failures: 3,
            open_for: Duration::from_secs(60),
        };
        let (addr, state) = start_axum(&limits).await;
        let client = http();

        let res = client
            .get(format!("http://{addr}/upstream"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            res.status(),
            200,
            "the route works while the breaker is closed"
        );
        for _ in 0..3 {
            let res = client
                .get(format!("http://{addr}/upstream?fail=true"))
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 500);
        }
        // Open now: even a call that would succeed is rejected without running the handler.
        let reply = Reply::send(client.get(format!("http://{addr}/upstream"))).await;
        assert_eq!(reply.status, 503);
        reply.retry_after_secs();
        assert_eq!(reply.json()["error"], "circuit_open");
        assert_eq!(state.upstream_hits.load(Ordering::Relaxed), 4);

        // The breaker guards /upstream only.
        let res = client.get(format!("http://{addr}/")).send().await.unwrap();
        assert_eq!(res.status(), 200);
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// tonic_layers
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn tonic_health_check_then_breaker_opens_when_the_server_is_gone() {
    within(15, async {
        let (listener, addr) = local_listener().await;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(tonic_layers::serve(listener, 1000.0, 1000, async {
            let _ = stopped.await;
        }));

        let breaker = resilience::CircuitBreaker::builder()
            .consecutive_failures(2)
            .open_for(Duration::from_secs(60))
            .build();
        let mut client = tonic_layers::connect(addr, breaker.clone()).await.unwrap();
        let status = tonic_layers::check(&mut client).await.unwrap();
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );

        stop.send(()).unwrap();
        server.await.unwrap().unwrap();

        // Two transport failures reach the (dead) server's address and open the breaker.
        for i in 0..2 {
            let err = tonic_layers::check(&mut client).await.unwrap_err();
            assert!(
                tonic_layers::circuit_open(&err).is_none(),
                "failure {i} is a real transport error, not a rejection: {err:?}"
            );
        }
        assert_eq!(breaker.state(), CircuitState::Open);

        // Now calls fail fast with CircuitOpen as the status source.
        let calls_before = breaker.stats().calls;
        let err = tonic_layers::check(&mut client).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
        let open = tonic_layers::circuit_open(&err).expect("CircuitOpen as the source");
        assert!(open.retry_after > Duration::ZERO);
        assert!(open.retry_after <= Duration::from_secs(60));
        let stats = breaker.stats();
        assert_eq!(stats.calls, calls_before, "a rejected call is not a call");
        assert!(stats.rejections >= 1);
    })
    .await;
}

#[tokio::test]
async fn tonic_server_rate_limit_is_resource_exhausted_and_does_not_trip_the_breaker() {
    within(15, async {
        let (listener, addr) = local_listener().await;
        tokio::spawn(tonic_layers::serve(
            listener,
            NO_REFILL,
            2,
            std::future::pending(),
        ));
        let breaker = resilience::CircuitBreaker::builder()
            .consecutive_failures(1)
            .build();
        let mut client = tonic_layers::connect(addr, breaker.clone()).await.unwrap();

        for _ in 0..2 {
            tonic_layers::check(&mut client).await.unwrap();
        }
        for _ in 0..2 {
            let err = tonic_layers::check(&mut client).await.unwrap_err();
            assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
            let retry_after = err
                .metadata()
                .get("retry-after")
                .expect("retry-after metadata")
                .to_str()
                .unwrap();
            assert!(retry_after.parse::<u64>().unwrap() >= 1);
        }
        assert_eq!(
            breaker.state(),
            CircuitState::Closed,
            "a gRPC error status is a response, not a transport failure"
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// reqwest_breaker
// ---------------------------------------------------------------------------------------

async fn start_upstream() -> (SocketAddr, reqwest_breaker::Hits) {
    let (listener, addr) = local_listener().await;
    let hits = reqwest_breaker::Hits::default();
    reqwest_breaker::spawn_upstream(listener, hits.clone());
    (addr, hits)
}

#[tokio::test]
async fn reqwest_5xx_opens_the_breaker_then_circuit_open_without_hitting_the_server() {
    within(10, async {
        let (addr, hits) = start_upstream().await;
        let breaker = resilience::CircuitBreaker::builder()
            .consecutive_failures(3)
            .open_for(Duration::from_secs(60))
            .build();
        let mut client = reqwest_breaker::layered(
            http(),
            breaker.clone(),
            1000.0,
            1000,
            Duration::from_secs(1),
        );
        let url = format!("http://{addr}/fail");

        for _ in 0..3 {
            let res = reqwest_breaker::send_get(&mut client, &url).await.unwrap();
            assert_eq!(
                res.status(),
                500,
                "5xx is a response; the breaker counts it"
            );
        }
        assert_eq!(hits.get(), 3);
        assert_eq!(breaker.state(), CircuitState::Open);

        for _ in 0..3 {
            let err = reqwest_breaker::send_get(&mut client, &format!("http://{addr}/ok"))
                .await
                .unwrap_err();
            let open = err
                .downcast_ref::<resilience::CircuitOpen>()
                .expect("CircuitOpen");
            assert!(open.retry_after <= Duration::from_secs(60));
        }
        assert_eq!(hits.get(), 3, "rejected calls never reach the server");
    })
    .await;
}

#[tokio::test]
async fn reqwest_wait_mode_smooths_calls() {
    within(10, async {
        let (addr, hits) = start_upstream().await;
        // Burst 1 at 20/s: after the first call, one call per 50 ms.
        let mut client = reqwest_breaker::layered(
            http(),
            resilience::CircuitBreaker::new(),
            20.0,
            1,
            Duration::from_secs(1),
        );
        let url = format!("http://{addr}/ok");

        let start = tokio::time::Instant::now();
        for _ in 0..5 {
            let res = reqwest_breaker::send_get(&mut client, &url).await.unwrap();
            assert_eq!(res.status(), 200, "waiting, not failing");
        }
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_millis(190),
            "5 calls at 20/s with burst 1 take at least 200 ms, took {elapsed:?}"
        );
        assert_eq!(hits.get(), 5);
    })
    .await;
}

#[tokio::test]
async fn reqwest_wait_mode_gives_up_past_max_wait() {
    within(10, async {
        let (addr, hits) = start_upstream().await;
        // One token per 10 s, but a call waits at most 50 ms.
        let mut client = reqwest_breaker::layered(
            http(),
            resilience::CircuitBreaker::new(),
            0.1,
            1,
            Duration::from_millis(50),
        );
        let url = format!("http://{addr}/ok");

        reqwest_breaker::send_get(&mut client, &url).await.unwrap();
        let start = tokio::time::Instant::now();
        let err = reqwest_breaker::send_get(&mut client, &url)
            .await
            .unwrap_err();
        let limited = err
            .downcast_ref::<resilience::RateLimited>()
            .expect("RateLimited");
        assert!(limited.retry_after > Duration::from_millis(50));
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "it does not sleep 10 s first"
        );
        assert_eq!(hits.get(), 1);
    })
    .await;
}
