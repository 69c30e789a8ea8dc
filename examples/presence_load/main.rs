//! `presence_load`: load generator for the presence HTTP API (README, Performance).
//!
//! Start the server with rate limiting effectively off (all the load comes from one IP,
//! and the default per-client bucket is 30 requests/s), then point the generator at it:
//!
//! ```text
//! PRESENCE_HTTP_PORT=8080 PRESENCE_RATE_LIMIT_RATE=1000000 PRESENCE_RATE_LIMIT_CAPACITY=1000000 \
//!     cargo run --release --example presence_server
//!
//! cargo run --release --example presence_load -- --mode nodes --nodes 10000 --interval-ms 1000
//! cargo run --release --example presence_load -- --mode flood --nodes 1000 --concurrency 64 --duration 10
//! cargo run --release --example presence_load -- --mode list --nodes 100000 --login-concurrency 64 --concurrency 1 --duration 5
//! cargo run --release --example presence_load -- --mode bare --duration 3   # in-process bare hyper baseline
//! cargo run --release --example presence_load -- --serve-bare 8081          # bare server only, in its own process
//! cargo run --release --example presence_load -- --mode bare --url http://127.0.0.1:8081/presence --duration 10
//! cargo run --release --example presence_load -- --mode flood --url https://localhost:8443/presence --cacert ca.pem
//! cargo run --release --example presence_load -- --help
//! ```
//!
//! The watch stream (`GET /presence/watch`) across two servers on one Redis: start A
//! and B alike but for the port (`PRESENCE_REDIS_URI=redis://127.0.0.1:6379
//! PRESENCE_KEY_PREFIX=bench`, `PRESENCE_HTTP_PORT=8081` and `8082`, the rate limit off
//! as above, `PRESENCE_MAX_CONNECTIONS=20000 PRESENCE_MAX_WATCHERS=20000` for many
//! watchers, `PRESENCE_TTL_SEC=5` for the expiry run), then:
//!
//! ```text
//! # 1000 watchers on A; 2000 logins through B at 200/s; join latency and fan-out
//! cargo run --release --example presence_load -- --mode watch --watchers 1000 --watch-url http://127.0.0.1:8081/presence \
//!     --url http://127.0.0.1:8082/presence --nodes 2000 --rate 200 --duration 10
//! # 10000 idle watchers held for 30 s (sample the server's VmRSS meanwhile)
//! cargo run --release --example presence_load -- --mode watch --watchers 10000 --nodes 0 --url http://127.0.0.1:8081/presence --duration 30
//! # 10000 nodes logged in through B, never heartbeated; one watcher on A times each expiry
//! cargo run --release --example presence_load -- --mode expiry --nodes 10000 --login-concurrency 64 \
//!     --url http://127.0.0.1:8082/presence --watch-url http://127.0.0.1:8081/presence
//! ```
//!
//! Build with `--release`: a debug build mostly measures the generator itself. The generator
//! and the server share the machine's cores, so compare modes within one machine only. To
//! take little of that shared CPU, the generator speaks HTTP/1.1 through a small client of
//! its own (`client.rs`: one keep-alive connection per worker, requests written from
//! ready-made bytes, responses framed by `Content-Length`), as `wrk` does, rather than
//! through hyper's client; the bare server (`bare.rs`, `--serve-bare`) is plain hyper.
//! The run is bounded: the steady phase stops after `--duration`, every request has a
//! timeout, and the only addresses contacted are the ones in `--url` and `--watch-url`
//! (meant for loopback). `watch` and `expiry` runs are bounded too: the watchers get one
//! timeout for their snapshot, `watch` stops logging in after `--duration` and waits one
//! timeout for the last events, `expiry` stops TTL + 10 s after its logins.
//!
//! Modules: `cli` (the flags, clap), `client` (the HTTP/1 client), `phases` (login and the
//! steady phase of each mode), `report` (counters, hdrhistogram latencies, the summary and
//! the JSON line), `watch` (the watch-stream reader and the `watch` and `expiry` modes),
//! `bare` (the bare hyper server). `tests/presence_load.rs` runs the built
//! binary.

mod bare;
mod cli;
mod client;
mod phases;
mod report;
mod watch;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use bytes::Bytes;

use cli::{Command, Mode, Options};
use client::Target;
use report::Report;

/// Runs one load test as described by `opts`.
async fn run(opts: &Options) -> Result<Report, String> {
    // Where the load goes: a bare server started here, or the server at --url.
    let (target, local_bare) = if opts.mode == Mode::Bare && !opts.bare_external {
        let (addr, server) = bare::spawn(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .map_err(|e| format!("cannot start the bare server: {e}"))?;
        let target = Target::new(addr, &format!("http://{addr}/presence"), opts)?;
        (Arc::new(target), Some(server))
    } else {
        let target = Target::resolve(opts).await?;
        target.check_reachable().await?;
        (Arc::new(target), None)
    };
    let mut phases = Vec::new();
    let mut note = None;
    let mut watched = None;
    if matches!(opts.mode, Mode::Watch | Mode::Expiry) {
        let watch_target = if opts.watch_url == opts.url {
            target.clone()
        } else {
            let t = Target::resolve_url(&opts.watch_url, opts)
                .await
                .map_err(|e| format!("--watch-url {e}"))?;
            t.check_reachable().await?;
            Arc::new(t)
        };
        let (login, stats) = if opts.mode == Mode::Watch {
            watch::watch(&target, &watch_target, opts).await
        } else {
            watch::expiry(&target, &watch_target, opts).await
        };
        phases = login;
        watched = Some(stats);
    } else if opts.mode == Mode::Bare {
        eprintln!(
            "presence_load: bare: flooding {} for {:.1} s over {} connections",
            target.addr,
            opts.duration.as_secs_f64(),
            opts.concurrency
        );
        let requests = phases::bare_requests(&target, opts.nodes);
        phases.push(phases::flood(&target, &requests, opts).await);
        note = Some(match local_bare {
            Some(_) => "bare hyper server in this process: it shares the cores with the generator",
            None => "bare server at --url (start it with --serve-bare PORT in another process)",
        });
    } else {
        let mut heartbeats = Vec::new();
        if opts.nodes > 0 {
            eprintln!(
                "presence_load: login: {} nodes over {} connections",
                opts.nodes,
                opts.login_concurrency.min(opts.nodes)
            );
            let (stats, requests) =
                phases::login(&target, opts.nodes, opts.login_concurrency).await;
            phases.push(stats);
            heartbeats = requests;
        }
        eprintln!(
            "presence_load: steady: {} for {:.1} s over at most {} connections",
            opts.mode.name(),
            opts.duration.as_secs_f64(),
            opts.concurrency
        );
        match opts.mode {
            Mode::Nodes => phases.push(phases::nodes(&target, heartbeats, opts).await),
            Mode::List => phases.push(phases::list(&target, opts).await),
            _ => {
                let requests: Vec<Bytes> = heartbeats.into_iter().flatten().collect();
                if requests.is_empty() {
                    note = Some("no node could log in; the steady phase was skipped");
                } else {
                    phases.push(phases::flood(&target, &requests, opts).await);
                }
            }
        }
    }
    if let Some(server) = local_bare {
        server.abort();
    }
    Ok(Report {
        mode: opts.mode,
        url: target.url.clone(),
        addr: target.addr,
        nodes: opts.nodes,
        concurrency: match opts.mode {
            Mode::Watch | Mode::Expiry => opts.login_concurrency,
            _ => opts.concurrency,
        },
        duration: opts.duration,
        phases,
        watch: watched,
        note: note.map(str::to_owned),
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    match cli::parse() {
        Command::ServeBare { port, duration } => bare::serve(port, duration).await,
        Command::Run(opts) => match run(&opts).await {
            Ok(report) => {
                print!("{}", report.summary());
                if opts.json {
                    println!("{}", report.to_json());
                }
                if report.success() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(e) => {
                eprintln!("presence_load: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
