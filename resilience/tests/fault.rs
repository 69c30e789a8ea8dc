//! Fault injection: seeded, so the same seed gives the same faults and delays; rates
//! and modes do what they say. On paused tokio time throughout.

use std::{
    convert::Infallible,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use http::{Request, Response, StatusCode};
use proptest::prelude::*;
use resilience::fault::{FaultLayer, FaultLayerBuilder, FaultStats, InjectedFault, Latency};
use tokio::time::Instant;
use tower::{service_fn, Layer, ServiceExt};

const MS: Duration = Duration::from_millis(1);

fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime")
}

/// Runs `calls` calls one after the other through a layer built by `builder`; returns
/// each call's outcome (`true`: it passed) and how long it took.
async fn sequence(builder: FaultLayerBuilder, calls: u32) -> Vec<(bool, Duration)> {
    let svc = builder
        .build()
        .layer(service_fn(|n: u32| async move { Ok::<_, Infallible>(n) }));
    let mut out = Vec::new();
    for n in 0..calls {
        let start = Instant::now();
        let outcome = svc.clone().oneshot(n).await;
        out.push((outcome.is_ok(), start.elapsed()));
    }
    out
}

fn chaos(seed: u64) -> FaultLayerBuilder {
    FaultLayer::builder(seed)
        .error_rate(0.3)
        .latency(Latency::uniform(MS, 100 * MS))
        .latency_rate(0.5)
}

#[test]
fn the_same_seed_gives_the_same_outcomes_and_latencies() {
    let run = |seed| paused_runtime().block_on(sequence(chaos(seed), 200));
    let first = run(1234);
    assert_eq!(first, run(1234));
    // Not a constant sequence: some of each outcome, several distinct delays.
    assert!(first.iter().any(|(ok, _)| *ok) && first.iter().any(|(ok, _)| !*ok));
    let mut delays: Vec<_> = first.iter().map(|(_, d)| *d).collect();
    delays.sort();
    delays.dedup();
    assert!(delays.len() > 50, "{} distinct delays", delays.len());
    // Another seed, another sequence.
    assert_ne!(first, run(1235));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn any_seed_is_reproducible_and_delays_stay_within_bounds(seed in any::<u64>()) {
        let run = || paused_runtime().block_on(sequence(chaos(seed), 50));
        let first = run();
        prop_assert_eq!(&first, &run());
        for (_, d) in first {
            // Paused time: a delay is exactly what was drawn; no delay is exactly 0.
            prop_assert!(d == Duration::ZERO || (MS..=100 * MS).contains(&d), "{:?}", d);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn rates_zero_and_one_are_never_and_always() {
    let never = sequence(FaultLayer::builder(9).error_rate(0.0), 100).await;
    assert!(never.iter().all(|(ok, d)| *ok && d.is_zero()));
    let always = sequence(
        FaultLayer::builder(9)
            .error_rate(1.0)
            .latency(Latency::fixed(20 * MS)),
        100,
    )
    .await;
    assert!(always.iter().all(|(ok, d)| !*ok && *d == 20 * MS));
}

#[tokio::test(start_paused = true)]
async fn the_error_rate_is_about_right_and_the_stats_add_up() {
    let layer = FaultLayer::builder(5)
        .error_rate(0.25)
        .latency(Latency::fixed(MS))
        .latency_rate(0.1)
        .build();
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let svc = layer.layer(service_fn(move |n: u32| {
        counted.fetch_add(1, Ordering::SeqCst);
        async move { Ok::<_, Infallible>(n) }
    }));
    let mut failed = 0;
    for n in 0..4000 {
        if let Err(e) = svc.clone().oneshot(n).await {
            assert!(e.downcast_ref::<InjectedFault>().is_some());
            failed += 1;
        }
    }
    let FaultStats {
        calls: decided,
        errors,
        delayed,
    } = layer.stats();
    assert_eq!((decided, errors), (4000, failed));
    // A failed call never reaches the service.
    assert_eq!(calls.load(Ordering::SeqCst) as u64, 4000 - failed);
    assert!((800..1200).contains(&failed), "{failed} of 4000 failed");
    assert!((250..550).contains(&delayed), "{delayed} of 4000 delayed");
}

#[tokio::test(start_paused = true)]
async fn a_custom_error_in_error_mode() {
    let layer = FaultLayer::builder(1)
        .error_rate(1.0)
        .error(|| std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused"))
        .build();
    let svc = layer.layer(service_fn(|n: u32| async move { Ok::<_, Infallible>(n) }));
    let err = svc.oneshot(1).await.unwrap_err();
    let io = err
        .downcast_ref::<std::io::Error>()
        .expect("the configured error");
    assert_eq!(io.kind(), std::io::ErrorKind::ConnectionRefused);
}

#[tokio::test(start_paused = true)]
async fn http_mode_answers_the_status_and_passes_the_rest() {
    let layer = FaultLayer::builder(3)
        .error_rate(0.5)
        .status(StatusCode::GATEWAY_TIMEOUT)
        .build()
        .http();
    assert_eq!(layer.status(), StatusCode::GATEWAY_TIMEOUT);
    let svc = layer.layer(service_fn(|_req: Request<String>| async {
        Ok::<_, Infallible>(Response::new(String::from("fine")))
    }));
    let mut statuses = Vec::new();
    for _ in 0..40 {
        let res = svc
            .clone()
            .oneshot(Request::new(String::new()))
            .await
            .unwrap();
        if res.status() == StatusCode::GATEWAY_TIMEOUT {
            assert_eq!(res.headers()["x-injected-fault"], "1");
        } else {
            assert!(res.headers().get("x-injected-fault").is_none());
        }
        statuses.push(res.status());
    }
    assert!(statuses.contains(&StatusCode::OK));
    assert!(statuses.contains(&StatusCode::GATEWAY_TIMEOUT));
}

#[test]
fn bad_values_are_refused() {
    assert!(FaultLayer::builder(0).error_rate(1.5).try_build().is_err());
    assert!(FaultLayer::builder(0)
        .error_rate(f64::NAN)
        .try_build()
        .is_err());
    assert!(FaultLayer::builder(0)
        .latency_rate(-0.1)
        .try_build()
        .is_err());
    let err = FaultLayer::builder(0)
        .latency(Latency::uniform(2 * MS, MS))
        .try_build()
        .unwrap_err();
    assert_eq!(
        err.reason(),
        "the shortest latency must not be above the longest"
    );
    let layer = FaultLayer::builder(17)
        .error_rate(0.5)
        .latency(Latency::fixed(MS))
        .latency_rate(0.25)
        .build();
    assert_eq!(
        (
            layer.seed(),
            layer.error_rate(),
            layer.latency(),
            layer.latency_rate()
        ),
        (17, 0.5, Some(Latency::fixed(MS)), 0.25)
    );
}

#[test]
#[should_panic(expected = "a rate must be within 0..=1")]
fn build_panics_on_a_bad_rate() {
    let _ = FaultLayer::builder(0).error_rate(2.0).build();
}
