//! Errors of the concurrency limit: [`Overloaded`] and [`InvalidConcurrencyLimit`].

use std::{fmt, time::Duration};

use crate::retry_after::RetryAfter;

/// A call was rejected because the limit's maximum of calls (for an adaptive limit, its
/// current value) was already in flight. The inner service was not called.
///
/// In the layer's error mode it comes boxed in a [`BoxError`](crate::BoxError); find it
/// with `err.downcast_ref::<Overloaded>()`. In the layer's HTTP mode it becomes a
/// `503 Service Unavailable` response instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Overloaded {
    /// When to try again: the hint configured with
    /// [`ConcurrencyLimitLayer::retry_after`](super::ConcurrencyLimitLayer::retry_after)
    /// (default [`DEFAULT_RETRY_AFTER`](super::DEFAULT_RETRY_AFTER), 1 s). A slot frees as
    /// soon as a call in flight finishes, so this is advice, not a promise.
    pub retry_after: Duration,
}

impl Overloaded {
    /// A rejection that advises retrying after `retry_after`.
    pub fn new(retry_after: Duration) -> Self {
        Overloaded { retry_after }
    }
}

/// `overloaded; retry after N s`, N in whole seconds rounded up and never 0: the number
/// of the `Retry-After` header ([`retry_after_secs`](crate::retry_after_secs)), and the
/// text of the `503` body in HTTP mode.
impl fmt::Display for Overloaded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "overloaded; {}", RetryAfter(self.retry_after))
    }
}

impl std::error::Error for Overloaded {}

/// A maximum a concurrency limit cannot work with: 0, which would reject every call.
///
/// Returned by [`ConcurrencyLimitLayer::try_new`](super::ConcurrencyLimitLayer::try_new);
/// [`ConcurrencyLimitLayer::new`](super::ConcurrencyLimitLayer::new) panics with its
/// message instead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidConcurrencyLimit {
    max: usize,
    reason: &'static str,
}

impl InvalidConcurrencyLimit {
    pub(crate) fn new(max: usize, reason: &'static str) -> Self {
        InvalidConcurrencyLimit { max, reason }
    }

    /// The refused maximum.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Why the maximum was refused.
    pub fn reason(&self) -> &str {
        self.reason
    }
}

impl fmt::Display for InvalidConcurrencyLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid concurrency limit (max {}): {}",
            self.max, self.reason
        )
    }
}

impl std::error::Error for InvalidConcurrencyLimit {}

/// A parameter an adaptive concurrency limit cannot work with: bounds out of order, an
/// initial limit outside them, an empty window, or an algorithm parameter out of range.
///
/// Returned by the `try_build` of [`AdaptiveLimitBuilder`](super::AdaptiveLimitBuilder),
/// [`AimdBuilder`](super::AimdBuilder) and [`Gradient2Builder`](super::Gradient2Builder);
/// their `build` panics with its message instead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidAdaptiveLimit {
    reason: &'static str,
}

impl InvalidAdaptiveLimit {
    pub(crate) fn new(reason: &'static str) -> Self {
        InvalidAdaptiveLimit { reason }
    }

    /// Why the value was refused.
    pub fn reason(&self) -> &str {
        self.reason
    }
}

impl fmt::Display for InvalidAdaptiveLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid adaptive concurrency limit: {}", self.reason)
    }
}

impl std::error::Error for InvalidAdaptiveLimit {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overloaded_display_is_whole_seconds_rounded_up() {
        let s = |ms| Overloaded::new(Duration::from_millis(ms)).to_string();
        assert_eq!(s(1000), "overloaded; retry after 1 s");
        assert_eq!(s(1500), "overloaded; retry after 2 s");
        assert_eq!(s(0), "overloaded; retry after 1 s");
    }

    #[test]
    fn invalid_display() {
        let e = InvalidConcurrencyLimit::new(0, "the maximum must be at least 1");
        assert_eq!(
            e.to_string(),
            "invalid concurrency limit (max 0): the maximum must be at least 1"
        );
        assert_eq!(e.max(), 0);
    }
}
