//! Integration tests of the concurrency limit. The futures and bodies of the
//! interleaving tests are polled by hand; the tests where time matters run on paused
//! tokio time.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll, Waker},
    time::Duration,
};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use proptest::prelude::*;
use resilience::{
    concurrency_limit::DEFAULT_RETRY_AFTER, BoxError, ConcurrencyLimitLayer,
    InvalidConcurrencyLimit, Overloaded,
};
use tower::{service_fn, Layer, Service, ServiceExt};

/// What the inner service observes: its calls, and the calls really in flight (a
/// [`Guard`] is alive for each).
#[derive(Clone, Default)]
struct Tracker {
    calls: Arc<AtomicUsize>,
    live: Arc<AtomicUsize>,
}

impl Tracker {
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
    fn live(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }
    fn guard(&self) -> Guard {
        self.live.fetch_add(1, Ordering::SeqCst);
        Guard(self.live.clone())
    }
}

/// One call really in flight: from the inner `call` until its future is dropped
/// unfinished, or its body ends or is dropped.
struct Guard(Arc<AtomicUsize>);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What one call does: wait until `gate` is open, then answer with `frames` frames.
struct Plan {
    gate: Arc<AtomicBool>,
    frames: usize,
}

impl Plan {
    fn new(frames: usize) -> (Plan, Arc<AtomicBool>) {
        let gate = Arc::new(AtomicBool::new(false));
        (
            Plan {
                gate: gate.clone(),
                frames,
            },
            gate,
        )
    }
}

/// An inner service the test drives: its futures finish when their gate opens, its
/// bodies yield one frame per poll, and `ready` switches its readiness.
#[derive(Clone)]
struct Controlled {
    tracker: Tracker,
    ready: Arc<AtomicBool>,
}

impl Controlled {
    fn new(tracker: &Tracker) -> Self {
        Controlled {
            tracker: tracker.clone(),
            ready: Arc::new(AtomicBool::new(true)),
        }
    }
}

impl Service<Plan> for Controlled {
    type Response = Response<TestBody>;
    type Error = Infallible;
    type Future = CallFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        if self.ready.load(Ordering::SeqCst) {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }

    fn call(&mut self, plan: Plan) -> CallFuture {
        self.tracker.calls.fetch_add(1, Ordering::SeqCst);
        CallFuture {
            guard: Some(self.tracker.guard()),
            plan,
        }
    }
}

struct CallFuture {
    guard: Option<Guard>,
    plan: Plan,
}

impl Future for CallFuture {
    type Output = Result<Response<TestBody>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Self::Output> {
        if !self.plan.gate.load(Ordering::SeqCst) {
            return Poll::Pending;
        }
        let frames = self.plan.frames;
        // An empty body is over as soon as the response is: the call ends here.
        let guard = self.guard.take().filter(|_| frames > 0);
        Poll::Ready(Ok(Response::new(TestBody { frames, guard })))
    }
}

/// A body of `frames` one-byte frames that ends the call with its last one.
struct TestBody {
    frames: usize,
    guard: Option<Guard>,
}

impl Body for TestBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.frames == 0 {
            self.guard = None;
            return Poll::Ready(None);
        }
        self.frames -= 1;
        if self.frames == 0 {
            self.guard = None;
        }
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"x")))))
    }

    fn is_end_stream(&self) -> bool {
        self.frames == 0
    }
}

fn poll_once<F: Future>(fut: Pin<&mut F>) -> Poll<F::Output> {
    fut.poll(&mut Context::from_waker(Waker::noop()))
}

fn poll_ready<S: Service<R>, R>(svc: &mut S) -> Poll<Result<(), S::Error>> {
    svc.poll_ready(&mut Context::from_waker(Waker::noop()))
}

/// What one `poll_frame` returns.
type Polled<B> = Poll<Option<Result<Frame<<B as Body>::Data>, <B as Body>::Error>>>;

fn poll_frame<B: Body + Unpin>(body: &mut B) -> Polled<B> {
    Pin::new(body).poll_frame(&mut Context::from_waker(Waker::noop()))
}

// ---------------------------------------------------------------------------------
// Any interleaving of starts, completions, drops and body reads.
// ---------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    /// A call through service `svc` (of three: two made by the layer, one a clone),
    /// whose body will have `frames` frames.
    Start { svc: usize, frames: usize },
    /// Open the gate of a pending call and poll it to its response.
    Complete(usize),
    /// Drop a pending call's future.
    DropCall(usize),
    /// Poll one frame of a response body.
    ReadFrame(usize),
    /// Drop a response body.
    DropBody(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..3usize, 0..4usize).prop_map(|(svc, frames)| Op::Start { svc, frames }),
        2 => any::<usize>().prop_map(Op::Complete),
        1 => any::<usize>().prop_map(Op::DropCall),
        2 => any::<usize>().prop_map(Op::ReadFrame),
        1 => any::<usize>().prop_map(Op::DropBody),
    ]
}

/// Runs `ops` against a layer in HTTP mode, checking after every step that no more
/// than `max` calls are really in flight and that the layer counts exactly those.
fn run_http(max: usize, ops: &[Op]) -> Result<(), TestCaseError> {
    let tracker = Tracker::default();
    let layer = ConcurrencyLimitLayer::new(max).http();
    let first = layer.layer(Controlled::new(&tracker));
    let mut svcs = [first.clone(), layer.layer(Controlled::new(&tracker)), first];
    let mut pending = Vec::new();
    let mut bodies = Vec::new();
    let mut rejections = 0;

    for op in ops {
        match *op {
            Op::Start { svc, frames } => {
                let svc = &mut svcs[svc];
                prop_assert!(matches!(poll_ready(svc), Poll::Ready(Ok(()))));
                let (calls, full) = (tracker.calls(), layer.in_flight() == max);
                let (plan, gate) = Plan::new(frames);
                let mut fut = Box::pin(svc.call(plan));
                if full {
                    rejections += 1;
                    prop_assert_eq!(
                        tracker.calls(),
                        calls,
                        "a rejection called the inner service"
                    );
                    match poll_once(fut.as_mut()) {
                        Poll::Ready(Ok(res)) => {
                            prop_assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE)
                        }
                        _ => prop_assert!(false, "a rejection is an immediate 503"),
                    }
                } else {
                    prop_assert_eq!(tracker.calls(), calls + 1);
                    pending.push((gate, fut));
                }
            }
            Op::Complete(i) if !pending.is_empty() => {
                let (gate, mut fut) = pending.remove(i % pending.len());
                gate.store(true, Ordering::SeqCst);
                match poll_once(fut.as_mut()) {
                    Poll::Ready(Ok(res)) => {
                        prop_assert_eq!(res.status(), StatusCode::OK);
                        bodies.push(res.into_body());
                    }
                    _ => prop_assert!(false, "an open gate completes the call"),
                }
            }
            Op::DropCall(i) if !pending.is_empty() => {
                drop(pending.remove(i % pending.len()));
            }
            Op::ReadFrame(i) if !bodies.is_empty() => {
                let n = bodies.len();
                let polled = poll_frame(&mut bodies[i % n]);
                prop_assert!(polled.is_ready());
            }
            Op::DropBody(i) if !bodies.is_empty() => {
                drop(bodies.remove(i % bodies.len()));
            }
            _ => {}
        }
        prop_assert!(
            tracker.live() <= max,
            "{} in flight over {max}",
            tracker.live()
        );
        prop_assert_eq!(layer.in_flight(), tracker.live());
        prop_assert_eq!(layer.rejections(), rejections);
    }
    drop((pending, bodies));
    prop_assert_eq!(layer.in_flight(), 0);
    Ok(())
}

/// The same in error mode, where a call ends with its future (bodies are empty).
fn run_error_mode(max: usize, ops: &[Op]) -> Result<(), TestCaseError> {
    let tracker = Tracker::default();
    let layer = ConcurrencyLimitLayer::new(max);
    let first = layer.layer(Controlled::new(&tracker));
    let mut svcs = [first.clone(), layer.layer(Controlled::new(&tracker)), first];
    let mut pending = Vec::new();
    let mut rejections = 0;

    for op in ops {
        match *op {
            Op::Start { svc, .. } => {
                let svc = &mut svcs[svc];
                prop_assert!(matches!(poll_ready(svc), Poll::Ready(Ok(()))));
                let (calls, full) = (tracker.calls(), layer.in_flight() == max);
                let (plan, gate) = Plan::new(0);
                let mut fut = Box::pin(svc.call(plan));
                if full {
                    rejections += 1;
                    prop_assert_eq!(
                        tracker.calls(),
                        calls,
                        "a rejection called the inner service"
                    );
                    match poll_once(fut.as_mut()) {
                        Poll::Ready(Err(e)) => prop_assert!(e.is::<Overloaded>()),
                        _ => prop_assert!(false, "a rejection is an immediate error"),
                    }
                } else {
                    prop_assert_eq!(tracker.calls(), calls + 1);
                    pending.push((gate, fut));
                }
            }
            Op::Complete(i) if !pending.is_empty() => {
                let (gate, mut fut) = pending.remove(i % pending.len());
                gate.store(true, Ordering::SeqCst);
                prop_assert!(matches!(poll_once(fut.as_mut()), Poll::Ready(Ok(_))));
            }
            Op::DropCall(i) if !pending.is_empty() => {
                drop(pending.remove(i % pending.len()));
            }
            _ => {}
        }
        prop_assert!(
            tracker.live() <= max,
            "{} in flight over {max}",
            tracker.live()
        );
        prop_assert_eq!(layer.in_flight(), tracker.live());
        prop_assert_eq!(layer.rejections(), rejections);
    }
    drop(pending);
    prop_assert_eq!(layer.in_flight(), 0);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn http_mode_never_exceeds_max_and_counts_exactly(
        max in 1..5usize,
        ops in prop::collection::vec(op(), 1..200),
    ) {
        run_http(max, &ops)?;
    }

    #[test]
    fn error_mode_never_exceeds_max_and_counts_exactly(
        max in 1..5usize,
        ops in prop::collection::vec(op(), 1..200),
    ) {
        run_error_mode(max, &ops)?;
    }
}

// ---------------------------------------------------------------------------------
// The contract, one promise at a time.
// ---------------------------------------------------------------------------------

#[test]
fn a_rejection_does_not_call_the_inner_service() {
    let tracker = Tracker::default();
    let layer = ConcurrencyLimitLayer::new(1);
    let mut svc = layer.layer(Controlled::new(&tracker));

    let (plan, _gate) = Plan::new(0);
    let _held = svc.call(plan);
    assert_eq!(tracker.calls(), 1);

    let (plan, _gate) = Plan::new(0);
    let mut rejected = Box::pin(svc.call(plan));
    let Poll::Ready(Err(err)) = poll_once(rejected.as_mut()) else {
        panic!("a full limit rejects at once");
    };
    assert_eq!(
        err.downcast_ref::<Overloaded>(),
        Some(&Overloaded::new(DEFAULT_RETRY_AFTER))
    );
    assert_eq!(err.to_string(), "overloaded; retry after 1 s");
    assert_eq!(tracker.calls(), 1, "the inner service was called");
    assert_eq!((layer.in_flight(), layer.rejections()), (1, 1));
}

#[test]
fn clones_and_services_of_one_layer_share_one_limit() {
    let tracker = Tracker::default();
    let layer = ConcurrencyLimitLayer::new(2);
    let mut a = layer.layer(Controlled::new(&tracker));
    let mut b = a.clone();
    let mut c = layer.clone().layer(Controlled::new(&tracker));

    let _one = a.call(Plan::new(0).0);
    let _two = b.call(Plan::new(0).0);
    assert_eq!((a.in_flight(), c.in_flight(), layer.in_flight()), (2, 2, 2));
    let mut third = Box::pin(c.call(Plan::new(0).0));
    assert!(matches!(poll_once(third.as_mut()), Poll::Ready(Err(_))));
    assert_eq!(c.rejections(), 1);

    // Another layer value is another limit.
    let mut other = ConcurrencyLimitLayer::new(2).layer(Controlled::new(&tracker));
    let _own = other.call(Plan::new(0).0);
    assert_eq!((other.in_flight(), layer.in_flight()), (1, 2));
}

#[test]
fn poll_ready_forwards_readiness_and_never_reserves() {
    let tracker = Tracker::default();
    let inner = Controlled::new(&tracker);
    let ready = inner.ready.clone();
    let layer = ConcurrencyLimitLayer::new(1);
    let mut svc = layer.layer(inner);

    ready.store(false, Ordering::SeqCst);
    assert!(poll_ready(&mut svc).is_pending());
    ready.store(true, Ordering::SeqCst);

    // Many services polled ready hold nothing.
    let mut others: Vec<_> = (0..5).map(|_| svc.clone()).collect();
    for other in &mut others {
        assert!(matches!(poll_ready(other), Poll::Ready(Ok(()))));
    }
    assert_eq!(layer.in_flight(), 0);

    // A full limit still reports ready: the rejection comes in `call`.
    let _held = svc.call(Plan::new(0).0);
    assert!(matches!(poll_ready(&mut others[0]), Poll::Ready(Ok(()))));
    assert_eq!(layer.rejections(), 0);
}

#[test]
fn the_permit_is_released_when_the_response_future_is_dropped() {
    let tracker = Tracker::default();
    let layer = ConcurrencyLimitLayer::new(1);
    let mut svc = layer.layer(Controlled::new(&tracker));

    let held = svc.call(Plan::new(0).0);
    assert_eq!(layer.in_flight(), 1);
    drop(held);
    assert_eq!(layer.in_flight(), 0);
    let mut next = Box::pin(svc.call(Plan::new(0).0));
    assert!(
        poll_once(next.as_mut()).is_pending(),
        "admitted, waiting on its gate"
    );
}

#[tokio::test(start_paused = true)]
async fn a_slot_frees_when_a_slow_call_finishes() {
    let slow = service_fn(|secs: u64| async move {
        tokio::time::sleep(Duration::from_secs(secs)).await;
        Ok::<_, BoxError>(secs)
    });
    let layer = ConcurrencyLimitLayer::new(1);
    let svc = layer.layer(slow);

    let first = tokio::spawn(svc.clone().oneshot(5));
    tokio::task::yield_now().await;
    assert_eq!(layer.in_flight(), 1);
    let err = svc.clone().oneshot(1).await.unwrap_err();
    assert!(err.is::<Overloaded>());

    tokio::time::advance(Duration::from_secs(5)).await;
    assert_eq!(first.await.unwrap().unwrap(), 5);
    assert_eq!(layer.in_flight(), 0);
    assert_eq!(svc.oneshot(1).await.unwrap(), 1);
}

#[tokio::test(start_paused = true)]
async fn http_mode_answers_503_with_retry_after_and_the_json_body() {
    let tracker = Tracker::default();
    let layer = ConcurrencyLimitLayer::new(1)
        .retry_after(Duration::from_millis(2500))
        .http();
    let mut svc = layer.layer(Controlled::new(&tracker));

    let _held = svc.call(Plan::new(1).0);
    let res = svc.call(Plan::new(1).0).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()["retry-after"], "3");
    assert_eq!(res.headers()["content-type"], "application/json");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        body,
        r#"{"error":"overloaded","message":"overloaded; retry after 3 s"}"#
    );
    assert_eq!(tracker.calls(), 1);
    assert_eq!(layer.rejections(), 1);
}

#[test]
fn the_permit_is_held_until_the_http_body_ends() {
    let tracker = Tracker::default();
    let layer = ConcurrencyLimitLayer::new(1).http();
    let mut svc = layer.layer(Controlled::new(&tracker));

    let (plan, gate) = Plan::new(2);
    let mut fut = Box::pin(svc.call(plan));
    gate.store(true, Ordering::SeqCst);
    let Poll::Ready(Ok(res)) = poll_once(fut.as_mut()) else {
        panic!("the gate is open");
    };
    drop(fut);
    let mut body = res.into_body();

    // The response is out, its body is not: the slot is still taken.
    assert_eq!(layer.in_flight(), 1);
    let mut refused = Box::pin(svc.call(Plan::new(0).0));
    let Poll::Ready(Ok(res)) = poll_once(refused.as_mut()) else {
        panic!("a rejection is immediate");
    };
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);

    assert!(poll_frame(&mut body).is_ready());
    assert_eq!(layer.in_flight(), 1, "one frame of two read");
    assert!(poll_frame(&mut body).is_ready());
    assert!(body.is_end_stream());
    assert_eq!(layer.in_flight(), 0, "the last frame ends the call");
    assert!(matches!(poll_frame(&mut body), Poll::Ready(None)));
    assert_eq!(layer.in_flight(), 0);
    assert_eq!(tracker.live(), 0);
}

#[test]
fn the_permit_is_released_when_the_http_body_is_dropped() {
    let tracker = Tracker::default();
    let layer = ConcurrencyLimitLayer::new(1).http();
    let mut svc = layer.layer(Controlled::new(&tracker));

    let (plan, gate) = Plan::new(3);
    let mut fut = Box::pin(svc.call(plan));
    gate.store(true, Ordering::SeqCst);
    let Poll::Ready(Ok(res)) = poll_once(fut.as_mut()) else {
        panic!("the gate is open");
    };
    let mut body = res.into_body();
    assert!(poll_frame(&mut body).is_ready());
    assert_eq!(layer.in_flight(), 1);
    drop(body);
    assert_eq!(layer.in_flight(), 0);
}

#[test]
fn an_empty_http_body_ends_the_call_with_the_response() {
    let tracker = Tracker::default();
    let layer = ConcurrencyLimitLayer::new(1).http();
    let mut svc = layer.layer(Controlled::new(&tracker));

    let (plan, gate) = Plan::new(0);
    let mut fut = Box::pin(svc.call(plan));
    gate.store(true, Ordering::SeqCst);
    let Poll::Ready(Ok(res)) = poll_once(fut.as_mut()) else {
        panic!("the gate is open");
    };
    assert_eq!(layer.in_flight(), 0);
    drop(res);
}

#[tokio::test(start_paused = true)]
async fn an_inner_error_in_http_mode_frees_the_slot() {
    let failing = service_fn(|_: ()| async {
        Err::<Response<http_body_util::Empty<Bytes>>, &'static str>("boom")
    });
    let layer = ConcurrencyLimitLayer::new(1).http();
    let svc = layer.layer(failing);
    assert_eq!(svc.clone().oneshot(()).await.err(), Some("boom"));
    assert_eq!(layer.in_flight(), 0);
    assert_eq!(svc.oneshot(()).await.err(), Some("boom"));
    assert_eq!(layer.rejections(), 0);
}

#[test]
fn constructors_and_getters() {
    let layer = ConcurrencyLimitLayer::new(7);
    assert_eq!(layer.max(), 7);
    assert_eq!(layer.in_flight(), 0);
    assert_eq!(layer.rejections(), 0);
    assert_eq!(layer.retry_after_hint(), DEFAULT_RETRY_AFTER);
    assert_eq!(DEFAULT_RETRY_AFTER, Duration::from_secs(1));

    let layer = layer.retry_after(Duration::from_secs(3)).http();
    assert_eq!(layer.max(), 7);
    assert_eq!(layer.retry_after_hint(), Duration::from_secs(3));
    let svc = layer.layer(Controlled::new(&Tracker::default()));
    assert_eq!(
        (svc.max(), svc.retry_after_hint()),
        (7, Duration::from_secs(3))
    );

    let err: InvalidConcurrencyLimit = ConcurrencyLimitLayer::try_new(0).unwrap_err();
    assert_eq!(err.max(), 0);
    assert_eq!(
        err.to_string(),
        "invalid concurrency limit (max 0): the maximum must be at least 1"
    );
    assert!(ConcurrencyLimitLayer::try_new(1).is_ok());
}

#[test]
#[should_panic(expected = "invalid concurrency limit (max 0)")]
fn new_panics_on_zero() {
    let _ = ConcurrencyLimitLayer::new(0);
}
