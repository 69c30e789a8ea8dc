//! How long to wait before retrying, in the one wording every part of the crate uses.
//!
//! A rejection tells its client when to come back in three places: the `Retry-After`
//! header, the message of the HTTP body, and the `Display` of [`CircuitOpen`] and
//! [`RateLimited`]. All three say the same number, whole seconds rounded up and never
//! 0, from [`retry_after_secs`]; the text is always `retry after N s`.
//!
//! [`CircuitOpen`]: crate::CircuitOpen
//! [`RateLimited`]: crate::RateLimited

use std::{fmt, time::Duration};

/// Whole seconds to wait before retrying: `d` rounded up, and never 0, because a client
/// told "0" retries at once and is rejected again.
///
/// This is the value of the `Retry-After` header every layer sends in HTTP mode, and the
/// number in every "retry after N s" the crate writes. Use it for your own
/// `Retry-After` headers so they agree with the layers'.
///
/// ```
/// use std::time::Duration;
/// use resilience::retry_after_secs;
///
/// assert_eq!(retry_after_secs(Duration::from_millis(3200)), 4);
/// assert_eq!(retry_after_secs(Duration::from_secs(2)), 2);
/// assert_eq!(retry_after_secs(Duration::ZERO), 1);
/// ```
pub fn retry_after_secs(d: Duration) -> u64 {
    let secs = d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0));
    secs.max(1)
}

/// `retry after N s`, N from [`retry_after_secs`]: the one formatter behind the
/// `Display` of both rejection errors and the messages of both HTTP bodies.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RetryAfter(pub(crate) Duration);

impl fmt::Display for RetryAfter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "retry after {} s", retry_after_secs(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_up_and_is_never_zero() {
        assert_eq!(retry_after_secs(Duration::from_millis(200)), 1);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(2)), 2);
        assert_eq!(retry_after_secs(Duration::from_millis(2001)), 3);
        assert_eq!(retry_after_secs(Duration::MAX), u64::MAX);
        assert_eq!(
            RetryAfter(Duration::from_millis(3200)).to_string(),
            "retry after 4 s"
        );
    }
}
