//! The publishes waiting for the writer thread: a vector under a lock and a condvar the
//! writer sleeps on.
//!
//! Why not a channel: a channel wakes a blocked receiver on every send, so gathering a group
//! commit of 32 publishes woke the writer thread 32 times (a futex call for the sender and a
//! context switch for the writer each, on cores the publishers need). Here the writer says
//! how many it waits for, and only the sender that brings the queue to that count wakes it.

use std::time::Instant;

use parking_lot::{Condvar, Mutex};

pub struct Queue<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
}

struct State<T> {
    items: Vec<T>,
    /// How many items the sleeping writer waits for; 0 while it is not asleep.
    want: usize,
    /// The writer is gone: pushes are refused.
    closed: bool,
}

impl<T> Queue<T> {
    pub fn new() -> Queue<T> {
        Queue {
            state: Mutex::new(State {
                items: Vec::new(),
                want: 0,
                closed: false,
            }),
            ready: Condvar::new(),
        }
    }

    /// Queues `item`; gives it back when the writer is gone.
    pub fn push(&self, item: T) -> Result<(), T> {
        let wake = {
            let mut s = self.state.lock();
            if s.closed {
                return Err(item);
            }
            s.items.push(item);
            let wake = s.want != 0 && s.items.len() >= s.want;
            if wake {
                s.want = 0; // one wake-up is enough
            }
            wake
        };
        if wake {
            self.ready.notify_one();
        }
        Ok(())
    }

    /// Waits until at least `want` items are queued or `deadline` passes, then moves up to
    /// `max` of them (the oldest) to the end of `into`. Returns how many it moved.
    pub fn take(&self, want: usize, deadline: Instant, max: usize, into: &mut Vec<T>) -> usize {
        let mut s = self.state.lock();
        while s.items.len() < want.max(1) && !s.closed {
            s.want = want.max(1);
            if self.ready.wait_until(&mut s, deadline).timed_out() {
                break;
            }
        }
        s.want = 0;
        let n = s.items.len().min(max);
        if n == s.items.len() && into.is_empty() {
            // The usual case: the whole queue, by swapping buffers (both keep their capacity).
            std::mem::swap(&mut s.items, into);
        } else {
            into.extend(s.items.drain(..n));
        }
        n
    }

    /// Refuses every push from now on, and gives back what is still queued.
    pub fn close(&self) -> Vec<T> {
        let mut s = self.state.lock();
        s.closed = true;
        std::mem::take(&mut s.items)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[test]
    fn take_waits_for_the_count_asked_or_the_deadline() {
        let q = Arc::new(Queue::new());
        let mut got = Vec::new();
        // Nothing queued: the deadline ends the wait with nothing.
        let n = q.take(1, Instant::now() + Duration::from_millis(20), 10, &mut got);
        assert_eq!(n, 0);
        // Three pushed by another thread, one at a time: one take of 3 gets them together.
        let pusher = {
            let q = q.clone();
            std::thread::spawn(move || {
                for i in 0..3 {
                    std::thread::sleep(Duration::from_millis(5));
                    q.push(i).expect("open");
                }
            })
        };
        let n = q.take(3, Instant::now() + Duration::from_secs(10), 10, &mut got);
        pusher.join().expect("pusher");
        assert_eq!((n, &got[..]), (3, &[0, 1, 2][..]));
        // Fewer than asked by the deadline: what there is.
        q.push(3).expect("open");
        let n = q.take(5, Instant::now() + Duration::from_millis(20), 10, &mut got);
        assert_eq!((n, &got[..]), (1, &[0, 1, 2, 3][..]));
    }

    #[test]
    fn take_moves_at_most_max_oldest_first() {
        let q = Queue::new();
        for i in 0..5 {
            q.push(i).expect("open");
        }
        let mut got = Vec::new();
        assert_eq!(q.take(1, Instant::now(), 2, &mut got), 2);
        assert_eq!(q.take(1, Instant::now(), 10, &mut got), 3);
        assert_eq!(got, [0, 1, 2, 3, 4]);
    }

    #[test]
    fn a_closed_queue_refuses_pushes_and_gives_back_what_it_held() {
        let q = Queue::new();
        q.push(1).expect("open");
        assert_eq!(q.close(), [1]);
        assert_eq!(q.push(2), Err(2));
        // A take on a closed queue does not wait.
        let mut got = Vec::new();
        assert_eq!(
            q.take(1, Instant::now() + Duration::from_secs(60), 10, &mut got),
            0
        );
    }
}
