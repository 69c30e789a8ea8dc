//! A [`Store`] with an injected fault, for testing what is built on a store: the
//! server's `503`s and its circuit breaker, graceful shutdown with a request in
//! flight, listings shared by concurrent requests.
//!
//! ```
//! use std::sync::{atomic::Ordering, Arc};
//! use presence::store::{FaultyStore, Store, StoreError};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let store = Arc::new(FaultyStore::down());
//! assert!(matches!(store.ping().await, Err(StoreError::Unavailable(_))));
//! assert_eq!(store.calls.load(Ordering::SeqCst), 1);
//! # }
//! ```

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

use super::feed::{Cursor, Watch, WatchOptions};
use super::query::{Page, Query};
use super::{BoxFuture, LoginOutcome, MemoryStore, NodeListJson, Store, StoreError};
use crate::model::{Meta, Node, NodeId, Stats, Status};

/// What a [`FaultyStore`] does wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Every call fails at once with [`StoreError::Unavailable`], like a Redis whose
    /// port is closed.
    Down,
    /// No call ever answers, like a Redis that accepts connections and then hangs.
    Stalled,
    /// A working in-memory store whose listings read their data at once and then
    /// take this long to answer: a listing that is reliably in flight.
    SlowList(Duration),
    /// Every call panics, like a store implementation with a bug: for testing that a
    /// panic becomes a `500` and takes nothing else down.
    Panics,
    /// A store of `shards` shards (a node's shard: the sum of its id's bytes, modulo
    /// `shards`) whose shard `down` is [`Fault::Down`], like one dead master of a
    /// cluster: calls about a node of that shard fail, and so do calls about every
    /// node (listings, stats, ping); calls about the other nodes work.
    ShardDown {
        /// How many shards the store says it has (at least 1).
        shards: usize,
        /// The shard that fails.
        down: usize,
    },
}

/// A store with one [`Fault`], counting the calls the fault applies to.
#[derive(Debug)]
pub struct FaultyStore {
    inner: MemoryStore,
    fault: Fault,
    /// Calls that reached the store: every call for [`Fault::Down`],
    /// [`Fault::Stalled`] and [`Fault::Panics`], the failing ones for
    /// [`Fault::ShardDown`], the listings for [`Fault::SlowList`].
    pub calls: AtomicUsize,
    /// Notified each time a listing starts.
    pub list_started: Notify,
}

impl FaultyStore {
    /// A store with `fault`.
    pub fn new(fault: Fault) -> FaultyStore {
        FaultyStore {
            inner: MemoryStore::new(),
            fault,
            calls: AtomicUsize::new(0),
            list_started: Notify::new(),
        }
    }

    /// A store whose every call fails at once ([`Fault::Down`]).
    pub fn down() -> FaultyStore {
        FaultyStore::new(Fault::Down)
    }

    /// A store that never answers ([`Fault::Stalled`]).
    pub fn stalled() -> FaultyStore {
        FaultyStore::new(Fault::Stalled)
    }

    /// A store whose every call panics ([`Fault::Panics`]).
    pub fn panicking() -> FaultyStore {
        FaultyStore::new(Fault::Panics)
    }

    /// A working store whose listings take `delay` ([`Fault::SlowList`]).
    pub fn slow_list(delay: Duration) -> FaultyStore {
        FaultyStore::new(Fault::SlowList(delay))
    }

    /// A store of `shards` shards whose shard `down` fails ([`Fault::ShardDown`]).
    pub fn shard_down(shards: usize, down: usize) -> FaultyStore {
        FaultyStore::new(Fault::ShardDown { shards, down })
    }

    /// [`FaultyStore::fault`] for a call about `node`: with [`Fault::ShardDown`],
    /// a node of another shard than the failing one gets through.
    fn fault_for<T: Send + 'static>(
        &self,
        node: &NodeId,
    ) -> Option<BoxFuture<'static, Result<T, StoreError>>> {
        match self.fault {
            Fault::ShardDown { down, .. } if self.shard_of(node) != down => None,
            _ => self.fault(),
        }
    }

    /// `Some(answer)` when the fault decides the call; `None` lets it through to the
    /// working store.
    fn fault<T: Send + 'static>(&self) -> Option<BoxFuture<'static, Result<T, StoreError>>> {
        match self.fault {
            Fault::Down | Fault::ShardDown { .. } => {
                self.calls.fetch_add(1, Ordering::SeqCst);
                Some(Box::pin(std::future::ready(Err(StoreError::Unavailable(
                    "connection refused (test store that is always down)".to_owned(),
                )))))
            }
            Fault::Stalled => {
                self.calls.fetch_add(1, Ordering::SeqCst);
                Some(Box::pin(std::future::pending()))
            }
            Fault::Panics => {
                self.calls.fetch_add(1, Ordering::SeqCst);
                Some(Box::pin(async {
                    panic!("test store panics on every call")
                }))
            }
            Fault::SlowList(_) => None,
        }
    }

    /// Runs a listing under the fault: counted, announced, read at once (like a real
    /// store, what it returns is as of its start) and answered after the delay.
    fn listing<'a, T: Send + 'static>(
        &'a self,
        read: BoxFuture<'a, Result<T, StoreError>>,
    ) -> BoxFuture<'a, Result<T, StoreError>> {
        if let Some(answer) = self.fault() {
            return answer;
        }
        let Fault::SlowList(delay) = self.fault else {
            return read;
        };
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.list_started.notify_one();
            let result = read.await;
            tokio::time::sleep(delay).await;
            result
        })
    }
}

impl Store for FaultyStore {
    fn login_with<'a>(
        &'a self,
        node: &'a NodeId,
        lease_id: &'a str,
        ttl_ms: u64,
        meta: Meta,
        status: Status,
    ) -> BoxFuture<'a, Result<LoginOutcome, StoreError>> {
        self.fault_for(node)
            .unwrap_or_else(|| self.inner.login_with(node, lease_id, ttl_ms, meta, status))
    }

    fn heartbeat_with<'a>(
        &'a self,
        node: &'a NodeId,
        lease_id: &'a str,
        ttl_ms: u64,
        meta: Option<Meta>,
        status: Option<Status>,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        self.fault_for(node).unwrap_or_else(|| {
            self.inner
                .heartbeat_with(node, lease_id, ttl_ms, meta, status)
        })
    }

    fn logout<'a>(
        &'a self,
        node: &'a NodeId,
        lease_id: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.fault_for(node)
            .unwrap_or_else(|| self.inner.logout(node, lease_id))
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<Node>, StoreError>> {
        self.listing(self.inner.list())
    }

    fn list_json(&self) -> BoxFuture<'_, Result<NodeListJson, StoreError>> {
        self.listing(self.inner.list_json())
    }

    fn query_json<'a>(&'a self, query: &'a Query) -> BoxFuture<'a, Result<Page, StoreError>> {
        self.listing(self.inner.query_json(query))
    }

    fn stats(&self) -> BoxFuture<'_, Result<Stats, StoreError>> {
        self.fault().unwrap_or_else(|| self.inner.stats())
    }

    fn get<'a>(&'a self, node: &'a NodeId) -> BoxFuture<'a, Result<Option<Node>, StoreError>> {
        self.fault_for(node).unwrap_or_else(|| self.inner.get(node))
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        self.fault().unwrap_or_else(|| self.inner.ping())
    }

    fn now_ms(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        self.fault().unwrap_or_else(|| Store::now_ms(&self.inner))
    }

    fn watch<'a>(
        &'a self,
        after: Option<&'a Cursor>,
        options: WatchOptions,
    ) -> BoxFuture<'a, Result<Watch, StoreError>> {
        self.fault()
            .unwrap_or_else(|| self.inner.watch(after, options))
    }

    fn feed_cursor(&self) -> Option<Cursor> {
        self.inner.feed_cursor()
    }

    // `sweep_expired` is the default (nothing to report, never faulted): the server
    // sweeps in the background, and its calls must not count against the fault or
    // the breaker the tests watch.

    fn shard_count(&self) -> usize {
        match self.fault {
            Fault::ShardDown { shards, .. } => shards.max(1),
            _ => 1,
        }
    }

    fn shard_of(&self, node: &NodeId) -> usize {
        let sum: usize = node.as_str().bytes().map(usize::from).sum();
        sum % self.shard_count()
    }

    fn describe(&self) -> String {
        format!("faulty ({:?}, test store)", self.fault)
    }
}
