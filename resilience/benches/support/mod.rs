//! What the layer benchmarks share: a pass-through service to measure against, and one
//! call polled by hand (no runtime), so a benchmark times the layer and nothing else.

use std::convert::Infallible;
use std::future::{ready, Future, Ready};
use std::pin::pin;
use std::task::{Context, Poll};

use tower::Service;

/// The cheapest possible service: answers with its request.
#[derive(Clone, Copy)]
pub struct PassThrough;

impl Service<u64> for PassThrough {
    type Response = u64;
    type Error = Infallible;
    type Future = Ready<Result<u64, Infallible>>;

    #[inline]
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    #[inline]
    fn call(&mut self, req: u64) -> Self::Future {
        ready(Ok(req))
    }
}

/// One request through `svc`, polled to completion by hand.
#[inline]
pub fn once<S>(svc: &mut S, cx: &mut Context<'_>, req: u64) -> bool
where
    S: Service<u64, Response = u64>,
{
    if svc.poll_ready(cx).is_pending() {
        return false;
    }
    let fut = pin!(svc.call(req));
    matches!(fut.poll(cx), Poll::Ready(Ok(_)))
}
