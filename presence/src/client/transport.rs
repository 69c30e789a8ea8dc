//! The bottom of the client stack: any tower HTTP service, with its response body
//! collected so the layers above (breaker, retry, timeout) see a plain
//! `http::Response<Bytes>`.
//!
//! The same service, type-erased once, also carries the [watch feed](super::watch),
//! which reads the body as it streams: there it is used without the collecting step,
//! the timeout layer, the breaker, the retry layer and the rate limiter (the feed has
//! its own reconnect backoff and only bounds the wait for the response headers).
//!
//! ```no_run
//! // The default transport is hyper-util's pooled HTTP/1 client (over rustls for an
//! // `https://` base URL); any other tower
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

use bytes::{Bytes, BytesMut};
use http_body::Body;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
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

/// A response body still streaming, type-erased (`Send`, not `Sync`, like the bodies
/// of most transports).
pub(crate) type StreamingBody = UnsyncBoxBody<Bytes, BoxError>;

/// The user's transport (or hyper-util's) with its error and body type erased and
/// nothing else done: the body still streams. Both the collecting path of the
/// client stack ([`collect`]) and the watch feed (which reads the body as it comes)
/// are built on it, so one injected service serves both.
pub(crate) type RawService =
    BoxCloneService<ClientRequest, http::Response<StreamingBody>, BoxError>;

/// Erases a user's transport: errors boxed, body boxed (still streaming).
pub(crate) fn raw<S, B>(service: S) -> RawService
where
    S: Service<ClientRequest, Response = http::Response<B>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let svc = service
        .map_err(into_box::<S::Error>)
        .map_response(|response: http::Response<B>| {
            response.map(|body| body.map_err(into_box::<B::Error>).boxed_unsync())
        });
    BoxCloneService::new(svc)
}

fn into_box<E: Into<BoxError>>(e: E) -> BoxError {
    e.into()
}

/// The collecting transport of the client stack: the body read whole, with a size
/// bound.
///
/// Reading the body happens here, under the timeout layer, so a server that sends
/// headers and then stalls is a timeout like any other.
pub(crate) fn collect(raw: RawService, max_response_bytes: usize) -> HttpService {
    let svc = raw.and_then(move |response: http::Response<StreamingBody>| async move {
        let (parts, body) = response.into_parts();
        let bytes = read_body(body, max_response_bytes).await?;
        Ok::<_, BoxError>(http::Response::from_parts(parts, bytes))
    });
    BoxCloneService::new(svc)
}

/// Reads a body whole, failing if it is over `max` bytes.
///
/// (A hand-written loop rather than `Limited::collect`: that future's `Send`-ness
/// trips a higher-ranked lifetime limitation of rustc once it is boxed.)
pub(crate) async fn read_body(mut body: StreamingBody, max: usize) -> Result<Bytes, BoxError> {
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            if buf.len() + data.len() > max {
                return Err(format!(
                    "length limit exceeded: the response body is over {max} bytes"
                )
                .into());
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

/// hyper-util's legacy pooled client, HTTP/1 over plain TCP.
pub(crate) fn hyper_client(
) -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// hyper-util's legacy pooled client, HTTP/1.1 over rustls with `tls` (its roots
/// verify the server); `http://` URLs still go over plain TCP.
pub(crate) fn https_client(
    tls: rustls::ClientConfig,
) -> Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
> {
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    Client::builder(TokioExecutor::new()).build(connector)
}
