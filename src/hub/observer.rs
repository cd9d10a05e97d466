//! What the hub tells the parts of crier that act on events rather than hold subscribers:
//! webhooks (message, subscribe, unsubscribe, channel deleted) and Web Push (message).
//!
//! Observers are called synchronously on the task that caused the event, so an
//! implementation only records or enqueues (a bounded queue, a counter): it never blocks,
//! never awaits and never calls back into the hub.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::model::Transport;

use super::Message;

/// One message, as the hub accepted it.
pub struct Published<'a> {
    pub channel: &'a str,
    pub message: &'a Arc<Message>,
    /// The publish request's headers (empty when the message did not come over HTTP): for
    /// per-message options such as Web Push's `Crier-Urgency`.
    pub headers: &'a http::HeaderMap,
}

/// A subscriber joined or left a channel.
pub struct SubscriberEvent<'a> {
    pub channel: &'a str,
    pub transport: Transport,
    /// The channel's subscriber count after the change.
    pub subscribers: usize,
    pub remote: Option<SocketAddr>,
}

/// Every method has a no-op default: an observer implements what it cares about.
pub trait HubObserver: Send + Sync + 'static {
    /// Called under the channel's append lock, so calls for one channel come in id order.
    fn message(&self, _m: &Published<'_>) {}
    /// Called for every subscriber that joins, before it reads anything.
    fn subscribed(&self, _e: &SubscriberEvent<'_>) {}
    /// Called once for every subscriber that leaves, whatever the reason (clean close,
    /// reset, timeout, channel delete, shutdown): it runs when the subscription is dropped.
    fn unsubscribed(&self, _e: &SubscriberEvent<'_>) {}
    fn channel_deleted(&self, _channel: &str) {}
}

/// The observers the hub calls, keyed by who installed them (so webhooks and Web Push can
/// each replace theirs on reload without touching the other's).
#[derive(Default, Clone)]
pub(super) struct Observers {
    list: Arc<[(&'static str, Arc<dyn HubObserver>)]>,
}

impl Observers {
    pub(super) fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub(super) fn with(&self, key: &'static str, obs: Option<Arc<dyn HubObserver>>) -> Observers {
        let mut v: Vec<_> = self
            .list
            .iter()
            .filter(|(k, _)| *k != key)
            .cloned()
            .collect();
        if let Some(o) = obs {
            v.push((key, o));
        }
        Observers { list: v.into() }
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &Arc<dyn HubObserver>> {
        self.list.iter().map(|(_, o)| o)
    }
}
