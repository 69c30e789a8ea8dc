//! The request body size limit of `/presence*` (16 KiB, `413 payload_too_large`).
//!
//! Written here rather than taken from `tower_http::limit` because that layer answers
//! a too-large `Content-Length` with its own plain-text `413`, and the API promises
//! the JSON error shape for every error.
//!
//! The layer rejects what it can before the body is read (a declared length over the
//! limit); the body reader of the router ([`read_body`](super::router)) stops at the
//! same limit for a body without a declared length, so the body passes through this
//! layer untouched (not wrapped and boxed again).

use std::convert::Infallible;
use std::task::{Context, Poll};

use futures_util::future::{ready, Either, Ready};
use tower::{Layer, Service};

use super::errors::ApiError;
use super::{RequestBody, ResponseBody};

/// Rejects a request whose `Content-Length` exceeds the limit at once, without
/// reading its body; a chunked body (no length up front) is cut at the same limit by
/// the handler that reads it, with the same `413`.
#[derive(Clone, Copy, Debug)]
pub struct BodyLimitLayer {
    limit: usize,
}

impl BodyLimitLayer {
    /// A limit of `limit` bytes.
    pub fn new(limit: usize) -> Self {
        BodyLimitLayer { limit }
    }
}

impl<S> Layer<S> for BodyLimitLayer {
    type Service = BodyLimit<S>;
    fn layer(&self, inner: S) -> Self::Service {
        BodyLimit {
            inner,
            limit: self.limit,
        }
    }
}

/// The service of [`BodyLimitLayer`].
#[derive(Clone, Debug)]
pub struct BodyLimit<S> {
    inner: S,
    limit: usize,
}

impl<S> Service<http::Request<RequestBody>> for BodyLimit<S>
where
    S: Service<
        http::Request<RequestBody>,
        Response = http::Response<ResponseBody>,
        Error = Infallible,
    >,
{
    type Response = http::Response<ResponseBody>;
    type Error = Infallible;
    type Future = Either<Ready<Result<http::Response<ResponseBody>, Infallible>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<RequestBody>) -> Self::Future {
        // hyper's body knows its declared `Content-Length` (the lower bound of its size
        // hint); other bodies say what they know the same way.
        let declared = http_body::Body::size_hint(req.body()).lower();
        if declared > self.limit as u64 {
            return Either::Left(ready(Ok(
                ApiError::PayloadTooLarge { limit: self.limit }.into_response()
            )));
        }
        // A body without a declared length (chunked) is cut where it passes the
        // limit, by whoever reads it.
        let mut req = req;
        req.body_mut().set_limit(self.limit);
        Either::Right(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full, StreamBody};
    use tower::{service_fn, ServiceExt};

    /// A service that reads the body as the handlers do: `413` past its limit.
    async fn read(
        req: http::Request<RequestBody>,
    ) -> Result<http::Response<ResponseBody>, Infallible> {
        Ok(
            match super::super::request::collect_body(req.into_body()).await {
                Ok(bytes) => http::Response::new(ResponseBody::full(bytes)),
                Err(e) => e.into_response(),
            },
        )
    }

    fn chunked(len: usize) -> RequestBody {
        // A stream has no declared length, as a chunked request body.
        let chunks = vec![Ok::<_, Infallible>(http_body::Frame::data(Bytes::from(
            vec![b'x'; len],
        )))];
        RequestBody::new(StreamBody::new(futures_util::stream::iter(chunks)))
    }

    #[tokio::test]
    async fn the_layer_limit_holds_for_declared_and_chunked_bodies() {
        let svc = BodyLimitLayer::new(8).layer(service_fn(read));
        for (what, body, status) in [
            (
                "declared, over",
                RequestBody::new(Full::new(Bytes::from_static(b"0123456789"))),
                413,
            ),
            (
                "declared, at",
                RequestBody::new(Full::new(Bytes::from_static(b"01234567"))),
                200,
            ),
            ("chunked, over", chunked(9), 413),
            ("chunked, at", chunked(8), 200),
        ] {
            let res = svc.clone().oneshot(http::Request::new(body)).await.unwrap();
            assert_eq!(res.status(), status, "{what}");
            if status == 413 {
                let bytes = res.into_body().collect().await.unwrap().to_bytes();
                assert!(
                    String::from_utf8_lossy(&bytes).contains("larger than 8 bytes"),
                    "{what}: names the layer's limit"
                );
            }
        }
        // Above the default: a layer may also allow more than 16 KiB.
        let svc = BodyLimitLayer::new(64 * 1024).layer(service_fn(read));
        let res = svc
            .oneshot(http::Request::new(chunked(20_000)))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
}
