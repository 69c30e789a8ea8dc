//! [`RedisTokenBucketLayer`]: the token-bucket layer on buckets kept in Redis.

use std::{fmt, marker::PhantomData, sync::Arc};

use bytes::Bytes;
use http::HeaderValue;
use tower_layer::Layer;

use super::{buckets::RedisBuckets, service::RedisTokenBucketService};
use crate::{
    key::KeyType,
    mode::{ErrorMode, HttpMode},
    token_bucket::layer::Settings,
};

/// A [`Layer`] that rate limits a service on [`RedisBuckets`], so that every process
/// using the same Redis and prefix shares one limit per key.
///
/// The same contract as [`TokenBucketLayer`](crate::TokenBucketLayer): `poll_ready`
/// only forwards, refusals happen in `call` and never reach the inner service, a
/// missing key is refused ([`MissingKey`](crate::MissingKey), HTTP mode `500`), and in
/// [HTTP mode](Self::http) a refusal is the same `429` with the same `Retry-After`,
/// `RateLimit` and `RateLimit-Policy` fields, and responses that pass get the two
/// `RateLimit` fields. The buckets, and so the connection, are shared by every service
/// and clone.
///
/// The inner service must be `Clone`: the decision is a round trip, after which the
/// service that was polled ready is called (a clone takes its place, as in
/// [wait mode](crate::WaitMode)).
pub struct RedisTokenBucketLayer<E: KeyType, M = ErrorMode> {
    extractor: E,
    buckets: RedisBuckets<E::Key>,
    settings: Arc<Settings>,
    _mode: PhantomData<fn() -> M>,
}

impl<E: KeyType> RedisTokenBucketLayer<E> {
    /// A layer in error mode drawing from `buckets` by the key `extractor` finds. Use
    /// a key whose `Display` is the same in every process ([`PeerIp`](crate::PeerIp),
    /// [`key_fn`](crate::key_fn)); [`HeaderKey`](crate::HeaderKey)'s digest is keyed per
    /// process.
    pub fn new(extractor: E, buckets: RedisBuckets<E::Key>) -> Self {
        let settings = Arc::new(Settings::new(buckets.gcra()));
        RedisTokenBucketLayer {
            extractor,
            buckets,
            settings,
            _mode: PhantomData,
        }
    }
}

impl<E: KeyType, M> RedisTokenBucketLayer<E, M> {
    /// HTTP mode: `429` responses, as [`TokenBucketLayer::http`](crate::TokenBucketLayer::http).
    pub fn http(self) -> RedisTokenBucketLayer<E, HttpMode> {
        RedisTokenBucketLayer {
            extractor: self.extractor,
            buckets: self.buckets,
            settings: self.settings,
            _mode: PhantomData,
        }
    }

    /// The body of the 429 and its `Content-Type`, instead of the default JSON; as
    /// [`TokenBucketLayer::body`](crate::TokenBucketLayer::body).
    pub fn body(mut self, content_type: HeaderValue, body: impl Into<Bytes>) -> Self {
        Arc::make_mut(&mut self.settings).body = Some((content_type, body.into()));
        self
    }

    /// Whether responses that pass carry `RateLimit-Policy` and `RateLimit` too (default
    /// `true`); as
    /// [`TokenBucketLayer::headers_on_success`](crate::TokenBucketLayer::headers_on_success).
    pub fn headers_on_success(mut self, on: bool) -> Self {
        Arc::make_mut(&mut self.settings).headers_on_success = on;
        self
    }

    /// The key extractor, as given to [`new`](RedisTokenBucketLayer::new).
    pub fn key(&self) -> &E {
        &self.extractor
    }

    /// The shared buckets, as given to [`new`](RedisTokenBucketLayer::new): e.g. to
    /// export [`fallbacks`](RedisBuckets::fallbacks) as a metric.
    pub fn buckets(&self) -> &RedisBuckets<E::Key> {
        &self.buckets
    }
}

impl<S, E: KeyType, M> Layer<S> for RedisTokenBucketLayer<E, M> {
    type Service = RedisTokenBucketService<S, E, M>;

    fn layer(&self, inner: S) -> Self::Service {
        RedisTokenBucketService::new(
            inner,
            self.extractor.clone(),
            self.buckets.clone(),
            self.settings.clone(),
        )
    }
}

impl<E: KeyType, M> Clone for RedisTokenBucketLayer<E, M> {
    fn clone(&self) -> Self {
        RedisTokenBucketLayer {
            extractor: self.extractor.clone(),
            buckets: self.buckets.clone(),
            settings: self.settings.clone(),
            _mode: PhantomData,
        }
    }
}

impl<E: KeyType + fmt::Debug, M> fmt::Debug for RedisTokenBucketLayer<E, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTokenBucketLayer")
            .field("key", &self.extractor)
            .field("buckets", &self.buckets)
            .field("mode", &std::any::type_name::<M>())
            .finish()
    }
}
