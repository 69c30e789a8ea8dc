//! [`Server`]: binds a TCP listener and serves [`PresenceService`] over HTTP/1 and
//! HTTP/2 with hyper, until a shutdown signal.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tower::ServiceBuilder;

use super::PresenceService;
use crate::config::Config;
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
    header_timeout: Duration,
    shutdown_grace: Duration,
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
    /// The address cannot be resolved or bound; the message names it.
    pub async fn bind_service(config: &Config, service: PresenceService) -> io::Result<Server> {
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
            header_timeout: config.header_timeout,
            shutdown_grace: config.shutdown_grace,
        })
    }

    /// The address the server listens on (with the real port when bound to port `0`).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves connections until `shutdown` completes, then stops accepting, lets
    /// in-flight requests finish for up to `PRESENCE_SHUTDOWN_GRACE_MS` (idle
    /// keep-alive connections are closed at once), aborts what is left and returns.
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
            header_timeout,
            shutdown_grace,
        } = self;

        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout);
        builder.http2().timer(TokioTimer::new());
        let builder = Arc::new(builder);

        let graceful = GracefulShutdown::new();
        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);

        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let watcher = graceful.watcher();
                        let builder = builder.clone();
                        let service = service.clone();
                        connections.spawn(async move {
                            if !first_byte_within(&stream, header_timeout).await {
                                tracing::debug!(%peer, "closing connection that sent nothing");
                                return;
                            }
                            let service = ServiceBuilder::new()
                                .map_request(move |mut req: http::Request<Incoming>| {
                                    // Read by the rate limiter's client-IP extractor.
                                    req.extensions_mut().insert(peer);
                                    req
                                })
                                .service(service);
                            let conn = builder.serve_connection(
                                TokioIo::new(stream),
                                TowerToHyperService::new(service),
                            );
                            if let Err(e) = watcher.watch(conn).await {
                                tracing::debug!(%peer, error = %e, "connection ended with an error");
                            }
                        });
                    }
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
        if tokio::time::timeout(shutdown_grace, graceful.shutdown())
            .await
            .is_err()
        {
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
    tracing::info!("listening on http://{}", server.local_addr());
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

/// Waits until the client has sent at least one byte.
///
/// hyper's `header_read_timeout` only starts once the auto builder has sniffed the
/// protocol, so without this a client that connects and stays silent would hold a
/// connection (and a file descriptor) forever.
async fn first_byte_within(stream: &TcpStream, timeout: Duration) -> bool {
    let mut buf = [0u8; 1];
    matches!(
        tokio::time::timeout(timeout, stream.peek(&mut buf)).await,
        Ok(Ok(n)) if n > 0
    )
}
