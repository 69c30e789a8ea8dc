//! The response future of [`RetryService`](super::RetryService).

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
};

use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower_service::Service;

use super::{
    layer::Shared,
    policy::{Action, Refused, RetryPolicy},
};

pin_project! {
    /// Response future of [`RetryService`](super::RetryService): the attempts, the waits
    /// between them, and the last attempt's result.
    pub struct ResponseFuture<S, P, Req>
    where
        S: Service<Req>,
    {
        #[pin]
        state: State<S::Future, Req>,
        svc: S,
        shared: Arc<Shared<P>>,
        // The copy for the next attempt, or why there is none.
        spare: Result<Req, Refused>,
        attempts: u32,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, Req> {
        Called {
            #[pin]
            future: F,
        },
        Waiting {
            // Boxed: keeps the future small on the usual path, with no retry.
            sleep: Pin<Box<Sleep>>,
            request: Option<Req>,
        },
        Ready {
            request: Option<Req>,
        },
    }
}

impl<S, P, Req> ResponseFuture<S, P, Req>
where
    S: Service<Req>,
{
    pub(crate) fn new(
        future: S::Future,
        svc: S,
        shared: Arc<Shared<P>>,
        spare: Result<Req, Refused>,
    ) -> Self {
        ResponseFuture {
            state: State::Called { future },
            svc,
            shared,
            spare,
            attempts: 1,
        }
    }
}

impl<S, P, Req> Future for ResponseFuture<S, P, Req>
where
    S: Service<Req>,
    P: RetryPolicy<Req, S::Response, S::Error>,
{
    type Output = Result<S::Response, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Called { future } => {
                    let result = ready!(future.poll(cx));
                    let attempts = *this.attempts;
                    let after = match this.shared.policy.retry(&result, attempts) {
                        Action::Stop => return Poll::Ready(result),
                        Action::Retry { after } => after,
                    };
                    if let Err(refused) = this.spare {
                        tracing::debug!(attempts, reason = refused.reason(), "not retried");
                        return Poll::Ready(result);
                    }
                    if !this.shared.budget.try_withdraw() {
                        tracing::debug!(attempts, reason = "retry budget spent", "not retried");
                        return Poll::Ready(result);
                    }
                    let request = match std::mem::replace(
                        this.spare,
                        Err(Refused::new("request already sent")),
                    ) {
                        Ok(request) => Some(request),
                        Err(_) => return Poll::Ready(result),
                    };
                    tracing::debug!(attempts, delay = ?after, "retrying");
                    drop(result);
                    if after.is_zero() {
                        this.state.set(State::Ready { request });
                    } else {
                        this.state.set(State::Waiting {
                            sleep: Box::pin(tokio::time::sleep(after)),
                            request,
                        });
                    }
                }
                StateProj::Waiting { sleep, request } => {
                    ready!(sleep.as_mut().poll(cx));
                    let request = request.take();
                    this.state.set(State::Ready { request });
                }
                StateProj::Ready { request } => {
                    if let Err(e) = ready!(this.svc.poll_ready(cx)) {
                        return Poll::Ready(Err(e));
                    }
                    let request = request
                        .take()
                        .expect("the retry's request is taken only when it is sent");
                    *this.spare = this.shared.policy.clone_request(&request);
                    *this.attempts += 1;
                    let future = this.svc.call(request);
                    this.state.set(State::Called { future });
                }
            }
        }
    }
}

impl<S, P, Req> fmt::Debug for ResponseFuture<S, P, Req>
where
    S: Service<Req>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("attempts", &self.attempts)
            .field("budget", &self.shared.budget)
            .finish_non_exhaustive()
    }
}
