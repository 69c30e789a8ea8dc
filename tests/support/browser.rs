//! A headless Chromium driven over WebDriver, for the status page tests.
//!
//! `chromedriver` runs as a child process on a free port, in a process group of its
//! own, and starts Debian's `chromium` (headless, its own throwaway profile). The
//! test speaks the W3C WebDriver protocol to it with the reqwest client the other
//! tests use: a handful of JSON requests (new session, navigate, execute script,
//! screenshot, delete session), so no WebDriver or CDP crate is compiled for it.
//!
//! When the test ends, early or not, the session is deleted (Chromium quits) and
//! the driver's process group is killed, so no browser outlives its test.
//!
//! Without Chromium the tests skip with the reason, unless `PRESENCE_REQUIRE_BROWSER=1`
//! (as CI sets it), which turns the skip into a failure. `PRESENCE_CHROMIUM` and
//! `PRESENCE_CHROMEDRIVER` name other binaries.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

use super::free_port;
use super::process::{clean_command, ChildGuard};

/// Where Chromium and its driver are.
#[derive(Clone, Debug)]
pub struct BrowserBinaries {
    /// The browser (`/usr/bin/chromium` on Debian).
    pub chromium: PathBuf,
    /// Its WebDriver server (`/usr/bin/chromedriver`, package `chromium-driver`).
    pub chromedriver: PathBuf,
}

/// The first of `names` that is an executable file: absolute, or found on `PATH`.
fn find_program(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    names.iter().find_map(|name| {
        let name = Path::new(name);
        if name.is_absolute() {
            return name.is_file().then(|| name.to_path_buf());
        }
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    })
}

/// Chromium and chromedriver, or why they are not there.
pub fn find_browser() -> Result<BrowserBinaries, String> {
    let from_env = |var: &str| std::env::var(var).ok().filter(|v| !v.is_empty());
    let chromium = match from_env("PRESENCE_CHROMIUM") {
        Some(path) => Some(PathBuf::from(path)),
        None => find_program(&["chromium", "chromium-browser", "google-chrome"]),
    }
    .ok_or("no chromium on PATH (Debian: apt-get install chromium chromium-driver)")?;
    let chromedriver = match from_env("PRESENCE_CHROMEDRIVER") {
        Some(path) => Some(PathBuf::from(path)),
        None => find_program(&["chromedriver"]),
    }
    .ok_or("no chromedriver on PATH (Debian: apt-get install chromium-driver)")?;
    Ok(BrowserBinaries {
        chromium,
        chromedriver,
    })
}

/// [`find_browser`], or `None` with the reason on stderr (the test then skips);
/// under `PRESENCE_REQUIRE_BROWSER=1` a missing browser fails the test instead.
pub fn browser_or_skip() -> Option<BrowserBinaries> {
    match find_browser() {
        Ok(found) => Some(found),
        Err(why) if std::env::var("PRESENCE_REQUIRE_BROWSER").as_deref() == Ok("1") => {
            panic!("PRESENCE_REQUIRE_BROWSER=1, but {why}")
        }
        Err(why) => {
            eprintln!("skipping: {why}");
            None
        }
    }
}

/// One browser window in a WebDriver session.
pub struct Browser {
    driver: ChildGuard,
    http: reqwest::Client,
    port: u16,
    session: String,
    profile: PathBuf,
}

impl Browser {
    /// Starts chromedriver on a free port and opens a headless Chromium window of
    /// `width` x `height` CSS pixels.
    pub async fn start(binaries: &BrowserBinaries, width: u32, height: u32) -> Browser {
        let port = free_port();
        let profile =
            std::env::temp_dir().join(format!("presence-ui-test-{}-{port}", std::process::id()));
        let mut cmd = clean_command(&binaries.chromedriver);
        cmd.arg(format!("--port={port}"));
        // Its own process group: Chromium is its child, and the whole group goes at
        // the end even if the driver cannot close the browser.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let driver = ChildGuard::spawn(cmd)
            .unwrap_or_else(|e| panic!("start {}: {e}", binaries.chromedriver.display()));
        let http = super::client::http();
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = http.get(format!("{base}/status")).send().await;
            if let Ok(res) = ready {
                let status: Value = res.json().await.unwrap_or_default();
                if status["value"]["ready"] == true {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver did not answer on port {port} within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let args = [
            "--headless=new".to_owned(),
            // Root in a container has no user namespace for the sandbox.
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--no-first-run".to_owned(),
            "--no-default-browser-check".to_owned(),
            "--disable-extensions".to_owned(),
            "--no-proxy-server".to_owned(),
            // Timers and animation frames at full speed, as in a tab in front.
            "--disable-background-timer-throttling".to_owned(),
            "--disable-renderer-backgrounding".to_owned(),
            "--disable-backgrounding-occluded-windows".to_owned(),
            "--force-device-scale-factor=1".to_owned(),
            "--lang=en-US".to_owned(),
            format!("--window-size={width},{height}"),
            format!("--user-data-dir={}", profile.display()),
        ];
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": binaries.chromium.to_string_lossy(),
                "args": args,
            },
        }}});
        let res = http
            .post(format!("{base}/session"))
            .json(&capabilities)
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .unwrap_or_else(|e| panic!("WebDriver new session: {e}"));
        let reply: Value = res
            .json()
            .await
            .unwrap_or_else(|e| panic!("WebDriver new session reply: {e}"));
        let session = reply["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| {
                let (_, lines) = driver.find_line(Duration::from_millis(200), |_| None::<()>);
                panic!("no WebDriver session: {reply}\nchromedriver said: {lines:#?}")
            })
            .to_owned();
        Browser {
            driver,
            http,
            port,
            session,
            profile,
        }
    }

    fn url(&self, path: &str) -> String {
        format!(
            "http://127.0.0.1:{}/session/{}{path}",
            self.port, self.session
        )
    }

    /// A WebDriver command: its `value`, or a panic naming the command and the error.
    async fn command(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self.http.request(method.clone(), self.url(path));
        if let Some(body) = body {
            req = req.json(&body);
        }
        let res = req
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"));
        let status = res.status();
        let reply: Value = res
            .json()
            .await
            .unwrap_or_else(|e| panic!("WebDriver {method} {path}: reply is not JSON: {e}"));
        assert!(
            status.is_success(),
            "WebDriver {method} {path}: {status} {reply}"
        );
        reply["value"].clone()
    }

    /// Navigates to `url` and waits for the page to load.
    pub async fn goto(&self, url: &str) {
        self.command(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
            .await;
    }

    /// Runs `script` (a function body: `return ...;`) in the page with `args` as
    /// `arguments`, and returns its JSON result.
    pub async fn eval(&self, script: &str, args: Value) -> Value {
        self.command(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({ "script": script, "args": args })),
        )
        .await
    }

    /// Polls `script` every 50 ms until it returns something other than `null` or
    /// `false`, and returns that; after `secs` seconds, fails with `what` and the
    /// last value. (A browser is a process of its own: waiting on what it shows is
    /// the only way to know it is done.)
    pub async fn wait_for(&self, what: &str, secs: u64, script: &str, args: Value) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let value = self.eval(script, args.clone()).await;
            if !value.is_null() && value != Value::Bool(false) {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not so within {secs} s (last value {value})"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A PNG of the window.
    pub async fn screenshot(&self) -> Vec<u8> {
        let value = self
            .command(reqwest::Method::GET, "/screenshot", None)
            .await;
        let encoded = value.as_str().unwrap_or_default();
        base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap_or_else(|e| panic!("the screenshot is not base64: {e}"))
    }

    /// Closes the browser and stops the driver.
    pub async fn quit(mut self) {
        self.command(reqwest::Method::DELETE, "", None).await;
        self.session.clear();
        self.driver.kill_group();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            // A test that failed before `quit`: close the browser with a plain
            // blocking request (no runtime is needed in a drop), bounded.
            delete_session(self.port, &self.session);
        }
        self.driver.kill_group();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// `DELETE /session/<id>` on a bare connection, waiting at most 10 s for the answer.
fn delete_session(port: u16, session: &str) {
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let request = format!(
        "DELETE /session/{session} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    );
    if stream.write_all(request.as_bytes()).is_ok() {
        let mut reply = Vec::new();
        let _ = stream.read_to_end(&mut reply);
    }
}

/// Serializes the browser tests of one test binary: two Chromiums and the server
/// on two cores would make each other's timings meaningless.
pub static ONE_BROWSER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
