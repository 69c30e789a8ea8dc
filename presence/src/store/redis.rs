//! [`RedisStore`]: presence state in Redis, shared by any number of stateless
//! servers (SPEC §6).
//!
//! # Data model
//!
//! Every key carries the hash tag `{<prefix>}`, so all keys of a deployment live in
//! one cluster slot and every script only touches keys of that slot:
//!
//! - `{<prefix>}:nodes`: sorted set, member `node_id`, score `expires_at_ms`.
//! - `{<prefix>}:node:<node_id>`: hash with `lease`, `meta` (JSON text),
//!   `online_since`, `last_seen`, `expires_at` (epoch ms), and a `PEXPIREAT` at
//!   `expires_at` + [`MAX_PRESERVED_OUTAGE`] as garbage collection. The sorted set
//!   itself expires when its last member's hash does, so an abandoned deployment
//!   leaves nothing behind.
//! - `{<prefix>}:outage`: when the last outage was given back to the leases (see
//!   [self-preservation](super#outages-self-preservation)); expires after
//!   [`MAX_PRESERVED_OUTAGE`].
//!
//! Expired records stay (invisible: every read compares `expires_at` with `TIME`)
//! for [`MAX_PRESERVED_OUTAGE`] after their expiry, so that after an outage
//! [`Store::extend_after_outage`] still finds the leases the outage ran down.
//!
//! `node_id`s are [`NodeId`]s, validated before they get anywhere near a key.
//!
//! # Operations
//!
//! `login`, `heartbeat` and `logout` are Lua scripts (`EVALSHA`, loaded
//! automatically on `NOSCRIPT`): one round trip, atomic, clock from `TIME` inside
//! the script. `login` drops expired members from the sorted set by range
//! (`ZREMRANGEBYSCORE`, [`MAX_PRESERVED_OUTAGE`] after their expiry); `heartbeat`,
//! the hot path, leaves that to it (every node that joins the set logs in, so the
//! set stays bounded). Heartbeats that are waiting at the same moment share one
//! script call (see below). `list` is one pipeline (`TIME` + `ZRANGE ... BYSCORE`)
//! followed by the hashes, fetched with `HMGET` in pipelined pages:
//! `1 + ceil(N / page)` round trips, never `KEYS`, never one request per node. `get`
//! is one pipeline (`TIME` + `HMGET`).
//!
//! # Performance
//!
//! Everything goes over one multiplexed connection, so concurrent calls are
//! pipelined; the scripts are hashed once per process.
//!
//! - Heartbeats are batched: a background task takes every heartbeat that is
//!   waiting (up to 128) into one call of the heartbeat script, which handles each
//!   on its own (its own lease check and result; `redis.pcall`, so a bad key fails
//!   only its heartbeat). Redis spends about 3 µs of overhead per call and 5 µs per
//!   heartbeat, and the server encodes one command and parses one reply per call,
//!   so under load this about doubles what Redis can take; a lone heartbeat still
//!   goes out at once, at the cost of one task switch. Each heartbeat still costs
//!   one round trip.
//! - A listing costs Redis about 0.8 µs per node (one `HMGET` each); parsing the
//!   replies (the `redis` crate's RESP parser, about 1 µs per node) is most of
//!   the server's share. [`Store::list_json`] writes the JSON response straight
//!   from the replies, copying the stored meta text as it is (after checking that
//!   it is a JSON object).
//!
//! Requires Redis 6.2 or newer (`ZRANGE ... BYSCORE`); single-node or a
//! replicated primary (cluster mode is not wired up, although the key layout is
//! cluster ready). `rediss://` needs the `redis` crate's TLS features, which this
//! build does not enable: such a URI fails at connect with a clear error.

use std::fmt;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{StreamExt, TryStreamExt};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Script};
use tokio::sync::{mpsc, oneshot};

use super::json::{is_json_object, ListWriter, NODE_OVERHEAD};
use super::{
    redact_uri, BoxFuture, LoginOutcome, NodeListJson, Store, StoreError, MAX_PRESERVED_OUTAGE,
};
use crate::model::{Meta, Node, NodeId};

/// Longest accepted key prefix, in bytes.
pub const MAX_PREFIX_LEN: usize = 128;

/// Prelude shared by the scripts: `now` in epoch ms from the Redis clock. Redis 7
/// replicates script effects, so `TIME` may precede writes; the guarded call makes
/// Redis 6.2 do the same (Redis 7 has `REDIS_VERSION_NUM` and skips the deprecated
/// call, which costs a heartbeat about 5%).
macro_rules! lua_now {
    () => {
        "if not redis.REDIS_VERSION_NUM then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"
    };
}

/// Keeps the sorted set alive at least until `gc`, the garbage-collection time of the
/// record just written (it must outlive its members).
macro_rules! lua_keep_nodes_key {
    () => {
        "if redis.call('PTTL', KEYS[1]) < gc - now then redis.call('PEXPIREAT', KEYS[1], gc) end
"
    };
}

/// KEYS: nodes zset, node hash. ARGV: node_id, lease, ttl_ms, meta JSON, grace_ms
/// (how long expired records are kept, [`MAX_PRESERVED_OUTAGE`]).
/// Returns `{now, expires_at}`.
static LOGIN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        lua_now!(),
        "local ttl = tonumber(ARGV[3])
local grace = tonumber(ARGV[5])
local exp = now + ttl
local gc = exp + grace
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - grace)
redis.call('HSET', KEYS[2], 'lease', ARGV[2], 'meta', ARGV[4],
  'online_since', now, 'last_seen', now, 'expires_at', exp)
redis.call('PEXPIREAT', KEYS[2], gc)
redis.call('ZADD', KEYS[1], exp, ARGV[1])
",
        lua_keep_nodes_key!(),
        "return {now, exp}
"
    ))
});

/// Heartbeats, several per call (see [`RedisStore`]'s batching). KEYS: nodes zset.
/// ARGV: grace_ms, node key prefix, then five values per heartbeat: node_id, lease,
/// ttl_ms, "1" to replace the meta with the fifth / "0" to keep it, meta. Returns one
/// integer per heartbeat: `0` not online, `1` lease mismatch, `-1` failed (the key
/// holds something else than a hash), otherwise the new `expires_at`.
///
/// An expired record is left alone (garbage collection takes it later): a heartbeat
/// that was queued while Redis was paused runs before the server can give the
/// outage back, and must not destroy the record it would restore.
///
/// The hot path: per heartbeat one `HMGET`, one `HSET`, `PEXPIREAT`, `ZADD`; `TIME`
/// and the sorted set's own expiry once per call; no `ZREMRANGEBYSCORE` (login purges
/// the set). `redis.pcall`, so that one bad key fails its own heartbeat, not the
/// others in the call.
static HEARTBEATS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        lua_now!(),
        "local grace = tonumber(ARGV[1])
local prefix = ARGV[2]
local out = {}
local gc = 0
for i = 3, #ARGV - 4, 5 do
  local id = ARGV[i]
  local key = prefix .. id
  local h = redis.pcall('HMGET', key, 'lease', 'expires_at')
  if h.err then
    out[#out + 1] = -1
  elseif not h[1] or not h[2] or tonumber(h[2]) <= now then
    out[#out + 1] = 0
  elseif h[1] ~= ARGV[i + 1] then
    out[#out + 1] = 1
  else
    local exp = now + tonumber(ARGV[i + 2])
    if ARGV[i + 3] == '1' then
      redis.call('HSET', key, 'meta', ARGV[i + 4], 'last_seen', now, 'expires_at', exp)
    else
      redis.call('HSET', key, 'last_seen', now, 'expires_at', exp)
    end
    redis.call('PEXPIREAT', key, exp + grace)
    redis.call('ZADD', KEYS[1], exp, id)
    if exp + grace > gc then gc = exp + grace end
    out[#out + 1] = exp
  end
end
if gc > 0 then
",
        lua_keep_nodes_key!(),
        "end
return out
"
    ))
});

/// KEYS: nodes zset, node hash. ARGV: node_id, lease. Returns 0 not online,
/// 1 removed, 2 lease mismatch.
static LOGOUT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        lua_now!(),
        "local h = redis.call('HMGET', KEYS[2], 'lease', 'expires_at')
local online = h[1] and h[2] and tonumber(h[2]) > now
if online and h[1] ~= ARGV[2] then return 2 end
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[1], ARGV[1])
if online then return 1 end
return 0
"
    ))
});

/// KEYS: outage marker. ARGV: outage_ms, grace_ms. Claims the job of giving an
/// outage back: `{1, now}` if this caller must do it, `{0, now}` if another server
/// already did (its recovery time is at or after this outage's start).
static OUTAGE_CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        lua_now!(),
        "local start = now - tonumber(ARGV[1])
local done = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if done >= start then return {0, now} end
redis.call('SET', KEYS[1], now, 'PX', ARGV[2])
return {1, now}
"
    ))
});

/// KEYS: nodes zset. ARGV: lowest score (inclusive), highest score (inclusive),
/// outage_ms, grace_ms, node key prefix, page size. Moves one page of the members
/// in the range, highest first, by the outage (score and hash `expires_at`); a
/// member whose hash is gone is garbage and removed. Returns
/// `{handled, moved, lowest score handled}`: the next page's highest score, since
/// every member handled has moved above it (or is gone) and ties not yet handled
/// are still at it.
static OUTAGE_SHIFT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "local d = tonumber(ARGV[3])
local grace = tonumber(ARGV[4])
local page = redis.call('ZRANGE', KEYS[1], ARGV[2], ARGV[1], 'BYSCORE', 'REV',
  'LIMIT', 0, tonumber(ARGV[6]), 'WITHSCORES')
local moved = 0
local last = 0
local lowest = 0
for i = 1, #page, 2 do
  local id = page[i]
  local key = ARGV[5] .. id
  lowest = tonumber(page[i + 1])
  if redis.call('EXISTS', key) == 1 then
    local exp = lowest + d
    redis.call('HSET', key, 'expires_at', exp)
    redis.call('PEXPIREAT', key, exp + grace)
    redis.call('ZADD', KEYS[1], exp, id)
    if exp > last then last = exp end
    moved = moved + 1
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
if last > 0 and redis.call('PTTL', KEYS[1]) < last + grace - tonumber(ARGV[1]) - d then
  redis.call('PEXPIREAT', KEYS[1], last + grace)
end
return {#page / 2, moved, lowest}
",
    )
});

/// How far below the estimated Redis clock a listing's `ZRANGE` starts (see
/// [`RedisStore::live_ids`]): covers clock drift between listings. Members that
/// expired within it are read and dropped.
const LIST_CLOCK_MARGIN_MS: u64 = 2_000;

/// Members moved by one [`OUTAGE_SHIFT`] call: bounds how long one script blocks
/// Redis (a few milliseconds) when a large deployment comes back from an outage.
const OUTAGE_PAGE: usize = 1000;

/// The hash fields `get` and `list` read, in this order.
const NODE_FIELDS: [&str; 4] = ["meta", "online_since", "last_seen", "expires_at"];

/// One `HMGET` reply for [`NODE_FIELDS`].
type NodeFields = (Option<Vec<u8>>, Option<u64>, Option<u64>, Option<u64>);

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
    /// Hashes fetched per pipelined round trip by `list` (default 500).
    pub page_size: usize,
    /// Pages of `list` in flight at once (default 4).
    pub page_concurrency: usize,
    /// Connect on first use instead of in [`RedisStore::connect_with`] (default
    /// `false`). A lazy store can be created while Redis is down: its calls fail with
    /// [`StoreError::Unavailable`] until Redis answers, then it works.
    pub lazy: bool,
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
}

/// Presence state in Redis (see the [module docs](self) for the data model).
///
/// Cheap to clone: clones share one multiplexed, self-reconnecting connection
/// (`redis::aio::ConnectionManager`).
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    inner: Arc<Inner>,
}

struct Inner {
    prefix: String,
    nodes_key: String,
    node_key_prefix: String,
    outage_key: String,
    description: String,
    page_size: usize,
    page_concurrency: usize,
    /// Redis clock minus the local wall clock, in ms, as of the last listing
    /// (`i64::MIN`: not known yet). Bounds the next listing's `ZRANGE`.
    clock_offset_ms: AtomicI64,
    /// Bytes per node of the last listing: sizes the next one's buffer.
    list_bytes_per_node: AtomicUsize,
    /// Queue of the heartbeat batcher (see [`batch_heartbeats`]).
    heartbeats: mpsc::UnboundedSender<HeartbeatJob>,
}

/// One heartbeat waiting for [`batch_heartbeats`].
struct HeartbeatJob {
    node: NodeId,
    lease_id: String,
    ttl_ms: u64,
    /// The new meta, serialized; `None` keeps the stored one.
    meta: Option<String>,
    /// The [`HEARTBEATS`] code of this heartbeat.
    reply: oneshot::Sender<Result<i64, StoreError>>,
}

/// Heartbeats in one [`HEARTBEATS`] call at most: bounds the call's argument list
/// (and how long it keeps Redis busy, about 5 µs per heartbeat).
const MAX_HEARTBEAT_BATCH: usize = 128;

/// Sends the heartbeats that wait in `queue` to Redis, as many as are waiting (up
/// to [`MAX_HEARTBEAT_BATCH`]) in one [`HEARTBEATS`] call, each call in its own
/// task so that calls overlap on the multiplexed connection. Ends when the store
/// (every sender) is gone.
///
/// Under load this is what makes a heartbeat cheap: one `EVALSHA` costs Redis about
/// 3 µs of call overhead plus 5 µs per heartbeat in it, and the server one command
/// to encode and one reply to parse per call instead of per heartbeat (2x the
/// heartbeats per second of one call per heartbeat, measured with
/// `redis-benchmark`). A lone heartbeat goes out at once, alone: batching costs it
/// one task switch.
async fn batch_heartbeats(
    conn: ConnectionManager,
    nodes_key: String,
    node_key_prefix: String,
    mut queue: mpsc::UnboundedReceiver<HeartbeatJob>,
) {
    while let Some(first) = queue.recv().await {
        let mut jobs = vec![first];
        // Let the other ready requests queue theirs before the call goes out.
        tokio::task::yield_now().await;
        while jobs.len() < MAX_HEARTBEAT_BATCH {
            match queue.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let mut call = HEARTBEATS.key(&nodes_key);
        call.arg(grace_ms()).arg(&node_key_prefix);
        for job in &jobs {
            call.arg(job.node.as_str())
                .arg(&job.lease_id)
                .arg(job.ttl_ms)
                .arg(if job.meta.is_some() { "1" } else { "0" })
                .arg(job.meta.as_deref().unwrap_or(""));
        }
        let mut conn = conn.clone();
        tokio::spawn(async move {
            let codes: Result<Vec<i64>, StoreError> =
                call.invoke_async(&mut conn).await.map_err(unavailable);
            match codes {
                Ok(codes) if codes.len() == jobs.len() => {
                    for (job, code) in jobs.into_iter().zip(codes) {
                        // The caller may have given up (timeout); nobody to tell.
                        let _ = job.reply.send(Ok(code));
                    }
                }
                Ok(codes) => {
                    let e = StoreError::Unavailable(format!(
                        "redis: {} heartbeat results for {} heartbeats",
                        codes.len(),
                        jobs.len()
                    ));
                    for job in jobs {
                        let _ = job.reply.send(Err(e.clone()));
                    }
                }
                Err(e) => {
                    for job in jobs {
                        let _ = job.reply.send(Err(e.clone()));
                    }
                }
            }
        });
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("description", &self.inner.description)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects to `uri` (`redis://[user:password@]host:port[/db]`) with
    /// [`RedisOptions::default`]; keys live under `{prefix}`.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] if the URI or prefix is invalid or Redis cannot be
    /// reached (within about a second when nothing listens).
    pub async fn connect(uri: &str, prefix: &str) -> Result<RedisStore, StoreError> {
        Self::connect_with(uri, prefix, RedisOptions::default()).await
    }

    /// [`RedisStore::connect`] with explicit [`RedisOptions`]. With
    /// [`RedisOptions::lazy`] nothing is sent until the first call, and Redis being
    /// unreachable is not an error here.
    ///
    /// Must be called within a Tokio runtime (the connection manager spawns a task).
    ///
    /// # Errors
    /// As for [`RedisStore::connect`].
    pub async fn connect_with(
        uri: &str,
        prefix: &str,
        options: RedisOptions,
    ) -> Result<RedisStore, StoreError> {
        validate_prefix(prefix)?;
        let shown = redact_uri(uri);
        let client = redis::Client::open(uri)
            .map_err(|e| StoreError::Unavailable(format!("invalid Redis URI {shown:?}: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.connection_timeout))
            .set_response_timeout(Some(options.response_timeout))
            .set_number_of_retries(options.reconnect_retries)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| StoreError::Unavailable(format!("cannot connect to {shown}: {e}")))?;
        let nodes_key = format!("{{{prefix}}}:nodes");
        let node_key_prefix = format!("{{{prefix}}}:node:");
        let (heartbeats, queue) = mpsc::unbounded_channel();
        tokio::spawn(batch_heartbeats(
            conn.clone(),
            nodes_key.clone(),
            node_key_prefix.clone(),
            queue,
        ));
        let store = RedisStore {
            conn,
            inner: Arc::new(Inner {
                prefix: prefix.to_owned(),
                nodes_key,
                node_key_prefix,
                outage_key: format!("{{{prefix}}}:outage"),
                description: format!("redis {shown} prefix {prefix}"),
                page_size: options.page_size.max(1),
                page_concurrency: options.page_concurrency.max(1),
                clock_offset_ms: AtomicI64::new(i64::MIN),
                list_bytes_per_node: AtomicUsize::new(NODE_OVERHEAD + 32),
                heartbeats,
            }),
        };
        if !options.lazy {
            store
                .ping_impl()
                .await
                .map_err(|e| StoreError::Unavailable(format!("cannot connect to {shown}: {e}")))?;
        }
        Ok(store)
    }

    /// The key prefix this store was opened with.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The sorted set key, `{prefix}:nodes`.
    pub fn nodes_key(&self) -> &str {
        &self.inner.nodes_key
    }

    /// The hash key of one node, `{prefix}:node:<node_id>`.
    pub fn node_key(&self, node: &NodeId) -> String {
        format!("{}{}", self.inner.node_key_prefix, node.as_str())
    }

    /// Deletes every key of this prefix (`SCAN MATCH {prefix}:*` + `UNLINK`, never
    /// `KEYS`); returns how many were deleted. Meant for tests and decommissioning:
    /// it wipes the deployment.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] if Redis fails.
    pub async fn delete_prefix(&self) -> Result<u64, StoreError> {
        let mut conn = self.conn.clone();
        let pattern = format!("{}*", glob_escape(&format!("{{{}}}:", self.inner.prefix)));
        let mut cursor: u64 = 0;
        let mut deleted = 0;
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            if !keys.is_empty() {
                let n: u64 = redis::cmd("UNLINK")
                    .arg(&keys)
                    .query_async(&mut conn)
                    .await
                    .map_err(unavailable)?;
                deleted += n;
            }
            if next == 0 {
                return Ok(deleted);
            }
            cursor = next;
        }
    }

    async fn login_impl(
        &self,
        node: NodeId,
        lease_id: String,
        ttl_ms: u64,
        meta: Meta,
    ) -> Result<LoginOutcome, StoreError> {
        let meta = encode_meta(&meta)?;
        let (now, exp): (u64, u64) = LOGIN
            .key(&self.inner.nodes_key)
            .key(self.node_key(&node))
            .arg(node.as_str())
            .arg(lease_id)
            .arg(ttl_ms)
            .arg(meta)
            .arg(grace_ms())
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(LoginOutcome {
            online_since_ms: now,
            expires_at_ms: exp,
        })
    }

    async fn heartbeat_impl(
        &self,
        node: NodeId,
        lease_id: String,
        ttl_ms: u64,
        meta: Option<Meta>,
    ) -> Result<u64, StoreError> {
        let meta = meta.as_ref().map(encode_meta).transpose()?;
        let (reply, outcome) = oneshot::channel();
        let job = HeartbeatJob {
            node,
            lease_id,
            ttl_ms,
            meta,
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
                "redis: heartbeat failed (code {code}); is the node's key a hash?"
            ))),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(StoreError::Unavailable(
                "redis: the heartbeat batcher dropped the call".to_owned(),
            )),
        }
    }

    async fn logout_impl(&self, node: NodeId, lease_id: String) -> Result<bool, StoreError> {
        let reply: u64 = LOGOUT
            .key(&self.inner.nodes_key)
            .key(self.node_key(&node))
            .arg(node.as_str())
            .arg(lease_id)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        match reply {
            0 => Ok(false),
            1 => Ok(true),
            2 => Err(StoreError::LeaseMismatch),
            other => Err(unexpected("logout", &[other])),
        }
    }

    /// The store clock and the ids of the nodes online then, sorted. May also hold
    /// members that expired shortly before: callers drop those by `expires_at`.
    ///
    /// `TIME` and `ZRANGE ... BYSCORE` in one pipeline, not a script: turning a
    /// large reply into a Lua table and back costs Redis more than the range itself
    /// (about 1.6 ms per 10 000 members). Without a script the range cannot start at
    /// `TIME`, so it starts at the Redis clock as estimated from the previous listing
    /// minus [`LIST_CLOCK_MARGIN_MS`], and is read again from `-inf` if that bound
    /// turns out to be above the `TIME` of the same pipeline (which Redis ran just
    /// before the range): no member that is online at `TIME` is ever missed.
    async fn live_ids(&self) -> Result<(u64, Vec<String>), StoreError> {
        let offset = self.inner.clock_offset_ms.load(Ordering::Relaxed);
        let mut lower = (offset != i64::MIN)
            .then(|| local_epoch_ms().saturating_add_signed(offset))
            .map(|estimate| estimate.saturating_sub(LIST_CLOCK_MARGIN_MS));
        loop {
            let min = lower.map_or_else(|| "-inf".to_owned(), |l| l.to_string());
            let ((secs, micros), mut ids): ((u64, u64), Vec<String>) = redis::pipe()
                .cmd("TIME")
                .cmd("ZRANGE")
                .arg(&self.inner.nodes_key)
                .arg(min)
                .arg("+inf")
                .arg("BYSCORE")
                .query_async(&mut self.conn.clone())
                .await
                .map_err(unavailable)?;
            let now = epoch_ms(secs, micros);
            let offset = i64::try_from(now)
                .unwrap_or(i64::MAX)
                .saturating_sub(i64::try_from(local_epoch_ms()).unwrap_or(i64::MAX));
            self.inner.clock_offset_ms.store(offset, Ordering::Relaxed);
            match lower {
                Some(l) if l > now => lower = None,
                _ => {
                    ids.sort_unstable();
                    return Ok((now, ids));
                }
            }
        }
    }

    async fn list_impl(&self) -> Result<Vec<Node>, StoreError> {
        let (now, ids) = self.live_ids().await?;
        // Futures built up front: a closure inside the stream trips the compiler's
        // `Send` inference for higher-ranked lifetimes.
        let fetches: Vec<_> = ids
            .chunks(self.inner.page_size)
            .map(|page| self.fetch_page(page))
            .collect();
        let pages = futures_util::stream::iter(fetches)
            .buffered(self.inner.page_concurrency)
            .try_collect::<Vec<Vec<NodeFields>>>()
            .await?;
        Ok(ids
            .iter()
            .zip(pages.into_iter().flatten())
            .filter_map(|(id, fields)| to_node(id, fields, now))
            .collect())
    }

    /// [`Store::list_json`]: like `list_impl`, but each page's replies are written
    /// into the response as they arrive, meta text as stored.
    async fn list_json_impl(&self) -> Result<NodeListJson, StoreError> {
        let (now, ids) = self.live_ids().await?;
        let per_node = self.inner.list_bytes_per_node.load(Ordering::Relaxed);
        let mut list = ListWriter::with_capacity(ids.len().saturating_mul(per_node));
        let fetches: Vec<_> = ids
            .chunks(self.inner.page_size)
            .map(|page| self.fetch_page(page))
            .collect();
        let mut pages = futures_util::stream::iter(fetches).buffered(self.inner.page_concurrency);
        let mut page_ids = ids.chunks(self.inner.page_size);
        while let Some(page) = pages.next().await {
            let page = page?;
            for (id, fields) in page_ids.next().unwrap_or_default().iter().zip(page) {
                push_node(&mut list, id, fields, now);
            }
        }
        if let Some(per_node) = list.len().checked_div(list.count()) {
            self.inner
                .list_bytes_per_node
                .store(per_node + per_node / 8, Ordering::Relaxed);
        }
        Ok(list.finish())
    }

    /// One pipelined round trip: the [`NODE_FIELDS`] of `ids`, in order.
    async fn fetch_page(&self, ids: &[String]) -> Result<Vec<NodeFields>, StoreError> {
        let mut pipe = redis::pipe();
        let mut key = String::new();
        for id in ids {
            key.clear();
            key.push_str(&self.inner.node_key_prefix);
            key.push_str(id);
            pipe.cmd("HMGET").arg(&key).arg(&NODE_FIELDS[..]);
        }
        let replies: Vec<NodeFields> = pipe
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        if replies.len() == ids.len() {
            Ok(replies)
        } else {
            Err(StoreError::Unavailable(format!(
                "redis: {} replies to a pipeline of {} HMGETs",
                replies.len(),
                ids.len()
            )))
        }
    }

    async fn get_impl(&self, node: NodeId) -> Result<Option<Node>, StoreError> {
        let ((secs, micros), fields): ((u64, u64), NodeFields) = redis::pipe()
            .cmd("TIME")
            .cmd("HMGET")
            .arg(self.node_key(&node))
            .arg(&NODE_FIELDS[..])
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(to_node(node.as_str(), fields, epoch_ms(secs, micros)))
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
        let outage_ms = u64::try_from(outage.as_millis()).unwrap_or(u64::MAX);
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
        let low = now.saturating_sub(outage_ms);
        let mut high = low.saturating_add(max_ttl_ms);
        let mut moved = 0;
        loop {
            let (handled, page_moved, lowest): (u64, u64, u64) = OUTAGE_SHIFT
                .key(&self.inner.nodes_key)
                .arg(low)
                .arg(high)
                .arg(outage_ms)
                .arg(grace_ms())
                .arg(&self.inner.node_key_prefix)
                .arg(OUTAGE_PAGE)
                .invoke_async(&mut self.conn.clone())
                .await
                .map_err(unavailable)?;
            moved += page_moved;
            if handled < OUTAGE_PAGE as u64 {
                return Ok(moved);
            }
            high = lowest;
        }
    }

    async fn ping_impl(&self) -> Result<(), StoreError> {
        let ping = || async { redis::cmd("PING").exec_async(&mut self.conn.clone()).await };
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

impl Store for RedisStore {
    fn login(
        &self,
        node: &NodeId,
        lease_id: &str,
        ttl_ms: u64,
        meta: Meta,
    ) -> BoxFuture<'_, Result<LoginOutcome, StoreError>> {
        Box::pin(self.login_impl(node.clone(), lease_id.to_owned(), ttl_ms, meta))
    }

    fn heartbeat(
        &self,
        node: &NodeId,
        lease_id: &str,
        ttl_ms: u64,
        meta: Option<Meta>,
    ) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(self.heartbeat_impl(node.clone(), lease_id.to_owned(), ttl_ms, meta))
    }

    fn logout(&self, node: &NodeId, lease_id: &str) -> BoxFuture<'_, Result<bool, StoreError>> {
        Box::pin(self.logout_impl(node.clone(), lease_id.to_owned()))
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<Node>, StoreError>> {
        Box::pin(self.list_impl())
    }

    fn list_json(&self) -> BoxFuture<'_, Result<NodeListJson, StoreError>> {
        Box::pin(self.list_json_impl())
    }

    fn get(&self, node: &NodeId) -> BoxFuture<'_, Result<Option<Node>, StoreError>> {
        Box::pin(self.get_impl(node.clone()))
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

    fn describe(&self) -> String {
        self.inner.description.clone()
    }
}

/// Builds a [`Node`] from an `HMGET` reply; `None` if the hash is gone, incomplete
/// or expired at `now`.
fn to_node(
    id: &str,
    (meta, online_since, last_seen, expires_at): NodeFields,
    now: u64,
) -> Option<Node> {
    let (online_since_ms, last_seen_ms, expires_at_ms) = (online_since?, last_seen?, expires_at?);
    if expires_at_ms <= now {
        return None;
    }
    let meta = match meta.as_deref() {
        None | Some(b"") => Meta::new(),
        Some(json) => serde_json::from_slice(json).unwrap_or_else(|e| {
            tracing::warn!(node_id = id, error = %e, "stored meta is not a JSON object; listing it as {{}}");
            Meta::new()
        }),
    };
    Some(Node {
        node_id: id.to_owned(),
        meta,
        online_since_ms,
        last_seen_ms,
        expires_at_ms,
    })
}

/// Writes an `HMGET` reply into a listing, unless the hash is gone, incomplete or
/// expired at `now` (what [`to_node`] drops). A meta that is not a JSON object is
/// listed as `{}`, as [`to_node`] does.
fn push_node(
    list: &mut ListWriter,
    id: &str,
    (meta, online_since, last_seen, expires_at): NodeFields,
    now: u64,
) {
    let (Some(online_since_ms), Some(last_seen_ms), Some(expires_at_ms)) =
        (online_since, last_seen, expires_at)
    else {
        return;
    };
    if expires_at_ms <= now {
        return;
    }
    let meta = match meta.as_deref() {
        None | Some(b"") => None,
        Some(json) if is_json_object(json) => Some(json),
        Some(_) => {
            tracing::warn!(
                node_id = id,
                "stored meta is not a JSON object; listing it as {{}}"
            );
            None
        }
    };
    list.push(id, meta, online_since_ms, last_seen_ms, expires_at_ms);
}

/// The local wall clock in epoch ms (only to estimate the Redis clock).
fn local_epoch_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// How long expired records are kept, in ms ([`MAX_PRESERVED_OUTAGE`]).
fn grace_ms() -> u64 {
    u64::try_from(MAX_PRESERVED_OUTAGE.as_millis()).unwrap_or(u64::MAX)
}

fn epoch_ms(secs: u64, micros: u64) -> u64 {
    secs.saturating_mul(1000).saturating_add(micros / 1000)
}

fn encode_meta(meta: &Meta) -> Result<String, StoreError> {
    serde_json::to_string(meta)
        .map_err(|e| StoreError::Unavailable(format!("cannot encode meta: {e}")))
}

fn unavailable(e: RedisError) -> StoreError {
    StoreError::Unavailable(format!("redis: {e}"))
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

/// Escapes the glob metacharacters of `SCAN MATCH`.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Helpers for tests that need a Redis server (this crate's and the workspace's
/// end-to-end tests). Not part of the stable API.
#[doc(hidden)]
pub mod test_support {
    use std::time::{SystemTime, UNIX_EPOCH};

    use super::RedisStore;

    /// Default when `PRESENCE_TEST_REDIS_URI` is unset.
    pub const DEFAULT_TEST_REDIS_URI: &str = "redis://127.0.0.1:6379";

    /// A key prefix no other test run uses: `test-<pid>-<nanos>-<name>`.
    pub fn unique_prefix(name: &str) -> String {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let name: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        format!("test-{}-{nanos}-{name}", std::process::id())
    }

    /// A [`RedisStore`] on a fresh [`unique_prefix`] for the test `name`, connected to
    /// `PRESENCE_TEST_REDIS_URI` (default [`DEFAULT_TEST_REDIS_URI`]).
    ///
    /// When Redis is unreachable it prints why and returns `None`, so the test can
    /// return early (skip); with `PRESENCE_REQUIRE_REDIS=1` it panics instead, so CI
    /// cannot silently skip. Call [`RedisStore::delete_prefix`] at the end of the test;
    /// keys left behind by a failed test expire with their nodes anyway.
    ///
    /// # Panics
    /// If Redis is unreachable and `PRESENCE_REQUIRE_REDIS=1`.
    pub async fn redis_for_tests(name: &str) -> Option<RedisStore> {
        let uri = std::env::var("PRESENCE_TEST_REDIS_URI")
            .ok()
            .filter(|u| !u.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_TEST_REDIS_URI.to_owned());
        let required = std::env::var("PRESENCE_REQUIRE_REDIS").is_ok_and(|v| v.trim() == "1");
        match RedisStore::connect(&uri, &unique_prefix(name)).await {
            Ok(store) => Some(store),
            Err(e) if required => {
                panic!("{name}: Redis is required (PRESENCE_REQUIRE_REDIS=1) but unavailable: {e}")
            }
            Err(e) => {
                eprintln!(
                    "skipping {name}: {e} (start Redis or set PRESENCE_TEST_REDIS_URI; \
                     PRESENCE_REQUIRE_REDIS=1 makes this a failure)"
                );
                None
            }
        }
    }
}

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
    fn glob_escaping() {
        assert_eq!(glob_escape("{a*b?}[c]\\"), "{a\\*b\\?}\\[c\\]\\\\");
    }

    #[test]
    fn to_node_skips_missing_and_expired() {
        assert!(to_node("a", (None, None, None, None), 10).is_none());
        assert!(to_node("a", (None, Some(1), Some(1), Some(10)), 10).is_none());
        let n = to_node(
            "a",
            (Some(b"{\"x\":1}".to_vec()), Some(1), Some(2), Some(11)),
            10,
        );
        assert_eq!(
            n.map(|n| (n.meta["x"].clone(), n.expires_at_ms)),
            Some((1.into(), 11))
        );
        let bad_meta = to_node("a", (Some(b"[".to_vec()), Some(1), Some(2), Some(11)), 10);
        assert_eq!(bad_meta.map(|n| n.meta.len()), Some(0));
    }
}
