//! The one support module of the cross-crate tests (`mod support;` in each test file).
//!
//! Here: time bounds, free ports, test configurations, metric and RSS readings. In the
//! submodules:
//!
//! - [`server`]: a presence server on a real socket ([`server::TestServer`]);
//! - [`client`]: a proxy-free HTTP client and replies read completely
//!   ([`client::Reply`], [`client::get`], [`client::post_with`], ...);
//! - [`raw_http`]: hand-written requests on a bare TCP connection;
//! - [`in_process`]: requests to a `PresenceService` called in-process, no socket;
//! - [`process`]: child processes (the example binaries) and their output lines;
//! - [`redis`]: the shared test Redis and throwaway `redis-server` children (plain or TLS);
//! - [`tls`]: a throwaway CA and server certificate (rcgen), HTTPS clients trusting it;
//! - [`browser`]: a headless Chromium driven over WebDriver (the status page).

#![allow(dead_code)] // each test target uses its own subset

pub mod browser;
pub mod client;
pub mod in_process;
pub mod process;
pub mod raw_http;
pub mod redis;
pub mod server;
pub mod tls;

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use presence::config::Config;

/// Fails the test if `fut` takes longer than `secs` instead of hanging.
pub async fn within<T>(secs: u64, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {secs} s"))
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bound and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

/// A configuration read through [`Config::from_lookup`] from `vars`, the way the
/// server reads its environment, bound to `127.0.0.1` on a free port unless `vars`
/// says otherwise. Everything else (the rate limit included) is the default.
pub fn config(vars: &[(&str, &str)]) -> Config {
    let mut map: HashMap<&str, &str> = vars.iter().copied().collect();
    map.entry("PRESENCE_HTTP_HOST").or_insert("127.0.0.1");
    map.entry("PRESENCE_HTTP_PORT").or_insert("0");
    Config::from_lookup(|name| map.get(name).map(|v| (*v).to_owned()))
        .unwrap_or_else(|e| panic!("test configuration rejected: {e}"))
}

/// A configuration for tests that send many requests from one address: `127.0.0.1`,
/// port 0, no practical rate limit, the given store timeout; everything else the
/// defaults. Fields can be changed afterwards (`cfg.ttl = ...`).
pub fn unlimited_config(store_timeout: Duration) -> Config {
    let mut c = Config::default();
    c.http_host = "127.0.0.1".into();
    c.http_port = 0;
    c.rate_limit_rate = 1e9;
    c.rate_limit_capacity = 1_000_000_000;
    c.store_timeout = store_timeout;
    c
}

/// The value of sample `name{labels}` (labels exactly as encoded, e.g.
/// `{kind="timeout"}`; none for a plain series) in a Prometheus/OpenMetrics text
/// scrape.
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

/// `VmRSS` of this process in bytes (Linux), `None` elsewhere.
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
