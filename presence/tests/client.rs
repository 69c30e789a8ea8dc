//! Client SDK tests on paused time, against a scripted transport (a `service_fn`
//! that answers from a script and records every request) and, end to end, against
//! the server's own service in-process.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use http_body_util::{BodyExt, Full};
use presence::client::{ClientError, Heartbeat, PresenceClient, PresenceClientBuilder};
use presence::model::Meta;
use resilience::{BoxError, CircuitBreaker, CircuitState};
use serde_json::{json, Value};
use tokio::time::Instant;

const BASE: &str = "http://presence.test/presence";

/// One request as the transport saw it.
#[derive(Clone, Debug)]
struct Seen {
    method: Method,
    path: String,
    headers: HeaderMap,
    body: Value,
    at: Instant,
}

impl Seen {
    fn lease_id(&self) -> &str {
        self.body["lease_id"].as_str().unwrap_or_default()
    }
}

/// What the scripted transport does with a request.
enum Act {
    Reply(StatusCode, Value),
    ReplyWith(http::Response<Full<Bytes>>),
    Fail(&'static str),
    Hang,
}

fn ok(v: Value) -> Act {
    Act::Reply(StatusCode::OK, v)
}

fn err(status: u16, code: &str) -> Act {
    Act::Reply(
        StatusCode::from_u16(status).expect("test status"),
        json!({"error": code, "message": format!("scripted {code}")}),
    )
}

#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<Seen>>>);

impl Log {
    fn all(&self) -> Vec<Seen> {
        self.0.lock().expect("log lock").clone()
    }
    fn len(&self) -> usize {
        self.0.lock().expect("log lock").len()
    }
    fn to(&self, path: &str) -> Vec<Seen> {
        self.all().into_iter().filter(|s| s.path == path).collect()
    }
}

/// A transport answering with `script(request, how many earlier requests had the same
/// path)`, and the log of what it saw.
fn scripted<F>(
    script: F,
) -> (
    impl tower::Service<
            http::Request<Full<Bytes>>,
            Response = http::Response<Full<Bytes>>,
            Error = BoxError,
            Future = impl Send,
        > + Clone
        + Send
        + 'static,
    Log,
)
where
    F: Fn(&Seen, usize) -> Act + Send + Sync + 'static,
{
    let log = Log::default();
    let script = Arc::new(script);
    let svc_log = log.clone();
    let svc = tower::service_fn(move |req: http::Request<Full<Bytes>>| {
        let log = svc_log.clone();
        let script = script.clone();
        async move {
            let (parts, body) = req.into_parts();
            let bytes = body.collect().await?.to_bytes();
            let seen = Seen {
                method: parts.method,
                path: parts.uri.path().to_owned(),
                headers: parts.headers,
                body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
                at: Instant::now(),
            };
            let act = {
                let mut log = log.0.lock().expect("log lock");
                let earlier = log.iter().filter(|s| s.path == seen.path).count();
                log.push(seen.clone());
                script(&seen, earlier)
            };
            match act {
                Act::Reply(status, v) => Ok(http::Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(v.to_string())))?),
                Act::ReplyWith(r) => Ok(r),
                Act::Fail(msg) => Err(BoxError::from(msg)),
                Act::Hang => {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    Ok(http::Response::new(Full::new(Bytes::from_static(b"[]"))))
                }
            }
        }
    });
    (svc, log)
}

fn lease(n: usize, heartbeat_ms: u64) -> Value {
    json!({
        "node_id": "node-1",
        "lease_id": format!("L{n}"),
        "ttl_ms": heartbeat_ms * 3,
        "heartbeat_ms": heartbeat_ms,
        "expires_at_ms": 1_000_000,
    })
}

fn beat(seen: &Seen) -> Value {
    json!({"node_id": seen.body["node_id"], "lease_id": seen.body["lease_id"], "expires_at_ms": 2_000_000})
}

/// A builder over `svc` with no client-side rate limit, the default breaker and retry.
fn builder<S>(svc: S) -> PresenceClientBuilder
where
    S: tower::Service<
            http::Request<Full<Bytes>>,
            Response = http::Response<Full<Bytes>>,
            Error = BoxError,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    PresenceClient::builder(BASE).service(svc).no_rate_limit()
}

// ---------------------------------------------------------------------------
// circuit breaker

#[tokio::test(start_paused = true)]
async fn breaker_opens_after_repeated_5xx_fails_fast_and_half_opens_after_open_for() {
    let (svc, log) = scripted(|_, n| {
        if n < 3 {
            err(500, "boom")
        } else {
            ok(json!([]))
        }
    });
    let breaker = CircuitBreaker::builder()
        .consecutive_failures(3)
        .open_for(Duration::from_secs(1))
        .build();
    let pc = builder(svc)
        .no_retry()
        .breaker(breaker.clone())
        .build()
        .expect("client");

    for _ in 0..3 {
        match pc.list_nodes().await {
            Err(ClientError::Server {
                status: 500, code, ..
            }) => assert_eq!(code, "boom"),
            other => panic!("expected a 500, got {other:?}"),
        }
    }
    assert_eq!(breaker.state(), CircuitState::Open);

    // Open: fails fast, the transport is not reached.
    match pc.list_nodes().await {
        Err(ClientError::CircuitOpen(open)) => {
            assert!(open.retry_after <= Duration::from_secs(1));
            assert!(open.retry_after > Duration::ZERO);
        }
        other => panic!("expected CircuitOpen, got {other:?}"),
    }
    assert!(matches!(
        pc.get_node("node-1").await,
        Err(ClientError::CircuitOpen(_))
    ));
    assert_eq!(log.len(), 3, "an open breaker must not reach the transport");

    // After open_for: a trial call goes through, succeeds, and closes the breaker.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(pc.list_nodes().await.expect("trial call"), vec![]);
    assert_eq!(log.len(), 4);
    assert_eq!(breaker.state(), CircuitState::Closed);
}

#[tokio::test(start_paused = true)]
async fn four_xx_replies_do_not_trip_the_breaker() {
    let (svc, log) = scripted(|_, _| err(404, "not_found"));
    let breaker = CircuitBreaker::builder().consecutive_failures(2).build();
    let pc = builder(svc)
        .breaker(breaker.clone())
        .build()
        .expect("client");
    for _ in 0..5 {
        assert_eq!(pc.get_node("ghost").await.expect("404 is None"), None);
    }
    assert_eq!(breaker.state(), CircuitState::Closed);
    assert_eq!(log.len(), 5);
}

// ---------------------------------------------------------------------------
// rate limiter

#[tokio::test(start_paused = true)]
async fn limiter_waits_for_a_token_instead_of_failing() {
    let (svc, log) = scripted(|_, _| ok(json!([])));
    let pc = PresenceClient::builder(BASE)
        .service(svc)
        .rate_limit(10.0, 2)
        .build()
        .expect("client");

    let start = Instant::now();
    pc.list_nodes().await.expect("1st");
    pc.list_nodes().await.expect("2nd");
    assert_eq!(
        start.elapsed(),
        Duration::ZERO,
        "the burst goes through at once"
    );

    pc.list_nodes().await.expect("3rd waits, then succeeds");
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(99) && waited <= Duration::from_millis(110),
        "the call after the burst waits ~1/rate, waited {waited:?}"
    );
    let calls = log.all();
    assert_eq!(calls.len(), 3);
    assert_eq!(calls[2].at.duration_since(start), waited);
}

#[tokio::test(start_paused = true)]
async fn limiter_fails_a_call_that_would_wait_longer_than_its_bound() {
    let (svc, log) = scripted(|_, _| ok(json!([])));
    let pc = PresenceClient::builder(BASE)
        .service(svc)
        .rate_limit(1.0, 1)
        .rate_limit_max_wait(Duration::from_millis(100))
        .build()
        .expect("client");
    pc.list_nodes().await.expect("1st");
    match pc.list_nodes().await {
        Err(ClientError::RateLimited(r)) => assert!(r.retry_after > Duration::from_millis(100)),
        other => panic!("expected RateLimited, got {other:?}"),
    }
    assert_eq!(log.len(), 1);
}

// ---------------------------------------------------------------------------
// retry

#[tokio::test(start_paused = true)]
async fn retry_stops_at_its_limit() {
    let (svc, log) = scripted(|_, _| err(503, "store_unavailable"));
    let pc = builder(svc)
        .retry(3, Duration::from_millis(100))
        .build()
        .expect("client");

    let start = Instant::now();
    match pc.list_nodes().await {
        Err(ClientError::Server {
            status: 503, code, ..
        }) => assert_eq!(code, "store_unavailable"),
        other => panic!("expected the last 503, got {other:?}"),
    }
    assert_eq!(log.len(), 3, "3 attempts in all");
    // Full jitter: the waits are at most 100 ms and 200 ms.
    assert!(start.elapsed() <= Duration::from_millis(300));
    // One retried call is one outcome for the breaker.
    assert_eq!(pc.breaker().stats().failures, 1);
}

#[tokio::test(start_paused = true)]
async fn transport_errors_502_and_504_are_retried_until_success() {
    let (svc, log) = scripted(|_, n| match n {
        0 => Act::Fail("connection reset"),
        1 => err(502, "bad_gateway"),
        2 => err(504, "gateway_timeout"),
        _ => ok(json!([])),
    });
    let pc = builder(svc)
        .retry(4, Duration::from_millis(10))
        .build()
        .expect("client");
    assert_eq!(pc.list_nodes().await.expect("4th attempt succeeds"), vec![]);
    assert_eq!(log.len(), 4);
}

#[tokio::test(start_paused = true)]
async fn timeouts_are_retried_then_reported() {
    let (svc, log) = scripted(|_, _| Act::Hang);
    let pc = builder(svc)
        .timeout(Duration::from_secs(1))
        .retry(2, Duration::from_millis(10))
        .build()
        .expect("client");
    let start = Instant::now();
    assert!(matches!(pc.list_nodes().await, Err(ClientError::Timeout)));
    assert_eq!(log.len(), 2);
    let took = start.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took <= Duration::from_millis(2010),
        "{took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn login_is_never_retried() {
    let (svc, log) = scripted(|seen, _| match seen.path.as_str() {
        "/presence/login" if seen.body["node_id"] == "a" => err(503, "store_unavailable"),
        "/presence/login" => Act::Fail("connection refused"),
        _ => ok(json!([])),
    });
    let pc = builder(svc)
        .retry(5, Duration::from_millis(10))
        .build()
        .expect("client");
    assert!(matches!(
        pc.login("a").await,
        Err(ClientError::Server { status: 503, .. })
    ));
    assert!(matches!(
        pc.login("b").await,
        Err(ClientError::Transport(_))
    ));
    assert_eq!(log.len(), 2, "one attempt per login");
    assert_eq!(pc.lease("a"), None);
}

#[tokio::test(start_paused = true)]
async fn client_errors_and_500_are_not_retried() {
    let (svc, log) = scripted(|seen, _| match seen.path.as_str() {
        "/presence/login" => ok(lease(1, 1000)),
        "/presence/heartbeat" => err(409, "lease_mismatch"),
        "/presence/ghost" => err(404, "not_found"),
        _ => err(500, "internal"),
    });
    let pc = builder(svc)
        .retry(5, Duration::from_millis(10))
        .build()
        .expect("client");
    pc.login("node-1").await.expect("login");
    assert!(matches!(
        pc.heartbeat("node-1").await,
        Err(ClientError::LeaseMismatch)
    ));
    assert_eq!(pc.get_node("ghost").await.expect("None"), None);
    assert!(matches!(
        pc.list_nodes().await,
        Err(ClientError::Server { status: 500, .. })
    ));
    assert_eq!(log.len(), 4, "each call sent exactly once");
}

#[tokio::test(start_paused = true)]
async fn a_503_asking_for_longer_than_max_backoff_is_not_retried() {
    let (svc, log) = scripted(|_, _| {
        Act::ReplyWith(
            http::Response::builder()
                .status(503)
                .header("retry-after", "30")
                .body(Full::new(Bytes::from_static(
                    br#"{"error":"store_unavailable","message":"down"}"#,
                )))
                .expect("response"),
        )
    });
    let pc = builder(svc)
        .retry(5, Duration::from_millis(10))
        .build()
        .expect("client");
    assert!(matches!(
        pc.list_nodes().await,
        Err(ClientError::Server { status: 503, .. })
    ));
    assert_eq!(log.len(), 1);
}

// ---------------------------------------------------------------------------
// leases, heartbeat, logout

/// A small fake server: login issues L1, L2, ...; heartbeats succeed unless
/// `forget_on` says the server has forgotten the node at this heartbeat.
fn fake_server(
    heartbeat_ms: u64,
    heartbeat: impl Fn(&Seen, usize) -> Option<Act> + Send + Sync + 'static,
) -> (
    impl tower::Service<
            http::Request<Full<Bytes>>,
            Response = http::Response<Full<Bytes>>,
            Error = BoxError,
            Future = impl Send,
        > + Clone
        + Send
        + 'static,
    Log,
) {
    scripted(move |seen, n| match seen.path.as_str() {
        "/presence/login" => ok(lease(n + 1, heartbeat_ms)),
        "/presence/heartbeat" => heartbeat(seen, n).unwrap_or_else(|| ok(beat(seen))),
        "/presence/logout" => ok(json!({"node_id": seen.body["node_id"], "removed": true})),
        _ => ok(json!([])),
    })
}

#[tokio::test(start_paused = true)]
async fn login_remembers_the_lease_and_heartbeat_uses_it() {
    let (svc, log) = fake_server(1000, |_, _| None);
    let pc = builder(svc).build().expect("client");
    let l = pc.login("node-1").await.expect("login");
    assert_eq!(l.lease_id, "L1");
    assert_eq!(pc.lease("node-1").map(|l| l.lease_id), Some("L1".into()));
    let hb = pc.heartbeat("node-1").await.expect("heartbeat");
    assert!(!hb.relogged());
    assert_eq!(hb.lease_id(), "L1");
    assert_eq!(log.to("/presence/heartbeat")[0].lease_id(), "L1");
    assert!(
        log.to("/presence/heartbeat")[0].body.get("meta").is_none(),
        "meta is kept"
    );
}

#[tokio::test(start_paused = true)]
async fn heartbeat_logs_in_again_after_404_with_the_last_meta() {
    let (svc, log) = fake_server(1000, |_, n| (n == 1).then(|| err(404, "not_found")));
    let pc = builder(svc).build().expect("client");
    let mut meta = Meta::new();
    meta.insert("hp".into(), json!(3));
    pc.login_with_meta("node-1", meta.clone())
        .await
        .expect("login");
    meta.insert("hp".into(), json!(7));
    pc.heartbeat_with_meta("node-1", meta.clone())
        .await
        .expect("1st heartbeat");

    match pc
        .heartbeat("node-1")
        .await
        .expect("2nd heartbeat re-logs in")
    {
        Heartbeat::Relogged(l) => assert_eq!(l.lease_id, "L2"),
        other => panic!("expected a re-login, got {other:?}"),
    }
    let logins = log.to("/presence/login");
    assert_eq!(logins.len(), 2);
    assert_eq!(
        logins[1].body["meta"],
        json!({"hp": 7}),
        "the last meta sent"
    );
    assert_eq!(pc.lease("node-1").map(|l| l.lease_id), Some("L2".into()));
    assert_eq!(pc.heartbeat("node-1").await.expect("3rd").lease_id(), "L2");
}

#[tokio::test(start_paused = true)]
async fn heartbeat_without_a_lease_logs_in() {
    let (svc, log) = fake_server(1000, |_, _| None);
    let pc = builder(svc).build().expect("client");
    assert!(pc.heartbeat("node-1").await.expect("heartbeat").relogged());
    assert_eq!(log.to("/presence/login").len(), 1);
    assert_eq!(log.to("/presence/heartbeat").len(), 0);
}

#[tokio::test(start_paused = true)]
async fn logout_sends_the_lease_then_forgets_it() {
    let (svc, log) = fake_server(1000, |_, _| None);
    let pc = builder(svc).build().expect("client");
    pc.login("node-1").await.expect("login");
    assert!(pc.logout("node-1").await.expect("logout"));
    assert_eq!(log.to("/presence/logout")[0].lease_id(), "L1");
    assert_eq!(pc.lease("node-1"), None);
    assert!(!pc.logout("node-1").await.expect("second logout"));
    assert_eq!(
        log.to("/presence/logout").len(),
        1,
        "no lease, nothing sent"
    );
}

#[tokio::test(start_paused = true)]
async fn invalid_node_ids_are_refused_before_sending() {
    let (svc, log) = fake_server(1000, |_, _| None);
    let pc = builder(svc).build().expect("client");
    assert!(matches!(
        pc.login("a b").await,
        Err(ClientError::InvalidInput(_))
    ));
    assert!(matches!(
        pc.heartbeat("").await,
        Err(ClientError::InvalidInput(_))
    ));
    assert!(matches!(
        pc.get_node("a/b").await,
        Err(ClientError::InvalidInput(_))
    ));
    assert!(matches!(
        pc.logout("x".repeat(257)).await,
        Err(ClientError::InvalidInput(_))
    ));
    assert_eq!(log.len(), 0);
}

#[tokio::test(start_paused = true)]
async fn requests_carry_json_headers_and_the_bearer_token() {
    let (svc, log) = fake_server(1000, |_, _| None);
    let pc = builder(svc).bearer_token("s3cret").build().expect("client");
    pc.login("node-1").await.expect("login");
    pc.list_nodes().await.expect("list");
    let seen = log.all();
    assert_eq!(seen[0].method, Method::POST);
    assert_eq!(seen[0].headers["content-type"], "application/json");
    assert_eq!(seen[0].headers["authorization"], "Bearer s3cret");
    assert_eq!(seen[0].body, json!({"node_id": "node-1"}));
    assert_eq!(
        (seen[1].method.clone(), seen[1].path.as_str()),
        (Method::GET, "/presence")
    );
    assert_eq!(seen[1].headers["authorization"], "Bearer s3cret");
}

#[tokio::test(start_paused = true)]
async fn replies_map_to_error_variants() {
    let (svc, _log) = scripted(|seen, _| match seen.path.as_str() {
        "/presence/unauth" => err(401, "unauthorized"),
        "/presence/limited" => Act::ReplyWith(
            http::Response::builder()
                .status(429)
                .header("retry-after", "3")
                .body(Full::new(Bytes::from_static(
                    br#"{"error":"rate_limited","message":"slow"}"#,
                )))
                .expect("response"),
        ),
        "/presence/bad" => err(422, "invalid_meta"),
        "/presence/garbage" => Act::Reply(StatusCode::OK, json!({"not": "a node"})),
        _ => err(413, "payload_too_large"),
    });
    let pc = builder(svc).no_retry().build().expect("client");
    assert!(matches!(
        pc.get_node("unauth").await,
        Err(ClientError::Unauthorized)
    ));
    match pc.get_node("limited").await {
        Err(ClientError::RateLimited(r)) => assert_eq!(r.retry_after, Duration::from_secs(3)),
        other => panic!("expected RateLimited, got {other:?}"),
    }
    match pc.get_node("bad").await {
        Err(ClientError::InvalidInput(m)) => assert!(m.contains("invalid_meta"), "{m}"),
        other => panic!("expected InvalidInput, got {other:?}"),
    }
    match pc.get_node("garbage").await {
        Err(ClientError::Server {
            status: 200, code, ..
        }) => assert_eq!(code, "invalid_response"),
        other => panic!("expected invalid_response, got {other:?}"),
    }
    match pc.get_node("other").await {
        Err(e @ ClientError::Server { status: 413, .. }) => {
            assert!(!e.is_transient());
            assert!(e.to_string().contains("payload_too_large"));
        }
        other => panic!("expected a 413, got {other:?}"),
    }
}

#[test]
fn client_and_keep_alive_can_be_shared_across_tasks() {
    fn assert_send_sync_clone<T: Send + Sync + Clone + 'static>() {}
    fn assert_send<T: Send + 'static>() {}
    assert_send_sync_clone::<PresenceClient>();
    assert_send::<presence::client::KeepAlive>();
    assert_send_sync_clone::<Heartbeat>();

    // Every call's future can be spawned on a multi-threaded runtime.
    fn assert_send_future<F: std::future::Future + Send>(_: F) {}
    let (svc, _log) = fake_server(1000, |_, _| None);
    let pc = builder(svc).build().expect("client");
    assert_send_future(pc.login("n"));
    assert_send_future(pc.login_with_meta("n", Meta::new()));
    assert_send_future(pc.heartbeat("n"));
    assert_send_future(pc.heartbeat_with_meta("n", Meta::new()));
    assert_send_future(pc.logout("n"));
    assert_send_future(pc.list_nodes());
    assert_send_future(pc.get_node("n"));
    assert_send_future(pc.keep_alive("n", Meta::new()));
}

#[test]
fn builder_refuses_bad_settings() {
    let bad = |b: PresenceClientBuilder| matches!(b.build(), Err(ClientError::InvalidInput(_)));
    assert!(bad(PresenceClient::builder("not a url")));
    assert!(bad(PresenceClient::builder("ftp://h/presence")));
    // https is built in; a CA without a certificate is not.
    assert!(!bad(PresenceClient::builder("https://h/presence")));
    assert!(bad(
        PresenceClient::builder("https://h/presence").tls_ca_pem(b"no PEM".to_vec())
    ));
    assert!(bad(PresenceClient::builder(BASE).timeout(Duration::ZERO)));
    assert!(bad(PresenceClient::builder(BASE).rate_limit(0.0, 1)));
    assert!(bad(PresenceClient::builder(BASE).rate_limit(1.0, 0)));
    assert!(bad(PresenceClient::builder(BASE).bearer_token("a\nb")));
}

#[test]
fn default_node_id_prefers_node_id_env() {
    // The only test of this binary that touches NODE_ID.
    std::env::set_var("NODE_ID", "from-env-1");
    let id = PresenceClient::default_node_id().expect("from NODE_ID");
    assert_eq!(id.as_str(), "from-env-1");
    std::env::set_var("NODE_ID", "not valid");
    assert!(matches!(
        PresenceClient::default_node_id(),
        Err(ClientError::InvalidInput(_))
    ));
    std::env::remove_var("NODE_ID");
}

// ---------------------------------------------------------------------------
// keep_alive

fn intervals(seen: &[Seen]) -> Vec<Duration> {
    seen.windows(2)
        .map(|w| w[1].at.duration_since(w[0].at))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn keep_alive_heartbeats_with_jitter_and_logs_in_again_after_404() {
    // The server forgets the node at the 2nd heartbeat.
    let (svc, log) = fake_server(1000, |_, n| (n == 1).then(|| err(404, "not_found")));
    let pc = builder(svc).build().expect("client");
    let mut meta = Meta::new();
    meta.insert("load".into(), json!(0.5));
    let keep = pc.keep_alive("node-1", meta).await.expect("keep_alive");
    assert_eq!(keep.lease().map(|l| l.lease_id), Some("L1".into()));

    tokio::time::sleep(Duration::from_millis(5_500)).await;

    let logins = log.to("/presence/login");
    assert_eq!(logins.len(), 2, "one re-login after the 404");
    assert_eq!(logins[1].body["meta"], json!({"load": 0.5}));
    let beats = log.to("/presence/heartbeat");
    assert!(beats.len() >= 4, "{} heartbeats", beats.len());
    assert_eq!(beats[0].lease_id(), "L1");
    assert_eq!(beats[1].lease_id(), "L1"); // answered 404
    assert!(beats[2..].iter().all(|b| b.lease_id() == "L2"));
    assert_eq!(keep.lease().map(|l| l.lease_id), Some("L2".into()));
    for d in intervals(&beats) {
        assert!(
            d >= Duration::from_millis(900) && d <= Duration::from_millis(1100),
            "heartbeat interval {d:?} outside 1 s ± 10 %"
        );
    }

    assert!(keep.stop().await.expect("stop logs out"));
    let logouts = log.to("/presence/logout");
    assert_eq!(logouts.len(), 1);
    assert_eq!(logouts[0].lease_id(), "L2");
    let after = log.len();
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(log.len(), after, "no heartbeat after stop");
}

#[tokio::test(start_paused = true)]
async fn keep_alive_keeps_going_through_transient_errors_and_sends_new_meta() {
    let (svc, log) = fake_server(1000, |_, n| match n {
        0 => Some(err(503, "store_unavailable")),
        1 => Some(Act::Fail("connection reset")),
        _ => None,
    });
    let pc = builder(svc).no_retry().build().expect("client");
    let keep = pc
        .keep_alive("node-1", Meta::new())
        .await
        .expect("keep_alive");
    let mut meta = Meta::new();
    meta.insert("hp".into(), json!(1));
    keep.set_meta(meta);

    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(!keep.is_finished());
    let beats = log.to("/presence/heartbeat");
    assert!(beats.len() >= 4, "{} heartbeats", beats.len());
    // After a failure the next attempt comes after about half an interval.
    let gaps = intervals(&beats);
    assert!(gaps[0] >= Duration::from_millis(450) && gaps[0] <= Duration::from_millis(550));
    // The new meta rides on every attempt until one succeeds, then is not repeated.
    assert!(beats[..3]
        .iter()
        .all(|b| b.body["meta"] == json!({"hp": 1})));
    assert!(beats[3].body.get("meta").is_none());
    assert_eq!(
        log.to("/presence/login").len(),
        1,
        "transient errors do not re-login"
    );
    keep.stop().await.expect("stop");
}

#[tokio::test(start_paused = true)]
async fn keep_alive_stops_on_lease_mismatch_and_reports_it() {
    let (svc, log) = fake_server(1000, |_, _| Some(err(409, "lease_mismatch")));
    let pc = builder(svc).build().expect("client");
    let keep = pc
        .keep_alive("node-1", Meta::new())
        .await
        .expect("keep_alive");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(keep.is_finished());
    assert_eq!(
        log.to("/presence/heartbeat").len(),
        1,
        "no fight over the node id"
    );
    assert!(matches!(keep.stop().await, Err(ClientError::LeaseMismatch)));
    assert_eq!(log.to("/presence/logout").len(), 0);
}

#[tokio::test(start_paused = true)]
async fn dropping_keep_alive_stops_the_task_without_logging_out() {
    let (svc, log) = fake_server(1000, |_, _| None);
    let pc = builder(svc).build().expect("client");
    let keep = pc
        .keep_alive("node-1", Meta::new())
        .await
        .expect("keep_alive");
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let beats = log.to("/presence/heartbeat").len();
    assert_eq!(beats, 2);
    drop(keep);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(log.to("/presence/heartbeat").len(), beats);
    assert_eq!(log.to("/presence/logout").len(), 0);
}

// ---------------------------------------------------------------------------
// end to end, in-process: the client over the server's own service (no sockets)

fn in_process(config: &presence::config::Config) -> PresenceClientBuilder {
    let service = presence::server::PresenceService::new(
        Arc::new(presence::store::MemoryStore::new()),
        config,
    )
    .with_default_peer(([127, 0, 0, 1], 40000).into());
    PresenceClient::builder("http://in-process/presence").service(service)
}

#[tokio::test(start_paused = true)]
async fn end_to_end_login_list_heartbeat_get_logout() {
    let pc = in_process(&presence::config::Config::default())
        .build()
        .expect("client");
    assert_eq!(pc.list_nodes().await.expect("empty list"), vec![]);

    let mut meta = Meta::new();
    meta.insert("hp".into(), json!(10));
    let lease = pc
        .login_with_meta("node-1", meta.clone())
        .await
        .expect("login");
    assert_eq!(lease.node_id, "node-1");
    assert_eq!(lease.heartbeat_ms, 3000);
    assert_eq!(lease.ttl_ms, 9000);

    let nodes = pc.list_nodes().await.expect("list");
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].node_id, "node-1");
    assert_eq!(nodes[0].meta, meta);

    tokio::time::sleep(Duration::from_secs(2)).await;
    let hb = pc.heartbeat("node-1").await.expect("heartbeat");
    assert!(!hb.relogged());
    assert_eq!(hb.lease_id(), lease.lease_id);
    assert!(hb.expires_at_ms() >= lease.expires_at_ms + 2000);

    let node = pc.get_node("node-1").await.expect("get").expect("online");
    assert_eq!(node.expires_at_ms, hb.expires_at_ms());
    assert_eq!(node.meta, meta, "a heartbeat without meta keeps it");
    assert_eq!(pc.get_node("node-2").await.expect("get"), None);

    assert!(pc.logout("node-1").await.expect("logout"));
    assert_eq!(pc.list_nodes().await.expect("empty again"), vec![]);
    assert_eq!(pc.get_node("node-1").await.expect("get"), None);
}

#[tokio::test(start_paused = true)]
async fn end_to_end_heartbeat_logs_in_again_after_expiry() {
    let pc = in_process(&presence::config::Config::default())
        .build()
        .expect("client");
    let first = pc.login("node-1").await.expect("login");
    tokio::time::sleep(Duration::from_secs(10)).await; // past the 9 s TTL
    assert_eq!(pc.list_nodes().await.expect("list"), vec![], "expired");
    match pc.heartbeat("node-1").await.expect("heartbeat") {
        Heartbeat::Relogged(l) => assert_ne!(l.lease_id, first.lease_id),
        other => panic!("expected a re-login, got {other:?}"),
    }
    assert_eq!(pc.list_nodes().await.expect("list").len(), 1);
}

#[tokio::test(start_paused = true)]
async fn end_to_end_a_newer_login_fences_the_old_lease() {
    let config = presence::config::Config::default();
    let service = presence::server::PresenceService::new(
        Arc::new(presence::store::MemoryStore::new()),
        &config,
    )
    .with_default_peer(([127, 0, 0, 1], 40000).into());
    let old = PresenceClient::builder("http://in-process/presence")
        .service(service.clone())
        .build()
        .expect("client");
    let new = PresenceClient::builder("http://in-process/presence")
        .service(service)
        .build()
        .expect("client");
    old.login("node-1").await.expect("old login");
    new.login("node-1").await.expect("new login (a restart)");
    assert!(matches!(
        old.heartbeat("node-1").await,
        Err(ClientError::LeaseMismatch)
    ));
    assert!(matches!(
        old.logout("node-1").await,
        Err(ClientError::LeaseMismatch)
    ));
    assert!(!new
        .heartbeat("node-1")
        .await
        .expect("new lease works")
        .relogged());
    assert_eq!(new.list_nodes().await.expect("list").len(), 1);
}

#[tokio::test(start_paused = true)]
async fn end_to_end_keep_alive_keeps_the_node_online_until_stop() {
    let pc = in_process(&presence::config::Config::default())
        .build()
        .expect("client");
    let keep = pc
        .keep_alive("node-1", Meta::new())
        .await
        .expect("keep_alive");
    tokio::time::sleep(Duration::from_secs(30)).await; // > 3 TTLs
    assert_eq!(
        pc.list_nodes().await.expect("list").len(),
        1,
        "still online"
    );
    assert!(keep.stop().await.expect("stop"));
    assert_eq!(pc.list_nodes().await.expect("list"), vec![]);
}

#[tokio::test(start_paused = true)]
async fn end_to_end_bearer_token() {
    let mut config = presence::config::Config::default();
    config.auth_token = Some("s3cret".into());
    let anonymous = in_process(&config).build().expect("client");
    assert!(matches!(
        anonymous.list_nodes().await,
        Err(ClientError::Unauthorized)
    ));
    let authed = in_process(&config)
        .bearer_token("s3cret")
        .build()
        .expect("client");
    assert_eq!(authed.list_nodes().await.expect("list"), vec![]);
}
