//! Redis for the tests: the shared test Redis (`PRESENCE_TEST_REDIS_URI`, used through
//! `presence::store::redis::test_support::redis_for_tests`), and throwaway
//! `redis-server` children that a test may kill, pause, restart and flush at will.

use std::io;
use std::process::Command;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::free_port;
use super::process::ChildGuard;

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

/// A plain connection to the test Redis, for commands the store does not send
/// (`SCAN`, `ZADD` behind the store's back, ...).
pub async fn test_redis_connection() -> redis::aio::MultiplexedConnection {
    redis::Client::open(test_redis_uri())
        .expect("redis uri")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to the test Redis")
}

/// A `redis-server` child process on its own port, without persistence. Killed on drop.
pub struct RedisChild {
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    process: ChildGuard,
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
        match ChildGuard::spawn_quiet(redis_server(port)) {
            Ok(process) => {
                let mut redis = RedisChild { port, process };
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

    /// SIGKILL, and waits until the process is gone (its port refuses connections).
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts a new `redis-server` on the same port (empty: no persistence).
    pub async fn restart(&mut self) {
        self.kill();
        // The port was just released; binding it again can race with TIME_WAIT-free
        // reuse on some kernels, so retry briefly.
        for _ in 0..50 {
            match ChildGuard::spawn_quiet(redis_server(self.port)) {
                Ok(process) => {
                    self.process = process;
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
        self.process.signal("STOP");
    }

    /// SIGCONT after [`pause`](Self::pause).
    pub fn resume(&self) {
        self.process.signal("CONT");
    }

    /// Runs one inline command over raw RESP (no redis-cli needed); the reply's first
    /// read, trimmed (`+OK`, `:3`, ...).
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
            if let Some(status) = self.process.wait_exit(Duration::ZERO).await {
                eprintln!("redis-server exited early: {status}");
                return false;
            }
            if let Ok(Ok(true)) =
                tokio::time::timeout(Duration::from_millis(200), ping(self.port)).await
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }
}

/// A `redis-server` child that speaks only TLS (`--port 0 --tls-port ...`), its
/// certificate signed by a throwaway CA. Killed on drop.
pub struct RedisTlsChild {
    /// The TLS port (127.0.0.1).
    pub port: u16,
    /// The CA and the server's certificate and key.
    pub certs: super::tls::TestCerts,
    process: ChildGuard,
}

impl RedisTlsChild {
    /// Starts `redis-server` with TLS on a free port and waits until it accepts
    /// connections. `None` (with the reason printed) when it cannot start or has no
    /// TLS, unless `PRESENCE_REQUIRE_REDIS=1`, which makes that a failure.
    pub async fn start(test: &str) -> Option<RedisTlsChild> {
        let certs = super::tls::TestCerts::generate();
        let port = free_port();
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", "0", "--tls-port", &port.to_string()])
            .arg("--tls-cert-file")
            .arg(&certs.cert_file)
            .arg("--tls-key-file")
            .arg(&certs.key_file)
            .arg("--tls-ca-cert-file")
            .arg(&certs.ca_file)
            .args(["--tls-auth-clients", "no", "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"]);
        let skip = |why: String| {
            if redis_required() {
                panic!("{test}: PRESENCE_REQUIRE_REDIS=1 but {why}");
            }
            eprintln!(
                "skipping {test}: {why}; install Redis with TLS, or set \
                 PRESENCE_REQUIRE_REDIS=1 to make this a failure"
            );
            None
        };
        let mut process = match ChildGuard::spawn_quiet(cmd) {
            Ok(process) => process,
            Err(e) => return skip(format!("cannot start redis-server ({e})")),
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(status) = process.wait_exit(Duration::ZERO).await {
                return skip(format!(
                    "redis-server with --tls-port exited ({status}): built without TLS?"
                ));
            }
            if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return Some(RedisTlsChild {
                    port,
                    certs,
                    process,
                });
            }
            if tokio::time::Instant::now() >= deadline {
                return skip("redis-server did not listen on its TLS port within 5 s".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `rediss://127.0.0.1:port`.
    pub fn uri(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL).
    pub fn kill(&mut self) {
        self.process.kill();
    }
}

/// `redis-server` on 127.0.0.1:`port`, without persistence.
fn redis_server(port: u16) -> Command {
    let mut cmd = Command::new("redis-server");
    cmd.args([
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ]);
    cmd
}

async fn ping(port: u16) -> io::Result<bool> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    stream.write_all(b"PING\r\n").await?;
    let mut buf = [0u8; 16];
    let n = stream.read(&mut buf).await?;
    Ok(buf[..n].starts_with(b"+PONG"))
}
