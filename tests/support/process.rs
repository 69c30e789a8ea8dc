//! Child processes: the example binaries (`target/<profile>/examples/`), run with a
//! clean environment, their output read line by line, killed if the test ends early.

use std::io::{self, BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// `target/<profile>/examples/<name>`, found from this test executable
/// (`target/<profile>/deps/<test>-<hash>`). `Err` says why it is not there.
pub fn example_binary(name: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .ok_or_else(|| format!("unexpected test executable location {}", exe.display()))?;
    let path = profile_dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if path.is_file() {
        // `cargo test --test X` rebuilds this test but not the examples: say so when
        // the binary predates it, as it may not contain the latest server code.
        let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        if let (Some(bin), Some(test)) = (modified(&path), modified(&exe)) {
            if bin < test {
                eprintln!(
                    "note: {} is older than this test binary and may be stale; \
                     `cargo build --example {name}` refreshes it",
                    path.display()
                );
            }
        }
        Ok(path)
    } else {
        Err(format!(
            "{} does not exist; `cargo test -p presence-workspace` (without --test) or \
             `cargo build --example {name}` builds it",
            path.display()
        ))
    }
}

/// [`example_binary`], or `None` with the reason on stderr: the test then skips.
pub fn example_binary_or_skip(name: &str) -> Option<PathBuf> {
    match example_binary(name) {
        Ok(path) => Some(path),
        Err(why) => {
            eprintln!("skipping: {why}");
            None
        }
    }
}

/// A command for `program` with a clean presence environment: every `PRESENCE_*`,
/// `NODE_ID` and `RUST_LOG` variable of this process removed, `RUST_LOG=info`,
/// colours off.
pub fn clean_command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("PRESENCE_") || k == "NODE_ID" || k == "RUST_LOG" {
            cmd.env_remove(&key);
        }
    }
    cmd.env("RUST_LOG", "info").env("NO_COLOR", "1");
    cmd
}

/// A child process that is killed (by its own handle) if the test ends early.
pub struct ChildGuard {
    child: Option<Child>,
    lines: Option<mpsc::Receiver<String>>,
}

impl ChildGuard {
    /// Spawns `cmd` with stdout and stderr piped into one line channel.
    pub fn spawn(mut cmd: Command) -> io::Result<ChildGuard> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let (tx, rx) = mpsc::channel();
        if let Some(out) = child.stdout.take() {
            forward_lines(out, tx.clone());
        }
        if let Some(err) = child.stderr.take() {
            forward_lines(err, tx);
        }
        Ok(ChildGuard {
            child: Some(child),
            lines: Some(rx),
        })
    }

    /// Spawns `cmd` with all output discarded.
    pub fn spawn_quiet(mut cmd: Command) -> io::Result<ChildGuard> {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(ChildGuard {
            child: Some(child),
            lines: None,
        })
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Waits up to `timeout` for an output line (ANSI escapes stripped) for which `f`
    /// returns `Some`; returns it and every line seen so far. `None` if the process
    /// ended or the time ran out first.
    pub fn find_line<T>(
        &self,
        timeout: Duration,
        mut f: impl FnMut(&str) -> Option<T>,
    ) -> (Option<T>, Vec<String>) {
        let mut seen = Vec::new();
        let Some(rx) = &self.lines else {
            return (None, seen);
        };
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    let line = strip_ansi(&line);
                    let found = f(&line);
                    seen.push(line);
                    if found.is_some() {
                        return (found, seen);
                    }
                }
                Err(_) => return (None, seen),
            }
        }
    }

    /// Waits (polling, bounded by `timeout`) for the process to exit; `None` if it is
    /// still running then.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    self.child = None;
                    return Some(status);
                }
                Ok(None) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                _ => return None,
            }
        }
    }

    /// Every output line still buffered (ANSI escapes stripped), once the process has
    /// exited and its pipes are closed (bounded).
    pub fn remaining_lines(&self) -> Vec<String> {
        let Some(rx) = &self.lines else {
            return Vec::new();
        };
        let mut lines = Vec::new();
        while let Ok(line) = rx.recv_timeout(Duration::from_secs(5)) {
            lines.push(strip_ansi(&line));
        }
        lines
    }

    /// `kill -<signal>` (`"TERM"`, `"STOP"`, `"CONT"`, ...) to the process; panics if
    /// it has been reaped already or `kill` fails.
    pub fn signal(&self, signal: &str) {
        let pid = self
            .child
            .as_ref()
            .map(Child::id)
            .unwrap_or_else(|| panic!("kill -{signal}: the process has been reaped already"));
        let status = Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {pid}: {status:?}");
    }

    /// Kills the process's whole process group (SIGKILL) and reaps the process: for
    /// a child started as a group leader (`CommandExt::process_group(0)`) that starts
    /// children of its own, such as chromedriver and its Chromium.
    pub fn kill_group(&mut self) {
        if let Some(mut child) = self.child.take() {
            let group = format!("-{}", child.id());
            let _ = Command::new("kill")
                .args(["-KILL", "--", &group])
                .stderr(Stdio::null())
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

fn forward_lines(stream: impl Read + Send + 'static, tx: mpsc::Sender<String>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            match line {
                Ok(line) => {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
    });
}

/// `s` without ANSI escape sequences (`ESC [ ... letter`).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The `host:port` after `http://` (or `https://`) in a log line, e.g. from
/// `... listening on http://127.0.0.1:41234`.
pub fn parse_listen_addr(line: &str) -> Option<SocketAddr> {
    let (_, rest) = line
        .split_once("listening on http://")
        .or_else(|| line.split_once("listening on https://"))?;
    let addr: String = rest
        .chars()
        .take_while(|c| c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '[' | ']'))
        .collect();
    addr.parse().ok()
}
