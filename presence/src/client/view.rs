//! [`PresenceView`]: a local copy of the online set, kept current by a background
//! task that consumes a [watch feed](super::watch).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), presence::client::ClientError> {
//! use presence::client::{PresenceClient, Filter};
//!
//! const NODE: &str = r#"{"node_id":"n1","meta":{},"online_since_ms":1,"last_seen_ms":1,"expires_at_ms":9}"#;
//! let server = tower::service_fn(|_req: http::Request<http_body_util::Full<bytes::Bytes>>| async {
//!     let feed = format!("id: c1\nevent: snapshot\ndata: {{\"nodes\":[{NODE}]}}\n\n");
//!     let body = http_body_util::StreamBody::new(futures_util::StreamExt::chain(
//!         futures_util::stream::iter([Ok::<_, std::convert::Infallible>(
//!             http_body::Frame::data(bytes::Bytes::from(feed)),
//!         )]),
//!         futures_util::stream::pending(),
//!     ));
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
//! let mut view = client.view(Filter::all());
//! assert!(view.changed().await); // the first snapshot is in
//! assert_eq!(view.len(), 1);
//! assert_eq!(view.get("n1").map(|n| n.expires_at_ms), Some(9));
//! drop(view); // stops the task and closes the feed
//! # Ok(()) }
//! ```
//!
//! A snapshot replaces the map; a join or an update inserts the node; a leave
//! removes it. Applying is idempotent by node id, so the events a reconnect repeats
//! change nothing, and [`changed`](PresenceView::changed) fires only when the map
//! did change (and once for the first snapshot, even an empty one, so a caller can
//! wait for the view to be in sync).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::watch::{Watch, WatchEvent, WatchItem};
use super::{lock, ClientError, Filter, PresenceClient};
use crate::model::Node;

/// A local map of the nodes matching a filter, kept current from the watch feed;
/// made by [`PresenceClient::view`].
///
/// Reads are cheap (a lock and a clone, no network). Dropping the view stops its
/// background task and closes the feed.
#[must_use = "dropping a PresenceView stops it at once"]
pub struct PresenceView {
    shared: Arc<Shared>,
    changes: watch::Receiver<()>,
    task: JoinHandle<()>,
}

#[derive(Default)]
struct Shared {
    nodes: Mutex<BTreeMap<String, Node>>,
    synced: AtomicBool,
    cursor: Mutex<Option<String>>,
    error: Mutex<Option<ClientError>>,
}

impl PresenceClient {
    /// A [`PresenceView`] of the nodes matching `filter`: starts a background task
    /// (on the current tokio runtime) that consumes [`watch`](Self::watch) and keeps
    /// the view's map current. Not async: the view starts empty and
    /// [`PresenceView::changed`] resolves once the first snapshot is applied.
    ///
    /// # Panics
    /// Outside a tokio runtime (as `tokio::spawn`).
    pub fn view(&self, filter: Filter) -> PresenceView {
        PresenceView::spawn(self.watch(filter))
    }
}

impl PresenceView {
    fn spawn(feed: Watch) -> PresenceView {
        let shared = Arc::new(Shared::default());
        let (tx, changes) = watch::channel(());
        let task = tokio::spawn(run(feed, shared.clone(), tx));
        PresenceView {
            shared,
            changes,
            task,
        }
    }

    /// Every node, sorted by node id.
    pub fn nodes(&self) -> Vec<Node> {
        lock(&self.shared.nodes).values().cloned().collect()
    }

    /// One node, if it is in the view.
    pub fn get(&self, node_id: &str) -> Option<Node> {
        lock(&self.shared.nodes).get(node_id).cloned()
    }

    /// How many nodes are in the view.
    pub fn len(&self) -> usize {
        lock(&self.shared.nodes).len()
    }

    /// `true` if the view holds no node (also before the first snapshot).
    pub fn is_empty(&self) -> bool {
        lock(&self.shared.nodes).is_empty()
    }

    /// `true` once a snapshot has been applied (before that the view is empty
    /// because it knows nothing yet, not because no node is online).
    pub fn is_synced(&self) -> bool {
        self.shared.synced.load(Ordering::Acquire)
    }

    /// The cursor of the last event applied.
    pub fn cursor(&self) -> Option<String> {
        lock(&self.shared.cursor).clone()
    }

    /// Waits until the map has changed since the last call (or since the view was
    /// made) and returns `true`; changes in between coalesce into one. Returns
    /// `false` once the view has stopped and will not change again: the feed ended
    /// with an error no reconnect fixes (see [`take_error`](Self::take_error)).
    pub async fn changed(&mut self) -> bool {
        self.changes.changed().await.is_ok()
    }

    /// `true` once the background task has stopped by itself.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// The error that stopped the view (`401`, `404`...), once; `None` while it runs.
    pub fn take_error(&self) -> Option<ClientError> {
        lock(&self.shared.error).take()
    }
}

impl Drop for PresenceView {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl fmt::Debug for PresenceView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PresenceView")
            .field("len", &self.len())
            .field("synced", &self.is_synced())
            .field("finished", &self.is_finished())
            .finish_non_exhaustive()
    }
}

async fn run(mut feed: Watch, shared: Arc<Shared>, tx: watch::Sender<()>) {
    while let Some(item) = feed.next().await {
        match item {
            Ok(item) => {
                if apply(&shared, item) {
                    tx.send_replace(());
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "presence view: the watch feed stopped");
                *lock(&shared.error) = Some(e);
                break;
            }
        }
    }
    // `tx` drops here: `changed` returns `false` from now on.
}

/// Applies one event; `true` if the map changed (or this is the first snapshot).
fn apply(shared: &Shared, item: WatchItem) -> bool {
    let WatchItem { cursor, event } = item;
    *lock(&shared.cursor) = (!cursor.is_empty()).then_some(cursor);
    let mut nodes = lock(&shared.nodes);
    match event {
        WatchEvent::Snapshot(list) => {
            let fresh: BTreeMap<String, Node> =
                list.into_iter().map(|n| (n.node_id.clone(), n)).collect();
            let first = !shared.synced.swap(true, Ordering::AcqRel);
            let changed = *nodes != fresh;
            *nodes = fresh;
            changed || first
        }
        WatchEvent::Join(node) | WatchEvent::Update(node) => {
            if nodes.get(&node.node_id) == Some(&node) {
                false
            } else {
                nodes.insert(node.node_id.clone(), node);
                true
            }
        }
        WatchEvent::Leave { node_id, .. } => nodes.remove(&node_id).is_some(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::LeaveReason;

    fn node(id: &str, seen: u64) -> Node {
        Node {
            node_id: id.into(),
            status: Default::default(),
            meta: Default::default(),
            online_since_ms: 1,
            last_seen_ms: seen,
            expires_at_ms: seen + 10,
        }
    }

    fn item(cursor: &str, event: WatchEvent) -> WatchItem {
        WatchItem {
            cursor: cursor.into(),
            event,
        }
    }

    #[test]
    fn applies_idempotently_by_node_id() {
        let s = Shared::default();
        assert!(apply(&s, item("1", WatchEvent::Snapshot(vec![]))));
        assert!(!apply(&s, item("2", WatchEvent::Snapshot(vec![]))));
        assert!(apply(&s, item("3", WatchEvent::Join(node("b", 1)))));
        assert!(!apply(&s, item("4", WatchEvent::Join(node("b", 1)))));
        assert!(apply(&s, item("5", WatchEvent::Update(node("b", 2)))));
        assert!(apply(&s, item("6", WatchEvent::Update(node("a", 2)))));
        let leave = |id: &str| WatchEvent::Leave {
            node_id: id.into(),
            reason: LeaveReason::Expired,
        };
        assert!(apply(&s, item("7", leave("a"))));
        assert!(!apply(&s, item("8", leave("a"))));
        assert_eq!(lock(&s.nodes).len(), 1);
        assert!(apply(
            &s,
            item("9", WatchEvent::Snapshot(vec![node("z", 1), node("c", 1)]))
        ));
        let ids: Vec<String> = lock(&s.nodes).keys().cloned().collect();
        assert_eq!(ids, ["c", "z"]);
        assert_eq!(lock(&s.cursor).as_deref(), Some("9"));
    }
}
