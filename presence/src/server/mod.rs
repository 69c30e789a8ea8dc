//! The presence HTTP server (the API is described in docs/http-api.md): a tower
//! service stack, and a hyper server that runs it.
//!
//! - [`PresenceService`]: the whole API as one `tower::Service<http::Request<B>>`;
//!   use it in-process (tests, or as a [`PresenceClient`](crate::client) transport),
//!   or mount it in your own hyper / axum server.
//! - [`Server`]: binds the configured address and serves the service over HTTP/1 and
//!   HTTP/2 with graceful shutdown; [`serve`] does bind + run in one call.
//!
//! The stack, outermost first:
//!
//! ```text
//! metrics (requests by route/method/status, latency) and a debug log line per request
//!                                                            -> GET /metrics
//! ├─ /healthz /readyz /metrics /ui* / (and unknown paths) ──┐
//! └─ /presence*: bearer auth (401)                           │
//!                token bucket per client IP (429 + Retry-After)
//!                16 KiB body limit (413)                     │
//!                router <────────────────────────────────────┘
//!                  -> body within PRESENCE_REQUEST_TIMEOUT_MS (408)
//!                  -> store, behind PRESENCE_STORE_TIMEOUT_MS and a circuit breaker (503)
//! ```
//!
//! Around the stack, [`Server`] closes connections that have had no request in
//! flight for `PRESENCE_HEADER_TIMEOUT_MS` (silent clients, half-sent heads, idle
//! keep-alive and HTTP/2 connections). Each phase of a request has one bound, and a
//! bound only costs a timer when the phase does not complete at once.
//!
//! When the store answers again after an outage, the first call gives the outage
//! back to the leases it interrupted before anything else reaches the store
//! ([self-preservation](crate::store#outages-self-preservation)), so the nodes do not
//! all expire at once.
//!
//! Every error is `{"error": code, "message": sentence}`, made by
//! [`ApiError::into_response`].

mod auth;
mod body;
mod deadline;
mod edge;
mod errors;
mod handlers;
mod jwt;
mod limit;
mod list;
mod metrics;
mod outage;
mod params;
mod request;
mod routes;
mod serve;
mod service;
mod store_call;
mod ui;
mod watch;

use bytes::Bytes;

pub use self::auth::{BearerAuth, BearerAuthLayer};
pub use self::body::{RequestBody, ResponseBody};
pub use self::errors::ApiError;
pub use self::jwt::{Access, InvalidToken, JwtVerifier, JWT_LEEWAY_SECS};
pub use self::limit::{BodyLimit, BodyLimitLayer};
pub use self::metrics::{Metrics, MetricsFuture, MetricsLayer, MetricsService, StoreErrorKind};
pub use self::serve::{serve, shutdown_signal, Server};
pub use self::service::{PresenceService, ResponseFuture};

/// Largest accepted request body on `/presence*` (16 KiB).
pub const MAX_BODY_BYTES: usize = 16 * 1024;

fn full(bytes: Bytes) -> ResponseBody {
    ResponseBody::full(bytes)
}
