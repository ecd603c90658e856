//! One line of a stream file: when it was read, where it came from and
//! its text, as `2026-12-02T10:00:00.123Z stdout hello`. Readable as it
//! stands (`dev` keeps these files as the job's log) and read back by the
//! shipper, which sends `stdout hello` with the time as the event's.
//!
//! The writer keeps every line short enough to be one CloudWatch Logs
//! event: longer output is cut into pieces marked as continued
//! (the marks of [`crate::telemetry::batch::join_pieces`]), so no reader ever needs
//! more than one event's worth of memory for one line.

use crate::telemetry::batch::{LogEvent, CONTINUED, CONTINUES, MAX_EVENT_BYTES};

/// Where a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Stdout,
    Stderr,
    /// The agent's own note in a job's stream (output dropped, truncated),
    /// or a line of the agent's own log.
    Agent,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Stdout => "stdout",
            Source::Stderr => "stderr",
            Source::Agent => "agent",
        }
    }

    fn parse(word: &str) -> Option<Source> {
        match word {
            "stdout" => Some(Source::Stdout),
            "stderr" => Some(Source::Stderr),
            "agent" => Some(Source::Agent),
            _ => None,
        }
    }
}

/// Length of the timestamp at the start of every line.
pub const STAMP_LEN: usize = "2026-12-02T10:00:00.123Z".len();

/// Longest source word plus its space: what a message carries besides the
/// line's text.
const SOURCE_ROOM: usize = "stdout ".len();

/// Longest text of one line, so that `source text` is one event.
pub const MAX_TEXT: usize = MAX_EVENT_BYTES - SOURCE_ROOM;

/// Formats `at_ms` (ms since the Unix epoch) as the line's stamp.
pub fn stamp(at_ms: i64) -> String {
    let at = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(at_ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    at.format(&fmt)
        .unwrap_or_else(|_| "1970-01-01T00:00:00.000Z".into())
}

fn parse_stamp(s: &str) -> Option<i64> {
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    let at = time::PrimitiveDateTime::parse(s, &fmt).ok()?.assume_utc();
    i64::try_from(at.unix_timestamp_nanos() / 1_000_000).ok()
}

/// Appends one line (with its newline) to `out`.
pub fn encode(out: &mut Vec<u8>, stamp: &str, source: Source, text: &str) {
    out.extend_from_slice(stamp.as_bytes());
    out.push(b' ');
    out.extend_from_slice(source.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(text.as_bytes());
    out.push(b'\n');
}

/// Reads lines back as events, remembering the last stamp it parsed (the
/// lines of one read share theirs).
#[derive(Debug, Default)]
pub struct Decoder {
    last: Option<([u8; STAMP_LEN], i64)>,
}

impl Decoder {
    /// A line (without its newline) as the event to send: the text behind
    /// its stamp. A line that is not in the format (a file damaged by hand
    /// or by a crash mid-write) is sent as it stands, at `fallback_ms`,
    /// rather than lost.
    pub fn decode(&mut self, line: &[u8], fallback_ms: i64) -> LogEvent {
        let parsed = line.get(..STAMP_LEN).and_then(|stamp| {
            let rest = line.get(STAMP_LEN..)?.strip_prefix(b" ")?;
            let word_end = rest.iter().position(|&b| b == b' ').unwrap_or(rest.len());
            Source::parse(std::str::from_utf8(&rest[..word_end]).ok()?)?;
            let at = match self.last {
                Some((seen, at)) if seen == stamp => at,
                _ => {
                    let at = parse_stamp(std::str::from_utf8(stamp).ok()?)?;
                    let mut key = [0u8; STAMP_LEN];
                    key.copy_from_slice(stamp);
                    self.last = Some((key, at));
                    at
                }
            };
            Some((at, rest))
        });
        let (timestamp_ms, text) = parsed.unwrap_or((fallback_ms, line));
        let mut message = match std::str::from_utf8(text) {
            Ok(t) => t.to_string(),
            Err(_) => String::from_utf8_lossy(text).into_owned(),
        };
        if message.len() > MAX_EVENT_BYTES {
            let mut end = MAX_EVENT_BYTES;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        LogEvent {
            timestamp_ms,
            message,
        }
    }
}

/// Cuts one pipe's bytes into lines, each at most `MAX_TEXT` bytes of
/// UTF-8 (invalid bytes replaced): a longer line comes out in pieces, all
/// but the last ending with the "continues" mark and all but the first
/// beginning with the "continued" one. Holds at most one piece of a line
/// that has not ended yet.
#[derive(Debug, Default)]
pub struct Lines {
    partial: Vec<u8>,
    /// The line being held began as a continuation of an earlier piece.
    continued: bool,
}

/// Bytes of text per piece: one event with both marks.
const PIECE: usize = MAX_TEXT - CONTINUES.len() - CONTINUED.len();

impl Lines {
    /// Feeds `bytes`, calling `emit` for every finished line or piece.
    pub fn feed(&mut self, mut bytes: &[u8], emit: &mut impl FnMut(&str)) {
        while !bytes.is_empty() {
            let end = memchr::memchr(b'\n', bytes);
            self.partial
                .extend_from_slice(&bytes[..end.unwrap_or(bytes.len())]);
            while self.partial.len() > PIECE {
                self.piece(emit);
            }
            match end {
                Some(at) => {
                    self.finish(emit);
                    bytes = &bytes[at + 1..];
                }
                None => bytes = &[],
            }
        }
    }

    /// The pipe ended: a last line without its newline comes out too.
    pub fn end(&mut self, emit: &mut impl FnMut(&str)) {
        if !self.partial.is_empty() || self.continued {
            self.finish(emit);
        }
    }

    fn finish(&mut self, emit: &mut impl FnMut(&str)) {
        // Invalid bytes grow into replacement characters: a line that fit
        // as bytes may not as text.
        while self.lead().len() + String::from_utf8_lossy(&self.partial).len() > MAX_TEXT {
            self.piece(emit);
        }
        let text = String::from_utf8_lossy(&self.partial);
        let text = text.strip_suffix('\r').unwrap_or(&text);
        emit(&format!("{}{text}", self.lead()));
        self.partial.clear();
        self.continued = false;
    }

    fn lead(&self) -> &'static str {
        if self.continued {
            CONTINUED
        } else {
            ""
        }
    }

    /// Sends as much of the line as fits one event as a piece that
    /// continues, cut at a character boundary when the bytes are UTF-8.
    fn piece(&mut self, emit: &mut impl FnMut(&str)) {
        let mut end = PIECE.min(self.partial.len());
        let text = loop {
            // Back off at most three bytes to keep a character whole.
            let floor = end.saturating_sub(3).max(1);
            while end > floor && end < self.partial.len() && (self.partial[end] & 0xC0) == 0x80 {
                end -= 1;
            }
            let text = String::from_utf8_lossy(&self.partial[..end]);
            if text.len() <= PIECE || end == 1 {
                break text.into_owned();
            }
            // Replacement characters took more room: shrink by their share.
            end = (end * PIECE / text.len()).clamp(1, end - 1);
        };
        emit(&format!("{}{text}{CONTINUES}", self.lead()));
        self.partial.drain(..end);
        self.continued = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::batch::join_pieces;

    fn lines_of(chunks: &[&[u8]]) -> Vec<String> {
        let mut lines = Lines::default();
        let mut out = Vec::new();
        for c in chunks {
            lines.feed(c, &mut |l| out.push(l.to_string()));
        }
        lines.end(&mut |l| out.push(l.to_string()));
        out
    }

    #[test]
    fn lines_split_at_newlines_across_chunks_and_a_last_line_without_one_is_kept() {
        assert_eq!(
            lines_of(&[b"one\ntw", b"o\r\n\nthree"]),
            ["one", "two", "", "three"]
        );
        assert!(lines_of(&[b""]).is_empty());
    }

    #[test]
    fn a_long_line_comes_out_in_marked_pieces_that_join_back_whole() {
        let line: String = (0..3 * 1024 * 1024)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        let mut input = line.clone().into_bytes();
        input.extend_from_slice(b"\nafter\n");
        let out = lines_of(&[&input[..1000], &input[1000..]]);
        assert_eq!(out.last().map(String::as_str), Some("after"));
        let pieces = &out[..out.len() - 1];
        assert_eq!(pieces.len(), 4, "3 MiB in pieces of one event each");
        assert!(pieces.iter().all(|p| p.len() <= MAX_TEXT));
        assert!(pieces[0].ends_with(CONTINUES) && !pieces[0].starts_with(CONTINUED));
        let last = &pieces[pieces.len() - 1];
        assert!(last.starts_with(CONTINUED) && !last.ends_with(CONTINUES));
        assert_eq!(join_pieces(pieces.iter().map(String::as_str)), line);
    }

    #[test]
    fn multibyte_characters_are_never_cut_and_invalid_bytes_are_replaced() {
        let line = "é".repeat(PIECE); // twice PIECE bytes
        let out = lines_of(&[line.as_bytes(), b"\n"]);
        assert_eq!(join_pieces(out.iter().map(String::as_str)), line);
        assert_eq!(lines_of(&[b"a\xffb\n"]), ["a\u{fffd}b"]);
        // Invalid bytes triple in size as replacement characters: the
        // pieces still fit one event each.
        let garbage = vec![0xffu8; 2 * MAX_TEXT];
        let out = lines_of(&[&garbage, b"\n"]);
        assert!(
            out.iter().all(|p| p.len() <= MAX_TEXT),
            "{:?}",
            out.iter().map(String::len).collect::<Vec<_>>()
        );
        let text = join_pieces(out.iter().map(String::as_str));
        assert_eq!(text.chars().count(), 2 * MAX_TEXT);
    }

    #[test]
    fn a_line_reads_back_as_its_source_and_text_at_its_time() {
        let at = 1_796_205_600_123;
        let mut buf = Vec::new();
        encode(&mut buf, &stamp(at), Source::Stderr, "oops: x y");
        assert_eq!(buf, b"2026-12-02T10:00:00.123Z stderr oops: x y\n");
        let mut decoder = Decoder::default();
        let ev = decoder.decode(&buf[..buf.len() - 1], 7);
        assert_eq!(
            (ev.timestamp_ms, ev.message.as_str()),
            (at, "stderr oops: x y")
        );
        let again = decoder.decode(&buf[..buf.len() - 1], 7);
        assert_eq!(again, ev, "the remembered stamp reads the same");
        let damaged = decoder.decode(b"garbage line", 7);
        assert_eq!(
            (damaged.timestamp_ms, damaged.message.as_str()),
            (7, "garbage line")
        );
    }
}
