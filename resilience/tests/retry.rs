//! The retry layer: its budget's bound (against tower's `TpsBudget` on the same
//! schedules), the HTTP policy's rules on paused time, and its place inside a circuit
//! breaker.

use std::{
    convert::Infallible,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use proptest::prelude::*;
use resilience::{
    retry::{Action, HttpRetryPolicy, Refused, RetryBudget, RetryLayer, RetryPolicy},
    BoxError, CircuitBreaker, CircuitBreakerLayer, CircuitOpen, FaultLayer,
};
use tokio::time::Instant;
use tower::{
    retry::budget::{Budget, TpsBudget},
    service_fn, Layer, Service, ServiceBuilder, ServiceExt,
};

/// Retries every error, at once, up to `max` attempts.
struct AlwaysRetry {
    max: u32,
}

impl<Res, E> RetryPolicy<u32, Res, E> for AlwaysRetry {
    fn retry(&self, result: &Result<Res, E>, attempts: u32) -> Action {
        match result {
            Err(_) if attempts < self.max => Action::Retry {
                after: Duration::ZERO,
            },
            _ => Action::Stop,
        }
    }

    fn clone_request(&self, req: &u32) -> Result<u32, Refused> {
        Ok(*req)
    }
}

/// A dependency that is down: a fault layer failing every call with "connection
/// refused". Its `stats().calls` counts the attempts that reached it.
fn down() -> FaultLayer {
    FaultLayer::builder(0)
        .error_rate(1.0)
        .error(|| "connection refused")
        .build()
}

/// What `down()` wraps; never reached.
fn echo() -> impl Service<u32, Response = u32, Error = Infallible, Future: Send> + Clone {
    service_fn(|req: u32| async move { Ok::<_, Infallible>(req) })
}

/// One step of a schedule: wait `gap_ms`, then make `burst` calls.
#[derive(Clone, Debug)]
struct Step {
    gap_ms: u64,
    burst: u32,
}

fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
}

/// The worst `retries − (ratio × requests + floor × t + initial)` over a schedule, for
/// our budget (through the layer, on a dependency that always fails) and for tower's
/// `TpsBudget` (deposit per request, withdraw per retry, the same attempt cap; it has no
/// start-up allowance, so `initial` only loosens its bound).
fn overspend(
    schedule: &[Step],
    ratio: f64,
    floor: u32,
    window_s: u64,
    max: u32,
    initial: u32,
) -> (f64, f64) {
    paused_runtime().block_on(async {
        let budget = RetryBudget::builder()
            .ratio(ratio)
            .min_per_sec(f64::from(floor))
            .window(Duration::from_secs(window_s))
            .initial(initial)
            .build();
        let tps = TpsBudget::new(Duration::from_secs(window_s), floor, ratio as f32);
        let start = Instant::now();
        let dependency = down();
        let svc = RetryLayer::new(AlwaysRetry { max })
            .budget(budget.clone())
            .layer(dependency.layer(echo()));

        let (mut requests, mut tps_retries) = (0u64, 0u64);
        let (mut ours_worst, mut tower_worst) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
        for step in schedule {
            tokio::time::advance(Duration::from_millis(step.gap_ms)).await;
            for _ in 0..step.burst {
                assert!(svc.clone().oneshot(7).await.is_err());
                requests += 1;
                tps.deposit();
                for _ in 1..max {
                    if !tps.withdraw() {
                        break;
                    }
                    tps_retries += 1;
                }
                let allowed = ratio * requests as f64
                    + f64::from(floor) * start.elapsed().as_secs_f64()
                    + f64::from(initial);
                let retries = dependency.stats().calls - requests;
                assert_eq!(budget.stats().retries, retries);
                ours_worst = ours_worst.max(retries as f64 - allowed);
                tower_worst = tower_worst.max(tps_retries as f64 - allowed);
            }
        }
        (ours_worst, tower_worst)
    })
}

/// The largest overspend of tower's `TpsBudget` the property test has seen.
static TOWER_WORST: Mutex<f64> = Mutex::new(0.0);

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn budget_never_lets_retries_exceed_ratio_times_requests_plus_floor_times_t_plus_initial(
        schedule in prop::collection::vec(
            (0u64..4_000, 1u32..25).prop_map(|(gap_ms, burst)| Step { gap_ms, burst }),
            1..40,
        ),
        ratio in prop::sample::select(vec![0.0, 0.1, 0.2, 0.5, 1.0, 2.5]),
        floor in prop::sample::select(vec![0u32, 1, 5, 10]),
        window_s in 1u64..20,
        max in 2u32..6,
        initial in prop::sample::select(vec![0u32, 1, 3, 10]),
    ) {
        let (ours, tower) = overspend(&schedule, ratio, floor, window_s, max, initial);
        prop_assert!(ours <= 1e-9, "our budget overspent by {ours}");
        let mut worst = TOWER_WORST.lock().unwrap();
        if tower > *worst {
            *worst = tower;
            eprintln!(
                "overspend (retries − ratio×requests − floor×t): ours {ours:.3}, \
                 tower TpsBudget {tower:.3} (ratio {ratio}, floor {floor}/s, window {window_s} s, \
                 {} steps)",
                schedule.len()
            );
        }
    }
}

#[test]
fn tower_tps_budget_overspend_beside_ours_on_fixed_schedules() {
    // A cold start: one burst at t = 0, with the defaults (0.2, 10/s, 10 s).
    let cold = [Step {
        gap_ms: 0,
        burst: 50,
    }];
    // Steady trickle, one request every 500 ms for a minute.
    let trickle: Vec<_> = (0..120)
        .map(|_| Step {
            gap_ms: 500,
            burst: 1,
        })
        .collect();
    // Bursts 11 s apart, each after the last one's credit has expired.
    let bursts: Vec<_> = (0..6)
        .map(|_| Step {
            gap_ms: 11_000,
            burst: 40,
        })
        .collect();
    for (name, schedule) in [
        ("cold start", &cold[..]),
        ("trickle", &trickle),
        ("bursts", &bursts),
    ] {
        let (ours, tower) = overspend(schedule, 0.2, 10, 10, 4, 0);
        eprintln!("{name}: overspend ours {ours:.3}, tower TpsBudget {tower:.3}");
        assert!(ours <= 1e-9);
    }
}

#[test]
fn a_start_up_allowance_retries_the_first_failing_calls_and_only_initial_of_them() {
    paused_runtime().block_on(async {
        // Without one, the very first failing call is not retried: nothing deposited yet,
        // no floor accrued yet.
        let dependency = down();
        let bare = RetryLayer::new(AlwaysRetry { max: 3 })
            .budget(RetryBudget::builder().ratio(0.2).min_per_sec(10.0).build());
        assert!(bare
            .layer(dependency.layer(echo()))
            .oneshot(1)
            .await
            .is_err());
        assert_eq!(dependency.stats().calls, 1);
        assert_eq!(bare.retry_budget().stats().denied, 1);

        // With `initial(2)`: the first call gets its two retries at t = 0...
        let dependency = down();
        let budget = RetryBudget::builder()
            .ratio(0.2)
            .min_per_sec(10.0)
            .initial(2)
            .build();
        assert_eq!(budget.initial(), 2);
        let layer = RetryLayer::new(AlwaysRetry { max: 3 }).budget(budget.clone());
        let svc = layer.layer(dependency.layer(echo()));
        assert!(svc.clone().oneshot(1).await.is_err());
        assert_eq!(dependency.stats().calls, 3);
        // ...and the allowance does not refill: the next call at t = 0 has only its own
        // 0.2 + the first call's 0.2 of credit.
        assert!(svc.clone().oneshot(2).await.is_err());
        assert_eq!(dependency.stats().calls, 4);
        assert_eq!(
            budget.stats(),
            resilience::retry::BudgetStats {
                requests: 2,
                retries: 2,
                denied: 1
            }
        );
        // The floor still accrues afterwards, as without an allowance.
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(svc.clone().oneshot(3).await.is_err());
        assert_eq!(dependency.stats().calls, 6);
    });
}

#[test]
fn budget_allows_exactly_the_ratio_of_a_burst() {
    let (retries, requests) = paused_runtime().block_on(async {
        let budget = RetryBudget::builder().ratio(0.2).min_per_sec(0.0).build();
        let svc = RetryLayer::new(AlwaysRetry { max: 2 })
            .budget(budget.clone())
            .layer(down().layer(echo()));
        for _ in 0..100 {
            let _ = svc.clone().oneshot(1).await;
        }
        let stats = budget.stats();
        (stats.retries, stats.requests)
    });
    assert_eq!((retries, requests), (20, 100));
}

#[tokio::test(start_paused = true)]
async fn budget_is_shared_by_every_service_of_a_layer_and_their_clones() {
    let layer = RetryLayer::new(AlwaysRetry { max: 5 })
        .budget(RetryBudget::builder().ratio(1.0).min_per_sec(0.0).build());
    let dependency = down();
    let a = layer.layer(dependency.layer(echo()));
    let b = layer.layer(dependency.layer(echo()));
    let _ = a.clone().oneshot(1).await;
    let _ = b.clone().oneshot(2).await;
    let _ = a.oneshot(3).await;
    // Three deposits of 1: three retries in all, across services and clones.
    assert_eq!(dependency.stats().calls, 6);
    let stats = layer.retry_budget().stats();
    assert_eq!((stats.requests, stats.retries), (3, 3));
}

// ===== the HTTP policy =====

type Req = Request<Full<Bytes>>;
type Res = Response<Full<Bytes>>;

/// A dependency answering from `responses` in turn (the last one forever), recording
/// the instant of each call.
#[derive(Clone)]
struct Scripted {
    responses: Arc<Vec<(StatusCode, Option<String>)>>,
    calls: Arc<Mutex<Vec<Instant>>>,
}

impl Scripted {
    fn new(responses: Vec<(StatusCode, Option<String>)>) -> Self {
        Scripted {
            responses: Arc::new(responses),
            calls: Arc::default(),
        }
    }

    fn calls(&self) -> usize {
        self.calls.lock().unwrap().len()
    }

    fn gaps(&self) -> Vec<Duration> {
        let calls = self.calls.lock().unwrap();
        calls.windows(2).map(|w| w[1] - w[0]).collect()
    }
}

impl<B> Service<Request<B>> for Scripted {
    type Response = Res;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Res, BoxError>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Request<B>) -> Self::Future {
        let mut calls = self.calls.lock().unwrap();
        let (status, retry_after) =
            self.responses[calls.len().min(self.responses.len() - 1)].clone();
        calls.push(Instant::now());
        let mut res = Response::builder().status(status);
        if let Some(v) = retry_after {
            res = res.header("retry-after", v);
        }
        std::future::ready(Ok(res.body(Full::new(Bytes::from_static(b"x"))).unwrap()))
    }
}

/// A budget that never gets in the way of these tests.
fn roomy() -> RetryBudget {
    RetryBudget::builder().ratio(100.0).build()
}

fn get() -> Req {
    Request::get("http://svc.local/")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn retry_after_seconds_delays_the_retry() {
    let dep = Scripted::new(vec![
        (StatusCode::SERVICE_UNAVAILABLE, Some("2".into())),
        (StatusCode::OK, None),
    ]);
    let svc = RetryLayer::new(HttpRetryPolicy::new())
        .budget(roomy())
        .layer(dep.clone());
    let start = Instant::now();
    let res = svc.oneshot(get()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(start.elapsed(), Duration::from_secs(2));
    assert_eq!(dep.gaps(), [Duration::from_secs(2)]);
}

#[tokio::test(start_paused = true)]
async fn retry_after_http_date_delays_the_retry() {
    let at = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(3));
    let dep = Scripted::new(vec![
        (StatusCode::TOO_MANY_REQUESTS, Some(at)),
        (StatusCode::OK, None),
    ]);
    let svc = RetryLayer::new(HttpRetryPolicy::new())
        .budget(roomy())
        .layer(dep.clone());
    let res = svc.oneshot(get()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    // The date has whole seconds: 2 to 3 s from now.
    let gap = dep.gaps()[0];
    assert!(
        gap > Duration::from_secs(2) && gap <= Duration::from_secs(3),
        "{gap:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_capped() {
    let dep = Scripted::new(vec![
        (StatusCode::SERVICE_UNAVAILABLE, Some("3600".into())),
        (StatusCode::OK, None),
    ]);
    let policy = HttpRetryPolicy::new().max_retry_after(Duration::from_secs(5));
    let svc = RetryLayer::new(policy).budget(roomy()).layer(dep.clone());
    assert_eq!(svc.oneshot(get()).await.unwrap().status(), StatusCode::OK);
    assert_eq!(dep.gaps(), [Duration::from_secs(5)]);
}

#[tokio::test(start_paused = true)]
async fn post_is_not_retried_by_default() {
    let dep = Scripted::new(vec![(StatusCode::SERVICE_UNAVAILABLE, None)]);
    let svc = RetryLayer::new(HttpRetryPolicy::new())
        .budget(roomy())
        .layer(dep.clone());
    for method in [Method::POST, Method::PATCH] {
        let req = Request::builder()
            .method(method)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let res = svc.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
    assert_eq!(dep.calls(), 2);

    // Unless configured.
    let dep = Scripted::new(vec![
        (StatusCode::SERVICE_UNAVAILABLE, None),
        (StatusCode::OK, None),
    ]);
    let policy = HttpRetryPolicy::new().retry_method(Method::POST);
    let svc = RetryLayer::new(policy).budget(roomy()).layer(dep.clone());
    let req = Request::post("/")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    assert_eq!(svc.oneshot(req).await.unwrap().status(), StatusCode::OK);
    assert_eq!(dep.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn status_500_and_4xx_other_than_429_are_not_retried() {
    for status in [
        StatusCode::INTERNAL_SERVER_ERROR,
        StatusCode::NOT_IMPLEMENTED,
        StatusCode::BAD_REQUEST,
        StatusCode::NOT_FOUND,
        StatusCode::REQUEST_TIMEOUT,
        StatusCode::CONFLICT,
    ] {
        let dep = Scripted::new(vec![(status, None), (StatusCode::OK, None)]);
        let svc = RetryLayer::new(HttpRetryPolicy::new())
            .budget(roomy())
            .layer(dep.clone());
        assert_eq!(svc.oneshot(get()).await.unwrap().status(), status);
        assert_eq!(dep.calls(), 1, "{status}");
    }
    for status in [
        StatusCode::TOO_MANY_REQUESTS,
        StatusCode::BAD_GATEWAY,
        StatusCode::SERVICE_UNAVAILABLE,
        StatusCode::GATEWAY_TIMEOUT,
    ] {
        let dep = Scripted::new(vec![(status, None), (StatusCode::OK, None)]);
        let svc = RetryLayer::new(HttpRetryPolicy::new())
            .budget(roomy())
            .layer(dep.clone());
        assert_eq!(svc.oneshot(get()).await.unwrap().status(), StatusCode::OK);
        assert_eq!(dep.calls(), 2, "{status}");
    }
}

#[tokio::test(start_paused = true)]
async fn max_attempts_holds_and_backoff_is_full_jitter() {
    let dep = Scripted::new(vec![(StatusCode::BAD_GATEWAY, None)]);
    let policy = HttpRetryPolicy::new()
        .max_attempts(5)
        .backoff(Duration::from_millis(100), Duration::from_millis(300))
        .seed(1);
    let svc = RetryLayer::new(policy).budget(roomy()).layer(dep.clone());
    let res = svc.oneshot(get()).await.unwrap();
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "x");
    assert_eq!(dep.calls(), 5);
    // Before retry n: at most min(300 ms, 100 ms × 2ⁿ).
    let ceilings = [100, 200, 300, 300].map(Duration::from_millis);
    for (gap, ceiling) in dep.gaps().iter().zip(ceilings) {
        assert!(*gap <= ceiling, "{gap:?} > {ceiling:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn transport_errors_are_retried() {
    let calls = Arc::new(AtomicU32::new(0));
    let counted = calls.clone();
    let dep = service_fn(move |_req: Req| {
        let n = counted.fetch_add(1, Ordering::SeqCst);
        async move {
            if n < 2 {
                Err::<Res, BoxError>("connection reset".into())
            } else {
                Ok(Response::new(Full::new(Bytes::new())))
            }
        }
    });
    let svc = RetryLayer::new(HttpRetryPolicy::new())
        .budget(roomy())
        .layer(dep);
    assert_eq!(svc.oneshot(get()).await.unwrap().status(), StatusCode::OK);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn a_body_that_cannot_be_replayed_is_not_retried() {
    let dep = Scripted::new(vec![
        (StatusCode::SERVICE_UNAVAILABLE, None),
        (StatusCode::OK, None),
    ]);
    let svc = RetryLayer::new(HttpRetryPolicy::new())
        .budget(roomy())
        .layer(dep.clone());
    let body = Full::new(Bytes::from_static(b"stream"))
        .map_err(|e| match e {})
        .boxed();
    let req = Request::put("/").body(body).unwrap();
    assert_eq!(
        svc.oneshot(req).await.unwrap().status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(dep.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_default_budget_stops_retries_of_a_dead_dependency() {
    // Defaults: 0.2 per request, 10/s floor starting empty. At t = 0 a lone request
    // has 0.2 of a retry: it is not retried.
    let dep = Scripted::new(vec![(StatusCode::SERVICE_UNAVAILABLE, None)]);
    let layer = RetryLayer::new(HttpRetryPolicy::new().max_attempts(10));
    let svc = layer.layer(dep.clone());
    assert_eq!(
        svc.clone().oneshot(get()).await.unwrap().status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(dep.calls(), 1);
    assert_eq!(layer.retry_budget().stats().denied, 1);
}

// ===== with a circuit breaker =====

#[tokio::test(start_paused = true)]
async fn a_breaker_outside_the_retry_sees_one_failure_per_call() {
    let dependency = down();
    let breaker = CircuitBreaker::builder()
        .consecutive_failures(3)
        .open_for(Duration::from_secs(30))
        .build();
    let svc = ServiceBuilder::new()
        .layer(CircuitBreakerLayer::new(breaker.clone()))
        .layer(
            RetryLayer::new(AlwaysRetry { max: 4 })
                .budget(RetryBudget::builder().ratio(10.0).build()),
        )
        .layer(dependency.clone())
        .service(echo());

    assert!(svc.clone().oneshot(1).await.is_err());
    assert_eq!(dependency.stats().calls, 4, "four attempts");
    let stats = breaker.stats();
    assert_eq!(
        (stats.calls, stats.failures),
        (1, 1),
        "one failure for the call"
    );

    for _ in 0..2 {
        assert!(svc.clone().oneshot(1).await.is_err());
    }
    assert_eq!(breaker.stats().failures, 3);
    assert_eq!(dependency.stats().calls, 12);

    // Open: the call is rejected before any attempt.
    let err = svc.clone().oneshot(1).await.unwrap_err();
    assert!(err.downcast_ref::<CircuitOpen>().is_some());
    assert_eq!(dependency.stats().calls, 12);
}
