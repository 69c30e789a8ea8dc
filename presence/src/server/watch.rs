//! `GET /presence/watch`: the store's change feed as Server-Sent Events, and the
//! background sweep that turns expiries into events.
//!
//! One stream per request: a `snapshot` first when the request carries no usable
//! cursor (`Last-Event-ID` or `?since=`), else the changes after it; then every
//! change as it happens, each with its cursor as the SSE `id:`; a `: keep-alive`
//! comment every `PRESENCE_WATCH_KEEPALIVE_SEC`. The stream is not cut by the
//! request timeout. It ends when the server shuts down (cleanly: the client resumes
//! elsewhere with its cursor), and when the watcher falls `PRESENCE_WATCH_BACKLOG`
//! changes behind (the connection is closed, even if its writes are blocked).
//!
//! # Filtered watches
//! `?prefix=`, `?status=` and `?meta.<key>=` (as for `GET /presence`) narrow the
//! stream to the nodes that match: the snapshot lists only them, and a
//! [`WatchFilter`] judges each change. A join or update of a matching node is sent;
//! one of a node that no longer matches is sent as a `leave` with reason
//! `unmatched` if the watcher holds the node, else dropped; a leave is sent only if
//! the watcher holds the node. An unfiltered watch has no filter and pays nothing.

use std::borrow::Cow;
use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use http::StatusCode;
use http_body::{Body, Frame, SizeHint};
use resilience::BoxError;
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use super::errors::ApiError;
use super::metrics::{Metrics, WATCH_EVENTS};
use super::params::{self, Route};
use super::serve::signal_on;
use super::store_call::State;
use super::ResponseBody;
use crate::config::Config;
use crate::model::Status;
use crate::store::feed::{
    Change, ChangeKind, Changes, Cursor, LeaveReason, WatchOptions, WatchStart,
};
use crate::store::query::Filter;

/// How often the server sweeps the store for expiries.
pub(crate) const SWEEP_INTERVAL: Duration = Duration::from_millis(100);

/// Closes the connection of a watcher that fell too far behind: inserted into the
/// extensions of a watch request by the [`Server`](super::Server), whose connection
/// task stops when it fires. (A slow watcher's writes are blocked, so the body
/// itself would never run to notice.)
#[derive(Clone, Debug)]
pub(crate) struct ConnectionAbort(pub(crate) CancellationToken);

/// The watch streams of one service: how many are open, the limits, and the signal
/// that ends them all at shutdown.
#[derive(Debug)]
pub(crate) struct Watchers {
    open: AtomicUsize,
    max: usize,
    backlog: usize,
    keepalive: Duration,
    closing: CancellationToken,
}

impl Watchers {
    pub(crate) fn new(config: &Config) -> Watchers {
        Watchers {
            open: AtomicUsize::new(0),
            max: config.max_watchers,
            backlog: config.watch_backlog.max(1),
            keepalive: config.watch_keepalive,
            closing: CancellationToken::new(),
        }
    }

    /// Ends every stream (cleanly) and refuses new ones: graceful shutdown.
    pub(crate) fn close(&self) {
        self.closing.cancel();
    }

    /// Open streams.
    pub(crate) fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    fn enter(self: &Arc<Self>, metrics: &Arc<Metrics>) -> Result<WatcherSlot, ApiError> {
        if self.closing.is_cancelled() {
            return Err(ApiError::ShuttingDown);
        }
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .map_err(|_| ApiError::TooManyWatchers { max: self.max })?;
        metrics.watcher_opened();
        Ok(WatcherSlot {
            watchers: self.clone(),
            metrics: metrics.clone(),
        })
    }
}

/// One open stream, counted while it lives.
struct WatcherSlot {
    watchers: Arc<Watchers>,
    metrics: Arc<Metrics>,
}

impl Drop for WatcherSlot {
    fn drop(&mut self) {
        self.watchers.open.fetch_sub(1, Ordering::AcqRel);
        self.metrics.watcher_closed();
    }
}

/// The cursor a watch request resumes from: `Last-Event-ID` (what `EventSource`
/// sends by itself) or else `?since=`. One that does not decode is no cursor (a
/// snapshot), never an error: a client must always be able to start over.
fn requested_cursor(parts: &http::request::Parts) -> Option<Cursor> {
    let token = parts
        .headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| {
            let query = parts.uri.query()?;
            form_value(query, "since")
        })?;
    match Cursor::decode(&token) {
        Ok(cursor) => Some(cursor),
        Err(why) => {
            tracing::debug!(%why, "watch cursor not usable; starting with a snapshot");
            None
        }
    }
}

/// The value of `key` in a query string, decoded as forms encode it (as the
/// listing's parameters are, see `params`).
fn form_value(query: &str, key: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

/// `GET /presence/watch`.
pub(crate) async fn respond(
    state: &Arc<State>,
    parts: &http::request::Parts,
) -> Result<http::Response<ResponseBody>, ApiError> {
    let cursor = requested_cursor(parts);
    let query = params::parse(parts.uri.query(), Route::Watch)?.map(|p| p.query);
    let slot = state.watchers.enter(&state.metrics)?;
    let abort = parts.extensions.get::<ConnectionAbort>().cloned();
    let metrics = state.metrics.clone();
    let options = WatchOptions {
        backlog: state.watchers.backlog,
        on_overflow: Some(Arc::new(move || {
            metrics.watcher_dropped_slow();
            if let Some(ConnectionAbort(abort)) = &abort {
                abort.cancel();
            }
        })),
    };
    let watch = state
        .guarded(None, |s| s.watch(cursor.as_ref(), options))
        .await?;
    let mut first = VecDeque::new();
    let mut filter = None;
    match (watch.start, query) {
        (WatchStart::Resumed(changes), query) => {
            // What the client held at its cursor is unknown here: see `WatchFilter`.
            filter = query.map(|q| WatchFilter::resumed(q.filter().clone()));
            for change in &changes {
                if let Some(frame) = frame_for(filter.as_mut(), change, &state.metrics) {
                    first.push_back(frame);
                }
            }
        }
        (WatchStart::Snapshot, None) => {
            // Listed after subscribing: everything up to the cursor is in it.
            let listing = state.list.list(state).await?;
            push_snapshot(
                &mut first,
                &watch.cursor,
                listing.json.chunks,
                &state.metrics,
            );
        }
        (WatchStart::Snapshot, Some(query)) => {
            // Queried after subscribing, like the plain snapshot.
            let page = state.guarded(None, |s| s.query_json(&query)).await?;
            let held = WatchFilter::snapshot(query.filter().clone(), &page.json)?;
            filter = Some(held);
            push_snapshot(&mut first, &watch.cursor, page.json.chunks, &state.metrics);
        }
    }
    let keepalive = state.watchers.keepalive;
    let body = WatchBody {
        first,
        changes: watch.changes,
        keepalive,
        next_keepalive: Box::pin(tokio::time::sleep(keepalive)),
        last_sent: Instant::now(),
        closing: signal_on(state.watchers.closing.clone().cancelled_owned()),
        metrics: state.metrics.clone(),
        filter,
        _slot: slot,
        done: false,
    };
    let mut response = http::Response::new(ResponseBody::new(body));
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // nginx would otherwise buffer the stream.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// A change as one SSE event: `id`, `event`, one line of `data`.
fn sse_frame(change: &Change) -> Bytes {
    let cursor = change.cursor().encode();
    let name = change.kind.name();
    let mut frame = BytesMut::with_capacity(cursor.len() + name.len() + change.data.len() + 24);
    frame.put_slice(b"id: ");
    frame.put_slice(cursor.as_bytes());
    frame.put_slice(b"\nevent: ");
    frame.put_slice(name.as_bytes());
    frame.put_slice(b"\ndata: ");
    frame.put_slice(&change.data);
    frame.put_slice(b"\n\n");
    frame.freeze()
}

/// Queues a `snapshot` event at `cursor` holding the JSON array `nodes`.
fn push_snapshot(
    first: &mut VecDeque<Bytes>,
    cursor: &Cursor,
    nodes: Vec<Bytes>,
    metrics: &Metrics,
) {
    metrics.watch_event_sent(0);
    first.push_back(Bytes::from(format!(
        "id: {}\nevent: snapshot\ndata: {{\"nodes\":",
        cursor.encode()
    )));
    first.extend(nodes);
    first.push_back(Bytes::from_static(b"}\n\n"));
}

/// The frame a watcher gets for `change`: the change's own (shared) frame when there
/// is no filter or it passes, an `unmatched` leave, or nothing. Counted in the
/// metrics as what is sent.
fn frame_for(
    filter: Option<&mut WatchFilter>,
    change: &Change,
    metrics: &Metrics,
) -> Option<Bytes> {
    let verdict = filter.map_or(Verdict::Send, |f| f.judge(change));
    match verdict {
        Verdict::Send => {
            metrics.watch_event_sent(event_index(change.kind));
            Some(change.encoded(sse_frame))
        }
        Verdict::Unmatched => {
            metrics.watch_event_sent(event_index(ChangeKind::Leave(LeaveReason::Unmatched)));
            Some(unmatched_frame(change))
        }
        Verdict::Drop => None,
    }
}

/// The `leave` a filtered watcher gets when a node it holds stops matching: the
/// change's cursor as `id:`, `{"node_id","reason":"unmatched"}` as data. Made per
/// watcher (the change's shared frame is its join or update).
fn unmatched_frame(change: &Change) -> Bytes {
    // Serializing a `str` cannot fail (node ids never even need escaping).
    let node_id = serde_json::to_string(&*change.node_id).unwrap_or_default();
    Bytes::from(format!(
        "id: {}\nevent: leave\ndata: {{\"node_id\":{node_id},\"reason\":\"{}\"}}\n\n",
        change.cursor().encode(),
        LeaveReason::Unmatched.as_str()
    ))
}

/// What a filtered watcher does with one change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    /// Send the change as it is.
    Send,
    /// Send a `leave` with reason `unmatched`.
    Unmatched,
    /// Send nothing.
    Drop,
}

/// The filter of one watch and the nodes its client holds: those it was sent as
/// matching (in the snapshot or a join/update) and not sent a leave for since.
///
/// A watch that resumed from a cursor does not know what its client held at that
/// cursor; it treats a node it has not seen yet as possibly held, so the first
/// non-matching change of such a node is still sent (as `unmatched`, or as the
/// leave it is). A leave of a node the client never had is harmless (applying by
/// `node_id` is idempotent); a missed leave would keep a stale node in its view.
#[derive(Debug)]
struct WatchFilter {
    filter: Filter,
    held: HashSet<Box<str>>,
    /// Resumed watches only: the nodes known not to be held (seen not matching).
    /// `None`: every node not in `held` is not held (a snapshot told the client all).
    not_held: Option<HashSet<Box<str>>>,
}

impl WatchFilter {
    /// The filter of a watch that started with `snapshot` (a `query_json` array):
    /// the client holds exactly the nodes in it.
    fn snapshot(
        filter: Filter,
        snapshot: &crate::store::NodeListJson,
    ) -> Result<WatchFilter, ApiError> {
        let text = snapshot.to_bytes();
        let nodes: Vec<NodeFields<'_>> = serde_json::from_slice(&text)
            .map_err(|e| ApiError::Internal(format!("the store's listing is not JSON: {e}")))?;
        let held = nodes.into_iter().map(|n| n.node_id.into()).collect();
        Ok(WatchFilter {
            filter,
            held,
            not_held: None,
        })
    }

    /// The filter of a watch that resumed from a cursor (see the type's docs).
    fn resumed(filter: Filter) -> WatchFilter {
        WatchFilter {
            filter,
            held: HashSet::new(),
            not_held: Some(HashSet::new()),
        }
    }

    /// What to send for `change`; updates what the client holds accordingly.
    fn judge(&mut self, change: &Change) -> Verdict {
        let id = &*change.node_id;
        match change.kind {
            ChangeKind::Join | ChangeKind::Update if self.node_matches(change) => {
                self.hold(id);
                Verdict::Send
            }
            ChangeKind::Join | ChangeKind::Update => {
                if self.release(id) {
                    Verdict::Unmatched
                } else {
                    Verdict::Drop
                }
            }
            ChangeKind::Leave(_) => {
                let maybe_held = self.may_hold(id);
                // Gone: in neither set, so a watcher's sets stay within the nodes
                // online (the next change of this node is its join, which decides).
                self.held.remove(id);
                if let Some(not_held) = &mut self.not_held {
                    not_held.remove(id);
                }
                if maybe_held {
                    Verdict::Send
                } else {
                    Verdict::Drop
                }
            }
        }
    }

    /// Whether the client holds `id`, or may (resumed watches).
    fn may_hold(&self, id: &str) -> bool {
        self.held.contains(id)
            || self
                .not_held
                .as_ref()
                .is_some_and(|not_held| !not_held.contains(id))
    }

    /// Marks `id` held: the client was sent it as matching.
    fn hold(&mut self, id: &str) {
        if let Some(not_held) = &mut self.not_held {
            not_held.remove(id);
        }
        if !self.held.contains(id) {
            self.held.insert(id.into());
        }
    }

    /// Marks `id` not held; whether it was (or may have been).
    fn release(&mut self, id: &str) -> bool {
        let was = self.may_hold(id);
        self.held.remove(id);
        if let Some(not_held) = &mut self.not_held {
            if !not_held.contains(id) {
                not_held.insert(id.into());
            }
        }
        was
    }

    /// Whether the node of a join or update (its data is the node's JSON) matches.
    fn node_matches(&self, change: &Change) -> bool {
        match serde_json::from_slice::<NodeFields<'_>>(&change.data) {
            Ok(node) => self.filter.matches(
                &change.node_id,
                node.status,
                node.meta.map(|m| m.get().as_bytes()),
            ),
            // A store always writes the node; if one ever did not, the node is not
            // shown as matching (and a held one is taken away from the client).
            Err(e) => {
                tracing::warn!(node_id = %change.node_id, error = %e, "a change's node is not readable");
                false
            }
        }
    }
}

/// The fields of a node's JSON a filter looks at (the meta as its JSON text, which
/// is how a store keeps it and how [`Filter::matches`] compares numbers).
#[derive(serde::Deserialize)]
struct NodeFields<'a> {
    #[serde(borrow)]
    node_id: Cow<'a, str>,
    #[serde(default)]
    status: Status,
    #[serde(borrow, default)]
    meta: Option<&'a serde_json::value::RawValue>,
}

fn event_index(kind: ChangeKind) -> usize {
    let name = kind.name();
    WATCH_EVENTS.iter().position(|&e| e == name).unwrap_or(0)
}

/// The body of a watch stream (see the [module docs](self)).
struct WatchBody {
    /// The snapshot or replay, sent before any live change.
    first: VecDeque<Bytes>,
    changes: Changes,
    keepalive: Duration,
    /// Fires `keepalive` after the last frame, or earlier: it is not moved for every
    /// frame (a timer reset per event per watcher is the fan-out's costliest step
    /// after the socket write), but when it fires after a frame, it is moved to
    /// `keepalive` after that frame instead of sending a comment.
    next_keepalive: Pin<Box<Sleep>>,
    /// When the last frame was sent.
    last_sent: Instant,
    /// Fires at shutdown. Not the token's own future: that takes the token's locks
    /// on every poll, and every watcher polls it once per change, on every thread.
    closing: oneshot::Receiver<()>,
    metrics: Arc<Metrics>,
    /// The filter of a filtered watch; `None` sends every change.
    filter: Option<WatchFilter>,
    _slot: WatcherSlot,
    done: bool,
}

impl Body for WatchBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if let Some(bytes) = this.first.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(bytes))));
        }
        // Changes a filter drops are skipped until one is sent or none is ready.
        loop {
            match this.changes.poll_recv(cx) {
                Poll::Ready(Some(change)) => {
                    let Some(frame) = frame_for(this.filter.as_mut(), &change, &this.metrics)
                    else {
                        continue;
                    };
                    this.last_sent = Instant::now();
                    return Poll::Ready(Some(Ok(Frame::data(frame))));
                }
                // Dropped for being slow, or the feed restarted: the client resumes.
                Poll::Ready(None) => {
                    this.done = true;
                    return Poll::Ready(None);
                }
                Poll::Pending => break,
            }
        }
        // After the changes: a stream that shuts down with changes ready sends them
        // first (at most its backlog), and one that is sending is polled here once
        // per change, not twice.
        if Pin::new(&mut this.closing).poll(cx).is_ready() {
            this.done = true;
            return Poll::Ready(None);
        }
        while this.next_keepalive.as_mut().poll(cx).is_ready() {
            let due = this.last_sent + this.keepalive;
            if due > Instant::now() {
                // A frame went out since the timer was set: quiet for less than
                // `keepalive` yet.
                this.next_keepalive.as_mut().reset(due);
                continue;
            }
            this.last_sent = Instant::now();
            this.next_keepalive
                .as_mut()
                .reset(this.last_sent + this.keepalive);
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
                b": keep-alive\n\n",
            )))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// Sweeps the store for expiries every [`SWEEP_INTERVAL`] while the service lives
/// (see [`Store::sweep_expired`](crate::store::Store::sweep_expired)), as
/// [background work](State::background), shard by shard: after an outage of a shard
/// its leases get the outage back first, so the sweep finds no expiry the outage
/// caused; a shard is skipped while its breaker is not closed.
pub(crate) async fn sweep(state: Weak<State>) {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(state) = state.upgrade() else {
            return;
        };
        // Shard by shard, so that one shard's outage stops its own sweep alone (a
        // shard's expiries are its own, whatever the deployment's shard count).
        for shard in 0..state.store.shard_count() {
            // Several calls in a row while a backlog of expiries is due.
            for _ in 0..100 {
                let swept = state
                    .background(shard, |s| async move { s.sweep_expired().await })
                    .await;
                let Some(sweep) = swept else {
                    break;
                };
                if sweep.expired > 0 {
                    state.metrics.set_sweep_lag_ms(sweep.lag_ms);
                }
                if !sweep.more {
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_come_from_last_event_id_or_since() {
        let cursor = Cursor::new(3, vec![crate::store::feed::Position { ms: 1, seq: 2 }]);
        let token = cursor.encode();
        let parts = |uri: &str, header: Option<&str>| {
            let mut req = http::Request::get(uri);
            if let Some(h) = header {
                req = req.header("last-event-id", h);
            }
            req.body(()).unwrap().into_parts().0
        };
        let since = format!("/presence/watch?x=1&since={token}");
        assert_eq!(requested_cursor(&parts(&since, None)), Some(cursor.clone()));
        assert_eq!(
            requested_cursor(&parts("/presence/watch?since=zzz", Some(&token))),
            Some(cursor)
        );
        assert_eq!(
            requested_cursor(&parts("/presence/watch?since=garbage", None)),
            None
        );
        assert_eq!(requested_cursor(&parts("/presence/watch", None)), None);
    }
}
