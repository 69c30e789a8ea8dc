//! [`RedisStore`]: presence state in Redis, shared by any number of stateless
//! servers.
//!
//! # Data model
//!
//! Every key of a shard carries the shard's hash tag, so all its keys live in one
//! cluster slot and every script only touches keys of that slot. A deployment of one
//! shard (the default) has the tag `{<prefix>}`; one of S shards
//! ([`RedisOptions::shards`]) has `{<prefix>.0}` … `{<prefix>.<S-1>}`, each with the
//! keys below, and records S in `{<prefix>}:shards` (see [`RedisStore`]). In the keys
//! below, `<prefix>` stands for the tag:
//!
//! - `{<prefix>}:nodes`: sorted set, member `node_id`, score `expires_at_ms` to
//!   within [`INDEX_GRANULARITY`] (10 s): the score is never ahead of the record's
//!   expiry and lags it by less than that, because a heartbeat only writes it when
//!   the expiry moves into another 10-second slot. It is an index for ranges
//!   (listing, purge, outage); the record decides.
//! - `{<prefix>}:records`: hash, field `node_id`, value the node's record:
//!   `<expires_at><last_seen><online_since><lease length><lease><meta>`: the three
//!   times as epoch ms in 15 zero-padded digits, the lease length in bytes in 5
//!   digits, then the lease and the meta (JSON text) as they are, e.g.
//!   `000001764600012000` `000001764600003000` `000001764600000000` `00032`
//!   `6f1c…9a` `{"load":0.1}` (without the spaces). Fixed widths let the scripts
//!   check and renew a record with substring operations, without parsing or
//!   formatting numbers (see [`HEARTBEATS`]). A node that is not `up` has a status
//!   mark between the lease and the meta: `d` degraded, `r` draining (an `up`
//!   node's record is byte for byte what a server older than statuses wrote).
//! - `{<prefix>}:ids`: sorted set, every record's `node_id` at score 0: the index in
//!   `node_id` order that pages and prefixes read with `ZRANGE ... BYLEX`, so a page
//!   costs what the page costs. Written by `login` (a new id) and by whatever
//!   removes a record.
//! - `{<prefix>}:counts`: hash `u`/`d`/`r`, the records by status that are online or
//!   expired but not yet reported: `GET /presence/stats` is one `HMGET`. Every
//!   script that adds, removes, re-statuses or reports a record keeps it, in the
//!   same atomic step. Its field `l` says that the label index below is built.
//! - `{<prefix>}:labels`: sorted set at score 0 of `<key>\0<value>\0<node_id>`,
//!   one member per [label](crate::store::query#labels-the-index-of-meta-values) of
//!   each record (a top-level string or boolean of its meta), read `BYLEX`: a meta
//!   filter reads the ids behind its label, in `node_id` order, instead of every
//!   record. `{<prefix>}:labels-of`: hash, field `node_id`, the record's labels
//!   joined by `\x01`, so that the script that changes or removes a record takes
//!   its old labels away. Both are written by `login`, a heartbeat that changes the
//!   meta, and whatever removes a record.
//! - `{<prefix>}:feed`, `{<prefix>}:feed-epoch`, `{<prefix>}:swept`: the change
//!   feed, its epoch, and the expiry sweep's watermark (see [`Store::watch`] and
//!   [`Store::sweep_expired`]).
//! - `{<prefix>}:outage`: when the last outage was given back to the leases (see
//!   [self-preservation](super#outages-self-preservation)); expires after
//!   [`MAX_PRESERVED_OUTAGE`].
//!
//! A deployment written by a server older than the id index, the counters or the
//! labels gets them built once, before a newer server first writes, reads a page or the
//! stats, or sweeps (one script that reads every record).
//!
//! All these keys expire [`KEY_SLACK`] after the last record's garbage
//! collection time (its expiry plus [`MAX_PRESERVED_OUTAGE`]), so an abandoned
//! deployment leaves nothing behind. Expired records stay (invisible: every read
//! compares `expires_at` with `TIME`) for [`MAX_PRESERVED_OUTAGE`] after their
//! expiry, so that after an outage [`Store::extend_after_outage`] still finds the
//! leases the outage ran down; `login` then removes them by score range.
//!
//! This differs from the obvious layout (one hash per node, with a `PEXPIRE`) on
//! purpose: with one record per node in one hash, a batch of heartbeats is three
//! commands in one script whatever its size (`HMGET`, `HSET`, `ZADD`), and a page of
//! a listing is one `HMGET` whose reply is one string per node; with a hash per node
//! both cost one command per node, which made Redis the bottleneck of the
//! heartbeat path and of `GET /presence` (see *Performance* below).
//!
//! `node_id`s are [`NodeId`]s, validated before they get anywhere near a key or a
//! field.
//!
//! # Operations
//!
//! `login`, `heartbeat` and `logout` are Lua scripts (`EVALSHA`, loaded
//! automatically on `NOSCRIPT`): one round trip, atomic, clock from `TIME` inside
//! the script. `login` drops records that expired more than
//! [`MAX_PRESERVED_OUTAGE`] ago (a bounded number per call; every node that joins
//! the set logs in, so that keeps up); `heartbeat`, the hot path, leaves that to
//! it. Heartbeats that are waiting at the same moment share one script call (see
//! below). `list` is one pipeline (`TIME` + `ZRANGE ... BYLEX` of the id index, or
//! `ZRANGE ... BYSCORE` after a mass expiry: see [`Shard::for_each_live`]) followed
//! by the records, fetched with `HMGET` in pipelined pages: `1 + ceil(N / page)`
//! round trips, never `KEYS`, never one request per node. `get` is one pipeline (`TIME` +
//! `HGET`).
//!
//! # Performance
//!
//! Everything goes over one multiplexed connection, so concurrent calls are
//! pipelined; the scripts are hashed once per process.
//!
//! - Heartbeats are batched: a background task takes every heartbeat that is
//!   waiting (up to 128) into one call of the heartbeat script, which handles each
//!   on its own (its own lease check and result) with three commands for the whole
//!   batch: one `HMGET` of the records, one `HSET` of the renewed ones, one `ZADD`.
//!   Redis pays its per-call and per-command overhead once per batch, and the server
//!   encodes one command and parses one reply per batch. A lone heartbeat still
//!   goes out at once, at the cost of one task switch. Each heartbeat still costs
//!   one round trip.
//! - A listing costs Redis one `ZRANGE` plus one field lookup per node, in `HMGET`s
//!   of [`RedisOptions::page_size`] fields, several in flight. It reads 2N strings,
//!   which the `redis` crate would parse at about 0.5 µs each (more than Redis spends
//!   on them), so it goes over a connection of its own whose replies are sliced out
//!   of one buffer ([`bulk`]); [`Store::list_json`] writes the JSON response straight
//!   from the records, copying the stored meta text as it is (after checking that it
//!   is a JSON object). (`HSCAN` of the records alone would save the `ZRANGE` but
//!   costs Redis about three times as much per record, in round trips that cannot
//!   overlap.)
//!
//! Requires Redis 6.2 or newer (`ZRANGE ... BYSCORE` and `BYLEX`): one server, a replicated
//! primary, or a Redis Cluster ([`RedisOptions::cluster`], the seed nodes in the
//! URI), on which a listing goes over the shared connection instead of [`bulk`]'s.
//!
//! # TLS
//!
//! `rediss://host:port` connects over TLS (rustls) and verifies the server's
//! certificate against the system's roots, or only against
//! [`RedisOptions::tls_ca_pem`] when it is set (`PRESENCE_REDIS_CA_FILE`). The
//! listing connection ([`bulk`]) speaks TLS with the same roots, so listings keep
//! their decoder. `rediss://...#insecure` (no verification) is refused.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::collections::VecDeque;

use redis::RedisError;
use tokio::sync::{mpsc, oneshot};

use self::batch::{batch_heartbeats, eval, evalsha, HeartbeatJob};
use self::bulk::{BulkConnection, Bulks, Session};
use self::conn::{Connector, RedisConnection};
use self::feed::{changes_between, read_feed};
use self::record::{parse_u64, to_node, Record};
use self::scripts::{
    labels_arg, lease_header, status_arg, status_mark, INDEX_BUILD, LOGIN, LOGIN_PURGE, LOGOUT,
    OUTAGE_CLAIM, OUTAGE_SHIFT, PAGE, SWEEP,
};
pub use self::scripts::{INDEX_GRANULARITY, KEY_SLACK, MAX_LEASE_LEN};
pub use self::sharded::{RedisStore, MAX_SHARDS};
use super::feed::{
    Cursor, Hub, HubStart, Position, Watch, WatchOptions, WatchStart, DEFAULT_RETENTION_MS,
};
use super::json::{ListWriter, NODE_OVERHEAD};
use super::query::{Page, Query};
use super::{
    redact_uri, sort_key, BoxFuture, LoginOutcome, NodeListJson, Store, StoreError, Sweep,
    MAX_PRESERVED_OUTAGE,
};
use crate::model::{Meta, Node, NodeId, Stats, Status};

mod batch;
mod bulk;
mod conn;
mod feed;
mod record;
mod scripts;
mod sharded;

/// Longest accepted key prefix, in bytes.
pub const MAX_PREFIX_LEN: usize = 128;

/// How far below the estimated Redis clock a listing's `ZRANGE` starts (see
/// [`RedisStore::live_ids`]): covers clock drift between listings. Members that
/// expired within it are read and dropped.
const LIST_CLOCK_MARGIN_MS: u64 = 2_000;

/// Members one [`SWEEP`] call reads at most: bounds how long it blocks Redis (about
/// a millisecond per thousand).
const SWEEP_PAGE: usize = 1000;

/// How late (Redis clock, after it was sent) a sweep may still run: one that waited
/// longer in a stalled Redis does nothing (see [`SWEEP`]). Far above a healthy
/// round trip, far below the TTLs an outage would run down.
const SWEEP_LATENESS_MS: u64 = 500;

/// Most ids one [`PAGE`] call reads: bounds the time a filtered scan holds Redis
/// (about 1 ms per 1 000 ids).
const QUERY_BUDGET: usize = 2_048;

/// Changes the in-process feed keeps for watchers that resume (older ones are read
/// from the stream).
const RECENT_CHANGES: usize = 10_000;

/// Members moved by one [`OUTAGE_SHIFT`] call: bounds how long one script blocks
/// Redis (a few milliseconds) when a large deployment comes back from an outage.
const OUTAGE_PAGE: usize = 1000;

/// Connection tuning for [`RedisStore::connect_with`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisOptions {
    /// Bound on establishing one connection (default 1 s).
    pub connection_timeout: Duration,
    /// Bound on each request's reply (default 2 s). A dead server fails calls
    /// after this long instead of hanging; the connection is then re-established
    /// in the background.
    pub response_timeout: Duration,
    /// Reconnection attempts per outage before calls start failing (default 2).
    pub reconnect_retries: usize,
    /// Records fetched per `HMGET` by a listing (default 500).
    pub page_size: usize,
    /// Listing pages in flight at once (default 4).
    pub page_concurrency: usize,
    /// Connect on first use instead of in [`RedisStore::connect_with`] (default
    /// `false`). A lazy store can be created while Redis is down: its calls fail with
    /// [`StoreError::Unavailable`] until Redis answers, then it works.
    pub lazy: bool,
    /// For `rediss://`: the PEM CA certificate(s) the server's certificate must
    /// chain to, instead of the system's roots (default `None`: the system's).
    pub tls_ca_pem: Option<Vec<u8>>,
    /// Whether the URI names the seed nodes of a Redis Cluster, comma-separated
    /// (default `false`: one standalone Redis or replicated primary).
    pub cluster: bool,
    /// How many shards the deployment's keys are spread over (default 1; see
    /// [`RedisStore::shard_of`]). A deployment keeps the count it was created with.
    pub shards: usize,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            connection_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(2),
            reconnect_retries: 2,
            page_size: 500,
            page_concurrency: 4,
            lazy: false,
            tls_ca_pem: None,
            cluster: false,
            shards: 1,
        }
    }
}

impl RedisOptions {
    /// Sets [`RedisOptions::connection_timeout`].
    pub fn connection_timeout(mut self, d: Duration) -> Self {
        self.connection_timeout = d;
        self
    }

    /// Sets [`RedisOptions::response_timeout`].
    pub fn response_timeout(mut self, d: Duration) -> Self {
        self.response_timeout = d;
        self
    }

    /// Sets [`RedisOptions::reconnect_retries`].
    pub fn reconnect_retries(mut self, n: usize) -> Self {
        self.reconnect_retries = n;
        self
    }

    /// Sets [`RedisOptions::page_size`] (at least 1).
    pub fn page_size(mut self, n: usize) -> Self {
        self.page_size = n.max(1);
        self
    }

    /// Sets [`RedisOptions::page_concurrency`] (at least 1).
    pub fn page_concurrency(mut self, n: usize) -> Self {
        self.page_concurrency = n.max(1);
        self
    }

    /// Sets [`RedisOptions::lazy`].
    pub fn lazy(mut self, lazy: bool) -> Self {
        self.lazy = lazy;
        self
    }

    /// Sets [`RedisOptions::tls_ca_pem`].
    pub fn tls_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls_ca_pem = Some(pem.into());
        self
    }

    /// Sets [`RedisOptions::cluster`].
    pub fn cluster(mut self, cluster: bool) -> Self {
        self.cluster = cluster;
        self
    }

    /// Sets [`RedisOptions::shards`] (1 to [`MAX_SHARDS`]; checked on connect).
    pub fn shards(mut self, shards: usize) -> Self {
        self.shards = shards;
        self
    }
}

/// One shard of a [`RedisStore`]: a deployment's keys under one hash tag (see the
/// [module docs](self) for the data model), with its own heartbeat batcher, listing
/// connection and feed reader. A deployment of one shard is one of these.
pub(super) struct Shard {
    conn: RedisConnection,
    inner: Arc<Inner>,
}

struct Inner {
    /// The keys every script gets (see [`SCRIPT_KEYS`](scripts::SCRIPT_KEYS)).
    keys: DeploymentKeys,
    outage_key: String,
    description: String,
    page_size: usize,
    page_concurrency: usize,
    /// The listing's own connection (see [`bulk`]); `None` on a cluster, whose
    /// listings go over the shared connection.
    bulk: Option<BulkConnection>,
    /// Nodes in the last listing: sizes the next one's buffer list.
    list_nodes_hint: AtomicUsize,
    /// Whether the next listing reads its ids from the id index, in order, rather
    /// than from the expiry index (see [`Shard::for_each_live`]).
    list_by_id: AtomicBool,
    /// Whether this store has made sure the deployment has its id index and
    /// counters ([`INDEX_BUILD`], before its first write, page, stats or sweep:
    /// see [`Shard::ensure_index`]).
    index_built: AtomicBool,
    /// Redis clock minus the local wall clock, in ms, as of the last listing
    /// (`i64::MIN`: not known yet). Bounds the next listing's `ZRANGE`.
    clock_offset_ms: AtomicI64,
    /// Bytes per node of the last listing: sizes the next one's buffer.
    list_bytes_per_node: AtomicUsize,
    /// Queue of the heartbeat batcher (see [`batch_heartbeats`]).
    heartbeats: mpsc::UnboundedSender<HeartbeatJob>,
    /// The change feed's in-process side, fed by [`read_feed`].
    hub: Arc<Hub>,
    /// [`RedisOptions::response_timeout`].
    response_timeout: Duration,
}

/// The keys of a deployment every script takes, in their order (see
/// [`SCRIPT_KEYS`](scripts::SCRIPT_KEYS)), and the feed's retention the scripts trim it to.
#[derive(Clone)]
struct DeploymentKeys {
    pub(super) nodes: String,
    pub(super) records: String,
    pub(super) feed: String,
    pub(super) epoch: String,
    pub(super) swept: String,
    pub(super) index: String,
    pub(super) counts: String,
    pub(super) labels: String,
    pub(super) labelled: String,
    retention_ms: Arc<AtomicU64>,
}

impl DeploymentKeys {
    /// The keys under the hash tag `{tag}`.
    fn new(tag: &str) -> DeploymentKeys {
        DeploymentKeys {
            nodes: format!("{{{tag}}}:nodes"),
            records: format!("{{{tag}}}:records"),
            feed: format!("{{{tag}}}:feed"),
            epoch: format!("{{{tag}}}:feed-epoch"),
            index: format!("{{{tag}}}:ids"),
            counts: format!("{{{tag}}}:counts"),
            swept: format!("{{{tag}}}:swept"),
            labels: format!("{{{tag}}}:labels"),
            labelled: format!("{{{tag}}}:labels-of"),
            retention_ms: Arc::new(AtomicU64::new(DEFAULT_RETENTION_MS)),
        }
    }

    /// How long the feed keeps events, in ms.
    pub(super) fn retention_ms(&self) -> u64 {
        self.retention_ms.load(Ordering::Relaxed)
    }

    /// Every key a shard may hold (for [`RedisStore::delete_prefix`]).
    fn all(&self, outage_key: &str) -> [String; 10] {
        [
            self.nodes.clone(),
            self.records.clone(),
            self.feed.clone(),
            self.epoch.clone(),
            self.swept.clone(),
            self.index.clone(),
            self.counts.clone(),
            self.labels.clone(),
            self.labelled.clone(),
            outage_key.to_owned(),
        ]
    }
}

impl Shard {
    /// The shard under the hash tag `{tag}`, over `conn`: starts its heartbeat
    /// batcher and its feed reader (a connection of its own from `connector`).
    fn new(
        conn: RedisConnection,
        connector: &Connector,
        bulk: Option<BulkConnection>,
        tag: String,
        description: String,
        options: &RedisOptions,
    ) -> Shard {
        let keys = DeploymentKeys::new(&tag);
        let (heartbeats, queue) = mpsc::unbounded_channel();
        tokio::spawn(batch_heartbeats(conn.clone(), keys.clone(), queue));
        let hub = Arc::new(Hub::new(None, Position::default(), RECENT_CHANGES));
        tokio::spawn(read_feed(
            connector.clone(),
            keys.clone(),
            Arc::downgrade(&hub),
            options.connection_timeout,
            options.response_timeout,
        ));
        Shard {
            conn,
            inner: Arc::new(Inner {
                outage_key: format!("{{{tag}}}:outage"),
                keys,
                description,
                page_size: options.page_size.max(1),
                page_concurrency: options.page_concurrency.max(1),
                bulk,
                list_nodes_hint: AtomicUsize::new(0),
                list_by_id: AtomicBool::new(true),
                index_built: AtomicBool::new(false),
                clock_offset_ms: AtomicI64::new(i64::MIN),
                list_bytes_per_node: AtomicUsize::new(NODE_OVERHEAD + 32),
                heartbeats,
                hub,
                response_timeout: options.response_timeout,
            }),
        }
    }

    /// The sorted set key, `{tag}:nodes`.
    fn nodes_key(&self) -> &str {
        &self.inner.keys.nodes
    }

    /// The hash of the node records, `{tag}:records`.
    fn records_key(&self) -> &str {
        &self.inner.keys.records
    }

    /// Every key this shard may hold.
    fn all_keys(&self) -> [String; 10] {
        self.inner.keys.all(&self.inner.outage_key)
    }

    async fn login_impl(
        &self,
        node: &NodeId,
        lease_id: &str,
        ttl_ms: u64,
        meta: Meta,
        status: Status,
    ) -> Result<LoginOutcome, StoreError> {
        if lease_id.len() > MAX_LEASE_LEN {
            return Err(StoreError::Unavailable(format!(
                "redis: a lease of {} bytes is longer than the {MAX_LEASE_LEN} a record holds",
                lease_id.len()
            )));
        }
        let labels = labels_arg(&meta);
        let meta = encode_meta(&meta)?;
        self.ensure_index().await?;
        let mut call = evalsha(
            &LOGIN,
            &self.inner.keys,
            9,
            140 + lease_id.len() + meta.len() + labels.len(),
        );
        // The record's status mark follows the lease (none for `up`).
        let mut lease = lease_header(lease_id);
        lease.push_str(status_mark(status));
        call.arg(node.as_str())
            .arg(lease)
            .arg(ttl_ms)
            .arg(meta)
            .arg(grace_ms())
            .arg(LOGIN_PURGE)
            .arg(index_granularity_ms())
            .arg(labels)
            .arg(self.inner.keys.retention_ms());
        let (now, exp): (u64, u64) = eval(&mut self.conn.clone(), &LOGIN, &call)
            .await
            .map_err(unavailable)?;
        Ok(LoginOutcome {
            online_since_ms: now,
            expires_at_ms: exp,
        })
    }

    async fn heartbeat_impl(
        &self,
        node: &NodeId,
        lease_id: &str,
        ttl_ms: u64,
        meta: Option<Meta>,
        status: Option<Status>,
    ) -> Result<u64, StoreError> {
        let labels = meta.as_ref().map(labels_arg);
        let meta = meta.as_ref().map(encode_meta).transpose()?;
        self.ensure_index().await?;
        let (reply, outcome) = oneshot::channel();
        let job = HeartbeatJob {
            node: node.clone(),
            lease: lease_header(lease_id),
            ttl_ms,
            meta,
            labels,
            status,
            reply,
        };
        if self.inner.heartbeats.send(job).is_err() {
            return Err(StoreError::Unavailable(
                "redis: the heartbeat batcher has stopped".to_owned(),
            ));
        }
        match outcome.await {
            Ok(Ok(0)) => Err(StoreError::NotFound),
            Ok(Ok(1)) => Err(StoreError::LeaseMismatch),
            Ok(Ok(exp)) if exp > 1 => Ok(exp.unsigned_abs()),
            Ok(Ok(code)) => Err(StoreError::Unavailable(format!(
                "redis: unexpected heartbeat script reply {code}"
            ))),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(StoreError::Unavailable(
                "redis: the heartbeat batcher dropped the call".to_owned(),
            )),
        }
    }

    async fn logout_impl(&self, node: &NodeId, lease_id: &str) -> Result<bool, StoreError> {
        self.ensure_index().await?;
        let mut call = evalsha(
            &LOGOUT,
            &self.inner.keys,
            3,
            24 + node.as_str().len() + lease_id.len(),
        );
        call.arg(node.as_str())
            .arg(lease_header(lease_id))
            .arg(self.inner.keys.retention_ms());
        let reply: u64 = eval(&mut self.conn.clone(), &LOGOUT, &call)
            .await
            .map_err(unavailable)?;
        match reply {
            0 => Ok(false),
            1 => Ok(true),
            2 => Err(StoreError::LeaseMismatch),
            other => Err(unexpected("logout", &[other])),
        }
    }

    /// Calls `each` with the id and record of every node online at the store's
    /// clock, in `node_id` order, page by page as the pages arrive.
    ///
    /// Two exchanges on the [`BulkConnection`]: `TIME` + a `ZRANGE` of the ids in one
    /// pipeline, then `HMGET`s of [`RedisOptions::page_size`] records, up to
    /// [`RedisOptions::page_concurrency`] in flight so that Redis answers the next
    /// while this page is written out. Vanished, expired and unreadable records are
    /// skipped.
    ///
    /// The ids come from the id index (`ZRANGE ... BYLEX`), already in `node_id`
    /// order: sorting them here was 4 ms of a 100 000-node listing (README,
    /// Performance). The index also holds the records that expired in the last
    /// [`MAX_PRESERVED_OUTAGE`], which the listing reads only to skip; when the last
    /// listing skipped more than a quarter as many as it listed (after a mass expiry),
    /// the ids come from the expiry index instead, which leaves those out, and are
    /// sorted here ([`Shard::live_members`]), until that index says the stale records
    /// are gone.
    async fn for_each_live(
        &self,
        mut each: impl FnMut(&str, Record<'_>) + Send,
    ) -> Result<(), StoreError> {
        let by_id = self.inner.list_by_id.load(Ordering::Relaxed);
        if by_id {
            self.ensure_index().await?;
        }
        let mut session = match &self.inner.bulk {
            Some(bulk) => ListSession::Bulk(bulk.session().await?),
            None => ListSession::Shared {
                conn: self.conn.clone(),
                sent: VecDeque::new(),
                ready: VecDeque::new(),
            },
        };
        let (now, ids, order) = if by_id {
            let (now, ids) = self.indexed_members(&mut session).await?;
            let order = (0..ids.len()).collect();
            (now, ids, order)
        } else {
            let (now, ids, indexed) = self.live_members(&mut session).await?;
            let order = node_id_order(&ids);
            if indexed
                .is_some_and(|indexed| !mostly_stale(indexed.saturating_sub(ids.len()), ids.len()))
            {
                self.inner.list_by_id.store(true, Ordering::Relaxed);
            }
            (now, ids, order)
        };
        let (listed, skipped) = self
            .each_record(&mut session, &ids, &order, now, &mut each)
            .await?;
        if by_id && mostly_stale(skipped, listed) {
            self.inner.list_by_id.store(false, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The Redis clock and every member of the id index, in `node_id` order: `TIME`
    /// + `ZRANGE ... BYLEX` in one pipeline.
    async fn indexed_members(
        &self,
        session: &mut ListSession<'_>,
    ) -> Result<(u64, Bulks), StoreError> {
        let range = redis::pipe()
            .cmd("TIME")
            .cmd("ZRANGE")
            .arg(&self.inner.keys.index)
            .arg("-")
            .arg("+")
            .arg("BYLEX")
            .clone();
        session.send(&range).await?;
        let time = session.reply().await?;
        let ids = session.reply().await?;
        Ok((self.observed_clock(&time)?, ids))
    }

    /// The Redis clock and the members of the sorted set that may be online at it,
    /// and the size of the id index: `TIME` + `ZRANGE ... BYSCORE` + `ZCARD` in one
    /// pipeline (see [`for_each_live`]'s lower bound). The index's size is `None`
    /// when the range was read twice.
    ///
    /// [`for_each_live`]: Self::for_each_live
    async fn live_members(
        &self,
        session: &mut ListSession<'_>,
    ) -> Result<(u64, Bulks, Option<usize>), StoreError> {
        let offset = self.inner.clock_offset_ms.load(Ordering::Relaxed);
        let mut lower = (offset != i64::MIN)
            .then(|| local_epoch_ms().saturating_add_signed(offset))
            .map(|estimate| estimate.saturating_sub(LIST_CLOCK_MARGIN_MS + index_granularity_ms()));
        loop {
            let min = lower.map_or_else(|| "-inf".to_owned(), |l| l.to_string());
            let range = redis::pipe()
                .cmd("TIME")
                .cmd("ZRANGE")
                .arg(&self.inner.keys.nodes)
                .arg(min)
                .arg("+inf")
                .arg("BYSCORE")
                .cmd("ZCARD")
                .arg(&self.inner.keys.index)
                .clone();
            session.send(&range).await?;
            let time = session.reply().await?;
            let ids = session.reply().await?;
            let indexed = session.reply_integer().await?;
            let now = self.observed_clock(&time)?;
            match lower {
                // Every node online at `now` has a score above `now - granularity`.
                Some(l) if l.saturating_add(index_granularity_ms()) > now => lower = None,
                _ => return Ok((now, ids, usize::try_from(indexed).ok())),
            }
        }
    }

    /// The epoch ms of a `TIME` reply, noted as the Redis clock (see
    /// [`Shard::note_clock`]).
    fn observed_clock(&self, time: &Bulks) -> Result<u64, StoreError> {
        let now = match (
            time.get(0).and_then(parse_u64),
            time.get(1).and_then(parse_u64),
        ) {
            (Some(secs), Some(micros)) => epoch_ms(secs, micros),
            _ => {
                return Err(StoreError::Unavailable(
                    "redis: TIME reply is not two numbers".into(),
                ))
            }
        };
        self.note_clock(now);
        Ok(now)
    }

    /// Notes that the Redis clock reads `now` (epoch ms): the clock offset the next
    /// listing and sweep start from.
    fn note_clock(&self, now: u64) {
        let offset = i64::try_from(now)
            .unwrap_or(i64::MAX)
            .saturating_sub(i64::try_from(local_epoch_ms()).unwrap_or(i64::MAX));
        self.inner.clock_offset_ms.store(offset, Ordering::Relaxed);
    }

    /// Calls `each` for every member in `order` whose record is online at `now`:
    /// `HMGET`s of [`RedisOptions::page_size`] records, up to
    /// [`RedisOptions::page_concurrency`] in flight, so that Redis answers the next
    /// page while this one is written out. Returns how many it listed and how many
    /// it skipped as not online.
    async fn each_record(
        &self,
        session: &mut ListSession<'_>,
        ids: &Bulks,
        order: &[usize],
        now: u64,
        each: &mut (impl FnMut(&str, Record<'_>) + Send),
    ) -> Result<(usize, usize), StoreError> {
        let pages: Vec<&[usize]> = order.chunks(self.inner.page_size).collect();
        let hmget = |page: &[usize]| {
            let mut pipe = redis::pipe();
            let cmd = pipe.cmd("HMGET").arg(&self.inner.keys.records);
            for &i in page {
                cmd.arg(ids.get(i).unwrap_or_default());
            }
            pipe
        };
        let (mut listed, mut skipped) = (0, 0);
        let mut sent = 0;
        for page in pages.iter().take(self.inner.page_concurrency) {
            session.send(&hmget(page)).await?;
            sent += 1;
        }
        for page in &pages {
            let records = session.reply().await?;
            if let Some(next) = pages.get(sent) {
                session.send(&hmget(next)).await?;
                sent += 1;
            }
            if records.len() != page.len() {
                return Err(StoreError::Unavailable(format!(
                    "redis: {} records for an HMGET of {}",
                    records.len(),
                    page.len()
                )));
            }
            for (&i, rec) in page.iter().zip(records.iter()) {
                let (Some(id), Some(rec)) = (ids.get(i), rec) else {
                    skipped += 1;
                    continue;
                };
                match Record::parse(rec) {
                    Some(rec) if rec.expires_at_ms > now => {
                        if let Some(id) = listed_id(id) {
                            listed += 1;
                            each(id, rec);
                        }
                    }
                    Some(_) => skipped += 1,
                    None => tracing::warn!(
                        node_id = %String::from_utf8_lossy(id),
                        "stored record does not parse; not listing it"
                    ),
                }
            }
        }
        Ok((listed, skipped))
    }

    async fn list_impl(&self) -> Result<Vec<Node>, StoreError> {
        let mut nodes = Vec::new();
        self.for_each_live(|id, rec| nodes.push(to_node(id, &rec)))
            .await?;
        Ok(nodes)
    }

    /// [`Store::list_json`]: each page's records are written into the response as
    /// they arrive, meta text as stored.
    async fn list_json_impl(&self) -> Result<NodeListJson, StoreError> {
        Ok(self.list_written(false).await?.finish())
    }

    /// The listing, written; `spanned` keeps where each node is (to be merged with
    /// other shards').
    async fn list_written(&self, spanned: bool) -> Result<ListWriter, StoreError> {
        let per_node = self.inner.list_bytes_per_node.load(Ordering::Relaxed);
        let expected = self.inner.list_nodes_hint.load(Ordering::Relaxed);
        let bytes = expected.saturating_mul(per_node);
        let mut list = if spanned {
            ListWriter::spanned(bytes)
        } else {
            ListWriter::with_capacity(bytes)
        };
        self.for_each_live(|id, rec| {
            rec.push_to(&mut list, id, rec.meta_json(id));
        })
        .await?;
        self.inner
            .list_nodes_hint
            .store(list.count(), Ordering::Relaxed);
        if let Some(per_node) = list.len().checked_div(list.count()) {
            self.inner
                .list_bytes_per_node
                .store(per_node + per_node / 8, Ordering::Relaxed);
        }
        Ok(list)
    }

    async fn get_impl(&self, node: &NodeId) -> Result<Option<Node>, StoreError> {
        let ((secs, micros), rec): ((u64, u64), Option<Vec<u8>>) = redis::pipe()
            .cmd("TIME")
            .cmd("HGET")
            .arg(&self.inner.keys.records)
            .arg(node.as_str())
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        let now = epoch_ms(secs, micros);
        Ok(rec
            .as_deref()
            .and_then(Record::parse)
            .filter(|rec| rec.expires_at_ms > now)
            .map(|rec| to_node(node.as_str(), &rec)))
    }

    async fn now_impl(&self) -> Result<u64, StoreError> {
        let (secs, micros): (u64, u64) = redis::cmd("TIME")
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(epoch_ms(secs, micros))
    }

    async fn extend_after_outage_impl(
        &self,
        outage: Duration,
        max_ttl_ms: u64,
    ) -> Result<u64, StoreError> {
        let outage_ms = crate::millis(outage);
        if outage_ms == 0 {
            return Ok(0);
        }
        let (claimed, now): (u64, u64) = OUTAGE_CLAIM
            .key(&self.inner.outage_key)
            .arg(outage_ms)
            .arg(grace_ms())
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        if claimed == 0 {
            return Ok(0);
        }
        let exp_low = now.saturating_sub(outage_ms);
        let exp_high = exp_low.saturating_add(max_ttl_ms);
        // Scores lag expiries by less than INDEX_GRANULARITY.
        let low = exp_low.saturating_sub(index_granularity_ms());
        let mut high = exp_high;
        let mut skip = 0;
        let mut moved = 0;
        loop {
            let mut call = evalsha(&OUTAGE_SHIFT, &self.inner.keys, 9, 144);
            call.arg(low)
                .arg(high)
                .arg(outage_ms)
                .arg(grace_ms())
                .arg(OUTAGE_PAGE)
                .arg(exp_low)
                .arg(exp_high)
                .arg(skip)
                .arg(self.inner.keys.retention_ms());
            let (handled, page_moved, lowest, stayed): (u64, u64, u64, u64) =
                eval(&mut self.conn.clone(), &OUTAGE_SHIFT, &call)
                    .await
                    .map_err(unavailable)?;
            moved += page_moved;
            if handled < OUTAGE_PAGE as u64 {
                return Ok(moved);
            }
            // A page all at the score it started at adds to those to skip there.
            skip = if lowest == high {
                skip + stayed
            } else {
                stayed
            };
            high = lowest;
        }
    }

    /// Waits, at most a Redis response timeout, until this server's feed reader can
    /// judge `after`: until it knows the feed's epoch (a store just opened), knows
    /// the feed a cursor is of (a reader that started before the feed existed knows
    /// it by epoch 0 until it reads its first entries), and has read up to a cursor
    /// of its feed (one made by another server may be ahead by the reader's lag).
    /// Without the wait each of these would be a needless snapshot.
    async fn wait_for_reader(&self, after: Option<&Cursor>) -> Result<(), StoreError> {
        let deadline = tokio::time::Instant::now() + self.inner.response_timeout;
        // Whether the feed in Redis is the cursor's: asked once, and only while the
        // reader knows the feed by epoch 0.
        let mut cursors_feed = None;
        loop {
            let hub = &self.inner.hub;
            let behind = match (hub.epoch(), after) {
                (None, _) => true,
                (Some(0), Some(cursor)) if cursor.epoch() != 0 => match cursors_feed {
                    Some(known) => known,
                    None => {
                        let epoch: Option<String> = redis::cmd("GET")
                            .arg(&self.inner.keys.epoch)
                            .query_async(&mut self.conn.clone())
                            .await
                            .map_err(unavailable)?;
                        let known =
                            epoch.and_then(|e| parse_u64(e.as_bytes())) == Some(cursor.epoch());
                        cursors_feed = Some(known);
                        known
                    }
                },
                (Some(epoch), Some(cursor)) if epoch == cursor.epoch() => {
                    match (cursor.single(), hub.head().and_then(|h| h.single())) {
                        (Some(at), Some(head)) => head < at,
                        _ => false,
                    }
                }
                _ => false,
            };
            if !behind || tokio::time::Instant::now() >= deadline {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    async fn watch_impl(
        &self,
        after: Option<&Cursor>,
        options: WatchOptions,
    ) -> Result<Watch, StoreError> {
        self.wait_for_reader(after).await?;
        let subscribed = self.inner.hub.subscribe(after, options)?;
        let start = match subscribed.start {
            HubStart::Replay(changes) => WatchStart::Resumed(changes),
            HubStart::Snapshot => WatchStart::Snapshot,
            HubStart::Fetch(after) => {
                let head = subscribed.head.single().unwrap_or_default();
                let mut conn = self.conn.clone();
                let epoch = subscribed.head.epoch();
                match changes_between(&mut conn, &self.inner.keys, epoch, after, head).await? {
                    Some(changes) => WatchStart::Resumed(changes),
                    None => WatchStart::Snapshot,
                }
            }
        };
        Ok(Watch {
            start,
            cursor: subscribed.head,
            changes: subscribed.changes,
        })
    }

    /// Makes sure, once per store, that the deployment has its id index and
    /// counters ([`INDEX_BUILD`]) before this store first writes, reads a page or
    /// the stats, or sweeps: a write that came first would create the counters, and
    /// [`INDEX_BUILD`] would then take the deployment for a built one and leave the
    /// older server's records out of the index and the counters for good.
    async fn ensure_index(&self) -> Result<(), StoreError> {
        if self.inner.index_built.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut call = evalsha(&INDEX_BUILD, &self.inner.keys, 1, 16);
        call.arg(grace_ms());
        let built: u64 = eval(&mut self.conn.clone(), &INDEX_BUILD, &call)
            .await
            .map_err(unavailable)?;
        if built > 0 {
            tracing::info!(
                records = built,
                "redis: built the id index and the counters of a deployment written by an older server"
            );
        }
        self.inner.index_built.store(true, Ordering::Relaxed);
        Ok(())
    }

    async fn sweep_impl(&self) -> Result<Sweep, StoreError> {
        self.ensure_index().await?;
        // The Redis clock by which this sweep must have run (see `SWEEP`), from the
        // clock offset the last listing or sweep measured.
        let offset = self.inner.clock_offset_ms.load(Ordering::Relaxed);
        let deadline = (offset != i64::MIN).then(|| {
            local_epoch_ms()
                .saturating_add_signed(offset)
                .saturating_add(SWEEP_LATENESS_MS)
        });
        let mut call = evalsha(&SWEEP, &self.inner.keys, 4, 56);
        call.arg(SWEEP_PAGE)
            .arg(grace_ms())
            .arg(deadline.unwrap_or(0))
            .arg(self.inner.keys.retention_ms());
        let (expired, lag_ms, more, now): (u64, u64, u64, u64) =
            eval(&mut self.conn.clone(), &SWEEP, &call)
                .await
                .map_err(unavailable)?;
        self.note_clock(now);
        Ok(Sweep {
            expired,
            lag_ms,
            more: more != 0,
        })
    }

    /// [`Store::query_json`]: [`PAGE`] calls along the id index, or along the ids
    /// with the filter's [label](crate::store::query::Filter::label) in the label index, each reading at
    /// most [`QUERY_BUDGET`] ids, until the page has one match more than it holds
    /// (which says that a next page exists) or the range is done.
    ///
    /// Everything a filter selects, unpaged and with no prefix or label to narrow
    /// the index with, is read as the full listing is (the records in bulk, over the
    /// listing connection) and filtered here: a Lua loop over every record costs
    /// Redis more than sending them (README, Performance).
    async fn query_json_impl(&self, query: &Query) -> Result<Page, StoreError> {
        let (list, next_after) = self.query_written(query, false).await?;
        Ok(Page {
            json: list.finish(),
            next_after,
        })
    }

    /// [`Shard::query_json_impl`]'s page, written, and the next page's `after`;
    /// `spanned` keeps where each node is (to be merged with other shards').
    async fn query_written(
        &self,
        query: &Query,
        spanned: bool,
    ) -> Result<(ListWriter, Option<String>), StoreError> {
        let writer = |bytes| {
            if spanned {
                ListWriter::spanned(bytes)
            } else {
                ListWriter::with_capacity(bytes)
            }
        };
        self.ensure_index().await?;
        let filter = query.filter();
        // Members of the label index are `<label>\0<id>`: a range of ids is the
        // same range behind this prefix.
        let label = filter.label().map(|l| l + "\0").unwrap_or_default();
        if query.limit_value().is_none()
            && query.after_value().is_none()
            && filter.prefix_value().is_none()
            && label.is_empty()
        {
            let mut list = writer(4096);
            self.for_each_live(|id, rec| {
                let meta = rec.meta_json(id);
                if filter.matches(id, rec.status, meta) {
                    rec.push_to(&mut list, id, meta);
                }
            })
            .await?;
            return Ok((list, None));
        }
        let limit = query.limit_value().unwrap_or(usize::MAX);
        let mut start = match query.scan_start() {
            None if label.is_empty() => "-".to_owned(),
            None => format!("[{label}"),
            Some((id, true)) => format!("[{label}{id}"),
            Some((id, false)) => format!("({label}{id}"),
        }
        .into_bytes();
        // Node ids are ASCII below DEL: every id with the prefix sorts before
        // `prefix` + DEL.
        let stop = match filter.prefix_value() {
            None if label.is_empty() => "+".to_owned(),
            prefix => format!("({label}{}\u{7f}", prefix.unwrap_or("")),
        };
        let statuses: String = if filter.has_status_filter() {
            filter.selected_statuses().map(status_arg).collect()
        } else {
            String::new()
        };
        let mut list = writer(limit.min(QUERY_BUDGET) * 128);
        let mut last: Option<String> = None;
        loop {
            let want = limit.saturating_sub(list.count()).saturating_add(1);
            let needles = filter.meta_needles();
            let mut call = evalsha(
                &PAGE,
                &self.inner.keys,
                6 + 2 * needles.len(),
                64 + 3 * label.len(),
            );
            call.arg(&start)
                .arg(&stop)
                .arg(want.min(QUERY_BUDGET))
                .arg(QUERY_BUDGET)
                .arg(&statuses)
                .arg(&label);
            for needle in needles {
                call.arg(needle.string_text())
                    .arg(needle.literal_text().unwrap_or(""));
            }
            let (found, next): (Vec<Vec<u8>>, Vec<u8>) = eval(&mut self.conn.clone(), &PAGE, &call)
                .await
                .map_err(unavailable)?;
            for pair in found.chunks_exact(2) {
                let (Some(id), Some(rec)) = (listed_id(&pair[0]), Record::parse(&pair[1])) else {
                    continue;
                };
                let meta = rec.meta_json(id);
                if !filter.matches(id, rec.status, meta) {
                    continue;
                }
                if list.count() == limit {
                    return Ok((list, last));
                }
                rec.push_to(&mut list, id, meta);
                last = Some(id.to_owned());
            }
            if next.is_empty() {
                return Ok((list, None));
            }
            start = next;
        }
    }

    /// [`Store::stats`]: the counters, one `HMGET`.
    async fn stats_impl(&self) -> Result<Stats, StoreError> {
        self.ensure_index().await?;
        let counts: Vec<Option<i64>> = redis::cmd("HMGET")
            .arg(&self.inner.keys.counts)
            .arg(&["u", "d", "r"][..])
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        let mut out = [0u64; 3];
        for (slot, n) in out.iter_mut().zip(counts) {
            // A counter below zero would be a bug; never report one.
            *slot = n.map_or(0, |n| n.max(0).unsigned_abs());
        }
        Ok(Stats::from_counts(out))
    }

    async fn ping_impl(&self) -> Result<(), StoreError> {
        // A command on one of the shard's keys, not `PING`: on a cluster that reaches
        // the master of the shard's slot (a `PING` would go to every master).
        let ping = || async {
            redis::cmd("EXISTS")
                .arg(&self.inner.keys.counts)
                .exec_async(&mut self.conn.clone())
                .await
        };
        match ping().await {
            // After an outage the first command may only collect the failure of a
            // stale reconnection attempt, which starts a fresh one: a probe asks again,
            // so a Redis that is back is seen at once (one breaker interval sooner).
            Err(e) if e.is_io_error() || e.is_connection_dropped() => {
                ping().await.map_err(unavailable)
            }
            other => other.map_err(unavailable),
        }
    }
}

/// The exchanges of one listing: over the shard's [`BulkConnection`], or, on a
/// cluster (where that connection does not follow slots and failovers), over the
/// shared connection, through the `redis` crate's parser (README, Performance).
enum ListSession<'a> {
    Bulk(Session<'a>),
    Shared {
        conn: RedisConnection,
        /// Pipelines sent, in order: each runs in its own task so that several are
        /// in flight, like the bulk connection's.
        sent: VecDeque<tokio::task::JoinHandle<redis::RedisResult<Vec<redis::Value>>>>,
        /// Replies of the first pipeline not handed out yet.
        ready: VecDeque<redis::Value>,
    },
}

impl ListSession<'_> {
    /// Sends `pipeline`, whose replies [`reply`](Self::reply) then reads in order.
    async fn send(&mut self, pipeline: &redis::Pipeline) -> Result<(), StoreError> {
        match self {
            ListSession::Bulk(session) => {
                session
                    .send(&pipeline.get_packed_pipeline(), pipeline.len())
                    .await
            }
            ListSession::Shared { conn, sent, .. } => {
                let mut conn = conn.clone();
                let pipeline = pipeline.clone();
                sent.push_back(tokio::spawn(async move {
                    pipeline.query_async(&mut conn).await
                }));
                Ok(())
            }
        }
    }

    /// The next reply, which must be an array of bulk strings or nils.
    async fn reply(&mut self) -> Result<Bulks, StoreError> {
        match self {
            ListSession::Bulk(session) => session.reply().await,
            ListSession::Shared { sent, ready, .. } => Self::next_value(sent, ready)
                .await?
                .and_then(Bulks::from_value)
                .ok_or_else(|| {
                    StoreError::Unavailable(
                        "redis: a listing reply is not an array of strings".to_owned(),
                    )
                }),
        }
    }

    /// The next reply, which must be an integer.
    async fn reply_integer(&mut self) -> Result<i64, StoreError> {
        match self {
            ListSession::Bulk(session) => session.reply_integer().await,
            ListSession::Shared { sent, ready, .. } => match Self::next_value(sent, ready).await? {
                Some(redis::Value::Int(n)) => Ok(n),
                _ => Err(StoreError::Unavailable(
                    "redis: a listing reply is not an integer".to_owned(),
                )),
            },
        }
    }

    /// The next reply of the shared connection's pipelines, as sent.
    async fn next_value(
        sent: &mut VecDeque<tokio::task::JoinHandle<redis::RedisResult<Vec<redis::Value>>>>,
        ready: &mut VecDeque<redis::Value>,
    ) -> Result<Option<redis::Value>, StoreError> {
        if ready.is_empty() {
            let Some(next) = sent.pop_front() else {
                return Err(StoreError::Unavailable(
                    "redis: a reply was read that was not asked for".to_owned(),
                ));
            };
            let replies = next
                .await
                .map_err(|e| StoreError::Unavailable(format!("redis: listing task failed: {e}")))?;
            ready.extend(replies.map_err(unavailable)?);
        }
        Ok(ready.pop_front())
    }
}

impl Store for Shard {
    fn login_with<'a>(
        &'a self,
        node: &'a NodeId,
        lease_id: &'a str,
        ttl_ms: u64,
        meta: Meta,
        status: Status,
    ) -> BoxFuture<'a, Result<LoginOutcome, StoreError>> {
        Box::pin(self.login_impl(node, lease_id, ttl_ms, meta, status))
    }

    fn heartbeat_with<'a>(
        &'a self,
        node: &'a NodeId,
        lease_id: &'a str,
        ttl_ms: u64,
        meta: Option<Meta>,
        status: Option<Status>,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(self.heartbeat_impl(node, lease_id, ttl_ms, meta, status))
    }

    fn logout<'a>(
        &'a self,
        node: &'a NodeId,
        lease_id: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(self.logout_impl(node, lease_id))
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<Node>, StoreError>> {
        Box::pin(self.list_impl())
    }

    fn list_json(&self) -> BoxFuture<'_, Result<NodeListJson, StoreError>> {
        Box::pin(self.list_json_impl())
    }

    fn query_json<'a>(&'a self, query: &'a Query) -> BoxFuture<'a, Result<Page, StoreError>> {
        Box::pin(self.query_json_impl(query))
    }

    fn stats(&self) -> BoxFuture<'_, Result<Stats, StoreError>> {
        Box::pin(self.stats_impl())
    }

    fn get<'a>(&'a self, node: &'a NodeId) -> BoxFuture<'a, Result<Option<Node>, StoreError>> {
        Box::pin(self.get_impl(node))
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(self.ping_impl())
    }

    fn now_ms(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(self.now_impl())
    }

    fn extend_after_outage(
        &self,
        outage: Duration,
        max_ttl_ms: u64,
    ) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(self.extend_after_outage_impl(outage, max_ttl_ms))
    }

    fn watch<'a>(
        &'a self,
        after: Option<&'a Cursor>,
        options: WatchOptions,
    ) -> BoxFuture<'a, Result<Watch, StoreError>> {
        Box::pin(self.watch_impl(after, options))
    }

    fn feed_cursor(&self) -> Option<Cursor> {
        self.inner.hub.head()
    }

    fn set_feed_retention(&self, retention: Duration) {
        let ms = crate::millis(retention);
        self.inner.keys.retention_ms.store(ms, Ordering::Relaxed);
        self.inner.hub.set_retention_ms(ms);
    }

    fn sweep_expired(&self) -> BoxFuture<'_, Result<Sweep, StoreError>> {
        Box::pin(self.sweep_impl())
    }

    fn describe(&self) -> String {
        self.inner.description.clone()
    }
}

/// The local wall clock in epoch ms (only to estimate the Redis clock).
pub(super) fn local_epoch_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, crate::millis)
}

/// A stored field name as a node id for a listing; `None` (logged) if it is not
/// UTF-8, which no server writes.
fn listed_id(id: &[u8]) -> Option<&str> {
    let id = std::str::from_utf8(id).ok();
    if id.is_none() {
        tracing::warn!("stored node id is not UTF-8; not listing it");
    }
    id
}

/// [`INDEX_GRANULARITY`] in ms.
fn index_granularity_ms() -> u64 {
    crate::millis(INDEX_GRANULARITY)
}

/// How long expired records are kept, in ms ([`MAX_PRESERVED_OUTAGE`]).
pub(super) fn grace_ms() -> u64 {
    crate::millis(MAX_PRESERVED_OUTAGE)
}

/// The members' indexes in `node_id` order, each with its sort key: a 16-byte prefix
/// computed once (most ids differ in it), the rest of the bytes only on a tie.
fn node_id_order(ids: &Bulks) -> Vec<usize> {
    let mut order: Vec<(u128, usize)> = (0..ids.len())
        .filter_map(|i| Some((sort_key(ids.get(i)?), i)))
        .collect();
    order.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| ids.get(a.1).cmp(&ids.get(b.1))));
    order.into_iter().map(|(_, i)| i).collect()
}

/// Whether a listing that read `stale` records it did not list for `listed` it
/// did should read its ids from the expiry index rather than the id index (see
/// [`Shard::for_each_live`]): more than a quarter as many, and more than 512.
fn mostly_stale(stale: usize, listed: usize) -> bool {
    stale > 512 && stale > listed / 4
}

fn epoch_ms(secs: u64, micros: u64) -> u64 {
    secs.saturating_mul(1000).saturating_add(micros / 1000)
}

fn encode_meta(meta: &Meta) -> Result<String, StoreError> {
    serde_json::to_string(meta)
        .map_err(|e| StoreError::Unavailable(format!("cannot encode meta: {e}")))
}

/// A `redis` client for `uri` (`redis://` or `rediss://`): over TLS it trusts `ca_pem`
/// alone when given, the system's roots otherwise; `#insecure` (TLS without
/// verification) is refused. The store and the shared rate limits
/// (`PRESENCE_RATE_LIMIT_SCOPE=shared`) connect alike.
///
/// # Errors
/// [`StoreError::Unavailable`] for an invalid URI, `#insecure`, or a CA the `redis`
/// crate refuses.
pub fn redis_client(uri: &str, ca_pem: Option<&[u8]>) -> Result<redis::Client, StoreError> {
    let shown = redact_uri(uri);
    let invalid =
        |e: &dyn fmt::Display| StoreError::Unavailable(format!("invalid Redis URI {shown:?}: {e}"));
    let client = redis::Client::open(uri).map_err(|e| invalid(&e))?;
    match client.get_connection_info().addr() {
        redis::ConnectionAddr::TcpTls { insecure: true, .. } => {
            Err(StoreError::Unavailable(format!(
                "cannot connect to {shown}: #insecure (TLS without verification) is not supported"
            )))
        }
        redis::ConnectionAddr::TcpTls { .. } => {
            // The redis crate builds its TLS configuration with the process's
            // default provider (see `crate::tls`).
            crate::tls::install_default_provider();
            let Some(pem) = ca_pem else {
                return Ok(client);
            };
            let info = client.get_connection_info().clone();
            let certificates = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.to_vec()),
            };
            redis::Client::build_with_tls(info, certificates).map_err(|e| invalid(&e))
        }
        _ => Ok(client),
    }
}

fn is_tls(client: &redis::Client) -> bool {
    matches!(
        client.get_connection_info().addr(),
        redis::ConnectionAddr::TcpTls { .. }
    )
}

/// A Redis error as a store error: [`StoreError::Refused`] when Redis answered but
/// will not write (`OOM`, `READONLY`, `MISCONF`, or `NOSCRIPT` that reloading did not
/// cure), [`StoreError::Unavailable`] otherwise.
pub(super) fn unavailable(e: RedisError) -> StoreError {
    if refuses_writes(e.code()) {
        StoreError::Refused(format!("redis: {e}"))
    } else {
        StoreError::Unavailable(format!("redis: {e}"))
    }
}

/// Whether a Redis error code says "up, but not writing".
pub(super) fn refuses_writes(code: Option<&str>) -> bool {
    matches!(code, Some("OOM" | "READONLY" | "MISCONF" | "NOSCRIPT"))
}

fn unexpected(what: &str, reply: &[u64]) -> StoreError {
    StoreError::Unavailable(format!("redis: unexpected {what} script reply {reply:?}"))
}

/// A prefix must be non-empty, at most [`MAX_PREFIX_LEN`] bytes, and free of `{`,
/// `}` (they would break the hash tag), whitespace and control characters.
fn validate_prefix(prefix: &str) -> Result<(), StoreError> {
    let ok = !prefix.is_empty()
        && prefix.len() <= MAX_PREFIX_LEN
        && !prefix
            .chars()
            .any(|c| c == '{' || c == '}' || c.is_whitespace() || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(StoreError::Unavailable(format!(
            "invalid key prefix {prefix:?}: 1 to {MAX_PREFIX_LEN} bytes without braces, spaces or control characters"
        )))
    }
}

/// Helpers for tests that need a Redis server or a Redis Cluster (this crate's and
/// the workspace's end-to-end tests), behind the `test-util` feature: not part of the
/// library's API.
#[cfg(feature = "test-util")]
pub mod test_support;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_validation() {
        assert!(validate_prefix("presence").is_ok());
        assert!(validate_prefix("test-1-2-a_b:c").is_ok());
        for bad in ["", "a{b", "a}b", "a b", "a\nb"] {
            assert!(validate_prefix(bad).is_err(), "{bad:?}");
        }
        assert!(validate_prefix(&"p".repeat(MAX_PREFIX_LEN + 1)).is_err());
    }

    #[test]
    fn stale_listings_are_more_than_a_page_and_a_quarter() {
        assert!(!mostly_stale(512, 0));
        assert!(mostly_stale(513, 0));
        assert!(mostly_stale(1_000, 3_999));
        assert!(!mostly_stale(1_000, 4_000));
    }
}
