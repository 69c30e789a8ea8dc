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

use resilience::retry_after_secs;

use super::ResponseBody;
use crate::model::{ErrorBody, InvalidNodeId, InvalidStatus};

/// An error response of the presence API.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ApiError {
    /// `400 bad_request`: the body is not valid JSON, a field has the wrong type or a
    /// required field is missing, or a query parameter is malformed. The string says
    /// which.
    BadRequest(String),
    /// `401 unauthorized`: the bearer token is missing or wrong.
    Unauthorized,
    /// `403 forbidden`: the token is valid but does not allow this call (a node
    /// writing another node, a reader writing). The string says which.
    Forbidden(String),
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
    /// `422 invalid_status`: a status that is not `up`, `degraded` or `draining`.
    InvalidStatus(InvalidStatus),
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
    /// `503 too_many_watchers` with `Retry-After`: the server already serves
    /// `PRESENCE_MAX_WATCHERS` watch streams.
    TooManyWatchers {
        /// The limit.
        max: usize,
    },
    /// `503 shutting_down` with `Retry-After`: the server is draining and takes no
    /// new watch streams (another server will).
    ShuttingDown,
    /// `500 internal`: a bug or an exhausted OS resource; the string is for the log
    /// only and is not sent to the client.
    Internal(String),
}

impl ApiError {
    /// The HTTP response for this error: status, `{"error": code, "message": sentence}`
    /// body and the headers the API documents for it (`Allow`, `Retry-After`,
    /// `WWW-Authenticate`; see docs/http-api.md).
    pub fn into_response(self) -> http::Response<ResponseBody> {
        let (status, code) = self.status_and_code();
        let header = self.header();
        let message = self.into_message();
        let mut response = json_response(status, &ErrorBody::new(code, message));
        if let Some((name, value)) = header {
            response.headers_mut().insert(name, value);
        }
        response
    }

    /// The status and the `error` code.
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::RouteNotFound { .. } | ApiError::NodeNotFound(_) => {
                (StatusCode::NOT_FOUND, "not_found")
            }
            ApiError::MethodNotAllowed { .. } => {
                (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
            }
            ApiError::LeaseMismatch => (StatusCode::CONFLICT, "lease_mismatch"),
            ApiError::PayloadTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
            }
            ApiError::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            ApiError::InvalidNodeId(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_node_id"),
            ApiError::InvalidMeta(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_meta"),
            ApiError::InvalidStatus(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_status"),
            ApiError::RequestTimeout => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            ApiError::StoreUnavailable { .. } | ApiError::StoreRefused(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable")
            }
            ApiError::TooManyWatchers { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "too_many_watchers")
            }
            ApiError::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }

    /// The one header the error sets, if any.
    fn header(&self) -> Option<(http::HeaderName, HeaderValue)> {
        match self {
            ApiError::Unauthorized => Some((WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))),
            ApiError::MethodNotAllowed { allow } => Some((ALLOW, HeaderValue::from_static(allow))),
            ApiError::StoreUnavailable { .. }
            | ApiError::StoreRefused(_)
            | ApiError::TooManyWatchers { .. }
            | ApiError::ShuttingDown => {
                Some((RETRY_AFTER, HeaderValue::from(self.retry_after_secs())))
            }
            _ => None,
        }
    }

    /// `Retry-After` of the `503`s, in whole seconds rounded up.
    fn retry_after_secs(&self) -> u64 {
        match self {
            ApiError::StoreUnavailable { retry_after } => retry_after_secs(*retry_after),
            // A watcher that leaves frees a slot; spread the retries a little.
            ApiError::TooManyWatchers { .. } => 5,
            _ => retry_after_secs(STORE_REFUSED_RETRY_AFTER),
        }
    }

    /// The `message` sentence; logs what is for the log only.
    fn into_message(self) -> String {
        match self {
            ApiError::BadRequest(why)
            | ApiError::UnsupportedMediaType(why)
            | ApiError::InvalidMeta(why)
            | ApiError::Forbidden(why) => why,
            ApiError::Unauthorized => {
                "a valid `Authorization: Bearer <token>` header is required".to_owned()
            }
            ApiError::RouteNotFound { method, path } => format!("no route for {method} {path}"),
            ApiError::NodeNotFound(node) => format!("node {node:?} is not online"),
            ApiError::MethodNotAllowed { allow } => {
                format!("method not allowed; allowed: {allow}")
            }
            ApiError::LeaseMismatch => {
                "the lease is not the node's current lease; log in again".to_owned()
            }
            ApiError::PayloadTooLarge { limit } => {
                format!("the request body is larger than {limit} bytes")
            }
            ApiError::InvalidNodeId(why) => why.to_string(),
            ApiError::InvalidStatus(why) => why.to_string(),
            ApiError::RequestTimeout => "the request took too long".to_owned(),
            ApiError::StoreUnavailable { .. } => format!(
                "the presence store is unavailable; retry after {} s",
                self.retry_after_secs()
            ),
            ApiError::StoreRefused(ref detail) => {
                tracing::warn!(%detail, "store refused a write");
                format!(
                    "the presence store refuses writes (out of memory or read-only); reads still work; retry after {} s",
                    self.retry_after_secs()
                )
            }
            ApiError::TooManyWatchers { max } => format!(
                "this server already serves {max} watch streams; retry after {} s or on another server",
                self.retry_after_secs()
            ),
            ApiError::ShuttingDown => format!(
                "this server is shutting down; retry after {} s",
                self.retry_after_secs()
            ),
            ApiError::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                "internal server error".to_owned()
            }
        }
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
