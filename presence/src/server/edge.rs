//! The HTTP edge of the stack, from tower-http: `Authorization` marked sensitive,
//! panics turned into `500` answers, CORS for browser clients on other origins
//! (`PRESENCE_CORS_ORIGINS`), and compression of listings when the client asks for
//! it. (Request ids are the metrics layer's: see [`Metrics`](super::Metrics).)
//!
//! Outermost first, around the metrics layer and the dispatch:
//!
//! ```text
//! Metrics (x-request-id kept or made, named in the log line and sent back)
//!   SetSensitiveRequestHeaders (Authorization)
//!     CatchPanic (a panicking handler is a 500 JSON error)
//!       CORS (only with PRESENCE_CORS_ORIGINS)
//!         dispatch: GET /presence -> Compression (gzip, br, zstd) -> /presence* branch
//!                   other /presence* -> /presence* branch
//!                   /healthz, /readyz, /metrics -> router
//! ```
//!
//! Compression sits on the listing branch only: tower-http's compression body is
//! about 6 KB (its encoders' state), which every heartbeat answer would otherwise
//! carry through the stack, and only listings are large enough to compress.

use std::any::Any;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderName, HeaderValue, Method};
use resilience::BoxError;
use tower::util::{Either, MapResponse};
use tower_http::body::UnsyncBoxBody as CatchPanicBody;
use tower_http::catch_panic::CatchPanic;
use tower_http::compression::predicate::{And, NotForContentType, Predicate, SizeAbove};
use tower_http::compression::{CompressionBody, CompressionLayer};
use tower_http::cors::{AllowOrigin, Cors, CorsLayer};
use tower_http::sensitive_headers::SetSensitiveRequestHeaders;

use super::errors::ApiError;
use super::ResponseBody;

/// The request id header.
pub(crate) const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Responses smaller than this are sent as they are: compressing a heartbeat answer
/// would cost more than it saves.
const COMPRESS_ABOVE_BYTES: u16 = 1024;

/// The layers inside the metrics layer, around `S`.
pub(crate) type Inner<S> = SetSensitiveRequestHeaders<
    MapResponse<CatchPanic<Either<Cors<S>, S>, PanicResponse>, FromCaught>,
>;

/// The future of a listing answered through [`compression`]: the branch's own
/// future, compressing its answer when the client asked.
pub(crate) type Compressed<F> = tower::util::future::MapResponseFuture<
    tower_http::compression::ResponseFuture<F, Compressible>,
    FromCompressed,
>;

type PanicResponse = fn(Box<dyn Any + Send + 'static>) -> http::Response<ResponseBody>;
pub(crate) type Compressible = And<SizeAbove, NotForContentType>;
type FromCaught =
    fn(http::Response<CatchPanicBody<Bytes, BoxError>>) -> http::Response<ResponseBody>;
type FromCompressed =
    fn(http::Response<CompressionBody<ResponseBody>>) -> http::Response<ResponseBody>;

/// Wraps `inner` (the dispatch) in the layers that go inside the metrics layer.
pub(crate) fn inner<S>(inner: S, cors_origins: &[HeaderValue]) -> Inner<S> {
    let cors = if cors_origins.is_empty() {
        Either::Right(inner)
    } else {
        Either::Left(tower::Layer::layer(&cors(cors_origins), inner))
    };
    let panics = CatchPanic::custom(cors, panic_response as PanicResponse);
    SetSensitiveRequestHeaders::new(
        MapResponse::new(panics, |res| res.map(ResponseBody::caught)),
        std::iter::once(AUTHORIZATION),
    )
}

/// The compression of listings: gzip, br or zstd when the client asks for it, for
/// answers over [`COMPRESS_ABOVE_BYTES`]. Only the listing goes through it:
/// tower-http's compressed body is some 6 KB that every answer would carry.
pub(crate) fn compression() -> CompressionLayer<Compressible> {
    CompressionLayer::new()
        .gzip(true)
        .br(true)
        .zstd(true)
        .compress_when(
            SizeAbove::new(COMPRESS_ABOVE_BYTES)
                // The watch feed's events must not wait in a compressor's buffer.
                .and(NotForContentType::SSE),
        )
}

/// Calls `inner` through `compression`. The compression service is made per call
/// around a borrow of `inner`: it is only a view of the layer's settings, and the
/// branch is not cloned for it.
pub(crate) fn call_compressed<S>(
    compression: &CompressionLayer<Compressible>,
    inner: &mut S,
    req: http::Request<super::RequestBody>,
) -> Compressed<S::Future>
where
    S: tower::Service<http::Request<super::RequestBody>, Response = http::Response<ResponseBody>>,
{
    let mut compressed = MapResponse::new(
        tower::Layer::layer(compression, inner),
        from_compressed as FromCompressed,
    );
    tower::Service::call(&mut compressed, req)
}

fn from_compressed(
    res: http::Response<CompressionBody<ResponseBody>>,
) -> http::Response<ResponseBody> {
    res.map(ResponseBody::compressed)
}

/// The CORS policy for `origins`: those origins may call every route with the
/// methods and headers the API uses, and read the headers it sends.
fn cors(origins: &[HeaderValue]) -> CorsLayer {
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().cloned())
    };
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::HEAD, Method::POST])
        .allow_headers([AUTHORIZATION, CONTENT_TYPE, X_REQUEST_ID])
        .expose_headers([
            http::header::RETRY_AFTER,
            HeaderName::from_static("ratelimit"),
            HeaderName::from_static("ratelimit-policy"),
            X_REQUEST_ID,
        ])
}

/// A panic in a handler: a `500` in the API's error shape. The connection and the
/// process carry on; the panic message goes to the log, not to the client.
fn panic_response(panic: Box<dyn Any + Send + 'static>) -> http::Response<ResponseBody> {
    let detail = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a handler panicked".to_owned());
    ApiError::Internal(format!("handler panicked: {detail}")).into_response()
}
