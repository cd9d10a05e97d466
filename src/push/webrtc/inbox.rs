//! A session's inbox: the datagrams the socket task has routed to it, not yet read.
//!
//! Not a tokio mpsc channel: every session has one for its whole life, and tokio's costs 800
//! bytes before the first datagram (a 512-byte channel, cache-padded, and a first block of 32
//! slots, kept) — 2% of an idle session. This is one small allocation, plus a ring buffer only
//! while datagrams wait.

use std::collections::VecDeque;

use parking_lot::Mutex;
use tokio::sync::Notify;

/// Ring buffers grown past this by a burst are let go once drained.
const KEEP: usize = 8;

pub(super) struct Inbox<T> {
    items: Mutex<VecDeque<T>>,
    ready: Notify,
    capacity: usize,
}

impl<T> Inbox<T> {
    /// Holds at most `capacity` items; past that, `push` drops.
    pub(super) fn new(capacity: usize) -> Inbox<T> {
        Inbox {
            items: Mutex::new(VecDeque::new()),
            ready: Notify::new(),
            capacity,
        }
    }

    /// Queues `item`, or gives it back when the inbox is full (UDP semantics: the caller
    /// drops it, as the network would).
    pub(super) fn push(&self, item: T) -> Result<(), T> {
        {
            let mut q = self.items.lock();
            if q.len() >= self.capacity {
                return Err(item);
            }
            q.push_back(item);
        }
        // One reader: a permit is stored if it is not waiting yet.
        self.ready.notify_one();
        Ok(())
    }

    /// The oldest item, waiting for one. Cancel-safe: an item is only taken in the poll that
    /// returns it.
    pub(super) async fn recv(&self) -> T {
        loop {
            if let Some(item) = self.pop() {
                return item;
            }
            self.ready.notified().await;
        }
    }

    fn pop(&self) -> Option<T> {
        let mut q = self.items.lock();
        let item = q.pop_front();
        if q.is_empty() && q.capacity() > KEEP {
            *q = VecDeque::new();
        }
        item
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[test]
    fn an_idle_inbox_is_one_small_allocation() {
        // What every session keeps (in its `Arc`, with the two counts), before and after a burst.
        let size = std::mem::size_of::<Inbox<Box<[u8; 72]>>>();
        assert!(size <= 96, "an Inbox is {size} bytes");
        let inbox = Inbox::new(64);
        for i in 0..40u8 {
            assert!(inbox.push(Box::new([i; 72])).is_ok());
        }
        assert!(inbox.items.lock().capacity() >= 40);
        while inbox.pop().is_some() {}
        assert_eq!(
            inbox.items.lock().capacity(),
            0,
            "a drained burst's buffer is let go"
        );
    }

    #[test]
    fn keeps_order_and_drops_past_its_capacity() {
        let inbox = Inbox::new(2);
        assert_eq!(inbox.push(1), Ok(()));
        assert_eq!(inbox.push(2), Ok(()));
        assert_eq!(inbox.push(3), Err(3));
        assert_eq!(inbox.pop(), Some(1));
        assert_eq!(inbox.push(4), Ok(()));
        assert_eq!(inbox.pop(), Some(2));
        assert_eq!(inbox.pop(), Some(4));
        assert_eq!(inbox.pop(), None);
    }

    #[tokio::test]
    async fn a_waiting_reader_wakes_for_a_push_from_another_task() {
        let inbox = Arc::new(Inbox::new(4));
        let reader = tokio::spawn({
            let inbox = inbox.clone();
            async move { (inbox.recv().await, inbox.recv().await) }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(inbox.push("a"), Ok(()));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(inbox.push("b"), Ok(()));
        let got = tokio::time::timeout(Duration::from_secs(5), reader).await;
        assert_eq!(got.expect("woken").expect("reader"), ("a", "b"));
    }

    #[tokio::test]
    async fn a_push_before_the_reader_waits_is_not_lost() {
        let inbox = Inbox::new(4);
        assert_eq!(inbox.push(7), Ok(()));
        let got = tokio::time::timeout(Duration::from_secs(5), inbox.recv()).await;
        assert_eq!(got.expect("not lost"), 7);
    }
}
