//! The tower-http layers at the edge of the server, over real sockets: a panicking
//! handler is a `500` JSON error and the connection and process carry on; listings
//! are compressed when the client asks; `x-request-id` is set or propagated; CORS
//! answers only for the configured origins.

mod support;

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use presence::model::Meta;
use presence::store::FaultyStore;
use support::client::{http, Reply};
use support::server::{memory_store_with_nodes, TestServer};
use support::{config, within};
use tokio::net::TcpStream;

/// One HTTP/1 connection, for several requests in a row.
async fn connection(server: &TestServer) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let stream = TcpStream::connect(server.addr).await.unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

async fn get_on(
    send: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    path: &str,
    headers: &[(&str, &str)],
) -> (http::response::Parts, Bytes) {
    let mut req = http::Request::get(path).header("host", "t");
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    send.ready().await.unwrap();
    let res = send
        .send_request(req.body(Empty::new()).unwrap())
        .await
        .unwrap();
    let (parts, body) = res.into_parts();
    (parts, body.collect().await.unwrap().to_bytes())
}

#[tokio::test]
async fn a_panicking_handler_is_a_500_and_the_connection_and_process_survive() {
    let server = TestServer::start(&config(&[]), Arc::new(FaultyStore::panicking())).await;
    within(10, async {
        let mut send = connection(&server).await;
        let (parts, body) = get_on(&mut send, "/presence/n-1", &[]).await;
        assert_eq!(parts.status, 500);
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["error"], "internal", "{json}");
        assert_eq!(
            json["message"], "internal server error",
            "no panic text leaks"
        );
        // The same connection serves the next request.
        let (parts, _) = get_on(&mut send, "/healthz", &[]).await;
        assert_eq!(parts.status, 200);
        // And so does the process, again and again.
        for _ in 0..3 {
            let (parts, _) = get_on(&mut send, "/presence", &[]).await;
            assert_eq!(parts.status, 500);
        }
        let reply = Reply::send(http().get(server.url("/healthz"))).await;
        assert_eq!(reply.status, 200);
    })
    .await;
    server.stop().await;
}

async fn server_with_listing(nodes: usize) -> TestServer {
    let mut meta = Meta::new();
    meta.insert("load".into(), 0.5.into());
    meta.insert("hp".into(), 90.into());
    let store = memory_store_with_nodes(nodes, &meta).await;
    TestServer::start(&config(&[]), store).await
}

#[tokio::test]
async fn listings_are_compressed_when_the_client_asks() {
    let server = server_with_listing(500).await;
    within(20, async {
        let mut send = connection(&server).await;
        let (plain_parts, plain) = get_on(&mut send, "/presence", &[]).await;
        assert_eq!(plain_parts.status, 200);
        assert!(plain_parts.headers.get("content-encoding").is_none());
        assert!(plain.len() > 10_000);
        for encoding in ["gzip", "br", "zstd"] {
            let (parts, body) =
                get_on(&mut send, "/presence", &[("accept-encoding", encoding)]).await;
            assert_eq!(parts.status, 200, "{encoding}");
            assert_eq!(
                parts
                    .headers
                    .get("content-encoding")
                    .and_then(|v| v.to_str().ok()),
                Some(encoding)
            );
            assert!(
                body.len() * 4 < plain.len(),
                "{encoding}: {} bytes compressed vs {} plain",
                body.len(),
                plain.len()
            );
        }
        // Small answers are sent as they are.
        let (parts, _) = get_on(&mut send, "/healthz", &[("accept-encoding", "gzip")]).await;
        assert!(parts.headers.get("content-encoding").is_none());
    })
    .await;
    // A client that decodes gets the same listing.
    let decoding = reqwest::Client::builder()
        .no_proxy()
        .gzip(true)
        .build()
        .unwrap();
    let decoded = Reply::send(decoding.get(server.url("/presence"))).await;
    let plain = Reply::send(http().get(server.url("/presence"))).await;
    assert_eq!(decoded.json(), plain.json());
    server.stop().await;
}

#[tokio::test]
async fn request_ids_are_set_or_propagated() {
    let server = TestServer::memory(&config(&[])).await;
    within(10, async {
        let mut send = connection(&server).await;
        let (a, _) = get_on(&mut send, "/healthz", &[]).await;
        let (b, _) = get_on(&mut send, "/presence/nobody", &[]).await;
        let id = |p: &http::response::Parts| {
            p.headers
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
                .expect("an x-request-id")
        };
        assert_ne!(id(&a), id(&b), "each request its own id");
        let (c, _) = get_on(&mut send, "/healthz", &[("x-request-id", "trace-42")]).await;
        assert_eq!(id(&c), "trace-42", "the client's id is kept");
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn cors_answers_only_for_the_configured_origins() {
    let server = TestServer::memory(&config(&[(
        "PRESENCE_CORS_ORIGINS",
        "https://ops.example.com",
    )]))
    .await;
    let client = http();
    let preflight = Reply::send(
        client
            .request(reqwest::Method::OPTIONS, server.url("/presence/login"))
            .header("origin", "https://ops.example.com")
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type",
            ),
    )
    .await;
    assert_eq!(preflight.status, 200, "{preflight:?}");
    assert_eq!(
        preflight.header("access-control-allow-origin"),
        Some("https://ops.example.com")
    );
    let allowed = Reply::send(
        client
            .get(server.url("/presence"))
            .header("origin", "https://ops.example.com"),
    )
    .await;
    assert_eq!(
        allowed.header("access-control-allow-origin"),
        Some("https://ops.example.com")
    );
    let other = Reply::send(
        client
            .get(server.url("/presence"))
            .header("origin", "https://evil.example.net"),
    )
    .await;
    assert_eq!(other.status, 200);
    assert_eq!(other.header("access-control-allow-origin"), None);
    server.stop().await;

    // Without PRESENCE_CORS_ORIGINS: no CORS at all.
    let server = TestServer::memory(&config(&[])).await;
    let reply = Reply::send(
        client
            .get(server.url("/presence"))
            .header("origin", "https://ops.example.com"),
    )
    .await;
    assert_eq!(reply.header("access-control-allow-origin"), None);
    let preflight = Reply::send(
        client
            .request(reqwest::Method::OPTIONS, server.url("/presence/login"))
            .header("origin", "https://ops.example.com")
            .header("access-control-request-method", "POST"),
    )
    .await;
    assert_eq!(preflight.status, 405, "{preflight:?}");
    server.stop().await;
}
