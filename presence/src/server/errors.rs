//! Every error the server answers with, and the one function that turns it into an
//! HTTP response (the error table of docs/http-api.md).
//!
//! Keeping the status, the code and the headers of every error in a single `match`
//! is what keeps the API consistent: a new error variant cannot get a response shape
//! of its own by accident. (The `429` is written by the token-bucket layer of the
//! `resilience` crate in the same `{"error","message"}` shape.)

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::StatusCode;
use serde::Serialize;

use super::ResponseBody;
use crate::model::{ErrorBody, InvalidNodeId};

/// An error response of the presence API.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ApiError {
    /// `400 bad_request`: the body is not valid JSON, a field has the wrong type or a
    /// required field is missing. The string says which.
    BadRequest(String),
    /// `401 unauthorized`: the bearer token is missing or wrong.
    Unauthorized,
    /// `404 not_found`: no route for this path.
    RouteNotFound {
        /// The request method.
        method: http::Method,
        /// The request path.
        path: String,
    },
    /// `404 not_found`: the node is not online.
    NodeNotFound(String),
    /// `405 method_not_allowed`, with `Allow` set to the given methods.
    MethodNotAllowed {
        /// Value of the `Allow` header, e.g. `"GET, HEAD, POST"`.
        allow: &'static str,
    },
    /// `409 lease_mismatch`: the lease is not the node's current lease.
    LeaseMismatch,
    /// `413 payload_too_large`: the body is larger than `limit` bytes.
    PayloadTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// `415 unsupported_media_type`: a POST without one JSON content type in UTF-8, or
    /// with a transfer coding other than `chunked`. The string says which.
    UnsupportedMediaType(String),
    /// `422 invalid_node_id`.
    InvalidNodeId(InvalidNodeId),
    /// `422 invalid_meta`: meta is not an object or is too large. The string says which.
    InvalidMeta(String),
    /// `408 request_timeout`: the request body took longer than
    /// `PRESENCE_REQUEST_TIMEOUT_MS` to arrive.
    RequestTimeout,
    /// `503 store_unavailable` with `Retry-After`: the store failed, did not answer in
    /// time, or its circuit breaker is open.
    StoreUnavailable {
        /// Sent as `Retry-After`, in whole seconds rounded up (at least 1).
        retry_after: Duration,
    },
    /// `503 store_unavailable` with `Retry-After`: the store answered but refused the
    /// write (out of memory, read-only replica). The string is for the log only.
    StoreRefused(String),
    /// `500 internal`: a bug or an exhausted OS resource; the string is for the log
    /// only and is not sent to the client.
    Internal(String),
}

impl ApiError {
    /// The HTTP response for this error: status, `{"error": code, "message": sentence}`
    /// body and the headers the API documents for it (`Allow`, `Retry-After`,
    /// `WWW-Authenticate`; see docs/http-api.md).
    pub fn into_response(self) -> http::Response<ResponseBody> {
        let mut extra: Option<(http::HeaderName, HeaderValue)> = None;
        let (status, code, message) = match self {
            ApiError::BadRequest(why) => (StatusCode::BAD_REQUEST, "bad_request", why),
            ApiError::Unauthorized => {
                extra = Some((WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")));
                (
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "a valid `Authorization: Bearer <token>` header is required".to_owned(),
                )
            }
            ApiError::RouteNotFound { method, path } => (
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no route for {method} {path}"),
            ),
            ApiError::NodeNotFound(node) => (
                StatusCode::NOT_FOUND,
                "not_found",
                format!("node {node:?} is not online"),
            ),
            ApiError::MethodNotAllowed { allow } => {
                extra = Some((ALLOW, HeaderValue::from_static(allow)));
                (
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    format!("method not allowed; allowed: {allow}"),
                )
            }
            ApiError::LeaseMismatch => (
                StatusCode::CONFLICT,
                "lease_mismatch",
                "the lease is not the node's current lease; log in again".to_owned(),
            ),
            ApiError::PayloadTooLarge { limit } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the request body is larger than {limit} bytes"),
            ),
            ApiError::UnsupportedMediaType(why) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                why,
            ),
            ApiError::InvalidNodeId(why) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_node_id",
                why.to_string(),
            ),
            ApiError::InvalidMeta(why) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_meta", why),
            ApiError::RequestTimeout => (
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                "the request took too long".to_owned(),
            ),
            ApiError::StoreUnavailable { retry_after } => {
                let secs = retry_after_secs(retry_after);
                extra = Some((RETRY_AFTER, HeaderValue::from(secs)));
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    format!("the presence store is unavailable; retry after {secs} s"),
                )
            }
            ApiError::StoreRefused(detail) => {
                tracing::warn!(%detail, "store refused a write");
                let secs = retry_after_secs(STORE_REFUSED_RETRY_AFTER);
                extra = Some((RETRY_AFTER, HeaderValue::from(secs)));
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    format!(
                        "the presence store refuses writes (out of memory or read-only); reads still work; retry after {secs} s"
                    ),
                )
            }
            ApiError::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal server error".to_owned(),
                )
            }
        };
        let mut response = json_response(status, &ErrorBody::new(code, message));
        if let Some((name, value)) = extra {
            response.headers_mut().insert(name, value);
        }
        response
    }
}

/// How long a client should wait after the store refused a write.
const STORE_REFUSED_RETRY_AFTER: Duration = Duration::from_secs(1);

/// A JSON response with `status` and `body` serialized.
pub(crate) fn json_response(
    status: StatusCode,
    body: &impl Serialize,
) -> http::Response<ResponseBody> {
    match serde_json::to_vec(body) {
        Ok(bytes) => bytes_response(status, "application/json", Bytes::from(bytes)),
        // Our own types always serialize (string keys, no failing Serialize impls);
        // answering something valid beats panicking on a bug.
        Err(e) => bytes_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "application/json",
            Bytes::from(format!(
                r#"{{"error":"internal","message":"response serialization failed: {}"}}"#,
                e.to_string().replace(['"', '\\'], "'")
            )),
        ),
    }
}

/// A response with `status`, `content_type` and `bytes` as the body.
pub(crate) fn bytes_response(
    status: StatusCode,
    content_type: &'static str,
    bytes: Bytes,
) -> http::Response<ResponseBody> {
    let mut response = http::Response::new(super::full(bytes));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// Whole seconds, rounded up and never 0: a client told "0" retries at once.
fn retry_after_secs(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}
