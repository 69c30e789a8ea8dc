//! The watch feed: [`PresenceClient::watch`] streams the changes of the online set
//! from `GET {base}/watch` (server-sent events), reconnecting and resuming by itself.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), presence::client::ClientError> {
//! use futures_util::StreamExt;
//! use presence::client::{LeaveReason, PresenceClient, WatchEvent, Filter};
//!
//! // A stand-in for the server: one snapshot, one join, one leave, then the stream
//! // stays open. Over the network this is `PresenceClient::new(url)?` instead.
//! const FEED: &str = "\
//! id: c1\nevent: snapshot\ndata: {\"nodes\":[]}\n\n\
//! : keep-alive\n\n\
//! id: c2\nevent: join\ndata: {\"node_id\":\"n1\",\"meta\":{},\"online_since_ms\":1,\"last_seen_ms\":1,\"expires_at_ms\":9}\n\n\
//! id: c3\nevent: leave\ndata: {\"node_id\":\"n1\",\"reason\":\"logout\"}\n\n";
//! let server = tower::service_fn(|_req: http::Request<http_body_util::Full<bytes::Bytes>>| async {
//!     let body = http_body_util::StreamBody::new(
//!         futures_util::stream::iter([Ok::<_, std::convert::Infallible>(
//!             http_body::Frame::data(bytes::Bytes::from_static(FEED.as_bytes())),
//!         )])
//!         .chain(futures_util::stream::pending()),
//!     );
//!     let response = http::Response::builder()
//!         .header("content-type", "text/event-stream")
//!         .body(body)
//!         .unwrap();
//!     Ok::<_, std::convert::Infallible>(response)
//! });
//! let client = PresenceClient::builder("http://presence.test/presence")
//!     .service(server)
//!     .build()?;
//!
//! let mut watch = client.watch(Filter::all());
//! let first = watch.next().await.expect("the feed does not end")?;
//! assert_eq!(first.cursor, "c1");
//! assert!(matches!(first.event, WatchEvent::Snapshot(ref nodes) if nodes.is_empty()));
//! let join = watch.next().await.expect("the feed does not end")?;
//! assert!(matches!(join.event, WatchEvent::Join(ref n) if n.node_id == "n1"));
//! let leave = watch.next().await.expect("the feed does not end")?;
//! assert_eq!(
//!     leave.event,
//!     WatchEvent::Leave { node_id: "n1".into(), reason: LeaveReason::Logout }
//! );
//! # Ok(()) }
//! ```
//!
//! # What the stream yields
//!
//! `Ok(`[`WatchItem`]`)` for every event, with the event's cursor (its SSE `id`).
//! A [`WatchEvent::Snapshot`] means "replace everything you knew": it comes first on
//! a connection without a cursor, and again after a reconnect whose cursor the server
//! no longer holds, so a consumer that replaces its state on every snapshot and
//! applies the other events by node id is always right, across any gap.
//!
//! # Reconnecting
//!
//! When the stream ends (server shutdown, the server dropped a slow client), breaks
//! (a transport error, no byte for the [idle timeout]), or the request fails with a
//! transport error, a header timeout, `408`, `429` or any `5xx`, the feed connects
//! again by itself and sends the last cursor as `Last-Event-ID` (or as `?since=` if
//! the cursor cannot be a header value), so the server resumes where it left off.
//! The `n`-th reconnect in a row waits a random time in `[0, min(cap, base *
//! 2^(n-1))]` ("full jitter", [defaults] 100 ms and 5 s), and at least the
//! `Retry-After` of a `429` / `503` (and, after a stream that ended, at least the
//! stream's `retry:` field). The count starts again once a connection has delivered
//! a byte, so a feed that was up for a while reconnects quickly, while a server that
//! accepts and hangs up at once is backed off.
//!
//! Those failures are logged with `tracing` and never yielded: the stream yields an
//! `Err` only for what no reconnect fixes (`401` [`ClientError::Unauthorized`],
//! `404` [`ClientError::NotFound`], `422`, any other `4xx` or `3xx`, a `2xx` that is
//! not `text/event-stream`, a request that cannot be built), and then ends.
//!
//! An event of a known type whose data does not decode (a protocol mismatch) is not
//! skipped, as that would leave the consumer's state silently wrong: it is logged
//! and the feed reconnects *without* a cursor, so a fresh snapshot replaces whatever
//! was missed. Events of unknown types are skipped (and advance the cursor), so a
//! server may add types.
//!
//! The feed uses the client's transport (the injected service, or hyper-util's
//! client) with the bearer token, but not the breaker, retry, timeout and rate limit
//! layers of the API calls: it has its own backoff, and only the wait for the
//! response headers is bounded (by the client's [timeout]).
//!
//! [idle timeout]: super::PresenceClientBuilder::watch_idle_timeout
//! [defaults]: super::PresenceClientBuilder::watch_backoff
//! [timeout]: super::PresenceClientBuilder::timeout

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use http::header::{ACCEPT, CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderValue, Method, StatusCode};
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use tower::ServiceExt;

use super::error::retry_after;
use super::filter::Filter;
use super::retry::full_jitter;
use super::sse::{SseEvent, SseParser};
use super::transport::{read_body, StreamingBody};
use super::{lock, ClientError, PresenceClient};
use crate::model::Node;

/// The largest error body read from a failed `GET /watch` (for its message).
const MAX_ERROR_BODY: usize = 64 * 1024;

/// The name of the resume header.
const LAST_EVENT_ID: &str = "last-event-id";

/// One event of the feed with its cursor.
#[derive(Clone, Debug, PartialEq)]
pub struct WatchItem {
    /// The event's cursor (its SSE `id`; opaque). Give it to
    /// [`PresenceClient::watch_from`] to resume from here in another process.
    pub cursor: String,
    /// The event.
    pub event: WatchEvent,
}

/// A change of the online set (of the nodes that match the filter).
#[derive(Clone, Debug, PartialEq)]
pub enum WatchEvent {
    /// Every node that matches, now: replace everything known before (sent first on
    /// a new feed, and after a reconnect the server could not resume).
    Snapshot(Vec<Node>),
    /// A node came online (or started to match the filter).
    Join(Node),
    /// A node's record changed (heartbeat with new meta, status...).
    Update(Node),
    /// A node went away (or stopped matching the filter).
    Leave {
        /// The node's id.
        node_id: String,
        /// Why it left.
        reason: LeaveReason,
    },
}

impl WatchEvent {
    /// The node the event is about; `None` for a snapshot.
    pub fn node_id(&self) -> Option<&str> {
        match self {
            WatchEvent::Snapshot(_) => None,
            WatchEvent::Join(n) | WatchEvent::Update(n) => Some(&n.node_id),
            WatchEvent::Leave { node_id, .. } => Some(node_id),
        }
    }

    /// `true` for [`WatchEvent::Snapshot`] ("replace everything").
    pub fn is_snapshot(&self) -> bool {
        matches!(self, WatchEvent::Snapshot(_))
    }
}

/// Why a node left the feed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum LeaveReason {
    /// The node logged out.
    Logout,
    /// The node's lease expired (no heartbeat within its TTL).
    Expired,
    /// The node is still online but no longer matches the filter.
    Unmatched,
    /// A reason this client does not know yet (a newer server); the node left all
    /// the same.
    #[serde(other)]
    Other,
}

/// The feed's settings, from the builder.
#[derive(Clone, Copy, Debug)]
pub(crate) struct WatchSettings {
    pub(crate) base_backoff: Duration,
    pub(crate) max_backoff: Duration,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) headers_timeout: Duration,
    pub(crate) max_event_bytes: usize,
}

impl Default for WatchSettings {
    fn default() -> Self {
        use super::PresenceClientBuilder as B;
        WatchSettings {
            base_backoff: B::DEFAULT_WATCH_BASE_BACKOFF,
            max_backoff: B::DEFAULT_WATCH_MAX_BACKOFF,
            idle_timeout: Some(B::DEFAULT_WATCH_IDLE_TIMEOUT),
            headers_timeout: B::DEFAULT_TIMEOUT,
            max_event_bytes: B::DEFAULT_MAX_RESPONSE_BYTES,
        }
    }
}

impl WatchSettings {
    /// The ceiling of the wait before reconnect number `n` in a row (1-based).
    fn ceiling(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX);
        self.base_backoff
            .checked_mul(factor)
            .unwrap_or(self.max_backoff)
            .min(self.max_backoff)
    }
}

/// The watch feed: a [`Stream`] of [`WatchItem`]s that reconnects by itself; made by
/// [`PresenceClient::watch`]. See the [module docs](self).
///
/// It does nothing until polled; dropping it closes the connection.
#[must_use = "a Watch does nothing unless polled"]
pub struct Watch {
    inner: Pin<Box<dyn Stream<Item = Result<WatchItem, ClientError>> + Send>>,
}

impl Stream for Watch {
    type Item = Result<WatchItem, ClientError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

impl fmt::Debug for Watch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watch").finish_non_exhaustive()
    }
}

impl PresenceClient {
    /// The watch feed of the nodes that match `filter`: a snapshot, then every
    /// join, update and leave, reconnecting and resuming by itself (see
    /// [`watch`](super::watch)).
    pub fn watch(&self, filter: Filter) -> Watch {
        self.watch_inner(filter, None)
    }

    /// As [`watch`](Self::watch), resuming after `cursor` (a [`WatchItem::cursor`]
    /// seen earlier, e.g. by another process): the server sends what happened since,
    /// or a snapshot if it no longer holds that cursor.
    pub fn watch_from(&self, filter: Filter, cursor: impl Into<String>) -> Watch {
        let cursor = cursor.into();
        self.watch_inner(filter, (!cursor.is_empty()).then_some(cursor))
    }

    fn watch_inner(&self, filter: Filter, cursor: Option<String>) -> Watch {
        let state = Feed {
            client: self.clone(),
            settings: self.inner.watch,
            filter,
            cursor,
            failures: 0,
            delay: None,
            conn: None,
            pending: VecDeque::new(),
            done: false,
        };
        let stream = futures_util::stream::unfold(state, |mut feed| async move {
            let item = feed.next().await?;
            Some((item, feed))
        });
        Watch {
            inner: Box::pin(stream),
        }
    }
}

/// The feed's state between items.
struct Feed {
    client: PresenceClient,
    settings: WatchSettings,
    filter: Filter,
    /// The cursor of the last event handed out (or given to `watch_from`).
    cursor: Option<String>,
    /// Reconnects in a row without a byte received.
    failures: u32,
    /// The wait before the next connect.
    delay: Option<Duration>,
    conn: Option<Conn>,
    pending: VecDeque<WatchItem>,
    done: bool,
}

struct Conn {
    body: StreamingBody,
    parser: SseParser,
}

/// Why a connect did not give a stream.
enum ConnectError {
    /// Try again after the backoff (and at least `retry_after`).
    Retry {
        error: ClientError,
        retry_after: Option<Duration>,
    },
    /// No retry helps: yield this and end.
    Fatal(ClientError),
}

/// Why a stream stopped.
enum Broke {
    Ended,
    Error(ClientError),
    Idle(Duration),
    Protocol(String),
}

impl Feed {
    async fn next(&mut self) -> Option<Result<WatchItem, ClientError>> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some(Ok(item));
            }
            if self.done {
                return None;
            }
            match self.conn.take() {
                Some(mut conn) => match self.read(&mut conn).await {
                    Ok(()) => self.conn = Some(conn),
                    Err(broke) => self.broke(broke, &conn),
                },
                None => {
                    if let Some(delay) = self.delay.take() {
                        tokio::time::sleep(delay).await;
                    }
                    match self.connect().await {
                        Ok(conn) => self.conn = Some(conn),
                        Err(ConnectError::Fatal(e)) => {
                            tracing::warn!(error = %e, "presence watch: giving up");
                            self.done = true;
                            return Some(Err(e));
                        }
                        Err(ConnectError::Retry { error, retry_after }) => {
                            let delay = self.backoff(retry_after);
                            tracing::warn!(
                                error = %error,
                                delay_ms = crate::millis(delay),
                                "presence watch: connect failed; retrying"
                            );
                            self.delay = Some(delay);
                        }
                    }
                }
            }
        }
    }

    /// The next wait: one more failure in a row, full jitter, at least `floor`.
    fn backoff(&mut self, floor: Option<Duration>) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let jittered = full_jitter(self.settings.ceiling(self.failures));
        floor.map_or(jittered, |f| f.max(jittered))
    }

    fn broke(&mut self, broke: Broke, conn: &Conn) {
        let delay = match broke {
            Broke::Ended => {
                let delay = self.backoff(conn.parser.retry());
                tracing::info!(
                    delay_ms = crate::millis(delay),
                    "presence watch: the stream ended; reconnecting"
                );
                delay
            }
            Broke::Error(e) => {
                let delay = self.backoff(None);
                tracing::warn!(error = %e, delay_ms = crate::millis(delay), "presence watch: the stream broke; reconnecting");
                delay
            }
            Broke::Idle(idle) => {
                let delay = self.backoff(None);
                tracing::warn!(
                    idle_ms = crate::millis(idle),
                    delay_ms = crate::millis(delay),
                    "presence watch: nothing received for the idle timeout; reconnecting"
                );
                delay
            }
            Broke::Protocol(why) => {
                // Start over from a snapshot: a skipped event would leave the
                // consumer's state wrong.
                self.cursor = None;
                let delay = self.backoff(None);
                tracing::error!(
                    error = %why,
                    delay_ms = crate::millis(delay),
                    "presence watch: undecodable event; reconnecting for a fresh snapshot"
                );
                delay
            }
        };
        self.delay = Some(delay);
    }

    /// Reads one frame and queues the events it completes.
    async fn read(&mut self, conn: &mut Conn) -> Result<(), Broke> {
        let frame = match self.settings.idle_timeout {
            Some(idle) => tokio::time::timeout(idle, conn.body.frame())
                .await
                .map_err(|_| Broke::Idle(idle))?,
            None => conn.body.frame().await,
        };
        let data: Bytes = match frame {
            None => return Err(Broke::Ended),
            Some(Err(e)) => return Err(Broke::Error(ClientError::Transport(e))),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(_trailers) => return Ok(()),
            },
        };
        if data.is_empty() {
            return Ok(());
        }
        // Any byte means the server is there and serving: backoff starts again.
        self.failures = 0;
        let mut events = Vec::new();
        let parsed = conn.parser.feed(&data, &mut events);
        for event in events {
            match decode(&event) {
                Ok(Some(item)) => {
                    self.cursor = (!item.cursor.is_empty()).then(|| item.cursor.clone());
                    self.pending.push_back(item);
                }
                Ok(None) => {
                    tracing::debug!(event = %event.event, "presence watch: skipping an event of unknown type");
                    self.cursor = (!event.id.is_empty()).then(|| event.id.clone());
                }
                Err(why) => return Err(Broke::Protocol(why)),
            }
        }
        parsed.map_err(|e| Broke::Protocol(e.to_string()))
    }

    async fn connect(&mut self) -> Result<Conn, ConnectError> {
        let mut path = self.filter.apply_to("/watch");
        let mut resume_header = None;
        if let Some(cursor) = &self.cursor {
            match HeaderValue::from_str(cursor) {
                Ok(value) => resume_header = Some(value),
                Err(_) => {
                    let since = super::filter::encode(cursor);
                    let sep = if path.contains('?') { '&' } else { '?' };
                    path = format!("{path}{sep}since={since}");
                }
            }
        }
        let mut request = self
            .client
            .request(Method::GET, &path, None::<&()>, false)
            .map_err(ConnectError::Fatal)?;
        let headers = request.headers_mut();
        headers.insert(ACCEPT, HeaderValue::from_static("text/event-stream"));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        if let Some(value) = resume_header {
            headers.insert(LAST_EVENT_ID, value);
        }

        let service = lock(&self.client.inner.raw).clone();
        let timeout = self.settings.headers_timeout;
        let response = match tokio::time::timeout(timeout, service.oneshot(request)).await {
            Err(_) => {
                return Err(ConnectError::Retry {
                    error: ClientError::Timeout,
                    retry_after: None,
                })
            }
            Ok(Err(e)) => {
                return Err(ConnectError::Retry {
                    error: ClientError::from_stack(e),
                    retry_after: None,
                })
            }
            Ok(Ok(response)) => response,
        };
        let (parts, body) = response.into_parts();
        let status = parts.status;
        if status.is_success() {
            if let Some(ct) = parts.headers.get(CONTENT_TYPE) {
                let is_sse = ct.to_str().is_ok_and(|ct| {
                    ct.trim_start()
                        .to_ascii_lowercase()
                        .starts_with("text/event-stream")
                });
                if !is_sse {
                    return Err(ConnectError::Fatal(ClientError::Server {
                        status: status.as_u16(),
                        code: "invalid_response".to_owned(),
                        message: format!(
                            "GET /watch answered with content type {ct:?}, not text/event-stream"
                        ),
                    }));
                }
            }
            let last = self.cursor.clone().unwrap_or_default();
            return Ok(Conn {
                body,
                parser: SseParser::new(last, self.settings.max_event_bytes),
            });
        }

        // The error body, for the message; bounded in size and time.
        let collected = tokio::time::timeout(timeout, read_body(body, MAX_ERROR_BODY));
        let bytes = match collected.await {
            Ok(Ok(bytes)) => bytes,
            _ => Bytes::new(),
        };
        let error = ClientError::from_reply(status, &parts.headers, &bytes);
        if retryable(status) {
            Err(ConnectError::Retry {
                error,
                retry_after: retry_after(&parts.headers),
            })
        } else {
            Err(ConnectError::Fatal(error))
        }
    }
}

/// `408`, `429` and `5xx`: the server (or a proxy) may answer differently later.
fn retryable(status: StatusCode) -> bool {
    status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
}

#[derive(Deserialize)]
struct SnapshotData {
    nodes: Vec<Node>,
}

#[derive(Deserialize)]
struct LeaveData {
    node_id: String,
    reason: LeaveReason,
}

/// An SSE event as a feed item; `Ok(None)` for a type this client does not know.
fn decode(event: &SseEvent) -> Result<Option<WatchItem>, String> {
    fn json<'a, T: Deserialize<'a>>(event: &'a SseEvent) -> Result<T, String> {
        serde_json::from_str(&event.data)
            .map_err(|e| format!("the data of a {:?} event does not decode: {e}", event.event))
    }
    let parsed = match event.event.as_str() {
        "snapshot" => WatchEvent::Snapshot(json::<SnapshotData>(event)?.nodes),
        "join" => WatchEvent::Join(json(event)?),
        "update" => WatchEvent::Update(json(event)?),
        "leave" => {
            let leave: LeaveData = json(event)?;
            WatchEvent::Leave {
                node_id: leave.node_id,
                reason: leave.reason,
            }
        }
        _ => return Ok(None),
    };
    Ok(Some(WatchItem {
        cursor: event.id.clone(),
        event: parsed,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sse(id: &str, event: &str, data: &str) -> SseEvent {
        SseEvent {
            id: id.into(),
            event: event.into(),
            data: data.into(),
        }
    }

    #[test]
    fn decodes_every_type_tolerantly() {
        let node = r#"{"node_id":"n1","meta":{"a":1},"online_since_ms":1,"last_seen_ms":2,"expires_at_ms":3,"status":"up"}"#;
        let item = decode(&sse("c1", "join", node)).unwrap().unwrap();
        assert_eq!(item.cursor, "c1");
        assert!(
            matches!(&item.event, WatchEvent::Join(n) if n.node_id == "n1" && n.expires_at_ms == 3)
        );
        let snap = decode(&sse("c2", "snapshot", &format!(r#"{{"nodes":[{node}]}}"#)))
            .unwrap()
            .unwrap();
        assert!(matches!(&snap.event, WatchEvent::Snapshot(v) if v.len() == 1));
        let leave = decode(&sse(
            "c3",
            "leave",
            r#"{"node_id":"n1","reason":"unmatched"}"#,
        ))
        .unwrap()
        .unwrap();
        assert_eq!(
            leave.event,
            WatchEvent::Leave {
                node_id: "n1".into(),
                reason: LeaveReason::Unmatched
            }
        );
        let newer = decode(&sse(
            "c4",
            "leave",
            r#"{"node_id":"n1","reason":"evicted"}"#,
        ))
        .unwrap()
        .unwrap();
        assert!(matches!(
            newer.event,
            WatchEvent::Leave {
                reason: LeaveReason::Other,
                ..
            }
        ));
        assert_eq!(decode(&sse("c5", "ping", "{}")), Ok(None));
        assert!(decode(&sse("c6", "update", "{not json")).is_err());
    }

    #[test]
    fn backoff_ceiling_doubles_to_the_cap() {
        let s = WatchSettings::default();
        assert_eq!(s.ceiling(1), Duration::from_millis(100));
        assert_eq!(s.ceiling(3), Duration::from_millis(400));
        assert_eq!(s.ceiling(7), Duration::from_secs(5));
        assert_eq!(s.ceiling(200), Duration::from_secs(5));
        assert!(retryable(StatusCode::TOO_MANY_REQUESTS));
        assert!(retryable(StatusCode::SERVICE_UNAVAILABLE));
        assert!(!retryable(StatusCode::UNAUTHORIZED));
        assert!(!retryable(StatusCode::FORBIDDEN));
    }
}
