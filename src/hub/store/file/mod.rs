//! The file engine (`[channels] store = PATH`): every channel's buffer in one redb file, so a
//! restart (an upgrade, a crash, SIGKILL) keeps every acknowledged message.
//!
//! Layout: an append log keyed by one global sequence (`log`: u64 → record), plus one row per
//! channel (`channels`: name → last id, floor, when) that outlives the channel's messages: the
//! tombstone above which a deleted or emptied channel's next incarnation continues, even if the
//! clock went back. Keying the log by a global sequence rather than by (channel, seq) puts
//! every insert at the right edge of one B-tree and every trim at its left edge; measured, it is
//! 3–20× faster with 10,000 channels.
//!
//! Group commit: one writer thread (a plain std thread: redb blocks, the runtime must not)
//! owns the database. Publishers send their message and wait on a oneshot; the writer takes
//! everything queued (up to [`MAX_BATCH`]), assigns ids, encodes them and the trims once
//! ([`changes`]), appends that to the journal with one fsync ([`journal`]), then appends the
//! batch to the local tails (in id order, waking subscribers) and answers every publisher.
//! The database gets the changes about once a second, folded ([`pending`]: a message trimmed
//! in between never reaches it), in one durable commit (a checkpoint) after which the journal
//! starts over. (Two journal writes in flight at once, from threads of their own, were tried:
//! fsyncs overlap on the device, but batches get smaller and the publish rate did not rise.)
//! Durability costs each publish one journal write's latency; concurrent publishes share
//! it, so throughput stays. At start the journal's records after the last checkpoint are
//! applied again: the database and its journal (`PATH.journal`) are one store.
//!
//! The writer keeps its own copy of each channel's stored tail (log keys, ids, times), so
//! trimming by count (at publish) and by TTL (once a second) deletes from the file without a
//! lookup, and the file stays bounded by the buffers' size.

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableHandle};
use tokio::sync::{oneshot, watch};

use super::{Engine, EngineFuture};
use crate::config::{BufferPolicy, Config};
use crate::hub::PublishReceipt;
use crate::hub::{Channel, ChannelStats, Hub, HubError, Message, MessageId, NewMessage};
use crate::model::ChannelName;
use changes::Changes;
use journal::Journal;
use pending::Pending;
use queue::Queue;

mod changes;
mod journal;
mod pending;
mod queue;

/// What the fuzz targets check of the journal (src/fuzzing.rs).
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod fuzz {
    pub(crate) use super::journal::{frame_record, scan};
}

/// Global sequence → one message (see [`encode`]).
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
/// A channel's row: (last id ms, last id seq, floor ms, floor seq, last change unix ms).
type Row = (u64, u64, u64, u64, u64);
/// Channel name → its row.
const CHANNELS: TableDefinition<&str, Row> = TableDefinition::new("channels");
/// `format` → the layout version, so a newer layout is refused rather than misread;
/// `journal` → the sequence of the last journal record the database holds.
const META: TableDefinition<&str, u64> = TableDefinition::new("crier");
/// 2: with a journal (a crier that reads 1 only would miss what is in it). 1 is read too.
const FORMAT: u64 = 2;
const JOURNALED: &str = "journal";

/// Most publishes one commit takes: a bound on one transaction's size and on how long the
/// first publisher of a batch waits for the last; past it the rest go in the next commit.
const MAX_BATCH: usize = 4096;
/// Longest a commit waits for the publishers of the last one to come back (see `run`): a
/// fraction of an fsync.
const GATHER: Duration = Duration::from_micros(500);
/// How often the writer drops expired messages from the file (the hub's sweep interval).
const MAINTENANCE_EVERY: Duration = Duration::from_secs(1);
/// The longest the database goes without a durable commit (a checkpoint) while it changes:
/// a bound on what a restart applies again from the journal.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// A checkpoint comes sooner once this much of the journal is used.
const CHECKPOINT_BYTES: u64 = journal::JOURNAL_BYTES / 4 * 3;
/// How long an empty channel's row is kept (the hub keeps its tombstones as long).
const TOMBSTONE_TTL_MS: u64 = 24 * 3600 * 1000;
/// redb's page cache: the file is read whole at start and then only written.
const CACHE_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("channels.store {path}: {reason}; crier leaves the file as it is (move it and its .journal aside to start with empty buffers)")]
    Open { path: PathBuf, reason: String },
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One record of the log, appended to `v`: version 1, then ids and time (u64 LE), then the
/// channel, the event name (flag byte, then length-prefixed) and the content type (u32 LE
/// length-prefixed), then the body to the end.
fn encode_into(v: &mut Vec<u8>, channel: &str, id: MessageId, at_ms: u64, msg: &NewMessage) {
    let event = msg.event.as_deref();
    let ct = msg.content_type.as_bytes();
    v.reserve(38 + channel.len() + event.map_or(0, str::len) + ct.len() + msg.body.len());
    v.push(1u8);
    v.extend_from_slice(&id.ms.to_le_bytes());
    v.extend_from_slice(&id.seq.to_le_bytes());
    v.extend_from_slice(&at_ms.to_le_bytes());
    put(v, channel.as_bytes());
    match event {
        Some(e) => {
            v.push(1);
            put(v, e.as_bytes());
        }
        None => v.push(0),
    }
    put(v, ct);
    v.extend_from_slice(&msg.body);
}

fn put(v: &mut Vec<u8>, b: &[u8]) {
    v.extend_from_slice(&(b.len() as u32).to_le_bytes());
    v.extend_from_slice(b);
}

/// A record read back (borrowing the stored bytes).
struct Record<'a> {
    channel: &'a str,
    id: MessageId,
    at_ms: u64,
    event: Option<&'a str>,
    content_type: &'a [u8],
    body: &'a [u8],
}

fn decode(b: &[u8]) -> Option<Record<'_>> {
    let mut r = Reader(b);
    if r.take(1)? != [1] {
        return None;
    }
    let id = MessageId {
        ms: r.u64()?,
        seq: r.u64()?,
    };
    let at_ms = r.u64()?;
    let channel = std::str::from_utf8(r.bytes()?).ok()?;
    let event = match r.take(1)? {
        [0] => None,
        [1] => Some(std::str::from_utf8(r.bytes()?).ok()?),
        _ => return None,
    };
    let content_type = r.bytes()?;
    Some(Record {
        channel,
        id,
        at_ms,
        event,
        content_type,
        body: r.0,
    })
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = u32::from_le_bytes(self.take(4)?.try_into().ok()?) as usize;
        self.take(n)
    }
}

/// One stored message, as the writer tracks it.
#[derive(Debug, Clone, Copy)]
struct Entry {
    key: u64,
    id: MessageId,
    at_ms: u64,
}

/// What the file holds of one channel.
#[derive(Debug)]
struct Stored {
    /// The newest id ever given in this channel (its high-water mark): the next is above it.
    last: MessageId,
    /// Every id up to here is gone (evicted, expired or deleted): a resume from before it
    /// reports a gap.
    floor: MessageId,
    /// Unix ms of the last change (to forget empty channels after a day).
    at_ms: u64,
    policy: BufferPolicy,
    /// The stored messages, oldest first.
    tail: VecDeque<Entry>,
}

impl Stored {
    fn row(&self) -> Row {
        (
            self.last.ms,
            self.last.seq,
            self.floor.ms,
            self.floor.seq,
            self.at_ms,
        )
    }

    /// Drops what the policy no longer keeps (by count, then by age at `now_ms`); the log
    /// keys to delete go to `removed`. True when anything went.
    fn trim(&mut self, now_ms: u64, removed: &mut Vec<u64>) -> bool {
        let before = removed.len();
        let ttl = self.policy.buffer_ttl.as_millis() as u64;
        while self.tail.len() > self.policy.buffer_messages.max(1)
            || self
                .tail
                .front()
                .is_some_and(|e| now_ms.saturating_sub(e.at_ms) > ttl)
        {
            let Some(e) = self.tail.pop_front() else {
                break;
            };
            removed.push(e.key);
            self.floor = self.floor.max(e.id);
        }
        removed.len() > before
    }
}

/// What the file held at start, for [`Restored::into_hub`].
pub struct Restored {
    channels: Vec<(Arc<str>, MessageId, Vec<Arc<Message>>)>,
    tombstones: Vec<(Arc<str>, MessageId)>,
}

impl Restored {
    /// Puts the stored channels into the hub; returns (channels, messages) restored.
    pub fn into_hub(self, hub: &Hub) -> (usize, usize) {
        let mut messages = 0;
        let n = self.channels.len();
        for (name, floor, tail) in self.channels {
            messages += tail.len();
            hub.restore(name, floor, tail);
        }
        for (name, last) in self.tombstones {
            hub.restore_tombstone(name, last);
        }
        (n, messages)
    }
}

enum Op {
    Publish {
        hub: Hub,
        name: ChannelName,
        chan: Arc<Channel>,
        msg: NewMessage,
        reply: oneshot::Sender<Result<PublishReceipt, HubError>>,
    },
    Delete {
        hub: Hub,
        name: Box<str>,
        reply: oneshot::Sender<Result<(), HubError>>,
    },
    /// Finish what was sent before, then close the file.
    Stop,
}

/// The file engine: a handle to the writer thread.
pub struct File {
    path: PathBuf,
    /// To the writer thread; closed when the thread ends, so a push after that fails.
    ops: Arc<Queue<Op>>,
    /// True (or the sender gone) once the writer has closed the database.
    done: watch::Receiver<bool>,
    /// Publish batches committed so far (each one journal record and one fsync).
    commits: Arc<AtomicU64>,
    /// Durable commits of the database so far (one at start, then about once a second).
    checkpoints: Arc<AtomicU64>,
    /// The contract suite's temporary directory, removed with the engine.
    #[cfg(test)]
    _dir: Option<tempfile::TempDir>,
}

fn closed() -> HubError {
    HubError::Unavailable("the message store is closed".into())
}

impl File {
    /// Opens (or creates, mode 0600) the store, reads every channel back, drops what the
    /// config's buffer policies no longer keep (by count and age), and starts the writer. An
    /// unreadable file is an error naming it; nothing is deleted or rewritten then.
    pub fn open(path: &Path, config: &Config) -> Result<(File, Restored), FileError> {
        let fail = |reason: String| FileError::Open {
            path: path.to_path_buf(),
            reason,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| fail(format!("cannot create its directory: {e}")))?;
        }
        // Message bodies are the app's data: 0600 from the start (redb makes a new database
        // in an existing empty file), and an existing file readable by others is tightened.
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| fail(format!("cannot open: {e}")))?;
        let meta = f.metadata().map_err(|e| fail(e.to_string()))?;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %path.display(), "channels.store was readable by others: set to mode 0600");
            f.set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(|e| fail(format!("cannot set mode 0600: {e}")))?;
        }
        drop(f);
        // redb may panic on a file damaged outside it; a panic here is a start-up error too.
        let opened = std::panic::catch_unwind(|| open_db(path, config));
        let (writer, restored) = match opened {
            Ok(r) => r.map_err(fail)?,
            Err(_) => return Err(fail("the file is damaged (reading it failed)".into())),
        };
        let queue = Arc::new(Queue::new());
        let (done_tx, done) = watch::channel(false);
        let commits = writer.commits.clone();
        let checkpoints = writer.checkpoints.clone();
        std::thread::Builder::new()
            .name("crier-store".into())
            .spawn({
                let queue = queue.clone();
                move || writer.run(queue, done_tx)
            })
            .map_err(|e| fail(format!("cannot start the writer thread: {e}")))?;
        Ok((
            File {
                path: path.to_path_buf(),
                ops: queue,
                done,
                commits,
                checkpoints,
                #[cfg(test)]
                _dir: None,
            },
            restored,
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Publish batches committed since the file was opened.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Durable commits of the database since the file was opened.
    pub fn checkpoints(&self) -> u64 {
        self.checkpoints.load(Ordering::Relaxed)
    }
}

/// The journal that belongs to the store at `path`: `PATH.journal`, next to it.
pub fn journal_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".journal");
    PathBuf::from(p)
}

/// Opens the database and reads it: the writer's state and what the hub gets back.
fn open_db(path: &Path, config: &Config) -> Result<(Writer, Restored), String> {
    let db = Database::builder()
        .set_cache_size(CACHE_BYTES)
        .create(path)
        .map_err(|e| format!("not a readable message store: {e}"))?;
    let created = check_format(&db)?;
    let jpath = journal_path(path);
    let (mut journal, replay) = Journal::open(&jpath, journaled(&db)?)
        .map_err(|e| format!("its journal {}: {e}", jpath.display()))?;
    // What was acknowledged after the last checkpoint is in the journal only: applied again,
    // with the marker, in one durable commit. Records found next to a database made just now
    // belong to one that is gone (moved aside): they are of no use without it.
    if created && !replay.records.is_empty() {
        tracing::warn!(
            journal = %jpath.display(),
            "channels.store: a new store, so the {} records of the journal next to it (from an earlier store) are ignored",
            replay.records.len()
        );
    }
    {
        let tx = db.begin_write().map_err(|e| e.to_string())?;
        if !created {
            let mut replayed = Pending::default();
            replay
                .records
                .iter()
                .try_for_each(|rec| replayed.absorb(rec))
                .and_then(|()| replayed.write(&tx))
                .map_err(|e| match e {
                    changes::ApplyError::Damaged => format!(
                        "its journal {} holds a record crier did not write",
                        jpath.display()
                    ),
                    changes::ApplyError::Db(e) => format!("cannot apply its journal: {e}"),
                })?;
        }
        tx.open_table(META)
            .and_then(|mut t| {
                t.insert(JOURNALED, replay.last_seq)?;
                t.insert("format", FORMAT)?;
                Ok(())
            })
            .map_err(|e| e.to_string())?;
        tx.commit().map_err(|e| e.to_string())?;
    }
    journal.reset();
    if !created && !replay.records.is_empty() {
        tracing::info!(
            journal = %jpath.display(),
            "channels.store: applied {} journal records written after the last checkpoint",
            replay.records.len()
        );
    }
    let now_ms = unix_ms();
    let (mut chans, next_key, mut bodies) = read_all(&db, config, true)?;
    // What the policies (perhaps changed since) no longer keep goes, from the file too.
    let mut removed = Vec::new();
    let mut touched = Vec::new();
    for (name, st) in chans.iter_mut() {
        if st.trim(now_ms, &mut removed) {
            touched.push(name.clone());
        }
    }
    let mut writer = Writer {
        db,
        journal,
        chans,
        next_key,
        applied: replay.last_seq,
        dirty: false,
        last_checkpoint: Instant::now(),
        stale: false,
        broken: false,
        commits: Arc::default(),
        checkpoints: Arc::new(AtomicU64::new(1)),
        changes: Changes::default(),
        pending: Pending::default(),
    };
    if !removed.is_empty() {
        // Not journaled: if this is lost, the next start trims again.
        let mut c = Changes::default();
        for k in &removed {
            c.remove(*k);
        }
        for name in &touched {
            if let Some(st) = writer.chans.get(name) {
                c.row(name, st.row());
            }
        }
        writer
            .pending
            .absorb(c.bytes())
            .map_err(|e| e.to_string())
            .and_then(|()| writer.checkpoint())
            .map_err(|e| format!("cannot trim it: {e}"))?;
    }
    let gone: HashSet<u64> = removed.into_iter().collect();
    let now = Instant::now();
    let mut restored = Restored {
        channels: Vec::new(),
        tombstones: Vec::new(),
    };
    for (name, st) in &writer.chans {
        if st.tail.is_empty() {
            restored.tombstones.push((name.clone(), st.last));
            continue;
        }
        let tail = bodies
            .remove(name)
            .unwrap_or_default()
            .into_iter()
            .filter(|(key, _)| !gone.contains(key))
            .map(|(_, m)| {
                // An Instant for its age: the TTL keeps counting from when it was published.
                let age = Duration::from_millis(now_ms.saturating_sub(m.at_ms));
                Arc::new(Message::new(
                    m.id,
                    m.event,
                    m.content_type,
                    m.body,
                    now.checked_sub(age).unwrap_or(now),
                ))
            })
            .collect();
        restored.channels.push((name.clone(), st.floor, tail));
    }
    Ok((writer, restored))
}

/// A new file gets the format row; an old one must have ours (and a redb file that is
/// something else, like the Web Push store, is refused rather than written into). True
/// when the file is new.
fn check_format(db: &Database) -> Result<bool, String> {
    let tx = db.begin_read().map_err(|e| e.to_string())?;
    let tables: Vec<String> = tx
        .list_tables()
        .map_err(|e| e.to_string())?
        .map(|t| t.name().to_string())
        .collect();
    let format = match tx.open_table(META) {
        Ok(t) => t
            .get("format")
            .map_err(|e| e.to_string())?
            .map(|v| v.value()),
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(e) => return Err(e.to_string()),
    };
    drop(tx);
    match format {
        Some(1 | FORMAT) => Ok(false),
        Some(v) => Err(format!(
            "written by a newer crier (store format {v}, this one reads {FORMAT})"
        )),
        None if !tables.is_empty() => Err(format!(
            "a redb file, but not a crier message store (its tables: {})",
            tables.join(", ")
        )),
        None => {
            let tx = db.begin_write().map_err(|e| e.to_string())?;
            tx.open_table(META)
                .and_then(|mut t| {
                    t.insert("format", FORMAT)?;
                    Ok(())
                })
                .map_err(|e| e.to_string())?;
            tx.open_table(LOG).map_err(|e| e.to_string())?;
            tx.open_table(CHANNELS).map_err(|e| e.to_string())?;
            tx.commit().map_err(|e| e.to_string())?;
            Ok(true)
        }
    }
}

/// The last journal record the database holds (0: none, or a store of format 1).
fn journaled(db: &Database) -> Result<u64, String> {
    let tx = db.begin_read().map_err(|e| e.to_string())?;
    let meta = tx.open_table(META).map_err(|e| e.to_string())?;
    let v = meta.get(JOURNALED).map_err(|e| e.to_string())?;
    Ok(v.map_or(0, |v| v.value()))
}

/// A message read back at start.
struct Loaded {
    id: MessageId,
    at_ms: u64,
    event: Option<Box<str>>,
    content_type: http::HeaderValue,
    body: Bytes,
}

type Bodies = HashMap<Arc<str>, Vec<(u64, Loaded)>>;
type Chans = HashMap<Arc<str>, Stored>;

/// Reads the channel rows and the log: every channel's stored tail, the next log key, and
/// (with `bodies`) the messages themselves. A record that does not parse is an error: the
/// file is not what crier wrote.
fn read_all(db: &Database, config: &Config, bodies: bool) -> Result<(Chans, u64, Bodies), String> {
    let tx = db.begin_read().map_err(|e| e.to_string())?;
    let mut chans: HashMap<Arc<str>, Stored> = HashMap::new();
    let rows = tx.open_table(CHANNELS).map_err(|e| e.to_string())?;
    for row in rows.iter().map_err(|e| e.to_string())? {
        let (k, v) = row.map_err(|e| e.to_string())?;
        let name: Arc<str> = k.value().into();
        let (lm, ls, fm, fs, at) = v.value();
        let st = Stored {
            last: MessageId { ms: lm, seq: ls },
            floor: MessageId { ms: fm, seq: fs },
            at_ms: at,
            policy: config.buffer_policy_for(&name),
            tail: VecDeque::new(),
        };
        chans.insert(name, st);
    }
    let log = tx.open_table(LOG).map_err(|e| e.to_string())?;
    let next_key = match log.last().map_err(|e| e.to_string())? {
        Some((k, _)) => k.value() + 1,
        None => 1,
    };
    let mut out = Bodies::new();
    for row in log.iter().map_err(|e| e.to_string())? {
        let (k, v) = row.map_err(|e| e.to_string())?;
        let key = k.value();
        let bytes = v.value();
        let r = decode(bytes).ok_or_else(|| format!("log record {key} is damaged"))?;
        let name: Arc<str> = match chans.get_key_value(r.channel) {
            Some((n, _)) => n.clone(),
            None => r.channel.into(),
        };
        let st = chans.entry(name.clone()).or_insert_with(|| Stored {
            last: r.id,
            floor: MessageId::ZERO,
            at_ms: r.at_ms,
            policy: config.buffer_policy_for(&name),
            tail: VecDeque::new(),
        });
        st.last = st.last.max(r.id);
        st.tail.push_back(Entry {
            key,
            id: r.id,
            at_ms: r.at_ms,
        });
        if bodies {
            let content_type = http::HeaderValue::from_bytes(r.content_type)
                .map_err(|_| format!("log record {key} has a damaged content type"))?;
            out.entry(name).or_default().push((
                key,
                Loaded {
                    id: r.id,
                    at_ms: r.at_ms,
                    event: r.event.map(Into::into),
                    content_type,
                    body: Bytes::copy_from_slice(r.body),
                },
            ));
        }
    }
    Ok((chans, next_key, out))
}

/// The writer thread's state: the only user of the database and its journal.
struct Writer {
    db: Database,
    journal: Journal,
    chans: HashMap<Arc<str>, Stored>,
    next_key: u64,
    /// The last journal record folded into `pending` (in the database once checkpointed).
    applied: u64,
    /// Records journaled since the last checkpoint.
    dirty: bool,
    last_checkpoint: Instant,
    /// A commit failed: `chans` may not match the file; it is read again before the next.
    stale: bool,
    /// A journaled batch could not be folded into `pending`: only a restart, which reads the
    /// journal back, makes the two agree again, so nothing more is written (and the journal
    /// is never started over).
    broken: bool,
    commits: Arc<AtomicU64>,
    checkpoints: Arc<AtomicU64>,
    /// The batch being encoded (kept, so its buffer is reused).
    changes: Changes,
    /// What the journal holds since the last checkpoint, for the database.
    pending: Pending,
}

impl Writer {
    fn run(mut self, queue: Arc<Queue<Op>>, done: watch::Sender<bool>) {
        // However the writer ends (a panic too), later publishes are refused, not left waiting.
        let _closing = CloseOnDrop(queue.clone());
        let mut next_maintenance = Instant::now() + MAINTENANCE_EVERY;
        let mut stop = false;
        // The size of the last batch: how many to wait for (see below).
        let mut expect = 1;
        let mut published = 0u64;
        let mut taken = Vec::new();
        while !stop {
            queue.take(1, next_maintenance, MAX_BATCH, &mut taken);
            // While fewer have come than the last commit took, wait a moment for the rest:
            // its publishers got their answers together and are sending their next messages
            // now; taking them in this commit rather than the next halves their wait (one
            // commit instead of two). The queue wakes the writer once for all of them.
            if !taken.is_empty() && taken.len() < expect {
                let more = expect - taken.len();
                let room = MAX_BATCH - taken.len();
                queue.take(more, Instant::now() + GATHER, room, &mut taken);
            }
            // What came after a stop is not written: its publishers are told "closed".
            if let Some(at) = taken.iter().position(|op| matches!(op, Op::Stop)) {
                stop = true;
                taken.truncate(at);
            }
            if !taken.is_empty() {
                expect = taken.len();
                published += taken.len() as u64;
                self.commit(std::mem::take(&mut taken));
            }
            if Instant::now() >= next_maintenance {
                self.maintain();
                next_maintenance = Instant::now() + MAINTENANCE_EVERY;
            }
            if self.dirty
                && (self.journal.used() >= CHECKPOINT_BYTES
                    || self.last_checkpoint.elapsed() >= CHECKPOINT_EVERY)
            {
                if let Err(e) = self.checkpoint() {
                    tracing::error!("channels.store: checkpoint failed: {e}");
                }
            }
        }
        if self.dirty {
            if let Err(e) = self.checkpoint() {
                // The journal still holds it all: the next start applies it.
                tracing::error!("channels.store: the last checkpoint failed: {e}");
            }
        }
        tracing::info!(
            "channels.store: closed after {published} publishes and deletes in {} commits",
            self.commits.load(Ordering::Relaxed)
        );
        // Publishes sent after the stop are answered "closed" when their senders drop.
        drop(queue.close());
        drop(self); // closes the database and releases its lock
        let _ = done.send(true);
    }

    /// Reads the file again after a failed commit, and starts the journal over.
    fn recover(&mut self, config: &Config) -> bool {
        if !self.stale {
            return true;
        }
        // Everything acknowledged goes to the database first; the failed record may be in
        // the journal in part or whole: a durable database and a journal started over (the
        // record's sequence is never used again) leave it out.
        if let Err(e) = self.checkpoint() {
            tracing::error!("channels.store: cannot write the file: {e}");
            return false;
        }
        match read_all(&self.db, config, false) {
            Ok((chans, next_key, _)) => {
                self.chans = chans;
                self.next_key = next_key;
                self.stale = false;
                true
            }
            Err(e) => {
                tracing::error!("channels.store: cannot read the file again: {e}");
                false
            }
        }
    }

    /// Appends `changes` to the journal and waits until they are on disk: from here on
    /// they survive a crash. Returns the record's sequence.
    fn log(&mut self, changes: &Changes) -> Result<u64, String> {
        if !self.journal.fits(changes.bytes().len()) && self.journal.used() > 0 {
            self.checkpoint().map_err(|e| format!("checkpoint: {e}"))?;
        }
        self.journal
            .append(changes.bytes())
            .map_err(|e| format!("journal {}: {e}", self.journal.path().display()))
    }

    /// Keeps changes already journaled (as record `seq`) for the next checkpoint.
    fn apply_logged(&mut self, seq: u64, changes: &Changes) {
        match self.pending.absorb(changes.bytes()) {
            Ok(()) => {
                self.applied = seq;
                self.dirty = true;
            }
            Err(e) => {
                tracing::error!(
                    "channels.store: a journaled write failed ({e}): nothing more is written; restart crier, which applies the journal again"
                );
                self.broken = true;
            }
        }
    }

    /// One durable commit of everything journaled since the last one, marking the journal
    /// records it holds; the journal starts over. When it fails, nothing is lost: the
    /// journal and `pending` still hold it all, for the next try.
    fn checkpoint(&mut self) -> Result<(), String> {
        if self.broken {
            return Err("a journaled write is missing from the database".into());
        }
        let tx = self.db.begin_write().map_err(|e| e.to_string())?;
        self.pending.write(&tx).map_err(|e| e.to_string())?;
        tx.open_table(META)
            .and_then(|mut t| {
                t.insert(JOURNALED, self.applied)?;
                Ok(())
            })
            .map_err(|e| e.to_string())?;
        tx.commit().map_err(|e| e.to_string())?;
        self.pending.clear();
        self.journal.reset();
        self.dirty = false;
        self.last_checkpoint = Instant::now();
        self.checkpoints.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Group commit of one batch: ids, one journal record, then the local tails and
    /// answers, then the database.
    fn commit(&mut self, batch: Vec<Op>) {
        if self.broken {
            return fail(batch, "an earlier write failed; restart crier");
        }
        if self.stale {
            let config = batch.iter().find_map(|op| match op {
                Op::Publish { hub, .. } | Op::Delete { hub, .. } => Some(hub.config()),
                Op::Stop => None,
            });
            if !config.is_some_and(|c| self.recover(&c)) {
                return fail(batch, "the file cannot be read");
            }
        }
        let now_ms = unix_ms();
        let mut changes = std::mem::take(&mut self.changes);
        changes.clear();
        let mut removed = Vec::new();
        let mut touched: HashSet<Arc<str>> = HashSet::new();
        let mut ids = Vec::with_capacity(batch.len());
        for op in &batch {
            match op {
                Op::Publish {
                    hub,
                    name,
                    chan,
                    msg,
                    ..
                } => {
                    let key = name.as_arc();
                    // Above the local tail too (its floor: a tombstone, this process's start),
                    // also when the channel was freed and made again since the lookup.
                    let mut head = chan.head_id();
                    if let Some(now) = hub.get(name.as_str()) {
                        head = head.max(now.head_id());
                    }
                    let st = self.chans.entry(key.clone()).or_insert_with(|| Stored {
                        last: head,
                        floor: head,
                        at_ms: now_ms,
                        policy: chan.policy(),
                        tail: VecDeque::new(),
                    });
                    st.policy = chan.policy();
                    let id = MessageId::next_after(Some(st.last.max(head)), now_ms);
                    st.last = id;
                    st.at_ms = now_ms;
                    let k = self.next_key;
                    self.next_key += 1;
                    changes.put(k, |v| encode_into(v, name.as_str(), id, now_ms, msg));
                    st.tail.push_back(Entry {
                        key: k,
                        id,
                        at_ms: now_ms,
                    });
                    st.trim(now_ms, &mut removed);
                    touched.insert(key.clone());
                    ids.push(id);
                }
                Op::Delete { name, .. } => {
                    if let Some(st) = self.chans.get_mut(&**name).filter(|st| !st.tail.is_empty()) {
                        removed.extend(st.tail.drain(..).map(|e| e.key));
                        st.floor = st.last;
                        st.at_ms = now_ms;
                        touched.insert(Arc::from(&**name));
                    }
                    ids.push(MessageId::ZERO);
                }
                Op::Stop => ids.push(MessageId::ZERO),
            }
        }
        // After the puts: a message trimmed in the batch that stored it goes again.
        for k in &removed {
            changes.remove(*k);
        }
        for name in &touched {
            if let Some(st) = self.chans.get(name) {
                changes.row(name, st.row());
            }
        }
        // Nothing to write (deletes of channels already empty): nothing to wait for.
        let logged = if changes.is_empty() {
            Ok(None)
        } else {
            self.log(&changes).map(Some)
        };
        let seq = match logged {
            Ok(seq) => seq,
            Err(e) => {
                tracing::error!("channels.store: commit failed: {e}");
                self.stale = true;
                self.changes = changes;
                return fail(batch, &e);
            }
        };
        if seq.is_some() {
            self.commits.fetch_add(1, Ordering::Relaxed);
        }
        answer(batch, ids);
        // The publishers have their answers; the database's copy is not what they wait for.
        if let Some(seq) = seq {
            self.apply_logged(seq, &changes);
        }
        self.changes = changes;
    }

    /// Once a second: drops expired messages from the file, and forgets the rows of channels
    /// that have been empty for a day.
    fn maintain(&mut self) {
        if self.stale || self.broken {
            return; // the next publish reads the file again first
        }
        let now_ms = unix_ms();
        let mut removed = Vec::new();
        let mut touched = Vec::new();
        let mut forgotten = Vec::new();
        for (name, st) in self.chans.iter_mut() {
            if st.trim(now_ms, &mut removed) {
                touched.push(name.clone());
            } else if st.tail.is_empty() && now_ms.saturating_sub(st.at_ms) > TOMBSTONE_TTL_MS {
                forgotten.push(name.clone());
            }
        }
        if removed.is_empty() && forgotten.is_empty() {
            return;
        }
        let mut changes = Changes::default();
        for k in &removed {
            changes.remove(*k);
        }
        for name in &touched {
            if let Some(st) = self.chans.get(name) {
                changes.row(name, st.row());
            }
        }
        for name in &forgotten {
            changes.forget(name);
        }
        match self.log(&changes) {
            Ok(seq) => self.apply_logged(seq, &changes),
            Err(e) => {
                tracing::error!("channels.store: trimming failed: {e}");
                self.stale = true;
                return;
            }
        }
        for name in &forgotten {
            self.chans.remove(name);
        }
    }
}

/// Closes the writer's queue when dropped.
struct CloseOnDrop(Arc<Queue<Op>>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        drop(self.0.close());
    }
}

/// Answers the publishes and deletes of a batch that is on disk: each message goes to its
/// local tail (waking subscribers) in id order.
fn answer(ops: Vec<Op>, ids: Vec<MessageId>) {
    for (op, id) in ops.into_iter().zip(ids) {
        match op {
            Op::Publish {
                hub,
                name,
                chan,
                msg,
                reply,
            } => {
                let m = Arc::new(Message::new(
                    id,
                    msg.event,
                    msg.content_type,
                    msg.body,
                    Instant::now(),
                ));
                let receipt = hub.append_stored(&name, chan, m, &msg.headers);
                let _ = reply.send(Ok(receipt));
            }
            Op::Delete { hub, name, reply } => {
                let _ = reply.send(hub.delete_local(&name));
            }
            Op::Stop => {}
        }
    }
}

/// Answers one publish or delete with `err`.
fn refuse(op: Op, err: HubError) {
    match op {
        Op::Publish { reply, .. } => {
            let _ = reply.send(Err(err));
        }
        Op::Delete { reply, .. } => {
            let _ = reply.send(Err(err));
        }
        Op::Stop => {}
    }
}

/// Answers every publish and delete of a batch that was not committed.
fn fail(batch: Vec<Op>, why: &str) {
    for op in batch {
        refuse(
            op,
            HubError::Unavailable(format!("the message store cannot write: {why}")),
        );
    }
}

impl Engine for File {
    fn publish<'a>(
        &'a self,
        hub: &'a Hub,
        channel: &'a ChannelName,
        msg: NewMessage,
    ) -> EngineFuture<'a, Result<PublishReceipt, HubError>> {
        Box::pin(async move {
            // The channel limit is checked here, before anything is written.
            let (chan, _) = hub.get_or_create(channel, None)?;
            let (reply, answer) = oneshot::channel();
            self.ops
                .push(Op::Publish {
                    hub: hub.clone(),
                    name: channel.clone(),
                    chan,
                    msg,
                    reply,
                })
                .map_err(|_| closed())?;
            answer.await.map_err(|_| closed())?
        })
    }

    fn delete<'a>(
        &'a self,
        hub: &'a Hub,
        channel: &'a str,
    ) -> EngineFuture<'a, Result<(), HubError>> {
        Box::pin(async move {
            let (reply, answer) = oneshot::channel();
            self.ops
                .push(Op::Delete {
                    hub: hub.clone(),
                    name: channel.into(),
                    reply,
                })
                .map_err(|_| closed())?;
            answer.await.map_err(|_| closed())?
        })
    }

    fn stats<'a>(
        &'a self,
        hub: &'a Hub,
        channel: &'a str,
    ) -> EngineFuture<'a, Result<Option<ChannelStats>, HubError>> {
        Box::pin(std::future::ready(Ok(hub.local_stats(channel))))
    }

    fn close(&self) {
        let _ = self.ops.push(Op::Stop);
    }

    fn closed(&self) -> Option<EngineFuture<'_, ()>> {
        let mut done = self.done.clone();
        Some(Box::pin(async move {
            // Err: the writer is gone without saying so (it panicked); done all the same.
            let _ = done.wait_for(|d| *d).await;
        }))
    }
}

impl Drop for File {
    fn drop(&mut self) {
        let _ = self.ops.push(Op::Stop);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use redb::ReadableTableMetadata;

    use super::*;
    use crate::hub::store::contract::{engine_contract, msg, name, MakeHub};
    use crate::hub::{Start, Transport};
    use crate::metrics::Metrics;

    fn config(max_channels: usize, buffer: usize, ttl: Duration) -> Config {
        let mut c = Config::default();
        c.channels.max_channels = max_channels;
        c.channels.buffer = BufferPolicy {
            buffer_messages: buffer,
            buffer_ttl: ttl,
        };
        c
    }

    /// A hub on the file at `path`, with what it held read back.
    fn hub_at(path: &Path, c: Config) -> Hub {
        let (file, restored) = File::open(path, &c).expect("store opens");
        let hub = Hub::with_engine(Arc::new(c), Arc::new(Metrics::new()), Arc::new(file));
        restored.into_hub(&hub);
        hub
    }

    /// Stops a hub as the server does, so the file can be opened again.
    async fn stop(hub: Hub) {
        hub.close_all();
        hub.engine_closed().await;
    }

    struct MakeFile;

    impl MakeHub for MakeFile {
        fn make(&self, max_channels: usize, buffer: usize, ttl: Duration) -> Hub {
            let dir = tempfile::tempdir().expect("test setup");
            let c = config(max_channels, buffer, ttl);
            let (mut file, restored) =
                File::open(&dir.path().join("c.redb"), &c).expect("store opens");
            file._dir = Some(dir);
            let hub = Hub::with_engine(Arc::new(c), Arc::new(Metrics::new()), Arc::new(file));
            restored.into_hub(&hub);
            hub
        }
    }

    engine_contract!(MakeFile);

    fn rich(body: &str, event: &str) -> NewMessage {
        let mut m = msg(body);
        m.event = Some(event.into());
        m.content_type = http::HeaderValue::from_static("application/json");
        m
    }

    async fn all(h: &Hub, c: &str, from: Start) -> (bool, Vec<Arc<Message>>) {
        let mut s = h
            .subscribe(&name(c), Transport::Sse, from, None)
            .await
            .expect("test setup");
        let mut out = Vec::new();
        s.try_read(&mut out, 10_000);
        (s.gap(), out)
    }

    fn log_rows(path: &Path) -> u64 {
        let db = Database::create(path).expect("test setup");
        let tx = db.begin_read().expect("test setup");
        let log = tx.open_table(LOG).expect("test setup");
        log.len().expect("test setup")
    }

    #[tokio::test]
    async fn a_restart_keeps_messages_ids_and_positions() {
        let dir = tempfile::tempdir().expect("test setup");
        let p = dir.path().join("c.redb");
        let h = hub_at(&p, config(10, 100, Duration::from_secs(60)));
        let mut ids = Vec::new();
        for i in 0..5 {
            let r = h.publish(&name("r"), rich(&format!("m{i}"), "ev")).await;
            ids.push(r.expect("published").id);
        }
        stop(h).await;
        let h = hub_at(&p, config(10, 100, Duration::from_secs(60)));
        let (_, got) = all(&h, "r", Start::Oldest).await;
        assert_eq!(
            got.iter().map(|m| m.id.to_string()).collect::<Vec<_>>(),
            ids
        );
        assert!(got
            .iter()
            .enumerate()
            .all(|(i, m)| m.body == format!("m{i}").as_bytes()
                && m.event.as_deref() == Some("ev")
                && m.content_type == "application/json"));
        let (gap, after) = all(&h, "r", Start::After(ids[1].parse().expect("id"))).await;
        assert!(!gap, "inside the stored buffer: exact");
        assert_eq!(after.len(), 3);
        let (gap, _) = all(&h, "r", Start::After(MessageId { ms: 1, seq: 0 })).await;
        assert!(gap, "from before the buffer: a gap");
        let next = h.publish(&name("r"), msg("n")).await.expect("published");
        assert!(next.id.parse::<MessageId>().expect("id") > ids[4].parse().expect("id"));
        stop(h).await;
    }

    #[tokio::test]
    async fn ids_continue_above_the_stored_ones_when_the_clock_is_behind() {
        let dir = tempfile::tempdir().expect("test setup");
        let p = dir.path().join("c.redb");
        let h = hub_at(&p, config(10, 100, Duration::from_secs(60)));
        h.publish(&name("k"), msg("a")).await.expect("published");
        h.publish(&name("gone"), msg("a")).await.expect("published");
        h.delete("gone").await.expect("deleted");
        stop(h).await;
        // As if those ids were given while the clock was an hour ahead of now.
        let ahead = MessageId {
            ms: unix_ms() + 3_600_000,
            seq: 7,
        };
        {
            let db = Database::create(&p).expect("test setup");
            let tx = db.begin_write().expect("test setup");
            {
                let mut log = tx.open_table(LOG).expect("test setup");
                log.retain(|_, _| false).expect("test setup");
                let mut rows = tx.open_table(CHANNELS).expect("test setup");
                for n in ["k", "gone"] {
                    rows.insert(n, (ahead.ms, ahead.seq, ahead.ms, ahead.seq, unix_ms()))
                        .expect("test setup");
                }
            }
            tx.commit().expect("test setup");
        }
        let h = hub_at(&p, config(10, 100, Duration::from_secs(60)));
        for n in ["k", "gone"] {
            let id: MessageId = h
                .publish(&name(n), msg("b"))
                .await
                .expect("published")
                .id
                .parse()
                .expect("id");
            assert!(id > ahead, "{n}: {id} is not above {ahead}");
        }
        stop(h).await;
    }

    #[tokio::test]
    async fn trimming_and_deleting_remove_from_the_file() {
        let dir = tempfile::tempdir().expect("test setup");
        let p = dir.path().join("c.redb");
        let h = hub_at(&p, config(10, 3, Duration::from_secs(60)));
        for i in 0..10 {
            h.publish(&name("t"), msg(&i.to_string()))
                .await
                .expect("published");
            h.publish(&name("d"), msg(&i.to_string()))
                .await
                .expect("published");
        }
        let last_d = h.stats("d").await.expect("stats").expect("exists").last_id;
        h.delete("d").await.expect("deleted");
        stop(h).await;
        assert_eq!(log_rows(&p), 3, "3 of t's, none of d's");
        let h = hub_at(&p, config(10, 3, Duration::from_secs(60)));
        let (_, t) = all(&h, "t", Start::Oldest).await;
        assert_eq!(
            t.iter().map(|m| &m.body[..]).collect::<Vec<_>>(),
            [b"7", b"8", b"9"]
        );
        assert!(h.get("d").is_none(), "the deleted channel stays deleted");
        let again: MessageId = h
            .publish(&name("d"), msg("x"))
            .await
            .expect("published")
            .id
            .parse()
            .expect("id");
        let last_d: MessageId = last_d.expect("had messages").parse().expect("id");
        assert!(
            again > last_d,
            "the next incarnation continues above the tombstone"
        );
        let (gap, got) = all(&h, "d", Start::After(last_d)).await;
        assert!(!gap);
        assert_eq!(got.len(), 1);
        stop(h).await;
    }

    #[tokio::test]
    async fn the_ttl_applies_across_a_restart() {
        let dir = tempfile::tempdir().expect("test setup");
        let p = dir.path().join("c.redb");
        let h = hub_at(&p, config(10, 100, Duration::from_millis(300)));
        h.publish(&name("e"), msg("old")).await.expect("published");
        stop(h).await;
        let h = hub_at(&p, config(10, 100, Duration::from_millis(300)));
        let (_, got) = all(&h, "e", Start::Oldest).await;
        assert_eq!(got.len(), 1, "still young");
        stop(h).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        let h = hub_at(&p, config(10, 100, Duration::from_millis(300)));
        let (_, got) = all(&h, "e", Start::Oldest).await;
        assert!(got.is_empty(), "expired while crier was down");
        stop(h).await;
        assert_eq!(log_rows(&p), 0, "and gone from the file");
    }

    #[tokio::test]
    async fn expired_messages_leave_the_file_while_running() {
        let dir = tempfile::tempdir().expect("test setup");
        let p = dir.path().join("c.redb");
        let h = hub_at(&p, config(10, 100, Duration::from_millis(100)));
        h.publish(&name("x"), msg("a")).await.expect("published");
        // The writer trims once a second.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        stop(h).await;
        assert_eq!(log_rows(&p), 0);
    }

    #[tokio::test]
    async fn a_damaged_file_is_an_error_naming_it_and_left_alone() {
        let dir = tempfile::tempdir().expect("test setup");
        let p = dir.path().join("c.redb");
        let garbage: Vec<u8> = (0..20_000u32).map(|i| (i * 7919 % 251) as u8).collect();
        std::fs::write(&p, &garbage).expect("test setup");
        let err = File::open(&p, &Config::default())
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains(&p.display().to_string()), "{err}");
        assert!(
            std::fs::read(&p).expect("test setup") == garbage,
            "unchanged"
        );
        // A redb file of something else is refused too, not written into.
        let other = dir.path().join("other.redb");
        {
            let db = Database::create(&other).expect("test setup");
            let tx = db.begin_write().expect("test setup");
            const T: TableDefinition<&str, &str> = TableDefinition::new("subscriptions");
            tx.open_table(T).expect("test setup");
            tx.commit().expect("test setup");
        }
        let err = File::open(&other, &Config::default())
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("not a crier message store"), "{err}");
        let db = Database::create(&other).expect("still a redb file");
        let tx = db.begin_read().expect("test setup");
        let tables: Vec<String> = tx
            .list_tables()
            .expect("test setup")
            .map(|t| t.name().to_string())
            .collect();
        assert_eq!(
            tables,
            ["subscriptions"],
            "nothing of crier's written into it"
        );
    }

    #[tokio::test]
    async fn the_file_is_private() {
        let dir = tempfile::tempdir().expect("test setup");
        let p = dir.path().join("sub/c.redb");
        let h = hub_at(&p, Config::default());
        let mode = std::fs::metadata(&p).expect("made").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let jmode = std::fs::metadata(journal_path(&p))
            .expect("made")
            .permissions()
            .mode();
        assert_eq!(jmode & 0o777, 0o600, "the journal too");
        stop(h).await;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).expect("test setup");
        let h = hub_at(&p, Config::default());
        let mode = std::fs::metadata(&p).expect("exists").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "tightened");
        stop(h).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_publishes_are_all_stored_in_shared_commits() {
        let dir = tempfile::tempdir().expect("test setup");
        let p = dir.path().join("c.redb");
        let c = config(10, 1000, Duration::from_secs(60));
        let (file, restored) = File::open(&p, &c).expect("store opens");
        let file = Arc::new(file);
        let h = Hub::with_engine(Arc::new(c), Arc::new(Metrics::new()), file.clone());
        restored.into_hub(&h);
        let tasks: Vec<_> = (0..400)
            .map(|i| {
                let h = h.clone();
                tokio::spawn(async move {
                    let c = format!("c{}", i % 4);
                    h.publish(&name(&c), msg(&i.to_string()))
                        .await
                        .expect("published")
                        .id
                })
            })
            .collect();
        let mut acked = Vec::new();
        for t in tasks {
            acked.push(t.await.expect("task"));
        }
        // 400 publishes sent at once cannot each wait for a commit of their own: they queue
        // while one commits (an fsync), and the next commit takes them all.
        assert!(
            file.commits() < 200,
            "{} commits for 400 publishes",
            file.commits()
        );
        drop(file);
        stop(h).await;
        let h = hub_at(&p, config(10, 1000, Duration::from_secs(60)));
        let mut stored = Vec::new();
        for c in 0..4 {
            let (_, got) = all(&h, &format!("c{c}"), Start::Oldest).await;
            assert!(got.windows(2).all(|w| w[0].id < w[1].id));
            stored.extend(got.iter().map(|m| m.id.to_string()));
        }
        acked.sort();
        stored.sort();
        assert_eq!(acked.len(), 400);
        assert_eq!(stored, acked);
        stop(h).await;
    }

    /// The files as a crash would leave them (SIGKILL keeps what was written, fsync or not),
    /// copied to `to` while the engine runs.
    fn crash_copy(p: &Path, to: &Path, with_journal: bool) -> PathBuf {
        let c = to.join("c.redb");
        std::fs::copy(p, &c).expect("test setup");
        if with_journal {
            std::fs::copy(journal_path(p), journal_path(&c)).expect("test setup");
        }
        c
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn publishes_after_the_last_checkpoint_come_back_from_the_journal() {
        let dir = tempfile::tempdir().expect("test setup");
        let p = dir.path().join("c.redb");
        let c = config(10, 1000, Duration::from_secs(60));
        let (file, restored) = File::open(&p, &c).expect("store opens");
        let file = Arc::new(file);
        let h = Hub::with_engine(Arc::new(c), Arc::new(Metrics::new()), file.clone());
        restored.into_hub(&h);
        let mut acked = Vec::new();
        for i in 0..40 {
            let ch = name(&format!("j{}", i % 2));
            let r = h.publish(&ch, rich(&format!("m{i}"), "ev")).await;
            acked.push(r.expect("published").id);
        }
        h.publish(&name("gone"), msg("x")).await.expect("published");
        h.delete("gone").await.expect("deleted");
        // The writer applies to the database after answering: let it finish the last one.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let checkpointed = file.checkpoints() > 1;
        let crashed = tempfile::tempdir().expect("test setup");
        let cp = crash_copy(&p, crashed.path(), true);
        let bare = tempfile::tempdir().expect("test setup");
        let bp = crash_copy(&p, bare.path(), false);
        drop(file);
        stop(h).await;

        let h = hub_at(&cp, config(10, 1000, Duration::from_secs(60)));
        let mut got = Vec::new();
        for k in 0..2 {
            let (_, ms) = all(&h, &format!("j{k}"), Start::Oldest).await;
            assert!(ms
                .iter()
                .all(|m| m.event.as_deref() == Some("ev") && m.content_type == "application/json"));
            got.extend(ms.iter().map(|m| (m.id.to_string(), m.body.clone())));
        }
        got.sort();
        let mut want: Vec<_> = acked
            .iter()
            .enumerate()
            .map(|(i, id)| (id.clone(), Bytes::from(format!("m{i}"))))
            .collect();
        want.sort();
        assert_eq!(got, want, "every acknowledged publish, as it was");
        assert!(h.get("gone").is_none(), "the delete came back too");
        stop(h).await;

        // Without its journal the database is as of its last checkpoint (here: the start),
        // so it was the journal that held them, and no commit waited for the database.
        if !checkpointed {
            let h = hub_at(&bp, config(10, 1000, Duration::from_secs(60)));
            let (_, ms) = all(&h, "j0", Start::Oldest).await;
            assert!(ms.is_empty(), "{} messages were in the database", ms.len());
            stop(h).await;
        }
    }

    #[tokio::test]
    async fn a_damaged_journal_record_stops_the_start_and_is_left_alone() {
        let dir = tempfile::tempdir().expect("test setup");
        let p = dir.path().join("c.redb");
        let h = hub_at(&p, Config::default());
        h.publish(&name("a"), msg("1")).await.expect("published");
        stop(h).await;
        // A whole record (its checksum right) whose content is not crier's.
        let jp = journal_path(&p);
        let (mut j, _) = Journal::open(&jp, 0).expect("test setup");
        j.append(b"\xffnot a change").expect("test setup");
        drop(j);
        let journal = std::fs::read(&jp).expect("test setup");
        for _ in 0..2 {
            let err = File::open(&p, &Config::default())
                .err()
                .expect("refused, every time")
                .to_string();
            assert!(err.contains(&jp.display().to_string()), "{err}");
            assert!(err.contains("did not write"), "{err}");
        }
        assert!(
            std::fs::read(&jp).expect("kept") == journal,
            "the journal unchanged"
        );
        // The database holds what it held (redb keeps its own header flags up to date on
        // every open, so its bytes are not compared).
        assert_eq!(log_rows(&p), 1);
    }

    #[tokio::test]
    async fn a_journal_left_from_a_store_moved_aside_is_not_applied() {
        let dir = tempfile::tempdir().expect("test setup");
        let p = dir.path().join("c.redb");
        let c = config(10, 100, Duration::from_secs(60));
        let (file, restored) = File::open(&p, &c).expect("store opens");
        let h = Hub::with_engine(Arc::new(c), Arc::new(Metrics::new()), Arc::new(file));
        restored.into_hub(&h);
        h.publish(&name("a"), msg("1")).await.expect("published");
        tokio::time::sleep(Duration::from_millis(50)).await;
        // A crash, then the store (not its journal) moved aside to start empty.
        let crashed = tempfile::tempdir().expect("test setup");
        let cp = crash_copy(&p, crashed.path(), true);
        stop(h).await;
        std::fs::remove_file(&cp).expect("test setup");
        let h = hub_at(&cp, Config::default());
        assert!(h.get("a").is_none(), "a new store starts empty");
        stop(h).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn checkpoints_start_the_journal_over_so_it_keeps_its_size() {
        let dir = tempfile::tempdir().expect("test setup");
        let p = dir.path().join("c.redb");
        let mut c = config(10, 20, Duration::from_secs(60));
        c.channels.max_message_size = 64 * 1024;
        let (file, restored) = File::open(&p, &c).expect("store opens");
        let file = Arc::new(file);
        let h = Hub::with_engine(Arc::new(c), Arc::new(Metrics::new()), file.clone());
        restored.into_hub(&h);
        // ~24 MiB through a 16 MiB journal, one record per publish.
        let body = "z".repeat(16 * 1024);
        for i in 0..1_200 {
            h.publish(&name(&format!("s{}", i % 4)), msg(&body))
                .await
                .expect("published");
        }
        let len = std::fs::metadata(journal_path(&p)).expect("journal").len();
        assert_eq!(len, journal::JOURNAL_BYTES, "the journal kept its size");
        assert!(
            file.checkpoints() >= 2,
            "{} checkpoints",
            file.checkpoints()
        );
        drop(file);
        stop(h).await;
        let h = hub_at(&p, config(10, 20, Duration::from_secs(60)));
        for k in 0..4 {
            let (_, ms) = all(&h, &format!("s{k}"), Start::Oldest).await;
            assert_eq!(ms.len(), 20);
        }
        stop(h).await;
    }
}
