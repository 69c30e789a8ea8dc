//! [`ConcurrencyLimitService`]: the middleware.

use std::{
    fmt,
    marker::PhantomData,
    task::{Context, Poll},
    time::Duration,
};

use tower_service::Service;

use super::{
    error::Overloaded,
    future::{HttpResponseFuture, PermitBody, ResponseFuture},
    limit::SharedLimit,
};
use crate::{
    mode::{ErrorMode, HttpMode},
    BoxError, ResponseBody,
};

/// A service that admits at most [`limit`](Self::limit) calls at a time and rejects the rest; made by
/// [`ConcurrencyLimitLayer`](super::ConcurrencyLimitLayer), whose docs describe the
/// modes.
///
/// `poll_ready` only forwards the inner service's readiness: it never fails on its own
/// account and never reserves a slot. The decision is made in `call`; a rejected call
/// never reaches the inner service. Clones share the limit.
pub struct ConcurrencyLimitService<S, M = ErrorMode> {
    inner: S,
    limit: SharedLimit,
    retry_after: Duration,
    _mode: PhantomData<fn() -> M>,
}

impl<S, M> ConcurrencyLimitService<S, M> {
    pub(crate) fn from_parts(inner: S, limit: SharedLimit, retry_after: Duration) -> Self {
        ConcurrencyLimitService {
            inner,
            limit,
            retry_after,
            _mode: PhantomData,
        }
    }

    /// The most calls in flight at once (for an adaptive limit, the highest the limit
    /// goes), shared with the layer and its other services.
    pub fn max(&self) -> usize {
        self.limit.max()
    }

    /// The lowest the limit goes: `max` for a static limit.
    pub fn min(&self) -> usize {
        self.limit.min()
    }

    /// The limit now, shared with the layer and its other services.
    pub fn limit(&self) -> usize {
        self.limit.limit()
    }

    /// Calls in flight now, across every service of the layer.
    pub fn in_flight(&self) -> usize {
        self.limit.in_flight()
    }

    /// Calls rejected so far, across every service of the layer.
    pub fn rejections(&self) -> u64 {
        self.limit.rejections()
    }

    /// The `retry_after` of this service's rejections.
    pub fn retry_after_hint(&self) -> Duration {
        self.retry_after
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

impl<S, Req> Service<Req> for ConcurrencyLimitService<S, ErrorMode>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        match self.limit.try_acquire() {
            Some(permit) => ResponseFuture::called(self.inner.call(req), permit),
            None => ResponseFuture::rejected(Overloaded::new(self.retry_after)),
        }
    }
}

impl<S, Req, B> Service<Req> for ConcurrencyLimitService<S, HttpMode>
where
    S: Service<Req, Response = http::Response<B>>,
    B: http_body::Body,
{
    type Response = http::Response<ResponseBody<PermitBody<B>>>;
    type Error = S::Error;
    type Future = HttpResponseFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        match self.limit.try_acquire() {
            Some(permit) => HttpResponseFuture::called(self.inner.call(req), permit),
            None => HttpResponseFuture::rejected(Overloaded::new(self.retry_after)),
        }
    }
}

impl<S: Clone, M> Clone for ConcurrencyLimitService<S, M> {
    fn clone(&self) -> Self {
        ConcurrencyLimitService {
            inner: self.inner.clone(),
            limit: self.limit.clone(),
            retry_after: self.retry_after,
            _mode: PhantomData,
        }
    }
}

impl<S: fmt::Debug, M> fmt::Debug for ConcurrencyLimitService<S, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConcurrencyLimitService")
            .field("inner", &self.inner)
            .field("limit", &self.limit)
            .field("retry_after", &self.retry_after)
            .field("mode", &std::any::type_name::<M>())
            .finish()
    }
}
