//! [`RedisStore`]: a deployment over one or more [`Shard`]s, on a standalone Redis or
//! a Redis Cluster.
//!
//! A node's shard is the CRC16 of its id (the hash Redis Cluster places keys by)
//! modulo the shard count. Calls about one node go to its shard alone; listings,
//! pages and stats ask every shard at once and merge (by `node_id`) or add up; the
//! watch merges the shards' feeds, its cursor holding a position per shard.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::try_join_all;

use super::bulk::BulkConnection;
use super::conn::{cluster_client, Connector, RedisConnection};
use super::scripts::SHARD_COUNT;
use super::{is_tls, redis_client, unavailable, validate_prefix, RedisOptions, Shard};
use crate::model::{Meta, Node, NodeId, Stats, Status};
use crate::store::feed::{self, Cursor, Watch, WatchOptions};
use crate::store::json::merge_lists;
use crate::store::query::{Page, Query};
use crate::store::{redact_uri, BoxFuture, LoginOutcome, NodeListJson, Store, StoreError, Sweep};

/// Most shards a deployment may have.
pub const MAX_SHARDS: usize = 1024;

/// Presence state in Redis, shared by any number of stateless servers (see the
/// [module docs](super) for the data model).
///
/// Cheap to clone: clones share one multiplexed, self-reconnecting connection
/// (`redis::aio::ConnectionManager`, or the `redis` crate's cluster connection).
#[derive(Clone)]
pub struct RedisStore {
    shards: Arc<[Arc<Shard>]>,
    layout: Arc<Layout>,
}

/// What the deployment as a whole has: its prefix, its shard count and the key that
/// records it.
struct Layout {
    prefix: String,
    description: String,
    conn: RedisConnection,
    /// `{prefix}:shards`, the deployment's shard count.
    shards_key: String,
    /// `{prefix}:records`: the records of a deployment of one shard.
    single_records_key: String,
    /// Whether the shard count was checked against the deployment's.
    checked: AtomicBool,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("description", &self.layout.description)
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

    /// [`RedisStore::connect`] with explicit [`RedisOptions`]: on a cluster
    /// ([`RedisOptions::cluster`], `uri` a comma-separated list of seed nodes), over
    /// [`RedisOptions::shards`] shards. With [`RedisOptions::lazy`] nothing is sent
    /// until the first call, and Redis being unreachable is not an error here.
    ///
    /// Must be called within a Tokio runtime (the connection spawns tasks).
    ///
    /// # Errors
    /// As for [`RedisStore::connect`]; also [`StoreError::Refused`] when the
    /// deployment has another shard count (checked here unless lazy, else before the
    /// first call: see [`RedisStore::check_shards`]).
    pub async fn connect_with(
        uri: &str,
        prefix: &str,
        options: RedisOptions,
    ) -> Result<RedisStore, StoreError> {
        validate_prefix(prefix)?;
        let count = options.shards;
        if count == 0 || count > MAX_SHARDS {
            return Err(StoreError::Unavailable(format!(
                "{count} shards: a deployment has 1 to {MAX_SHARDS}"
            )));
        }
        let shown = redact_uri(uri);
        let ca = options.tls_ca_pem.as_deref();
        let connector = if options.cluster {
            Connector::Cluster(cluster_client(uri, ca, options.reconnect_retries)?)
        } else {
            Connector::Standalone(redis_client(uri, ca)?)
        };
        let conn = connector
            .shared(&options)
            .map_err(|e| StoreError::Unavailable(format!("cannot connect to {shown}: {e}")))?;
        let mode = if options.cluster { "cluster " } else { "" };
        let description = if count == 1 {
            format!("redis {mode}{shown} prefix {prefix}")
        } else {
            format!("redis {mode}{shown} prefix {prefix}, {count} shards")
        };
        let mut shards = Vec::with_capacity(count);
        for shard in 0..count {
            let bulk = match &connector {
                Connector::Standalone(client) => Some(bulk_connection(client, &options, &shown)?),
                // The listing connection does not follow slots: see `ListSession`.
                Connector::Cluster(_) => None,
            };
            shards.push(Arc::new(Shard::new(
                conn.clone(),
                &connector,
                bulk,
                shard_tag(prefix, shard, count),
                description.clone(),
                &options,
            )));
        }
        let store = RedisStore {
            shards: shards.into(),
            layout: Arc::new(Layout {
                prefix: prefix.to_owned(),
                description,
                conn,
                shards_key: format!("{{{prefix}}}:shards"),
                single_records_key: format!("{{{prefix}}}:records"),
                checked: AtomicBool::new(false),
            }),
        };
        if !options.lazy {
            store
                .ping_all()
                .await
                .map_err(|e| StoreError::Unavailable(format!("cannot connect to {shown}: {e}")))?;
            store.check_shards().await?;
        }
        Ok(store)
    }

    /// The key prefix this store was opened with.
    pub fn prefix(&self) -> &str {
        &self.layout.prefix
    }

    /// How many shards the deployment is spread over.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The shard `node` lives in: the CRC16 (XMODEM, as Redis Cluster's key slots) of
    /// its id modulo the shard count.
    pub fn shard_of(&self, node: &NodeId) -> usize {
        shard_index(node.as_str(), self.shards.len())
    }

    /// The hash tag of shard `shard`'s keys: `prefix` for a deployment of one shard,
    /// `prefix.<shard>` otherwise.
    pub fn shard_tag(&self, shard: usize) -> String {
        shard_tag(&self.layout.prefix, shard, self.shards.len())
    }

    /// The sorted set key of the first shard, `{prefix}:nodes` with one shard.
    pub fn nodes_key(&self) -> &str {
        self.shards[0].nodes_key()
    }

    /// The hash of the first shard's records, `{prefix}:records` with one shard
    /// (field: the node id).
    pub fn records_key(&self) -> &str {
        self.shards[0].records_key()
    }

    /// Makes sure the deployment has the shard count this store runs with: records
    /// it for a new deployment (`{prefix}:shards`), and refuses another. Done once,
    /// before the first call of a lazy store.
    ///
    /// # Errors
    /// [`StoreError::Refused`] naming both counts when they differ;
    /// [`StoreError::Unavailable`] if Redis does not answer.
    pub async fn check_shards(&self) -> Result<(), StoreError> {
        if self.layout.checked.load(Ordering::Relaxed) {
            return Ok(());
        }
        let stored: u64 = SHARD_COUNT
            .key(&self.layout.shards_key)
            .key(&self.layout.single_records_key)
            .arg(self.shards.len())
            .invoke_async(&mut self.layout.conn.clone())
            .await
            .map_err(unavailable)?;
        if stored != self.shards.len() as u64 {
            return Err(StoreError::Refused(format!(
                "deployment {:?} has {stored} shards, this server runs with {} \
                 (PRESENCE_SHARDS); a deployment keeps the count it was created with",
                self.layout.prefix,
                self.shards.len()
            )));
        }
        self.layout.checked.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Deletes every key of this deployment (each shard's keys and the shard
    /// count); returns how many were deleted. Meant for tests and decommissioning:
    /// it wipes the deployment.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] if Redis fails.
    pub async fn delete_prefix(&self) -> Result<u64, StoreError> {
        let mut deleted = 0;
        let mut conn = self.layout.conn.clone();
        for shard in self.shards.iter() {
            // A shard's keys share its slot: one UNLINK each.
            let n: u64 = redis::cmd("UNLINK")
                .arg(&shard.all_keys()[..])
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            deleted += n;
        }
        let n: u64 = redis::cmd("UNLINK")
            .arg(&self.layout.shards_key)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        self.layout.checked.store(false, Ordering::Relaxed);
        Ok(deleted + n)
    }

    fn shard(&self, node: &NodeId) -> &Shard {
        &self.shards[self.shard_of(node)]
    }

    /// The store's calls, after [`RedisStore::check_shards`].
    async fn checked(&self) -> Result<(), StoreError> {
        if self.layout.checked.load(Ordering::Relaxed) {
            Ok(())
        } else {
            self.check_shards().await
        }
    }

    async fn ping_all(&self) -> Result<(), StoreError> {
        try_join_all(self.shards.iter().map(|s| s.ping())).await?;
        Ok(())
    }

    async fn list_json_all(&self) -> Result<NodeListJson, StoreError> {
        self.checked().await?;
        if let [shard] = &self.shards[..] {
            return shard.list_json().await;
        }
        let lists =
            try_join_all(self.shards.iter().map(|s| async {
                Ok::<_, StoreError>(s.list_written(true).await?.finish_spanned())
            }))
            .await?;
        Ok(merge_lists(&lists, None).0)
    }

    async fn query_json_all(&self, query: &Query) -> Result<Page, StoreError> {
        self.checked().await?;
        if let [shard] = &self.shards[..] {
            return shard.query_json(query).await;
        }
        let pages = try_join_all(self.shards.iter().map(|s| async {
            let (list, next) = s.query_written(query, true).await?;
            Ok::<_, StoreError>((list.finish_spanned(), next.is_some()))
        }))
        .await?;
        let more = pages.iter().any(|(_, more)| *more);
        let lists: Vec<_> = pages.into_iter().map(|(list, _)| list).collect();
        let (json, cut, last) = merge_lists(&lists, query.limit_value());
        // Each shard's page holds up to the limit: the merged one ends early if any
        // shard's did, or if the shards found more together than it holds.
        let next_after = if cut || more { last } else { None };
        Ok(Page { json, next_after })
    }

    async fn list_all(&self) -> Result<Vec<Node>, StoreError> {
        self.checked().await?;
        let lists = try_join_all(self.shards.iter().map(|s| s.list())).await?;
        let mut nodes: Vec<Node> = lists.into_iter().flatten().collect();
        nodes.sort_unstable_by(|a, b| a.node_id.as_str().cmp(b.node_id.as_str()));
        Ok(nodes)
    }

    async fn stats_all(&self) -> Result<Stats, StoreError> {
        self.checked().await?;
        let all = try_join_all(self.shards.iter().map(|s| s.stats())).await?;
        let mut counts = [0u64; 3];
        for stats in all {
            counts[0] += stats.by_status.up;
            counts[1] += stats.by_status.degraded;
            counts[2] += stats.by_status.draining;
        }
        Ok(Stats::from_counts(counts))
    }

    async fn sweep_all(&self) -> Result<Sweep, StoreError> {
        self.checked().await?;
        let all = try_join_all(self.shards.iter().map(|s| s.sweep_expired())).await?;
        Ok(all.into_iter().fold(Sweep::default(), |sum, s| Sweep {
            expired: sum.expired + s.expired,
            lag_ms: sum.lag_ms.max(s.lag_ms),
            more: sum.more || s.more,
        }))
    }

    async fn extend_all(&self, outage: Duration, max_ttl_ms: u64) -> Result<u64, StoreError> {
        let all = try_join_all(
            self.shards
                .iter()
                .map(|s| s.extend_after_outage(outage, max_ttl_ms)),
        )
        .await?;
        Ok(all.into_iter().sum())
    }

    async fn watch_all(
        &self,
        after: Option<&Cursor>,
        options: WatchOptions,
    ) -> Result<Watch, StoreError> {
        if let [shard] = &self.shards[..] {
            return shard.watch(after, options).await;
        }
        // Every reader must know its feed before the cursor can be judged.
        try_join_all(self.shards.iter().map(|s| s.wait_for_reader(None))).await?;
        let heads: Vec<Option<Cursor>> = self.shards.iter().map(|s| s.feed_cursor()).collect();
        let split = feed::split(after, &heads);
        let watches = try_join_all(
            self.shards
                .iter()
                .zip(&split)
                .map(|(s, at)| s.watch(at.as_ref(), options.clone())),
        )
        .await?;
        Ok(feed::merge(watches))
    }

    fn feed_cursor_all(&self) -> Option<Cursor> {
        if let [shard] = &self.shards[..] {
            return shard.feed_cursor();
        }
        let heads: Option<Vec<Cursor>> = self.shards.iter().map(|s| s.feed_cursor()).collect();
        let heads = heads?;
        let epochs: Vec<u64> = heads.iter().map(Cursor::epoch).collect();
        Some(Cursor::new(
            feed::combined_epoch(&epochs),
            heads
                .iter()
                .map(|h| h.single().unwrap_or_default())
                .collect(),
        ))
    }
}

/// The listing connection of a standalone Redis, trusting what the `redis` crate's
/// connection does: the CA alone when one is given, the system's roots otherwise.
fn bulk_connection(
    client: &redis::Client,
    options: &RedisOptions,
    shown: &str,
) -> Result<BulkConnection, StoreError> {
    let tls = if is_tls(client) {
        let ca = options.tls_ca_pem.as_deref();
        let roots = crate::tls::roots(ca, ca.is_none())
            .map_err(|e| StoreError::Unavailable(format!("Redis CA: {e}")))?;
        let config = crate::tls::client_config(roots, &[]).map_err(StoreError::Unavailable)?;
        Some(Arc::new(config))
    } else {
        None
    };
    BulkConnection::new(
        client.get_connection_info(),
        tls,
        options.connection_timeout,
        options.response_timeout,
    )
    .ok_or_else(|| {
        StoreError::Unavailable(format!(
            "cannot connect to {shown}: not a TCP, TLS or Unix socket address"
        ))
    })
}

/// See [`RedisStore::shard_of`].
fn shard_index(id: &str, count: usize) -> usize {
    usize::from(crc16::State::<crc16::XMODEM>::calculate(id.as_bytes())) % count.max(1)
}

/// See [`RedisStore::shard_tag`].
fn shard_tag(prefix: &str, shard: usize, count: usize) -> String {
    if count == 1 {
        prefix.to_owned()
    } else {
        format!("{prefix}.{shard}")
    }
}

impl Store for RedisStore {
    fn login_with<'a>(
        &'a self,
        node: &'a NodeId,
        lease_id: &'a str,
        ttl_ms: u64,
        meta: Meta,
        status: Status,
    ) -> BoxFuture<'a, Result<LoginOutcome, StoreError>> {
        Box::pin(async move {
            self.checked().await?;
            self.shard(node)
                .login_with(node, lease_id, ttl_ms, meta, status)
                .await
        })
    }

    fn heartbeat_with<'a>(
        &'a self,
        node: &'a NodeId,
        lease_id: &'a str,
        ttl_ms: u64,
        meta: Option<Meta>,
        status: Option<Status>,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        if self.layout.checked.load(Ordering::Relaxed) {
            // The hot path: no second future around the shard's.
            return self
                .shard(node)
                .heartbeat_with(node, lease_id, ttl_ms, meta, status);
        }
        Box::pin(async move {
            self.checked().await?;
            self.shard(node)
                .heartbeat_with(node, lease_id, ttl_ms, meta, status)
                .await
        })
    }

    fn logout<'a>(
        &'a self,
        node: &'a NodeId,
        lease_id: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            self.checked().await?;
            self.shard(node).logout(node, lease_id).await
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<Node>, StoreError>> {
        Box::pin(self.list_all())
    }

    fn list_json(&self) -> BoxFuture<'_, Result<NodeListJson, StoreError>> {
        Box::pin(self.list_json_all())
    }

    fn query_json<'a>(&'a self, query: &'a Query) -> BoxFuture<'a, Result<Page, StoreError>> {
        Box::pin(self.query_json_all(query))
    }

    fn stats(&self) -> BoxFuture<'_, Result<Stats, StoreError>> {
        Box::pin(self.stats_all())
    }

    fn get<'a>(&'a self, node: &'a NodeId) -> BoxFuture<'a, Result<Option<Node>, StoreError>> {
        self.shard(node).get(node)
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(self.ping_all())
    }

    fn now_ms(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        self.shards[0].now_ms()
    }

    fn extend_after_outage(
        &self,
        outage: Duration,
        max_ttl_ms: u64,
    ) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(self.extend_all(outage, max_ttl_ms))
    }

    fn watch<'a>(
        &'a self,
        after: Option<&'a Cursor>,
        options: WatchOptions,
    ) -> BoxFuture<'a, Result<Watch, StoreError>> {
        Box::pin(self.watch_all(after, options))
    }

    fn feed_cursor(&self) -> Option<Cursor> {
        self.feed_cursor_all()
    }

    fn set_feed_retention(&self, retention: Duration) {
        for shard in self.shards.iter() {
            shard.set_feed_retention(retention);
        }
    }

    fn sweep_expired(&self) -> BoxFuture<'_, Result<Sweep, StoreError>> {
        Box::pin(self.sweep_all())
    }

    fn check_deployment(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(self.check_shards())
    }

    fn shard_count(&self) -> usize {
        self.shards.len()
    }

    fn shard_of(&self, node: &NodeId) -> usize {
        RedisStore::shard_of(self, node)
    }

    fn shard_store(&self, shard: usize) -> Option<Arc<dyn Store>> {
        let shard: Arc<dyn Store> = self.shards.get(shard)?.clone();
        Some(shard)
    }

    fn describe(&self) -> String {
        self.layout.description.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_keeps_its_shard_and_shards_share_the_load() {
        assert_eq!(shard_index("anything", 1), 0);
        // CRC16/XMODEM of "123456789" is 0x31C3 (the check value).
        assert_eq!(shard_index("123456789", 1 << 16), 0x31c3);
        let mut per_shard = [0usize; 16];
        for i in 0..16_000 {
            per_shard[shard_index(&format!("node-{i}"), 16)] += 1;
        }
        assert!(
            per_shard.iter().all(|&n| (800..1200).contains(&n)),
            "{per_shard:?}"
        );
        assert_eq!(shard_tag("p", 0, 1), "p");
        assert_eq!(shard_tag("p", 3, 16), "p.3");
    }

    /// The listing reads the id index until a listing skips mostly expired records,
    /// then the expiry index until the expired records are gone; either way it lists
    /// exactly the online nodes, in order. Real Redis (its clock decides expiry); skips
    /// without one unless `PRESENCE_REQUIRE_REDIS=1`.
    #[tokio::test]
    async fn listings_leave_the_id_index_after_a_mass_expiry_and_come_back() {
        let uri = std::env::var("PRESENCE_TEST_REDIS_URI")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
        let prefix = format!(
            "unit-stale-{}-{}",
            std::process::id(),
            super::super::local_epoch_ms()
        );
        let store = match RedisStore::connect(&uri, &prefix).await {
            Ok(store) => store,
            Err(e) if std::env::var("PRESENCE_REQUIRE_REDIS").is_ok_and(|v| v.trim() == "1") => {
                panic!("Redis is required (PRESENCE_REQUIRE_REDIS=1) but unavailable: {e}")
            }
            Err(e) => {
                eprintln!("skipping: no Redis at {uri}: {e}");
                return;
            }
        };
        let shard = &store.shards[0];
        let by_id = || shard.inner.list_by_id.load(Ordering::Relaxed);
        let login = |name: String, ttl_ms: u64| {
            let store = &store;
            async move {
                let node = NodeId::parse(&name).expect("id");
                store
                    .login(&node, &crate::model::new_lease_id(), ttl_ms, Meta::new())
                    .await
                    .expect("login");
            }
        };
        let listed = || async {
            let nodes = store.list().await.expect("list");
            nodes
                .into_iter()
                .map(|n| n.node_id.to_string())
                .collect::<Vec<_>>()
        };
        let online: Vec<String> = (0..10).map(|i| format!("up-{i:02}")).collect();
        let brief: Vec<String> = (0..600).map(|i| format!("gone-{i:03}")).collect();
        for name in &online {
            login(name.clone(), 60_000).await;
        }
        futures_util::future::join_all(brief.iter().map(|n| login(n.clone(), 300))).await;
        let mut everyone: Vec<String> = online.iter().chain(&brief).cloned().collect();
        everyone.sort();
        assert_eq!(listed().await, everyone);
        assert!(by_id());

        tokio::time::sleep(Duration::from_millis(400)).await;
        // 600 expired records read and skipped for 10 listed: the next listing reads
        // the expiry index.
        assert_eq!(listed().await, online);
        assert!(!by_id());
        // Their scores are recent, so its range holds them too: no better than the id
        // index, which the next listing reads again (and skips them again).
        assert_eq!(listed().await, online);
        assert!(by_id());
        assert_eq!(listed().await, online);
        assert!(!by_id());

        // Once their scores are older than the range's lower bound (as they are a
        // little more than 10 s after the expiry), the expiry index leaves them out
        // and listings stay with it.
        let mut raw = redis::Client::open(uri.as_str())
            .expect("uri")
            .get_multiplexed_async_connection()
            .await
            .expect("raw connection");
        let long_ago = super::super::local_epoch_ms() - 60_000;
        let mut aged = redis::cmd("ZADD");
        aged.arg(&shard.inner.keys.nodes).arg("XX");
        for name in &brief {
            aged.arg(long_ago).arg(name);
        }
        let _: i64 = aged.query_async(&mut raw).await.expect("zadd");
        assert_eq!(listed().await, online);
        assert!(!by_id());
        assert_eq!(listed().await, online);
        assert!(
            !by_id(),
            "the 600 expired records are still in the id index"
        );

        // Logging the expired nodes in again replaces their records: none stale.
        futures_util::future::join_all(brief.iter().map(|n| login(n.clone(), 60_000))).await;
        assert_eq!(listed().await, everyone);
        assert!(by_id());
        assert_eq!(listed().await, everyone);
        assert!(by_id());
        assert!(store.delete_prefix().await.is_ok());
    }
}
