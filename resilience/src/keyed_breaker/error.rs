//! The error of a keyed breaker layer's parameters.

use std::{error::Error, fmt};

/// A parameter of [`KeyedCircuitBreakers`](super::KeyedCircuitBreakers) out of range,
/// from the `try_` constructors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidKeyedBreaker {
    what: String,
    reason: &'static str,
}

impl InvalidKeyedBreaker {
    pub(crate) fn new(what: String, reason: &'static str) -> Self {
        InvalidKeyedBreaker { what, reason }
    }

    /// Why the value was refused.
    pub fn reason(&self) -> &str {
        self.reason
    }
}

impl fmt::Display for InvalidKeyedBreaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid keyed circuit breaker: {}: {}",
            self.what, self.reason
        )
    }
}

impl Error for InvalidKeyedBreaker {}
