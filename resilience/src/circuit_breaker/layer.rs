//! [`CircuitBreakerLayer`]: applies a [`CircuitBreaker`] to tower services.

use std::fmt;

use tower_layer::Layer;

use super::{breaker::CircuitBreaker, classify::DefaultClassifier, service::CircuitBreakerService};
use crate::mode::{ErrorMode, HttpMode};

/// A [`Layer`] that wraps services in a [`CircuitBreakerService`].
///
/// Every service this layer makes, and every clone of them, shares the one
/// [`CircuitBreaker`] the layer holds: the state exists from the moment the layer is
/// built, so per-request clones (hyper-util's `TowerToHyperService`, axum) see the same
/// breaker.
///
/// * `C`: the [`Classifier`](super::Classifier) that decides which outcomes are
///   failures; [`DefaultClassifier`] (the mode's own) until
///   [`classifier`](Self::classifier) sets one.
/// * `M`: [`ErrorMode`] (default) or [`HttpMode`] (see [`http`](Self::http)), the same
///   markers as [`TokenBucketLayer`](crate::TokenBucketLayer)'s.
///
/// The two settings are independent: `.classifier(c).http()` and `.http().classifier(c)`
/// make the same layer.
///
/// # Using it in axum
///
/// axum needs layers whose service is infallible. In error mode this layer's error is
/// a [`BoxError`](crate::BoxError), so `Router::layer(CircuitBreakerLayer::new(..))`
/// does not compile, with an error that does not name this layer:
///
/// ```text
/// error[E0277]: the trait bound `Infallible: From<Box<(dyn std::error::Error + Send + Sync + 'static)>>` is not satisfied
///    |
///    |         .layer(CircuitBreakerLayer::new(breaker))
///    |          ----- ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^ the trait `From<Box<(dyn std::error::Error + Send + Sync + 'static)>>` is not implemented for `Infallible`
///    |          |
///    |          required by a bound introduced by this call
/// ```
///
/// The fix is HTTP mode, where a rejection is a `503` response and the error type is
/// the inner service's:
///
/// ```
/// use resilience::{CircuitBreaker, CircuitBreakerLayer};
/// # fn app(router: axum::Router) -> axum::Router {
/// router.layer(
///     CircuitBreakerLayer::new(CircuitBreaker::new())
///         .http(), // <- without it: `Infallible: From<Box<dyn Error + ...>>`
/// )
/// # }
/// ```
///
/// Behind a [`TokenBucketLayer`](crate::TokenBucketLayer), put the limiter outside the
/// breaker (see "where to put a circuit breaker" there).
pub struct CircuitBreakerLayer<C = DefaultClassifier, M = ErrorMode> {
    breaker: CircuitBreaker,
    classifier: C,
    _mode: std::marker::PhantomData<fn() -> M>,
}

impl CircuitBreakerLayer {
    /// A layer in error mode with the mode's classifier ([`DefaultClassifier`]: every
    /// `Err` is a failure).
    pub fn new(breaker: CircuitBreaker) -> Self {
        CircuitBreakerLayer {
            breaker,
            classifier: DefaultClassifier,
            _mode: std::marker::PhantomData,
        }
    }
}

impl Default for CircuitBreakerLayer {
    /// A layer around a new breaker with the default policy.
    fn default() -> Self {
        CircuitBreakerLayer::new(CircuitBreaker::new())
    }
}

impl<C, M> CircuitBreakerLayer<C, M> {
    /// Uses `classifier` to decide which outcomes are failures, in whichever mode the
    /// layer is or is switched to.
    pub fn classifier<C2>(self, classifier: C2) -> CircuitBreakerLayer<C2, M> {
        CircuitBreakerLayer {
            breaker: self.breaker,
            classifier,
            _mode: std::marker::PhantomData,
        }
    }

    /// Switches to HTTP mode: a rejection is `Ok(503 Service Unavailable)` with a
    /// `Retry-After` header (whole seconds, rounded up, at least 1; see
    /// [`retry_after_secs`](crate::retry_after_secs)) and the JSON body
    /// `{"error":"circuit_open","message":"circuit breaker is open; retry after N s"}`
    /// (the message is [`CircuitOpen`](super::CircuitOpen)'s `Display`); the service's
    /// error type stays the inner one and its response is
    /// `http::Response<ResponseBody<B>>`.
    ///
    /// Only the mode changes: a classifier set with [`classifier`](Self::classifier),
    /// before or after, is kept. Without one, HTTP mode classifies like
    /// [`HttpClassifier`](super::HttpClassifier) (`Err` and `5xx` are failures).
    pub fn http(self) -> CircuitBreakerLayer<C, HttpMode> {
        CircuitBreakerLayer {
            breaker: self.breaker,
            classifier: self.classifier,
            _mode: std::marker::PhantomData,
        }
    }

    /// The shared breaker, as given to [`new`](CircuitBreakerLayer::new), to read its
    /// state and stats.
    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }
}

impl<S, C: Clone, M> Layer<S> for CircuitBreakerLayer<C, M> {
    type Service = CircuitBreakerService<S, C, M>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreakerService::from_parts(inner, self.breaker.clone(), self.classifier.clone())
    }
}

impl<C: Clone, M> Clone for CircuitBreakerLayer<C, M> {
    fn clone(&self) -> Self {
        CircuitBreakerLayer {
            breaker: self.breaker.clone(),
            classifier: self.classifier.clone(),
            _mode: std::marker::PhantomData,
        }
    }
}

impl<C: fmt::Debug, M> fmt::Debug for CircuitBreakerLayer<C, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerLayer")
            .field("breaker", &self.breaker)
            .field("classifier", &self.classifier)
            .field("mode", &std::any::type_name::<M>())
            .finish()
    }
}
