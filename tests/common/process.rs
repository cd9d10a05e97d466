//! The built `crier` binary as a child process: for the CLI, startup errors, and figures
//! (RSS) that must belong to crier alone rather than to the test process.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The binary cargo built for the tests. `CRIER_BIN` overrides it: the by-hand measurements
/// (benches/sizing.sh names the WebRTC sessions test) measure a release build that way.
pub fn crier_bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var("CRIER_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_crier").to_string())
    })
}

/// Runs `crier args...` in `cwd` to completion (at most 30 s) with logging quiet.
pub fn run_cli(args: &[&str], cwd: &Path) -> Output {
    let mut child = Command::new(crier_bin())
        .args(args)
        .current_dir(cwd)
        .env_remove("CRIER_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn crier");
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        if child.try_wait().expect("wait crier").is_some() {
            return child.wait_with_output().expect("crier output");
        }
        if Instant::now() > end {
            let _ = child.kill();
            let out = child.wait_with_output().expect("crier output");
            panic!(
                "crier {args:?} did not exit within 30 s; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running `crier --config <temp file>`; killed on drop.
pub struct CrierProcess {
    child: Child,
    pub public: SocketAddr,
    pub config_path: PathBuf,
    /// Lines crier writes on stdout (the access log), read on a thread.
    pub stdout: mpsc::Receiver<String>,
    _dir: tempfile::TempDir,
}

impl CrierProcess {
    /// Starts the binary with [`super::base_config`] (every listener on port 0) and waits for
    /// its log line naming the public address.
    pub fn start(upstream: &str, extra: &str) -> CrierProcess {
        let dir = tempfile::tempdir().expect("tempdir");
        let toml = super::base_config(upstream, &dir.path().join("publish.sock"), extra);
        let config_path = dir.path().join("crier.toml");
        std::fs::write(&config_path, toml).expect("write config");
        let mut child = Command::new(crier_bin())
            .arg("--config")
            .arg(&config_path)
            .args(["--log-format", "json"])
            .env("CRIER_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn crier");
        let out = child.stdout.take().expect("stdout");
        let (out_tx, stdout) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = out_tx.send(line);
            }
        });
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // Keep draining stderr for the life of the child so it never blocks on a full pipe.
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let end = Instant::now() + Duration::from_secs(20);
        let mut seen = Vec::new();
        let public = loop {
            let left = end.saturating_duration_since(Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(l) => l,
                Err(_) => {
                    let _ = child.kill();
                    panic!(
                        "crier did not report its public address; stderr:\n{}",
                        seen.join("\n")
                    );
                }
            };
            if let Some(a) = public_addr(&line) {
                break a;
            }
            seen.push(line);
        };
        CrierProcess {
            child,
            public,
            config_path,
            stdout,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.public, path)
    }

    /// A `/proc/<pid>/status` field in KiB (`VmRSS`, `VmHWM`).
    pub fn status_kib(&self, field: &str) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc status"))
    }
}

impl Drop for CrierProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `listening on http://ADDR (public)` from a JSON log line.
fn public_addr(line: &str) -> Option<SocketAddr> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let msg = v["fields"]["message"].as_str()?;
    msg.strip_prefix("listening on http://")?
        .strip_suffix(" (public)")?
        .parse()
        .ok()
}
