//! crier with clients that are not ours: the browser suites (`tests/e2e/run.mjs`: headless
//! Chromium driven by playwright-core; `tests/e2e/webpush.mjs`: Web Push; `tests/e2e/webrtc.mjs`:
//! its WebRTC stack) and the Python suites (`tests/pyclient/run.py`: PyPI `websockets` and
//! `httpx`; `tests/pyclient/webrtc.py`: aiortc). Both start the built `crier` binary themselves; these tests make
//! sure what they need is there, run them, stream their output and assert their exit status.
//!
//! What is missing gets installed: Chromium and openssl with apt-get (only as root, as CI
//! runs), `npm ci` of the committed lock file into `tests/e2e/node_modules`, and a venv under
//! `target/` (the Python script makes it). Without root or network a missing piece fails the
//! test with what to do; `CRIER_SKIP_BROWSER=1` / `CRIER_SKIP_PYTHON=1` skip a suite instead,
//! saying so.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The suites start Chromium, crier and clients: one at a time on a 2-core machine.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Each suite's own watchdog is shorter; this catches a wedged interpreter.
const SUITE_TIMEOUT: Duration = Duration::from_secs(240);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn out_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("e2e")
}

fn skip(var: &str, suite: &str) -> bool {
    if std::env::var(var).is_ok_and(|v| v == "1") {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: the {suite} suite ({var}=1 is set); nothing of it was checked"
        );
        return true;
    }
    false
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs a setup command to completion (bounded), failing the test with its output.
fn setup(what: &str, cmd: &mut Command, limit: Duration) {
    let _ = writeln!(std::io::stderr(), "e2e setup: {what}");
    let out = run_bounded(cmd, limit, false);
    assert!(
        out.success,
        "e2e setup failed: {what}\n{}",
        String::from_utf8_lossy(&out.output)
    );
}

/// Installs a Debian package when a command is missing: as root only; otherwise fails loudly.
fn ensure_apt(cmd: &str, package: &str, skip_var: &str) {
    if have(cmd) {
        return;
    }
    assert!(
        is_root(),
        "`{cmd}` is missing and this is not root, so it cannot be installed here: run \
         `apt-get install -y {package}` (or set {skip_var}=1 to skip this suite)"
    );
    apt_install(package);
    assert!(
        have(cmd),
        "`{cmd}` is still missing after installing {package}"
    );
}

fn apt_install(package: &str) {
    let apt = |args: &[&str]| {
        let mut c = Command::new("apt-get");
        c.args(["-o", "DPkg::Lock::Timeout=300", "-q", "-y"])
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    setup(
        "apt-get update",
        &mut apt(&["update"]),
        Duration::from_secs(300),
    );
    setup(
        &format!("apt-get install {package}"),
        &mut apt(&["install", package]),
        Duration::from_secs(900),
    );
}

struct Finished {
    success: bool,
    output: Vec<u8>,
}

/// Runs `cmd` in its own process group, killing the whole group after `limit`. Output
/// (stdout and stderr together) is collected and, with `echo`, also written to this process's
/// stderr as it comes, so CI logs show progress whether or not the test harness captures.
fn run_bounded(cmd: &mut Command, limit: Duration, echo: bool) -> Finished {
    use std::os::unix::process::CommandExt;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let output = Arc::new(Mutex::new(Vec::new()));
    let readers: Vec<_> = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|pipe| {
        let output = output.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).split(b'\n').map_while(Result::ok) {
                if echo {
                    let mut err = std::io::stderr().lock();
                    let _ = err.write_all(&line);
                    let _ = err.write_all(b"\n");
                }
                let mut o = output.lock().unwrap_or_else(|p| p.into_inner());
                o.extend_from_slice(&line);
                o.push(b'\n');
            }
        })
    })
    .collect();
    let end = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => {
                // Whatever the suite started and left behind (crier, Chromium) goes too.
                // SAFETY: kill(2) on the process group the child led.
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                break Some(s);
            }
            Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                // SAFETY: kill(2) on the child's own process group (it was made the leader).
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                let _ = child.wait();
                break None;
            }
        }
    };
    for r in readers {
        let _ = r.join();
    }
    let mut output = std::mem::take(&mut *output.lock().unwrap_or_else(|p| p.into_inner()));
    if status.is_none() {
        output.extend_from_slice(format!("\n(killed after {limit:?})\n").as_bytes());
    }
    Finished {
        success: status.is_some_and(|s| s.success()),
        output,
    }
}

fn node_major() -> Option<u32> {
    let out = Command::new("node").arg("--version").output().ok()?;
    let v = String::from_utf8_lossy(&out.stdout);
    v.trim()
        .trim_start_matches('v')
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// `npm ci` when `node_modules` does not match the committed lock file (a copy of the lock
/// file it was installed from is kept next to the modules).
fn ensure_node_modules(dir: &Path) {
    let lock = std::fs::read(dir.join("package-lock.json")).expect("tests/e2e/package-lock.json");
    let stamp = dir.join("node_modules").join(".crier-installed-from.json");
    if std::fs::read(&stamp).is_ok_and(|s| s == lock) {
        return;
    }
    setup(
        "npm ci (playwright-core, from tests/e2e/package-lock.json)",
        Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(dir),
        Duration::from_secs(300),
    );
    std::fs::write(&stamp, &lock).expect("write the node_modules stamp");
}

fn run_suite(name: &str, cmd: &mut Command) {
    let started = Instant::now();
    let out = run_bounded(
        cmd.env("CRIER_BIN", env!("CARGO_BIN_EXE_crier"))
            .env("CRIER_E2E_OUT", out_dir())
            .current_dir(repo()),
        SUITE_TIMEOUT,
        true,
    );
    let _ = writeln!(
        std::io::stderr(),
        "{name} suite: {} in {:.1} s",
        if out.success { "passed" } else { "FAILED" },
        started.elapsed().as_secs_f64()
    );
    assert!(
        out.success,
        "the {name} suite failed; its output:\n{}",
        String::from_utf8_lossy(&out.output)
    );
}

#[test]
fn browser_suite() {
    browser("browser", "run.mjs");
}

/// The WebRTC transport with Chromium's own WebRTC stack (`tests/e2e/webrtc.mjs`).
#[test]
fn browser_webrtc_suite() {
    browser("browser WebRTC", "webrtc.mjs");
}

/// Web Push in Chromium (`tests/e2e/webpush.mjs`): the demo page's "Notify me" flow, with a
/// recorded PushSubscription (headless Chromium reaches no push service).
#[test]
fn webpush_browser_suite() {
    browser("Web Push browser", "webpush.mjs");
}

#[test]
fn python_suite() {
    python("Python", "run.py", "CRIER_PY_VENV", "venv");
}

/// The WebRTC transport with aiortc's stack (`tests/pyclient/webrtc.py`, its own venv).
#[test]
fn python_webrtc_suite() {
    python(
        "Python WebRTC",
        "webrtc.py",
        "CRIER_PY_WEBRTC_VENV",
        "venv-webrtc",
    );
}

/// Runs `tests/e2e/<script>` with Node and headless Chromium (both checked or installed first).
fn browser(name: &str, script: &str) {
    if skip("CRIER_SKIP_BROWSER", name) {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    match node_major() {
        Some(v) if v >= 20 => {}
        other => panic!(
            "the browser suite needs Node.js 20 or newer (found {other:?}); install it or set \
             CRIER_SKIP_BROWSER=1"
        ),
    }
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !Path::new(&chromium).exists() {
        ensure_apt("chromium", "chromium", "CRIER_SKIP_BROWSER");
    }
    ensure_apt("openssl", "openssl", "CRIER_SKIP_BROWSER");
    let dir = repo().join("tests/e2e");
    ensure_node_modules(&dir);
    run_suite(
        name,
        Command::new("node")
            .arg(dir.join(script))
            .env("CHROMIUM", chromium),
    );
}

/// Runs `tests/pyclient/<script>`, which makes its venv at `out_dir()/<venv>` (passed in
/// `venv_env`).
fn python(name: &str, script: &str, venv_env: &str, venv: &str) {
    if skip("CRIER_SKIP_PYTHON", name) {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    ensure_apt("python3", "python3", "CRIER_SKIP_PYTHON");
    let venv_ok = Command::new("python3")
        .args(["-c", "import venv, ensurepip"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !venv_ok {
        assert!(
            is_root(),
            "python3 cannot make a venv (no ensurepip): run `apt-get install -y python3-venv` \
             (or set CRIER_SKIP_PYTHON=1)"
        );
        apt_install("python3-venv");
    }
    ensure_apt("openssl", "openssl", "CRIER_SKIP_PYTHON");
    run_suite(
        name,
        Command::new("python3")
            .arg(repo().join("tests/pyclient").join(script))
            .env(venv_env, out_dir().join(venv)),
    );
}
