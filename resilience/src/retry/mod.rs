//! Retries within a budget, as a tower layer, with a ready policy for HTTP clients.
//!
//! ```
//! use std::{
//!     sync::atomic::{AtomicU32, Ordering},
//!     sync::Arc,
//!     time::Duration,
//! };
//!
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use resilience::retry::{HttpRetryPolicy, RetryBudget, RetryLayer};
//! use resilience::BoxError;
//! use tower::{service_fn, Layer, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! // A dependency that is busy once, then answers.
//! let calls = Arc::new(AtomicU32::new(0));
//! let counted = calls.clone();
//! let dependency = service_fn(move |_req: Request<Full<Bytes>>| {
//!     let n = counted.fetch_add(1, Ordering::SeqCst);
//!     async move {
//!         let status = if n == 0 { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
//!         let res = Response::builder().status(status).header("retry-after", "2");
//!         Ok::<_, BoxError>(res.body(Full::new(Bytes::new())).unwrap())
//!     }
//! });
//!
//! let budget = RetryBudget::builder().ratio(1.0).build();
//! let layer = RetryLayer::new(HttpRetryPolicy::new().max_attempts(3)).budget(budget.clone());
//! let svc = layer.layer(dependency);
//!
//! // The 503 is retried after its `Retry-After`; the caller sees the 200.
//! let start = tokio::time::Instant::now();
//! let res = svc.clone().oneshot(Request::get("/").body(Full::new(Bytes::new())).unwrap()).await.unwrap();
//! assert_eq!(res.status(), StatusCode::OK);
//! assert_eq!(start.elapsed(), Duration::from_secs(2));
//! assert_eq!(calls.load(Ordering::SeqCst), 2);
//!
//! // A POST is not idempotent: sent once, the 503 handed back.
//! calls.store(0, Ordering::SeqCst);
//! let res = svc.clone().oneshot(Request::post("/").body(Full::new(Bytes::new())).unwrap()).await.unwrap();
//! assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
//! assert_eq!(calls.load(Ordering::SeqCst), 1);
//!
//! let stats = budget.stats();
//! assert_eq!((stats.requests, stats.retries), (2, 1));
//! # }
//! ```
//!
//! # The contract
//!
//! * **Policy.** A [`RetryLayer`] is generic over a [`RetryPolicy<Req, Res, E>`]: it
//!   decides on each result ([`Action::Stop`] or [`Action::Retry`] with the delay),
//!   caps the attempts, and makes the copies of the request that retries send, or
//!   refuses to ([`Refused`]). [`HttpRetryPolicy`] is the ready one for
//!   `http::Request<B>` services: idempotent methods only, transport errors and
//!   `429` / `502` / `503` / `504`, `Retry-After` (seconds or HTTP-date) or
//!   exponential backoff with full jitter, and a cap on attempts.
//! * **Bodies.** A request is retried only if the policy can copy it. For
//!   [`HttpRetryPolicy`] the body must be a [`ReplayBody`]: in-memory bodies
//!   (`Full<Bytes>`, `Empty`, `String`) are; streams (`BoxBody`, `UnsyncBoxBody`,
//!   `axum::body::Body`) are not, and such requests are sent once. When a result would
//!   have been retried but the request cannot be replayed (or its method is not
//!   idempotent), the reason is logged with `tracing::debug!` and the result handed
//!   back.
//! * **Budget.** Every call deposits in a [`RetryBudget`] and every retry withdraws a
//!   whole retry; with none left the result is handed back (and logged). The budget
//!   guarantees, `t` being the time since it was built,
//!   `retries(t) ≤ ratio × requests(t) + min_per_sec × t + initial`; deposits expire
//!   after its window. `initial` is a start-up allowance (default 0,
//!   [`RetryBudgetBuilder::initial`]): without one a process's first failing call is
//!   not retried, since nothing has been deposited yet. It is made when the layer is built and shared by all the layer's services
//!   and their clones, so a fleet of per-request clones cannot multiply the retries.
//! * **Errors.** The service's error type is the inner service's, unchanged: a call
//!   that is not retried, or whose retries are exhausted or refused, returns the last
//!   attempt's `Ok` or `Err` as it was. A `poll_ready` error of the inner service before
//!   a retry is returned as the call's error.
//! * **Readiness.** `poll_ready` forwards the inner service's. The service that was
//!   polled ready makes the first call and moves into the response future (a clone
//!   takes its place, as in tower's `Retry`); it is polled ready again before each
//!   retry. The inner service must be `Clone`.
//! * **Time.** Delays are `tokio::time::sleep`s; the budget reads `tokio::time` when it
//!   is built on paused tokio time, the CPU's time-stamp counter otherwise (it is read
//!   on every call): tests run on paused time. A delay of zero retries at once, with no
//!   timer.
//! * **Cost.** On a call that succeeds at once: the budget's deposit (no lock), the
//!   policy's copy of the request (for `http::Request`, a copy of its headers: an
//!   allocation, inherent to replaying a request that the inner service consumes,
//!   tower's `Retry` makes the same copy) and two `Arc` clones into the response
//!   future.
//!
//! # Ordering with a circuit breaker
//!
//! Put the [`CircuitBreakerLayer`](crate::CircuitBreakerLayer) **outside** the retry:
//!
//! ```
//! # use resilience::{retry::{HttpRetryPolicy, RetryLayer}, CircuitBreaker, CircuitBreakerLayer};
//! # let breaker = CircuitBreaker::new();
//! let stack = tower::ServiceBuilder::new()
//!     .layer(CircuitBreakerLayer::new(breaker.clone())) // sees calls
//!     .layer(RetryLayer::new(HttpRetryPolicy::new())); // makes attempts
//! # let _ = stack;
//! ```
//!
//! Then the breaker counts one outcome per call: a call whose attempts all fail is
//! one failure, a call that succeeds on a retry is one success, and an open breaker
//! rejects the call before any attempt, so a dead dependency gets no retries at all.
//! Inside the retry it would count every attempt, trip three times as fast under
//! `max_attempts(3)`, and its [`CircuitOpen`](crate::CircuitOpen) rejections would be
//! retried (the policy sees them as errors), spending the budget on calls that cannot
//! succeed.

mod budget;
mod future;
mod http;
mod layer;
mod policy;
mod service;

pub use self::http::{
    HttpRetryPolicy, ReplayBody, DEFAULT_BASE, DEFAULT_MAX_ATTEMPTS, DEFAULT_MAX_BACKOFF,
    DEFAULT_MAX_RETRY_AFTER,
};
pub use budget::{
    BudgetStats, RetryBudget, RetryBudgetBuilder, DEFAULT_INITIAL, DEFAULT_MIN_PER_SEC,
    DEFAULT_RATIO, DEFAULT_WINDOW,
};
pub use future::ResponseFuture;
pub use layer::RetryLayer;
pub use policy::{Action, Refused, RetryPolicy};
pub use service::RetryService;
