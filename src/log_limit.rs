//! Warnings that cannot flood the journal: a backend that is down fails every request, and a
//! line per request would bury everything else. A [`LogLimit`] lets one line through per
//! period and counts the ones it held back, so the next line says how many there were.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// One line per `period`, shared by every thread (lock-free: a compare-and-swap on the
/// time the next line is due).
pub struct LogLimit {
    period_ms: u64,
    /// Milliseconds since `epoch` when the next line may go out.
    next_ms: AtomicU64,
    held_back: AtomicU64,
    epoch: std::sync::OnceLock<Instant>,
}

impl LogLimit {
    pub const fn new(period: Duration) -> LogLimit {
        LogLimit {
            period_ms: period.as_millis() as u64,
            next_ms: AtomicU64::new(0),
            held_back: AtomicU64::new(0),
            epoch: std::sync::OnceLock::new(),
        }
    }

    /// Some(lines held back since the last one) when this line may be logged now.
    pub fn allow(&self) -> Option<u64> {
        let epoch = *self.epoch.get_or_init(Instant::now);
        let now = epoch.elapsed().as_millis() as u64;
        let due = self.next_ms.load(Ordering::Relaxed);
        if now >= due
            && self
                .next_ms
                .compare_exchange(
                    due,
                    now + self.period_ms,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return Some(self.held_back.swap(0, Ordering::Relaxed));
        }
        self.held_back.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// " (12 more like it since the last line)" when lines were held back, else nothing.
pub fn held_back_note(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(" ({n} more like it since the last line)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_period_and_the_rest_counted() {
        let l = LogLimit::new(Duration::from_secs(3600));
        assert_eq!(l.allow(), Some(0));
        assert_eq!(l.allow(), None);
        assert_eq!(l.allow(), None);
        assert_eq!(l.held_back.load(Ordering::Relaxed), 2);
        let l = LogLimit::new(Duration::ZERO);
        assert_eq!(l.allow(), Some(0));
        assert_eq!(l.allow(), Some(0));
    }
}
