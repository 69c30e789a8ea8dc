//! Slow readers: a response being written keeps its connection open for as long as
//! the client keeps reading, over HTTP/1 and HTTP/2, however much longer than the
//! idle (header) timeout that takes; a client that stops reading is cut off after the
//! write-stall timeout.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use presence::config::Config;
use presence::model::Meta;
use support::server::{memory_store_with_nodes, TestServer};
use support::{unlimited_config, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Nodes with about 4 KB of meta each: a listing of about 8 MB, more than the
/// kernel's socket buffers hold, so the server cannot hand it all to the kernel at
/// once and must keep writing while the client reads.
const NODES: usize = 2000;

async fn server_with_big_listing(write_stall: Duration) -> (TestServer, Config) {
    let mut meta = Meta::new();
    meta.insert("blob".into(), "x".repeat(4000).into());
    let store = memory_store_with_nodes(NODES, &meta).await;
    let mut cfg = unlimited_config(Duration::from_secs(5));
    cfg.header_timeout = Duration::from_millis(300);
    cfg.write_stall_timeout = write_stall;
    let server = TestServer::start(&cfg, store).await;
    (server, cfg)
}

/// A client socket with a small receive buffer, so that what it does not read stays
/// on the server's side.
async fn small_window_connect(server: &TestServer) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    socket.connect(server.addr).await.unwrap()
}

/// The `Content-Length` of a response head.
fn content_length(head: &str) -> usize {
    head.lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .expect("a Content-Length")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_slow_reader_gets_the_whole_listing_past_the_idle_timeout() {
    let (server, cfg) = server_with_big_listing(Duration::from_secs(5)).await;
    let mut stream = small_window_connect(&server).await;
    stream
        .write_all(b"GET /presence HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let mut received = Vec::new();
    let mut chunk = vec![0u8; 32 * 1024];
    let body_len = within(60, async {
        let mut head_end = None;
        loop {
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed after {} bytes", received.len());
            received.extend_from_slice(&chunk[..n]);
            if head_end.is_none() {
                head_end = received
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .map(|p| p + 4);
            }
            if let Some(end) = head_end {
                let len = content_length(&String::from_utf8_lossy(&received[..end]));
                if received.len() - end >= len {
                    return len;
                }
            }
            // About 3 MB/s: several seconds for the listing.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(body_len > 7_000_000, "listing of {body_len} bytes");
    assert!(
        started.elapsed() > cfg.header_timeout * 3,
        "the read took {:?}, not longer than the idle timeout: the test proves nothing",
        started.elapsed()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_slow_reader_gets_the_whole_listing_past_the_idle_timeout() {
    let (server, cfg) = server_with_big_listing(Duration::from_secs(5)).await;
    let stream = small_window_connect(&server).await;
    // The spec's smallest windows, not hyper's generous defaults: the server may send
    // only as much as this client has read.
    let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .adaptive_window(false)
        .handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(format!("http://{}/presence", server.addr))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let started = tokio::time::Instant::now();
    let res = send.send_request(req).await.unwrap();
    assert_eq!(res.status(), 200);
    let expected: usize = res
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .expect("a Content-Length");
    let mut body = res.into_body();
    let mut read = 0usize;
    let mut paused_at = 0usize;
    within(60, async {
        while let Some(frame) = body.frame().await {
            let frame = frame.unwrap_or_else(|e| panic!("stream cut after {read} bytes: {e}"));
            if let Ok(data) = frame.into_data() {
                read += data.len();
            }
            // A pause per window's worth (frames come as small as the window
            // updates): about 3 MB/s, several seconds for the listing.
            if read >= paused_at + 32 * 1024 {
                paused_at = read;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    })
    .await;
    assert_eq!(read, expected, "the whole listing");
    assert!(
        started.elapsed() > cfg.header_timeout * 3,
        "the read took {:?}: the test proves nothing",
        started.elapsed()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stops_reading_is_cut_off_after_the_write_stall_timeout() {
    let stall = Duration::from_millis(500);
    let (server, _cfg) = server_with_big_listing(stall).await;
    let mut stream = small_window_connect(&server).await;
    stream
        .write_all(b"GET /presence HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    // Read nothing for three times the stall timeout, then drain what the kernel
    // buffered: the connection must have been closed, the listing unfinished.
    tokio::time::sleep(stall * 3).await;
    let mut received = Vec::new();
    let n = within(10, stream.read_to_end(&mut received))
        .await
        .unwrap_or(0);
    assert!(n < 7_000_000, "read {n} bytes: the server did not give up");
    server.stop().await;
}
