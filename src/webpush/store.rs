//! The Web Push subscriptions: a redb file (one table, key `channel \n endpoint`) and the
//! in-memory index that delivery reads. Every change is committed to the file before the
//! index changes and before the HTTP answer, so a crash never loses an acknowledged
//! subscription; at start the index is read back from the file.
//!
//! With `[cluster]` the table is a Redis hash every node shares instead of the file
//! ([`Store::open_shared`]): a change is in Redis before the answer, and every node's index
//! follows the others' changes ([`Store::follow`]), so the node that takes a publish pushes to
//! every node's subscribers, once.

use std::collections::HashMap;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use parking_lot::{Mutex, RwLock};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::crypto::UaKeys;
use crate::hub::store::{SharedTable, TableChange};

const TABLE: TableDefinition<&str, &[u8]> = TableDefinition::new("subscriptions");

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("webpush store {path}: {reason}")]
    Open { path: PathBuf, reason: String },
    #[error("webpush store: {0}")]
    Io(String),
    #[error("webpush store is closed (shutting down)")]
    Closed,
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

/// One browser's subscription to one channel.
#[derive(Debug)]
pub struct WebPushSubscription {
    pub channel: Arc<str>,
    pub endpoint: String,
    /// `scheme://host[:port]` of the endpoint: the VAPID audience and the per-service queue.
    pub origin: String,
    pub keys: UaKeys,
}

/// What the file holds per subscription (the keys as the browser sent them).
#[derive(Serialize, Deserialize)]
struct Record {
    p256dh: String,
    auth: String,
    created_ms: u64,
}

impl WebPushSubscription {
    fn record(&self, created_ms: u64) -> Vec<u8> {
        let r = Record {
            p256dh: URL_SAFE_NO_PAD.encode(self.keys.public),
            auth: URL_SAFE_NO_PAD.encode(self.keys.auth),
            created_ms,
        };
        serde_json::to_vec(&r).unwrap_or_default()
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

fn key(channel: &str, endpoint: &str) -> String {
    format!("{channel}\n{endpoint}")
}

/// A change waiting for the next commit, and where its answer goes.
enum Op {
    Put(WebPushSubscription),
    /// By key (`channel \n endpoint`).
    Remove(String),
}

type Reply = std::sync::mpsc::SyncSender<Result<bool, StoreError>>;

/// By channel, then by endpoint.
type Index = HashMap<Arc<str>, HashMap<String, Arc<WebPushSubscription>>>;

pub struct Store {
    path: PathBuf,
    /// Taken on shutdown, so the file's lock goes with the process's last use of it (a crier
    /// started again in the same process, as the tests do, can open it). parking_lot: held
    /// only to clone the Arc.
    db: Mutex<Option<Arc<Database>>>,
    /// parking_lot: map reads and writes only, never across `.await` or file I/O.
    index: RwLock<Index>,
    /// Subscriptions in the index (kept here so the gauge and the limit check cost nothing).
    total: AtomicUsize,
    /// Changes waiting for the next commit (see [`Store::apply`]). parking_lot: push or take.
    pending: Mutex<Vec<(Op, Reply)>>,
    /// Held by the thread committing a batch; blocking threads (never the runtime's) wait on it.
    writer: Mutex<()>,
    /// `[cluster]`: the shared table instead of the file, and the runtime its writes run on
    /// (a blocking caller waits for them).
    shared: Option<(SharedTable, tokio::runtime::Handle)>,
}

impl Store {
    /// Opens (or creates) the file and reads every subscription into the index. Records
    /// that no longer parse (a key crier would now refuse) are skipped with a warning.
    pub fn open(
        path: &Path,
        origin_of: impl Fn(&str) -> Option<String>,
    ) -> Result<Store, StoreError> {
        let open_err = |e: &dyn std::fmt::Display| StoreError::Open {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| open_err(&e))?;
        }
        // The file holds every subscription's endpoint and auth secret: 0600 from the start
        // (redb makes a new database in an existing empty file).
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| open_err(&e))?;
        let db = Database::create(path).map_err(|e| open_err(&e))?;
        {
            let tx = db.begin_write().map_err(|e| open_err(&e))?;
            tx.open_table(TABLE).map_err(|e| open_err(&e))?;
            tx.commit().map_err(|e| open_err(&e))?;
        }
        let mut index = Index::new();
        let mut total = 0;
        let tx = db.begin_read().map_err(|e| open_err(&e))?;
        let table = tx.open_table(TABLE).map_err(|e| open_err(&e))?;
        for row in table.iter().map_err(|e| open_err(&e))? {
            let (k, v) = row.map_err(|e| open_err(&e))?;
            let Some(sub) = parse_row(k.value(), v.value(), &origin_of) else {
                tracing::warn!(
                    key = k.value(),
                    "webpush store: skipped an unreadable subscription"
                );
                continue;
            };
            index
                .entry(sub.channel.clone())
                .or_default()
                .insert(sub.endpoint.clone(), Arc::new(sub));
            total += 1;
        }
        drop(table);
        drop(tx);
        Ok(Store {
            path: path.to_path_buf(),
            db: Mutex::new(Some(Arc::new(db))),
            index: RwLock::new(index),
            total: AtomicUsize::new(total),
            pending: Mutex::new(Vec::new()),
            writer: Mutex::new(()),
            shared: None,
        })
    }

    /// The store on a table every cluster node shares, read whole now. `path` (the config's
    /// `webpush.store`) is not opened: it only names the store in messages.
    pub async fn open_shared(
        table: SharedTable,
        path: &Path,
        origin_of: impl Fn(&str) -> Option<String>,
    ) -> Result<Store, StoreError> {
        let store = Store {
            path: path.to_path_buf(),
            db: Mutex::new(None),
            index: RwLock::new(Index::new()),
            total: AtomicUsize::new(0),
            pending: Mutex::new(Vec::new()),
            writer: Mutex::new(()),
            shared: Some((table, tokio::runtime::Handle::current())),
        };
        store.reload(&origin_of).await?;
        Ok(store)
    }

    /// Reads the shared table whole into the index.
    async fn reload(&self, origin_of: &impl Fn(&str) -> Option<String>) -> Result<(), StoreError> {
        let Some((table, _)) = &self.shared else {
            return Ok(());
        };
        let rows = table.load().await.map_err(io)?;
        let mut index = Index::new();
        let mut total = 0;
        for (k, v) in rows {
            let Some(sub) = std::str::from_utf8(&k)
                .ok()
                .and_then(|k| parse_row(k, &v, origin_of))
            else {
                continue;
            };
            index
                .entry(sub.channel.clone())
                .or_default()
                .insert(sub.endpoint.clone(), Arc::new(sub));
            total += 1;
        }
        *self.index.write() = index;
        self.total.store(total, Ordering::Relaxed);
        Ok(())
    }

    /// Applies what other nodes change in the shared table to the index, until the table's
    /// changes end (the engine stopped). `changed` runs after each (the gauge).
    pub async fn follow(
        &self,
        mut changes: tokio::sync::mpsc::UnboundedReceiver<TableChange>,
        origin_of: impl Fn(&str) -> Option<String>,
        changed: impl Fn(usize),
    ) {
        while let Some(c) = changes.recv().await {
            match c {
                TableChange::Reload => {
                    if let Err(e) = self.reload(&origin_of).await {
                        tracing::warn!(
                            "webpush: the shared subscriptions could not be read again: {e}"
                        );
                    }
                }
                TableChange::Put { field, value } => {
                    let sub = std::str::from_utf8(&field)
                        .ok()
                        .and_then(|k| parse_row(k, &value, &origin_of));
                    if let Some(sub) = sub {
                        self.index_apply(Op::Put(sub));
                    }
                }
                TableChange::Remove { field } => {
                    self.index_apply(Op::Remove(String::from_utf8_lossy(&field).into_owned()));
                }
            }
            changed(self.total());
        }
    }

    /// Whether this is the cluster's shared table rather than a file.
    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn db(&self) -> Result<Arc<Database>, StoreError> {
        self.db.lock().clone().ok_or(StoreError::Closed)
    }

    /// Drops the database handle; later writes fail with `Closed`.
    pub fn close(&self) {
        self.db.lock().take();
    }

    /// Saves a subscription (committed to disk) and indexes it. Ok(true) when it is new,
    /// Ok(false) when the endpoint was already subscribed to the channel (its keys are
    /// replaced: a browser that re-subscribes may have new ones). Blocking: call it off the
    /// runtime's worker threads.
    pub fn put(&self, sub: WebPushSubscription) -> Result<bool, StoreError> {
        self.apply(Op::Put(sub))
    }

    /// Removes a subscription from the file and the index; Ok(false) when there was none.
    /// Blocking, like [`Store::put`].
    pub fn remove(&self, channel: &str, endpoint: &str) -> Result<bool, StoreError> {
        self.apply(Op::Remove(key(channel, endpoint)))
    }

    /// Group commit: the change joins the pending batch; whoever holds the writer lock commits
    /// every pending change in one transaction (one fsync), so many browsers subscribing at
    /// once cost a few commits, not one each. Returns once this change is on disk.
    fn apply(&self, op: Op) -> Result<bool, StoreError> {
        if let Some((table, rt)) = &self.shared {
            // In Redis (and told to every node) before the index and the answer. A blocking
            // thread, not a runtime worker, waits here (callers use spawn_blocking).
            let written = rt.block_on(async {
                match &op {
                    Op::Put(sub) => {
                        let k = key(&sub.channel, &sub.endpoint);
                        table.put(&k, &sub.record(unix_ms())).await
                    }
                    Op::Remove(k) => table.remove(k).await,
                }
            });
            let answer = written.map_err(io)?;
            self.index_apply(op);
            return Ok(answer);
        }
        let db = self.db()?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.pending.lock().push((op, tx));
        {
            let _writer = self.writer.lock();
            let batch = std::mem::take(&mut *self.pending.lock());
            if !batch.is_empty() {
                self.commit(&db, batch);
            }
        }
        // Our change was in this batch or in one committed before we got the lock.
        rx.recv()
            .map_err(|_| StoreError::Io("the commit was lost".into()))?
    }

    fn commit(&self, db: &Database, batch: Vec<(Op, Reply)>) {
        let now = unix_ms();
        let written = (|| {
            let tx = db.begin_write().map_err(io)?;
            let mut answers = Vec::with_capacity(batch.len());
            {
                let mut t = tx.open_table(TABLE).map_err(io)?;
                for (op, _) in &batch {
                    answers.push(match op {
                        Op::Put(sub) => {
                            let k = key(&sub.channel, &sub.endpoint);
                            let existed = t.get(k.as_str()).map_err(io)?.is_some();
                            t.insert(k.as_str(), sub.record(now).as_slice())
                                .map_err(io)?;
                            !existed
                        }
                        Op::Remove(k) => t.remove(k.as_str()).map_err(io)?.is_some(),
                    });
                }
            }
            tx.commit().map_err(io)?;
            Ok::<_, StoreError>(answers)
        })();
        let answers = match written {
            Ok(a) => a,
            Err(e) => {
                for (_, reply) in batch {
                    let _ = reply.send(Err(e.clone()));
                }
                return;
            }
        };
        // On disk: now the index, in the batch's order.
        let mut index = self.index.write();
        let mut replies = Vec::with_capacity(batch.len());
        for ((op, reply), answer) in batch.into_iter().zip(answers) {
            self.index_op(&mut index, op);
            replies.push((reply, answer));
        }
        drop(index);
        for (reply, answer) in replies {
            let _ = reply.send(Ok(answer));
        }
    }

    fn index_apply(&self, op: Op) {
        let mut index = self.index.write();
        self.index_op(&mut index, op);
    }

    fn index_op(&self, index: &mut Index, op: Op) {
        match op {
            Op::Put(sub) => {
                let replaced = index
                    .entry(sub.channel.clone())
                    .or_default()
                    .insert(sub.endpoint.clone(), Arc::new(sub));
                if replaced.is_none() {
                    self.total.fetch_add(1, Ordering::Relaxed);
                }
            }
            Op::Remove(k) => {
                let (channel, endpoint) = k.split_once('\n').unwrap_or((&k, ""));
                if let Some(m) = index.get_mut(channel) {
                    if m.remove(endpoint).is_some() {
                        self.total.fetch_sub(1, Ordering::Relaxed);
                    }
                    if m.is_empty() {
                        index.remove(channel);
                    }
                }
            }
        }
    }

    pub fn has_channel(&self, channel: &str) -> bool {
        self.index.read().contains_key(channel)
    }

    pub fn contains(&self, channel: &str, endpoint: &str) -> bool {
        self.index
            .read()
            .get(channel)
            .is_some_and(|m| m.contains_key(endpoint))
    }

    /// A snapshot of a channel's subscriptions (Arc clones; the lock is held for the copy).
    pub fn of_channel(&self, channel: &str) -> Vec<Arc<WebPushSubscription>> {
        self.index
            .read()
            .get(channel)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    pub fn count(&self, channel: &str) -> usize {
        self.index.read().get(channel).map_or(0, HashMap::len)
    }

    pub fn total(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// (channel, subscriptions), largest first, at most `limit`.
    pub fn per_channel(&self, limit: usize) -> Vec<(String, usize)> {
        let mut v: Vec<(String, usize)> = self
            .index
            .read()
            .iter()
            .map(|(c, m)| (c.to_string(), m.len()))
            .collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v.truncate(limit);
        v
    }
}

fn parse_row(
    k: &str,
    v: &[u8],
    origin_of: &impl Fn(&str) -> Option<String>,
) -> Option<WebPushSubscription> {
    let (channel, endpoint) = k.split_once('\n')?;
    let r: Record = serde_json::from_slice(v).ok()?;
    let keys = UaKeys::parse(
        &URL_SAFE_NO_PAD.decode(&r.p256dh).ok()?,
        &URL_SAFE_NO_PAD.decode(&r.auth).ok()?,
    )
    .ok()?;
    Some(WebPushSubscription {
        channel: channel.into(),
        endpoint: endpoint.to_string(),
        origin: origin_of(endpoint)?,
        keys,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(channel: &str, endpoint: &str) -> WebPushSubscription {
        let pk = super::super::crypto::fresh_point();
        WebPushSubscription {
            channel: channel.into(),
            endpoint: endpoint.into(),
            origin: "https://push.example".into(),
            keys: UaKeys::parse(&pk, &[1; 16]).expect("valid"),
        }
    }

    #[test]
    fn put_remove_and_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("s/wp.redb");
        let origin = |_: &str| Some("https://push.example".to_string());
        let s = Store::open(&p, origin).expect("opens");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&p).expect("file").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "subscriptions hold secrets");
        assert!(s.put(sub("a", "https://push.example/1")).expect("put"));
        assert!(!s
            .put(sub("a", "https://push.example/1"))
            .expect("put again"));
        assert!(s.put(sub("a", "https://push.example/2")).expect("put"));
        assert!(s.put(sub("b", "https://push.example/1")).expect("put"));
        assert!(s.remove("a", "https://push.example/2").expect("remove"));
        assert!(!s
            .remove("a", "https://push.example/2")
            .expect("remove again"));
        assert_eq!(s.total(), 2);
        s.close();
        assert!(matches!(
            s.put(sub("c", "https://x/1")),
            Err(StoreError::Closed)
        ));
        drop(s);
        let s = Store::open(&p, origin).expect("reopens");
        assert_eq!(s.count("a"), 1);
        assert_eq!(s.count("b"), 1);
        assert!(s.contains("a", "https://push.example/1"));
        assert_eq!(s.per_channel(10).len(), 2);
    }

    #[test]
    fn concurrent_changes_are_group_committed_with_each_answer_right() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("wp.redb");
        let s = Arc::new(Store::open(&p, |_| Some("https://push.example".into())).expect("opens"));
        let threads: Vec<_> = (0..64)
            .map(|i| {
                let s = s.clone();
                std::thread::spawn(move || {
                    let new = s
                        .put(sub("c", &format!("https://push.example/{i}")))
                        .expect("put");
                    // Every other thread also subscribes a shared endpoint: exactly one is first.
                    let shared = (i % 2 == 0)
                        .then(|| s.put(sub("c", "https://push.example/shared")).expect("put"));
                    (new, shared)
                })
            })
            .collect();
        let answers: Vec<_> = threads
            .into_iter()
            .map(|t| t.join().expect("thread"))
            .collect();
        assert!(answers.iter().all(|(new, _)| *new));
        assert_eq!(answers.iter().filter(|(_, s)| *s == Some(true)).count(), 1);
        assert_eq!(s.total(), 65);
        let removals: Vec<_> = (0..64)
            .map(|i| {
                let s = s.clone();
                // Each of 32 endpoints is removed twice, at once: one removal finds it.
                std::thread::spawn(move || {
                    s.remove("c", &format!("https://push.example/{}", i / 2))
                        .expect("remove")
                })
            })
            .collect();
        let found = removals
            .into_iter()
            .map(|t| t.join().expect("thread"))
            .filter(|r| *r)
            .count();
        assert_eq!(found, 32);
        drop(s);
        let s = Store::open(&p, |_| Some("https://push.example".into())).expect("reopens");
        assert_eq!(
            s.count("c"),
            65 - 32,
            "32 distinct endpoints removed, on disk"
        );
    }
}
