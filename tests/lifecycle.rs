//! The built binary under signals: SIGTERM drains (SSE, WebSocket, long-poll, a slow proxied
//! request) and exits 0; SIGHUP reloads (or keeps the old config when the new one is broken);
//! sd_notify messages reach NOTIFY_SOCKET.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// crier as a child process; its addresses are read from its log.
struct Proc {
    child: Child,
    public: SocketAddr,
    publish: SocketAddr,
    admin: SocketAddr,
    config: PathBuf,
    sock: PathBuf,
    log: mpsc::Receiver<String>,
    _dir: tempfile::TempDir,
}

fn config_text(upstream: &str, sock: &Path, extra: &str) -> String {
    format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nshutdown_timeout = \"5s\"\n\
         [upstream]\nurl = \"{upstream}\"\nresponse_timeout = \"10s\"\n\
         [publish]\nunix = \"{}\"\nlisten = [\"127.0.0.1:0\"]\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n{extra}",
        sock.display()
    )
}

impl Proc {
    fn start(upstream: &str, extra: &str, env: &[(&str, String)]) -> Proc {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("crier.toml");
        std::fs::write(
            &config,
            config_text(upstream, &dir.path().join("pub.sock"), extra),
        )
        .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_crier"));
        cmd.arg("--config")
            .arg(&config)
            .env("CRIER_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let (mut public, mut publish, mut admin) = (None, None, None);
        let addr_after = |line: &str, marker: &str| -> Option<SocketAddr> {
            let rest = &line[line.find(marker)? + marker.len()..];
            rest.split_whitespace().next()?.parse().ok()
        };
        loop {
            let line = rx
                .recv_timeout(Duration::from_secs(10))
                .expect("crier logs its addresses");
            if line.contains("(public)") {
                public = addr_after(&line, "listening on http://");
            } else if line.contains("publish API on http://") {
                publish = addr_after(&line, "publish API on http://");
            } else if line.contains("admin on http://") {
                admin = addr_after(&line, "admin on http://");
            } else if line.contains("crier is ready") {
                break;
            }
        }
        Proc {
            child,
            public: public.unwrap(),
            publish: publish.unwrap(),
            admin: admin.unwrap(),
            config,
            sock: dir.path().join("pub.sock"),
            log: rx,
            _dir: dir,
        }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.public, path)
    }

    async fn publish(&self, channel: &str, body: &str) -> reqwest::StatusCode {
        client()
            .post(format!("http://{}/pub/{channel}", self.publish))
            .body(body.to_string())
            .send()
            .await
            .unwrap()
            .status()
    }

    async fn metric(&self, sample: &str) -> Option<f64> {
        metric_at(self.admin, sample).await
    }

    /// Waits for a log line containing `needle`.
    fn wait_log(&self, needle: &str) -> bool {
        let end = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < end {
            if let Ok(l) = self.log.recv_timeout(Duration::from_millis(100)) {
                if l.contains(needle) {
                    return true;
                }
            }
        }
        false
    }

    async fn wait_exit(&mut self) -> std::process::ExitStatus {
        for _ in 0..300 {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = self.child.kill();
        panic!("crier did not exit within 15s");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn sigterm_drains_every_kind_of_connection_and_exits_zero() {
    let up = Upstream::start().await;
    let mut p = Proc::start(
        &up.url(),
        "[[push]]\npath = \"/live/{channel}\"\nlongpoll_timeout = \"20s\"\n",
        &[],
    );
    let mut sse = SseClient::connect(&p.url("/live/d"), None).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/live/d", p.public))
        .await
        .unwrap();
    let longpoll = tokio::spawn(client().get(p.url("/live/d")).send());
    let slow = tokio::spawn(client().get(p.url("/delay?ms=1500")).send());
    assert!(
        eventually(Duration::from_secs(5), async || {
            p.metric("crier_connections{transport=\"longpoll\"}").await == Some(1.0)
                && p.metric("crier_connections{transport=\"websocket\"}").await == Some(1.0)
        })
        .await
    );
    assert_eq!(
        client()
            .get(format!("http://{}/readyz", p.admin))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    tokio::time::sleep(Duration::from_millis(100)).await; // the slow request is in flight
    p.signal(libc::SIGTERM);

    // /readyz says 503 while the slow request drains.
    let admin = p.admin;
    assert!(
        eventually(Duration::from_secs(2), async || {
            match client().get(format!("http://{admin}/readyz")).send().await {
                Ok(r) => r.status() == 503,
                Err(_) => false,
            }
        })
        .await,
        "/readyz answers 503 during the drain"
    );

    // SSE: a retry hint, then the end of the stream.
    assert!(sse.next_event().await.is_none(), "SSE stream ends");
    assert_eq!(
        sse.retries, 2,
        "one retry hint at the start, one before the end"
    );
    assert_eq!(sse.retry, Some(2000));
    // WebSocket: close 1001.
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
        {
            Some(Ok(WsMessage::Close(f))) => break f,
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(close.unwrap().code, CloseCode::Away);
    // Long-poll: 503 with Retry-After.
    let lp = longpoll.await.unwrap().unwrap();
    assert_eq!(lp.status(), 503);
    assert!(lp.headers().contains_key("retry-after"));
    // The slow proxied request finishes.
    let slow = slow.await.unwrap().unwrap();
    assert_eq!(slow.status(), 200);
    assert_eq!(slow.text().await.unwrap(), "late");

    let status = p.wait_exit().await;
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test]
async fn sighup_applies_a_new_config_without_dropping_subscribers() {
    let up1 = Upstream::start().await;
    let mut p = Proc::start(&up1.url(), "[[push]]\npath = \"/live/{channel}\"\n", &[]);
    let mut sse = SseClient::connect(&p.url("/live/keep"), None).await;
    assert_eq!(p.publish("keep", "before").await, 201);
    assert_eq!(sse.next_event().await.unwrap().data, "before");
    // The second push location does not exist yet: the path goes to the upstream.
    let r = client().get(p.url("/events/x")).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "hello from upstream");

    // New config: a second push location and another upstream (a dead address, so the
    // change shows as 502).
    let dead = dead_addr().await;
    let text = config_text(
        &format!("http://{dead}"),
        &p.sock,
        "[[push]]\npath = \"/live/{channel}\"\n[[push]]\npath = \"/events/{channel}\"\n",
    );
    std::fs::write(&p.config, text).unwrap();
    p.signal(libc::SIGHUP);
    assert!(p.wait_log("config reloaded"), "reload logged");
    assert_eq!(
        p.metric("crier_config_reloads_total{result=\"ok\"}").await,
        Some(1.0)
    );

    // Proxy now goes to the new (dead) upstream; the new location is served by crier.
    let r = client().get(p.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    let r = client()
        .get(p.url("/events/x?last_event_id=earliest"))
        .timeout(Duration::from_secs(5))
        .send();
    assert_eq!(p.publish("x", "new location").await, 201);
    let r = r.await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "new location");

    // The SSE subscriber from before the reload still receives.
    assert_eq!(p.publish("keep", "after").await, 201);
    assert_eq!(sse.next_event().await.unwrap().data, "after");

    p.signal(libc::SIGTERM);
    assert!(p.wait_exit().await.success());
}

#[tokio::test]
async fn sighup_with_a_broken_config_keeps_the_old_one() {
    let up = Upstream::start().await;
    let mut p = Proc::start(&up.url(), "", &[]);
    let mut sse = SseClient::connect(&p.url("/live/k"), None).await;
    std::fs::write(&p.config, "[server]\nlisten = [\"127.0.0.1:70000\"]\n").unwrap();
    p.signal(libc::SIGHUP);
    assert!(p.wait_log("config reload failed"), "failure logged");
    assert_eq!(
        p.metric("crier_config_reloads_total{result=\"error\"}")
            .await,
        Some(1.0)
    );
    let r = client().get(p.url("/")).send().await.unwrap();
    assert_eq!(
        r.text().await.unwrap(),
        "hello from upstream",
        "still proxying"
    );
    assert_eq!(p.publish("k", "still here").await, 201);
    assert_eq!(sse.next_event().await.unwrap().data, "still here");
    p.signal(libc::SIGTERM);
    assert!(p.wait_exit().await.success());
}

#[tokio::test]
async fn sd_notify_messages() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let up = Upstream::start().await;
    let mut p = Proc::start(
        &up.url(),
        "",
        &[
            ("NOTIFY_SOCKET", sock_path.display().to_string()),
            ("WATCHDOG_USEC", "200000".to_string()),
        ],
    );
    let mut buf = [0u8; 512];
    let mut recv = || {
        let n = sock.recv(&mut buf).expect("a notify message");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let mut next_non_watchdog = |seen_watchdog: &mut bool| loop {
        let m = recv();
        if m == "WATCHDOG=1" {
            *seen_watchdog = true;
            continue;
        }
        return m;
    };
    let mut watchdog = false;
    assert_eq!(next_non_watchdog(&mut watchdog), "READY=1");
    p.signal(libc::SIGHUP);
    let m = next_non_watchdog(&mut watchdog);
    assert!(m.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{m:?}");
    assert_eq!(next_non_watchdog(&mut watchdog), "READY=1");
    // Watchdog pings come every WATCHDOG_USEC/2.
    std::thread::sleep(Duration::from_millis(300));
    p.signal(libc::SIGTERM);
    assert_eq!(next_non_watchdog(&mut watchdog), "STOPPING=1");
    assert!(watchdog, "WATCHDOG=1 was sent");
    assert!(p.wait_exit().await.success());
}
