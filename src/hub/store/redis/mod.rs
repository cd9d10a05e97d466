//! The Redis engine (`[cluster] redis`): several crier nodes share channels, ids, history and
//! resume through Redis.
//!
//! A publish is one Lua script on the channel's shard ([`script::PUBLISH`]): XADD with the id
//! Redis assigns, trim, expire, and PUBLISH of the entry on the channel's fan-out topic, in one
//! atomic step; a 201 means Redis has it. Group commit, per channel: publishes to a channel
//! that come while its call is in flight wait, and go together in the next call (one script,
//! one fan-out message, up to [`MAX_BATCH`]), each answered with its own id; a lone publish
//! goes at once. No node appends what it publishes itself: every node,
//! the publishing one too, appends only what the fan-out brings, so all of them deliver one
//! order ([`fanout`]). Each entry carries the channel's previous id, so a node sees at once
//! when it missed something (a dropped pub/sub connection, an outage) and fills the hole from
//! the stream, or, when the stream no longer has it, tells its subscribers of the gap.
//!
//! A node listens to a channel's topic only while the channel is active here (it has local
//! subscribers, and for a few seconds after the last one left; publishing from here does not
//! count: what a node publishes reaches it like anyone else's, if it listens). Opening a channel
//! subscribes first, then reads the stream's tail, so nothing falls between the two.

mod error;
mod fanout;
mod script;
mod shard;
mod table;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

pub use error::ClusterError;

/// What the fuzz targets check of the fan-out format (src/fuzzing.rs).
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod fuzz {
    pub(crate) use super::script::{parse_fanout, Entry, Fanout};
}
pub use table::{SharedTable, TableChange};

use super::{Engine, EngineFuture};
use crate::config::ClusterConfig;
use crate::hub::{
    Channel, ChannelStats, Hub, HubError, Message, MessageId, NewMessage, PublishReceipt,
};
use crate::keys::Secret;
use crate::metrics::Metrics;
use crate::model::ChannelName;
use error::{redact, unavailable};
use script::Keys;

/// Longest a publish, delete or stats command waits for Redis: past it the client gets a 503
/// and may retry (nothing hangs on a Redis that stopped answering).
const COMMAND_TIMEOUT: Duration = Duration::from_millis(1000);
/// Longest a subscriber waits for its channel to be opened (subscribe + stream read).
const OPEN_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the meta hash (head id, count) outlives the last publish beyond the buffer TTL:
/// as long as the hub remembers a freed channel's last id.
const META_EXTRA: Duration = Duration::from_secs(24 * 3600);
/// Most publishes one script call carries (the rest wait for the next call)...
pub(super) const MAX_BATCH: usize = 256;
/// ... and about how many body bytes (a larger message still goes, alone).
const MAX_BATCH_BYTES: usize = 1 << 20;

/// The engine: one [`Shard`] per URL.
pub struct Redis {
    shards: Vec<Arc<Shard>>,
    stop: CancellationToken,
    /// The fan-out tasks, until [`Redis::start`] hands them a hub.
    pending: Mutex<Vec<(Arc<Shard>, mpsc::UnboundedReceiver<Op>)>>,
    /// What must live as long as the engine (a test's Redis server).
    _guard: Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

/// One Redis server: a command connection (publish scripts, stream reads) and, in its
/// [`fanout`] task, a pub/sub connection.
pub(super) struct Shard {
    /// The URL as messages show it (no password).
    name: String,
    client: ::redis::Client,
    conn: ::redis::aio::ConnectionManager,
    prefix: Arc<str>,
    /// Tells this node's delete markers from other nodes'.
    node: Arc<str>,
    /// The channels active here, by name (see [`Active`]). parking_lot: held for lookups only.
    active: Mutex<HashMap<Arc<str>, Active>>,
    ops: mpsc::UnboundedSender<Op>,
    metrics: Arc<Metrics>,
    /// Shards whose fan-out is connected (shared by all shards: `crier_cluster_up`).
    connected: Arc<AtomicUsize>,
    shard_count: usize,
    /// Shared tables' topics and their followers ([`SharedTable::follow`]).
    tables: Mutex<Vec<(String, mpsc::UnboundedSender<TableChange>)>>,
    /// Channels with a publish call in flight, and the publishes waiting for the next one.
    /// parking_lot: held to queue or take, never across a call.
    queues: Mutex<HashMap<Arc<str>, Vec<Queued>>>,
}

/// A publish waiting for its channel's script call.
struct Queued {
    chan: Arc<Channel>,
    event: Option<Box<str>>,
    content_type: http::HeaderValue,
    body: bytes::Bytes,
    headers: http::HeaderMap,
    done: oneshot::Sender<Result<Stored, HubError>>,
}

/// A publish Redis has: its id and the stream's length after.
struct Stored {
    id: String,
    len: u64,
}

/// A channel this node listens to.
struct Active {
    chan: Arc<Channel>,
    /// Subscribers waiting for the tail to be loaded; None once it is.
    waiting: Option<Vec<oneshot::Sender<()>>>,
    /// Since when it has had no local subscriber (the fan-out task lets it go after a while).
    idle_since: Option<Instant>,
}

/// What the fan-out task is asked to do.
pub(super) enum Op {
    /// Subscribe to the channel's topic (if not yet) and load its tail.
    Open(Arc<str>),
    /// A shared table got a follower: subscribe to its topic.
    Follow,
}

impl Redis {
    /// Sets up every shard (a URL that does not parse is an error here); connections are made
    /// on first use. [`Redis::check`] is the start-up test that they can be.
    pub fn new(
        config: &ClusterConfig,
        password: Option<&Secret>,
        metrics: Arc<Metrics>,
    ) -> Result<Redis, ClusterError> {
        metrics.register_cluster();
        let node: Arc<str> = format!("{:016x}", node_id()).into();
        let prefix: Arc<str> = config.key_prefix.as_str().into();
        let connected = Arc::new(AtomicUsize::new(0));
        let mut shards = Vec::new();
        let mut pending = Vec::new();
        let ca = match &config.ca_file {
            None => None,
            Some(p) => Some(std::fs::read(p).map_err(|e| ClusterError::CaFile {
                path: p.display().to_string(),
                reason: format!("cannot read: {e}"),
            })?),
        };
        for url in &config.redis {
            let name = redact(url);
            let client =
                client(url, password, ca.as_deref()).map_err(|e| ClusterError::Connect {
                    url: name.clone(),
                    reason: e.to_string(),
                })?;
            let manager = ::redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(COMMAND_TIMEOUT))
                .set_response_timeout(Some(COMMAND_TIMEOUT))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_millis(500));
            let conn =
                ::redis::aio::ConnectionManager::new_lazy_with_config(client.clone(), manager)
                    .map_err(|e| ClusterError::Connect {
                        url: name.clone(),
                        reason: e.to_string(),
                    })?;
            let (ops, rx) = mpsc::unbounded_channel();
            let shard = Arc::new(Shard {
                name,
                client,
                conn,
                prefix: prefix.clone(),
                node: node.clone(),
                active: Mutex::new(HashMap::new()),
                ops,
                metrics: metrics.clone(),
                connected: connected.clone(),
                shard_count: config.redis.len(),
                tables: Mutex::new(Vec::new()),
                queues: Mutex::new(HashMap::new()),
            });
            pending.push((shard.clone(), rx));
            shards.push(shard);
        }
        Ok(Redis {
            shards,
            stop: CancellationToken::new(),
            pending: Mutex::new(pending),
            _guard: Mutex::new(None),
        })
    }

    /// Asks every shard for its `INFO server` (or, where an ACL refuses INFO, a PING): a
    /// refused connection, a bad password or a server that does not answer is a start-up
    /// error naming the shard, and so is a server older than Redis 7.0 (the publish script
    /// needs `<ms>-*` ids).
    pub async fn check(&self) -> Result<(), ClusterError> {
        for s in &self.shards {
            let error = |reason| ClusterError::Connect {
                url: s.name.clone(),
                reason,
            };
            match s
                .query_reason::<String>(::redis::cmd("INFO").arg("server"))
                .await
            {
                Ok(info) => too_old(&info).map_or(Ok(()), |r| Err(error(r)))?,
                Err(_) => {
                    s.query_reason::<String>(&::redis::cmd("PING"))
                        .await
                        .map_err(error)?;
                }
            }
        }
        Ok(())
    }

    /// Starts each shard's fan-out task on the hub this engine serves.
    pub fn start(&self, hub: &Hub) {
        for (shard, ops) in self.pending.lock().drain(..) {
            tokio::spawn(fanout::run(shard, hub.clone(), ops, self.stop.clone()));
        }
    }

    /// The shared table of that name (on the first shard: one table, one place).
    pub fn table(&self, name: &str) -> SharedTable {
        SharedTable::new(self.shards[0].clone(), name)
    }

    fn shard(&self, channel: &str) -> &Arc<Shard> {
        &self.shards[shard::shard_of(channel, self.shards.len())]
    }
}

/// Why a server is too old for crier, from its `INFO server` (None: new enough, or it does
/// not say, as a proxy in front of it might not).
fn too_old(info: &str) -> Option<String> {
    let version = info
        .lines()
        .find_map(|l| l.trim().strip_prefix("redis_version:"))?;
    let major: u32 = version.split('.').next()?.parse().ok()?;
    (major < 7).then(|| format!("Redis {version} is too old: crier needs 7.0 or later"))
}

/// A client for one URL, with the password of `password_file` when there is one, and for a
/// `rediss://` URL the CA of `ca_file` instead of the system roots.
fn client(
    url: &str,
    password: Option<&Secret>,
    ca: Option<&[u8]>,
) -> Result<::redis::Client, ::redis::RedisError> {
    use ::redis::IntoConnectionInfo;
    let mut info = url.into_connection_info()?;
    if let Some(pw) = password {
        let pw = String::from_utf8_lossy(&pw.0).into_owned();
        let settings = info.redis_settings().clone().set_password(pw);
        info = info.set_redis_settings(settings);
    }
    match ca {
        Some(ca) if url.starts_with("rediss://") => ::redis::Client::build_with_tls(
            info,
            ::redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(ca.to_vec()),
            },
        ),
        _ => ::redis::Client::open(info),
    }
}

/// Random enough to tell nodes apart (the pid and the clock, hashed by the std hasher's keys).
fn node_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(unix_ms() as u128);
    h.finish()
}

pub(super) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Shard {
    async fn query<T: ::redis::FromRedisValue>(&self, cmd: &::redis::Cmd) -> Result<T, HubError> {
        self.query_reason(cmd)
            .await
            .map_err(|e| unavailable(&self.name, e))
    }

    /// A command's answer, or why there is none.
    async fn query_reason<T: ::redis::FromRedisValue>(
        &self,
        cmd: &::redis::Cmd,
    ) -> Result<T, String> {
        let mut conn = self.conn.clone();
        let started = Instant::now();
        let r = tokio::time::timeout(COMMAND_TIMEOUT, cmd.query_async(&mut conn)).await;
        self.timed(started);
        error::reason(r, COMMAND_TIMEOUT)
    }

    fn timed(&self, started: Instant) {
        self.metrics
            .cluster_command_duration
            .observe(started.elapsed().as_secs_f64());
    }

    /// Queues a publish for its channel's next script call, and makes that call at once when
    /// none is in flight (a lone publish does not wait).
    fn enqueue(self: &Arc<Self>, hub: &Hub, q: Queued) {
        let first = {
            let mut queues = self.queues.lock();
            match queues.get_mut(&q.chan.name) {
                Some(waiting) => {
                    waiting.push(q);
                    None
                }
                None => {
                    queues.insert(q.chan.name.clone(), Vec::new());
                    Some(q)
                }
            }
        };
        if let Some(q) = first {
            // A task of its own: the call and the ones after it (what queued meanwhile) run
            // to the end whatever becomes of the publish that started them.
            tokio::spawn(self.clone().flush(hub.clone(), vec![q]));
        }
    }

    /// Publishes `batch`, tells the observers (webhooks) of each message in id order and
    /// answers its publishers, then does the same with what queued for the channel meanwhile,
    /// until nothing waits.
    async fn flush(self: Arc<Self>, hub: Hub, mut batch: Vec<Queued>) {
        let name = batch[0].chan.name.clone();
        loop {
            let chan = batch[batch.len() - 1].chan.clone();
            let answer = self.publish_batch(&batch).await;
            match answer {
                Ok((ids, len)) => {
                    for (q, (id, parsed)) in batch.drain(..).zip(ids) {
                        let message = Arc::new(Message::new(
                            parsed,
                            q.event,
                            q.content_type,
                            q.body,
                            Instant::now(),
                        ));
                        hub.observe_published(&name, &message, &q.headers);
                        let _ = q.done.send(Ok(Stored { id, len }));
                    }
                }
                Err(e) => {
                    for q in batch.drain(..) {
                        let _ = q.done.send(Err(e.clone()));
                    }
                }
            }
            let mut queues = self.queues.lock();
            let Some(waiting) = queues.get_mut(&name) else {
                return; // not reached: only this task removes the entry
            };
            if waiting.is_empty() {
                queues.remove(&name);
                drop(queues);
                // A channel this node only publishes to holds nothing here (its tail is not
                // kept): the sweep lets it go a buffer TTL from now.
                if !self.active.lock().contains_key(&name) {
                    chan.free_later();
                }
                return;
            }
            let mut bytes = 0;
            let take = waiting
                .iter()
                .take(MAX_BATCH)
                .position(|q| {
                    bytes += q.body.len();
                    bytes > MAX_BATCH_BYTES
                })
                .unwrap_or(waiting.len().min(MAX_BATCH))
                .max(1);
            batch = waiting.drain(..take).collect();
        }
    }

    /// One script call for a group of publishes to one channel: their ids (in order, as
    /// text and parsed) and the stream's length after. An error refuses them all (none was
    /// answered yet).
    async fn publish_batch(
        &self,
        batch: &[Queued],
    ) -> Result<(Vec<(String, MessageId)>, u64), HubError> {
        let chan = &batch[0].chan;
        let policy = chan.policy();
        let keys = Keys::of(&self.prefix, &chan.name);
        let ttl_ms = policy.buffer_ttl.as_millis().max(1) as u64;
        let (first, len, _n): (String, u64, u64) = self
            .eval(&script::PUBLISH, &[&keys.stream, &keys.meta], |call| {
                call.arg(&keys.topic)
                    .arg(policy.buffer_messages)
                    .arg(ttl_ms)
                    .arg(ttl_ms + META_EXTRA.as_millis() as u64)
                    .arg(chan.head_id().to_string())
                    .arg(batch.len());
                for q in batch {
                    call.arg(script::Packed {
                        event: q.event.as_deref().unwrap_or(""),
                        content_type: q.content_type.as_bytes(),
                        body: &q.body,
                    });
                }
            })
            .await?;
        let first: MessageId = first
            .parse()
            .map_err(|_| unavailable(&self.name, format!("unexpected id {first:?}")))?;
        // The script gives a call's messages consecutive ids from the first.
        let ids = (0..batch.len() as u64)
            .map(|i| match first.seq.checked_add(i) {
                Some(seq) => {
                    let id = MessageId { ms: first.ms, seq };
                    Ok((id.to_string(), id))
                }
                None => Err(unavailable(&self.name, format!("unexpected id {first}"))),
            })
            .collect::<Result<_, _>>()?;
        Ok((ids, len))
    }

    /// Runs `script` on `keys` and the arguments `args` adds, with the deadline, timing it;
    /// loads the script first when Redis does not have it (a restarted or flushed Redis).
    /// The EVALSHA is built as one command rather than through redis's ScriptInvocation,
    /// which keeps each argument in an allocation of its own and copies them all again.
    async fn eval<T: ::redis::FromRedisValue>(
        &self,
        script: &::redis::Script,
        keys: &[&str],
        args: impl FnOnce(&mut ::redis::Cmd),
    ) -> Result<T, HubError> {
        let mut call = ::redis::cmd("EVALSHA");
        call.arg(script.get_hash()).arg(keys.len()).arg(keys);
        args(&mut call);
        let mut conn = self.conn.clone();
        let started = Instant::now();
        let r = tokio::time::timeout(COMMAND_TIMEOUT, async {
            match call.query_async(&mut conn).await {
                Err(e)
                    if e.kind()
                        == ::redis::ErrorKind::Server(::redis::ServerErrorKind::NoScript) =>
                {
                    script.load_async(&mut conn).await?;
                    call.query_async(&mut conn).await
                }
                r => r,
            }
        })
        .await;
        self.timed(started);
        error::reason(r, COMMAND_TIMEOUT).map_err(|e| unavailable(&self.name, e))
    }

    /// Makes `chan` active here: the fan-out task subscribes to its topic and loads its tail.
    /// Returns a receiver that resolves once that is done (None: it is already).
    fn activate(&self, chan: &Arc<Channel>, wait: bool) -> Option<oneshot::Receiver<()>> {
        let mut active = self.active.lock();
        let (tx, rx) = if wait {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        match active.get_mut(&chan.name) {
            Some(a) if Arc::ptr_eq(&a.chan, chan) => {
                a.idle_since = None;
                match (&mut a.waiting, tx) {
                    (None, _) => None,
                    (Some(w), Some(tx)) => {
                        w.push(tx);
                        rx
                    }
                    (Some(_), None) => None,
                }
            }
            _ => {
                // New here, or a new incarnation of the channel (freed and made again): who
                // waited for the old one is let go (it is gone; they see it closed).
                let old = active.insert(
                    chan.name.clone(),
                    Active {
                        chan: chan.clone(),
                        waiting: Some(tx.into_iter().collect()),
                        idle_since: None,
                    },
                );
                for w in old.and_then(|a| a.waiting).into_iter().flatten() {
                    let _ = w.send(());
                }
                // The task ends only with the engine: a closed queue means shutting down.
                let _ = self.ops.send(Op::Open(chan.name.clone()));
                rx
            }
        }
    }

    /// The fan-out task loaded `chan`: wake who waits for it.
    fn loaded(&self, chan: &Arc<Channel>) {
        let waiting = {
            let mut active = self.active.lock();
            match active.get_mut(&chan.name) {
                Some(a) if Arc::ptr_eq(&a.chan, chan) => a.waiting.take(),
                _ => None,
            }
        };
        for w in waiting.into_iter().flatten() {
            let _ = w.send(());
        }
    }

    /// Sets `crier_cluster_up` from how many shards have their fan-out connected.
    fn set_connected(&self, up: bool) {
        let n = if up {
            self.connected.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            self.connected.fetch_sub(1, Ordering::Relaxed) - 1
        };
        self.metrics
            .cluster_up
            .set(i64::from(n == self.shard_count));
    }
}

/// A stream entry as a message on the local tail. One read back from the stream (`live`
/// false) is as old as its id says (Redis's clock), so every node expires it at about the same
/// time; one the fan-out brings now is new (a node whose clock runs ahead of Redis's by more
/// than the TTL would otherwise drop it on arrival).
fn message(e: script::Entry, live: bool) -> Arc<Message> {
    let age = match live {
        true => Duration::ZERO,
        false => Duration::from_millis(unix_ms().saturating_sub(e.id.ms)),
    };
    let now = Instant::now();
    let content_type = http::HeaderValue::from_maybe_shared(e.content_type)
        .unwrap_or(http::HeaderValue::from_static("application/octet-stream"));
    Arc::new(Message::new(
        e.id,
        e.event,
        content_type,
        e.body,
        now.checked_sub(age).unwrap_or(now),
    ))
}

/// The id every id of the chain up to `e` is at or below: `e`'s previous id when Redis knew
/// it, else just below `e` (what came before it cannot be known).
fn floor_before(e: &script::Entry) -> MessageId {
    if e.prev != MessageId::ZERO && e.prev < e.id {
        return e.prev;
    }
    match e.id.seq {
        0 => MessageId {
            ms: e.id.ms.saturating_sub(1),
            seq: u64::MAX,
        },
        s => MessageId {
            ms: e.id.ms,
            seq: s - 1,
        },
    }
}

impl Engine for Redis {
    fn publish<'a>(
        &'a self,
        hub: &'a Hub,
        channel: &'a ChannelName,
        msg: NewMessage,
    ) -> EngineFuture<'a, Result<PublishReceipt, HubError>> {
        Box::pin(async move {
            // The channel limit is this node's, as with every engine. Publishing does not
            // make the channel active here: a node listens only to channels it has
            // subscribers for (a subscriber opening it here reads the tail from the stream),
            // so a publish-only node costs Redis no fan-out message, and itself no parse.
            let (chan, _) = hub.get_or_create(channel, None)?;
            let shard = self.shard(channel.as_str());
            let (done, answer) = oneshot::channel();
            shard.enqueue(
                hub,
                Queued {
                    chan: chan.clone(),
                    event: msg.event,
                    content_type: msg.content_type,
                    body: msg.body,
                    headers: msg.headers,
                    done,
                },
            );
            let stored = match answer.await {
                Ok(Ok(s)) => s,
                r => {
                    // Nothing was accepted: a channel made for this publish goes again (an
                    // outage must not fill max_channels with empty channels).
                    hub.release_if_idle(&chan);
                    return Err(match r {
                        Ok(Err(e)) => e,
                        _ => HubError::ShuttingDown, // the runtime stopped the call
                    });
                }
            };
            Ok(PublishReceipt {
                id: stored.id,
                channel: channel.as_str().to_string(),
                subscribers: chan.subscriber_count(),
                buffered: (stored.len as usize).min(chan.policy().buffer_messages),
            })
        })
    }

    fn open<'a>(
        &'a self,
        _hub: &'a Hub,
        channel: &'a Arc<Channel>,
    ) -> Option<EngineFuture<'a, Result<(), HubError>>> {
        let shard = self.shard(&channel.name);
        let rx = shard.activate(channel, true)?;
        Some(Box::pin(async move {
            match tokio::time::timeout(OPEN_TIMEOUT, rx).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err(HubError::ShuttingDown),
                Err(_) => Err(unavailable(
                    &shard.name,
                    format!(
                        "the channel's history could not be read within {}s",
                        OPEN_TIMEOUT.as_secs()
                    ),
                )),
            }
        }))
    }

    fn delete<'a>(
        &'a self,
        hub: &'a Hub,
        channel: &'a str,
    ) -> EngineFuture<'a, Result<(), HubError>> {
        Box::pin(async move {
            let shard = self.shard(channel);
            let keys = Keys::of(&shard.prefix, channel);
            let had: u64 = shard
                .eval(&script::DELETE, &[&keys.stream, &keys.meta], |c| {
                    c.arg(&keys.topic).arg(&*shard.node);
                })
                .await?;
            shard.active.lock().remove(channel);
            match hub.delete_local(channel) {
                Err(HubError::NoSuchChannel) if had > 0 => Ok(()),
                r => r,
            }
        })
    }

    fn stats<'a>(
        &'a self,
        hub: &'a Hub,
        channel: &'a str,
    ) -> EngineFuture<'a, Result<Option<ChannelStats>, HubError>> {
        Box::pin(async move {
            let shard = self.shard(channel);
            let keys = Keys::of(&shard.prefix, channel);
            let mut pipe = ::redis::pipe();
            pipe.cmd("GET")
                .arg(&keys.meta)
                .cmd("XLEN")
                .arg(&keys.stream);
            let mut conn = shard.conn.clone();
            let started = Instant::now();
            let r = tokio::time::timeout(
                COMMAND_TIMEOUT,
                pipe.query_async::<(Option<String>, u64)>(&mut conn),
            )
            .await;
            shard.timed(started);
            let (meta, len) = match r {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => return Err(unavailable(&shard.name, e)),
                Err(_) => return Err(unavailable(&shard.name, "no answer in time")),
            };
            let (last, n) = meta.as_deref().map_or((None, 0), |m| {
                let (last, n) = script::parse_meta(m);
                (Some(last.to_string()), n)
            });
            let local = hub.local_stats(channel);
            if n == 0 && local.is_none() {
                return Ok(None);
            }
            let policy = hub.config().buffer_policy_for(channel);
            let mut s = local.unwrap_or_else(|| ChannelStats {
                channel: channel.to_string(),
                subscribers: 0,
                subscribers_by_transport: crate::hub::SubscriberCounts {
                    websocket: 0,
                    sse: 0,
                    longpoll: 0,
                    webrtc: 0,
                },
                buffered: 0,
                last_id: None,
                published: 0,
            });
            s.published = n;
            s.last_id = if n > 0 { last } else { None };
            s.buffered = (len as usize).min(policy.buffer_messages);
            Ok(Some(s))
        })
    }

    fn close(&self) {
        self.stop.cancel();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests;
