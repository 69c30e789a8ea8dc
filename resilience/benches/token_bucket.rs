//! Token bucket vs governor, same run, same machine.
//!
//! `cargo bench -p resilience --bench token_bucket -- --warm-up-time 1 --measurement-time 2`
//!
//! - `direct/*`: one bucket, `TokenBucket::try_acquire` vs governor's direct `check`.
//! - `keyed_10k/*`: 10 000 keys (IPv4 addresses), cycled, `KeyedTokenBuckets::try_acquire`
//!   vs governor's keyed (`DashMap`) `check_key`.
//! - `layer/*`: a pass-through service bare, then behind a global and a keyed (10 000
//!   keys) `TokenBucketLayer`, futures polled by hand: the layer's overhead per call.
//! - `clock/*`: the cost of reading the time, which both pay on every decision.
//! - `*_std_clock`: governor on std's `Instant`, to compare the algorithms on the clock
//!   the buckets used before they moved to the time-stamp counter.
//! - `*_2threads`: two OS threads hammer the same limiter; the time is per operation per
//!   thread (wall time of the slower thread / its operations).
//!
//! Rates are huge so both limiters grant (almost) every request: this measures the cost
//! of the decision, not of a refusal. Before the timings, the bench prints the bytes per
//! key of both keyed limiters, measured with a counting allocator.

mod support;

use std::{
    alloc::{GlobalAlloc, Layout, System},
    hint::black_box,
    net::{IpAddr, Ipv4Addr},
    num::NonZeroU32,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Barrier,
    },
    task::{Context, Waker},
    time::{Duration, Instant},
};

use criterion::{criterion_group, Criterion};
use governor::{
    clock::{Clock, MonotonicClock, QuantaClock},
    middleware::NoOpMiddleware,
    state::keyed::DashMapStateStore,
    Quota, RateLimiter,
};
use resilience::{key_fn, Burst, KeyedTokenBuckets, Rate, TokenBucket, TokenBucketLayer};
use support::{once, PassThrough};
use tower::Layer;

/// Counts live heap bytes, to measure memory per key.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const RATE: u32 = 1_000_000_000;
const KEYS: u32 = 10_000;

fn quota() -> Quota {
    Quota::per_second(NonZeroU32::new(RATE).expect("non-zero"))
}

fn key(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
}

/// Runs `op(thread, i)` for `i in 0..iters` on `threads` threads at once; returns the
/// wall time of the slowest.
fn on_threads<F>(threads: usize, iters: u64, op: F) -> Duration
where
    F: Fn(usize, u64) + Send + Sync + 'static,
{
    let op = Arc::new(op);
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (op, barrier) = (op.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let start = Instant::now();
                for i in 0..iters {
                    op(t, i);
                }
                start.elapsed()
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("bench thread"))
        .max()
        .unwrap_or_default()
}

fn clock(c: &mut Criterion) {
    // What a decision pays just to read the time.
    let mut group = c.benchmark_group("clock");
    group.bench_function("std_instant_now", |b| b.iter(std::time::Instant::now));
    group.bench_function("tokio_instant_now", |b| b.iter(tokio::time::Instant::now));
    let quanta = QuantaClock::default();
    group.bench_function("governor_quanta_now", |b| b.iter(|| quanta.now()));
    group.finish();
}

fn direct(c: &mut Criterion) {
    let mut group = c.benchmark_group("direct");
    let ours = TokenBucket::new(Rate::per_second(f64::from(RATE)), Burst(RATE));
    let theirs = RateLimiter::direct(quota());
    group.bench_function("resilience_try_acquire", |b| {
        b.iter(|| black_box(ours.try_acquire().is_ok()))
    });
    group.bench_function("governor_check", |b| {
        b.iter(|| black_box(theirs.check().is_ok()))
    });
    // Same clock as ours (std `Instant`), to compare the algorithms alone.
    let theirs_std = RateLimiter::direct_with_clock(quota(), MonotonicClock);
    group.bench_function("governor_check_std_clock", |b| {
        b.iter(|| black_box(theirs_std.check().is_ok()))
    });
    let ours = Arc::new(ours);
    let theirs = Arc::new(theirs);
    group.bench_function("resilience_try_acquire_2threads", |b| {
        b.iter_custom(|iters| {
            let ours = ours.clone();
            on_threads(2, iters, move |_, _| {
                black_box(ours.try_acquire().is_ok());
            })
        })
    });
    group.bench_function("governor_check_2threads", |b| {
        b.iter_custom(|iters| {
            let theirs = theirs.clone();
            on_threads(2, iters, move |_, _| {
                black_box(theirs.check().is_ok());
            })
        })
    });
    group.finish();
}

fn keyed(c: &mut Criterion) {
    let mut group = c.benchmark_group("keyed_10k");
    let keys: Arc<Vec<IpAddr>> = Arc::new((0..KEYS).map(key).collect());
    let ours = Arc::new(KeyedTokenBuckets::<IpAddr>::new(
        Rate::per_second(f64::from(RATE)),
        Burst(RATE),
    ));
    let theirs = Arc::new(RateLimiter::<IpAddr, _, _>::keyed(quota()));
    let theirs_std: RateLimiter<
        IpAddr,
        DashMapStateStore<IpAddr>,
        MonotonicClock,
        NoOpMiddleware<Instant>,
    > = RateLimiter::dashmap_with_clock(quota(), MonotonicClock);
    // Every key has state before timing: this is the steady state of a busy server.
    for k in keys.iter() {
        let _ = ours.try_acquire(k);
        let _ = theirs.check_key(k);
        let _ = theirs_std.check_key(k);
    }

    let mut i = 0usize;
    group.bench_function("resilience_try_acquire", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            black_box(ours.try_acquire(&keys[i]).is_ok())
        })
    });
    let mut i = 0usize;
    group.bench_function("governor_check_key", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            black_box(theirs.check_key(&keys[i]).is_ok())
        })
    });
    let mut i = 0usize;
    group.bench_function("governor_check_key_std_clock", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            black_box(theirs_std.check_key(&keys[i]).is_ok())
        })
    });
    group.bench_function("resilience_try_acquire_2threads", |b| {
        b.iter_custom(|iters| {
            let (ours, keys) = (ours.clone(), keys.clone());
            on_threads(2, iters, move |t, i| {
                // The threads walk the keys from different ends.
                let k = (i as usize * 7919 + t * 5000) % keys.len();
                black_box(ours.try_acquire(&keys[k]).is_ok());
            })
        })
    });
    group.bench_function("governor_check_key_2threads", |b| {
        b.iter_custom(|iters| {
            let (theirs, keys) = (theirs.clone(), keys.clone());
            on_threads(2, iters, move |t, i| {
                let k = (i as usize * 7919 + t * 5000) % keys.len();
                black_box(theirs.check_key(&keys[k]).is_ok());
            })
        })
    });
    group.finish();
}

fn layer(c: &mut Criterion) {
    let mut cx = Context::from_waker(Waker::noop());
    let mut group = c.benchmark_group("layer");
    let rate = Rate::per_second(f64::from(RATE));

    let mut bare = PassThrough;
    group.bench_function("pass_through", |b| {
        b.iter(|| once(&mut bare, &mut cx, black_box(1)))
    });

    let mut global = TokenBucketLayer::new(rate, Burst(RATE)).layer(PassThrough);
    group.bench_function("global", |b| {
        b.iter(|| once(&mut global, &mut cx, black_box(1)))
    });

    // The request is the key: 10 000 distinct keys, cycled, all with state already.
    let keyed = TokenBucketLayer::builder(rate, Burst(RATE))
        .key(key_fn(|req: &u64| Some(*req)))
        .build();
    let mut keyed = keyed.layer(PassThrough);
    for k in 0..u64::from(KEYS) {
        once(&mut keyed, &mut cx, k);
    }
    let mut i = 0u64;
    group.bench_function("keyed_10k", |b| {
        b.iter(|| {
            i = (i + 1) % u64::from(KEYS);
            once(&mut keyed, &mut cx, black_box(i))
        })
    });
    group.finish();
}

/// Live heap bytes `build` leaves allocated in what it returns.
fn live_bytes<T>(build: impl FnOnce() -> T) -> (usize, T) {
    let before = LIVE.load(Ordering::SeqCst);
    let value = build();
    (LIVE.load(Ordering::SeqCst).saturating_sub(before), value)
}

fn memory(_c: &mut Criterion) {
    println!(
        "slot: {} bytes per IpAddr key (key + 4-byte hash + 8-byte state, padded, + control byte)",
        KeyedTokenBuckets::<IpAddr>::slot_bytes()
    );
    for n in [10_000u32, 100_000, 1_000_000] {
        let (bytes, ours) = live_bytes(|| {
            let ours = KeyedTokenBuckets::<IpAddr>::new(Rate::per_second(1.0), Burst(10));
            for i in 0..n {
                let _ = ours.try_acquire(&key(i));
            }
            ours
        });
        println!(
            "resilience keyed, {n:>9} distinct keys: {} stored, {bytes:>10} bytes, {:.1} bytes per stored key",
            ours.len(),
            bytes as f64 / ours.len() as f64
        );
        drop(ours);
        let (bytes, theirs) = live_bytes(|| {
            let theirs = RateLimiter::<IpAddr, _, _>::keyed(Quota::per_second(
                NonZeroU32::new(1).expect("non-zero"),
            ));
            for i in 0..n {
                let _ = theirs.check_key(&key(i));
            }
            theirs
        });
        println!(
            "governor keyed,   {n:>9} distinct keys: {} stored, {bytes:>10} bytes, {:.1} bytes per stored key",
            theirs.len(),
            bytes as f64 / theirs.len() as f64
        );
    }
}

criterion_group!(benches, memory, clock, direct, keyed, layer);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
