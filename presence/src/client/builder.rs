//! [`PresenceClientBuilder`]: transport, auth and the resilience stack of a client.
//!
//! ```no_run
//! # fn main() -> Result<(), presence::client::ClientError> {
//! use std::time::Duration;
//! use presence::client::PresenceClient;
//! use resilience::CircuitBreaker;
//!
//! let breaker = CircuitBreaker::builder()
//!     .consecutive_failures(3)
//!     .open_for(Duration::from_secs(2))
//!     .build();
//! let pc = PresenceClient::builder("http://presence.internal:8080/presence")
//!     .bearer_token("s3cret")
//!     .timeout(Duration::from_secs(2))
//!     .rate_limit(10.0, 20)
//!     .retry(4, Duration::from_millis(50))
//!     .breaker(breaker.clone())
//!     .build()?;
//! // `breaker` is the client's breaker: its state and counters can be exported.
//! println!("{}", breaker.state());
//!
//! // HTTPS: the system's roots verify the server; a private CA is added by PEM.
//! let ca_pem = std::fs::read("/etc/presence/ca.pem").expect("the CA file");
//! let pc = PresenceClient::builder("https://presence.internal:8443/presence")
//!     .tls_ca_pem(ca_pem)
//!     .build()?;
//! # Ok(()) }
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;
use http_body::Body;
use resilience::{
    BoxError, Burst, CircuitBreaker, CircuitBreakerLayer, HttpClassifier, Rate, RetryLayer,
    TokenBucketLayer,
};
use tower::timeout::TimeoutLayer;
use tower::util::BoxCloneService;
use tower::{Layer, Service, ServiceBuilder};

use super::retry::{ClientRetryPolicy, RetryConfig};
use super::transport::{self, ClientRequest, HttpService, RawService};
use super::watch::WatchSettings;
use super::{ClientError, PresenceClient};

/// Builds a [`PresenceClient`]; made by [`PresenceClient::builder`].
///
/// The stack, outermost first: token bucket in wait mode (one global bucket) ->
/// circuit breaker (an `Err` or a `5xx` counts as a failure) -> retry
/// (`resilience`'s `RetryLayer` with one retry budget per client; idempotent calls
/// only, see [`RetryConfig`]) -> timeout per attempt -> transport. The breaker
/// sits outside the retry, so one call that exhausts its retries counts once, and an
/// open breaker stops a call before any attempt; the limiter sits outside both, so a
/// burst waits instead of tripping anything.
pub struct PresenceClientBuilder {
    base_url: String,
    transport: Option<RawService>,
    bearer_token: Option<TokenSource>,
    timeout: Duration,
    rate_limit: Option<(f64, u32)>,
    rate_limit_max_wait: Duration,
    retry: RetryConfig,
    breaker: Option<CircuitBreaker>,
    max_response_bytes: usize,
    watch: WatchSettings,
    /// PEM CA certificates trusted besides the system's roots (https only).
    extra_ca_pem: Vec<Vec<u8>>,
}

impl PresenceClientBuilder {
    /// Default per-attempt timeout.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
    /// Default client-side rate: the server's default per-client refill, so a
    /// well-behaved client never sees the server's `429`.
    pub const DEFAULT_RATE: f64 = 30.0;
    /// Default client-side burst: the server's default per-client capacity.
    pub const DEFAULT_CAPACITY: u32 = 60;
    /// Default bound on the limiter's wait; a call that would wait longer fails with
    /// [`ClientError::RateLimited`].
    pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(10);
    /// Default bound on a response body (a list of many nodes with large meta fits).
    pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;
    /// Default base of the watch feed's reconnect backoff.
    pub const DEFAULT_WATCH_BASE_BACKOFF: Duration = Duration::from_millis(100);
    /// Default cap of the watch feed's reconnect backoff.
    pub const DEFAULT_WATCH_MAX_BACKOFF: Duration = Duration::from_secs(5);
    /// Default idle timeout of the watch feed (no byte for this long: reconnect).
    pub const DEFAULT_WATCH_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

    pub(crate) fn new(base_url: String) -> Self {
        PresenceClientBuilder {
            base_url,
            transport: None,
            bearer_token: None,
            timeout: Self::DEFAULT_TIMEOUT,
            rate_limit: Some((Self::DEFAULT_RATE, Self::DEFAULT_CAPACITY)),
            rate_limit_max_wait: Self::DEFAULT_MAX_WAIT,
            retry: RetryConfig::default(),
            breaker: None,
            max_response_bytes: Self::DEFAULT_MAX_RESPONSE_BYTES,
            watch: WatchSettings::default(),
            extra_ca_pem: Vec::new(),
        }
    }

    /// Trusts the CA certificate(s) of `pem` for `https://`, besides the system's
    /// roots: for a deployment whose certificate comes from a private CA. May be
    /// called more than once. Ignored with a transport given to
    /// [`service`](Self::service), which does its own TLS.
    pub fn tls_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.extra_ca_pem.push(pem.into());
        self
    }

    /// Sends requests through `service` instead of hyper-util's HTTP/1 client: a
    /// client with TLS, a proxy, a test double, or the presence server's own service
    /// in-process (no sockets). Any tower HTTP service fits; for the API calls its
    /// response body is read whole (under the timeout) before the layers above see
    /// it, while [`PresenceClient::watch`] reads the body of `GET /watch` as it
    /// streams (the service is type-erased once and shared by both paths).
    pub fn service<S, B>(mut self, service: S) -> Self
    where
        S: Service<ClientRequest, Response = http::Response<B>> + Clone + Send + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        self.transport = Some(transport::raw(service));
        self
    }

    /// Sends `Authorization: Bearer <token>` with every request: the server's
    /// `PRESENCE_AUTH_TOKEN`, or a JWT.
    pub fn bearer_token(mut self, token: impl Into<String>) -> Self {
        self.bearer_token = Some(TokenSource::Fixed(token.into()));
        self
    }

    /// Sends `Authorization: Bearer <fresh()>` with every request, asking `fresh` for
    /// the token each time: for JWTs that are rotated before they expire, so a
    /// long-running node (its [`keep_alive`](super::PresenceClient::keep_alive) too)
    /// carries on across the rotation. `fresh` is called once per attempt and should
    /// be cheap (return a cached token, refreshed elsewhere).
    pub fn bearer_token_fn(mut self, fresh: impl Fn() -> String + Send + Sync + 'static) -> Self {
        self.bearer_token = Some(TokenSource::Fresh(Arc::new(fresh)));
        self
    }

    /// Timeout of each attempt, body included (default
    /// [`DEFAULT_TIMEOUT`](Self::DEFAULT_TIMEOUT)). A call that retries can take up to
    /// `max_attempts` times this, plus backoff.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Client-side rate limit: `rate` requests per second, bursts of `capacity`
    /// (default [`DEFAULT_RATE`](Self::DEFAULT_RATE) /
    /// [`DEFAULT_CAPACITY`](Self::DEFAULT_CAPACITY)). Calls over the limit wait for a
    /// token rather than fail.
    pub fn rate_limit(mut self, rate: f64, capacity: u32) -> Self {
        self.rate_limit = Some((rate, capacity));
        self
    }

    /// The longest a call waits for a token (default
    /// [`DEFAULT_MAX_WAIT`](Self::DEFAULT_MAX_WAIT)); a call that would wait longer
    /// fails with [`ClientError::RateLimited`].
    pub fn rate_limit_max_wait(mut self, max_wait: Duration) -> Self {
        self.rate_limit_max_wait = max_wait;
        self
    }

    /// No client-side rate limit (e.g. a load generator that wants the server's `429`s).
    pub fn no_rate_limit(mut self) -> Self {
        self.rate_limit = None;
        self
    }

    /// Retries idempotent calls: `max_attempts` attempts in all, the first one
    /// included, with exponential backoff from `base_backoff` and full jitter (default
    /// 3 attempts from 100 ms). See [`RetryConfig`] for what is retried and why.
    pub fn retry(mut self, max_attempts: u32, base_backoff: Duration) -> Self {
        self.retry = RetryConfig::new(max_attempts, base_backoff);
        self
    }

    /// Sets the retry configuration as a whole (e.g. with a different backoff cap).
    pub fn retry_config(mut self, config: RetryConfig) -> Self {
        self.retry = config;
        self
    }

    /// Sends every call once.
    pub fn no_retry(mut self) -> Self {
        self.retry = RetryConfig::disabled();
        self
    }

    /// Uses this circuit breaker (default: [`CircuitBreaker::new`], 5 consecutive
    /// failures open it for 5 s). Keep a clone to watch its state; clients built with
    /// clones of one breaker share it.
    pub fn breaker(mut self, breaker: CircuitBreaker) -> Self {
        self.breaker = Some(breaker);
        self
    }

    /// The largest response body accepted (default
    /// [`DEFAULT_MAX_RESPONSE_BYTES`](Self::DEFAULT_MAX_RESPONSE_BYTES)); a larger one
    /// is a [`ClientError::Transport`] error.
    pub fn max_response_bytes(mut self, max: usize) -> Self {
        self.max_response_bytes = max;
        self
    }

    /// Backoff of the [watch feed](PresenceClient::watch)'s reconnects: the `n`-th
    /// reconnect in a row waits a uniformly random time in
    /// `[0, min(max, base * 2^(n-1))]` (default
    /// [`DEFAULT_WATCH_BASE_BACKOFF`](Self::DEFAULT_WATCH_BASE_BACKOFF) /
    /// [`DEFAULT_WATCH_MAX_BACKOFF`](Self::DEFAULT_WATCH_MAX_BACKOFF)); `max` is never
    /// below `base`.
    pub fn watch_backoff(mut self, base: Duration, max: Duration) -> Self {
        self.watch.base_backoff = base;
        self.watch.max_backoff = max.max(base);
        self
    }

    /// How long the [watch feed](PresenceClient::watch) waits for the next byte of
    /// the stream (an event or a `: keep-alive` comment) before it takes the
    /// connection for dead and reconnects (default
    /// [`DEFAULT_WATCH_IDLE_TIMEOUT`](Self::DEFAULT_WATCH_IDLE_TIMEOUT)); `None`
    /// waits forever. Keep it well above the server's keep-alive interval.
    pub fn watch_idle_timeout(mut self, idle: Option<Duration>) -> Self {
        self.watch.idle_timeout = idle.filter(|d| !d.is_zero());
        self
    }

    /// Builds the client.
    ///
    /// # Errors
    /// [`ClientError::InvalidInput`] for a base URL that is not an absolute `http`
    /// or `https` URL (other schemes need a transport given with
    /// [`service`](Self::service)), a [`tls_ca_pem`](Self::tls_ca_pem) without a
    /// usable certificate, a zero timeout, a rate that is not positive and
    /// finite, a zero capacity, or a bearer token that cannot be a header value.
    pub fn build(mut self) -> Result<PresenceClient, ClientError> {
        let base = parse_base_url(&self.base_url, self.transport.is_some())?;
        if self.timeout.is_zero() {
            return Err(ClientError::InvalidInput(
                "the timeout must not be zero".into(),
            ));
        }
        if let Some((rate, capacity)) = self.rate_limit {
            if !(rate.is_finite() && rate > 0.0) || capacity == 0 {
                return Err(ClientError::InvalidInput(format!(
                    "rate limit needs a positive finite rate and a capacity of at least 1 \
                     (got rate {rate}/s, capacity {capacity})"
                )));
            }
        }
        let auth = match self.bearer_token.take() {
            Some(TokenSource::Fixed(token)) => Some(BearerToken::Fixed(bearer_header(&token)?)),
            Some(TokenSource::Fresh(fresh)) => Some(BearerToken::Fresh(fresh)),
            None => None,
        };

        let raw = match self.transport {
            Some(raw) => raw,
            // Plain http keeps the plain client: no roots to load, no TLS in the way.
            None if base.starts_with("http://") => transport::raw(transport::hyper_client()),
            None => transport::raw(transport::https_client(tls_config(&self.extra_ca_pem)?)),
        };
        let transport = transport::collect(raw.clone(), self.max_response_bytes);
        let mut watch = self.watch;
        // The headers of `GET /watch` are awaited as long as any other reply's.
        watch.headers_timeout = self.timeout;
        watch.max_event_bytes = self.max_response_bytes;
        let breaker = self.breaker.unwrap_or_default();
        let core = ServiceBuilder::new()
            .layer(CircuitBreakerLayer::new(breaker.clone()).classifier(HttpClassifier))
            .layer(RetryLayer::new(ClientRetryPolicy::new(self.retry)).budget(self.retry.budget()))
            .layer(TimeoutLayer::new(self.timeout))
            .service(transport);
        let service: HttpService = match self.rate_limit {
            Some((rate, capacity)) => BoxCloneService::new(
                TokenBucketLayer::new(Rate::per_second(rate), Burst(capacity))
                    .wait(self.rate_limit_max_wait)
                    .layer(core),
            ),
            None => BoxCloneService::new(core),
        };
        Ok(PresenceClient::from_parts(
            base,
            service,
            auth,
            breaker,
            self.timeout,
            self.retry,
            self.rate_limit,
            raw,
            watch,
        ))
    }
}

impl fmt::Debug for PresenceClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PresenceClientBuilder")
            .field("base_url", &self.base_url)
            .field("custom_transport", &self.transport.is_some())
            .field(
                "bearer_token",
                &self.bearer_token.as_ref().map(|_| "<redacted>"),
            )
            .field("timeout", &self.timeout)
            .field("rate_limit", &self.rate_limit)
            .field("rate_limit_max_wait", &self.rate_limit_max_wait)
            .field("retry", &self.retry)
            .field("max_response_bytes", &self.max_response_bytes)
            .field("watch", &self.watch)
            .field("extra_ca_certificates", &self.extra_ca_pem.len())
            .finish_non_exhaustive()
    }
}

/// Checks the base URL and returns it without a trailing slash, so paths can be
/// appended as `/login`, `/{node_id}`.
fn parse_base_url(url: &str, custom_transport: bool) -> Result<String, ClientError> {
    let invalid = |why: &str| ClientError::InvalidInput(format!("base URL {url:?}: {why}"));
    let uri: http::Uri = url.parse().map_err(|e| invalid(&format!("{e}")))?;
    let scheme = uri
        .scheme_str()
        .ok_or_else(|| invalid("not absolute (no scheme)"))?;
    if uri.authority().is_none() {
        return Err(invalid("no host"));
    }
    if uri.query().is_some() {
        return Err(invalid("a query string is not allowed"));
    }
    if scheme != "http" && scheme != "https" && !custom_transport {
        return Err(invalid(
            "the built-in transport speaks http and https only; give another with .service(..)",
        ));
    }
    // Lower-cased so the transport choice in `build` needs no case games.
    let rest = &url[scheme.len()..];
    Ok(format!("{}{rest}", scheme.to_ascii_lowercase())
        .trim_end_matches('/')
        .to_owned())
}

/// The client TLS configuration of the built-in transport: the system's roots and
/// `extra_ca_pem`. No ALPN here: hyper-rustls sets it for the protocols it enables.
fn tls_config(extra_ca_pem: &[Vec<u8>]) -> Result<rustls::ClientConfig, ClientError> {
    let invalid = |why: String| ClientError::InvalidInput(format!("tls_ca_pem: {why}"));
    let mut roots = crate::tls::roots(None, true).map_err(invalid)?;
    for pem in extra_ca_pem {
        for cert in crate::tls::certificates(pem).map_err(invalid)? {
            roots
                .add(cert)
                .map_err(|e| invalid(format!("not a usable CA certificate: {e}")))?;
        }
    }
    crate::tls::client_config(roots, &[]).map_err(invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_without_a_certificate_is_refused() {
        let built = PresenceClientBuilder::new("https://h/presence".into())
            .tls_ca_pem(b"no PEM here".to_vec())
            .build();
        assert!(
            matches!(&built, Err(ClientError::InvalidInput(why)) if why.contains("tls_ca_pem")),
            "{:?}",
            built.err()
        );
    }

    #[test]
    fn base_url_is_checked_and_normalized() {
        assert_eq!(
            parse_base_url("http://h:1/presence/", false)
                .ok()
                .as_deref(),
            Some("http://h:1/presence")
        );
        assert!(parse_base_url("h:1/presence", false).is_err());
        assert!(parse_base_url("/presence", false).is_err());
        assert_eq!(
            parse_base_url("HTTPS://h/presence", false).ok().as_deref(),
            Some("https://h/presence")
        );
        assert!(parse_base_url("ftp://h/presence", false).is_err());
        assert!(parse_base_url("ftp://h/presence", true).is_ok());
        assert!(parse_base_url("http://h/presence?x=1", false).is_err());
    }
}

/// Where the builder's bearer token comes from.
enum TokenSource {
    Fixed(String),
    Fresh(Arc<dyn Fn() -> String + Send + Sync>),
}

/// The client's `Authorization` header: made once, or from a fresh token per
/// request ([`PresenceClientBuilder::bearer_token_fn`]).
#[derive(Clone)]
pub(crate) enum BearerToken {
    Fixed(HeaderValue),
    Fresh(Arc<dyn Fn() -> String + Send + Sync>),
}

impl BearerToken {
    /// The header value to send now.
    pub(crate) fn header(&self) -> Result<HeaderValue, ClientError> {
        match self {
            BearerToken::Fixed(value) => Ok(value.clone()),
            BearerToken::Fresh(fresh) => bearer_header(&fresh()),
        }
    }
}

/// `Bearer <token>`, marked sensitive (never logged by hyper or tower-http).
fn bearer_header(token: &str) -> Result<HeaderValue, ClientError> {
    let mut value = HeaderValue::try_from(format!("Bearer {token}")).map_err(|_| {
        ClientError::InvalidInput(
            "the bearer token contains characters not allowed in a header".into(),
        )
    })?;
    value.set_sensitive(true);
    Ok(value)
}
