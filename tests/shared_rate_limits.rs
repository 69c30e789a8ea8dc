//! `PRESENCE_RATE_LIMIT_SCOPE=shared`: three servers on one Redis, one client
//! spraying requests over all three, real sockets, against a `redis-server` child of
//! each test's own (skipped with a reason when `redis-server` is missing, unless
//! `PRESENCE_REQUIRE_REDIS=1`).
//!
//! - Shared: the client is granted at most `capacity + rate × t` (+1) in all, where
//!   `server` scope grants about three times that.
//! - The shared limit's `429` carries the same headers as a server's own.
//! - Redis killed: every request is still answered within the store timeout (+200 ms),
//!   limited by each server's own buckets, and `presence_rate_limit_fallbacks_total`
//!   counts it.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use presence::config::{Config, RateLimitScope};
use support::client::http;
use support::redis::RedisChild;
use support::server::TestServer;
use support::{metric_value, unlimited_config, within};

const RATE: f64 = 20.0;
const CAPACITY: u32 = 10;
const STORE_TIMEOUT: Duration = Duration::from_millis(500);

fn config(redis: &RedisChild, scope: RateLimitScope) -> Config {
    let mut c = unlimited_config(STORE_TIMEOUT);
    c.store_uri = Some(redis.uri());
    c.key_prefix = "shared-limits".into();
    c.rate_limit_rate = RATE;
    c.rate_limit_capacity = CAPACITY;
    c.rate_limit_scope = scope;
    c
}

async fn servers(config: &Config, n: usize) -> Vec<TestServer> {
    let mut out = Vec::new();
    for _ in 0..n {
        let store = presence::store::open(config.store_uri.as_deref(), &config.key_prefix)
            .await
            .expect("open the store");
        out.push(TestServer::start(config, store).await);
    }
    out
}

/// What one client got from spraying `GET /presence/stats` over `servers` for `for_`,
/// `in_flight` requests at a time: (granted, refused with 429, other statuses, the longest
/// answer, how long the spray took).
struct Spray {
    granted: u64,
    limited: u64,
    other: Vec<u16>,
    slowest: Duration,
    took: Duration,
}

async fn spray(servers: &[TestServer], for_: Duration, in_flight: usize) -> Spray {
    let client = http();
    let urls: Arc<Vec<String>> =
        Arc::new(servers.iter().map(|s| s.url("/presence/stats")).collect());
    let start = Instant::now();
    let tasks: Vec<_> = (0..in_flight)
        .map(|t| {
            let (client, urls) = (client.clone(), urls.clone());
            tokio::spawn(async move {
                let mut out = (0u64, 0u64, Vec::new(), Duration::ZERO);
                let mut i = t;
                while start.elapsed() < for_ {
                    let sent = Instant::now();
                    let status = match client.get(&urls[i % urls.len()]).send().await {
                        Ok(r) => r.status().as_u16(),
                        Err(_) => 0,
                    };
                    out.3 = out.3.max(sent.elapsed());
                    match status {
                        200 => out.0 += 1,
                        429 => out.1 += 1,
                        other => out.2.push(other),
                    }
                    i += 1;
                }
                out
            })
        })
        .collect();
    let mut spray = Spray {
        granted: 0,
        limited: 0,
        other: Vec::new(),
        slowest: Duration::ZERO,
        took: Duration::ZERO,
    };
    for task in tasks {
        let (granted, limited, other, slowest) = task.await.expect("spray task");
        spray.granted += granted;
        spray.limited += limited;
        spray.other.extend(other);
        spray.slowest = spray.slowest.max(slowest);
    }
    spray.took = start.elapsed();
    spray
}

/// `presence_rate_limit_fallbacks_total` of `server` (0 when not served).
async fn fallbacks(server: &TestServer) -> f64 {
    let scrape = http()
        .get(server.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    metric_value(&scrape, "presence_rate_limit_fallbacks_total").unwrap_or(0.0)
}

/// `capacity + rate × t + 1`: what one bucket may grant over `t`.
fn bound(t: Duration) -> u64 {
    bound_of(RATE, CAPACITY, t)
}

fn bound_of(rate: f64, capacity: u32, t: Duration) -> u64 {
    (f64::from(capacity) + rate * t.as_secs_f64()).floor() as u64 + 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_share_one_bucket_per_client_where_server_scope_grants_three() {
    let Some(redis) = RedisChild::start("shared_rate_limits").await else {
        return;
    };
    within(60, async {
        let shared = servers(&config(&redis, RateLimitScope::Shared), 3).await;
        let s = spray(&shared, Duration::from_secs(5), 4).await;
        eprintln!(
            "shared: {} granted, {} limited in {:?} (bound {})",
            s.granted,
            s.limited,
            s.took,
            bound(s.took)
        );
        assert!(s.other.is_empty(), "only 200 and 429: {:?}", s.other);
        assert!(
            s.granted <= bound(s.took),
            "granted {} > bound {}",
            s.granted,
            bound(s.took)
        );
        // The bucket was used up and refilled: far more asked than granted.
        assert!(s.granted >= bound(s.took) / 2, "granted only {}", s.granted);
        assert!(s.limited > s.granted, "{} limited", s.limited);
        for server in &shared {
            assert_eq!(
                fallbacks(server).await,
                0.0,
                "Redis answered every decision"
            );
        }
        drop(shared);

        // The same spray on per-server buckets (another prefix: fresh buckets).
        let mut per_server = config(&redis, RateLimitScope::Server);
        per_server.key_prefix = "server-limits".into();
        let own = servers(&per_server, 3).await;
        let o = spray(&own, Duration::from_secs(5), 4).await;
        eprintln!(
            "server scope: {} granted, {} limited in {:?}",
            o.granted, o.limited, o.took
        );
        assert!(o.other.is_empty(), "only 200 and 429: {:?}", o.other);
        assert!(o.granted <= 3 * bound(o.took), "granted {}", o.granted);
        assert!(
            o.granted > 2 * bound(o.took),
            "three servers' own buckets grant about three times one bucket: {} vs {}",
            o.granted,
            bound(o.took)
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_limits_429_carries_the_headers_of_a_servers_own() {
    let Some(redis) = RedisChild::start("shared_rate_limit_headers").await else {
        return;
    };
    within(30, async {
        let mut headers = Vec::new();
        for (scope, prefix) in [
            (RateLimitScope::Shared, "h-shared"),
            (RateLimitScope::Server, "h-own"),
        ] {
            let mut cfg = config(&redis, scope);
            cfg.key_prefix = prefix.into();
            let server = servers(&cfg, 1).await.remove(0);
            let client = http();
            let refused = loop {
                let r = client
                    .get(server.url("/presence/stats"))
                    .send()
                    .await
                    .expect("request");
                if r.status() == 429 {
                    break r;
                }
            };
            let mut names: Vec<String> = refused
                .headers()
                .keys()
                .map(|k| k.as_str().to_owned())
                .collect();
            names.retain(|n| {
                n.starts_with("ratelimit") || n == "retry-after" || n == "content-type"
            });
            names.sort();
            let body: serde_json::Value = refused.json().await.expect("a JSON body");
            assert_eq!(body["error"], "rate_limited", "{body}");
            headers.push(names);
        }
        assert!(
            headers[0].contains(&"retry-after".to_owned()),
            "{:?}",
            headers[0]
        );
        assert_eq!(headers[0], headers[1], "shared vs the server's own");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_each_server_limits_with_its_own_buckets_and_says_so() {
    let Some(mut redis) = RedisChild::start("shared_rate_limit_fallback").await else {
        return;
    };
    within(60, async {
        // A small bucket: each decision now waits out the Redis timeout, so few
        // requests are made.
        let mut cfg = config(&redis, RateLimitScope::Shared);
        cfg.rate_limit_rate = 2.0;
        cfg.rate_limit_capacity = 5;
        let shared = servers(&cfg, 3).await;
        redis.kill();
        let s = spray(&shared, Duration::from_secs(3), 32).await;
        eprintln!(
            "Redis down: {} granted (then 503 from the store), {} limited, slowest {:?}",
            s.other.len(),
            s.limited,
            s.slowest
        );
        // Granted requests reach the (dead) store: 503; refused ones are 429.
        assert!(s.other.iter().all(|&st| st == 503), "{:?}", s.other);
        assert!(s.granted == 0);
        let through = s.other.len() as u64;
        let local = bound_of(2.0, 5, s.took);
        assert!(
            through <= 3 * local,
            "{through} through the local buckets (3 x {local})"
        );
        assert!(s.limited > 0, "the local buckets limit");
        assert!(
            s.slowest <= STORE_TIMEOUT * 2 + Duration::from_millis(400),
            "answered within the bounds: {:?}",
            s.slowest
        );
        let mut counted = 0.0;
        for _ in 0..30 {
            counted = 0.0;
            for server in &shared {
                counted += fallbacks(server).await;
            }
            if counted >= (through + s.limited) as f64 * 0.9 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            counted >= (through + s.limited) as f64 * 0.9,
            "fallbacks counted: {counted} of {} decisions",
            through + s.limited
        );
    })
    .await;
}
