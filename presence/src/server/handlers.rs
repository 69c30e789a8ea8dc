//! The request handlers and the innermost service, [`Router`], that runs them for
//! the action [`Resolved`] found.

use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{HeaderValue, LINK};
use http::{Method, StatusCode};
use serde::Serialize;
use tower::Service;

use super::errors::{bytes_response, json_response, ApiError};
use super::jwt::Access;
use super::list::{list_response, Listing};
use super::params::{self, Params, Route};
use super::request::{parse_json, read_body, read_json};
use super::routes::{Endpoint, Resolved};
use super::store_call::State;
use super::{RequestBody, ResponseBody};
use crate::model::{
    try_new_lease_id, InvalidStatus, LoginResponse, LogoutResponse, Meta, NodeId, Status,
};
use crate::wire::{heartbeat_reply, plain_heartbeat, HeartbeatWire, LoginWire, LogoutWire};

/// A node id as it stands in a path segment, percent-decoded (`svc%40host%3A7000` is
/// `svc@host:7000`, as `encodeURIComponent` writes it). What decoding yields is then
/// validated like any id, so `%2F` is an invalid id, never a path separator (and bytes
/// that are not UTF-8 become U+FFFD, an invalid character too).
fn decode_node_id(segment: &str) -> Cow<'_, str> {
    percent_encoding::percent_decode_str(segment).decode_utf8_lossy()
}

impl State {
    async fn handle(
        self: &Arc<Self>,
        action: Endpoint,
        req: http::Request<RequestBody>,
    ) -> Result<http::Response<ResponseBody>, ApiError> {
        let (parts, body) = req.into_parts();
        let access = super::auth::access(&parts.extensions);
        if matches!(
            action,
            Endpoint::List | Endpoint::Watch | Endpoint::Stats | Endpoint::Node
        ) && !access.can_read()
        {
            return Err(ApiError::Forbidden(
                "the token does not allow reading (scope presence:read)".to_owned(),
            ));
        }
        match action {
            Endpoint::Healthz => Ok(json_response(StatusCode::OK, &Health { status: "ok" })),
            Endpoint::Readyz => {
                self.guarded(None, |s| s.ping()).await?;
                Ok(json_response(StatusCode::OK, &Health { status: "ready" }))
            }
            Endpoint::Metrics => Ok(bytes_response(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                Bytes::from(self.metrics.encode()),
            )),
            Endpoint::List => match params::parse(parts.uri.query(), Route::List)? {
                // The plain listing: shared by concurrent requests (see `list`).
                None => {
                    let list = self.list.list(self).await?;
                    self.metrics.set_online_nodes(list.json.count);
                    Ok(list_response(list))
                }
                Some(params) => self.query_listing(parts.uri.path(), &params).await,
            },
            Endpoint::Watch => super::watch::respond(self, &parts).await,
            Endpoint::Root => Ok(super::ui::redirect()),
            Endpoint::Ui | Endpoint::UiScript | Endpoint::UiStyle => {
                super::ui::asset(action, &parts.headers).ok_or_else(|| {
                    ApiError::Internal(format!("{action:?} has no file of the page"))
                })
            }
            Endpoint::Stats => {
                let stats = self.guarded(None, |s| s.stats()).await?;
                Ok(json_response(StatusCode::OK, &stats))
            }
            Endpoint::Node => {
                let id = decode_node_id(
                    parts
                        .uri
                        .path()
                        .get("/presence/".len()..)
                        .unwrap_or_default(),
                );
                let node = NodeId::parse(&id).map_err(ApiError::InvalidNodeId)?;
                match self.guarded(Some(&node), |s| s.get(&node)).await? {
                    Some(found) => Ok(json_response(StatusCode::OK, &found)),
                    None => Err(ApiError::NodeNotFound(node.into_string())),
                }
            }
            Endpoint::Login => {
                let req: LoginWire = read_json(&parts.headers, body, self.body_timeout).await?;
                let node = NodeId::parse(&req.node_id).map_err(ApiError::InvalidNodeId)?;
                may_write(access, &node)?;
                let meta = self.check_meta(req.meta)?.unwrap_or_default();
                let status = check_status(req.status)?.unwrap_or_default();
                let lease_id = try_new_lease_id()
                    .map_err(|e| ApiError::Internal(format!("OS random source failed: {e}")))?;
                let outcome = self
                    .guarded(Some(&node), |s| {
                        s.login_with(&node, &lease_id, self.ttl_ms, meta, status)
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
            Endpoint::Heartbeat => self.heartbeat(&parts.headers, access, body).await,
            Endpoint::Logout => {
                let req: LogoutWire = read_json(&parts.headers, body, self.body_timeout).await?;
                let node = NodeId::parse(&req.node_id).map_err(ApiError::InvalidNodeId)?;
                may_write(access, &node)?;
                let removed = self
                    .guarded(Some(&node), |s| s.logout(&node, &req.lease_id))
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
        access: &Access,
        body: RequestBody,
    ) -> Result<http::Response<ResponseBody>, ApiError> {
        let bytes = read_body(headers, body, self.body_timeout).await?;
        let req: HeartbeatWire<'_> = match plain_heartbeat(&bytes) {
            Some(req) => req,
            None => parse_json(&bytes)?,
        };
        let node = NodeId::parse(&req.node_id).map_err(ApiError::InvalidNodeId)?;
        may_write(access, &node)?;
        let meta = self.check_meta(req.meta)?;
        let status = check_status(req.status)?;
        let expires_at_ms = self
            .guarded(Some(&node), |s| {
                s.heartbeat_with(&node, &req.lease_id, self.ttl_ms, meta, status)
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

impl State {
    /// `GET /presence` with filter or page parameters: one store query (not shared
    /// with other requests: each asks for its own page), with the feed's cursor from
    /// before it, and a `Link` to the next page when there is one.
    async fn query_listing(
        self: &Arc<Self>,
        path: &str,
        params: &Params,
    ) -> Result<http::Response<ResponseBody>, ApiError> {
        // Taken before the store is read, as the plain listing does: watching from
        // it misses nothing that changed after the page was read.
        let cursor = self.store.feed_cursor().map(|c| c.encode());
        let page = self.guarded(None, |s| s.query_json(&params.query)).await?;
        let mut response = list_response(Listing {
            cursor,
            json: page.json,
        });
        if let Some(next_after) = page.next_after {
            // Every byte of the link is percent-encoded ASCII or a node id given by
            // the store; a value that still fails to be a header is left out, which
            // only ends the paging early, rather than failing the page.
            if let Ok(link) = HeaderValue::try_from(params.next_link(path, &next_after)) {
                response.headers_mut().insert(LINK, link);
            }
        }
        Ok(response)
    }
}

/// The status of a login or heartbeat body: `null` or absent is none, a string must
/// be `up`, `degraded` or `draining`; anything else is a `422 invalid_status`.
fn check_status(status: Option<serde_json::Value>) -> Result<Option<Status>, ApiError> {
    match status {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => s.parse().map(Some).map_err(ApiError::InvalidStatus),
        // A number, boolean, array or object: named by its JSON text.
        Some(other) => Err(ApiError::InvalidStatus(InvalidStatus(
            other.to_string().chars().take(64).collect(),
        ))),
    }
}

/// `403` unless `access` may write `node`.
fn may_write(access: &Access, node: &NodeId) -> Result<(), ApiError> {
    if access.can_write(node.as_str()) {
        Ok(())
    } else {
        Err(ApiError::Forbidden(format!(
            "the token does not allow writing node {:?} (scope presence:write for its sub, or presence:admin)",
            node.as_str()
        )))
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

/// The body of `/healthz` and `/readyz`.
#[derive(Serialize)]
struct Health {
    status: &'static str,
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
        let action = Resolved::from_request(&req).action(req.method(), req.uri().path());
        let action = match action {
            Ok(action) => action,
            Err(e) => return Box::pin(std::future::ready(Ok(e.into_response()))),
        };
        // A heartbeat gets a future of its own: the one of `handle` is sized for the
        // largest route, and every request would move all of it into its box.
        if action == Endpoint::Heartbeat {
            return Box::pin(async move {
                let (parts, body) = req.into_parts();
                let access = super::auth::access(&parts.extensions);
                Ok(state
                    .heartbeat(&parts.headers, access, body)
                    .await
                    .unwrap_or_else(ApiError::into_response))
            });
        }
        let head = req.method() == Method::HEAD;
        Box::pin(async move {
            let res = state
                .handle(action, req)
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
