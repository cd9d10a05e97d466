//! When channels' oldest messages expire. The once-a-second sweep visits only the channels
//! whose oldest message's `buffer_ttl` has run out (then trims them, frees the idle ones and
//! puts the rest back at their new oldest's time), not every channel: a channel is put here
//! when its buffer goes from empty to not empty, which a busy channel's publishes never do.

use std::collections::BTreeMap;
use std::sync::Weak;
use std::time::Instant;

use parking_lot::Mutex;

use super::Channel;

#[derive(Default)]
pub struct Expiries {
    /// parking_lot: an insert or a split, never held across `.await` or a channel's lock.
    due: Mutex<BTreeMap<Instant, Vec<Weak<Channel>>>>,
}

impl Expiries {
    /// Visit `chan` at `at` (its oldest message's expiry).
    pub fn schedule(&self, at: Instant, chan: Weak<Channel>) {
        self.due.lock().entry(at).or_default().push(chan);
    }

    /// Every channel due by `now`, taken off the schedule.
    pub fn take_due(&self, now: Instant) -> Vec<Weak<Channel>> {
        let mut due = self.due.lock();
        let later = match now.checked_add(std::time::Duration::from_nanos(1)) {
            Some(t) => due.split_off(&t),
            None => BTreeMap::new(),
        };
        let ready = std::mem::replace(&mut *due, later);
        drop(due);
        ready.into_values().flatten().collect()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.due.lock().values().map(Vec::len).sum()
    }
}
