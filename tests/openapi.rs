//! `docs/openapi.yaml` held against the server, in-process (a `PresenceService`
//! called with `tower::ServiceExt::oneshot`, no socket).
//!
//! - The routes: for every path of the document and each of `GET`, `HEAD`,
//!   `POST`, `PUT` and `DELETE`, a method the document lists is routed (never a
//!   `405` nor a "no route" `404`) and answers one of the statuses the document
//!   lists for it; a method it does not list is `405` with an `Allow` naming
//!   exactly the documented methods. Paths the document does not have are `404`.
//! - The bodies: real responses (successes, every client error, `401`, `403`,
//!   `429`, `500`, `503`, the operational endpoints and the first events of the
//!   watch feed) are validated with `jsonschema` (draft 2020-12, the dialect of
//!   OpenAPI 3.1) against the schema the document gives for that path, method,
//!   status and `Content-Type`, with `components` inlined so that `$ref`s resolve.
//! - The headers: every header the document marks required for a response is
//!   there, and every documented header that is there matches its schema
//!   (`Presence-Cursor`, `Retry-After`, `RateLimit`, `RateLimit-Policy`, `Allow`,
//!   `WWW-Authenticate`, `X-Request-Id`, ...).

mod support;

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use http_body_util::{BodyExt, Full};
use presence::server::{PresenceService, ResponseBody};
use presence::store::{FaultyStore, MemoryStore, Store};
use serde_json::{json, Value};
use tower::ServiceExt;

use support::within;

/// The document under test.
const DOC_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.yaml");

/// The methods the route sweep tries on every path.
const METHODS: [&str; 5] = ["GET", "HEAD", "POST", "PUT", "DELETE"];

/// Operations OpenAPI knows besides [`METHODS`]; the document must have none
/// (the server answers them `405`).
const OTHER_OPERATIONS: [&str; 3] = ["options", "patch", "trace"];

// ---------------------------------------------------------------------------
// The document
// ---------------------------------------------------------------------------

/// `docs/openapi.yaml` as JSON, parsed once.
fn doc() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(|| {
        let text =
            std::fs::read_to_string(DOC_PATH).unwrap_or_else(|e| panic!("read {DOC_PATH}: {e}"));
        serde_norway::from_str::<Value>(&text)
            .unwrap_or_else(|e| panic!("{DOC_PATH} is not valid YAML: {e}"))
    })
}

/// The value a local `$ref` (`#/components/...`) points at.
fn resolve(reference: &str) -> &'static Value {
    let pointer = reference
        .strip_prefix('#')
        .unwrap_or_else(|| panic!("{reference:?} is not a local reference"));
    doc()
        .pointer(pointer)
        .unwrap_or_else(|| panic!("{reference:?} resolves to nothing in the document"))
}

/// A response, header or parameter object with its `$ref`s followed.
fn deref(mut value: &'static Value) -> &'static Value {
    while let Some(reference) = value.get("$ref").and_then(Value::as_str) {
        value = resolve(reference);
    }
    value
}

/// The path item of `template` (`/presence/{node_id}`).
fn path_item(template: &str) -> &'static Value {
    doc()["paths"]
        .get(template)
        .unwrap_or_else(|| panic!("the document has no path {template}"))
}

/// The methods the document lists for `template`, uppercase.
fn documented_methods(template: &str) -> BTreeSet<String> {
    let item = path_item(template);
    METHODS
        .iter()
        .filter(|m| item.get(m.to_ascii_lowercase()).is_some())
        .map(|m| (*m).to_owned())
        .collect()
}

/// The response object the document gives for `method template` and `status`.
fn documented_response(template: &str, method: &str, status: u16) -> &'static Value {
    let operation = path_item(template)
        .get(method.to_ascii_lowercase())
        .unwrap_or_else(|| panic!("the document has no {method} {template}"));
    let responses = &operation["responses"];
    let response = responses.get(status.to_string()).unwrap_or_else(|| {
        let listed: Vec<&String> = responses
            .as_object()
            .map(|r| r.keys().collect())
            .unwrap_or_default();
        panic!("{method} {template} answered {status}, which the document does not list (it lists {listed:?})")
    });
    deref(response)
}

/// `components/responses/<name>`.
fn component_response(name: &str) -> &'static Value {
    deref(resolve(&format!("#/components/responses/{name}")))
}

/// A schema that is `components/schemas/<name>`.
fn schema_named(name: &str) -> Value {
    // Checked here so that a typo fails with the name, not as a compile error.
    resolve(&format!("#/components/schemas/{name}"));
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

/// A validator for `schema`, with the document's `components` inlined beside it so
/// that its `#/components/...` references resolve.
fn validator(schema: &Value) -> jsonschema::Validator {
    let mut root = match schema {
        Value::Object(map) => map.clone(),
        Value::Bool(true) => serde_json::Map::new(),
        other => panic!("not a schema object: {other}"),
    };
    root.insert("components".to_owned(), doc()["components"].clone());
    jsonschema::draft202012::new(&Value::Object(root))
        .unwrap_or_else(|e| panic!("the schema {schema} does not compile: {e}"))
}

/// The validation errors of `instance` against `schema`, one line each.
fn violations(schema: &Value, instance: &Value) -> Vec<String> {
    validator(schema)
        .iter_errors(instance)
        .map(|e| format!("{e} (at {:?})", e.instance_path().to_string()))
        .collect()
}

/// Fails unless `instance` matches `schema`.
fn assert_valid(schema: &Value, instance: &Value, what: &str) {
    let errors = violations(schema, instance);
    assert!(
        errors.is_empty(),
        "{what}: {instance} does not match {schema}:\n  {}",
        errors.join("\n  ")
    );
}

// ---------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------

/// A configuration from `vars` (as the server reads its environment), with no
/// practical rate limit unless `vars` sets one.
fn config(vars: &[(&str, &str)]) -> presence::config::Config {
    let mut all: Vec<(&str, &str)> = vars.to_vec();
    for (name, value) in [
        ("PRESENCE_RATE_LIMIT_RATE", "1000000"),
        ("PRESENCE_RATE_LIMIT_CAPACITY", "1000000"),
    ] {
        if !vars.iter().any(|(n, _)| *n == name) {
            all.push((name, value));
        }
    }
    support::config(&all)
}

fn service_on(store: Arc<dyn Store>, vars: &[(&str, &str)]) -> PresenceService {
    PresenceService::new(store, &config(vars)).with_default_peer(([127, 0, 0, 1], 40000).into())
}

fn service(vars: &[(&str, &str)]) -> PresenceService {
    service_on(Arc::new(MemoryStore::new()), vars)
}

/// A request with `headers` and `body` (no `Content-Type` unless among `headers`).
fn request(
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> http::Request<Full<Bytes>> {
    let mut req = http::Request::builder().method(method).uri(path);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    req.body(Full::new(body.into()))
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

fn get(path: &str) -> http::Request<Full<Bytes>> {
    request("GET", path, &[], Bytes::new())
}

fn post(path: &str, body: &Value) -> http::Request<Full<Bytes>> {
    post_with(path, body, &[])
}

fn post_with(path: &str, body: &Value, headers: &[(&str, &str)]) -> http::Request<Full<Bytes>> {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    request("POST", path, &all, body.to_string())
}

/// A response read completely (a `GET` of the watch stream only up to its head:
/// the stream never ends).
struct Reply {
    what: String,
    status: u16,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{}: the body is not JSON ({e}): {:?}",
                self.what,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("{}: no {name} header", self.what))
            .to_str()
            .unwrap_or_else(|e| panic!("{}: {name} is not text: {e}", self.what))
    }

    /// Whether this is the router's "no such path" `404` (not "node not online").
    fn is_no_route(&self) -> bool {
        self.status == 404
            && serde_json::from_slice::<Value>(&self.body).is_ok_and(|b| {
                b["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("no route for"))
            })
    }
}

async fn send(svc: &PresenceService, req: http::Request<Full<Bytes>>) -> Reply {
    let what = format!("{} {}", req.method(), req.uri());
    let is_get = req.method() == http::Method::GET;
    let res = within(10, svc.clone().oneshot(req))
        .await
        .unwrap_or_else(|e| match e {});
    let (parts, body) = res.into_parts();
    let streaming = is_get
        && parts
            .headers
            .get(CONTENT_TYPE)
            .is_some_and(|v| v == "text/event-stream");
    let body = if streaming {
        Bytes::new()
    } else {
        within(10, body.collect())
            .await
            .unwrap_or_else(|e| panic!("{what}: reading the body: {e}"))
            .to_bytes()
    };
    Reply {
        what,
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    }
}

// ---------------------------------------------------------------------------
// Conformance of one reply to one response object
// ---------------------------------------------------------------------------

/// Fails unless `reply` is what the response object `response` describes: every
/// required header present, every documented header present matching its schema,
/// a documented `Content-Type` and a body matching its schema (no body where the
/// document gives no content).
fn assert_conforms(reply: &Reply, response: &'static Value) {
    let what = &reply.what;
    if let Some(headers) = response.get("headers").and_then(Value::as_object) {
        for (name, header) in headers {
            let header = deref(header);
            let required = header["required"].as_bool().unwrap_or(false);
            let Some(value) = reply.headers.get(name.as_str()) else {
                assert!(
                    !required,
                    "{what} ({}): the required header {name} is missing",
                    reply.status
                );
                continue;
            };
            let value = value
                .to_str()
                .unwrap_or_else(|e| panic!("{what}: {name} is not text: {e}"));
            let schema = &header["schema"];
            let instance = if schema["type"] == "integer" {
                Value::from(
                    value
                        .parse::<i64>()
                        .unwrap_or_else(|e| panic!("{what}: {name}: {value:?} is no integer: {e}")),
                )
            } else {
                Value::String(value.to_owned())
            };
            assert_valid(schema, &instance, &format!("{what}: header {name}"));
        }
    }
    let Some(content) = response.get("content").and_then(Value::as_object) else {
        assert!(
            reply.body.is_empty(),
            "{what} ({}): the document gives no body, the server sent {:?}",
            reply.status,
            String::from_utf8_lossy(&reply.body)
        );
        return;
    };
    let content_type = reply.header("content-type");
    let media = content.get(content_type).unwrap_or_else(|| {
        panic!(
            "{what} ({}): Content-Type {content_type:?} is not documented (documented: {:?})",
            reply.status,
            content.keys().collect::<Vec<_>>()
        )
    });
    let schema = &media["schema"];
    match content_type {
        "application/json" => assert_valid(schema, &reply.json(), what),
        // The stream is checked event by event (see the watch tests).
        "text/event-stream" => {}
        _ => {
            let text = std::str::from_utf8(&reply.body)
                .unwrap_or_else(|e| panic!("{what}: the {content_type} body is not UTF-8: {e}"));
            assert_valid(schema, &Value::String(text.to_owned()), what);
        }
    }
}

/// Sends `req`, expects `status`, and checks the reply against the document's
/// response for `method template` and that status.
async fn expect(
    svc: &PresenceService,
    template: &str,
    req: http::Request<Full<Bytes>>,
    status: u16,
) -> Reply {
    let method = req.method().as_str().to_owned();
    let mut reply = send(svc, req).await;
    if method == "HEAD" {
        drop_pre_router_head_body(&mut reply, template);
    }
    assert_eq!(
        reply.status,
        status,
        "{}: {:?}",
        reply.what,
        String::from_utf8_lossy(&reply.body)
    );
    assert_conforms(&reply, documented_response(template, &method, status));
    reply
}

/// Known deviation (reported, not fixed here: server code is out of scope): the
/// `HEAD` answers made before the router, by the auth layer (`401`), the rate
/// limiter (`429`) and the body limit (`413`), carry the `GET`'s JSON error body
/// when the service is called in-process; docs/http-api.md says a `HEAD` has no
/// body (hyper drops it on the wire). Such a body must at least be the `GET`'s
/// documented error; it is then dropped so that the rest of the reply is checked
/// against the `HEAD` operation. Router-made `HEAD` answers (the route sweep) are
/// held to "no body" strictly.
fn drop_pre_router_head_body(reply: &mut Reply, template: &str) {
    if reply.body.is_empty() || ![401, 413, 429].contains(&reply.status) {
        return;
    }
    let as_get = Reply {
        what: format!("{} (its body, as GET)", reply.what),
        status: reply.status,
        headers: reply.headers.clone(),
        body: reply.body.clone(),
    };
    assert_conforms(&as_get, documented_response(template, "GET", reply.status));
    reply.body = Bytes::new();
}

/// Logs `node` in (checked against the document) and returns its lease.
async fn login(svc: &PresenceService, node: &str, meta: Value) -> String {
    let reply = expect(
        svc,
        "/presence/login",
        post("/presence/login", &json!({"node_id": node, "meta": meta})),
        200,
    )
    .await;
    reply.json()["lease_id"]
        .as_str()
        .unwrap_or_else(|| panic!("login of {node}: no lease_id"))
        .to_owned()
}

/// An HS256 JWT for `sub` with `scope`, valid for an hour.
fn jwt(secret: &[u8], sub: &str, scope: &str) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
        + 3600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": sub, "scope": scope, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(secret).expect("HS256 key"),
    )
    .expect("a JWT")
}

// ---------------------------------------------------------------------------
// The watch stream
// ---------------------------------------------------------------------------

/// One Server-Sent Event, parsed.
#[derive(Debug)]
struct SseEvent {
    id: String,
    event: String,
    data: Value,
}

impl SseEvent {
    /// The event as the document's `WatchEvent` schema describes it.
    fn as_value(&self) -> Value {
        json!({"id": self.id, "event": self.event, "data": self.data})
    }
}

/// Reads a watch body incrementally, event by event (it never ends).
struct Sse {
    body: Pin<Box<ResponseBody>>,
    buffer: Vec<u8>,
}

impl Sse {
    /// `GET path` (with `headers`): checks the `200` head against the document and
    /// returns the stream.
    async fn open(svc: &PresenceService, path: &str, headers: &[(&str, &str)]) -> Sse {
        let res = within(
            10,
            svc.clone()
                .oneshot(request("GET", path, headers, Bytes::new())),
        )
        .await
        .unwrap_or_else(|e| match e {});
        let (parts, body) = res.into_parts();
        let head = Reply {
            what: format!("GET {path}"),
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: Bytes::new(),
        };
        assert_eq!(head.status, 200, "{}", head.what);
        assert_eq!(head.header("content-type"), "text/event-stream");
        assert_conforms(&head, documented_response("/presence/watch", "GET", 200));
        Sse {
            body: Box::pin(body),
            buffer: Vec::new(),
        }
    }

    /// The next event (comments such as `: keep-alive` skipped), within 10 s.
    async fn next(&mut self) -> SseEvent {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
                let block = String::from_utf8(block).expect("the stream is UTF-8");
                if let Some(event) = parse_event(&block) {
                    return event;
                }
                continue;
            }
            let frame = within(10, self.body.frame())
                .await
                .expect("the watch stream ended")
                .unwrap_or_else(|e| panic!("the watch stream failed: {e}"));
            if let Ok(data) = frame.into_data() {
                self.buffer.extend_from_slice(&data);
            }
        }
    }

    /// The next event, checked against `WatchEvent` and against the data schema
    /// the document gives for its type; it must be `event`.
    async fn next_valid(&mut self, event: &str) -> SseEvent {
        let got = self.next().await;
        assert_eq!(got.event, event, "{got:?}");
        assert_valid(&schema_named("WatchEvent"), &got.as_value(), "watch event");
        let data_schema = match got.event.as_str() {
            "snapshot" => "WatchSnapshotData",
            "join" | "update" => "Node",
            "leave" => "WatchLeaveData",
            other => panic!("undocumented event {other:?}"),
        };
        assert_valid(
            &schema_named(data_schema),
            &got.data,
            &format!("{event} data"),
        );
        got
    }
}

/// One SSE block: `None` for a comment-only block. Its data must be one line.
fn parse_event(block: &str) -> Option<SseEvent> {
    let (mut id, mut event, mut data) = (None, None, Vec::new());
    for line in block.lines().filter(|l| !l.is_empty()) {
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "id" => id = Some(value.to_owned()),
            "event" => event = Some(value.to_owned()),
            "data" => data.push(value.to_owned()),
            other => panic!("undocumented SSE field {other:?} in {block:?}"),
        }
    }
    let event = event?;
    assert_eq!(data.len(), 1, "one line of data per event: {block:?}");
    Some(SseEvent {
        id: id.unwrap_or_else(|| panic!("an event without id: {block:?}")),
        event,
        data: serde_json::from_str(&data[0])
            .unwrap_or_else(|e| panic!("data that is not JSON ({e}): {block:?}")),
    })
}

// ---------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------

#[test]
fn the_document_is_openapi_3_1_its_refs_resolve_and_its_schemas_compile() {
    let doc = doc();
    let version = doc["openapi"].as_str().expect("an openapi version");
    assert!(version.starts_with("3.1."), "OpenAPI {version}");

    fn refs(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                if let Some(r) = map.get("$ref").and_then(Value::as_str) {
                    out.push(r.to_owned());
                }
                map.values().for_each(|v| refs(v, out));
            }
            Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    refs(doc, &mut all);
    assert!(all.len() > 100, "only {} $refs", all.len());
    for reference in &all {
        resolve(reference);
    }

    let schemas = doc["components"]["schemas"]
        .as_object()
        .expect("components/schemas");
    for name in schemas.keys() {
        validator(&schema_named(name));
    }
    // Every operation's every JSON response schema compiles too.
    for (template, item) in doc["paths"].as_object().expect("paths") {
        for method in METHODS {
            let Some(op) = item.get(method.to_ascii_lowercase()) else {
                continue;
            };
            for (status, response) in op["responses"].as_object().expect("responses") {
                let response = deref(response);
                if let Some(content) = response.get("content").and_then(Value::as_object) {
                    for (media, body) in content {
                        assert!(
                            body.get("schema").is_some(),
                            "{method} {template} {status} {media}: no schema"
                        );
                        validator(&body["schema"]);
                    }
                }
            }
        }
        for other in OTHER_OPERATIONS {
            assert!(
                item.get(other).is_none(),
                "{template} documents {other}, which the server does not route"
            );
        }
    }
}

#[test]
fn the_schemas_reject_what_the_server_must_not_send() {
    let node = json!({"node_id": "n-1", "status": "up", "meta": {}, "online_since_ms": 1, "last_seen_ms": 2, "expires_at_ms": 3});
    let mut down = node.clone();
    down["status"] = json!("down");
    let mut statusless = node.clone();
    statusless.as_object_mut().map(|n| n.remove("status"));
    assert_valid(&schema_named("Node"), &node, "a node");
    let mut extra = node.clone();
    extra["lease_id"] = json!("x");
    for (schema, bad) in [
        ("Node", extra),
        ("Node", down),
        ("Node", statusless),
        (
            "Stats",
            json!({"online": 1, "by_status": {"up": 1, "degraded": 0}}),
        ),
        (
            "Stats",
            json!({"online": -1, "by_status": {"up": 0, "degraded": 0, "draining": 0}}),
        ),
        ("Node", json!({"node_id": "n-1", "meta": {}})),
        (
            "Node",
            json!({"node_id": "login", "meta": {}, "online_since_ms": 1, "last_seen_ms": 2, "expires_at_ms": 3}),
        ),
        (
            "Node",
            json!({"node_id": "a b", "meta": {}, "online_since_ms": 1, "last_seen_ms": 2, "expires_at_ms": 3}),
        ),
        ("Error", json!({"error": "teapot", "message": "no"})),
        ("Error", json!({"error": "not_found"})),
        (
            "LoginResponse",
            json!({"node_id": "n", "lease_id": "ABC", "ttl_ms": 1, "heartbeat_ms": 1, "expires_at_ms": 1}),
        ),
        ("LogoutResponse", json!({"node_id": "n", "removed": "yes"})),
        ("WatchLeaveData", json!({"node_id": "n", "reason": "gone"})),
        (
            "WatchEvent",
            json!({"id": "AQ", "event": "join", "data": {"node_id": "n", "reason": "logout"}}),
        ),
        (
            "WatchEvent",
            json!({"id": "AQ", "event": "snapshot", "data": []}),
        ),
    ] {
        assert!(
            !violations(&schema_named(schema), &bad).is_empty(),
            "{schema} accepts {bad}"
        );
    }
}

#[tokio::test]
async fn every_documented_method_is_routed_and_every_other_is_405_allowing_exactly_the_documented_ones(
) {
    let svc = service(&[]);
    let paths = doc()["paths"].as_object().expect("paths");
    assert_eq!(paths.len(), 14, "the server has fourteen route templates");
    for template in paths.keys() {
        let path = template.replace("{node_id}", "sweep-node");
        let documented = documented_methods(template);
        assert!(!documented.is_empty(), "{template} has no operation");
        let mut get_status = None;
        for method in METHODS {
            let req = if method == "POST" {
                post(&path, &json!({}))
            } else {
                request(method, &path, &[], Bytes::new())
            };
            let reply = send(&svc, req).await;
            if documented.contains(method) {
                assert_ne!(reply.status, 405, "{} is documented", reply.what);
                assert!(!reply.is_no_route(), "{} is documented", reply.what);
                assert_conforms(&reply, documented_response(template, method, reply.status));
                match method {
                    "GET" => get_status = Some(reply.status),
                    "HEAD" => {
                        assert_eq!(Some(reply.status), get_status, "{}: as GET", reply.what);
                        assert!(reply.body.is_empty(), "{}: no body", reply.what);
                    }
                    _ => {}
                }
            } else {
                assert_eq!(reply.status, 405, "{} is not documented", reply.what);
                let allow: BTreeSet<String> = reply
                    .header(ALLOW.as_str())
                    .split(',')
                    .map(|m| m.trim().to_owned())
                    .collect();
                assert_eq!(allow, documented, "{}: Allow", reply.what);
                assert_conforms(&reply, component_response("MethodNotAllowed"));
            }
        }
    }
}

#[tokio::test]
async fn undocumented_paths_are_404_no_route() {
    let svc = service(&[]);
    for path in [
        "/presence/a/b",
        "/nope",
        "/presence/login/",
        "/healthz/",
        "/presencex",
        "/ui/",
        "/ui/index.html",
        "/index.html",
    ] {
        assert!(doc()["paths"].get(path).is_none(), "{path} is documented");
        for method in METHODS {
            let reply = send(&svc, request(method, path, &[], Bytes::new())).await;
            assert_eq!(reply.status, 404, "{}", reply.what);
            if method == "HEAD" {
                continue;
            }
            assert!(reply.is_no_route(), "{}: {:?}", reply.what, reply.json());
            assert_eq!(
                reply.json()["message"],
                format!("no route for {method} {path}")
            );
            assert_conforms(&reply, component_response("NotFound"));
        }
    }
}

#[tokio::test]
async fn login_heartbeat_and_logout_replies_match_their_schemas() {
    let svc = service(&[]);
    let lease = login(&svc, "n-1", json!({"load": 0.4, "hp": 97})).await;
    // Without meta, and with `"meta": null`.
    expect(
        &svc,
        "/presence/login",
        post("/presence/login", &json!({"node_id": "n-2"})),
        200,
    )
    .await;
    let lease2 = login(&svc, "n-3", Value::Null).await;

    let hb = |body: Value| post("/presence/heartbeat", &body);
    // The SDK's exact body (the server's hand-read fast path), then with meta.
    let plain = expect(
        &svc,
        "/presence/heartbeat",
        request(
            "POST",
            "/presence/heartbeat",
            &[("content-type", "application/json")],
            format!(r#"{{"node_id":"n-1","lease_id":"{lease}"}}"#),
        ),
        200,
    )
    .await;
    assert_eq!(plain.json()["lease_id"], lease);
    expect(
        &svc,
        "/presence/heartbeat",
        hb(json!({"node_id": "n-1", "lease_id": lease, "meta": {"load": 0.7}})),
        200,
    )
    .await;
    expect(
        &svc,
        "/presence/heartbeat",
        hb(json!({"node_id": "n-3", "lease_id": lease2, "meta": null, "extra": 1})),
        200,
    )
    .await;

    let out = |body: Value| post("/presence/logout", &body);
    let removed = expect(
        &svc,
        "/presence/logout",
        out(json!({"node_id": "n-1", "lease_id": lease})),
        200,
    )
    .await;
    assert_eq!(removed.json()["removed"], true);
    let again = expect(
        &svc,
        "/presence/logout",
        out(json!({"node_id": "n-1", "lease_id": lease})),
        200,
    )
    .await;
    assert_eq!(again.json()["removed"], false);
}

#[tokio::test]
async fn list_and_get_match_the_node_schema_and_the_list_carries_presence_cursor() {
    let svc = service(&[]);
    // An empty listing first: `[]`, with a cursor.
    let empty = expect(&svc, "/presence", get("/presence"), 200).await;
    assert_eq!(empty.json(), json!([]));
    empty.header("presence-cursor");

    login(&svc, "n-2", json!({"nested": {"a": [1, 2, {"b": null}]}})).await;
    login(&svc, "n-1", json!({})).await;
    login(&svc, "svc@host:7000", json!({"load": 0.1})).await;

    let list = expect(&svc, "/presence", get("/presence"), 200).await;
    list.header("presence-cursor");
    let ids: Vec<Value> = list
        .json()
        .as_array()
        .expect("an array")
        .iter()
        .map(|n| n["node_id"].clone())
        .collect();
    assert_eq!(ids, [json!("n-1"), json!("n-2"), json!("svc@host:7000")]);

    let head = expect(
        &svc,
        "/presence",
        request("HEAD", "/presence", &[], ""),
        200,
    )
    .await;
    assert_eq!(
        head.header(CONTENT_LENGTH.as_str()),
        list.body.len().to_string()
    );
    head.header("presence-cursor");

    let one = expect(&svc, "/presence/{node_id}", get("/presence/n-2"), 200).await;
    assert_eq!(
        one.json()["meta"],
        json!({"nested": {"a": [1, 2, {"b": null}]}})
    );
    let decoded = expect(
        &svc,
        "/presence/{node_id}",
        get("/presence/svc%40host%3A7000"),
        200,
    )
    .await;
    assert_eq!(decoded.json()["node_id"], "svc@host:7000");
    let head = expect(
        &svc,
        "/presence/{node_id}",
        request("HEAD", "/presence/n-2", &[], ""),
        200,
    )
    .await;
    assert_eq!(
        head.header(CONTENT_LENGTH.as_str()),
        one.body.len().to_string()
    );
}

#[tokio::test]
async fn client_errors_400_404_405_409_413_415_422_match_their_documented_responses() {
    let svc = service(&[]);
    let lease = login(&svc, "n-1", json!({})).await;
    let json_ct = [("content-type", "application/json")];

    // 400: not JSON, not an object, a wrong type, a missing field.
    for body in ["{not json", "[1, 2]", r#"{"node_id": 1}"#, "{}"] {
        let reply = expect(
            &svc,
            "/presence/login",
            request("POST", "/presence/login", &json_ct, body),
            400,
        )
        .await;
        assert_eq!(reply.json()["error"], "bad_request", "{body}");
    }
    expect(
        &svc,
        "/presence/heartbeat",
        post("/presence/heartbeat", &json!({"node_id": "n-1"})),
        400,
    )
    .await;

    // 404: a node that is not online, fetched or heartbeated.
    let missing = expect(&svc, "/presence/{node_id}", get("/presence/nobody"), 404).await;
    assert_eq!(missing.json()["message"], r#"node "nobody" is not online"#);
    expect(
        &svc,
        "/presence/heartbeat",
        post(
            "/presence/heartbeat",
            &json!({"node_id": "nobody", "lease_id": lease}),
        ),
        404,
    )
    .await;

    // 405, on an action path and on a read path.
    for (path, allow) in [
        ("/presence/login", "GET, HEAD, POST"),
        ("/presence", "GET, HEAD"),
    ] {
        let reply = send(&svc, request("DELETE", path, &[], "")).await;
        assert_eq!(reply.status, 405, "{}", reply.what);
        assert_eq!(reply.header("allow"), allow);
        assert_conforms(&reply, component_response("MethodNotAllowed"));
    }

    // 409: a stale lease, on heartbeat and logout.
    for template in ["/presence/heartbeat", "/presence/logout"] {
        expect(
            &svc,
            template,
            post(template, &json!({"node_id": "n-1", "lease_id": "stale"})),
            409,
        )
        .await;
    }

    // 413: over 16 KiB, declared; on a POST and on a GET.
    let big = format!(r#"{{"node_id":"n-1","pad":"{}"}}"#, "x".repeat(17_000));
    expect(
        &svc,
        "/presence/login",
        request("POST", "/presence/login", &json_ct, big.clone()),
        413,
    )
    .await;
    for (template, path) in [
        ("/presence", "/presence"),
        ("/presence/{node_id}", "/presence/n-1"),
        ("/presence/watch", "/presence/watch"),
    ] {
        expect(
            &svc,
            template,
            request("GET", path, &json_ct, big.clone()),
            413,
        )
        .await;
    }

    // 415: no JSON content type, two of them, a charset other than UTF-8.
    let body = json!({"node_id": "n-1"}).to_string();
    for headers in [
        &[("content-type", "text/plain")][..],
        &[][..],
        &[
            ("content-type", "application/json"),
            ("content-type", "application/json"),
        ][..],
        &[("content-type", "application/json; charset=latin1")][..],
    ] {
        expect(
            &svc,
            "/presence/login",
            request("POST", "/presence/login", headers, body.clone()),
            415,
        )
        .await;
    }

    // 422: bad ids in the body and the path, reserved ids, bad meta.
    for (template, req, code) in [
        (
            "/presence/login",
            post("/presence/login", &json!({"node_id": "bad id"})),
            "invalid_node_id",
        ),
        (
            "/presence/login",
            post("/presence/login", &json!({"node_id": "n-1", "meta": "x"})),
            "invalid_meta",
        ),
        (
            "/presence/login",
            post(
                "/presence/login",
                &json!({"node_id": "n-1", "meta": {"k": "v".repeat(5000)}}),
            ),
            "invalid_meta",
        ),
        (
            "/presence/heartbeat",
            post(
                "/presence/heartbeat",
                &json!({"node_id": "n-1", "lease_id": lease, "meta": [1]}),
            ),
            "invalid_meta",
        ),
        (
            "/presence/logout",
            post(
                "/presence/logout",
                &json!({"node_id": "stats", "lease_id": lease}),
            ),
            "invalid_node_id",
        ),
        (
            "/presence/{node_id}",
            get("/presence/bad%20id"),
            "invalid_node_id",
        ),
        ("/presence/{node_id}", get("/presence/"), "invalid_node_id"),
        (
            "/presence/{node_id}",
            get("/presence/a%2Fb"),
            "invalid_node_id",
        ),
        ("/presence/login", get("/presence/login"), "invalid_node_id"),
        (
            "/presence/login",
            post(
                "/presence/login",
                &json!({"node_id": "n-1", "status": "down"}),
            ),
            "invalid_status",
        ),
        (
            "/presence/heartbeat",
            post(
                "/presence/heartbeat",
                &json!({"node_id": "n-1", "lease_id": lease, "status": 3}),
            ),
            "invalid_status",
        ),
        (
            "/presence/heartbeat",
            get("/presence/heartbeat"),
            "invalid_node_id",
        ),
    ] {
        let reply = expect(&svc, template, req, 422).await;
        assert_eq!(reply.json()["error"], code, "{}", reply.what);
    }
}

#[tokio::test]
async fn a_missing_or_wrong_token_is_401_with_www_authenticate() {
    let svc = service(&[("PRESENCE_AUTH_TOKEN", "t0ken")]);
    let wrong = [("authorization", "Bearer nope")];
    for (template, req) in [
        ("/presence", get("/presence")),
        ("/presence/watch", get("/presence/watch")),
        (
            "/presence/{node_id}",
            request("GET", "/presence/n-1", &wrong, ""),
        ),
        (
            "/presence/login",
            post_with("/presence/login", &json!({"node_id": "n-1"}), &wrong),
        ),
        ("/presence", request("HEAD", "/presence", &[], "")),
    ] {
        let reply = expect(&svc, template, req, 401).await;
        assert_eq!(reply.header("www-authenticate"), "Bearer");
    }
    // Under /presence even an unknown path is 401 first.
    let reply = send(&svc, get("/presence/a/b")).await;
    assert_eq!(reply.status, 401);
    assert_conforms(&reply, component_response("Unauthorized"));

    // The right token (any case of the scheme) passes; the operational routes
    // need none.
    let right = [("authorization", "bearer t0ken")];
    expect(
        &svc,
        "/presence",
        request("GET", "/presence", &right, ""),
        200,
    )
    .await;
    expect(&svc, "/healthz", get("/healthz"), 200).await;
    expect(&svc, "/readyz", get("/readyz"), 200).await;
}

#[tokio::test]
async fn a_jwt_without_the_scope_for_the_call_is_403() {
    const SECRET: &str = "s3cret-for-openapi";
    let svc = service(&[("PRESENCE_JWT_SECRET", SECRET)]);
    let bearer = |token: &str| format!("Bearer {token}");
    let reader = bearer(&jwt(SECRET.as_bytes(), "n-1", "presence:read"));
    let writer = bearer(&jwt(SECRET.as_bytes(), "n-1", "presence:write"));
    let as_reader = [("authorization", reader.as_str())];
    let as_writer = [("authorization", writer.as_str())];

    // A read-only token reads, and may not write.
    expect(
        &svc,
        "/presence",
        request("GET", "/presence", &as_reader, ""),
        200,
    )
    .await;
    let denied = expect(
        &svc,
        "/presence/login",
        post_with("/presence/login", &json!({"node_id": "n-1"}), &as_reader),
        403,
    )
    .await;
    assert_eq!(denied.json()["error"], "forbidden");

    // A write token for n-1 writes n-1 only, and may not read.
    let lease = expect(
        &svc,
        "/presence/login",
        post_with("/presence/login", &json!({"node_id": "n-1"}), &as_writer),
        200,
    )
    .await
    .json()["lease_id"]
        .clone();
    expect(
        &svc,
        "/presence/heartbeat",
        post_with(
            "/presence/heartbeat",
            &json!({"node_id": "n-1", "lease_id": lease}),
            &as_writer,
        ),
        200,
    )
    .await;
    for template in ["/presence/login", "/presence/logout"] {
        expect(
            &svc,
            template,
            post_with(
                template,
                &json!({"node_id": "n-2", "lease_id": "x"}),
                &as_writer,
            ),
            403,
        )
        .await;
    }
    for (template, path) in [
        ("/presence", "/presence"),
        ("/presence/{node_id}", "/presence/n-1"),
        ("/presence/watch", "/presence/watch"),
        ("/presence/stats", "/presence/stats"),
        ("/presence", "/presence?status=up&limit=1"),
    ] {
        expect(&svc, template, request("GET", path, &as_writer, ""), 403).await;
    }
    expect(
        &svc,
        "/presence/stats",
        request("GET", "/presence/stats", &as_reader, ""),
        200,
    )
    .await;

    // A token that does not verify is 401, not 403.
    let forged = bearer(&jwt(b"another-secret", "n-1", "presence:admin"));
    expect(
        &svc,
        "/presence",
        request(
            "GET",
            "/presence",
            &[("authorization", forged.as_str())],
            "",
        ),
        401,
    )
    .await;
}

#[tokio::test]
async fn an_empty_bucket_is_429_with_retry_after_ratelimit_and_ratelimit_policy() {
    let svc = service(&[
        ("PRESENCE_RATE_LIMIT_RATE", "0.01"),
        ("PRESENCE_RATE_LIMIT_CAPACITY", "1"),
    ]);
    expect(&svc, "/presence", get("/presence"), 200).await;
    for (template, req) in [
        ("/presence", get("/presence")),
        ("/presence", request("HEAD", "/presence", &[], "")),
        (
            "/presence/login",
            post("/presence/login", &json!({"node_id": "n-1"})),
        ),
        ("/presence/watch", get("/presence/watch")),
    ] {
        let reply = expect(&svc, template, req, 429).await;
        let retry: u64 = reply.header("retry-after").parse().expect("seconds");
        assert!(retry >= 1, "Retry-After {retry}");
        assert_eq!(reply.header("ratelimit-policy"), r#""default";q=1;w=100"#);
        reply.header("ratelimit");
    }
    // The operational routes are not limited.
    for _ in 0..3 {
        expect(&svc, "/healthz", get("/healthz"), 200).await;
        expect(&svc, "/metrics", get("/metrics"), 200).await;
    }
}

#[tokio::test]
async fn a_store_that_is_down_is_503_with_retry_after() {
    let svc = service_on(Arc::new(FaultyStore::down()), &[]);
    for (template, req) in [
        ("/presence", get("/presence")),
        ("/presence/{node_id}", get("/presence/n-1")),
        (
            "/presence/login",
            post("/presence/login", &json!({"node_id": "n-1"})),
        ),
        (
            "/presence/heartbeat",
            post(
                "/presence/heartbeat",
                &json!({"node_id": "n-1", "lease_id": "x"}),
            ),
        ),
        (
            "/presence/logout",
            post(
                "/presence/logout",
                &json!({"node_id": "n-1", "lease_id": "x"}),
            ),
        ),
        ("/presence/watch", get("/presence/watch")),
        ("/readyz", get("/readyz")),
        ("/readyz", request("HEAD", "/readyz", &[], "")),
    ] {
        let reply = expect(&svc, template, req, 503).await;
        reply.header("retry-after");
        if !reply.body.is_empty() {
            assert_eq!(reply.json()["error"], "store_unavailable");
        }
    }
    // Liveness never calls the store.
    expect(&svc, "/healthz", get("/healthz"), 200).await;
}

#[tokio::test]
async fn watch_refusals_are_503_too_many_watchers_and_shutting_down_with_retry_after() {
    let svc = service(&[("PRESENCE_MAX_WATCHERS", "1")]);
    let _open = Sse::open(&svc, "/presence/watch", &[]).await;
    let full = expect(&svc, "/presence/watch", get("/presence/watch"), 503).await;
    assert_eq!(full.json()["error"], "too_many_watchers");
    assert_eq!(full.header("retry-after"), "5");

    svc.end_watches();
    let draining = expect(&svc, "/presence/watch", get("/presence/watch"), 503).await;
    assert_eq!(draining.json()["error"], "shutting_down");
    assert_eq!(draining.header("retry-after"), "1");
}

#[tokio::test]
async fn a_panicking_handler_is_500_internal() {
    let svc = service_on(Arc::new(FaultyStore::panicking()), &[]);
    let reply = expect(&svc, "/presence", get("/presence"), 500).await;
    assert_eq!(reply.json()["error"], "internal");
    assert_eq!(reply.json()["message"], "internal server error");
}

#[tokio::test]
async fn the_status_page_its_files_the_redirect_and_304s_match_their_documented_responses() {
    // With auth on: the page and its files need no token (they hold no data).
    let svc = service(&[("PRESENCE_AUTH_TOKEN", "page-test-token")]);
    let root = expect(&svc, "/", get("/"), 302).await;
    assert_eq!(root.header("location"), "ui");
    expect(&svc, "/", request("HEAD", "/", &[], Bytes::new()), 302).await;
    for (path, media) in [
        ("/ui", "text/html"),
        ("/ui/app.js", "text/javascript"),
        ("/ui/style.css", "text/css"),
    ] {
        let full = expect(&svc, path, get(path), 200).await;
        assert!(full.header("content-type").starts_with(media), "{path}");
        let etag = full.header("etag").to_owned();
        let head = expect(&svc, path, request("HEAD", path, &[], Bytes::new()), 200).await;
        assert_eq!(head.header("etag"), etag);
        assert_eq!(
            head.header(CONTENT_LENGTH.as_str()),
            full.body.len().to_string()
        );
        for method in ["GET", "HEAD"] {
            let cached = expect(
                &svc,
                path,
                request(method, path, &[("if-none-match", &etag)], Bytes::new()),
                304,
            )
            .await;
            assert!(cached.body.is_empty(), "{path}: a 304 has no body");
        }
        let stale = expect(
            &svc,
            path,
            request(
                "GET",
                path,
                &[("if-none-match", "\"0000000000000000\"")],
                Bytes::new(),
            ),
            200,
        )
        .await;
        assert_eq!(stale.body, full.body);
    }
    // The data the page shows stays behind the token.
    expect(&svc, "/presence/stats", get("/presence/stats"), 401).await;
}

#[tokio::test]
async fn healthz_readyz_and_metrics_match_their_schemas() {
    let svc = service(&[]);
    let health = expect(&svc, "/healthz", get("/healthz"), 200).await;
    assert_eq!(health.json(), json!({"status": "ok"}));
    let ready = expect(&svc, "/readyz", get("/readyz"), 200).await;
    assert_eq!(ready.json(), json!({"status": "ready"}));
    let metrics = expect(&svc, "/metrics", get("/metrics"), 200).await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.contains("presence_http_requests_total"),
        "a scrape: {text}"
    );
    for (template, full) in [
        ("/healthz", &health),
        ("/readyz", &ready),
        ("/metrics", &metrics),
    ] {
        let head = expect(&svc, template, request("HEAD", template, &[], ""), 200).await;
        assert_eq!(
            head.header("content-type"),
            full.header("content-type"),
            "HEAD {template}"
        );
        // The length of the GET's body (the metrics grow between the two).
        if template != "/metrics" {
            assert_eq!(
                head.header(CONTENT_LENGTH.as_str()),
                full.body.len().to_string(),
                "HEAD {template}"
            );
        }
    }
    // A request id sent is sent back.
    let reply = send(
        &svc,
        request("GET", "/healthz", &[("x-request-id", "req-42")], ""),
    )
    .await;
    assert_eq!(reply.header("x-request-id"), "req-42");
}

#[tokio::test]
async fn watch_snapshot_join_update_and_leave_match_their_schemas() {
    let svc = service(&[]);
    login(&svc, "before", json!({"a": 1})).await;
    let mut feed = Sse::open(&svc, "/presence/watch", &[]).await;

    let snapshot = feed.next_valid("snapshot").await;
    assert_eq!(snapshot.data["nodes"][0]["node_id"], "before");

    let lease = login(&svc, "w-1", json!({"load": 0.5})).await;
    let join = feed.next_valid("join").await;
    assert_eq!(join.data["node_id"], "w-1");
    assert_eq!(join.data["meta"], json!({"load": 0.5}));

    // A heartbeat that moves only time is no event; one that changes meta is.
    expect(
        &svc,
        "/presence/heartbeat",
        post(
            "/presence/heartbeat",
            &json!({"node_id": "w-1", "lease_id": lease}),
        ),
        200,
    )
    .await;
    expect(
        &svc,
        "/presence/heartbeat",
        post(
            "/presence/heartbeat",
            &json!({"node_id": "w-1", "lease_id": lease, "meta": {"load": 0.9}}),
        ),
        200,
    )
    .await;
    let update = feed.next_valid("update").await;
    assert_eq!(update.data["meta"], json!({"load": 0.9}));

    expect(
        &svc,
        "/presence/logout",
        post(
            "/presence/logout",
            &json!({"node_id": "w-1", "lease_id": lease}),
        ),
        200,
    )
    .await;
    let leave = feed.next_valid("leave").await;
    assert_eq!(leave.data, json!({"node_id": "w-1", "reason": "logout"}));

    // Cursors are distinct and ordered as sent.
    let ids: BTreeSet<&str> = [&snapshot, &join, &update, &leave]
        .iter()
        .map(|e| e.id.as_str())
        .collect();
    assert_eq!(ids.len(), 4, "distinct cursors");
}

#[tokio::test]
async fn watch_resumes_after_a_presence_cursor_given_as_since_or_last_event_id() {
    let svc = service(&[]);
    login(&svc, "a", json!({})).await;
    let list = expect(&svc, "/presence", get("/presence"), 200).await;
    let cursor = list.header("presence-cursor").to_owned();
    assert_valid(
        &schema_named("Cursor"),
        &Value::String(cursor.clone()),
        "Presence-Cursor",
    );
    login(&svc, "b", json!({"x": true})).await;

    let since = format!("/presence/watch?since={cursor}");
    let mut by_query = Sse::open(&svc, &since, &[]).await;
    let first = by_query.next_valid("join").await;
    assert_eq!(first.data["node_id"], "b");

    let mut by_header = Sse::open(&svc, "/presence/watch", &[("last-event-id", &cursor)]).await;
    let first = by_header.next_valid("join").await;
    assert_eq!(first.data["node_id"], "b");

    // A cursor that cannot be read is a snapshot, never an error.
    let mut garbled = Sse::open(&svc, "/presence/watch?since=garbage", &[]).await;
    let snapshot = garbled.next_valid("snapshot").await;
    assert_eq!(snapshot.data["nodes"].as_array().map(Vec::len), Some(2));
}

/// Logs `node` in with `status` (checked against the document); returns the lease.
async fn login_as(svc: &PresenceService, node: &str, status: &str) -> String {
    let reply = expect(
        svc,
        "/presence/login",
        post(
            "/presence/login",
            &json!({"node_id": node, "status": status}),
        ),
        200,
    )
    .await;
    reply.json()["lease_id"]
        .as_str()
        .expect("a lease")
        .to_owned()
}

#[tokio::test]
async fn filtered_pages_carry_a_link_and_stats_match_their_schemas() {
    let svc = service(&[]);
    for (node, status) in [
        ("p-1", "up"),
        ("p-2", "draining"),
        ("p-3", "up"),
        ("p-4", "up"),
    ] {
        login_as(&svc, node, status).await;
    }
    let first = expect(&svc, "/presence", get("/presence?status=up&limit=2"), 200).await;
    first.header("presence-cursor");
    let link = first.header("link").to_owned();
    assert_eq!(
        link,
        "</presence?status=up&limit=2&after=p-3>; rel=\"next\""
    );
    let next = link
        .strip_prefix('<')
        .and_then(|l| l.split_once('>'))
        .map(|(target, _)| target.to_owned())
        .expect("a link target");
    let last = expect(&svc, "/presence", get(&next), 200).await;
    assert_eq!(last.json()[0]["node_id"], "p-4");
    assert!(
        last.headers.get("link").is_none(),
        "no Link on the last page"
    );
    let head = expect(
        &svc,
        "/presence",
        request("HEAD", "/presence?status=up&limit=2", &[], ""),
        200,
    )
    .await;
    assert_eq!(head.header("link"), link);
    for path in [
        "/presence?limit=0",
        "/presence?status=down",
        "/presence?meta.=x",
    ] {
        expect(&svc, "/presence", get(path), 400).await;
        expect(&svc, "/presence", request("HEAD", path, &[], ""), 400).await;
    }
    expect(&svc, "/presence/watch", get("/presence/watch?limit=1"), 400).await;

    let stats = expect(&svc, "/presence/stats", get("/presence/stats"), 200).await;
    assert_eq!(
        stats.json(),
        json!({"online": 4, "by_status": {"up": 3, "degraded": 0, "draining": 1}})
    );
    let head = expect(
        &svc,
        "/presence/stats",
        request("HEAD", "/presence/stats", &[], ""),
        200,
    )
    .await;
    assert_eq!(
        head.header(CONTENT_LENGTH.as_str()),
        stats.body.len().to_string()
    );
}

#[tokio::test]
async fn a_filtered_watch_sends_unmatched_leaves_that_match_their_schema() {
    let svc = service(&[]);
    let lease = login_as(&svc, "f-1", "up").await;
    login_as(&svc, "f-2", "draining").await;
    let mut feed = Sse::open(&svc, "/presence/watch?status=up", &[]).await;
    let snapshot = feed.next_valid("snapshot").await;
    assert_eq!(snapshot.data["nodes"].as_array().map(Vec::len), Some(1));
    expect(
        &svc,
        "/presence/heartbeat",
        post(
            "/presence/heartbeat",
            &json!({"node_id": "f-1", "lease_id": lease, "status": "degraded"}),
        ),
        200,
    )
    .await;
    let leave = feed.next_valid("leave").await;
    assert_eq!(leave.data, json!({"node_id": "f-1", "reason": "unmatched"}));
}

/// Every metric family `GET /metrics` serves is in the document's table of
/// `/metrics` (by its full name), and the table names no metric the server lacks.
#[tokio::test]
async fn the_metrics_table_lists_exactly_the_metrics_served() {
    let svc = service(&[]);
    // A request first: the request counter's family appears with its first sample.
    assert_eq!(send(&svc, get("/healthz")).await.status, 200);
    let reply = send(&svc, get("/metrics")).await;
    assert_eq!(reply.status, 200);
    let text = String::from_utf8(reply.body.to_vec()).expect("metrics are text");
    let served: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let (name, kind) = (words.next()?, words.next()?);
            // OpenMetrics names a counter family without its `_total`.
            Some(match kind {
                "counter" => format!("{name}_total"),
                _ => name.to_owned(),
            })
        })
        .filter(|name| name.starts_with("presence_"))
        .collect();
    let description = path_item("/metrics")["get"]["description"]
        .as_str()
        .expect("/metrics has a description");
    let documented: BTreeSet<String> = description
        .lines()
        .filter_map(|l| l.trim().strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .filter(|name| name.starts_with("presence_"))
        .map(str::to_owned)
        .collect();
    assert!(!served.is_empty(), "no presence metrics served:\n{text}");
    assert_eq!(served, documented, "served vs documented metrics");
}
