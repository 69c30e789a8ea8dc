//! Overhead of a retry layer on a call that succeeds at once: this crate's
//! [`RetryLayer`] with [`HttpRetryPolicy`] (and its default budget) against tower's
//! `RetryLayer` with an equivalent policy (idempotent methods, `Full<Bytes>` copied,
//! `Err` / 429 / 502 / 503 / 504 retried, a `TpsBudget`) and no layer at all.
//!
//! The futures are polled directly (no runtime): the inner service is ready at once and
//! answers `200` at once, so each iteration measures `poll_ready` + `call` (budget
//! deposit, request copy) + one poll of the response future, for all three in the same
//! run. Every iteration of all three builds the same `http::Request` (a URI and one
//! header), so the differences are the layers'.
//!
//! Any retry layer must copy the request before the first attempt (the inner service
//! consumes it): for an `http::Request` that copy (its `HeaderMap` is an allocation) is
//! most of the overhead, for ours and tower's alike. The `retry_u64` group shows the
//! layers without it: the same three on a `u64` request, whose copy is free, with a
//! budget deposit per call in both layers.
//!
//! Run: `cargo bench -p resilience --bench retry -- --warm-up-time 1 --measurement-time 2`

mod support;

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
use resilience::retry::{Action, HttpRetryPolicy, Refused, RetryLayer, RetryPolicy};
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
    // Outside a runtime our budget reads the time-stamp counter, tower's `Instant::now`.
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

/// Our side of the `u64` group: retries errors up to 3 attempts, copies for free.
struct U64Policy;

impl<E> RetryPolicy<u64, u64, E> for U64Policy {
    fn retry(&self, result: &Result<u64, E>, attempts: u32) -> Action {
        match result {
            Err(_) if attempts < 3 => Action::Retry {
                after: Duration::from_millis(100),
            },
            _ => Action::Stop,
        }
    }

    fn clone_request(&self, req: &u64) -> Result<u64, Refused> {
        Ok(*req)
    }
}

/// tower's side of the `u64` group: the same decisions, with tower's budget.
#[derive(Clone)]
struct TowerU64Policy {
    budget: Arc<TpsBudget>,
    attempts: u32,
}

impl<E> tower::retry::Policy<u64, u64, E> for TowerU64Policy {
    type Future = tokio::time::Sleep;

    fn retry(&mut self, _req: &mut u64, result: &mut Result<u64, E>) -> Option<Self::Future> {
        if result.is_ok() {
            self.budget.deposit();
            return None;
        }
        self.attempts += 1;
        if self.attempts >= 3 || !self.budget.withdraw() {
            return None;
        }
        Some(tokio::time::sleep(Duration::from_millis(100)))
    }

    fn clone_request(&mut self, req: &u64) -> Option<u64> {
        Some(*req)
    }
}

fn overhead_u64(c: &mut Criterion) {
    let mut cx = Context::from_waker(Waker::noop());
    let mut group = c.benchmark_group("retry_u64");

    let mut bare = support::PassThrough;
    group.bench_function("pass_through", |b| {
        b.iter(|| support::once(&mut bare, &mut cx, black_box(1)))
    });

    let mut ours = RetryLayer::new(U64Policy).layer(support::PassThrough);
    group.bench_function("resilience_retry", |b| {
        b.iter(|| support::once(&mut ours, &mut cx, black_box(1)))
    });

    let policy = TowerU64Policy {
        budget: Arc::new(TpsBudget::new(Duration::from_secs(10), 10, 0.2)),
        attempts: 0,
    };
    let mut theirs = tower::retry::RetryLayer::new(policy).layer(support::PassThrough);
    group.bench_function("tower_retry", |b| {
        b.iter(|| support::once(&mut theirs, &mut cx, black_box(1)))
    });

    group.finish();
}

criterion_group!(benches, overhead, overhead_u64);
criterion_main!(benches);
