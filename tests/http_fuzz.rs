//! Fuzzing the HTTP surface in-process (`PresenceService::new(..).with_default_peer(..)`
//! called with `tower::ServiceExt::oneshot`): proptest-generated methods, paths,
//! headers and bodies (invalid UTF-8, deep JSON nesting, huge numbers, duplicate
//! fields, wrong types and content types, oversized bodies) against a healthy store
//! and a failing one, with and without a bearer token. The service must never panic,
//! never answer a 5xx other than `503 store_unavailable`, and every error must be the
//! JSON error shape with the headers its status needs.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use presence::server::PresenceService;
use presence::store::{FaultyStore, MemoryStore};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use support::unlimited_config;
use tower::ServiceExt;

const TOKEN: &str = "s3cret-token";

fn services() -> Vec<PresenceService> {
    let peer: SocketAddr = ([127, 0, 0, 1], 40_000).into();
    let mut open = unlimited_config(Duration::from_millis(200));
    // The default peer is a trusted proxy, so X-Forwarded-For is parsed too.
    open.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
    let mut authed = open.clone();
    authed.auth_token = Some(TOKEN.into());
    let memory = Arc::new(MemoryStore::new());
    vec![
        PresenceService::new(memory.clone(), &open).with_default_peer(peer),
        PresenceService::new(memory, &authed).with_default_peer(peer),
        PresenceService::new(Arc::new(FaultyStore::down()), &open).with_default_peer(peer),
        // With a tiny burst, for 429s.
        {
            let mut limited = open.clone();
            limited.rate_limit_rate = 0.001;
            limited.rate_limit_capacity = 3;
            PresenceService::new(Arc::new(MemoryStore::new()), &limited).with_default_peer(peer)
        },
    ]
}

#[derive(Debug, Clone)]
struct Case {
    service: usize,
    method: String,
    path: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

fn method() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => Just("POST".to_owned()),
        4 => Just("GET".to_owned()),
        1 => Just("PUT".to_owned()),
        1 => Just("DELETE".to_owned()),
        1 => Just("HEAD".to_owned()),
        1 => Just("OPTIONS".to_owned()),
        1 => Just("PATCH".to_owned()),
        1 => "[A-Z]{1,12}",
    ]
}

fn node_id() -> impl Strategy<Value = String> {
    prop_oneof![
        "[A-Za-z0-9._~:@+=-]{1,20}",
        "[A-Za-z0-9._~:@+=-]{250,260}",
        any::<String>(),
        Just("{hash}:tag*?[x]".to_owned()),
        Just("a\r\nSET x y".to_owned()),
        Just(String::new()),
    ]
}

fn path() -> impl Strategy<Value = String> {
    let fixed = prop_oneof![
        Just("/presence".to_owned()),
        Just("/presence/".to_owned()),
        Just("/presence/login".to_owned()),
        Just("/presence/heartbeat".to_owned()),
        Just("/presence/logout".to_owned()),
        Just("/healthz".to_owned()),
        Just("/readyz".to_owned()),
        Just("/metrics".to_owned()),
        Just("/".to_owned()),
        Just("/ui".to_owned()),
        Just("/ui/app.js?v=1".to_owned()),
        Just("/presence//login".to_owned()),
        Just("/presence/../healthz".to_owned()),
        Just("/presence/a/b".to_owned()),
        Just("/presence/%7Bx%7D".to_owned()),
        Just("/presence/login?x=1&y".to_owned()),
    ];
    prop_oneof![
        3 => fixed,
        1 => "/presence/[ -~]{0,300}".prop_map(|s| s),
        1 => "/[a-z/%0-9]{0,40}",
    ]
}

fn header() -> impl Strategy<Value = (String, Vec<u8>)> {
    prop_oneof![
        3 => prop_oneof![
            Just(b"application/json".to_vec()),
            Just(b"application/json; charset=utf-8".to_vec()),
            Just(b"APPLICATION/JSON".to_vec()),
            Just(b"application/problem+json".to_vec()),
            Just(b"text/plain".to_vec()),
            Just(b"application/x-www-form-urlencoded".to_vec()),
            Just(b"multipart/form-data; boundary=x".to_vec()),
            Just(b"application/json\xff".to_vec()),
            Just(Vec::new()),
        ]
        .prop_map(|v| ("content-type".to_owned(), v)),
        1 => prop_oneof![
            Just(format!("Bearer {TOKEN}").into_bytes()),
            Just(b"Bearer wrong".to_vec()),
            Just(b"bearer s3cret-token ".to_vec()),
            Just(b"Basic czNjcmV0".to_vec()),
            Just(b"Bearer".to_vec()),
            proptest::collection::vec(any::<u8>(), 0..40),
        ]
        .prop_map(|v| ("authorization".to_owned(), v)),
        1 => prop_oneof![
            Just(b"0".to_vec()),
            Just(b"17".to_vec()),
            Just(b"99999999999999999999999".to_vec()),
            Just(b"-1".to_vec()),
            Just(b"20000".to_vec()),
            Just(b"abc".to_vec()),
        ]
        .prop_map(|v| ("content-length".to_owned(), v)),
        1 => prop_oneof![
            Just(b"203.0.113.9".to_vec()),
            Just(b"1.2.3.4, 10.0.0.1, 203.0.113.9".to_vec()),
            Just(b"garbage, ::1, [::1]:80, unknown".to_vec()),
            proptest::collection::vec(any::<u8>(), 0..60),
        ]
        .prop_map(|v| ("x-forwarded-for".to_owned(), v)),
        1 => ("[a-z-]{1,20}", proptest::collection::vec(any::<u8>(), 0..60)),
    ]
}

fn nested(depth: usize, open: &str, close: &str, inner: &str) -> Vec<u8> {
    let mut s = String::with_capacity(depth * (open.len() + close.len()) + inner.len());
    for _ in 0..depth {
        s.push_str(open);
    }
    s.push_str(inner);
    for _ in 0..depth {
        s.push_str(close);
    }
    s.into_bytes()
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    let json_value = prop_oneof![
        Just(serde_json::json!(null)),
        Just(serde_json::json!(true)),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        any::<String>().prop_map(serde_json::Value::from),
        Just(serde_json::json!([1, "two", {"three": 3}])),
        Just(serde_json::json!({"hp": 3, "load": 0.5, "tags": ["a"]})),
    ];
    prop_oneof![
        // Well-formed requests with fuzzed field values.
        3 => (node_id(), proptest::option::of(json_value.clone()))
            .prop_map(|(id, meta)| {
                let mut o = serde_json::json!({ "node_id": id });
                if let Some(meta) = meta {
                    o["meta"] = meta;
                }
                o.to_string().into_bytes()
            }),
        2 => (node_id(), "[0-9a-f]{0,40}", proptest::option::of(json_value))
            .prop_map(|(id, lease, meta)| {
                let mut o = serde_json::json!({ "node_id": id, "lease_id": lease });
                if let Some(meta) = meta {
                    o["meta"] = meta;
                }
                o.to_string().into_bytes()
            }),
        // Hostile shapes.
        1 => Just(b"{\"node_id\":\"\xff\xfe\xfd\"}".to_vec()),
        1 => Just(b"\xef\xbb\xbf{\"node_id\":\"bom\"}".to_vec()),
        1 => (100usize..20_000).prop_map(|d| nested(d, "[", "]", "")),
        1 => (100usize..5_000).prop_map(|d| {
            let mut v = b"{\"node_id\":\"deep\",\"meta\":".to_vec();
            v.extend(nested(d, "{\"a\":", "}", "1"));
            v.push(b'}');
            v
        }),
        1 => Just(br#"{"node_id":"n","meta":{"x":1e999999}}"#.to_vec()),
        1 => Just(br#"{"node_id":"n","meta":{"x":123456789012345678901234567890123456789}}"#.to_vec()),
        1 => Just(br#"{"node_id":"n","meta":{"x":-0.0000000000000000000000000001e-400}}"#.to_vec()),
        1 => Just(br#"{"node_id":"a","node_id":"b","lease_id":"x","lease_id":"y"}"#.to_vec()),
        1 => Just(br#"{"node_id":"a","meta":{"k":1,"k":2}}"#.to_vec()),
        1 => Just(br#"{"node_id":123,"lease_id":[]}"#.to_vec()),
        1 => Just(br#"{"node_id":null}"#.to_vec()),
        1 => Just(br#"["node_id","lease"]"#.to_vec()),
        1 => Just(br#""just a string""#.to_vec()),
        1 => Just(b"{\"node_id\":\"a\\u0000b\"}".to_vec()),
        1 => Just(b"{\"node_id\":\"\\ud800\"}".to_vec()),
        1 => (4090usize..4200).prop_map(|n| {
            format!(r#"{{"node_id":"big","meta":{{"s":"{}"}}}}"#, "x".repeat(n)).into_bytes()
        }),
        1 => (16_000usize..17_000).prop_map(|n| vec![b' '; n]),
        2 => proptest::collection::vec(any::<u8>(), 0..600),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    let random = (
        0usize..4,
        method(),
        path(),
        proptest::collection::vec(header(), 0..5),
        body(),
    )
        .prop_map(|(service, method, path, headers, body)| Case {
            service,
            method,
            path,
            headers,
            body,
        });
    // Aimed at the handlers: a JSON POST to an action, so the bodies get parsed.
    let aimed = (
        prop_oneof![4 => Just(0usize), 1 => 1usize..4],
        prop_oneof![
            Just("/presence/login"),
            Just("/presence/heartbeat"),
            Just("/presence/logout")
        ],
        proptest::collection::vec(header(), 0..2),
        body(),
    )
        .prop_map(|(service, path, extra, body)| {
            let mut headers = vec![("content-type".to_owned(), b"application/json".to_vec())];
            headers.extend(extra);
            Case {
                service,
                method: "POST".to_owned(),
                path: path.to_owned(),
                headers,
                body,
            }
        });
    prop_oneof![random, aimed]
}

fn build(case: &Case) -> Option<http::Request<Full<Bytes>>> {
    let method = http::Method::from_bytes(case.method.as_bytes()).ok()?;
    let uri = http::Uri::try_from(case.path.as_str()).ok()?;
    let mut req = http::Request::builder().method(method).uri(uri);
    for (name, value) in &case.headers {
        let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(name.as_bytes()),
            http::HeaderValue::from_bytes(value),
        ) else {
            continue;
        };
        req = req.header(name, value);
    }
    req.body(Full::new(Bytes::from(case.body.clone()))).ok()
}

/// Checks one response against the contract; `Err` describes the violation.
fn check(
    case: &Case,
    res: http::Response<presence::server::ResponseBody>,
    body: &[u8],
) -> Result<(), String> {
    let status = res.status();
    let header = |name: &str| res.headers().get(name).and_then(|v| v.to_str().ok());
    // A `HEAD` answer is the `GET` one without its body.
    if case.method == "HEAD" && body.is_empty() {
        return Ok(());
    }
    // `/` redirects to the status page, with no body.
    if status == 302 && body.is_empty() && header("location") == Some("ui") {
        return Ok(());
    }
    // Everything is JSON except the Prometheus text of `GET /metrics` and the status
    // page's HTML, JavaScript and CSS (`304` when the client holds the current copy).
    let json: serde_json::Value = match serde_json::from_slice(body) {
        Ok(json) => json,
        Err(_) if status == 200 && case.path.starts_with("/metrics") => return Ok(()),
        Err(_) if (status == 200 || status == 304) && case.path.starts_with("/ui") => return Ok(()),
        Err(e) => {
            return Err(format!(
                "{status}: body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(body)
            ))
        }
    };
    if status.is_success() {
        return Ok(());
    }
    if !header("content-type").is_some_and(|ct| ct.starts_with("application/json")) {
        return Err(format!("{status}: error without a JSON content type"));
    }
    let obj = json
        .as_object()
        .ok_or(format!("{status}: error body is not an object"))?;
    let code = obj
        .get("error")
        .and_then(|v| v.as_str())
        .unwrap_or_default();
    let message_ok = obj.get("message").is_some_and(|v| v.is_string());
    if obj.len() != 2 || code.is_empty() || !message_ok {
        return Err(format!("{status}: not the error shape: {json}"));
    }
    if status.is_server_error() && !(status == 503 && code == "store_unavailable") {
        return Err(format!(
            "{status} {code}: a 5xx other than 503 store_unavailable"
        ));
    }
    let needs = match status.as_u16() {
        503 | 429 => Some("retry-after"),
        405 => Some("allow"),
        401 => Some("www-authenticate"),
        _ => None,
    };
    if let Some(name) = needs {
        if header(name).is_none() {
            return Err(format!("{status} {code}: no {name} header"));
        }
    }
    if status == 503 && case.service != 2 {
        return Err(format!("503 from a healthy store: {json}"));
    }
    Ok(())
}

#[test]
fn fuzzed_requests_never_panic_and_errors_are_json() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let services = rt.block_on(async { services() });
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 3000,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let statuses = std::cell::RefCell::new(std::collections::BTreeMap::<u16, usize>::new());
    let result = runner.run(&case(), |case| {
        let Some(req) = build(&case) else {
            return Ok(());
        };
        let service = services[case.service].clone();
        let (res, body) = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), async {
                let res = service
                    .oneshot(req)
                    .await
                    .unwrap_or_else(|e: Infallible| match e {});
                let (parts, body) = res.into_parts();
                let bytes = body
                    .collect()
                    .await
                    .map(|c| c.to_bytes())
                    .unwrap_or_default();
                (
                    http::Response::from_parts(
                        parts,
                        presence::server::ResponseBody::full(Bytes::new()),
                    ),
                    bytes,
                )
            })
            .await
            .expect("answered within 5 s")
        });
        *statuses
            .borrow_mut()
            .entry(res.status().as_u16())
            .or_default() += 1;
        check(&case, res, &body).map_err(TestCaseError::fail)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let statuses = statuses.into_inner();
    println!(
        "fuzzed {} requests; statuses: {statuses:?}",
        statuses.values().sum::<usize>()
    );
    // The generator reaches the interesting answers, not just one of them.
    for status in [200, 400, 401, 404, 405, 413, 415, 422, 429, 503] {
        assert!(
            statuses.contains_key(&status),
            "no {status} in {statuses:?}"
        );
    }
}

/// Below the service, hyper parses the bytes: hostile framing (request smuggling
/// shapes, invalid chunks, oversized and countless headers, random bytes) must at
/// worst close the connection or get a 4xx, never a 5xx, and never take the server
/// down for the next client. (hyper answers its own parse errors itself, without a
/// body, before any request reaches the service.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_bytes_on_the_socket_never_take_the_server_down() {
    use support::client::get;
    use support::server::TestServer;
    use support::within;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    within(30, async {
        let mut cfg = unlimited_config(Duration::from_millis(500));
        cfg.header_timeout = Duration::from_millis(300);
        cfg.request_timeout = Duration::from_millis(500);
        let server = TestServer::memory(&cfg).await;
        let mut blobs: Vec<Vec<u8>> = vec![
            b"POST /presence/login HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /presence HTTP/1.1\r\n\r\n".to_vec(),
            b"POST /presence/login HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\nzz\r\n{}\r\n0\r\n\r\n".to_vec(),
            b"POST /presence/login HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab".to_vec(),
            b"GET /presence HTTP/1.1\r\nHost: x\r\nX-Big: ".iter().copied().chain(std::iter::repeat_n(b'a', 200_000)).chain(*b"\r\n\r\n").collect(),
            (0..500).flat_map(|i| format!("X-H{i}: v\r\n").into_bytes()).fold(b"GET /presence HTTP/1.1\r\nHost: x\r\n".to_vec(), |mut v, b| { v.push(b); v }).into_iter().chain(*b"\r\n").collect(),
            b"GET /presence HTTP/9.9\r\n\r\n".to_vec(),
            b"GET http://evil.example/presence HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            b"GET /presence\x00 HTTP/1.1\r\n\r\n".to_vec(),
            b"\r\n\r\n\r\n".to_vec(),
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00garbage".to_vec(),
        ];
        let mut runner = TestRunner::deterministic();
        let random = proptest::collection::vec(any::<u8>(), 1..2000);
        for _ in 0..200 {
            use proptest::strategy::ValueTree;
            let mut blob = random.new_tree(&mut runner).expect("value").current();
            if blob.len() % 2 == 0 {
                // Half of them start like a request, so they get past the first line.
                let mut head = b"POST /presence/login HTTP/1.1\r\n".to_vec();
                head.append(&mut blob);
                blob = head;
            }
            blobs.push(blob);
        }
        // All at once: most of them stall until the header timeout.
        let addr = server.addr;
        let sends = blobs.iter().map(|blob| async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let _ = stream.write_all(blob).await;
            let mut reply = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut reply)).await;
            (blob, reply)
        });
        let mut answers = std::collections::BTreeMap::<String, usize>::new();
        for (blob, reply) in futures_util::future::join_all(sends).await {
            let status = String::from_utf8_lossy(reply.get(9..12).unwrap_or_default()).into_owned();
            if reply.starts_with(b"HTTP/1.1 ") {
                assert!(
                    !status.starts_with('5'),
                    "{status} for {:?}",
                    String::from_utf8_lossy(&blob[..blob.len().min(80)])
                );
            }
            let key = if reply.is_empty() { "closed".to_owned() } else { status };
            *answers.entry(key).or_default() += 1;
        }
        let reply = get(&server.url("/healthz")).await;
        assert_eq!(reply.status, 200, "the server still serves");
        println!("hostile bytes: {} connections, answers {answers:?}; server still serving", blobs.len());
        server.stop().await;
    })
    .await;
}
