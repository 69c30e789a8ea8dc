//! The errors a circuit breaker produces.

use std::{error::Error, fmt, time::Duration};

use crate::retry_after::RetryAfter;

/// A call was rejected because the circuit breaker is open (or half-open with all trial
/// slots taken). The inner service was not called.
///
/// In the layer's error mode it comes boxed in a [`BoxError`](crate::BoxError); find it
/// with `err.downcast_ref::<CircuitOpen>()`. In the layer's HTTP mode it becomes a
/// `503 Service Unavailable` response instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CircuitOpen {
    /// How long until the breaker admits a call again, as far as it knows: the time left
    /// until it turns half-open. Zero when it is already half-open and all trial slots are
    /// taken (a slot frees as soon as a trial call finishes).
    pub retry_after: Duration,
}

impl CircuitOpen {
    /// A rejection that advises retrying after `retry_after`.
    pub fn new(retry_after: Duration) -> Self {
        CircuitOpen { retry_after }
    }
}

/// `circuit breaker is open; retry after N s`, N in whole seconds rounded up and never
/// 0: the number of the `Retry-After` header
/// ([`retry_after_secs`](crate::retry_after_secs)), and the text of the `503` body in
/// HTTP mode. The exact wait is [`retry_after`](CircuitOpen::retry_after).
impl fmt::Display for CircuitOpen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "circuit breaker is open; {}",
            RetryAfter(self.retry_after)
        )
    }
}

impl Error for CircuitOpen {}

/// The result error of [`CircuitBreaker::call`](super::CircuitBreaker::call): either the
/// breaker rejected the call, or the call itself failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BreakerError<E> {
    /// The breaker rejected the call without running it.
    Open(CircuitOpen),
    /// The call ran and returned this error.
    Inner(E),
}

impl<E> BreakerError<E> {
    /// `true` if the breaker rejected the call.
    pub fn is_open(&self) -> bool {
        matches!(self, BreakerError::Open(_))
    }

    /// The call's own error, if the call ran.
    pub fn into_inner(self) -> Option<E> {
        match self {
            BreakerError::Inner(e) => Some(e),
            BreakerError::Open(_) => None,
        }
    }
}

impl<E> From<CircuitOpen> for BreakerError<E> {
    fn from(open: CircuitOpen) -> Self {
        BreakerError::Open(open)
    }
}

impl<E: fmt::Display> fmt::Display for BreakerError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BreakerError::Open(open) => open.fmt(f),
            BreakerError::Inner(e) => e.fmt(f),
        }
    }
}

/// Transparent over the inner error: `Inner(e)` displays as `e` and has `e`'s source, so
/// error reports do not print the same message twice.
impl<E: Error + 'static> Error for BreakerError<E> {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            BreakerError::Open(_) => None,
            BreakerError::Inner(e) => e.source(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_whole_seconds_rounded_up() {
        let s = |ms| CircuitOpen::new(Duration::from_millis(ms)).to_string();
        assert_eq!(s(1234), "circuit breaker is open; retry after 2 s");
        assert_eq!(s(5000), "circuit breaker is open; retry after 5 s");
        assert_eq!(s(200), "circuit breaker is open; retry after 1 s");
        assert_eq!(s(0), "circuit breaker is open; retry after 1 s");
    }
}
