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

/// A second node (hub and engine) on the same Redis.
fn node_on(url: &str, c: Config) -> Hub {
    let cluster = ClusterConfig {
        redis: vec![url.to_string()],
        key_prefix: "t:".into(),
        password_file: None,
        ca_file: None,
    };
    let metrics = Arc::new(Metrics::new());
    let engine = Arc::new(Redis::new(&cluster, None, metrics.clone()).expect("test setup"));
    let h = Hub::with_engine(Arc::new(c), metrics, engine.clone());
    engine.start(&h);
    h
}

/// How many times Redis ran each of these commands (INFO commandstats).
async fn calls(url: &str, commands: &[&str]) -> u64 {
    let client = ::redis::Client::open(url).expect("test setup");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("test setup");
    let info: String = ::redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .expect("test setup");
    commands
        .iter()
        .map(|c| {
            info.lines()
                .find_map(|l| l.strip_prefix(&format!("cmdstat_{c}:calls=")))
                .and_then(|rest| rest.split(',').next())
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum()
}

#[tokio::test]
async fn concurrent_publishes_to_a_channel_share_script_calls_and_keep_one_chain() {
    if let Some(why) = absent() {
        eprintln!("skipped: {why}");
        return;
    }
    const N: usize = 600;
    let mut c = Config::default();
    c.channels.buffer = BufferPolicy {
        buffer_messages: 2 * N,
        buffer_ttl: Duration::from_secs(600),
    };
    let server = Server::start();
    let url = server.url();
    let a = hub_on(server, c.clone());
    let b = node_on(&url, c);
    let mut subs = Vec::new();
    for h in [&a, &b] {
        subs.push(
            h.subscribe(&name("many"), Transport::Sse, Start::Newest, None)
                .await
                .expect("test setup"),
        );
    }
    let before = calls(&url, &["evalsha", "eval"]).await;
    // All at once, half on each node: each node's first goes alone, the rest queue behind it.
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let h = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move { h.publish(&name("many"), msg(&format!("p{i}"))).await })
        })
        .collect();
    let mut sent = std::collections::HashMap::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let r = t.await.expect("the task ends").expect("accepted");
        let id: crate::hub::MessageId = r.id.parse().expect("an id");
        assert!(
            sent.insert(id, format!("p{i}")).is_none(),
            "{id} given twice"
        );
    }
    let scripts = calls(&url, &["evalsha", "eval"]).await - before;
    assert_eq!(calls(&url, &["xadd"]).await, N as u64);
    assert!(
        scripts * 10 <= N as u64,
        "{N} publishes took {scripts} script calls: they were not grouped"
    );
    // Every node delivers every message once, in id order, each with its own body.
    for sub in &mut subs {
        let mut out = Vec::new();
        while out.len() < N {
            let r = tokio::time::timeout(Duration::from_secs(10), sub.next(&mut out, N))
                .await
                .expect("delivered");
            assert!(matches!(r, Read::Messages(_)), "{r:?}");
        }
        assert_eq!(out.len(), N);
        assert!(out.windows(2).all(|w| w[0].id < w[1].id), "id order");
        for m in &out {
            assert_eq!(
                sent.get(&m.id).map(|b| b.as_bytes()),
                Some(&m.body[..]),
                "{}",
                m.id
            );
        }
        assert!(
            tokio::time::timeout(Duration::from_millis(200), sub.next(&mut out, N))
                .await
                .is_err(),
            "nothing more"
        );
    }
    // Both nodes' heads and the cluster's count agree with what was published.
    let newest = sent.keys().max().copied();
    for h in [&a, &b] {
        let s = h.stats("many").await.expect("stats").expect("a channel");
        assert_eq!(s.published, N as u64);
        assert_eq!(s.last_id, newest.map(|i| i.to_string()));
    }
}

#[tokio::test]
async fn a_head_ahead_of_redis_clock_keeps_ids_rising_and_consecutive() {
    if let Some(why) = absent() {
        eprintln!("skipped: {why}");
        return;
    }
    const N: u64 = 40;
    let server = Server::start();
    let url = server.url();
    let h = hub_on(server, Config::default());
    h.publish(&name("ahead"), msg("first"))
        .await
        .expect("test setup");
    // The channel was deleted when its head was a minute ahead of Redis's clock (another
    // node's clock, or Redis's stepped back): the head stays, the stream is gone, and a `*`
    // id would be below the head.
    let ahead = super::unix_ms() + 60_000;
    let client = ::redis::Client::open(url.as_str()).expect("test setup");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("test setup");
    let _: () = ::redis::pipe()
        .cmd("DEL")
        .arg("t:{ahead}:s")
        .ignore()
        .cmd("SET")
        .arg("t:{ahead}:m")
        .arg(format!("{ahead}-5 1"))
        .arg("PX")
        .arg(600_000)
        .ignore()
        .query_async(&mut conn)
        .await
        .expect("test setup");
    // All at once: the first call goes alone (and takes the head's ms), the rest in groups.
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let h = h.clone();
            tokio::spawn(async move { h.publish(&name("ahead"), msg(&format!("p{i}"))).await })
        })
        .collect();
    let mut seqs = Vec::new();
    for t in tasks {
        let r = t.await.expect("the task ends").expect("accepted");
        let id: crate::hub::MessageId = r.id.parse().expect("an id");
        assert_eq!(id.ms, ahead, "{id}: above the head, not at Redis's clock");
        seqs.push(id.seq);
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (6..6 + N).collect::<Vec<_>>());
    // The stream holds exactly those (the entry first given a `*` id is gone), each chained
    // to the one before, and the head and count follow.
    let entries: ::redis::Value = ::redis::cmd("XRANGE")
        .arg("t:{ahead}:s")
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .expect("test setup");
    let ::redis::Value::Array(entries) = entries else {
        panic!("{entries:?}");
    };
    let entries: Vec<_> = entries
        .iter()
        .map(|e| super::script::entry_of(e).expect("an entry"))
        .collect();
    assert_eq!(entries.len() as u64, N);
    let mut prev = crate::hub::MessageId { ms: ahead, seq: 5 };
    for e in &entries {
        assert_eq!(e.prev, prev, "{}", e.id);
        prev = e.id;
    }
    let meta: String = ::redis::cmd("GET")
        .arg("t:{ahead}:m")
        .query_async(&mut conn)
        .await
        .expect("test setup");
    assert_eq!(meta, format!("{ahead}-{} {}", 5 + N, 1 + N));
}

#[test]
fn a_server_older_than_redis_7_is_refused_by_name() {
    let info = |v: &str| format!("# Server\r\nredis_version:{v}\r\nredis_mode:standalone\r\n");
    assert_eq!(
        super::too_old(&info("6.2.14")).as_deref(),
        Some("Redis 6.2.14 is too old: crier needs 7.0 or later")
    );
    for ok in ["7.0.15", "7.2.4", "8.0.0"] {
        assert_eq!(super::too_old(&info(ok)), None, "{ok}");
    }
    assert_eq!(super::too_old("# Server\r\n"), None, "says nothing");
}

#[tokio::test]
async fn a_server_whose_acl_refuses_info_still_passes_the_check() {
    if let Some(why) = absent() {
        eprintln!("skipped: {why}");
        return;
    }
    let server = Server::start();
    let client = ::redis::Client::open(server.url().as_str()).expect("test setup");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("test setup");
    let _: () = ::redis::cmd("ACL")
        .arg("SETUSER")
        .arg("default")
        .arg("-info")
        .query_async(&mut conn)
        .await
        .expect("test setup");
    let cluster = ClusterConfig {
        redis: vec![server.url()],
        key_prefix: "t:".into(),
        password_file: None,
        ca_file: None,
    };
    let engine = Redis::new(&cluster, None, Arc::new(Metrics::new())).expect("parses");
    engine
        .check()
        .await
        .expect("PING answers where INFO may not");
}
