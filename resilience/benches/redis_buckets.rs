//! Shared buckets on a local Redis: one decision of `RedisBuckets::try_acquire` (one
//! `EVALSHA` round trip) next to a plain `PING` round trip on a connection of its own,
//! and the local fallback's decision, in the same run.
//!
//! `cargo bench -p resilience --features redis --bench redis_buckets -- --warm-up-time 1 --measurement-time 2`
//!
//! Needs Redis on 127.0.0.1:6379 (prints why and measures nothing without it). Keys
//! go under a prefix of their own and expire once full.

use std::{hint::black_box, time::Duration};

use criterion::{criterion_group, Criterion};
use resilience::{Burst, Rate, RedisBuckets, RedisFallback};

const REDIS: &str = "redis://127.0.0.1:6379";

fn shared(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let Ok(client) = redis::Client::open(REDIS) else {
        println!("skipped: bad Redis URI {REDIS}");
        return;
    };
    let conn = rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(2),
            client.get_multiplexed_async_connection(),
        )
        .await
    });
    let Ok(Ok(conn)) = conn else {
        println!("skipped: Redis at {REDIS} is unreachable");
        return;
    };
    let prefix = format!("resilience-bench:{}:", std::process::id());
    // The connection manager spawns its task on the runtime it is built in.
    let _runtime = rt.enter();
    // Huge rate: every decision is a grant, as in the local benches.
    let buckets: RedisBuckets<u32> =
        RedisBuckets::builder(client, Rate::per_second(1e9), Burst(1_000_000_000))
            .prefix(prefix)
            .timeout(Duration::from_millis(500))
            .fallback(RedisFallback::Deny)
            .build();

    let mut group = c.benchmark_group("redis");
    group.bench_function("ping_round_trip", |b| {
        b.to_async(&rt).iter(|| {
            let mut conn = conn.clone();
            async move {
                let pong: Result<String, _> = redis::cmd("PING").query_async(&mut conn).await;
                black_box(pong.is_ok())
            }
        })
    });
    let mut k = 0u32;
    group.bench_function("redis_buckets_try_acquire_1k_keys", |b| {
        b.to_async(&rt).iter(|| {
            k = (k + 1) % 1000;
            let (buckets, key) = (&buckets, k);
            async move { black_box(buckets.try_acquire(&key).await.is_ok()) }
        })
    });
    group.finish();
    println!(
        "fallbacks during the run: {} (0: every decision was Redis's)",
        buckets.fallbacks()
    );
}

criterion_group!(benches, shared);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
