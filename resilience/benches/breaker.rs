//! Overhead of a closed circuit breaker around a pass-through service.
//!
//! The futures are polled directly (no runtime, no allocation): the inner service is
//! ready at once, so each iteration measures `poll_ready` + `call` + one poll of the
//! response future, with and without the breaker, in the same run.
//!
//! Run: `cargo bench -p resilience --bench breaker -- --warm-up-time 1 --measurement-time 3`

mod support;

use std::{
    hint::black_box,
    task::{Context, Waker},
    time::Duration,
};

use criterion::{criterion_group, criterion_main, Criterion};
use resilience::{CircuitBreaker, CircuitBreakerLayer, Window};
use support::{once, PassThrough};
use tower::Layer;

fn overhead(c: &mut Criterion) {
    let mut cx = Context::from_waker(Waker::noop());
    let mut group = c.benchmark_group("closed_breaker");

    let mut bare = PassThrough;
    group.bench_function("bare_service", |b| {
        b.iter(|| once(&mut bare, &mut cx, black_box(1)))
    });

    let mut consecutive = CircuitBreakerLayer::new(CircuitBreaker::new()).layer(PassThrough);
    group.bench_function("layer_consecutive_failures", |b| {
        b.iter(|| once(&mut consecutive, &mut cx, black_box(1)))
    });

    let rate = CircuitBreaker::builder()
        .failure_rate(50.0, Window::Count(100), 20)
        .build();
    let mut rate = CircuitBreakerLayer::new(rate).layer(PassThrough);
    group.bench_function("layer_failure_rate_count_window", |b| {
        b.iter(|| once(&mut rate, &mut cx, black_box(1)))
    });

    let slow = CircuitBreaker::builder()
        .slow_call(Duration::from_secs(1))
        .build();
    let mut slow = CircuitBreakerLayer::new(slow).layer(PassThrough);
    group.bench_function("layer_consecutive_with_slow_call", |b| {
        b.iter(|| once(&mut slow, &mut cx, black_box(1)))
    });

    let breaker = CircuitBreaker::new();
    group.bench_function("standalone_try_acquire_success", |b| {
        b.iter(|| match breaker.try_acquire() {
            Ok(permit) => permit.success(),
            Err(open) => {
                black_box(open);
            }
        })
    });
    group.finish();
}

criterion_group!(benches, overhead);
criterion_main!(benches);
