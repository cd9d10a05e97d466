//! Exact delivery accounting for one reader of one channel (issue 19): what arrived, in which
//! order, and which of the lost messages the reader was *told* about.
//!
//! With several publish connections, publishes race: the order the server accepts them in is
//! not the order of their sequence numbers. What is certain is causality: a message whose
//! publish was acknowledged before another's was sent was accepted first. So the accounting
//! uses each message's send time (stamped in its body) and acknowledgement time (recorded by the
//! publisher), and every judgement is one causality can make:
//!
//! - *out of order*: X arrived after Y although X was acknowledged before Y was sent;
//! - a gap signal — an SSE `event: crier.gap` notice, or a resume answered with
//!   `Crier-Resume: gap` — sits between L, the last message that arrived before it, and F, the
//!   first after it (none: the start or the end of the run). A lost message M was *told* when it
//!   was certainly accepted between L and F (sent after L's ack, acknowledged before F was
//!   sent); *ambiguous* when its publish overlapped L's or F's, so that either order is possible
//!   (at most a few per signal; none with one publish connection); *silent* otherwise.

use serde_json::json;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    Msg(u64),
    Told,
}

/// Per sequence number: when its publish was sent and acknowledged (unix ns; ack 0 = the
/// publish failed, so the message is not expected).
pub struct Times {
    pub sent: Vec<u64>,
    pub ack: Vec<u64>,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub published: u64,
    pub received: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub lost_told: u64,
    pub lost_ambiguous: u64,
    pub lost_silent: u64,
    /// Received messages that were never acknowledged, or outside the published range.
    pub unexpected: u64,
}

impl Counts {
    pub fn json(&self) -> serde_json::Value {
        json!({
            "published": self.published, "received": self.received, "lost": self.lost,
            "duplicates": self.duplicates, "out_of_order": self.out_of_order,
            "lost_told": self.lost_told, "lost_ambiguous": self.lost_ambiguous,
            "lost_silent": self.lost_silent, "unexpected": self.unexpected,
        })
    }
}

/// A gap signal's bounds: the messages that arrived just before and just after it.
struct Gap {
    before: Option<usize>,
    after: Option<usize>,
}

enum Side {
    Inside,
    Maybe,
    Outside,
}

fn side(m: usize, g: &Gap, t: &Times) -> Side {
    // Certainly after L / before F, and certainly before L / after F.
    let after_l = g.before.is_none_or(|l| t.sent[m] > t.ack[l]);
    let before_f = g.after.is_none_or(|f| t.ack[m] < t.sent[f]);
    let before_l = g.before.is_some_and(|l| t.ack[m] < t.sent[l]);
    let after_f = g.after.is_some_and(|f| t.sent[m] > t.ack[f]);
    if after_l && before_f {
        Side::Inside
    } else if before_l || after_f {
        Side::Outside
    } else {
        Side::Maybe
    }
}

pub fn account(log: &[Entry], t: &Times) -> Counts {
    let n = t.ack.len();
    let mut got = vec![false; n];
    let mut c = Counts {
        published: t.ack.iter().filter(|&&a| a > 0).count() as u64,
        ..Counts::default()
    };
    let mut max_sent = 0u64;
    for e in log {
        let Entry::Msg(s) = *e else { continue };
        let s = s as usize;
        if s >= n || t.ack[s] == 0 {
            c.unexpected += 1;
            continue;
        }
        if got[s] {
            c.duplicates += 1;
            continue;
        }
        got[s] = true;
        c.received += 1;
        if t.ack[s] < max_sent {
            c.out_of_order += 1;
        }
        max_sent = max_sent.max(t.sent[s]);
    }
    c.lost = c.published - c.received;

    // The gap signals and their neighbours in arrival order (consecutive signals are one gap).
    let mut gaps: Vec<Gap> = Vec::new();
    let mut last: Option<usize> = None;
    let mut open = false;
    for e in log {
        match *e {
            Entry::Told if !open => {
                gaps.push(Gap {
                    before: last,
                    after: None,
                });
                open = true;
            }
            Entry::Told => {}
            Entry::Msg(s) if (s as usize) < n && t.ack[s as usize] > 0 => {
                if open {
                    if let Some(g) = gaps.last_mut() {
                        g.after = Some(s as usize);
                    }
                    open = false;
                }
                last = Some(s as usize);
            }
            Entry::Msg(_) => {}
        }
    }
    for m in (0..n).filter(|&m| t.ack[m] > 0 && !got[m]) {
        let mut maybe = false;
        let mut inside = false;
        for g in &gaps {
            match side(m, g, t) {
                Side::Inside => {
                    inside = true;
                    break;
                }
                Side::Maybe => maybe = true,
                Side::Outside => {}
            }
        }
        if inside {
            c.lost_told += 1;
        } else if maybe {
            c.lost_ambiguous += 1;
        } else {
            c.lost_silent += 1;
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use Entry::{Msg, Told};

    /// One publisher: message i sent at 10i, acknowledged at 10i + 5.
    fn sequential(n: usize) -> Times {
        Times {
            sent: (0..n as u64).map(|i| 10 * i + 1).collect(),
            ack: (0..n as u64).map(|i| 10 * i + 5).collect(),
        }
    }

    #[test]
    fn told_and_silent() {
        // 0..10 published; 2,3 lost after a notice; 6 lost silently; 9 lost at the end, told.
        let log = [
            Msg(0),
            Msg(1),
            Told,
            Msg(4),
            Msg(5),
            Msg(7),
            Msg(5),
            Msg(8),
            Told,
        ];
        let c = account(&log, &sequential(10));
        assert_eq!(
            (c.published, c.received, c.lost, c.duplicates),
            (10, 6, 4, 1)
        );
        assert_eq!((c.lost_told, c.lost_ambiguous, c.lost_silent), (3, 0, 1));
        assert_eq!(c.out_of_order, 0);
    }

    #[test]
    fn leading_gap_and_order() {
        // A notice before any message covers from the start; 4 after 5 is out of order.
        let c = account(&[Told, Msg(3), Msg(5), Msg(4)], &sequential(6));
        assert_eq!((c.lost, c.lost_told, c.lost_silent), (3, 3, 0));
        assert_eq!(c.out_of_order, 1);
        // Nothing told: every loss is silent.
        let c = account(&[Msg(0), Msg(9)], &sequential(10));
        assert_eq!((c.lost, c.lost_told, c.lost_silent), (8, 0, 8));
    }

    #[test]
    fn racing_publishers() {
        // Two publishes in flight at once: 1 and 2 overlap (either order is right), 0 and 3 do not.
        let t = Times {
            sent: vec![0, 10, 11, 30],
            ack: vec![5, 20, 21, 35],
        };
        // 2 arrives before 1: not out of order (they raced).
        let c = account(&[Msg(0), Msg(2), Msg(1), Msg(3)], &t);
        assert_eq!(c.out_of_order, 0);
        // 1 lost around a gap that follows 2: it raced 2, so it may have been before or after.
        let c = account(&[Msg(0), Msg(2), Told, Msg(3)], &t);
        assert_eq!((c.lost_told, c.lost_ambiguous, c.lost_silent), (0, 1, 0));
        // 1 lost, gap after 0 and before 3: certainly inside.
        let c = account(&[Msg(0), Told, Msg(2), Msg(3)], &t);
        assert_eq!((c.lost_told, c.lost_ambiguous, c.lost_silent), (0, 1, 0));
        let c = account(&[Msg(0), Told, Msg(3)], &t);
        assert_eq!((c.lost_told, c.lost_silent), (2, 0));
        // 0 was acknowledged before 3 was sent: 0 after 3 is out of order.
        let c = account(&[Msg(3), Msg(0)], &t);
        assert_eq!(c.out_of_order, 1);
    }
}
