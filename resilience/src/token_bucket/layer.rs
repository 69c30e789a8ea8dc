//! [`TokenBucketLayer`] and its modes.

use std::{fmt, sync::Arc, time::Duration};

use bytes::Bytes;
use http::HeaderValue;
use tower_layer::Layer;

use super::{
    bucket::{Gcra, TokenBucket},
    error::InvalidRate,
    keyed::{KeyedSlot, KeyedTokenBuckets, DEFAULT_MAX_KEYS},
    service::TokenBucketService,
};
use crate::key::GlobalKey;

/// Reject mode (the default): a request over the limit fails with
/// [`RateLimited`](crate::RateLimited), boxed into [`BoxError`](crate::BoxError).
#[derive(Clone, Copy, Debug, Default)]
pub struct Reject;

/// HTTP mode: a request over the limit gets a `429 Too Many Requests` response.
/// Set with [`TokenBucketLayer::http`].
#[derive(Clone, Debug)]
pub struct Http {
    /// `Content-Type` and body of the 429; `None` is the default JSON.
    pub(crate) body: Option<(HeaderValue, Bytes)>,
    /// `RateLimit-Policy`, the same on every response.
    pub(crate) policy: HeaderValue,
    /// Whether responses that pass get the `RateLimit` headers too.
    pub(crate) on_success: bool,
}

/// Wait mode: a request over the limit waits for its token, up to a bound.
/// Set with [`TokenBucketLayer::wait`].
#[derive(Clone, Copy, Debug)]
pub struct Wait {
    pub(crate) max_wait: Duration,
}

/// Where the buckets live. Created when the layer is built and shared (the bucket and
/// the slot are both handles to shared state) by every service the layer makes.
#[derive(Clone, Debug)]
pub(crate) enum Limiter {
    /// One bucket: the layer was made by `new` and never keyed.
    Global(TokenBucket),
    /// A bucket per key.
    Keyed(Arc<KeyedSlot>),
}

/// A [`tower_layer::Layer`] that rate limits a service with token buckets.
///
/// ```
/// use std::{convert::Infallible, net::SocketAddr};
/// use bytes::Bytes;
/// use http::{Request, Response, StatusCode};
/// use http_body_util::Full;
/// use resilience::{PeerIp, TokenBucketLayer};
/// use tower::{service_fn, Layer, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// // Per client IP: 1 request/s, bursts of 2. Over the limit: 429 + Retry-After.
/// let layer = TokenBucketLayer::new(1.0, 2).key(PeerIp).http();
/// let svc = layer.layer(service_fn(|_req: Request<Full<Bytes>>| async {
///     Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"hello"))))
/// }));
///
/// let peer: SocketAddr = "203.0.113.7:50000".parse().unwrap();
/// let mut statuses = Vec::new();
/// for _ in 0..3 {
///     let mut req = Request::new(Full::default());
///     req.extensions_mut().insert(peer);
///     let res = svc.clone().oneshot(req).await.unwrap();
///     statuses.push(res.status());
/// }
/// assert_eq!(statuses, [StatusCode::OK, StatusCode::OK, StatusCode::TOO_MANY_REQUESTS]);
/// # }
/// ```
///
/// # Modes
///
/// | mode | built with | over the limit | `Error` |
/// |---|---|---|---|
/// | reject | [`new`](Self::new) | `Err(RateLimited)`, boxed | [`BoxError`](crate::BoxError) |
/// | HTTP | [`.http()`](Self::http) | `Ok(429)` with `Retry-After`, `RateLimit`, `RateLimit-Policy` | `S::Error` |
/// | wait | [`.wait(max)`](Self::wait) | waits up to `max`, then `Err(RateLimited)` | [`BoxError`](crate::BoxError) |
///
/// # Keys
///
/// [`new`](Self::new) makes one bucket for all requests ([`GlobalKey`]).
/// [`.key(extractor)`](Self::key) gives every key its own bucket (a
/// [`KeyedTokenBuckets`](crate::KeyedTokenBuckets), capped at
/// [`.max_keys(n)`](Self::max_keys) keys). A request whose key is missing is refused:
/// `Err(MissingKey)` or, in HTTP mode, a `500` naming what is missing.
///
/// # Sharing
///
/// The buckets are created when the layer is built. Every service it makes, and every
/// clone of those services, draws from the same buckets; so do clones of the layer.
/// (hyper-util clones the service for each request, so anything else would not limit.)
/// Build a new layer for an independent limit.
#[derive(Clone)]
pub struct TokenBucketLayer<E = GlobalKey, M = Reject> {
    pub(crate) extractor: E,
    pub(crate) limiter: Limiter,
    pub(crate) gcra: Gcra,
    pub(crate) max_keys: usize,
    pub(crate) mode: M,
}

impl TokenBucketLayer {
    /// One bucket of `rate` tokens per second and `capacity` burst for all requests, in
    /// reject mode.
    ///
    /// # Panics
    ///
    /// On the parameters [`TokenBucket::new`] panics on; see
    /// [`try_new`](Self::try_new).
    #[track_caller]
    pub fn new(rate: f64, capacity: u32) -> Self {
        match Self::try_new(rate, capacity) {
            Ok(layer) => layer,
            Err(e) => panic!("{e}"),
        }
    }

    /// Like [`new`](Self::new), but returns an error instead of panicking.
    pub fn try_new(rate: f64, capacity: u32) -> Result<Self, InvalidRate> {
        let gcra = Gcra::new(rate, capacity)?;
        Ok(TokenBucketLayer {
            extractor: GlobalKey,
            limiter: Limiter::Global(TokenBucket::try_new(rate, capacity)?),
            gcra,
            max_keys: DEFAULT_MAX_KEYS,
            mode: Reject,
        })
    }
}

impl<E, M> TokenBucketLayer<E, M> {
    /// A bucket per key that `extractor` finds in a request (e.g. [`PeerIp`]).
    ///
    /// This replaces the layer's buckets with a new, empty keyed map.
    ///
    /// [`PeerIp`]: crate::PeerIp
    pub fn key<E2>(self, extractor: E2) -> TokenBucketLayer<E2, M> {
        TokenBucketLayer {
            extractor,
            limiter: Limiter::Keyed(Arc::new(KeyedSlot::new(self.gcra, self.max_keys))),
            gcra: self.gcra,
            max_keys: self.max_keys,
            mode: self.mode,
        }
    }

    /// The hard cap on keys (default 100 000; 0 is taken as 1). See
    /// [`KeyedTokenBuckets`](crate::KeyedTokenBuckets) for what is evicted at the cap.
    /// Has no effect on a global (unkeyed) layer. Starts from an empty map.
    pub fn max_keys(mut self, max_keys: usize) -> Self {
        self.max_keys = max_keys.max(1);
        if let Limiter::Keyed(_) = self.limiter {
            self.limiter = Limiter::Keyed(Arc::new(KeyedSlot::new(self.gcra, self.max_keys)));
        }
        self
    }

    /// HTTP mode, for services of `http::Request` to `http::Response`: over the limit,
    /// answer `429 Too Many Requests` instead of an error, so the layer drops into axum
    /// with a plain `.layer(...)` (no `HandleErrorLayer`).
    ///
    /// The 429 carries `Retry-After` (whole seconds, rounded up, never 0),
    /// `RateLimit-Policy: "default";q=<capacity>;w=<capacity/rate, s>` and
    /// `RateLimit: "default";r=<remaining>;t=<s until full>` (IETF
    /// draft-ietf-httpapi-ratelimit-headers), and by default the JSON body
    /// `{"error":"rate_limited","message":"..."}` (see [`body`](Self::body)). Responses
    /// that pass get the two `RateLimit` headers too, unless the inner service set them
    /// (or [`headers_on_success(false)`](TokenBucketLayer::headers_on_success)).
    ///
    /// A request without a key gets `500` with
    /// `{"error":"rate_limit_key_missing","message":"..."}` naming what is missing.
    ///
    /// The service's `Response` is `http::Response<ResponseBody<B>>`; its `Error` is the
    /// inner service's.
    pub fn http(self) -> TokenBucketLayer<E, Http> {
        let window_nanos = (f64::from(self.gcra.capacity()) / self.gcra.rate() * 1e9).round();
        // Through whole nanoseconds first, so 3 / 0.3 is 10 s, not 10.000000000000002.
        let window = (window_nanos / 1e9).ceil().max(1.0) as u64;
        let policy = format!("\"default\";q={};w={}", self.gcra.capacity(), window);
        TokenBucketLayer {
            extractor: self.extractor,
            limiter: self.limiter,
            gcra: self.gcra,
            max_keys: self.max_keys,
            mode: Http {
                body: None,
                policy: HeaderValue::try_from(policy)
                    .unwrap_or_else(|_| HeaderValue::from_static("\"default\"")),
                on_success: true,
            },
        }
    }

    /// Wait mode, for clients: a request over the limit books the next free token and
    /// waits (tokio sleep) until it is due, then calls the inner service. If that wait
    /// would be longer than `max_wait`, it fails at once with
    /// [`RateLimited`](crate::RateLimited) instead, without taking a token.
    ///
    /// Needs `S: Clone`: the service that was polled ready is moved into the waiting
    /// future (a fresh clone takes its place), so the call after the wait goes to a ready
    /// service. Dropping a waiting future gives its token back. `Error` is
    /// [`BoxError`](crate::BoxError).
    pub fn wait(self, max_wait: Duration) -> TokenBucketLayer<E, Wait> {
        self.with_mode(Wait { max_wait })
    }

    /// Back to reject mode.
    pub fn reject(self) -> TokenBucketLayer<E, Reject> {
        self.with_mode(Reject)
    }

    fn with_mode<M2>(self, mode: M2) -> TokenBucketLayer<E, M2> {
        TokenBucketLayer {
            extractor: self.extractor,
            limiter: self.limiter,
            gcra: self.gcra,
            max_keys: self.max_keys,
            mode,
        }
    }

    /// The refill rate, tokens per second.
    pub fn rate(&self) -> f64 {
        self.gcra.rate()
    }

    /// The capacity (burst) of each bucket.
    pub fn capacity(&self) -> u32 {
        self.gcra.capacity()
    }

    /// The key extractor.
    pub fn extractor(&self) -> &E {
        &self.extractor
    }

    /// A handle to the buckets of key type `K` that the services of this layer use
    /// (clones share state), e.g. to export the number of tracked keys as a metric or
    /// to check the cap in a test; `None` for a global (unkeyed) layer. `K` is the
    /// extractor's key type (`IpAddr` for [`PeerIp`](crate::PeerIp)); asking for
    /// another type makes a separate map that no request uses.
    pub fn keyed_buckets<K>(&self) -> Option<KeyedTokenBuckets<K>>
    where
        K: std::hash::Hash + Eq + Clone + Send + Sync + 'static,
    {
        match &self.limiter {
            Limiter::Global(_) => None,
            Limiter::Keyed(slot) => Some(KeyedTokenBuckets::clone(&slot.get::<K>())),
        }
    }
}

impl<E> TokenBucketLayer<E, Http> {
    /// The body of the 429 response and its `Content-Type`, instead of the default JSON.
    ///
    /// ```
    /// use http::HeaderValue;
    /// use resilience::TokenBucketLayer;
    ///
    /// let layer = TokenBucketLayer::new(10.0, 20)
    ///     .http()
    ///     .body(HeaderValue::from_static("text/plain; charset=utf-8"), "slow down\n");
    /// # let _ = layer;
    /// ```
    pub fn body(mut self, content_type: HeaderValue, body: impl Into<Bytes>) -> Self {
        self.mode.body = Some((content_type, body.into()));
        self
    }

    /// Whether responses that pass carry `RateLimit-Policy` and `RateLimit` too
    /// (default `true`); the `429` always does. Without them a passing request costs
    /// no header formatting, and its response is some 70 bytes shorter: worth it for
    /// an API whose clients call it often and stay far from the limit.
    ///
    /// ```
    /// use resilience::{PeerIp, TokenBucketLayer};
    ///
    /// let layer = TokenBucketLayer::new(30.0, 60)
    ///     .key(PeerIp)
    ///     .http()
    ///     .headers_on_success(false);
    /// # let _ = layer;
    /// ```
    pub fn headers_on_success(mut self, on: bool) -> Self {
        self.mode.on_success = on;
        self
    }
}

impl<S, E: Clone, M: Clone> Layer<S> for TokenBucketLayer<E, M> {
    type Service = TokenBucketService<S, E, M>;

    fn layer(&self, inner: S) -> Self::Service {
        TokenBucketService::new(
            inner,
            self.extractor.clone(),
            self.limiter.clone(),
            self.mode.clone(),
        )
    }
}

impl<E: fmt::Debug, M: fmt::Debug> fmt::Debug for TokenBucketLayer<E, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenBucketLayer")
            .field("rate", &self.gcra.rate())
            .field("capacity", &self.gcra.capacity())
            .field("extractor", &self.extractor)
            .field("keyed", &matches!(self.limiter, Limiter::Keyed(_)))
            .field("max_keys", &self.max_keys)
            .field("mode", &self.mode)
            .finish()
    }
}
