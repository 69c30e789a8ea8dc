//! Prometheus metrics of the presence server and the layer that records the
//! per-request ones.
//!
//! Exported (OpenMetrics text, `GET /metrics`):
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `presence_http_requests_total` | counter | `route`, `method`, `status` |
//! | `presence_http_request_duration_seconds` | histogram | `route` |
//! | `presence_rate_limited_total` | counter | |
//! | `presence_store_errors_total` | counter | `kind` = `unavailable` / `timeout` / `circuit_open` |
//! | `presence_online_nodes` | gauge | |
//! | `presence_store_circuit_state` | gauge | 0 closed, 1 half-open, 2 open |
//!
//! `route` is the route template (`/presence/{node_id}`, never the raw path) and
//! `unmatched` for unknown paths, so a scanner cannot blow up the label cardinality.
//! `presence_online_nodes` is set whenever `GET /presence` lists the nodes: it costs
//! nothing extra, and a scrape must not trigger a full listing of a large store.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use tower::{Layer, Service};

use super::router::route_label;
use super::ResponseBody;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    method: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreErrorLabels {
    kind: &'static str,
}

/// Why a store call failed, as counted by `presence_store_errors_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreErrorKind {
    /// The store answered with an error.
    Unavailable,
    /// The store did not answer within `PRESENCE_STORE_TIMEOUT_MS`.
    Timeout,
    /// The circuit breaker rejected the call without asking the store.
    CircuitOpen,
}

type HistogramFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 0.5 ms .. ~8 s: in-memory calls land in the first buckets, a Redis that times
    // out (default 1 s) in the last ones.
    Histogram::new(exponential_buckets(0.0005, 2.0, 15))
}

/// The server's metrics registry. Cheap to share (`Arc` inside each metric); one per
/// [`PresenceService`](super::PresenceService).
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: HistogramFamily,
    rate_limited: Counter,
    store_errors: Family<StoreErrorLabels, Counter>,
    online_nodes: Gauge,
    circuit_state: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric registered at zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("presence");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency: HistogramFamily =
            Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        let rate_limited = Counter::default();
        let store_errors = Family::<StoreErrorLabels, Counter>::default();
        // Present from the start (at 0): an alert on `rate()` needs the series to exist
        // before the first failure.
        for kind in ["unavailable", "timeout", "circuit_open"] {
            let _zero: Counter = store_errors.get_or_create_owned(&StoreErrorLabels { kind });
        }
        let online_nodes = Gauge::default();
        let circuit_state = Gauge::default();
        registry.register(
            "http_requests",
            "HTTP requests by route template, method and status",
            requests.clone(),
        );
        registry.register_with_unit(
            "http_request_duration",
            "Time from request to response head, by route template",
            Unit::Seconds,
            latency.clone(),
        );
        registry.register(
            "rate_limited",
            "Requests rejected by the per-client token bucket (429)",
            rate_limited.clone(),
        );
        registry.register(
            "store_errors",
            "Failed store calls by kind (unavailable, timeout, circuit_open)",
            store_errors.clone(),
        );
        registry.register(
            "online_nodes",
            "Online nodes as of the last GET /presence",
            online_nodes.clone(),
        );
        registry.register(
            "store_circuit_state",
            "Store circuit breaker: 0 closed, 1 half-open, 2 open",
            circuit_state.clone(),
        );
        Metrics {
            registry,
            requests,
            latency,
            rate_limited,
            store_errors,
            online_nodes,
            circuit_state,
        }
    }

    /// The registry in OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail; an encoder error would be a bug in a
        // metric type, and a partial scrape is better than none.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }

    pub(crate) fn record_request(
        &self,
        route: &'static str,
        method: &'static str,
        status: http::StatusCode,
        elapsed: std::time::Duration,
    ) {
        self.requests
            .get_or_create(&RequestLabels {
                route,
                method,
                status: status.as_u16(),
            })
            .inc();
        self.latency
            .get_or_create(&RouteLabels { route })
            .observe(elapsed.as_secs_f64());
        if status == http::StatusCode::TOO_MANY_REQUESTS {
            self.rate_limited.inc();
        }
    }

    pub(crate) fn record_store_error(&self, kind: StoreErrorKind) {
        let kind = match kind {
            StoreErrorKind::Unavailable => "unavailable",
            StoreErrorKind::Timeout => "timeout",
            StoreErrorKind::CircuitOpen => "circuit_open",
        };
        self.store_errors
            .get_or_create(&StoreErrorLabels { kind })
            .inc();
    }

    pub(crate) fn set_online_nodes(&self, n: usize) {
        self.online_nodes.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub(crate) fn set_circuit_state(&self, state: i64) {
        self.circuit_state.set(state);
    }
}

/// Methods as metric labels: the known ones by name, everything else as `other`, so
/// arbitrary extension methods cannot create label values.
fn method_label(method: &http::Method) -> &'static str {
    match *method {
        http::Method::GET => "GET",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::DELETE => "DELETE",
        http::Method::HEAD => "HEAD",
        http::Method::OPTIONS => "OPTIONS",
        http::Method::PATCH => "PATCH",
        _ => "other",
    }
}

/// Records `presence_http_requests_total` and the latency histogram for every
/// request that passes through it.
#[derive(Clone, Debug)]
pub struct MetricsLayer {
    metrics: Arc<Metrics>,
}

impl MetricsLayer {
    /// A layer recording into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        MetricsLayer { metrics }
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        MetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service of [`MetricsLayer`].
#[derive(Clone, Debug)]
pub struct MetricsService<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B> Service<http::Request<B>> for MetricsService<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResponseBody>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<ResponseBody>;
    type Error = Infallible;
    type Future =
        Pin<Box<dyn Future<Output = Result<http::Response<ResponseBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let route = route_label(req.method(), req.uri().path());
        let method = method_label(req.method());
        let metrics = self.metrics.clone();
        let start = tokio::time::Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let response = fut.await?;
            metrics.record_request(route, method, response.status(), start.elapsed());
            Ok(response)
        })
    }
}
