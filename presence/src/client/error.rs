//! [`ClientError`]: the one error type of the client SDK.
//!
//! ```
//! use presence::client::ClientError;
//!
//! fn explain(e: &ClientError) -> &'static str {
//!     match e {
//!         ClientError::CircuitOpen(_) => "the server looks down; the breaker fails fast for now",
//!         ClientError::RateLimited(_) => "slow down",
//!         ClientError::NotFound => "not online",
//!         ClientError::LeaseMismatch => "another process holds this node id",
//!         ClientError::Unauthorized => "check the bearer token",
//!         ClientError::Timeout | ClientError::Transport(_) => "network trouble",
//!         ClientError::Server { .. } => "the server refused",
//!         ClientError::InvalidInput(_) => "fix the call",
//!         _ => "something else",
//!     }
//! }
//! assert_eq!(explain(&ClientError::NotFound), "not online");
//! ```

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use resilience::{BoxError, CircuitOpen, RateLimited};

use crate::model::ErrorBody;

/// Everything a [`PresenceClient`](super::PresenceClient) call can fail with.
///
/// Server replies are mapped by status: `401` -> [`Unauthorized`](Self::Unauthorized),
/// `404` -> [`NotFound`](Self::NotFound), `409` -> [`LeaseMismatch`](Self::LeaseMismatch),
/// `422` -> [`InvalidInput`](Self::InvalidInput), `429` ->
/// [`RateLimited`](Self::RateLimited) (with the server's `Retry-After`), anything else
/// that is not a success -> [`Server`](Self::Server). Errors of the tower stack are
/// mapped by type: the client's own breaker and limiter give
/// [`CircuitOpen`](Self::CircuitOpen) and [`RateLimited`](Self::RateLimited), the
/// per-attempt timeout gives [`Timeout`](Self::Timeout), the rest is
/// [`Transport`](Self::Transport).
#[derive(Debug)]
#[non_exhaustive]
pub enum ClientError {
    /// The client's circuit breaker is open: the call failed fast without reaching the
    /// server.
    CircuitOpen(CircuitOpen),
    /// Rate limited: either the client's own limiter would have had to wait longer
    /// than its bound, or the server answered `429 rate_limited`.
    RateLimited(RateLimited),
    /// `404 not_found`: the node is not online (or the base URL is wrong).
    NotFound,
    /// `409 lease_mismatch`: another lease is current for this node id, i.e. the node
    /// logged in again elsewhere (or restarted); this lease is dead.
    LeaseMismatch,
    /// `401 unauthorized`: the bearer token is missing or wrong.
    Unauthorized,
    /// Any other non-success reply, or a success reply whose body could not be decoded
    /// (then `code` is `invalid_response`).
    Server {
        /// The HTTP status code.
        status: u16,
        /// The machine-readable `error` field of the body (docs/http-api.md), or
        /// `http_<status>` when the body was not the JSON error shape.
        code: String,
        /// The human-readable `message` of the body.
        message: String,
    },
    /// The request did not get a response: connection refused or reset, a body error,
    /// or any other error of the transport service.
    Transport(BoxError),
    /// An attempt took longer than the configured timeout (after the retries allowed
    /// for the call).
    Timeout,
    /// The call was refused before anything was sent (an invalid node id, a bad base
    /// URL or builder setting), or the server answered `422`.
    InvalidInput(String),
}

impl ClientError {
    /// `true` for failures that may go away by themselves: an open breaker, rate
    /// limiting, timeouts, transport errors and `5xx` replies. `keep_alive` keeps going
    /// through those.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::CircuitOpen(_)
            | ClientError::RateLimited(_)
            | ClientError::Timeout
            | ClientError::Transport(_) => true,
            ClientError::Server { status, .. } => *status >= 500,
            ClientError::NotFound
            | ClientError::LeaseMismatch
            | ClientError::Unauthorized
            | ClientError::InvalidInput(_) => false,
        }
    }

    /// How long to wait before trying again, when the error says so (an open breaker
    /// or rate limiting).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ClientError::CircuitOpen(e) => Some(e.retry_after),
            ClientError::RateLimited(e) => Some(e.retry_after),
            _ => None,
        }
    }

    /// Maps an error of the tower stack by downcasting.
    pub(crate) fn from_stack(e: BoxError) -> ClientError {
        let e = match e.downcast::<CircuitOpen>() {
            Ok(open) => return ClientError::CircuitOpen(*open),
            Err(e) => e,
        };
        let e = match e.downcast::<RateLimited>() {
            Ok(limited) => return ClientError::RateLimited(*limited),
            Err(e) => e,
        };
        if e.is::<tower::timeout::error::Elapsed>() {
            return ClientError::Timeout;
        }
        ClientError::Transport(e)
    }

    /// Maps a non-success reply.
    pub(crate) fn from_reply(status: StatusCode, headers: &HeaderMap, body: &Bytes) -> ClientError {
        let parsed: Option<ErrorBody> = serde_json::from_slice(body).ok();
        match status {
            StatusCode::UNAUTHORIZED => ClientError::Unauthorized,
            StatusCode::NOT_FOUND => ClientError::NotFound,
            StatusCode::CONFLICT => ClientError::LeaseMismatch,
            StatusCode::UNPROCESSABLE_ENTITY => ClientError::InvalidInput(match parsed {
                Some(b) => format!("{}: {}", b.error, b.message),
                None => "the server rejected the input (422)".to_owned(),
            }),
            StatusCode::TOO_MANY_REQUESTS => ClientError::RateLimited(RateLimited::new(
                // The server always sends Retry-After with a 429; one second is the
                // smallest value it can send, so it is the least surprising fallback.
                retry_after(headers).unwrap_or(Duration::from_secs(1)),
            )),
            _ => match parsed {
                Some(b) => ClientError::Server {
                    status: status.as_u16(),
                    code: b.error,
                    message: b.message,
                },
                None => ClientError::Server {
                    status: status.as_u16(),
                    code: format!("http_{}", status.as_u16()),
                    message: snippet(body),
                },
            },
        }
    }

    /// A success reply whose body is not what the API promises.
    pub(crate) fn invalid_response(status: StatusCode, err: &serde_json::Error) -> ClientError {
        ClientError::Server {
            status: status.as_u16(),
            code: "invalid_response".to_owned(),
            message: format!("the reply body does not match the API: {err}"),
        }
    }
}

/// `Retry-After` in delta-seconds (the only form the presence server sends).
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let secs: u64 = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs))
}

/// The start of a non-JSON error body, for the message; bounded so a proxy's HTML
/// error page does not end up whole in a log line.
fn snippet(body: &Bytes) -> String {
    const MAX: usize = 200;
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.chars().count() <= MAX {
        text.to_owned()
    } else {
        let mut s: String = text.chars().take(MAX).collect();
        s.push_str("...");
        s
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::CircuitOpen(e) => write!(f, "presence client: {e}"),
            ClientError::RateLimited(e) => write!(f, "presence client: {e}"),
            ClientError::NotFound => f.write_str("presence: not found (the node is not online)"),
            ClientError::LeaseMismatch => f.write_str(
                "presence: lease mismatch (the node logged in again elsewhere; this lease is dead)",
            ),
            ClientError::Unauthorized => {
                f.write_str("presence: unauthorized (bearer token missing or wrong)")
            }
            ClientError::Server {
                status,
                code,
                message,
            } => write!(f, "presence server error {status} {code}: {message}"),
            ClientError::Transport(e) => write!(f, "presence transport error: {e}"),
            ClientError::Timeout => f.write_str("presence request timed out"),
            ClientError::InvalidInput(m) => write!(f, "presence: invalid input: {m}"),
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientError::CircuitOpen(e) => Some(e),
            ClientError::RateLimited(e) => Some(e),
            ClientError::Transport(e) => Some(e.as_ref()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_statuses() {
        let h = HeaderMap::new();
        let body = Bytes::from_static(br#"{"error":"store_unavailable","message":"slow"}"#);
        assert!(matches!(
            ClientError::from_reply(StatusCode::CONFLICT, &h, &body),
            ClientError::LeaseMismatch
        ));
        match ClientError::from_reply(StatusCode::SERVICE_UNAVAILABLE, &h, &body) {
            ClientError::Server {
                status,
                code,
                message,
            } => {
                assert_eq!(
                    (status, code.as_str(), message.as_str()),
                    (503, "store_unavailable", "slow")
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        let html = Bytes::from_static(b"<html>bad gateway</html>");
        match ClientError::from_reply(StatusCode::BAD_GATEWAY, &h, &html) {
            ClientError::Server { code, message, .. } => {
                assert_eq!(code, "http_502");
                assert_eq!(message, "<html>bad gateway</html>");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn maps_429_with_retry_after() {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::RETRY_AFTER,
            http::HeaderValue::from_static("7"),
        );
        match ClientError::from_reply(StatusCode::TOO_MANY_REQUESTS, &h, &Bytes::new()) {
            ClientError::RateLimited(r) => assert_eq!(r.retry_after, Duration::from_secs(7)),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn maps_stack_errors_by_type() {
        let open: BoxError = Box::new(CircuitOpen::new(Duration::from_secs(2)));
        assert!(matches!(
            ClientError::from_stack(open),
            ClientError::CircuitOpen(_)
        ));
        let elapsed: BoxError = Box::new(tower::timeout::error::Elapsed::new());
        assert!(matches!(
            ClientError::from_stack(elapsed),
            ClientError::Timeout
        ));
        let other: BoxError = "connection refused".into();
        assert!(matches!(
            ClientError::from_stack(other),
            ClientError::Transport(_)
        ));
    }
}
