//! A circuit breaker, as a tower layer and standalone.
//!
//! ```
//! use std::{
//!     sync::atomic::{AtomicUsize, Ordering},
//!     sync::Arc,
//!     time::Duration,
//! };
//!
//! use resilience::{BoxError, CircuitBreaker, CircuitBreakerLayer, CircuitOpen, CircuitState};
//! use tower::{service_fn, Layer, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! // A dependency that is down: every call fails.
//! let calls = Arc::new(AtomicUsize::new(0));
//! let counted = calls.clone();
//! let flaky = service_fn(move |_req: &'static str| {
//!     counted.fetch_add(1, Ordering::SeqCst);
//!     async { Err::<&'static str, BoxError>("connection refused".into()) }
//! });
//!
//! let breaker = CircuitBreaker::builder()
//!     .consecutive_failures(3)
//!     .open_for(Duration::from_secs(10))
//!     .build();
//! let svc = CircuitBreakerLayer::new(breaker.clone()).layer(flaky);
//!
//! // Three failures in a row trip it...
//! for _ in 0..3 {
//!     let err = svc.clone().oneshot("ping").await.unwrap_err();
//!     assert_eq!(err.to_string(), "connection refused");
//! }
//! assert_eq!(breaker.state(), CircuitState::Open);
//!
//! // ...and now calls fail fast, without reaching the dependency.
//! let err = svc.clone().oneshot("ping").await.unwrap_err();
//! let open = err.downcast_ref::<CircuitOpen>().expect("rejected by the breaker");
//! assert_eq!(open.retry_after, Duration::from_secs(10));
//! assert_eq!(calls.load(Ordering::SeqCst), 3);
//!
//! // After `open_for` it lets one trial call through; a failure opens it again.
//! tokio::time::advance(Duration::from_secs(10)).await;
//! assert_eq!(breaker.state(), CircuitState::HalfOpen);
//! assert!(svc.clone().oneshot("ping").await.is_err());
//! assert_eq!(calls.load(Ordering::SeqCst), 4);
//! assert_eq!(breaker.state(), CircuitState::Open);
//!
//! let stats = breaker.stats();
//! assert_eq!((stats.calls, stats.failures, stats.rejections), (4, 4, 1));
//! # }
//! ```
//!
//! # The contract
//!
//! * **States.** *Closed*: calls pass and their outcomes are counted. When the trip
//!   policy fires it turns *open*: calls are rejected at once with [`CircuitOpen`]
//!   (`retry_after` = the time left), without touching the inner service. After
//!   `open_for` it is *half-open*: at most `half_open_calls` trial calls are admitted at
//!   a time and the rest are rejected; `half_open_calls` successes close it, one failure
//!   opens it again.
//! * **Trip policies** ([`CircuitBreakerBuilder`]): `consecutive_failures(n)` (default,
//!   n = 5) and/or `failure_rate(percent, Window::Count(n) | Window::Time(d), min_calls)`.
//!   `slow_call(d)` makes calls slower than `d` count as failures. `open_for(d)`
//!   (default 5 s), optionally growing on repeated trips with `open_for_growth(factor,
//!   cap)`; closing resets it.
//! * **Failures** are what a [`Classifier`] says: [`ErrIsFailure`] (every `Err`),
//!   [`HttpClassifier`] for HTTP (`Err` or status `>= 500`, for `http::Response` and,
//!   with the `reqwest` feature, `reqwest::Response`), or a closure via [`classify_fn`].
//!   A layer not given one uses [`DefaultClassifier`]: `ErrIsFailure` in error mode,
//!   `HttpClassifier` in HTTP mode. `.classifier(c)` and `.http()` can come in either
//!   order.
//! * **Late results are harmless.** Each admitted call holds a [`BreakerPermit`] tagged
//!   with the state period (generation) that admitted it. A call admitted while closed
//!   that finishes after the breaker tripped and recovered does not count against the
//!   new closed period; a stale half-open trial cannot close or reopen a later one.
//! * **Shared state.** [`CircuitBreaker`] is an `Arc` inside. A
//!   [`CircuitBreakerLayer`] holds one from the moment it is built, and every service it
//!   makes, and every clone of those, shares it.
//! * **Tower manners.** `poll_ready` only forwards to the inner service; rejection
//!   happens in `call`. In [error mode](crate::ErrorMode) the service's error is
//!   [`BoxError`](crate::BoxError) (inner errors converted with `Into`, rejections a boxed
//!   [`CircuitOpen`] to `downcast_ref`). In [HTTP mode](CircuitBreakerLayer::http) the
//!   error type is the inner one and a rejection is a `503` response with `Retry-After`
//!   (whole seconds, rounded up, at least 1) and a JSON body
//!   `{"error":"circuit_open","message":"circuit breaker is open; retry after N s"}`.
//! * **Bad values** (`consecutive_failures(0)`, a failure-rate percent outside
//!   `(0, 100]`, an empty window...) panic in the builder method that takes them,
//!   documented under `# Panics`; nothing is silently adjusted.
//! * **Controls.** [`CircuitBreaker::force_open`] (rejects everything until told
//!   otherwise), [`force_closed`](CircuitBreaker::force_closed),
//!   [`disable`](CircuitBreaker::disable) (admits everything, still counts) and
//!   [`reset`](CircuitBreaker::reset) (as built). Each is a transition the hook and
//!   the stats see. [`max_wait_in_half_open(d)`](CircuitBreakerBuilder::max_wait_in_half_open)
//!   reopens a half-open breaker whose trials have not reported within `d`.
//! * **Observable.** [`CircuitBreaker::state`], [`CircuitBreaker::stats`] (calls,
//!   successes, failures, rejections, transitions) and the
//!   [`on_state_change`](CircuitBreakerBuilder::on_state_change) hook, for metrics.
//! * **Standalone.** `breaker.call(|| async { ... }).await` returns
//!   `Result<T, BreakerError<E>>`; [`CircuitBreaker::try_acquire`] is the low-level form.
//! * **Time** is `tokio::time::Instant`, so tests on paused time are deterministic.
//! * **Cost.** The closed-state path is lock-free; see [`CircuitBreaker`] for exactly
//!   where a mutex is used.
//!
//! # HTTP mode
//!
//! ```
//! use std::{convert::Infallible, time::Duration};
//!
//! use http::{Request, Response, StatusCode};
//! use resilience::{CircuitBreaker, CircuitBreakerLayer};
//! use tower::{service_fn, Layer, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let upstream = service_fn(|_req: Request<String>| async {
//!     let mut res = Response::new(String::from("upstream is sick"));
//!     *res.status_mut() = StatusCode::BAD_GATEWAY;
//!     Ok::<_, Infallible>(res)
//! });
//! let breaker = CircuitBreaker::builder()
//!     .consecutive_failures(1)
//!     .open_for(Duration::from_millis(1500))
//!     .build();
//! // `.http()`: 5xx responses count as failures, rejections are 503 responses.
//! let svc = CircuitBreakerLayer::new(breaker).http().layer(upstream);
//!
//! let res = svc.clone().oneshot(Request::new(String::new())).await.unwrap();
//! assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
//!
//! let res = svc.oneshot(Request::new(String::new())).await.unwrap();
//! assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
//! assert_eq!(res.headers()["retry-after"], "2"); // 1.5 s, rounded up
//! assert_eq!(res.headers()["content-type"], "application/json");
//! # }
//! ```

mod breaker;
mod classify;
mod error;
pub mod future;
mod layer;
mod service;

pub use breaker::{
    BreakerPermit, BreakerStats, CircuitBreaker, CircuitBreakerBuilder, CircuitState, Transition,
    Window, DEFAULT_CONSECUTIVE_FAILURES, DEFAULT_HALF_OPEN_CALLS, DEFAULT_OPEN_FOR,
};
pub use classify::{
    classify_fn, Classifier, DefaultClassifier, ErrIsFailure, FnClassifier, HttpClassifier,
};
pub use error::{BreakerError, CircuitOpen};
pub use layer::CircuitBreakerLayer;
pub use service::CircuitBreakerService;
