// The presence status page: the online nodes, kept live by GET /presence/watch.
//
// - The feed is read with fetch(), not EventSource, so that it can carry an
//   `Authorization: Bearer` header (a token never goes into a URL). It resumes with
//   Last-Event-ID after a break and reconnects by itself with jittered backoff.
// - Node ids and meta only ever reach the page as text (textContent, attribute
//   values): nothing the server sends is parsed as HTML.
// - Events change the model at once; the DOM is updated at most once per animation
//   frame, and only the rows in view exist (a 10 000-node table is ~40 row elements).
"use strict";

(() => {
  const ROW_H = 30; // px; rows are laid out here, so the CSS has no height of its own
  const HEAD_H = 32; // px: the sticky header row above the rows, in the same scroller
  const OVERSCAN = 8; // rows above and below the viewport
  const FLASH_MS = 1200; // how long a join / update / leave stays highlighted
  const IDLE_MS = 45000; // no byte for this long (3 keep-alives): the feed is dead
  const BACKOFF_BASE_MS = 250;
  const BACKOFF_MAX_MS = 5000;
  const STATS_EVERY_MS = 5000;
  const TOKEN_KEY = "presence.token";
  const STATUSES = ["up", "degraded", "draining"];

  const $ = (id) => document.getElementById(id);
  // The API, relative to this page (`/ui` -> `/presence`), so that the page works
  // behind a proxy that mounts the server under a path.
  const api = (path) => new URL("presence" + path, document.baseURI).toString();

  // ---------------------------------------------------------------- the model
  const nodes = new Map(); // node_id -> {node, version, gone?: {reason, until}}
  let order = []; // node ids, sorted as the server sorts them (by code unit)
  const flashes = new Map(); // node_id -> time the highlight ends
  let selected = null; // node_id shown in the detail panel
  let cursor = null; // the last event's id: where a reconnect resumes
  let lastUpdate = null; // Date of the last event
  let skewMs = 0; // local clock minus the store's clock, estimated
  let skewKnown = false;
  let events = 0; // events applied (read by the browser test)
  let goneCount = 0; // nodes that left and are still shown, struck through

  function insertId(id) {
    let lo = 0;
    let hi = order.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (order[mid] < id) lo = mid + 1;
      else hi = mid;
    }
    if (order[lo] !== id) order.splice(lo, 0, id);
  }

  function removeId(id) {
    let lo = 0;
    let hi = order.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (order[mid] < id) lo = mid + 1;
      else hi = mid;
    }
    if (order[lo] === id) order.splice(lo, 1);
  }

  function flash(id) {
    flashes.set(id, performance.now() + FLASH_MS);
  }

  // The store's clock, learnt from live changes: a join or update is stamped with
  // the store's "now", so the difference to ours is the skew (plus the delivery
  // time, which the smoothing keeps small).
  function learnClock(node) {
    const sample = Date.now() - node.last_seen_ms;
    if (!skewKnown) {
      skewMs = sample;
      skewKnown = true;
    } else {
      skewMs = Math.min(sample, skewMs * 0.9 + sample * 0.1);
    }
  }

  function learnClockFromDate(res) {
    const date = Date.parse(res.headers.get("date") || "");
    if (!skewKnown && Number.isFinite(date)) skewMs = Date.now() - (date + 500);
  }

  const storeNow = () => Date.now() - skewMs;

  function upsert(node, live) {
    const id = node.node_id;
    const known = nodes.get(id);
    if (known && known.gone) goneCount -= 1;
    nodes.set(id, { node, version: known ? known.version + 1 : 0 });
    if (!known) insertId(id);
    if (live) {
      flash(id);
      learnClock(node);
    }
  }

  function applyEvent(type, data) {
    switch (type) {
      case "snapshot": {
        nodes.clear();
        flashes.clear();
        goneCount = 0;
        const list = data.nodes || [];
        for (const node of list) nodes.set(node.node_id, { node, version: 0 });
        order = list.map((n) => n.node_id);
        // The server sends it sorted; a sort of sorted input is cheap, and keeps the
        // binary searches right even if it did not.
        order.sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
        break;
      }
      case "join":
      case "update":
        upsert(data, true);
        break;
      case "leave": {
        const known = nodes.get(data.node_id);
        if (known) {
          if (!known.gone) goneCount += 1;
          known.gone = { reason: data.reason, until: performance.now() + FLASH_MS };
          known.version += 1;
          flashes.delete(data.node_id);
        }
        break;
      }
      default:
        return; // a type this page does not know: skipped, the cursor still moves
    }
    events += 1;
    document.body.dataset.events = String(events);
    lastUpdate = new Date();
    statsSoon();
    render();
  }

  // Leaves stay on screen, struck through, for FLASH_MS; then they go. Highlights
  // that ended (of rows drawn or not) are forgotten.
  function expire(now) {
    for (const [id, until] of flashes) if (until <= now) flashes.delete(id);
    if (goneCount === 0) return;
    for (const [id, entry] of nodes) {
      if (entry.gone && entry.gone.until <= now) {
        nodes.delete(id);
        removeId(id);
        goneCount -= 1;
      }
    }
  }

  // ---------------------------------------------------------------- rendering
  const viewport = $("viewport");
  const rowsEl = $("rows");
  const pool = [];
  let frame = 0;

  function render() {
    if (!frame) frame = requestAnimationFrame(draw);
  }

  function compactMeta(meta) {
    const parts = [];
    for (const [key, value] of Object.entries(meta || {})) {
      parts.push(key + "=" + (typeof value === "string" ? value : JSON.stringify(value)));
      if (parts.length > 12) break;
    }
    return parts.join("  ");
  }

  function age(ms) {
    const s = Math.max(0, Math.round(ms / 1000));
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
    if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
    return Math.floor(s / 86400) + " d";
  }

  function makeRow() {
    const row = document.createElement("div");
    row.className = "row";
    row.setAttribute("role", "row");
    row.style.height = ROW_H + "px";
    for (const name of ["c-id", "c-status", "c-meta", "c-seen", "c-exp"]) {
      const cell = document.createElement("span");
      cell.className = name;
      cell.setAttribute("role", "cell");
      row.appendChild(cell);
    }
    const badge = document.createElement("span");
    row.children[1].appendChild(badge);
    rowsEl.appendChild(row);
    return row;
  }

  function fill(row, id, entry) {
    const key = id + "\u0000" + entry.version;
    if (row.renderedKey === key) return;
    row.renderedKey = key;
    const node = entry.node;
    const [idCell, statusCell, metaCell] = row.children;
    row.dataset.id = id;
    idCell.textContent = id;
    const badge = statusCell.firstChild;
    const status = entry.gone ? "gone" : STATUSES.includes(node.status) ? node.status : "up";
    badge.className = "badge " + status;
    badge.textContent = entry.gone ? "left (" + entry.gone.reason + ")" : status;
    row.dataset.status = status;
    const meta = compactMeta(node.meta);
    metaCell.textContent = meta;
    metaCell.title = meta;
  }

  function fillTimes(row, entry, now) {
    const node = entry.node;
    const seen = row.children[3];
    const exp = row.children[4];
    seen.textContent = age(now - node.last_seen_ms) + " ago";
    const left = node.expires_at_ms - now;
    exp.textContent = entry.gone ? "–" : left > 0 ? age(left) : "expired";
    exp.classList.toggle("late", !entry.gone && left <= 0);
    exp.classList.toggle("soon", !entry.gone && left > 0 && left < 2000);
  }

  function draw() {
    frame = 0;
    const t = performance.now();
    expire(t);
    const total = order.length;
    rowsEl.style.height = total * ROW_H + "px";
    $("empty").hidden = total > 0 || !synced;
    const top = Math.max(0, viewport.scrollTop - HEAD_H);
    const height = viewport.clientHeight || window.innerHeight;
    const first = Math.max(0, Math.floor(top / ROW_H) - OVERSCAN);
    const last = Math.min(total, Math.ceil((top + height) / ROW_H) + OVERSCAN);
    const now = storeNow();
    let k = 0;
    for (let i = first; i < last; i += 1, k += 1) {
      const id = order[i];
      const entry = nodes.get(id);
      const row = pool[k] || (pool[k] = makeRow());
      row.hidden = false;
      row.style.transform = "translateY(" + i * ROW_H + "px)";
      fill(row, id, entry);
      fillTimes(row, entry, now);
      const until = flashes.get(id);
      const flashing = until !== undefined && until > t;
      if (until !== undefined && !flashing) flashes.delete(id);
      row.classList.toggle("flash", flashing && !entry.gone);
      row.classList.toggle("leaving", Boolean(entry.gone));
      row.classList.toggle("selected", id === selected);
    }
    for (; k < pool.length; k += 1) {
      pool[k].hidden = true;
      pool[k].renderedKey = null;
      delete pool[k].dataset.id;
    }
    const live = total - goneCount;
    $("shown").textContent = synced ? live + (filterActive() ? " matching" : " shown") : "";
    drawDetail(now);
    // Highlights and leaving rows fade by time: draw again until they are over.
    if (flashes.size > 0 || goneCount > 0) setTimeout(render, 200);
  }

  function drawDetail(now) {
    const panel = $("detail");
    if (selected === null) {
      panel.hidden = true;
      return;
    }
    panel.hidden = false;
    const entry = nodes.get(selected);
    $("detail-id").textContent = selected;
    if (!entry) {
      $("detail-state").textContent = "not online";
      return;
    }
    const node = entry.node;
    $("detail-state").textContent = entry.gone
      ? "left: " + entry.gone.reason
      : node.status + ", online since " + new Date(node.online_since_ms + skewMs).toLocaleTimeString() +
        ", last seen " + age(now - node.last_seen_ms) + " ago";
    const text = JSON.stringify(node, null, 2);
    const pre = $("detail-json");
    if (pre.textContent !== text) pre.textContent = text;
  }

  viewport.addEventListener("scroll", render, { passive: true });
  window.addEventListener("resize", render);
  rowsEl.addEventListener("click", (e) => {
    const row = e.target.closest(".row");
    if (!row || !row.dataset.id) return;
    selected = selected === row.dataset.id ? null : row.dataset.id;
    render();
  });
  $("detail-close").addEventListener("click", () => {
    selected = null;
    render();
  });
  // Ages and "expires in" move with time.
  setInterval(render, 1000);

  // ---------------------------------------------------------------- the filter
  // The page's query string is the filter, with the API's own parameters
  // (prefix=, status=a,b, meta.<key>=), so a view can be shared as a link.
  function readFilter() {
    const params = new URLSearchParams(location.search);
    $("f-prefix").value = params.get("prefix") || "";
    const statuses = (params.get("status") || "").split(",");
    for (const box of document.querySelectorAll(".statuses input")) {
      box.checked = statuses.includes(box.value);
    }
    const meta = [];
    for (const [key, value] of params) {
      if (key.startsWith("meta.")) meta.push(key.slice(5) + "=" + value);
    }
    $("f-meta").value = meta.join(" & ");
  }

  function filterQuery() {
    const params = new URLSearchParams();
    const prefix = $("f-prefix").value.trim();
    if (prefix) params.set("prefix", prefix);
    const statuses = [...document.querySelectorAll(".statuses input:checked")].map((b) => b.value);
    if (statuses.length) params.set("status", statuses.join(","));
    for (const pair of $("f-meta").value.split("&")) {
      const text = pair.trim();
      if (!text) continue;
      const eq = text.indexOf("=");
      if (eq <= 0) continue; // the server would refuse a pair without a key
      params.append("meta." + text.slice(0, eq).trim(), text.slice(eq + 1).trim());
    }
    return params.toString();
  }

  let query = "";
  const filterActive = () => query !== "";

  $("filter").addEventListener("submit", (e) => {
    e.preventDefault();
    applyFilter();
  });
  $("f-clear").addEventListener("click", () => {
    $("f-prefix").value = "";
    $("f-meta").value = "";
    for (const box of document.querySelectorAll(".statuses input")) box.checked = false;
    applyFilter();
  });

  function applyFilter() {
    const next = filterQuery();
    history.replaceState(null, "", location.pathname + (next ? "?" + next : ""));
    if (next !== query) {
      query = next;
      restartFeed(); // another filter, another snapshot: the old cursor does not apply
    }
  }

  // ---------------------------------------------------------------- auth
  const token = () => sessionStorage.getItem(TOKEN_KEY);

  function headers(extra) {
    const h = Object.assign({}, extra);
    const t = token();
    if (t) h.Authorization = "Bearer " + t;
    return h;
  }

  let needToken = false;

  function askToken(why) {
    if (needToken) return;
    needToken = true;
    stopFeed();
    $("login").hidden = false;
    $("login-why").textContent = why;
    $("token").value = "";
    $("token").focus();
    setFeed("down", "not connected: a token is needed");
  }

  $("login").addEventListener("submit", (e) => {
    e.preventDefault();
    const t = $("token").value.trim();
    if (!t) return;
    sessionStorage.setItem(TOKEN_KEY, t);
    needToken = false;
    $("login").hidden = true;
    $("signout").hidden = false;
    restartFeed();
  });
  $("signout").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    $("signout").hidden = true;
    askToken("Token forgotten. Paste a bearer token to watch again.");
  });

  // ---------------------------------------------------------------- stats
  let statsTimer = 0;
  let statsDue = false;

  async function loadStats() {
    statsTimer = 0;
    statsDue = false;
    try {
      const res = await fetch(api("/stats"), { headers: headers({ Accept: "application/json" }), cache: "no-store" });
      learnClockFromDate(res);
      if (res.status === 401) return askToken("The server refused the token (401). Paste a valid one.");
      if (!res.ok) throw new Error("HTTP " + res.status);
      const stats = await res.json();
      $("count-online").textContent = String(stats.online);
      for (const s of STATUSES) $("count-" + s).textContent = String(stats.by_status[s]);
      $("counts").classList.remove("stale");
    } catch (_) {
      $("counts").classList.add("stale");
    }
  }

  // At most one stats request per second while events flow, and one every
  // STATS_EVERY_MS anyway.
  function statsSoon() {
    if (statsDue) return;
    statsDue = true;
    clearTimeout(statsTimer);
    statsTimer = setTimeout(loadStats, 1000);
  }
  setInterval(() => {
    if (!statsDue && !needToken) loadStats();
  }, STATS_EVERY_MS);

  // ---------------------------------------------------------------- the feed
  let feedGen = 0; // bumps on every (re)start; an old loop sees it and stops
  let feedAbort = null;
  let synced = false; // a snapshot (or a resume) has been applied

  function setFeed(state, text) {
    const el = $("feed");
    el.className = "feed " + state;
    el.textContent = text;
    document.body.dataset.feed = state;
  }

  let lastHeard = null; // when the feed last sent a byte (events or keep-alives)

  function feedDownText(extra) {
    const since = lastHeard ? " since " + lastHeard.toLocaleTimeString() : "";
    const last = lastUpdate ? "last update " + lastUpdate.toLocaleTimeString() : "no update yet";
    return "feed down" + since + " · " + last + (extra ? " · " + extra : "");
  }

  function stopFeed() {
    feedGen += 1;
    if (feedAbort) feedAbort.abort();
    feedAbort = null;
  }

  function restartFeed() {
    stopFeed();
    cursor = null;
    synced = false;
    lastHeard = null;
    nodes.clear();
    order = [];
    flashes.clear();
    goneCount = 0;
    render();
    const gen = feedGen;
    loadStats();
    runFeed(gen);
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  async function runFeed(gen) {
    let failures = 0;
    let retryMs = 0;
    while (gen === feedGen) {
      const abort = new AbortController();
      feedAbort = abort;
      let delivered = false;
      try {
        const extra = { Accept: "text/event-stream" };
        if (cursor) extra["Last-Event-ID"] = cursor;
        const url = api("/watch") + (query ? "?" + query : "");
        if (lastHeard) setFeed("down", feedDownText("reconnecting…"));
        else setFeed("connecting", "connecting…");
        const res = await fetch(url, { headers: headers(extra), signal: abort.signal, cache: "no-store" });
        if (gen !== feedGen) return;
        if (res.status === 401) return askToken(token() ? "The server refused the token (401). Paste a valid one." : "This server requires a bearer token.");
        if (res.status === 403) {
          setFeed("down", "the token does not allow reading (scope presence:read)");
          return;
        }
        if (res.status === 400) {
          const body = await res.json().catch(() => ({}));
          $("filter-error").textContent = body.message || "the server refused the filter";
          setFeed("down", "filter refused");
          return;
        }
        $("filter-error").textContent = "";
        // A 429 or 503 says when to come back.
        const after = Number(res.headers.get("retry-after"));
        retryMs = Number.isFinite(after) && after > 0 ? Math.min(after * 1000, 60000) : 0;
        const type = res.headers.get("content-type") || "";
        if (!res.ok || !type.startsWith("text/event-stream")) throw new Error("HTTP " + res.status);
        setFeed("live", "live");
        lastHeard = new Date();
        $("signout").hidden = !token();
        loadStats();
        await readStream(res.body, abort, gen, () => {
          delivered = true;
        });
      } catch (_) {
        // A network error, an abort, a server that went away: reconnect below.
      }
      if (gen !== feedGen) return;
      failures = delivered ? 1 : failures + 1;
      const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** (failures - 1));
      const wait = Math.max(retryMs, Math.random() * ceiling);
      setFeed("down", feedDownText("reconnecting in " + Math.ceil(wait / 1000) + " s"));
      $("counts").classList.add("stale");
      await sleep(wait);
    }
  }

  // Reads Server-Sent Events from `body` until it ends (or goes idle, or the feed
  // is restarted). Lines are found by scanning each byte once.
  async function readStream(body, abort, gen, onBytes) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let scan = 0;
    let id = null;
    let type = "";
    let data = [];
    let idle = setTimeout(() => abort.abort(), IDLE_MS);
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done || gen !== feedGen) return;
        onBytes();
        lastHeard = new Date();
        clearTimeout(idle);
        idle = setTimeout(() => abort.abort(), IDLE_MS);
        buffer += decoder.decode(value, { stream: true });
        let start = 0;
        for (;;) {
          const nl = buffer.indexOf("\n", scan);
          if (nl < 0) break;
          let line = buffer.slice(start, nl);
          if (line.endsWith("\r")) line = line.slice(0, -1);
          start = nl + 1;
          scan = start;
          if (line === "") {
            if (data.length && gen === feedGen) {
              if (id !== null) cursor = id;
              let parsed = null;
              try {
                parsed = JSON.parse(data.join("\n"));
              } catch (_) {
                parsed = null;
              }
              if (parsed !== null) {
                applyEvent(type, parsed);
                synced = true; // a snapshot, or a resume continuing what we hold
              } else {
                // An event that does not decode: start over from a snapshot rather
                // than hold a silently wrong table.
                cursor = null;
                abort.abort();
                return;
              }
            }
            id = null;
            type = "";
            data = [];
            continue;
          }
          if (line.startsWith(":")) continue; // a comment: the keep-alive
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let value = colon < 0 ? "" : line.slice(colon + 1);
          if (value.startsWith(" ")) value = value.slice(1);
          if (field === "data") data.push(value);
          else if (field === "event") type = value;
          else if (field === "id") id = value;
        }
        buffer = buffer.slice(start);
        scan -= start;
      }
    } finally {
      clearTimeout(idle);
      reader.cancel().catch(() => {});
    }
  }

  // ---------------------------------------------------------------- start
  readFilter();
  query = filterQuery();
  $("signout").hidden = !token();
  restartFeed();
})();
