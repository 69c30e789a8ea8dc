//! The `GET /presence` body: the hand-written listing writer next to `serde_json`
//! (meta as a borrowed `RawValue`, numbers by its `itoa`) on the same 10 000 and
//! 100 000 nodes with a small meta, in the same run. The hand-written writer stays
//! only while it is more than 5 % faster.
//!
//! Run: `cargo bench -p presence --bench list_writer -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use presence::store::json::compare::{by_hand, by_serde, Row};

fn rows(n: u64) -> Vec<Row> {
    (0..n)
        .map(|i| {
            (
                format!("node-{i:06}"),
                r#"{"load":0.5,"hp":90}"#.to_owned(),
                1_764_424_123_456 + i,
                1_764_424_125_456 + i,
                1_764_424_134_456 + i,
            )
        })
        .collect()
}

fn listing(c: &mut Criterion) {
    let mut group = c.benchmark_group("list_writer");
    for n in [10_000u64, 100_000] {
        let rows = rows(n);
        group.throughput(Throughput::Elements(n));
        group.bench_with_input(BenchmarkId::new("by_hand", n), &rows, |b, rows| {
            b.iter(|| black_box(by_hand(rows)).len())
        });
        group.bench_with_input(
            BenchmarkId::new("serde_json_raw_value", n),
            &rows,
            |b, rows| b.iter(|| black_box(by_serde(rows)).len()),
        );
    }
    group.finish();
}

criterion_group!(benches, listing);
criterion_main!(benches);
