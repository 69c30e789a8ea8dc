//! Routing and the request handlers.
//!
//! Routing is one `match` on the path and the method: the API has eight fixed routes
//! and one path parameter, which a `match` expresses completely and readably, with
//! `404` vs `405` + `Allow` decided in the same place. A router crate would add a
//! dependency (and its own error responses to re-map into our JSON shape) for no gain.
//!
//! `login`, `heartbeat`, `logout`, `watch` and `stats` are reserved node ids
//! ([`RESERVED_NODE_IDS`](crate::model::RESERVED_NODE_IDS)): a `GET` on
//! `/presence/login` resolves as a node lookup and answers `422 invalid_node_id`
//! saying the id is reserved; a `POST` is the action.

use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use resilience::circuit_breaker::CircuitBreaker;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tower::Service;

use super::deadline::{deadline, TimedOut};
use super::errors::{bytes_response, json_response, ApiError};
use super::list::{list_response, ListCoalescer};
use super::metrics::{Metrics, StoreErrorKind};
use super::outage::OutageTracker;
use super::{RequestBody, ResponseBody};
use crate::model::{try_new_lease_id, LoginResponse, LogoutResponse, Meta, NodeId};
use crate::store::json::write_u64;
use crate::store::{Store, StoreError};

/// A matched route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Route<'a> {
    Login,
    Heartbeat,
    Logout,
    List,
    Get(&'a str),
    Healthz,
    Readyz,
    Metrics,
}

// `HEAD` is served wherever `GET` is (RFC 9110 9.3.2): the same status and headers,
// no body. Load balancers' health probes often use it.
const GET: &str = "GET, HEAD";
const GET_POST: &str = "GET, HEAD, POST";

/// The routing table: the route for `method` + `path`, or the `404` / `405` error.
pub(crate) fn resolve<'a>(method: &Method, path: &'a str) -> Result<Route<'a>, ApiError> {
    let (route, allow) = match path {
        "/healthz" => (method_is(method, Method::GET, Route::Healthz), GET),
        "/readyz" => (method_is(method, Method::GET, Route::Readyz), GET),
        "/metrics" => (method_is(method, Method::GET, Route::Metrics), GET),
        "/presence" => (method_is(method, Method::GET, Route::List), GET),
        "/presence/login" | "/presence/heartbeat" | "/presence/logout" => {
            let action = match path {
                "/presence/login" => Route::Login,
                "/presence/heartbeat" => Route::Heartbeat,
                _ => Route::Logout,
            };
            let route = match *method {
                Method::POST => Some(action),
                Method::GET | Method::HEAD => Some(Route::Get(&path["/presence/".len()..])),
                _ => None,
            };
            (route, GET_POST)
        }
        _ => match path.strip_prefix("/presence/") {
            // One path segment only: `/presence/a/b` is no route, not node "a/b".
            Some(id) if !id.contains('/') => (method_is(method, Method::GET, Route::Get(id)), GET),
            _ => {
                return Err(ApiError::RouteNotFound {
                    method: method.clone(),
                    path: path.to_owned(),
                })
            }
        },
    };
    route.ok_or(ApiError::MethodNotAllowed { allow })
}

fn method_is<'a>(method: &Method, expected: Method, route: Route<'a>) -> Option<Route<'a>> {
    let head_of_get = expected == Method::GET && *method == Method::HEAD;
    (*method == expected || head_of_get).then_some(route)
}

/// A node id as it stands in a path segment, percent-decoded (`svc%40host%3A7000` is
/// `svc@host:7000`, as `encodeURIComponent` writes it). What decoding yields is then
/// validated like any id, so `%2F` is an invalid id, never a path separator (and bytes
/// that are not UTF-8 become U+FFFD, an invalid character too).
fn decode_node_id(segment: &str) -> Cow<'_, str> {
    percent_encoding::percent_decode_str(segment).decode_utf8_lossy()
}

/// The metrics label of a request: its route template, `unmatched` if there is none.
pub(crate) fn route_label(method: &Method, path: &str) -> &'static str {
    match resolve(method, path) {
        Ok(route) => route.label(),
        // Wrong method on a known path: label by the path, whichever method was used.
        Err(ApiError::MethodNotAllowed { .. }) => match path {
            "/healthz" => "/healthz",
            "/readyz" => "/readyz",
            "/metrics" => "/metrics",
            "/presence" => "/presence",
            "/presence/login" => "/presence/login",
            "/presence/heartbeat" => "/presence/heartbeat",
            "/presence/logout" => "/presence/logout",
            _ => "/presence/{node_id}",
        },
        Err(_) => "unmatched",
    }
}

impl Route<'_> {
    fn label(self) -> &'static str {
        match self {
            Route::Login => "/presence/login",
            Route::Heartbeat => "/presence/heartbeat",
            Route::Logout => "/presence/logout",
            Route::List => "/presence",
            Route::Get(_) => "/presence/{node_id}",
            Route::Healthz => "/healthz",
            Route::Readyz => "/readyz",
            Route::Metrics => "/metrics",
        }
    }
}

/// Whether `path` is under `/presence` (authenticated, rate limited, body limited).
pub(crate) fn is_presence_path(path: &str) -> bool {
    path == "/presence" || path.starts_with("/presence/")
}

/// Everything the handlers share. One per [`PresenceService`](super::PresenceService).
pub(crate) struct State {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) breaker: CircuitBreaker,
    pub(crate) outage: Arc<OutageTracker>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) store_timeout: Duration,
    /// How long a request body may take to arrive (`408` after it).
    pub(crate) body_timeout: Duration,
    pub(crate) ttl_ms: u64,
    pub(crate) heartbeat_ms: u64,
    pub(crate) max_meta_bytes: usize,
    /// Batches concurrent `GET /presence` into shared listings.
    pub(crate) list: ListCoalescer,
}

/// How long a client should wait after a store failure that was not a breaker
/// rejection (the breaker knows better when it will let calls through again).
const STORE_RETRY_AFTER: Duration = Duration::from_secs(1);

impl State {
    /// Runs one store call under the store timeout and the circuit breaker.
    ///
    /// `NotFound` and `LeaseMismatch` are answers, so they count as breaker successes;
    /// so does `Refused` (Redis out of memory or read-only: it still answers reads,
    /// so the breaker must not take reads and `/readyz` down with the writes). Only
    /// `Unavailable` and timeouts are failures. `node` names the node in a
    /// `404` message. After an outage, the first call gives the outage back to the
    /// leases ([`OutageTracker`]) before its own call, within the same timeout.
    pub(crate) async fn guarded<'s, T, F>(
        &'s self,
        node: &str,
        call: impl FnOnce(&'s dyn Store) -> F,
    ) -> Result<T, ApiError>
    where
        F: Future<Output = Result<T, StoreError>> + 's,
    {
        let permit = match self.breaker.try_acquire() {
            Ok(permit) => permit,
            Err(open) => {
                self.metrics.record_store_error(StoreErrorKind::CircuitOpen);
                return Err(ApiError::StoreUnavailable {
                    retry_after: open.retry_after,
                });
            }
        };
        // The store is only asked once the breaker has admitted the call.
        let attempt = async {
            if self.outage.pending() {
                self.outage.recover(&self.store).await?;
            }
            call(&*self.store).await
        };
        let attempt = deadline(self.store_timeout, attempt);
        tokio::pin!(attempt);
        let outcome = attempt.as_mut().await;
        let (result, kind) = match outcome {
            Ok(Ok(value)) => (Ok(value), None),
            Ok(Err(StoreError::NotFound)) => (Err(ApiError::NodeNotFound(node.to_owned())), None),
            Ok(Err(StoreError::LeaseMismatch)) => (Err(ApiError::LeaseMismatch), None),
            Ok(Err(StoreError::Refused(why))) => {
                self.metrics.record_store_error(StoreErrorKind::Refused);
                (Err(ApiError::StoreRefused(why)), None)
            }
            Ok(Err(StoreError::Unavailable(why))) => {
                tracing::warn!(reason = %why, "store call failed");
                (
                    Err(ApiError::StoreUnavailable {
                        retry_after: STORE_RETRY_AFTER,
                    }),
                    Some(StoreErrorKind::Unavailable),
                )
            }
            Err(TimedOut { .. }) => {
                tracing::warn!(timeout = ?self.store_timeout, "store call timed out");
                (
                    Err(ApiError::StoreUnavailable {
                        retry_after: STORE_RETRY_AFTER,
                    }),
                    Some(StoreErrorKind::Timeout),
                )
            }
        };
        match kind {
            None => permit.success(),
            Some(kind) => {
                self.metrics.record_store_error(kind);
                // A call that failed at its first poll started just now.
                let started = attempt
                    .as_ref()
                    .armed_at()
                    .unwrap_or_else(tokio::time::Instant::now);
                self.outage.failed(started);
                permit.failure();
            }
        }
        result
    }

    async fn handle(
        self: &Arc<Self>,
        req: http::Request<RequestBody>,
    ) -> Result<http::Response<ResponseBody>, ApiError> {
        let (parts, body) = req.into_parts();
        match resolve(&parts.method, parts.uri.path())? {
            Route::Healthz => Ok(json_response(StatusCode::OK, &Status { status: "ok" })),
            Route::Readyz => {
                self.guarded("", |s| s.ping()).await?;
                Ok(json_response(StatusCode::OK, &Status { status: "ready" }))
            }
            Route::Metrics => Ok(bytes_response(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                Bytes::from(self.metrics.encode()),
            )),
            Route::List => {
                let list = self.list.list(self).await?;
                self.metrics.set_online_nodes(list.count);
                Ok(list_response(list))
            }
            Route::Get(id) => {
                let id = decode_node_id(id);
                let node = NodeId::parse(&id).map_err(ApiError::InvalidNodeId)?;
                match self.guarded(&id, |s| s.get(&node)).await? {
                    Some(found) => Ok(json_response(StatusCode::OK, &found)),
                    None => Err(ApiError::NodeNotFound(node.into_string())),
                }
            }
            Route::Login => {
                let req: LoginWire = read_json(&parts.headers, body, self.body_timeout).await?;
                let node = NodeId::parse(&req.node_id).map_err(ApiError::InvalidNodeId)?;
                let meta = self.check_meta(req.meta)?.unwrap_or_default();
                let lease_id = try_new_lease_id()
                    .map_err(|e| ApiError::Internal(format!("OS random source failed: {e}")))?;
                let outcome = self
                    .guarded(&req.node_id, |s| {
                        s.login(&node, &lease_id, self.ttl_ms, meta)
                    })
                    .await?;
                Ok(json_response(
                    StatusCode::OK,
                    &LoginResponse {
                        node_id: node.into_string(),
                        lease_id,
                        ttl_ms: self.ttl_ms,
                        heartbeat_ms: self.heartbeat_ms,
                        expires_at_ms: outcome.expires_at_ms,
                    },
                ))
            }
            Route::Heartbeat => self.heartbeat(&parts.headers, body).await,
            Route::Logout => {
                let req: LogoutWire = read_json(&parts.headers, body, self.body_timeout).await?;
                let node = NodeId::parse(&req.node_id).map_err(ApiError::InvalidNodeId)?;
                let removed = self
                    .guarded(&req.node_id, |s| s.logout(&node, &req.lease_id))
                    .await?;
                Ok(json_response(
                    StatusCode::OK,
                    &LogoutResponse {
                        node_id: node.into_string(),
                        removed,
                    },
                ))
            }
        }
    }

    /// `POST /presence/heartbeat`, the hot path: its own future (see [`Router`]), ids
    /// borrowed from the body rather than copied, and the body every client sends
    /// taken apart without a JSON parser.
    async fn heartbeat(
        &self,
        headers: &http::HeaderMap,
        body: RequestBody,
    ) -> Result<http::Response<ResponseBody>, ApiError> {
        let bytes = read_body(headers, body, self.body_timeout).await?;
        let req: HeartbeatWire<'_> = match plain_heartbeat(&bytes) {
            Some(req) => req,
            None => parse_json(&bytes)?,
        };
        let node = NodeId::parse(&req.node_id).map_err(ApiError::InvalidNodeId)?;
        let meta = self.check_meta(req.meta)?;
        let expires_at_ms = self
            .guarded(&req.node_id, |s| {
                s.heartbeat(&node, &req.lease_id, self.ttl_ms, meta)
            })
            .await?;
        Ok(bytes_response(
            StatusCode::OK,
            "application/json",
            heartbeat_reply(node.as_str(), &req.lease_id, expires_at_ms),
        ))
    }

    /// `meta` must be a JSON object (`null` or absent means "none") of at most
    /// `max_meta_bytes` serialized.
    fn check_meta(&self, meta: Option<serde_json::Value>) -> Result<Option<Meta>, ApiError> {
        let meta = match meta {
            None | Some(serde_json::Value::Null) => return Ok(None),
            Some(serde_json::Value::Object(map)) => map,
            Some(_) => {
                return Err(ApiError::InvalidMeta(
                    "meta must be a JSON object".to_owned(),
                ))
            }
        };
        let mut size = ByteCounter(0);
        // Serializing a `Value` into a counting writer cannot fail; if it ever did,
        // treating the meta as invalid is the safe side.
        if serde_json::to_writer(&mut size, &meta).is_err() || size.0 > self.max_meta_bytes {
            return Err(ApiError::InvalidMeta(format!(
                "meta is {} bytes serialized; at most {} are allowed",
                size.0, self.max_meta_bytes
            )));
        }
        Ok(Some(meta))
    }
}

/// Counts the bytes written to it (the serialized size of meta, without allocating it).
struct ByteCounter(usize);

impl std::io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 = self.0.saturating_add(buf.len());
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[derive(Serialize)]
struct Status {
    status: &'static str,
}

// The wire types of the POST bodies. `meta` is a raw `Value` here (not the model's
// `Option<Meta>`) so that a non-object meta is a `422 invalid_meta`, as
// docs/http-api.md says, rather than a `400` from the deserializer.
#[derive(Deserialize)]
struct LoginWire {
    node_id: String,
    #[serde(default)]
    meta: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct HeartbeatWire<'a> {
    #[serde(borrow)]
    node_id: Cow<'a, str>,
    #[serde(borrow)]
    lease_id: Cow<'a, str>,
    #[serde(default)]
    meta: Option<serde_json::Value>,
}

/// A heartbeat body of exactly the form the SDK (and any `serde_json` client)
/// sends, `{"node_id":"<id>","lease_id":"<lease>"}` with no escapes, no whitespace
/// and no meta, taken apart by hand; `None` for anything else, which the JSON parser
/// then reads (and judges). For the bodies it accepts, the result is what the parser
/// would give (a property test checks this).
fn plain_heartbeat(body: &[u8]) -> Option<HeartbeatWire<'_>> {
    let inner = body
        .strip_prefix(br#"{"node_id":""#)?
        .strip_suffix(br#""}"#)?;
    // The node id is the short part: it ends at the first quote.
    let end = inner.iter().position(|&b| b == b'"')?;
    let (node_id, rest) = inner.split_at(end);
    let lease_id = rest.strip_prefix(br#"","lease_id":""#)?;
    // No quote in the lease either, so the `"}` stripped above closed it.
    if !plain_json_text(node_id) || !plain_json_text(lease_id) {
        return None;
    }
    Some(HeartbeatWire {
        node_id: Cow::Borrowed(std::str::from_utf8(node_id).ok()?),
        lease_id: Cow::Borrowed(std::str::from_utf8(lease_id).ok()?),
        meta: None,
    })
}

/// Whether `s` is the same inside a JSON string as outside: no quote, no backslash,
/// no control character. Without an early exit, so the loop runs on whole words.
fn plain_json_text(s: &[u8]) -> bool {
    s.iter().fold(true, |plain, &b| {
        plain & (b >= 0x20) & (b != b'"') & (b != b'\\')
    })
}

/// The [`HeartbeatResponse`](crate::model::HeartbeatResponse) JSON, written by hand
/// into a buffer of exactly its size (so `Bytes` takes it without another
/// allocation): every heartbeat answers with it. The node id never needs escaping
/// (see [`NodeId`]); the lease does only if the client sent an odd one.
fn heartbeat_reply(node_id: &str, lease_id: &str, expires_at_ms: u64) -> Bytes {
    if !plain_json_text(lease_id.as_bytes()) {
        return match serde_json::to_vec(&crate::model::HeartbeatResponse {
            node_id: node_id.to_owned(),
            lease_id: lease_id.to_owned(),
            expires_at_ms,
        }) {
            Ok(json) => Bytes::from(json),
            // A struct of strings and a number always serializes.
            Err(_) => Bytes::from_static(b"{}"),
        };
    }
    let head: [&[u8]; 5] = [
        br#"{"node_id":""#,
        node_id.as_bytes(),
        br#"","lease_id":""#,
        lease_id.as_bytes(),
        br#"","expires_at_ms":"#,
    ];
    let digits = expires_at_ms.checked_ilog10().map_or(1, |d| d as usize + 1);
    let mut out = Vec::with_capacity(head.iter().map(|p| p.len()).sum::<usize>() + digits + 1);
    for part in head {
        out.extend_from_slice(part);
    }
    write_u64(&mut out, expires_at_ms);
    out.push(b'}');
    Bytes::from(out)
}

#[derive(Deserialize)]
struct LogoutWire {
    node_id: String,
    lease_id: String,
}

/// The request's body framing and type, or the `415` that says what is wrong: one
/// `Content-Type` of `application/json` or any `application/*+json`
/// (case-insensitive), in UTF-8 (no `charset`, or `charset=utf-8`), and no transfer
/// coding but `chunked` (a `gzip` body would otherwise be read as if it were JSON).
fn check_json_content(headers: &http::HeaderMap) -> Result<(), ApiError> {
    let refuse = |why: &str| Err(ApiError::UnsupportedMediaType(why.to_owned()));
    let mut types = headers.get_all(CONTENT_TYPE).iter();
    let value = match (types.next(), types.next()) {
        (Some(value), None) => value,
        (None, _) => {
            return refuse("the request body must be JSON (`Content-Type: application/json`)")
        }
        (Some(_), Some(_)) => return refuse("the request has more than one `Content-Type`"),
    };
    if let Some(coding) = headers.get(http::header::TRANSFER_ENCODING) {
        if !coding.as_bytes().eq_ignore_ascii_case(b"chunked") {
            return refuse("no transfer coding but `chunked` is supported");
        }
    }
    // What every heartbeat carries, compared as it is.
    if value.as_bytes() == b"application/json" {
        return Ok(());
    }
    let mut parts = value.to_str().unwrap_or_default().split(';');
    let essence = parts.next().unwrap_or_default().trim();
    // Compared in place: every heartbeat passes through here.
    let is_json = essence
        .get(.."application/".len())
        .filter(|t| t.eq_ignore_ascii_case("application/"))
        .map(|t| &essence[t.len()..])
        .is_some_and(|subtype| {
            subtype.eq_ignore_ascii_case("json")
                || subtype
                    .len()
                    .checked_sub("+json".len())
                    .and_then(|at| subtype.get(at..))
                    .is_some_and(|tail| tail.eq_ignore_ascii_case("+json"))
        });
    if !is_json {
        return refuse("the request body must be JSON (`Content-Type: application/json`)");
    }
    let utf8 = parts.all(|param| match param.split_once('=') {
        Some((name, value)) if name.trim().eq_ignore_ascii_case("charset") => {
            let value = value.trim();
            let value = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(value);
            value.eq_ignore_ascii_case("utf-8") || value.eq_ignore_ascii_case("utf8")
        }
        _ => true,
    });
    if utf8 {
        Ok(())
    } else {
        refuse("the request body must be UTF-8 JSON (no `charset` other than `utf-8`)")
    }
}

/// Checks the content type (`415`), reads the body (`413` over the limit) and
/// deserializes it (`400`).
async fn read_json<T: DeserializeOwned>(
    headers: &http::HeaderMap,
    body: RequestBody,
    timeout: Duration,
) -> Result<T, ApiError> {
    let bytes = read_body(headers, body, timeout).await?;
    parse_json(&bytes)
}

/// Checks the content type (`415`) and reads the body (`413` past
/// the body's limit (default [`MAX_BODY_BYTES`](super::MAX_BODY_BYTES)), `408` if it has not arrived within `timeout`: a client that
/// trickles its body).
///
/// A body that arrives as one piece (as a small request body does) is taken as it
/// is, without the buffer list of `collect`; and if it is there already, no timer is
/// set at all (see [`deadline`]).
async fn read_body(
    headers: &http::HeaderMap,
    body: RequestBody,
    timeout: Duration,
) -> Result<Bytes, ApiError> {
    check_json_content(headers)?;
    deadline(timeout, collect_body(body))
        .await
        .unwrap_or(Err(ApiError::RequestTimeout))
}

/// The body's bytes (`413` past its [`limit`](RequestBody::limit)).
pub(crate) async fn collect_body(mut body: RequestBody) -> Result<Bytes, ApiError> {
    let limit = body.limit();
    let mut first: Option<Bytes> = None;
    let mut rest: Vec<u8> = Vec::new();
    let mut read = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|e| ApiError::BadRequest(format!("could not read the request body: {e}")))?;
        // Trailers carry nothing a JSON body needs.
        let Ok(data) = frame.into_data() else {
            continue;
        };
        // A body without a declared length (chunked) stops here; a declared one over
        // the limit was refused before it was read (`BodyLimit`).
        read = read.saturating_add(data.len());
        if read > limit {
            return Err(ApiError::PayloadTooLarge { limit });
        }
        match &first {
            None => first = Some(data),
            Some(head) => {
                if rest.is_empty() {
                    rest.extend_from_slice(head);
                }
                rest.extend_from_slice(&data);
            }
        }
    }
    Ok(if rest.is_empty() {
        first.unwrap_or_default()
    } else {
        Bytes::from(rest)
    })
}

/// Deserializes a request body (`400` if it is not the expected JSON object).
fn parse_json<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, ApiError> {
    // The hot path (heartbeats) deserializes straight into the wire type, without a
    // `serde_json::Value` tree in between; the first byte tells it is an object.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
        return serde_json::from_slice(bytes).map_err(|e| {
            ApiError::BadRequest(match e.classify() {
                serde_json::error::Category::Data => format!("invalid body: {e}"),
                _ => format!("the body is not valid JSON: {e}"),
            })
        });
    }
    // Not an object. Say whether it is JSON at all. (serde's derived structs would
    // also accept a JSON array of the fields in order; the API takes objects only.)
    serde_json::from_slice::<serde::de::IgnoredAny>(bytes)
        .map_err(|e| ApiError::BadRequest(format!("the body is not valid JSON: {e}")))?;
    Err(ApiError::BadRequest(
        "the body must be a JSON object".to_owned(),
    ))
}

/// The innermost service: routes and handles a request.
#[derive(Clone)]
pub(crate) struct Router {
    state: Arc<State>,
}

impl Router {
    pub(crate) fn new(state: Arc<State>) -> Self {
        Router { state }
    }
}

impl Service<http::Request<RequestBody>> for Router {
    type Response = http::Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<RequestBody>) -> Self::Future {
        let state = self.state.clone();
        // A heartbeat gets a future of its own: the one of `handle` is sized for the
        // largest route, and every request would move all of it into its box.
        if matches!(
            resolve(req.method(), req.uri().path()),
            Ok(Route::Heartbeat)
        ) {
            return Box::pin(async move {
                let (parts, body) = req.into_parts();
                Ok(state
                    .heartbeat(&parts.headers, body)
                    .await
                    .unwrap_or_else(ApiError::into_response))
            });
        }
        let head = req.method() == Method::HEAD;
        Box::pin(async move {
            let res = state
                .handle(req)
                .await
                .unwrap_or_else(ApiError::into_response);
            Ok(if head { without_body(res) } else { res })
        })
    }
}

/// The answer to a `HEAD`: the `GET` response's status and headers, its length as
/// `Content-Length`, no body. (hyper would drop the body on the wire by itself; an
/// in-process caller gets the same answer.)
fn without_body(res: http::Response<ResponseBody>) -> http::Response<ResponseBody> {
    use http_body::Body as _;
    let (mut parts, body) = res.into_parts();
    if let Some(len) = body.size_hint().exact() {
        parts
            .headers
            .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
    }
    http::Response::from_parts(parts, ResponseBody::full(Bytes::new()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(resolve(&Method::GET, "/presence"), Ok(Route::List));
        assert_eq!(resolve(&Method::POST, "/presence/login"), Ok(Route::Login));
        assert_eq!(
            resolve(&Method::GET, "/presence/login"),
            Ok(Route::Get("login"))
        );
        assert_eq!(
            resolve(&Method::GET, "/presence/n-1"),
            Ok(Route::Get("n-1"))
        );
        assert_eq!(resolve(&Method::GET, "/presence/"), Ok(Route::Get("")));
        assert!(matches!(
            resolve(&Method::GET, "/presence/a/b"),
            Err(ApiError::RouteNotFound { .. })
        ));
        assert_eq!(
            resolve(&Method::DELETE, "/presence/login"),
            Err(ApiError::MethodNotAllowed { allow: GET_POST })
        );
        assert_eq!(
            resolve(&Method::POST, "/presence/n-1"),
            Err(ApiError::MethodNotAllowed { allow: GET })
        );
    }

    #[test]
    fn labels_are_templates() {
        assert_eq!(
            route_label(&Method::GET, "/presence/n-1"),
            "/presence/{node_id}"
        );
        assert_eq!(
            route_label(&Method::PUT, "/presence/n-1"),
            "/presence/{node_id}"
        );
        assert_eq!(
            route_label(&Method::PUT, "/presence/login"),
            "/presence/login"
        );
        assert_eq!(route_label(&Method::GET, "/wp-admin"), "unmatched");
        assert_eq!(route_label(&Method::POST, "/healthz"), "/healthz");
    }

    #[test]
    fn plain_heartbeats_are_read_by_hand_and_the_rest_by_serde() {
        let ok = plain_heartbeat(br#"{"node_id":"n-1","lease_id":"abc"}"#).expect("plain");
        assert_eq!((&*ok.node_id, &*ok.lease_id), ("n-1", "abc"));
        for other in [
            &br#"{"node_id":"n","lease_id":"a","meta":{}}"#[..],
            br#"{ "node_id":"n","lease_id":"a"}"#,
            br#"{"lease_id":"a","node_id":"n"}"#,
            br#"{"node_id":"n\u0041","lease_id":"a"}"#,
            br#"{"node_id":"n","lease_id":"a"} "#,
            br#"{"node_id":"n","lease_id":"a""#,
            b"{\"node_id\":\"n\x01\",\"lease_id\":\"a\"}",
        ] {
            assert!(
                plain_heartbeat(other).is_none(),
                "{:?}",
                String::from_utf8_lossy(other)
            );
        }
    }

    proptest::proptest! {
        /// Whatever the hand reader accepts, serde reads the same way.
        #[test]
        fn plain_heartbeats_agree_with_serde(
            node in "[ -~]{0,12}|.{0,6}",
            lease in "[ -~]{0,40}|.{0,6}",
            tail in proptest::sample::select(vec!["}", "} ", ",\"x\":1}", ""]),
        ) {
            let body = format!(r#"{{"node_id":"{node}","lease_id":"{lease}"{tail}"#);
            if let Some(fast) = plain_heartbeat(body.as_bytes()) {
                let slow: HeartbeatWire<'_> = serde_json::from_str(&body).expect("valid JSON");
                proptest::prop_assert_eq!(&*fast.node_id, &*slow.node_id);
                proptest::prop_assert_eq!(&*fast.lease_id, &*slow.lease_id);
                proptest::prop_assert!(slow.meta.is_none());
            }
        }
    }

    #[test]
    fn heartbeat_replies_are_what_serde_writes() {
        for (id, lease, exp) in [
            ("n-1", "0123456789abcdef0123456789abcdef", 1_764_600_000_123),
            ("a", "", 0),
            ("b", "we\"ird\\lease\u{1}é", u64::MAX),
        ] {
            let expected = serde_json::to_vec(&crate::model::HeartbeatResponse {
                node_id: id.to_owned(),
                lease_id: lease.to_owned(),
                expires_at_ms: exp,
            })
            .unwrap();
            assert_eq!(heartbeat_reply(id, lease, exp), expected, "{lease:?}");
        }
    }

    #[test]
    fn json_content_types() {
        let h = |v: &str| {
            let mut m = http::HeaderMap::new();
            if let Ok(v) = http::HeaderValue::from_str(v) {
                m.insert(CONTENT_TYPE, v);
            }
            check_json_content(&m).is_ok()
        };
        assert!(h("application/json"));
        assert!(h("Application/JSON; charset=utf-8"));
        assert!(h("application/json; charset=\"UTF-8\""));
        assert!(h("application/merge-patch+json"));
        assert!(!h("text/plain"));
        assert!(!h("application/jsonx"));
        assert!(!h("application/json; charset=utf-16"));
        assert!(!h("application/json; charset=iso-8859-1"));
        assert!(check_json_content(&http::HeaderMap::new()).is_err());

        let mut two = http::HeaderMap::new();
        two.append(
            CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        two.append(CONTENT_TYPE, http::HeaderValue::from_static("text/plain"));
        assert!(check_json_content(&two).is_err());

        let mut gzip = http::HeaderMap::new();
        gzip.insert(
            CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        gzip.insert(
            http::header::TRANSFER_ENCODING,
            http::HeaderValue::from_static("gzip, chunked"),
        );
        assert!(check_json_content(&gzip).is_err());
        gzip.insert(
            http::header::TRANSFER_ENCODING,
            http::HeaderValue::from_static("chunked"),
        );
        assert!(check_json_content(&gzip).is_ok());
    }
}
