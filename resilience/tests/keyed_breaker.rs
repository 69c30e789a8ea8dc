//! Keyed circuit breakers: keys trip on their own, the key cap holds under a flood of
//! distinct keys, and eviction takes closed, idle breakers first. On paused time.

use std::{convert::Infallible, time::Duration};

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use proptest::prelude::*;
use resilience::{
    key_fn, BoxError, CircuitBreaker, CircuitOpen, CircuitState, KeyedCircuitBreakerLayer,
    KeyedCircuitBreakers, MissingKey, UriHost,
};
use tower::{service_fn, Layer, ServiceExt};

const SEC: Duration = Duration::from_secs(1);

/// Requests are `(key, ok)`: the service fails the ones with `ok == false`.
fn by_outcome(
) -> impl tower::Service<(u32, bool), Response = u32, Error = BoxError, Future = impl Send> + Clone
{
    service_fn(|(key, ok): (u32, bool)| async move {
        if ok {
            Ok(key)
        } else {
            Err::<u32, BoxError>("down".into())
        }
    })
}

#[tokio::test(start_paused = true)]
async fn one_key_failing_does_not_open_another_keys_breaker() {
    let layer = KeyedCircuitBreakerLayer::builder(
        CircuitBreaker::builder()
            .consecutive_failures(3)
            .open_for(SEC * 5),
    )
    .key(key_fn(|req: &(u32, bool)| Some(req.0)))
    .build();
    let svc = layer.layer(by_outcome());
    for _ in 0..3 {
        assert!(svc.clone().oneshot((1, false)).await.is_err());
    }
    let err = svc.clone().oneshot((1, true)).await.unwrap_err();
    assert_eq!(
        err.downcast_ref::<CircuitOpen>().unwrap().retry_after,
        SEC * 5
    );
    // Key 2 was never failing: called, and closed. Key 2's failures count for key 2 only.
    for _ in 0..2 {
        assert_eq!(svc.clone().oneshot((2, true)).await.unwrap(), 2);
        assert!(svc.clone().oneshot((2, false)).await.is_err());
    }
    let breakers = layer.breakers();
    assert_eq!(breakers.get(&1).unwrap().state(), CircuitState::Open);
    assert_eq!(breakers.get(&2).unwrap().state(), CircuitState::Closed);
    assert_eq!(breakers.len(), 2);
    // Key 1 recovers on its own schedule.
    tokio::time::advance(SEC * 5).await;
    assert_eq!(svc.clone().oneshot((1, true)).await.unwrap(), 1);
    assert_eq!(breakers.get(&1).unwrap().state(), CircuitState::Closed);
}

#[test]
fn the_cap_holds_at_a_million_distinct_keys() {
    let cap = 10_000;
    let breakers = KeyedCircuitBreakers::<u64>::new(CircuitBreaker::builder(), cap);
    let mut most = 0;
    for key in 0..1_000_000u64 {
        let breaker = breakers.breaker(&key);
        breaker
            .try_acquire()
            .expect("a new key is closed")
            .success();
        drop(breaker);
        if key % 1000 == 999 {
            most = most.max(breakers.len());
        }
    }
    assert!(
        most <= cap,
        "the map held {most} keys, over its cap of {cap}"
    );
    assert!(breakers.len() <= cap);
    assert_eq!(
        breakers.evicted(),
        1_000_000 - breakers.len() as u64,
        "every key is either in the map or was evicted"
    );
}

#[tokio::test(start_paused = true)]
async fn closed_idle_breakers_are_evicted_before_open_or_held_ones() {
    // A cap of 32 is one shard: every key competes with every other.
    let template = CircuitBreaker::builder()
        .consecutive_failures(1)
        .open_for(SEC * 3600);
    let breakers = KeyedCircuitBreakers::<u32>::new(template, 32);
    breakers.breaker(&0).try_acquire().unwrap().failure();
    let held = breakers.breaker(&1);
    let in_flight = breakers.breaker(&2).try_acquire().unwrap();
    for key in 3..10_000 {
        // Time moves, so the flood's keys are all used after the three above.
        tokio::time::advance(Duration::from_millis(1)).await;
        breakers.breaker(&key).try_acquire().unwrap().success();
        assert!(breakers.len() <= 32);
    }
    assert_eq!(breakers.get(&0).unwrap().state(), CircuitState::Open);
    assert!(
        breakers.get(&1).is_some(),
        "a held handle keeps its breaker"
    );
    assert!(
        breakers.get(&2).is_some(),
        "a call in flight keeps its breaker"
    );
    drop((held, in_flight));
}

#[tokio::test(start_paused = true)]
async fn with_nothing_idle_the_least_recently_used_go_and_the_cap_still_holds() {
    let breakers =
        KeyedCircuitBreakers::<u32>::new(CircuitBreaker::builder().consecutive_failures(1), 32);
    // Every key open: no closed, idle breaker to evict.
    for key in 0..1000 {
        tokio::time::advance(Duration::from_millis(1)).await;
        breakers.breaker(&key).try_acquire().unwrap().failure();
        assert!(breakers.len() <= 32);
    }
    assert!(breakers.get(&999).is_some(), "the newest key is kept");
    assert!(breakers.get(&0).is_none(), "the oldest key went");
}

#[tokio::test(start_paused = true)]
async fn a_request_without_a_key_is_refused_in_both_modes() {
    let layer = KeyedCircuitBreakerLayer::builder(CircuitBreaker::builder())
        .key(UriHost)
        .build();
    let svc = layer.layer(service_fn(|_req: Request<()>| async {
        Ok::<_, Infallible>(Response::new(()))
    }));
    let err = svc.oneshot(Request::new(())).await.unwrap_err();
    assert_eq!(
        err.downcast_ref::<MissingKey>().unwrap().what(),
        "host in the request URI"
    );

    let svc = layer
        .clone()
        .http()
        .layer(service_fn(|_req: Request<()>| async {
            Ok::<_, Infallible>(Response::new(String::new()))
        }));
    let res = svc.oneshot(Request::new(())).await.unwrap();
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(body.starts_with(br#"{"error":"breaker_key_missing""#));
    assert!(layer.breakers().is_empty());
}

#[test]
fn parameters_and_getters() {
    assert!(KeyedCircuitBreakers::<u32>::try_new(CircuitBreaker::builder(), 0).is_err());
    let err = KeyedCircuitBreakerLayer::builder(CircuitBreaker::builder())
        .max_keys(0)
        .try_build()
        .unwrap_err();
    assert_eq!(err.reason(), "the key cap must be at least 1");
    let layer = KeyedCircuitBreakerLayer::builder(CircuitBreaker::builder())
        .key(UriHost)
        .max_keys(77)
        .build();
    assert_eq!((layer.max_keys(), *layer.key()), (77, UriHost));
}

#[cfg(feature = "reqwest")]
#[test]
fn uri_host_keys_reqwest_requests_like_http_ones() {
    use resilience::KeyExtractor;
    let req = |url: &str| reqwest::Request::new(reqwest::Method::GET, url.parse().unwrap());
    assert_eq!(
        UriHost.extract(&req("https://Up.Example/a")).unwrap(),
        "up.example"
    );
    assert_eq!(
        UriHost.extract(&req("http://10.0.0.1:8080/")).unwrap(),
        "10.0.0.1:8080"
    );
    let http = Request::get("http://10.0.0.1:8080/").body(()).unwrap();
    assert_eq!(UriHost.extract(&http).unwrap(), "10.0.0.1:8080");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any sequence of keys and outcomes: the map never holds more than its cap, and
    /// every key either has its breaker or was evicted.
    #[test]
    fn the_map_never_exceeds_its_cap(
        cap in 1usize..100,
        calls in proptest::collection::vec((0u32..500, any::<bool>()), 1..400),
    ) {
        let breakers =
            KeyedCircuitBreakers::<u32>::new(CircuitBreaker::builder().consecutive_failures(1), cap);
        let mut seen = std::collections::HashSet::new();
        for (key, ok) in calls {
            if let Ok(permit) = breakers.try_acquire(&key) {
                permit.record(!ok);
            }
            seen.insert(key);
            prop_assert!(breakers.len() <= cap, "{} keys, cap {}", breakers.len(), cap);
        }
        prop_assert!(breakers.len() as u64 + breakers.evicted() >= seen.len() as u64);
    }
}
