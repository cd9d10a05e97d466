//! `crier demo`: what it prints works as printed. The page it names arrives through crier
//! from the built-in demo app and subscribes to `/live/demo`; the publish command it prints
//! reaches that channel; its chat box's WebSocket location publishes what clients send. The
//! browser suite (tests/e2e) does the same in Chromium.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::process::crier_bin;
use common::*;

/// `crier demo` as a child; SIGTERM on drop.
struct Demo {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Demo {
    /// The text after `label` on the first stdout line that has it (within 20 s).
    fn printed(&mut self, label: &str) -> String {
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(v) = self
                .seen
                .iter()
                .find_map(|l| l.trim_start().strip_prefix(label))
            {
                return v.trim().to_string();
            }
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => self.seen.push(l),
                Err(_) => panic!(
                    "crier demo did not print {label:?}; it printed:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    fn terminate(&mut self) -> Option<i32> {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(15);
        while Instant::now() < end {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        None
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn the_printed_page_shows_what_the_printed_command_publishes() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("demo.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n[publish]\nunix = \"{}\"\nlisten = [\"127.0.0.1:0\"]\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n",
            dir.path().join("publish.sock").display()
        ),
    )
    .unwrap();
    let mut child = Command::new(crier_bin())
        .arg("demo")
        .arg("--config")
        .arg(&config)
        .env("CRIER_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn crier demo");
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let mut demo = Demo {
        child,
        lines,
        seen: Vec::new(),
    };
    let page_url = demo.printed("1. open");
    let command = demo.printed("2. publish");
    let status_url = demo.printed("status page");
    assert!(command.ends_with("publish demo \"hello\""), "{command}");

    // The page comes from the demo app, through crier's proxy, and subscribes on the same origin.
    let ok = eventually(Duration::from_secs(10), async || {
        client().get(&page_url).send().await.is_ok()
    })
    .await;
    assert!(ok, "{page_url} never answered");
    let r = client().get(&page_url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("new EventSource('/live/demo')"));
    let status = client().get(&status_url).send().await.unwrap();
    assert_eq!(
        status.status(),
        200,
        "the status page is at the printed address"
    );

    let mut sse = SseClient::connect(&format!("{page_url}live/demo"), None).await;
    let out = tokio::task::spawn_blocking(move || {
        Command::new("sh")
            .arg("-c")
            .arg(&command)
            .output()
            .expect("run the printed command")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "the printed command failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"channel\":\"demo\""));
    let ev = sse
        .next_within(Duration::from_secs(5))
        .await
        .expect("a message within 5 s")
        .expect("the stream is open");
    assert_eq!(ev.data, "hello");
    drop(sse);

    // The page's chat box: a crier.json WebSocket that publishes what it sends.
    let ws_url = format!("{}demo-chat/room", page_url.replacen("http", "ws", 1));
    let (mut a, _) = ws_connect(&ws_url, &[("sec-websocket-protocol", "crier.json")]).await;
    let (mut b, _) = ws_connect(&ws_url, &[("sec-websocket-protocol", "crier.json")]).await;
    use futures_util::SinkExt;
    a.send(tokio_tungstenite::tungstenite::Message::text(
        r#"{"publish":"room","data":"hi from a"}"#,
    ))
    .await
    .unwrap();
    let ack = ws_json(&ws_next(&mut a).await.expect("an ack"));
    assert_eq!(ack["published"], "room", "{ack}");
    let m = ws_json(&ws_next(&mut b).await.expect("the message"));
    assert_eq!((&m["data"], &m["id"]), (&"hi from a".into(), &ack["id"]));
    drop((a, b));
    assert_eq!(demo.terminate(), Some(0), "crier demo exits 0 on SIGTERM");
}
