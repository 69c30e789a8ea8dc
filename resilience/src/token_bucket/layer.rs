//! [`TokenBucketLayer`], its builder, and its modes.

use std::{
    fmt,
    marker::PhantomData,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use http::HeaderValue;
use tower_layer::Layer;

use super::{
    bucket::{Gcra, TokenBucket},
    error::{InvalidTokenBucket, MissingKey, RateLimited},
    keyed::{check_max_keys, KeyedTokenBuckets, DEFAULT_MAX_KEYS},
    rate::{Burst, Rate},
    service::TokenBucketService,
};
use crate::{
    key::{GlobalKey, KeyType},
    mode::{ErrorMode, HttpMode, WaitMode},
};

/// Where the buckets live. Created once, by [`TokenBucketLayerBuilder::build`], and
/// shared (both variants are handles to shared state) by every service the layer makes.
pub(crate) enum Limiter<K> {
    /// One bucket: the builder was never given a key extractor.
    Global(TokenBucket),
    /// A bucket per key.
    Keyed(KeyedTokenBuckets<K>),
}

impl<K> Clone for Limiter<K> {
    fn clone(&self) -> Self {
        match self {
            Limiter::Global(bucket) => Limiter::Global(bucket.clone()),
            Limiter::Keyed(buckets) => Limiter::Keyed(buckets.clone()),
        }
    }
}

impl<K> fmt::Debug for Limiter<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Limiter::Global(bucket) => f.debug_tuple("Global").field(bucket).finish(),
            Limiter::Keyed(buckets) => f.debug_tuple("Keyed").field(buckets).finish(),
        }
    }
}

/// What the modes need besides the buckets; shared by the layer's services.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    /// `Content-Type` and body of the 429; `None` is the default JSON.
    pub(crate) body: Option<(HeaderValue, Bytes)>,
    /// `RateLimit-Policy`, the same on every response.
    pub(crate) policy: HeaderValue,
    /// Whether responses that pass get the `RateLimit` headers too.
    pub(crate) headers_on_success: bool,
    /// Wait mode's bound.
    pub(crate) max_wait: Duration,
    /// Set by [`TokenBucketLayerBuilder::shadow`]: refusals are counted, not made.
    pub(crate) shadow: Option<Arc<Shadow>>,
}

/// A request shadow mode let through that the limiter would have refused; what the
/// [`on_shadowed`](TokenBucketLayerBuilder::on_shadowed) hook is given.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ShadowRejection {
    /// Over the limit: outside shadow mode this would be the `RateLimited` error (or
    /// the `429`).
    Limited(RateLimited),
    /// The key was missing: outside shadow mode this would be the `MissingKey` error
    /// (or the `500`).
    MissingKey(MissingKey),
}

type ShadowHook = Arc<dyn Fn(&ShadowRejection) + Send + Sync>;

/// Shadow mode's shared state: made by `build`, shared by every service and clone.
pub(crate) struct Shadow {
    count: AtomicU64,
    hook: Option<ShadowHook>,
}

impl Shadow {
    /// Counts a refusal that was not made, and tells the hook.
    pub(crate) fn record(&self, rejection: ShadowRejection) {
        self.count.fetch_add(1, Ordering::Relaxed);
        if let Some(hook) = &self.hook {
            hook(&rejection);
        }
    }
}

impl fmt::Debug for Shadow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shadow")
            .field("count", &self.count.load(Ordering::Relaxed))
            .field("hook", &self.hook.is_some())
            .finish()
    }
}

impl Settings {
    pub(crate) fn new(gcra: &Gcra) -> Settings {
        let burst = gcra.burst();
        let window_nanos = (f64::from(burst) / gcra.rate().as_per_second() * 1e9).round();
        // Through whole nanoseconds first, so 3 / 0.3 is 10 s, not 10.000000000000002.
        let window = (window_nanos / 1e9).ceil().max(1.0) as u64;
        let policy = format!("\"default\";q={burst};w={window}");
        Settings {
            body: None,
            policy: HeaderValue::try_from(policy)
                .unwrap_or_else(|_| HeaderValue::from_static("\"default\"")),
            headers_on_success: true,
            max_wait: Duration::ZERO,
            shadow: None,
        }
    }
}

/// Builds a [`TokenBucketLayer`]: what its buckets are (rate, burst, key, key cap).
/// Get one from [`TokenBucketLayer::builder`].
///
/// The builder holds no buckets; [`build`](Self::build) creates them, exactly once. So
/// the order of [`key`](Self::key) and [`max_keys`](Self::max_keys) does not matter,
/// and neither can throw away buckets a service already uses. Every setting has a
/// getter of the same name on the layer.
#[derive(Clone)]
#[must_use = "call .build() to get a TokenBucketLayer"]
pub struct TokenBucketLayerBuilder<E = GlobalKey> {
    rate: Rate,
    burst: Burst,
    extractor: E,
    keyed: bool,
    max_keys: usize,
    shadow: bool,
    on_shadowed: Option<ShadowHook>,
}

impl<E: fmt::Debug> fmt::Debug for TokenBucketLayerBuilder<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenBucketLayerBuilder")
            .field("rate", &self.rate)
            .field("burst", &self.burst)
            .field("key", &self.extractor)
            .field("keyed", &self.keyed)
            .field("max_keys", &self.max_keys)
            .field("shadow", &self.shadow)
            .field("on_shadowed", &self.on_shadowed.is_some())
            .finish()
    }
}

impl<E> TokenBucketLayerBuilder<E> {
    /// A bucket per key that `extractor` finds in a request (e.g.
    /// [`PeerIp`](crate::PeerIp)), instead of one bucket for all requests.
    pub fn key<E2: KeyType>(self, extractor: E2) -> TokenBucketLayerBuilder<E2> {
        TokenBucketLayerBuilder {
            rate: self.rate,
            burst: self.burst,
            extractor,
            keyed: true,
            max_keys: self.max_keys,
            shadow: self.shadow,
            on_shadowed: self.on_shadowed,
        }
    }

    /// Shadow mode: the limiter decides as usual (and takes tokens), but lets every
    /// request through; the ones it would have refused, over the limit or without a
    /// key, are counted ([`TokenBucketLayer::shadowed`]) and given to the
    /// [`on_shadowed`](Self::on_shadowed) hook. For trying a limit on real traffic
    /// before enforcing it. Global and keyed layers alike, in every mode: in HTTP mode
    /// a shadowed request's response gets no `RateLimit` headers (they would announce
    /// a limit that was not applied), and in wait mode nothing waits.
    ///
    /// ```
    /// use std::sync::{Arc, atomic::{AtomicU64, Ordering}};
    /// use resilience::{key_fn, Burst, Rate, ShadowRejection, TokenBucketLayer};
    /// use tower::{service_fn, Layer, ServiceExt};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let seen = Arc::new(AtomicU64::new(0));
    /// let hook_seen = seen.clone();
    /// let layer = TokenBucketLayer::builder(Rate::per_second(1.0), Burst(2))
    ///     .key(key_fn(|user: &&'static str| Some(*user)))
    ///     .shadow()
    ///     .on_shadowed(move |r| {
    ///         assert!(matches!(r, ShadowRejection::Limited(_)));
    ///         hook_seen.fetch_add(1, Ordering::Relaxed);
    ///     })
    ///     .build();
    /// let svc = layer.layer(service_fn(|user: &'static str| async move {
    ///     Ok::<_, std::convert::Infallible>(user)
    /// }));
    /// for _ in 0..5 {
    ///     assert_eq!(svc.clone().oneshot("alice").await.unwrap(), "alice"); // all pass
    /// }
    /// assert!(layer.shadow());
    /// assert_eq!(layer.shadowed(), 3); // 5 requests, a burst of 2
    /// assert_eq!(seen.load(Ordering::Relaxed), 3);
    /// # }
    /// ```
    pub fn shadow(mut self) -> Self {
        self.shadow = true;
        self
    }

    /// Called, in [shadow mode](Self::shadow), for every request let through that
    /// would have been refused, on the task that made the request. Keep it short (a
    /// metric, a sampled log line). Without [`shadow`](Self::shadow) it is never
    /// called: refusals are then made, and are the caller's to see.
    pub fn on_shadowed<F>(mut self, hook: F) -> Self
    where
        F: Fn(&ShadowRejection) + Send + Sync + 'static,
    {
        self.on_shadowed = Some(Arc::new(hook));
        self
    }

    /// The hard cap on keys (default [`DEFAULT_MAX_KEYS`], 100 000). See
    /// [`KeyedTokenBuckets`] for what is evicted at the cap. Unused by a global
    /// (unkeyed) layer. 0 is refused by [`build`](Self::build).
    pub fn max_keys(mut self, max_keys: usize) -> Self {
        self.max_keys = max_keys;
        self
    }

    /// Creates the buckets and the layer, in [error mode](ErrorMode).
    ///
    /// # Panics
    ///
    /// When the burst is 0, `burst / rate` is over a century, or `max_keys` is 0. Use
    /// [`try_build`](Self::try_build) for parameters read at run time.
    #[track_caller]
    pub fn build(self) -> TokenBucketLayer<E>
    where
        E: KeyType,
    {
        match self.try_build() {
            Ok(layer) => layer,
            Err(e) => panic!("{e}"),
        }
    }

    /// Like [`build`](Self::build), but returns an error instead of panicking.
    pub fn try_build(self) -> Result<TokenBucketLayer<E>, InvalidTokenBucket>
    where
        E: KeyType,
    {
        let gcra = Gcra::new(self.rate, self.burst)?;
        check_max_keys(self.max_keys)?;
        let limiter = if self.keyed {
            Limiter::Keyed(KeyedTokenBuckets::with_gcra(gcra, self.max_keys))
        } else {
            Limiter::Global(TokenBucket::with_gcra(gcra))
        };
        let mut settings = Settings::new(&gcra);
        settings.shadow = self.shadow.then(|| {
            Arc::new(Shadow {
                count: AtomicU64::new(0),
                hook: self.on_shadowed,
            })
        });
        Ok(TokenBucketLayer {
            extractor: self.extractor,
            limiter,
            max_keys: self.max_keys,
            settings: Arc::new(settings),
            _mode: PhantomData,
        })
    }
}

/// A [`tower_layer::Layer`] that rate limits a service with token buckets.
///
/// ```
/// use std::{convert::Infallible, net::SocketAddr};
/// use bytes::Bytes;
/// use http::{Request, Response, StatusCode};
/// use http_body_util::Full;
/// use resilience::{Burst, PeerIp, Rate, TokenBucketLayer};
/// use tower::{service_fn, Layer, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// // Per client IP: 1 request/s, bursts of 2. Over the limit: 429 + Retry-After.
/// let layer = TokenBucketLayer::builder(Rate::per_second(1.0), Burst(2))
///     .key(PeerIp)
///     .build()
///     .http();
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
/// // The very map the services use, typed by the extractor's key (here `IpAddr`).
/// assert_eq!(layer.keyed_buckets().unwrap().len(), 1);
/// # }
/// ```
///
/// # Building
///
/// [`new(rate, burst)`](Self::new) makes one bucket for all requests ([`GlobalKey`]).
/// [`builder(rate, burst)`](Self::builder) adds a key: with
/// [`.key(extractor)`](TokenBucketLayerBuilder::key) every key gets its own bucket (a
/// [`KeyedTokenBuckets`], capped at
/// [`.max_keys(n)`](TokenBucketLayerBuilder::max_keys) keys), created by
/// [`.build()`](TokenBucketLayerBuilder::build). A request whose key is missing is
/// refused: `Err(MissingKey)` or, in HTTP mode, a `500` naming what is missing.
///
/// The getters are named after what they read back: [`rate`](Self::rate),
/// [`burst`](Self::burst), [`key`](Self::key), [`max_keys`](Self::max_keys), and
/// [`keyed_buckets`](Self::keyed_buckets) for the map itself.
///
/// # Modes
///
/// | mode | set with | over the limit | `Error` |
/// |---|---|---|---|
/// | [`ErrorMode`] | (the default) | `Err(RateLimited)`, boxed | [`BoxError`](crate::BoxError) |
/// | [`HttpMode`] | [`.http()`](Self::http) | `Ok(429)` with `Retry-After`, `RateLimit`, `RateLimit-Policy` | `S::Error` |
/// | [`WaitMode`] | [`.wait(max)`](Self::wait) | waits up to `max`, then `Err(RateLimited)` | [`BoxError`](crate::BoxError) |
///
/// The mode is the last of `.http()` / `.wait(max)` called; the other settings
/// ([`body`](Self::body), [`headers_on_success`](Self::headers_on_success)) can be
/// given in any order, before or after `.http()`, and are kept across mode changes.
/// Changing the mode keeps the buckets.
///
/// # Using it in axum
///
/// axum needs layers whose service is infallible. In error mode this layer's error is
/// a [`BoxError`](crate::BoxError), so `Router::layer(TokenBucketLayer::new(..))` does
/// not compile, with an error that does not name this layer:
///
/// ```text
/// error[E0277]: the trait bound `Infallible: From<Box<(dyn std::error::Error + Send + Sync + 'static)>>` is not satisfied
///    |
///    |         .layer(TokenBucketLayer::new(rate, burst))
///    |          ----- ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^ the trait `From<Box<(dyn std::error::Error + Send + Sync + 'static)>>` is not implemented for `Infallible`
///    |          |
///    |          required by a bound introduced by this call
/// ```
///
/// The fix is HTTP mode, where a rejection is a `429` response and the error type is
/// the inner service's:
///
/// ```
/// use resilience::{Burst, PeerIp, Rate, TokenBucketLayer};
/// # fn app(router: axum::Router) -> axum::Router {
/// router.layer(
///     TokenBucketLayer::builder(Rate::per_second(5.0), Burst(10))
///         .key(PeerIp)
///         .build()
///         .http(), // <- without it: `Infallible: From<Box<dyn Error + ...>>`
/// )
/// // and serve it with `.into_make_service_with_connect_info::<SocketAddr>()`,
/// // so `PeerIp` finds the peer address (resilience's `axum` feature).
/// # }
/// ```
///
/// # A missing peer address, and where to put a circuit breaker
///
/// [`PeerIp`](crate::PeerIp) and [`TrustedProxyIp`](crate::TrustedProxyIp) need the
/// peer address in the request extensions; without it (axum served without
/// `into_make_service_with_connect_info::<SocketAddr>()`, or without this crate's
/// `axum` feature) every request is answered `500 rate_limit_key_missing`, and the
/// first one logs what to fix at `warn`.
///
/// A [`CircuitBreakerLayer`](crate::CircuitBreakerLayer) in HTTP mode counts `5xx`
/// responses as failures. Placed *outside* the limiter it would count those `500`s,
/// and open, for every client, because of a deployment mistake. Put the limiter
/// outside the breaker, so the breaker only sees requests that passed the limiter and
/// classifies only the inner service's `5xx`:
///
/// ```
/// use resilience::{Burst, CircuitBreaker, CircuitBreakerLayer, PeerIp, Rate, TokenBucketLayer};
/// use tower::ServiceBuilder;
///
/// let stack = ServiceBuilder::new()
///     // outermost: refuses before the breaker sees anything
///     .layer(TokenBucketLayer::builder(Rate::per_second(5.0), Burst(10)).key(PeerIp).build().http())
///     .layer(CircuitBreakerLayer::new(CircuitBreaker::new()).http());
/// # let _ = stack;
/// ```
///
/// # Sharing
///
/// The buckets are created when the layer is built. Every service it makes, and every
/// clone of those services, draws from the same buckets; so do clones of the layer.
/// (hyper-util clones the service for each request, so anything else would not limit.)
/// Build a new layer for an independent limit.
pub struct TokenBucketLayer<E: KeyType = GlobalKey, M = ErrorMode> {
    extractor: E,
    limiter: Limiter<E::Key>,
    max_keys: usize,
    settings: Arc<Settings>,
    _mode: PhantomData<fn() -> M>,
}

impl TokenBucketLayer {
    /// One bucket of `rate` and `burst` for all requests, in error mode. For a bucket
    /// per client, use [`builder`](Self::builder) and
    /// [`.key(...)`](TokenBucketLayerBuilder::key).
    ///
    /// ```
    /// use resilience::{Burst, Rate, TokenBucketLayer};
    ///
    /// let layer = TokenBucketLayer::new(Rate::per_second(100.0), Burst(60));
    /// assert_eq!((layer.rate(), layer.burst()), (Rate::per_second(100.0), 60));
    /// ```
    ///
    /// # Panics
    ///
    /// On the parameters [`TokenBucket::new`] panics on; see
    /// [`try_new`](Self::try_new).
    #[track_caller]
    pub fn new(rate: Rate, burst: Burst) -> Self {
        TokenBucketLayer::builder(rate, burst).build()
    }

    /// Like [`new`](Self::new), but returns an error instead of panicking.
    pub fn try_new(rate: Rate, burst: Burst) -> Result<Self, InvalidTokenBucket> {
        TokenBucketLayer::builder(rate, burst).try_build()
    }

    /// Starts building a layer whose buckets have `rate` and `burst`.
    pub fn builder(rate: Rate, burst: Burst) -> TokenBucketLayerBuilder {
        TokenBucketLayerBuilder {
            rate,
            burst,
            extractor: GlobalKey,
            keyed: false,
            max_keys: DEFAULT_MAX_KEYS,
            shadow: false,
            on_shadowed: None,
        }
    }
}

impl<E: KeyType, M> TokenBucketLayer<E, M> {
    fn with_mode<M2>(self) -> TokenBucketLayer<E, M2> {
        TokenBucketLayer {
            extractor: self.extractor,
            limiter: self.limiter,
            max_keys: self.max_keys,
            settings: self.settings,
            _mode: PhantomData,
        }
    }

    /// HTTP mode, for services of `http::Request` to `http::Response`: over the limit,
    /// answer `429 Too Many Requests` instead of an error, so the layer drops into axum
    /// with a plain `.layer(...)` (no `HandleErrorLayer`).
    ///
    /// The 429 carries `Retry-After` (whole seconds, rounded up, never 0; see
    /// [`retry_after_secs`](crate::retry_after_secs)),
    /// `RateLimit-Policy: "default";q=<burst>;w=<burst/rate, s>` and
    /// `RateLimit: "default";r=<remaining>;t=<s until full>` (IETF
    /// draft-ietf-httpapi-ratelimit-headers), and by default the JSON body
    /// `{"error":"rate_limited","message":"rate limited; retry after N s"}` (the
    /// message is [`RateLimited`](crate::RateLimited)'s `Display`; see
    /// [`body`](Self::body)). Responses that pass get the two `RateLimit` headers too,
    /// unless the inner service set them (or
    /// [`headers_on_success(false)`](Self::headers_on_success)).
    ///
    /// A request without a key gets `500` with
    /// `{"error":"rate_limit_key_missing","message":"..."}` naming what is missing.
    ///
    /// The service's `Response` is `http::Response<ResponseBody<B>>`; its `Error` is the
    /// inner service's.
    pub fn http(self) -> TokenBucketLayer<E, HttpMode> {
        self.with_mode()
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
    pub fn wait(mut self, max_wait: Duration) -> TokenBucketLayer<E, WaitMode> {
        Arc::make_mut(&mut self.settings).max_wait = max_wait;
        self.with_mode()
    }

    /// The body of the 429 response and its `Content-Type`, instead of the default
    /// JSON. Used in HTTP mode; may be set before or after [`http`](Self::http).
    ///
    /// ```
    /// use http::HeaderValue;
    /// use resilience::{Burst, Rate, TokenBucketLayer};
    ///
    /// let layer = TokenBucketLayer::new(Rate::per_second(10.0), Burst(20))
    ///     .http()
    ///     .body(HeaderValue::from_static("text/plain; charset=utf-8"), "slow down\n");
    /// # let _ = layer;
    /// ```
    pub fn body(mut self, content_type: HeaderValue, body: impl Into<Bytes>) -> Self {
        Arc::make_mut(&mut self.settings).body = Some((content_type, body.into()));
        self
    }

    /// Whether responses that pass carry `RateLimit-Policy` and `RateLimit` too
    /// (default `true`); the `429` always does. Used in HTTP mode; may be set before or
    /// after [`http`](Self::http). Without them a passing request costs no header
    /// formatting, and its response is some 70 bytes shorter: worth it for an API whose
    /// clients call it often and stay far from the limit.
    ///
    /// ```
    /// use resilience::{Burst, PeerIp, Rate, TokenBucketLayer};
    ///
    /// let layer = TokenBucketLayer::builder(Rate::per_second(30.0), Burst(60))
    ///     .key(PeerIp)
    ///     .build()
    ///     .http()
    ///     .headers_on_success(false);
    /// # let _ = layer;
    /// ```
    pub fn headers_on_success(mut self, on: bool) -> Self {
        Arc::make_mut(&mut self.settings).headers_on_success = on;
        self
    }

    /// The refill rate of the buckets, as given to [`new`](TokenBucketLayer::new) or
    /// [`builder`](TokenBucketLayer::builder).
    pub fn rate(&self) -> Rate {
        match &self.limiter {
            Limiter::Global(bucket) => bucket.rate(),
            Limiter::Keyed(buckets) => buckets.rate(),
        }
    }

    /// The burst of the buckets, as given to [`new`](TokenBucketLayer::new) or
    /// [`builder`](TokenBucketLayer::builder).
    pub fn burst(&self) -> u32 {
        match &self.limiter {
            Limiter::Global(bucket) => bucket.burst(),
            Limiter::Keyed(buckets) => buckets.burst(),
        }
    }

    /// The key extractor, as given to [`.key(...)`](TokenBucketLayerBuilder::key)
    /// ([`GlobalKey`] for a global layer).
    pub fn key(&self) -> &E {
        &self.extractor
    }

    /// The cap on keys, as given to
    /// [`.max_keys(n)`](TokenBucketLayerBuilder::max_keys) (default
    /// [`DEFAULT_MAX_KEYS`]; unused by a global layer).
    pub fn max_keys(&self) -> usize {
        self.max_keys
    }

    /// Whether the layer is in shadow mode, as set by
    /// [`.shadow()`](TokenBucketLayerBuilder::shadow).
    pub fn shadow(&self) -> bool {
        self.settings.shadow.is_some()
    }

    /// How many requests shadow mode let through that would have been refused, since
    /// the layer was built, over all its services and clones (0 outside shadow mode).
    pub fn shadowed(&self) -> u64 {
        self.settings
            .shadow
            .as_ref()
            .map_or(0, |shadow| shadow.count.load(Ordering::Relaxed))
    }

    /// The buckets the services of this layer use, typed by the extractor's key
    /// (`IpAddr` for [`PeerIp`](crate::PeerIp)), e.g. to export the number of tracked
    /// keys as a metric or to check the cap in a test; `None` for a global (unkeyed)
    /// layer. A handle: clones share state. The map was created by
    /// [`build`](TokenBucketLayerBuilder::build) and is never replaced.
    pub fn keyed_buckets(&self) -> Option<KeyedTokenBuckets<E::Key>> {
        match &self.limiter {
            Limiter::Global(_) => None,
            Limiter::Keyed(buckets) => Some(buckets.clone()),
        }
    }
}

impl<S, E: KeyType, M> Layer<S> for TokenBucketLayer<E, M> {
    type Service = TokenBucketService<S, E, M>;

    fn layer(&self, inner: S) -> Self::Service {
        TokenBucketService::new(
            inner,
            self.extractor.clone(),
            self.limiter.clone(),
            self.settings.clone(),
        )
    }
}

impl<E: KeyType, M> Clone for TokenBucketLayer<E, M> {
    fn clone(&self) -> Self {
        TokenBucketLayer {
            extractor: self.extractor.clone(),
            limiter: self.limiter.clone(),
            max_keys: self.max_keys,
            settings: self.settings.clone(),
            _mode: PhantomData,
        }
    }
}

impl<E: KeyType + fmt::Debug, M> fmt::Debug for TokenBucketLayer<E, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenBucketLayer")
            .field("rate", &self.rate())
            .field("burst", &self.burst())
            .field("key", &self.extractor)
            .field("keyed", &matches!(self.limiter, Limiter::Keyed(_)))
            .field("max_keys", &self.max_keys)
            .field("mode", &std::any::type_name::<M>())
            .field("settings", &self.settings)
            .finish()
    }
}
