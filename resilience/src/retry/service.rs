//! [`RetryService`]: the middleware.

use std::{
    fmt,
    sync::Arc,
    task::{Context, Poll},
};

use tower_service::Service;

use super::{budget::RetryBudget, future::ResponseFuture, layer::Shared, policy::RetryPolicy};

/// A service that retries failed calls; made by [`RetryLayer`](super::RetryLayer).
///
/// `poll_ready` forwards the inner service's readiness. `call` deposits in the budget,
/// asks the policy for a spare copy of the request, and sends the request to the inner
/// service, which it moves into the response future (a clone takes its place, as in
/// tower's `Retry`); the future polls it ready again before each retry. Its error type
/// is the inner service's: a call that is not retried, or whose retries ran out,
/// returns the last attempt's result unchanged.
pub struct RetryService<S, P> {
    inner: S,
    shared: Arc<Shared<P>>,
}

impl<S, P> RetryService<S, P> {
    pub(crate) fn from_parts(inner: S, shared: Arc<Shared<P>>) -> Self {
        RetryService { inner, shared }
    }

    /// The budget this service shares with its layer.
    pub fn retry_budget(&self) -> &RetryBudget {
        &self.shared.budget
    }

    /// The policy this service shares with its layer.
    pub fn policy(&self) -> &P {
        &self.shared.policy
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, P, Req> Service<Req> for RetryService<S, P>
where
    S: Service<Req> + Clone,
    P: RetryPolicy<Req, S::Response, S::Error>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S, P, Req>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        self.shared.budget.deposit();
        let spare = self.shared.policy.clone_request(&req);
        // The ready service makes the call and goes with the future for the retries.
        let clone = self.inner.clone();
        let mut svc = std::mem::replace(&mut self.inner, clone);
        let future = svc.call(req);
        ResponseFuture::new(future, svc, self.shared.clone(), spare)
    }
}

impl<S: Clone, P> Clone for RetryService<S, P> {
    fn clone(&self) -> Self {
        RetryService {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug, P: fmt::Debug> fmt::Debug for RetryService<S, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryService")
            .field("inner", &self.inner)
            .field("policy", &self.shared.policy)
            .field("budget", &self.shared.budget)
            .finish()
    }
}
