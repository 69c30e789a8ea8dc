//! Helpers for the end-to-end tests: a presence server on a real socket, an HTTP client
//! that never goes through a proxy, replies decoded into status + headers + body, stores
//! that fail on purpose, and the plumbing for child processes (the example binary, a
//! throwaway `redis-server`).

#![allow(dead_code)] // each test target uses its own subset

use std::collections::HashMap;
use std::future::Future;
use std::io::{self, BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use http::HeaderMap;
use presence::config::Config;
use presence::server::Server;
use presence::store::{MemoryStore, Store};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Fails the test if `fut` takes longer than `secs` instead of hanging.
pub async fn within<T>(secs: u64, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {secs} s"))
}

/// A configuration read through [`Config::from_lookup`] from `vars`, bound to
/// `127.0.0.1` on a free port unless `vars` says otherwise.
pub fn config(vars: &[(&str, &str)]) -> Config {
    let mut map: HashMap<&str, &str> = vars.iter().copied().collect();
    map.entry("PRESENCE_HTTP_HOST").or_insert("127.0.0.1");
    map.entry("PRESENCE_HTTP_PORT").or_insert("0");
    Config::from_lookup(|name| map.get(name).map(|v| (*v).to_owned()))
        .unwrap_or_else(|e| panic!("test configuration rejected: {e}"))
}

/// A presence server running in this runtime on a real socket.
pub struct TestServer {
    /// Where it listens.
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<io::Result<()>>>,
}

impl TestServer {
    /// Binds `config` (port 0) on `store` and spawns `run` with a oneshot shutdown.
    pub async fn start(config: &Config, store: Arc<dyn Store>) -> TestServer {
        let server = within(10, Server::bind(config, store))
            .await
            .unwrap_or_else(|e| panic!("bind failed: {e}"));
        let addr = server.local_addr();
        assert!(addr.ip().is_loopback(), "bound to {addr}");
        assert_ne!(addr.port(), 0, "port 0 must be resolved to the real port");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            // A dropped sender also means "stop".
            let _ = rx.await;
        }));
        TestServer {
            addr,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// A server on a fresh in-memory store.
    pub async fn memory(config: &Config) -> TestServer {
        TestServer::start(config, Arc::new(MemoryStore::new())).await
    }

    /// `http://<addr><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The client SDK's base URL, `http://<addr>/presence`.
    pub fn base(&self) -> String {
        self.url("/presence")
    }

    /// Signals shutdown; call [`join`](Self::join) to wait for the drain.
    pub fn signal_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Waits (bounded) for `run` to return after [`signal_shutdown`](Self::signal_shutdown)
    /// and asserts it returned `Ok`.
    pub async fn join(&mut self) {
        if let Some(task) = self.task.take() {
            let result = within(15, task).await;
            match result {
                Ok(Ok(())) => {}
                Ok(Err(e)) => panic!("server run failed: {e}"),
                Err(e) => panic!("server task panicked: {e}"),
            }
        }
    }

    /// Graceful stop: signal, then wait for `run` to return `Ok`.
    pub async fn stop(mut self) {
        self.signal_shutdown();
        self.join().await;
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        // A test that panicked before `stop`: stop serving at once.
        self.signal_shutdown();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A reqwest client that ignores `HTTP_PROXY` & co. (they would swallow 127.0.0.1).
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap_or_else(|e| panic!("reqwest client: {e}"))
}

/// A response, read completely.
#[derive(Debug)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Headers.
    pub headers: HeaderMap,
    /// Body as text.
    pub body: String,
}

impl Reply {
    /// Sends `req` and reads the whole reply (bounded).
    pub async fn send(req: reqwest::RequestBuilder) -> Reply {
        within(15, async {
            let res = req
                .send()
                .await
                .unwrap_or_else(|e| panic!("request failed: {e}"));
            let status = res.status().as_u16();
            let headers = res.headers().clone();
            let body = res
                .text()
                .await
                .unwrap_or_else(|e| panic!("reading the body failed: {e}"));
            Reply {
                status,
                headers,
                body,
            }
        })
        .await
    }

    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
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

/// `GET url`.
pub async fn get(url: &str) -> Reply {
    Reply::send(http().get(url)).await
}

/// `POST url` with a raw body sent as `application/json` (it need not be valid JSON).
pub async fn post_json(url: &str, body: impl Into<String>) -> Reply {
    Reply::send(
        http()
            .post(url)
            .header("content-type", "application/json")
            .body(body.into()),
    )
    .await
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

/// Sends raw bytes on a fresh connection and reads the reply until the server closes
/// it. The request should say `Connection: close`. A reset after the reply arrived
/// (the server closing with part of a rejected body unread) is tolerated.
pub async fn raw_request(addr: SocketAddr, request: &[u8]) -> Reply {
    within(15, async {
        let mut stream = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        // The server may answer (and stop reading) before all of a rejected body is
        // written; the reply is what matters.
        let _ = stream.write_all(request).await;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if buf.is_empty() => panic!("no reply from {addr}: {e}"),
                Err(_) => break,
            }
        }
        parse_http_response(&buf)
    })
    .await
}

/// Parses an HTTP/1.1 response with a `Content-Length` body (what the server sends).
fn parse_http_response(raw: &[u8]) -> Reply {
    let text = String::from_utf8_lossy(raw);
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("incomplete HTTP response: {text:?}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let mut headers = HeaderMap::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .unwrap_or_else(|| panic!("bad header line {line:?}"));
        let name = http::HeaderName::from_bytes(name.trim().as_bytes())
            .unwrap_or_else(|e| panic!("bad header name {name:?}: {e}"));
        let value = http::HeaderValue::from_str(value.trim())
            .unwrap_or_else(|e| panic!("bad header value {value:?}: {e}"));
        headers.append(name, value);
    }
    let body = match headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
    {
        Some(len) => rest.get(..len).unwrap_or(rest).to_owned(),
        None => rest.to_owned(),
    };
    Reply {
        status,
        headers,
        body,
    }
}

/// The value of sample `name{labels}` (labels exactly as encoded, e.g.
/// `{kind="timeout"}`; `""` for none) in a Prometheus/OpenMetrics text scrape.
pub fn metric_value(scrape: &str, series: &str) -> Option<f64> {
    scrape.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?;
        rest.strip_prefix(' ')?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

// ---------------------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------------------

/// `target/<profile>/examples/<name>`, found from this test executable
/// (`target/<profile>/deps/<test>-<hash>`). `Err` says why it is not there.
pub fn example_binary(name: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .ok_or_else(|| format!("unexpected test executable location {}", exe.display()))?;
    let path = profile_dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if path.is_file() {
        // `cargo test --test X` rebuilds this test but not the examples: say so when
        // the binary predates it, as it may not contain the latest server code.
        let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        if let (Some(bin), Some(test)) = (modified(&path), modified(&exe)) {
            if bin < test {
                eprintln!(
                    "note: {} is older than this test binary and may be stale; \
                     `cargo build --example {name}` refreshes it",
                    path.display()
                );
            }
        }
        Ok(path)
    } else {
        Err(format!(
            "{} does not exist; `cargo test -p presence-workspace` (without --test) or \
             `cargo build --example {name}` builds it",
            path.display()
        ))
    }
}

/// A command for `program` with a clean presence environment: every `PRESENCE_*`,
/// `NODE_ID` and `RUST_LOG` variable of this process removed, `RUST_LOG=info`,
/// colours off.
pub fn clean_command(program: &PathBuf) -> Command {
    let mut cmd = Command::new(program);
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("PRESENCE_") || k == "NODE_ID" || k == "RUST_LOG" {
            cmd.env_remove(&key);
        }
    }
    cmd.env("RUST_LOG", "info").env("NO_COLOR", "1");
    cmd
}

/// A child process that is killed (by its own handle) if the test ends early.
pub struct ChildGuard {
    child: Option<Child>,
    lines: Option<mpsc::Receiver<String>>,
}

impl ChildGuard {
    /// Spawns `cmd` with stdout and stderr piped into one line channel.
    pub fn spawn(mut cmd: Command) -> io::Result<ChildGuard> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let (tx, rx) = mpsc::channel();
        if let Some(out) = child.stdout.take() {
            forward_lines(out, tx.clone());
        }
        if let Some(err) = child.stderr.take() {
            forward_lines(err, tx);
        }
        Ok(ChildGuard {
            child: Some(child),
            lines: Some(rx),
        })
    }

    /// Spawns `cmd` with all output discarded.
    pub fn spawn_quiet(mut cmd: Command) -> io::Result<ChildGuard> {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(ChildGuard {
            child: Some(child),
            lines: None,
        })
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Waits up to `timeout` for an output line (ANSI escapes stripped) for which `f`
    /// returns `Some`; returns it and every line seen so far. `None` if the process
    /// ended or the time ran out first.
    pub fn find_line<T>(
        &self,
        timeout: Duration,
        mut f: impl FnMut(&str) -> Option<T>,
    ) -> (Option<T>, Vec<String>) {
        let mut seen = Vec::new();
        let Some(rx) = &self.lines else {
            return (None, seen);
        };
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    let line = strip_ansi(&line);
                    let found = f(&line);
                    seen.push(line);
                    if found.is_some() {
                        return (found, seen);
                    }
                }
                Err(_) => return (None, seen),
            }
        }
    }

    /// Waits (polling, bounded by `timeout`) for the process to exit; `None` if it is
    /// still running then.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    self.child = None;
                    return Some(status);
                }
                Ok(None) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                _ => return None,
            }
        }
    }

    /// Every output line still buffered (ANSI escapes stripped), once the process has
    /// exited and its pipes are closed (bounded).
    pub fn remaining_lines(&self) -> Vec<String> {
        let Some(rx) = &self.lines else {
            return Vec::new();
        };
        let mut lines = Vec::new();
        while let Ok(line) = rx.recv_timeout(Duration::from_secs(5)) {
            lines.push(strip_ansi(&line));
        }
        lines
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

fn forward_lines(stream: impl Read + Send + 'static, tx: mpsc::Sender<String>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            match line {
                Ok(line) => {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
    });
}

/// `s` without ANSI escape sequences (`ESC [ ... letter`).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The `host:port` after `http://` in a log line, e.g. from
/// `... listening on http://127.0.0.1:41234`.
pub fn parse_listen_addr(line: &str) -> Option<SocketAddr> {
    let (_, rest) = line.split_once("listening on http://")?;
    let addr: String = rest
        .chars()
        .take_while(|c| c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '[' | ']'))
        .collect();
    addr.parse().ok()
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

/// `true` when `PRESENCE_REQUIRE_REDIS=1`: Redis tests must run, not skip.
pub fn redis_required() -> bool {
    std::env::var("PRESENCE_REQUIRE_REDIS").is_ok_and(|v| v.trim() == "1")
}

/// The Redis URI of the test Redis (`PRESENCE_TEST_REDIS_URI` or the default), as
/// `presence::store::redis::test_support::redis_for_tests` uses it.
pub fn test_redis_uri() -> String {
    std::env::var("PRESENCE_TEST_REDIS_URI")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| presence::store::redis::test_support::DEFAULT_TEST_REDIS_URI.to_owned())
}
