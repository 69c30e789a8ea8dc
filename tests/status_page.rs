//! The status page (`GET /ui`) in a real headless Chromium, against a real server on
//! a socket: rows appear, change and go as nodes log in, change status, log out and
//! expire, without a reload; node ids and meta render as text, never as HTML; the
//! feed resumes after a server restart; with auth on, the page asks for a token and
//! sends it as a bearer header; 10 000 nodes and a burst of 1 000 events/s keep up;
//! and a screenshot of 50 nodes (`docs/status-page.png`).
//!
//! Chromium is driven over WebDriver (see `support::browser`). Without it these tests
//! skip with the reason, unless `PRESENCE_REQUIRE_BROWSER=1` (CI), where they fail.
//! Everything the browser does is awaited by polling what the page shows, with a
//! deadline: a browser is a process of its own.
//!
//! `PRESENCE_UI_SCREENSHOT=docs/status-page.png cargo test --test status_page
//! a_screenshot` writes the README's screenshot.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use presence::client::PresenceClient;
use presence::config::Config;
use presence::model::{Meta, NodeId, Status};
use presence::store::{MemoryStore, Store};
use serde_json::{json, Value};

use support::browser::{browser_or_skip, Browser, ONE_BROWSER_AT_A_TIME};
use support::client::{http, post_with, Reply};
use support::server::{memory_store_with_nodes, TestServer};

/// How long the page may take to show something the server did.
const SHOW_SECS: u64 = 20;

/// The visible rows: id (as `data-id` and as the text of the id cell), status,
/// badge text, meta text, and whether the row is struck through as leaving.
const ROWS: &str = r#"
return [...document.querySelectorAll('#rows .row')].filter((r) => !r.hidden).map((r) => ({
  id: r.dataset.id, id_text: r.children[0].textContent, status: r.dataset.status,
  badge: r.children[1].textContent, meta: r.children[2].textContent,
  leaving: r.classList.contains('leaving'),
}));
"#;

/// The row of `arguments[0]`, or `null`.
const ROW: &str = r#"
const r = [...document.querySelectorAll('#rows .row')].find((r) => !r.hidden && r.dataset.id === arguments[0]);
return r ? { status: r.dataset.status, badge: r.children[1].textContent, meta: r.children[2].textContent,
             leaving: r.classList.contains('leaving') } : null;
"#;

/// Records every row that gets highlighted (`flash`) or struck through (`leaving`),
/// and marks the window, so that a reload would show (the mark would be gone).
const OBSERVE: &str = r#"
window.__marks = { flash: [], leaving: [] };
window.__not_reloaded = true;
new MutationObserver((records) => {
  for (const record of records) {
    const row = record.target;
    if (!row.dataset || !row.dataset.id) continue;
    if (row.classList.contains('flash')) window.__marks.flash.push(row.dataset.id);
    if (row.classList.contains('leaving')) window.__marks.leaving.push(row.dataset.id);
  }
}).observe(document.getElementById('rows'), { attributes: true, attributeFilter: ['class'], subtree: true });
return true;
"#;

/// The meta value that would run script if it were ever inserted as HTML.
const HOSTILE: &str = "<img src=x onerror=\"window.__xss=1\"><script>window.__xss=2</script>";

/// A configuration for a test server: no practical rate limit, and the given
/// heartbeat and TTL (short ones make expiry quick).
fn config(heartbeat: Duration, ttl: Duration, vars: &[(&str, &str)]) -> Config {
    let mut all = vec![
        ("PRESENCE_RATE_LIMIT_RATE", "1000000"),
        ("PRESENCE_RATE_LIMIT_CAPACITY", "1000000"),
    ];
    all.extend_from_slice(vars);
    let mut cfg = support::config(&all);
    cfg.heartbeat = heartbeat;
    cfg.ttl = ttl;
    cfg
}

fn meta(value: Value) -> Meta {
    match value {
        Value::Object(map) => map,
        other => panic!("meta must be an object, not {other}"),
    }
}

async fn open_page(browser: &Browser, server: &TestServer) {
    // Through `/`, which redirects to the page.
    browser.goto(&server.url("/")).await;
    let path = browser.eval("return location.pathname;", json!([])).await;
    assert_eq!(path, "/ui", "GET / redirects to the page");
    browser.eval(OBSERVE, json!([])).await;
    browser
        .wait_for(
            "the feed is live",
            SHOW_SECS,
            "return document.body.dataset.feed === 'live';",
            json!([]),
        )
        .await;
}

async fn row(browser: &Browser, id: &str) -> Value {
    browser.eval(ROW, json!([id])).await
}

/// Waits until `id`'s row satisfies `check` (a JS expression over `row`, which is
/// `null` when there is no row).
async fn wait_row(browser: &Browser, what: &str, id: &str, check: &str) -> Value {
    let script =
        format!("const row = (() => {{ {ROW} }})(); return ({check}) ? (row || true) : null;");
    browser
        .wait_for(what, SHOW_SECS, &script, json!([id]))
        .await
}

async fn marks(browser: &Browser, kind: &str) -> Vec<String> {
    let value = browser
        .eval("return window.__marks[arguments[0]];", json!([kind]))
        .await;
    serde_json::from_value(value).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_follow_logins_status_changes_logouts_and_expiries_live_and_resume_after_a_restart() {
    let Some(binaries) = browser_or_skip() else {
        return;
    };
    let _one = ONE_BROWSER_AT_A_TIME.lock().await;
    // Heartbeats every 300 ms keep the nodes that should stay; one node that never
    // heartbeats expires 5 s after its login (long enough to be seen first on a
    // busy machine).
    let cfg = config(Duration::from_millis(300), Duration::from_secs(5), &[]);
    let store = Arc::new(MemoryStore::new());
    let mut server = TestServer::start(&cfg, store.clone()).await;
    let browser = Browser::start(&binaries, 1280, 800).await;
    open_page(&browser, &server).await;
    let empty = browser.eval(ROWS, json!([])).await;
    assert_eq!(empty, json!([]), "no node yet");

    // Log in through the API: three nodes kept alive by the SDK, one left to expire.
    let sdk = PresenceClient::new(&server.base()).unwrap_or_else(|e| panic!("client: {e}"));
    let keep = |id: &'static str, m: Value| {
        let sdk = sdk.clone();
        async move {
            sdk.keep_alive(id, meta(m))
                .await
                .unwrap_or_else(|e| panic!("keep_alive {id}: {e}"))
        }
    };
    let web = keep("web-1", json!({"load": 0.25, "region": "eu"})).await;
    let odd_id = "svc@host:7000+a=b~c_d.e";
    let odd = sdk
        .keep_alive(odd_id, meta(json!({"addr": "10.0.0.7:7000"})))
        .await
        .unwrap_or_else(|e| panic!("keep_alive {odd_id}: {e}"));
    let hostile = keep("db-1", json!({"note": HOSTILE, "region": "us"})).await;
    let leaver = keep("cache-1", json!({})).await;
    let http = http();
    let expiring = post_with(
        &http,
        &server.url("/presence/login"),
        &json!({"node_id": "ephemeral", "status": "draining"}),
    )
    .await
    .ok_json();
    assert_eq!(expiring["ttl_ms"], 5000);

    let started = Instant::now();
    let all = ["cache-1", "db-1", "ephemeral", odd_id, "web-1"];
    browser
        .wait_for(
            "the five rows, in node id order",
            SHOW_SECS,
            &format!("const ids = (() => {{ {ROWS} }})().map((r) => r.id); return JSON.stringify(ids) === arguments[0];"),
            json!([serde_json::to_string(&all).unwrap_or_default()]),
        )
        .await;
    eprintln!("rows appeared {:?} after the logins", started.elapsed());
    let reloaded = browser
        .eval("return window.__not_reloaded !== true;", json!([]))
        .await;
    assert_eq!(reloaded, false, "the rows came without a reload");
    let ephemeral = row(&browser, "ephemeral").await;
    assert_eq!(ephemeral["status"], "draining");

    // Ids and meta are text: the odd id as it is, the hostile meta literally, and
    // no element made from either.
    let rows: Vec<Value> =
        serde_json::from_value(browser.eval(ROWS, json!([])).await).unwrap_or_default();
    for r in &rows {
        assert_eq!(r["id"], r["id_text"], "{r}");
    }
    let db = row(&browser, "db-1").await;
    let db_meta = db["meta"].as_str().unwrap_or_default();
    assert!(
        db_meta.contains(&format!("note={HOSTILE}")),
        "the meta is shown literally: {db_meta:?}"
    );
    browser
        .eval(
            "document.querySelector('#rows .row[data-id=\"db-1\"]').click(); return true;",
            json!([]),
        )
        .await;
    let detail = browser
        .wait_for(
            "the detail panel shows db-1",
            SHOW_SECS,
            "const pre = document.getElementById('detail-json'); return !document.getElementById('detail').hidden && pre.textContent.includes('db-1') ? pre.textContent : null;",
            json!([]),
        )
        .await;
    let shown: Value =
        serde_json::from_str(detail.as_str().unwrap_or_default()).unwrap_or_default();
    assert_eq!(shown["meta"]["note"], HOSTILE, "the whole meta, literally");
    let injected = browser
        .eval(
            "return { imgs: document.querySelectorAll('img').length, scripts: document.scripts.length, xss: window.__xss === undefined ? null : window.__xss };",
            json!([]),
        )
        .await;
    assert_eq!(
        injected,
        json!({"imgs": 0, "scripts": 1, "xss": null}),
        "nothing from the meta became an element or ran"
    );

    // A status change: the row changes in place, highlighted.
    web.set_status(Status::Degraded);
    wait_row(
        &browser,
        "web-1 shows degraded",
        "web-1",
        "row && row.status === 'degraded' && row.badge === 'degraded'",
    )
    .await;
    assert!(marks(&browser, "flash")
        .await
        .iter()
        .any(|id| id == "web-1"));

    // A logout and an expiry: both rows go (struck through first).
    leaver
        .stop()
        .await
        .unwrap_or_else(|e| panic!("cache-1 logout: {e}"));
    wait_row(&browser, "cache-1 is gone", "cache-1", "row === null").await;
    wait_row(&browser, "ephemeral expired", "ephemeral", "row === null").await;
    let leaving = marks(&browser, "leaving").await;
    for id in ["cache-1", "ephemeral"] {
        assert!(
            leaving.iter().any(|l| l == id),
            "{id} was shown leaving: {leaving:?}"
        );
    }
    browser
        .wait_for(
            "the counts say 3 online, 1 degraded",
            SHOW_SECS,
            "return document.getElementById('count-online').textContent === '3' && document.getElementById('count-degraded').textContent === '1';",
            json!([]),
        )
        .await;

    // The server goes away: the page says so, with the time of its last update.
    let port = server.addr.port();
    server.signal_shutdown();
    server.join().await;
    let down = browser
        .wait_for(
            "the page says the feed is down",
            SHOW_SECS,
            "const f = document.getElementById('feed'); return document.body.dataset.feed === 'down' ? f.textContent : null;",
            json!([]),
        )
        .await;
    let down = down.as_str().unwrap_or_default();
    assert!(
        down.contains("feed down") && down.contains("last update"),
        "{down:?}"
    );
    // A new server on the same port and store: the page reconnects by itself and
    // resumes from its cursor (Last-Event-ID), so the new server sends no snapshot.
    let mut again = cfg.clone();
    again.http_port = port;
    let server = TestServer::start(&again, store.clone()).await;
    let later = post_with(
        &http,
        &server.url("/presence/login"),
        &json!({"node_id": "after-restart"}),
    )
    .await;
    assert_eq!(later.status, 200, "{later:?}");
    wait_row(
        &browser,
        "a node logged in after the restart appears",
        "after-restart",
        "row !== null",
    )
    .await;
    browser
        .wait_for(
            "the feed is live again",
            SHOW_SECS,
            "return document.body.dataset.feed === 'live';",
            json!([]),
        )
        .await;
    let scrape = Reply::send(http.get(server.url("/metrics"))).await.text();
    let snapshots =
        support::metric_value(&scrape, "presence_watch_events_total{type=\"snapshot\"}");
    assert_eq!(
        snapshots.unwrap_or(0.0),
        0.0,
        "the page resumed with its cursor rather than starting over"
    );

    for k in [web, odd, hostile] {
        let _ = k.stop().await;
    }
    browser.quit().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auth_on_the_page_asks_for_a_token_and_sends_it_as_a_bearer_header() {
    let Some(binaries) = browser_or_skip() else {
        return;
    };
    let _one = ONE_BROWSER_AT_A_TIME.lock().await;
    let token = "static-token-of-the-page-test";
    let cfg = config(
        Duration::from_secs(3),
        Duration::from_secs(600),
        &[("PRESENCE_AUTH_TOKEN", token)],
    );
    let server = TestServer::memory(&cfg).await;
    let http = http();
    // The page is served without a token; the data is not.
    let page = Reply::send(http.get(server.url("/ui"))).await;
    assert_eq!(page.status, 200);
    let stats = Reply::send(http.get(server.url("/presence/stats"))).await;
    stats.assert_error(401, "unauthorized");
    let login = Reply::send(
        http.post(server.url("/presence/login"))
            .bearer_auth(token)
            .json(&json!({"node_id": "secured-1"})),
    )
    .await;
    assert_eq!(login.status, 200, "{login:?}");

    let browser = Browser::start(&binaries, 1280, 800).await;
    browser.goto(&server.url("/ui")).await;
    browser
        .wait_for(
            "the token prompt appears",
            SHOW_SECS,
            "return !document.getElementById('login').hidden;",
            json!([]),
        )
        .await;
    assert_eq!(browser.eval(ROWS, json!([])).await, json!([]));

    // A wrong token is refused and asked for again; the right one shows the node.
    let submit = "document.getElementById('token').value = arguments[0]; document.getElementById('login').requestSubmit(); return true;";
    browser.eval(submit, json!(["wrong"])).await;
    browser
        .wait_for(
            "a wrong token is asked for again",
            SHOW_SECS,
            "return !document.getElementById('login').hidden && document.getElementById('login-why').textContent.includes('refused');",
            json!([]),
        )
        .await;
    browser.eval(submit, json!([token])).await;
    wait_row(
        &browser,
        "the node shows with the token",
        "secured-1",
        "row !== null",
    )
    .await;
    let kept = browser
        .eval(
            "return { stored: sessionStorage.getItem('presence.token'), local: localStorage.length, url: location.href };",
            json!([]),
        )
        .await;
    assert_eq!(kept["stored"], token, "kept in session storage");
    assert_eq!(kept["local"], 0, "nothing in local storage");
    assert!(
        !kept["url"].as_str().unwrap_or_default().contains(token),
        "never in the URL: {kept}"
    );
    browser
        .wait_for(
            "the counts came with the token",
            SHOW_SECS,
            "return document.getElementById('count-online').textContent === '1';",
            json!([]),
        )
        .await;
    browser.quit().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_filter_box_uses_the_listing_filters_and_puts_them_in_the_url() {
    let Some(binaries) = browser_or_skip() else {
        return;
    };
    let _one = ONE_BROWSER_AT_A_TIME.lock().await;
    let cfg = config(Duration::from_secs(3), Duration::from_secs(600), &[]);
    let server = TestServer::memory(&cfg).await;
    let http = http();
    for (id, status, region) in [
        ("eu-1", "up", "eu"),
        ("eu-2", "degraded", "eu"),
        ("us-1", "up", "us"),
        ("us-2", "draining", "us"),
    ] {
        post_with(
            &http,
            &server.url("/presence/login"),
            &json!({"node_id": id, "status": status, "meta": {"region": region}}),
        )
        .await
        .ok_json();
    }
    let browser = Browser::start(&binaries, 1280, 800).await;
    // A shared link opens filtered: status up or degraded, in the eu region.
    browser
        .goto(&server.url("/ui?status=up,degraded&meta.region=eu"))
        .await;
    let ids = "return JSON.stringify((() => { ".to_owned()
        + ROWS
        + " })().map((r) => r.id)) === arguments[0];";
    browser
        .wait_for(
            "the link's filter applies",
            SHOW_SECS,
            &ids,
            json!([r#"["eu-1","eu-2"]"#]),
        )
        .await;
    // The box: a prefix; the URL follows.
    browser
        .eval(
            "document.getElementById('f-prefix').value = 'us-'; document.querySelectorAll('.statuses input').forEach((b) => { b.checked = false; }); document.getElementById('f-meta').value = ''; document.getElementById('filter').requestSubmit(); return true;",
            json!([]),
        )
        .await;
    browser
        .wait_for(
            "the prefix applies",
            SHOW_SECS,
            &ids,
            json!([r#"["us-1","us-2"]"#]),
        )
        .await;
    let search = browser.eval("return location.search;", json!([])).await;
    assert_eq!(search, "?prefix=us-");
    // A node that joins and matches shows; one that does not, does not.
    for id in ["us-3", "eu-3"] {
        post_with(
            &http,
            &server.url("/presence/login"),
            &json!({"node_id": id}),
        )
        .await
        .ok_json();
    }
    browser
        .wait_for(
            "a matching join shows",
            SHOW_SECS,
            &ids,
            json!([r#"["us-1","us-2","us-3"]"#]),
        )
        .await;
    browser.quit().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_nodes_render_and_a_burst_of_a_thousand_events_a_second_keeps_up() {
    let Some(binaries) = browser_or_skip() else {
        return;
    };
    let _one = ONE_BROWSER_AT_A_TIME.lock().await;
    const NODES: usize = 10_000;
    const BURST: usize = 1_000;
    let cfg = config(Duration::from_secs(3), Duration::from_secs(600), &[]);
    let store = memory_store_with_nodes(NODES, &meta(json!({"load": 0.5, "hp": 100}))).await;
    let server = TestServer::start(&cfg, store.clone()).await;
    let browser = Browser::start(&binaries, 1280, 800).await;
    let started = Instant::now();
    browser.goto(&server.url("/ui")).await;
    browser
        .wait_for(
            "10 000 nodes shown",
            60,
            "return document.getElementById('shown').textContent === '10000 shown';",
            json!([]),
        )
        .await;
    let loaded = started.elapsed();
    let elements = browser
        .eval(
            "return document.querySelectorAll('#rows .row').length;",
            json!([]),
        )
        .await;
    let elements = elements.as_u64().unwrap_or(u64::MAX);
    assert!(
        elements < 100,
        "only the rows in view are in the document: {elements}"
    );
    // Watch the frames while the burst runs: the longest gap between two frames.
    browser
        .eval(
            "window.__gap = 0; let last = performance.now(); const tick = (t) => { window.__gap = Math.max(window.__gap, t - last); last = t; requestAnimationFrame(tick); }; requestAnimationFrame(tick); return true;",
            json!([]),
        )
        .await;
    let before = browser
        .eval(
            "return Number(document.body.dataset.events || 0);",
            json!([]),
        )
        .await
        .as_u64()
        .unwrap_or(0);
    // 1 000 meta changes in one second (10 every 10 ms), straight into the store:
    // each is an `update` on the feed.
    let burst = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    for batch in 0..BURST / 10 {
        tick.tick().await;
        for j in 0..10 {
            let i = batch * 10 + j;
            let node = NodeId::parse(&format!("node-{i:05}")).unwrap_or_else(|e| panic!("{e}"));
            store
                .heartbeat_with(
                    &node,
                    &format!("lease-{i}"),
                    600_000,
                    Some(meta(json!({"load": 0.5, "hp": 100, "burst": i}))),
                    None,
                )
                .await
                .unwrap_or_else(|e| panic!("heartbeat {i}: {e}"));
        }
    }
    let sent = burst.elapsed();
    browser
        .wait_for(
            "the page applied every event of the burst",
            30,
            "return Number(document.body.dataset.events || 0) >= arguments[0];",
            json!([before + BURST as u64]),
        )
        .await;
    let caught_up = burst.elapsed();
    let gap = browser.eval("return window.__gap;", json!([])).await;
    let top = row(&browser, "node-00000").await;
    assert_eq!(top["meta"], "burst=0  hp=100  load=0.5", "{top}");
    eprintln!(
        "{NODES} nodes shown {loaded:?} after the navigation; {BURST} events sent in {sent:?}, \
         all applied {caught_up:?} after the first; longest frame gap during the burst {gap} ms"
    );
    assert!(
        caught_up < sent + Duration::from_secs(5),
        "the page fell behind: {caught_up:?} for a burst sent in {sent:?}"
    );
    browser.quit().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_screenshot_of_fifty_nodes() {
    let Some(binaries) = browser_or_skip() else {
        return;
    };
    let _one = ONE_BROWSER_AT_A_TIME.lock().await;
    let cfg = config(Duration::from_secs(3), Duration::from_secs(600), &[]);
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let regions = ["eu-west", "eu-central", "us-east", "ap-south"];
    for i in 1..=50u32 {
        let status = match i {
            _ if i % 11 == 0 => Status::Draining,
            _ if i % 7 == 0 => Status::Degraded,
            _ => Status::Up,
        };
        let region = regions[(i % 4) as usize];
        let id = format!("{region}.node-{i:02}");
        let node = NodeId::parse(&id).unwrap_or_else(|e| panic!("{id}: {e}"));
        let m = meta(json!({
            "addr": format!("10.{}.0.{i}:7000", i % 4),
            "hp": 100 - i,
            "load": f64::from(i * 37 % 100) / 100.0,
            "version": "1.4.2",
        }));
        store
            .login_with(&node, &format!("lease-{i}"), 600_000, m, status)
            .await
            .unwrap_or_else(|e| panic!("login {id}: {e}"));
    }
    let server = TestServer::start(&cfg, store).await;
    let browser = Browser::start(&binaries, 1280, 900).await;
    browser.goto(&server.url("/ui")).await;
    browser
        .wait_for(
            "50 nodes shown",
            SHOW_SECS,
            "return document.getElementById('shown').textContent === '50 shown' && document.getElementById('count-online').textContent === '50';",
            json!([]),
        )
        .await;
    // One node's whole record in the side panel, as a click shows it.
    browser
        .eval(
            "document.querySelector('#rows .row:nth-child(3)').click(); return true;",
            json!([]),
        )
        .await;
    browser
        .wait_for(
            "the detail panel is open",
            SHOW_SECS,
            "return !document.getElementById('detail').hidden && document.getElementById('detail-json').textContent.length > 0;",
            json!([]),
        )
        .await;
    let png = browser.screenshot().await;
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    let path = std::env::var("PRESENCE_UI_SCREENSHOT")
        .ok()
        .filter(|p| !p.is_empty())
        .map_or_else(
            || std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png"),
            |p| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(p),
        );
    std::fs::write(&path, &png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    eprintln!("screenshot: {} ({} bytes)", path.display(), png.len());
    browser.quit().await;
    server.stop().await;
}
