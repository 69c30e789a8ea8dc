//! The `presence_load` example, run as the built binary (`tests/load`): its command line
//! (help, bad usage exits 2), each mode against a presence server in this process or a
//! bare server, the README's way of reading the steady req/s, and the fast failure on a
//! dead server. Skipped, saying why, when the binary has not been built.

mod load;
mod support;

use std::time::{Duration, Instant};

use load::{assert_clean, LoadGen};
use support::process::parse_listen_addr;
use support::server::TestServer;
use support::tls::TestCerts;
use support::{config, free_port, within};

/// A presence server with the per-client rate limit out of the way (all the load comes
/// from one IP), plus `vars`.
async fn presence_server(vars: &[(&str, &str)]) -> TestServer {
    let mut all = vec![
        ("PRESENCE_RATE_LIMIT_RATE", "1000000"),
        ("PRESENCE_RATE_LIMIT_CAPACITY", "1000000"),
    ];
    all.extend_from_slice(vars);
    TestServer::memory(&config(&all)).await
}

#[tokio::test]
async fn help_lists_every_flag_and_mode() {
    let Some(gen) = LoadGen::find() else {
        return;
    };
    within(60, async {
        let run = gen.run(&["--help"]).await;
        run.assert_code(0);
        let help = run.output();
        for word in [
            "--url",
            "--mode",
            "--nodes",
            "--concurrency",
            "--login-concurrency",
            "--duration",
            "--interval-ms",
            "--timeout-ms",
            "--auth",
            "--cacert",
            "--json",
            "--serve-bare",
            "--watchers",
            "--watch-url",
            "--rate",
            "nodes:",
            "flood:",
            "list:",
            "bare:",
            "watch:",
            "expiry:",
            "Exit status",
        ] {
            assert!(help.contains(word), "no {word} in the help:\n{help}");
        }
        gen.run(&["-h"]).await.assert_code(0);
    })
    .await;
}

#[tokio::test]
async fn bad_usage_exits_2_with_a_message() {
    let Some(gen) = LoadGen::find() else {
        return;
    };
    within(60, async {
        for bad in [
            &["--mode", "storm"][..],
            &["--nodes", "many"],
            &["--duration", "0"],
            &["--duration", "-1"],
            &["--concurrency", "0"],
            &["--login-concurrency", "0"],
            &["--interval-ms", "0"],
            &["--url", "https://127.0.0.1/presence"],
            &[
                "--mode",
                "watch",
                "--url",
                "https://127.0.0.1/presence",
                "--cacert",
                "ca.pem",
            ],
            &["--url", "http://127.0.0.1/presence?x=1"],
            &["--url"],
            &["--json=yes"],
            &["--auth", "bad\ttoken\u{7f}"],
            &["--mode", "flood", "--nodes", "0"],
            &["--mode", "expiry", "--nodes", "0"],
            &["--mode", "watch", "--watchers", "0"],
            &["--mode", "watch", "--rate", "0"],
            &["--mode", "watch", "--rate", "fast"],
            &[
                "--mode",
                "watch",
                "--watch-url",
                "https://127.0.0.1/presence",
            ],
            &["--frobnicate"],
        ] {
            let run = gen.run(bad).await;
            run.assert_code(2);
            assert!(run.line("error: ").is_some(), "{}", run.output());
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_reads_both_flag_spellings_and_the_readme_reads_its_rate() {
    let Some(gen) = LoadGen::find() else {
        return;
    };
    within(60, async {
        let server = presence_server(&[]).await;
        let url = server.base();
        let run = gen
            .run(&[
                "--mode=flood",
                "--nodes",
                "5",
                "--concurrency=3",
                "--duration",
                "0.25",
                "--url",
                &url,
                "--json",
            ])
            .await;
        run.assert_code(0);
        let report = run.report();
        assert_eq!(report["mode"], "flood", "{}", run.output());
        assert_eq!(report["url"], url.as_str());
        assert_eq!(report["nodes"], 5);
        assert_eq!(report["concurrency"], 3);
        assert_eq!(report["duration_s"], 0.25);
        let login = run.phase("login");
        assert_clean(&login, &run);
        assert_eq!(login["ok"], 5, "{}", run.output());
        assert_clean(&run.phase("steady"), &run);
        assert!(run.steady_rps() > 0.0, "{}", run.output());
        assert!(run
            .line("presence_load: login: 5 nodes over 3 connections")
            .is_some());
        server.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_over_https_trusts_its_cacert_alone() {
    let Some(gen) = LoadGen::find() else {
        return;
    };
    within(60, async {
        let certs = TestCerts::generate();
        let vars = certs.server_vars();
        let tls: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let server = presence_server(&tls).await;
        let url = server.base();
        assert!(url.starts_with("https://"), "{url}");
        let ca = certs.ca_file.display().to_string();
        let args = |ca: &str| {
            [
                "--mode",
                "flood",
                "--nodes",
                "4",
                "--concurrency",
                "2",
                "--duration",
                "0.25",
                "--url",
                &url,
                "--cacert",
                ca,
                "--json",
            ]
            .map(str::to_owned)
        };
        let args_ok = args(&ca);
        let run = gen
            .run(&args_ok.iter().map(String::as_str).collect::<Vec<_>>())
            .await;
        run.assert_code(0);
        assert_clean(&run.phase("login"), &run);
        assert_clean(&run.phase("steady"), &run);
        assert!(run.steady_rps() > 0.0, "{}", run.output());

        // Another CA: the handshake fails before any request, and the run with it.
        let stranger = TestCerts::generate();
        let args_bad = args(&stranger.ca_file.display().to_string());
        let run = gen
            .run(&args_bad.iter().map(String::as_str).collect::<Vec<_>>())
            .await;
        run.assert_code(1);
        assert!(run.output().contains("TLS handshake"), "{}", run.output());
        server.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_logs_in_over_its_own_connections() {
    let Some(gen) = LoadGen::find() else {
        return;
    };
    within(60, async {
        let server = presence_server(&[]).await;
        let url = server.base();
        let run = gen
            .run(&[
                "--mode",
                "list",
                "--nodes",
                "10",
                "--login-concurrency",
                "8",
                "--concurrency",
                "1",
                "--duration",
                "0.3",
                "--url",
                &url,
                "--json",
            ])
            .await;
        run.assert_code(0);
        assert!(
            run.line("presence_load: login: 10 nodes over 8 connections")
                .is_some(),
            "{}",
            run.output()
        );
        assert_eq!(run.phase("login")["ok"], 10, "{}", run.output());
        let steady = run.phase("steady");
        assert_clean(&steady, &run);
        // Every listing carries the ten nodes.
        let per_listing = steady["bytes_in"].as_u64().unwrap() / steady["ok"].as_u64().unwrap();
        assert!(per_listing > 10 * "load-0".len() as u64, "{}", run.output());
        server.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_mode_keeps_a_schedule_and_auth_is_sent() {
    let Some(gen) = LoadGen::find() else {
        return;
    };
    within(60, async {
        let server = presence_server(&[("PRESENCE_AUTH_TOKEN", "s3cret")]).await;
        let url = server.base();
        let nodes_run = |auth: Option<&'static str>| {
            let mut args = vec![
                "--mode",
                "nodes",
                "--nodes",
                "20",
                "--interval-ms",
                "100",
                "--concurrency",
                "4",
                "--duration",
                "0.5",
                "--url",
                &url,
                "--json",
            ];
            args.extend(auth.iter().flat_map(|token| ["--auth", token]));
            args
        };
        let run = gen.run(&nodes_run(Some("s3cret"))).await;
        run.assert_code(0);
        assert_clean(&run.phase("steady"), &run);
        let schedule = &run.phase("steady")["schedule"];
        assert_eq!(schedule["target_rps"], 200.0, "{}", run.output());
        assert!(
            run.line("steady: schedule target 200.0 req/s").is_some(),
            "{}",
            run.output()
        );

        // Without the token every login is refused: no steady success, exit status 1.
        let run = gen.run(&nodes_run(None)).await;
        run.assert_code(1);
        assert_eq!(
            run.phase("login")["status_errors"]["401"],
            20,
            "{}",
            run.output()
        );
        server.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_mode_floods_its_own_server() {
    let Some(gen) = LoadGen::find() else {
        return;
    };
    within(60, async {
        let run = gen
            .run(&[
                "--mode",
                "bare",
                "--duration",
                "0.5",
                "--concurrency",
                "4",
                "--nodes",
                "10",
                "--json",
            ])
            .await;
        run.assert_code(0);
        assert_clean(&run.phase("steady"), &run);
        let note = run.report()["note"].as_str().unwrap_or_default().to_owned();
        assert!(note.contains("in this process"), "{}", run.output());
        assert!(run.steady_rps() > 0.0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_bare_serves_until_stopped_and_bare_mode_floods_it() {
    let Some(gen) = LoadGen::find() else {
        return;
    };
    within(60, async {
        // Until Ctrl-C (here: until the guard kills it).
        let server = gen.spawn(&["--serve-bare", "0"]);
        let (addr, seen) = server.find_line(Duration::from_secs(15), |line| {
            line.strip_prefix("bare hyper server on ")
                .and_then(|rest| parse_listen_addr(&format!("listening on {rest}")))
        });
        let addr = addr.unwrap_or_else(|| panic!("no address in {seen:?}"));
        let url = format!("http://{addr}/presence");
        let run = gen
            .run(&[
                "--mode",
                "bare",
                "--url",
                &url,
                "--duration",
                "0.3",
                "--concurrency",
                "2",
                "--nodes",
                "4",
                "--json",
            ])
            .await;
        run.assert_code(0);
        assert_clean(&run.phase("steady"), &run);
        let report = run.report();
        assert_eq!(report["addr"], addr.to_string(), "{}", run.output());
        assert!(
            report["note"]
                .as_str()
                .unwrap_or_default()
                .contains("--serve-bare"),
            "{}",
            run.output()
        );
        drop(server);

        // With --duration it stops by itself, with status 0.
        let run = gen.run(&["--serve-bare", "0", "--duration", "0.2"]).await;
        run.assert_code(0);
        assert!(
            run.line("bare hyper server on http://127.0.0.1:").is_some(),
            "{}",
            run.output()
        );
    })
    .await;
}

#[tokio::test]
async fn a_dead_server_fails_the_run_at_once() {
    let Some(gen) = LoadGen::find() else {
        return;
    };
    within(60, async {
        let url = format!("http://127.0.0.1:{}/presence", free_port());
        for mode in ["flood", "list", "nodes", "bare", "watch", "expiry"] {
            let started = Instant::now();
            let run = gen
                .run(&["--mode", mode, "--url", &url, "--duration", "30"])
                .await;
            run.assert_code(1);
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "{}",
                run.output()
            );
            assert!(
                run.line("presence_load: cannot connect to 127.0.0.1:")
                    .is_some(),
                "{}",
                run.output()
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_mode_times_every_join_on_every_watcher() {
    let Some(gen) = LoadGen::find() else {
        return;
    };
    within(60, async {
        let server = presence_server(&[]).await;
        let url = server.base();
        let run = gen
            .run(&[
                "--mode",
                "watch",
                "--watchers",
                "3",
                "--nodes",
                "20",
                "--rate",
                "200",
                "--login-concurrency",
                "4",
                "--duration",
                "5",
                "--url",
                &url,
                "--json",
            ])
            .await;
        run.assert_code(0);
        assert_clean(&run.phase("login"), &run);
        let report = run.report();
        assert_eq!(report["mode"], "watch", "{}", run.output());
        let watch = &report["watch"];
        assert_eq!(watch["ready"], 3, "{}", run.output());
        assert_eq!(watch["connected_at_end"], 3, "{}", run.output());
        assert_eq!(watch["nodes_logged_in"], 20, "{}", run.output());
        assert_eq!(watch["expected"], 60, "{}", run.output());
        assert_eq!(watch["samples"], 60, "{}", run.output());
        assert_eq!(watch["missing"], 0, "{}", run.output());
        assert_eq!(watch["duplicates"], 0, "{}", run.output());
        assert_eq!(watch["events"]["snapshot"], 3, "{}", run.output());
        assert!(
            watch["events"]["join"].as_u64() >= Some(60),
            "{}",
            run.output()
        );
        assert!(
            watch["events_per_s"].as_f64() > Some(0.0),
            "{}",
            run.output()
        );
        let latency = &watch["latency_ms"];
        let figures: Vec<f64> = ["p50", "p90", "p99", "max"]
            .iter()
            .map(|q| latency[q].as_f64().unwrap_or(-1.0))
            .collect();
        assert!(figures[0] > 0.0, "{}", run.output());
        assert!(figures.windows(2).all(|w| w[0] <= w[1]), "{}", run.output());
        // 20 logins at 200/s take about 0.1 s, not the 5 s of --duration.
        assert!(
            run.phase("login")["elapsed_s"].as_f64() < Some(2.0),
            "{}",
            run.output()
        );
        assert!(
            run.line("join latency: 60 samples of 60 expected")
                .is_some(),
            "{}",
            run.output()
        );
        server.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_mode_without_nodes_holds_its_watchers_and_counts_refusals() {
    let Some(gen) = LoadGen::find() else {
        return;
    };
    within(60, async {
        let server = presence_server(&[("PRESENCE_MAX_WATCHERS", "4")]).await;
        let url = server.base();
        let run = gen
            .run(&[
                "--mode",
                "watch",
                "--watchers",
                "4",
                "--nodes",
                "0",
                "--duration",
                "0.3",
                "--url",
                &url,
                "--json",
            ])
            .await;
        run.assert_code(0);
        let watch = &run.report()["watch"];
        assert_eq!(watch["connected_at_end"], 4, "{}", run.output());
        assert_eq!(watch["disconnected"], 0, "{}", run.output());
        assert!(
            run.line("presence_load: watch: holding 4 watchers")
                .is_some(),
            "{}",
            run.output()
        );

        // Past PRESENCE_MAX_WATCHERS the server answers 503: counted, and the run fails.
        let run = gen
            .run(&[
                "--mode",
                "watch",
                "--watchers",
                "6",
                "--nodes",
                "0",
                "--duration",
                "0.3",
                "--url",
                &url,
                "--json",
            ])
            .await;
        run.assert_code(1);
        let watch = &run.report()["watch"];
        assert_eq!(watch["ready"], 4, "{}", run.output());
        assert_eq!(watch["open_failures"]["http_503"], 2, "{}", run.output());
        server.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_mode_reports_each_expiry_once_and_its_lateness() {
    let Some(gen) = LoadGen::find() else {
        return;
    };
    within(60, async {
        let server =
            presence_server(&[("PRESENCE_HEARTBEAT_SEC", "1"), ("PRESENCE_TTL_SEC", "1")]).await;
        let url = server.base();
        let started = Instant::now();
        let run = gen
            .run(&[
                "--mode",
                "expiry",
                "--watchers",
                "2",
                "--nodes",
                "50",
                "--login-concurrency",
                "8",
                "--url",
                &url,
                "--watch-url",
                &url,
                "--json",
            ])
            .await;
        run.assert_code(0);
        assert_eq!(run.phase("login")["ok"], 50, "{}", run.output());
        let watch = &run.report()["watch"];
        assert_eq!(watch["latency_of"], "expiry_lateness", "{}", run.output());
        assert_eq!(watch["expected"], 100, "{}", run.output());
        assert_eq!(watch["samples"], 100, "{}", run.output());
        assert_eq!(watch["duplicates"], 0, "{}", run.output());
        assert_eq!(watch["early"], 0, "{}", run.output());
        assert_eq!(watch["events"]["leave"], 100, "{}", run.output());
        // Lateness is the sweep's: within a few of its 100 ms ticks, not seconds.
        let max = watch["latency_ms"]["max"].as_f64().unwrap_or(-1.0);
        assert!((0.0..2000.0).contains(&max), "{}", run.output());
        // It stopped once every expiry was seen, well before TTL + 10 s.
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "{}",
            run.output()
        );
        server.stop().await;
    })
    .await;
}
