//! What one subscriber saw, per channel: a bitmap of sequence numbers (so loss and duplicates
//! are exact per (subscriber, channel)), latency into the shared histogram, and the counters
//! the run's drain loop watches.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use crate::payload;
use crate::subscriber::{now_ns, Shared};

/// What one subscriber saw, returned when the run stops it.
#[derive(Debug, Default, Clone)]
pub struct SubResult {
    /// The channels (indices into the run's channel list) this subscriber listens on.
    pub channels: Vec<u32>,
    pub connected: bool,
    pub ended: bool,
    /// Distinct sequence numbers received, per channel (same order as `channels`).
    pub distinct: Vec<u32>,
    pub dups: u32,
    /// Sequence numbers outside the published range, bodies that did not parse, or messages of
    /// a channel this subscriber did not ask for.
    pub unexpected: u32,
}

pub struct Tracker {
    /// `channels.len()` bitmaps of `words` u64 each.
    seen: Vec<u64>,
    words: usize,
    seq_cap: usize,
    pub res: SubResult,
    pub shared: Arc<Shared>,
}

impl Tracker {
    pub fn new(channels: Vec<u32>, seq_cap: usize, shared: Arc<Shared>) -> Self {
        let words = seq_cap.div_ceil(64).max(1);
        Tracker {
            seen: vec![0; words * channels.len()],
            words,
            seq_cap,
            res: SubResult {
                distinct: vec![0; channels.len()],
                channels,
                ..SubResult::default()
            },
            shared,
        }
    }

    /// Which of this subscriber's channels a message belongs to: the body's channel index,
    /// checked against the envelope's channel name when there is one.
    fn slot(&self, body_channel: Option<u32>, named: Option<&str>) -> Option<usize> {
        let by_index = match body_channel {
            Some(c) => Some(self.res.channels.iter().position(|&x| x == c)?),
            None if self.res.channels.len() == 1 => Some(0),
            None => None,
        };
        if let (Some(name), Some(i)) = (named, by_index) {
            let c = self.res.channels[i] as usize;
            if self.shared.names.get(c).map(String::as_str) != Some(name) {
                return None;
            }
        }
        by_index
    }

    /// A message as the transport delivered it: the body, or a crier.json envelope.
    pub fn on_message(&mut self, m: &[u8]) {
        if m.first() == Some(&b'{') {
            match payload::unwrap(m) {
                Some((name, body)) => self.on_body(&body, name.as_deref()),
                None => self.res.unexpected += 1,
            }
        } else {
            self.on_body(m, None);
        }
    }

    fn on_body(&mut self, b: &[u8], named: Option<&str>) {
        let now = now_ns();
        let Some(p) = payload::parse(b) else {
            self.res.unexpected += 1;
            return;
        };
        self.shared.deliveries.fetch_add(1, Relaxed);
        self.shared.last_delivery_ns.fetch_max(now, Relaxed);
        self.shared
            .latency
            .record(now.saturating_sub(p.sent_ns) / 1000);
        let seq = p.seq as usize;
        let Some(slot) = self.slot(p.channel, named) else {
            self.res.unexpected += 1;
            return;
        };
        if seq >= self.seq_cap {
            self.res.unexpected += 1;
            return;
        }
        let (w, bit) = (slot * self.words + seq / 64, 1u64 << (seq % 64));
        if self.seen[w] & bit != 0 {
            self.res.dups += 1;
        } else {
            self.seen[w] |= bit;
            self.res.distinct[slot] += 1;
            self.shared.distinct.fetch_add(1, Relaxed);
        }
    }

    pub fn on_sse_line(&mut self, line: &[u8]) {
        if let Some(rest) = line.strip_prefix(b"data:") {
            let rest = rest.strip_prefix(b" ").unwrap_or(rest);
            self.on_message(rest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_channel_accounting() {
        let names: Vec<String> = (0..4).map(|c| format!("c{c}")).collect();
        let shared = Arc::new(Shared::new(names));
        let mut t = Tracker::new(vec![1, 3], 10, shared);
        t.on_message(payload::body(0, 1, 40).as_bytes());
        t.on_message(payload::body(0, 3, 40).as_bytes());
        t.on_message(payload::body(0, 3, 40).as_bytes()); // duplicate
        t.on_message(payload::body(1, 2, 40).as_bytes()); // not subscribed
        let env = format!(
            r#"{{"channel":"c3","id":"1-0","data":"{}"}}"#,
            payload::body(1, 3, 40)
        );
        t.on_message(env.as_bytes());
        let wrong = format!(
            r#"{{"channel":"c1","id":"1-0","data":"{}"}}"#,
            payload::body(2, 3, 40)
        );
        t.on_message(wrong.as_bytes()); // envelope names another channel than the body
        assert_eq!(t.res.distinct, vec![1, 2]);
        assert_eq!((t.res.dups, t.res.unexpected), (1, 2));
    }
}
