//! Integration tests of the adaptive concurrency limit, on paused tokio time: a
//! simulated dependency whose latency steps up and back down under a closed-loop load,
//! proptests of the bounds over random latency sequences, the hook, shared state, the
//! shrinking invariant and the HTTP classification.

use std::{
    convert::Infallible,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use futures_util::future::join_all;
use http::{Response, StatusCode};
use http_body_util::Full;
use proptest::prelude::*;
use resilience::{
    concurrency_limit::{Algorithm, QueueSize, SampleWindow},
    Aimd, BoxError, ConcurrencyLimitLayer, Gradient2, InvalidAdaptiveLimit, Overloaded,
};
use tokio::{sync::oneshot, time::Instant};
use tower::{service_fn, Layer, Service, ServiceExt};

/// A hook's record: `(old, new, completed calls of the dependency at the change)`.
type Changes = Arc<Mutex<Vec<(usize, usize, usize)>>>;

/// The dependency of the step tests: every call sleeps the current latency (read when
/// it is called), then counts itself completed.
#[derive(Clone, Default)]
struct Dependency {
    latency_ms: Arc<AtomicU64>,
    completed: Arc<AtomicUsize>,
}

/// Runs `clients` closed-loop clients against `layer` over `dep` until `until`: each
/// calls again as soon as its call returns, or 5 ms after a rejection.
async fn load(layer: &ConcurrencyLimitLayer, dep: &Dependency, clients: usize, until: Instant) {
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let dep = dep.clone();
        let svc = layer.layer(service_fn(move |()| {
            let dep = dep.clone();
            async move {
                let ms = dep.latency_ms.load(Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                dep.completed.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Infallible>(())
            }
        }));
        tasks.push(tokio::spawn(async move {
            while Instant::now() < until {
                if let Err(e) = svc.clone().oneshot(()).await {
                    assert!(e.downcast_ref::<Overloaded>().is_some());
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// What a step test saw: the limit before the step up, the windows after it until the
/// limit was at most half of that, the limit at the step down and the windows after it
/// until the limit was back to 3/4 of the first.
#[derive(Debug)]
struct Step {
    before: usize,
    windows_to_halve: usize,
    at_step_down: usize,
    windows_to_recover: usize,
    changes: Vec<(usize, usize, usize)>,
}

const WINDOW: usize = 10;

async fn step(algorithm: Algorithm) -> Step {
    let changes: Changes = Arc::default();
    let dep = Dependency::default();
    dep.latency_ms.store(10, Ordering::SeqCst);
    let layer = ConcurrencyLimitLayer::adaptive(algorithm)
        .min(2)
        .max(64)
        .initial(8)
        .window(SampleWindow::Samples(WINDOW))
        .on_limit_change({
            let (changes, completed) = (changes.clone(), dep.completed.clone());
            move |old, new| {
                changes
                    .lock()
                    .unwrap()
                    .push((old, new, completed.load(Ordering::SeqCst)))
            }
        })
        .build();
    let start = Instant::now();

    // 2 s at 10 ms, 4 s at 100 ms, 3 s at 10 ms, under 100 clients.
    let driver = {
        let (layer, dep) = (layer.clone(), dep.clone());
        tokio::spawn(async move { load(&layer, &dep, 100, start + Duration::from_secs(9)).await })
    };
    tokio::time::sleep_until(start + Duration::from_secs(2)).await;
    let before = layer.limit();
    let up_at = dep.completed.load(Ordering::SeqCst);
    dep.latency_ms.store(100, Ordering::SeqCst);
    tokio::time::sleep_until(start + Duration::from_secs(6)).await;
    let at_step_down = layer.limit();
    let down_at = dep.completed.load(Ordering::SeqCst);
    dep.latency_ms.store(10, Ordering::SeqCst);
    driver.await.unwrap();

    let changes = changes.lock().unwrap().clone();
    // Windows since a step: the dependency's completions since, over the window size
    // (every completed call is one sample), rounded up.
    let windows = |from: usize, pred: &dyn Fn(usize) -> bool| {
        changes
            .iter()
            .find(|&&(_, new, at)| at > from && pred(new))
            .map(|&(_, _, at)| (at - from).div_ceil(WINDOW))
            .unwrap_or(usize::MAX)
    };
    Step {
        before,
        windows_to_halve: windows(up_at, &|new| new <= before / 2),
        at_step_down,
        windows_to_recover: windows(down_at, &|new| new >= before * 3 / 4),
        changes,
    }
}

fn assert_hook_saw_every_change(s: &Step, initial: usize, last: usize) {
    let mut prev = initial;
    for &(old, new, _) in &s.changes {
        assert_eq!(old, prev, "{s:?}");
        assert_ne!(old, new);
        assert!((2..=64).contains(&new));
        prev = new;
    }
    assert_eq!(prev, last);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn aimd_falls_when_latency_steps_up_and_rises_after_it_steps_down() {
    let aimd = Aimd::builder().timeout(Duration::from_millis(50)).build();
    let s = step(aimd.into()).await;
    // Grown to the maximum at 10 ms.
    assert_eq!(s.before, 64, "{s:?}");
    // First the windows of the 64 calls already in flight at the step (fast, 7 windows of
    // 10), then every sample is over the 50 ms threshold: ×0.9 per window, 0.9^7 < 0.5.
    assert!(s.windows_to_halve <= 7 + 7, "{s:?}");
    assert!(s.at_step_down <= 8, "{s:?}");
    // +1 per window once under the threshold again (the first window also holds the
    // calls in flight at the step down).
    assert!(s.windows_to_recover <= 48 - s.at_step_down + 2, "{s:?}");
    assert_hook_saw_every_change(&s, 8, s.changes.last().unwrap().1);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn gradient2_falls_when_latency_steps_up_and_rises_after_it_steps_down() {
    let s = step(Gradient2::default().into()).await;
    assert_eq!(s.before, 64, "{s:?}");
    // The 7 windows of the calls in flight at the step, then gradient 0.5 at 10× the
    // latency: limit × 0.9 + 0.2·√limit per window (smoothing 0.2), under half in 10.
    assert!(s.windows_to_halve <= 7 + 11, "{s:?}");
    assert!(s.at_step_down <= 8, "{s:?}");
    // Gradient 1 again: + 0.2·√limit per window, from 6 to 48 in about
    // 10·(√48 − √6) ≈ 45 windows.
    assert!(s.windows_to_recover <= 60, "{s:?}");
    assert_hook_saw_every_change(&s, 8, s.changes.last().unwrap().1);
}

/// One proptest case: random bounds, window and algorithm; batches of concurrent calls
/// with random latencies and outcomes. The limit stays within the bounds, the hook sees
/// a chain of changes ending at the limit, and no call is admitted at or over the limit.
fn run_bounds(
    algorithm: Algorithm,
    (min, max, initial): (usize, usize, usize),
    window: usize,
    batches: Vec<Vec<(u64, bool)>>,
) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async move {
        let changes = Arc::new(Mutex::new(Vec::new()));
        let layer = ConcurrencyLimitLayer::adaptive(algorithm)
            .min(min)
            .max(max)
            .initial(initial)
            .window(SampleWindow::Samples(window))
            .on_limit_change({
                let changes = changes.clone();
                move |old, new| changes.lock().unwrap().push((old, new))
            })
            .build();
        let live = Arc::new(AtomicUsize::new(0));
        let over = Arc::new(AtomicUsize::new(0));
        let svc = layer.layer(service_fn({
            let (layer, live, over) = (layer.clone(), live.clone(), over.clone());
            move |(ms, fail): (u64, bool)| {
                let now = live.fetch_add(1, Ordering::SeqCst) + 1;
                if now > layer.limit() {
                    over.fetch_add(1, Ordering::SeqCst);
                }
                let live = live.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    live.fetch_sub(1, Ordering::SeqCst);
                    if fail {
                        Err::<(), BoxError>("boom".into())
                    } else {
                        Ok(())
                    }
                }
            }
        }));
        for batch in batches {
            let calls = batch.into_iter().map(|req| svc.clone().oneshot(req));
            join_all(calls).await;
            prop_assert!((min..=max).contains(&layer.limit()));
        }
        prop_assert_eq!(over.load(Ordering::SeqCst), 0);
        let changes = changes.lock().unwrap();
        let mut prev = initial;
        for &(old, new) in changes.iter() {
            prop_assert_eq!(old, prev);
            prop_assert!(
                (min..=max).contains(&new),
                "{} outside {}..={}",
                new,
                min,
                max
            );
            prev = new;
        }
        prop_assert_eq!(prev, layer.limit());
        Ok(())
    })
}

fn bounds() -> impl Strategy<Value = (usize, usize, usize)> {
    (1usize..20, 0usize..40)
        .prop_flat_map(|(min, span)| (Just(min), Just(min + span), min..=min + span))
}

fn batches() -> impl Strategy<Value = Vec<Vec<(u64, bool)>>> {
    prop::collection::vec(
        prop::collection::vec((0u64..300, prop::bool::weighted(0.2)), 1..60),
        1..40,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn aimd_never_crosses_min_or_max(
        b in bounds(),
        window in 1usize..8,
        ratio in 0.05f64..0.99,
        timeout_ms in 1u64..200,
        batches in batches(),
    ) {
        let aimd = Aimd::builder()
            .backoff_ratio(ratio)
            .timeout(Duration::from_millis(timeout_ms))
            .build();
        run_bounds(aimd.into(), b, window, batches)?;
    }

    #[test]
    fn gradient2_never_crosses_min_or_max(
        b in bounds(),
        window in 1usize..8,
        smoothing in 0.01f64..=1.0,
        tolerance in 1.0f64..3.0,
        long_window in 1usize..700,
        fixed in prop::option::of(0usize..10),
        batches in batches(),
    ) {
        let g = Gradient2::builder()
            .smoothing(smoothing)
            .rtt_tolerance(tolerance)
            .long_window(long_window)
            .queue_size(fixed.map_or(QueueSize::Sqrt, QueueSize::Fixed))
            .build();
        run_bounds(g.into(), b, window, batches)?;
    }
}

/// An inner service whose calls wait for a signal and then fail or succeed as told.
fn gated() -> impl Service<
    oneshot::Receiver<bool>,
    Response = (),
    Error = BoxError,
    Future = impl std::future::Future<Output = Result<(), BoxError>> + Send,
> + Clone {
    service_fn(|rx: oneshot::Receiver<bool>| async move {
        match rx.await {
            Ok(true) => Err::<(), BoxError>("boom".into()),
            _ => Ok(()),
        }
    })
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_shrinking_limit_lets_calls_in_flight_finish_and_rejects_until_below_it() {
    let layer = ConcurrencyLimitLayer::adaptive(Aimd::default())
        .initial(4)
        .window(SampleWindow::Samples(1))
        .build();
    let mut svc = layer.layer(gated());
    let mut calls = Vec::new();
    for _ in 0..4 {
        let (tx, rx) = oneshot::channel();
        calls.push((tx, tokio::spawn(svc.ready().await.unwrap().call(rx))));
    }
    tokio::task::yield_now().await;
    assert_eq!((layer.in_flight(), layer.limit()), (4, 4));

    // Each failure shrinks the limit (4 → 3 → 2 → 1 → 1) while the others are still in
    // flight: they finish, and a new call is rejected until fewer than the limit are.
    let expected = [(3, 3), (2, 2), (1, 1), (0, 1)];
    for ((tx, call), (in_flight, limit)) in calls.into_iter().zip(expected) {
        tx.send(true).unwrap();
        assert_eq!(call.await.unwrap().unwrap_err().to_string(), "boom");
        assert_eq!((layer.in_flight(), layer.limit()), (in_flight, limit));
        let (_tx, rx) = oneshot::channel();
        let admitted = svc.ready().await.unwrap().call(rx);
        if in_flight < limit {
            assert_eq!(layer.in_flight(), in_flight + 1);
            drop(admitted);
        } else {
            let err = admitted.await.unwrap_err();
            assert!(err.downcast_ref::<Overloaded>().is_some());
        }
    }
    assert_eq!(layer.rejections(), 3);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn clones_and_services_share_one_limit() {
    let layer = ConcurrencyLimitLayer::adaptive(Aimd::default())
        .initial(10)
        .window(SampleWindow::Samples(1))
        .build();
    let clone = layer.clone();
    let a = layer.layer(gated());
    let b = clone.layer(gated());
    let (tx, rx) = oneshot::channel();
    let call = tokio::spawn(a.clone().oneshot(rx));
    tokio::task::yield_now().await;
    assert_eq!((b.in_flight(), clone.in_flight()), (1, 1));
    tx.send(true).unwrap();
    call.await.unwrap().unwrap_err();
    // One failure through `a` moved the limit every handle sees.
    assert_eq!(layer.limit(), 9);
    assert_eq!((clone.limit(), a.limit(), b.limit()), (9, 9, 9));
    assert_eq!((b.min(), b.max()), (1, 200));
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_time_window_updates_at_the_first_sample_after_it() {
    let changes = Arc::new(Mutex::new(Vec::new()));
    let layer = ConcurrencyLimitLayer::adaptive(Aimd::default())
        .initial(10)
        .window(SampleWindow::Time(Duration::from_secs(1)))
        .on_limit_change({
            let changes = changes.clone();
            move |old, new| changes.lock().unwrap().push((old, new))
        })
        .build();
    let svc = layer.layer(service_fn(|fail: bool| async move {
        if fail {
            Err::<(), BoxError>("boom".into())
        } else {
            Ok(())
        }
    }));
    // Failures within the first second: no update yet.
    for _ in 0..3 {
        svc.clone().oneshot(true).await.unwrap_err();
        tokio::time::advance(Duration::from_millis(300)).await;
    }
    assert_eq!(layer.limit(), 10);
    tokio::time::advance(Duration::from_millis(200)).await;
    // 1.1 s after the window's first sample: this one closes it, with its drops.
    svc.clone().oneshot(false).await.unwrap();
    assert_eq!(layer.limit(), 9);
    assert_eq!(*changes.lock().unwrap(), [(10, 9)]);
    assert_eq!(
        layer.window(),
        Some(SampleWindow::Time(Duration::from_secs(1)))
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn in_http_mode_a_5xx_is_a_drop_and_a_2xx_is_not() {
    let layer = ConcurrencyLimitLayer::adaptive(Aimd::default())
        .initial(10)
        .window(SampleWindow::Samples(1))
        .build()
        .http();
    let svc = layer.layer(service_fn(|status: u16| async move {
        let mut res = Response::new(Full::<bytes::Bytes>::default());
        *res.status_mut() = StatusCode::from_u16(status).unwrap();
        Ok::<_, Infallible>(res)
    }));
    for (status, limit) in [(200, 10), (404, 10), (500, 9), (503, 8), (200, 8)] {
        let res = svc.clone().oneshot(status).await.unwrap();
        assert_eq!(res.status().as_u16(), status);
        assert_eq!(layer.limit(), limit, "after {status}");
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_slow_success_over_the_aimd_timeout_is_a_drop() {
    let aimd = Aimd::builder().timeout(Duration::from_millis(100)).build();
    let layer = ConcurrencyLimitLayer::adaptive(aimd)
        .initial(10)
        .window(SampleWindow::Samples(1))
        .build();
    let svc = layer.layer(service_fn(|ms: u64| async move {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok::<_, BoxError>(())
    }));
    svc.clone().oneshot(100).await.unwrap();
    assert_eq!(layer.limit(), 10);
    svc.clone().oneshot(101).await.unwrap();
    assert_eq!(layer.limit(), 9);
}

#[test]
fn defaults_getters_and_refusals() {
    let aimd = Aimd::default();
    assert_eq!(
        (aimd.backoff_ratio(), aimd.timeout()),
        (0.9, Duration::from_secs(5))
    );
    let g = Gradient2::default();
    assert_eq!(
        (
            g.smoothing(),
            g.rtt_tolerance(),
            g.long_window(),
            g.queue_size()
        ),
        (0.2, 1.5, 600, QueueSize::Sqrt)
    );
    let layer = ConcurrencyLimitLayer::adaptive(g).build();
    assert_eq!((layer.min(), layer.limit(), layer.max()), (1, 20, 200));
    assert_eq!(layer.algorithm(), Some(Algorithm::Gradient2(g)));
    assert_eq!(layer.window(), Some(SampleWindow::Samples(10)));
    let fixed = ConcurrencyLimitLayer::new(5);
    assert_eq!((fixed.min(), fixed.limit(), fixed.max()), (5, 5, 5));
    assert_eq!((fixed.algorithm(), fixed.window()), (None, None));

    let reason =
        |r: Result<ConcurrencyLimitLayer, InvalidAdaptiveLimit>| r.unwrap_err().reason().to_owned();
    let a = || ConcurrencyLimitLayer::adaptive(Aimd::default());
    assert_eq!(
        reason(a().min(0).try_build()),
        "the minimum must be at least 1"
    );
    assert_eq!(
        reason(a().min(5).max(4).initial(4).try_build()),
        "the maximum must be at least the minimum"
    );
    assert_eq!(
        reason(a().max(10).initial(11).try_build()),
        "the initial limit must be between the minimum and the maximum"
    );
    assert_eq!(
        reason(a().window(SampleWindow::Samples(0)).try_build()),
        "the window must be at least 1 sample"
    );
    assert_eq!(
        reason(a().window(SampleWindow::Time(Duration::ZERO)).try_build()),
        "the window must be longer than 0"
    );
    let err = Aimd::builder().backoff_ratio(1.0).try_build().unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid adaptive concurrency limit: the backoff ratio must be in (0, 1)"
    );
    assert!(Aimd::builder().timeout(Duration::ZERO).try_build().is_err());
    assert!(Gradient2::builder().smoothing(0.0).try_build().is_err());
    assert!(Gradient2::builder().rtt_tolerance(0.9).try_build().is_err());
    assert!(Gradient2::builder().long_window(0).try_build().is_err());
    assert!(a().min(3).max(3).initial(3).try_build().is_ok());
}

#[test]
#[should_panic(expected = "invalid adaptive concurrency limit: the minimum must be at least 1")]
fn build_panics_on_a_bad_value() {
    let _ = ConcurrencyLimitLayer::adaptive(Aimd::default())
        .min(0)
        .build();
}
