//! The HTTP edges a probing client finds, over real sockets: `Forwarded` from a
//! trusted proxy, `HEAD`, header and stream and connection caps, percent-encoded
//! node ids, errors hyper raises before the service runs, and loose content
//! handling (charsets, duplicate `Content-Type`, transfer codings).

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::client::{http, http2, login, Reply};
use support::raw_http::{parse_http_response, raw_request, read_to_close};
use support::server::TestServer;
use support::{config, within};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

async fn memory_server(vars: &[(&str, &str)]) -> TestServer {
    TestServer::memory(&config(vars)).await
}

/// A `GET /presence` from 127.0.0.1 with one extra header line.
async fn list_with(server: &TestServer, header: &str) -> u16 {
    let req = format!("GET /presence HTTP/1.1\r\nHost: t\r\n{header}\r\nConnection: close\r\n\r\n");
    raw_request(server.addr, req.as_bytes()).await.status
}

#[tokio::test]
async fn forwarded_from_a_trusted_proxy_keys_the_rate_limit_by_client() {
    let server = memory_server(&[
        ("PRESENCE_TRUSTED_PROXIES", "127.0.0.1/32"),
        ("PRESENCE_RATE_LIMIT_RATE", "0.001"),
        ("PRESENCE_RATE_LIMIT_CAPACITY", "2"),
    ])
    .await;
    for (what, header) in [
        ("plain", "Forwarded: for=5.6.0.2"),
        ("quoted", "Forwarded: for=\"5.6.0.3\""),
        ("with proto", "Forwarded: for=5.6.0.4;proto=https"),
        ("For=", "Forwarded: For=5.6.0.5"),
        ("IPv6 with port", "Forwarded: for=\"[2001:db8::5]:80\""),
        ("X-Forwarded-For", "X-Forwarded-For: 5.6.0.6"),
    ] {
        // Each client has its own bucket of two.
        assert_eq!(list_with(&server, header).await, 200, "{what}");
        assert_eq!(list_with(&server, header).await, 200, "{what}");
        assert_eq!(
            list_with(&server, header).await,
            429,
            "{what}: its own bucket is empty"
        );
    }
    // A malformed header is not believed: the proxy's own bucket (fresh so far).
    assert_eq!(list_with(&server, "X-Forwarded-For: 5.6.0.7, ").await, 200);
    assert_eq!(list_with(&server, "X-Forwarded-For: 5.6.0.8, ").await, 200);
    assert_eq!(
        list_with(&server, "X-Forwarded-For: 5.6.0.9, ").await,
        429,
        "an empty last entry keys on the proxy, whatever the client wrote"
    );
    server.stop().await;
}

#[tokio::test]
async fn head_is_served_wherever_get_is() {
    let server = memory_server(&[]).await;
    login(&server, "n-1").await;
    for path in [
        "/healthz",
        "/readyz",
        "/metrics",
        "/presence",
        "/presence/n-1",
    ] {
        let req = format!("HEAD {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        let reply = raw_request(server.addr, req.as_bytes()).await;
        assert_eq!(reply.status, 200, "HEAD {path}: {reply:?}");
        assert!(reply.body.is_empty(), "HEAD {path} has no body: {reply:?}");
        let len: usize = reply
            .headers
            .get("content-length")
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or_else(|| panic!("HEAD {path} has a Content-Length: {reply:?}"));
        assert!(len > 0, "HEAD {path}: the GET body's length");
    }
    // HTTP/2 too.
    let reply = Reply::send(http2().head(server.url("/healthz"))).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    // A method nobody serves still says what is allowed.
    let reply = Reply::send(http().delete(server.url("/healthz"))).await;
    assert_eq!(reply.status, 405);
    assert_eq!(reply.header("allow"), Some("GET, HEAD"));
    server.stop().await;
}

#[tokio::test]
async fn oversized_request_heads_are_refused_with_431() {
    let server = memory_server(&[("PRESENCE_MAX_HEADER_BYTES", "16384")]).await;
    let big = "a".repeat(20_000);
    let req =
        format!("GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: {big}\r\nConnection: close\r\n\r\n");
    let reply = raw_request(server.addr, req.as_bytes()).await;
    assert_eq!(reply.status, 431, "{reply:?}");
    // Under the cap is fine.
    let ok = "a".repeat(8_000);
    let req =
        format!("GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: {ok}\r\nConnection: close\r\n\r\n");
    assert_eq!(raw_request(server.addr, req.as_bytes()).await.status, 200);
    server.stop().await;
}

#[tokio::test]
async fn http2_connections_advertise_the_stream_and_header_caps() {
    let server = memory_server(&[
        ("PRESENCE_MAX_STREAMS_PER_CONNECTION", "7"),
        ("PRESENCE_MAX_HEADER_BYTES", "20000"),
    ])
    .await;
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let (mut client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    // The server's SETTINGS arrive with the first exchange.
    let req = http::Request::get(server.url("/healthz")).body(()).unwrap();
    client = within(5, client.ready()).await.unwrap();
    let (response, _) = client.send_request(req, true).unwrap();
    let response = within(5, response).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(client.current_max_send_streams(), 7);
    server.stop().await;
}

/// A connection that has sent half a request head, and holds its slot.
async fn half_request(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
    s
}

/// Finishes the request of [`half_request`] and reads the status code.
async fn finish_request(mut s: TcpStream) -> u16 {
    s.write_all(b"Host: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    parse_http_response(&read_to_close(&mut s).await).status
}

#[tokio::test]
async fn connections_past_the_cap_wait_while_open_ones_are_served() {
    let server = memory_server(&[
        ("PRESENCE_MAX_CONNECTIONS", "2"),
        ("PRESENCE_HEADER_TIMEOUT_MS", "20000"),
    ])
    .await;
    let first = half_request(server.addr).await;
    let second = half_request(server.addr).await;
    // Both are being served before the third arrives.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let addr = server.addr;
    let waiting = tokio::spawn(async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        String::from_utf8_lossy(&read_to_close(&mut s).await).into_owned()
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "a third connection was served past the cap of 2"
    );
    // Open connections keep being served at the cap.
    assert_eq!(within(5, finish_request(first)).await, 200);
    // That closed one: the waiting connection gets its slot.
    let answer = within(5, waiting).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert_eq!(within(5, finish_request(second)).await, 200);
    server.stop().await;
}

#[tokio::test]
async fn percent_encoded_node_ids_are_decoded_then_validated() {
    let server = memory_server(&[]).await;
    login(&server, "svc@host:7000").await;
    let reply = Reply::send(http().get(server.url("/presence/svc%40host%3A7000"))).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.json()["node_id"], "svc@host:7000");
    for bad in [
        "/presence/a%2Fb",
        "/presence/a%20b",
        "/presence/%C3%A9",
        "/presence/%FF",
    ] {
        let reply = Reply::send(http().get(server.url(bad))).await;
        reply.assert_error(422, "invalid_node_id");
    }
    server.stop().await;
}

#[tokio::test]
async fn errors_hyper_raises_before_the_service_are_plain_status_lines() {
    // Documented in docs/http-api.md ("Errors raised before the service runs"):
    // hyper answers these itself, with no body, and closes the connection.
    let server = memory_server(&[]).await;
    for (what, raw, status) in [
        (
            "two different Content-Lengths",
            &b"POST /presence/login HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}"[..],
            400,
        ),
        ("malformed request line", b"GET\r\n\r\n", 400),
        (
            "obs-fold",
            b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-A: a\r\n b\r\n\r\n",
            400,
        ),
    ] {
        let reply = raw_request(server.addr, raw).await;
        assert_eq!(reply.status, status, "{what}: {reply:?}");
        assert!(reply.body.is_empty(), "{what}: {reply:?}");
    }
    server.stop().await;
}

async fn post_raw(server: &TestServer, headers: &str, body: &str) -> Reply {
    let req = format!(
        "POST /presence/login HTTP/1.1\r\nHost: t\r\n{headers}Connection: close\r\n\r\n{body}"
    );
    raw_request(server.addr, req.as_bytes()).await
}

#[tokio::test]
async fn only_one_utf8_json_content_type_and_no_transfer_coding_but_chunked() {
    let server = memory_server(&[]).await;
    let body = r#"{"node_id":"n-1"}"#;
    let len = format!("Content-Length: {}\r\n", body.len());
    for (what, headers) in [
        (
            "UTF-16 charset",
            format!("Content-Type: application/json; charset=utf-16\r\n{len}"),
        ),
        (
            "two Content-Types",
            format!("Content-Type: application/json\r\nContent-Type: text/plain\r\n{len}"),
        ),
    ] {
        let reply = post_raw(&server, &headers, body).await;
        let message = reply.assert_error(415, "unsupported_media_type");
        assert!(!message.is_empty(), "{what}");
    }
    // gzip, chunked: hyper removes the chunking; the gzip would be read as JSON.
    let chunked = format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len());
    let reply = post_raw(
        &server,
        "Content-Type: application/json\r\nTransfer-Encoding: gzip, chunked\r\n",
        &chunked,
    )
    .await;
    let message = reply.assert_error(415, "unsupported_media_type");
    assert!(message.contains("chunked"), "{message}");
    // The accepted forms.
    for headers in [
        "Content-Type: application/json; charset=UTF-8\r\nTransfer-Encoding: chunked\r\n",
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n",
    ] {
        let reply = post_raw(&server, headers, &chunked).await;
        assert_eq!(reply.status, 200, "{headers}: {reply:?}");
    }
    server.stop().await;
}
