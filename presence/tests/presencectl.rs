//! `presencectl`, the real binary (`CARGO_BIN_EXE_presencectl`), against a real
//! server on a free port of 127.0.0.1: `list` (table, `--json`, filters), `get`,
//! `stats`, `watch` (lines and NDJSON), `token` (a JWT the server accepts), the
//! global `--url` / `PRESENCE_URL` and `--token` / `PRESENCE_TOKEN`, and the exit
//! statuses: 1 with one line on stderr for a failed call, 2 for bad usage.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use presence::config::Config;
use presence::server::Server;
use presence::store::MemoryStore;
use serde_json::{json, Value};
use tokio::sync::oneshot;

const BIN: &str = env!("CARGO_BIN_EXE_presencectl");

/// A server on `127.0.0.1:<free port>`, stopped when dropped.
struct Running {
    addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

impl Running {
    async fn start(vars: &[(&str, &str)]) -> Running {
        let mut all: Vec<(&str, &str)> = vec![
            ("PRESENCE_HTTP_HOST", "127.0.0.1"),
            ("PRESENCE_HTTP_PORT", "0"),
            ("PRESENCE_RATE_LIMIT_RATE", "100000"),
            ("PRESENCE_RATE_LIMIT_CAPACITY", "100000"),
        ];
        all.extend_from_slice(vars);
        let config = Config::from_lookup(|name| {
            all.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| (*v).to_owned())
        })
        .unwrap_or_else(|e| panic!("config: {e}"));
        let server = Server::bind(&config, Arc::new(MemoryStore::new()))
            .await
            .unwrap_or_else(|e| panic!("bind: {e}"));
        let addr = server.local_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        Running { addr, _stop: stop }
    }

    fn base(&self) -> String {
        format!("http://{}/presence", self.addr)
    }
}

/// `presencectl args...` with a clean environment plus `env`.
fn command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    cmd.envs(env.iter().copied());
    cmd
}

/// Runs it to the end (off the runtime's threads, which serve the server).
async fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = command(args, env);
    tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap_or_else(|e| panic!("join: {e}"))
        .unwrap_or_else(|e| panic!("run {BIN}: {e}"))
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts success and returns stdout.
fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{:?}: stdout {:?} stderr {:?}",
        out.status,
        stdout(out),
        stderr(out)
    );
    stdout(out)
}

/// Asserts exit status `code` with nothing on stdout and one `presencectl: ...`
/// line on stderr; returns the line.
fn failed(out: &Output, code: i32) -> String {
    assert_eq!(out.status.code(), Some(code), "stderr {:?}", stderr(out));
    assert_eq!(stdout(out), "", "nothing on stdout");
    let err = stderr(out);
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    assert!(err.starts_with("presencectl: "), "{err:?}");
    err.trim_end().to_owned()
}

/// Logs a node in through the SDK (with `token`, if any); `body` as the API's.
async fn login(server: &Running, body: Value, token: Option<&str>) {
    let client = presence::client::PresenceClient::builder(server.base());
    let client = match token {
        Some(t) => client.bearer_token(t),
        None => client,
    }
    .build()
    .unwrap_or_else(|e| panic!("client: {e}"));
    let id = body["node_id"].as_str().unwrap_or_default().to_owned();
    let meta = body["meta"].as_object().cloned().unwrap_or_default();
    let status = body["status"]
        .as_str()
        .map(|s| s.parse().unwrap_or_else(|e| panic!("{e}")))
        .unwrap_or_default();
    client
        .login_with_status(&id, meta, status)
        .await
        .unwrap_or_else(|e| panic!("login {id}: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_get_and_stats_print_tables_or_json_and_take_the_filters() {
    let server = Running::start(&[]).await;
    let url = server.base();
    for (id, status, region) in [
        ("web-1", "up", "eu"),
        ("web-2", "degraded", "us"),
        ("db-1", "draining", "eu"),
    ] {
        login(
            &server,
            json!({"node_id": id, "status": status, "meta": {"region": region, "load": 0.5}}),
            None,
        )
        .await;
    }

    let table = ok(&run(&["list", "--url", &url], &[]).await);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    assert!(
        lines[0].starts_with("NODE   STATUS    LAST SEEN  EXPIRES IN  META"),
        "{table}"
    );
    assert!(lines[1].starts_with("db-1   draining"), "{table}");
    assert!(lines[1].ends_with("load=0.5 region=eu"), "{table}");
    // The columns line up: every row's status starts where the header's does.
    let column = lines[0].find("STATUS").unwrap_or_default();
    for line in &lines[1..] {
        let (before, at) = line.split_at(column);
        assert!(before.ends_with("  ") && !at.starts_with(' '), "{table}");
    }

    // Filters as flags, and PRESENCE_URL instead of --url.
    let env = [("PRESENCE_URL", url.as_str())];
    let json_out = ok(&run(
        &[
            "list",
            "--prefix",
            "web-",
            "--status",
            "up,degraded",
            "--json",
        ],
        &env,
    )
    .await);
    let nodes: Value =
        serde_json::from_str(&json_out).unwrap_or_else(|e| panic!("{e}: {json_out}"));
    let ids: Vec<&str> = nodes
        .as_array()
        .map(|a| a.iter().filter_map(|n| n["node_id"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(ids, ["web-1", "web-2"]);
    let eu = ok(&run(&["list", "--meta", "region=eu", "--json"], &env).await);
    let eu: Value = serde_json::from_str(&eu).unwrap_or_default();
    assert_eq!(eu.as_array().map(Vec::len), Some(2), "{eu}");

    let one = ok(&run(&["get", "web-2"], &env).await);
    assert!(
        one.starts_with("node_id      web-2\nstatus       degraded\n"),
        "{one}"
    );
    let one = ok(&run(&["get", "web-2", "--json"], &env).await);
    let one: Value = serde_json::from_str(&one).unwrap_or_default();
    assert_eq!(one["meta"], json!({"load": 0.5, "region": "us"}));

    let stats = ok(&run(&["stats"], &env).await);
    assert_eq!(stats, "3 online: 1 up, 1 degraded, 1 draining\n");
    let stats = ok(&run(&["stats", "--json"], &env).await);
    assert_eq!(
        serde_json::from_str::<Value>(&stats).unwrap_or_default(),
        json!({"online": 3, "by_status": {"up": 1, "degraded": 1, "draining": 1}})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_calls_exit_1_and_bad_usage_exits_2_with_one_line_on_stderr() {
    let server = Running::start(&[("PRESENCE_AUTH_TOKEN", "t0ken")]).await;
    let url = server.base();
    let env = [("PRESENCE_URL", url.as_str())];

    let missing = failed(&run(&["get", "nobody", "--token", "t0ken"], &env).await, 1);
    assert!(missing.contains("\"nobody\" is not online"), "{missing}");
    let refused = failed(&run(&["stats"], &env).await, 1);
    assert!(refused.contains("unauthorized"), "{refused}");
    // The token from the environment works.
    let stats = ok(&run(
        &["stats"],
        &[("PRESENCE_URL", &url), ("PRESENCE_TOKEN", "t0ken")],
    )
    .await);
    assert_eq!(stats, "0 online: 0 up, 0 degraded, 0 draining\n");
    // Nobody listening.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("{e}"));
    let dead = format!("http://127.0.0.1:{port}/presence");
    let unreachable = failed(&run(&["list", "--url", &dead], &[]).await, 1);
    assert!(unreachable.contains("transport"), "{unreachable}");

    for args in [
        &["list", "--status", "sideways"][..],
        &["frobnicate"],
        &[],
        &["get"],
        &["list", "--meta", "novalue"],
        &["token", "--scope", "read", "--ttl", "1w"],
        &["list", "--url", "ftp://example.invalid/presence"],
    ] {
        let out = run(args, &env).await;
        let line = failed(&out, 2);
        assert!(!line.contains('\n'), "{args:?}: {line}");
    }
    // Help is no error.
    let help = ok(&run(&["--help"], &[]).await);
    for word in ["list", "get", "watch", "stats", "token", "--url", "--token"] {
        assert!(help.contains(word), "help names {word}: {help}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_mints_a_jwt_the_server_accepts_for_its_node_only() {
    let secret = "the-shared-hs256-secret";
    let server = Running::start(&[("PRESENCE_JWT_SECRET", secret)]).await;
    let env = [("PRESENCE_JWT_SECRET", secret)];

    let writer = ok(&run(
        &[
            "token", "--sub", "node-7", "--scope", "write", "--ttl", "24h",
        ],
        &env,
    )
    .await);
    let writer = writer.trim_end();
    assert_eq!(writer.split('.').count(), 3, "a JWT: {writer}");
    let payload = writer.split('.').nth(1).unwrap_or_default();
    let claims: Value =
        base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, payload)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_else(|| panic!("the claims of {writer}"));
    assert_eq!(claims["sub"], "node-7");
    assert_eq!(claims["scope"], "presence:write");
    let lifetime = claims["exp"].as_u64().unwrap_or(0) - claims["iat"].as_u64().unwrap_or(0);
    assert_eq!(lifetime, 86_400);

    // It logs its node in, and only its node; it cannot read.
    login(&server, json!({"node_id": "node-7"}), Some(writer)).await;
    let other = presence::client::PresenceClient::builder(server.base())
        .bearer_token(writer)
        .build()
        .unwrap_or_else(|e| panic!("{e}"))
        .login("node-8")
        .await;
    assert!(
        matches!(
            other,
            Err(presence::client::ClientError::Server { status: 403, .. })
        ),
        "{other:?}"
    );
    let url = server.base();
    let cannot_read = failed(
        &run(&["list", "--url", &url, "--token", writer], &[]).await,
        1,
    );
    assert!(cannot_read.contains("403"), "{cannot_read}");

    let reader = ok(&run(&["token", "--scope", "presence:read", "--ttl", "5m"], &env).await);
    let listed = ok(&run(
        &["list", "--json", "--url", &url],
        &[("PRESENCE_TOKEN", reader.trim_end())],
    )
    .await);
    assert!(listed.contains("\"node-7\""), "{listed}");

    // No secret, or a write token for nobody: bad usage.
    let no_secret = failed(
        &run(&["token", "--sub", "n", "--scope", "write"], &[]).await,
        2,
    );
    assert!(no_secret.contains("PRESENCE_JWT_SECRET"), "{no_secret}");
    let nobody = failed(&run(&["token", "--scope", "write"], &env).await, 2);
    assert!(nobody.contains("--sub"), "{nobody}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_a_line_per_event_or_ndjson() {
    let server = Running::start(&[]).await;
    let url = server.base();
    login(&server, json!({"node_id": "early"}), None).await;

    for json_mode in [false, true] {
        let mut args = vec!["watch", "--url", url.as_str(), "--prefix", "w-"];
        if json_mode {
            args.push("--json");
        }
        let mut child = command(&args, &[])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn: {e}"));
        let out = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
        let (tx, lines) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let next = || {
            lines
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("no line from watch: {e}"))
        };
        let id = if json_mode { "w-json" } else { "w-text" };
        let first = next();
        login(&server, json!({"node_id": id, "meta": {"k": "v"}}), None).await;
        let join = next();
        let client = presence::client::PresenceClient::new(&url).unwrap_or_else(|e| panic!("{e}"));
        // A login through this client so that it holds the lease to log out with.
        client.login(id).await.unwrap_or_else(|e| panic!("{e}"));
        let rejoin = next();
        client.logout(id).await.unwrap_or_else(|e| panic!("{e}"));
        let leave = next();
        let _ = child.kill();
        let _ = child.wait();

        if json_mode {
            let parse =
                |l: &str| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            let (first, join, rejoin, leave) =
                (parse(&first), parse(&join), parse(&rejoin), parse(&leave));
            assert_eq!(first["event"], "snapshot");
            assert_eq!(first["data"], json!({"nodes": []}), "the filter applies");
            assert_eq!(join["event"], "join");
            assert_eq!(join["data"]["node_id"], id);
            assert_eq!(join["data"]["meta"], json!({"k": "v"}));
            assert_eq!(rejoin["event"], "join");
            assert_eq!(leave["event"], "leave");
            assert_eq!(leave["data"], json!({"node_id": id, "reason": "logout"}));
            for event in [&first, &join, &leave] {
                assert!(
                    event["id"].as_str().is_some_and(|c| !c.is_empty()),
                    "{event}"
                );
            }
        } else {
            assert_eq!(first, "snapshot 0 nodes");
            assert_eq!(join, format!("join     {id} up k=v"));
            assert_eq!(rejoin, format!("join     {id} up"));
            assert_eq!(leave, format!("leave    {id} (logout)"));
        }
    }
}
