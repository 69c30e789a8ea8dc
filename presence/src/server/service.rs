//! [`PresenceService`]: the whole server as one tower `Service`.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::Either;
use http_body::Body;
use resilience::key::{ForwardedHeader, TrustedProxyIp};
use resilience::token_bucket::{RedisTokenBucketService, TokenBucketLayer, TokenBucketService};
use resilience::{
    BoxError, Burst, HttpMode, KeyedTokenBuckets, Rate, RedisBuckets, RedisFallback,
    RedisTokenBucketLayer,
};
use tower::util::MapResponse;
use tower::{Layer, Service, ServiceBuilder};

use super::auth::{BearerAuth, BearerAuthLayer};
use super::edge;
use super::handlers::Router;
use super::limit::{BodyLimit, BodyLimitLayer};
use super::metrics::{Metrics, MetricsLayer, MetricsService};
use super::outage::OutageTracker;
use super::routes::Resolved;
use super::store_call::{State, StoreBreakers};
use super::watch::Watchers;
use super::{RequestBody, ResponseBody, MAX_BODY_BYTES};
use crate::config::{Config, RateLimitScope};
use crate::store::Store;
use tower_http::compression::CompressionLayer;

/// The `/presence*` branch: auth, rate limit, body limit, router.
type PresenceBranch = BearerAuth<MapResponse<RateLimit<BodyLimit<Router>>, LimitedResponse>>;

/// The per-client token bucket: this server's own (`PRESENCE_RATE_LIMIT_SCOPE=server`)
/// or the deployment's, in Redis (`shared`).
type RateLimit<S> = tower::util::Either<
    TokenBucketService<S, TrustedProxyIp, HttpMode>,
    RedisTokenBucketService<S, TrustedProxyIp, HttpMode>,
>;

/// How often a server with shared rate limits looks whether it had to decide
/// locally (and says so in the log).
const FALLBACK_REPORT_EVERY: Duration = Duration::from_secs(1);

/// The token bucket's response as the stack's own (see [`limited_response`]).
type LimitedResponse =
    fn(http::Response<resilience::ResponseBody<ResponseBody>>) -> http::Response<ResponseBody>;

/// The whole stack, as a concrete type: no box for its future, no dynamic call.
type Inner = MetricsService<edge::Inner<Dispatch<PresenceBranch>>>;

/// The presence server as a tower service: metrics (and a debug log line) ->
/// (for `/presence*`: bearer auth -> per-client token bucket -> 16 KiB body limit) ->
/// router -> store (behind a timeout and a circuit breaker).
///
/// It accepts any request body (`hyper::body::Incoming`, `Full<Bytes>`, ...), never
/// fails (`Error = Infallible`; every error is a JSON response) and is cheap to clone:
/// clones share the store, the breaker, the rate-limit buckets and the metrics.
///
/// The token bucket is keyed by client IP, read from the peer [`SocketAddr`] in the
/// request extensions (which [`Server`](super::Server) inserts). A request without
/// one is a `500` naming what is missing, never a silently shared bucket; in-process
/// callers that have no peer use [`with_default_peer`](Self::with_default_peer).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use std::sync::Arc;
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use presence::{config::Config, server::PresenceService, store::MemoryStore};
/// use tower::ServiceExt;
///
/// let service = PresenceService::new(Arc::new(MemoryStore::new()), &Config::default())
///     .with_default_peer(([127, 0, 0, 1], 40000).into());
/// let req = http::Request::get("/presence").body(Full::new(Bytes::new())).unwrap();
/// let res = service.oneshot(req).await.unwrap();
/// assert_eq!(res.status(), 200);
/// # }
/// ```
#[derive(Clone)]
pub struct PresenceService {
    inner: Inner,
    metrics: Arc<Metrics>,
    rate_limiter: Option<KeyedTokenBuckets<IpAddr>>,
    default_peer: Option<SocketAddr>,
    watchers: Arc<Watchers>,
}

impl std::fmt::Debug for PresenceService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PresenceService")
            .field("default_peer", &self.default_peer)
            .finish_non_exhaustive()
    }
}

impl PresenceService {
    /// Builds the service stack on `store` with the limits, timeouts and auth token of
    /// `config` (its bind address and shutdown grace are for [`Server`](super::Server)).
    ///
    /// # Panics
    /// If the JWT secret is empty or the JWT public key is not an Ed25519 or RSA PEM
    /// key; or if `config.rate_limit_rate` / `rate_limit_capacity` cannot make a token bucket
    /// (rate not a finite number above 0, capacity 0, or a refill over a century).
    /// [`Config::from_env`] and [`Config::from_lookup`] reject such values with an
    /// error naming the variable; only a hand-edited `Config` can get here. With
    /// [`RateLimitScope::Shared`], also outside a tokio runtime (the shared buckets'
    /// Redis connection is driven by a task of its own).
    pub fn new(store: Arc<dyn Store>, config: &Config) -> PresenceService {
        let metrics = Arc::new(Metrics::new());
        let breakers = StoreBreakers::new(store.shard_count(), metrics.clone());
        let ttl_ms = crate::millis(config.ttl);
        let outage = OutageTracker::new(store.shard_count(), ttl_ms, config.store_timeout);
        let state = Arc::new(State {
            store,
            breakers,
            outage: Arc::new(outage),
            metrics: metrics.clone(),
            store_timeout: config.store_timeout,
            body_timeout: config.request_timeout,
            ttl_ms,
            heartbeat_ms: crate::millis(config.heartbeat),
            max_meta_bytes: config.max_meta_bytes,
            list: Default::default(),
            watchers: Arc::new(Watchers::new(config)),
        });
        state.store.set_feed_retention(config.watch_retention);
        // Expiries become events only if somebody sweeps; a service built outside a
        // runtime (a doctest, say) serves without it.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(super::watch::sweep(Arc::downgrade(&state)));
        }
        let watchers = state.watchers.clone();
        let router = Router::new(state);

        // Proxies of either kind: `X-Forwarded-For` (nginx, most balancers)
        // or RFC 7239 `Forwarded`; a request with both is keyed by its peer.
        let client_ip =
            TrustedProxyIp::new(config.trusted_proxies.clone()).header(ForwardedHeader::Either);
        let (rate, burst) = (
            Rate::per_second(config.rate_limit_rate),
            Burst(config.rate_limit_capacity),
        );
        let (rate_limit, rate_limiter) = match shared_buckets(config, rate, burst) {
            None => {
                let local = TokenBucketLayer::builder(rate, burst)
                    .key(client_ip)
                    .build()
                    .http()
                    .headers_on_success(false);
                let buckets = local.keyed_buckets();
                (tower::util::Either::Left(local), buckets)
            }
            Some(shared) => {
                let buckets = Some(shared.local_buckets().clone());
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    runtime.spawn(report_fallbacks(shared.clone(), Arc::downgrade(&metrics)));
                }
                let layer = RedisTokenBucketLayer::new(client_ip, shared)
                    .http()
                    .headers_on_success(false);
                (tower::util::Either::Right(layer), buckets)
            }
        };
        // Failing here would fail open (no key: no JWT accepted, and without a static
        // token no authentication at all), so a bad key stops the build instead.
        let jwt = config
            .jwt_verifier()
            .unwrap_or_else(|why| panic!("invalid JWT key configuration: {why}"));
        let presence = ServiceBuilder::new()
            .layer(BearerAuthLayer::new(config.auth_token.as_deref()).jwt(jwt))
            .map_response(limited_response as LimitedResponse)
            .layer(rate_limit)
            .layer(BodyLimitLayer::new(MAX_BODY_BYTES))
            .service(router.clone());

        let dispatch = Dispatch {
            compression: edge::compression(),
            presence,
            ops: router,
        };

        let cors_origins: Vec<http::HeaderValue> = config
            .cors_origins
            .iter()
            // Validated by the config parser; one that is not a header value would
            // match no request anyway.
            .filter_map(|o| http::HeaderValue::from_str(o).ok())
            .collect();
        let stack = MetricsLayer::new(metrics.clone()).layer(edge::inner(dispatch, &cors_origins));

        PresenceService {
            inner: stack,
            metrics,
            rate_limiter,
            default_peer: None,
            watchers,
        }
    }

    /// Ends every watch stream cleanly and refuses new ones (`503 shutting_down`):
    /// the first step of a graceful shutdown, which [`Server`](super::Server) takes
    /// by itself. Watchers resume on another server from their cursor.
    pub fn end_watches(&self) {
        self.watchers.close();
    }

    /// Watch streams open now.
    pub fn open_watches(&self) -> usize {
        self.watchers.open()
    }

    /// Requests that carry no peer [`SocketAddr`] extension are treated as coming
    /// from `peer`. For in-process use (tests, a client given this service as its
    /// transport), like httpx's `ASGITransport(client=...)`; a network server inserts
    /// the real peer address and never needs it.
    pub fn with_default_peer(mut self, peer: SocketAddr) -> Self {
        self.default_peer = Some(peer);
        self
    }

    /// The metrics this service records (also served at `GET /metrics`).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The per-client token buckets of `/presence*`, keyed by client IP: the very map
    /// the service uses (clones share it), capped at
    /// [`DEFAULT_MAX_KEYS`](resilience::token_bucket::DEFAULT_MAX_KEYS) keys. For
    /// monitoring and tests.
    pub fn rate_limiter(&self) -> &KeyedTokenBuckets<IpAddr> {
        // Always `Some`: the layer above is keyed.
        self.rate_limiter
            .as_ref()
            .unwrap_or_else(|| unreachable!("the presence rate limiter is keyed"))
    }
}

impl<B> Service<http::Request<B>> for PresenceService
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = http::Response<ResponseBody>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Service::<http::Request<RequestBody>>::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let mut req = req.map(RequestBody::new);
        if let Some(peer) = self.default_peer {
            if req.extensions().get::<SocketAddr>().is_none() {
                req.extensions_mut().insert(peer);
            }
        }
        ResponseFuture {
            inner: self.inner.call(req),
        }
    }
}

pin_project_lite::pin_project! {
    /// Response future of [`PresenceService`]: the stack's own future, not boxed.
    pub struct ResponseFuture {
        #[pin]
        inner: <Inner as Service<http::Request<RequestBody>>>::Future,
    }
}

impl std::future::Future for ResponseFuture {
    type Output = Result<http::Response<ResponseBody>, Infallible>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx)
    }
}

impl std::fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

/// The token bucket's response as the stack's own: the router's body as it is (no
/// second box), or the bucket's `429` / `500` body.
fn limited_response(
    res: http::Response<resilience::ResponseBody<ResponseBody>>,
) -> http::Response<ResponseBody> {
    res.map(|body| match body {
        resilience::ResponseBody::Inner { body } => body,
        resilience::ResponseBody::Rejection { body } => super::full(body.unwrap_or_default()),
    })
}

/// The deployment's shared buckets (`PRESENCE_RATE_LIMIT_SCOPE=shared`): keys
/// `<prefix>:rate:{<client ip>}` in the store's Redis (over TLS with the store's CA
/// for `rediss://`), one `EVALSHA` per request
/// bounded by the store timeout, this server's own buckets when Redis does not answer.
/// `None` for per-server buckets.
///
/// # Panics
/// If the store URI does not parse as a Redis URI ([`Config::from_lookup`] only
/// accepts `shared` with a Redis store).
fn shared_buckets(config: &Config, rate: Rate, burst: Burst) -> Option<RedisBuckets<IpAddr>> {
    if config.rate_limit_scope != RateLimitScope::Shared {
        return None;
    }
    let uri = config.store_uri.as_deref()?;
    let ca = config.redis_ca.as_ref().map(|(_, pem)| pem.as_slice());
    let client = crate::store::redis::redis_client(uri, ca)
        .unwrap_or_else(|e| panic!("PRESENCE_RATE_LIMIT_SCOPE=shared: {e}"));
    Some(
        RedisBuckets::builder(client, rate, burst)
            .prefix(format!("{}:rate:", config.key_prefix))
            .timeout(config.store_timeout)
            .fallback(RedisFallback::Local)
            .build(),
    )
}

/// Counts the shared buckets' local decisions into the metrics, and logs each second
/// that had any, while the metrics live.
async fn report_fallbacks(buckets: RedisBuckets<IpAddr>, metrics: std::sync::Weak<Metrics>) {
    let mut reported = 0;
    let mut tick = tokio::time::interval(FALLBACK_REPORT_EVERY);
    loop {
        tick.tick().await;
        let Some(metrics) = metrics.upgrade() else {
            return;
        };
        let now = buckets.fallbacks();
        if now > reported {
            metrics.rate_limit_fell_back(now - reported);
            tracing::warn!(
                decisions = now - reported,
                "shared rate limits: Redis did not answer in time; these requests were limited by this server's own buckets"
            );
            reported = now;
        }
    }
}

/// Sends `/presence*` through auth, rate limit and body limit (`P`); `/healthz`,
/// `/readyz`, `/metrics` (and unknown paths, for their `404`) straight to the router.
#[derive(Clone)]
struct Dispatch<P> {
    presence: P,
    /// How `GET /presence`, the one large answer, is compressed when the client asks.
    compression: CompressionLayer<edge::Compressible>,
    ops: Router,
}

impl<P> Service<http::Request<RequestBody>> for Dispatch<P>
where
    P: Service<
        http::Request<RequestBody>,
        Response = http::Response<ResponseBody>,
        Error = Infallible,
    >,
{
    type Response = http::Response<ResponseBody>;
    type Error = Infallible;
    type Future = Either<
        Either<P::Future, edge::Compressed<P::Future>>,
        <Router as Service<http::Request<RequestBody>>>::Future,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The router is always ready; only the presence stack could make us wait.
        self.presence.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<RequestBody>) -> Self::Future {
        let resolved = Resolved::from_request(&req);
        if !resolved.is_presence() {
            Either::Right(self.ops.call(req))
        } else if resolved.is_listing() {
            Either::Left(Either::Right(edge::call_compressed(
                &self.compression,
                &mut self.presence,
                req,
            )))
        } else {
            Either::Left(Either::Left(self.presence.call(req)))
        }
    }
}
