//! The response future of [`FaultService`](super::FaultService).

use std::{
    future::Future,
    pin::Pin,
    task::{ready, Context, Poll},
};

use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use pin_project_lite::pin_project;
use tokio::time::Sleep;

use crate::{BoxError, ResponseBody};

pin_project! {
    /// The injected latency (if any), then the inner future or the injected fault.
    ///
    /// The inner service was called when the request arrived, but its future is not
    /// polled before the latency is over: for the usual lazy futures (hyper, reqwest,
    /// tonic) the request starts after the delay.
    pub struct ResponseFuture<F, X> {
        #[pin]
        sleep: Option<Sleep>,
        #[pin]
        kind: Kind<F, X>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, X> {
        Inner { #[pin] future: F },
        Fault { fault: Option<X> },
    }
}

impl<F, X> ResponseFuture<F, X> {
    pub(crate) fn inner(sleep: Option<Sleep>, future: F) -> Self {
        ResponseFuture {
            sleep,
            kind: Kind::Inner { future },
        }
    }

    pub(crate) fn fault(sleep: Option<Sleep>, fault: X) -> Self {
        ResponseFuture {
            sleep,
            kind: Kind::Fault { fault: Some(fault) },
        }
    }

    /// Waits out the latency, then yields the inner future's output or the fault.
    fn poll_parts<T>(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T, X>>
    where
        F: Future<Output = T>,
    {
        let mut this = self.project();
        if let Some(sleep) = this.sleep.as_mut().as_pin_mut() {
            ready!(sleep.poll(cx));
            this.sleep.set(None);
        }
        match this.kind.project() {
            KindProj::Inner { future } => future.poll(cx).map(Ok),
            KindProj::Fault { fault } => match fault.take() {
                Some(fault) => Poll::Ready(Err(fault)),
                None => panic!("ResponseFuture polled after completion"),
            },
        }
    }
}

impl<F, R, E> Future for ResponseFuture<F, BoxError>
where
    F: Future<Output = Result<R, E>>,
    E: Into<BoxError>,
{
    type Output = Result<R, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(match ready!(self.poll_parts(cx)) {
            Ok(outcome) => outcome.map_err(Into::into),
            Err(fault) => Err(fault),
        })
    }
}

impl<F, B, E> Future for ResponseFuture<F, StatusCode>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = Result<http::Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(match ready!(self.poll_parts(cx)) {
            Ok(outcome) => outcome.map(|res| res.map(ResponseBody::inner)),
            Err(status) => Ok(fault_response(status)),
        })
    }
}

/// The response of an injected HTTP fault: the status, an empty body.
fn fault_response<B>(status: StatusCode) -> http::Response<ResponseBody<B>> {
    let mut res = http::Response::new(ResponseBody::rejection(Bytes::new()));
    *res.status_mut() = status;
    // Says where the failure came from to whoever reads the logs of the caller.
    res.headers_mut().insert(
        http::header::HeaderName::from_static("x-injected-fault"),
        HeaderValue::from_static("1"),
    );
    res
}
