//! The HTTP client side: a reqwest client that never goes through a proxy, and
//! replies read completely into status + headers + body + how long they took.

use std::future::Future;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderMap;
use serde_json::Value;

use super::server::TestServer;
use super::within;

/// A reqwest client that ignores `HTTP_PROXY` & co. (they would swallow 127.0.0.1),
/// keeps up to 64 idle connections per host and gives up on a request after 10 s.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(64)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap_or_else(|e| panic!("reqwest client: {e}"))
}

/// Like [`http`], speaking HTTP/2 from the first byte (prior knowledge, `h2c`).
pub fn http2() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap_or_else(|e| panic!("reqwest HTTP/2 client: {e}"))
}

/// A response, read completely.
#[derive(Debug)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Headers.
    pub headers: HeaderMap,
    /// The body as it arrived ([`text`](Self::text), [`json`](Self::json) decode it).
    pub body: Bytes,
    /// From sending the request to the last byte of the body.
    pub elapsed: Duration,
}

impl Reply {
    /// Sends `req` and reads the whole reply (bounded, timed). Transport errors panic:
    /// the server must always answer.
    pub async fn send(req: reqwest::RequestBuilder) -> Reply {
        within(15, async {
            let started = Instant::now();
            let res = req
                .send()
                .await
                .unwrap_or_else(|e| panic!("request failed: {e}"));
            let status = res.status().as_u16();
            let headers = res.headers().clone();
            let body = res
                .bytes()
                .await
                .unwrap_or_else(|e| panic!("reading the body failed: {e}"));
            Reply {
                status,
                headers,
                body,
                elapsed: started.elapsed(),
            }
        })
        .await
    }

    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics if it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }

    /// `body["error"]` as a string (empty if the body is not JSON or has none).
    pub fn error_code(&self) -> String {
        serde_json::from_slice::<Value>(&self.body)
            .ok()
            .and_then(|body| body["error"].as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    /// Asserts a `200` JSON reply and returns its body.
    pub fn ok_json(&self) -> Value {
        assert_eq!(self.status, 200, "expected 200, got {self:?}");
        self.assert_json_content_type();
        self.json()
    }

    fn assert_json_content_type(&self) {
        let ct = self.header("content-type").unwrap_or_default();
        assert!(
            ct.starts_with("application/json"),
            "Content-Type {ct:?} is not JSON in {self:?}"
        );
    }

    /// Asserts the API's error shape: `status`, JSON content type, a body that is
    /// exactly `{"error": code, "message": <non-empty sentence>}`. Returns the message.
    pub fn assert_error(&self, status: u16, code: &str) -> String {
        assert_eq!(
            self.status, status,
            "expected {status} {code}, got {self:?}"
        );
        self.assert_json_content_type();
        let body = self.json();
        let obj = body
            .as_object()
            .unwrap_or_else(|| panic!("error body is not an object: {body}"));
        let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["error", "message"], "error body fields in {body}");
        assert_eq!(obj["error"], code, "error code in {body}");
        let message = obj["message"]
            .as_str()
            .unwrap_or_else(|| panic!("message is not a string in {body}"));
        assert!(!message.trim().is_empty(), "empty message in {body}");
        message.to_owned()
    }

    /// Asserts a `503 store_unavailable` with a `Retry-After` of whole seconds >= 1;
    /// `what` names the request in the failure messages.
    pub fn assert_store_unavailable(&self, what: &str) {
        assert_eq!(self.status, 503, "{what}: {self:?}");
        assert_eq!(self.error_code(), "store_unavailable", "{what}: {self:?}");
        let secs: u64 = self
            .header("retry-after")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{what}: Retry-After missing or not whole seconds"));
        assert!(secs >= 1, "{what}: Retry-After {secs}");
    }

    /// `Retry-After` as whole seconds; asserts it is present, numeric and at least 1.
    pub fn retry_after_secs(&self) -> u64 {
        let value = self
            .header("retry-after")
            .unwrap_or_else(|| panic!("no Retry-After in {self:?}"));
        let secs: u64 = value
            .parse()
            .unwrap_or_else(|_| panic!("Retry-After {value:?} is not whole seconds"));
        assert!(secs >= 1, "Retry-After must never be 0");
        secs
    }
}

/// `GET url` on a fresh [`http`] client.
pub async fn get(url: &str) -> Reply {
    get_with(&http(), url).await
}

/// `POST url` on a fresh [`http`] client, with a raw body sent as `application/json`
/// (it need not be valid JSON).
pub async fn post_json(url: &str, body: impl Into<String>) -> Reply {
    Reply::send(
        http()
            .post(url)
            .header("content-type", "application/json")
            .body(body.into()),
    )
    .await
}

/// `GET url` on `client` (its connection pool). The request is built before the
/// future, which borrows nothing: it can be spawned or joined.
pub fn get_with(
    client: &reqwest::Client,
    url: &str,
) -> impl Future<Output = Reply> + Send + 'static {
    Reply::send(client.get(url))
}

/// `POST url` on `client` with `body` as JSON. The future borrows nothing.
pub fn post_with(
    client: &reqwest::Client,
    url: &str,
    body: &Value,
) -> impl Future<Output = Reply> + Send + 'static {
    Reply::send(
        client
            .post(url)
            .header("content-type", "application/json")
            .body(body.to_string()),
    )
}

/// Logs `node` in over HTTP and returns the login reply.
pub async fn login(server: &TestServer, node: &str) -> Value {
    post_json(
        &server.url("/presence/login"),
        serde_json::json!({ "node_id": node }).to_string(),
    )
    .await
    .ok_json()
}
