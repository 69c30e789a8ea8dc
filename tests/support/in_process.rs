//! Requests to a [`PresenceService`] called in-process with
//! `tower::ServiceExt::oneshot`: the whole HTTP stack above hyper, without a socket.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use presence::server::PresenceService;
use serde_json::Value;
use tower::ServiceExt;

/// One request: method, path, an optional JSON body, extra headers and the peer
/// address the connection would have had.
pub struct ServiceRequest<'a> {
    method: &'a str,
    path: &'a str,
    body: Option<Value>,
    headers: Vec<(&'a str, String)>,
    peer: Option<SocketAddr>,
}

impl<'a> ServiceRequest<'a> {
    /// `method path`, no body, no headers, the service's default peer.
    pub fn new(method: &'a str, path: &'a str) -> Self {
        ServiceRequest {
            method,
            path,
            body: None,
            headers: Vec::new(),
            peer: None,
        }
    }

    /// `body` as `application/json`.
    pub fn json(mut self, body: Value) -> Self {
        self.body = Some(body);
        self
    }

    /// One more header.
    pub fn header(mut self, name: &'a str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// The connection's peer address, e.g. `"203.0.113.5:1000"`.
    pub fn peer(mut self, peer: &str) -> Self {
        self.peer = Some(peer.parse().expect("socket address"));
        self
    }

    /// Calls `service`; the status, the headers and the body as JSON (`Null` if it
    /// is not JSON).
    pub async fn send(self, service: &PresenceService) -> (u16, http::HeaderMap, Value) {
        let mut req = http::Request::builder().method(self.method).uri(self.path);
        if self.body.is_some() {
            req = req.header("content-type", "application/json");
        }
        for (name, value) in &self.headers {
            req = req.header(*name, value.as_str());
        }
        let body = self.body.map(|b| b.to_string()).unwrap_or_default();
        let mut req = req.body(Full::new(Bytes::from(body))).expect("request");
        if let Some(peer) = self.peer {
            req.extensions_mut().insert(peer);
        }
        let res = service.clone().oneshot(req).await.expect("infallible");
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let bytes = res.into_body().collect().await.expect("body").to_bytes();
        (
            status,
            headers,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }
}

/// `method path` with an optional JSON body: the status and the body as JSON
/// (`Null` if it is not JSON).
pub async fn call(
    service: &PresenceService,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = ServiceRequest::new(method, path);
    req.body = body;
    let (status, _, body) = req.send(service).await;
    (status, body)
}
