//! Log lines as operators read them, from the built binary: plain text on a pipe (no ANSI
//! codes), colour on a terminal unless NO_COLOR, one JSON object per line with
//! `--log-format json`, and on the journal (JOURNAL_STREAM naming stderr) a syslog priority
//! leading every line and no timestamp of crier's own. Also `crier check FILE`.

mod common;

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::process::{crier_bin, run_cli};

/// A crier child whose stderr lines arrive on `lines`; killed on drop.
struct Logged {
    child: Child,
    lines: mpsc::Receiver<String>,
    config: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Logged {
    /// Starts `crier --config <tmp> args...` with stderr on `stderr` (whose reading end is
    /// `read`), CRIER_LOG=info and `env`, and waits for "crier is ready".
    fn start(
        args: &[&str],
        env: &[(&str, &str)],
        stderr: Stdio,
        read: impl Read + Send + 'static,
    ) -> (Logged, Vec<String>) {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("crier.toml");
        std::fs::write(
            &config,
            common::base_config("http://127.0.0.1:9", &dir.path().join("pub.sock"), ""),
        )
        .unwrap();
        let mut cmd = Command::new(crier_bin());
        cmd.arg("--config")
            .arg(&config)
            .args(args)
            .env("CRIER_LOG", "info")
            .env_remove("NO_COLOR")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        let lines = read_lines(read);
        let mut l = Logged {
            child,
            lines,
            config,
            _dir: dir,
        };
        let seen = l.until("crier is ready");
        (l, seen)
    }

    /// Lines up to and including the first that contains `needle` (10 s at most).
    fn until(&mut self, needle: &str) -> Vec<String> {
        let end = Instant::now() + Duration::from_secs(10);
        let mut seen = Vec::new();
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let done = line.contains(needle);
                    seen.push(line);
                    if done {
                        return seen;
                    }
                }
                Err(_) => panic!("no log line with {needle:?}; got:\n{}", seen.join("\n")),
            }
        }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Lines read from `r` on a thread (CR stripped: a terminal sends CRLF).
fn read_lines(r: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            let _ = tx.send(line.trim_end_matches('\r').to_string());
        }
    });
    rx
}

fn piped() -> (Stdio, File, (u64, u64)) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array we pass.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both fds are fresh and owned by nobody else.
    let (r, w) = unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: fstat writes only into the struct we pass.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::fstat(fds[1], &mut st) }, 0);
    (Stdio::from(w), r, (st.st_dev as u64, st.st_ino as u64))
}

/// A pseudo-terminal: (the slave for the child's stderr, the master to read).
fn pty() -> (Stdio, File) {
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two fds; the name, termios and winsize pointers may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: fresh fds owned by nobody else.
    unsafe {
        (
            Stdio::from(OwnedFd::from_raw_fd(slave)),
            File::from_raw_fd(master),
        )
    }
}

fn has_escape(lines: &[String]) -> bool {
    lines.iter().any(|l| l.contains('\x1b'))
}

/// `2026-...Z` at the start: the fmt layer's own timestamp.
fn starts_with_timestamp(s: &str) -> bool {
    s.len() > 20 && s.as_bytes()[..4].iter().all(u8::is_ascii_digit) && s.as_bytes()[4] == b'-'
}

#[test]
fn text_logs_on_a_pipe_are_plain() {
    let (w, r, _) = piped();
    let (_c, lines) = Logged::start(&[], &[], w, r);
    assert!(!has_escape(&lines), "ANSI codes on a pipe:\n{lines:?}");
    assert!(
        lines
            .iter()
            .all(|l| starts_with_timestamp(l) && l.contains(" INFO ")),
        "{lines:?}"
    );
}

#[test]
fn text_logs_on_a_terminal_have_colour_unless_no_color() {
    let (slave, master) = pty();
    let (_c, lines) = Logged::start(&[], &[], slave, master);
    assert!(has_escape(&lines), "no colour on a terminal:\n{lines:?}");

    let (slave, master) = pty();
    let (_c, lines) = Logged::start(&[], &[("NO_COLOR", "1")], slave, master);
    assert!(!has_escape(&lines), "colour despite NO_COLOR:\n{lines:?}");

    // NO_COLOR is only honoured when not empty (no-color.org).
    let (slave, master) = pty();
    let (_c, lines) = Logged::start(&[], &[("NO_COLOR", "")], slave, master);
    assert!(
        has_escape(&lines),
        "empty NO_COLOR turned colour off:\n{lines:?}"
    );
}

#[test]
fn json_logs_are_one_object_per_line() {
    let (w, r, _) = piped();
    let (_c, lines) = Logged::start(&["--log-format", "json"], &[], w, r);
    for l in &lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert_eq!(v["level"], "INFO", "{l}");
        assert!(v["fields"]["message"].is_string(), "{l}");
        assert!(v["timestamp"].is_string(), "{l}");
    }
}

#[test]
fn on_the_journal_every_line_leads_with_its_priority() {
    let (w, r, (dev, ino)) = piped();
    let stream = format!("{dev}:{ino}");
    let (mut c, lines) = Logged::start(&[], &[("JOURNAL_STREAM", &stream)], w, r);
    for l in &lines {
        let rest = l
            .strip_prefix("<6>")
            .unwrap_or_else(|| panic!("info line without <6>: {l:?}"));
        assert!(
            !starts_with_timestamp(rest.trim_start()),
            "journald stamps lines itself; crier's timestamp is noise: {l:?}"
        );
        assert!(rest.trim_start().starts_with("INFO"), "{l:?}");
    }
    assert!(!has_escape(&lines), "{lines:?}");

    // A failed reload logs one error of several lines: each keeps priority 3.
    std::fs::write(
        &c.config,
        "[server]\nlisten = \"not a list\"\n[channels]\nbuffer_messages = -1\n",
    )
    .unwrap();
    c.signal(libc::SIGHUP);
    let seen = c.until("config reload failed");
    let first = seen.last().unwrap();
    assert!(first.starts_with("<3>"), "{first:?}");
    // The problems follow on their own lines, still priority 3.
    let next = c
        .lines
        .recv_timeout(Duration::from_secs(5))
        .expect("the reload error's next line");
    assert!(
        next.starts_with("<3>"),
        "continuation line lost its priority: {next:?}"
    );
}

#[test]
fn json_on_the_journal_leads_with_the_priority_too() {
    let (w, r, (dev, ino)) = piped();
    let stream = format!("{dev}:{ino}");
    let (_c, lines) = Logged::start(
        &["--log-format", "json"],
        &[("JOURNAL_STREAM", &stream)],
        w,
        r,
    );
    for l in &lines {
        let json = l
            .strip_prefix("<6>")
            .unwrap_or_else(|| panic!("no <6>: {l:?}"));
        let v: serde_json::Value = serde_json::from_str(json).expect("JSON after the lead");
        assert_eq!(v["level"], "INFO");
    }
}

#[test]
fn a_journal_stream_that_is_not_stderr_is_ignored() {
    // Inherited from a unit but stderr was redirected: plain text with timestamps.
    let (w, r, (dev, ino)) = piped();
    let other = format!("{dev}:{}", ino + 1);
    let (_c, lines) = Logged::start(&[], &[("JOURNAL_STREAM", &other)], w, r);
    assert!(lines.iter().all(|l| starts_with_timestamp(l)), "{lines:?}");
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn check_takes_the_file_as_an_argument() {
    let dir = tempfile::tempdir().unwrap();
    // A valid conf/crier.toml in the working directory: the default that must not be used.
    std::fs::create_dir(dir.path().join("conf")).unwrap();
    write(dir.path(), "conf/crier.toml", "");
    let good = write(
        dir.path(),
        "good.toml",
        "[server]\nshutdown_timeout = \"5s\"\n",
    );
    let bad = write(
        dir.path(),
        "bad.toml",
        "[server]\nshutdown_timeout = \"soon\"\n",
    );

    let out = run_cli(&["check", good.to_str().unwrap()], dir.path());
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{}: ok", good.display())
    );

    let out = run_cli(&["check", bad.to_str().unwrap()], dir.path());
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml") && err.contains("server.shutdown_timeout"),
        "{err}"
    );

    // --config still works, and naming two files is refused rather than guessed.
    let out = run_cli(&["check", "--config", bad.to_str().unwrap()], dir.path());
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let out = run_cli(
        &[
            "check",
            "--config",
            good.to_str().unwrap(),
            bad.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

/// The first line says what runs, from which file, on which addresses; an upstream that is
/// down is told once by the probe and once per 10 s by the proxy, however many requests fail.
#[test]
fn start_up_line_and_rate_limited_upstream_warnings() {
    let (stderr, read, _) = piped();
    let (l, seen) = Logged::start(&[], &[], stderr, read);
    let start = seen
        .iter()
        .find(|s| s.contains(" starting; config "))
        .unwrap_or_else(|| panic!("no start-up line in:\n{}", seen.join("\n")));
    let config = l.config.display().to_string();
    let version = format!("crier {}", env!("CARGO_PKG_VERSION"));
    for want in [
        version.as_str(),
        config.as_str(),
        "listeners http://127.0.0.1:",
        "publish unix:",
        "admin http://127.0.0.1:",
    ] {
        assert!(start.contains(want), "{want:?} not in {start}");
    }
    let public = seen
        .iter()
        .find_map(|s| s.split("listening on http://").nth(1))
        .and_then(|s| s.split(' ').next())
        .expect("public listener line")
        .to_string();
    for _ in 0..5 {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(&public).unwrap();
        s.write_all(b"GET /x HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    }
    let mut later = Vec::new();
    let end = Instant::now() + Duration::from_millis(1500);
    while let Ok(line) = l
        .lines
        .recv_timeout(end.saturating_duration_since(Instant::now()))
    {
        later.push(line);
    }
    let all: Vec<&String> = seen.iter().chain(&later).collect();
    let proxy = all
        .iter()
        .filter(|s| s.contains("proxy: upstream unreachable"))
        .count();
    let probe = all
        .iter()
        .filter(|s| s.contains("is not accepting connections"))
        .count();
    assert_eq!(proxy, 1, "five 502s, one line:\n{all:#?}");
    assert_eq!(probe, 1, "the probe tells it once:\n{all:#?}");
    assert!(all.iter().any(|s| s.contains("WARN")), "{all:#?}");
}
