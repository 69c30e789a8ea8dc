//! A limit on calls in flight that rejects instead of queueing, as a tower layer.
//!
//! ```
//! use std::time::Duration;
//!
//! use resilience::{BoxError, ConcurrencyLimitLayer, Overloaded};
//! use tokio::sync::oneshot;
//! use tower::{service_fn, Layer, Service, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! // A slow dependency: each call waits for its own signal.
//! let slow = service_fn(|done: oneshot::Receiver<()>| async move {
//!     let _ = done.await;
//!     Ok::<_, BoxError>("done")
//! });
//!
//! let layer = ConcurrencyLimitLayer::new(2).retry_after(Duration::from_millis(500));
//! let mut svc = layer.layer(slow);
//!
//! // Two calls in flight fill the limit...
//! let (first_done, rx) = oneshot::channel();
//! let first = svc.ready().await.unwrap().call(rx);
//! let (_second_done, rx) = oneshot::channel();
//! let _second = svc.ready().await.unwrap().call(rx);
//! assert_eq!(layer.in_flight(), 2);
//!
//! // ...so a third is rejected at once, without reaching the dependency.
//! let (_tx, rx) = oneshot::channel();
//! let err = svc.ready().await.unwrap().call(rx).await.unwrap_err();
//! let overloaded = err.downcast_ref::<Overloaded>().expect("rejected by the limit");
//! assert_eq!(overloaded.retry_after, Duration::from_millis(500));
//! assert_eq!(err.to_string(), "overloaded; retry after 1 s");
//! assert_eq!(layer.rejections(), 1);
//!
//! // A call that completes frees its slot.
//! first_done.send(()).unwrap();
//! assert_eq!(first.await.unwrap(), "done");
//! assert_eq!(layer.in_flight(), 1);
//! # }
//! ```
//!
//! # The contract
//!
//! * **No queue.** tower's own `ConcurrencyLimit` makes callers wait in `poll_ready`
//!   for a slot and has no way to say "no" (tower#793); under overload the wait grows
//!   without bound. This layer never waits: a call that finds `max` calls in flight is
//!   rejected at once with [`Overloaded`], without calling the inner service.
//! * **Tower manners.** `poll_ready` only forwards the inner service's readiness: it
//!   never fails on the limit's account (tower treats a `poll_ready` error as a dead
//!   service) and never reserves a slot, so a service polled ready and then dropped or
//!   left idle holds nothing. The decision is made in `call`.
//! * **What a slot covers.** A call holds its slot from `call` until its response
//!   future completes or is dropped. In [HTTP mode](ConcurrencyLimitLayer::http) it
//!   holds it longer: until the response body has been streamed (it returns its last
//!   frame, `None` or an error) or is dropped, since a response being written (a large
//!   listing, a stream) still costs what the limit protects. The body is a
//!   [`PermitBody`] that carries the slot.
//! * **Shared state.** The count is created when the layer is built, behind an `Arc`;
//!   every service the layer makes, and every clone of those and of the layer, shares
//!   it.
//! * **Modes.** In [error mode](crate::ErrorMode) the service's error is
//!   [`BoxError`](crate::BoxError) (inner errors converted with `Into`, rejections a
//!   boxed [`Overloaded`] to `downcast_ref`). In [HTTP mode](crate::HttpMode) the error
//!   type is the inner one and a rejection is a `503` response with `Retry-After`
//!   (whole seconds, rounded up, at least 1) and the JSON body
//!   `{"error":"overloaded","message":"overloaded; retry after N s"}`, so the layer
//!   drops into axum with a plain `.layer(...)`.
//! * **When to come back.** A slot frees whenever a call finishes, so there is no exact
//!   wait to report; `retry_after` is a configured hint,
//!   [`ConcurrencyLimitLayer::retry_after`], by default [`DEFAULT_RETRY_AFTER`] (1 s).
//! * **Bad values.** A `max` of 0 panics in [`ConcurrencyLimitLayer::new`]
//!   (documented under `# Panics`); [`ConcurrencyLimitLayer::try_new`] returns
//!   [`InvalidConcurrencyLimit`] instead.
//! * **Observable.** [`in_flight`](ConcurrencyLimitLayer::in_flight),
//!   [`max`](ConcurrencyLimitLayer::max) and
//!   [`rejections`](ConcurrencyLimitLayer::rejections), on the layer and on its
//!   services.
//! * **Cost.** Admission is one compare-and-swap on a shared counter and one `Arc`
//!   clone; the count never exceeds `max`, not even for an instant.
//!
//! # HTTP mode, in axum
//!
//! ```
//! use std::time::Duration;
//!
//! use axum::{body::Body, routing::get, Router};
//! use http::{Request, StatusCode};
//! use http_body_util::BodyExt;
//! use resilience::ConcurrencyLimitLayer;
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let limit = ConcurrencyLimitLayer::new(1)
//!     .retry_after(Duration::from_millis(1500))
//!     .http();
//! let app = Router::new()
//!     .route("/slow", get(|| async {
//!         tokio::time::sleep(Duration::from_secs(10)).await;
//!         "finally"
//!     }))
//!     .layer(limit.clone());
//!
//! // One request in the handler takes the only slot...
//! let first = tokio::spawn(app.clone().oneshot(Request::get("/slow").body(Body::empty()).unwrap()));
//! tokio::task::yield_now().await;
//! assert_eq!(limit.in_flight(), 1);
//!
//! // ...so the next is answered 503 at once.
//! let res = app.clone().oneshot(Request::get("/slow").body(Body::empty()).unwrap()).await.unwrap();
//! assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
//! assert_eq!(res.headers()["retry-after"], "2"); // 1.5 s, rounded up
//! assert_eq!(res.headers()["content-type"], "application/json");
//! let body = res.into_body().collect().await.unwrap().to_bytes();
//! assert_eq!(body, r#"{"error":"overloaded","message":"overloaded; retry after 2 s"}"#);
//!
//! // The first response holds its slot until its body has been read.
//! let res = first.await.unwrap().unwrap();
//! assert_eq!(res.status(), StatusCode::OK);
//! assert_eq!(limit.in_flight(), 1);
//! let body = res.into_body().collect().await.unwrap().to_bytes();
//! assert_eq!(body, "finally");
//! assert_eq!(limit.in_flight(), 0);
//! # }
//! ```
//!
//! # Adaptive limits
//!
//! A fixed `max` is a guess about the dependency's capacity. An adaptive limit, built
//! with [`ConcurrencyLimitLayer::adaptive`], learns it instead, as Netflix's
//! `concurrency-limits` and Envoy's adaptive concurrency filter do: the limit moves
//! between `min` and `max` (never crossing either) from the calls' latency and errors,
//! and calls over it are rejected exactly as above ([`Overloaded`], or `503` with
//! `Retry-After` in HTTP mode).
//!
//! * **Samples.** Each admitted call is one sample: its latency from `call` to the
//!   completion of its response future, and whether it was a *drop*: an `Err` from the inner service or, in HTTP
//!   mode, a `5xx` response (any other status is a success; the body's streaming time
//!   is not part of the latency). A response future dropped before completing gives no
//!   sample. Rejected calls give none either.
//! * **Windows.** Samples are aggregated over a [`SampleWindow`]: `Samples(n)` (default
//!   10) or `Time(d)`. At the end of each window the algorithm computes the new limit
//!   from the window's mean latency, whether it had a drop and its most calls in
//!   flight. The update runs on the task completing the window's last call; there is no
//!   timer.
//! * **Algorithms.** [`Aimd`]: `limit + 1` after a window without a drop (if at least
//!   half the limit was in use), `⌊limit × backoff_ratio⌋` after a window with one; a
//!   sample slower than [`Aimd::timeout`] is a drop too. [`Gradient2`]: `limit` follows
//!   `clamp(rtt_tolerance × long_rtt / short_rtt, 0.5, 1.0)`, see its docs for the
//!   formulas. Both are clamped to `min..=max` after every update.
//! * **Shrinking.** The limit only ever bounds admission: when it falls below the calls
//!   in flight, those run to the end, and new calls are rejected until fewer than the
//!   limit are in flight. No call is ever admitted while `in_flight >= limit`.
//! * **Observable.** [`limit`](ConcurrencyLimitLayer::limit) reads the limit now, on the
//!   layer and every service (all clones share it);
//!   [`on_limit_change`](AdaptiveLimitBuilder::on_limit_change) is called with
//!   `(old, new)` on every change, to export it as a metric.
//! * **Clock.** Latency is read from the CPU's time-stamp counter (`quanta`: one
//!   `rdtsc` on x86-64, about half of `Instant::now`'s cost, measured in the
//!   `concurrency_limit` bench's `clock` group), unless tokio's clock is paused when
//!   the layer is built: then from [`tokio::time`], so tests on paused time
//!   (`start_paused`, `advance`) are deterministic. Build the layer after pausing. The
//!   first counter clock of a process calibrates itself against the OS clock, once
//!   (0.5–200 ms, when the first adaptive layer or retry budget is built).
//! * **Cost.** Admission is the same compare-and-swap, plus one clock read; the end of
//!   a call reads the clock again and adds its sample to the open window with relaxed
//!   atomics, no lock. Only the sample that closes a window takes the limit's mutex, to
//!   run the algorithm (and the hook). Under concurrency a sample that lands while a
//!   window closes may count in either window.
//!
//! ```
//! use std::{sync::{Arc, Mutex}, time::Duration};
//!
//! use resilience::{concurrency_limit::SampleWindow, Aimd, BoxError, ConcurrencyLimitLayer};
//! use tower::{service_fn, Layer, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! // A dependency: answers after `ms` milliseconds, or fails at once on 0.
//! let dependency = service_fn(|ms: u64| async move {
//!     if ms == 0 {
//!         return Err::<(), BoxError>("connection reset".into());
//!     }
//!     tokio::time::sleep(Duration::from_millis(ms)).await;
//!     Ok(())
//! });
//!
//! let changes = Arc::new(Mutex::new(Vec::new()));
//! let aimd = Aimd::builder().backoff_ratio(0.5).timeout(Duration::from_millis(100)).build();
//! let layer = ConcurrencyLimitLayer::adaptive(aimd)
//!     .min(2)
//!     .max(100)
//!     .initial(16)
//!     .window(SampleWindow::Samples(4))
//!     .on_limit_change({
//!         let changes = changes.clone();
//!         move |old, new| changes.lock().unwrap().push((old, new))
//!     })
//!     .build();
//! let svc = layer.layer(dependency);
//!
//! // A window of fast successes: the limit is hardly in use (1 call in flight of 16),
//! // so it stays.
//! for _ in 0..4 {
//!     svc.clone().oneshot(10).await.unwrap();
//! }
//! assert_eq!(layer.limit(), 16);
//!
//! // A window with an error halves it; one with a call over the 100 ms threshold too.
//! for ms in [10, 0, 10, 10, 10, 250, 10, 10] {
//!     let _ = svc.clone().oneshot(ms).await;
//! }
//! assert_eq!(layer.limit(), 4);
//! assert_eq!(*changes.lock().unwrap(), [(16, 8), (8, 4)]);
//!
//! // Four calls in flight fill the limit: a fifth is rejected at once.
//! let in_flight: Vec<_> = (0..4).map(|_| tokio::spawn(svc.clone().oneshot(50))).collect();
//! tokio::task::yield_now().await;
//! assert!(svc.clone().oneshot(10).await.unwrap_err().is::<resilience::Overloaded>());
//! for call in in_flight {
//!     call.await.unwrap().unwrap();
//! }
//! // That window was fast and full: +1.
//! assert_eq!(layer.limit(), 5);
//! # }
//! ```

mod adaptive;
mod error;
mod future;
mod layer;
mod limit;
mod service;

pub use self::{
    adaptive::{
        AdaptiveLimitBuilder, Aimd, AimdBuilder, Algorithm, Gradient2, Gradient2Builder, QueueSize,
        SampleWindow,
    },
    error::{InvalidAdaptiveLimit, InvalidConcurrencyLimit, Overloaded},
    future::{HttpResponseFuture, PermitBody, ResponseFuture},
    layer::{ConcurrencyLimitLayer, DEFAULT_RETRY_AFTER},
    service::ConcurrencyLimitService,
};
