//! Where presence state lives: the [`Store`] trait and its two implementations,
//! [`MemoryStore`] (one server, embedded default) and [`RedisStore`] (shared by any
//! number of stateless servers).
//!
//! # Semantics (both stores)
//!
//! All times are Unix epoch milliseconds from the **store's** clock (Redis `TIME` for
//! Redis), never the caller's, so servers with skewed clocks agree.
//!
//! - A node is *online* while `now < expires_at_ms`. A node with
//!   `expires_at_ms <= now` is never listed, fetched, heartbeated or logged out, even
//!   if its record has not been garbage-collected yet.
//! - [`Store::login`] always succeeds and replaces whatever was there: the caller's
//!   new lease becomes the only valid one (the old lease is fenced off) and a new
//!   session starts, so `online_since_ms = last_seen_ms = now` and
//!   `expires_at_ms = now + ttl_ms`.
//! - [`Store::heartbeat`] needs an online node ([`StoreError::NotFound`] otherwise)
//!   and its current lease ([`StoreError::LeaseMismatch`] otherwise; the not-online
//!   check comes first). It sets `last_seen_ms = now`, `expires_at_ms = now + ttl_ms`;
//!   `Some(meta)` replaces the meta (no merge), `None` keeps it.
//! - [`Store::logout`] of an online node with its current lease removes it
//!   (`Ok(true)`); a node that is not online gives `Ok(false)` whatever the lease;
//!   an online node with another lease is [`StoreError::LeaseMismatch`].
//! - [`Store::list`] returns the online nodes sorted by `node_id` (byte order).
//!
//! # Outages: self-preservation
//!
//! While the store is unreachable no node can heartbeat, so every lease runs down
//! through no fault of the nodes; without care, a store that comes back after an
//! outage longer than the TTL would find every node expired and the whole list would
//! empty at once (followed by a login stampede). The rule, in the spirit of etcd
//! (which extends leases on leader change) and Eureka (which stops expiring when
//! renewals collapse):
//!
//! > **An outage of length `D` is given back to the leases it interrupted.** When the
//! > store answers again after being unavailable for `D >= MIN_PRESERVED_OUTAGE`
//! > (1 s), every lease that was live when the outage began and has not been renewed
//! > since, i.e. whose `expires_at_ms` lies in `[T - D, T - D + ttl]` with `T` the
//! > store's clock now, moves by `min(D, MAX_PRESERVED_OUTAGE)`. Each such node has
//! > exactly the lease time left that it had when the outage began.
//!
//! - The server measures `D` ([`crate::server`]): from the start of the first store
//!   call that failed (error or timeout) to the first call after the store answers
//!   again, which calls [`Store::extend_after_outage`] before anything else reaches
//!   the store. `D` can be too long by at most the store circuit breaker's open
//!   interval (the first call after recovery waits for it), never too short.
//! - A node that died during the outage is listed for the rest of its lease after the
//!   store returns instead of disappearing during the outage: the trade every
//!   self-preservation scheme makes.
//! - [`RedisStore`] keeps expired records for [`MAX_PRESERVED_OUTAGE`] after their
//!   expiry (invisible: every read compares `expires_at_ms` with the clock), so a
//!   Redis that was paused, partitioned away or slow still has them to move. A Redis
//!   restarted without persistence has lost them anyway; the clients' `keep_alive`
//!   logs them in again on their next heartbeat (`404`).
//! - Several servers on one Redis: the first to recover moves the leases and records
//!   when; a server whose outage began before that record skips, so the outage is
//!   given back once, not once per server.
//! - [`MemoryStore`] lives in the server process and cannot be unreachable; its
//!   [`Store::extend_after_outage`] is the default no-op.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use self::feed::{Cursor, Watch, WatchOptions};
use self::query::{Page, Query};
use crate::model::{Meta, Node, NodeId, Stats, Status};

pub mod faulty;
pub mod feed;
#[cfg(not(feature = "test-util"))]
pub(crate) mod json;
#[cfg(feature = "test-util")]
#[doc(hidden)]
pub mod json;
pub mod memory;
pub mod query;
pub mod redis;

pub use self::faulty::{Fault, FaultyStore};
pub use self::memory::MemoryStore;
pub use self::redis::RedisStore;

/// Shortest outage that is given back to the leases (see the [module docs](self)):
/// shorter ones cost a node less than a second of its lease, less than a heartbeat
/// interval, so they are not worth a pass over every record.
pub const MIN_PRESERVED_OUTAGE: Duration = Duration::from_secs(1);

/// Longest outage that is given back to the leases, and how long [`RedisStore`] keeps
/// expired records around so that it can (see the [module docs](self)). After a
/// longer outage the nodes log in again by themselves.
pub const MAX_PRESERVED_OUTAGE: Duration = Duration::from_secs(300);

/// A boxed, `Send` future, as returned by the object-safe [`Store`] methods.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a successful [`Store::login`] reports (store clock).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoginOutcome {
    /// Start of the new session; also its `last_seen_ms`.
    pub online_since_ms: u64,
    /// `online_since_ms + ttl_ms`.
    pub expires_at_ms: u64,
}

/// The online nodes as the JSON array `GET /presence` answers with: what
/// [`Store::list_json`] returns.
///
/// The text comes in pieces of about [`NodeListJson::CHUNK`] bytes rather than one
/// buffer: a listing of 100 000 nodes is 13.6 MB, and glibc's allocator keeps
/// freed blocks that large in the heap (its mmap threshold adapts upwards), so a
/// server that answered them from single buffers would keep tens of megabytes it no
/// longer uses. Small pieces are reused from one listing to the next instead.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeListJson {
    /// How many nodes the array holds.
    pub count: usize,
    /// `[Node, ...]` sorted by `node_id`, in order: together the same bytes as
    /// `serde_json::to_vec(&store.list().await?)`.
    pub chunks: Vec<bytes::Bytes>,
}

impl NodeListJson {
    /// The size the pieces of [`NodeListJson::chunks`] are cut at (a piece ends
    /// with the first node that reaches it).
    pub const CHUNK: usize = 32 * 1024;

    /// Length of the JSON text in bytes.
    pub fn len(&self) -> usize {
        self.chunks.iter().map(bytes::Bytes::len).sum()
    }

    /// `true` when there is no text at all (never for a listing, which is at least
    /// `[]`).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The JSON text in one buffer (a copy when there is more than one piece).
    pub fn to_bytes(&self) -> bytes::Bytes {
        match self.chunks.as_slice() {
            [] => bytes::Bytes::new(),
            [one] => one.clone(),
            many => many.concat().into(),
        }
    }
}

/// What one [`Store::sweep_expired`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Expiries reported.
    pub expired: u64,
    /// How long after its expiry the latest-reported node was reported, in ms.
    pub lag_ms: u64,
    /// More are due: sweep again at once.
    pub more: bool,
}

/// Why a store operation failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreError {
    /// The node is not online (never seen, logged out or expired).
    NotFound,
    /// The node is online under another lease.
    LeaseMismatch,
    /// The store could not be reached or answered unexpectedly; the message says
    /// why (it never contains credentials).
    Unavailable(String),
    /// The store is up but refuses this write: out of memory (`OOM`), a read-only
    /// replica (`READONLY`), a failed snapshot (`MISCONF`). Reads still work, so this
    /// does not count against the store's health.
    Refused(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::NotFound => f.write_str("node is not online"),
            StoreError::LeaseMismatch => f.write_str("lease is not the node's current lease"),
            StoreError::Unavailable(why) => write!(f, "store unavailable: {why}"),
            StoreError::Refused(why) => write!(f, "store refused the write: {why}"),
        }
    }
}

impl std::error::Error for StoreError {}

/// Presence state storage. Object safe: servers hold an `Arc<dyn Store>`.
///
/// The returned futures may borrow the arguments (keep them until the future is
/// done), so an implementation copies only what must outlive the call; they do
/// nothing until polled. See the [module docs](self) for the exact semantics every
/// implementation follows.
pub trait Store: Send + Sync + 'static {
    /// Starts a new session for `node` under `lease_id` with status `up`: see
    /// [`Store::login_with`].
    fn login<'a>(
        &'a self,
        node: &'a NodeId,
        lease_id: &'a str,
        ttl_ms: u64,
        meta: Meta,
    ) -> BoxFuture<'a, Result<LoginOutcome, StoreError>> {
        self.login_with(node, lease_id, ttl_ms, meta, Status::Up)
    }

    /// Starts a new session for `node` under `lease_id` (always succeeds unless the
    /// store is unavailable), replacing any previous session and lease.
    fn login_with<'a>(
        &'a self,
        node: &'a NodeId,
        lease_id: &'a str,
        ttl_ms: u64,
        meta: Meta,
        status: Status,
    ) -> BoxFuture<'a, Result<LoginOutcome, StoreError>>;

    /// Extends an online node's session, keeping its status: see
    /// [`Store::heartbeat_with`].
    fn heartbeat<'a>(
        &'a self,
        node: &'a NodeId,
        lease_id: &'a str,
        ttl_ms: u64,
        meta: Option<Meta>,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        self.heartbeat_with(node, lease_id, ttl_ms, meta, None)
    }

    /// Extends an online node's session; returns the new `expires_at_ms`.
    /// `Some(meta)` replaces the meta, `None` keeps it; `Some(status)` replaces the
    /// status, `None` keeps it. A heartbeat that changes the meta or the status is an
    /// `update` in the feed; one that only moves time is none.
    fn heartbeat_with<'a>(
        &'a self,
        node: &'a NodeId,
        lease_id: &'a str,
        ttl_ms: u64,
        meta: Option<Meta>,
        status: Option<Status>,
    ) -> BoxFuture<'a, Result<u64, StoreError>>;

    /// Ends an online node's session; `Ok(false)` if it was not online.
    fn logout<'a>(
        &'a self,
        node: &'a NodeId,
        lease_id: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Every online node, sorted by `node_id`.
    fn list(&self) -> BoxFuture<'_, Result<Vec<Node>, StoreError>>;

    /// [`Store::list`], serialized as the JSON array `GET /presence` answers with.
    ///
    /// The default serializes [`Store::list`]. Both stores override it to write the
    /// array straight from their records (the meta is kept as JSON text, so it is
    /// copied, not decoded and encoded again): for a large listing that is several
    /// times faster and allocates one buffer instead of a tree per node.
    fn list_json(&self) -> BoxFuture<'_, Result<NodeListJson, StoreError>> {
        Box::pin(async move {
            let nodes = self.list().await?;
            let json = serde_json::to_vec(&nodes)
                .map_err(|e| StoreError::Unavailable(format!("cannot encode the list: {e}")))?;
            Ok(NodeListJson {
                count: nodes.len(),
                chunks: vec![json.into()],
            })
        })
    }

    /// One page of the online nodes a [`Query`] selects, sorted by `node_id`, as
    /// the JSON array `GET /presence` answers with (see [`query`] for matching).
    ///
    /// The default filters [`Store::list`]: it reads every node. Both stores
    /// override it so that a page costs what the page costs (an index in `node_id`
    /// order), not what the deployment costs.
    fn query_json<'a>(&'a self, query: &'a Query) -> BoxFuture<'a, Result<Page, StoreError>> {
        Box::pin(async move {
            let nodes = self.list().await?;
            let mut list = json::ListWriter::with_capacity(0);
            let (mut next_after, mut last) = (None, None);
            for node in nodes.iter().filter(|n| query.in_range(&n.node_id)) {
                let meta = serde_json::to_vec(&node.meta)
                    .map_err(|e| StoreError::Unavailable(format!("cannot encode meta: {e}")))?;
                let meta = (!node.meta.is_empty()).then_some(meta.as_slice());
                if !query.filter().matches(&node.node_id, node.status, meta) {
                    continue;
                }
                if query.limit_value().is_some_and(|l| list.count() == l) {
                    next_after = last.map(str::to_owned);
                    break;
                }
                last = Some(node.node_id.as_str());
                list.push(
                    &node.node_id,
                    node.status,
                    meta,
                    node.online_since_ms,
                    node.last_seen_ms,
                    node.expires_at_ms,
                );
            }
            Ok(Page {
                json: list.finish(),
                next_after,
            })
        })
    }

    /// How many nodes are online, in all and by status (`GET /presence/stats`).
    /// A node counts from its login until its `leave` is in the feed: a node that
    /// expired is counted out by [`Store::sweep_expired`], which the server runs
    /// every 100 ms.
    ///
    /// The default counts [`Store::list`]. Both stores override it with counters
    /// their writes keep, so that it reads no node.
    fn stats(&self) -> BoxFuture<'_, Result<Stats, StoreError>> {
        Box::pin(async move {
            let mut counts = [0u64; 3];
            for node in self.list().await? {
                counts[node.status.index()] += 1;
            }
            Ok(Stats::from_counts(counts))
        })
    }

    /// One node if it is online.
    fn get<'a>(&'a self, node: &'a NodeId) -> BoxFuture<'a, Result<Option<Node>, StoreError>>;

    /// Succeeds when the store answers (readiness probe).
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>>;

    /// The store clock: Unix epoch milliseconds.
    fn now_ms(&self) -> BoxFuture<'_, Result<u64, StoreError>>;

    /// Self-preservation after an outage of length `outage` (see the
    /// [module docs](self#outages-self-preservation) for the rule): moves every lease
    /// whose `expires_at_ms` lies in `[now - outage, now - outage + max_ttl_ms]` by
    /// `outage`, unless another server already did so for this outage. Returns how
    /// many leases moved.
    ///
    /// The default does nothing and returns `Ok(0)`: right for a store that cannot be
    /// unreachable, like [`MemoryStore`].
    fn extend_after_outage(
        &self,
        outage: Duration,
        max_ttl_ms: u64,
    ) -> BoxFuture<'_, Result<u64, StoreError>> {
        let _ = (outage, max_ttl_ms);
        Box::pin(std::future::ready(Ok(0)))
    }

    /// Subscribes to the store's change feed (see [`feed`] for the contract): where a
    /// watcher that last saw `after` starts, and every change from then on.
    ///
    /// The default has no feed: [`StoreError::Unavailable`].
    fn watch<'a>(
        &'a self,
        after: Option<&'a Cursor>,
        options: WatchOptions,
    ) -> BoxFuture<'a, Result<Watch, StoreError>> {
        let _ = (after, options);
        Box::pin(std::future::ready(Err(StoreError::Unavailable(
            "this store has no change feed".to_owned(),
        ))))
    }

    /// The feed's cursor now (`Presence-Cursor` of a listing made after this call):
    /// `None` if the store has no feed or does not know it yet.
    fn feed_cursor(&self) -> Option<Cursor> {
        None
    }

    /// How long the feed keeps changes for resuming watchers
    /// (`PRESENCE_WATCH_RETENTION_SEC`). The default ignores it.
    fn set_feed_retention(&self, retention: Duration) {
        let _ = retention;
    }

    /// Finds the nodes whose lease has run out and reports each as a `leave` with
    /// reason `expired`, exactly once however many servers sweep one store. Returns
    /// what it did; run it often (the server does, every 100 ms) so that expiries are
    /// reported promptly.
    ///
    /// The default reports nothing.
    fn sweep_expired(&self) -> BoxFuture<'_, Result<Sweep, StoreError>> {
        Box::pin(std::future::ready(Ok(Sweep::default())))
    }

    /// Checks that the stored deployment is one this store can serve (a
    /// [`RedisStore`]: the shard count it was created with). A server runs it at
    /// start and exits if it fails with [`StoreError::Refused`]; the store's own
    /// calls refuse until it passes. The default passes.
    ///
    /// # Errors
    /// [`StoreError::Refused`] for a deployment of another shape (the message names
    /// both), [`StoreError::Unavailable`] if the store does not answer.
    fn check_deployment(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(std::future::ready(Ok(())))
    }

    /// How many shards the store spreads nodes over (default 1). A server gives an
    /// outage back to the shards it hit only ([`Store::shard_store`]).
    fn shard_count(&self) -> usize {
        1
    }

    /// The shard `node` lives in, below [`Store::shard_count`] (default 0).
    fn shard_of(&self, node: &NodeId) -> usize {
        let _ = node;
        0
    }

    /// Shard `shard` as a store of its own (its calls, ping and outage
    /// recovery reach that shard alone), or `None` for a store of one shard, which
    /// is its own.
    fn shard_store(&self, shard: usize) -> Option<Arc<dyn Store>> {
        let _ = shard;
        None
    }

    /// One line for the start-up log, e.g. `memory (single server only)` or
    /// `redis redis://host:6379/ prefix presence` (credentials redacted).
    fn describe(&self) -> String;
}

/// Opens the store a URI names (`PRESENCE_REDIS_URI`, see the README's Configuration):
/// `None`, `""` or `memory://` -> [`MemoryStore`] (logged at `info`: single server
/// only); `redis://` or `rediss://` -> [`RedisStore`] with key namespace `prefix`.
///
/// Redis is connected lazily ([`RedisOptions::lazy`](redis::RedisOptions::lazy)): a
/// server started while Redis is down starts anyway, answers `503` (and `/readyz`
/// `503`) and serves as soon as Redis answers, like after any other outage.
///
/// # Errors
/// [`StoreError::Unavailable`] for an unknown scheme, an invalid URI or prefix.
pub async fn open(uri: Option<&str>, prefix: &str) -> Result<Arc<dyn Store>, StoreError> {
    open_with(uri, prefix, redis::RedisOptions::default().lazy(true)).await
}

/// [`open`] as the configuration says: `PRESENCE_REDIS_URI`, `PRESENCE_KEY_PREFIX`,
/// and `PRESENCE_REDIS_CA_FILE` for a `rediss://` Redis with a private CA.
///
/// # Errors
/// As for [`open`].
pub async fn open_for(config: &crate::config::Config) -> Result<Arc<dyn Store>, StoreError> {
    let mut options = redis::RedisOptions::default()
        .lazy(true)
        .cluster(config.redis_mode == crate::config::RedisMode::Cluster)
        .shards(config.shards);
    options.tls_ca_pem = config.redis_ca.as_ref().map(|(_, pem)| pem.clone());
    open_with(config.store_uri.as_deref(), &config.key_prefix, options).await
}

async fn open_with(
    uri: Option<&str>,
    prefix: &str,
    options: redis::RedisOptions,
) -> Result<Arc<dyn Store>, StoreError> {
    match uri.map(str::trim) {
        None | Some("") => Ok(memory()),
        Some(u) if has_scheme(u, "memory") => Ok(memory()),
        Some(u) if has_scheme(u, "redis") || has_scheme(u, "rediss") => Ok(Arc::new(
            RedisStore::connect_with(u, prefix, options).await?,
        )),
        Some(u) => Err(StoreError::Unavailable(format!(
            "unsupported store URI {:?}: expected memory://, redis:// or rediss://",
            redact_uri(u)
        ))),
    }
}

fn memory() -> Arc<dyn Store> {
    tracing::info!(
        "using the in-memory presence store: it is for a single server only \
         (set PRESENCE_REDIS_URI=redis://... to share state between servers)"
    );
    Arc::new(MemoryStore::new())
}

fn has_scheme(uri: &str, scheme: &str) -> bool {
    uri.get(..scheme.len() + 3)
        .is_some_and(|head| head.eq_ignore_ascii_case(&format!("{scheme}://")))
}

/// Shard `shard` of `store` as a store of its own ([`Store::shard_store`]), or
/// `store` itself when it has one shard.
pub(crate) fn shard(store: &Arc<dyn Store>, shard: usize) -> Arc<dyn Store> {
    store.shard_store(shard).unwrap_or_else(|| store.clone())
}

/// The first 16 bytes of a node id as a big-endian integer (zero-padded): ordered
/// like the ids themselves up to ties (a shorter id that is a prefix of a longer one
/// sorts first either way). Both stores sort listings on it, so that most
/// comparisons end without following a pointer.
pub(crate) fn sort_key(id: &[u8]) -> u128 {
    let mut key = [0u8; 16];
    let n = id.len().min(16);
    key[..n].copy_from_slice(&id[..n]);
    u128::from_be_bytes(key)
}

/// `uri` with any `user:password@` part replaced by `***@`, for logs and errors.
pub(crate) fn redact_uri(uri: &str) -> String {
    let Some(scheme_end) = uri.find("://") else {
        return uri.to_owned();
    };
    let rest = &uri[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{}://***@{}", &uri[..scheme_end], &rest[at + 1..]),
        None => uri.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sort_keys_sort_like_the_bytes() {
        let mut ids: Vec<&[u8]> = vec![
            b"b",
            b"a",
            b"aaaaaaaaaaaaaaaab",
            b"aaaaaaaaaaaaaaaaa",
            b"",
            b"a\x00",
        ];
        let mut by_key = ids.clone();
        ids.sort_unstable();
        by_key.sort_unstable_by(|a, b| sort_key(a).cmp(&sort_key(b)).then_with(|| a.cmp(b)));
        assert_eq!(ids, by_key);
    }

    #[test]
    fn redacts_credentials() {
        assert_eq!(
            redact_uri("redis://user:pw@host:6379/0"),
            "redis://***@host:6379/0"
        );
        assert_eq!(redact_uri("redis://:pw@host"), "redis://***@host");
        assert_eq!(redact_uri("redis://host:6379"), "redis://host:6379");
    }

    #[test]
    fn schemes() {
        assert!(has_scheme("memory://", "memory"));
        assert!(has_scheme("REDIS://h", "redis"));
        assert!(!has_scheme("rediss://h", "redis"));
        assert!(has_scheme("rediss://h", "rediss"));
        assert!(!has_scheme("redis:/h", "redis"));
    }

    #[tokio::test]
    async fn open_picks_memory_and_rejects_unknown_schemes() {
        for uri in [None, Some(""), Some("memory://")] {
            let store = open(uri, "p").await.map_err(|e| e.to_string());
            assert!(store.is_ok_and(|s| s.describe().starts_with("memory")));
        }
        let err = open(Some("ftp://u:secret@h"), "p").await.err();
        assert!(
            matches!(&err, Some(StoreError::Unavailable(m)) if !m.contains("secret")),
            "{err:?}"
        );
    }
}
