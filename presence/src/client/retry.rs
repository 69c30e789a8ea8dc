//! Retry with capped exponential backoff and full jitter, for idempotent calls only.
//!
//! ```
//! use std::time::Duration;
//! use presence::client::RetryConfig;
//!
//! // Three attempts in all; the n-th retry waits a uniformly random time in
//! // [0, min(max_backoff, base * 2^(n-1))].
//! let cfg = RetryConfig::new(3, Duration::from_millis(100));
//! assert_eq!(cfg.max_attempts(), 3);
//! assert_eq!(cfg.max_backoff(), Duration::from_secs(2));
//! ```
//!
//! # Which calls are retried
//!
//! A retry is only safe when doing the call twice has the same effect as doing it
//! once, because a failed attempt may well have reached the server (the reply was
//! lost, or came after the timeout).
//!
//! * `list_nodes` and `get_node` read: retried.
//! * `heartbeat` carries the current lease and only pushes `expires_at_ms` forward
//!   (and sets the same `meta` again): applying it twice equals applying it once, so
//!   it is retried.
//! * `logout` carries the lease too; a repeat after an applied logout answers
//!   `removed: false` instead of `true`, and changes nothing on the server. It is
//!   retried; the only cost is that `removed` may under-report.
//! * `login` is **not** retried: each login issues a new lease and restarts
//!   `online_since`. If an attempt was applied but its reply lost, a retry would
//!   issue a second lease, and if another process with the same node id logged in
//!   in between, the retry would silently take its lease away. A failed login is
//!   returned to the caller, who knows whether taking over is intended
//!   (`heartbeat` and `keep_alive` do log in again, once, on `404`).
//!
//! Only failures that say nothing about the request itself are retried: transport
//! errors, per-attempt timeouts, and `502`/`503`/`504`. Never a `4xx` (the request
//! is wrong, repeating it does not help), never another `5xx` (a `500` is likely a
//! bug that repeats), never the client's own `CircuitOpen` / `RateLimited`. A `503`
//! whose `Retry-After` is longer than `max_backoff` is returned at once instead of
//! being retried against a server that said it needs longer; a shorter one is waited
//! (or the jittered backoff, if that is longer).
//!
//! # The budget
//!
//! The retries run in `resilience`'s [`RetryLayer`](resilience::RetryLayer), within one
//! [`RetryBudget`] per client: 20 % of its calls
//! ([`BUDGET_RATIO`](RetryConfig::BUDGET_RATIO)) plus 10 retries per second
//! ([`BUDGET_MIN_PER_SEC`](RetryConfig::BUDGET_MIN_PER_SEC)) over 10 s, and a
//! start-up allowance of [`BUDGET_INITIAL`](RetryConfig::BUDGET_INITIAL) retries, so
//! a node whose first calls at boot meet a server that is still starting retries them
//! (the budget's floor starts empty). So, over the client's life,
//! `retries ≤ 0.2 × calls + 10 × seconds + 10`: a fleet of clients cannot multiply the
//! load of a struggling server by `max_attempts`.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::StatusCode;
use resilience::retry::{Action, Refused, RetryBudget, RetryPolicy};
use resilience::{BoxError, CircuitOpen, RateLimited};

use super::transport::{ClientRequest, ClientResponse};

/// Marks a request as safe to repeat; requests without it are sent once.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Idempotent;

/// How the client retries idempotent calls (see the [module docs](self)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryConfig {
    max_attempts: u32,
    base_backoff: Duration,
    max_backoff: Duration,
}

impl RetryConfig {
    /// Default number of attempts, the first one included.
    pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
    /// Default base of the exponential backoff.
    pub const DEFAULT_BASE_BACKOFF: Duration = Duration::from_millis(100);
    /// Default cap of the exponential backoff.
    pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(2);

    /// `max_attempts` attempts in all (the first one included; `0` is read as `1`),
    /// backoff doubling from `base_backoff`, capped at
    /// [`DEFAULT_MAX_BACKOFF`](Self::DEFAULT_MAX_BACKOFF) or `base_backoff`, whichever
    /// is larger.
    pub fn new(max_attempts: u32, base_backoff: Duration) -> RetryConfig {
        RetryConfig {
            max_attempts: max_attempts.max(1),
            base_backoff,
            max_backoff: Self::DEFAULT_MAX_BACKOFF.max(base_backoff),
        }
    }

    /// No retries: every call is sent once.
    pub fn disabled() -> RetryConfig {
        RetryConfig::new(1, Duration::ZERO)
    }

    /// Sets the cap of the backoff (never below the base).
    pub fn with_max_backoff(mut self, max_backoff: Duration) -> RetryConfig {
        self.max_backoff = max_backoff.max(self.base_backoff);
        self
    }

    /// Attempts in all, the first one included.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The base of the exponential backoff.
    pub fn base_backoff(&self) -> Duration {
        self.base_backoff
    }

    /// The cap of the exponential backoff.
    pub fn max_backoff(&self) -> Duration {
        self.max_backoff
    }

    /// The upper bound of the wait before retry number `retry` (1-based):
    /// `min(max_backoff, base * 2^(retry-1))`.
    pub fn backoff_ceiling(&self, retry: u32) -> Duration {
        let factor = 1u32
            .checked_shl(retry.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.base_backoff
            .checked_mul(factor)
            .unwrap_or(self.max_backoff)
            .min(self.max_backoff)
    }
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig::new(Self::DEFAULT_MAX_ATTEMPTS, Self::DEFAULT_BASE_BACKOFF)
    }
}

impl RetryConfig {
    /// The share of calls the client's retry budget lets be retried: 20 %.
    pub const BUDGET_RATIO: f64 = 0.2;
    /// The retries per second the client's budget allows whatever the traffic: 10.
    pub const BUDGET_MIN_PER_SEC: f64 = 10.0;
    /// The client's start-up allowance of retries: 10.
    pub const BUDGET_INITIAL: u32 = 10;

    /// The retry budget of one client with this configuration.
    pub(crate) fn budget(&self) -> RetryBudget {
        RetryBudget::builder()
            .ratio(Self::BUDGET_RATIO)
            .min_per_sec(Self::BUDGET_MIN_PER_SEC)
            .initial(Self::BUDGET_INITIAL)
            .build()
    }
}

/// The client's policy for `resilience`'s [`RetryLayer`](resilience::RetryLayer): what
/// is retried and how long to wait (see the [module docs](self)).
#[derive(Clone, Debug)]
pub(crate) struct ClientRetryPolicy {
    config: RetryConfig,
}

impl ClientRetryPolicy {
    pub(crate) fn new(config: RetryConfig) -> ClientRetryPolicy {
        ClientRetryPolicy { config }
    }
}

fn retryable_status(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
    )
}

fn retryable_error(e: &BoxError) -> bool {
    // Only reachable with a custom stack below the retry layer, but a rejection by a
    // breaker or limiter must never be hammered.
    !(e.is::<CircuitOpen>() || e.is::<RateLimited>())
}

impl RetryPolicy<ClientRequest, ClientResponse, BoxError> for ClientRetryPolicy {
    fn retry(&self, result: &Result<ClientResponse, BoxError>, attempts: u32) -> Action {
        let server_wait = match result {
            Ok(response) if retryable_status(response.status()) => {
                super::error::retry_after(response.headers())
            }
            Ok(_) => return Action::Stop,
            Err(e) if retryable_error(e) => None,
            Err(_) => return Action::Stop,
        };
        if attempts >= self.config.max_attempts {
            return Action::Stop;
        }
        if server_wait.is_some_and(|w| w > self.config.max_backoff) {
            return Action::Stop;
        }
        // `attempts` is 1 after the first call: retry number `attempts` comes next.
        let jittered = full_jitter(self.config.backoff_ceiling(attempts));
        let after = server_wait.map_or(jittered, |w| w.max(jittered));
        tracing::debug!(
            attempt = attempts + 1,
            delay_ms = after.as_millis() as u64,
            outcome = %match result {
                Ok(r) => r.status().to_string(),
                Err(e) => e.to_string(),
            },
            "presence client: retrying"
        );
        Action::Retry { after }
    }

    fn clone_request(&self, req: &ClientRequest) -> Result<ClientRequest, Refused> {
        if self.config.max_attempts <= 1 {
            return Err(Refused::new("retries are disabled"));
        }
        // The mark, not the method: heartbeat and logout are POSTs, and idempotent.
        if req.extensions().get::<Idempotent>().is_none() {
            return Err(Refused::new("the call is not idempotent"));
        }
        Ok(req.clone())
    }
}

/// A uniformly random duration in `[0, ceiling]` ("full jitter").
pub(crate) fn full_jitter(ceiling: Duration) -> Duration {
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    if nanos == 0 {
        return Duration::ZERO;
    }
    Duration::from_nanos(random_u64() % nanos.saturating_add(1))
}

/// `base` scaled by a random factor in `[1 - spread, 1 + spread]`.
pub(crate) fn spread(base: Duration, spread: f64) -> Duration {
    let unit = (random_u64() >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
    base.mul_f64(1.0 - spread + 2.0 * spread * unit)
}

/// Cheap, unpredictable-enough randomness for jitter: SipHash keyed by std's
/// per-process random keys, over a counter. Jitter only has to decorrelate clients,
/// so no crate and no system call per draw.
pub(crate) fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let cfg = RetryConfig::new(10, Duration::from_millis(100));
        assert_eq!(cfg.backoff_ceiling(1), Duration::from_millis(100));
        assert_eq!(cfg.backoff_ceiling(2), Duration::from_millis(200));
        assert_eq!(cfg.backoff_ceiling(3), Duration::from_millis(400));
        assert_eq!(cfg.backoff_ceiling(6), Duration::from_secs(2));
        assert_eq!(cfg.backoff_ceiling(100), Duration::from_secs(2));
    }

    #[test]
    fn jitter_stays_in_bounds_and_varies() {
        let ceiling = Duration::from_millis(100);
        let draws: Vec<Duration> = (0..200).map(|_| full_jitter(ceiling)).collect();
        assert!(draws.iter().all(|d| *d <= ceiling));
        assert!(draws.iter().any(|d| *d != draws[0]));
        for _ in 0..200 {
            let d = spread(Duration::from_secs(1), 0.1);
            assert!(d >= Duration::from_millis(900) && d <= Duration::from_millis(1100));
        }
        assert_eq!(full_jitter(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn zero_attempts_means_one() {
        assert_eq!(RetryConfig::new(0, Duration::ZERO).max_attempts(), 1);
    }
}
