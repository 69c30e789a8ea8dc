//! [`Server`]: binds a TCP listener and serves [`PresenceService`] over HTTP/1 and
//! HTTP/2 with hyper, until a shutdown signal; over TLS (rustls) when the
//! configuration has a certificate (`PRESENCE_TLS_CERT_FILE`, `PRESENCE_TLS_KEY_FILE`).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures_util::future::Either;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::util::Oneshot;
use tower::{Service, ServiceExt};

use super::watch::ConnectionAbort;
use super::{PresenceService, ResponseBody};
use crate::config::{Config, MIN_HEADER_BYTES};
use crate::store::Store;

/// A bound, not yet running presence server.
///
/// ```no_run
/// # async fn demo() -> std::io::Result<()> {
/// use std::sync::Arc;
/// use presence::{config::Config, server::{shutdown_signal, Server}, store::MemoryStore};
///
/// let mut config = Config::default();
/// config.http_host = "127.0.0.1".into();
/// config.http_port = 0; // any free port
/// let server = Server::bind(&config, Arc::new(MemoryStore::new())).await?;
/// println!("listening on http://{}", server.local_addr());
/// server.run(shutdown_signal()).await
/// # }
/// ```
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    local_addr: SocketAddr,
    service: PresenceService,
    limits: ConnectionLimits,
    shutdown_grace: Duration,
    max_connections: usize,
    builders: Arc<Builders>,
    /// `Some`: every connection is TLS, its protocol chosen by ALPN.
    tls: Option<Arc<rustls::ServerConfig>>,
}

/// What bounds one connection (from the [`Config`]).
#[derive(Clone, Copy, Debug)]
struct ConnectionLimits {
    /// No request in flight for this long: closed (`PRESENCE_HEADER_TIMEOUT_MS`).
    idle: Duration,
    /// A response waiting for the client to read for this long: closed
    /// (`PRESENCE_WRITE_STALL_TIMEOUT_MS`).
    write_stall: Duration,
}

impl Server {
    /// Binds `PRESENCE_HTTP_HOST:PRESENCE_HTTP_PORT` (port `0` picks a free port; see
    /// [`local_addr`](Self::local_addr)) and builds the service on `store`.
    ///
    /// # Errors
    /// The address cannot be resolved or bound; the message names it.
    pub async fn bind(config: &Config, store: Arc<dyn Store>) -> io::Result<Server> {
        let service = PresenceService::new(store, config);
        Server::bind_service(config, service).await
    }

    /// Like [`bind`](Self::bind) with a service built by the caller.
    ///
    /// # Errors
    /// The address cannot be resolved or bound; the message names it. A TLS
    /// certificate or key that [`Config::from_lookup`] would have refused
    /// ([`io::ErrorKind::InvalidInput`]).
    pub async fn bind_service(config: &Config, service: PresenceService) -> io::Result<Server> {
        let tls = config
            .tls_server_config()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("TLS {e}")))?;
        let addr = (config.http_host.as_str(), config.http_port);
        let listener = TcpListener::bind(addr).await.map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot listen on {}:{}: {e}",
                    config.http_host, config.http_port
                ),
            )
        })?;
        let local_addr = listener.local_addr()?;
        Ok(Server {
            listener,
            local_addr,
            service,
            limits: ConnectionLimits {
                idle: config.header_timeout,
                write_stall: config.write_stall_timeout,
            },
            shutdown_grace: config.shutdown_grace,
            max_connections: config.max_connections,
            builders: Arc::new(Builders::new(config)),
            tls,
        })
    }

    /// `"https"` when the server speaks TLS, `"http"` otherwise: for URLs and logs.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// The address the server listens on (with the real port when bound to port `0`).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves connections until `shutdown` completes, then stops accepting, lets
    /// in-flight requests finish for up to `PRESENCE_SHUTDOWN_GRACE_MS` (idle
    /// keep-alive connections are closed at once), aborts what is left and returns.
    ///
    /// HTTP/1 and HTTP/2 (prior knowledge, `h2c`) are told apart by the first bytes;
    /// over TLS, by what the client chose by ALPN (`h2`, else HTTP/1.1), and the TLS
    /// handshake must be done within `PRESENCE_HEADER_TIMEOUT_MS`. Slow and idle
    /// clients are bounded by `PRESENCE_HEADER_TIMEOUT_MS`: a connection
    /// that sends nothing, or not a whole request header, within it is closed, and so
    /// is one (HTTP/1 or HTTP/2) that has had no request in flight for that long. A
    /// request stays in flight until its response body has been written, so a slow
    /// reader that keeps reading is never cut; one that stops reading is closed after
    /// `PRESENCE_WRITE_STALL_TIMEOUT_MS`. At most `PRESENCE_MAX_CONNECTIONS`
    /// connections are served at once; further ones wait in the listen backlog.
    ///
    /// # Errors
    /// None today; accept errors (e.g. out of file descriptors) are logged and
    /// retried, since they are usually transient. The `Result` leaves room for
    /// fatal listener errors.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> io::Result<()> {
        let Server {
            listener,
            local_addr: _,
            service,
            limits,
            shutdown_grace,
            max_connections,
            builders,
            tls,
        } = self;
        // One permit per open connection: at the cap, the loop stops accepting (the
        // kernel's backlog holds new connections) while open ones are still served.
        let slots = Arc::new(Semaphore::new(max_connections));

        // `true` once shutdown begins; every connection task watches it.
        let (closing_tx, closing_rx) = watch::channel(false);
        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);

        loop {
            let next = async {
                // Never closed, so this only waits.
                let slot = slots.clone().acquire_owned().await.ok();
                (slot, listener.accept().await)
            };
            tokio::select! {
                (slot, accepted) = next => match accepted {
                    Ok((stream, peer)) => match &tls {
                        // Spawned as it is: wrapped in another `async` block, the
                        // connection's future would be stored twice in its task (once
                        // captured, once awaited), 4 KB more per connection.
                        None => {
                            connections.spawn(serve_connection(
                                stream,
                                peer,
                                builders.clone(),
                                service.clone(),
                                limits,
                                closing_rx.clone(),
                                slot,
                            ));
                        }
                        // A task of its own type, so that TLS state never sizes the
                        // task of a plain connection.
                        Some(tls) => {
                            connections.spawn(serve_tls_connection(
                                stream,
                                peer,
                                tokio_rustls::TlsAcceptor::from(tls.clone()),
                                builders.clone(),
                                service.clone(),
                                limits,
                                closing_rx.clone(),
                                slot,
                            ));
                        }
                    },
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning on the error.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                // Reap finished connection tasks so the set does not grow without bound.
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                () = &mut shutdown => break,
            }
        }

        drop(listener);
        tracing::info!(
            connections = connections.len(),
            grace = ?shutdown_grace,
            "shutting down: draining in-flight requests"
        );
        // Watch streams never end by themselves: end them first, so that their
        // connections drain like any other.
        service.end_watches();
        let _ = closing_tx.send(true);
        let drain = async { while connections.join_next().await.is_some() {} };
        if tokio::time::timeout(shutdown_grace, drain).await.is_err() {
            tracing::warn!(
                connections = connections.len(),
                "shutdown grace period over; aborting remaining connections"
            );
        }
        connections.shutdown().await;
        Ok(())
    }
}

/// Binds, serves until `shutdown` completes, drains and returns: [`Server::bind`] +
/// [`Server::run`].
///
/// # Errors
/// The address cannot be bound.
pub async fn serve(
    config: &Config,
    store: Arc<dyn Store>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let server = Server::bind(config, store).await?;
    tracing::info!("listening on {}://{}", server.scheme(), server.local_addr());
    server.run(shutdown).await
}

/// Completes on Ctrl-C (SIGINT) or, on Unix, SIGTERM.
///
/// If a signal handler cannot be installed it is logged and that signal is ignored:
/// shutting down at once would be worse than not reacting to it.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        match tokio::signal::ctrl_c().await {
            Ok(()) => tracing::info!("received Ctrl-C"),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for Ctrl-C");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
                tracing::info!("received SIGTERM");
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

/// The end of [`serve_connection`] and [`serve_protocol`]: hyper's connection for
/// `$protocol` on `$io`, driven by [`drive`] until it ends. A macro rather than a
/// function so that the plain connection's task holds it inline: awaited as a nested
/// future, its arguments and hyper's connection took 2 KB more per task.
macro_rules! serve_inline {
    ($io:expr, $protocol:expr, $peer:expr, $builders:expr, $service:expr, $limits:expr, $closing:expr) => {{
        let activity = Arc::new(Activity::new());
        let service = ConnectionService {
            service: Mutex::new($service),
            peer: $peer,
            activity: activity.clone(),
        };
        let io = $io;
        match $protocol {
            Protocol::Http1 => {
                // Pinned here and lent to `drive`: moved into it, hyper's connection
                // would be stored twice in the task (as the argument and as the
                // pinned local).
                let conn = $builders.http1.serve_connection(io, service);
                tokio::pin!(conn);
                drive(conn, $peer, &activity, $limits, $closing, false).await;
            }
            Protocol::Http2 => {
                // Boxed: hyper's HTTP/2 connection is several kilobytes of state, and
                // inline it would size every connection's task, so every HTTP/1
                // connection (an idle watcher, say) would carry it too.
                let builders = &$builders;
                let (peer, limits, closing) = ($peer, $limits, $closing);
                Box::pin(async move {
                    let conn = builders.http2.serve_connection(io, service);
                    tokio::pin!(conn);
                    drive(conn, peer, &activity, limits, closing, true).await;
                })
                .await;
            }
        }
    }};
}

/// Serves one connection until it ends: closes it gracefully when the server shuts
/// down (in-flight requests finish, HTTP/2 gets a GOAWAY) or when it has had no
/// request in flight for `idle_timeout`.
///
/// hyper's `header_read_timeout` covers slow and idle HTTP/1 connections, but HTTP/2
/// has no equivalent: a client that sends the preface and then nothing (or keeps a
/// connection open without streams) would hold a task and a file descriptor forever.
/// The idle rule here covers both protocols the same way.
///
/// The idle check costs a request nothing but a clock read: requests record when the
/// connection last went idle, and one timer per connection wakes up at the earliest
/// time it could be idle for `idle_timeout`, then either closes it or sleeps again.
/// It also stands in for hyper's `header_read_timeout` (one timer per request): an
/// HTTP/1 connection stuck in half a request head has nothing in flight, so it is
/// closed `idle_timeout` after its last response (or its first byte).
///
/// `slot` is the connection's permit of the connection cap, given back when it ends.
async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    builders: Arc<Builders>,
    service: PresenceService,
    limits: ConnectionLimits,
    mut closing: watch::Receiver<bool>,
    slot: Option<OwnedSemaphorePermit>,
) {
    let _slot = slot;
    let protocol = tokio::select! {
        sent = first_bytes_within(&stream, limits.idle) => match sent {
            Some(protocol) => protocol,
            None => {
                tracing::debug!(%peer, "closing connection that sent nothing");
                return;
            }
        },
        () = shutdown_begun(&mut closing) => return,
    };
    // Responses are written whole (one `writev` each), so Nagle's algorithm could only
    // delay them: a pipelined or HTTP/2 response behind an unacknowledged one would
    // wait for the peer's delayed ACK.
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
    }
    // Inline rather than through `serve_protocol`: awaited as a nested future, the
    // connection's arguments and hyper's connection took 2 KB more per task.
    serve_inline!(
        TokioIo::new(stream),
        protocol,
        peer,
        builders,
        service,
        limits,
        closing
    );
}

/// Serves one TLS connection until it ends, like [`serve_connection`] (whose
/// comment explains the idle rule): the handshake must be done within the idle
/// timeout (a client that connects and sends nothing, or stalls mid-handshake, is
/// closed then), and the protocol is the one the client chose by ALPN.
#[allow(clippy::too_many_arguments)] // serve_connection's, and the acceptor
async fn serve_tls_connection(
    stream: TcpStream,
    peer: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    builders: Arc<Builders>,
    service: PresenceService,
    limits: ConnectionLimits,
    mut closing: watch::Receiver<bool>,
    slot: Option<OwnedSemaphorePermit>,
) {
    let _slot = slot;
    // Before the handshake: its flights are small writes too.
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
    }
    let handshake = tokio::time::timeout(limits.idle, acceptor.accept(stream));
    let stream = tokio::select! {
        done = handshake => match done {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "closing connection that did not finish the TLS handshake");
                return;
            }
        },
        () = shutdown_begun(&mut closing) => return,
    };
    let protocol = match stream.get_ref().1.alpn_protocol() {
        Some(b"h2") => Protocol::Http2,
        _ => Protocol::Http1,
    };
    // Boxed: rustls's connection state sits beside hyper's for as long as the
    // connection lives.
    Box::pin(serve_protocol(
        TokioIo::new(stream),
        protocol,
        peer,
        &builders,
        service,
        limits,
        closing,
    ))
    .await;
}

/// Serves `io` with `protocol`'s builder until the connection ends (see [`drive`]):
/// what [`serve_connection`] does inline, for TLS connections.
async fn serve_protocol<I>(
    io: TokioIo<I>,
    protocol: Protocol,
    peer: SocketAddr,
    builders: &Builders,
    service: PresenceService,
    limits: ConnectionLimits,
    closing: watch::Receiver<bool>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    serve_inline!(io, protocol, peer, builders, service, limits, closing);
}

/// hyper's connection builders, one per protocol. The protocol is told apart by
/// [`first_bytes_within`] (which only peeks), so the connection is served by the
/// protocol's own builder, without the auto builder's read-ahead and replay of the
/// first bytes on every read.
#[derive(Debug)]
struct Builders {
    http1: hyper::server::conn::http1::Builder,
    http2: hyper::server::conn::http2::Builder<TokioExecutor>,
}

impl Builders {
    fn new(config: &Config) -> Builders {
        // No `header_read_timeout` for HTTP/1: hyper would arm a timer for every
        // request head. The idle rule of `drive` bounds slow and silent clients
        // instead, for HTTP/1 and HTTP/2 alike, with one timer per connection.
        let mut http1 = hyper::server::conn::http1::Builder::new();
        // hyper's default read buffer grows to ~400 KB for one request head: a
        // thousand half-sent heads would hold 400 MB. Past the cap hyper answers 431.
        http1.max_buf_size(config.max_header_bytes.max(MIN_HEADER_BYTES));
        let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .max_concurrent_streams(config.max_streams_per_connection)
            .max_header_list_size(u32::try_from(config.max_header_bytes).unwrap_or(u32::MAX));
        Builders { http1, http2 }
    }
}

/// Drives one connection until it ends: closes it gracefully when the server shuts
/// down, and when it has had no request in flight for `idle_timeout` (see
/// [`serve_connection`]). An idle HTTP/1 connection is simply closed (it has nothing
/// in flight, perhaps half a request head, which a graceful close would wait for);
/// an idle HTTP/2 one gets a GOAWAY first.
async fn drive<C>(
    mut conn: Pin<&mut C>,
    peer: SocketAddr,
    activity: &Activity,
    limits: ConnectionLimits,
    closing: watch::Receiver<bool>,
    http2: bool,
) where
    C: GracefulConnection,
    C::Error: std::fmt::Display,
{
    let mut shutdown = connection_shutdown(closing);
    let idle_check = tokio::time::sleep(limits.idle.min(limits.write_stall));
    tokio::pin!(idle_check);
    let mut shutting_down = false;
    // Set when the connection is closed for idleness: a client that does not let it
    // close (an HTTP/2 handshake that never finishes, a peer that stops reading) is
    // dropped at this deadline.
    let mut hard_close: Option<Instant> = None;
    let abort = activity.abort.cancelled();
    tokio::pin!(abort);
    // Not registered before the connection carries a watch: that flag is set while
    // `conn` is polled, so the same pass of the `select!` below then polls the token.
    let mut aborted = std::future::poll_fn(|cx| {
        if activity.watched.load(Ordering::Relaxed) {
            abort.as_mut().poll(cx)
        } else {
            Poll::Pending
        }
    });
    loop {
        tokio::select! {
            biased;
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            () = &mut aborted => {
                tracing::debug!(%peer, "dropping the connection of a watcher that fell behind");
                return;
            }
            // Sent, or the server's runtime is going away: shut down either way.
            _ = &mut shutdown, if !shutting_down => {
                conn.as_mut().graceful_shutdown();
                shutting_down = true;
            }
            // Also while shutting down: a client that stops reading must not hold the
            // drain until the grace period ends.
            () = idle_check.as_mut() => match activity.check(limits) {
                // Busy, or not idle for long enough yet: look again when it could be.
                Check::Again(next_check) => idle_check.as_mut().reset(next_check),
                Check::Stalled => {
                    tracing::debug!(%peer, "closing connection whose client stopped reading");
                    return;
                }
                Check::Idle if shutting_down => idle_check.as_mut().reset(Instant::now() + limits.idle),
                Check::Idle => {
                    tracing::debug!(%peer, "closing idle connection");
                    if !http2 {
                        return;
                    }
                    conn.as_mut().graceful_shutdown();
                    shutting_down = true;
                    hard_close = Some(Instant::now() + IDLE_CLOSE_GRACE);
                }
            },
            () = sleep_until_or_never(hard_close) => {
                tracing::debug!(%peer, "dropping idle connection that did not close");
                return;
            }
        }
    }
}

/// How long an idle connection may take to close gracefully before it is dropped.
const IDLE_CLOSE_GRACE: Duration = Duration::from_millis(500);

async fn sleep_until_or_never(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// The server's shutdown as one connection's [`drive`] waits for it (see
/// [`signal_on`]): polling the `closing` watch in `drive` would take a lock of the
/// channel's notifier on every wake of the connection (perf: ~0.9 % of a
/// heartbeat's server time).
fn connection_shutdown(mut closing: watch::Receiver<bool>) -> oneshot::Receiver<()> {
    signal_on(async move { shutdown_begun(&mut closing).await })
}

/// A oneshot that fires once `done` completes: for a hot path to poll instead of
/// `done` itself, when `done` waits on a shared signal (a `watch`, a
/// `CancellationToken`) whose every poll takes the signal's lock, taken by every
/// other waiter too. A oneshot receiver's poll is an atomic load. A small task
/// waits on `done` and sends, or ends without sending once the receiver is dropped;
/// it costs one spawn.
pub(crate) fn signal_on<F>(done: F) -> oneshot::Receiver<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let (mut tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let fired = tokio::select! {
            () = done => true,
            () = tx.closed() => false,
        };
        if fired {
            let _ = tx.send(());
        }
    });
    rx
}

/// Completes once the server is shutting down (or gone).
async fn shutdown_begun(closing: &mut watch::Receiver<bool>) {
    while !*closing.borrow_and_update() {
        if closing.changed().await.is_err() {
            return;
        }
    }
}

/// The hyper service of one connection: adds the peer address (read by the rate
/// limiter's client-IP extractor), counts the requests in flight, and calls the
/// connection's own [`PresenceService`].
///
/// hyper-util's `TowerToHyperService` clones the tower service for every request
/// (hyper's `Service::call` takes `&self`, tower's `&mut self`); for this stack that
/// is a dozen reference counts shared by every core, touched twice per request. One
/// service per connection behind an uncontended mutex (held only while `call` builds
/// the future) keeps the shared counts out of the request path. The tower contract
/// holds: `call` follows a `poll_ready` that returned `Ready`; if the stack is ever not
/// ready, the request goes through a ready clone instead.
struct ConnectionService {
    service: Mutex<PresenceService>,
    peer: SocketAddr,
    activity: Arc<Activity>,
}

type StackFuture = Either<
    <PresenceService as Service<http::Request<Incoming>>>::Future,
    Oneshot<PresenceService, http::Request<Incoming>>,
>;

impl hyper::service::Service<http::Request<Incoming>> for ConnectionService {
    type Response = http::Response<TrackedBody>;
    type Error = Infallible;
    type Future = Counted<StackFuture>;

    fn call(&self, mut req: http::Request<Incoming>) -> Self::Future {
        req.extensions_mut().insert(self.peer);
        // Only a watch can need closing from outside (see `ConnectionAbort`); the
        // other requests do not pay for the extension.
        if req.uri().path() == "/presence/watch" {
            self.activity.watched.store(true, Ordering::Relaxed);
            req.extensions_mut()
                .insert(ConnectionAbort(self.activity.abort.clone()));
        }
        let in_flight = InFlight::enter(&self.activity);
        let mut cx = Context::from_waker(Waker::noop());
        // A poisoned lock only means a panic elsewhere while calling; the service
        // itself is still whole.
        let mut service = self
            .service
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let inner = match Service::<http::Request<Incoming>>::poll_ready(&mut *service, &mut cx) {
            Poll::Ready(Ok(())) => Either::Left(service.call(req)),
            Poll::Ready(Err(never)) => match never {},
            Poll::Pending => Either::Right(service.clone().oneshot(req)),
        };
        Counted {
            inner,
            in_flight: Some(in_flight),
        }
    }
}

pin_project_lite::pin_project! {
    /// A response future that counts as one request in flight, and hands that count
    /// on to the response body: a request is in flight until its body is written.
    struct Counted<F> {
        #[pin]
        inner: F,
        in_flight: Option<InFlight>,
    }
}

impl<F> Future for Counted<F>
where
    F: Future<Output = Result<http::Response<ResponseBody>, Infallible>>,
{
    type Output = Result<http::Response<TrackedBody>, Infallible>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let res = std::task::ready!(this.inner.poll(cx))?;
        let in_flight = this.in_flight.take();
        Poll::Ready(Ok(res.map(|body| TrackedBody {
            body,
            in_flight,
            handed_out: false,
        })))
    }
}

/// A response body that keeps its request in flight until it is written (or
/// dropped), and tells the connection when a frame it handed out has not been taken
/// by the client yet.
///
/// hyper asks for the next frame only once it has written the last one (HTTP/1: the
/// socket took it; HTTP/2: the stream's flow-control window had room), so "a frame
/// was handed out and the next one not asked for" is exactly "the client is not
/// reading". A single-frame body (every JSON answer but a listing) never counts as
/// waiting.
pub(crate) struct TrackedBody {
    body: ResponseBody,
    in_flight: Option<InFlight>,
    handed_out: bool,
}

impl TrackedBody {
    fn taken(&mut self) {
        if std::mem::take(&mut self.handed_out) {
            if let Some(InFlight(activity)) = &self.in_flight {
                activity.progress();
                activity.waiting_bodies.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

impl http_body::Body for TrackedBody {
    type Data = bytes::Bytes;
    type Error = resilience::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let frame = Pin::new(&mut this.body).poll_frame(cx);
        let out = matches!(frame, Poll::Ready(Some(_))) && !this.body.is_end_stream();
        if let Some(InFlight(activity)) = &this.in_flight {
            let was_out = std::mem::replace(&mut this.handed_out, out);
            // The last frame taken and the next handed out make one stamp: a stream
            // does both on every event, and each stamp reads the clock.
            if was_out || out {
                activity.progress();
            }
            if out && !was_out {
                activity.waiting_bodies.fetch_add(1, Ordering::AcqRel);
            } else if was_out && !out {
                activity.waiting_bodies.fetch_sub(1, Ordering::AcqRel);
            }
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        self.taken();
    }
}

/// Requests in flight on one connection, since when it has had none, and whether
/// its client is reading the responses.
struct Activity {
    started: Instant,
    in_flight: AtomicUsize,
    /// When `in_flight` last dropped to zero, in ns since `started` (0: never, so
    /// idle since the start).
    idle_since_ns: AtomicU64,
    /// Response bodies whose last frame the client has not taken yet.
    waiting_bodies: AtomicUsize,
    /// When a response body last handed out a frame or was asked for the next one,
    /// in ns since `started`.
    progress_ns: AtomicU64,
    /// Cancelled to drop the connection at once (a watcher that fell too far behind).
    abort: CancellationToken,
    /// Set when the connection first carries a watch: only then can `abort` fire, and
    /// only then does [`drive`] poll it (polling a token takes its lock; on every wake
    /// of every connection that was about 1 % of a heartbeat's server time).
    watched: AtomicBool,
}

/// What [`Activity::check`] found.
enum Check {
    /// Nothing in flight for the idle timeout.
    Idle,
    /// A response has waited for the client to read for the write-stall timeout.
    Stalled,
    /// Neither yet: look again then.
    Again(Instant),
}

impl Activity {
    fn new() -> Activity {
        Activity {
            started: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since_ns: AtomicU64::new(0),
            waiting_bodies: AtomicUsize::new(0),
            progress_ns: AtomicU64::new(0),
            abort: CancellationToken::new(),
            watched: AtomicBool::new(false),
        }
    }

    fn elapsed_ns(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn at(&self, ns: &AtomicU64) -> Instant {
        self.started + Duration::from_nanos(ns.load(Ordering::Acquire))
    }

    fn progress(&self) {
        self.progress_ns
            .fetch_max(self.elapsed_ns(), Ordering::AcqRel);
    }

    /// Whether the connection is idle or stalled under `limits`, or when it could
    /// first be.
    fn check(&self, limits: ConnectionLimits) -> Check {
        let now = Instant::now();
        if self.in_flight.load(Ordering::Acquire) > 0 {
            if self.waiting_bodies.load(Ordering::Acquire) == 0 {
                return Check::Again(now + limits.idle.min(limits.write_stall));
            }
            let until = self.at(&self.progress_ns) + limits.write_stall;
            return if until > now {
                Check::Again(until)
            } else {
                Check::Stalled
            };
        }
        let until = self.at(&self.idle_since_ns) + limits.idle;
        if until > now {
            Check::Again(until)
        } else {
            Check::Idle
        }
    }
}

/// Counts one request in flight while it lives.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn enter(activity: &Arc<Activity>) -> InFlight {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.0;
        // Stamp first, then leave: whoever sees `in_flight == 0` also sees the stamp.
        activity
            .idle_since_ns
            .fetch_max(activity.elapsed_ns(), Ordering::AcqRel);
        activity.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The protocol a connection speaks, as far as its first bytes tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    Http1,
    /// It begins with the HTTP/2 preface (`PRI * HTTP/2.0...`).
    Http2,
}

/// Waits until the client has sent something, and tells from its first bytes which
/// protocol it speaks; `None` if it sent nothing within `timeout`.
///
/// hyper only starts to read (and time) a connection once it is served, so without
/// this a client that connects and stays silent would hold a connection (and a file
/// descriptor) forever. Three bytes tell the protocols apart; when fewer have come
/// (the first ones of `POST` or `PUT`, say), it waits a moment for the rest.
async fn first_bytes_within(stream: &TcpStream, timeout: Duration) -> Option<Protocol> {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 3];
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => n,
            // Silent (or gone) for the whole timeout, or still stuck on one or two
            // bytes at its end: nothing to serve.
            _ => return None,
        };
        // HTTP/1 cannot begin with "PRI" (there is no such method).
        if n == buf.len() || !b"PRI".starts_with(&buf[..n]) {
            return Some(if buf[..n] == *b"PRI" {
                Protocol::Http2
            } else {
                Protocol::Http1
            });
        }
        // `peek` returns at once while those bytes are buffered: wait a moment.
        tokio::time::sleep(Duration::from_millis(1)).await;
        if Instant::now() >= deadline {
            return None;
        }
    }
}

#[cfg(test)]
mod task_size {
    use super::*;

    /// An idle connection (a watcher, say) costs its task's memory for as long as it
    /// is open: the task holds hyper's HTTP/1 connection once, not twice.
    #[tokio::test]
    async fn an_http1_connection_task_holds_hypers_connection_once() {
        let config = Config::default();
        let service = || PresenceService::new(Arc::new(crate::store::MemoryStore::new()), &config);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (a, b) = (
            TcpStream::connect(addr).await.expect("connect"),
            TcpStream::connect(addr).await.expect("connect"),
        );
        let builders = Arc::new(Builders::new(&config));
        let hyper_conn = builders.http1.serve_connection(
            TokioIo::new(a),
            ConnectionService {
                service: Mutex::new(service()),
                peer: addr,
                activity: Arc::new(Activity::new()),
            },
        );
        let limits = ConnectionLimits {
            idle: Duration::from_secs(1),
            write_stall: Duration::from_secs(1),
        };
        let (_closing_tx, closing) = watch::channel(false);
        let task = serve_connection(b, addr, builders, service(), limits, closing, None);
        let (task, hyper) = (
            std::mem::size_of_val(&task),
            std::mem::size_of_val(&hyper_conn),
        );
        assert!(
            task < 2 * hyper + 1024,
            "task {task} B, hyper's connection {hyper} B"
        );
    }
}

#[cfg(test)]
mod signal {
    use super::*;

    /// The oneshot fires when the future completes, and not before.
    #[tokio::test(start_paused = true)]
    async fn a_signal_fires_once_its_future_completes() {
        let token = tokio_util::sync::CancellationToken::new();
        let mut fired = signal_on(token.clone().cancelled_owned());
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            fired.try_recv().is_err(),
            "fired before the token was cancelled"
        );
        token.cancel();
        assert_eq!(
            tokio::time::timeout(Duration::from_millis(10), fired).await,
            Ok(Ok(())),
            "did not fire after the token was cancelled"
        );
    }

    /// Dropping the receiver ends the waiting task: nothing is left behind per
    /// stream or connection.
    #[tokio::test(start_paused = true)]
    async fn a_dropped_signal_ends_its_task() {
        let (tx, rx) = oneshot::channel::<()>();
        let waited = Arc::new(());
        let held = waited.clone();
        let fired = signal_on(async move {
            let _held = held;
            let _ = rx.await;
        });
        drop(fired);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(
            Arc::strong_count(&waited),
            1,
            "the task still holds its future"
        );
        drop(tx);
    }
}
