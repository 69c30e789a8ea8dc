//! Slow and idle clients against a real server socket (in-memory store):
//! `PRESENCE_HEADER_TIMEOUT_MS` closes connections that send half a request header,
//! trickle it, or send nothing; `PRESENCE_REQUEST_TIMEOUT_MS` answers a trickled body
//! with `408`; and 500 such connections hanging at once do not stop other clients
//! from being served.

mod support;

use std::time::{Duration, Instant};

use support::client::{get_with, http, http2};
use support::raw_http::read_to_close;
use support::server::TestServer;
use support::{unlimited_config, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HEADER_TIMEOUT: Duration = Duration::from_millis(1000);
const REQUEST_TIMEOUT: Duration = Duration::from_millis(1500);
/// Slack for timers and scheduling on a loaded 2-core CI machine.
const SLACK: Duration = Duration::from_millis(750);

async fn server() -> TestServer {
    let mut cfg = unlimited_config(Duration::from_secs(1));
    cfg.header_timeout = HEADER_TIMEOUT;
    cfg.request_timeout = REQUEST_TIMEOUT;
    TestServer::memory(&cfg).await
}

const HALF_HEADER: &[u8] = b"GET /presence HTTP/1.1\r\nHost: presence.test\r\nUser-Agent: slow";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_a_header_is_closed_within_the_header_timeout() {
    within(10, async {
        let server = server().await;
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        stream.write_all(HALF_HEADER).await.unwrap();
        let sent = Instant::now();
        let reply = read_to_close(&mut stream).await;
        let closed_after = sent.elapsed();
        assert!(
            closed_after <= HEADER_TIMEOUT + SLACK,
            "closed after {closed_after:?} (header timeout {HEADER_TIMEOUT:?})"
        );
        assert!(
            closed_after >= HEADER_TIMEOUT - Duration::from_millis(100),
            "closed too early: {closed_after:?}"
        );
        // hyper may answer 408 before closing; anything else would be a bug.
        let text = String::from_utf8_lossy(&reply);
        assert!(
            reply.is_empty() || text.starts_with("HTTP/1.1 408"),
            "unexpected reply {text:?}"
        );
        println!(
            "half a header: closed {closed_after:?} after it was sent (timeout {HEADER_TIMEOUT:?})"
        );
        server.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_header_does_not_extend_the_timeout() {
    within(10, async {
        let server = server().await;
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        let started = Instant::now();
        let (mut read, mut write) = stream.split();
        // One byte every 50 ms, forever: the timeout is for the whole header.
        let trickle = async {
            for b in HALF_HEADER.iter().cycle() {
                if write.write_all(&[*b]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let closed = async {
            let mut buf = [0u8; 1024];
            while matches!(read.read(&mut buf).await, Ok(n) if n > 0) {}
        };
        tokio::select! {
            () = closed => {}
            () = trickle => {}
        }
        let closed_after = started.elapsed();
        assert!(
            closed_after <= HEADER_TIMEOUT + SLACK,
            "a trickled header held the connection {closed_after:?}"
        );
        println!("trickled header: closed after {closed_after:?}");
        server.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_closed_within_the_header_timeout() {
    within(10, async {
        let server = server().await;
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        let started = Instant::now();
        let reply = read_to_close(&mut stream).await;
        let closed_after = started.elapsed();
        assert!(reply.is_empty(), "{reply:?}");
        assert!(
            closed_after <= HEADER_TIMEOUT + SLACK,
            "silent connection held {closed_after:?}"
        );
        println!("silent connection: closed after {closed_after:?}");
        server.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_body_gets_408_within_the_request_timeout() {
    within(10, async {
        let server = server().await;
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        let head = "POST /presence/login HTTP/1.1\r\nHost: presence.test\r\n\
                    Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"node_id\":";
        stream.write_all(head.as_bytes()).await.unwrap();
        let sent = Instant::now();
        let mut buf = vec![0u8; 4096];
        let n = stream.read(&mut buf).await.unwrap_or(0);
        let answered_after = sent.elapsed();
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(text.starts_with("HTTP/1.1 408"), "{text:?}");
        assert!(text.contains("\"error\":\"request_timeout\""), "{text:?}");
        assert!(
            answered_after <= REQUEST_TIMEOUT + SLACK
                && answered_after >= REQUEST_TIMEOUT - Duration::from_millis(100),
            "408 after {answered_after:?} (request timeout {REQUEST_TIMEOUT:?})"
        );
        println!("trickled body: 408 after {answered_after:?}");
        server.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_hanging_connections_do_not_stop_other_clients() {
    within(15, async {
        let server = server().await;
        let mut hanging = Vec::new();
        for _ in 0..500 {
            let mut stream = TcpStream::connect(server.addr).await.unwrap();
            stream.write_all(HALF_HEADER).await.unwrap();
            hanging.push((Instant::now(), stream));
        }

        // Meanwhile other clients are served, promptly.
        let client = http();
        let mut slowest = Duration::ZERO;
        for i in 0..50 {
            let reply = if i % 2 == 0 {
                get_with(&client, &server.url("/presence")).await
            } else {
                get_with(&client, &server.url("/healthz")).await
            };
            assert_eq!(reply.status, 200, "{reply:?}");
            slowest = slowest.max(reply.elapsed);
        }
        assert!(
            slowest < Duration::from_millis(500),
            "with 500 hanging connections a request took {slowest:?}"
        );

        // And every hanging connection is closed by the server within the timeout.
        let closes = hanging.into_iter().map(|(sent, mut stream)| async move {
            read_to_close(&mut stream).await;
            sent.elapsed()
        });
        let closed = futures_util::future::join_all(closes).await;
        let latest = closed.iter().max().copied().unwrap_or_default();
        assert!(
            latest <= HEADER_TIMEOUT + SLACK,
            "a hanging connection was closed only after {latest:?}"
        );
        println!(
            "500 hanging connections: others served (slowest of 50 requests {slowest:?}); \
             all 500 closed within {latest:?} of their half header"
        );
        server.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_and_so_is_a_stalled_second_request() {
    within(10, async {
        let server = server().await;
        for second in [&b""[..], HALF_HEADER] {
            let mut stream = TcpStream::connect(server.addr).await.unwrap();
            stream
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: presence.test\r\n\r\n")
                .await
                .unwrap();
            let mut buf = vec![0u8; 4096];
            let n = stream.read(&mut buf).await.unwrap();
            assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
            stream.write_all(second).await.unwrap();
            let idle_from = Instant::now();
            read_to_close(&mut stream).await;
            let closed_after = idle_from.elapsed();
            assert!(
                closed_after <= HEADER_TIMEOUT + SLACK,
                "keep-alive connection (then {:?}) held {closed_after:?}",
                String::from_utf8_lossy(second)
            );
            println!(
                "keep-alive connection then {} bytes of a second request: closed after {closed_after:?}",
                second.len()
            );
        }
        server.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_that_stalls_is_closed() {
    within(10, async {
        let server = server().await;
        // The HTTP/2 preface, then silence: no SETTINGS, no request.
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        stream
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        let sent = Instant::now();
        read_to_close(&mut stream).await;
        let closed_after = sent.elapsed();
        // Idle for the header timeout, then half a second to close gracefully (which a
        // handshake that never finishes cannot), then dropped.
        assert!(
            closed_after <= HEADER_TIMEOUT + Duration::from_millis(500) + SLACK,
            "stalled HTTP/2 connection held {closed_after:?}"
        );
        println!("stalled HTTP/2 connection: closed after {closed_after:?}");
        server.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_clients_are_served_concurrently() {
    within(10, async {
        let server = server().await;
        let client = http2();
        let replies = futures_util::future::join_all(
            (0..20).map(|_| client.get(server.url("/presence")).send()),
        )
        .await;
        for reply in replies {
            let reply = reply.expect("an HTTP/2 answer");
            assert_eq!(reply.version(), reqwest::Version::HTTP_2);
            assert_eq!(reply.status(), 200);
        }
        server.stop().await;
    })
    .await;
}
