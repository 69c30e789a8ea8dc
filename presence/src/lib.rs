//! # presence
//!
//! Which nodes of a network are online right now, with each node's load and health.
//!
//! Nodes [`login`](client::PresenceClient::login), heartbeat every few seconds and
//! log out; anyone can list them. A node that stops heartbeating drops out of the list
//! after its TTL. Leases fence writers: every login issues a new random lease id, and a
//! heartbeat or logout carrying an older lease is refused with `409 lease_mismatch`.
//!
//! The crate has three parts, each usable on its own:
//!
//! - [`store`]: where presence lives. [`store::MemoryStore`] for a single server (the
//!   default), [`store::RedisStore`] for any number of stateless servers sharing one
//!   Redis (Lua scripts, one round trip per call, the Redis clock).
//! - [`server`]: the HTTP API (docs/http-api.md) as one `tower::Service`
//!   ([`server::PresenceService`]) composed from the [`resilience`] layers, and a hyper
//!   server that runs it ([`server::Server`]). [`config::Config`] reads the environment.
//! - [`client`]: [`client::PresenceClient`], itself a tower stack (rate limiter, circuit
//!   breaker, retry, timeout) over hyper-util or any injected tower HTTP service.
//!
//! ## Example
//!
//! The client talking to the server's own service in-process (no sockets), exactly as
//! it would over the network:
//!
//! ```
//! use std::sync::Arc;
//! use presence::{client::PresenceClient, config::Config, server::PresenceService, store::MemoryStore};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), presence::client::ClientError> {
//! let service = PresenceService::new(Arc::new(MemoryStore::new()), &Config::default())
//!     .with_default_peer(([127, 0, 0, 1], 40000).into());
//! let client = PresenceClient::builder("http://presence.local/presence")
//!     .service(service)
//!     .build()?;
//!
//! let lease = client.login("node-123").await?;
//! client.heartbeat("node-123").await?;
//! let nodes = client.list_nodes().await?;
//! assert_eq!(nodes[0].node_id, "node-123");
//! assert!(nodes[0].expires_at_ms > 0 && !lease.lease_id.is_empty());
//! assert!(client.logout("node-123").await?);
//! assert!(client.list_nodes().await?.is_empty());
//! # Ok(())
//! # }
//! ```
//!
//! Over the network it is `PresenceClient::new("http://localhost:8080/presence")?`;
//! run a server with `cargo run --release --example presence_server`.

#![warn(missing_docs)]

pub mod client;
pub mod config;
pub mod model;
pub mod server;
pub mod store;
pub mod tls;
mod wire;

/// `d` in whole milliseconds, saturating (the durations here are configuration values
/// and outages, far below `u64::MAX` ms).
pub(crate) fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The README's code blocks, compiled (and, unless marked `no_run`, run) as doctests of
/// this crate, so they cannot fall behind the API.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;

pub use client::{ClientError, PresenceClient};
pub use config::Config;
pub use model::{Meta, Node, NodeId};
pub use server::{PresenceService, Server};
pub use store::{MemoryStore, RedisStore, Store, StoreError};
