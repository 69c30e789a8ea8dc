//! The bottom of the client stack: any tower HTTP service, with its response body
//! collected so the layers above (breaker, retry, timeout) see a plain
//! `http::Response<Bytes>`.
//!
//! ```no_run
//! // The default transport is hyper-util's pooled HTTP/1 client; any other tower
//! // service can take its place, e.g. the presence server's own service in-process.
//! # fn main() -> Result<(), presence::client::ClientError> {
//! use presence::client::PresenceClient;
//!
//! let transport = tower::service_fn(|_req: http::Request<http_body_util::Full<bytes::Bytes>>| async {
//!     Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
//!         bytes::Bytes::from_static(b"[]"),
//!     )))
//! });
//! let client = PresenceClient::builder("http://presence.test/presence")
//!     .service(transport)
//!     .build()?;
//! # Ok(()) }
//! ```

use bytes::Bytes;
use http_body::Body;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use resilience::BoxError;
use tower::util::BoxCloneService;
use tower::{Service, ServiceExt};

/// The request type every layer of the client stack takes.
pub type ClientRequest = http::Request<Full<Bytes>>;

/// The response type every layer above the transport sees: the body is read whole.
pub type ClientResponse = http::Response<Bytes>;

/// The type-erased client stack (and the type-erased transport under it).
pub(crate) type HttpService = BoxCloneService<ClientRequest, ClientResponse, BoxError>;

/// Wraps a user's transport: errors boxed, body collected with a size bound.
///
/// Reading the body happens here, under the timeout layer, so a server that sends
/// headers and then stalls is a timeout like any other.
pub(crate) fn erase<S, B>(service: S, max_response_bytes: usize) -> HttpService
where
    S: Service<ClientRequest, Response = http::Response<B>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let svc = service
        .map_err(Into::into)
        .and_then(move |response: http::Response<B>| async move {
            let (parts, body) = response.into_parts();
            let bytes = Limited::new(body, max_response_bytes)
                .collect()
                .await?
                .to_bytes();
            Ok::<_, BoxError>(http::Response::from_parts(parts, bytes))
        });
    BoxCloneService::new(svc)
}

/// hyper-util's legacy pooled client, HTTP/1 over plain TCP.
pub(crate) fn hyper_client(
) -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}
