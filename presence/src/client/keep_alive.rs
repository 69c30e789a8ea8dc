//! [`KeepAlive`]: a background task that keeps one node online.
//!
//! ```no_run
//! # async fn run() -> Result<(), presence::client::ClientError> {
//! use presence::client::PresenceClient;
//! use presence::model::{Meta, Status};
//!
//! let pc = PresenceClient::new("http://localhost:8080/presence")?;
//! let mut meta = Meta::new();
//! meta.insert("load".into(), 0.25.into());
//! let keep = pc.keep_alive("node-123", meta.clone()).await?;
//! // ... the node does its work; heartbeats go out in the background ...
//! meta.insert("load".into(), 0.75.into());
//! keep.set_meta(meta); // sent with the next heartbeat
//! keep.set_status(Status::Draining); // so is a status: watchers see an update
//! let removed = keep.stop().await?; // stops heartbeating and logs out
//! assert!(removed);
//! # Ok(()) }
//! ```
//!
//! The task heartbeats every `heartbeat_ms` of the login reply, spread by ±10 % so a
//! fleet started at once does not beat in lockstep. When the server has forgotten the
//! node (`404`, e.g. it expired during a network partition, or the store was
//! restarted) the heartbeat logs in again by itself. Transient failures (timeouts,
//! transport errors, `5xx`, an open breaker, rate limiting) are logged with
//! `tracing` and the next attempt comes after half an interval, so one lost beat
//! does not use up the TTL (three intervals by default). A `409 lease_mismatch`
//! means another process logged in with this node id: the lease fences this one out,
//! so the task stops instead of fighting over the node id; so do `401` and `422`,
//! which no repetition fixes. [`KeepAlive::stop`] reports such an error.

use std::fmt;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::retry::spread;
use super::{ClientError, Heartbeat, NodeUpdate, PresenceClient};
use crate::model::{Lease, Meta, NodeId, Status};

/// The shortest interval the task heartbeats at, whatever the server advises: a
/// misconfigured server must not turn every client into a busy loop.
const MIN_INTERVAL: Duration = Duration::from_millis(50);

/// How much each interval is spread, as a fraction of it.
const JITTER: f64 = 0.1;

/// A node kept online by a background task; made by
/// [`PresenceClient::keep_alive`].
///
/// [`stop`](Self::stop) ends the task and logs out. Dropping a `KeepAlive` ends the
/// task too, but cannot log out (a destructor cannot wait for the network): the node
/// then goes offline when its TTL runs out.
#[must_use = "dropping a KeepAlive stops its heartbeats at once"]
pub struct KeepAlive {
    client: PresenceClient,
    node_id: NodeId,
    update: watch::Sender<NodeUpdate>,
    task: Option<JoinHandle<ClientError>>,
}

impl KeepAlive {
    pub(crate) fn spawn(client: PresenceClient, node_id: NodeId, first: &Lease) -> KeepAlive {
        let (update, rx) = watch::channel(NodeUpdate::default());
        let interval = Duration::from_millis(first.heartbeat_ms);
        let task = tokio::spawn(run(client.clone(), node_id.clone(), interval, rx));
        KeepAlive {
            client,
            node_id,
            update,
            task: Some(task),
        }
    }

    /// The node this keeps online.
    pub fn node_id(&self) -> &str {
        self.node_id.as_str()
    }

    /// The node's current lease (it changes when the task logs in again).
    pub fn lease(&self) -> Option<Lease> {
        self.client.lease(self.node_id.as_str())
    }

    /// Replaces the node's meta; the next heartbeat carries it (and so does a login
    /// the task makes after that).
    pub fn set_meta(&self, meta: Meta) {
        self.update.send_modify(|u| u.meta = Some(meta));
    }

    /// Sets the node's status (e.g. [`Status::Draining`] before a shutdown); the
    /// next heartbeat carries it (and so does a login the task makes after that).
    pub fn set_status(&self, status: Status) {
        self.update.send_modify(|u| u.status = Some(status));
    }

    /// `true` once the task has stopped by itself after an error no retry fixes
    /// (`409`, `401`, `422`); [`stop`](Self::stop) returns that error.
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Stops heartbeating and logs the node out; `Ok(removed)` as in
    /// [`PresenceClient::logout`].
    ///
    /// # Errors
    /// The error that stopped the task, if it stopped by itself (then there is no
    /// valid lease to log out with, and nothing is sent); else the logout's error.
    pub async fn stop(mut self) -> Result<bool, ClientError> {
        if let Some(task) = self.task.take() {
            task.abort();
            // A task that ended by itself hands back the error that ended it; an
            // aborted one gives a cancellation JoinError, which just means "was running".
            if let Ok(fatal) = task.await {
                return Err(fatal);
            }
        }
        self.client.logout(self.node_id.as_str()).await
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl fmt::Debug for KeepAlive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeepAlive")
            .field("node_id", &self.node_id)
            .field("finished", &self.is_finished())
            .finish_non_exhaustive()
    }
}

/// The heartbeat loop; returns only with the error that ended it.
async fn run(
    client: PresenceClient,
    node_id: NodeId,
    mut interval: Duration,
    mut changes: watch::Receiver<NodeUpdate>,
) -> ClientError {
    // What the next heartbeat must carry: the latest meta and status set since the
    // last heartbeat that went through.
    let mut pending = NodeUpdate::default();
    let mut last_failed = false;
    loop {
        let base = interval.max(MIN_INTERVAL);
        let wait = if last_failed { base / 2 } else { base };
        tokio::time::sleep(spread(wait, JITTER)).await;

        if changes.has_changed().unwrap_or(false) {
            // The latest of each ever set (sending a meta again that is already
            // stored changes nothing, so it is no event).
            let set = changes.borrow_and_update().clone();
            pending.meta = set.meta.or(pending.meta);
            pending.status = set.status.or(pending.status);
        }
        match client.heartbeat_inner(&node_id, pending.clone()).await {
            Ok(beat) => {
                if let Heartbeat::Relogged(lease) = &beat {
                    tracing::info!(
                        node_id = %node_id,
                        lease_id = %lease.lease_id,
                        "presence keep-alive: the server had forgotten the node; logged in again"
                    );
                    interval = Duration::from_millis(lease.heartbeat_ms);
                }
                pending = NodeUpdate::default();
                last_failed = false;
            }
            Err(e) if e.is_transient() => {
                tracing::warn!(node_id = %node_id, error = %e, "presence keep-alive: heartbeat failed; will retry");
                last_failed = true;
            }
            Err(e) => {
                tracing::error!(node_id = %node_id, error = %e, "presence keep-alive: stopping");
                return e;
            }
        }
    }
}
