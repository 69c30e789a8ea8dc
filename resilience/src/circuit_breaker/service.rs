//! [`CircuitBreakerService`]: the middleware.

use std::{
    fmt,
    marker::PhantomData,
    task::{Context, Poll},
};

use tower_service::Service;

use super::{
    breaker::CircuitBreaker,
    classify::{Classifier, DefaultClassifier},
    future::{HttpResponseFuture, ResponseFuture},
};
use crate::{
    mode::{ErrorMode, HttpMode},
    BoxError, ResponseBody,
};

/// A service guarded by a [`CircuitBreaker`]. Made by
/// [`CircuitBreakerLayer`](super::CircuitBreakerLayer) or [`new`](Self::new).
///
/// `poll_ready` only forwards to the inner service and never fails because of the
/// breaker (tower treats a `poll_ready` error as a dead service); an open breaker rejects
/// in `call`, without calling the inner service. Clones share the breaker.
pub struct CircuitBreakerService<S, C = DefaultClassifier, M = ErrorMode> {
    inner: S,
    breaker: CircuitBreaker,
    classifier: C,
    _mode: PhantomData<fn() -> M>,
}

impl<S> CircuitBreakerService<S> {
    /// Guards `inner` with `breaker`, in error mode with the mode's classifier
    /// ([`DefaultClassifier`]: every `Err` is a failure).
    pub fn new(inner: S, breaker: CircuitBreaker) -> Self {
        CircuitBreakerService::from_parts(inner, breaker, DefaultClassifier)
    }
}

impl<S, C, M> CircuitBreakerService<S, C, M> {
    pub(crate) fn from_parts(inner: S, breaker: CircuitBreaker, classifier: C) -> Self {
        CircuitBreakerService {
            inner,
            breaker,
            classifier,
            _mode: PhantomData,
        }
    }

    /// The shared breaker.
    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, C, Req> Service<Req> for CircuitBreakerService<S, C, ErrorMode>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    C: Classifier<S::Response, S::Error>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, C>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        match self.breaker.try_acquire() {
            Ok(permit) => {
                ResponseFuture::called(self.inner.call(req), permit, self.classifier.clone())
            }
            Err(open) => ResponseFuture::rejected(open),
        }
    }
}

impl<S, C, Req, B> Service<Req> for CircuitBreakerService<S, C, HttpMode>
where
    S: Service<Req, Response = http::Response<B>>,
    C: Classifier<http::Response<B>, S::Error>,
{
    type Response = http::Response<ResponseBody<B>>;
    type Error = S::Error;
    type Future = HttpResponseFuture<S::Future, C>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        match self.breaker.try_acquire() {
            Ok(permit) => {
                HttpResponseFuture::called(self.inner.call(req), permit, self.classifier.clone())
            }
            Err(open) => HttpResponseFuture::rejected(open),
        }
    }
}

impl<S: Clone, C: Clone, M> Clone for CircuitBreakerService<S, C, M> {
    fn clone(&self) -> Self {
        CircuitBreakerService {
            inner: self.inner.clone(),
            breaker: self.breaker.clone(),
            classifier: self.classifier.clone(),
            _mode: PhantomData,
        }
    }
}

impl<S: fmt::Debug, C: fmt::Debug, M> fmt::Debug for CircuitBreakerService<S, C, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerService")
            .field("inner", &self.inner)
            .field("breaker", &self.breaker)
            .field("classifier", &self.classifier)
            .field("mode", &std::any::type_name::<M>())
            .finish()
    }
}
