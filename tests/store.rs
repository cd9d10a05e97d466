//! `[channels] store`: the built binary keeps every acknowledged message across SIGKILL and
//! SIGTERM restarts (same ids, bodies, content types, event names), ids keep rising, resume is
//! exact inside the stored buffer and a gap before it, the TTL counts across the restart,
//! deletes stay deleted, and a damaged file stops the start with its name.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::process::crier_bin;
use common::{client, longpoll, SseClient, SseEvent};

/// A crier process whose store (and config) live in a directory that outlives it.
struct Node {
    child: Child,
    public: SocketAddr,
    publish: SocketAddr,
    /// Its log lines up to the addresses.
    startup: Vec<String>,
    /// Its log lines after the addresses.
    log: mpsc::Receiver<String>,
}

fn config_in(dir: &Path, extra: &str) -> PathBuf {
    let store = dir.join("channels.redb");
    let toml = common::base_config(
        "http://127.0.0.1:9",
        &dir.join("publish.sock"),
        &format!("[channels]\nstore = \"{}\"\n{extra}", store.display()),
    );
    let path = dir.join("crier.toml");
    std::fs::write(&path, toml).expect("write config");
    path
}

impl Node {
    /// Starts `crier --config DIR/crier.toml` with the store in DIR, and waits until it
    /// reports its public and publish addresses.
    fn start(dir: &Path, extra: &str) -> Node {
        let config = config_in(dir, extra);
        let mut child = Command::new(crier_bin())
            .arg("--config")
            .arg(&config)
            .args(["--log-format", "json"])
            .env("CRIER_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn crier");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let end = Instant::now() + Duration::from_secs(30);
        let (mut public, mut publish) = (None, None);
        let mut seen = Vec::new();
        while public.is_none() || publish.is_none() {
            let left = end.saturating_duration_since(Instant::now());
            let Ok(line) = rx.recv_timeout(left) else {
                let _ = child.kill();
                panic!("crier did not report its addresses:\n{}", seen.join("\n"));
            };
            let msg = serde_json::from_str::<serde_json::Value>(&line)
                .ok()
                .and_then(|v| v["fields"]["message"].as_str().map(str::to_string))
                .unwrap_or_default();
            if let Some(a) = msg
                .strip_prefix("listening on http://")
                .and_then(|m| m.strip_suffix(" (public)"))
            {
                public = a.parse().ok();
            }
            if let Some(a) = msg.strip_prefix("publish API on http://") {
                publish = a.parse().ok();
            }
            seen.push(line);
        }
        Node {
            child,
            public: public.expect("public address"),
            publish: publish.expect("publish address"),
            startup: seen,
            log: rx,
        }
    }

    /// Waits (at most 20 s) for a log line containing `text`.
    fn wait_log(&self, text: &str) {
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) if line.contains(text) => return,
                Ok(_) => {}
                Err(_) => panic!("no log line with {text:?}"),
            }
        }
    }

    fn live(&self, channel: &str) -> String {
        format!("http://{}/live/{channel}", self.public)
    }

    fn pub_url(&self, channel: &str) -> String {
        format!("http://{}/pub/{channel}", self.publish)
    }

    /// Sends `sig` and waits for the exit; returns the exit code (None: killed by a signal).
    fn stop(mut self, sig: libc::c_int) -> Option<i32> {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(pid, sig) };
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait crier") {
                return status.code();
            }
            assert!(
                Instant::now() < end,
                "crier did not exit after signal {sig}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a publish sent and what it was acknowledged with.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sent {
    id: String,
    body: String,
    content_type: String,
    event: Option<String>,
}

async fn publish(
    c: &reqwest::Client,
    node: &Node,
    channel: &str,
    body: String,
    content_type: &str,
    event: Option<&str>,
) -> Sent {
    let mut req = c
        .post(node.pub_url(channel))
        .header("content-type", content_type)
        .body(body.clone());
    if let Some(e) = event {
        req = req.header("crier-event", e);
    }
    let r = req.send().await.expect("publish");
    assert_eq!(r.status(), 201, "publish answered {}", r.status());
    let v: serde_json::Value = r.json().await.expect("publish json");
    Sent {
        id: v["id"].as_str().expect("id").to_string(),
        body,
        content_type: content_type.to_string(),
        event: event.map(str::to_string),
    }
}

/// Every event of an SSE resume until `want` messages arrived (in-band gap notices apart).
async fn sse_read(url: &str, last: Option<&str>, want: usize) -> (Option<String>, Vec<SseEvent>) {
    let mut s = SseClient::connect(url, last).await;
    let resume = s.header("crier-resume");
    let mut got = Vec::new();
    while got.len() < want {
        match s.next_within(Duration::from_secs(10)).await {
            Ok(Some(ev)) if ev.event.as_deref() == Some("crier.gap") => {}
            Ok(Some(ev)) => got.push(ev),
            other => panic!("after {} of {want} events: {other:?}", got.len()),
        }
    }
    (resume, got)
}

fn id_of(s: &str) -> (u64, u64) {
    let (a, b) = s.split_once('-').expect("id shape");
    (a.parse().expect("ms"), b.parse().expect("seq"))
}

#[tokio::test]
async fn every_acknowledged_publish_survives_sigkill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let extra = "buffer_messages = 1000\n";
    let node = Node::start(dir.path(), extra);
    let c = client();
    // 800 at once over 4 channels, each with its own content type and event name.
    let mut tasks = Vec::new();
    for i in 0..800 {
        let (c, url) = (c.clone(), node.pub_url(&format!("k{}", i % 4)));
        tasks.push(tokio::spawn(async move {
            let ct = ["text/plain", "application/json"][i % 2];
            let event = (i % 3 == 0).then(|| format!("ev{}", i % 5));
            let mut req = c
                .post(url)
                .header("content-type", ct)
                .body(format!("{{\"n\":{i}}}"));
            if let Some(e) = &event {
                req = req.header("crier-event", e.as_str());
            }
            let r = req.send().await.expect("publish");
            assert_eq!(r.status(), 201);
            let v: serde_json::Value = r.json().await.expect("json");
            (
                i % 4,
                Sent {
                    id: v["id"].as_str().expect("id").to_string(),
                    body: format!("{{\"n\":{i}}}"),
                    content_type: ct.to_string(),
                    event,
                },
            )
        }));
    }
    let mut acked: Vec<Vec<Sent>> = vec![Vec::new(); 4];
    for t in tasks {
        let (k, s) = t.await.expect("task");
        acked[k].push(s);
    }
    // Right after the last acknowledgement: no chance to flush anything more.
    assert_eq!(node.stop(libc::SIGKILL), None);
    let node = Node::start(dir.path(), extra);
    // The database is made durable about once a second: the last publishes were only in the
    // journal, and the restart applied them from there.
    assert!(
        node.startup
            .iter()
            .any(|l| l.contains("journal records written after the last checkpoint")),
        "the restart applied nothing from the journal:\n{}",
        node.startup.join("\n")
    );
    for (k, sent) in acked.iter_mut().enumerate() {
        sent.sort_by_key(|s| id_of(&s.id));
        let url = format!("{}?last_event_id=earliest", node.live(&format!("k{k}")));
        let (_, got) = sse_read(&url, None, sent.len()).await;
        let want: Vec<(Option<String>, Option<String>, String)> = sent
            .iter()
            .map(|s| (Some(s.id.clone()), s.event.clone(), s.body.clone()))
            .collect();
        let got: Vec<_> = got.into_iter().map(|e| (e.id, e.event, e.data)).collect();
        assert!(
            got == want,
            "channel k{k}: the replay differs from what was acknowledged"
        );
    }
    // Content types, by long-poll (one message per answer, in its own content type).
    let lp = client();
    let first = &acked[0];
    let mut etag = None::<String>;
    for s in first.iter().take(20) {
        let url = match &etag {
            None => format!("{}?last_event_id=earliest", node.live("k0")),
            Some(_) => node.live("k0"),
        };
        let p = longpoll(&lp, &url, etag.as_deref()).await;
        assert_eq!(p.status, 200);
        assert_eq!(p.content_type.as_deref(), Some(s.content_type.as_str()));
        assert_eq!(p.body, s.body.as_bytes());
        etag = p.etag;
    }
}

#[tokio::test]
async fn sigkill_and_sigterm_restarts_resume_exactly_and_ids_continue() {
    let dir = tempfile::tempdir().expect("tempdir");
    let extra = "buffer_messages = 5\n";
    let c = client();
    for sig in [libc::SIGKILL, libc::SIGTERM] {
        let d = dir.path().join(format!("s{sig}"));
        std::fs::create_dir_all(&d).expect("dir");
        let node = Node::start(&d, extra);
        let mut sent = Vec::new();
        for i in 0..8 {
            let ev = (i % 2 == 0).then_some("tick");
            sent.push(publish(&c, &node, "r", format!("m{i}"), "text/plain", ev).await);
        }
        let code = node.stop(sig);
        if sig == libc::SIGTERM {
            assert_eq!(code, Some(0), "a drained exit");
        }
        let node = Node::start(&d, extra);
        // Inside the stored buffer (the last 5): exact, no gap.
        let (resume, got) = sse_read(&node.live("r"), Some(&sent[4].id), 3).await;
        assert_eq!(
            resume.as_deref(),
            Some("ok"),
            "no gap inside the buffer (signal {sig})"
        );
        let want: Vec<_> = sent[5..]
            .iter()
            .map(|s| (Some(s.id.clone()), s.event.clone(), s.body.clone()))
            .collect();
        let got: Vec<_> = got.into_iter().map(|e| (e.id, e.event, e.data)).collect();
        assert_eq!(got, want);
        // Before it: the whole buffer, and the gap said.
        let (resume, got) = sse_read(&node.live("r"), Some(&sent[0].id), 5).await;
        assert_eq!(resume.as_deref(), Some("gap"));
        assert_eq!(got[0].id.as_deref(), Some(sent[3].id.as_str()));
        let next = publish(&c, &node, "r", "after".into(), "text/plain", None).await;
        assert!(id_of(&next.id) > id_of(&sent[7].id), "ids continue");
        drop(node);
    }
}

#[tokio::test]
async fn the_buffer_ttl_counts_across_the_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let extra = "buffer_ttl = \"2s\"\n";
    let c = client();
    let node = Node::start(dir.path(), extra);
    publish(&c, &node, "t", "old".into(), "text/plain", None).await;
    node.stop(libc::SIGKILL);
    std::thread::sleep(Duration::from_millis(2500));
    let node = Node::start(dir.path(), extra);
    let r = c.get(node.pub_url("t")).send().await.expect("stats");
    assert_eq!(
        r.status(),
        404,
        "the expired message is gone, and its channel with it"
    );
    let fresh = publish(&c, &node, "t", "new".into(), "text/plain", None).await;
    let (_, got) = sse_read(
        &format!("{}?last_event_id=earliest", node.live("t")),
        None,
        1,
    )
    .await;
    assert_eq!(got[0].id.as_deref(), Some(fresh.id.as_str()));
    assert_eq!(got[0].data, "new");
}

#[tokio::test]
async fn a_deleted_channel_stays_deleted_and_its_ids_keep_rising() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = client();
    let node = Node::start(dir.path(), "");
    publish(&c, &node, "d", "1".into(), "text/plain", None).await;
    let last = publish(&c, &node, "d", "2".into(), "text/plain", None).await;
    publish(&c, &node, "keep", "k".into(), "text/plain", None).await;
    let r = c.delete(node.pub_url("d")).send().await.expect("delete");
    assert!(r.status().is_success(), "delete answered {}", r.status());
    node.stop(libc::SIGKILL);
    let node = Node::start(dir.path(), "");
    let r = c.get(node.pub_url("d")).send().await.expect("stats");
    assert_eq!(r.status(), 404, "deleted before the restart: still deleted");
    let r = c.get(node.pub_url("keep")).send().await.expect("stats");
    assert_eq!(r.status(), 200);
    let again = publish(&c, &node, "d", "3".into(), "text/plain", None).await;
    assert!(
        id_of(&again.id) > id_of(&last.id),
        "the next incarnation continues above"
    );
    let (resume, got) = sse_read(&node.live("d"), Some(&last.id), 1).await;
    assert_eq!(resume.as_deref(), Some("ok"));
    assert_eq!(got[0].data, "3");
}

#[tokio::test]
async fn a_damaged_store_stops_the_start_and_is_left_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config_in(dir.path(), "");
    let store = dir.path().join("channels.redb");
    let garbage: Vec<u8> = (0..50_000u32).map(|i| (i * 31 % 253) as u8).collect();
    std::fs::write(&store, &garbage).expect("write");
    let out = common::process::run_cli(
        &["--config", config.to_str().expect("utf-8 path")],
        dir.path(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&store.display().to_string()),
        "the error names the file: {stderr}"
    );
    assert!(
        std::fs::read(&store).expect("read") == garbage,
        "the file is unchanged"
    );
}

#[tokio::test]
async fn the_store_file_is_private_and_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let extra = "buffer_messages = 10\n";
    let node = Node::start(dir.path(), extra);
    let store = dir.path().join("channels.redb");
    let mode = std::fs::metadata(&store)
        .expect("made")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let journal = dir.path().join("channels.redb.journal");
    let mode = std::fs::metadata(&journal)
        .expect("made")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the journal too");
    let c = client();
    let body = "x".repeat(200);
    let mut size_after = Vec::new();
    for round in 0..2 {
        let n = if round == 0 { 2_000 } else { 8_000 };
        let mut tasks = Vec::new();
        for w in 0..32 {
            let (c, base, body) = (
                c.clone(),
                format!("http://{}/pub/", node.publish),
                body.clone(),
            );
            tasks.push(tokio::spawn(async move {
                for i in (w..n).step_by(32) {
                    let r = c
                        .post(format!("{base}b{}", i % 10))
                        .body(body.clone())
                        .send()
                        .await
                        .expect("publish");
                    assert_eq!(r.status(), 201);
                }
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        size_after.push(std::fs::metadata(&store).expect("store").len());
    }
    eprintln!("store size after 2,000 and 10,000 publishes: {size_after:?} bytes");
    assert!(
        size_after[1] <= size_after[0] * 2,
        "10 channels × 10 messages: the file stays bounded ({size_after:?})"
    );
    node.stop(libc::SIGTERM);
    let node = Node::start(dir.path(), extra);
    for k in 0..10 {
        let (_, got) = sse_read(
            &format!("{}?last_event_id=earliest", node.live(&format!("b{k}"))),
            None,
            10,
        )
        .await;
        assert_eq!(got.len(), 10);
    }
}

#[tokio::test]
async fn a_reload_keeps_the_store_until_the_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = client();
    let node = Node::start(dir.path(), "");
    let first = publish(&c, &node, "h", "1".into(), "text/plain", None).await;
    // The same config without `store`: SIGHUP applies the rest, the store stays open.
    let config = dir.path().join("crier.toml");
    let without: String = std::fs::read_to_string(&config)
        .expect("config")
        .lines()
        .filter(|l| !l.starts_with("store = "))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&config, without).expect("rewrite config");
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(node.child.id() as libc::pid_t, libc::SIGHUP) };
    node.wait_log("channels.store changed: it takes effect when crier restarts");
    node.wait_log("config reloaded");
    let second = publish(&c, &node, "h", "2".into(), "text/plain", None).await;
    node.stop(libc::SIGKILL);
    let node = Node::start(dir.path(), ""); // writes the config with `store` again
    let (_, got) = sse_read(
        &format!("{}?last_event_id=earliest", node.live("h")),
        None,
        2,
    )
    .await;
    let ids: Vec<_> = got.iter().filter_map(|e| e.id.clone()).collect();
    assert_eq!(
        ids,
        [first.id, second.id],
        "both stored: the reload did not drop the store"
    );
}
