//! Overhead of a concurrency limit around a pass-through service: this crate's
//! rejecting [`ConcurrencyLimitLayer`], static and adaptive (AIMD and Gradient2, each
//! call a latency sample, a window of 10), against tower's queueing one and no layer at
//! all.
//!
//! The futures are polled directly (no runtime): the inner service is ready at once, so
//! each iteration measures `poll_ready` + `call` + one poll of the response future,
//! which takes and frees one slot, for all three in the same run.
//!
//! The `clock` group times one read of each clock the adaptive limit could use.
//!
//! Run: `cargo bench -p resilience --bench concurrency_limit -- --warm-up-time 1 --measurement-time 2`

mod support;

use std::{
    hint::black_box,
    task::{Context, Waker},
};

use criterion::{criterion_group, criterion_main, Criterion};
use resilience::{Aimd, ConcurrencyLimitLayer, Gradient2};
use support::{once, PassThrough};
use tower::Layer;

fn overhead(c: &mut Criterion) {
    let mut cx = Context::from_waker(Waker::noop());
    let mut group = c.benchmark_group("concurrency_limit");

    let mut bare = PassThrough;
    group.bench_function("pass_through", |b| {
        b.iter(|| once(&mut bare, &mut cx, black_box(1)))
    });

    let mut ours = ConcurrencyLimitLayer::new(64).layer(PassThrough);
    group.bench_function("resilience_rejecting", |b| {
        b.iter(|| once(&mut ours, &mut cx, black_box(1)))
    });

    let mut aimd = ConcurrencyLimitLayer::adaptive(Aimd::default())
        .max(64)
        .initial(64)
        .build()
        .layer(PassThrough);
    group.bench_function("adaptive_aimd", |b| {
        b.iter(|| once(&mut aimd, &mut cx, black_box(1)))
    });

    let mut gradient2 = ConcurrencyLimitLayer::adaptive(Gradient2::default())
        .max(64)
        .initial(64)
        .build()
        .layer(PassThrough);
    group.bench_function("adaptive_gradient2", |b| {
        b.iter(|| once(&mut gradient2, &mut cx, black_box(1)))
    });

    let mut towers = tower::limit::ConcurrencyLimitLayer::new(64).layer(PassThrough);
    group.bench_function("tower_queueing", |b| {
        b.iter(|| once(&mut towers, &mut cx, black_box(1)))
    });
    group.finish();
}

/// What one clock read costs: the adaptive limit reads its clock twice per call, so this
/// is why it reads the time-stamp counter (`quanta`) rather than `Instant::now`.
fn clocks(c: &mut Criterion) {
    let mut group = c.benchmark_group("clock");
    group.bench_function("std_instant_now", |b| b.iter(std::time::Instant::now));
    group.bench_function("tokio_instant_now", |b| b.iter(tokio::time::Instant::now));
    let clock = quanta::Clock::new();
    group.bench_function("quanta_raw", |b| b.iter(|| clock.raw()));
    group.finish();
}

criterion_group!(benches, overhead, clocks);
criterion_main!(benches);
