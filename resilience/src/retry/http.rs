//! [`HttpRetryPolicy`]: the ready policy for `http::Request` / `http::Response` services,
//! and [`ReplayBody`], the bodies it can send twice.

use std::{
    cell::Cell,
    collections::hash_map::RandomState,
    hash::{BuildHasher, Hasher},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, SystemTime},
};

use bytes::Buf;
use http::{header, HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, combinators::UnsyncBoxBody, Empty, Full};

use super::policy::{Action, Refused, RetryPolicy};

/// Attempts in all (the first call included) unless [`HttpRetryPolicy::max_attempts`]
/// sets another: 3.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// The base of the backoff unless [`HttpRetryPolicy::backoff`] sets another: 100 ms.
pub const DEFAULT_BASE: Duration = Duration::from_millis(100);
/// The cap of the backoff unless [`HttpRetryPolicy::backoff`] sets another: 5 s.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(5);
/// The cap on a `Retry-After` unless [`HttpRetryPolicy::max_retry_after`] sets another:
/// 30 s.
pub const DEFAULT_MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

/// A request body that can be sent again: [`replay`](Self::replay) makes a fresh copy,
/// or says it cannot (`None`).
///
/// The rule of [`HttpRetryPolicy`]: a request is retried only if its body replays.
/// Bodies held in memory do: [`Full`] over a `Clone` buffer (`Full<Bytes>`, the usual
/// client body), [`Empty`] and `String`. Streams do not: [`BoxBody`] and
/// [`UnsyncBoxBody`] (and, with the `axum` feature, `axum::body::Body`) return `None`,
/// so requests with them are sent once, and a retry that was wanted is logged with
/// `tracing::debug!` ("request body cannot be replayed"). Implement it for your own
/// body types; a body that is `Clone` replays with `Some(self.clone())`.
pub trait ReplayBody: Sized {
    /// A copy of the body to send again, or `None` if it cannot be replayed.
    fn replay(&self) -> Option<Self>;
}

impl<D: Buf + Clone> ReplayBody for Full<D> {
    #[inline]
    fn replay(&self) -> Option<Self> {
        Some(self.clone())
    }
}

impl<D: Buf> ReplayBody for Empty<D> {
    #[inline]
    fn replay(&self) -> Option<Self> {
        Some(Empty::new())
    }
}

impl ReplayBody for String {
    #[inline]
    fn replay(&self) -> Option<Self> {
        Some(self.clone())
    }
}

impl<D, E> ReplayBody for BoxBody<D, E> {
    #[inline]
    fn replay(&self) -> Option<Self> {
        None
    }
}

impl<D, E> ReplayBody for UnsyncBoxBody<D, E> {
    #[inline]
    fn replay(&self) -> Option<Self> {
        None
    }
}

#[cfg(feature = "axum")]
impl ReplayBody for axum::body::Body {
    #[inline]
    fn replay(&self) -> Option<Self> {
        None
    }
}

/// The retry policy for HTTP clients (`Service<http::Request<B>, Response =
/// http::Response<RB>>`).
///
/// * **What.** Transport errors (any `Err`), and the responses `429 Too Many Requests`,
///   `502 Bad Gateway`, `503 Service Unavailable` and `504 Gateway Timeout`. Not `500`
///   (the server got the request and failed on it) nor any other `4xx`.
/// * **Which requests.** Idempotent methods only: `GET`, `HEAD`, `OPTIONS`, `PUT`,
///   `DELETE`, `TRACE`. `POST`, `PATCH` (and extension methods) are sent once unless
///   added with [`retry_method`](Self::retry_method). The body must replay
///   ([`ReplayBody`]).
/// * **How often.** At most [`max_attempts`](Self::max_attempts) attempts in all
///   (default 3), and only while the [`RetryBudget`](super::RetryBudget) lasts.
/// * **How long to wait.** The response's `Retry-After`, in seconds or as an HTTP-date,
///   capped at [`max_retry_after`](Self::max_retry_after) (default 30 s: a longer one
///   is shortened to it). Otherwise exponential backoff with full jitter: before retry
///   `n` (0 for the first), a uniform draw from `[0, min(max, base × 2ⁿ)]` (default
///   base 100 ms, max 5 s), from a per-thread xorshift generator or a seeded one
///   ([`seed`](Self::seed)).
///
/// A request is copied (method, URI, version, headers, extensions, body) before each
/// attempt that may be followed by another.
#[derive(Debug)]
pub struct HttpRetryPolicy {
    methods: Vec<Method>,
    max_attempts: u32,
    base: Duration,
    max_backoff: Duration,
    max_retry_after: Duration,
    rng: Rng,
}

impl HttpRetryPolicy {
    /// The policy with the defaults above.
    pub fn new() -> Self {
        HttpRetryPolicy {
            methods: vec![
                Method::GET,
                Method::HEAD,
                Method::OPTIONS,
                Method::PUT,
                Method::DELETE,
                Method::TRACE,
            ],
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            base: DEFAULT_BASE,
            max_backoff: DEFAULT_MAX_BACKOFF,
            max_retry_after: DEFAULT_MAX_RETRY_AFTER,
            rng: Rng::Thread,
        }
    }

    /// At most `n` attempts in all, the first call included: 1 turns retries off.
    ///
    /// # Panics
    ///
    /// When `n` is 0.
    #[track_caller]
    pub fn max_attempts(mut self, n: u32) -> Self {
        assert!(n > 0, "max_attempts must be at least 1");
        self.max_attempts = n;
        self
    }

    /// The backoff when there is no `Retry-After`: before retry `n`, a uniform draw
    /// from `[0, min(max, base × 2ⁿ)]`.
    ///
    /// # Panics
    ///
    /// When `base` is greater than `max`.
    #[track_caller]
    pub fn backoff(mut self, base: Duration, max: Duration) -> Self {
        assert!(
            base <= max,
            "backoff base {base:?} is above its max {max:?}"
        );
        self.base = base;
        self.max_backoff = max;
        self
    }

    /// The longest `Retry-After` honoured; a longer one is shortened to it.
    pub fn max_retry_after(mut self, max: Duration) -> Self {
        self.max_retry_after = max;
        self
    }

    /// Retries `method` too, e.g. `POST` for an API whose POSTs are idempotent (with an
    /// idempotency key).
    pub fn retry_method(mut self, method: Method) -> Self {
        if !self.methods.contains(&method) {
            self.methods.push(method);
        }
        self
    }

    /// Draws the jitter from a generator seeded with `seed`, shared by every user of
    /// the policy: reproducible delays for tests. By default each thread has its own
    /// generator, seeded from the standard library's random hasher keys.
    pub fn seed(mut self, seed: u64) -> Self {
        self.rng = Rng::Seeded(AtomicU64::new(nonzero(splitmix64(seed))));
        self
    }

    /// The methods retried.
    pub fn methods(&self) -> &[Method] {
        &self.methods
    }

    /// The delay before retry `n` (0 for the first) without `Retry-After`: one draw of
    /// the full jitter.
    pub fn backoff_delay(&self, n: u32) -> Duration {
        let ceiling = 2u32
            .checked_pow(n)
            .and_then(|m| self.base.checked_mul(m))
            .map_or(self.max_backoff, |d| d.min(self.max_backoff));
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        // Uniform in [0, nanos]: the high half of a 64 × 64-bit product.
        let draw = (u128::from(self.rng.next()) * (u128::from(nanos) + 1)) >> 64;
        Duration::from_nanos(draw as u64)
    }

    fn retryable_status(status: StatusCode) -> bool {
        matches!(
            status,
            StatusCode::TOO_MANY_REQUESTS
                | StatusCode::BAD_GATEWAY
                | StatusCode::SERVICE_UNAVAILABLE
                | StatusCode::GATEWAY_TIMEOUT
        )
    }
}

impl Default for HttpRetryPolicy {
    fn default() -> Self {
        HttpRetryPolicy::new()
    }
}

impl Clone for HttpRetryPolicy {
    fn clone(&self) -> Self {
        HttpRetryPolicy {
            methods: self.methods.clone(),
            max_attempts: self.max_attempts,
            base: self.base,
            max_backoff: self.max_backoff,
            max_retry_after: self.max_retry_after,
            rng: match &self.rng {
                Rng::Thread => Rng::Thread,
                Rng::Seeded(state) => Rng::Seeded(AtomicU64::new(state.load(Ordering::Relaxed))),
            },
        }
    }
}

impl HttpRetryPolicy {
    /// The decision on a response with `status` and `headers`, or on a transport error
    /// (`None`), after attempt number `attempts`.
    fn decide(&self, response: Option<(StatusCode, &HeaderMap)>, attempts: u32) -> Action {
        if attempts >= self.max_attempts {
            return Action::Stop;
        }
        let n = attempts.saturating_sub(1);
        match response {
            None => Action::Retry {
                after: self.backoff_delay(n),
            },
            Some((status, headers)) if Self::retryable_status(status) => {
                let after = match parse_retry_after(headers, SystemTime::now()) {
                    Some(d) => d.min(self.max_retry_after),
                    None => self.backoff_delay(n),
                };
                Action::Retry { after }
            }
            Some(_) => Action::Stop,
        }
    }
}

impl<B, RB, E> RetryPolicy<Request<B>, Response<RB>, E> for HttpRetryPolicy
where
    B: ReplayBody,
{
    fn retry(&self, result: &Result<Response<RB>, E>, attempts: u32) -> Action {
        let response = result.as_ref().ok().map(|r| (r.status(), r.headers()));
        self.decide(response, attempts)
    }

    fn clone_request(&self, req: &Request<B>) -> Result<Request<B>, Refused> {
        if !self.methods.contains(req.method()) {
            return Err(Refused::new("method is not idempotent"));
        }
        let body = req
            .body()
            .replay()
            .ok_or(Refused::new("request body cannot be replayed"))?;
        let mut copy = Request::new(body);
        *copy.method_mut() = req.method().clone();
        *copy.uri_mut() = req.uri().clone();
        *copy.version_mut() = req.version();
        *copy.headers_mut() = req.headers().clone();
        *copy.extensions_mut() = req.extensions().clone();
        Ok(copy)
    }
}

/// With the `reqwest` feature: the same policy for a `reqwest::Client` used as a tower
/// service. A request is copied with `reqwest::Request::try_clone`, which refuses a
/// streaming body ("request body cannot be replayed"); the decisions are the ones above.
#[cfg(feature = "reqwest")]
impl<E> RetryPolicy<reqwest::Request, reqwest::Response, E> for HttpRetryPolicy {
    fn retry(&self, result: &Result<reqwest::Response, E>, attempts: u32) -> Action {
        let response = result.as_ref().ok().map(|r| (r.status(), r.headers()));
        self.decide(response, attempts)
    }

    fn clone_request(&self, req: &reqwest::Request) -> Result<reqwest::Request, Refused> {
        if !self.methods.contains(req.method()) {
            return Err(Refused::new("method is not idempotent"));
        }
        req.try_clone()
            .ok_or(Refused::new("request body cannot be replayed"))
    }
}

/// The wait a `Retry-After` header asks for: delay-seconds, or an HTTP-date (IMF-fixdate,
/// or the obsolete RFC 850 and asctime forms) less `now` (zero if past). `None` if the
/// header is absent or unreadable.
pub(crate) fn parse_retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Too many digits for a u64 is "a very long time"; the cap shortens it.
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The jitter's generator: xorshift64*, per thread or seeded and shared.
#[derive(Debug)]
enum Rng {
    Thread,
    Seeded(AtomicU64),
}

thread_local! {
    static THREAD_RNG: Cell<u64> = Cell::new(nonzero({
        let mut h = RandomState::new().build_hasher();
        h.write_u64(0x5eed);
        h.finish()
    }));
}

impl Rng {
    fn next(&self) -> u64 {
        match self {
            Rng::Thread => THREAD_RNG.with(|cell| {
                let (state, out) = xorshift64star(cell.get());
                cell.set(state);
                out
            }),
            Rng::Seeded(atomic) => {
                let mut current = atomic.load(Ordering::Relaxed);
                loop {
                    let (state, out) = xorshift64star(current);
                    match atomic.compare_exchange_weak(
                        current,
                        state,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    ) {
                        Ok(_) => return out,
                        Err(seen) => current = seen,
                    }
                }
            }
        }
    }
}

/// One step of xorshift64*: the next state and the output.
#[inline]
fn xorshift64star(mut x: u64) -> (u64, u64) {
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    (x, x.wrapping_mul(0x2545_f491_4f6c_dd1d))
}

fn splitmix64(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// xorshift's state must not be 0.
fn nonzero(x: u64) -> u64 {
    if x == 0 {
        0x9e37_79b9_7f4a_7c15
    } else {
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::RETRY_AFTER, v.parse().unwrap());
        h
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(
            parse_retry_after(&headers("2"), now),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            parse_retry_after(&headers("Sun, 06 Nov 1994 08:49:40 GMT"), now),
            Some(Duration::from_secs(3))
        );
        // RFC 850 and asctime, which a recipient must accept too.
        assert_eq!(
            parse_retry_after(&headers("Sunday, 06-Nov-94 08:49:41 GMT"), now),
            Some(Duration::from_secs(4))
        );
        assert_eq!(
            parse_retry_after(&headers("Sun Nov  6 08:49:42 1994"), now),
            Some(Duration::from_secs(5))
        );
        // In the past: at once.
        assert_eq!(
            parse_retry_after(&headers("Sun, 06 Nov 1994 08:00:00 GMT"), now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after(&headers("soon"), now), None);
        assert_eq!(parse_retry_after(&headers("-1"), now), None);
        assert_eq!(parse_retry_after(&HeaderMap::new(), now), None);
    }

    #[test]
    fn full_jitter_stays_under_the_ceiling_and_spreads() {
        let policy = HttpRetryPolicy::new()
            .backoff(Duration::from_millis(100), Duration::from_secs(1))
            .seed(42);
        for n in 0..40 {
            let ceiling = Duration::from_millis(100)
                .checked_mul(2u32.saturating_pow(n))
                .unwrap_or(Duration::MAX)
                .min(Duration::from_secs(1));
            let draws: Vec<_> = (0..200).map(|_| policy.backoff_delay(n)).collect();
            assert!(draws.iter().all(|d| *d <= ceiling));
            let mean = draws.iter().sum::<Duration>() / 200;
            assert!(
                mean > ceiling / 3 && mean < ceiling * 2 / 3,
                "{n}: {mean:?}"
            );
        }
        // Seeded: reproducible.
        let a = HttpRetryPolicy::new().seed(7);
        let b = HttpRetryPolicy::new().seed(7);
        assert_eq!(a.backoff_delay(3), b.backoff_delay(3));
    }
}
