//! Response futures of [`ConcurrencyLimitService`](super::ConcurrencyLimitService), and
//! [`PermitBody`], the HTTP body that holds a slot until it has been streamed.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    task::{ready, Context, Poll},
};

use http::{header, HeaderValue, StatusCode};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::{error::Overloaded, limit::Permit};
use crate::{http_response::json_error, retry_after::retry_after_secs, BoxError, ResponseBody};

pin_project! {
    /// Response future of the service in error mode: the inner future, holding the
    /// call's slot until it completes or is dropped, or an immediate [`Overloaded`]
    /// error.
    pub struct ResponseFuture<F> {
        #[pin]
        kind: Kind<F>,
    }
}

pin_project! {
    /// Response future of the service in HTTP mode: the inner future, holding the
    /// call's slot until it completes (then the slot moves into the [`PermitBody`]) or
    /// is dropped, or an immediate `503` response.
    pub struct HttpResponseFuture<F> {
        #[pin]
        kind: Kind<F>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F> {
        Called {
            #[pin]
            future: F,
            // `None` once the future has completed.
            permit: Option<Permit>,
        },
        Rejected {
            overloaded: Overloaded,
        },
    }
}

/// The inner output and the call's permit (`None` if polled again after completing), or
/// the rejection.
type Outcome<T> = Result<(T, Option<Permit>), Overloaded>;

impl<F> Kind<F> {
    /// The inner output and the call's permit, or `Err` if rejected.
    #[inline]
    fn poll_inner(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome<F::Output>>
    where
        F: Future,
    {
        match self.project() {
            KindProj::Called { future, permit } => {
                let output = ready!(future.poll(cx));
                Poll::Ready(Ok((output, permit.take())))
            }
            KindProj::Rejected { overloaded } => Poll::Ready(Err(*overloaded)),
        }
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn called(future: F, permit: Permit) -> Self {
        ResponseFuture {
            kind: Kind::Called {
                future,
                permit: Some(permit),
            },
        }
    }

    pub(crate) fn rejected(overloaded: Overloaded) -> Self {
        ResponseFuture {
            kind: Kind::Rejected { overloaded },
        }
    }
}

impl<F, R, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<R, E>>,
    E: Into<BoxError>,
{
    type Output = Result<R, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(match ready!(self.project().kind.poll_inner(cx)) {
            // The permit is dropped here: the call is over.
            Ok((output, permit)) => {
                if let Some(mut permit) = permit {
                    permit.complete(output.is_err());
                }
                output.map_err(Into::into)
            }
            Err(overloaded) => Err(Box::new(overloaded)),
        })
    }
}

impl<F> HttpResponseFuture<F> {
    pub(crate) fn called(future: F, permit: Permit) -> Self {
        HttpResponseFuture {
            kind: Kind::Called {
                future,
                permit: Some(permit),
            },
        }
    }

    pub(crate) fn rejected(overloaded: Overloaded) -> Self {
        HttpResponseFuture {
            kind: Kind::Rejected { overloaded },
        }
    }
}

impl<F, B, E> Future for HttpResponseFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
    B: Body,
{
    type Output = Result<http::Response<ResponseBody<PermitBody<B>>>, E>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(match ready!(self.project().kind.poll_inner(cx)) {
            // An `Err` drops the permit here; a response carries it in its body. The
            // latency sample is taken now, at the response; `Err` and `5xx` are drops.
            Ok((output, mut permit)) => {
                if let Some(permit) = &mut permit {
                    permit.complete(match &output {
                        Ok(res) => res.status().is_server_error(),
                        Err(_) => true,
                    });
                }
                output.map(|res| res.map(|body| ResponseBody::inner(PermitBody::new(body, permit))))
            }
            Err(overloaded) => Ok(overloaded_response(overloaded)),
        })
    }
}

/// The `503` a full limit answers with in HTTP mode.
fn overloaded_response<B>(overloaded: Overloaded) -> http::Response<ResponseBody<B>> {
    // `Overloaded`'s Display: "overloaded; retry after N s", N as in `Retry-After`.
    let body = json_error("overloaded", &overloaded.to_string());
    let mut res = http::Response::new(ResponseBody::rejection(body));
    *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    let headers = res.headers_mut();
    headers.insert(
        header::RETRY_AFTER,
        HeaderValue::from(retry_after_secs(overloaded.retry_after)),
    );
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}

pin_project! {
    /// The inner service's response body, holding the call's slot of the concurrency
    /// limit until the body has been streamed.
    ///
    /// The slot is freed as soon as the body ends (`poll_frame` returns `None` or an
    /// error, or a frame leaves [`is_end_stream`](Body::is_end_stream) true) or the body
    /// is dropped, whichever comes first. A body that is already at its end when the
    /// response is ready (an empty one) frees it at once. Frames, trailers, size hint
    /// and end of stream are the inner body's, untouched.
    pub struct PermitBody<B> {
        #[pin]
        body: B,
        permit: Option<Permit>,
    }
}

impl<B: Body> PermitBody<B> {
    fn new(body: B, permit: Option<Permit>) -> Self {
        let permit = permit.filter(|_| !body.is_end_stream());
        PermitBody { body, permit }
    }
}

impl<B> PermitBody<B> {
    /// `true` while the body holds its call's slot.
    pub fn holds_permit(&self) -> bool {
        self.permit.is_some()
    }

    /// The inner body.
    pub fn get_ref(&self) -> &B {
        &self.body
    }
}

impl<B: Body> Body for PermitBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.body.as_mut().poll_frame(cx));
        let ended = match &frame {
            Some(Ok(_)) => this.body.is_end_stream(),
            Some(Err(_)) | None => true,
        };
        if ended {
            *this.permit = None;
        }
        Poll::Ready(frame)
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl<B: fmt::Debug> fmt::Debug for PermitBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PermitBody")
            .field("body", &self.body)
            .field("holds_permit", &self.holds_permit())
            .finish()
    }
}
