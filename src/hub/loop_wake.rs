//! Waking a channel's subscribers that run on event loops (`server.event_loops`) from their
//! own loop.
//!
//! A subscriber's task on an event loop belongs to that loop's single-threaded runtime. Woken
//! from the publishing thread, each one is a remote schedule (a locked queue and an unpark of
//! the loop's thread): a publish to 10,000 of them cost 15 % of a fan-out's deliveries/s. So a
//! channel keeps one `Notify` per loop beside its own. A subscriber on loop `i` waits on the
//! `i`th and arms it first; an append posts the channel once to each armed loop, and that
//! loop's relay task wakes the waiters there, where each wake-up is a push onto the local run
//! queue. Tasks on the shared runtime (and every subscriber when there are no loops) wait on
//! the channel's own `Notify`, as before.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::runtime::Handle;
use tokio::sync::mpsc::{self, UnboundedSender};
use tokio::sync::Notify;

use super::Channel;

/// One channel's waiters on one event loop.
#[derive(Default)]
pub(super) struct LoopWaiters {
    notify: Arc<Notify>,
    /// Set by a waiter before it registers and looks; cleared by the append that posts the
    /// channel to the loop. At most one post per loop is in flight for a channel, however
    /// fast it is published to, and a loop without waiters costs an append one load.
    armed: AtomicBool,
}

impl LoopWaiters {
    /// The `Notify` to register on, armed. Called before registering and before looking at
    /// the channel's state: an append that the look misses sees the flag (the state lock
    /// orders the two) and posts.
    pub(super) fn arm(&self) -> &Arc<Notify> {
        // A load first: most waits find it armed already, and a store would take the
        // cache line from the publishing core for nothing.
        if !self.armed.load(Ordering::Relaxed) {
            self.armed.store(true, Ordering::Relaxed);
        }
        &self.notify
    }

    /// Called after an append (its state lock let go): true when the loop has to be told.
    pub(super) fn take(&self) -> bool {
        self.armed.load(Ordering::Relaxed) && self.armed.swap(false, Ordering::AcqRel)
    }

    /// On the loop: wakes every waiter registered so far.
    pub(super) fn wake(&self) {
        self.notify.notify_waiters();
    }
}

/// The hub's way to each event loop's relay task. Sized when the hub is made (event loops
/// change only with a restart); the queues exist once the loops run.
pub struct LoopRelays {
    loops: usize,
    queues: OnceLock<Box<[UnboundedSender<Arc<Channel>>]>>,
    /// Channels posted to a loop, ever (the tests' view of how often a loop is told).
    posted: AtomicU64,
}

impl LoopRelays {
    pub fn new(loops: usize) -> LoopRelays {
        LoopRelays {
            loops,
            queues: OnceLock::new(),
            posted: AtomicU64::new(0),
        }
    }

    /// A new channel's waiter lists, one per loop (none without loops).
    pub(super) fn waiters(&self) -> Box<[LoopWaiters]> {
        (0..self.loops).map(|_| LoopWaiters::default()).collect()
    }

    /// Starts one relay task on each loop (`handles[i]` runs loop `i + 1`, see
    /// `event_loop::current`). Once: later calls do nothing. The tasks end with their loops.
    pub fn start(&self, handles: &[Handle]) {
        let n = handles.len().min(self.loops);
        let mut queues = Vec::with_capacity(n);
        let mut receivers = Vec::with_capacity(n);
        for _ in 0..n {
            let (tx, rx) = mpsc::unbounded_channel::<Arc<Channel>>();
            queues.push(tx);
            receivers.push(rx);
        }
        if self.queues.set(queues.into_boxed_slice()).is_err() {
            return;
        }
        for (i, (h, mut rx)) in handles.iter().zip(receivers).enumerate() {
            h.spawn(async move {
                let mut batch = Vec::with_capacity(64);
                while rx.recv_many(&mut batch, 64).await > 0 {
                    for chan in batch.drain(..) {
                        chan.wake_loop(i);
                    }
                }
            });
        }
    }

    /// Asks loop `i`'s relay to wake the channel's waiters there. Before the loops run (or
    /// after they stopped) there is no one on them to wake.
    pub(super) fn post(&self, i: usize, chan: Arc<Channel>) {
        if let Some(q) = self.queues.get().and_then(|q| q.get(i)) {
            self.posted.fetch_add(1, Ordering::Relaxed);
            let _ = q.send(chan);
        }
    }

    #[cfg(test)]
    pub(super) fn posted(&self) -> u64 {
        self.posted.load(Ordering::Relaxed)
    }
}
