//! The store's connections, to a standalone Redis or to a Redis Cluster: one
//! multiplexed connection that every call shares ([`RedisConnection`]), and the
//! [`Connector`] that opens the dedicated ones (each shard's feed reader blocks on
//! its own).

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, MultiplexedConnection};
use redis::cluster::{ClusterClient, ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

use super::super::{redact_uri, StoreError};

/// A connection a store call goes over: the shared, self-reconnecting one to a
/// standalone Redis, a dedicated one (a feed reader's), or one to a cluster, which
/// routes each command to the master of its key's slot and follows failovers.
#[derive(Clone)]
pub(super) enum RedisConnection {
    /// The shared connection to a standalone Redis.
    Managed(ConnectionManager),
    /// A dedicated connection to a standalone Redis.
    Multiplexed(MultiplexedConnection),
    /// A connection to a cluster (shared, or a feed reader's own).
    Cluster(ClusterConnection),
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConnection::Managed(c) => c.req_packed_command(cmd),
            RedisConnection::Multiplexed(c) => c.req_packed_command(cmd),
            RedisConnection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConnection::Managed(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConnection::Multiplexed(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConnection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConnection::Managed(c) => c.get_db(),
            RedisConnection::Multiplexed(c) => c.get_db(),
            RedisConnection::Cluster(c) => c.get_db(),
        }
    }
}

/// Opens dedicated connections to the store's Redis.
// One per store, used when shards start and feed readers reconnect: its size is
// no cost.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub(super) enum Connector {
    /// A standalone Redis.
    Standalone(redis::Client),
    /// A cluster, by its seed nodes.
    Cluster(ClusterClient),
}

impl Connector {
    /// A new connection of its own, whose replies may take up to `response_timeout`.
    pub(super) async fn dedicated(
        &self,
        connection_timeout: Duration,
        response_timeout: Duration,
    ) -> RedisResult<RedisConnection> {
        match self {
            Connector::Standalone(client) => {
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(connection_timeout))
                    .set_response_timeout(Some(response_timeout));
                let conn = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                Ok(RedisConnection::Multiplexed(conn))
            }
            Connector::Cluster(client) => {
                let config = ClusterConfig::new()
                    .set_connection_timeout(connection_timeout)
                    .set_response_timeout(response_timeout);
                let conn = client.get_async_connection_with_config(config).await?;
                Ok(RedisConnection::Cluster(conn))
            }
        }
    }

    /// The shared connection, connected on first use (see
    /// [`RedisOptions::lazy`](super::RedisOptions::lazy)).
    pub(super) fn shared(&self, options: &super::RedisOptions) -> RedisResult<RedisConnection> {
        match self {
            Connector::Standalone(client) => {
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(options.connection_timeout))
                    .set_response_timeout(Some(options.response_timeout))
                    .set_number_of_retries(options.reconnect_retries)
                    .set_min_delay(Duration::from_millis(50))
                    .set_max_delay(Duration::from_millis(500));
                let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)?;
                Ok(RedisConnection::Managed(conn))
            }
            Connector::Cluster(client) => {
                let config = ClusterConfig::new()
                    .set_connection_timeout(options.connection_timeout)
                    .set_response_timeout(options.response_timeout);
                Ok(RedisConnection::Cluster(
                    client.get_pending_async_connection_with_config(config),
                ))
            }
        }
    }
}

/// A cluster client for the comma-separated seed node URIs `uris` (`redis://` or
/// `rediss://`, all alike): over TLS it trusts `ca_pem` alone when given, the system's
/// roots otherwise. Failed calls are retried `retries` times while the cluster moves
/// slots or fails over (waiting 50 ms, doubling, up to 500 ms).
///
/// # Errors
/// [`StoreError::Unavailable`] for no seed, an invalid URI, a mix of `redis://` and
/// `rediss://`, or `#insecure`.
pub(super) fn cluster_client(
    uris: &str,
    ca_pem: Option<&[u8]>,
    retries: usize,
) -> Result<ClusterClient, StoreError> {
    let seeds: Vec<&str> = uris
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let shown = redact_uri(uris);
    let invalid = |e: &dyn std::fmt::Display| {
        StoreError::Unavailable(format!("invalid Redis Cluster seeds {shown:?}: {e}"))
    };
    if seeds.is_empty() {
        return Err(invalid(&"no seed node"));
    }
    // Each seed is checked as a standalone URI would be (#insecure refused, TLS set up).
    let mut tls = None;
    for seed in &seeds {
        let client = super::redis_client(seed, ca_pem)?;
        let is_tls = super::is_tls(&client);
        if tls.is_some_and(|t| t != is_tls) {
            return Err(invalid(&"seeds mix redis:// and rediss://"));
        }
        tls = Some(is_tls);
    }
    let mut builder = ClusterClientBuilder::new(seeds)
        .retries(u32::try_from(retries).unwrap_or(u32::MAX))
        .min_retry_wait(50)
        .max_retry_wait(500);
    if let (Some(true), Some(pem)) = (tls, ca_pem) {
        builder = builder.certs(redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem.to_vec()),
        });
    }
    builder.build().map_err(|e| invalid(&e))
}
