//! Response futures of [`KeyedCircuitBreakerService`](super::KeyedCircuitBreakerService).

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use http::{header, HeaderValue, StatusCode};
use pin_project_lite::pin_project;

use crate::{
    circuit_breaker::{
        future::{HttpResponseFuture as BreakerHttpFuture, ResponseFuture as BreakerFuture},
        Classifier,
    },
    http_response::json_error,
    BoxError, MissingKey, ResponseBody,
};

pin_project! {
    /// Response future in error mode: the key's breaker's future, or an immediate
    /// [`MissingKey`] error.
    pub struct ResponseFuture<F, C> {
        #[pin]
        kind: Kind<BreakerFuture<F, C>>,
    }
}

pin_project! {
    /// Response future in HTTP mode: the key's breaker's future, or an immediate `500`
    /// for a request without a key.
    pub struct HttpResponseFuture<F, C> {
        #[pin]
        kind: Kind<BreakerHttpFuture<F, C>>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<T> {
        Breaker { #[pin] future: T },
        Missing { missing: Option<MissingKey> },
    }
}

impl<T: Future> Kind<T> {
    fn poll_kind(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<T::Output, MissingKey>> {
        match self.project() {
            KindProj::Breaker { future } => future.poll(cx).map(Ok),
            KindProj::Missing { missing } => match missing.take() {
                Some(missing) => Poll::Ready(Err(missing)),
                None => panic!("future polled after completion"),
            },
        }
    }
}

impl<F, C> ResponseFuture<F, C> {
    pub(crate) fn breaker(future: BreakerFuture<F, C>) -> Self {
        ResponseFuture {
            kind: Kind::Breaker { future },
        }
    }

    pub(crate) fn missing(missing: MissingKey) -> Self {
        ResponseFuture {
            kind: Kind::Missing {
                missing: Some(missing),
            },
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

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project()
            .kind
            .poll_kind(cx)
            .map(|outcome| match outcome {
                Ok(outcome) => outcome,
                Err(missing) => Err(Box::new(missing) as BoxError),
            })
    }
}

impl<F, C> HttpResponseFuture<F, C> {
    pub(crate) fn breaker(future: BreakerHttpFuture<F, C>) -> Self {
        HttpResponseFuture {
            kind: Kind::Breaker { future },
        }
    }

    pub(crate) fn missing(missing: MissingKey) -> Self {
        HttpResponseFuture {
            kind: Kind::Missing {
                missing: Some(missing),
            },
        }
    }
}

impl<F, C, B, E> Future for HttpResponseFuture<F, C>
where
    F: Future<Output = Result<http::Response<B>, E>>,
    C: Classifier<http::Response<B>, E>,
{
    type Output = Result<http::Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project()
            .kind
            .poll_kind(cx)
            .map(|outcome| match outcome {
                Ok(outcome) => outcome,
                Err(missing) => Ok(missing_key_response(&missing)),
            })
    }
}

/// The `500` for a request without a key, as the token-bucket layer answers it.
fn missing_key_response<B>(missing: &MissingKey) -> http::Response<ResponseBody<B>> {
    let body = json_error("breaker_key_missing", &missing.to_string());
    let mut res = http::Response::new(ResponseBody::rejection(body));
    *res.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}
