//! Token buckets shared through Redis: [`RedisBuckets`] and [`RedisTokenBucketLayer`]
//! (crate feature `redis`). Several servers behind one load balancer then enforce one
//! limit per client together, instead of one each.
//!
//! ```
//! use std::{convert::Infallible, net::SocketAddr, time::{Duration, SystemTime}};
//! use http::{Request, Response, StatusCode};
//! use resilience::{Burst, PeerIp, Rate, RedisBuckets, RedisFallback, RedisTokenBucketLayer};
//! use tower::{service_fn, Layer, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // Every server of the fleet builds the same buckets: same Redis, same prefix.
//! let client = redis::Client::open("redis://127.0.0.1:6379").unwrap();
//! # let unique = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos();
//! let buckets = RedisBuckets::builder(client, Rate::per_second(1.0), Burst(2))
//!     .prefix(format!("example:{unique}:"))
//!     .timeout(Duration::from_millis(100))
//!     // Without Redis, each server limits on its own: the example runs either way.
//!     .fallback(RedisFallback::Local)
//!     .build();
//! let svc = RedisTokenBucketLayer::new(PeerIp, buckets.clone())
//!     .http()
//!     .layer(service_fn(|_req: Request<()>| async {
//!         Ok::<_, Infallible>(Response::new(()))
//!     }));
//!
//! let request = || {
//!     let mut req = Request::new(());
//!     req.extensions_mut().insert("198.51.100.4:40000".parse::<SocketAddr>().unwrap());
//!     req
//! };
//! let mut statuses = Vec::new();
//! for _ in 0..3 {
//!     statuses.push(svc.clone().oneshot(request()).await.unwrap().status());
//! }
//! assert_eq!(statuses, [StatusCode::OK, StatusCode::OK, StatusCode::TOO_MANY_REQUESTS]);
//! println!("decided locally {} times", buckets.fallbacks());
//! # }
//! ```
//!
//! # How
//!
//! One Lua script holds the GCRA of [`KeyedTokenBuckets`](crate::KeyedTokenBuckets)
//! (one number per key: when its bucket is full again), run with `EVALSHA`: one round
//! trip per decision, atomic in Redis, on the server's clock (`TIME`). Keys are
//! `<prefix>{<key>}`, a hash tag per client key, so a Redis Cluster spreads clients over
//! its slots, and expire when their bucket is full again.
//!
//! # When Redis fails
//!
//! Every decision is bounded by a timeout; on an error or a timeout the configured
//! [`RedisFallback`] decides, [`Local`](RedisFallback::Local) buckets (the default),
//! [`Allow`](RedisFallback::Allow) or [`Deny`](RedisFallback::Deny), and
//! [`RedisBuckets::fallbacks`] counts how often. The connection is re-established in
//! the background; the next decision tries Redis again.

mod buckets;
mod future;
mod layer;
mod service;

pub use self::{
    buckets::{RedisBuckets, RedisBucketsBuilder, RedisFallback, DEFAULT_REDIS_TIMEOUT},
    future::ResponseFuture as RedisResponseFuture,
    layer::RedisTokenBucketLayer,
    service::RedisTokenBucketService,
};
