//! Both resilience layers on an axum 0.8 `Router`, each added with a plain `.layer(...)`.
//!
//! In HTTP mode (`.http()`) a layer answers a rejection itself (`429`, `503`) instead of
//! returning an error, so the layered service stays infallible and axum needs no
//! `HandleErrorLayer`.
//!
//! - The whole router is behind
//!   `TokenBucketLayer::builder(rate, burst).key(PeerIp).build().http()`: one bucket per
//!   client IP. `PeerIp` reads axum's `ConnectInfo<SocketAddr>` (the `resilience` crate's
//!   `axum` feature), which `into_make_service_with_connect_info::<SocketAddr>()` inserts.
//!   Over the limit: `429` with `Retry-After`, `RateLimit` and `RateLimit-Policy`.
//! - `GET /upstream` (a stand-in for a call to a flaky dependency; `?fail=true` makes it
//!   answer `500`) is also behind `CircuitBreakerLayer::new(breaker).http()`: after 3
//!   failures in a row it answers `503` with `Retry-After` for 10 s without running the
//!   handler.
//!
//! Run it with `cargo run --example axum_layers` (`PORT` picks the port, default 3000; `0`
//! picks a free one), then for example:
//!
//! ```text
//! for i in 1 2 3 4; do curl -s -o /dev/null -w '%{http_code}\n' 'localhost:3000/upstream?fail=true'; done
//! for i in $(seq 12); do curl -s -o /dev/null -w '%{http_code}\n' localhost:3000/; done
//! ```

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use axum::{
    extract::{Query, State},
    http::StatusCode,
    routing::get,
    Router,
};
use resilience::{key::PeerIp, Burst, CircuitBreaker, CircuitBreakerLayer, Rate, TokenBucketLayer};
use serde::Deserialize;
use tokio::net::TcpListener;

/// Limits of the app; `Default` is what `main` runs with.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Token refill per client IP, requests per second.
    pub rate_per_sec: f64,
    /// Burst per client IP.
    pub burst: u32,
    /// Consecutive failures of `/upstream` that open the breaker.
    pub breaker_failures: u32,
    /// How long the breaker stays open.
    pub open_for: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            rate_per_sec: 2.0,
            burst: 10,
            breaker_failures: 3,
            open_for: Duration::from_secs(10),
        }
    }
}

/// Shared state of the handlers.
#[derive(Clone, Default)]
pub struct AppState {
    /// Requests that reached the `/upstream` handler (rejected ones never do).
    pub upstream_hits: Arc<AtomicU64>,
}

/// The router with both layers.
pub fn app(limits: &Limits, state: AppState) -> Router {
    let breaker = CircuitBreaker::builder()
        .consecutive_failures(limits.breaker_failures)
        .open_for(limits.open_for)
        .build();

    Router::new()
        .route("/", get(|| async { "hello\n" }))
        .route(
            "/upstream",
            get(upstream).layer(CircuitBreakerLayer::new(breaker).http()),
        )
        .with_state(state)
        .layer(
            TokenBucketLayer::builder(Rate::per_second(limits.rate_per_sec), Burst(limits.burst))
                .key(PeerIp)
                .build()
                .http(),
        )
}

/// Serves `router` with the peer address available to `PeerIp`.
pub async fn serve(listener: TcpListener, router: Router) -> std::io::Result<()> {
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await
}

#[derive(Deserialize)]
struct UpstreamQuery {
    #[serde(default)]
    fail: bool,
}

async fn upstream(
    State(state): State<AppState>,
    Query(query): Query<UpstreamQuery>,
) -> (StatusCode, &'static str) {
    let n = state.upstream_hits.fetch_add(1, Ordering::Relaxed) + 1;
    if query.fail {
        println!("/upstream call #{n}: failing on purpose");
        (StatusCode::INTERNAL_SERVER_ERROR, "upstream failed\n")
    } else {
        println!("/upstream call #{n}: ok");
        (StatusCode::OK, "upstream ok\n")
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let port: u16 = match std::env::var("PORT") {
        Ok(p) => p.parse().map_err(|e| format!("PORT={p:?}: {e}"))?,
        Err(_) => 3000,
    };
    let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, port)).await?;
    println!("axum_layers listening on http://{}", listener.local_addr()?);
    serve(listener, app(&Limits::default(), AppState::default())).await?;
    Ok(())
}
