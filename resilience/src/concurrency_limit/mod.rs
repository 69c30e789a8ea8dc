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

mod error;
mod future;
mod layer;
mod limit;
mod service;

pub use self::{
    error::{InvalidConcurrencyLimit, Overloaded},
    future::{HttpResponseFuture, PermitBody, ResponseFuture},
    layer::{ConcurrencyLimitLayer, DEFAULT_RETRY_AFTER},
    service::ConcurrencyLimitService,
};
