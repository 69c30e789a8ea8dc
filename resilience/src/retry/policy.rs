//! [`RetryPolicy`]: what to retry, when, and how to get a second copy of a request.

use std::{fmt, time::Duration};

/// What a [`RetryPolicy`] decides about the result of an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Hand the result to the caller.
    Stop,
    /// Try again after `after` (`Duration::ZERO`: at once), if the request can be
    /// replayed and the [`RetryBudget`](super::RetryBudget) allows it.
    Retry {
        /// How long to wait before the next attempt.
        after: Duration,
    },
}

/// Why a request cannot be sent again: the policy refused to clone it.
///
/// Logged (`tracing::debug!`) when a result the policy would have retried is handed
/// back instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused {
    reason: &'static str,
}

impl Refused {
    /// A refusal, with the reason that the log will give.
    pub const fn new(reason: &'static str) -> Self {
        Refused { reason }
    }

    /// Why the request cannot be replayed.
    pub const fn reason(&self) -> &'static str {
        self.reason
    }
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "request not replayable: {}", self.reason)
    }
}

/// Decides which results of a service `Service<Req, Response = Res, Error = E>` are
/// retried, how long to wait first, and makes the copies of the request that retries
/// send.
///
/// The methods take `&self`: one policy, behind an `Arc`, serves every service of a
/// [`RetryLayer`](super::RetryLayer) and every clone of them, so a policy with state
/// (a random number generator) keeps it in atomics or cells.
///
/// [`HttpRetryPolicy`](super::HttpRetryPolicy) is the ready one for HTTP services.
///
/// ```
/// use std::time::Duration;
/// use resilience::retry::{Action, Refused, RetryPolicy};
///
/// /// Retries every error twice (three attempts in all), 10 ms apart.
/// struct Twice;
///
/// impl<E> RetryPolicy<u32, u32, E> for Twice {
///     fn retry(&self, result: &Result<u32, E>, attempts: u32) -> Action {
///         match result {
///             Err(_) if attempts < 3 => Action::Retry { after: Duration::from_millis(10) },
///             _ => Action::Stop,
///         }
///     }
///
///     fn clone_request(&self, req: &u32) -> Result<u32, Refused> {
///         Ok(*req)
///     }
/// }
/// ```
pub trait RetryPolicy<Req, Res, E> {
    /// The decision on `result`, the outcome of attempt number `attempts` (1 for the
    /// first call): [`Action::Stop`] hands it to the caller, [`Action::Retry`] tries
    /// again after a delay. A cap on attempts belongs here.
    fn retry(&self, result: &Result<Res, E>, attempts: u32) -> Action;

    /// A copy of `req` for the next attempt, made before each attempt is sent (the
    /// attempt consumes the request), or the reason it cannot be made. A request that
    /// must never be retried (a non-idempotent method) is refused here too; the refusal
    /// only matters, and is only logged, when [`retry`](Self::retry) asks for a retry.
    fn clone_request(&self, req: &Req) -> Result<Req, Refused>;
}
