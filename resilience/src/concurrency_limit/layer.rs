//! [`ConcurrencyLimitLayer`]: a limit on calls in flight that rejects instead of queueing.

use std::{fmt, marker::PhantomData, time::Duration};

use tower_layer::Layer;

use super::{
    adaptive::{AdaptiveLimitBuilder, Algorithm, SampleWindow},
    error::InvalidConcurrencyLimit,
    limit::{Limit, SharedLimit},
    service::ConcurrencyLimitService,
};
use crate::mode::{ErrorMode, HttpMode};

/// `retry_after` of a rejection unless [`ConcurrencyLimitLayer::retry_after`] sets
/// another: 1 s.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// A [`Layer`] that wraps services in a [`ConcurrencyLimitService`]: at most `max` calls
/// in flight, the rest rejected at once with [`Overloaded`](super::Overloaded).
///
/// The count exists from the moment the layer is built, behind an `Arc`: every service
/// this layer makes, and every clone of them, shares it, so per-request clones
/// (hyper-util's `TowerToHyperService`, axum) are limited together. Clones of the layer
/// share it too.
///
/// `M` is [`ErrorMode`] (default) or [`HttpMode`] (see [`http`](Self::http)), the same
/// markers as the other layers'.
///
/// # Using it in axum
///
/// axum needs layers whose service is infallible, so use HTTP mode, where a rejection is
/// a `503` response and the error type is the inner service's:
///
/// ```
/// use resilience::ConcurrencyLimitLayer;
/// # fn app(router: axum::Router) -> axum::Router {
/// router.layer(ConcurrencyLimitLayer::new(64).http())
/// # }
/// ```
pub struct ConcurrencyLimitLayer<M = ErrorMode> {
    limit: SharedLimit,
    retry_after: Duration,
    _mode: PhantomData<fn() -> M>,
}

impl ConcurrencyLimitLayer {
    /// A layer in error mode admitting at most `max` calls at a time, with
    /// `retry_after` = [`DEFAULT_RETRY_AFTER`].
    ///
    /// # Panics
    ///
    /// When `max` is 0. Use [`try_new`](Self::try_new) for a value read at run time.
    #[track_caller]
    pub fn new(max: usize) -> Self {
        match ConcurrencyLimitLayer::try_new(max) {
            Ok(layer) => layer,
            Err(e) => panic!("{e}"),
        }
    }

    /// Like [`new`](Self::new), but returns an error instead of panicking.
    pub fn try_new(max: usize) -> Result<Self, InvalidConcurrencyLimit> {
        Ok(ConcurrencyLimitLayer {
            limit: Limit::try_new(max)?,
            retry_after: DEFAULT_RETRY_AFTER,
            _mode: PhantomData,
        })
    }

    /// A builder of an adaptive limit: one that `algorithm` ([`Aimd`](super::Aimd) or
    /// [`Gradient2`](super::Gradient2)) moves between `min` and `max` from the latency
    /// and the errors of the calls. See the [module docs](super#adaptive-limits).
    ///
    /// ```
    /// use resilience::{concurrency_limit::Aimd, ConcurrencyLimitLayer};
    ///
    /// let layer = ConcurrencyLimitLayer::adaptive(Aimd::default())
    ///     .min(4)
    ///     .max(256)
    ///     .initial(32)
    ///     .on_limit_change(|old, new| tracing::info!(old, new, "concurrency limit"))
    ///     .build();
    /// assert_eq!((layer.min(), layer.limit(), layer.max()), (4, 32, 256));
    /// ```
    pub fn adaptive(algorithm: impl Into<Algorithm>) -> AdaptiveLimitBuilder {
        AdaptiveLimitBuilder::new(algorithm.into())
    }

    pub(crate) fn from_limit(limit: SharedLimit, retry_after: Duration) -> Self {
        ConcurrencyLimitLayer {
            limit,
            retry_after,
            _mode: PhantomData,
        }
    }
}

impl<M> ConcurrencyLimitLayer<M> {
    /// Sets the `retry_after` of rejections: the field of [`Overloaded`](super::Overloaded)
    /// in error mode, the `Retry-After` header (whole seconds, rounded up, at least 1)
    /// and the body's "retry after N s" in HTTP mode. Any value is accepted; 0 is sent
    /// as 1 s (see [`retry_after_secs`](crate::retry_after_secs)).
    ///
    /// The getter is [`retry_after_hint`](Self::retry_after_hint).
    pub fn retry_after(mut self, retry_after: Duration) -> Self {
        self.retry_after = retry_after;
        self
    }

    /// Switches to HTTP mode: a rejection is `Ok(503 Service Unavailable)` with a
    /// `Retry-After` header and the JSON body
    /// `{"error":"overloaded","message":"overloaded; retry after N s"}` (the message is
    /// [`Overloaded`](super::Overloaded)'s `Display`); the service's error type stays the
    /// inner one and its response is
    /// `http::Response<ResponseBody<PermitBody<B>>>`: an admitted call keeps its slot
    /// until its body has been streamed or dropped.
    ///
    /// Only the mode changes: the limit (and its count) and `retry_after` are kept.
    pub fn http(self) -> ConcurrencyLimitLayer<HttpMode> {
        ConcurrencyLimitLayer {
            limit: self.limit,
            retry_after: self.retry_after,
            _mode: PhantomData,
        }
    }

    /// The most calls in flight at once, as given to [`new`](ConcurrencyLimitLayer::new);
    /// for an adaptive limit, the highest the limit goes.
    pub fn max(&self) -> usize {
        self.limit.max()
    }

    /// The lowest the limit goes: `max` for a static limit.
    pub fn min(&self) -> usize {
        self.limit.min()
    }

    /// The limit now: the most calls admitted at once. `max` for a static limit; an
    /// adaptive one moves between `min` and `max`.
    pub fn limit(&self) -> usize {
        self.limit.limit()
    }

    /// The algorithm of an adaptive limit; `None` for a static one.
    pub fn algorithm(&self) -> Option<Algorithm> {
        self.limit.algorithm()
    }

    /// The sample window of an adaptive limit; `None` for a static one.
    pub fn window(&self) -> Option<SampleWindow> {
        self.limit.window()
    }

    /// Calls in flight now, across every service of this layer.
    pub fn in_flight(&self) -> usize {
        self.limit.in_flight()
    }

    /// Calls rejected so far, across every service of this layer.
    pub fn rejections(&self) -> u64 {
        self.limit.rejections()
    }

    /// The `retry_after` of rejections, as set with [`retry_after`](Self::retry_after).
    pub fn retry_after_hint(&self) -> Duration {
        self.retry_after
    }
}

impl<S, M> Layer<S> for ConcurrencyLimitLayer<M> {
    type Service = ConcurrencyLimitService<S, M>;

    fn layer(&self, inner: S) -> Self::Service {
        ConcurrencyLimitService::from_parts(inner, self.limit.clone(), self.retry_after)
    }
}

impl<M> Clone for ConcurrencyLimitLayer<M> {
    fn clone(&self) -> Self {
        ConcurrencyLimitLayer {
            limit: self.limit.clone(),
            retry_after: self.retry_after,
            _mode: PhantomData,
        }
    }
}

impl<M> fmt::Debug for ConcurrencyLimitLayer<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConcurrencyLimitLayer")
            .field("limit", &self.limit)
            .field("retry_after", &self.retry_after)
            .field("mode", &std::any::type_name::<M>())
            .finish()
    }
}
