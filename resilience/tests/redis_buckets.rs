//! Token buckets shared through Redis (feature `redis`), against a real Redis.
//!
//! The tests need Redis on 127.0.0.1:6379 (and `redis-server` on the PATH for the one
//! that kills its own server). Without it they print why and pass, unless
//! `PRESENCE_REQUIRE_REDIS=1`, which makes a missing Redis a failure. Redis keeps time
//! with `TIME`, which paused tokio time cannot move: these tests run on real time and
//! assert bounds that hold whatever the scheduling. Every test uses a key prefix of its
//! own, so they share the server with anyone.
#![cfg(feature = "redis")]

use std::{
    convert::Infallible,
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime},
};

use http::{Request, Response, StatusCode};
use proptest::prelude::*;
use resilience::{
    key_fn, BoxError, Burst, PeerIp, Rate, RateLimited, RedisBuckets, RedisFallback,
    RedisTokenBucketLayer, TokenBucketLayer,
};
use tower::{service_fn, Layer, ServiceExt};

const REDIS: &str = "redis://127.0.0.1:6379";

fn required() -> bool {
    std::env::var("PRESENCE_REQUIRE_REDIS").is_ok_and(|v| v.trim() == "1")
}

/// Skips (prints why, returns `false`) or, with `PRESENCE_REQUIRE_REDIS=1`, fails.
fn skip(test: &str, why: &str) -> bool {
    assert!(
        !required(),
        "{test}: Redis is required (PRESENCE_REQUIRE_REDIS=1) but {why}"
    );
    eprintln!("skipped {test}: {why} (PRESENCE_REQUIRE_REDIS=1 makes this a failure)");
    false
}

async fn ping(uri: &str) -> Result<(), String> {
    let client = redis::Client::open(uri).map_err(|e| e.to_string())?;
    let pong = tokio::time::timeout(Duration::from_secs(2), async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await
    })
    .await;
    match pong {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer within 2 s".to_owned()),
    }
}

/// `true` if the shared Redis answers.
async fn redis_up(test: &str) -> bool {
    match ping(REDIS).await {
        Ok(()) => true,
        Err(e) => skip(test, &format!("Redis at {REDIS} is unreachable: {e}")),
    }
}

fn unique_prefix(test: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("resilience-test:{test}:{}:{nanos}:", std::process::id())
}

fn client(uri: &str) -> redis::Client {
    redis::Client::open(uri).unwrap()
}

fn buckets(
    uri: &str,
    prefix: &str,
    rate: f64,
    burst: u32,
    fallback: RedisFallback,
) -> RedisBuckets<u32> {
    RedisBuckets::builder(client(uri), Rate::per_second(rate), Burst(burst))
        .prefix(prefix)
        .timeout(Duration::from_millis(500))
        .fallback(fallback)
        .build()
}

#[tokio::test]
async fn the_shared_bucket_grants_the_burst_then_refuses_with_an_exact_wait() {
    if !redis_up("the_shared_bucket_grants_the_burst").await {
        return;
    }
    let prefix = unique_prefix("burst");
    let b = buckets(REDIS, &prefix, 1.0, 3, RedisFallback::Deny);
    let remaining: Vec<u32> = [
        b.try_acquire(&1).await.unwrap().remaining(),
        b.try_acquire(&1).await.unwrap().remaining(),
        b.try_acquire(&1).await.unwrap().remaining(),
    ]
    .into();
    assert_eq!(remaining, [2, 1, 0]);
    let RateLimited { retry_after } = b.try_acquire(&1).await.unwrap_err();
    assert!(
        retry_after > Duration::from_millis(900) && retry_after <= Duration::from_secs(1),
        "{retry_after:?}"
    );
    // Another key has its own bucket; a request over the burst never touches Redis.
    assert!(b.try_acquire(&2).await.is_ok());
    assert_eq!(
        b.try_acquire_n(&3, 4).await.unwrap_err().retry_after,
        Duration::MAX
    );
    assert_eq!(b.fallbacks(), 0);
}

/// One step of a schedule: after `gap_ms`, process `layer` sends `calls` at once.
#[derive(Clone, Debug)]
struct Step {
    layer: usize,
    calls: usize,
    gap_ms: u64,
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(
        (0..3usize, 1..6usize, 0..40u64).prop_map(|(layer, calls, gap_ms)| Step {
            layer,
            calls,
            gap_ms,
        }),
        1..12,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// Three layers, as three servers would build them (one client and one set of
    /// buckets each), share one Redis bucket: together they admit at most
    /// `burst + rate * t`, whatever the interleaving.
    #[test]
    fn three_layers_sharing_one_bucket_admit_at_most_burst_plus_rate_times_t(schedule in steps()) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            if !redis_up("three_layers_sharing_one_bucket").await {
                return Ok(());
            }
            let (rate, burst) = (20.0, 5);
            let prefix = unique_prefix("three");
            let layers: Vec<_> = (0..3)
                .map(|_| {
                    RedisTokenBucketLayer::new(
                        key_fn(|_: &u32| Some(7u32)),
                        buckets(REDIS, &prefix, rate, burst, RedisFallback::Deny),
                    )
                })
                .collect();
            let svcs: Vec<_> = layers
                .iter()
                .map(|l| l.layer(service_fn(|n: u32| async move { Ok::<_, Infallible>(n) })))
                .collect();
            let start = Instant::now();
            let mut admitted = 0u32;
            for step in &schedule {
                tokio::time::sleep(Duration::from_millis(step.gap_ms)).await;
                let calls = (0..step.calls).map(|_| svcs[step.layer].clone().oneshot(1));
                for outcome in futures_util::future::join_all(calls).await {
                    match outcome {
                        Ok(_) => admitted += 1,
                        Err(e) => assert!(e.downcast_ref::<RateLimited>().is_some(), "{e}"),
                    }
                }
            }
            let t = start.elapsed().as_secs_f64();
            let bound = f64::from(burst) + rate * t;
            for l in &layers {
                prop_assert_eq!(l.buckets().fallbacks(), 0);
            }
            prop_assert!(f64::from(admitted) <= bound, "admitted {} > {} + {} * {}", admitted, burst, rate, t);
            // And it does admit: at least the burst, when asked for that many.
            let asked: usize = schedule.iter().map(|s| s.calls).sum();
            prop_assert!(admitted as usize >= asked.min(burst as usize));
            Ok(())
        })?;
    }
}

#[tokio::test]
async fn http_mode_answers_the_same_429_and_headers_as_local_buckets() {
    if !redis_up("http_mode_answers_the_same_429").await {
        return;
    }
    let app = || service_fn(|_req: Request<()>| async { Ok::<_, Infallible>(Response::new(())) });
    let shared = RedisBuckets::builder(client(REDIS), Rate::per_second(1.0), Burst(2))
        .prefix(unique_prefix("http"))
        .timeout(Duration::from_millis(500))
        .fallback(RedisFallback::Deny)
        .build();
    let redis = RedisTokenBucketLayer::new(PeerIp, shared.clone())
        .http()
        .layer(app());
    let local = TokenBucketLayer::builder(Rate::per_second(1.0), Burst(2))
        .key(PeerIp)
        .build()
        .http()
        .layer(app());
    let request = || {
        let mut req = Request::new(());
        req.extensions_mut()
            .insert("192.0.2.9:5000".parse::<SocketAddr>().unwrap());
        req
    };
    let shape = |res: Response<_>| {
        let h = res.headers();
        let get = |name: &str| h.get(name).map(|v| v.to_str().unwrap().to_owned());
        (
            res.status(),
            get("retry-after"),
            get("ratelimit-policy"),
            get("ratelimit"),
            get("content-type"),
        )
    };
    for _ in 0..3 {
        let ours = shape(redis.clone().oneshot(request()).await.unwrap());
        let theirs = shape(local.clone().oneshot(request()).await.unwrap());
        assert_eq!(ours, theirs);
    }
    let last = shape(redis.clone().oneshot(request()).await.unwrap());
    assert_eq!(last.0, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(last.1.as_deref(), Some("1"));
    // No peer address: the same 500 as the local layer.
    let res = redis.clone().oneshot(Request::new(())).await.unwrap();
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(shared.fallbacks(), 0);

    // The body and the success headers are set as on the local layer.
    let quiet = RedisTokenBucketLayer::new(PeerIp, shared.clone())
        .http()
        .headers_on_success(false)
        .body(http::HeaderValue::from_static("text/plain"), "slow down\n")
        .layer(app());
    let mut req = request();
    req.extensions_mut()
        .insert("192.0.2.10:5000".parse::<SocketAddr>().unwrap());
    let res = quiet.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(res.headers().get("ratelimit").is_none());
    let mut statuses = Vec::new();
    for _ in 0..2 {
        let mut req = request();
        req.extensions_mut()
            .insert("192.0.2.10:5000".parse::<SocketAddr>().unwrap());
        statuses.push(quiet.clone().oneshot(req).await.unwrap());
    }
    let limited = statuses.pop().unwrap();
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(limited.headers()["content-type"], "text/plain");
}

/// A `redis-server` of the test's own on a free port, killed on drop.
struct OwnRedis {
    child: Child,
    uri: String,
}

impl OwnRedis {
    async fn start(test: &str) -> Option<OwnRedis> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(e) => {
                skip(test, &format!("redis-server cannot be started: {e}"));
                return None;
            }
        };
        let uri = format!("redis://127.0.0.1:{port}");
        let mut own = OwnRedis { child, uri };
        for _ in 0..100 {
            if ping(&own.uri).await.is_ok() {
                return Some(own);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        own.kill();
        skip(
            test,
            "the redis-server child did not answer PING within 5 s",
        );
        None
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test]
async fn killing_redis_makes_each_fallback_do_what_it_says() {
    let Some(mut server) = OwnRedis::start("killing_redis").await else {
        return;
    };
    let prefix = unique_prefix("kill");
    let local = buckets(&server.uri, &prefix, 1.0, 2, RedisFallback::Local);
    let allow = buckets(&server.uri, &prefix, 1.0, 2, RedisFallback::Allow);
    let deny = buckets(&server.uri, &prefix, 1.0, 2, RedisFallback::Deny);
    // While Redis is up all three share the bucket of key 1: two tokens in all.
    assert!(local.try_acquire(&1).await.is_ok());
    assert!(allow.try_acquire(&1).await.is_ok());
    assert!(deny.try_acquire(&1).await.is_err());
    assert_eq!(
        (local.fallbacks(), allow.fallbacks(), deny.fallbacks()),
        (0, 0, 0)
    );

    server.kill();

    // Local: this process's own bucket of the same rate and burst (starting full).
    let start = Instant::now();
    assert!(local.try_acquire(&1).await.is_ok());
    assert!(local.try_acquire(&1).await.is_ok());
    assert!(local.try_acquire(&1).await.is_err());
    assert_eq!(local.fallbacks(), 3);
    assert_eq!(local.local_buckets().len(), 1);
    // Allow: everything passes.
    for _ in 0..5 {
        assert!(allow.try_acquire(&1).await.is_ok());
    }
    assert_eq!(allow.fallbacks(), 5);
    // Deny: everything is refused, with one token's interval as the wait.
    for _ in 0..3 {
        let limited = deny.try_acquire(&1).await.unwrap_err();
        assert_eq!(limited.retry_after, Duration::from_secs(1));
    }
    assert_eq!(deny.fallbacks(), 3);
    // Eleven decisions, each bounded by the 500 ms timeout (a refused connection is
    // much faster than that).
    assert!(start.elapsed() < Duration::from_millis(11 * 500 + 1000));
}

#[tokio::test]
async fn a_redis_that_never_answers_is_bounded_by_the_timeout() {
    // A listener nobody accepts on: connections sit in the backlog, commands unanswered.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let uri = format!("redis://{}", listener.local_addr().unwrap());
    let b: RedisBuckets<u32> = RedisBuckets::builder(client(&uri), Rate::per_second(1.0), Burst(1))
        .prefix(unique_prefix("silent"))
        .timeout(Duration::from_millis(100))
        .fallback(RedisFallback::Allow)
        .build();
    for _ in 0..3 {
        let start = Instant::now();
        assert!(b.try_acquire(&1).await.is_ok());
        let took = start.elapsed();
        assert!(took < Duration::from_millis(600), "{took:?}");
    }
    assert_eq!(b.fallbacks(), 3);
    drop(listener);
}

#[test]
fn building_outside_a_runtime_is_an_error_not_a_panic_in_redis() {
    let err = RedisBuckets::builder(client(REDIS), Rate::per_second(1.0), Burst(1))
        .try_build::<u32>()
        .unwrap_err();
    assert!(err.to_string().contains("outside a tokio runtime"), "{err}");
}

#[tokio::test]
async fn error_mode_refuses_with_rate_limited_and_a_missing_key_with_missing_key() {
    if !redis_up("error_mode_refuses").await {
        return;
    }
    let layer = RedisTokenBucketLayer::new(
        key_fn(|req: &Option<u32>| *req),
        buckets(REDIS, &unique_prefix("error"), 1.0, 1, RedisFallback::Deny),
    );
    let svc = layer.layer(service_fn(|_req: Option<u32>| async {
        Ok::<_, BoxError>("ok")
    }));
    assert_eq!(svc.clone().oneshot(Some(1)).await.unwrap(), "ok");
    let err = svc.clone().oneshot(Some(1)).await.unwrap_err();
    assert!(err.downcast_ref::<RateLimited>().is_some());
    let err = svc.clone().oneshot(None).await.unwrap_err();
    assert!(err.downcast_ref::<resilience::MissingKey>().is_some());
}
