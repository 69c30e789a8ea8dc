//! The watch feed and the view of the client SDK, against a fake in-process server
//! (a `service_fn` that serves scripted SSE bodies and records every request), on
//! paused time.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{self, BoxStream};
use futures_util::StreamExt;
use http::{HeaderMap, StatusCode};
use http_body::Frame;
use http_body_util::{Full, StreamBody};
use presence::client::{ClientError, Filter, LeaveReason, PresenceClient, WatchEvent, WatchItem};
use presence::model::Node;
use resilience::BoxError;
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::Instant;

const BASE: &str = "http://presence.test/presence";

type Body = StreamBody<BoxStream<'static, Result<Frame<Bytes>, BoxError>>>;

/// What the fake server does with one request.
enum Act {
    /// `200 text/event-stream` with these chunks, then the body ends.
    Stream(Vec<String>),
    /// The chunks, then the body stays open.
    StreamOpen(Vec<String>),
    /// The chunks, then a body error.
    StreamBroken(Vec<String>),
    /// A body fed from a channel (ends when the sender is dropped).
    Channel(mpsc::UnboundedReceiver<String>),
    /// A plain reply.
    Status(u16, Vec<(&'static str, &'static str)>, &'static str),
}

#[derive(Clone, Debug)]
struct Seen {
    uri: String,
    headers: HeaderMap,
    at: Instant,
}

impl Seen {
    fn last_event_id(&self) -> Option<&str> {
        self.headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
    }
}

#[derive(Clone, Default)]
struct Fake {
    script: Arc<Mutex<VecDeque<Act>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

fn frames(chunks: Vec<String>) -> BoxStream<'static, Result<Frame<Bytes>, BoxError>> {
    stream::iter(
        chunks
            .into_iter()
            .map(|c| Ok::<_, BoxError>(Frame::data(Bytes::from(c)))),
    )
    .boxed()
}

fn sse_response(body: BoxStream<'static, Result<Frame<Bytes>, BoxError>>) -> http::Response<Body> {
    http::Response::builder()
        .header("content-type", "text/event-stream")
        .body(StreamBody::new(body))
        .unwrap()
}

impl Fake {
    fn new(script: Vec<Act>) -> Fake {
        Fake {
            script: Arc::new(Mutex::new(script.into())),
            seen: Arc::default(),
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn respond(&self, req: http::Request<Full<Bytes>>) -> http::Response<Body> {
        self.seen.lock().unwrap().push(Seen {
            uri: req.uri().to_string(),
            headers: req.headers().clone(),
            at: Instant::now(),
        });
        let act = self.script.lock().unwrap().pop_front();
        match act {
            Some(Act::Stream(chunks)) => sse_response(frames(chunks)),
            Some(Act::StreamOpen(chunks)) => {
                sse_response(frames(chunks).chain(stream::pending()).boxed())
            }
            Some(Act::StreamBroken(chunks)) => sse_response(
                frames(chunks)
                    .chain(stream::iter([Err::<Frame<Bytes>, BoxError>(
                        "connection reset".into(),
                    )]))
                    .boxed(),
            ),
            Some(Act::Channel(rx)) => sse_response(
                stream::unfold(rx, |mut rx| async move {
                    let chunk = rx.recv().await?;
                    Some((Ok(Frame::data(Bytes::from(chunk))), rx))
                })
                .boxed(),
            ),
            Some(Act::Status(status, headers, body)) => {
                let mut b = http::Response::builder().status(StatusCode::from_u16(status).unwrap());
                for (k, v) in headers {
                    b = b.header(k, v);
                }
                b.body(StreamBody::new(frames(vec![body.to_owned()])))
                    .unwrap()
            }
            // Out of script: an open stream with nothing in it.
            None => sse_response(stream::pending().boxed()),
        }
    }

    fn client(&self) -> PresenceClient {
        let fake = self.clone();
        PresenceClient::builder(BASE)
            .bearer_token("t0ken")
            .watch_idle_timeout(None)
            .service(tower::service_fn(move |req| {
                let response = fake.respond(req);
                async move { Ok::<_, Infallible>(response) }
            }))
            .build()
            .unwrap()
    }
}

fn node_json(id: &str, seen: u64) -> serde_json::Value {
    json!({
        "node_id": id,
        "meta": {"zone": "eu", "load": 0.5},
        "online_since_ms": 1000,
        "last_seen_ms": seen,
        "expires_at_ms": seen + 30_000,
        "status": "up",
    })
}

fn node(id: &str, seen: u64) -> Node {
    serde_json::from_value(node_json(id, seen)).unwrap()
}

fn event(id: &str, kind: &str, data: serde_json::Value) -> String {
    format!("id: {id}\nevent: {kind}\ndata: {data}\n\n")
}

fn snapshot(id: &str, nodes: &[(&str, u64)]) -> String {
    let nodes: Vec<_> = nodes.iter().map(|(n, s)| node_json(n, *s)).collect();
    event(id, "snapshot", json!({ "nodes": nodes }))
}

fn leave(id: &str, node_id: &str, reason: &str) -> String {
    event(id, "leave", json!({"node_id": node_id, "reason": reason}))
}

async fn next(watch: &mut presence::client::Watch) -> WatchItem {
    match watch.next().await {
        Some(Ok(item)) => item,
        other => panic!("expected an item, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn events_are_parsed_with_exact_data() {
    let fake = Fake::new(vec![Act::StreamOpen(vec![
        snapshot("c1", &[("a", 5), ("b", 6)]),
        ": keep-alive\n\n".into(),
        event("c2", "join", node_json("c", 7)),
        event("c3", "update", node_json("a", 8)),
        leave("c4", "b", "expired"),
        leave("c5", "c", "logout"),
        leave("c6", "a", "unmatched"),
        event("c7", "something-new", json!({})),
        event("c8", "join", node_json("d", 9)),
    ])]);
    let mut watch = fake.client().watch(Filter::all());
    let expected = [
        ("c1", WatchEvent::Snapshot(vec![node("a", 5), node("b", 6)])),
        ("c2", WatchEvent::Join(node("c", 7))),
        ("c3", WatchEvent::Update(node("a", 8))),
        (
            "c4",
            WatchEvent::Leave {
                node_id: "b".into(),
                reason: LeaveReason::Expired,
            },
        ),
        (
            "c5",
            WatchEvent::Leave {
                node_id: "c".into(),
                reason: LeaveReason::Logout,
            },
        ),
        (
            "c6",
            WatchEvent::Leave {
                node_id: "a".into(),
                reason: LeaveReason::Unmatched,
            },
        ),
        // c7 is of an unknown type: skipped.
        ("c8", WatchEvent::Join(node("d", 9))),
    ];
    for (cursor, event) in expected {
        let item = next(&mut watch).await;
        assert_eq!(item.cursor, cursor);
        assert_eq!(item.event, event);
    }
    let a = node("a", 5);
    assert_eq!(a.meta["zone"], "eu");
    assert_eq!(a.expires_at_ms, 30_005);

    let seen = fake.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].uri, "http://presence.test/presence/watch");
    assert_eq!(seen[0].headers["accept"], "text/event-stream");
    assert_eq!(seen[0].headers["authorization"], "Bearer t0ken");
    assert_eq!(seen[0].last_event_id(), None);
}

#[tokio::test(start_paused = true)]
async fn chunk_boundaries_in_the_middle_of_lines() {
    let text = format!(
        "{}: keep-alive\r\n\r\nid: c2\r\nevent: join\r\ndata: {}\r\n\r\n",
        snapshot("c1", &[("caf\u{e9}-\u{1f600}", 1)]),
        node_json("b", 2)
    );
    // Every chunk boundary at once: one byte per chunk, splitting "\r\n" and the
    // UTF-8 sequences too.
    let bytes = text.into_bytes();
    let fake = ByteFake::new(bytes.chunks(1).map(Bytes::copy_from_slice).collect());
    let mut watch = fake.client().watch(Filter::all());
    let first = next(&mut watch).await;
    assert_eq!(first.cursor, "c1");
    assert_eq!(
        first.event,
        WatchEvent::Snapshot(vec![node("caf\u{e9}-\u{1f600}", 1)])
    );
    let second = next(&mut watch).await;
    assert_eq!(second.cursor, "c2");
    assert_eq!(second.event, WatchEvent::Join(node("b", 2)));

    // And chunks cut at every position of one event, each its own connection.
    let one = event("c9", "update", node_json("x", 3)).into_bytes();
    for cut in 1..one.len() {
        let fake = ByteFake::new(vec![
            Bytes::copy_from_slice(&one[..cut]),
            Bytes::copy_from_slice(&one[cut..]),
        ]);
        let mut watch = fake.client().watch(Filter::all());
        let item = next(&mut watch).await;
        assert_eq!(
            (item.cursor.as_str(), &item.event),
            ("c9", &WatchEvent::Update(node("x", 3))),
            "cut at {cut}"
        );
    }
}

/// A fake that serves raw byte chunks (one connection, then stays open).
struct ByteFake {
    chunks: Vec<Bytes>,
}

impl ByteFake {
    fn new(chunks: Vec<Bytes>) -> ByteFake {
        ByteFake { chunks }
    }

    fn client(&self) -> PresenceClient {
        let chunks = self.chunks.clone();
        PresenceClient::builder(BASE)
            .watch_idle_timeout(None)
            .service(tower::service_fn(
                move |_req: http::Request<Full<Bytes>>| {
                    let body = stream::iter(
                        chunks
                            .clone()
                            .into_iter()
                            .map(|c| Ok::<_, BoxError>(Frame::data(c))),
                    )
                    .chain(stream::pending())
                    .boxed();
                    async move { Ok::<_, Infallible>(sse_response(body)) }
                },
            ))
            .build()
            .unwrap()
    }
}

#[tokio::test(start_paused = true)]
async fn resumes_after_the_body_ends_with_the_last_cursor() {
    let fake = Fake::new(vec![
        Act::Stream(vec![
            snapshot("c1", &[("a", 1)]),
            event("c2", "join", node_json("b", 2)),
            // A partial event when the body ends: dropped, and its id not used.
            "id: c3\nevent: join\n".into(),
        ]),
        Act::StreamOpen(vec![event("c4", "update", node_json("a", 3))]),
    ]);
    let mut watch = fake.client().watch(Filter::all());
    assert_eq!(next(&mut watch).await.cursor, "c1");
    assert_eq!(next(&mut watch).await.cursor, "c2");
    let resumed = next(&mut watch).await;
    assert_eq!(resumed.cursor, "c4");
    assert_eq!(resumed.event, WatchEvent::Update(node("a", 3)));

    let seen = fake.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].last_event_id(), None);
    assert_eq!(seen[1].last_event_id(), Some("c2"));
    // Full jitter from a 100 ms base after a connection that delivered bytes.
    assert!(seen[1].at - seen[0].at <= Duration::from_millis(100));
}

#[tokio::test(start_paused = true)]
async fn a_broken_body_reconnects_and_resumes() {
    let fake = Fake::new(vec![
        Act::StreamBroken(vec![snapshot("c1", &[])]),
        Act::StreamOpen(vec![event("c2", "join", node_json("a", 1))]),
    ]);
    let mut watch = fake.client().watch(Filter::all());
    assert_eq!(next(&mut watch).await.cursor, "c1");
    assert_eq!(next(&mut watch).await.cursor, "c2");
    assert_eq!(fake.seen()[1].last_event_id(), Some("c1"));
}

#[tokio::test(start_paused = true)]
async fn watch_from_sends_the_given_cursor_and_the_filter() {
    let fake = Fake::new(vec![Act::StreamOpen(vec![event(
        "c8",
        "join",
        node_json("a", 1),
    )])]);
    let filter = Filter::all()
        .prefix("eu/")
        .status(["up", "degraded"])
        .meta("role", "edge cache");
    let mut watch = fake.client().watch_from(filter, "c7");
    assert_eq!(next(&mut watch).await.cursor, "c8");
    let seen = fake.seen();
    assert_eq!(
        seen[0].uri,
        "http://presence.test/presence/watch?prefix=eu%2F&status=up,degraded&meta.role=edge%20cache"
    );
    assert_eq!(seen[0].last_event_id(), Some("c7"));
}

#[tokio::test(start_paused = true)]
async fn retries_503_and_429_honouring_retry_after() {
    let fake = Fake::new(vec![
        Act::Status(
            503,
            vec![("retry-after", "3"), ("content-type", "application/json")],
            r#"{"error":"too_many_watchers","message":"later"}"#,
        ),
        Act::Status(
            429,
            vec![("retry-after", "2")],
            r#"{"error":"rate_limited","message":"slow"}"#,
        ),
        Act::Status(
            503,
            vec![],
            r#"{"error":"store_unavailable","message":"down"}"#,
        ),
        Act::Status(500, vec![], "oops"),
        Act::StreamOpen(vec![snapshot("c1", &[])]),
    ]);
    let mut watch = fake.client().watch(Filter::all());
    let item = next(&mut watch).await;
    assert_eq!(item.cursor, "c1");
    let seen = fake.seen();
    assert_eq!(seen.len(), 5);
    let gap = |i: usize| seen[i].at - seen[i - 1].at;
    assert!(gap(1) >= Duration::from_secs(3), "{:?}", gap(1));
    assert!(gap(2) >= Duration::from_secs(2), "{:?}", gap(2));
    // Without Retry-After: full jitter, third and fourth failure in a row.
    assert!(gap(3) <= Duration::from_millis(400), "{:?}", gap(3));
    assert!(gap(4) <= Duration::from_millis(800), "{:?}", gap(4));
}

#[tokio::test(start_paused = true)]
async fn unauthorized_ends_the_stream_with_an_error() {
    let fake = Fake::new(vec![Act::Status(
        401,
        vec![],
        r#"{"error":"unauthorized","message":"no"}"#,
    )]);
    let mut watch = fake.client().watch(Filter::all());
    assert!(matches!(
        watch.next().await,
        Some(Err(ClientError::Unauthorized))
    ));
    assert!(watch.next().await.is_none());
    assert_eq!(fake.seen().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn other_client_errors_end_the_stream_too() {
    for status in [400u16, 403, 404, 422] {
        let fake = Fake::new(vec![Act::Status(
            status,
            vec![],
            r#"{"error":"x","message":"y"}"#,
        )]);
        let mut watch = fake.client().watch(Filter::all());
        match watch.next().await {
            Some(Err(e)) => assert!(!e.is_transient(), "{status}: {e}"),
            other => panic!("{status}: {other:?}"),
        }
        assert!(watch.next().await.is_none());
        assert_eq!(fake.seen().len(), 1);
    }
    // A success that is not an event stream: a misrouted request, not retried.
    let fake = Fake::new(vec![Act::Status(
        200,
        vec![("content-type", "application/json")],
        "[]",
    )]);
    let mut watch = fake.client().watch(Filter::all());
    assert!(matches!(
        watch.next().await,
        Some(Err(ClientError::Server { status: 200, .. }))
    ));
    assert!(watch.next().await.is_none());
}

#[tokio::test(start_paused = true)]
async fn an_undecodable_event_restarts_without_a_cursor() {
    let fake = Fake::new(vec![
        Act::Stream(vec![
            snapshot("c1", &[]),
            "id: c2\nevent: join\ndata: {not json\n\n".into(),
        ]),
        Act::StreamOpen(vec![snapshot("c5", &[("a", 1)])]),
    ]);
    let mut watch = fake.client().watch(Filter::all());
    assert_eq!(next(&mut watch).await.cursor, "c1");
    let again = next(&mut watch).await;
    assert_eq!(again.event, WatchEvent::Snapshot(vec![node("a", 1)]));
    assert_eq!(fake.seen()[1].last_event_id(), None);
}

#[tokio::test(start_paused = true)]
async fn the_idle_timeout_reconnects() {
    let fake = Fake::new(vec![
        Act::StreamOpen(vec![snapshot("c1", &[])]),
        Act::StreamOpen(vec![event("c2", "join", node_json("a", 1))]),
    ]);
    let fake2 = fake.clone();
    let client = PresenceClient::builder(BASE)
        .watch_idle_timeout(Some(Duration::from_secs(20)))
        .service(tower::service_fn(move |req| {
            let response = fake2.respond(req);
            async move { Ok::<_, Infallible>(response) }
        }))
        .build()
        .unwrap();
    let mut watch = client.watch(Filter::all());
    assert_eq!(next(&mut watch).await.cursor, "c1");
    assert_eq!(next(&mut watch).await.cursor, "c2");
    let seen = fake.seen();
    assert!(seen[1].at - seen[0].at >= Duration::from_secs(20));
    assert_eq!(seen[1].last_event_id(), Some("c1"));
}

#[tokio::test(start_paused = true)]
async fn the_view_applies_every_event_and_changed_fires() {
    let (tx, rx) = mpsc::unbounded_channel();
    let fake = Fake::new(vec![Act::Channel(rx)]);
    let mut view = fake.client().view(Filter::all());
    assert!(!view.is_synced());
    assert!(view.is_empty());

    tx.send(snapshot("c1", &[("b", 1), ("a", 1)])).unwrap();
    assert!(view.changed().await);
    assert!(view.is_synced());
    let ids: Vec<String> = view.nodes().into_iter().map(|n| n.node_id).collect();
    assert_eq!(ids, ["a", "b"]);

    tx.send(event("c2", "join", node_json("c", 2))).unwrap();
    assert!(view.changed().await);
    assert_eq!(view.len(), 3);

    tx.send(event("c3", "update", node_json("a", 9))).unwrap();
    assert!(view.changed().await);
    assert_eq!(view.get("a"), Some(node("a", 9)));

    tx.send(leave("c4", "b", "logout")).unwrap();
    assert!(view.changed().await);
    assert_eq!(view.get("b"), None);
    assert_eq!(view.cursor().as_deref(), Some("c4"));

    // A repeat changes nothing; the next real change is what `changed` reports.
    tx.send(event("c5", "update", node_json("a", 9))).unwrap();
    tx.send(leave("c6", "b", "expired")).unwrap();
    tx.send(snapshot("c7", &[("z", 1)])).unwrap();
    assert!(view.changed().await);
    assert_eq!(view.nodes(), vec![node("z", 1)]);
    assert_eq!(view.cursor().as_deref(), Some("c7"));

    // Dropping the view stops the task, which closes the feed.
    drop(view);
    tokio::time::timeout(Duration::from_secs(1), tx.closed())
        .await
        .expect("the feed is closed once the view is dropped");
}

#[tokio::test(start_paused = true)]
async fn the_view_resyncs_after_a_reconnect_snapshot() {
    let fake = Fake::new(vec![
        Act::Stream(vec![snapshot("c1", &[("a", 1), ("b", 1)])]),
        // The server no longer holds c1: a fresh snapshot replaces everything.
        Act::StreamOpen(vec![snapshot("d1", &[("b", 2), ("c", 1)])]),
    ]);
    let mut view = fake.client().view(Filter::all());
    assert!(view.changed().await);
    while view.get("c").is_none() {
        assert!(view.changed().await);
    }
    assert_eq!(view.nodes(), vec![node("b", 2), node("c", 1)]);
    assert_eq!(fake.seen()[1].last_event_id(), Some("c1"));
}

#[tokio::test(start_paused = true)]
async fn the_view_stops_on_a_fatal_error() {
    let fake = Fake::new(vec![Act::Status(401, vec![], "")]);
    let mut view = fake.client().view(Filter::all());
    assert!(!view.changed().await);
    assert!(matches!(view.take_error(), Some(ClientError::Unauthorized)));
    assert!(view.take_error().is_none());
}

/// Over a real socket with the built-in hyper transport: events arrive while the
/// response is still open (the body streams), and the reconnect after the server
/// closes carries `Last-Event-ID`.
#[tokio::test]
async fn streams_over_the_network_with_the_builtin_transport() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (requests_tx, mut requests) = mpsc::unbounded_channel::<String>();
    let (close_tx, mut close_rx) = mpsc::unbounded_channel::<()>();
    let server = tokio::spawn(async move {
        for n in 0..2 {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let read = sock.read(&mut buf).await.unwrap();
                assert!(read > 0);
                head.extend_from_slice(&buf[..read]);
            }
            requests_tx
                .send(String::from_utf8_lossy(&head).to_lowercase())
                .unwrap();
            let body = if n == 0 {
                snapshot("c1", &[("a", 1)])
            } else {
                event("c2", "join", node_json("b", 2))
            };
            let reply = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n{body}"
            );
            sock.write_all(reply.as_bytes()).await.unwrap();
            // Keep the response open until the test says so.
            close_rx.recv().await;
        }
    });

    let client = PresenceClient::new(&format!("http://{addr}/presence")).unwrap();
    let mut watch = client.watch(Filter::all());
    let first = tokio::time::timeout(Duration::from_secs(10), next(&mut watch))
        .await
        .unwrap();
    assert_eq!(first.event, WatchEvent::Snapshot(vec![node("a", 1)]));
    let req = requests.recv().await.unwrap();
    assert!(req.starts_with("get /presence/watch http/1.1"), "{req}");
    assert!(!req.contains("last-event-id"), "{req}");

    close_tx.send(()).unwrap();
    let second = tokio::time::timeout(Duration::from_secs(10), next(&mut watch))
        .await
        .unwrap();
    assert_eq!(second.cursor, "c2");
    let req = requests.recv().await.unwrap();
    assert!(req.contains("last-event-id: c1\r\n"), "{req}");
    close_tx.send(()).unwrap();
    drop(watch);
    server.await.unwrap();
}
