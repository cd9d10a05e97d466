//! One batch of changes to the store, encoded once: the journal record's payload, read back
//! change by change when it is folded into what the next checkpoint writes ([`super::pending`]),
//! live and again when the journal is read back at start.
//!
//! Each change is a tag byte and its fields (integers u64 LE, strings and bytes u32 LE
//! length-prefixed): `1` log key and record (see [`super::encode_into`]), `2` log key
//! removed, `3` channel row (name, last ms, last seq, floor ms, floor seq, change unix ms),
//! `4` channel row removed (name).

use super::{Reader, Row};

const PUT: u8 = 1;
const REMOVE: u8 = 2;
const ROW: u8 = 3;
const FORGET: u8 = 4;

/// The encoded changes of one transaction.
#[derive(Default)]
pub(super) struct Changes {
    buf: Vec<u8>,
}

impl Changes {
    pub fn clear(&mut self) {
        self.buf.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// Inserts log record `key`, its bytes written by `record` into the payload.
    pub fn put(&mut self, key: u64, record: impl FnOnce(&mut Vec<u8>)) {
        self.buf.push(PUT);
        self.buf.extend_from_slice(&key.to_le_bytes());
        let at = self.buf.len();
        self.buf.extend_from_slice(&[0; 4]);
        record(&mut self.buf);
        let n = (self.buf.len() - at - 4) as u32;
        self.buf[at..at + 4].copy_from_slice(&n.to_le_bytes());
    }

    pub fn remove(&mut self, key: u64) {
        self.buf.push(REMOVE);
        self.buf.extend_from_slice(&key.to_le_bytes());
    }

    pub fn row(&mut self, name: &str, row: Row) {
        self.buf.push(ROW);
        put_bytes(&mut self.buf, name.as_bytes());
        for v in [row.0, row.1, row.2, row.3, row.4] {
            self.buf.extend_from_slice(&v.to_le_bytes());
        }
    }

    pub fn forget(&mut self, name: &str) {
        self.buf.push(FORGET);
        put_bytes(&mut self.buf, name.as_bytes());
    }
}

fn put_bytes(v: &mut Vec<u8>, b: &[u8]) {
    v.extend_from_slice(&(b.len() as u32).to_le_bytes());
    v.extend_from_slice(b);
}

#[derive(Debug, thiserror::Error)]
pub(super) enum ApplyError {
    #[error("a journal record is damaged")]
    Damaged,
    #[error(transparent)]
    Db(#[from] redb::Error),
}

impl From<redb::TableError> for ApplyError {
    fn from(e: redb::TableError) -> Self {
        ApplyError::Db(e.into())
    }
}

impl From<redb::StorageError> for ApplyError {
    fn from(e: redb::StorageError) -> Self {
        ApplyError::Db(e.into())
    }
}

/// One change, as read back from a payload.
pub(super) enum Change<'a> {
    Put(u64, &'a [u8]),
    Remove(u64),
    Row(&'a str, Row),
    Forget(&'a str),
}

/// Calls `f` with each change of one payload, in order. A payload that does not parse (a
/// record crier did not write) is [`ApplyError::Damaged`]; the changes before it have
/// been passed on, so whatever `f` built is then not to be used.
pub(super) fn each(
    payload: &[u8],
    mut f: impl FnMut(Change<'_>) -> Result<(), ApplyError>,
) -> Result<(), ApplyError> {
    let mut r = Reader(payload);
    while let Some(tag) = r.take(1) {
        let change = match tag[0] {
            PUT => {
                let key = u64(&mut r)?;
                Change::Put(key, bytes(&mut r)?)
            }
            REMOVE => Change::Remove(u64(&mut r)?),
            ROW => {
                let name = name(&mut r)?;
                let mut row = [0u64; 5];
                for v in &mut row {
                    *v = u64(&mut r)?;
                }
                Change::Row(name, (row[0], row[1], row[2], row[3], row[4]))
            }
            FORGET => Change::Forget(name(&mut r)?),
            _ => return Err(ApplyError::Damaged),
        };
        f(change)?;
    }
    Ok(())
}

fn u64(r: &mut Reader<'_>) -> Result<u64, ApplyError> {
    r.u64().ok_or(ApplyError::Damaged)
}

fn bytes<'a>(r: &mut Reader<'a>) -> Result<&'a [u8], ApplyError> {
    r.bytes().ok_or(ApplyError::Damaged)
}

/// A channel name: length-prefixed UTF-8.
fn name<'a>(r: &mut Reader<'a>) -> Result<&'a str, ApplyError> {
    std::str::from_utf8(bytes(r)?).map_err(|_| ApplyError::Damaged)
}
