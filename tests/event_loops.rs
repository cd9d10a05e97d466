//! `server.event_loops`: the public listeners' connections served by single-threaded event
//! loops, each with its own socket on the address (SO_REUSEPORT): proxying, SSE, WebSocket and
//! long-poll work there, the connections spread over the loops, a port already taken is still
//! a startup error, reload opens listeners on the loops, and shutdown ends the loops' threads.

mod common;

use std::time::Duration;

use common::process::run_cli;
use common::raw::RawConn;
use common::*;

const LOOPS: &str = "event_loops = 2\n";

/// One test of this file at a time: the shutdown test counts the process's loop threads, which
/// another test's server would add to or take from meanwhile.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn loop_connections(c: &Crier) -> (f64, f64) {
    let a = metric(c, "crier_event_loop_connections{loop=\"0\"}").await;
    let b = metric(c, "crier_event_loop_connections{loop=\"1\"}").await;
    (a.unwrap_or(-1.0), b.unwrap_or(-1.0))
}

/// Threads of this process named `crier-loop-*` (the in-process servers' loops).
fn loop_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|n| n.starts_with("crier-loop-"))
                })
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test]
async fn every_transport_works_on_the_loops_and_connections_spread_over_them() {
    let _serial = SERIAL.lock().await;
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), LOOPS).await;

    // 24 keep-alive connections through the proxy, each used twice (the fast path's
    // upstream connections go back to the loop that used them).
    let mut conns = Vec::new();
    for _ in 0..24 {
        let mut r = RawConn::connect(c.public).await;
        assert_eq!(r.get("/").await.status, 200);
        conns.push(r);
    }
    for r in &mut conns {
        let resp = r.get("/echo").await;
        assert_eq!(resp.status, 200, "{}", resp.head);
    }
    let (a, b) = loop_connections(&c).await;
    assert_eq!(a + b, 24.0, "loop 0: {a}, loop 1: {b}");
    // The kernel spreads them by address: all 24 on one loop is a 1-in-8-million event.
    assert!(a > 0.0 && b > 0.0, "loop 0: {a}, loop 1: {b}");

    // Subscribers on the loops get what the publish API (on the runtime) publishes.
    let mut sse = SseClient::connect(&c.url("/live/el"), None).await;
    let (mut ws, _) = ws_connect(&c.ws_url("/live/el"), &[]).await;
    wait_subscribers(&c, "el", 2).await;
    let poll = tokio::spawn({
        let url = c.url("/live/el");
        async move { longpoll(&client(), &url, None).await }
    });
    wait_subscribers(&c, "el", 3).await;
    c.publish("el", "on the loops").await;
    assert_eq!(
        sse.next_event().await.expect("sse event").data,
        "on the loops"
    );
    let m = ws_next(&mut ws).await.expect("ws message");
    assert_eq!(m.into_text().expect("text").as_str(), "on the loops");
    let polled = poll.await.expect("long-poll");
    assert_eq!(polled.body, "on the loops");

    drop(conns);
    let _ = ws.close(None).await;
    drop(ws);
    drop(sse);
    assert!(
        eventually(Duration::from_secs(5), async || loop_connections(&c).await
            == (0.0, 0.0))
        .await,
        "connections still counted: {:?}",
        loop_connections(&c).await
    );
    c.shutdown().await;
}

/// Shutdown drains the subscribers on the loops, `run` returns, and the loops' threads end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_the_loops_and_ends_their_threads() {
    let _serial = SERIAL.lock().await;
    let up = Upstream::start().await;
    // The loops of the test before this one end just after its server's `run` returned.
    assert!(
        eventually(Duration::from_secs(5), async || loop_threads() == 0).await,
        "loop threads of an earlier test are still running"
    );
    let c = Crier::start(&up.url(), LOOPS).await;
    assert_eq!(loop_threads(), 2);
    let mut sse = SseClient::connect(&c.url("/live/bye"), None).await;
    wait_subscribers(&c, "bye", 1).await;
    c.handle.shutdown();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(10), sse.next_event())
            .await
            .expect("the subscriber was let go"),
        None,
        "the stream ends"
    );
    tokio::time::timeout(Duration::from_secs(20), c.done)
        .await
        .expect("run returned")
        .expect("run did not panic");
    assert!(
        eventually(Duration::from_secs(5), async || loop_threads() == 0).await,
        "{} loop threads left",
        loop_threads()
    );
}

/// A listener that a reload adds is served on the loops as well.
#[tokio::test]
async fn a_listener_opened_by_reload_is_on_the_loops() {
    let _serial = SERIAL.lock().await;
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), LOOPS).await;
    // Serving already (a reload before `run` has its own test in tests/reload.rs).
    assert_eq!(RawConn::connect(c.public).await.get("/").await.status, 200);
    let old = c.public;
    let free = dead_addr().await;
    let mut cfg = c.handle.config().as_ref().clone();
    cfg.server.listen = vec![free];
    c.handle.reload(cfg).expect("reload");
    assert_eq!(c.handle.addrs().public, vec![free]);
    let mut conns = Vec::new();
    for _ in 0..16 {
        let mut r = RawConn::connect(free).await;
        assert_eq!(r.get("/").await.status, 200);
        conns.push(r);
    }
    let (a, b) = loop_connections(&c).await;
    assert_eq!(a + b, 16.0, "loop 0: {a}, loop 1: {b}");
    assert!(
        eventually(Duration::from_secs(2), async || {
            tokio::net::TcpStream::connect(old).await.is_err()
        })
        .await,
        "the old listener's sockets are closed on every loop"
    );
    c.shutdown().await;
}

/// SO_REUSEPORT does not let a second crier join the first one's port: it is the same clear
/// startup error as without loops, whether the holder has loops or not.
#[tokio::test]
async fn a_port_already_taken_is_still_a_startup_error() {
    let _serial = SERIAL.lock().await;
    let up = Upstream::start().await;
    // Held by a crier with loops (its sockets have SO_REUSEPORT) ...
    let holder = Crier::start(&up.url(), LOOPS).await;
    // ... and by a plain listener.
    let plain = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    for addr in [holder.public, plain.local_addr().expect("addr")] {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("crier.toml");
        let toml = base_config(&up.url(), &dir.path().join("publish.sock"), LOOPS).replace(
            "listen = [\"127.0.0.1:0\"]\nevent_loops",
            &format!("listen = [\"{addr}\"]\nevent_loops"),
        );
        assert!(toml.contains(&addr.to_string()), "{toml}");
        std::fs::write(&config, toml).expect("write config");
        let out = run_cli(&["--config", config.to_str().expect("path")], dir.path());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "crier started on {addr}, taken");
        assert!(stderr.contains(&addr.to_string()), "{stderr}");
        assert!(stderr.contains("server.listen"), "{stderr}");
    }
    // The holder still serves its port.
    for _ in 0..8 {
        let mut r = RawConn::connect(holder.public).await;
        assert_eq!(r.get("/").await.status, 200);
    }
    holder.shutdown().await;
}

#[test]
fn event_loops_out_of_range_is_a_config_error() {
    let toml = base_config(
        "http://127.0.0.1:9",
        std::path::Path::new("/tmp/x.sock"),
        "event_loops = 5000\n",
    );
    let e = crier::config::Config::from_toml(&toml, None)
        .expect_err("5000 loops accepted")
        .to_string();
    assert!(e.contains("server.event_loops"), "{e}");
}
