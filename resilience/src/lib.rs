//! # resilience
//!
//! Tower middleware for calls that can fail or flood: a [`CircuitBreaker`] and a keyed
//! [`TokenBucket`] rate limiter, each as a `tower::Layer` ([`CircuitBreakerLayer`],
//! [`TokenBucketLayer`]) and standalone. The layers work on any tower stack: axum and
//! hyper servers, tonic servers and channels, a `reqwest::Client`.
//!
//! ```
//! use std::time::Duration;
//! use resilience::{
//!     BoxError, Burst, CircuitBreaker, CircuitBreakerLayer, CircuitOpen, Rate, RateLimited,
//!     TokenBucketLayer,
//! };
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! // A dependency that is down.
//! let dependency = service_fn(|_req: u32| async { Err::<u32, BoxError>("connection refused".into()) });
//!
//! let breaker = CircuitBreaker::builder().consecutive_failures(2).open_for(Duration::from_secs(5)).build();
//! let svc = ServiceBuilder::new()
//!     // One global bucket: 10 per second, bursts of 3.
//!     .layer(TokenBucketLayer::new(Rate::per_second(10.0), Burst(3)))
//!     .layer(CircuitBreakerLayer::new(breaker.clone()))
//!     .service(dependency);
//!
//! // Two failures open the breaker; the third call fails fast without touching the dependency.
//! assert!(svc.clone().oneshot(1).await.is_err());
//! assert!(svc.clone().oneshot(2).await.is_err());
//! let err = svc.clone().oneshot(3).await.unwrap_err();
//! assert_eq!(err.downcast_ref::<CircuitOpen>().unwrap().retry_after, Duration::from_secs(5));
//! assert_eq!(err.to_string(), "circuit breaker is open; retry after 5 s");
//!
//! // The burst of 3 is spent: the fourth call is rate limited.
//! let err = svc.clone().oneshot(4).await.unwrap_err();
//! assert!(err.downcast_ref::<RateLimited>().is_some());
//! # }
//! ```
//!
//! Both layers have the same [modes](mode): [`ErrorMode`] (the default; rejections are
//! a [`BoxError`] holding [`CircuitOpen`] or [`RateLimited`]) and [`HttpMode`]
//! (`.http()`: rejections are `503` / `429` responses with `Retry-After`, so the layers
//! drop into axum with a plain `.layer(...)`). The token bucket also has [`WaitMode`]
//! (`.wait(max)`) for clients. The limiter is keyed by a [`KeyExtractor`]:
//! [`GlobalKey`], [`PeerIp`], [`TrustedProxyIp`], [`HeaderKey`] or a closure
//! ([`key_fn`]).
//!
//! State is created once, when a layer is built, and shared by every service it makes
//! and every clone of those (hyper-util clones the service per request). Neither layer
//! ever fails in `poll_ready`; rejections happen in `call`. Time comes from
//! [`tokio::time`], or, on the per-call paths, from the CPU's time-stamp counter unless
//! tokio's time is paused when the layer is built; so tests run on paused time.
//!
//! Conventions shared by both halves of the crate:
//!
//! - **Parameters are named at the call site**: `Rate::per_second(100.0)`, `Burst(60)`,
//!   `.consecutive_failures(5)`, `.max_keys(10_000)`; getters have the builders' names
//!   (`rate()`, `burst()`, `key()`, `max_keys()`).
//! - **Bad values are refused, never adjusted**: infallible constructors and builder
//!   methods panic, documented under `# Panics`; `try_*` twins return an error for
//!   values read at run time.
//! - **One wording for "when to come back"**: `Retry-After` and every "retry after N s"
//!   (the `Display` of [`CircuitOpen`] and [`RateLimited`], the HTTP bodies) are whole
//!   seconds rounded up, never 0: [`retry_after_secs`].
//!
//! [`ConcurrencyLimitLayer`] caps the calls in flight and rejects, never queues, the rest.
//! Its cap is fixed or adaptive ([`ConcurrencyLimitLayer::adaptive`], with [`Aimd`] or
//! [`Gradient2`]), moved by the calls' latency and errors.
//! [`RetryLayer`] retries by a [`RetryPolicy`] ([`HttpRetryPolicy`] for HTTP clients)
//! within a [`RetryBudget`]; see [`retry`], and its ordering with the breaker.
//! [`KeyedCircuitBreakerLayer`] keeps a breaker per key (an upstream host with
//! [`UriHost`]), under a hard key cap; see [`keyed_breaker`].
//! [`FaultLayer`] injects seeded errors and latency, for tests and drills; see
//! [`fault`].
//! See [`circuit_breaker`] and [`token_bucket`] for the full contracts.
//!
//! ## Features
//!
//! - `axum`: [`PeerIp`] also reads axum's `ConnectInfo<SocketAddr>`.
//! - `reqwest`: [`HttpClassifier`] classifies `reqwest::Response` by status; [`UriHost`]
//!   keys `reqwest::Request`s too.
//! - `redis`: `RedisBuckets` and `RedisTokenBucketLayer`, token buckets shared by
//!   several processes through Redis (see [`token_bucket`]).

#![warn(missing_docs)]

pub mod circuit_breaker;
mod clock;
pub mod concurrency_limit;
pub mod fault;
mod http_response;
pub mod key;
pub mod keyed_breaker;
pub mod mode;
pub mod retry;
mod retry_after;
pub mod token_bucket;

pub use http_response::ResponseBody;
pub use retry_after::retry_after_secs;

/// The boxed error type the layers return in their error mode, as in `tower`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub use circuit_breaker::{
    classify_fn, BreakerError, BreakerPermit, BreakerStats, CircuitBreaker, CircuitBreakerBuilder,
    CircuitBreakerLayer, CircuitBreakerService, CircuitOpen, CircuitState, Classifier,
    DefaultClassifier, ErrIsFailure, FnClassifier, HttpClassifier, Transition, Window,
};
pub use concurrency_limit::{AdaptiveLimitBuilder, Aimd, Gradient2, InvalidAdaptiveLimit};
pub use concurrency_limit::{
    ConcurrencyLimitLayer, ConcurrencyLimitService, InvalidConcurrencyLimit, Overloaded,
};
pub use fault::{FaultLayer, InjectedFault, Latency};
pub use key::{
    key_fn, FnKey, ForwardedHeader, GlobalKey, HeaderDigest, HeaderKey, KeyExtractor, KeyType,
    PeerIp, TrustedProxyIp, UriHost,
};
pub use keyed_breaker::{KeyedCircuitBreakerLayer, KeyedCircuitBreakers};
pub use mode::{ErrorMode, HttpMode, WaitMode};
pub use retry::{HttpRetryPolicy, RetryBudget, RetryLayer, RetryPolicy, RetryService};
pub use token_bucket::{
    Acquired, Burst, InvalidTokenBucket, KeyedTokenBuckets, MissingKey, Rate, RateLimited,
    ShadowRejection, TokenBucket, TokenBucketLayer, TokenBucketLayerBuilder, TokenBucketService,
};
#[cfg(feature = "redis")]
pub use token_bucket::{RedisBuckets, RedisFallback, RedisTokenBucketLayer};
