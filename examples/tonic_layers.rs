//! The resilience layers with tonic 0.14: a rate-limited gRPC server and a client `Channel`
//! behind a circuit breaker. The service is `grpc.health.v1.Health` from `tonic-health`, so
//! no `.proto` file and no `protoc` are needed.
//!
//! Server: `Server::builder().layer(..)` with `TokenBucketLayer` in **error mode**, keyed by
//! the peer IP, plus a `map_err` that turns `RateLimited` into
//! `Status::resource_exhausted` with a `retry-after` metadata entry. Why not HTTP mode: its
//! `429` carries a JSON body and no `grpc-status`, and a tonic client reads that body as
//! gRPC frames and reports `Internal: protocol error`. A `Status` error, on the other hand,
//! is what tonic's server expects: it turns it into a proper trailers-only gRPC response.
//! tonic puts the peer address in a `TcpConnectInfo` extension (not a bare `SocketAddr`),
//! so the key is a `key_fn` reading that.
//!
//! Client: `CircuitBreakerLayer` in error mode around a `tonic::transport::Channel`, used by
//! `HealthClient`. Transport errors (server gone, connection refused) count as failures;
//! gRPC error statuses arrive as ordinary HTTP responses and do not, so a rate-limited
//! client does not trip its own breaker. When the breaker is open, calls fail at once with
//! `Code::Unavailable` whose `source()` is the `CircuitOpen` (see [`circuit_open`]).
//!
//! Run it with `cargo run --example tonic_layers`: it starts the server on a free port,
//! checks health until the rate limit bites, stops the server, and shows the breaker open.

use std::{future::Future, net::IpAddr, net::SocketAddr, sync::Arc, time::Duration};

use resilience::{
    key::key_fn, retry_after_secs, BoxError, Burst, CircuitBreaker, CircuitBreakerLayer,
    CircuitOpen, Rate, RateLimited, TokenBucketLayer,
};
use tokio::net::TcpListener;
use tonic::{
    body::Body,
    metadata::MetadataValue,
    transport::{
        server::{TcpConnectInfo, TcpIncoming},
        Channel, Endpoint, Server,
    },
    Code, Status,
};
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
use tower::{util::BoxCloneService, ServiceBuilder};

/// The guarded client transport: `Channel` behind the breaker, boxed to keep the type short.
pub type GuardedChannel = BoxCloneService<http::Request<Body>, http::Response<Body>, BoxError>;

/// Serves `grpc.health.v1.Health` (overall status `SERVING`) on `listener`, rate limited per
/// client IP, until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    rate_per_sec: f64,
    burst: u32,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let (_reporter, health) = tonic_health::server::health_reporter();

    let peer_ip = key_fn(|req: &http::Request<Body>| -> Option<IpAddr> {
        let info = req.extensions().get::<TcpConnectInfo>()?;
        Some(info.remote_addr()?.ip())
    })
    .missing("peer address (tonic's TcpConnectInfo) in request extensions");
    let rate_limit = ServiceBuilder::new().map_err(rejection_to_status).layer(
        TokenBucketLayer::builder(Rate::per_second(rate_per_sec), Burst(burst))
            .key(peer_ip)
            .build(),
    );

    Server::builder()
        .layer(rate_limit)
        .add_service(health)
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), shutdown)
        .await
}

/// The gRPC form of the token bucket's errors.
fn rejection_to_status(err: BoxError) -> Status {
    match err.downcast::<RateLimited>() {
        Ok(limited) => {
            let mut status = Status::resource_exhausted(limited.to_string());
            // gRPC has no Retry-After header; the same value in metadata lets a client wait
            // exactly as long. Whole seconds, rounded up, as in HTTP.
            let secs = retry_after_secs(limited.retry_after);
            status
                .metadata_mut()
                .insert("retry-after", MetadataValue::from(secs));
            status
        }
        // The only other error is a missing key: no peer address, a server bug.
        Err(err) => Status::internal(err.to_string()),
    }
}

/// Connects to `addr` and returns a health client whose channel is behind `breaker`.
pub async fn connect(
    addr: SocketAddr,
    breaker: CircuitBreaker,
) -> Result<HealthClient<GuardedChannel>, tonic::transport::Error> {
    let channel: Channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(2))
        .connect()
        .await?;
    let guarded = ServiceBuilder::new()
        .map_err(open_to_status)
        .layer(CircuitBreakerLayer::new(breaker))
        .service(channel);
    Ok(HealthClient::new(BoxCloneService::new(guarded)))
}

/// Without this, tonic reports a `CircuitOpen` as `Code::Unknown`. As a `Status` it is
/// `Unavailable` (what gRPC clients retry on) and still carries the `CircuitOpen` as its
/// source; any other error passes through for tonic to classify as usual.
fn open_to_status(err: BoxError) -> BoxError {
    match err.downcast::<CircuitOpen>() {
        Ok(open) => {
            let mut status = Status::unavailable(open.to_string());
            status.set_source(Arc::new(*open));
            Box::new(status)
        }
        Err(err) => err,
    }
}

/// The `CircuitOpen` behind a failed call, if the breaker rejected it.
pub fn circuit_open(status: &Status) -> Option<&CircuitOpen> {
    let mut source = std::error::Error::source(status);
    while let Some(err) = source {
        if let Some(open) = err.downcast_ref::<CircuitOpen>() {
            return Some(open);
        }
        source = err.source();
    }
    None
}

/// One health check of the overall server status ("").
pub async fn check(client: &mut HealthClient<GuardedChannel>) -> Result<i32, Status> {
    let request = HealthCheckRequest {
        service: String::new(),
    };
    Ok(client.check(request).await?.into_inner().status)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    println!("health server on http://{addr}: 1 check/s per client IP, burst 3");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, 1.0, 3, async {
        let _ = stopped.await;
    }));

    let breaker = CircuitBreaker::builder()
        .consecutive_failures(3)
        .open_for(Duration::from_secs(30))
        .on_state_change(|t| println!("  [breaker] {} -> {}", t.from, t.to))
        .build();
    let mut client = connect(addr, breaker.clone()).await?;

    println!("\n5 health checks in a row:");
    for i in 1..=5 {
        match check(&mut client).await {
            Ok(status) => println!("  #{i} ok, status {status} (1 = SERVING)"),
            Err(status) => println!(
                "  #{i} {:?}: {} (retry-after: {:?})",
                status.code(),
                status.message(),
                status.metadata().get("retry-after")
            ),
        }
    }

    println!("\nstopping the server, then 5 more checks:");
    let _ = stop.send(());
    server.await??;
    for i in 1..=5 {
        match check(&mut client).await {
            Ok(status) => println!("  #{i} ok, status {status}"),
            Err(status) if circuit_open(&status).is_some() => {
                println!("  #{i} rejected by the breaker: {}", status.message())
            }
            Err(status) if status.code() == Code::Unavailable => {
                println!("  #{i} transport error: {}", status.message())
            }
            Err(status) => println!("  #{i} {:?}: {}", status.code(), status.message()),
        }
    }
    println!("\nbreaker stats: {:?}", breaker.stats());
    Ok(())
}
