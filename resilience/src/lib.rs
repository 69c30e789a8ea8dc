//! # resilience
//!
//! Tower middleware for calls that can fail or flood: a [`CircuitBreaker`] and a keyed
//! [`TokenBucket`] rate limiter, each as a `tower::Layer` ([`CircuitBreakerLayer`],
//! [`TokenBucketLayer`]) and standalone. The layers work on any tower stack: axum and
//! hyper servers, tonic servers and channels, a `reqwest::Client`.
//!
//! ```
//! use std::time::Duration;
//! use resilience::{BoxError, CircuitBreaker, CircuitBreakerLayer, CircuitOpen, RateLimited, TokenBucketLayer};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! // A dependency that is down.
//! let dependency = service_fn(|_req: u32| async { Err::<u32, BoxError>("connection refused".into()) });
//!
//! let breaker = CircuitBreaker::builder().consecutive_failures(2).open_for(Duration::from_secs(5)).build();
//! let svc = ServiceBuilder::new()
//!     .layer(TokenBucketLayer::new(10.0, 3))           // 10/s, bursts of 3, one global bucket
//!     .layer(CircuitBreakerLayer::new(breaker.clone()))
//!     .service(dependency);
//!
//! // Two failures open the breaker; the third call fails fast without touching the dependency.
//! assert!(svc.clone().oneshot(1).await.is_err());
//! assert!(svc.clone().oneshot(2).await.is_err());
//! let err = svc.clone().oneshot(3).await.unwrap_err();
//! assert_eq!(err.downcast_ref::<CircuitOpen>().unwrap().retry_after, Duration::from_secs(5));
//!
//! // The burst of 3 is spent: the fourth call is rate limited.
//! let err = svc.clone().oneshot(4).await.unwrap_err();
//! assert!(err.downcast_ref::<RateLimited>().is_some());
//! # }
//! ```
//!
//! Each layer has an error mode (above: rejections are a [`BoxError`] holding
//! [`CircuitOpen`] or [`RateLimited`]) and an HTTP mode (`.http()`: rejections are
//! `503` / `429` responses with `Retry-After`, so the layers drop into axum with a plain
//! `.layer(...)`). The token bucket also has a wait mode (`.wait(max)`) for clients.
//! The limiter is keyed by a [`KeyExtractor`]: [`GlobalKey`], [`PeerIp`],
//! [`TrustedProxyIp`], [`HeaderKey`] or a closure ([`key_fn`]).
//!
//! State is created when a layer is built and shared by every service it makes and
//! every clone of those (hyper-util clones the service per request). Neither layer ever
//! fails in `poll_ready`; rejections happen in `call`. Time comes from
//! [`tokio::time`], so tests run on paused time.
//!
//! See [`circuit_breaker`] and [`token_bucket`] for the full contracts.
//!
//! ## Features
//!
//! - `axum`: [`PeerIp`] also reads axum's `ConnectInfo<SocketAddr>`.
//! - `reqwest`: [`HttpClassifier`] classifies `reqwest::Response` by status.

#![warn(missing_docs)]

pub mod circuit_breaker;
mod http_response;
pub mod key;
pub mod token_bucket;

pub use http_response::ResponseBody;

/// The boxed error type the layers return in their error mode, as in `tower`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

// --- circuit breaker re-exports (owned by the breaker author) ---
pub use circuit_breaker::{
    classify_fn, BreakerError, BreakerPermit, BreakerStats, CircuitBreaker, CircuitBreakerBuilder,
    CircuitBreakerLayer, CircuitBreakerService, CircuitOpen, CircuitState, Classifier,
    ErrIsFailure, FnClassifier, HttpClassifier, Transition, Window,
};
// --- end circuit breaker re-exports ---

// --- token bucket re-exports (owned by the token bucket author) ---
pub use key::{
    key_fn, Cidr, CidrParseError, FnKey, ForwardedHeader, GlobalKey, HeaderDigest, HeaderKey,
    KeyExtractor, PeerIp, TrustedProxyIp,
};
pub use token_bucket::{
    Acquired, InvalidRate, KeyedTokenBuckets, MissingKey, RateLimited, TokenBucket,
    TokenBucketLayer, TokenBucketService,
};
// --- end token bucket re-exports ---
