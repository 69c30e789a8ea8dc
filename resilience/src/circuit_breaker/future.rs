//! Response futures of [`CircuitBreakerService`](super::CircuitBreakerService).

use std::{
    future::Future,
    pin::Pin,
    task::{ready, Context, Poll},
};

use http::{header, HeaderValue, StatusCode};
use pin_project_lite::pin_project;

use super::{
    breaker::BreakerPermit,
    classify::{http_mode_is_failure, Classifier},
    error::CircuitOpen,
};
use crate::{http_response::json_error, retry_after::retry_after_secs, BoxError, ResponseBody};

pin_project! {
    /// Response future of the service in error mode: the inner future, whose outcome is
    /// reported to the breaker when it completes, or an immediate [`CircuitOpen`] error.
    pub struct ResponseFuture<F, C> {
        #[pin]
        kind: Kind<F, C>,
    }
}

pin_project! {
    /// Response future of the service in HTTP mode: the inner future, whose outcome is
    /// reported to the breaker when it completes, or an immediate `503` response.
    pub struct HttpResponseFuture<F, C> {
        #[pin]
        kind: Kind<F, C>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, C> {
        Called {
            #[pin]
            future: F,
            // Dropping the future before it completes drops the permit unreported, which
            // frees a half-open slot (see `BreakerPermit`).
            permit: BreakerPermit,
            classifier: C,
        },
        Rejected {
            open: CircuitOpen,
        },
    }
}

impl<F, C> Kind<F, C> {
    fn called(future: F, permit: BreakerPermit, classifier: C) -> Self {
        Kind::Called {
            future,
            permit,
            classifier,
        }
    }

    /// Polls the inner future and reports its outcome, as `is_failure` judges it with
    /// the classifier; `Err(open)` if rejected.
    #[inline]
    fn poll_classified<R, E>(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        is_failure: impl FnOnce(&C, Result<&R, &E>) -> bool,
    ) -> Poll<Result<Result<R, E>, CircuitOpen>>
    where
        F: Future<Output = Result<R, E>>,
    {
        match self.project() {
            KindProj::Called {
                future,
                permit,
                classifier,
            } => {
                let outcome = ready!(future.poll(cx));
                permit.report(is_failure(classifier, outcome.as_ref()));
                Poll::Ready(Ok(outcome))
            }
            KindProj::Rejected { open } => Poll::Ready(Err(*open)),
        }
    }
}

impl<F, C> ResponseFuture<F, C> {
    pub(crate) fn called(future: F, permit: BreakerPermit, classifier: C) -> Self {
        ResponseFuture {
            kind: Kind::called(future, permit, classifier),
        }
    }

    pub(crate) fn rejected(open: CircuitOpen) -> Self {
        ResponseFuture {
            kind: Kind::Rejected { open },
        }
    }
}

impl<F, C, R, E> Future for ResponseFuture<F, C>
where
    F: Future<Output = Result<R, E>>,
    E: Into<BoxError>,
    C: Classifier<R, E>,
{
    type Output = Result<R, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let kind = self.project().kind;
        Poll::Ready(match ready!(kind.poll_classified(cx, C::is_failure)) {
            Ok(outcome) => outcome.map_err(Into::into),
            Err(open) => Err(Box::new(open)),
        })
    }
}

impl<F, C> HttpResponseFuture<F, C> {
    pub(crate) fn called(future: F, permit: BreakerPermit, classifier: C) -> Self {
        HttpResponseFuture {
            kind: Kind::called(future, permit, classifier),
        }
    }

    pub(crate) fn rejected(open: CircuitOpen) -> Self {
        HttpResponseFuture {
            kind: Kind::Rejected { open },
        }
    }
}

impl<F, C, B, E> Future for HttpResponseFuture<F, C>
where
    F: Future<Output = Result<http::Response<B>, E>>,
    C: Classifier<http::Response<B>, E>,
{
    type Output = Result<http::Response<ResponseBody<B>>, E>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let kind = self.project().kind;
        Poll::Ready(
            match ready!(kind.poll_classified(cx, http_mode_is_failure)) {
                Ok(outcome) => outcome.map(|res| res.map(ResponseBody::inner)),
                Err(open) => Ok(open_response(open)),
            },
        )
    }
}

/// The `503` an open breaker answers with in HTTP mode.
fn open_response<B>(open: CircuitOpen) -> http::Response<ResponseBody<B>> {
    // `CircuitOpen`'s Display: "circuit breaker is open; retry after N s", N as in
    // `Retry-After`.
    let body = json_error("circuit_open", &open.to_string());
    let mut res = http::Response::new(ResponseBody::rejection(body));
    *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    let headers = res.headers_mut();
    headers.insert(
        header::RETRY_AFTER,
        HeaderValue::from(retry_after_secs(open.retry_after)),
    );
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}
