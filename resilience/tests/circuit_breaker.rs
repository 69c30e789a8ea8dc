//! Integration tests of the circuit breaker. All run on paused tokio time.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::Duration,
};

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use resilience::{
    classify_fn, BoxError, BreakerError, CircuitBreaker, CircuitBreakerLayer, CircuitOpen,
    CircuitState, Classifier, DefaultClassifier, ErrIsFailure, HttpClassifier, Window,
};
use tokio::{sync::Semaphore, time::advance};
use tower::{service_fn, Layer, Service, ServiceExt};

const SEC: Duration = Duration::from_secs(1);

/// Runs one call through the standalone breaker: `Ok` if `ok`, else `Err`.
async fn run(b: &CircuitBreaker, ok: bool) -> Result<(), BreakerError<&'static str>> {
    b.call(|| async move {
        if ok {
            Ok(())
        } else {
            Err("fail")
        }
    })
    .await
}

/// The transitions a breaker went through, as `(from, to)`.
type Log = Arc<Mutex<Vec<(CircuitState, CircuitState)>>>;

fn transitions_log(builder: resilience::CircuitBreakerBuilder) -> (CircuitBreaker, Log) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = log.clone();
    let b = builder
        .on_state_change(move |t| sink.lock().unwrap().push((t.from, t.to)))
        .build();
    (b, log)
}

/// A service that counts its calls and answers from a shared switch: `Ok(req)` while
/// healthy, `Err` otherwise.
#[derive(Clone)]
struct Probe {
    calls: Arc<AtomicUsize>,
    healthy: Arc<Mutex<bool>>,
}

impl Probe {
    fn new(healthy: bool) -> Self {
        Probe {
            calls: Arc::new(AtomicUsize::new(0)),
            healthy: Arc::new(Mutex::new(healthy)),
        }
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
    fn set_healthy(&self, healthy: bool) {
        *self.healthy.lock().unwrap() = healthy;
    }
}

impl Service<u32> for Probe {
    type Response = u32;
    type Error = std::io::Error;
    type Future = std::future::Ready<Result<u32, std::io::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: u32) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let out = if *self.healthy.lock().unwrap() {
            Ok(req)
        } else {
            Err(std::io::Error::other("down"))
        };
        std::future::ready(out)
    }
}

#[tokio::test(start_paused = true)]
async fn trips_at_exactly_n_consecutive_failures() {
    let (b, log) = transitions_log(CircuitBreaker::builder().consecutive_failures(3));
    for _ in 0..2 {
        assert_eq!(run(&b, false).await, Err(BreakerError::Inner("fail")));
    }
    assert_eq!(
        b.state(),
        CircuitState::Closed,
        "2 of 3 failures must not trip"
    );
    assert_eq!(run(&b, false).await, Err(BreakerError::Inner("fail")));
    assert_eq!(b.state(), CircuitState::Open, "the 3rd failure trips");
    assert_eq!(
        *log.lock().unwrap(),
        [(CircuitState::Closed, CircuitState::Open)]
    );
}

#[tokio::test(start_paused = true)]
async fn a_success_resets_the_consecutive_count() {
    let b = CircuitBreaker::builder().consecutive_failures(3).build();
    for ok in [false, false, true, false, false, true, false, false] {
        let _ = run(&b, ok).await;
    }
    assert_eq!(b.state(), CircuitState::Closed);
    let _ = run(&b, false).await;
    assert_eq!(b.state(), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn default_policy_is_five_consecutive_failures_and_five_seconds() {
    let b = CircuitBreaker::new();
    for _ in 0..4 {
        let _ = run(&b, false).await;
    }
    assert_eq!(b.state(), CircuitState::Closed);
    let _ = run(&b, false).await;
    assert_eq!(b.state(), CircuitState::Open);
    match run(&b, true).await {
        Err(BreakerError::Open(open)) => assert_eq!(open.retry_after, 5 * SEC),
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn failure_rate_waits_for_min_calls() {
    let b = CircuitBreaker::builder()
        .failure_rate(50.0, Window::Count(20), 10)
        .build();
    // 9 failures: a 100 % rate, but below min_calls.
    for _ in 0..9 {
        let _ = run(&b, false).await;
    }
    assert_eq!(b.state(), CircuitState::Closed, "min_calls not reached");
    // Setting only failure_rate replaced the default 5-consecutive policy.
    let _ = run(&b, false).await;
    assert_eq!(b.state(), CircuitState::Open, "10 calls, 100 % failed");
}

#[tokio::test(start_paused = true)]
async fn failure_rate_trips_at_the_threshold_not_below() {
    let b = CircuitBreaker::builder()
        .failure_rate(50.0, Window::Count(10), 10)
        .build();
    // 4 failures in 10 calls: 40 %.
    for ok in [
        true, false, true, false, true, false, true, false, true, true,
    ] {
        let _ = run(&b, ok).await;
    }
    assert_eq!(b.state(), CircuitState::Closed, "40 % < 50 %");
    // The window now drops the oldest (a success) and takes a failure: 5 of 10.
    let _ = run(&b, false).await;
    assert_eq!(b.state(), CircuitState::Open, "50 % reaches the threshold");
}

#[tokio::test(start_paused = true)]
async fn failure_rate_count_window_forgets_old_calls() {
    let b = CircuitBreaker::builder()
        .failure_rate(50.0, Window::Count(4), 4)
        .build();
    // Failures early, then enough successes to push them out of the window.
    for ok in [false, true, true, true, true, true, false] {
        let _ = run(&b, ok).await;
    }
    // Window: [true, true, true, false] = 25 %.
    assert_eq!(b.state(), CircuitState::Closed);
    let _ = run(&b, false).await; // [true, true, false, false] = 50 %
    assert_eq!(b.state(), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn failure_rate_time_window_forgets_old_calls() {
    let b = CircuitBreaker::builder()
        .failure_rate(50.0, Window::Time(10 * SEC), 4)
        .build();
    for _ in 0..3 {
        let _ = run(&b, false).await;
    }
    // 11 s later those three failures are outside the window.
    advance(11 * SEC).await;
    let _ = run(&b, false).await;
    assert_eq!(b.state(), CircuitState::Closed, "only 1 call in the window");
    let _ = run(&b, true).await;
    let _ = run(&b, true).await;
    assert_eq!(b.state(), CircuitState::Closed, "3 calls < min_calls");
    // Inside the window they still count: 2 failures of 4 calls.
    advance(5 * SEC).await;
    let _ = run(&b, false).await;
    assert_eq!(b.state(), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn slow_successes_count_as_failures() {
    let b = CircuitBreaker::builder()
        .consecutive_failures(2)
        .slow_call(Duration::from_millis(100))
        .build();
    let slow = || async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        Ok::<_, &str>(())
    };
    let fast = || async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok::<_, &str>(())
    };
    assert_eq!(
        b.call(slow).await,
        Ok(()),
        "the caller still gets its result"
    );
    assert_eq!(b.call(fast).await, Ok(()));
    assert_eq!(b.stats().failures, 1);
    assert_eq!(
        b.state(),
        CircuitState::Closed,
        "a fast success reset the count"
    );
    b.call(slow).await.unwrap();
    b.call(slow).await.unwrap();
    assert_eq!(b.state(), CircuitState::Open);
    assert_eq!(b.stats().failures, 3);
    assert_eq!(b.stats().successes, 1);
}

#[tokio::test(start_paused = true)]
async fn slow_call_abandoned_after_the_limit_counts_as_failure() {
    let b = CircuitBreaker::builder()
        .consecutive_failures(1)
        .slow_call(Duration::from_millis(100))
        .build();
    // Cancelled (e.g. by an outer timeout) before the limit: counts as nothing.
    let p = b.try_acquire().unwrap();
    advance(Duration::from_millis(50)).await;
    drop(p);
    assert_eq!(b.state(), CircuitState::Closed);
    // Cancelled after the limit: it was slow.
    let p = b.try_acquire().unwrap();
    advance(Duration::from_millis(150)).await;
    drop(p);
    assert_eq!(b.state(), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn open_rejects_without_touching_the_inner_service() {
    let probe = Probe::new(false);
    let breaker = CircuitBreaker::builder()
        .consecutive_failures(2)
        .open_for(10 * SEC)
        .build();
    let mut svc = CircuitBreakerLayer::new(breaker.clone()).layer(probe.clone());
    for _ in 0..2 {
        let err = svc.ready().await.unwrap().call(1).await.unwrap_err();
        assert!(
            err.downcast_ref::<std::io::Error>().is_some(),
            "inner error boxed: {err}"
        );
    }
    assert_eq!(probe.calls(), 2);

    advance(3 * SEC).await;
    for _ in 0..5 {
        let err = svc.ready().await.unwrap().call(1).await.unwrap_err();
        let open = err.downcast_ref::<CircuitOpen>().expect("CircuitOpen");
        assert_eq!(open.retry_after, 7 * SEC, "time left until half-open");
    }
    assert_eq!(probe.calls(), 2, "rejections never reach the inner service");
    let stats = breaker.stats();
    assert_eq!(
        (
            stats.calls,
            stats.failures,
            stats.rejections,
            stats.transitions
        ),
        (2, 2, 5, 1)
    );
}

#[tokio::test(start_paused = true)]
async fn poll_ready_never_fails_while_open() {
    let probe = Probe::new(false);
    let breaker = CircuitBreaker::builder().consecutive_failures(1).build();
    let mut svc = CircuitBreakerLayer::new(breaker.clone()).layer(probe);
    let _ = svc.ready().await.unwrap().call(1).await;
    assert_eq!(breaker.state(), CircuitState::Open);
    let waker = std::task::Waker::noop();
    let mut cx = Context::from_waker(waker);
    assert!(matches!(svc.poll_ready(&mut cx), Poll::Ready(Ok(()))));
}

/// A service whose calls block until the test releases them.
#[derive(Clone)]
struct Gate {
    entered: Arc<AtomicUsize>,
    release: Arc<Semaphore>,
    fail: bool,
}

impl Gate {
    fn new(fail: bool) -> Self {
        Gate {
            entered: Arc::new(AtomicUsize::new(0)),
            release: Arc::new(Semaphore::new(0)),
            fail,
        }
    }
}

impl Service<()> for Gate {
    type Response = ();
    type Error = &'static str;
    type Future = Pin<Box<dyn Future<Output = Result<(), &'static str>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: ()) -> Self::Future {
        self.entered.fetch_add(1, Ordering::SeqCst);
        let release = self.release.clone();
        let fail = self.fail;
        Box::pin(async move {
            release.acquire().await.unwrap().forget();
            if fail {
                Err("trial failed")
            } else {
                Ok(())
            }
        })
    }
}

/// Trips `breaker` and waits out its `open_for`.
async fn trip_and_wait(breaker: &CircuitBreaker, open_for: Duration) {
    while breaker.state() == CircuitState::Closed {
        let _ = run(breaker, false).await;
    }
    advance(open_for).await;
    assert_eq!(breaker.state(), CircuitState::HalfOpen);
}

#[tokio::test(start_paused = true)]
async fn half_open_admits_exactly_half_open_calls_concurrent_trials() {
    let (breaker, log) = transitions_log(
        CircuitBreaker::builder()
            .consecutive_failures(1)
            .open_for(SEC)
            .half_open_calls(3),
    );
    trip_and_wait(&breaker, SEC).await;

    let gate = Gate::new(false);
    let svc = CircuitBreakerLayer::new(breaker.clone()).layer(gate.clone());
    let tasks: Vec<_> = (0..5)
        .map(|_| tokio::spawn(svc.clone().oneshot(())))
        .collect();
    tokio::task::yield_now().await;
    // Let every task run up to its gate.
    while gate.entered.load(Ordering::SeqCst) + (breaker.stats().rejections as usize) < 5 {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        gate.entered.load(Ordering::SeqCst),
        3,
        "exactly 3 trials reach inner"
    );
    assert_eq!(breaker.stats().rejections, 2);
    assert_eq!(breaker.state(), CircuitState::HalfOpen);

    gate.release.add_permits(3);
    let mut ok = 0;
    let mut open = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => ok += 1,
            Err(e) => {
                let o = e.downcast_ref::<CircuitOpen>().expect("rejection");
                assert_eq!(o.retry_after, Duration::ZERO, "half-open saturation");
                open += 1;
            }
        }
    }
    assert_eq!((ok, open), (3, 2));
    assert_eq!(
        breaker.state(),
        CircuitState::Closed,
        "3 successes close it"
    );
    assert_eq!(
        *log.lock().unwrap(),
        [
            (CircuitState::Closed, CircuitState::Open),
            (CircuitState::Open, CircuitState::HalfOpen),
            (CircuitState::HalfOpen, CircuitState::Closed),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn half_open_needs_all_trial_successes_to_close() {
    let b = CircuitBreaker::builder()
        .consecutive_failures(1)
        .open_for(SEC)
        .half_open_calls(2)
        .build();
    trip_and_wait(&b, SEC).await;
    run(&b, true).await.unwrap();
    assert_eq!(b.state(), CircuitState::HalfOpen, "1 of 2 successes");
    run(&b, true).await.unwrap();
    assert_eq!(b.state(), CircuitState::Closed);
    // Closed again means the full policy applies afresh.
    let _ = run(&b, false).await;
    assert_eq!(b.state(), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn one_half_open_failure_reopens() {
    let (b, log) = transitions_log(
        CircuitBreaker::builder()
            .consecutive_failures(1)
            .open_for(2 * SEC)
            .half_open_calls(3),
    );
    trip_and_wait(&b, 2 * SEC).await;
    run(&b, true).await.unwrap();
    assert_eq!(run(&b, false).await, Err(BreakerError::Inner("fail")));
    assert_eq!(b.state(), CircuitState::Open);
    match run(&b, true).await {
        Err(BreakerError::Open(o)) => assert_eq!(o.retry_after, 2 * SEC),
        other => panic!("expected rejection, got {other:?}"),
    }
    assert_eq!(
        log.lock().unwrap().last(),
        Some(&(CircuitState::HalfOpen, CircuitState::Open))
    );
}

#[tokio::test(start_paused = true)]
async fn dropped_trial_frees_its_half_open_slot() {
    let b = CircuitBreaker::builder()
        .consecutive_failures(1)
        .open_for(SEC)
        .build();
    trip_and_wait(&b, SEC).await;
    let trial = b.try_acquire().unwrap();
    assert_eq!(trial.state(), CircuitState::HalfOpen);
    assert!(b.try_acquire().is_err(), "the only slot is taken");
    drop(trial);
    assert_eq!(
        b.state(),
        CircuitState::HalfOpen,
        "a cancelled trial decides nothing"
    );
    b.try_acquire().unwrap().success();
    assert_eq!(b.state(), CircuitState::Closed);
    let s = b.stats();
    assert_eq!(
        (s.calls, s.successes, s.failures),
        (3, 1, 1),
        "calls include the cancelled"
    );
}

#[tokio::test(start_paused = true)]
async fn late_results_from_an_earlier_period_are_ignored() {
    let b = CircuitBreaker::builder()
        .consecutive_failures(1)
        .open_for(SEC)
        .half_open_calls(2)
        .build();
    // Admitted while closed, finishes much later.
    let old_closed = b.try_acquire().unwrap();
    let _ = run(&b, false).await;
    advance(SEC).await;
    // Two trials admitted; one fails and reopens; the other finishes later.
    let trial_a = b.try_acquire().unwrap();
    let trial_b = b.try_acquire().unwrap();
    trial_a.failure();
    assert_eq!(b.state(), CircuitState::Open);
    advance(SEC).await;
    assert_eq!(b.state(), CircuitState::HalfOpen);
    // A stale trial's success must not count toward closing the new half-open period.
    trial_b.success();
    let fresh = b.try_acquire().unwrap();
    fresh.success();
    assert_eq!(b.state(), CircuitState::HalfOpen, "1 of 2 fresh successes");
    b.try_acquire().unwrap().success();
    assert_eq!(b.state(), CircuitState::Closed);
    // The call admitted in the first closed period fails now: not this period's failure.
    old_closed.failure();
    assert_eq!(b.state(), CircuitState::Closed);
    assert_eq!(b.stats().failures, 3, "but the counters still see it");
}

#[tokio::test(start_paused = true)]
async fn open_for_grows_on_repeated_trips_up_to_the_cap_and_resets_on_close() {
    let b = CircuitBreaker::builder()
        .consecutive_failures(1)
        .open_for(SEC)
        .open_for_growth(2.0, 5 * SEC)
        .build();
    let retry_after = |r: Result<(), BreakerError<&str>>| match r {
        Err(BreakerError::Open(o)) => o.retry_after,
        other => panic!("expected rejection, got {other:?}"),
    };
    let _ = run(&b, false).await;
    let mut seen = Vec::new();
    for _ in 0..5 {
        let d = retry_after(run(&b, true).await);
        seen.push(d);
        advance(d).await;
        let _ = run(&b, false).await; // the trial fails: trip again
    }
    assert_eq!(seen, [SEC, 2 * SEC, 4 * SEC, 5 * SEC, 5 * SEC]);
    // Recover, then trip again: back to the base duration.
    advance(5 * SEC).await;
    run(&b, true).await.unwrap();
    assert_eq!(b.state(), CircuitState::Closed);
    let _ = run(&b, false).await;
    assert_eq!(retry_after(run(&b, true).await), SEC);
}

fn response(status: u16) -> Response<String> {
    let mut res = Response::new(String::new());
    *res.status_mut() = StatusCode::from_u16(status).unwrap();
    res
}

#[test]
fn http_classifier_counts_err_and_5xx_for_http_response() {
    let c = HttpClassifier;
    let ok = |s| Classifier::<Response<String>, ()>::is_failure(&c, Ok(&response(s)));
    assert!(!ok(200));
    assert!(!ok(304));
    assert!(!ok(404));
    assert!(!ok(499));
    assert!(ok(500));
    assert!(ok(503));
    assert!(ok(599));
    assert!(Classifier::<Response<String>, &str>::is_failure(
        &c,
        Err(&"reset")
    ));
}

#[cfg(feature = "reqwest")]
#[test]
fn http_classifier_counts_err_and_5xx_for_reqwest_response() {
    let c = HttpClassifier;
    let res = |s: u16| {
        let mut r = http::Response::new("body");
        *r.status_mut() = StatusCode::from_u16(s).unwrap();
        reqwest::Response::from(r)
    };
    let failed = |r: &reqwest::Response| {
        Classifier::<reqwest::Response, reqwest::Error>::is_failure(&c, Ok(r))
    };
    assert!(!failed(&res(200)));
    assert!(!failed(&res(429)));
    assert!(failed(&res(500)));
    assert!(failed(&res(502)));
}

#[cfg(feature = "reqwest")]
#[tokio::test(start_paused = true)]
async fn layer_with_http_classifier_trips_on_reqwest_5xx() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let client = service_fn(move |_req: ()| {
        counted.fetch_add(1, Ordering::SeqCst);
        let mut r = http::Response::new("oops");
        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        async move { Ok::<_, reqwest::Error>(reqwest::Response::from(r)) }
    });
    let breaker = CircuitBreaker::builder().consecutive_failures(2).build();
    let svc = CircuitBreakerLayer::new(breaker.clone())
        .classifier(HttpClassifier)
        .layer(client);
    for _ in 0..2 {
        let res = svc.clone().oneshot(()).await.unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
    assert_eq!(breaker.state(), CircuitState::Open);
    let err = svc.clone().oneshot(()).await.unwrap_err();
    assert!(err.is::<CircuitOpen>());
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn closure_classifier_decides_failures() {
    // Only "timeout" errors count; Ok(0) counts too.
    let classifier = classify_fn(|r: Result<&u32, &&str>| match r {
        Ok(v) => *v == 0,
        Err(e) => *e == "timeout",
    });
    let b = CircuitBreaker::builder().consecutive_failures(2).build();
    let call =
        |r: Result<u32, &'static str>| b.call_classified(classifier, move || async move { r });
    let _ = call(Err("bad request")).await;
    let _ = call(Err("bad request")).await;
    assert_eq!(b.state(), CircuitState::Closed);
    let _ = call(Ok(0)).await;
    let _ = call(Err("timeout")).await;
    assert_eq!(b.state(), CircuitState::Open);
    assert_eq!(b.stats().failures, 2);
    assert_eq!(b.stats().successes, 2);
}

#[tokio::test(start_paused = true)]
async fn err_is_failure_is_the_default() {
    assert!(Classifier::<(), ()>::is_failure(&ErrIsFailure, Err(&())));
    assert!(!Classifier::<(), ()>::is_failure(&ErrIsFailure, Ok(&())));
    // A layer's default classifier, used on its own, is `ErrIsFailure`.
    assert!(Classifier::<(), ()>::is_failure(
        &DefaultClassifier,
        Err(&())
    ));
    assert!(!Classifier::<(), ()>::is_failure(
        &DefaultClassifier,
        Ok(&())
    ));
}

#[tokio::test(start_paused = true)]
async fn state_is_shared_by_clones_and_by_all_services_of_one_layer() {
    let probe = Probe::new(false);
    let layer = CircuitBreakerLayer::new(CircuitBreaker::builder().consecutive_failures(3).build());
    let a = layer.layer(probe.clone());
    let b = layer.layer(probe.clone());
    let a2 = a.clone();
    let _ = a.oneshot(1).await;
    let _ = b.clone().oneshot(1).await;
    let _ = a2.clone().oneshot(1).await;
    assert_eq!(layer.breaker().state(), CircuitState::Open);
    let err = b.oneshot(1).await.unwrap_err();
    assert!(
        err.is::<CircuitOpen>(),
        "another service of the same layer sees it open"
    );
    assert_eq!(probe.calls(), 3);
    // A clone of the layer shares it too.
    let c = layer.clone().layer(probe.clone());
    assert!(c.oneshot(1).await.unwrap_err().is::<CircuitOpen>());
}

#[tokio::test(start_paused = true)]
async fn survives_hyper_utils_clone_per_request() {
    use hyper::service::Service as HyperService;
    use hyper_util::service::TowerToHyperService;

    let failing = service_fn(|_req: Request<String>| async { Ok::<_, Infallible>(response(500)) });
    let breaker = CircuitBreaker::builder()
        .consecutive_failures(3)
        .open_for(10 * SEC)
        .build();
    let layer = CircuitBreakerLayer::new(breaker.clone()).http();
    // hyper calls `&self`; TowerToHyperService clones the tower service per request.
    let hyper_svc = TowerToHyperService::new(layer.layer(failing));
    for _ in 0..3 {
        let res = hyper_svc.call(Request::new(String::new())).await.unwrap();
        assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
    let res = hyper_svc
        .clone()
        .call(Request::new(String::new()))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(breaker.state(), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn http_mode_answers_503_with_retry_after_rounded_up() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let upstream = service_fn(move |_req: Request<String>| {
        counted.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, Infallible>(response(502)) }
    });
    let breaker = CircuitBreaker::builder()
        .consecutive_failures(1)
        .open_for(Duration::from_millis(2500))
        .build();
    let svc = CircuitBreakerLayer::new(breaker).http().layer(upstream);

    let res = svc
        .clone()
        .oneshot(Request::new(String::new()))
        .await
        .unwrap();
    assert_eq!(
        res.status(),
        StatusCode::BAD_GATEWAY,
        "5xx passes through, counted"
    );

    let res = svc
        .clone()
        .oneshot(Request::new(String::new()))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()["retry-after"], "3", "2.5 s rounds up");
    assert_eq!(res.headers()["content-type"], "application/json");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json_lite::Value = serde_json_lite::parse(&body);
    assert_eq!(json.error, "circuit_open");
    assert_eq!(json.message, "circuit breaker is open; retry after 3 s");
    assert_eq!(calls.load(Ordering::SeqCst), 1, "inner service untouched");

    // Almost at half-open: Retry-After is still at least 1.
    advance(Duration::from_millis(2499)).await;
    let res = svc.oneshot(Request::new(String::new())).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()["retry-after"], "1");
}

#[tokio::test(start_paused = true)]
async fn http_mode_saturated_half_open_still_says_retry_after_1() {
    let gate = Gate::new(false);
    let inner = service_fn({
        let gate = gate.clone();
        move |_req: Request<()>| {
            let mut gate = gate.clone();
            async move {
                gate.call(()).await.unwrap();
                Ok::<_, Infallible>(response(200))
            }
        }
    });
    let breaker = CircuitBreaker::builder()
        .consecutive_failures(1)
        .open_for(SEC)
        .build();
    trip_and_wait(&breaker, SEC).await;
    let svc = CircuitBreakerLayer::new(breaker.clone())
        .http()
        .layer(inner);
    let trial = tokio::spawn(svc.clone().oneshot(Request::new(())));
    while gate.entered.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    let res = svc.clone().oneshot(Request::new(())).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()["retry-after"], "1");
    gate.release.add_permits(1);
    assert_eq!(trial.await.unwrap().unwrap().status(), StatusCode::OK);
    assert_eq!(breaker.state(), CircuitState::Closed);
}

#[cfg(feature = "axum")]
#[tokio::test(start_paused = true)]
async fn http_mode_drops_into_an_axum_router_with_a_plain_layer() {
    use axum::{body::Body, routing::get, Router};

    let breaker = CircuitBreaker::builder().consecutive_failures(2).build();
    let app = Router::new()
        .route("/", get(|| async { StatusCode::INTERNAL_SERVER_ERROR }))
        .layer(CircuitBreakerLayer::new(breaker.clone()).http());
    let get = || Request::get("/").body(Body::empty()).unwrap();
    for _ in 0..2 {
        let res = app.clone().oneshot(get()).await.unwrap();
        assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
    let res = app.oneshot(get()).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()["retry-after"], "5");
    assert_eq!(breaker.stats().rejections, 1);
}

#[tokio::test(start_paused = true)]
async fn error_mode_recovers_after_open_for() {
    let probe = Probe::new(false);
    let breaker = CircuitBreaker::builder()
        .consecutive_failures(1)
        .open_for(SEC)
        .build();
    let svc = CircuitBreakerLayer::new(breaker.clone()).layer(probe.clone());
    let _ = svc.clone().oneshot(7).await;
    assert!(svc
        .clone()
        .oneshot(7)
        .await
        .unwrap_err()
        .is::<CircuitOpen>());
    probe.set_healthy(true);
    advance(SEC).await;
    assert_eq!(svc.clone().oneshot(7).await.unwrap(), 7);
    assert_eq!(breaker.state(), CircuitState::Closed);
    assert_eq!(probe.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn stats_count_everything() {
    let (b, log) = transitions_log(
        CircuitBreaker::builder()
            .consecutive_failures(2)
            .open_for(SEC),
    );
    run(&b, true).await.unwrap();
    let _ = run(&b, false).await;
    let _ = run(&b, false).await; // trips
    let _ = run(&b, true).await; // rejected
    advance(SEC).await;
    run(&b, true).await.unwrap(); // trial closes it
    let s = b.stats();
    assert_eq!(s.calls, 4);
    assert_eq!(s.successes, 2);
    assert_eq!(s.failures, 2);
    assert_eq!(s.rejections, 1);
    assert_eq!(s.transitions, 3);
    assert_eq!(log.lock().unwrap().len(), 3);
}

#[test]
fn state_names_and_error_messages() {
    assert_eq!(CircuitState::Closed.to_string(), "closed");
    assert_eq!(CircuitState::Open.to_string(), "open");
    assert_eq!(CircuitState::HalfOpen.to_string(), "half_open");
    let open = CircuitOpen::new(Duration::from_millis(1234));
    assert_eq!(open.to_string(), "circuit breaker is open; retry after 2 s");
    let e: BreakerError<std::io::Error> = BreakerError::Open(open);
    assert!(e.is_open());
    let boxed: BoxError = Box::new(open);
    assert_eq!(boxed.downcast_ref::<CircuitOpen>(), Some(&open));
}

/// Tiny parser for the `{"error":..,"message":..}` body, so the test needs no JSON crate.
mod serde_json_lite {
    pub struct Value {
        pub error: String,
        pub message: String,
    }

    pub fn parse(body: &[u8]) -> Value {
        let s = std::str::from_utf8(body).unwrap();
        let field = |name: &str| {
            let key = format!("\"{name}\":\"");
            let start = s.find(&key).unwrap_or_else(|| panic!("no {name} in {s}")) + key.len();
            let end = start + s[start..].find('"').unwrap();
            s[start..end].to_string()
        };
        assert!(s.starts_with('{') && s.ends_with('}'), "not an object: {s}");
        Value {
            error: field("error"),
            message: field("message"),
        }
    }
}

mod half_open_invariant {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Op {
        Acquire,
        Succeed(usize),
        Fail(usize),
        Abandon(usize),
        Advance(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => Just(Op::Acquire),
            2 => any::<usize>().prop_map(Op::Succeed),
            2 => any::<usize>().prop_map(Op::Fail),
            1 => any::<usize>().prop_map(Op::Abandon),
            2 => (0u64..3000).prop_map(Op::Advance),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Whatever happens, the trial calls of one half-open period that are still
        /// running never exceed `half_open_calls`.
        #[test]
        fn half_open_admissions_never_exceed_the_limit(
            limit in 1u32..4,
            threshold in 1u32..4,
            ops in proptest::collection::vec(op(), 1..200),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            rt.block_on(async move {
                let periods = Arc::new(AtomicUsize::new(0));
                let counter = periods.clone();
                let b = CircuitBreaker::builder()
                    .consecutive_failures(threshold)
                    .open_for(Duration::from_millis(1000))
                    .half_open_calls(limit)
                    .on_state_change(move |t| {
                        if t.to == CircuitState::HalfOpen {
                            counter.fetch_add(1, Ordering::SeqCst);
                        }
                    })
                    .build();
                // (permit, half-open period that admitted it, if a trial)
                let mut running: Vec<(resilience::BreakerPermit, Option<usize>)> = Vec::new();
                for op in ops {
                    match op {
                        Op::Acquire => {
                            if let Ok(p) = b.try_acquire() {
                                let period = (p.state() == CircuitState::HalfOpen)
                                    .then(|| periods.load(Ordering::SeqCst));
                                running.push((p, period));
                            }
                        }
                        Op::Succeed(i) if !running.is_empty() => {
                            let n = running.len();
                            running.swap_remove(i % n).0.success();
                        }
                        Op::Fail(i) if !running.is_empty() => {
                            let n = running.len();
                            running.swap_remove(i % n).0.failure();
                        }
                        Op::Abandon(i) if !running.is_empty() => {
                            let n = running.len();
                            drop(running.swap_remove(i % n));
                        }
                        Op::Advance(ms) => advance(Duration::from_millis(ms)).await,
                        _ => {}
                    }
                    let current = periods.load(Ordering::SeqCst);
                    let trials = running.iter().filter(|(_, p)| *p == Some(current)).count();
                    prop_assert!(
                        trials <= limit as usize,
                        "{trials} trials running in half-open period {current}, limit {limit}"
                    );
                }
                Ok(())
            })?;
        }
    }
}

// The controls: every one is a transition the hook and the stats see.

#[tokio::test(start_paused = true)]
async fn every_control_call_is_a_transition_the_hook_sees() {
    use CircuitState::*;
    let (b, log) = transitions_log(
        CircuitBreaker::builder()
            .consecutive_failures(1)
            .open_for(SEC),
    );
    b.force_open();
    b.force_open(); // to the state it is in: still a transition
    b.disable();
    b.force_closed();
    assert!(run(&b, false).await.is_err()); // trips: Closed -> Open
    b.reset();
    assert_eq!(
        *log.lock().unwrap(),
        [
            (Closed, ForcedOpen),
            (ForcedOpen, ForcedOpen),
            (ForcedOpen, Disabled),
            (Disabled, Closed),
            (Closed, Open),
            (Open, Closed),
        ]
    );
    assert_eq!(b.stats().transitions, 6);
    assert_eq!(b.state(), Closed);
}

#[tokio::test(start_paused = true)]
async fn forced_open_rejects_until_told_otherwise_and_counts_rejections() {
    let b = CircuitBreaker::builder().open_for(SEC).build();
    b.force_open();
    advance(SEC * 3600).await;
    assert_eq!(b.state(), CircuitState::ForcedOpen);
    let err = run(&b, true).await.unwrap_err();
    assert_eq!(err, BreakerError::Open(CircuitOpen::new(SEC)));
    assert_eq!(b.stats().rejections, 1);

    // The layer rejects without calling the inner service.
    let probe = Probe::new(true);
    let svc = CircuitBreakerLayer::new(b.clone()).layer(probe.clone());
    let err = svc.oneshot(1).await.unwrap_err();
    assert!(err.downcast_ref::<CircuitOpen>().is_some());
    assert_eq!(probe.calls.load(Ordering::SeqCst), 0);

    b.force_closed();
    assert!(run(&b, true).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn disabled_admits_everything_and_still_counts() {
    let (b, log) = transitions_log(CircuitBreaker::builder().consecutive_failures(2));
    b.disable();
    for _ in 0..10 {
        assert_eq!(run(&b, false).await, Err(BreakerError::Inner("fail")));
    }
    assert!(run(&b, true).await.is_ok());
    assert_eq!(b.state(), CircuitState::Disabled);
    let stats = b.stats();
    assert_eq!(
        (
            stats.calls,
            stats.failures,
            stats.successes,
            stats.rejections
        ),
        (11, 10, 1, 0)
    );
    assert_eq!(
        log.lock().unwrap().len(),
        1,
        "nothing trips a disabled breaker"
    );
    // Failures counted while disabled do not carry over into the closed state.
    b.force_closed();
    assert!(run(&b, false).await.is_err());
    assert_eq!(b.state(), CircuitState::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_permit_from_before_a_control_call_counts_for_no_state() {
    let b = CircuitBreaker::builder().consecutive_failures(1).build();
    let permit = b.try_acquire().unwrap();
    b.force_closed();
    permit.failure();
    assert_eq!(b.state(), CircuitState::Closed);
    assert_eq!(b.stats().failures, 1);
}

#[tokio::test(start_paused = true)]
async fn reset_forgets_open_for_growth_force_closed_keeps_it() {
    let grown = || {
        CircuitBreaker::builder()
            .consecutive_failures(1)
            .open_for(SEC)
            .open_for_growth(2.0, SEC * 60)
            .build()
    };
    for (reset, expected) in [(true, SEC), (false, SEC * 2)] {
        let b = grown();
        assert!(run(&b, false).await.is_err()); // trip 1: open 1 s
        if reset {
            b.reset();
        } else {
            b.force_closed();
        }
        assert!(run(&b, false).await.is_err());
        let err = run(&b, true).await.unwrap_err();
        assert_eq!(
            err,
            BreakerError::Open(CircuitOpen::new(expected)),
            "reset {reset}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn max_wait_in_half_open_reopens_exactly_at_the_deadline() {
    use CircuitState::*;
    let (b, log) = transitions_log(
        CircuitBreaker::builder()
            .consecutive_failures(1)
            .open_for(SEC)
            .max_wait_in_half_open(SEC * 3),
    );
    assert!(run(&b, false).await.is_err());
    advance(SEC).await;
    let trial = b.try_acquire().expect("the trial call");
    assert_eq!(trial.state(), HalfOpen);
    // The one trial slot is taken: others are rejected meanwhile.
    assert!(b.try_acquire().is_err());
    advance(SEC * 3 - Duration::from_nanos(1)).await;
    assert_eq!(b.state(), HalfOpen);
    advance(Duration::from_nanos(1)).await;
    assert_eq!(b.state(), Open);
    // Open for `open_for` from the deadline.
    let err = b.try_acquire().unwrap_err();
    assert_eq!(err.retry_after, SEC);
    // The stale trial reports late: it changes nothing.
    trial.success();
    assert_eq!(b.state(), Open);
    advance(SEC).await;
    assert_eq!(b.state(), HalfOpen);
    assert_eq!(
        *log.lock().unwrap(),
        [
            (Closed, Open),
            (Open, HalfOpen),
            (HalfOpen, Open),
            (Open, HalfOpen)
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn max_wait_in_half_open_noticed_late_by_a_call_is_dated_at_the_deadline() {
    let b = CircuitBreaker::builder()
        .consecutive_failures(1)
        .open_for(SEC * 10)
        .max_wait_in_half_open(SEC)
        .build();
    assert!(run(&b, false).await.is_err());
    advance(SEC * 10).await;
    let _hung = b.try_acquire().expect("the trial call");
    advance(SEC * 4).await; // 3 s past the deadline, no one looked
    let err = b.try_acquire().unwrap_err();
    assert_eq!(err.retry_after, SEC * 7);
    assert_eq!(b.state(), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn without_max_wait_half_open_waits_for_its_trials() {
    let b = CircuitBreaker::builder()
        .consecutive_failures(1)
        .open_for(SEC)
        .build();
    assert!(run(&b, false).await.is_err());
    advance(SEC).await;
    let trial = b.try_acquire().unwrap();
    advance(SEC * 3600).await;
    assert_eq!(b.state(), CircuitState::HalfOpen);
    trial.success();
    assert_eq!(b.state(), CircuitState::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_half_open_deadline_and_the_open_period_after_it_both_unobserved() {
    use CircuitState::*;
    let (b, log) = transitions_log(
        CircuitBreaker::builder()
            .consecutive_failures(1)
            .open_for(SEC)
            .max_wait_in_half_open(SEC),
    );
    assert!(run(&b, false).await.is_err());
    advance(SEC).await;
    let _hung = b.try_acquire().expect("the trial call");
    // Reopened at t = 2 s, half-open again at t = 3 s; nobody looked until t = 10 s.
    advance(SEC * 9).await;
    let trial = b.try_acquire().expect("a new trial: both periods are over");
    assert_eq!(trial.state(), HalfOpen);
    trial.success();
    assert_eq!(b.state(), Closed);
    assert_eq!(
        *log.lock().unwrap(),
        [
            (Closed, Open),
            (Open, HalfOpen),
            (HalfOpen, Open),
            (Open, HalfOpen),
            (HalfOpen, Closed)
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn state_reads_through_a_reopen_whose_open_period_is_over_too() {
    let b = CircuitBreaker::builder()
        .consecutive_failures(1)
        .open_for(SEC)
        .max_wait_in_half_open(SEC)
        .build();
    assert!(run(&b, false).await.is_err());
    advance(SEC).await;
    let _hung = b.try_acquire().expect("the trial call");
    advance(SEC * 9).await;
    assert_eq!(b.state(), CircuitState::HalfOpen);
}

mod controls_invariant {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Op {
        Acquire,
        Succeed(usize),
        Fail(usize),
        Advance(u64),
        ForceOpen,
        ForceClosed,
        Disable,
        Reset,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => Just(Op::Acquire),
            2 => any::<usize>().prop_map(Op::Succeed),
            3 => any::<usize>().prop_map(Op::Fail),
            2 => (0u64..3000).prop_map(Op::Advance),
            1 => Just(Op::ForceOpen),
            1 => Just(Op::ForceClosed),
            1 => Just(Op::Disable),
            1 => Just(Op::Reset),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Whatever mix of calls, time and control calls: the hook sees every
        /// transition the stats count, as one unbroken chain (each starts where the
        /// previous ended), and the state read back is where the chain ends.
        #[test]
        fn the_hook_sees_every_transition_as_one_chain(
            ops in proptest::collection::vec(op(), 1..150),
            max_wait in proptest::option::of(1u64..3000),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut builder = CircuitBreaker::builder()
                    .consecutive_failures(2)
                    .open_for(Duration::from_millis(1000));
                if let Some(ms) = max_wait {
                    builder = builder.max_wait_in_half_open(Duration::from_millis(ms));
                }
                let (b, log) = transitions_log(builder);
                let mut running = Vec::new();
                for op in ops {
                    match op {
                        Op::Acquire => running.extend(b.try_acquire().ok()),
                        Op::Succeed(i) if !running.is_empty() => {
                            let n = running.len();
                            running.swap_remove(i % n).success();
                        }
                        Op::Fail(i) if !running.is_empty() => {
                            let n = running.len();
                            running.swap_remove(i % n).failure();
                        }
                        Op::Advance(ms) => advance(Duration::from_millis(ms)).await,
                        Op::ForceOpen => b.force_open(),
                        Op::ForceClosed => b.force_closed(),
                        Op::Disable => b.disable(),
                        Op::Reset => b.reset(),
                        _ => {}
                    }
                    let state = b.state();
                    let log = log.lock().unwrap();
                    prop_assert_eq!(log.len() as u64, b.stats().transitions);
                    let mut at = CircuitState::Closed;
                    for &(from, to) in log.iter() {
                        prop_assert_eq!(from, at);
                        at = to;
                    }
                    prop_assert_eq!(state, at);
                }
                Ok(())
            })?;
        }
    }
}

#[test]
#[should_panic(expected = "max_wait_in_half_open: the wait must be longer than zero")]
fn a_zero_max_wait_in_half_open_panics() {
    let _ = CircuitBreaker::builder().max_wait_in_half_open(Duration::ZERO);
}
