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

use std::collections::VecDeque;
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
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::errors::ApiError;
use super::metrics::{Metrics, WATCH_EVENTS};
use super::store_call::State;
use super::ResponseBody;
use crate::config::Config;
use crate::store::feed::{Change, ChangeKind, Changes, Cursor, WatchOptions, WatchStart};

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

/// The value of `key` in a query string (percent-decoded).
fn form_value(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == key).then(|| {
            percent_encoding::percent_decode_str(&v.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        })
    })
}

/// `GET /presence/watch`.
pub(crate) async fn respond(
    state: &Arc<State>,
    parts: &http::request::Parts,
) -> Result<http::Response<ResponseBody>, ApiError> {
    let cursor = requested_cursor(parts);
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
        .guarded("", |s| s.watch(cursor.as_ref(), options))
        .await?;
    let mut first = VecDeque::new();
    match watch.start {
        WatchStart::Resumed(changes) => {
            for change in &changes {
                state.metrics.watch_event_sent(event_index(change.kind));
                first.push_back(change.encoded(sse_frame));
            }
        }
        WatchStart::Snapshot => {
            // Listed after subscribing: everything up to the cursor is in it.
            let listing = state.list.list(state).await?;
            state.metrics.watch_event_sent(0);
            first.push_back(Bytes::from(format!(
                "id: {}\nevent: snapshot\ndata: {{\"nodes\":",
                watch.cursor.encode()
            )));
            first.extend(listing.json.chunks);
            first.push_back(Bytes::from_static(b"}\n\n"));
        }
    }
    let keepalive = state.watchers.keepalive;
    let body = WatchBody {
        first,
        changes: watch.changes,
        keepalive,
        next_keepalive: Box::pin(tokio::time::sleep(keepalive)),
        closing: Box::pin(state.watchers.closing.clone().cancelled_owned()),
        metrics: state.metrics.clone(),
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
    next_keepalive: Pin<Box<Sleep>>,
    closing: Pin<Box<WaitForCancellationFutureOwned>>,
    metrics: Arc<Metrics>,
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
        if this.closing.as_mut().poll(cx).is_ready() {
            this.done = true;
            return Poll::Ready(None);
        }
        match this.changes.poll_recv(cx) {
            Poll::Ready(Some(change)) => {
                this.metrics.watch_event_sent(event_index(change.kind));
                let deadline = Instant::now() + this.keepalive;
                this.next_keepalive.as_mut().reset(deadline);
                return Poll::Ready(Some(Ok(Frame::data(change.encoded(sse_frame)))));
            }
            // Dropped for being slow, or the feed restarted: the client resumes.
            Poll::Ready(None) => {
                this.done = true;
                return Poll::Ready(None);
            }
            Poll::Pending => {}
        }
        if this.next_keepalive.as_mut().poll(cx).is_ready() {
            let deadline = Instant::now() + this.keepalive;
            this.next_keepalive.as_mut().reset(deadline);
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
/// [background work](State::background): after an outage the leases get the outage
/// back first, so the sweep finds no expiry the outage caused; skipped while the
/// store breaker is not closed.
pub(crate) async fn sweep(state: Weak<State>) {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(state) = state.upgrade() else {
            return;
        };
        // Several calls in a row while a backlog of expiries is due.
        for _ in 0..100 {
            let Some(sweep) = state.background(|s| s.sweep_expired()).await else {
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
