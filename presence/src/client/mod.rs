//! The presence client SDK: [`PresenceClient`], a tower stack over an HTTP transport.
//!
//! ```no_run
//! # async fn run() -> Result<(), presence::client::ClientError> {
//! use presence::client::PresenceClient;
//! use presence::model::Meta;
//!
//! let pc = PresenceClient::new("http://localhost:8080/presence")?;
//! pc.login("node-123").await?;           // remembers the lease
//! pc.heartbeat("node-123").await?;       // re-logs in by itself on 404
//! let nodes = pc.list_nodes().await?;    // behind the circuit breaker
//! println!("{} nodes online", nodes.len());
//! pc.logout("node-123").await?;
//!
//! // Or let a background task do the heartbeats:
//! let keep = pc.keep_alive("node-123", Meta::new()).await?;
//! // ...
//! keep.stop().await?;                    // stops heartbeating and logs out
//! # Ok(()) }
//! ```
//!
//! # The stack
//!
//! Every call goes through, outermost first:
//!
//! 1. a **token bucket** in wait mode (one bucket for the client): a burst over the
//!    limit waits for tokens instead of failing, up to a bound;
//! 2. a **circuit breaker** ([`resilience::CircuitBreaker`]) counting transport
//!    errors, timeouts and `5xx` replies; while open, calls fail at once with
//!    [`ClientError::CircuitOpen`] without reaching the network;
//! 3. **retry** with exponential backoff and full jitter, for idempotent calls only
//!    (everything except `login`; see [`retry`] for the reasoning);
//! 4. a **timeout** per attempt (response body included);
//! 5. the **transport**: hyper-util's pooled HTTP/1 client (over rustls for an
//!    `https://` base URL, see below), or any tower HTTP service given to
//!    [`PresenceClientBuilder::service`], e.g. the presence server's own service
//!    in-process for tests, with no sockets.
//!
//! All of it is configured on [`PresenceClient::builder`].
//!
//! # HTTPS
//!
//! An `https://` base URL is spoken over TLS (rustls through `hyper-rustls`), the
//! server verified against the system's roots (`rustls-native-certs`: the OS store,
//! `SSL_CERT_FILE`). A deployment whose certificate comes from a private CA adds it
//! with [`PresenceClientBuilder::tls_ca_pem`]. `http://` stays plain TCP.
//!
//! # Leases
//!
//! `login` returns a lease; the client remembers the latest lease of each node id
//! and sends it with `heartbeat` and `logout`, so callers only deal in node ids. A
//! heartbeat for a node the server has forgotten (`404`: expired, store restarted)
//! logs in again with the last known meta. A `409` ([`ClientError::LeaseMismatch`])
//! means another process logged in with the same node id and now owns it; the client
//! does not log in again by itself in that case, as that would take the node back.
//!
//! # Watching
//!
//! [`PresenceClient::watch`] streams the changes of the online set (a snapshot, then
//! joins, updates and leaves) from `GET /presence/watch`, reconnecting and resuming
//! by itself; [`PresenceClient::view`] keeps a local map current from that feed. See
//! [`watch`] and [`view`]; [`Filter`] selects the nodes (and the listings of
//! [`PresenceClient::list_nodes_with`] and [`PresenceClient::pages`]).
//!
//! All time is `tokio::time`, so the whole client runs on paused time in tests.

mod builder;
mod error;
pub mod filter;
pub mod keep_alive;
pub mod retry;
mod sse;
pub mod transport;
pub mod view;
pub mod watch;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use http::Method;
use http_body_util::Full;
use resilience::CircuitBreaker;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tower::ServiceExt;

pub use self::builder::PresenceClientBuilder;
pub use self::error::ClientError;
pub use self::filter::Filter;
pub use self::keep_alive::KeepAlive;
pub use self::retry::RetryConfig;
pub use self::view::PresenceView;
pub use self::watch::{LeaveReason, Watch, WatchEvent, WatchItem};

use self::retry::Idempotent;
use self::transport::{ClientRequest, HttpService, RawService};
use self::watch::WatchSettings;
use crate::model::{
    HeartbeatRequest, HeartbeatResponse, Lease, LoginRequest, LogoutRequest, LogoutResponse, Meta,
    Node, NodeId, Stats, Status,
};

/// A client of the presence HTTP API (docs/http-api.md).
///
/// Cheap to clone: clones share the stack (breaker, rate limiter, connection pool)
/// and the remembered leases.
#[derive(Clone)]
pub struct PresenceClient {
    inner: Arc<Inner>,
}

struct Inner {
    base: String,
    // BoxCloneService is Send but not Sync; a call clones it out under the lock
    // (cheap: the layers' state is behind Arcs), so a transport need not be Sync.
    service: Mutex<HttpService>,
    // The bare transport (body streaming), for the watch feed; same Sync reasoning.
    raw: Mutex<RawService>,
    watch: WatchSettings,
    auth: Option<builder::BearerToken>,
    breaker: CircuitBreaker,
    timeout: Duration,
    retry: RetryConfig,
    rate_limit: Option<(f64, u32)>,
    sessions: Mutex<HashMap<String, Arc<Slot>>>,
}

/// What the client knows about one node id.
#[derive(Default)]
struct Slot {
    // Serializes the calls that change the lease (login, the re-login of a heartbeat,
    // logout): two concurrent re-logins would issue two leases, and the client could
    // keep the one the server already replaced, getting 409 from then on.
    lease_lock: tokio::sync::Mutex<()>,
    session: Mutex<Option<Session>>,
}

#[derive(Clone)]
struct Session {
    lease: Lease,
    /// The meta last sent, for a re-login (`None`: never sent, log in without).
    meta: Option<Meta>,
    /// The status last sent, for a re-login (`None`: never sent, `up`).
    status: Option<Status>,
}

/// What a login or heartbeat sets besides time: `None` keeps (heartbeat) or
/// leaves out (login) each part.
#[derive(Clone, Debug, Default)]
pub(crate) struct NodeUpdate {
    pub(crate) meta: Option<Meta>,
    pub(crate) status: Option<Status>,
}

impl NodeUpdate {
    fn meta(meta: Meta) -> NodeUpdate {
        NodeUpdate {
            meta: Some(meta),
            status: None,
        }
    }
}

impl Slot {
    fn current(&self) -> Option<Session> {
        lock(&self.session).clone()
    }

    fn lease_id(&self) -> Option<String> {
        lock(&self.session)
            .as_ref()
            .map(|s| s.lease.lease_id.clone())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded data stays consistent on panic (single assignments), so a
    // poisoned lock is still usable.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The outcome of [`PresenceClient::heartbeat`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Heartbeat {
    /// The lease was extended.
    Extended(HeartbeatResponse),
    /// The server had forgotten the node (`404`), so the client logged in again; this
    /// is the new lease.
    Relogged(Lease),
}

impl Heartbeat {
    /// The current lease id.
    pub fn lease_id(&self) -> &str {
        match self {
            Heartbeat::Extended(r) => &r.lease_id,
            Heartbeat::Relogged(l) => &l.lease_id,
        }
    }

    /// When the node goes offline unless it heartbeats again (store clock).
    pub fn expires_at_ms(&self) -> u64 {
        match self {
            Heartbeat::Extended(r) => r.expires_at_ms,
            Heartbeat::Relogged(l) => l.expires_at_ms,
        }
    }

    /// `true` if the client had to log in again.
    pub fn relogged(&self) -> bool {
        matches!(self, Heartbeat::Relogged(_))
    }
}

impl PresenceClient {
    /// A client for the server at `base_url` (e.g. `http://host:8080/presence`) with
    /// the default stack over hyper-util's HTTP/1 client.
    ///
    /// # Errors
    /// [`ClientError::InvalidInput`] if `base_url` is not an absolute `http` or
    /// `https` URL.
    pub fn new(base_url: &str) -> Result<PresenceClient, ClientError> {
        PresenceClient::builder(base_url).build()
    }

    /// A builder, to set the transport, a bearer token, the timeout, the rate limit,
    /// the retry policy or the breaker.
    pub fn builder(base_url: impl Into<String>) -> PresenceClientBuilder {
        PresenceClientBuilder::new(base_url.into())
    }

    /// The node id of this machine: `NODE_ID` if set, else the hostname (from
    /// `/proc/sys/kernel/hostname`, `/etc/hostname`, or the `HOSTNAME` /
    /// `COMPUTERNAME` environment variables).
    ///
    /// # Errors
    /// [`ClientError::InvalidInput`] if neither is available or the value is not a
    /// valid node id.
    pub fn default_node_id() -> Result<NodeId, ClientError> {
        let (raw, source) = match std::env::var("NODE_ID") {
            Ok(v) if !v.trim().is_empty() => (v.trim().to_owned(), "NODE_ID"),
            _ => (
                hostname().ok_or_else(|| {
                    ClientError::InvalidInput(
                        "NODE_ID is not set and the hostname is unknown".into(),
                    )
                })?,
                "the hostname",
            ),
        };
        NodeId::parse(&raw).map_err(|e| {
            ClientError::InvalidInput(format!("node id {raw:?} from {source} is not valid: {e}"))
        })
    }

    /// The base URL, without a trailing slash.
    pub fn base_url(&self) -> &str {
        &self.inner.base
    }

    /// The client's circuit breaker (for its state and counters).
    pub fn breaker(&self) -> &CircuitBreaker {
        &self.inner.breaker
    }

    /// The lease the client holds for `node_id`, if any.
    pub fn lease(&self, node_id: &str) -> Option<Lease> {
        let slot = lock(&self.inner.sessions).get(node_id).cloned()?;
        slot.current().map(|s| s.lease)
    }

    /// Logs `node_id` in without meta and remembers the lease. Never retried (see
    /// [`retry`]).
    ///
    /// # Errors
    /// [`ClientError::InvalidInput`] for an invalid node id (nothing is sent), else
    /// any error of the call.
    pub async fn login(&self, node_id: impl AsRef<str>) -> Result<Lease, ClientError> {
        let id = parse_node_id(node_id.as_ref())?;
        self.login_inner(&id, NodeUpdate::default()).await
    }

    /// Logs `node_id` in with `meta` and `status` (see [`Status`]), and remembers
    /// the lease, meta and status for a later re-login. Never retried.
    ///
    /// # Errors
    /// As [`login_with_meta`](Self::login_with_meta).
    pub async fn login_with_status(
        &self,
        node_id: impl AsRef<str>,
        meta: Meta,
        status: Status,
    ) -> Result<Lease, ClientError> {
        let id = parse_node_id(node_id.as_ref())?;
        let update = NodeUpdate {
            meta: Some(meta),
            status: Some(status),
        };
        self.login_inner(&id, update).await
    }

    /// Logs `node_id` in with `meta` and remembers the lease (and the meta, for a
    /// later re-login). Never retried (see [`retry`]).
    ///
    /// # Errors
    /// As [`login`](Self::login); `meta` over the server's limit is a `422`, i.e.
    /// [`ClientError::InvalidInput`].
    pub async fn login_with_meta(
        &self,
        node_id: impl AsRef<str>,
        meta: Meta,
    ) -> Result<Lease, ClientError> {
        let id = parse_node_id(node_id.as_ref())?;
        self.login_inner(&id, NodeUpdate::meta(meta)).await
    }

    /// Extends the node's lease, keeping its meta. Without a remembered lease, or
    /// when the server has forgotten the node (`404`), logs in again (with the last
    /// meta sent) and returns [`Heartbeat::Relogged`].
    ///
    /// # Errors
    /// [`ClientError::LeaseMismatch`] if another process logged in with this node id
    /// since; any error of the calls.
    pub async fn heartbeat(&self, node_id: impl AsRef<str>) -> Result<Heartbeat, ClientError> {
        let id = parse_node_id(node_id.as_ref())?;
        self.heartbeat_inner(&id, NodeUpdate::default()).await
    }

    /// As [`heartbeat`](Self::heartbeat), replacing the node's meta with `meta`.
    ///
    /// # Errors
    /// As [`heartbeat`](Self::heartbeat).
    pub async fn heartbeat_with_meta(
        &self,
        node_id: impl AsRef<str>,
        meta: Meta,
    ) -> Result<Heartbeat, ClientError> {
        let id = parse_node_id(node_id.as_ref())?;
        self.heartbeat_inner(&id, NodeUpdate::meta(meta)).await
    }

    /// As [`heartbeat`](Self::heartbeat), setting the node's status (its meta is
    /// kept). A status that differs from the stored one is an `update` for
    /// watchers.
    ///
    /// # Errors
    /// As [`heartbeat`](Self::heartbeat).
    pub async fn heartbeat_with_status(
        &self,
        node_id: impl AsRef<str>,
        status: Status,
    ) -> Result<Heartbeat, ClientError> {
        let id = parse_node_id(node_id.as_ref())?;
        let update = NodeUpdate {
            meta: None,
            status: Some(status),
        };
        self.heartbeat_inner(&id, update).await
    }

    /// Logs the node out with its remembered lease and forgets the lease. `Ok(true)`
    /// if the node was online and is now removed; `Ok(false)` if it was not online,
    /// or if the client holds no lease for it (then nothing is sent).
    ///
    /// # Errors
    /// [`ClientError::LeaseMismatch`] if another process logged in with this node id
    /// since (the lease is forgotten too: it is dead); any error of the call.
    pub async fn logout(&self, node_id: impl AsRef<str>) -> Result<bool, ClientError> {
        let id = parse_node_id(node_id.as_ref())?;
        let Some(slot) = lock(&self.inner.sessions).get(id.as_str()).cloned() else {
            return Ok(false);
        };
        let _guard = slot.lease_lock.lock().await;
        let Some(lease_id) = slot.lease_id() else {
            return Ok(false);
        };
        let body = LogoutRequest {
            node_id: id.as_str().to_owned(),
            lease_id,
        };
        let result: Result<LogoutResponse, ClientError> =
            self.call(Method::POST, "/logout", Some(&body), true).await;
        match result {
            Ok(reply) => {
                self.forget(&id, &slot);
                Ok(reply.removed)
            }
            Err(ClientError::LeaseMismatch) => {
                self.forget(&id, &slot);
                Err(ClientError::LeaseMismatch)
            }
            Err(e) => Err(e),
        }
    }

    /// All online nodes, sorted by node id.
    ///
    /// # Errors
    /// Any error of the call.
    pub async fn list_nodes(&self) -> Result<Vec<Node>, ClientError> {
        self.call(Method::GET, "", None::<&()>, true).await
    }

    /// The online nodes `filter` selects, sorted by node id, in one listing.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), presence::client::ClientError> {
    /// use presence::client::{Filter, PresenceClient};
    ///
    /// let pc = PresenceClient::new("http://localhost:8080/presence")?;
    /// let eu = Filter::all().status(["up"]).meta("region", "eu");
    /// for node in pc.list_nodes_with(&eu).await? {
    ///     println!("{} {}", node.node_id, node.status);
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`ClientError::InvalidInput`] for a filter the server refuses (`400`); any
    /// error of the call.
    pub async fn list_nodes_with(&self, filter: &Filter) -> Result<Vec<Node>, ClientError> {
        self.call(Method::GET, &filter.apply_to(""), None::<&()>, true)
            .await
    }

    /// The online nodes `filter` selects, a page of at most `page_size` (1 to
    /// 10 000) at a time, in node id order: a [`Stream`](futures_util::Stream) that
    /// asks for the next page only when the previous one has been taken, and ends
    /// after the last (the server says whether more remain with a `Link: ...;
    /// rel="next"` header). Each page costs the server what the page costs, so a
    /// large deployment can be walked without one huge listing.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), presence::client::ClientError> {
    /// use futures_util::TryStreamExt;
    /// use presence::client::{Filter, PresenceClient};
    ///
    /// let pc = PresenceClient::new("http://localhost:8080/presence")?;
    /// let mut pages = std::pin::pin!(pc.pages(Filter::all(), 1000));
    /// while let Some(page) = pages.try_next().await? {
    ///     println!("{} nodes, from {:?}", page.len(), page.first().map(|n| &n.node_id));
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// A node that logs in or out while the walk goes on may or may not be seen
    /// (each page is read as of its own request); none is seen twice.
    pub fn pages(
        &self,
        filter: Filter,
        page_size: usize,
    ) -> impl futures_util::Stream<Item = Result<Vec<Node>, ClientError>> + Send + 'static {
        let client = self.clone();
        let size = page_size.clamp(1, crate::store::query::MAX_PAGE);
        // `Some(after)`: the next page starts after it (`""`: the first page).
        futures_util::stream::try_unfold(Some(String::new()), move |after| {
            let client = client.clone();
            let filter = filter.clone();
            async move {
                let Some(after) = after else {
                    return Ok(None);
                };
                let mut path = filter.apply_to("");
                path.push(if path.is_empty() { '?' } else { '&' });
                path.push_str(&format!("limit={size}"));
                if !after.is_empty() {
                    path.push_str(&format!("&after={}", filter::encode(&after)));
                }
                let (page, headers): (Vec<Node>, _) = client
                    .call_with_headers(Method::GET, &path, None::<&()>, true)
                    .await?;
                let more = headers
                    .get_all(http::header::LINK)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .any(|v| v.contains("rel=\"next\""));
                let next = match page.last() {
                    Some(last) if more => Some(last.node_id.clone()),
                    _ => None,
                };
                Ok(Some((page, next)))
            }
        })
    }

    /// How many nodes are online, in all and by status (`GET /presence/stats`:
    /// counters, the server reads no node).
    ///
    /// # Errors
    /// Any error of the call.
    pub async fn stats(&self) -> Result<Stats, ClientError> {
        self.call(Method::GET, "/stats", None::<&()>, true).await
    }

    /// One node; `Ok(None)` if it is not online.
    ///
    /// # Errors
    /// [`ClientError::InvalidInput`] for an invalid node id (nothing is sent); any
    /// error of the call.
    pub async fn get_node(&self, node_id: impl AsRef<str>) -> Result<Option<Node>, ClientError> {
        let id = parse_node_id(node_id.as_ref())?;
        let path = format!("/{id}");
        match self.call(Method::GET, &path, None::<&()>, true).await {
            Ok(node) => Ok(Some(node)),
            Err(ClientError::NotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Logs `node_id` in with `meta` and keeps it online from a background task until
    /// [`KeepAlive::stop`] (or until the `KeepAlive` is dropped); see [`keep_alive`].
    ///
    /// # Errors
    /// The first login's error; later errors are the task's (see [`KeepAlive`]).
    pub async fn keep_alive(
        &self,
        node_id: impl AsRef<str>,
        meta: Meta,
    ) -> Result<KeepAlive, ClientError> {
        let id = parse_node_id(node_id.as_ref())?;
        let lease = self.login_inner(&id, NodeUpdate::meta(meta)).await?;
        Ok(KeepAlive::spawn(self.clone(), id, &lease))
    }

    /// As [`keep_alive`](Self::keep_alive), logging in with `status`;
    /// [`KeepAlive::set_status`] changes it later.
    ///
    /// # Errors
    /// As [`keep_alive`](Self::keep_alive).
    pub async fn keep_alive_with_status(
        &self,
        node_id: impl AsRef<str>,
        meta: Meta,
        status: Status,
    ) -> Result<KeepAlive, ClientError> {
        let id = parse_node_id(node_id.as_ref())?;
        let update = NodeUpdate {
            meta: Some(meta),
            status: Some(status),
        };
        let lease = self.login_inner(&id, update).await?;
        Ok(KeepAlive::spawn(self.clone(), id, &lease))
    }

    #[allow(clippy::too_many_arguments)] // one call site, the builder
    pub(crate) fn from_parts(
        base: String,
        service: HttpService,
        auth: Option<builder::BearerToken>,
        breaker: CircuitBreaker,
        timeout: Duration,
        retry: RetryConfig,
        rate_limit: Option<(f64, u32)>,
        raw: RawService,
        watch: WatchSettings,
    ) -> PresenceClient {
        PresenceClient {
            inner: Arc::new(Inner {
                base,
                service: Mutex::new(service),
                auth,
                breaker,
                timeout,
                retry,
                rate_limit,
                raw: Mutex::new(raw),
                watch,
                sessions: Mutex::new(HashMap::new()),
            }),
        }
    }

    fn slot(&self, id: &NodeId) -> Arc<Slot> {
        lock(&self.inner.sessions)
            .entry(id.as_str().to_owned())
            .or_default()
            .clone()
    }

    /// Drops the session; the slot goes too unless another call is using it.
    fn forget(&self, id: &NodeId, slot: &Arc<Slot>) {
        *lock(&slot.session) = None;
        let mut sessions = lock(&self.inner.sessions);
        // Two references: the map's and the caller's.
        if Arc::strong_count(slot) <= 2 {
            sessions.remove(id.as_str());
        }
    }

    async fn login_inner(&self, id: &NodeId, update: NodeUpdate) -> Result<Lease, ClientError> {
        let slot = self.slot(id);
        let _guard = slot.lease_lock.lock().await;
        self.login_locked(id, &slot, update).await
    }

    /// Logs in; the caller holds `slot.lease_lock`.
    async fn login_locked(
        &self,
        id: &NodeId,
        slot: &Slot,
        update: NodeUpdate,
    ) -> Result<Lease, ClientError> {
        let NodeUpdate { meta, status } = update;
        let body = LoginRequest {
            node_id: id.as_str().to_owned(),
            meta: meta.clone(),
            status,
        };
        let lease: Lease = self
            .call(Method::POST, "/login", Some(&body), false)
            .await?;
        *lock(&slot.session) = Some(Session {
            lease: lease.clone(),
            meta,
            status,
        });
        Ok(lease)
    }

    pub(crate) async fn heartbeat_inner(
        &self,
        id: &NodeId,
        update: NodeUpdate,
    ) -> Result<Heartbeat, ClientError> {
        let slot = self.slot(id);
        let sent_with = slot.current();
        if let Some(session) = &sent_with {
            match self
                .send_heartbeat(id, &slot, &session.lease.lease_id, &update)
                .await
            {
                Err(ClientError::NotFound) => {}
                other => return other,
            }
        }

        let _guard = slot.lease_lock.lock().await;
        let current = slot.current();
        if let Some(now) = &current {
            let changed = sent_with
                .as_ref()
                .is_none_or(|s| s.lease.lease_id != now.lease.lease_id);
            if changed {
                // Someone logged in while this heartbeat was out; extend that lease
                // instead of issuing yet another one.
                match self
                    .send_heartbeat(id, &slot, &now.lease.lease_id, &update)
                    .await
                {
                    Err(ClientError::NotFound) => {}
                    other => return other,
                }
            }
        }
        tracing::debug!(node_id = %id, "presence: node not online; logging in again");
        // Log in again as the node last was, with whatever this heartbeat changes.
        let last = current.or(sent_with);
        let again = NodeUpdate {
            meta: update
                .meta
                .or_else(|| last.as_ref().and_then(|s| s.meta.clone())),
            status: update.status.or_else(|| last.and_then(|s| s.status)),
        };
        self.login_locked(id, &slot, again)
            .await
            .map(Heartbeat::Relogged)
    }

    async fn send_heartbeat(
        &self,
        id: &NodeId,
        slot: &Slot,
        lease_id: &str,
        update: &NodeUpdate,
    ) -> Result<Heartbeat, ClientError> {
        let body = HeartbeatRequest {
            node_id: id.as_str().to_owned(),
            lease_id: lease_id.to_owned(),
            meta: update.meta.clone(),
            status: update.status,
        };
        let reply: HeartbeatResponse = self
            .call(Method::POST, "/heartbeat", Some(&body), true)
            .await?;
        if let Some(session) = lock(&slot.session).as_mut() {
            if session.lease.lease_id == lease_id {
                if let Some(meta) = &update.meta {
                    session.meta = Some(meta.clone());
                }
                if update.status.is_some() {
                    session.status = update.status;
                }
            }
        }
        Ok(Heartbeat::Extended(reply))
    }

    /// Sends one API call through the stack and decodes the reply.
    async fn call<Req, Res>(
        &self,
        method: Method,
        path: &str,
        body: Option<&Req>,
        idempotent: bool,
    ) -> Result<Res, ClientError>
    where
        Req: Serialize + ?Sized,
        Res: DeserializeOwned,
    {
        self.call_with_headers(method, path, body, idempotent)
            .await
            .map(|(reply, _)| reply)
    }

    /// [`call`](Self::call), also returning the reply's headers.
    async fn call_with_headers<Req, Res>(
        &self,
        method: Method,
        path: &str,
        body: Option<&Req>,
        idempotent: bool,
    ) -> Result<(Res, http::HeaderMap), ClientError>
    where
        Req: Serialize + ?Sized,
        Res: DeserializeOwned,
    {
        let request = self.request(method, path, body, idempotent)?;
        let service = lock(&self.inner.service).clone();
        let response = service
            .oneshot(request)
            .await
            .map_err(ClientError::from_stack)?;
        let (parts, body) = response.into_parts();
        if !parts.status.is_success() {
            return Err(ClientError::from_reply(parts.status, &parts.headers, &body));
        }
        let reply = serde_json::from_slice(&body)
            .map_err(|e| ClientError::invalid_response(parts.status, &e))?;
        Ok((reply, parts.headers))
    }

    fn request<Req: Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        body: Option<&Req>,
        idempotent: bool,
    ) -> Result<ClientRequest, ClientError> {
        let mut builder = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.inner.base))
            .header(ACCEPT, "application/json");
        let bytes = match body {
            Some(body) => {
                builder = builder.header(CONTENT_TYPE, "application/json");
                let json = serde_json::to_vec(body).map_err(|e| {
                    ClientError::InvalidInput(format!("cannot serialize the request: {e}"))
                })?;
                Bytes::from(json)
            }
            None => Bytes::new(),
        };
        if let Some(auth) = &self.inner.auth {
            builder = builder.header(AUTHORIZATION, auth.header()?);
        }
        let mut request = builder
            .body(Full::new(bytes))
            .map_err(|e| ClientError::InvalidInput(format!("cannot build the request: {e}")))?;
        if idempotent {
            request.extensions_mut().insert(Idempotent);
        }
        Ok(request)
    }
}

impl fmt::Debug for PresenceClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PresenceClient")
            .field("base_url", &self.inner.base)
            .field("authenticated", &self.inner.auth.is_some())
            .field("breaker", &self.inner.breaker.state())
            .field("timeout", &self.inner.timeout)
            .field("retry", &self.inner.retry)
            .field("rate_limit", &self.inner.rate_limit)
            .finish_non_exhaustive()
    }
}

fn parse_node_id(s: &str) -> Result<NodeId, ClientError> {
    NodeId::parse(s).map_err(|e| ClientError::InvalidInput(e.to_string()))
}

fn hostname() -> Option<String> {
    let files = ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .into_iter()
        .filter_map(|path| std::fs::read_to_string(path).ok());
    let vars = ["HOSTNAME", "COMPUTERNAME"]
        .into_iter()
        .filter_map(|var| std::env::var(var).ok());
    files
        .chain(vars)
        .map(|h| h.trim().to_owned())
        .find(|h| !h.is_empty())
}
