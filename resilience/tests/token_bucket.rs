//! Token bucket: the bucket's guarantees, keyed buckets, and the layer's three modes.
//!
//! Time-dependent tests run on tokio's paused clock; only the two-thread test uses real
//! time, and it asserts a bound that holds whatever the scheduling.

use std::{
    convert::Infallible,
    future::Future,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use proptest::prelude::*;
use resilience::{
    key_fn, BoxError, Burst, KeyedTokenBuckets, MissingKey, PeerIp, Rate, RateLimited, TokenBucket,
    TokenBucketLayer,
};
use tokio::time::{advance, Instant};
use tower::{service_fn, Layer, Service, ServiceExt};

const MS: Duration = Duration::from_millis(1);

fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime")
}

// ---------------------------------------------------------------------------------------
// TokenBucket

#[tokio::test(start_paused = true)]
async fn burst_of_capacity_then_one_token_per_interval() {
    let bucket = TokenBucket::new(Rate::per_second(4.0), Burst(3));
    assert_eq!(bucket.remaining(), 3);
    for _ in 0..3 {
        bucket.try_acquire().unwrap();
    }
    assert_eq!(bucket.remaining(), 0);
    assert_eq!(
        bucket.try_acquire(),
        Err(RateLimited {
            retry_after: Duration::from_millis(250)
        })
    );
    advance(Duration::from_millis(250)).await;
    bucket.try_acquire().unwrap();
    assert!(bucket.try_acquire().is_err());
    // Refills to full, never beyond.
    advance(Duration::from_secs(60)).await;
    assert_eq!(bucket.remaining(), 3);
    assert_eq!(bucket.time_until_full(), Duration::ZERO);
    bucket.try_acquire_n(3).unwrap();
    assert!(bucket.try_acquire().is_err());
}

#[tokio::test(start_paused = true)]
async fn remaining_and_time_until_full_track_the_refill() {
    let bucket = TokenBucket::new(Rate::per_second(10.0), Burst(5));
    assert_eq!((bucket.rate(), bucket.burst()), (Rate::per_second(10.0), 5));
    assert_eq!(bucket.rate().as_per_second(), 10.0);
    bucket.try_acquire_n(5).unwrap();
    assert_eq!(bucket.remaining(), 0);
    assert_eq!(bucket.time_until_full(), Duration::from_millis(500));
    advance(Duration::from_millis(250)).await;
    assert_eq!(bucket.remaining(), 2);
    assert_eq!(bucket.time_until_full(), Duration::from_millis(250));
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_exact_for_a_rate_with_a_fractional_interval() {
    // 1/3 s is not a whole number of nanoseconds: the interval rounds up, never down.
    let bucket = TokenBucket::new(Rate::per_second(3.0), Burst(1));
    bucket.try_acquire().unwrap();
    let retry = bucket.try_acquire().unwrap_err().retry_after;
    assert!(
        retry >= Duration::from_nanos(333_333_333) && retry <= Duration::from_nanos(333_333_334)
    );
    advance(retry - MS).await;
    assert_eq!(bucket.try_acquire().unwrap_err().retry_after, MS);
    advance(MS).await;
    bucket.try_acquire().unwrap();
}

#[tokio::test(start_paused = true)]
async fn fractional_rate_refills_one_token_every_two_seconds() {
    let bucket = TokenBucket::new(Rate::per_second(0.5), Burst(1));
    bucket.try_acquire().unwrap();
    assert_eq!(
        bucket.try_acquire().unwrap_err().retry_after,
        Duration::from_secs(2)
    );
    advance(Duration::from_millis(1999)).await;
    assert!(bucket.try_acquire().is_err());
    advance(MS).await;
    bucket.try_acquire().unwrap();
}

#[tokio::test(start_paused = true)]
async fn more_tokens_than_capacity_fail_at_once_and_never_wait() {
    let bucket = TokenBucket::new(Rate::per_second(1.0), Burst(5));
    let err = bucket.try_acquire_n(6).unwrap_err();
    assert_eq!(err.retry_after, Duration::MAX);
    assert!(err.is_permanent());

    let start = Instant::now();
    let err = bucket.acquire_n(6).await.unwrap_err();
    assert!(err.is_permanent());
    assert_eq!(start.elapsed(), Duration::ZERO);
    // Nothing was taken.
    assert_eq!(bucket.remaining(), 5);
}

#[tokio::test(start_paused = true)]
async fn acquire_waits_exactly_until_the_token_is_due() {
    let bucket = TokenBucket::new(Rate::per_second(10.0), Burst(1));
    let start = Instant::now();
    bucket.acquire().await;
    assert_eq!(start.elapsed(), Duration::ZERO);
    bucket.acquire().await;
    assert_eq!(start.elapsed(), Duration::from_millis(100));
    bucket.acquire_n(1).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(200));
}

#[tokio::test(start_paused = true)]
async fn concurrent_waiters_are_served_in_order_one_interval_apart() {
    let bucket = TokenBucket::new(Rate::per_second(10.0), Burst(1));
    bucket.try_acquire().unwrap();
    let start = Instant::now();
    let waiters: Vec<_> = (0..3)
        .map(|_| {
            let bucket = bucket.clone();
            tokio::spawn(async move {
                bucket.acquire().await;
                start.elapsed()
            })
        })
        .collect();
    let mut done = Vec::new();
    for w in waiters {
        done.push(w.await.unwrap());
    }
    done.sort();
    assert_eq!(
        done,
        [100, 200, 300].map(Duration::from_millis).to_vec(),
        "each waiter gets the next token"
    );
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_acquire_gives_its_token_back() {
    let bucket = TokenBucket::new(Rate::per_second(1.0), Burst(1));
    bucket.try_acquire().unwrap();
    let waiting = tokio::time::timeout(Duration::from_millis(100), bucket.acquire()).await;
    assert!(waiting.is_err(), "timed out while waiting");
    // Had the cancelled waiter kept its booking, the next token would be due at 2 s.
    advance(Duration::from_millis(900)).await;
    bucket.try_acquire().unwrap();
}

#[tokio::test(start_paused = true)]
async fn clones_share_one_bucket() {
    let a = TokenBucket::new(Rate::per_second(1.0), Burst(2));
    let b = a.clone();
    a.try_acquire().unwrap();
    b.try_acquire().unwrap();
    assert!(a.try_acquire().is_err());
    assert_eq!(b.remaining(), 0);
}

#[test]
fn invalid_parameters_are_refused() {
    assert!(Rate::try_per_second(0.0).is_err());
    assert!(Rate::try_per_second(f64::NAN).is_err());
    let err = Rate::try_per_second(-1.0).unwrap_err();
    assert!(err.to_string().contains("rate"), "{err}");
    let one = Rate::per_second(1.0);
    let err = TokenBucket::try_new(one, Burst(0)).unwrap_err();
    assert!(err.to_string().contains("burst"), "{err}");
    assert!(TokenBucket::try_new(Rate::per_second(1e-12), Burst(u32::MAX)).is_err());
    assert!(KeyedTokenBuckets::<u32>::try_new(one, Burst(0)).is_err());
    assert!(KeyedTokenBuckets::<u32>::try_with_max_keys(one, Burst(1), 0).is_err());
    assert!(TokenBucketLayer::try_new(one, Burst(0)).is_err());
    let err = TokenBucketLayer::builder(one, Burst(1))
        .key(PeerIp)
        .max_keys(0)
        .try_build()
        .unwrap_err();
    assert!(err.to_string().contains("max_keys"), "{err}");
}

#[test]
#[should_panic(expected = "the rate must be a finite number above 0")]
fn infallible_constructors_panic_on_bad_values() {
    let _ = Rate::per_second(0.0);
}

#[test]
#[should_panic(expected = "the burst must be at least 1")]
fn a_zero_burst_panics() {
    let _ = TokenBucket::new(Rate::per_second(1.0), Burst(0));
}

#[test]
fn two_threads_hammering_one_bucket_stay_within_capacity_plus_rate_times_t() {
    const RATE: f64 = 20_000.0;
    const CAPACITY: u32 = 100;
    // Taken before the bucket exists, so `elapsed` covers every possible grant.
    let start = std::time::Instant::now();
    let bucket = TokenBucket::new(Rate::per_second(RATE), Burst(CAPACITY));
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let bucket = bucket.clone();
            std::thread::spawn(move || {
                let mut granted = 0u64;
                while start.elapsed() < Duration::from_millis(300) {
                    if bucket.try_acquire().is_ok() {
                        granted += 1;
                    }
                }
                granted
            })
        })
        .collect();
    let granted: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    let elapsed = start.elapsed().as_secs_f64();
    let bound = f64::from(CAPACITY) + RATE * elapsed;
    assert!(
        granted as f64 <= bound,
        "granted {granted} > bound {bound:.0}"
    );
    assert!(
        granted >= u64::from(CAPACITY),
        "granted {granted}: not even the burst"
    );
}

fn advance_strategy() -> impl Strategy<Value = u64> {
    // Nanoseconds: often sub-millisecond (bursts), sometimes seconds (refills).
    prop_oneof![0u64..1_000_000, 0u64..50_000_000, 0u64..3_000_000_000]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// For every window between two grants, the tokens granted in it are at most
    /// `capacity + rate * window`; and an idle bucket refills to full.
    #[test]
    fn grants_never_exceed_capacity_plus_rate_times_t(
        rate in prop_oneof![0.05f64..2.0, 1.0f64..1_000.0, 1_000.0f64..1e7],
        capacity in 1u32..40,
        schedule in prop::collection::vec((advance_strategy(), 1u32..45), 1..150),
    ) {
        paused_runtime().block_on(async move {
            let bucket = TokenBucket::new(Rate::per_second(rate), Burst(capacity));
            let start = Instant::now();
            let mut grants: Vec<(Duration, u32)> = Vec::new();
            for (nanos, n) in schedule {
                advance(Duration::from_nanos(nanos)).await;
                match bucket.try_acquire_n(n) {
                    Ok(()) => grants.push((start.elapsed(), n)),
                    Err(e) if n > capacity => prop_assert!(e.is_permanent()),
                    Err(e) => prop_assert!(e.retry_after > Duration::ZERO),
                }
            }
            for i in 0..grants.len() {
                let mut tokens = 0u64;
                for j in i..grants.len() {
                    tokens += u64::from(grants[j].1);
                    let window = (grants[j].0 - grants[i].0).as_secs_f64();
                    let bound = f64::from(capacity) + rate * window;
                    prop_assert!(
                        tokens as f64 <= bound * (1.0 + 1e-12),
                        "{} tokens in {}s > {}", tokens, window, bound
                    );
                }
            }
            advance(bucket.time_until_full()).await;
            prop_assert_eq!(bucket.remaining(), capacity);
            prop_assert!(bucket.try_acquire_n(capacity).is_ok());
            Ok(())
        })?;
    }

    /// `retry_after` is exact: 1 ms earlier the request fails, at `retry_after` it passes.
    #[test]
    fn retry_after_is_exact(
        rate in prop_oneof![0.05f64..2.0, 1.0f64..1_000.0],
        capacity in 1u32..20,
        warmup in prop::collection::vec((advance_strategy(), 1u32..20), 0..30),
        n in 1u32..20,
    ) {
        paused_runtime().block_on(async move {
            let bucket = TokenBucket::new(Rate::per_second(rate), Burst(capacity));
            for (nanos, k) in warmup {
                advance(Duration::from_nanos(nanos)).await;
                let _ = bucket.try_acquire_n(k.min(capacity));
            }
            let n = n.min(capacity);
            // Drain until refused, so there is a retry_after to check.
            let retry = loop {
                match bucket.try_acquire_n(n) {
                    Ok(()) => continue,
                    Err(e) => break e.retry_after,
                }
            };
            if retry > MS {
                advance(retry - MS).await;
                let again = bucket.try_acquire_n(n);
                prop_assert_eq!(again, Err(RateLimited { retry_after: MS }));
                advance(MS).await;
            } else {
                advance(retry).await;
            }
            prop_assert_eq!(bucket.try_acquire_n(n), Ok(()));
            Ok(())
        })?;
    }
}

// ---------------------------------------------------------------------------------------
// KeyedTokenBuckets

#[tokio::test(start_paused = true)]
async fn keyed_buckets_are_independent() {
    let keyed = KeyedTokenBuckets::<&'static str>::new(Rate::per_second(1.0), Burst(2));
    assert_eq!(keyed.try_acquire(&"a").unwrap().remaining(), 1);
    assert_eq!(keyed.try_acquire(&"a").unwrap().remaining(), 0);
    let limited = keyed.try_acquire(&"a").unwrap_err();
    assert_eq!(limited.retry_after, Duration::from_secs(1));
    let b = keyed.try_acquire(&"b").unwrap();
    assert_eq!(b.remaining(), 1);
    assert_eq!(b.time_until_full(), Duration::from_secs(1));
    assert_eq!(keyed.remaining(&"a"), 0);
    assert_eq!(keyed.remaining(&"never-seen"), 2);
    assert_eq!(keyed.time_until_full(&"a"), Duration::from_secs(2));
    assert_eq!(keyed.len(), 2);
    advance(Duration::from_secs(1)).await;
    keyed.try_acquire(&"a").unwrap();
    assert!(keyed.try_acquire(&"a").is_err());
}

#[tokio::test(start_paused = true)]
async fn keyed_retry_after_is_exact_and_oversized_requests_store_nothing() {
    let keyed = KeyedTokenBuckets::<u32>::new(Rate::per_second(5.0), Burst(1));
    keyed.try_acquire(&7).unwrap();
    let retry = keyed.try_acquire(&7).unwrap_err().retry_after;
    assert_eq!(retry, Duration::from_millis(200));
    advance(retry - MS).await;
    assert!(keyed.try_acquire(&7).is_err());
    advance(MS).await;
    keyed.try_acquire(&7).unwrap();

    assert!(keyed.try_acquire_n(&8, 2).unwrap_err().is_permanent());
    assert_eq!(
        keyed.len(),
        1,
        "a request that can never pass creates no bucket"
    );
}

#[tokio::test(start_paused = true)]
async fn full_buckets_are_evicted_first_and_lose_nothing() {
    // Under 64 keys the map is a single shard, so the cap is exact.
    let keyed = KeyedTokenBuckets::<u32>::with_max_keys(Rate::per_second(1.0), Burst(2), 40);
    assert_eq!(keyed.max_keys(), 40);
    for k in 0..20 {
        keyed.try_acquire(&k).unwrap();
    }
    advance(Duration::from_secs(5)).await; // keys 0..20 are full again
    for k in 100..120 {
        keyed.try_acquire(&k).unwrap();
    }
    assert_eq!(keyed.len(), 40);
    keyed.try_acquire(&1000).unwrap(); // at the cap: evicts
    assert_eq!(keyed.len(), 21, "exactly the 20 full buckets went");
    for k in 100..120 {
        assert_eq!(keyed.remaining(&k), 1, "non-full bucket {k} kept its state");
    }
    assert_eq!(keyed.remaining(&1000), 1);
}

// Real time, so the flood runs at full speed; at 0.01 tokens/s nothing refills while it
// runs, so the outcome does not depend on how fast the machine is.
#[test]
fn million_distinct_keys_keep_the_map_at_its_cap_and_the_abuser_stays_limited() {
    let keyed = KeyedTokenBuckets::<IpAddr>::new(Rate::per_second(0.01), Burst(10));
    assert_eq!(keyed.max_keys(), 100_000);
    let abuser = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1));
    keyed.try_acquire_n(&abuser, 10).unwrap();

    let started = std::time::Instant::now();
    for i in 0..1_000_000u32 {
        let ip = IpAddr::V4(Ipv4Addr::from(i));
        keyed.try_acquire(&ip).unwrap();
        if i % 100_000 == 0 {
            assert!(keyed.len() <= 100_000);
        }
    }
    let len = keyed.len();
    assert!(len <= 100_000, "len {len} over the cap");
    assert!(
        len >= 100_000 * 3 / 4,
        "len {len}: evicted far more than needed"
    );
    // Its bucket is the furthest from full, so the flood never evicted it.
    assert!(
        keyed.try_acquire(&abuser).is_err(),
        "the abuser got a fresh bucket"
    );
    eprintln!("1M keys in {:?}", started.elapsed());
}

#[test]
fn slot_bytes_per_key() {
    // Key + 4-byte hash + 8-byte state, padded, + 1 control byte.
    assert_eq!(KeyedTokenBuckets::<IpAddr>::slot_bytes(), 33);
    assert_eq!(KeyedTokenBuckets::<u64>::slot_bytes(), 25);
}

// ---------------------------------------------------------------------------------------
// TokenBucketLayer, error mode

async fn echo(req: &'static str) -> Result<&'static str, Infallible> {
    Ok(req)
}

#[tokio::test(start_paused = true)]
async fn error_mode_fails_with_rate_limited_and_stays_ready() {
    let mut svc = TokenBucketLayer::new(Rate::per_second(2.0), Burst(1)).layer(service_fn(echo));
    assert_eq!(svc.ready().await.unwrap().call("a").await.unwrap(), "a");
    let err = svc.ready().await.unwrap().call("b").await.unwrap_err();
    assert_eq!(
        err.downcast_ref::<RateLimited>(),
        Some(&RateLimited {
            retry_after: Duration::from_millis(500)
        })
    );
    // poll_ready never reports the limit: tower would drop the service.
    assert!(svc.ready().await.is_ok());
    advance(Duration::from_millis(500)).await;
    assert_eq!(svc.ready().await.unwrap().call("c").await.unwrap(), "c");
}

#[tokio::test(start_paused = true)]
async fn layer_state_is_shared_by_its_services_their_clones_and_layer_clones() {
    let layer = TokenBucketLayer::new(Rate::per_second(1.0), Burst(3));
    let a = layer.layer(service_fn(echo));
    let b = layer.clone().layer(service_fn(echo));
    a.clone().oneshot("1").await.unwrap();
    b.clone().oneshot("2").await.unwrap();
    a.oneshot("3").await.unwrap();
    let err = b.oneshot("4").await.unwrap_err();
    assert!(err.is::<RateLimited>());

    // Keyed the same way: one map for everything the layer made.
    let layer = TokenBucketLayer::builder(Rate::per_second(1.0), Burst(1))
        .key(PeerIp)
        .build();
    let ok = service_fn(|_req: Request<()>| async { Ok::<_, Infallible>(()) });
    let a = layer.layer(ok);
    let b = layer.layer(ok);
    a.oneshot(from_peer("192.0.2.1:1")).await.unwrap();
    let err = b
        .clone()
        .oneshot(from_peer("192.0.2.1:2"))
        .await
        .unwrap_err();
    assert!(err.is::<RateLimited>(), "same IP, other service: {err}");
    b.oneshot(from_peer("192.0.2.2:1")).await.unwrap();
}

#[tokio::test]
async fn error_mode_missing_key_is_an_error_naming_it() {
    let svc = TokenBucketLayer::builder(Rate::per_second(1.0), Burst(1))
        .key(PeerIp)
        .build()
        .layer(service_fn(|_req: Request<()>| async {
            Ok::<_, Infallible>(())
        }));
    let err = svc.oneshot(Request::new(())).await.unwrap_err();
    let missing = err.downcast_ref::<MissingKey>().expect("MissingKey");
    assert!(missing.what().starts_with("peer address"), "{missing}");
}

fn from_peer(addr: &str) -> Request<()> {
    let mut req = Request::new(());
    req.extensions_mut()
        .insert(addr.parse::<SocketAddr>().unwrap());
    req
}

// ---------------------------------------------------------------------------------------
// HTTP mode

fn hello_service() -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send,
> + Clone {
    service_fn(|_req: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"hello"))))
    })
}

fn http_request(peer: &str) -> Request<Full<Bytes>> {
    let mut req = Request::new(Full::default());
    req.extensions_mut()
        .insert(peer.parse::<SocketAddr>().unwrap());
    req
}

fn header<'a, B>(res: &'a Response<B>, name: &str) -> &'a str {
    res.headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn http_mode_answers_429_with_retry_after_and_ratelimit_fields() {
    // 5/s: the next token is 0.2 s away, which Retry-After rounds up to 1.
    let svc = TokenBucketLayer::builder(Rate::per_second(5.0), Burst(2))
        .key(PeerIp)
        .build()
        .http()
        .layer(hello_service());

    let first = svc
        .clone()
        .oneshot(http_request("198.51.100.1:1000"))
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(header(&first, "ratelimit-policy"), "\"default\";q=2;w=1");
    assert_eq!(header(&first, "ratelimit"), "\"default\";r=1;t=1");
    let second = svc
        .clone()
        .oneshot(http_request("198.51.100.1:1000"))
        .await
        .unwrap();
    assert_eq!(header(&second, "ratelimit"), "\"default\";r=0;t=1");
    assert_eq!(
        second.into_body().collect().await.unwrap().to_bytes(),
        "hello"
    );

    let limited = svc
        .clone()
        .oneshot(http_request("198.51.100.1:1000"))
        .await
        .unwrap();
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&limited, "retry-after"), "1");
    assert_eq!(header(&limited, "ratelimit-policy"), "\"default\";q=2;w=1");
    assert_eq!(header(&limited, "ratelimit"), "\"default\";r=0;t=1");
    assert_eq!(header(&limited, "content-type"), "application/json");
    let body = limited.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        body,
        r#"{"error":"rate_limited","message":"rate limited; retry after 1 s"}"#
    );

    // Another client is not affected.
    let other = svc
        .clone()
        .oneshot(http_request("198.51.100.2:1000"))
        .await
        .unwrap();
    assert_eq!(other.status(), StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn http_mode_reports_window_and_seconds_until_full_rounded_up() {
    // 10 tokens at 2/s: the window is 5 s.
    let svc = TokenBucketLayer::new(Rate::per_second(2.0), Burst(10))
        .http()
        .layer(hello_service());
    let mut last = None;
    for _ in 0..10 {
        last = Some(
            svc.clone()
                .oneshot(http_request("192.0.2.1:1"))
                .await
                .unwrap(),
        );
    }
    let last = last.unwrap();
    assert_eq!(header(&last, "ratelimit-policy"), "\"default\";q=10;w=5");
    assert_eq!(header(&last, "ratelimit"), "\"default\";r=0;t=5");
    advance(Duration::from_millis(1_600)).await;
    let limited = svc
        .clone()
        .oneshot(http_request("192.0.2.1:1"))
        .await
        .unwrap();
    assert_eq!(
        limited.status(),
        StatusCode::OK,
        "3 tokens are back after 1.6 s"
    );
    assert_eq!(header(&limited, "ratelimit"), "\"default\";r=2;t=4");

    // 1.5 s for the next token: Retry-After 2.
    let svc = TokenBucketLayer::new(Rate::per_second(1.0 / 1.5), Burst(1))
        .http()
        .layer(hello_service());
    svc.clone()
        .oneshot(http_request("192.0.2.1:1"))
        .await
        .unwrap();
    let limited = svc
        .clone()
        .oneshot(http_request("192.0.2.1:1"))
        .await
        .unwrap();
    assert_eq!(header(&limited, "retry-after"), "2");
    assert_eq!(header(&limited, "ratelimit-policy"), "\"default\";q=1;w=2");
}

#[tokio::test(start_paused = true)]
async fn http_mode_body_is_configurable() {
    let svc = TokenBucketLayer::new(Rate::per_second(1.0), Burst(1))
        .http()
        .body(http::HeaderValue::from_static("text/plain"), "slow down")
        .layer(hello_service());
    svc.clone()
        .oneshot(http_request("192.0.2.1:1"))
        .await
        .unwrap();
    let limited = svc.oneshot(http_request("192.0.2.1:1")).await.unwrap();
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&limited, "content-type"), "text/plain");
    assert_eq!(header(&limited, "retry-after"), "1");
    assert_eq!(
        limited.into_body().collect().await.unwrap().to_bytes(),
        "slow down"
    );
}

#[tokio::test(start_paused = true)]
async fn http_mode_keeps_ratelimit_headers_the_inner_service_set() {
    let inner = service_fn(|_req: Request<Full<Bytes>>| async {
        let mut res = Response::new(Full::new(Bytes::new()));
        res.headers_mut().insert(
            "ratelimit",
            http::HeaderValue::from_static("\"upstream\";r=0;t=9"),
        );
        Ok::<_, Infallible>(res)
    });
    let svc = TokenBucketLayer::new(Rate::per_second(1.0), Burst(5))
        .http()
        .layer(inner);
    let res = svc.oneshot(http_request("192.0.2.1:1")).await.unwrap();
    assert_eq!(header(&res, "ratelimit"), "\"upstream\";r=0;t=9");
    assert!(res.headers().get("ratelimit-policy").is_none());
}

// ---------------------------------------------------------------------------------------
// Wait mode

/// A service that refuses calls it was not polled ready for, like a tower Buffer would
/// misbehave; clones start not ready.
struct ReadyTracking {
    ready: bool,
    calls: Arc<AtomicUsize>,
}

impl Clone for ReadyTracking {
    fn clone(&self) -> Self {
        ReadyTracking {
            ready: false,
            calls: self.calls.clone(),
        }
    }
}

impl Service<&'static str> for ReadyTracking {
    type Response = &'static str;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<&'static str, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.ready = true;
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: &'static str) -> Self::Future {
        let was_ready = std::mem::replace(&mut self.ready, false);
        self.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            if was_ready {
                Ok(req)
            } else {
                Err("called without poll_ready".into())
            }
        })
    }
}

fn ready_tracking() -> (ReadyTracking, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    (
        ReadyTracking {
            ready: false,
            calls: calls.clone(),
        },
        calls,
    )
}

#[tokio::test(start_paused = true)]
async fn wait_mode_waits_for_the_token_then_calls_the_ready_service() {
    let (inner, calls) = ready_tracking();
    let mut svc = TokenBucketLayer::new(Rate::per_second(10.0), Burst(1))
        .wait(Duration::from_secs(1))
        .layer(inner);
    let start = Instant::now();
    assert_eq!(svc.ready().await.unwrap().call("a").await.unwrap(), "a");
    assert_eq!(start.elapsed(), Duration::ZERO);
    let second = svc.ready().await.unwrap().call("b");
    // The call is deferred: the inner service has not seen it yet.
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(second.await.unwrap(), "b");
    assert_eq!(start.elapsed(), Duration::from_millis(100));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    // The clone that replaced the waiting service is polled before the next call.
    assert_eq!(svc.ready().await.unwrap().call("c").await.unwrap(), "c");
    assert_eq!(start.elapsed(), Duration::from_millis(200));
}

#[tokio::test(start_paused = true)]
async fn wait_mode_refuses_waits_over_the_bound_without_taking_a_token() {
    let (inner, calls) = ready_tracking();
    let mut svc = TokenBucketLayer::new(Rate::per_second(1.0), Burst(1))
        .wait(Duration::from_millis(500))
        .layer(inner);
    svc.ready().await.unwrap().call("a").await.unwrap();
    let start = Instant::now();
    let err = svc.ready().await.unwrap().call("b").await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::ZERO, "failed at once");
    assert_eq!(
        err.downcast_ref::<RateLimited>(),
        Some(&RateLimited {
            retry_after: Duration::from_secs(1)
        })
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // The refused call booked nothing: after 1 s a call goes through without waiting.
    advance(Duration::from_secs(1)).await;
    let start = Instant::now();
    svc.ready().await.unwrap().call("c").await.unwrap();
    assert_eq!(start.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn wait_mode_dropping_a_waiting_call_gives_the_token_back() {
    let (inner, calls) = ready_tracking();
    let mut svc = TokenBucketLayer::new(Rate::per_second(1.0), Burst(1))
        .wait(Duration::from_secs(10))
        .layer(inner);
    svc.ready().await.unwrap().call("a").await.unwrap();
    let waiting = svc.ready().await.unwrap().call("b");
    assert!(tokio::time::timeout(Duration::from_millis(100), waiting)
        .await
        .is_err());
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the dropped call never ran"
    );
    advance(Duration::from_millis(900)).await;
    let start = Instant::now();
    svc.ready().await.unwrap().call("c").await.unwrap();
    assert_eq!(start.elapsed(), Duration::ZERO, "token was given back");
}

#[tokio::test(start_paused = true)]
async fn wait_mode_keyed_waits_per_key() {
    let layer = TokenBucketLayer::builder(Rate::per_second(10.0), Burst(1))
        .key(PeerIp)
        .build()
        .wait(Duration::from_secs(1));
    let svc = layer.layer(service_fn(|_req: Request<()>| async {
        Ok::<_, Infallible>(())
    }));
    let start = Instant::now();
    svc.clone().oneshot(from_peer("192.0.2.1:1")).await.unwrap();
    svc.clone().oneshot(from_peer("192.0.2.2:1")).await.unwrap();
    assert_eq!(start.elapsed(), Duration::ZERO);
    svc.clone().oneshot(from_peer("192.0.2.1:1")).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(100));
    let err = svc.oneshot(Request::new(())).await.unwrap_err();
    assert!(err.is::<MissingKey>());
}

// ---------------------------------------------------------------------------------------
// Shadow mode

/// A hook that records what it is given.
type Seen = Arc<std::sync::Mutex<Vec<resilience::ShadowRejection>>>;

fn seen() -> (
    Seen,
    impl Fn(&resilience::ShadowRejection) + Send + Sync + 'static,
) {
    let seen: Seen = Arc::default();
    let sink = seen.clone();
    (seen, move |r: &resilience::ShadowRejection| {
        sink.lock().unwrap().push(r.clone())
    })
}

#[tokio::test(start_paused = true)]
async fn shadow_mode_global_passes_everything_and_counts_what_it_would_refuse() {
    let (log, hook) = seen();
    let layer = TokenBucketLayer::builder(Rate::per_second(10.0), Burst(2))
        .shadow()
        .on_shadowed(hook)
        .build();
    let svc = layer.layer(service_fn(echo));
    for _ in 0..5 {
        assert_eq!(svc.clone().oneshot("hi").await.unwrap(), "hi");
    }
    assert!(layer.shadow());
    assert_eq!(layer.shadowed(), 3);
    // The bucket still decided: the refusals carry the exact wait they would have had.
    assert_eq!(
        *log.lock().unwrap(),
        vec![
            resilience::ShadowRejection::Limited(RateLimited {
                retry_after: 100 * MS
            });
            3
        ]
    );
    // Tokens were taken as usual: after 100 ms one more passes without being counted.
    advance(100 * MS).await;
    svc.clone().oneshot("hi").await.unwrap();
    assert_eq!(layer.shadowed(), 3);
}

#[tokio::test(start_paused = true)]
async fn shadow_mode_keyed_counts_per_key_and_missing_keys() {
    let (log, hook) = seen();
    let layer = TokenBucketLayer::builder(Rate::per_second(1.0), Burst(1))
        .key(PeerIp)
        .shadow()
        .on_shadowed(hook)
        .build();
    let svc = layer.layer(service_fn(|_req: Request<()>| async {
        Ok::<_, Infallible>("served")
    }));
    for peer in ["192.0.2.1:1", "192.0.2.1:2", "192.0.2.2:1", "192.0.2.2:2"] {
        assert_eq!(
            svc.clone().oneshot(from_peer(peer)).await.unwrap(),
            "served"
        );
    }
    // No peer address: would be `MissingKey`, passes too.
    assert_eq!(
        svc.clone().oneshot(Request::new(())).await.unwrap(),
        "served"
    );
    assert_eq!(layer.shadowed(), 3);
    let log = log.lock().unwrap();
    assert_eq!(log.len(), 3);
    assert!(matches!(log[0], resilience::ShadowRejection::Limited(_)));
    assert!(matches!(log[1], resilience::ShadowRejection::Limited(_)));
    assert!(matches!(log[2], resilience::ShadowRejection::MissingKey(_)));
    assert_eq!(layer.keyed_buckets().unwrap().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn shadow_mode_http_passes_with_200_and_no_ratelimit_headers_when_over() {
    let layer = TokenBucketLayer::builder(Rate::per_second(1.0), Burst(1))
        .key(PeerIp)
        .shadow()
        .build()
        .http();
    let svc = layer.layer(hello_service());
    let first = svc
        .clone()
        .oneshot(http_request("198.51.100.1:1"))
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(header(&first, "ratelimit"), "\"default\";r=0;t=1");
    let second = svc
        .clone()
        .oneshot(http_request("198.51.100.1:1"))
        .await
        .unwrap();
    assert_eq!(second.status(), StatusCode::OK);
    assert!(second.headers().get("ratelimit").is_none());
    let body = second.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"hello");
    assert_eq!(layer.shadowed(), 1);
}

#[tokio::test(start_paused = true)]
async fn shadow_mode_wait_never_waits() {
    let layer = TokenBucketLayer::builder(Rate::per_second(1.0), Burst(1))
        .shadow()
        .build()
        .wait(Duration::from_secs(10));
    let svc = layer.layer(service_fn(echo));
    let start = Instant::now();
    for _ in 0..3 {
        svc.clone().oneshot("hi").await.unwrap();
    }
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(layer.shadowed(), 2);
}

#[tokio::test(start_paused = true)]
async fn without_shadow_the_counter_stays_zero_and_refusals_are_made() {
    let layer = TokenBucketLayer::new(Rate::per_second(1.0), Burst(1));
    let svc = layer.layer(service_fn(echo));
    svc.clone().oneshot("a").await.unwrap();
    assert!(svc.clone().oneshot("b").await.is_err());
    assert!(!layer.shadow());
    assert_eq!(layer.shadowed(), 0);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Shadow mode refuses nothing, and counts exactly what the same limit enforced
    /// would have refused, request for request, on the same schedule.
    #[test]
    fn shadow_counts_exactly_what_enforcing_would_refuse(
        schedule in proptest::collection::vec((0u64..400, 0u8..4), 1..60),
    ) {
        paused_runtime().block_on(async {
            let rate = Rate::per_second(5.0);
            let shadow = TokenBucketLayer::builder(rate, Burst(3))
                .key(key_fn(|k: &u8| Some(*k)))
                .shadow()
                .build();
            let enforced = TokenBucketLayer::builder(rate, Burst(3))
                .key(key_fn(|k: &u8| Some(*k)))
                .build();
            let shadowed = shadow.layer(service_fn(|k: u8| async move { Ok::<_, Infallible>(k) }));
            let limited = enforced.layer(service_fn(|k: u8| async move { Ok::<_, Infallible>(k) }));
            let mut refused = 0u64;
            for (gap_ms, key) in schedule {
                advance(Duration::from_millis(gap_ms)).await;
                prop_assert!(shadowed.clone().oneshot(key).await.is_ok());
                if limited.clone().oneshot(key).await.is_err() {
                    refused += 1;
                }
                prop_assert_eq!(shadow.shadowed(), refused);
            }
            Ok(())
        })?;
    }
}
