//! Token-bucket rate limiting: a standalone [`TokenBucket`], per-key
//! [`KeyedTokenBuckets`], and the tower middleware [`TokenBucketLayer`].
//!
//! ```
//! use std::{convert::Infallible, net::SocketAddr, time::Duration};
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::{BodyExt, Full};
//! use resilience::{Burst, PeerIp, Rate, RateLimited, TokenBucket, TokenBucketLayer};
//! use tower::{service_fn, Layer, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! // Standalone: 5 tokens per second, bursts of 10.
//! let bucket = TokenBucket::new(Rate::per_second(5.0), Burst(10));
//! assert!(bucket.try_acquire_n(10).is_ok());
//! assert_eq!(bucket.try_acquire().unwrap_err(), RateLimited { retry_after: Duration::from_millis(200) });
//! bucket.acquire().await; // sleeps 200 ms
//!
//! // Server side: per client IP, answering 429 over the limit.
//! let app = service_fn(|_req: Request<Full<Bytes>>| async {
//!     Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
//! });
//! let svc = TokenBucketLayer::builder(Rate::per_second(1.0), Burst(1))
//!     .key(PeerIp)
//!     .build()
//!     .http()
//!     .layer(app);
//!
//! let request = || {
//!     let mut req = Request::new(Full::default());
//!     req.extensions_mut().insert("198.51.100.4:40000".parse::<SocketAddr>().unwrap());
//!     req
//! };
//! let ok = svc.clone().oneshot(request()).await.unwrap();
//! assert_eq!(ok.status(), StatusCode::OK);
//! let limited = svc.clone().oneshot(request()).await.unwrap();
//! assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
//! assert_eq!(limited.headers()["retry-after"], "1");
//! assert_eq!(limited.headers()["ratelimit-policy"], "\"default\";q=1;w=1");
//! assert_eq!(limited.headers()["ratelimit"], "\"default\";r=0;t=1");
//! let body = limited.into_body().collect().await.unwrap().to_bytes();
//! assert!(body.starts_with(br#"{"error":"rate_limited""#));
//!
//! // Client side: wait for a token (at most 5 s) instead of failing.
//! let client = service_fn(|req: &'static str| async move { Ok::<_, Infallible>(req) });
//! let client = TokenBucketLayer::new(Rate::per_second(2.0), Burst(1))
//!     .wait(Duration::from_secs(5))
//!     .layer(client);
//! let start = tokio::time::Instant::now();
//! client.clone().oneshot("first").await.unwrap();
//! client.clone().oneshot("second").await.unwrap(); // waited 500 ms
//! assert_eq!(start.elapsed(), Duration::from_millis(500));
//! # }
//! ```
//!
//! # The algorithm
//!
//! A bucket holds up to `burst` tokens and gains `rate` per second; a request takes
//! one (or `n`). It is implemented as GCRA: the state is the instant the bucket will be
//! full again, one `AtomicU64` of nanoseconds, changed by one compare-and-swap. No
//! locks, no background task, no timer: refilling is arithmetic on the clock. The clock
//! is the CPU's time-stamp counter (through `quanta`: one `rdtsc` and a multiply, where
//! `tokio::time::Instant::now` costs a `clock_gettime` and an atomic load), unless
//! tokio's time is paused when the bucket or layer is made: then it is tokio's clock, so
//! tests can pause and advance time.
//!
//! Guarantee: over any interval of length `t`, at most `burst + rate * t` tokens
//! are granted. `retry_after` in [`RateLimited`] is exact: the same request made that
//! much later is granted if no one else takes the tokens first.
//!
//! # Contract of the layer
//!
//! - Never fails in `poll_ready` (it only forwards the inner service's readiness);
//!   requests are refused in `call`, without reaching the inner service.
//! - The buckets are created once, when the layer is built, and shared by every
//!   service it makes and all their clones.
//! - A request whose key cannot be found is refused with [`MissingKey`] (HTTP mode:
//!   `500`), never counted in a shared bucket.
//! - HTTP mode rejections are responses (`429`, with `Retry-After` rounded up to whole
//!   seconds and never 0, and the IETF `RateLimit` / `RateLimit-Policy` fields), so the
//!   service stays infallible for axum.
//!
//! # Shadow mode
//!
//! [`.shadow()`](TokenBucketLayerBuilder::shadow) on the builder lets every request
//! through and counts the ones that would have been refused
//! ([`TokenBucketLayer::shadowed`], and the
//! [`on_shadowed`](TokenBucketLayerBuilder::on_shadowed) hook): a new limit can be
//! watched on real traffic before it is enforced.
//!
//! # Shared buckets
//!
//! With the crate feature `redis`, `RedisBuckets` keep the buckets in Redis, so
//! several processes share one limit per key, and `RedisTokenBucketLayer` is the
//! layer on them; see their docs for the fallback when Redis fails.
//!
//! # Parameters
//!
//! Every constructor takes the rate and the burst as [`Rate`] and [`Burst`], so a call
//! site names both: `TokenBucket::new(Rate::per_second(100.0), Burst(60))` is 100 per
//! second with bursts of 60. The same two getters, `rate()` and `burst()`, read them
//! back from [`TokenBucket`], [`KeyedTokenBuckets`] and [`TokenBucketLayer`].
//!
//! Bad values are refused, never adjusted: a rate that is not a finite number above 0,
//! a burst of 0, a burst that takes over a century to refill, a key cap of 0. The
//! infallible constructors panic (see their `# Panics`); each has a `try_` twin
//! returning [`InvalidTokenBucket`] for values read at run time.

mod bucket;
mod error;
mod future;
mod keyed;
mod layer;
mod rate;
#[cfg(feature = "redis")]
mod redis;
mod service;

pub use self::{
    bucket::{Acquired, TokenBucket},
    error::{InvalidTokenBucket, MissingKey, RateLimited},
    future::{HttpResponseFuture, ResponseFuture, WaitFuture},
    keyed::{KeyedTokenBuckets, DEFAULT_MAX_KEYS},
    layer::{ShadowRejection, TokenBucketLayer, TokenBucketLayerBuilder},
    rate::{Burst, Rate},
    service::TokenBucketService,
};

#[cfg(feature = "redis")]
pub use self::redis::{
    RedisBuckets, RedisBucketsBuilder, RedisFallback, RedisResponseFuture, RedisTokenBucketLayer,
    RedisTokenBucketService, DEFAULT_REDIS_TIMEOUT,
};
