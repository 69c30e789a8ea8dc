//! Smoke tests for the `presence_load` example: its argument parsing, its histogram, and
//! a short `bare` run against the built-in bare hyper server (no presence server needed).

// The example is compiled as a module here; its `main` and some helpers go unused.
#[allow(dead_code)]
#[path = "../examples/presence_load.rs"]
mod presence_load;

use std::time::Duration;

use presence_load::{parse_args, Command, Histogram, Mode};

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn parse_args_reads_flags_in_both_spellings() {
    let cmd = parse_args(args(&[
        "--mode=flood",
        "--nodes",
        "5",
        "--concurrency=3",
        "--duration",
        "0.25",
        "--url",
        "http://localhost:9000/presence",
        "--json",
    ]))
    .unwrap();
    let Command::Run(opts) = cmd else {
        panic!("expected a run, got {cmd:?}");
    };
    assert_eq!(opts.mode, Mode::Flood);
    assert_eq!(opts.nodes, 5);
    assert_eq!(opts.concurrency, 3);
    assert_eq!(opts.duration, Duration::from_millis(250));
    assert_eq!(opts.url, "http://localhost:9000/presence");
    assert!(opts.json);
}

#[test]
fn parse_args_rejects_bad_input() {
    for bad in [
        &["--mode", "storm"][..],
        &["--nodes", "many"],
        &["--duration", "0"],
        &["--duration", "-1"],
        &["--concurrency", "0"],
        &["--url", "https://127.0.0.1/presence"],
        &["--url"],
        &["--json=yes"],
        &["--frobnicate"],
    ] {
        assert!(parse_args(args(bad)).is_err(), "{bad:?} was accepted");
    }
}

#[test]
fn parse_args_help_and_serve_bare() {
    assert!(matches!(parse_args(args(&["--help"])), Ok(Command::Help)));
    assert!(matches!(
        parse_args(args(&["--serve-bare", "8081"])),
        Ok(Command::ServeBare {
            port: 8081,
            duration: None
        })
    ));
}

#[test]
fn histogram_quantiles_are_within_one_percent() {
    let mut h = Histogram::default();
    // 1 us .. 100 ms in 1 us steps.
    for us in 1..=100_000u64 {
        h.record(us * 1_000);
    }
    for (q, exact) in [
        (0.5, 50_000_000u64),
        (0.99, 99_000_000),
        (0.999, 99_900_000),
    ] {
        let got = h.quantile(q);
        let err = (got as f64 - exact as f64).abs() / exact as f64;
        assert!(err < 0.01, "q{q}: got {got}, exact {exact}");
    }
    assert_eq!(h.max(), 100_000_000);
    assert_eq!(h.count(), 100_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_mode_completes_requests_without_errors() {
    let cmd = parse_args(args(&[
        "--mode",
        "bare",
        "--duration",
        "0.5",
        "--concurrency",
        "4",
        "--nodes",
        "10",
    ]))
    .unwrap();
    let Command::Run(opts) = cmd else {
        panic!("expected a run, got {cmd:?}");
    };
    let report = presence_load::run(&opts).await.unwrap();
    let steady = report.phase("steady").expect("a steady phase");
    assert!(steady.requests() > 0, "no requests: {}", report.summary());
    assert_eq!(steady.errors(), 0, "{}", report.summary());
    assert_eq!(steady.latency().count(), steady.requests());
    assert!(report.success());
    let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
    assert_eq!(json["phases"][0]["name"], "steady");
}

#[test]
fn parse_args_login_concurrency_and_external_bare() {
    let Ok(Command::Run(opts)) = parse_args(args(&[
        "--mode",
        "list",
        "--nodes",
        "10",
        "--login-concurrency",
        "8",
        "--concurrency",
        "1",
    ])) else {
        panic!("expected a run");
    };
    assert_eq!(
        (opts.login_concurrency, opts.concurrency, opts.bare_external),
        (Some(8), 1, false)
    );
    assert!(parse_args(args(&["--login-concurrency", "0"])).is_err());

    // `bare` floods its own in-process server unless a --url names another one.
    let bare = |extra: &[&str]| match parse_args(args(&[&["--mode", "bare"][..], extra].concat())) {
        Ok(Command::Run(opts)) => opts.bare_external,
        other => panic!("expected a run, got {other:?}"),
    };
    assert!(!bare(&[]));
    assert!(bare(&["--url", "http://127.0.0.1:8081/presence"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_mode_floods_an_external_bare_server() {
    let (addr, server) = presence_load::spawn_bare_server(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let url = format!("http://{addr}/presence");
    let Ok(Command::Run(opts)) = parse_args(args(&[
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
    ])) else {
        panic!("expected a run");
    };
    let report = presence_load::run(&opts).await.unwrap();
    server.abort();
    let steady = report.phase("steady").expect("a steady phase");
    assert!(steady.ok() > 0, "{}", report.summary());
    assert_eq!(steady.errors(), 0, "{}", report.summary());
    assert!(report.summary().contains(&addr.to_string()));
}
