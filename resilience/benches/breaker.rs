//! Overhead of a closed circuit breaker around a pass-through service.
//!
//! The futures are polled directly (no runtime, no allocation): the inner service is
//! ready at once, so each iteration measures `poll_ready` + `call` + one poll of the
//! response future, with and without the breaker, in the same run.
//!
//! `keyed_breaker/*`: a `KeyedCircuitBreakerLayer` over 10 000 keys, cycled (every key
//! has its breaker already), and a `FaultLayer` injecting nothing (rate 0) and failing
//! every call, against the same pass-through.
//!
//! Run: `cargo bench -p resilience --bench breaker -- --warm-up-time 1 --measurement-time 3`

mod support;

use std::{
    hint::black_box,
    task::{Context, Waker},
    time::Duration,
};

use criterion::{criterion_group, criterion_main, Criterion};
use resilience::{
    key_fn, CircuitBreaker, CircuitBreakerLayer, FaultLayer, KeyedCircuitBreakerLayer, Window,
};
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

fn keyed_and_fault(c: &mut Criterion) {
    let mut cx = Context::from_waker(Waker::noop());
    let mut group = c.benchmark_group("keyed_breaker");
    const KEYS: u64 = 10_000;

    let mut bare = PassThrough;
    group.bench_function("bare_service", |b| {
        b.iter(|| once(&mut bare, &mut cx, black_box(1)))
    });

    // The request is the key.
    let mut keyed = KeyedCircuitBreakerLayer::builder(CircuitBreaker::builder())
        .key(key_fn(|req: &u64| Some(*req)))
        .max_keys(2 * KEYS as usize)
        .build()
        .layer(PassThrough);
    for k in 0..KEYS {
        once(&mut keyed, &mut cx, k);
    }
    let mut i = 0u64;
    group.bench_function("keyed_layer_10k_keys", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            once(&mut keyed, &mut cx, black_box(i))
        })
    });

    let mut quiet = FaultLayer::builder(1).build().layer(PassThrough);
    group.bench_function("fault_layer_rate_0", |b| {
        b.iter(|| once(&mut quiet, &mut cx, black_box(1)))
    });
    let mut failing = FaultLayer::builder(1)
        .error_rate(1.0)
        .build()
        .layer(PassThrough);
    group.bench_function("fault_layer_rate_1", |b| {
        b.iter(|| once(&mut failing, &mut cx, black_box(1)))
    });
    group.finish();
}

criterion_group!(benches, overhead, keyed_and_fault);
criterion_main!(benches);
