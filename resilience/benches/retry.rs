//! Overhead of a retry layer on a call that succeeds at once: this crate's
//! [`RetryLayer`] with [`HttpRetryPolicy`] (and its default budget) against tower's
//! `RetryLayer` with an equivalent policy (idempotent methods, `Full<Bytes>` copied,
//! `Err` / 429 / 502 / 503 / 504 retried, a `TpsBudget`) and no layer at all.
//!
//! The futures are polled directly (no runtime): the inner service is ready at once and
//! answers `200` at once, so each iteration measures `poll_ready` + `call` (budget
//! deposit, request copy) + one poll of the response future, for all three in the same
//! run.
//!
//! Run: `cargo bench -p resilience --bench retry -- --warm-up-time 1 --measurement-time 2`

use std::{
    convert::Infallible,
    future::{ready, Future, Ready},
    hint::black_box,
    pin::pin,
    sync::Arc,
    task::{Context, Poll, Waker},
    time::Duration,
};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use resilience::retry::{HttpRetryPolicy, RetryLayer};
use tower::{
    retry::budget::{Budget, TpsBudget},
    Layer, Service,
};

type Req = Request<Full<Bytes>>;
type Res = Response<Full<Bytes>>;

/// Answers `200` with an empty body, at once.
#[derive(Clone, Copy)]
struct Ok200;

impl Service<Req> for Ok200 {
    type Response = Res;
    type Error = Infallible;
    type Future = Ready<Result<Res, Infallible>>;

    #[inline]
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    #[inline]
    fn call(&mut self, _req: Req) -> Self::Future {
        ready(Ok(Response::new(Full::new(Bytes::new()))))
    }
}

/// tower's side: the same decisions as [`HttpRetryPolicy`], with tower's budget.
#[derive(Clone)]
struct TowerHttpPolicy {
    budget: Arc<TpsBudget>,
    attempts: u32,
}

impl<E> tower::retry::Policy<Req, Res, E> for TowerHttpPolicy {
    type Future = tokio::time::Sleep;

    fn retry(&mut self, _req: &mut Req, result: &mut Result<Res, E>) -> Option<Self::Future> {
        let retryable = match result {
            Err(_) => true,
            Ok(res) => matches!(
                res.status(),
                StatusCode::TOO_MANY_REQUESTS
                    | StatusCode::BAD_GATEWAY
                    | StatusCode::SERVICE_UNAVAILABLE
                    | StatusCode::GATEWAY_TIMEOUT
            ),
        };
        if !retryable {
            self.budget.deposit();
            return None;
        }
        self.attempts += 1;
        if self.attempts >= 3 || !self.budget.withdraw() {
            return None;
        }
        Some(tokio::time::sleep(Duration::from_millis(100)))
    }

    fn clone_request(&mut self, req: &Req) -> Option<Req> {
        let idempotent = [
            Method::GET,
            Method::HEAD,
            Method::OPTIONS,
            Method::PUT,
            Method::DELETE,
            Method::TRACE,
        ];
        if !idempotent.contains(req.method()) {
            return None;
        }
        let mut copy = Request::new(req.body().clone());
        *copy.method_mut() = req.method().clone();
        *copy.uri_mut() = req.uri().clone();
        *copy.version_mut() = req.version();
        *copy.headers_mut() = req.headers().clone();
        *copy.extensions_mut() = req.extensions().clone();
        Some(copy)
    }
}

fn request() -> Req {
    Request::get("http://svc.local/items/42")
        .header("accept", "application/json")
        .body(Full::new(Bytes::from_static(b"")))
        .unwrap()
}

/// One request through `svc`, polled to completion by hand.
#[inline]
fn once<S>(svc: &mut S, cx: &mut Context<'_>) -> bool
where
    S: Service<Req, Response = Res>,
{
    if svc.poll_ready(cx).is_pending() {
        return false;
    }
    let fut = pin!(svc.call(request()));
    matches!(fut.poll(cx), Poll::Ready(Ok(_)))
}

fn overhead(c: &mut Criterion) {
    let mut cx = Context::from_waker(Waker::noop());
    // Budgets read tokio's clock, which works without a runtime.
    let mut group = c.benchmark_group("retry");

    let mut bare = Ok200;
    group.bench_function("pass_through", |b| {
        b.iter(|| black_box(once(&mut bare, &mut cx)))
    });

    let mut ours = RetryLayer::new(HttpRetryPolicy::new()).layer(Ok200);
    group.bench_function("resilience_retry", |b| {
        b.iter(|| black_box(once(&mut ours, &mut cx)))
    });

    let policy = TowerHttpPolicy {
        budget: Arc::new(TpsBudget::new(Duration::from_secs(10), 10, 0.2)),
        attempts: 0,
    };
    let mut theirs = tower::retry::RetryLayer::new(policy).layer(Ok200);
    group.bench_function("tower_retry", |b| {
        b.iter(|| black_box(once(&mut theirs, &mut cx)))
    });

    group.finish();
}

criterion_group!(benches, overhead);
criterion_main!(benches);
