//! Shared plumbing of the `hardening_*` tests: time bounds, a presence server on a real
//! socket, a throwaway `redis-server` child the test may kill, pause and restart, and
//! raw HTTP helpers.

#![allow(dead_code)] // each test target uses its own subset

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use presence::config::Config;
use presence::server::{PresenceService, Server};
use presence::store::Store;
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

/// `PRESENCE_REQUIRE_REDIS=1`: a missing Redis (or `redis-server`) fails the test.
pub fn redis_required() -> bool {
    std::env::var("PRESENCE_REQUIRE_REDIS").is_ok_and(|v| v.trim() == "1")
}

/// A test configuration: 127.0.0.1, port 0, no practical rate limit, the given store
/// timeout; everything else the defaults.
pub fn config(store_timeout: Duration) -> Config {
    let mut c = Config::default();
    c.http_host = "127.0.0.1".into();
    c.http_port = 0;
    c.rate_limit_rate = 1_000_000.0;
    c.rate_limit_capacity = 1_000_000;
    c.store_timeout = store_timeout;
    c
}

/// A presence server running in this runtime on a real socket.
pub struct TestServer {
    /// Where it listens.
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<io::Result<()>>,
}

impl TestServer {
    /// Binds `config` (port 0) on `store` and runs it until [`stop`](Self::stop) or drop.
    pub async fn start(config: &Config, store: Arc<dyn Store>) -> TestServer {
        Self::start_service(config, PresenceService::new(store, config)).await
    }

    /// Like [`start`](Self::start) with a service built by the caller.
    pub async fn start_service(config: &Config, service: PresenceService) -> TestServer {
        let server = Server::bind_service(config, service)
            .await
            .expect("bind the test server");
        let addr = server.local_addr();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = rx.await;
        }));
        TestServer {
            addr,
            shutdown: Some(tx),
            task,
        }
    }

    /// `http://addr{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Signals shutdown and waits for the server to drain.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An HTTP client that never uses a proxy and never retries.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(64)
        .build()
        .expect("reqwest client")
}

/// A decoded reply.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub retry_after: Option<String>,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
    pub elapsed: Duration,
}

impl Reply {
    /// The body as JSON (`Null` if it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// `body["error"]` as a string (empty if absent).
    pub fn error_code(&self) -> String {
        self.json()["error"].as_str().unwrap_or_default().to_owned()
    }

    /// Asserts a `503 store_unavailable` with a `Retry-After` of whole seconds >= 1.
    pub fn assert_store_unavailable(&self, what: &str) {
        assert_eq!(self.status, 503, "{what}: {self:?}");
        assert_eq!(self.error_code(), "store_unavailable", "{what}: {self:?}");
        let secs: u64 = self
            .retry_after
            .as_deref()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{what}: Retry-After missing or not whole seconds"));
        assert!(secs >= 1, "{what}: Retry-After {secs}");
    }
}

/// Sends `req`, timing it. Transport errors panic: the server must always answer.
pub async fn send(req: reqwest::RequestBuilder) -> Reply {
    let started = std::time::Instant::now();
    let res = req.send().await.expect("the server answers");
    let status = res.status().as_u16();
    let header = |name: &str| {
        res.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let retry_after = header("retry-after");
    let content_type = header("content-type");
    let body = res.bytes().await.expect("the whole body").to_vec();
    Reply {
        status,
        retry_after,
        content_type,
        body,
        elapsed: started.elapsed(),
    }
}

/// `GET url`. The request is built before the future, which borrows nothing.
pub fn get(client: &reqwest::Client, url: &str) -> impl Future<Output = Reply> + Send + 'static {
    send(client.get(url))
}

/// `POST url` with a JSON body. The future borrows nothing.
pub fn post(
    client: &reqwest::Client,
    url: &str,
    body: &serde_json::Value,
) -> impl Future<Output = Reply> + Send + 'static {
    send(
        client
            .post(url)
            .header("content-type", "application/json")
            .body(body.to_string()),
    )
}

/// A free TCP port on 127.0.0.1 (bound and released; fine for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A `redis-server` child process on its own port, without persistence. Killed on drop.
pub struct RedisChild {
    pub port: u16,
    child: Option<Child>,
}

impl RedisChild {
    /// Starts `redis-server` on a free port and waits until it answers `PING`.
    ///
    /// `None` (with the reason printed) when the binary is missing, unless
    /// `PRESENCE_REQUIRE_REDIS=1`, which makes that a failure.
    pub async fn start(test: &str) -> Option<RedisChild> {
        Self::start_on(test, free_port()).await
    }

    /// Like [`start`](Self::start) on a given port.
    pub async fn start_on(test: &str, port: u16) -> Option<RedisChild> {
        match spawn_redis(port) {
            Ok(child) => {
                let mut redis = RedisChild {
                    port,
                    child: Some(child),
                };
                redis.wait_ready().await;
                Some(redis)
            }
            Err(e) if redis_required() => {
                panic!("{test}: PRESENCE_REQUIRE_REDIS=1 but redis-server cannot start: {e}")
            }
            Err(e) => {
                eprintln!(
                    "skipping {test}: cannot start redis-server ({e}); install Redis, or set \
                     PRESENCE_REQUIRE_REDIS=1 to make this a failure"
                );
                None
            }
        }
    }

    /// `redis://127.0.0.1:port`.
    pub fn uri(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(Child::id)
            .expect("redis child running")
    }

    /// SIGKILL, and waits until the process is gone (its port refuses connections).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a new `redis-server` on the same port (empty: no persistence).
    pub async fn restart(&mut self) {
        self.kill();
        // The port was just released; binding it again can race with TIME_WAIT-free
        // reuse on some kernels, so retry briefly.
        for _ in 0..50 {
            match spawn_redis(self.port) {
                Ok(child) => {
                    self.child = Some(child);
                    if self.try_wait_ready(Duration::from_secs(2)).await {
                        return;
                    }
                    self.kill();
                }
                Err(e) => panic!("cannot restart redis-server: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("redis-server did not come back on port {}", self.port);
    }

    /// SIGSTOP: Redis keeps its sockets but answers nothing (a hung server).
    pub fn pause(&self) {
        signal(self.pid(), "STOP");
    }

    /// SIGCONT after [`pause`](Self::pause).
    pub fn resume(&self) {
        signal(self.pid(), "CONT");
    }

    /// Runs one command with redis-cli-free raw RESP (inline command).
    pub async fn command(&self, inline: &str) -> String {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))
            .await
            .expect("connect to redis child");
        stream
            .write_all(format!("{inline}\r\n").as_bytes())
            .await
            .expect("write");
        let mut buf = vec![0u8; 512];
        let n = stream.read(&mut buf).await.expect("read");
        String::from_utf8_lossy(&buf[..n]).trim().to_owned()
    }

    async fn wait_ready(&mut self) {
        assert!(
            self.try_wait_ready(Duration::from_secs(5)).await,
            "redis-server on port {} did not answer PING within 5 s",
            self.port
        );
    }

    async fn try_wait_ready(&mut self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    eprintln!("redis-server exited early: {status}");
                    self.child = None;
                    return false;
                }
            }
            if let Ok(Ok(pong)) =
                tokio::time::timeout(Duration::from_millis(200), ping(self.port)).await
            {
                if pong {
                    return true;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }
}

impl Drop for RedisChild {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_ref() {
            // A paused child ignores nothing but SIGKILL; resume anyway for tidiness.
            signal(child.id(), "CONT");
        }
        self.kill();
    }
}

fn spawn_redis(port: u16) -> io::Result<Child> {
    Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
}

async fn ping(port: u16) -> io::Result<bool> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    stream.write_all(b"PING\r\n").await?;
    let mut buf = [0u8; 16];
    let n = stream.read(&mut buf).await?;
    Ok(buf[..n].starts_with(b"+PONG"))
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// `VmRSS` of this process in bytes (Linux), `None` elsewhere.
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
