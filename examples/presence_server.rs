//! The presence server, configured from the environment (README, Configuration).
//!
//! ```text
//! cargo run --example presence_server
//! PRESENCE_HTTP_PORT=9000 PRESENCE_REDIS_URI=redis://127.0.0.1:6379 cargo run --example presence_server
//! curl -s localhost:8080/presence
//! PRESENCE_TLS_CERT_FILE=cert.pem PRESENCE_TLS_KEY_FILE=key.pem cargo run --example presence_server
//! curl -s --cacert ca.pem https://localhost:8080/presence
//! ```
//!
//! Without `PRESENCE_REDIS_URI` it runs on the in-memory store (one server only).
//! With it, the server starts even when Redis is down and serves once Redis answers.
//! A bad variable, or a Redis deployment with another shard count than
//! `PRESENCE_SHARDS`, stops it with one line on stderr and exit status 2; SIGTERM or
//! Ctrl-C drains in-flight requests and exits 0.

use std::process::ExitCode;

// jemalloc rather than the system allocator: a heartbeat makes about fifteen short
// allocations (hyper's, tower's and ours), and jemalloc's thread caches serve them in
// a fraction of glibc's instructions (README, Performance).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use presence::config::Config;
use presence::server::{shutdown_signal, Server};
use presence::store::StoreError;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();

    let config = match Config::from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };

    let store = match presence::store::open_for(&config).await {
        Ok(store) => store,
        Err(e) => {
            eprintln!(
                "error: cannot open store {}: {e}",
                config.store_uri_redacted()
            );
            return ExitCode::FAILURE;
        }
    };
    // The store logs details itself (the in-memory one warns it is single-server);
    // describe() never contains credentials.
    tracing::info!(store = %store.describe(), "store opened");
    // Redis is connected lazily: a server started before Redis serves 503 (and
    // /readyz 503) until Redis answers, instead of exiting.
    match tokio::time::timeout(config.store_timeout, store.ping()).await {
        Ok(Ok(())) => {
            // A deployment of another shape (PRESENCE_SHARDS) is a configuration error.
            if let Ok(Err(StoreError::Refused(why))) =
                tokio::time::timeout(config.store_timeout, store.check_deployment()).await
            {
                eprintln!("error: {why}");
                return ExitCode::from(2);
            }
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "store not reachable yet; answering 503 until it is")
        }
        Err(_) => tracing::warn!("store not answering yet; answering 503 until it does"),
    }

    let server = match Server::bind(&config, store).await {
        Ok(server) => server,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!("listening on {}://{}", server.scheme(), server.local_addr());

    match server.run(shutdown_signal()).await {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
