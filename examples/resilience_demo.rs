//! The resilience layers on a plain hyper 1 server (no axum): the seed's demo app.
//!
//! - `GET /unstable` fails with `500` about half of the time. It sits behind
//!   `CircuitBreakerLayer::new(breaker).http()`: after 3 failures in a row the breaker opens
//!   and answers `503 Service Unavailable` with `Retry-After` for 2 s without calling the
//!   handler, then lets one trial call through (half-open) to decide whether to close again.
//! - `GET /limited` sits behind
//!   `TokenBucketLayer::builder(Rate::per_second(5.0), Burst(10)).key(PeerIp).build().http()`:
//!   each client IP gets a burst of 10 and 5 requests/s after that; beyond it the answer
//!   is `429 Too Many Requests` with `Retry-After`, `RateLimit` and `RateLimit-Policy`.
//!
//! `PeerIp` reads the peer's `std::net::SocketAddr` from the request extensions, so the
//! accept loop inserts it there once per connection (hyper itself does not).
//!
//! Run it with `cargo run --example resilience_demo` (`PORT=8080` picks the port, default
//! 3000; `PORT=0` picks a free one). It first drives itself for about 4 s and prints what
//! happens, then keeps serving until Ctrl-C so you can `curl -i` it yourself.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
    service::TowerToHyperService,
};
use resilience::{
    key::PeerIp, Burst, CircuitBreaker, CircuitBreakerLayer, Rate, ResponseBody, TokenBucketLayer,
};
use tokio::net::TcpListener;
use tower::{util::BoxCloneService, ServiceBuilder, ServiceExt};

/// The response type of every route: the layers wrap the handlers' `Full` bodies.
pub type DemoResponse = Response<ResponseBody<Full<Bytes>>>;

/// The whole app as one cloneable tower service (hyper-util clones it per request).
pub type DemoService = BoxCloneService<Request<Incoming>, DemoResponse, Infallible>;

/// Knobs of the demo. The randomness is injectable so tests can be deterministic.
#[derive(Clone, Debug)]
pub struct DemoConfig {
    /// Probability in `0.0..=1.0` that `/unstable` answers `500`.
    pub failure_probability: f64,
    /// Seed of the generator that decides which calls fail; same seed, same sequence.
    pub seed: u64,
    /// Consecutive failures that open the breaker.
    pub breaker_failures: u32,
    /// How long the breaker stays open before it lets a trial call through.
    pub open_for: Duration,
    /// Token refill of `/limited`, requests per second per client IP.
    pub rate_per_sec: f64,
    /// Burst of `/limited` per client IP.
    pub burst: u32,
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            failure_probability: 0.5,
            // A fresh seed per run; if the OS generator fails, a fixed one is still a demo.
            seed: getrandom::u64().unwrap_or(0x5eed),
            breaker_failures: 3,
            open_for: Duration::from_secs(2),
            rate_per_sec: 5.0,
            burst: 10,
        }
    }
}

/// The demo app plus the handles a caller may want to watch.
#[derive(Clone)]
pub struct Demo {
    /// The routed, layered service.
    pub service: DemoService,
    /// The breaker guarding `/unstable` (shared by all clones of the service).
    pub breaker: CircuitBreaker,
    /// How many requests actually reached the `/unstable` handler: calls the breaker
    /// rejected never get here.
    pub unstable_hits: Arc<AtomicU64>,
}

/// Builds the routed service with both layers.
pub fn app(config: &DemoConfig) -> Demo {
    let breaker = CircuitBreaker::builder()
        .consecutive_failures(config.breaker_failures)
        .open_for(config.open_for)
        .on_state_change(|t| println!("  [breaker] {} -> {}", t.from, t.to))
        .build();
    let unstable_hits = Arc::new(AtomicU64::new(0));

    let coin = Coin::new(config.seed, config.failure_probability);
    let hits = unstable_hits.clone();
    let unstable = ServiceBuilder::new()
        .layer(CircuitBreakerLayer::new(breaker.clone()).http())
        .service_fn(move |_req: Request<Incoming>| {
            hits.fetch_add(1, Ordering::Relaxed);
            let fails = coin.flip();
            async move {
                Ok::<_, Infallible>(if fails {
                    text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "the unstable upstream failed\n",
                    )
                } else {
                    text(StatusCode::OK, "the unstable upstream answered\n")
                })
            }
        });

    let limited = ServiceBuilder::new()
        .layer(
            TokenBucketLayer::builder(Rate::per_second(config.rate_per_sec), Burst(config.burst))
                .key(PeerIp)
                .build()
                .http(),
        )
        .service_fn(|_req: Request<Incoming>| async {
            Ok::<_, Infallible>(text(StatusCode::OK, "you got a token\n"))
        });

    let unstable = BoxCloneService::new(unstable);
    let limited = BoxCloneService::new(limited);
    let router = tower::service_fn(move |req: Request<Incoming>| {
        let route = match (req.method(), req.uri().path()) {
            (&Method::GET, "/unstable") => Some(unstable.clone()),
            (&Method::GET, "/limited") => Some(limited.clone()),
            _ => None,
        };
        async move {
            match route {
                Some(route) => route.oneshot(req).await,
                None => Ok(text(StatusCode::NOT_FOUND, "try /unstable or /limited\n")
                    .map(ResponseBody::inner)),
            }
        }
    });

    Demo {
        service: BoxCloneService::new(router),
        breaker,
        unstable_hits,
    }
}

/// Accepts connections forever, serving `service` on each; stops when the future is dropped
/// (connections run on tasks of the current runtime, so they end with it).
pub async fn serve(listener: TcpListener, service: DemoService) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(err) => {
                // Accept errors (e.g. out of file descriptors) are transient; back off a little.
                eprintln!("accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let service = ServiceBuilder::new()
            .map_request(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert::<SocketAddr>(peer);
                req
            })
            .service(service.clone());
        tokio::spawn(async move {
            let builder = auto::Builder::new(TokioExecutor::new());
            let conn =
                builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
            if let Err(err) = conn.await {
                eprintln!("connection from {peer} failed: {err}");
            }
        });
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *res.status_mut() = status;
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

/// A biased coin: SplitMix64 over one atomic, so clones share the sequence without a lock.
#[derive(Clone)]
struct Coin {
    state: Arc<AtomicU64>,
    probability: f64,
}

impl Coin {
    fn new(seed: u64, probability: f64) -> Self {
        Coin {
            state: Arc::new(AtomicU64::new(seed)),
            probability,
        }
    }

    /// `true` with the configured probability.
    fn flip(&self) -> bool {
        let mut z = self
            .state
            .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
            .wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        // 53 random bits as a uniform float in [0, 1): probability 1.0 always fails.
        ((z >> 11) as f64 / (1u64 << 53) as f64) < self.probability
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let port: u16 = match std::env::var("PORT") {
        Ok(p) => p.parse().map_err(|e| format!("PORT={p:?}: {e}"))?,
        Err(_) => 3000,
    };
    let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, port)).await?;
    let addr = listener.local_addr()?;
    println!("resilience_demo listening on http://{addr}");

    let demo = app(&DemoConfig::default());
    tokio::spawn(serve(listener, demo.service.clone()));

    let client = reqwest::Client::builder().no_proxy().build()?;
    println!("\n40 x GET /unstable, one per 100 ms (fails ~50%; 3 failures in a row open the breaker for 2 s):");
    for i in 1..=40 {
        let res = client.get(format!("http://{addr}/unstable")).send().await?;
        println!(
            "  #{i:2} {}{}   (breaker {})",
            res.status(),
            retry_after(&res),
            demo.breaker.state()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "  the handler ran {} times out of 40; the breaker answered the rest",
        demo.unstable_hits.load(Ordering::Relaxed)
    );

    println!("\n12 x GET /limited (burst 10, then 5/s):");
    for i in 1..=12 {
        let res = client.get(format!("http://{addr}/limited")).send().await?;
        let rate_limit = res
            .headers()
            .get("ratelimit")
            .and_then(|v| v.to_str().ok())
            .map(|v| format!("  RateLimit: {v}"))
            .unwrap_or_default();
        println!("  #{i:2} {}{}{rate_limit}", res.status(), retry_after(&res));
    }

    println!("\nserving until Ctrl-C; try: curl -i http://{addr}/unstable");
    tokio::signal::ctrl_c().await?;
    Ok(())
}

fn retry_after(res: &reqwest::Response) -> String {
    res.headers()
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(|v| format!("  Retry-After: {v}"))
        .unwrap_or_default()
}
