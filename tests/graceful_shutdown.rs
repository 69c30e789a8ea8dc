//! Graceful shutdown of the real `presence_server` binary (`target/debug/examples/`,
//! built by `cargo test`; skipped with a reason when it is missing): SIGTERM in the
//! middle of a stream of requests cuts no response off, requests in flight at the
//! signal are answered in full, and the process exits 0 within
//! `PRESENCE_SHUTDOWN_GRACE_MS`, even when a request never finishes.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::client::http;
use support::process::{clean_command, example_binary_or_skip, parse_listen_addr, ChildGuard};
use support::raw_http::{parse_http_response, read_to_close};
use support::within;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const GRACE: Duration = Duration::from_millis(3000);

/// The `presence_server` example binary as a child process, and where it listens.
struct ServerProcess {
    child: ChildGuard,
    addr: SocketAddr,
}

impl ServerProcess {
    fn start(binary: &Path) -> ServerProcess {
        let mut cmd = clean_command(binary);
        cmd.env("PRESENCE_HTTP_HOST", "127.0.0.1")
            .env("PRESENCE_HTTP_PORT", "0")
            .env("PRESENCE_SHUTDOWN_GRACE_MS", GRACE.as_millis().to_string())
            .env("PRESENCE_REQUEST_TIMEOUT_MS", "30000")
            .env("PRESENCE_RATE_LIMIT_RATE", "100000")
            .env("PRESENCE_RATE_LIMIT_CAPACITY", "100000");
        let child = ChildGuard::spawn(cmd).expect("spawn presence_server");
        let (addr, log) = child.find_line(Duration::from_secs(10), parse_listen_addr);
        let addr =
            addr.unwrap_or_else(|| panic!("the server logs its address within 10 s: {log:#?}"));
        ServerProcess { child, addr }
    }

    fn terminate(&self) {
        self.child.signal("TERM");
    }

    /// Waits for the exit, at most `limit`; the status and when it was seen, `None`
    /// if it did not exit.
    async fn wait(&mut self, limit: Duration) -> Option<(ExitStatus, Instant)> {
        let status = self.child.wait_exit(limit).await?;
        Some((status, Instant::now()))
    }
}

/// A login whose body is sent in two halves: the request is in flight in between.
struct HalfSentLogin {
    stream: TcpStream,
    rest: Vec<u8>,
}

impl HalfSentLogin {
    async fn start(addr: SocketAddr, node: &str) -> HalfSentLogin {
        let body = format!(r#"{{"node_id":"{node}"}}"#).into_bytes();
        let head = format!(
            "POST /presence/login HTTP/1.1\r\nHost: presence.test\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let half = body.len() / 2;
        stream.write_all(head.as_bytes()).await.expect("head");
        stream.write_all(&body[..half]).await.expect("half body");
        HalfSentLogin {
            stream,
            rest: body[half..].to_vec(),
        }
    }

    /// Sends the rest and reads the whole response; returns (status line, body).
    async fn finish(mut self) -> (String, serde_json::Value) {
        self.stream
            .write_all(&self.rest)
            .await
            .expect("rest of body");
        let raw = read_to_close(&mut self.stream).await;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let reply = parse_http_response(&raw);
        let length: usize = reply
            .header("content-length")
            .map(|v| v.parse().expect("numeric length"))
            .expect("Content-Length");
        assert_eq!(reply.body.len(), length, "the body is complete: {text:?}");
        let status = text.lines().next().unwrap_or_default().to_owned();
        (status, reply.json())
    }
}

#[derive(Default, Debug)]
struct StreamTally {
    complete: usize,
    refused_or_closed_before_response: usize,
    cut_off: Vec<String>,
}

/// Clients sending requests back to back until `stop`; every response is read in full.
fn request_stream(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    workers: usize,
) -> Vec<tokio::task::JoinHandle<StreamTally>> {
    (0..workers)
        .map(|w| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let client = http();
                let mut tally = StreamTally::default();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let req = if i % 2 == 0 {
                        client.get(format!("http://{addr}/presence"))
                    } else {
                        client
                            .post(format!("http://{addr}/presence/login"))
                            .header("content-type", "application/json")
                            .body(format!(r#"{{"node_id":"w{w}-{i}"}}"#))
                    };
                    match req.send().await {
                        Ok(res) => {
                            let status = res.status();
                            match res.bytes().await {
                                Ok(body)
                                    if serde_json::from_slice::<serde_json::Value>(&body)
                                        .is_ok() =>
                                {
                                    assert_eq!(status, 200);
                                    tally.complete += 1;
                                }
                                Ok(body) => tally.cut_off.push(format!("{status}: {body:?}")),
                                Err(e) => tally.cut_off.push(format!("{status}: {e}")),
                            }
                        }
                        // Refused (listener closed) or closed before any response byte:
                        // the request was not processed, and HTTP lets clients retry it.
                        Err(_) => {
                            tally.refused_or_closed_before_response += 1;
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                }
                tally
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_request_stream_cuts_nothing_off_and_exits_0() {
    let Some(binary) = example_binary_or_skip("presence_server") else {
        return;
    };
    within(20, async {
        let mut server = ServerProcess::start(&binary);
        let stop = Arc::new(AtomicBool::new(false));
        let stream = request_stream(server.addr, stop.clone(), 8);
        let mut in_flight = Vec::new();
        for i in 0..10 {
            in_flight.push(HalfSentLogin::start(server.addr, &format!("inflight-{i}")).await);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;

        server.terminate();
        let term_at = Instant::now();
        // The requests in flight at the signal finish after it, and are answered.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let answers =
            futures_util::future::join_all(in_flight.into_iter().map(HalfSentLogin::finish)).await;
        for (status, body) in &answers {
            assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
            assert_eq!(body["lease_id"].as_str().map(str::len), Some(32), "{body}");
        }

        let (status, exited_at) = server
            .wait(GRACE + Duration::from_secs(2))
            .await
            .expect("the server exits after SIGTERM");
        stop.store(true, Ordering::Relaxed);
        let mut total = StreamTally::default();
        for task in stream {
            let t = task.await.expect("stream worker");
            total.complete += t.complete;
            total.refused_or_closed_before_response += t.refused_or_closed_before_response;
            total.cut_off.extend(t.cut_off);
        }
        assert!(status.success(), "exit status {status}");
        assert!(
            total.cut_off.is_empty(),
            "responses cut off: {:?}",
            total.cut_off
        );
        assert!(total.complete > 50, "the stream ran: {total:?}");
        // The in-flight requests were completed 300 ms after the signal on purpose;
        // with nothing else in flight, the drain ends right after.
        let exit_from_term = exited_at - term_at;
        assert!(
            exit_from_term <= GRACE,
            "exit {exit_from_term:?} after SIGTERM"
        );
        println!(
            "SIGTERM mid-stream: {} responses complete, {} requests refused/closed before a \
             response (after the listener closed), 0 cut off; 10/10 in-flight requests \
             answered in full after the signal; exit 0 {:?} after SIGTERM (grace {GRACE:?})",
            total.complete, total.refused_or_closed_before_response, exit_from_term
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_request_that_never_finishes_exits_0_at_the_grace_bound() {
    let Some(binary) = example_binary_or_skip("presence_server") else {
        return;
    };
    within(20, async {
        let mut server = ServerProcess::start(&binary);
        let stuck = HalfSentLogin::start(server.addr, "stuck").await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        server.terminate();
        let term_at = Instant::now();
        let (status, exited_at) = server
            .wait(GRACE + Duration::from_secs(3))
            .await
            .expect("the server exits although a request never finishes");
        let exited_after = exited_at - term_at;
        assert!(status.success(), "exit status {status}");
        assert!(
            exited_after >= GRACE - Duration::from_millis(200)
                && exited_after <= GRACE + Duration::from_millis(1000),
            "exit {exited_after:?} after SIGTERM; grace {GRACE:?}"
        );
        drop(stuck);
        println!(
            "SIGTERM with a stuck request: exit 0 {exited_after:?} after SIGTERM (grace {GRACE:?})"
        );
    })
    .await;
}
