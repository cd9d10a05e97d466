//! The storage contract and the engine's own cases against a real `redis-server`, one per
//! hub, on a Unix socket in a temporary directory (killed when the engine goes).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use super::Redis;
use crate::config::{BufferPolicy, ClusterConfig, Config};
use crate::hub::store::contract::{engine_contract, msg, name, MakeHub};
use crate::hub::{Hub, Read, Start};
use crate::metrics::Metrics;
use crate::model::Transport;

const SERVER: &str = "redis-server";

fn absent() -> Option<String> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(SERVER).is_file()))
        .unwrap_or(false);
    (!found).then(|| format!("{SERVER} is not installed (apt-get install redis-server)"))
}

/// A redis-server of its own; killed on drop.
struct Server {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Server {
        let dir = tempfile::tempdir().expect("test setup");
        let socket = dir.path().join("redis.sock");
        let child = Command::new(SERVER)
            .args(["--port", "0", "--save", "", "--appendonly", "no"])
            .arg("--unixsocket")
            .arg(&socket)
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        wait_for(&socket);
        Server {
            child,
            socket,
            _dir: dir,
        }
    }

    fn url(&self) -> String {
        format!("unix://{}", self.socket.display())
    }
}

fn wait_for(socket: &Path) {
    for _ in 0..500 {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("redis-server did not open {}", socket.display());
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn hub_on(server: Server, c: Config) -> Hub {
    let cluster = ClusterConfig {
        redis: vec![server.url()],
        key_prefix: "t:".into(),
        password_file: None,
        ca_file: None,
    };
    let metrics = Arc::new(Metrics::new());
    let engine = Arc::new(Redis::new(&cluster, None, metrics.clone()).expect("test setup"));
    *engine._guard.lock() = Some(Box::new(server));
    let hub = Hub::with_engine(Arc::new(c), metrics, engine.clone());
    engine.start(&hub);
    hub
}

struct MakeRedis;

impl MakeHub for MakeRedis {
    fn make(&self, max_channels: usize, buffer: usize, ttl: Duration) -> Hub {
        let mut c = Config::default();
        c.channels.max_channels = max_channels;
        c.channels.buffer = BufferPolicy {
            buffer_messages: buffer,
            buffer_ttl: ttl,
        };
        hub_on(Server::start(), c)
    }
}

engine_contract!(MakeRedis, absent);

#[tokio::test]
async fn an_unreachable_server_is_a_start_up_error() {
    let dir = tempfile::tempdir().expect("test setup");
    let cluster = ClusterConfig {
        redis: vec![format!("unix://{}/none.sock", dir.path().display())],
        key_prefix: "t:".into(),
        password_file: None,
        ca_file: None,
    };
    let engine = Redis::new(&cluster, None, Arc::new(Metrics::new())).expect("parses");
    let e = engine.check().await.expect_err("nothing listens there");
    let text = e.to_string();
    assert!(
        text.starts_with("cluster.redis unix://") && !text.contains('\n'),
        "{text}"
    );
}

#[tokio::test]
async fn a_hole_the_stream_cannot_fill_is_a_gap() {
    if let Some(why) = absent() {
        eprintln!("skipped: {why}");
        return;
    }
    let server = Server::start();
    let url = server.url();
    let h = hub_on(server, Config::default());
    let mut sub = h
        .subscribe(&name("g"), Transport::Sse, Start::Newest, None)
        .await
        .expect("test setup");
    h.publish(&name("g"), msg("1")).await.expect("test setup");
    let mut out = Vec::new();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), sub.next(&mut out, 10))
            .await
            .expect("delivered"),
        Read::Messages(1)
    );
    // Another writer empties the stream and forgets the head behind crier's back (as a
    // Redis restarted without persistence would): the next entry's chain is broken.
    let client = ::redis::Client::open(url.as_str()).expect("test setup");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("test setup");
    let _: () = ::redis::cmd("FLUSHALL")
        .query_async(&mut conn)
        .await
        .expect("test setup");
    h.publish(&name("g"), msg("2")).await.expect("test setup");
    let r = tokio::time::timeout(Duration::from_secs(5), sub.next(&mut out, 10))
        .await
        .expect("told");
    assert_eq!(r, Read::Lagged, "the subscriber learns it missed something");
    sub.skip_to_oldest();
    assert!(sub.take_gap());
    out.clear();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), sub.next(&mut out, 10))
            .await
            .expect("delivered"),
        Read::Messages(1)
    );
    assert_eq!(&out[0].body[..], b"2");
    assert_eq!(h.metrics().cluster_gaps.get(), 1);
}

#[tokio::test]
async fn a_refused_publish_leaves_no_channel_behind() {
    let dir = tempfile::tempdir().expect("test setup");
    let cluster = ClusterConfig {
        redis: vec![format!("unix://{}/down.sock", dir.path().display())],
        key_prefix: "t:".into(),
        password_file: None,
        ca_file: None,
    };
    let metrics = Arc::new(Metrics::new());
    let engine = Arc::new(Redis::new(&cluster, None, metrics.clone()).expect("test setup"));
    let mut c = Config::default();
    c.channels.max_channels = 2;
    let h = Hub::with_engine(Arc::new(c), metrics, engine.clone());
    engine.start(&h);
    for ch in ["a", "b", "c"] {
        match h.publish(&name(ch), msg("x")).await {
            Err(crate::hub::HubError::Unavailable(why)) => {
                assert!(why.contains("down.sock"), "{why}")
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        h.channel_count(),
        0,
        "Redis refused them all: nothing is kept"
    );
}

#[tokio::test]
async fn every_byte_event_and_content_type_reach_the_other_node() {
    if let Some(why) = absent() {
        eprintln!("skipped: {why}");
        return;
    }
    let server = Server::start();
    let url = server.url();
    let a = hub_on(server, Config::default());
    let cluster = ClusterConfig {
        redis: vec![url],
        key_prefix: "t:".into(),
        password_file: None,
        ca_file: None,
    };
    let metrics = Arc::new(Metrics::new());
    let engine = Arc::new(Redis::new(&cluster, None, metrics.clone()).expect("test setup"));
    let b = Hub::with_engine(Arc::new(Config::default()), metrics, engine.clone());
    engine.start(&b);
    let mut sub = b
        .subscribe(&name("bin"), Transport::WebSocket, Start::Newest, None)
        .await
        .expect("test setup");
    let body: Vec<u8> = (0..=255u8).chain(b"\n\r\n0-0\nm".iter().copied()).collect();
    let sent = a
        .publish(
            &name("bin"),
            crate::hub::NewMessage {
                event: Some("tick.1".into()),
                content_type: http::HeaderValue::from_static("application/octet-stream"),
                body: bytes::Bytes::from(body.clone()),
                headers: http::HeaderMap::new(),
            },
        )
        .await
        .expect("test setup");
    let mut out = Vec::new();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), sub.next(&mut out, 10))
            .await
            .expect("delivered"),
        Read::Messages(1)
    );
    let m = &out[0];
    assert_eq!(m.id.to_string(), sent.id);
    assert_eq!(&m.body[..], &body[..]);
    assert_eq!(m.event.as_deref(), Some("tick.1"));
    assert_eq!(m.content_type, "application/octet-stream");
}
