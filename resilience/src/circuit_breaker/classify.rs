//! Which outcomes count as failures.
//!
//! A breaker only sees `Result<R, E>`; whether `Ok(response)` is healthy depends on the
//! protocol. A [`Classifier`] decides. [`ErrIsFailure`] counts every `Err`;
//! [`HttpClassifier`] also counts `5xx` responses; [`classify_fn`] turns a closure into a
//! classifier. A layer not given one uses [`DefaultClassifier`], which is the first in
//! error mode and the second in HTTP mode.

use std::{any::TypeId, fmt};

/// Decides whether the outcome of a call counts as a failure for the breaker.
///
/// Implemented by [`ErrIsFailure`], [`HttpClassifier`] and [`FnClassifier`]; implement it
/// yourself for protocol-specific rules (a gRPC status, a business error code, ...).
pub trait Classifier<R, E>: Clone + Send + Sync + 'static {
    /// `true` if this outcome is a failure.
    fn is_failure(&self, outcome: Result<&R, &E>) -> bool;
}

/// The default classifier: every `Err` is a failure, every `Ok` a success.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ErrIsFailure;

impl<R, E> Classifier<R, E> for ErrIsFailure {
    #[inline]
    fn is_failure(&self, outcome: Result<&R, &E>) -> bool {
        outcome.is_err()
    }
}

/// The classifier of a [`CircuitBreakerLayer`](crate::CircuitBreakerLayer) that was
/// not given one: the mode's own.
///
/// In error mode every `Err` is a failure (as [`ErrIsFailure`]); in HTTP mode an `Err`
/// or a `5xx` response is (as [`HttpClassifier`]). So `.http()` changes what counts
/// only when no classifier was chosen, and
/// [`.classifier(c)`](crate::CircuitBreakerLayer::classifier) wins in either order.
/// Used on its own, e.g. with [`CircuitBreaker::call_classified`], it is
/// [`ErrIsFailure`].
///
/// [`CircuitBreaker::call_classified`]: crate::CircuitBreaker::call_classified
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DefaultClassifier;

impl<R, E> Classifier<R, E> for DefaultClassifier {
    #[inline]
    fn is_failure(&self, outcome: Result<&R, &E>) -> bool {
        outcome.is_err()
    }
}

/// HTTP mode's verdict: `classifier`'s, or [`HttpClassifier`]'s when `classifier` is
/// [`DefaultClassifier`].
///
/// A type test rather than a trait impl: Rust has no specialisation, and a blanket
/// impl for user classifiers would overlap one for `DefaultClassifier`. `TypeId`s of
/// two known types compare at compile time, so this costs nothing per call.
#[inline]
pub(crate) fn http_mode_is_failure<C, B, E>(
    classifier: &C,
    outcome: Result<&http::Response<B>, &E>,
) -> bool
where
    C: Classifier<http::Response<B>, E>,
{
    if TypeId::of::<C>() == TypeId::of::<DefaultClassifier>() {
        Classifier::<http::Response<B>, E>::is_failure(&HttpClassifier, outcome)
    } else {
        classifier.is_failure(outcome)
    }
}

/// Classifier for HTTP: an `Err` (transport failure) or a response with status `>= 500`
/// is a failure. `4xx` responses are the client's fault, not a sick server, so they count
/// as successes.
///
/// Works for [`http::Response<B>`] (hyper, axum, tonic, tower-http) and, with the crate
/// feature `reqwest`, for `reqwest::Response`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HttpClassifier;

impl HttpClassifier {
    /// `true` if `status` is a server error (`>= 500`).
    pub fn is_failure_status(status: http::StatusCode) -> bool {
        status.as_u16() >= 500
    }
}

impl<B, E> Classifier<http::Response<B>, E> for HttpClassifier {
    #[inline]
    fn is_failure(&self, outcome: Result<&http::Response<B>, &E>) -> bool {
        match outcome {
            Ok(res) => HttpClassifier::is_failure_status(res.status()),
            Err(_) => true,
        }
    }
}

#[cfg(feature = "reqwest")]
impl<E> Classifier<reqwest::Response, E> for HttpClassifier {
    #[inline]
    fn is_failure(&self, outcome: Result<&reqwest::Response, &E>) -> bool {
        match outcome {
            Ok(res) => HttpClassifier::is_failure_status(res.status()),
            Err(_) => true,
        }
    }
}

/// A classifier made from a closure by [`classify_fn`].
#[derive(Clone, Copy)]
pub struct FnClassifier<F> {
    f: F,
}

impl<F> fmt::Debug for FnClassifier<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FnClassifier").finish_non_exhaustive()
    }
}

impl<R, E, F> Classifier<R, E> for FnClassifier<F>
where
    F: Fn(Result<&R, &E>) -> bool + Clone + Send + Sync + 'static,
{
    #[inline]
    fn is_failure(&self, outcome: Result<&R, &E>) -> bool {
        (self.f)(outcome)
    }
}

/// Makes a [`Classifier`] from a closure that returns `true` for failures.
///
/// ```
/// use resilience::{classify_fn, Classifier};
///
/// // Only timeouts count; other errors are the caller's problem.
/// let c = classify_fn(|r: Result<&u32, &std::io::Error>| {
///     matches!(r, Err(e) if e.kind() == std::io::ErrorKind::TimedOut)
/// });
/// let timeout = std::io::Error::from(std::io::ErrorKind::TimedOut);
/// let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
/// assert!(c.is_failure(Err(&timeout)));
/// assert!(!c.is_failure(Err(&denied)));
/// assert!(!c.is_failure(Ok(&7)));
/// ```
pub fn classify_fn<R, E, F>(f: F) -> FnClassifier<F>
where
    F: Fn(Result<&R, &E>) -> bool + Clone + Send + Sync + 'static,
{
    FnClassifier { f }
}
