//! Errors of the token bucket: [`RateLimited`], [`MissingKey`] and [`InvalidRate`].

use std::{borrow::Cow, fmt, time::Duration};

/// A request was refused because its token bucket is empty.
///
/// `retry_after` is exact: the same request made `retry_after` from now is granted (unless
/// someone else takes the tokens first). When the request asks for more tokens than the
/// bucket can ever hold, no wait helps and `retry_after` is [`Duration::MAX`]; see
/// [`RateLimited::is_permanent`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimited {
    /// How long until the same request would be granted.
    pub retry_after: Duration,
}

impl RateLimited {
    /// A rejection that is granted again after `retry_after`.
    pub fn new(retry_after: Duration) -> Self {
        RateLimited { retry_after }
    }

    /// True when the request can never be granted (it asks for more tokens than the
    /// capacity), so retrying is pointless.
    pub fn is_permanent(&self) -> bool {
        self.retry_after == Duration::MAX
    }
}

impl fmt::Display for RateLimited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_permanent() {
            return f
                .write_str("rate limited; the request needs more tokens than the bucket holds");
        }
        f.write_str("rate limited; retry after ")?;
        write_secs(f, self.retry_after)
    }
}

impl std::error::Error for RateLimited {}

/// Writes a duration as seconds with at most millisecond precision and no trailing zeros
/// ("0.2s", "1.234s", "3s"): short enough for a log line, exact enough for a human.
fn write_secs(f: &mut fmt::Formatter<'_>, d: Duration) -> fmt::Result {
    // Round up so a wait of 1 ns is never printed as "0s".
    let millis = d.as_nanos().div_ceil(1_000_000);
    let (secs, frac) = (millis / 1000, millis % 1000);
    if frac == 0 {
        write!(f, "{secs}s")
    } else {
        let frac = format!("{frac:03}");
        write!(f, "{secs}.{}s", frac.trim_end_matches('0'))
    }
}

/// The key extractor found nothing to key the request on.
///
/// Rate limiting such a request under some shared fallback key would silently put
/// unrelated clients in one bucket, so the layers refuse it instead: an error in the
/// reject and wait modes, a `500` naming [`what`](MissingKey::what) is missing in HTTP
/// mode. It almost always means a deployment mistake, e.g. a server that does not put
/// the peer address into the request extensions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MissingKey {
    what: Cow<'static, str>,
}

impl MissingKey {
    /// A missing key, described by what is missing, e.g.
    /// `"peer address (SocketAddr) in request extensions"`.
    pub fn new(what: impl Into<Cow<'static, str>>) -> Self {
        MissingKey { what: what.into() }
    }

    /// What is missing.
    pub fn what(&self) -> &str {
        &self.what
    }
}

impl fmt::Display for MissingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rate limit key missing: no {}", self.what)
    }
}

impl std::error::Error for MissingKey {}

/// Parameters a token bucket cannot work with, returned by
/// [`TokenBucket::try_new`](crate::TokenBucket::try_new) and
/// [`KeyedTokenBuckets::try_new`](crate::KeyedTokenBuckets::try_new).
#[derive(Clone, Debug, PartialEq)]
pub struct InvalidRate {
    rate: f64,
    capacity: u32,
    reason: &'static str,
}

impl InvalidRate {
    pub(crate) fn new(rate: f64, capacity: u32, reason: &'static str) -> Self {
        InvalidRate {
            rate,
            capacity,
            reason,
        }
    }

    /// Why the parameters were refused.
    pub fn reason(&self) -> &str {
        self.reason
    }
}

impl fmt::Display for InvalidRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid token bucket (rate {}/s, capacity {}): {}",
            self.rate, self.capacity, self.reason
        )
    }
}

impl std::error::Error for InvalidRate {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limited_display() {
        let e = RateLimited::new(Duration::from_millis(200));
        assert_eq!(e.to_string(), "rate limited; retry after 0.2s");
        let e = RateLimited::new(Duration::from_millis(1234));
        assert_eq!(e.to_string(), "rate limited; retry after 1.234s");
        let e = RateLimited::new(Duration::from_secs(3));
        assert_eq!(e.to_string(), "rate limited; retry after 3s");
        let e = RateLimited::new(Duration::from_nanos(1));
        assert_eq!(e.to_string(), "rate limited; retry after 0.001s");
        assert!(RateLimited::new(Duration::MAX).is_permanent());
    }

    #[test]
    fn missing_key_display() {
        let e = MissingKey::new("peer address");
        assert_eq!(e.what(), "peer address");
        assert_eq!(e.to_string(), "rate limit key missing: no peer address");
    }
}
