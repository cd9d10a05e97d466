//! What the journal holds and the database does not yet: the changes of every batch since
//! the last checkpoint, folded, so the database gets them all in the checkpoint's one commit.
//!
//! Why: a redb commit per batch, even without fsync, cost the writer thread a B-tree update
//! and page writes per message on its critical path (the next batch's fsync waited behind
//! it). Folded, a message trimmed before the checkpoint (a busy channel's buffer turns over
//! many times a second) never reaches the database at all, and what does goes in key order,
//! at the right edge of the log, in one transaction. The journal stays the durable copy: a
//! crash between checkpoints applies its records again at start, through this same fold.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

use redb::WriteTransaction;

use super::changes::{self, ApplyError, Change};
use super::{Row, CHANNELS, LOG};

#[derive(Default)]
pub(super) struct Pending {
    /// The records put, back to back.
    records: Vec<u8>,
    /// Log key → its record in `records`.
    puts: BTreeMap<u64, Range<usize>>,
    /// Log keys to remove that the database (not `puts`) holds.
    removes: Vec<u64>,
    /// Channel rows to write; None removes the row.
    rows: HashMap<Box<str>, Option<Row>>,
}

impl Pending {
    pub fn is_empty(&self) -> bool {
        self.puts.is_empty() && self.removes.is_empty() && self.rows.is_empty()
    }

    /// Folds one journal payload in, after those before it.
    pub fn absorb(&mut self, payload: &[u8]) -> Result<(), ApplyError> {
        changes::each(payload, |c| {
            match c {
                Change::Put(key, record) => {
                    let at = self.records.len();
                    self.records.extend_from_slice(record);
                    self.puts.insert(key, at..self.records.len());
                }
                Change::Remove(key) => {
                    if self.puts.remove(&key).is_none() {
                        self.removes.push(key);
                    }
                }
                Change::Row(name, row) => self.set_row(name, Some(row)),
                Change::Forget(name) => self.set_row(name, None),
            }
            Ok(())
        })
    }

    fn set_row(&mut self, name: &str, row: Option<Row>) {
        match self.rows.get_mut(name) {
            Some(r) => *r = row,
            None => {
                self.rows.insert(name.into(), row);
            }
        }
    }

    /// Writes everything folded in into `tx` (the caller commits it).
    pub fn write(&self, tx: &WriteTransaction) -> Result<(), ApplyError> {
        if self.is_empty() {
            return Ok(());
        }
        let mut log = tx.open_table(LOG)?;
        for key in &self.removes {
            log.remove(*key)?;
        }
        for (key, at) in &self.puts {
            log.insert(*key, &self.records[at.clone()])?;
        }
        let mut rows = tx.open_table(CHANNELS)?;
        for (name, row) in &self.rows {
            match row {
                Some(r) => {
                    rows.insert(&**name, *r)?;
                }
                None => {
                    rows.remove(&**name)?;
                }
            }
        }
        Ok(())
    }

    /// Forgets everything, once the database holds it.
    pub fn clear(&mut self) {
        self.records.clear();
        self.puts.clear();
        self.removes.clear();
        self.rows.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::super::changes::Changes;
    use super::*;

    #[test]
    fn a_put_removed_before_the_checkpoint_never_reaches_the_file() {
        let mut c = Changes::default();
        c.put(1, |v| v.extend_from_slice(b"one"));
        c.put(2, |v| v.extend_from_slice(b"two"));
        c.row("a", (1, 0, 0, 0, 5));
        let mut p = Pending::default();
        p.absorb(c.bytes()).expect("our own encoding");
        c.clear();
        c.remove(1);
        c.remove(7); // held by the database: removed from it
        c.row("a", (2, 0, 0, 0, 6));
        c.forget("b");
        p.absorb(c.bytes()).expect("our own encoding");
        assert_eq!(p.puts.keys().copied().collect::<Vec<_>>(), vec![2]);
        assert_eq!(&p.records[p.puts[&2].clone()], b"two");
        assert_eq!(p.removes, vec![7]);
        assert_eq!(p.rows["a"], Some((2, 0, 0, 0, 6)));
        assert_eq!(p.rows["b"], None);
        p.clear();
        assert!(p.is_empty());
    }

    #[test]
    fn a_payload_crier_did_not_write_is_damaged() {
        let mut p = Pending::default();
        assert!(matches!(p.absorb(&[9, 1, 2]), Err(ApplyError::Damaged)));
        assert!(matches!(p.absorb(&[1, 1, 2]), Err(ApplyError::Damaged)));
    }
}
