//! Log lines on stderr, shaped for whoever reads them.
//!
//! - a terminal: text with colour, unless `NO_COLOR` is set (<https://no-color.org>);
//! - a pipe or a file: plain text, never an ANSI escape code;
//! - the journal (`JOURNAL_STREAM` names stderr, as systemd sets it for `StandardError=journal`):
//!   plain text without crier's own timestamp (journald stamps each line), every line led by its
//!   syslog priority (`<3>` error, `<4>` warning, `<6>` info, `<7>` debug), which journald turns
//!   into the entry's priority, so `journalctl -p warning` finds crier's warnings;
//! - `--log-format json`: one JSON object per line, with the same priority lead on the journal.
//!
//! The level comes from `CRIER_LOG` (an `EnvFilter`: `debug`, `crier=debug,hyper=info`, ...).

use std::io::{IsTerminal, Write};

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

/// Where stderr goes, as far as the log format is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Destination {
    Journal,
    Terminal,
    /// A pipe, a file, /dev/null, or a terminal with `NO_COLOR`.
    Plain,
}

/// Installs the global subscriber. Call once, before anything logs.
pub fn init(format: Format) {
    let filter = EnvFilter::try_from_env("CRIER_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let dest = destination();
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(dest == Destination::Terminal);
    match (format, dest) {
        (Format::Text, Destination::Journal) => b.without_time().with_writer(Journal).init(),
        (Format::Text, _) => b.with_writer(std::io::stderr).init(),
        (Format::Json, Destination::Journal) => b.json().with_writer(Journal).init(),
        (Format::Json, _) => b.json().with_writer(std::io::stderr).init(),
    }
}

fn destination() -> Destination {
    if stderr_is_journal() {
        Destination::Journal
    } else if std::io::stderr().is_terminal() && !no_color() {
        Destination::Terminal
    } else {
        Destination::Plain
    }
}

/// `NO_COLOR` present and not empty.
fn no_color() -> bool {
    std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty())
}

/// systemd sets `JOURNAL_STREAM=<dev>:<inode>` for the stream it connects; stderr is the journal
/// only if it is still that stream (a redirect, or a child started from a shell in the unit, may
/// have replaced it while the variable was inherited).
fn stderr_is_journal() -> bool {
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    // SAFETY: fstat writes only into the zeroed struct we pass; fd 2 may be closed (then -1).
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(2, &mut st) } != 0 {
        return false;
    }
    st.st_dev as u64 == dev && st.st_ino as u64 == ino
}

/// The syslog priority journald reads from a line's `<N>` lead.
fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// Writes each event to stderr with its priority leading every line: journald splits a stream
/// at newlines, so a multi-line error (a config reload's list of problems) keeps its priority
/// on each line instead of the continuation lines becoming "info".
struct Journal;

struct JournalLine {
    lead: [u8; 3],
    at_line_start: bool,
}

impl<'a> MakeWriter<'a> for Journal {
    type Writer = JournalLine;

    fn make_writer(&'a self) -> JournalLine {
        self.line(6)
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> JournalLine {
        self.line(priority(meta.level()))
    }
}

impl Journal {
    fn line(&self, prio: u8) -> JournalLine {
        JournalLine {
            lead: [b'<', b'0' + prio, b'>'],
            at_line_start: true,
        }
    }
}

impl Write for JournalLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // The fmt layer hands over a whole formatted event at once; one write of the prefixed
        // copy keeps lines from concurrent threads from interleaving.
        let out = lead_lines(&self.lead, &mut self.at_line_start, buf);
        std::io::stderr().lock().write_all(&out)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// `buf` with `lead` before every line that starts in it; `at_line_start` carries over
/// between calls (a line split across two writes gets one lead).
fn lead_lines(lead: &[u8], at_line_start: &mut bool, buf: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(buf.len() + 2 * lead.len());
    for chunk in buf.split_inclusive(|&b| b == b'\n') {
        if *at_line_start {
            out.extend_from_slice(lead);
        }
        out.extend_from_slice(chunk);
        *at_line_start = chunk.ends_with(b"\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_split_across_writes_gets_one_lead() {
        let mut start = true;
        let mut out = lead_lines(b"<3>", &mut start, b"first\nsec");
        out.extend(lead_lines(b"<3>", &mut start, b"ond\nthird\n"));
        assert_eq!(out, b"<3>first\n<3>second\n<3>third\n");
        assert!(start);
    }
}
