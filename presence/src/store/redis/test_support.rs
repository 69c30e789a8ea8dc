//! Helpers for tests that need a Redis server or a Redis Cluster.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::{RedisOptions, RedisStore};

/// Default when `PRESENCE_TEST_REDIS_URI` is unset.
pub const DEFAULT_TEST_REDIS_URI: &str = "redis://127.0.0.1:6379";

/// A key prefix no other test run uses: `test-<pid>-<nanos>-<name>`.
pub fn unique_prefix(name: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let name: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("test-{}-{nanos}-{name}", std::process::id())
}

/// A [`RedisStore`] on a fresh [`unique_prefix`] for the test `name`, connected to
/// `PRESENCE_TEST_REDIS_URI` (default [`DEFAULT_TEST_REDIS_URI`]).
///
/// When Redis is unreachable it prints why and returns `None`, so the test can
/// return early (skip); with `PRESENCE_REQUIRE_REDIS=1` it panics instead, so CI
/// cannot silently skip. Call [`RedisStore::delete_prefix`] at the end of the test;
/// keys left behind by a failed test expire with their nodes anyway.
///
/// # Panics
/// If Redis is unreachable and `PRESENCE_REQUIRE_REDIS=1`.
pub async fn redis_for_tests(name: &str) -> Option<RedisStore> {
    sharded_redis_for_tests(name, 1).await
}

/// Whether `PRESENCE_REQUIRE_REDIS=1`: Redis (and Redis Cluster) tests must run.
fn required() -> bool {
    std::env::var("PRESENCE_REQUIRE_REDIS").is_ok_and(|v| v.trim() == "1")
}

/// [`redis_for_tests`] with a deployment of `shards` shards.
///
/// # Panics
/// If Redis is unreachable and `PRESENCE_REQUIRE_REDIS=1`.
pub async fn sharded_redis_for_tests(name: &str, shards: usize) -> Option<RedisStore> {
    let uri = std::env::var("PRESENCE_TEST_REDIS_URI")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_TEST_REDIS_URI.to_owned());
    let options = RedisOptions::default().shards(shards);
    match RedisStore::connect_with(&uri, &unique_prefix(name), options).await {
        Ok(store) => Some(store),
        Err(e) if required() => {
            panic!("{name}: Redis is required (PRESENCE_REQUIRE_REDIS=1) but unavailable: {e}")
        }
        Err(e) => {
            eprintln!(
                "skipping {name}: {e} (start Redis or set PRESENCE_TEST_REDIS_URI; \
                 PRESENCE_REQUIRE_REDIS=1 makes this a failure)"
            );
            None
        }
    }
}

/// A [`RedisStore`] of `shards` shards on a fresh prefix of the process's shared
/// [`LocalCluster`] (started on first use, gone shortly after the process).
///
/// When no cluster can be started (no `redis-server` or `redis-cli`) it prints why
/// and returns `None`; with `PRESENCE_REQUIRE_REDIS=1` it panics instead.
///
/// # Panics
/// As said.
pub async fn cluster_for_tests(name: &str, shards: usize) -> Option<RedisStore> {
    let cluster = shared_cluster(name)?;
    let options = RedisOptions::default().cluster(true).shards(shards);
    match RedisStore::connect_with(&cluster.seeds(), &unique_prefix(name), options).await {
        Ok(store) => Some(store),
        Err(e) => panic!("{name}: cannot open a store on the local cluster: {e}"),
    }
}

/// The process's shared [`LocalCluster`], started on first use (call it from a
/// multi-threaded runtime: it blocks while the cluster starts). Skips (`None`) or
/// panics as [`cluster_for_tests`].
///
/// # Panics
/// If no cluster can start and `PRESENCE_REQUIRE_REDIS=1`.
pub fn shared_cluster(name: &str) -> Option<&'static LocalCluster> {
    static SHARED: OnceLock<Result<LocalCluster, String>> = OnceLock::new();
    let cluster = tokio::task::block_in_place(|| SHARED.get_or_init(LocalCluster::start));
    match cluster {
        Ok(cluster) => Some(cluster),
        Err(e) if required() => {
            panic!("{name}: PRESENCE_REQUIRE_REDIS=1 but no Redis Cluster: {e}")
        }
        Err(e) => {
            eprintln!("skipping {name}: no Redis Cluster ({e})");
            None
        }
    }
}

/// A Redis Cluster of three masters with one replica each, on free ports of
/// 127.0.0.1, without persistence: `redis-server --cluster-enabled yes` six times,
/// then `redis-cli --cluster create`. Killed on drop; each server also stops by
/// itself within a second of this process ending.
#[derive(Debug)]
pub struct LocalCluster {
    /// The six ports.
    pub ports: Vec<u16>,
    dir: PathBuf,
    tls: Option<ClusterTls>,
}

/// The PEM files of a cluster that speaks TLS alone ([`LocalCluster::start_tls`]):
/// to clients, between its nodes and to its replicas.
#[derive(Debug, Clone)]
pub struct ClusterTls {
    /// The CA that signed `cert_file` (the nodes trust it, and so must clients).
    pub ca_file: PathBuf,
    /// Every node's certificate (valid for 127.0.0.1).
    pub cert_file: PathBuf,
    /// Its private key.
    pub key_file: PathBuf,
}

impl LocalCluster {
    /// Starts the cluster and waits until every node says `cluster_state:ok`.
    ///
    /// # Errors
    /// Why it could not (a binary missing, a node that did not start or join).
    pub fn start() -> Result<LocalCluster, String> {
        Self::start_with(None)
    }

    /// [`LocalCluster::start`], with every port speaking TLS alone
    /// (`--tls-port`, `--tls-cluster yes`, `--tls-replication yes`; clients are not
    /// asked for certificates): [`LocalCluster::seeds`] are `rediss://`.
    ///
    /// # Errors
    /// As [`LocalCluster::start`]; also a `redis-server` built without TLS.
    pub fn start_tls(tls: ClusterTls) -> Result<LocalCluster, String> {
        Self::start_with(Some(tls))
    }

    /// Up to three tries, each on fresh ports: a loaded CI machine can miss a
    /// deadline once, or lose a port to another process between the check and the
    /// bind. The error names every try's reason.
    fn start_with(tls: Option<ClusterTls>) -> Result<LocalCluster, String> {
        let mut reasons = Vec::new();
        for _ in 0..3 {
            match Self::try_start(tls.clone()) {
                Ok(cluster) => return Ok(cluster),
                Err(e) => reasons.push(e),
            }
        }
        Err(reasons.join("; then "))
    }

    fn try_start(tls: Option<ClusterTls>) -> Result<LocalCluster, String> {
        let dir = std::env::temp_dir().join(unique_prefix("cluster"));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut cluster = LocalCluster {
            ports: Vec::new(),
            dir,
            tls,
        };
        for _ in 0..6 {
            let port = cluster_port(&cluster.ports)?;
            cluster.spawn(port)?;
            cluster.ports.push(port);
        }
        for &port in &cluster.ports {
            wait_for(Duration::from_secs(5), || {
                cluster.command(port, &["PING"]).is_ok_and(|r| r == "PONG")
            })
            .map_err(|_| {
                format!(
                    "redis-server on {port} did not answer ({})",
                    cluster.log_tail(port)
                )
            })?;
        }
        let mut create = Command::new("redis-cli");
        if let Some(tls) = &cluster.tls {
            create.arg("--tls").arg("--cacert").arg(&tls.ca_file);
        }
        create.args(["--cluster", "create"]);
        for port in &cluster.ports {
            create.arg(format!("127.0.0.1:{port}"));
        }
        let out = create
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("redis-cli: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "redis-cli --cluster create failed: {}",
                String::from_utf8_lossy(&out.stdout)
            ));
        }
        cluster
            .wait_until_ok(Duration::from_secs(30))
            .map_err(|e| format!("{e} ({})", cluster.log_tail(cluster.ports[0])))?;
        // A replica that has not synced yet could not take over.
        wait_for(Duration::from_secs(30), || {
            cluster.ports.iter().all(|&port| {
                cluster
                    .command(port, &["INFO", "replication"])
                    .is_ok_and(|info| {
                        !info.contains("role:slave") || info.contains("master_link_status:up")
                    })
            })
        })
        .map_err(|_| "the replicas did not sync with their masters".to_owned())?;
        Ok(cluster)
    }

    fn spawn(&self, port: u16) -> Result<(), String> {
        let dir = self.dir.display();
        // With TLS, the cluster bus (port + 10000) speaks it too.
        let listen = match &self.tls {
            None => format!("--port {port}"),
            Some(tls) => format!(
                "--port 0 --tls-port {port} --tls-cluster yes --tls-replication yes \
                 --tls-auth-clients no --tls-cert-file '{}' --tls-key-file '{}' \
                 --tls-ca-cert-file '{}'",
                tls.cert_file.display(),
                tls.key_file.display(),
                tls.ca_file.display()
            ),
        };
        // The server runs under a shell that kills it once this process is gone, so
        // that a shared cluster (never dropped) does not outlive the test run.
        let script = format!(
            "redis-server {listen} --bind 127.0.0.1 --cluster-enabled yes \
             --cluster-config-file {dir}/nodes-{port}.conf --cluster-node-timeout 1000 \
             --dir {dir} --save '' --appendonly no --pidfile {dir}/{port}.pid \
             --daemonize no --logfile {dir}/{port}.log >/dev/null 2>&1 & r=$!; \
             while kill -0 {parent} 2>/dev/null && kill -0 $r 2>/dev/null; do sleep 0.2; done; \
             kill -9 $r 2>/dev/null",
            parent = std::process::id()
        );
        Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map(drop)
            .map_err(|e| format!("cannot start redis-server: {e}"))
    }

    /// The last lines the node on `port` logged, for an error message.
    fn log_tail(&self, port: u16) -> String {
        let log = std::fs::read_to_string(self.dir.join(format!("{port}.log")))
            .unwrap_or_else(|e| format!("no log: {e}"));
        let lines: Vec<&str> = log.lines().collect();
        format!(
            "its log ends: {}",
            lines[lines.len().saturating_sub(5)..].join(" | ")
        )
    }

    /// Waits until every live node says `cluster_state:ok` and agrees on the masters.
    ///
    /// # Errors
    /// If that takes longer than `limit`.
    pub fn wait_until_ok(&self, limit: Duration) -> Result<(), String> {
        wait_for(limit, || {
            self.ports
                .iter()
                .all(|&port| match self.command(port, &["CLUSTER", "INFO"]) {
                    Ok(info) => info.contains("cluster_state:ok"),
                    // A killed node says nothing.
                    Err(_) => true,
                })
                && self.masters().len() == 3
        })
        .map_err(|_| "the cluster did not reach cluster_state:ok".to_owned())
    }

    /// The seed nodes, `redis://127.0.0.1:<port>,...` (`rediss://` with TLS):
    /// `PRESENCE_REDIS_URI` with `PRESENCE_REDIS_MODE=cluster`.
    pub fn seeds(&self) -> String {
        self.ports
            .iter()
            .map(|&p| self.url(p))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn url(&self, port: u16) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{port}")
    }

    /// A client of the node on `port`, trusting the cluster's CA with TLS.
    fn client(&self, port: u16) -> Result<redis::Client, String> {
        let url = self.url(port);
        match &self.tls {
            None => redis::Client::open(url),
            Some(tls) => {
                let ca = std::fs::read(&tls.ca_file)
                    .map_err(|e| format!("{}: {e}", tls.ca_file.display()))?;
                redis::Client::build_with_tls(
                    url,
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(ca),
                    },
                )
            }
        }
        .map_err(|e| e.to_string())
    }

    /// One command to the node on `port`, its reply as text.
    fn command(&self, port: u16, args: &[&str]) -> Result<String, String> {
        let mut conn = self
            .client(port)?
            .get_connection_with_timeout(Duration::from_millis(500))
            .map_err(|e| e.to_string())?;
        let mut cmd = redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        let reply: redis::Value = cmd.query(&mut conn).map_err(|e| e.to_string())?;
        Ok(match reply {
            redis::Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
            redis::Value::SimpleString(s) => s,
            redis::Value::Int(n) => n.to_string(),
            redis::Value::VerbatimString { text, .. } => text,
            other => format!("{other:?}"),
        })
    }

    /// The ports of the masters that are up now (as the first node that answers
    /// sees them).
    pub fn masters(&self) -> Vec<u16> {
        let nodes = self
            .ports
            .iter()
            .find_map(|&port| self.command(port, &["CLUSTER", "NODES"]).ok())
            .unwrap_or_default();
        let mut masters: Vec<u16> = nodes
            .lines()
            .filter(|l| l.contains("master") && !l.contains("fail"))
            .filter_map(|l| {
                let addr = l.split(' ').nth(1)?;
                addr.split(['@', ':']).nth(1)?.parse().ok()
            })
            .collect();
        masters.sort_unstable();
        masters
    }

    /// Keys held by the node on `port` (`DBSIZE`).
    pub fn keys_on(&self, port: u16) -> u64 {
        self.command(port, &["DBSIZE"])
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    /// Keys on the node on `port` whose names start with `start` (`SCAN`).
    pub fn keys_starting(&self, port: u16, start: &str) -> usize {
        let Ok(client) = self.client(port) else {
            return 0;
        };
        let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_millis(500)) else {
            return 0;
        };
        let pattern = format!("{}*", start.replace('{', "\\{").replace('}', "\\}"));
        let mut cursor = 0u64;
        let mut found = 0;
        loop {
            let reply: redis::RedisResult<(u64, Vec<String>)> = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query(&mut conn);
            let Ok((next, keys)) = reply else {
                return found;
            };
            found += keys.len();
            if next == 0 {
                return found;
            }
            cursor = next;
        }
    }

    /// SIGKILLs the node on `port`.
    pub fn kill(&self, port: u16) {
        if let Ok(pid) = std::fs::read_to_string(self.dir.join(format!("{port}.pid"))) {
            let _ = Command::new("kill").args(["-9", pid.trim()]).status();
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for &port in &self.ports {
            self.kill(port);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A free port whose cluster bus port (+10000) is free too, not in `taken`.
///
/// Both lie below the kernel's range of ephemeral ports (`ip_local_port_range`,
/// 32768 and up by default): a port from that range could be taken by any
/// outgoing connection (the other tests make thousands) between this check and
/// the node's bind.
fn cluster_port(taken: &[u16]) -> Result<u16, String> {
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    // Ports from 10000 up, their bus ports under `ephemeral`.
    let span = ephemeral.saturating_sub(20_000).max(1);
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
        ^ std::process::id().wrapping_mul(2_654_435_761);
    for i in 0..500u32 {
        let offset =
            u16::try_from(seed.wrapping_add(i.wrapping_mul(7_919)) % u32::from(span)).unwrap_or(0);
        let port = 10_000 + offset;
        let bus = port + 10_000;
        let free = |p: u16| TcpListener::bind(("127.0.0.1", p)).is_ok();
        if !taken.contains(&port) && free(port) && free(bus) {
            return Ok(port);
        }
    }
    Err("no free port pair for a cluster node".to_owned())
}

fn wait_for(limit: Duration, mut ok: impl FnMut() -> bool) -> Result<(), ()> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(())
}
