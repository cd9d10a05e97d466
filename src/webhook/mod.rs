//! Webhooks both ways.
//!
//! Outbound (`[[webhook]]`): a hub observer turns hub events (message, subscribe, unsubscribe,
//! channel deleted) into [`Event`]s and puts each into the bounded queue of every endpoint
//! that wants it; each endpoint POSTs them, up to `max_in_flight` at once and in order per
//! channel, signed as Standard Webhooks, with retries ([`outbound`]). The observer runs under the channel's append lock, so it only
//! enqueues: a slow endpoint never slows publishing, subscribers or other endpoints.
//!
//! Inbound (`[[ingress]]`): a path on the public listener where a verified webhook request is
//! published to a channel ([`ingress`]).

pub mod ingress;
mod outbound;
pub mod sign;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use bytes::Bytes;
use parking_lot::Mutex;

use crate::config::{Config, WebhookEvent};
use crate::hub::{Hub, HubObserver, Message, Published, SubscriberEvent};
use crate::keys::Keys;
use crate::metrics::Metrics;
use crate::model::Transport;

pub use ingress::Ingress;
use outbound::{Endpoint, Running};

/// The hub observer key webhooks install themselves under.
const OBSERVER_KEY: &str = "webhooks";

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("webhook {name:?}: ca_file: {source}")]
    Client {
        name: String,
        source: crate::https_client::ClientError,
    },
    /// The keys were read from another config than this one (a bug).
    #[error("webhook {0:?}: its secret was not read")]
    NoSecret(String),
}

/// One event, shared by every endpoint it goes to. Its JSON body is built once, by the first
/// delivery task that needs it (not under the hub's append lock).
pub(crate) struct Event {
    /// `webhook-id`: unique per event, the same on every retry and every endpoint.
    id: String,
    at: SystemTime,
    data: EventData,
    body: OnceLock<Bytes>,
}

enum EventData {
    Message {
        channel: Arc<str>,
        message: Arc<Message>,
    },
    Subscriber {
        kind: WebhookEvent,
        channel: Arc<str>,
        transport: Transport,
        subscribers: usize,
        remote: Option<SocketAddr>,
    },
    Deleted {
        channel: Arc<str>,
    },
}

/// Event ids: `msg_<process start, ms, base 16>_<counter>`, unique across restarts of one host
/// unless two processes start in the same millisecond.
fn next_event_id() -> String {
    static BOOT: OnceLock<u64> = OnceLock::new();
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let boot = *BOOT.get_or_init(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    });
    format!("msg_{boot:x}_{}", SEQ.fetch_add(1, Ordering::Relaxed))
}

impl Event {
    fn new(data: EventData) -> Arc<Event> {
        Arc::new(Event {
            id: next_event_id(),
            at: SystemTime::now(),
            data,
            body: OnceLock::new(),
        })
    }

    /// The channel it is about: an endpoint keeps each channel's events in order.
    fn channel(&self) -> &Arc<str> {
        match &self.data {
            EventData::Message { channel, .. }
            | EventData::Subscriber { channel, .. }
            | EventData::Deleted { channel } => channel,
        }
    }

    fn kind(&self) -> WebhookEvent {
        match &self.data {
            EventData::Message { .. } => WebhookEvent::Message,
            EventData::Subscriber { kind, .. } => *kind,
            EventData::Deleted { .. } => WebhookEvent::ChannelDeleted,
        }
    }

    /// `{"type": ..., "timestamp": <RFC 3339>, "data": {...}}`
    pub(crate) fn body(&self) -> &Bytes {
        self.body.get_or_init(|| {
            let data = match &self.data {
                EventData::Message { channel, message } => {
                    let mut d = serde_json::json!({
                        "channel": &**channel,
                        "id": message.id.to_string(),
                        "event": message.event.as_deref(),
                        "content_type": message.content_type.to_str().unwrap_or(""),
                    });
                    match std::str::from_utf8(&message.body) {
                        Ok(text) => d["body"] = text.into(),
                        Err(_) => {
                            d["body_b64"] = base64::engine::general_purpose::STANDARD
                                .encode(&message.body)
                                .into()
                        }
                    }
                    d
                }
                EventData::Subscriber {
                    channel,
                    transport,
                    subscribers,
                    remote,
                    ..
                } => serde_json::json!({
                    "channel": &**channel,
                    "transport": transport.as_str(),
                    "subscribers": subscribers,
                    "remote": remote.map(|r| r.to_string()),
                }),
                EventData::Deleted { channel } => serde_json::json!({ "channel": &**channel }),
            };
            let v = serde_json::json!({
                "type": self.kind().as_str(),
                "timestamp": sign::rfc3339(self.at),
                "data": data,
            });
            serde_json::to_vec(&v).unwrap_or_default().into()
        })
    }
}

/// What the hub calls: routes each event to the endpoints that want it.
struct Observer {
    endpoints: Vec<Arc<Endpoint>>,
}

impl Observer {
    /// Builds the event once, only if some endpoint wants it.
    fn route(&self, kind: WebhookEvent, channel: &str, make: impl FnOnce() -> EventData) {
        let mut make = Some(make);
        let mut event: Option<Arc<Event>> = None;
        for ep in &self.endpoints {
            if !ep.cfg.wants(kind) || !ep.cfg.wants_channel(channel) {
                continue;
            }
            if let Some(f) = make.take() {
                event = Some(Event::new(f()));
            }
            if let Some(e) = &event {
                ep.enqueue(e.clone());
            }
        }
    }

    fn subscriber(&self, kind: WebhookEvent, e: &SubscriberEvent<'_>) {
        self.route(kind, e.channel, || EventData::Subscriber {
            kind,
            channel: e.channel.into(),
            transport: e.transport,
            subscribers: e.subscribers,
            remote: e.remote,
        });
    }
}

impl HubObserver for Observer {
    fn message(&self, m: &Published<'_>) {
        self.route(WebhookEvent::Message, m.channel, || EventData::Message {
            channel: m.channel.into(),
            message: m.message.clone(),
        });
    }

    fn subscribed(&self, e: &SubscriberEvent<'_>) {
        self.subscriber(WebhookEvent::Subscribe, e);
    }

    fn unsubscribed(&self, e: &SubscriberEvent<'_>) {
        self.subscriber(WebhookEvent::Unsubscribe, e);
    }

    fn channel_deleted(&self, channel: &str) {
        self.route(WebhookEvent::ChannelDeleted, channel, || {
            EventData::Deleted {
                channel: channel.into(),
            }
        });
    }
}

/// A webhook set built from a config, not yet running (building can fail; installing cannot).
pub struct Prepared {
    endpoints: Vec<Arc<Endpoint>>,
}

/// The running webhook set of a server: replaced as a whole on reload, drained on shutdown.
pub struct Webhooks {
    hub: Hub,
    metrics: Arc<Metrics>,
    /// parking_lot: touched at start, reload, shutdown and by `/webhooks`; never across `.await`.
    running: Mutex<Vec<Running>>,
}

impl Webhooks {
    pub fn new(hub: Hub, metrics: Arc<Metrics>) -> Webhooks {
        Webhooks {
            hub,
            metrics,
            running: Mutex::new(Vec::new()),
        }
    }

    /// Builds the endpoints of `config` (their HTTPS clients, metric handles) with their
    /// secrets from `keys`.
    pub fn prepare(&self, config: &Config, keys: &Keys) -> Result<Prepared, WebhookError> {
        let endpoints = config
            .webhooks
            .iter()
            .map(|w| {
                let secret = keys
                    .webhooks
                    .get(&w.name)
                    .cloned()
                    .ok_or_else(|| WebhookError::NoSecret(w.name.clone()))?;
                Endpoint::new(w.clone(), secret, &self.metrics).map(Arc::new)
            })
            .collect::<Result<_, _>>()?;
        Ok(Prepared { endpoints })
    }

    /// Starts `p`'s delivery tasks and points the hub at them. An endpoint with the name of a
    /// running one takes over its queue (in order, before anything newer); the others stop,
    /// and what they still held is logged with a count. Needs a Tokio runtime.
    pub fn install(&self, p: Prepared) {
        let mut running = self.running.lock();
        let mut old: Vec<Running> = std::mem::take(&mut *running);
        for ep in p.endpoints {
            let predecessor = old
                .iter()
                .position(|r| r.endpoint.cfg.name == ep.cfg.name)
                .map(|i| old.swap_remove(i));
            running.push(Running::start(ep, predecessor));
        }
        let endpoints: Vec<_> = running.iter().map(|r| r.endpoint.clone()).collect();
        let observer: Option<Arc<dyn HubObserver>> = if endpoints.is_empty() {
            None
        } else {
            Some(Arc::new(Observer { endpoints }))
        };
        self.hub.set_observer(OBSERVER_KEY, observer);
        drop(running);
        for r in old {
            r.retire(self.metrics.clone());
        }
    }

    /// Shutdown: call after the hub closed and subscribers left (so their `unsubscribe`
    /// events are queued). Waits up to `deadline` for every queue to empty, then stops the
    /// delivery tasks; returns (and logs) how many events were left undelivered.
    pub async fn drain(&self, deadline: Duration) -> usize {
        let endpoints: Vec<Arc<Endpoint>> = self
            .running
            .lock()
            .iter()
            .map(|r| r.endpoint.clone())
            .collect();
        if endpoints.is_empty() {
            return 0;
        }
        let end = tokio::time::Instant::now() + deadline;
        while endpoints.iter().any(|e| !e.is_idle()) && tokio::time::Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.hub.set_observer(OBSERVER_KEY, None);
        let running: Vec<Running> = std::mem::take(&mut *self.running.lock());
        let mut left = 0;
        for r in running {
            left += r.stop().await;
        }
        if left > 0 {
            tracing::warn!(
                "shutdown: {left} webhook event(s) left undelivered after the drain deadline ({deadline:?})"
            );
        }
        left
    }

    /// `GET /webhooks` on the admin listener.
    pub fn status(&self) -> serde_json::Value {
        let list: Vec<_> = self
            .running
            .lock()
            .iter()
            .map(|r| r.endpoint.status())
            .collect();
        serde_json::json!({ "webhooks": list })
    }
}

impl Drop for Webhooks {
    /// A server dropped without running its drain (a failed start, a test) leaves no delivery
    /// task behind.
    fn drop(&mut self) {
        for r in self.running.get_mut().iter() {
            r.cancel();
        }
    }
}
