//! HTTPS (`PRESENCE_TLS_CERT_FILE`, `PRESENCE_TLS_KEY_FILE`) on a real socket, with
//! certificates made at test time (a CA and a server certificate for 127.0.0.1 and
//! localhost): reqwest, the client SDK and curl trust the CA; ALPN picks HTTP/2 or
//! HTTP/1.1; a silent client is closed within the header timeout; bad TLS variables
//! are configuration errors naming the variable (exit 2 from the binary).

mod support;

use std::time::{Duration, Instant};

use presence::client::{ClientError, PresenceClient};
use presence::config::{Config, ENV_TLS_CERT_FILE, ENV_TLS_KEY_FILE};
use support::client::{get_with, http};
use support::process::{clean_command, example_binary_or_skip, ChildGuard};
use support::raw_http::read_to_close;
use support::server::TestServer;
use support::tls::{https_client, TestCerts};
use support::within;
use tokio::net::TcpStream;

/// A TLS server on the in-memory store, with `extra` variables.
async fn https_server(certs: &TestCerts, extra: &[(&str, &str)]) -> TestServer {
    let tls = certs.server_vars();
    let mut vars: Vec<(&str, &str)> = tls.iter().map(|(k, v)| (*k, v.as_str())).collect();
    vars.extend_from_slice(extra);
    let server = TestServer::memory(&support::config(&vars)).await;
    assert_eq!(server.scheme, "https");
    server
}

#[tokio::test]
async fn reqwest_gets_http2_by_alpn_and_http1_when_it_offers_only_that() {
    within(30, async {
        let certs = TestCerts::generate();
        let server = https_server(&certs, &[]).await;

        let h2 = get_with(&https_client(&certs, false), &server.url("/healthz")).await;
        assert_eq!(h2.status, 200, "{h2:?}");
        let res = https_client(&certs, false)
            .get(server.url("/presence"))
            .send()
            .await
            .expect("HTTPS request");
        assert_eq!(res.version(), http::Version::HTTP_2);
        assert_eq!(res.text().await.expect("body"), "[]");

        let res = https_client(&certs, true)
            .get(server.url("/presence"))
            .send()
            .await
            .expect("HTTPS request, HTTP/1.1 only");
        assert_eq!(res.version(), http::Version::HTTP_11);
        assert_eq!(res.status(), 200);

        // Plain HTTP on the TLS port gets no answer, and an untrusting client
        // refuses the certificate.
        let plain = http()
            .get(format!("http://{}/healthz", server.addr))
            .send()
            .await;
        assert!(plain.is_err(), "plain HTTP answered: {plain:?}");
        let other = TestCerts::generate();
        let untrusted = https_client(&other, false)
            .get(server.url("/healthz"))
            .send()
            .await;
        assert!(
            untrusted.is_err(),
            "a foreign CA was accepted: {untrusted:?}"
        );
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn the_client_sdk_speaks_https_with_a_private_ca() {
    within(30, async {
        let certs = TestCerts::generate();
        let server = https_server(&certs, &[]).await;
        assert!(server.base().starts_with("https://"));

        let pc = PresenceClient::builder(server.base())
            .tls_ca_pem(certs.ca_pem.as_bytes().to_vec())
            .build()
            .expect("client");
        pc.login("tls-node").await.expect("login over https");
        pc.heartbeat("tls-node")
            .await
            .expect("heartbeat over https");
        let nodes = pc.list_nodes().await.expect("list over https");
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].node_id, "tls-node");
        assert!(pc.logout("tls-node").await.expect("logout over https"));

        // Without the CA the system's roots do not know the server: a transport
        // error, not a silent plain-text fallback.
        let stranger = PresenceClient::builder(server.base())
            .no_retry()
            .build()
            .expect("client");
        let refused = stranger.list_nodes().await;
        assert!(
            matches!(refused, Err(ClientError::Transport(_))),
            "{refused:?}"
        );
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn curl_with_cacert_negotiates_http2_and_http1() {
    within(60, async {
        if std::process::Command::new("curl")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("skipping: curl is not installed");
            return;
        }
        let certs = TestCerts::generate();
        let server = https_server(&certs, &[]).await;
        for (flag, want) in [("--http2", "2"), ("--http1.1", "1.1")] {
            let url = server.url("/presence");
            let ca = certs.ca_file.clone();
            let out = tokio::task::spawn_blocking(move || {
                std::process::Command::new("curl")
                    .args(["-sS", "--max-time", "10", flag, "--cacert"])
                    .arg(&ca)
                    .args(["-w", "\n%{http_version} %{http_code}", url.as_str()])
                    .output()
            })
            .await
            .expect("join")
            .expect("run curl");
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "curl {flag}: {stdout} {stderr}");
            if want == "2" && stderr.contains("not support") {
                eprintln!("curl has no HTTP/2; HTTP/1.1 checked only");
                continue;
            }
            assert_eq!(stdout, format!("[]\n{want} 200"), "curl {flag}: {stderr}");
        }
        server.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_nothing_is_closed_within_the_header_timeout() {
    const TIMEOUT: Duration = Duration::from_millis(1000);
    const SLACK: Duration = Duration::from_millis(750);
    within(15, async {
        let certs = TestCerts::generate();
        let server = https_server(&certs, &[("PRESENCE_HEADER_TIMEOUT_MS", "1000")]).await;
        let mut stream = TcpStream::connect(server.addr).await.expect("connect");
        let connected = Instant::now();
        let reply = read_to_close(&mut stream).await;
        let closed_after = connected.elapsed();
        assert!(reply.is_empty(), "{reply:?}");
        assert!(
            closed_after <= TIMEOUT + SLACK && closed_after >= TIMEOUT - Duration::from_millis(100),
            "closed after {closed_after:?} (header timeout {TIMEOUT:?})"
        );
        println!("silent TLS client: closed {closed_after:?} after connecting");
        // The server still serves.
        let ok = get_with(&https_client(&certs, false), &server.url("/healthz")).await;
        assert_eq!(ok.status, 200);
        server.stop().await;
    })
    .await;
}

/// Variables and their values.
type Vars<'a> = Vec<(&'a str, String)>;

/// What `Config::from_lookup` says of `vars`.
fn config_error(vars: &[(&str, String)]) -> presence::config::ConfigError {
    Config::from_lookup(|name| {
        vars.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.clone())
    })
    .expect_err("a bad TLS configuration was accepted")
}

#[test]
fn bad_tls_variables_are_errors_naming_the_variable() {
    let certs = TestCerts::generate();
    let other = TestCerts::generate();
    let cert = certs.cert_file.display().to_string();
    let key = certs.key_file.display().to_string();
    let missing = certs.dir.join("missing.pem").display().to_string();
    let garbage = certs
        .write("garbage.pem", "not PEM at all")
        .display()
        .to_string();
    let cases: Vec<(&str, Vars, &str)> = vec![
        (
            ENV_TLS_CERT_FILE,
            vec![(ENV_TLS_CERT_FILE, cert.clone())],
            "must be set too",
        ),
        (
            ENV_TLS_KEY_FILE,
            vec![(ENV_TLS_KEY_FILE, key.clone())],
            "must be set too",
        ),
        (
            ENV_TLS_CERT_FILE,
            vec![
                (ENV_TLS_CERT_FILE, missing.clone()),
                (ENV_TLS_KEY_FILE, key.clone()),
            ],
            "cannot read",
        ),
        (
            ENV_TLS_KEY_FILE,
            vec![
                (ENV_TLS_CERT_FILE, cert.clone()),
                (ENV_TLS_KEY_FILE, missing),
            ],
            "cannot read",
        ),
        (
            ENV_TLS_CERT_FILE,
            vec![
                (ENV_TLS_CERT_FILE, garbage.clone()),
                (ENV_TLS_KEY_FILE, key.clone()),
            ],
            "certificate",
        ),
        (
            ENV_TLS_KEY_FILE,
            vec![
                (ENV_TLS_CERT_FILE, cert.clone()),
                (ENV_TLS_KEY_FILE, garbage.clone()),
            ],
            "key",
        ),
        (
            ENV_TLS_KEY_FILE,
            vec![
                (ENV_TLS_CERT_FILE, cert.clone()),
                (ENV_TLS_KEY_FILE, other.key_file.display().to_string()),
            ],
            "does not belong",
        ),
        (
            "PRESENCE_REDIS_CA_FILE",
            vec![("PRESENCE_REDIS_CA_FILE", garbage)],
            "certificate",
        ),
    ];
    for (var, vars, why) in cases {
        let e = config_error(&vars);
        assert_eq!(e.var, var, "{vars:?}: {e}");
        assert!(e.to_string().contains(why), "{vars:?}: {e}");
    }
    // Both, readable and matching: HTTPS.
    let ok = Config::from_lookup(|name| match name {
        ENV_TLS_CERT_FILE => Some(cert.clone()),
        ENV_TLS_KEY_FILE => Some(key.clone()),
        _ => None,
    })
    .expect("a good certificate and key");
    assert!(matches!(ok.tls_server_config(), Ok(Some(_))));
    assert!(
        !format!("{ok:?}").contains("PRIVATE KEY"),
        "the key leaks in Debug"
    );
}

#[tokio::test]
async fn the_binary_exits_2_naming_a_bad_tls_variable() {
    let Some(bin) = example_binary_or_skip("presence_server") else {
        return;
    };
    within(60, async {
        let certs = TestCerts::generate();
        let garbage = certs.write("garbage.pem", "not PEM at all");
        for (vars, named) in [
            (
                vec![(ENV_TLS_CERT_FILE, certs.cert_file.clone())],
                ENV_TLS_CERT_FILE,
            ),
            (
                vec![
                    (ENV_TLS_CERT_FILE, certs.cert_file.clone()),
                    (ENV_TLS_KEY_FILE, garbage),
                ],
                ENV_TLS_KEY_FILE,
            ),
        ] {
            let mut cmd = clean_command(&bin);
            cmd.env("PRESENCE_HTTP_PORT", "0");
            for (var, path) in &vars {
                cmd.env(var, path);
            }
            let mut child = ChildGuard::spawn(cmd).expect("spawn presence_server");
            let status = child
                .wait_exit(Duration::from_secs(15))
                .await
                .unwrap_or_else(|| panic!("{vars:?}: still running"));
            assert_eq!(status.code(), Some(2), "{vars:?}: {status:?}");
            let lines = child.remaining_lines();
            let errors: Vec<&String> = lines.iter().filter(|l| !l.trim().is_empty()).collect();
            assert_eq!(errors.len(), 1, "{vars:?}: {lines:#?}");
            assert!(errors[0].contains(named), "{vars:?}: {:?}", errors[0]);
        }
    })
    .await;
}

#[cfg(unix)]
#[tokio::test]
async fn the_binary_serves_https_and_logs_its_https_address() {
    let Some(bin) = example_binary_or_skip("presence_server") else {
        return;
    };
    within(60, async {
        let certs = TestCerts::generate();
        let mut cmd = clean_command(&bin);
        cmd.env("PRESENCE_HTTP_HOST", "127.0.0.1")
            .env("PRESENCE_HTTP_PORT", "0");
        for (var, value) in certs.server_vars() {
            cmd.env(var, value);
        }
        let mut child = ChildGuard::spawn(cmd).expect("spawn presence_server");
        let (addr, log) = child.find_line(Duration::from_secs(15), |line| {
            line.contains("listening on https://")
                .then(|| support::process::parse_listen_addr(line))
                .flatten()
        });
        let addr = addr.unwrap_or_else(|| panic!("no `listening on https://...` in {log:#?}"));
        let reply = get_with(
            &https_client(&certs, false),
            &format!("https://{addr}/healthz"),
        )
        .await;
        assert_eq!(reply.status, 200);
        child.signal("TERM");
        let status = child.wait_exit(Duration::from_secs(15)).await;
        assert_eq!(status.and_then(|s| s.code()), Some(0));
    })
    .await;
}

/// Prints what TLS costs a request on an open connection: 300 sequential
/// `GET /healthz` over HTTPS (HTTP/2 and HTTP/1.1) next to plain HTTP/1.1, one
/// connection each (`cargo test --test https -- --nocapture` shows the figures).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_latency_over_https_next_to_plain_http() {
    within(60, async {
        let certs = TestCerts::generate();
        let tls = https_server(&certs, &[("PRESENCE_RATE_LIMIT_RATE", "100000")]).await;
        let plain =
            TestServer::memory(&support::config(&[("PRESENCE_RATE_LIMIT_RATE", "100000")])).await;
        const N: u32 = 300;
        for (what, client, url) in [
            ("plain HTTP/1.1", http(), plain.url("/healthz")),
            (
                "HTTPS HTTP/2",
                https_client(&certs, false),
                tls.url("/healthz"),
            ),
            (
                "HTTPS HTTP/1.1",
                https_client(&certs, true),
                tls.url("/healthz"),
            ),
        ] {
            // The first request pays for the connection (and the handshake).
            let first = Instant::now();
            assert_eq!(get_with(&client, &url).await.status, 200);
            let connect = first.elapsed();
            let started = Instant::now();
            for _ in 0..N {
                assert_eq!(get_with(&client, &url).await.status, 200);
            }
            let per_request = started.elapsed() / N;
            println!("{what}: first request {connect:?}, then {per_request:?} per request");
        }
        tls.stop().await;
        plain.stop().await;
    })
    .await;
}
