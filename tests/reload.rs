//! Reload (what SIGHUP runs) opens and closes listeners without dropping connections that
//! the new config still serves, and refuses a config whose listener cannot be bound.

mod common;

use common::*;

#[tokio::test]
async fn reload_opens_and_closes_listeners_keeping_open_connections() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "").await;
    let old = c.public;
    let mut sse = SseClient::connect(&c.url("/live/r"), None).await;

    // Move the public listener to another port.
    let free = dead_addr().await;
    let mut cfg = c.handle.config().as_ref().clone();
    cfg.server.listen = vec![free];
    c.handle.reload(cfg).unwrap();
    assert_eq!(c.handle.addrs().public, vec![free]);

    let r = client()
        .get(format!("http://{free}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.text().await.unwrap(),
        "hello from upstream",
        "new listener serves"
    );
    assert!(
        eventually(std::time::Duration::from_secs(2), async || {
            tokio::net::TcpStream::connect(old).await.is_err()
        })
        .await,
        "old listener is closed"
    );
    // The subscriber that came in on the old listener keeps receiving.
    c.publish("r", "still connected").await;
    assert_eq!(sse.next_event().await.unwrap().data, "still connected");
    c.shutdown().await;
}

/// A reload that comes before the server runs (a SIGHUP right after start): every listener
/// still serves what it is for, and the one the reload closed is closed. `Crier::start` spawns
/// `run` on this single-threaded runtime, so it has not run yet when `reload` is called here.
/// It once paired the waiting sockets with the reloaded list by position: the public accept
/// loop got the admin socket and the publish listener's stop closed the old public one.
#[tokio::test]
async fn a_reload_before_run_keeps_each_listener_on_its_own_socket() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "").await;
    let old = c.public;
    let free = dead_addr().await;
    let mut cfg = c.handle.config().as_ref().clone();
    cfg.server.listen = vec![free];
    c.handle.reload(cfg).unwrap();

    let get = async |url: String| {
        let r = client().get(url).send().await.expect("request");
        (r.status().as_u16(), r.text().await.unwrap_or_default())
    };
    let (status, body) = get(format!("http://{free}/")).await;
    assert_eq!((status, body.as_str()), (200, "hello from upstream"));
    let (status, body) = get(c.admin_url("/metrics")).await;
    assert_eq!(status, 200);
    assert!(
        body.contains("crier_client_connections"),
        "admin answered: {body:.80}"
    );
    // The publish listener is still the publish API (it answers its own 404 for `/`).
    let (status, body) = get(format!("http://{}/", c.publish)).await;
    assert_eq!(status, 404);
    assert!(
        body.contains("publish"),
        "publish listener answered: {body:.80}"
    );
    c.publish("r", "published").await;
    assert!(
        eventually(std::time::Duration::from_secs(2), async || {
            tokio::net::TcpStream::connect(old).await.is_err()
        })
        .await,
        "the old public listener is closed"
    );
    c.shutdown().await;
}

#[tokio::test]
async fn reload_with_an_unbindable_listener_changes_nothing() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "").await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cfg = c.handle.config().as_ref().clone();
    cfg.server.listen.push(taken.local_addr().unwrap());
    cfg.push.clear();
    let err = c.handle.reload(cfg).unwrap_err().to_string();
    assert!(err.contains("server.listen"), "{err}");
    assert!(
        err.contains(&taken.local_addr().unwrap().to_string()),
        "{err}"
    );
    // Push locations were not removed: the old config still runs.
    let mut sse = SseClient::connect(&c.url("/live/r"), None).await;
    c.publish("r", "unchanged").await;
    assert_eq!(sse.next_event().await.unwrap().data, "unchanged");
    c.shutdown().await;
}
