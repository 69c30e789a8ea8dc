//! A `reqwest::Client` behind the resilience layers. `reqwest::Client` is a
//! `tower::Service<reqwest::Request>`, so the layers wrap it like any other service:
//!
//! ```text
//! TokenBucketLayer (wait mode) -> CircuitBreakerLayer (HttpClassifier) -> reqwest::Client
//! ```
//!
//! - The token bucket in **wait** mode smooths a runaway client: a call without a token
//!   sleeps until one is free (up to a bound) instead of failing.
//! - The breaker's `HttpClassifier` (crate feature `reqwest`) counts transport errors *and*
//!   `5xx` responses as failures. Once open, calls fail at once with `CircuitOpen` and never
//!   reach the server.
//!
//! The example starts its own upstream server on 127.0.0.1 (`/ok` answers 200, `/fail`
//! answers 500, both counting hits), so it runs offline:
//! `cargo run --example reqwest_breaker`.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use axum::{http::StatusCode, routing::get, Router};
use resilience::{
    BoxError, Burst, CircuitBreaker, CircuitBreakerLayer, CircuitOpen, HttpClassifier, Rate,
    TokenBucketLayer,
};
use tokio::net::TcpListener;
use tower::{util::BoxCloneService, Service, ServiceBuilder, ServiceExt};

/// The layered client: takes a `reqwest::Request`, gives a `reqwest::Response`.
pub type Client = BoxCloneService<reqwest::Request, reqwest::Response, BoxError>;

/// Requests that reached the upstream server.
#[derive(Clone, Default)]
pub struct Hits(Arc<AtomicU64>);

impl Hits {
    /// How many requests the upstream has seen.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Starts the local upstream on `listener`: `/ok` answers 200, `/fail` answers 500.
pub fn spawn_upstream(listener: TcpListener, hits: Hits) -> tokio::task::JoinHandle<()> {
    let ok_hits = hits.clone();
    let router = Router::new()
        .route(
            "/ok",
            get(move || async move {
                ok_hits.0.fetch_add(1, Ordering::Relaxed);
                "ok\n"
            }),
        )
        .route(
            "/fail",
            get(move || async move {
                hits.0.fetch_add(1, Ordering::Relaxed);
                (StatusCode::INTERNAL_SERVER_ERROR, "upstream failed\n")
            }),
        );
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, router).await {
            eprintln!("upstream server failed: {err}");
        }
    })
}

/// Wraps `client`: at most `rate_per_sec` calls per second after a burst of `burst`, each
/// call waiting at most `max_wait` for a token; then `breaker`, which trips on 5xx.
pub fn layered(
    client: reqwest::Client,
    breaker: CircuitBreaker,
    rate_per_sec: f64,
    burst: u32,
    max_wait: Duration,
) -> Client {
    let svc = ServiceBuilder::new()
        .layer(TokenBucketLayer::new(Rate::per_second(rate_per_sec), Burst(burst)).wait(max_wait))
        .layer(CircuitBreakerLayer::new(breaker).classifier(HttpClassifier))
        .service(client);
    BoxCloneService::new(svc)
}

/// Sends `GET url` through `client`.
pub async fn send_get(client: &mut Client, url: &str) -> Result<reqwest::Response, BoxError> {
    let url = reqwest::Url::parse(url)?;
    let request = reqwest::Request::new(reqwest::Method::GET, url);
    client.ready().await?.call(request).await
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
    let addr: SocketAddr = listener.local_addr()?;
    let hits = Hits::default();
    spawn_upstream(listener, hits.clone());
    println!("upstream on http://{addr}");

    let breaker = CircuitBreaker::builder()
        .consecutive_failures(3)
        .open_for(Duration::from_secs(30))
        .on_state_change(|t| println!("  [breaker] {} -> {}", t.from, t.to))
        .build();
    // 10 calls/s, burst 2; a call waits up to 1 s for its token.
    let reqwest_client = reqwest::Client::builder().no_proxy().build()?;
    let mut client = layered(
        reqwest_client,
        breaker.clone(),
        10.0,
        2,
        Duration::from_secs(1),
    );

    println!("\n6 calls to /ok (burst 2, then one every 100 ms):");
    let start = Instant::now();
    for i in 1..=6 {
        let res = send_get(&mut client, &format!("http://{addr}/ok")).await?;
        println!("  #{i} {} at {:?}", res.status(), start.elapsed());
    }

    println!("\n6 calls to /fail (the breaker opens after 3 failures in a row):");
    for i in 1..=6 {
        let before = hits.get();
        match send_get(&mut client, &format!("http://{addr}/fail")).await {
            Ok(res) => println!("  #{i} {} (server hit)", res.status()),
            Err(err) => match err.downcast_ref::<CircuitOpen>() {
                Some(open) => println!(
                    "  #{i} rejected: {open} (server hits unchanged: {})",
                    hits.get() == before
                ),
                None => println!("  #{i} error: {err}"),
            },
        }
    }
    println!("\nupstream saw {} requests in all", hits.get());
    Ok(())
}
