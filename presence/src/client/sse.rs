//! A small incremental parser of `text/event-stream` (the WHATWG "server-sent
//! events" format), for the watch feed.
//!
//! Bytes go in as they arrive, in chunks cut anywhere (mid-line, between `\r` and
//! `\n`, inside a UTF-8 sequence); complete events come out. Lines end with `\n`,
//! `\r\n` or a lone `\r`; `data:` lines of one event are joined with `\n`; lines
//! starting with `:` are comments; `id:` sets the last event id (kept from event to
//! event, and ignored if it contains NUL), `event:` the type (default `message`),
//! `retry:` the reconnection time in milliseconds (digits only). An event with no
//! `data` line is not dispatched, and a partial event at the end of the stream is
//! dropped, both as the standard says.

use std::time::Duration;

/// One dispatched event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SseEvent {
    /// The last event id when the event was dispatched (possibly from an earlier
    /// event; empty if none was ever sent).
    pub(crate) id: String,
    /// The event type (`message` when the event had no `event:` line).
    pub(crate) event: String,
    /// The data lines, joined with `\n`.
    pub(crate) data: String,
}

/// A line or event went over the size bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TooLarge {
    pub(crate) max: usize,
}

impl std::fmt::Display for TooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "an event of the watch stream is larger than {} bytes",
            self.max
        )
    }
}

impl std::error::Error for TooLarge {}

/// The parser's state between chunks.
#[derive(Debug)]
pub(crate) struct SseParser {
    /// The current, unfinished line.
    line: Vec<u8>,
    /// The last chunk ended with `\r`: a `\n` starting the next one belongs to it.
    after_cr: bool,
    /// Nothing parsed yet (a leading BOM is skipped).
    at_start: bool,
    data: String,
    has_data: bool,
    event: String,
    last_id: String,
    retry: Option<Duration>,
    max: usize,
}

impl SseParser {
    /// A parser whose last event id starts as `last_id` (the cursor of the previous
    /// connection), bounding a line and an event's data to `max` bytes.
    pub(crate) fn new(last_id: String, max: usize) -> SseParser {
        SseParser {
            line: Vec::new(),
            after_cr: false,
            at_start: true,
            data: String::new(),
            has_data: false,
            event: String::new(),
            last_id,
            retry: None,
            max,
        }
    }

    /// The reconnection time of the last `retry:` field, if any.
    pub(crate) fn retry(&self) -> Option<Duration> {
        self.retry
    }

    /// Feeds one chunk; complete events are pushed onto `out`.
    pub(crate) fn feed(
        &mut self,
        mut chunk: &[u8],
        out: &mut Vec<SseEvent>,
    ) -> Result<(), TooLarge> {
        if self.after_cr {
            self.after_cr = false;
            if let Some(rest) = chunk.strip_prefix(b"\n") {
                chunk = rest;
            }
        }
        while !chunk.is_empty() {
            match chunk.iter().position(|&b| b == b'\n' || b == b'\r') {
                Some(end) => {
                    self.push_line_bytes(&chunk[..end])?;
                    let cr = chunk[end] == b'\r';
                    chunk = &chunk[end + 1..];
                    if cr {
                        match chunk.first() {
                            Some(b'\n') => chunk = &chunk[1..],
                            Some(_) => {}
                            None => self.after_cr = true,
                        }
                    }
                    let line = std::mem::take(&mut self.line);
                    self.process_line(&line, out)?;
                }
                None => {
                    self.push_line_bytes(chunk)?;
                    chunk = &[];
                }
            }
        }
        Ok(())
    }

    fn push_line_bytes(&mut self, bytes: &[u8]) -> Result<(), TooLarge> {
        if self.line.len() + bytes.len() > self.max {
            return Err(TooLarge { max: self.max });
        }
        self.line.extend_from_slice(bytes);
        Ok(())
    }

    fn process_line(&mut self, line: &[u8], out: &mut Vec<SseEvent>) -> Result<(), TooLarge> {
        let mut line = line;
        if self.at_start {
            self.at_start = false;
            if let Some(rest) = line.strip_prefix("\u{feff}".as_bytes()) {
                line = rest;
            }
        }
        if line.is_empty() {
            self.dispatch(out);
            return Ok(());
        }
        if line[0] == b':' {
            return Ok(());
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        let value = String::from_utf8_lossy(value);
        match field {
            b"data" => {
                if self.data.len() + value.len() + 1 > self.max {
                    return Err(TooLarge { max: self.max });
                }
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(&value);
                self.has_data = true;
            }
            b"event" => self.event = value.into_owned(),
            b"id" if !value.contains('\0') => self.last_id = value.into_owned(),
            b"retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                // Digits only; a value past u64 is ignored like any invalid one.
                if let Ok(ms) = value.parse::<u64>() {
                    self.retry = Some(Duration::from_millis(ms));
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn dispatch(&mut self, out: &mut Vec<SseEvent>) {
        let event = std::mem::take(&mut self.event);
        if !self.has_data {
            return;
        }
        self.has_data = false;
        out.push(SseEvent {
            id: self.last_id.clone(),
            event: if event.is_empty() {
                "message".to_owned()
            } else {
                event
            },
            data: std::mem::take(&mut self.data),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_chunks(chunks: &[&[u8]]) -> (Vec<SseEvent>, SseParser) {
        let mut p = SseParser::new(String::new(), 1 << 20);
        let mut out = Vec::new();
        for c in chunks {
            p.feed(c, &mut out).unwrap();
        }
        (out, p)
    }

    fn ev(id: &str, event: &str, data: &str) -> SseEvent {
        SseEvent {
            id: id.into(),
            event: event.into(),
            data: data.into(),
        }
    }

    const STREAM: &str = "id: 1\nevent: join\ndata: {\"a\":1}\n\n: keep-alive\n\nid: 2\r\nevent: update\r\ndata: x\r\ndata:  y\r\n\r\nretry: 2500\rdata: z\r\r";

    #[test]
    fn parses_fields_comments_and_line_endings() {
        let (out, p) = parse_chunks(&[STREAM.as_bytes()]);
        assert_eq!(
            out,
            vec![
                ev("1", "join", "{\"a\":1}"),
                ev("2", "update", "x\n y"),
                ev("2", "message", "z"),
            ]
        );
        assert_eq!(p.retry(), Some(Duration::from_millis(2500)));
    }

    #[test]
    fn any_chunk_boundary_gives_the_same_events() {
        let bytes = STREAM.as_bytes();
        let (whole, _) = parse_chunks(&[bytes]);
        for cut in 0..=bytes.len() {
            let (a, b) = bytes.split_at(cut);
            let (out, _) = parse_chunks(&[a, b]);
            assert_eq!(out, whole, "cut at {cut}");
        }
        let singles: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(parse_chunks(&singles).0, whole);
    }

    #[test]
    fn utf8_split_inside_a_character_and_bom() {
        let text = "\u{feff}data: caf\u{e9} \u{1f600}\n\n";
        let bytes = text.as_bytes();
        for cut in 0..=bytes.len() {
            let (a, b) = bytes.split_at(cut);
            assert_eq!(
                parse_chunks(&[a, b]).0,
                vec![ev("", "message", "caf\u{e9} \u{1f600}")]
            );
        }
    }

    #[test]
    fn edge_cases_of_the_standard() {
        // No data: not dispatched, but the type is reset; id persists; NUL ids are
        // ignored; a field without a colon has an empty value; a partial event at the
        // end stays pending.
        let (out, _) = parse_chunks(&[
            b"event: ping\nid: 7\n\ndata\n\nid: a\0b\ndata:q\n\nretry: 1x\nfoo: bar\ndata: tail",
        ]);
        assert_eq!(out, vec![ev("7", "message", ""), ev("7", "message", "q")]);
        let (out, p) = parse_chunks(&[b"id\ndata: d\n\n"]);
        assert_eq!(out, vec![ev("", "message", "d")]);
        assert_eq!(p.retry(), None);
    }

    #[test]
    fn resumes_with_the_previous_last_id() {
        let mut p = SseParser::new("c9".into(), 1024);
        let mut out = Vec::new();
        p.feed(b"data: 1\n\n", &mut out).unwrap();
        assert_eq!(out, vec![ev("c9", "message", "1")]);
    }

    #[test]
    fn bounds_lines_and_events() {
        let mut p = SseParser::new(String::new(), 8);
        let mut out = Vec::new();
        assert_eq!(
            p.feed(b"data: 0123456789", &mut out),
            Err(TooLarge { max: 8 })
        );
        let mut p = SseParser::new(String::new(), 8);
        assert!(p.feed(b"data:1234\ndata:5678\n", &mut out).is_err());
    }
}
