//! [`FaultService`]: the service [`FaultLayer`](super::FaultLayer) wraps around yours.

use std::{
    fmt,
    marker::PhantomData,
    sync::Arc,
    task::{Context, Poll},
};

use http::{Request, Response, StatusCode};
use tower_service::Service;

use super::{future::ResponseFuture, layer::Faults};
use crate::{
    mode::{ErrorMode, HttpMode},
    BoxError, ResponseBody,
};

/// A service with injected faults; made by [`FaultLayer`](super::FaultLayer).
///
/// `poll_ready` only forwards to the inner service; each `call` draws its fate from the
/// layer's shared generator. Clones share it.
pub struct FaultService<S, M = ErrorMode> {
    inner: S,
    faults: Arc<Faults>,
    _mode: PhantomData<fn() -> M>,
}

impl<S, M> FaultService<S, M> {
    pub(crate) fn new(inner: S, faults: Arc<Faults>) -> Self {
        FaultService {
            inner,
            faults,
            _mode: PhantomData,
        }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The wrapped service, unwrapped.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// The sleep of a delayed call; `None` costs no timer.
    fn sleep(&self, delay: std::time::Duration) -> Option<tokio::time::Sleep> {
        (!delay.is_zero()).then(|| tokio::time::sleep(delay))
    }
}

impl<S, Req> Service<Req> for FaultService<S, ErrorMode>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, BoxError>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let decision = self.faults.decide();
        let sleep = self.sleep(decision.delay);
        if decision.fail {
            ResponseFuture::fault(sleep, self.faults.error())
        } else {
            ResponseFuture::inner(sleep, self.inner.call(req))
        }
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for FaultService<S, HttpMode>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, StatusCode>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let decision = self.faults.decide();
        let sleep = self.sleep(decision.delay);
        if decision.fail {
            ResponseFuture::fault(sleep, self.faults.status())
        } else {
            ResponseFuture::inner(sleep, self.inner.call(req))
        }
    }
}

impl<S: Clone, M> Clone for FaultService<S, M> {
    fn clone(&self) -> Self {
        FaultService {
            inner: self.inner.clone(),
            faults: self.faults.clone(),
            _mode: PhantomData,
        }
    }
}

impl<S: fmt::Debug, M> fmt::Debug for FaultService<S, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultService")
            .field("inner", &self.inner)
            .field("mode", &std::any::type_name::<M>())
            .finish_non_exhaustive()
    }
}
