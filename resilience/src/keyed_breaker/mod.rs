//! A circuit breaker per key: [`KeyedCircuitBreakerLayer`] keeps one
//! [`CircuitBreaker`](crate::CircuitBreaker) per upstream host (or client, tenant...),
//! so one failing key fails fast while the others keep being called.
//!
//! ```
//! use std::{convert::Infallible, time::Duration};
//! use http::{Request, Response, StatusCode};
//! use resilience::{CircuitBreaker, CircuitState, KeyedCircuitBreakerLayer, UriHost};
//! use tower::{service_fn, Layer, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! // A client whose one upstream, down.example, answers 502.
//! let client = service_fn(|req: Request<()>| async move {
//!     let status = match req.uri().host() {
//!         Some("down.example") => StatusCode::BAD_GATEWAY,
//!         _ => StatusCode::OK,
//!     };
//!     let mut res = Response::new(());
//!     *res.status_mut() = status;
//!     Ok::<_, Infallible>(res)
//! });
//! let layer = KeyedCircuitBreakerLayer::builder(
//!     CircuitBreaker::builder().consecutive_failures(2).open_for(Duration::from_secs(10)),
//! )
//! .key(UriHost)
//! .max_keys(1_000)
//! .build()
//! .http();
//! let svc = layer.layer(client);
//! let get = |uri: &str| Request::get(uri).body(()).unwrap();
//!
//! for _ in 0..2 {
//!     let res = svc.clone().oneshot(get("https://down.example/x")).await.unwrap();
//!     assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
//! }
//! // down.example's breaker is open: failing fast, with Retry-After...
//! let res = svc.clone().oneshot(get("https://down.example/x")).await.unwrap();
//! assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
//! assert_eq!(res.headers()["retry-after"], "10");
//! // ...while up.example is still called.
//! let res = svc.clone().oneshot(get("https://up.example/x")).await.unwrap();
//! assert_eq!(res.status(), StatusCode::OK);
//!
//! let breakers = layer.breakers();
//! assert_eq!(breakers.get(&"down.example".to_owned()).unwrap().state(), CircuitState::Open);
//! assert_eq!(breakers.get(&"up.example".to_owned()).unwrap().state(), CircuitState::Closed);
//! # }
//! ```
//!
//! # Contract
//!
//! - Every key's breaker is built from the one [`CircuitBreakerBuilder`](crate::CircuitBreakerBuilder)
//!   given to [`KeyedCircuitBreakerLayer::builder`], on the key's first request, and
//!   behaves exactly as a [`CircuitBreakerLayer`](crate::CircuitBreakerLayer)'s breaker.
//! - Keys come from the [key extractors](crate::key) of the token buckets, plus
//!   [`UriHost`](crate::UriHost) (the request URI's host, for clients). A request
//!   without a key is refused, never guarded by some shared breaker.
//! - At most `max_keys` breakers exist: closed, idle ones are evicted first (see
//!   [`KeyedCircuitBreakers`]).
//! - The map is made when the layer is built and shared by all its services and their
//!   clones; `poll_ready` only forwards; rejections happen in `call`.

mod error;
pub mod future;
mod layer;
mod map;
mod service;

pub use self::{
    error::InvalidKeyedBreaker,
    layer::{KeyedCircuitBreakerLayer, KeyedCircuitBreakerLayerBuilder},
    map::{KeyedCircuitBreakers, DEFAULT_MAX_BREAKERS},
    service::KeyedCircuitBreakerService,
};
