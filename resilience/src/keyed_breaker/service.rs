//! [`KeyedCircuitBreakerService`]: the middleware.

use std::{
    fmt,
    marker::PhantomData,
    task::{Context, Poll},
};

use tower_service::Service;

use super::{
    future::{HttpResponseFuture, ResponseFuture},
    map::KeyedCircuitBreakers,
};
use crate::{
    circuit_breaker::{
        future::{HttpResponseFuture as BreakerHttpFuture, ResponseFuture as BreakerFuture},
        Classifier, DefaultClassifier,
    },
    key::{GlobalKey, KeyExtractor, KeyType},
    mode::{ErrorMode, HttpMode},
    BoxError, ResponseBody,
};

/// A service guarded by a circuit breaker per key; made by
/// [`KeyedCircuitBreakerLayer`](super::KeyedCircuitBreakerLayer).
///
/// `poll_ready` only forwards to the inner service; a request whose key's breaker is
/// open is rejected in `call`, without calling the inner service. Clones share the
/// breakers.
pub struct KeyedCircuitBreakerService<
    S,
    E: KeyType = GlobalKey,
    C = DefaultClassifier,
    M = ErrorMode,
> {
    inner: S,
    extractor: E,
    breakers: KeyedCircuitBreakers<E::Key>,
    classifier: C,
    _mode: PhantomData<fn() -> M>,
}

impl<S, E: KeyType, C, M> KeyedCircuitBreakerService<S, E, C, M> {
    pub(crate) fn new(
        inner: S,
        extractor: E,
        breakers: KeyedCircuitBreakers<E::Key>,
        classifier: C,
    ) -> Self {
        KeyedCircuitBreakerService {
            inner,
            extractor,
            breakers,
            classifier,
            _mode: PhantomData,
        }
    }

    /// The shared breakers, by key.
    pub fn breakers(&self) -> &KeyedCircuitBreakers<E::Key> {
        &self.breakers
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

impl<S, E, C, Req> Service<Req> for KeyedCircuitBreakerService<S, E, C, ErrorMode>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    E: KeyExtractor<Req>,
    C: Classifier<S::Response, S::Error>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let key = match self.extractor.extract(&req) {
            Ok(key) => key,
            Err(missing) => return ResponseFuture::missing(missing),
        };
        let future = match self.breakers.try_acquire(&key) {
            Ok(permit) => {
                BreakerFuture::called(self.inner.call(req), permit, self.classifier.clone())
            }
            Err(open) => BreakerFuture::rejected(open),
        };
        ResponseFuture::breaker(future)
    }
}

impl<S, E, C, Req, B> Service<Req> for KeyedCircuitBreakerService<S, E, C, HttpMode>
where
    S: Service<Req, Response = http::Response<B>>,
    E: KeyExtractor<Req>,
    C: Classifier<http::Response<B>, S::Error>,
{
    type Response = http::Response<ResponseBody<B>>;
    type Error = S::Error;
    type Future = HttpResponseFuture<S::Future, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let key = match self.extractor.extract(&req) {
            Ok(key) => key,
            Err(missing) => return HttpResponseFuture::missing(missing),
        };
        let future = match self.breakers.try_acquire(&key) {
            Ok(permit) => {
                BreakerHttpFuture::called(self.inner.call(req), permit, self.classifier.clone())
            }
            Err(open) => BreakerHttpFuture::rejected(open),
        };
        HttpResponseFuture::breaker(future)
    }
}

impl<S: Clone, E: KeyType, C: Clone, M> Clone for KeyedCircuitBreakerService<S, E, C, M> {
    fn clone(&self) -> Self {
        KeyedCircuitBreakerService {
            inner: self.inner.clone(),
            extractor: self.extractor.clone(),
            breakers: self.breakers.clone(),
            classifier: self.classifier.clone(),
            _mode: PhantomData,
        }
    }
}

impl<S: fmt::Debug, E: KeyType + fmt::Debug, C: fmt::Debug, M> fmt::Debug
    for KeyedCircuitBreakerService<S, E, C, M>
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedCircuitBreakerService")
            .field("inner", &self.inner)
            .field("key", &self.extractor)
            .field("breakers", &self.breakers)
            .field("classifier", &self.classifier)
            .field("mode", &std::any::type_name::<M>())
            .finish()
    }
}
