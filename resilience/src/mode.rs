//! The modes of the layers: what a rejection looks like to the caller.
//!
//! Every layer takes the same markers as its last type parameter, so a stack's type
//! says how it rejects:
//!
//! | marker | set with | a rejection is | service `Error` | layers |
//! |---|---|---|---|---|
//! | [`ErrorMode`] | (the default) | `Err`, a boxed [`CircuitOpen`] / [`RateLimited`] / [`MissingKey`] / [`Overloaded`] | [`BoxError`] | all |
//! | [`HttpMode`] | `.http()` | `Ok` response: `503` / `429` / `500`, with `Retry-After` | the inner service's | all |
//! | [`WaitMode`] | `.wait(max)` | a wait for the token, up to `max`; then `Err` | [`BoxError`] | [`TokenBucketLayer`] |
//!
//! [`CircuitOpen`]: crate::CircuitOpen
//! [`RateLimited`]: crate::RateLimited
//! [`MissingKey`]: crate::MissingKey
//! [`Overloaded`]: crate::Overloaded
//! [`BoxError`]: crate::BoxError
//! [`TokenBucketLayer`]: crate::TokenBucketLayer

/// Error mode, the default of every layer: a rejection is an `Err` holding a boxed
/// [`CircuitOpen`](crate::CircuitOpen), [`RateLimited`](crate::RateLimited),
/// [`Overloaded`](crate::Overloaded) (or [`MissingKey`](crate::MissingKey)), to find
/// with `downcast_ref`; the service's error type is [`BoxError`](crate::BoxError).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ErrorMode;

/// HTTP mode, set with `.http()` on any layer: a rejection is a response (`503`
/// from the breaker and the concurrency limit, `429` from the limiter, `500` for a
/// missing rate-limit key) with
/// `Retry-After`, and the service keeps its inner error type, so an infallible axum
/// service stays infallible.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HttpMode;

/// Wait mode, set with [`TokenBucketLayer::wait`](crate::TokenBucketLayer::wait): a
/// request over the limit waits for its token, up to a bound, then fails with
/// [`RateLimited`](crate::RateLimited). For clients.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WaitMode;
