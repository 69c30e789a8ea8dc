//! The `presence_load` example binary, run as a child process for the tests: its exit
//! status, its output lines, its `--json` report and the figure the README's scripts read.
//!
//! The binary is `target/<profile>/examples/presence_load`, built by a plain `cargo test`
//! or by `cargo build --example presence_load`; without it the tests skip, saying why.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::support::process::{example_binary, ChildGuard};

/// The built load generator.
pub struct LoadGen(PathBuf);

impl LoadGen {
    /// The binary, or `None` with a note on stderr when it has not been built.
    pub fn find() -> Option<LoadGen> {
        match example_binary("presence_load") {
            Ok(path) => Some(LoadGen(path)),
            Err(why) => {
                eprintln!("skipping: {why}");
                None
            }
        }
    }

    /// Starts it with `args`, stdout and stderr read line by line through the guard.
    pub fn spawn(&self, args: &[&str]) -> ChildGuard {
        let mut cmd = Command::new(&self.0);
        cmd.args(args);
        ChildGuard::spawn(cmd).unwrap_or_else(|e| panic!("spawn {}: {e}", self.0.display()))
    }

    /// Runs it with `args` to its end (at most 60 s).
    pub async fn run(&self, args: &[&str]) -> Run {
        let mut child = self.spawn(args);
        let status = child
            .wait_exit(Duration::from_secs(60))
            .await
            .unwrap_or_else(|| panic!("presence_load {args:?} still running after 60 s"));
        Run {
            args: args.join(" "),
            code: status.code(),
            lines: child.remaining_lines(),
        }
    }
}

/// A finished run: its exit code and every line of stdout and stderr.
pub struct Run {
    args: String,
    /// The exit code (`None` if a signal ended it).
    pub code: Option<i32>,
    /// stdout and stderr, interleaved in the order the lines were read.
    pub lines: Vec<String>,
}

impl Run {
    /// Everything it printed, with its arguments, for assertion messages.
    pub fn output(&self) -> String {
        format!("presence_load {}\n{}", self.args, self.lines.join("\n"))
    }

    /// Asserts the exit code.
    pub fn assert_code(&self, code: i32) {
        assert_eq!(self.code, Some(code), "{}", self.output());
    }

    /// The first line that starts with `prefix`.
    pub fn line(&self, prefix: &str) -> Option<&str> {
        self.lines
            .iter()
            .map(String::as_str)
            .find(|l| l.starts_with(prefix))
    }

    /// The `--json` report (the one line that is a JSON object).
    pub fn report(&self) -> Value {
        self.lines
            .iter()
            .filter(|l| l.starts_with('{'))
            .find_map(|l| serde_json::from_str(l).ok())
            .unwrap_or_else(|| panic!("no JSON report:\n{}", self.output()))
    }

    /// The report's phase called `name` (`login` or `steady`).
    pub fn phase(&self, name: &str) -> Value {
        let report = self.report();
        report["phases"]
            .as_array()
            .and_then(|phases| phases.iter().find(|p| p["name"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("no {name} phase:\n{}", self.output()))
    }

    /// Requests/s of the steady phase as the README's scripts read it: the 5th field of
    /// the first line starting with `steady ` (`grep '^steady ' | head -1 | awk '{print $5}'`).
    pub fn steady_rps(&self) -> f64 {
        self.line("steady ")
            .and_then(|l| l.split_whitespace().nth(4))
            .and_then(|f| f.parse().ok())
            .unwrap_or_else(|| panic!("no steady req/s:\n{}", self.output()))
    }
}

/// Asserts that `phase` (from [`Run::phase`]) had successful requests and no error, and
/// that its latency figures are in order.
pub fn assert_clean(phase: &Value, run: &Run) {
    let (ok, requests) = (phase["ok"].as_u64(), phase["requests"].as_u64());
    assert!(ok.is_some_and(|ok| ok > 0), "{}", run.output());
    assert_eq!(ok, requests, "{}", run.output());
    assert_eq!(phase["errors"], 0, "{}", run.output());
    let latency = &phase["latency_ms"];
    let figures: Vec<f64> = ["p50", "p99", "p999", "max"]
        .iter()
        .map(|q| latency[q].as_f64().unwrap_or(-1.0))
        .collect();
    assert!(figures[0] > 0.0, "p50 of 0 ms: {}", run.output());
    assert!(
        figures.windows(2).all(|w| w[0] <= w[1]),
        "p50 <= p99 <= p999 <= max: {figures:?}\n{}",
        run.output()
    );
    let mean = latency["mean"].as_f64().unwrap_or(-1.0);
    assert!(mean > 0.0 && mean <= figures[3], "{}", run.output());
}
