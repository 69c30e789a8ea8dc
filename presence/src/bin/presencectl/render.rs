//! What `presencectl` prints for people: aligned tables and one line per event.
//! Everything a server sent is escaped on the way to the terminal (a meta value
//! with an escape sequence prints as `\u{1b}`, it does not drive the terminal).
//!
//! Ages are read against this machine's clock; the server stamps times with its
//! store's clock, so they are as right as the two clocks agree.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use presence::client::{WatchEvent, WatchItem};
use presence::model::{Meta, Node, Stats};
use serde_json::{json, Value};

/// Milliseconds since the Unix epoch on this machine's clock.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `s` with control characters escaped, so it is one line of plain text.
pub fn printable(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_owned();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// `12 s`, `3 min 4 s`, `2 h 5 min`, `3 d`.
pub fn age(ms: u64) -> String {
    let s = (ms + 500) / 1000;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        3600..86_400 => format!("{} h {} min", s / 3600, (s % 3600) / 60),
        _ => format!("{} d", s / 86_400),
    }
}

/// Meta as `key=value` pairs (strings as they are, other values as JSON).
pub fn compact_meta(meta: &Meta) -> String {
    let mut out = String::new();
    for (key, value) in meta {
        if !out.is_empty() {
            out.push(' ');
        }
        let value = match value {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let _ = write!(out, "{}={}", printable(key), printable(&value));
    }
    out
}

/// The nodes as an aligned table, a header first.
pub fn table(nodes: &[Node], now: u64) -> String {
    let header = ["NODE", "STATUS", "LAST SEEN", "EXPIRES IN", "META"];
    let rows: Vec<[String; 5]> = nodes
        .iter()
        .map(|n| {
            [
                printable(&n.node_id),
                n.status.to_string(),
                format!("{} ago", age(now.saturating_sub(n.last_seen_ms))),
                expires_in(n, now),
                compact_meta(&n.meta),
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: [&str; 5]| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            let pad = widths[i].saturating_sub(cell.chars().count());
            match i {
                // Times are right-aligned, the last column is not padded.
                2 | 3 => {
                    let _ = write!(text, "{}{cell}  ", " ".repeat(pad));
                }
                4 => text.push_str(cell),
                _ => {
                    let _ = write!(text, "{cell}{}  ", " ".repeat(pad));
                }
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(header);
    for row in &rows {
        line([&row[0], &row[1], &row[2], &row[3], &row[4]]);
    }
    out
}

fn expires_in(node: &Node, now: u64) -> String {
    if node.expires_at_ms > now {
        age(node.expires_at_ms - now)
    } else {
        "expired".to_owned()
    }
}

/// One node, a field a line.
pub fn node(n: &Node, now: u64) -> String {
    let meta = serde_json::to_string_pretty(&n.meta).unwrap_or_default();
    format!(
        "node_id      {}\nstatus       {}\nonline for   {}\nlast seen    {} ago\nexpires in   {}\nmeta         {}\n",
        printable(&n.node_id),
        n.status,
        age(now.saturating_sub(n.online_since_ms)),
        age(now.saturating_sub(n.last_seen_ms)),
        expires_in(n, now),
        // serde_json escapes control characters inside strings: only the
        // layout's newlines are raw, and each line is made printable anyway.
        meta.lines()
            .map(printable)
            .collect::<Vec<_>>()
            .join("\n             "),
    )
}

/// `5 online: 3 up, 1 degraded, 1 draining`.
pub fn stats(s: &Stats) -> String {
    format!(
        "{} online: {} up, {} degraded, {} draining\n",
        s.online, s.by_status.up, s.by_status.degraded, s.by_status.draining
    )
}

/// One feed event as a line for people.
pub fn event_line(item: &WatchItem) -> String {
    match &item.event {
        WatchEvent::Snapshot(nodes) => {
            let ids: Vec<String> = nodes
                .iter()
                .take(10)
                .map(|n| printable(&n.node_id))
                .collect();
            let more = nodes.len().saturating_sub(ids.len());
            let tail = if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            };
            format!(
                "snapshot {} nodes{}{}{tail}",
                nodes.len(),
                if ids.is_empty() { "" } else { ": " },
                ids.join(", ")
            )
        }
        WatchEvent::Join(n) => format!(
            "join     {} {} {}",
            printable(&n.node_id),
            n.status,
            compact_meta(&n.meta)
        ),
        WatchEvent::Update(n) => format!(
            "update   {} {} {}",
            printable(&n.node_id),
            n.status,
            compact_meta(&n.meta)
        ),
        WatchEvent::Leave { node_id, reason } => {
            let reason = serde_json::to_value(reason)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_else(|| "left".to_owned());
            format!("leave    {} ({reason})", printable(node_id))
        }
    }
    .trim_end()
    .to_owned()
}

/// One feed event as the API's `WatchEvent` object: `{"id", "event", "data"}`.
pub fn event_json(item: &WatchItem) -> Value {
    let (event, data) = match &item.event {
        WatchEvent::Snapshot(nodes) => ("snapshot", json!({ "nodes": nodes })),
        WatchEvent::Join(n) => ("join", json!(n)),
        WatchEvent::Update(n) => ("update", json!(n)),
        WatchEvent::Leave { node_id, reason } => {
            ("leave", json!({ "node_id": node_id, "reason": reason }))
        }
    };
    json!({ "id": item.cursor, "event": event, "data": data })
}

#[cfg(test)]
mod tests {
    use super::*;
    use presence::model::Status;

    fn node(id: &str, meta: Value) -> Node {
        Node {
            node_id: id.to_owned(),
            status: Status::Degraded,
            meta: match meta {
                Value::Object(m) => m,
                _ => Meta::new(),
            },
            online_since_ms: 1_000,
            last_seen_ms: 58_000,
            expires_at_ms: 67_000,
        }
    }

    #[test]
    fn the_table_is_aligned_and_escapes_control_characters() {
        let nodes = [
            node("a", json!({"load": 0.5, "role": "edge"})),
            node("longer-id", json!({"evil": "\u{1b}[2J"})),
        ];
        let out = table(&nodes, 60_000);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        assert!(lines[0].starts_with("NODE       STATUS    LAST SEEN  EXPIRES IN  META"));
        assert!(
            lines[1].starts_with("a          degraded    2 s ago         7 s  load=0.5 role=edge"),
            "{out}"
        );
        assert!(lines[2].ends_with("evil=\\u{1b}[2J"), "{out}");
        assert!(!out.contains('\u{1b}'));
    }

    #[test]
    fn ages() {
        assert_eq!(age(0), "0 s");
        assert_eq!(age(59_400), "59 s");
        assert_eq!(age(61_000), "1 min 1 s");
        assert_eq!(age(7_200_000), "2 h 0 min");
        assert_eq!(age(3 * 86_400_000), "3 d");
    }
}
