//! Event loops (`server.event_loops`): threads that each run a single-threaded runtime and
//! serve the public connections they accept from start to end, as nginx's worker processes do.
//!
//! On the shared runtime, a connection's task can run on any worker: the one that polled the
//! I/O driver wakes it, another may steal it, and the upstream connection it borrows was last
//! used by a third. Each hop is a cross-thread wake-up, and the app behind crier gets its
//! requests in smaller batches. On a loop, a connection, the tasks it spawns and the upstream
//! connections it borrows stay on one thread with its own epoll.

use std::cell::{Cell, RefCell};
use std::io;
use std::time::Duration;

use prometheus::{IntGauge, IntGaugeVec};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

thread_local! {
    /// 1 + the index of the loop this thread runs; 0 on any other thread.
    static INDEX: Cell<usize> = const { Cell::new(0) };
    /// `crier_event_loop_connections{loop}` of this thread's loop.
    static CONNECTIONS: RefCell<Option<IntGauge>> = const { RefCell::new(None) };
}

/// 1 + the index of the event loop the caller runs on; 0 when it is not on one. Lets state
/// that a loop should keep to itself (the upstream pool) be split by loop.
pub fn current() -> usize {
    INDEX.with(Cell::get)
}

/// A public connection opened on this thread: counted on its loop's gauge, if it is on one.
pub fn connection_opened() {
    CONNECTIONS.with(|c| {
        if let Some(g) = &*c.borrow() {
            g.inc();
        }
    });
}

/// The end of a connection [`connection_opened`] counted (on the same thread: a task never
/// leaves its loop).
pub fn connection_closed() {
    CONNECTIONS.with(|c| {
        if let Some(g) = &*c.borrow() {
            g.dec();
        }
    });
}

/// The running loops. Dropping this stops them: what still runs on them is dropped (its
/// sockets closed) on their own threads.
pub struct EventLoops {
    handles: Vec<Handle>,
    stop: CancellationToken,
}

impl EventLoops {
    /// Starts `n` loops (threads `crier-loop-0` ...), each counting its open connections on
    /// `gauge{loop="<i>"}`.
    pub async fn start(n: usize, gauge: &IntGaugeVec) -> io::Result<EventLoops> {
        let mut loops = EventLoops {
            handles: Vec::with_capacity(n),
            stop: CancellationToken::new(),
        };
        for i in 0..n {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let stop = loops.stop.clone();
            let connections = gauge.with_label_values(&[&i.to_string()]);
            std::thread::Builder::new()
                .name(format!("crier-loop-{i}"))
                .spawn(move || {
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    };
                    INDEX.set(i + 1);
                    CONNECTIONS.with(|c| *c.borrow_mut() = Some(connections));
                    if tx.send(Ok(rt.handle().clone())).is_err() {
                        return;
                    }
                    rt.block_on(stop.cancelled());
                    // Blocking work a connection started (a file read) gets a moment.
                    rt.shutdown_timeout(Duration::from_secs(1));
                })?;
            let handle = rx
                .await
                .map_err(|_| io::Error::other("an event loop thread ended at start"))??;
            loops.handles.push(handle);
        }
        Ok(loops)
    }

    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }

    /// Stops the loops now (as dropping them would).
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for EventLoops {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn each_loop_knows_its_index_and_counts_its_connections() {
        let gauge = IntGaugeVec::new(prometheus::Opts::new("g", "g"), &["loop"]).expect("gauge");
        let loops = EventLoops::start(2, &gauge).await.expect("start");
        assert_eq!(current(), 0, "the test's own thread is on no loop");
        for (i, h) in loops.handles().iter().enumerate() {
            let (index, name) = h
                .spawn(async {
                    connection_opened();
                    (current(), std::thread::current().name().map(str::to_string))
                })
                .await
                .expect("task");
            assert_eq!(index, i + 1);
            assert_eq!(name.as_deref(), Some(format!("crier-loop-{i}").as_str()));
        }
        assert_eq!(gauge.with_label_values(&["0"]).get(), 1);
        assert_eq!(gauge.with_label_values(&["1"]).get(), 1);
        loops.handles()[1]
            .spawn(async { connection_closed() })
            .await
            .expect("task");
        assert_eq!(gauge.with_label_values(&["1"]).get(), 0);
        // Off a loop nothing is counted.
        connection_opened();
        assert_eq!(gauge.with_label_values(&["0"]).get(), 1);

        // Dropped: the loops stop, and what ran on them is dropped.
        let h = loops.handles()[0].clone();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        h.spawn(async move {
            let _tx = tx;
            std::future::pending::<()>().await
        });
        drop(loops);
        assert!(
            tokio::time::timeout(Duration::from_secs(5), rx)
                .await
                .is_ok(),
            "a task on a stopped loop was not dropped"
        );
    }
}
