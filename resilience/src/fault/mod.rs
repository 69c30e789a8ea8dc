//! Fault injection: [`FaultLayer`] makes a share of calls fail, or slow, on purpose,
//! decided by a seeded generator, so a test (or a drill) can exercise the breakers,
//! retries and timeouts around a service and get the same faults on every run.
//!
//! ```
//! use std::{convert::Infallible, time::Duration};
//! use http::{Request, Response, StatusCode};
//! use resilience::fault::{FaultLayer, InjectedFault, Latency};
//! use tower::{service_fn, Layer, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! // Error mode: a third of the calls fail, every call takes 10 to 50 ms more.
//! let layer = FaultLayer::builder(42)
//!     .error_rate(0.33)
//!     .latency(Latency::uniform(Duration::from_millis(10), Duration::from_millis(50)))
//!     .build();
//! let svc = layer.layer(service_fn(|n: u32| async move { Ok::<_, Infallible>(n) }));
//! let mut outcomes = Vec::new();
//! for n in 0..6 {
//!     let start = tokio::time::Instant::now();
//!     let outcome = svc.clone().oneshot(n).await;
//!     assert!(start.elapsed() >= Duration::from_millis(10));
//!     if let Err(e) = &outcome {
//!         assert!(e.downcast_ref::<InjectedFault>().is_some());
//!     }
//!     outcomes.push(outcome.is_ok());
//! }
//! assert_eq!(layer.stats().calls, 6);
//! assert_eq!(layer.stats().errors, outcomes.iter().filter(|ok| !**ok).count() as u64);
//!
//! // HTTP mode: every call answered 502 by the layer, none reaching the service.
//! let svc = FaultLayer::builder(7)
//!     .error_rate(1.0)
//!     .status(StatusCode::BAD_GATEWAY)
//!     .build()
//!     .http()
//!     .layer(service_fn(|_req: Request<String>| async {
//!         Ok::<_, Infallible>(Response::new(String::from("fine")))
//!     }));
//! let res = svc.oneshot(Request::new(String::new())).await.unwrap();
//! assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
//! assert_eq!(res.headers()["x-injected-fault"], "1");
//! # }
//! ```
//!
//! # Determinism
//!
//! Each call draws, when it is made (in `call`, not when its future is polled), the
//! same numbers in the same order from one generator per layer: a roll for the
//! latency, a latency if it is delayed, a roll for the error. So one seed and one
//! order of calls give one sequence of outcomes and delays. The generator is `rand`'s
//! `SmallRng` seeded with `seed_from_u64`: fast, not cryptographic, and its sequence
//! is only promised for one version of `rand` on one platform, which is what a test
//! needs. Delays are `tokio::time::sleep`s, exact on paused time.
//!
//! # Contract of the layer
//!
//! - `poll_ready` only forwards to the inner service.
//! - A failed call never reaches the inner service; a delayed one reaches it when the
//!   delay is over (the inner future is made at `call` and first polled then).
//! - The generator and the [`stats`](FaultLayer::stats) are made when the layer is
//!   built and shared by all its services and their clones.
//! - Bad values (a rate outside `0..=1`, a uniform latency with `min > max`) panic in
//!   [`build`](FaultLayerBuilder::build); [`try_build`](FaultLayerBuilder::try_build)
//!   returns [`InvalidFault`] instead.

mod error;
mod future;
mod layer;
mod service;

pub use self::{
    error::{InjectedFault, InvalidFault},
    future::ResponseFuture,
    layer::{FaultLayer, FaultLayerBuilder, FaultStats, Latency},
    service::FaultService,
};
