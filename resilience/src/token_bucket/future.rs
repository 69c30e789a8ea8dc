//! Response futures of [`TokenBucketService`](super::TokenBucketService), one per mode.

use std::{
    future::Future,
    pin::Pin,
    task::{ready, Context, Poll},
};

use http::{HeaderName, HeaderValue, Response};
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower_service::Service;

use super::bucket::Reservation;
use crate::{BoxError, ResponseBody};

pin_project! {
    /// Response future of error mode: the inner service's future, or the rejection.
    pub struct ResponseFuture<F> {
        #[pin]
        kind: Kind<F>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F> {
        Inner { #[pin] future: F },
        Rejected { error: Option<BoxError> },
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn inner(future: F) -> Self {
        ResponseFuture {
            kind: Kind::Inner { future },
        }
    }

    pub(crate) fn rejected(error: BoxError) -> Self {
        ResponseFuture {
            kind: Kind::Rejected { error: Some(error) },
        }
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Inner { future } => future.poll(cx).map_err(Into::into),
            KindProj::Rejected { error } => {
                Poll::Ready(Err(error.take().unwrap_or_else(polled_after_completion)))
            }
        }
    }
}

fn polled_after_completion() -> BoxError {
    "token bucket future polled after completion".into()
}

/// The `RateLimit` and `RateLimit-Policy` headers for a response that passed.
pub(crate) struct RateLimitHeaders {
    pub(crate) policy: HeaderValue,
    pub(crate) limit: HeaderValue,
}

pub(crate) static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
pub(crate) static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");

pin_project! {
    /// Response future of HTTP mode: the inner service's response (with `RateLimit`
    /// headers added), or the layer's own `429` / `500`.
    pub struct HttpResponseFuture<F, B> {
        #[pin]
        kind: HttpKind<F, B>,
    }
}

pin_project! {
    #[project = HttpKindProj]
    enum HttpKind<F, B> {
        Inner { #[pin] future: F, headers: Option<RateLimitHeaders> },
        Rejected { response: Option<Response<ResponseBody<B>>> },
    }
}

impl<F, B> HttpResponseFuture<F, B> {
    pub(crate) fn inner(future: F, headers: Option<RateLimitHeaders>) -> Self {
        HttpResponseFuture {
            kind: HttpKind::Inner { future, headers },
        }
    }

    pub(crate) fn rejected(response: Response<ResponseBody<B>>) -> Self {
        HttpResponseFuture {
            kind: HttpKind::Rejected {
                response: Some(response),
            },
        }
    }
}

impl<F, B, E> Future for HttpResponseFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            HttpKindProj::Inner { future, headers } => {
                let response = ready!(future.poll(cx))?;
                let mut response = response.map(ResponseBody::inner);
                if let Some(h) = headers.take() {
                    let map = response.headers_mut();
                    // The inner service may enforce its own, stricter limit: keep its word.
                    if !map.contains_key(&RATELIMIT) && !map.contains_key(&RATELIMIT_POLICY) {
                        map.insert(RATELIMIT_POLICY.clone(), h.policy);
                        map.insert(RATELIMIT.clone(), h.limit);
                    }
                }
                Poll::Ready(Ok(response))
            }
            HttpKindProj::Rejected { response } => match response.take() {
                Some(response) => Poll::Ready(Ok(response)),
                // Not reachable through `Future`'s contract; answer rather than panic.
                None => Poll::Ready(Ok(crate::token_bucket::service::internal_error(
                    "internal_error",
                    "token bucket future polled after completion",
                ))),
            },
        }
    }
}

pin_project! {
    /// Response future of wait mode: waits for the booked token, then calls the inner
    /// service (the one that was polled ready) and resolves to its response.
    ///
    /// Dropping it while it waits gives the token back.
    pub struct WaitFuture<S, Req>
    where
        S: Service<Req>,
    {
        #[pin]
        kind: WaitKind<S, Req>,
    }
}

pin_project! {
    #[project = WaitKindProj]
    enum WaitKind<S, Req>
    where
        S: Service<Req>,
    {
        Waiting {
            #[pin]
            sleep: Sleep,
            service: Option<S>,
            request: Option<Req>,
            reservation: Option<Reservation>,
        },
        Calling { #[pin] future: S::Future },
        Failed { error: Option<BoxError> },
    }
}

impl<S: Service<Req>, Req> WaitFuture<S, Req> {
    pub(crate) fn waiting(
        sleep: Sleep,
        service: S,
        request: Req,
        reservation: Reservation,
    ) -> Self {
        WaitFuture {
            kind: WaitKind::Waiting {
                sleep,
                service: Some(service),
                request: Some(request),
                reservation: Some(reservation),
            },
        }
    }

    pub(crate) fn calling(future: S::Future) -> Self {
        WaitFuture {
            kind: WaitKind::Calling { future },
        }
    }

    pub(crate) fn failed(error: BoxError) -> Self {
        WaitFuture {
            kind: WaitKind::Failed { error: Some(error) },
        }
    }
}

impl<S, Req> Future for WaitFuture<S, Req>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut kind = self.project().kind;
        loop {
            match kind.as_mut().project() {
                WaitKindProj::Waiting {
                    sleep,
                    service,
                    request,
                    reservation,
                } => {
                    ready!(sleep.poll(cx));
                    if let Some(reservation) = reservation.take() {
                        reservation.commit();
                    }
                    let (Some(mut service), Some(request)) = (service.take(), request.take())
                    else {
                        return Poll::Ready(Err(polled_after_completion()));
                    };
                    let future = service.call(request);
                    kind.set(WaitKind::Calling { future });
                }
                WaitKindProj::Calling { future } => return future.poll(cx).map_err(Into::into),
                WaitKindProj::Failed { error } => {
                    return Poll::Ready(Err(error.take().unwrap_or_else(polled_after_completion)))
                }
            }
        }
    }
}
