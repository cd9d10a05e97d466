//! A real `redis-server` for the cluster tests: on a free loopback port, in its own directory
//! (so it can be killed and started again on the same port, with or without its AOF), killed
//! when dropped.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const SERVER: &str = "redis-server";

/// Why the cluster tests cannot run here (None: they can).
pub fn absent() -> Option<String> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(SERVER).is_file()))
        .unwrap_or(false);
    (!found).then(|| format!("{SERVER} is not installed (apt-get install redis-server)"))
}

pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    aof: bool,
    /// More `redis-server` arguments (`{port}` is replaced by the port).
    extra: Vec<String>,
}

impl RedisServer {
    /// `aof`: `appendonly yes` with `appendfsync always` (what a 201 is worth across a crash).
    pub fn start(aof: bool) -> RedisServer {
        Self::start_with(aof, &[])
    }

    /// With more arguments, e.g. `--requirepass x`; `{port}` in one is the chosen port (for
    /// `--tls-port {port} --port 0`).
    pub fn start_with(aof: bool, extra: &[&str]) -> RedisServer {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").expect("a free port");
            l.local_addr().expect("its address").port()
        };
        let mut s = RedisServer {
            port,
            child: None,
            dir: tempfile::tempdir().expect("test setup"),
            aof,
            extra: extra.iter().map(|a| a.to_string()).collect(),
        };
        s.spawn();
        s
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(SERVER);
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", ""])
            .arg("--dir")
            .arg(self.dir.path());
        if self.aof {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        let port = self.port.to_string();
        cmd.args(self.extra.iter().map(|a| a.replace("{port}", &port)));
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        for _ in 0..500 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server did not listen on {}", self.port);
    }

    /// SIGKILL: no goodbye, no last write.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port; `empty`: without what it had (no AOF read back).
    pub fn restart(&mut self, empty: bool) {
        self.kill();
        if empty {
            let _ = std::fs::remove_dir_all(self.data_dir());
            let _ = std::fs::create_dir_all(self.data_dir());
        }
        self.spawn();
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// One command over a fresh connection, answered as text (RESP read loosely).
    pub fn command(&self, args: &[&str]) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).expect("redis");
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes()).expect("redis write");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("test setup");
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).expect("redis answers");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
