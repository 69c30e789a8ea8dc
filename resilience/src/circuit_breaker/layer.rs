//! [`CircuitBreakerLayer`]: applies a [`CircuitBreaker`] to tower services.

use std::fmt;

use tower_layer::Layer;

use super::{
    breaker::CircuitBreaker,
    classify::{ErrIsFailure, HttpClassifier},
    service::CircuitBreakerService,
};

/// Mode marker: rejections are errors. The service's error type is
/// [`BoxError`](crate::BoxError) and a rejection is a boxed [`CircuitOpen`](super::CircuitOpen).
#[derive(Clone, Copy, Debug, Default)]
pub struct ErrorMode;

/// Mode marker: rejections are `503 Service Unavailable` responses, so the service keeps
/// its inner error type (an infallible axum service stays infallible).
#[derive(Clone, Copy, Debug, Default)]
pub struct HttpMode;

/// A [`Layer`] that wraps services in a [`CircuitBreakerService`].
///
/// Every service this layer makes, and every clone of them, shares the one
/// [`CircuitBreaker`] the layer holds: the state exists from the moment the layer is
/// built, so per-request clones (hyper-util's `TowerToHyperService`, axum) see the same
/// breaker.
///
/// * `C`: the [`Classifier`](super::Classifier) that decides which outcomes are failures.
/// * `M`: [`ErrorMode`] (default) or [`HttpMode`] (see [`http`](Self::http)).
pub struct CircuitBreakerLayer<C = ErrIsFailure, M = ErrorMode> {
    breaker: CircuitBreaker,
    classifier: C,
    _mode: std::marker::PhantomData<fn() -> M>,
}

impl CircuitBreakerLayer {
    /// A layer in error mode with the default classifier ([`ErrIsFailure`]).
    pub fn new(breaker: CircuitBreaker) -> Self {
        CircuitBreakerLayer {
            breaker,
            classifier: ErrIsFailure,
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
    /// Uses `classifier` to decide which outcomes are failures.
    pub fn classifier<C2>(self, classifier: C2) -> CircuitBreakerLayer<C2, M> {
        CircuitBreakerLayer {
            breaker: self.breaker,
            classifier,
            _mode: std::marker::PhantomData,
        }
    }

    /// Switches to HTTP mode: a rejection is `Ok(503 Service Unavailable)` with a
    /// `Retry-After` header (whole seconds, rounded up, at least 1) and the JSON body
    /// `{"error":"circuit_open","message":"..."}`; the service's error type stays the
    /// inner one and its response is `http::Response<ResponseBody<B>>`.
    ///
    /// Also switches the classifier to [`HttpClassifier`] (`Err` and `5xx` are
    /// failures); call [`classifier`](Self::classifier) afterwards to use another.
    pub fn http(self) -> CircuitBreakerLayer<HttpClassifier, HttpMode> {
        CircuitBreakerLayer {
            breaker: self.breaker,
            classifier: HttpClassifier,
            _mode: std::marker::PhantomData,
        }
    }

    /// The shared breaker, to read its state and stats.
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
