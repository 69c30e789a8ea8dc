//! The errors of fault injection: the default injected error, and bad parameters.

use std::{error::Error, fmt};

/// The error a [`FaultLayer`](super::FaultLayer) injects in error mode unless
/// [`error`](super::FaultLayerBuilder::error) gives another. Find it with
/// `err.downcast_ref::<InjectedFault>()`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct InjectedFault;

impl fmt::Display for InjectedFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("injected fault")
    }
}

impl Error for InjectedFault {}

/// A fault-injection parameter out of range, from
/// [`FaultLayerBuilder::try_build`](super::FaultLayerBuilder::try_build).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidFault {
    what: String,
    reason: &'static str,
}

impl InvalidFault {
    pub(crate) fn new(what: String, reason: &'static str) -> Self {
        InvalidFault { what, reason }
    }

    /// Why the value was refused.
    pub fn reason(&self) -> &str {
        self.reason
    }
}

impl fmt::Display for InvalidFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid fault injection: {}: {}", self.what, self.reason)
    }
}

impl Error for InvalidFault {}
