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
//! | `presence_store_errors_total` | counter | `kind` = `unavailable` / `refused` / `timeout` / `circuit_open` |
//! | `presence_online_nodes` | gauge | |
//! | `presence_store_circuit_state` | gauge | 0 closed, 1 half-open, 2 open: the worst of the shards' breakers (one per shard) |
//! | `presence_watchers` | gauge | |
//! | `presence_watch_events_total` | counter | `type` = `snapshot` / `join` / `update` / `leave` |
//! | `presence_watchers_dropped_slow_total` | counter | |
//! | `presence_watch_sweep_lag_seconds` | gauge | how late the last expiry sweep reported its latest expiry |
//!
//! `route` is the route template (`/presence/{node_id}`, never the raw path) and
//! `unmatched` for unknown paths, so a scanner cannot blow up the label cardinality.
//! `presence_online_nodes` is set whenever `GET /presence` lists the nodes: it costs
//! nothing extra, and a scrape must not trigger a full listing of a large store.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::{Registry, Unit};
use tower::{Layer, Service};

use super::edge::X_REQUEST_ID;
use super::routes::{Resolved, LABELS};
use super::{RequestBody, ResponseBody};

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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    r#type: &'static str,
}

/// The watch event types, in [`Metrics::watch_event_sent`] order.
pub(crate) const WATCH_EVENTS: [&str; 4] = ["snapshot", "join", "update", "leave"];

/// Why a store call failed, as counted by `presence_store_errors_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreErrorKind {
    /// The store answered with an error.
    Unavailable,
    /// The store is up but refused a write (out of memory, read-only).
    Refused,
    /// The store did not answer within `PRESENCE_STORE_TIMEOUT_MS`.
    Timeout,
    /// The circuit breaker rejected the call without asking the store.
    CircuitOpen,
}

type HistogramFamily = Family<RouteLabels, LatencyHistogram, fn() -> LatencyHistogram>;

/// Upper bounds of the latency buckets, in seconds: 0.5 ms .. ~8 s (in-memory calls
/// land in the first buckets, a Redis that times out, by default after 1 s, in the
/// last ones).
fn latency_bounds() -> [f64; LATENCY_BUCKETS] {
    std::array::from_fn(|i| 0.0005 * f64::powi(2.0, i32::try_from(i).unwrap_or(i32::MAX)))
}

const LATENCY_BUCKETS: usize = 15;

/// A request-latency histogram that records with three atomic additions and no lock
/// (`prometheus_client`'s `Histogram` takes a write lock per observation, which every
/// request on every core would contend for). Encoded exactly like that `Histogram`.
#[derive(Clone, Debug)]
pub(crate) struct LatencyHistogram(Arc<LatencyCells>);

#[derive(Debug)]
struct LatencyCells {
    bounds: [f64; LATENCY_BUCKETS],
    /// Observations per bucket (not cumulative); the last one is `+Inf`.
    counts: [AtomicU64; LATENCY_BUCKETS + 1],
    sum_nanos: AtomicU64,
}

impl LatencyHistogram {
    fn new() -> Self {
        LatencyHistogram(Arc::new(LatencyCells {
            bounds: latency_bounds(),
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_nanos: AtomicU64::new(0),
        }))
    }

    fn observe(&self, elapsed: std::time::Duration) {
        let cells = &*self.0;
        let secs = elapsed.as_secs_f64();
        let bucket = cells
            .bounds
            .iter()
            .position(|&bound| secs <= bound)
            .unwrap_or(LATENCY_BUCKETS);
        cells.counts[bucket].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        cells.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let cells = &*self.0;
        let mut buckets = [(0.0, 0); LATENCY_BUCKETS + 1];
        for (i, bucket) in buckets.iter_mut().enumerate() {
            // The encoder writes `f64::MAX` as `+Inf`.
            let bound = cells.bounds.get(i).copied().unwrap_or(f64::MAX);
            *bucket = (bound, cells.counts[i].load(Ordering::Relaxed));
        }
        let count = buckets.iter().map(|&(_, n)| n).sum();
        // Nanoseconds to seconds: exact to the nanosecond for 104 days of latency.
        #[allow(clippy::cast_precision_loss)]
        let sum = cells.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Every method label, in the order of [`method_index`].
const METHODS: [&str; 8] = [
    "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "other",
];

/// The statuses the server answers with, in the order of [`status_index`]; a
/// request counter for any other status is looked up in the family.
const STATUSES: [u16; 14] = [
    200, 400, 401, 404, 405, 408, 409, 413, 415, 422, 429, 500, 503, 504,
];

fn method_index(method: &str) -> Option<usize> {
    METHODS.iter().position(|m| *m == method)
}

fn status_index(status: u16) -> Option<usize> {
    STATUSES.iter().position(|s| *s == status)
}

/// A random `u64` with the low 32 bits clear: request ids count up from it. Without
/// randomness ids are still unique within the process.
fn random_high_half() -> u64 {
    let mut bytes = [0u8; 4];
    let _ = getrandom::fill(&mut bytes);
    u64::from(u32::from_le_bytes(bytes)) << 32
}

/// The server's metrics registry. Cheap to share (`Arc` inside each metric); one per
/// [`PresenceService`](super::PresenceService).
///
/// Recording a request touches no lock: the counter of each route, method and
/// status the server can answer with, and the histogram of each route, are taken
/// from their families once (lazily) and kept in tables.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_counters: Box<[OnceLock<Counter>]>,
    latency: HistogramFamily,
    latency_by_route: Box<[LatencyHistogram]>,
    rate_limited: Counter,
    rate_limit_fallbacks: Counter,
    store_errors: Family<StoreErrorLabels, Counter>,
    online_nodes: Gauge,
    circuit_state: Gauge,
    watchers: Gauge,
    /// One counter per [`WATCH_EVENTS`] type.
    watch_events: [Counter; WATCH_EVENTS.len()],
    watchers_dropped_slow: Counter,
    sweep_lag: Gauge<f64, AtomicU64>,
    /// The next request id: a random high half per process (ids from several
    /// servers do not collide), a counter below it.
    next_request_id: AtomicU64,
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
            Family::new_with_constructor(LatencyHistogram::new as fn() -> LatencyHistogram);
        // Series appear on first use, as with the family alone.
        let request_counters = (0..LABELS.len() * METHODS.len() * STATUSES.len())
            .map(|_| OnceLock::new())
            .collect();
        let latency_by_route = LABELS
            .iter()
            .map(|&route| latency.get_or_create_owned(&RouteLabels { route }))
            .collect();
        let rate_limited = Counter::default();
        let rate_limit_fallbacks = Counter::default();
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
            "rate_limit_fallbacks",
            "Rate-limit decisions made with this server's own buckets because the shared ones in Redis did not answer in time (PRESENCE_RATE_LIMIT_SCOPE=shared)",
            rate_limit_fallbacks.clone(),
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
            "Store circuit breaker, the worst shard's: 0 closed, 1 half-open, 2 open",
            circuit_state.clone(),
        );
        let watchers = Gauge::default();
        let events = Family::<EventLabels, Counter>::default();
        let watch_events =
            WATCH_EVENTS.map(|r#type| events.get_or_create_owned(&EventLabels { r#type }));
        let watchers_dropped_slow = Counter::default();
        let sweep_lag = Gauge::<f64, AtomicU64>::default();
        registry.register("watchers", "Open watch streams", watchers.clone());
        registry.register(
            "watch_events",
            "Events sent to watchers, by type (snapshot, join, update, leave)",
            events,
        );
        registry.register(
            "watchers_dropped_slow",
            "Watchers disconnected because their backlog was full",
            watchers_dropped_slow.clone(),
        );
        registry.register_with_unit(
            "watch_sweep_lag",
            "How long after its expiry the last sweep reported its latest expiry",
            Unit::Seconds,
            sweep_lag.clone(),
        );
        Metrics {
            registry,
            watchers,
            watch_events,
            watchers_dropped_slow,
            sweep_lag,
            requests,
            request_counters,
            latency,
            latency_by_route,
            rate_limited,
            rate_limit_fallbacks,
            store_errors,
            online_nodes,
            circuit_state,
            next_request_id: AtomicU64::new(random_high_half()),
        }
    }

    /// Counts `n` more rate-limit decisions made locally instead of in Redis.
    pub(crate) fn rate_limit_fell_back(&self, n: u64) {
        self.rate_limit_fallbacks.inc_by(n);
    }

    /// A new request id.
    fn request_id(&self) -> http::HeaderValue {
        http::HeaderValue::from(self.next_request_id.fetch_add(1, Ordering::Relaxed))
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
        route_at: usize,
        method: &'static str,
        status: http::StatusCode,
        elapsed: std::time::Duration,
    ) {
        let route = LABELS.get(route_at).copied().unwrap_or("unmatched");
        let labels = RequestLabels {
            route,
            method,
            status: status.as_u16(),
        };
        let slot = match (method_index(method), status_index(labels.status)) {
            (Some(m), Some(s)) => self
                .request_counters
                .get((route_at * METHODS.len() + m) * STATUSES.len() + s),
            _ => None,
        };
        match slot {
            Some(slot) => slot
                .get_or_init(|| self.requests.get_or_create_owned(&labels))
                .inc(),
            None => self.requests.get_or_create(&labels).inc(),
        };
        match self.latency_by_route.get(route_at) {
            Some(histogram) => histogram.observe(elapsed),
            None => self
                .latency
                .get_or_create(&RouteLabels { route })
                .observe(elapsed),
        }
        if status == http::StatusCode::TOO_MANY_REQUESTS {
            self.rate_limited.inc();
        }
    }

    pub(crate) fn record_store_error(&self, kind: StoreErrorKind) {
        let kind = match kind {
            StoreErrorKind::Unavailable => "unavailable",
            StoreErrorKind::Refused => "refused",
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

    pub(crate) fn watcher_opened(&self) {
        self.watchers.inc();
    }

    pub(crate) fn watcher_closed(&self) {
        self.watchers.dec();
    }

    /// Counts one event of [`WATCH_EVENTS`] type `index` sent to a watcher.
    pub(crate) fn watch_event_sent(&self, index: usize) {
        if let Some(counter) = self.watch_events.get(index) {
            counter.inc();
        }
    }

    pub(crate) fn watcher_dropped_slow(&self) {
        self.watchers_dropped_slow.inc();
    }

    pub(crate) fn set_sweep_lag_ms(&self, ms: u64) {
        #[allow(clippy::cast_precision_loss)]
        self.sweep_lag.set(ms as f64 / 1000.0);
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
/// request that passes through it, and logs each request at `debug` (target
/// `presence::server::metrics`): method, route template, status, latency. A `500` is
/// logged at `error`.
///
/// This is also the server's request log: the route, status and latency are at hand
/// here, and `tower_http`'s `TraceLayer` would wrap (and the stack re-box) every
/// response body to log the same thing.
///
/// And it keeps the request id: the client's `x-request-id`, or a new one (a
/// per-process random high half and a counter), named in the log line and sent back
/// on the response. tower-http's `SetRequestId` + `PropagateRequestId` did the same
/// for 0.41 µs more per in-process heartbeat (2.17 vs 1.76 µs in one run of
/// `cargo bench -p presence --bench service`): they store the id in the request's
/// headers and extensions and copy it back, where this makes one header value.
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

impl<S> Service<http::Request<RequestBody>> for MetricsService<S>
where
    S: Service<
        http::Request<RequestBody>,
        Response = http::Response<ResponseBody>,
        Error = Infallible,
    >,
{
    type Response = http::Response<ResponseBody>;
    type Error = Infallible;
    type Future = MetricsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<RequestBody>) -> Self::Future {
        // The one resolution of the request: the layers after this one read it from
        // the body, which carries it for free (an extension would cost a map insert
        // and a lookup per layer: about 200 instructions of every heartbeat).
        let resolved = Resolved::of(req.method(), req.uri().path());
        req.body_mut().set_resolved(resolved);
        let method = method_label(req.method());
        // The client's id (a cheap clone: shared bytes), or a new one.
        let request_id = match req.headers().get(X_REQUEST_ID) {
            Some(id) => id.clone(),
            None => self.metrics.request_id(),
        };
        MetricsFuture {
            request_id: Some(request_id),
            start: tokio::time::Instant::now(),
            inner: self.inner.call(req),
            metrics: self.metrics.clone(),
            route: resolved.label_index(),
            method,
        }
    }
}

pin_project_lite::pin_project! {
    /// Response future of [`MetricsService`]: records the request when the response
    /// head is ready.
    pub struct MetricsFuture<F> {
        #[pin]
        inner: F,
        metrics: Arc<Metrics>,
        route: usize,
        method: &'static str,
        request_id: Option<http::HeaderValue>,
        start: tokio::time::Instant,
    }
}

impl<F> Future for MetricsFuture<F>
where
    F: Future<Output = Result<http::Response<ResponseBody>, Infallible>>,
{
    type Output = Result<http::Response<ResponseBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = std::task::ready!(this.inner.poll(cx))?;
        let elapsed = this.start.elapsed();
        let status = response.status();
        this.metrics
            .record_request(*this.route, this.method, status, elapsed);
        let route = LABELS.get(*this.route).copied().unwrap_or("unmatched");
        let request_id = this.request_id.take();
        let shown = request_id
            .as_ref()
            .and_then(|id| id.to_str().ok())
            .unwrap_or("-");
        if status == http::StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(
                method = this.method,
                route,
                status = status.as_u16(),
                request_id = shown,
                ?elapsed,
                "request failed"
            );
        } else {
            tracing::debug!(
                method = this.method,
                route,
                status = status.as_u16(),
                request_id = shown,
                ?elapsed,
                "request"
            );
        }
        if let Some(id) = request_id {
            response.headers_mut().insert(X_REQUEST_ID, id);
        }
        Poll::Ready(Ok(response))
    }
}
