//! The response future of [`RedisTokenBucketService`](super::RedisTokenBucketService).

use std::{future::Future, pin::Pin};

/// The round trip to Redis, then the inner call (or the refusal).
///
/// Boxed: the decision is an `async` call into the `redis` client, whose future has no
/// nameable type, and it is one network round trip, next to which the allocation does
/// not count.
pub type ResponseFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;
