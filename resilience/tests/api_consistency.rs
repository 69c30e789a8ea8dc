//! The API promises that span both layers: builder calls in any order, buckets created
//! once, one "retry after N s" wording, and a missing peer address that says what to do.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU16, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use resilience::{
    classify_fn, retry_after_secs, Burst, CircuitBreaker, CircuitBreakerLayer, CircuitOpen,
    CircuitState, KeyExtractor, PeerIp, Rate, RateLimited, TokenBucketLayer,
};
use tower::{service_fn, Layer, ServiceExt};

fn from_peer(peer: &str) -> Request<Full<Bytes>> {
    let mut req = Request::new(Full::default());
    req.extensions_mut()
        .insert(peer.parse::<SocketAddr>().unwrap());
    req
}

async fn body_text<B>(res: Response<B>) -> String
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// The `message` of a `{"error":..,"message":..}` body.
fn message(body: &str) -> &str {
    let start = body.find("\"message\":\"").expect("a message") + "\"message\":\"".len();
    let end = start + body[start..].find('"').unwrap();
    &body[start..end]
}

// ---------------------------------------------------------------------------------------
// Circuit breaker: `.classifier(x)` and `.http()` in either order

/// An upstream answering the status in `status`.
fn upstream(
    status: Arc<AtomicU16>,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    service_fn(move |_req: Request<Full<Bytes>>| {
        let status = StatusCode::from_u16(status.load(Ordering::SeqCst)).unwrap();
        async move {
            let mut res = Response::new(Full::default());
            *res.status_mut() = status;
            Ok::<_, Infallible>(res)
        }
    })
}

#[tokio::test(start_paused = true)]
async fn classifier_then_http_keeps_the_classifier_and_so_does_the_other_order() {
    // Only 404s count: a classifier that disagrees with the HTTP default on both sides.
    let only_404 = classify_fn(
        |r: Result<&Response<Full<Bytes>>, &Infallible>| matches!(r, Ok(res) if res.status() == StatusCode::NOT_FOUND),
    );
    let breaker = || CircuitBreaker::builder().consecutive_failures(2).build();
    let status = Arc::new(AtomicU16::new(500));

    let before = breaker();
    let after = breaker();
    let default = breaker();
    let layers = [
        CircuitBreakerLayer::new(before.clone())
            .classifier(only_404)
            .http()
            .layer(upstream(status.clone())),
        CircuitBreakerLayer::new(after.clone())
            .http()
            .classifier(only_404)
            .layer(upstream(status.clone())),
    ];
    let defaulted = CircuitBreakerLayer::new(default.clone())
        .http()
        .layer(upstream(status.clone()));

    // 500s: not failures for the user's classifier, failures for the HTTP default.
    for _ in 0..3 {
        for svc in &layers {
            let res = svc.clone().oneshot(Request::new(Full::default())).await;
            assert_eq!(res.unwrap().status(), StatusCode::INTERNAL_SERVER_ERROR);
        }
        let _ = defaulted
            .clone()
            .oneshot(Request::new(Full::default()))
            .await;
    }
    for b in [&before, &after] {
        assert_eq!(b.state(), CircuitState::Closed);
        assert_eq!(b.stats().failures, 0, "the user's classifier was kept");
    }
    assert_eq!(
        default.state(),
        CircuitState::Open,
        "HTTP mode's default counts 5xx"
    );

    // 404s: failures for the user's classifier, in both orders.
    status.store(404, Ordering::SeqCst);
    for svc in &layers {
        for _ in 0..2 {
            let _ = svc.clone().oneshot(Request::new(Full::default())).await;
        }
    }
    assert_eq!(before.state(), CircuitState::Open);
    assert_eq!(after.state(), CircuitState::Open);
}

// ---------------------------------------------------------------------------------------
// Token bucket: the builder creates the buckets once

#[tokio::test(start_paused = true)]
async fn key_and_max_keys_in_either_order_make_one_map_that_is_never_replaced() {
    let rate = Rate::per_second(1.0);
    let a = TokenBucketLayer::builder(rate, Burst(1))
        .key(PeerIp)
        .max_keys(40)
        .build();
    let b = TokenBucketLayer::builder(rate, Burst(1))
        .max_keys(40)
        .key(PeerIp)
        .build();
    for layer in [&a, &b] {
        assert_eq!(layer.max_keys(), 40);
        assert_eq!(layer.keyed_buckets().unwrap().max_keys(), 40);
        assert_eq!((layer.rate(), layer.burst()), (rate, 1));
    }

    // The handle is typed by the extractor's key (`IpAddr`) and is the services' map.
    let buckets = a.keyed_buckets().unwrap();
    let ok = service_fn(|_req: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(Response::new(Full::<Bytes>::default()))
    });
    let error_mode = a.layer(ok);
    error_mode
        .oneshot(from_peer("192.0.2.1:1"))
        .await
        .expect("first request passes");
    assert_eq!(buckets.len(), 1);

    // Switching the mode and the HTTP settings after traffic keeps the buckets: the
    // client that spent its token is still limited, through the new layer.
    let http = a
        .clone()
        .http()
        .headers_on_success(false)
        .body(http::HeaderValue::from_static("text/plain"), "slow down");
    assert_eq!(http.keyed_buckets().unwrap().len(), 1);
    let res = http
        .layer(ok)
        .oneshot(from_peer("192.0.2.1:2"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(body_text(res).await, "slow down");
    let res = http
        .layer(ok)
        .oneshot(from_peer("192.0.2.2:1"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(res.headers().get("ratelimit").is_none());
    assert_eq!(buckets.len(), 2, "the original handle sees the new client");

    // Wait mode over the same buckets.
    let wait = a.wait(Duration::from_secs(5)).layer(ok);
    let start = tokio::time::Instant::now();
    wait.oneshot(from_peer("192.0.2.1:3")).await.unwrap();
    assert!(
        start.elapsed() > Duration::ZERO,
        "waited for the spent token"
    );
    assert_eq!(buckets.len(), 2);
}

#[test]
fn a_global_layer_has_no_keyed_map() {
    let layer = TokenBucketLayer::new(Rate::per_second(5.0), Burst(2));
    assert!(layer.keyed_buckets().is_none());
    assert_eq!(layer.max_keys(), resilience::token_bucket::DEFAULT_MAX_KEYS);
}

// ---------------------------------------------------------------------------------------
// One wording for "retry after"

#[tokio::test(start_paused = true)]
async fn errors_and_both_http_bodies_say_the_same_retry_after() {
    const WAIT: Duration = Duration::from_millis(3200);
    const SAID: &str = "retry after 4 s";
    assert_eq!(retry_after_secs(WAIT), 4);

    // The two errors.
    assert_eq!(
        CircuitOpen::new(WAIT).to_string(),
        format!("circuit breaker is open; {SAID}")
    );
    assert_eq!(
        RateLimited::new(WAIT).to_string(),
        format!("rate limited; {SAID}")
    );

    // The breaker's 503: open for 3.2 s.
    let breaker = CircuitBreaker::builder()
        .consecutive_failures(1)
        .open_for(WAIT)
        .build();
    let status = Arc::new(AtomicU16::new(500));
    let svc = CircuitBreakerLayer::new(breaker)
        .http()
        .layer(upstream(status));
    let _ = svc.clone().oneshot(Request::new(Full::default())).await;
    let open = svc.oneshot(Request::new(Full::default())).await.unwrap();
    assert_eq!(open.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(open.headers()["retry-after"], "4");
    let body = body_text(open).await;
    assert_eq!(message(&body), CircuitOpen::new(WAIT).to_string(), "{body}");

    // The limiter's 429: one token per 3.2 s.
    let ok = service_fn(|_req: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(Response::new(Full::<Bytes>::default()))
    });
    let svc = TokenBucketLayer::new(Rate::per_second(1.0 / 3.2), Burst(1))
        .http()
        .layer(ok);
    let _ = svc.clone().oneshot(Request::new(Full::default())).await;
    let limited = svc.oneshot(Request::new(Full::default())).await.unwrap();
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(limited.headers()["retry-after"], "4");
    let body = body_text(limited).await;
    assert_eq!(message(&body), RateLimited::new(WAIT).to_string(), "{body}");
    assert!(message(&body).ends_with(SAID));
}

// ---------------------------------------------------------------------------------------
// A missing peer address says what to do

#[test]
fn missing_peer_names_the_axum_feature_and_the_connect_info_call() {
    let missing = PeerIp.extract(&Request::new(())).unwrap_err();
    let text = missing.to_string();
    assert!(
        text.starts_with("rate limit key missing: no peer address"),
        "{text}"
    );
    assert!(text.contains("resilience's `axum` feature"), "{text}");
    assert!(
        text.contains("into_make_service_with_connect_info::<SocketAddr>()"),
        "{text}"
    );
    assert!(text.contains("hyper"), "{text}");
}
