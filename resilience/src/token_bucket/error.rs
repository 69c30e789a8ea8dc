//! Errors of the token bucket: [`RateLimited`], [`MissingKey`] and [`InvalidTokenBucket`].

use std::{borrow::Cow, fmt, time::Duration};

use crate::retry_after::RetryAfter;

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
        write!(f, "rate limited; {}", RetryAfter(self.retry_after))
    }
}

impl std::error::Error for RateLimited {}

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

/// Parameters a token bucket cannot work with: a rate that is not a finite number above
/// 0, a burst of 0, a burst that takes over a century to refill, a key cap of 0.
///
/// Returned by the `try_` constructors ([`Rate::try_per_second`](crate::Rate::try_per_second),
/// [`TokenBucket::try_new`](crate::TokenBucket::try_new),
/// [`KeyedTokenBuckets::try_new`](crate::KeyedTokenBuckets::try_new),
/// [`TokenBucketLayerBuilder::try_build`](crate::token_bucket::TokenBucketLayerBuilder::try_build)
/// and their siblings); the infallible constructors panic with its message instead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidTokenBucket {
    /// The refused value, e.g. `rate NaN/s` or `burst 0`.
    value: String,
    reason: &'static str,
}

impl InvalidTokenBucket {
    pub(crate) fn new(value: String, reason: &'static str) -> Self {
        InvalidTokenBucket { value, reason }
    }

    /// Why the parameters were refused.
    pub fn reason(&self) -> &str {
        self.reason
    }
}

impl fmt::Display for InvalidTokenBucket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid token bucket ({}): {}", self.value, self.reason)
    }
}

impl std::error::Error for InvalidTokenBucket {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limited_display_is_whole_seconds_rounded_up() {
        let s = |ms| RateLimited::new(Duration::from_millis(ms)).to_string();
        assert_eq!(s(200), "rate limited; retry after 1 s");
        assert_eq!(s(1234), "rate limited; retry after 2 s");
        assert_eq!(s(3000), "rate limited; retry after 3 s");
        assert_eq!(s(0), "rate limited; retry after 1 s");
        let e = RateLimited::new(Duration::from_nanos(1));
        assert_eq!(e.to_string(), "rate limited; retry after 1 s");
        assert!(RateLimited::new(Duration::MAX).is_permanent());
        assert_eq!(
            RateLimited::new(Duration::MAX).to_string(),
            "rate limited; the request needs more tokens than the bucket holds"
        );
    }

    #[test]
    fn missing_key_display() {
        let e = MissingKey::new("peer address");
        assert_eq!(e.what(), "peer address");
        assert_eq!(e.to_string(), "rate limit key missing: no peer address");
    }
}
