//! Concurrency limits on an axum 0.8 `Router`: calls over the limit are answered `503`
//! at once (with `Retry-After` and a JSON body) instead of queueing.
//!
//! - `GET /slow` (a stand-in for an expensive handler: it takes `Limits::slow_for`) is
//!   behind a **static** `ConcurrencyLimitLayer::new(max).http()`: at most `max` run at
//!   once; the next is answered
//!   `503 {"error":"overloaded","message":"overloaded; retry after 2 s"}` with
//!   `Retry-After: 2`, without running the handler.
//! - The whole router is behind an **adaptive** limit (AIMD, between 4 and 256, from
//!   32): it learns the capacity from latency and errors (a `5xx` or a call slower than
//!   1 s is a drop), and `GET /limit` shows where it is.
//!
//! HTTP mode (`.http()`) keeps the layered service infallible, so axum needs no
//! `HandleErrorLayer`.
//!
//! Run it with `cargo run --example axum_concurrency` (`PORT` picks the port, default
//! 3000; `0` picks a free one), then for example (5 at once against a limit of 2):
//!
//! ```text
//! for i in 1 2 3 4 5; do curl -s -o /dev/null -w '%{http_code}\n' localhost:3000/slow & done; wait
//! curl -s localhost:3000/limit
//! ```

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use axum::{extract::State, routing::get, Json, Router};
use resilience::{Aimd, ConcurrencyLimitLayer};
use serde_json::{json, Value};
use tokio::net::TcpListener;

/// Limits of the app; `Default` is what `main` runs with.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Calls of `/slow` at once.
    pub max_slow: usize,
    /// How long a call of `/slow` takes.
    pub slow_for: Duration,
    /// The `Retry-After` of a rejection (sent in whole seconds, rounded up).
    pub retry_after: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_slow: 2,
            slow_for: Duration::from_secs(3),
            retry_after: Duration::from_secs(2),
        }
    }
}

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    /// Calls that reached the `/slow` handler (rejected ones never do).
    pub slow_hits: Arc<AtomicU64>,
    /// The adaptive limit around the whole router, to report on `/limit`.
    pub adaptive: ConcurrencyLimitLayer,
    slow_for: Duration,
}

/// The router with both limits, and its state (to read the counters).
pub fn app(limits: &Limits) -> (Router, AppState) {
    // Shared state is made here, when the layers are built: every per-connection clone
    // of the router counts against the same limits.
    let adaptive =
        ConcurrencyLimitLayer::adaptive(Aimd::builder().timeout(Duration::from_secs(1)).build())
            .min(4)
            .max(256)
            .initial(32)
            .build()
            .retry_after(limits.retry_after);
    let slow_limit = ConcurrencyLimitLayer::new(limits.max_slow)
        .retry_after(limits.retry_after)
        .http();
    let state = AppState {
        slow_hits: Arc::default(),
        adaptive: adaptive.clone(),
        slow_for: limits.slow_for,
    };
    let router = Router::new()
        .route("/", get(|| async { "hello\n" }))
        .route("/slow", get(slow).layer(slow_limit))
        .route("/limit", get(limit))
        .with_state(state.clone())
        .layer(adaptive.http());
    (router, state)
}

/// Serves `router` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, router: Router) -> std::io::Result<()> {
    axum::serve(listener, router).await
}

async fn slow(State(state): State<AppState>) -> &'static str {
    state.slow_hits.fetch_add(1, Ordering::Relaxed);
    tokio::time::sleep(state.slow_for).await;
    "done\n"
}

async fn limit(State(state): State<AppState>) -> Json<Value> {
    let a = &state.adaptive;
    Json(json!({
        "limit": a.limit(),
        "min": a.min(),
        "max": a.max(),
        "in_flight": a.in_flight(),
        "rejections": a.rejections(),
    }))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let port: u16 = match std::env::var("PORT") {
        Ok(p) => p.parse().map_err(|e| format!("PORT={p:?}: {e}"))?,
        Err(_) => 3000,
    };
    let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, port)).await?;
    println!(
        "axum_concurrency listening on http://{}",
        listener.local_addr()?
    );
    let (router, _state) = app(&Limits::default());
    serve(listener, router).await?;
    Ok(())
}
