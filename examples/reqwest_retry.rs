//! A `reqwest::Client` behind a retry layer with a budget, and a circuit breaker outside
//! it. `reqwest::Client` is a `tower::Service<reqwest::Request>`, so the layers wrap it
//! like any other service:
//!
//! ```text
//! CircuitBreakerLayer (HttpClassifier) -> RetryLayer (HttpRetryPolicy, RetryBudget) -> reqwest::Client
//! ```
//!
//! - `HttpRetryPolicy` (crate feature `reqwest`) retries idempotent requests only (`GET`,
//!   `PUT`, `DELETE`, …; never a `POST`) on transport errors and `429` / `502` / `503` /
//!   `504`, waiting what `Retry-After` asks (capped) or a jittered backoff, at most
//!   3 attempts in all.
//! - The `RetryBudget` caps retries at 20 % of calls plus 10 per second, with a start-up
//!   allowance of 5 so the first calls of a fresh process are retried too.
//! - The breaker sits **outside** the retry: a call whose attempts all fail is one
//!   failure, and an open breaker stops a call before any attempt.
//!
//! The example starts its own upstream on 127.0.0.1 (`/flaky` answers `503` with
//! `Retry-After: 1` twice, then `200`), so it runs offline:
//! `cargo run --example reqwest_retry`.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use axum::{
    http::{header, StatusCode},
    routing::get,
    Router,
};
use resilience::{
    retry::{HttpRetryPolicy, RetryBudget, RetryLayer},
    BoxError, CircuitBreaker, CircuitBreakerLayer, HttpClassifier,
};
use tokio::net::TcpListener;
use tower::{util::BoxCloneService, Service, ServiceBuilder, ServiceExt};

/// The layered client: takes a `reqwest::Request`, gives a `reqwest::Response`.
pub type Client = BoxCloneService<reqwest::Request, reqwest::Response, BoxError>;

/// Requests that reached the upstream's `/flaky`.
#[derive(Clone, Default)]
pub struct Hits(Arc<AtomicU64>);

impl Hits {
    /// How many requests `/flaky` has seen.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Starts the local upstream on `listener`: `/flaky` (any method) answers
/// `503 Retry-After: 1` to its first `failures` requests, then `200 ok`.
pub fn spawn_upstream(
    listener: TcpListener,
    hits: Hits,
    failures: u64,
) -> tokio::task::JoinHandle<()> {
    let flaky = move || {
        let n = hits.0.fetch_add(1, Ordering::Relaxed);
        async move {
            if n < failures {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [(header::RETRY_AFTER, "1")],
                    "busy\n",
                )
            } else {
                (
                    StatusCode::OK,
                    [(header::CACHE_CONTROL, "no-store")],
                    "ok\n",
                )
            }
        }
    };
    let router = Router::new().route("/flaky", get(flaky.clone()).post(flaky));
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, router).await {
            eprintln!("upstream server failed: {err}");
        }
    })
}

/// Wraps `client`: `breaker` outside, then retries by `HttpRetryPolicy` (3 attempts,
/// `Retry-After` honoured up to 5 s) within `budget`.
pub fn layered(client: reqwest::Client, breaker: CircuitBreaker, budget: RetryBudget) -> Client {
    let policy = HttpRetryPolicy::new()
        .max_attempts(3)
        .max_retry_after(Duration::from_secs(5));
    let svc = ServiceBuilder::new()
        .layer(CircuitBreakerLayer::new(breaker).classifier(HttpClassifier))
        .layer(RetryLayer::new(policy).budget(budget))
        .service(client);
    BoxCloneService::new(svc)
}

/// The example's budget: 20 % of calls, plus 10 per second, plus 5 at start-up.
pub fn budget() -> RetryBudget {
    RetryBudget::builder()
        .ratio(0.2)
        .min_per_sec(10.0)
        .initial(5)
        .build()
}

/// Sends `method url` through `client`.
pub async fn send(
    client: &mut Client,
    method: reqwest::Method,
    url: &str,
) -> Result<reqwest::Response, BoxError> {
    let url = reqwest::Url::parse(url)?;
    client
        .ready()
        .await?
        .call(reqwest::Request::new(method, url))
        .await
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
    let addr: SocketAddr = listener.local_addr()?;
    let hits = Hits::default();
    spawn_upstream(listener, hits.clone(), 2);
    println!("upstream on http://{addr}");

    let breaker = CircuitBreaker::builder()
        .consecutive_failures(3)
        .open_for(Duration::from_secs(30))
        .build();
    let budget = budget();
    let mut client = layered(
        reqwest::Client::builder().no_proxy().build()?,
        breaker.clone(),
        budget.clone(),
    );
    let url = format!("http://{addr}/flaky");

    let start = Instant::now();
    let res = send(&mut client, reqwest::Method::GET, &url).await?;
    println!(
        "GET /flaky: {} after {:?} and {} attempts (two 503s, each waited out)",
        res.status(),
        start.elapsed(),
        hits.get()
    );

    // A POST is not idempotent: sent once, its 503 handed back.
    let upstream = Hits::default();
    let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    spawn_upstream(listener, upstream.clone(), 2);
    let res = send(
        &mut client,
        reqwest::Method::POST,
        &format!("http://{addr}/flaky"),
    )
    .await?;
    println!(
        "POST /flaky: {} after {} attempt(s)",
        res.status(),
        upstream.get()
    );

    let stats = budget.stats();
    println!(
        "budget: {} requests, {} retries, {} denied; breaker {}",
        stats.requests,
        stats.retries,
        stats.denied,
        breaker.state()
    );
    Ok(())
}
