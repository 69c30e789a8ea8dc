//! [`MemoryStore`]: presence state in process memory, for a single server.

use std::collections::{BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard, TryLockError};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use super::feed::{
    Change, ChangeKind, Cursor, Hub, HubStart, LeaveReason, Position, Watch, WatchOptions,
    WatchStart,
};
use super::json::{ListWriter, NODE_OVERHEAD};
use super::query::{labels_of, Page, Query};
use super::{sort_key, BoxFuture, LoginOutcome, NodeListJson, Store, StoreError, Sweep};
use crate::model::{Meta, Node, NodeId, Stats, Status};

const SHARDS: usize = 32;

/// How often (store clock) a write sweeps expired records out of memory.
const PURGE_INTERVAL_MS: u64 = 1_000;

/// Most changes the feed keeps for resuming watchers (besides the retention time):
/// bounds its memory under churn (about 200 bytes a change).
const MAX_FEED_CHANGES: usize = 100_000;

/// Presence state in process memory: the embedded default for **one** server (each
/// server process would see only its own nodes; use [`RedisStore`](super::RedisStore)
/// to share state).
///
/// - Sharded `RwLock<HashMap>`s; locks are never held across an `.await`.
/// - Compact: a record is the id, the lease, the meta as its serialized JSON and
///   three `u64`s: 100 000 nodes with a small meta take about 25 MB.
/// - Listing copies two shared pointers and three `u64`s per node under the read
///   locks, sorts after releasing them and writes the JSON array straight from the
///   copies ([`Store::list_json`]), the meta text as it is stored.
/// - Clock: the wall clock read once at construction plus the elapsed
///   [`tokio::time::Instant`], so tests on paused tokio time expire nodes
///   deterministically.
/// - Expired records are invisible at once and swept out by [`Store::sweep_expired`]
///   (the server runs it every 100 ms) and opportunistically by writes and listings
///   (at most once per second), so memory is bounded by the online nodes plus one
///   second's worth of logins. Each removal of an expired record is its `expired`
///   change.
/// - The change feed ([`Store::watch`]) is a log of the last
///   `PRESENCE_WATCH_RETENTION_SEC` (at most 100 000 changes), written under the
///   lock of the node's shard, so each node's changes are in order. Its epoch is
///   random: a cursor from another process gets a snapshot.
#[derive(Debug)]
pub struct MemoryStore {
    shards: Box<[Shard]>,
    base_ms: u64,
    base: Instant,
    next_purge_ms: AtomicU64,
    /// The rows of the last listing, emptied, kept for the next one: the vector is
    /// as long as the node count (7 MB for 100 000 nodes), and allocating it anew for
    /// every listing either faults its pages in again or, as glibc's mmap threshold
    /// adapts, leaves a freed copy behind in the heap. Kept, it costs neither.
    scratch: Mutex<Vec<Row>>,
    /// The change feed.
    hub: Hub,
    /// Every record's id in `node_id` order, for pages and prefixes: written only
    /// when a record is added or removed (a heartbeat does not touch it). Lock order:
    /// a shard, then this.
    index: RwLock<BTreeSet<Arc<str>>>,
    /// The ids of the records with each label (see
    /// [labels](super::query#labels-the-index-of-meta-values)), in `node_id` order:
    /// a meta filter reads the nodes it selects, not every record. Written when a
    /// record is added or removed, or its labels change. Lock order: a shard, then
    /// this (never together with `index`).
    labels: RwLock<HashMap<Box<str>, BTreeSet<Arc<str>>>>,
    /// Records held by status ([`Status::index`]), kept by every write under the
    /// record's shard lock: `GET /presence/stats` reads no record.
    counts: [AtomicU64; 3],
}

// Ids are shared (`Arc`) so that a listing can hold on to them without copying.
type Shard = RwLock<HashMap<Arc<str>, Entry>>;

#[derive(Debug)]
struct Entry {
    lease: Box<str>,
    status: Status,
    /// Serialized JSON object; `None` stands for `{}` (the common case costs nothing).
    meta: Option<Arc<str>>,
    /// The meta's labels, as the label index holds them (empty for most metas).
    labels: Labels,
    online_since_ms: u64,
    last_seen_ms: u64,
    expires_at_ms: u64,
}

/// A record's labels (see [`labels_of`]).
type Labels = Box<[Box<str>]>;

fn labels(meta: &Meta) -> Labels {
    labels_of(meta)
        .into_iter()
        .map(String::into_boxed_str)
        .collect()
}

impl Entry {
    fn online(&self, now: u64) -> bool {
        now < self.expires_at_ms
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store whose clock starts at the current wall-clock time.
    pub fn new() -> Self {
        let base_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(crate::millis)
            .unwrap_or(0);
        MemoryStore {
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
            base_ms,
            base: Instant::now(),
            next_purge_ms: AtomicU64::new(base_ms.saturating_add(PURGE_INTERVAL_MS)),
            scratch: Mutex::default(),
            hub: Hub::new(Some(random_epoch()), Position::default(), MAX_FEED_CHANGES),
            index: RwLock::default(),
            labels: RwLock::default(),
            counts: Default::default(),
        }
    }

    /// The store clock: Unix epoch milliseconds.
    pub fn now_ms(&self) -> u64 {
        let elapsed = crate::millis(self.base.elapsed());
        self.base_ms.saturating_add(elapsed)
    }

    /// Number of records held, including expired ones not swept out yet.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| read(s).len()).sum()
    }

    /// `true` when no record is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes every expired record now, each reported as its `expired` change;
    /// returns how many were removed.
    pub fn purge_expired(&self) -> usize {
        self.sweep().expired.try_into().unwrap_or(usize::MAX)
    }

    fn sweep(&self) -> Sweep {
        let now = self.now_ms();
        let mut sweep = Sweep::default();
        let mut gone = Vec::new();
        for shard in self.shards.iter() {
            let mut map = write(shard);
            let before = map.len();
            map.retain(|id, e| {
                if e.online(now) {
                    return true;
                }
                sweep.lag_ms = sweep.lag_ms.max(now - e.expires_at_ms);
                self.expired(id, e, now);
                gone.push((id.clone(), std::mem::take(&mut e.labels)));
                false
            });
            if !gone.is_empty() {
                let mut index = write(&self.index);
                for (id, _) in &gone {
                    index.remove(id);
                }
                drop(index);
                for (id, labels) in gone.drain(..) {
                    self.relabel(&id, &labels, &[]);
                }
            }
            sweep.expired += (before - map.len()) as u64;
            if map.capacity() > 64 && map.capacity() > 4 * map.len() {
                map.shrink_to_fit();
            }
        }
        sweep
    }

    /// Publishes that `node` expired and counts it out (called under its shard's
    /// lock, as it is removed).
    fn expired(&self, node: &str, e: &Entry, now: u64) {
        self.count(e.status, false);
        self.hub
            .publish_next(Change::leave(node, LeaveReason::Expired), now);
    }

    /// Counts a record of `status` in (`true`) or out (under its shard's lock).
    fn count(&self, status: Status, add: bool) {
        let counter = &self.counts[status.index()];
        if add {
            counter.fetch_add(1, Ordering::Relaxed);
        } else {
            counter.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Removes `node`'s record (under its shard's lock, held as `map`), from the
    /// index and the counts too.
    fn remove(&self, map: &mut HashMap<Arc<str>, Entry>, node: &str) -> Option<Entry> {
        let (id, entry) = map.remove_entry(node)?;
        write(&self.index).remove(&id);
        self.relabel(&id, &entry.labels, &[]);
        Some(entry)
    }

    /// Moves `node` from the labels `old` to the labels `new` in the label index
    /// (under its shard's lock).
    fn relabel(&self, node: &Arc<str>, old: &[Box<str>], new: &[Box<str>]) {
        if old == new {
            return;
        }
        let mut labels = write(&self.labels);
        for label in old.iter().filter(|l| !new.contains(l)) {
            if let Some(ids) = labels.get_mut(label) {
                ids.remove(node);
                if ids.is_empty() {
                    labels.remove(label);
                }
            }
        }
        for label in new.iter().filter(|l| !old.contains(l)) {
            labels
                .entry(label.clone())
                .or_default()
                .insert(node.clone());
        }
    }

    /// Publishes a join or update of `node` (under its shard's lock).
    fn changed(&self, kind: ChangeKind, node: &str, e: &Entry, now: u64) {
        let change = Change::node(
            kind,
            node,
            e.status,
            e.meta.as_deref().map(str::as_bytes),
            e.online_since_ms,
            e.last_seen_ms,
            e.expires_at_ms,
        );
        self.hub.publish_next(change, now);
    }

    fn maybe_purge(&self, now: u64) {
        let due = self.next_purge_ms.load(Ordering::Relaxed);
        // Only the caller that wins the exchange sweeps; the others carry on.
        if now >= due
            && self
                .next_purge_ms
                .compare_exchange(
                    due,
                    now.saturating_add(PURGE_INTERVAL_MS),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            self.purge_expired();
        }
    }

    fn shard(&self, node: &str) -> &Shard {
        // A plain polynomial hash: the shards only spread the locks, and each shard's
        // map hashes the id again with a keyed hasher, so ids chosen to collide cost
        // lock sharing, never map performance.
        let h = node
            .bytes()
            .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
        &self.shards[h as usize % self.shards.len()]
    }

    fn login_sync(
        &self,
        node: &NodeId,
        lease_id: &str,
        ttl_ms: u64,
        meta: &Meta,
        status: Status,
    ) -> Result<LoginOutcome, StoreError> {
        let labels = labels(meta);
        let meta = encode_meta(meta)?;
        let now = self.now_ms();
        self.maybe_purge(now);
        let expires_at_ms = now.saturating_add(ttl_ms);
        let entry = Entry {
            lease: lease_id.into(),
            status,
            meta,
            labels,
            online_since_ms: now,
            last_seen_ms: now,
            expires_at_ms,
        };
        let mut map = write(self.shard(node.as_str()));
        let id = map.get_key_value(node.as_str()).map(|(id, _)| id.clone());
        match (id, map.get_mut(node.as_str())) {
            (Some(id), Some(old)) => {
                if old.online(now) {
                    self.count(old.status, false);
                } else {
                    self.expired(node.as_str(), old, now);
                }
                self.count(status, true);
                self.changed(ChangeKind::Join, node.as_str(), &entry, now);
                self.relabel(&id, &old.labels, &entry.labels);
                *old = entry;
            }
            _ => {
                self.count(status, true);
                self.changed(ChangeKind::Join, node.as_str(), &entry, now);
                let id: Arc<str> = node.as_str().into();
                write(&self.index).insert(id.clone());
                self.relabel(&id, &[], &entry.labels);
                map.insert(id, entry);
            }
        }
        drop(map);
        Ok(LoginOutcome {
            online_since_ms: now,
            expires_at_ms,
        })
    }

    fn heartbeat_sync(
        &self,
        node: &NodeId,
        lease_id: &str,
        ttl_ms: u64,
        meta: Option<&Meta>,
        status: Option<Status>,
    ) -> Result<u64, StoreError> {
        let encoded = meta.map(encode_meta).transpose()?;
        let now = self.now_ms();
        self.maybe_purge(now);
        let mut map = write(self.shard(node.as_str()));
        let entry = match map.get_mut(node.as_str()) {
            Some(e) if e.online(now) => e,
            Some(_) => {
                if let Some(old) = self.remove(&mut map, node.as_str()) {
                    self.expired(node.as_str(), &old, now);
                }
                return Err(StoreError::NotFound);
            }
            None => return Err(StoreError::NotFound),
        };
        if *entry.lease != *lease_id {
            return Err(StoreError::LeaseMismatch);
        }
        entry.last_seen_ms = now;
        entry.expires_at_ms = now.saturating_add(ttl_ms);
        // Only a meta or status that differs is a change: a heartbeat that moves
        // time is none.
        let mut changed = false;
        let mut relabel = None;
        if let Some(encoded) = encoded.filter(|m| *m != entry.meta) {
            entry.meta = encoded;
            let new = meta.map(labels).unwrap_or_default();
            if new != entry.labels {
                relabel = Some(std::mem::replace(&mut entry.labels, new));
            }
            changed = true;
        }
        if let Some(status) = status.filter(|s| *s != entry.status) {
            self.count(entry.status, false);
            self.count(status, true);
            entry.status = status;
            changed = true;
        }
        if changed {
            self.changed(ChangeKind::Update, node.as_str(), entry, now);
        }
        let expires_at_ms = entry.expires_at_ms;
        if let Some(old) = relabel {
            let new = entry.labels.clone();
            if let Some((id, _)) = map.get_key_value(node.as_str()) {
                self.relabel(id, &old, &new);
            }
        }
        Ok(expires_at_ms)
    }

    fn logout_sync(&self, node: &NodeId, lease_id: &str) -> Result<bool, StoreError> {
        let now = self.now_ms();
        let mut map = write(self.shard(node.as_str()));
        match map.get(node.as_str()) {
            None => Ok(false),
            Some(e) if !e.online(now) => {
                if let Some(old) = self.remove(&mut map, node.as_str()) {
                    self.expired(node.as_str(), &old, now);
                }
                Ok(false)
            }
            Some(e) if *e.lease != *lease_id => Err(StoreError::LeaseMismatch),
            Some(_) => {
                if let Some(old) = self.remove(&mut map, node.as_str()) {
                    self.count(old.status, false);
                }
                self.hub
                    .publish_next(Change::leave(node.as_str(), LeaveReason::Logout), now);
                Ok(true)
            }
        }
    }

    fn list_sync(&self) -> Result<Vec<Node>, StoreError> {
        let now = self.now_ms();
        self.maybe_purge(now);
        // Copy under the lock (cheap: the meta is shared), decode after releasing it.
        let mut raw = Vec::new();
        for shard in self.shards.iter() {
            let map = read(shard);
            raw.reserve(map.len());
            raw.extend(
                map.iter()
                    .filter(|(_, e)| e.online(now))
                    .map(|(id, e)| snapshot(id, e)),
            );
        }
        raw.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        raw.into_iter().map(Snapshot::into_node).collect()
    }

    fn list_json_sync(&self) -> NodeListJson {
        self.scan_json(None)
    }

    /// The listing, of every online node or of those `query` selects (its filter
    /// and `after`; no limit): one pass over the shards, then a sort of what was
    /// kept.
    fn scan_json(&self, query: Option<&Query>) -> NodeListJson {
        let now = self.now_ms();
        self.maybe_purge(now);
        // Concurrent listings (several services on one store) get a fresh vector.
        let mut kept = match self.scratch.try_lock() {
            Ok(rows) => Some(rows),
            Err(TryLockError::Poisoned(rows)) => Some(rows.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        };
        let mut fresh = Vec::new();
        let rows: &mut Vec<Row> = kept.as_deref_mut().unwrap_or(&mut fresh);
        rows.clear();
        let mut bytes = 0;
        for shard in self.shards.iter() {
            let map = read(shard);
            rows.reserve(map.len());
            let selected = |id: &str, e: &Entry| {
                e.online(now)
                    && query.is_none_or(|q| {
                        q.in_range(id)
                            && q.filter().matches(
                                id,
                                e.status,
                                e.meta.as_deref().map(str::as_bytes),
                            )
                    })
            };
            for (id, e) in map.iter().filter(|(id, e)| selected(id, e)) {
                bytes += id.len() + e.meta.as_deref().map_or(2, str::len) + NODE_OVERHEAD;
                rows.push(Row {
                    key: sort_key(id.as_bytes()),
                    id: id.clone(),
                    status: e.status,
                    meta: e.meta.clone(),
                    online_since_ms: e.online_since_ms,
                    last_seen_ms: e.last_seen_ms,
                    expires_at_ms: e.expires_at_ms,
                });
            }
        }
        // Ties on the first 16 bytes are rare; only then follow the pointers.
        rows.sort_unstable_by(|a, b| a.key.cmp(&b.key).then_with(|| a.id.cmp(&b.id)));
        let mut list = ListWriter::with_capacity(bytes + 2);
        for row in rows.iter() {
            list.push(
                &row.id,
                row.status,
                row.meta.as_deref().map(str::as_bytes),
                row.online_since_ms,
                row.last_seen_ms,
                row.expires_at_ms,
            );
        }
        // Drop the shared pointers now; keep the room unless the store shrank a lot.
        let len = rows.len();
        rows.clear();
        if rows.capacity() > 4 * len.max(1024) {
            rows.shrink_to(len);
        }
        list.finish()
    }

    fn query_json_sync(&self, query: &Query) -> Page {
        // Ids are copied out of the index a batch at a time and looked up after
        // releasing it (writers take a shard, then the index: the other order here
        // could deadlock).
        const BATCH: usize = 512;
        // A meta filter with a label reads the ids with that label; otherwise the
        // ids of the range.
        let label = query.filter().label();
        if query.limit_value().is_none()
            && query.filter().prefix_value().is_none()
            && label.is_none()
        {
            // Everything the filter selects, and no prefix or label to narrow the
            // index with: one pass over the shards is cheaper than a lookup per id.
            return Page {
                json: self.scan_json(Some(query)),
                next_after: None,
            };
        }
        let now = self.now_ms();
        self.maybe_purge(now);
        let filter = query.filter();
        let want = query.limit_value().unwrap_or(usize::MAX);
        let mut from: Bound<Arc<str>> = match query.scan_start() {
            None => Bound::Unbounded,
            Some((id, true)) => Bound::Included(id.into()),
            Some((id, false)) => Bound::Excluded(id.into()),
        };
        let mut list = ListWriter::with_capacity(want.min(BATCH) * 128);
        let mut last: Option<Arc<str>> = None;
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            batch.clear();
            let range = (from.as_ref().map(|id| &**id), Bound::Unbounded);
            match label.as_deref() {
                None => batch.extend(
                    read(&self.index)
                        .range::<str, _>(range)
                        .take(BATCH)
                        .cloned(),
                ),
                Some(label) => {
                    if let Some(ids) = read(&self.labels).get(label) {
                        batch.extend(ids.range::<str, _>(range).take(BATCH).cloned());
                    }
                }
            }
            let Some(end) = batch.last() else { break };
            from = Bound::Excluded(end.clone());
            for id in &batch {
                if query.scan_done(id) {
                    return Page {
                        json: list.finish(),
                        next_after: None,
                    };
                }
                let map = read(self.shard(id));
                let Some(e) = map.get(id).filter(|e| e.online(now)) else {
                    continue;
                };
                let meta = e.meta.as_deref().map(str::as_bytes);
                if !filter.matches(id, e.status, meta) {
                    continue;
                }
                if list.count() == want {
                    drop(map);
                    return Page {
                        json: list.finish(),
                        next_after: last.map(|id| id.to_string()),
                    };
                }
                list.push(
                    id,
                    e.status,
                    meta,
                    e.online_since_ms,
                    e.last_seen_ms,
                    e.expires_at_ms,
                );
                drop(map);
                last = Some(id.clone());
            }
        }
        Page {
            json: list.finish(),
            next_after: None,
        }
    }

    /// Online nodes by status, from the counters (a record counts until its expiry
    /// is swept and reported; expired ones are swept at least once a second here
    /// and every 100 ms by the server).
    fn stats_sync(&self) -> Stats {
        self.maybe_purge(self.now_ms());
        Stats::from_counts(self.counts.each_ref().map(|c| c.load(Ordering::Relaxed)))
    }

    fn get_sync(&self, node: &NodeId) -> Result<Option<Node>, StoreError> {
        let now = self.now_ms();
        let snap = read(self.shard(node.as_str()))
            .get_key_value(node.as_str())
            .filter(|(_, e)| e.online(now))
            .map(|(id, e)| snapshot(id, e));
        snap.map(Snapshot::into_node).transpose()
    }
}

/// What a listing copies of one record under the lock: no allocation, two
/// reference counts.
#[derive(Debug)]
struct Row {
    /// The first 16 bytes of `id`: most comparisons end here, without following the
    /// pointer (sorting is most of a large listing's time otherwise).
    key: u128,
    id: Arc<str>,
    status: Status,
    meta: Option<Arc<str>>,
    online_since_ms: u64,
    last_seen_ms: u64,
    expires_at_ms: u64,
}

/// A copy of one record taken under the lock and decoded after releasing it.
struct Snapshot {
    id: Box<str>,
    status: Status,
    meta: Option<Arc<str>>,
    online_since_ms: u64,
    last_seen_ms: u64,
    expires_at_ms: u64,
}

fn snapshot(id: &str, e: &Entry) -> Snapshot {
    Snapshot {
        id: id.into(),
        status: e.status,
        meta: e.meta.clone(),
        online_since_ms: e.online_since_ms,
        last_seen_ms: e.last_seen_ms,
        expires_at_ms: e.expires_at_ms,
    }
}

impl Snapshot {
    fn into_node(self) -> Result<Node, StoreError> {
        let meta = match self.meta {
            None => Meta::new(),
            Some(json) => serde_json::from_str(&json)
                .map_err(|e| StoreError::Unavailable(format!("stored meta is corrupt: {e}")))?,
        };
        Ok(Node {
            node_id: self.id.into(),
            status: self.status,
            meta,
            online_since_ms: self.online_since_ms,
            last_seen_ms: self.last_seen_ms,
            expires_at_ms: self.expires_at_ms,
        })
    }
}

/// A feed epoch no other process is likely to have chosen.
fn random_epoch() -> u64 {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        // No OS randomness: the clock in ns is still unlikely to repeat.
        let ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        return u64::try_from(ns % u128::from(u64::MAX)).unwrap_or(1);
    }
    u64::from_be_bytes(bytes)
}

fn encode_meta(meta: &Meta) -> Result<Option<Arc<str>>, StoreError> {
    if meta.is_empty() {
        return Ok(None);
    }
    serde_json::to_string(meta)
        .map(|s| Some(Arc::from(s)))
        .map_err(|e| StoreError::Unavailable(format!("cannot encode meta: {e}")))
}

// A panic while a lock is held cannot leave an entry half-written (every mutation is
// a single assignment or insert), so a poisoned lock is still consistent.
fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

// The futures copy their arguments and act when polled, not when created, like any
// other future (a timed-out or dropped call that never ran has no effect).
impl Store for MemoryStore {
    fn login_with<'a>(
        &'a self,
        node: &'a NodeId,
        lease_id: &'a str,
        ttl_ms: u64,
        meta: Meta,
        status: Status,
    ) -> BoxFuture<'a, Result<LoginOutcome, StoreError>> {
        Box::pin(async move { self.login_sync(node, lease_id, ttl_ms, &meta, status) })
    }

    fn heartbeat_with<'a>(
        &'a self,
        node: &'a NodeId,
        lease_id: &'a str,
        ttl_ms: u64,
        meta: Option<Meta>,
        status: Option<Status>,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move { self.heartbeat_sync(node, lease_id, ttl_ms, meta.as_ref(), status) })
    }

    fn logout<'a>(
        &'a self,
        node: &'a NodeId,
        lease_id: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move { self.logout_sync(node, lease_id) })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<Node>, StoreError>> {
        Box::pin(async move { self.list_sync() })
    }

    fn list_json(&self) -> BoxFuture<'_, Result<NodeListJson, StoreError>> {
        Box::pin(async move { Ok(self.list_json_sync()) })
    }

    fn query_json<'a>(&'a self, query: &'a Query) -> BoxFuture<'a, Result<Page, StoreError>> {
        Box::pin(async move { Ok(self.query_json_sync(query)) })
    }

    fn stats(&self) -> BoxFuture<'_, Result<Stats, StoreError>> {
        Box::pin(async move { Ok(self.stats_sync()) })
    }

    fn get<'a>(&'a self, node: &'a NodeId) -> BoxFuture<'a, Result<Option<Node>, StoreError>> {
        Box::pin(async move { self.get_sync(node) })
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn now_ms(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move { Ok(MemoryStore::now_ms(self)) })
    }

    fn watch<'a>(
        &'a self,
        after: Option<&'a Cursor>,
        options: WatchOptions,
    ) -> BoxFuture<'a, Result<Watch, StoreError>> {
        Box::pin(async move {
            let subscribed = self.hub.subscribe(after, options)?;
            let start = match subscribed.start {
                HubStart::Replay(changes) => WatchStart::Resumed(changes),
                // The log is all there is: older than it is too old.
                HubStart::Fetch(_) | HubStart::Snapshot => WatchStart::Snapshot,
            };
            Ok(Watch {
                start,
                cursor: subscribed.head,
                changes: subscribed.changes,
            })
        })
    }

    fn feed_cursor(&self) -> Option<Cursor> {
        self.hub.head()
    }

    fn set_feed_retention(&self, retention: std::time::Duration) {
        self.hub.set_retention_ms(crate::millis(retention));
    }

    fn sweep_expired(&self) -> BoxFuture<'_, Result<Sweep, StoreError>> {
        Box::pin(async move {
            let sweep = self.sweep();
            // A whole pass per call: nothing is left for a next one.
            self.next_purge_ms.store(
                self.now_ms().saturating_add(PURGE_INTERVAL_MS),
                Ordering::Relaxed,
            );
            Ok(sweep)
        })
    }

    fn describe(&self) -> String {
        "memory (single server only: state is not shared between servers)".to_owned()
    }
}
