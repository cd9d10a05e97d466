//! One webhook endpoint: its bounded queue and the `max_in_flight` delivery slots that send it,
//! retrying on the configured schedule.
//!
//! Order is kept per channel, not per endpoint: a channel has at most one event in flight, and
//! its next event waits until that one is done (delivered, given up or gone), retries included.
//! Events of different channels go out side by side, so an endpoint 50 ms away takes
//! `max_in_flight` events per round trip (32 / 50 ms = 640/s) instead of one (20/s), while a
//! receiver still sees each channel's events in publish order.
//!
//! The queue is one FIFO (`fresh`) plus, for each channel with an event in flight, the events
//! of that channel a slot found behind it (`parked`). A slot takes the first fresh event whose
//! channel is free and parks the others it passes, so each event is moved at most once (no
//! rescans); the slot that finishes a channel's event takes that channel's next parked one.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use parking_lot::Mutex;
use prometheus::{Histogram, IntCounter, IntGauge};
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use super::{sign, Event, WebhookError};
use crate::config::WebhookConfig;
use crate::https_client::{self, error_chain, parse_retry_after, ClientOptions, HttpsClient};
use crate::keys::Secret;
use crate::metrics::Metrics;

/// The longest `Retry-After` honoured: a receiver cannot park an endpoint for longer.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// Response bodies are read (so the pooled connection can be reused) up to this much.
const MAX_RESPONSE_BODY: usize = 64 * 1024;

struct EndpointMetrics {
    delivered: IntCounter,
    retried: IntCounter,
    failed: IntCounter,
    dropped: IntCounter,
    disabled: IntCounter,
    depth: IntGauge,
    duration: Histogram,
}

/// An event in an endpoint's queue, with its place in the queue's age order.
struct Queued {
    /// Smaller is older. Enqueue counts up; events put back at the front count down.
    seq: i64,
    event: Arc<Event>,
}

/// What an endpoint holds. Invariant: every parked event is older than every fresh one (a
/// slot parks events from the front of `fresh`), so the oldest event is the oldest parked
/// front, or else the front of `fresh`.
#[derive(Default)]
struct Queue {
    /// Not yet looked at by a slot, oldest first.
    fresh: VecDeque<Queued>,
    /// The channels with an event in flight, each with the events of that channel a slot took
    /// off `fresh` meanwhile, oldest first. At most `max_in_flight` entries.
    busy: HashMap<Arc<str>, VecDeque<Queued>>,
    /// Fresh plus parked (what `max_queue` bounds; in-flight events are not counted).
    len: usize,
    back_seq: i64,
    front_seq: i64,
}

impl Queue {
    fn push_back(&mut self, event: Arc<Event>) {
        self.back_seq += 1;
        self.fresh.push_back(Queued {
            seq: self.back_seq,
            event,
        });
        self.len += 1;
    }

    /// Drops the oldest queued event (not one in flight); returns whether there was one.
    fn drop_oldest(&mut self) -> bool {
        let oldest_parked = self
            .busy
            .iter()
            .filter_map(|(ch, lane)| lane.front().map(|q| (q.seq, ch)))
            .min_by_key(|(seq, _)| *seq)
            .map(|(_, ch)| ch.clone());
        let dropped = match oldest_parked {
            Some(ch) => self.busy.get_mut(&ch).and_then(VecDeque::pop_front),
            None => self.fresh.pop_front(),
        };
        if dropped.is_some() {
            self.len -= 1;
        }
        dropped.is_some()
    }

    /// The oldest fresh event whose channel has nothing in flight, its channel marked busy;
    /// the fresh events it passes are parked behind their channel's event in flight.
    fn take(&mut self) -> Option<Queued> {
        while let Some(q) = self.fresh.pop_front() {
            match self.busy.entry(q.event.channel().clone()) {
                Entry::Occupied(mut lane) => lane.get_mut().push_back(q),
                Entry::Vacant(v) => {
                    v.insert(VecDeque::new());
                    self.len -= 1;
                    return Some(q);
                }
            }
        }
        None
    }

    /// `channel`'s event in flight is done: its next parked event (the channel stays busy),
    /// or None (the channel is free).
    fn finish(&mut self, channel: &Arc<str>) -> Option<Queued> {
        let next = self.busy.get_mut(channel).and_then(VecDeque::pop_front);
        match next {
            Some(_) => self.len -= 1,
            None => {
                self.busy.remove(channel);
            }
        }
        next
    }

    /// An event whose attempt was cut (the endpoint stopped) goes back before its channel's
    /// parked events; its channel stays busy until `drain`.
    fn put_back(&mut self, q: Queued) {
        self.busy
            .entry(q.event.channel().clone())
            .or_default()
            .push_front(q);
        self.len += 1;
    }

    /// Everything queued (fresh, parked, put back), oldest first: per-channel order holds.
    fn drain(&mut self) -> Vec<Arc<Event>> {
        let mut all: Vec<Queued> = self.fresh.drain(..).collect();
        for (_, lane) in self.busy.drain() {
            all.extend(lane);
        }
        all.sort_unstable_by_key(|q| q.seq);
        self.len = 0;
        all.into_iter().map(|q| q.event).collect()
    }

    fn clear(&mut self) -> usize {
        let n = self.len;
        self.fresh.clear();
        for lane in self.busy.values_mut() {
            lane.clear();
        }
        self.len = 0;
        n
    }
}

pub(super) struct Endpoint {
    pub(super) cfg: WebhookConfig,
    /// The HMAC key every event is signed with (from `keys`).
    secret: Secret,
    client: HttpsClient,
    /// parking_lot: a few pointer moves per event, never across `.await`. Bounded by
    /// `cfg.max_queue`: when full, the oldest event is dropped (and counted), so the hub
    /// never waits.
    queue: Mutex<Queue>,
    /// Woken after an enqueue. An idle slot registers (`enable`) before it looks at the
    /// queue, so an enqueue between its look and its wait still wakes it.
    wake: Notify,
    /// Set by `410 Gone`: nothing more is queued or sent until a reload.
    disabled: AtomicBool,
    last_error: Mutex<Option<(String, SystemTime)>>,
    /// Set when a reload handed this endpoint's queue to a new one: a publish that still holds
    /// the old observer list enqueues there instead of into a queue no task reads any more.
    successor: OnceLock<Weak<Endpoint>>,
    stop: CancellationToken,
    m: EndpointMetrics,
}

enum Attempt {
    Delivered,
    Gone,
    /// Worth retrying: the reason, and a `Retry-After` (429/503 only).
    Failed(String, Option<Duration>),
}

impl Endpoint {
    pub(super) fn new(
        cfg: WebhookConfig,
        secret: Secret,
        metrics: &Metrics,
    ) -> Result<Endpoint, WebhookError> {
        let client = https_client::build(&ClientOptions {
            ca_file: cfg.ca_file.clone(),
            connect_timeout: Some(cfg.timeout),
            // One kept-alive connection per slot (HTTP/1.1 has one request per connection).
            pool_max_idle_per_host: cfg.max_in_flight,
            vet: None, // the operator wrote these URLs
        })
        .map_err(|source| WebhookError::Client {
            name: cfg.name.clone(),
            source,
        })?;
        let outcome = |o: &str| {
            metrics
                .webhook_deliveries
                .with_label_values(&[cfg.name.as_str(), o])
        };
        let m = EndpointMetrics {
            delivered: outcome("delivered"),
            retried: outcome("retried"),
            failed: outcome("failed"),
            dropped: outcome("dropped"),
            disabled: outcome("disabled"),
            depth: metrics
                .webhook_queue_depth
                .with_label_values(&[cfg.name.as_str()]),
            duration: metrics
                .webhook_duration
                .with_label_values(&[cfg.name.as_str()]),
        };
        Ok(Endpoint {
            cfg,
            secret,
            client,
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
            disabled: AtomicBool::new(false),
            last_error: Mutex::new(None),
            successor: OnceLock::new(),
            stop: CancellationToken::new(),
            m,
        })
    }

    /// Called by the hub observer (under a channel's append lock): never blocks or waits.
    pub(super) fn enqueue(&self, e: Arc<Event>) {
        if let Some(next) = self.successor.get().and_then(Weak::upgrade) {
            return next.enqueue(e);
        }
        if self.disabled.load(Ordering::Relaxed) {
            self.m.dropped.inc();
            return;
        }
        let mut q = self.queue.lock();
        if q.len >= self.cfg.max_queue && q.drop_oldest() {
            self.m.dropped.inc();
        }
        q.push_back(e);
        self.m.depth.set(q.len as i64);
        drop(q);
        self.wake.notify_one(); // after unlocking: the woken slot takes the lock at once
    }

    fn take(&self) -> Option<Queued> {
        if self.disabled.load(Ordering::Relaxed) {
            return None;
        }
        let mut q = self.queue.lock();
        let next = q.take();
        self.m.depth.set(q.len as i64);
        next
    }

    fn finish(&self, channel: &Arc<str>) -> Option<Queued> {
        let mut q = self.queue.lock();
        let next = q.finish(channel);
        self.m.depth.set(q.len as i64);
        next
    }

    fn put_back(&self, item: Queued) {
        let mut q = self.queue.lock();
        q.put_back(item);
        self.m.depth.set(q.len as i64);
    }

    /// Puts events (oldest first) back at the front, before anything queued since, trimming to
    /// `max_queue` (oldest dropped). Only before the slots run (a reload's hand-over).
    fn unshift(&self, events: Vec<Arc<Event>>) {
        let mut q = self.queue.lock();
        for event in events.into_iter().rev() {
            q.front_seq -= 1;
            let seq = q.front_seq;
            q.fresh.push_front(Queued { seq, event });
            q.len += 1;
        }
        while q.len > self.cfg.max_queue && q.drop_oldest() {
            self.m.dropped.inc();
        }
        self.m.depth.set(q.len as i64);
    }

    /// Nothing queued and nothing in flight (or disabled: nothing will go out).
    pub(super) fn is_idle(&self) -> bool {
        if self.disabled.load(Ordering::Relaxed) {
            return true;
        }
        let q = self.queue.lock();
        q.len == 0 && q.busy.is_empty()
    }

    fn set_error(&self, e: String) {
        *self.last_error.lock() = Some((e, SystemTime::now()));
    }

    pub(super) fn status(&self) -> serde_json::Value {
        let state = if self.disabled.load(Ordering::Relaxed) {
            "disabled"
        } else if self.stop.is_cancelled() {
            "stopped"
        } else {
            "active"
        };
        let last = self.last_error.lock().clone();
        let (queued, in_flight) = {
            let q = self.queue.lock();
            (q.len, q.busy.len())
        };
        serde_json::json!({
            "name": self.cfg.name,
            "url": self.cfg.url.to_string(),
            "state": state,
            "queue_depth": queued,
            "in_flight": in_flight,
            "delivered": self.m.delivered.get(),
            "retried": self.m.retried.get(),
            "failed": self.m.failed.get(),
            "dropped": self.m.dropped.get(),
            "last_error": last.as_ref().map(|(e, _)| e.as_str()),
            "last_error_at": last.map(|(_, t)| sign::rfc3339(t)),
        })
    }

    /// One delivery slot: one event at a time until stopped; after an event, the next parked
    /// event of the same channel, if any. An event in flight when the endpoint is stopped goes
    /// back to the queue, ahead of its channel's others.
    async fn slot(self: Arc<Self>) {
        let mut next: Option<Queued> = None;
        loop {
            let item = match next.take() {
                Some(item) => item,
                None => {
                    let notified = self.wake.notified();
                    tokio::pin!(notified);
                    notified.as_mut().enable();
                    match self.take() {
                        Some(item) => item,
                        None => {
                            tokio::select! {
                                _ = notified => continue,
                                _ = self.stop.cancelled() => return,
                            }
                        }
                    }
                }
            };
            let done = tokio::select! {
                biased; // once stopped, no new attempt starts
                _ = self.stop.cancelled() => false,
                _ = self.deliver(&item.event) => true,
            };
            if !done {
                self.put_back(item);
                return;
            }
            next = self.finish(item.event.channel());
        }
    }

    /// Every attempt the schedule allows, until one succeeds.
    async fn deliver(&self, event: &Event) {
        let body = event.body().clone();
        let mut delays = self.cfg.retry.iter();
        loop {
            let started = Instant::now();
            let result = self.attempt(event, body.clone()).await;
            self.m.duration.observe(started.elapsed().as_secs_f64());
            let (reason, retry_after) = match result {
                Attempt::Delivered => {
                    self.m.delivered.inc();
                    return;
                }
                Attempt::Gone => {
                    self.disable();
                    return;
                }
                Attempt::Failed(reason, retry_after) => (reason, retry_after),
            };
            self.set_error(reason.clone());
            let Some(delay) = delays.next() else {
                self.m.failed.inc();
                tracing::warn!(
                    webhook = %self.cfg.name,
                    "webhook event {} given up after {} attempts: {reason}",
                    event.id,
                    self.cfg.retry.len() + 1
                );
                return;
            };
            self.m.retried.inc();
            let wait = retry_after.map_or(*delay, |ra| ra.min(MAX_RETRY_AFTER).max(*delay));
            tracing::debug!(webhook = %self.cfg.name, "{reason}; retrying in {wait:?}");
            tokio::time::sleep(wait).await;
        }
    }

    /// `410 Gone`: the receiver wants no more. Everything queued is dropped (and counted).
    /// Other slots' attempts already under way finish; only the first 410 counts.
    fn disable(&self) {
        if self.disabled.swap(true, Ordering::Relaxed) {
            return;
        }
        self.m.disabled.inc();
        let dropped = {
            let mut q = self.queue.lock();
            let n = q.clear();
            self.m.depth.set(0);
            n
        };
        self.m.dropped.inc_by(dropped as u64);
        self.set_error("410 Gone: disabled until the config is reloaded".into());
        tracing::warn!(
            webhook = %self.cfg.name,
            "webhook answered 410 Gone: disabled until reload ({dropped} queued event(s) dropped)"
        );
    }

    async fn attempt(&self, event: &Event, body: Bytes) -> Attempt {
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let signature = sign::sign_standard(&self.secret.0, &event.id, timestamp, &body);
        let req = Request::builder()
            .method(Method::POST)
            .uri(self.cfg.url.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(
                header::USER_AGENT,
                concat!("crier/", env!("CARGO_PKG_VERSION")),
            )
            .header("webhook-id", event.id.as_str())
            .header("webhook-timestamp", timestamp)
            .header("webhook-signature", signature)
            .body(Full::new(body));
        let req = match req {
            Ok(r) => r,
            Err(e) => return Attempt::Failed(format!("cannot build the request: {e}"), None),
        };
        let exchange = async {
            let resp = self.client.request(req).await?;
            let status = resp.status();
            let retry_after = match status {
                StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => resp
                    .headers()
                    .get(header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_retry_after),
                _ => None,
            };
            // Read (a bounded amount of) the body so the connection goes back to the pool.
            let _ = Limited::new(resp.into_body(), MAX_RESPONSE_BODY)
                .collect()
                .await;
            Ok::<_, hyper_util::client::legacy::Error>((status, retry_after))
        };
        match tokio::time::timeout(self.cfg.timeout, exchange).await {
            Err(_) => Attempt::Failed(format!("timed out after {:?}", self.cfg.timeout), None),
            Ok(Err(e)) => Attempt::Failed(format!("request failed: {}", error_chain(&e)), None),
            Ok(Ok((s, _))) if s.is_success() => Attempt::Delivered,
            Ok(Ok((StatusCode::GONE, _))) => Attempt::Gone,
            Ok(Ok((s, ra))) => Attempt::Failed(format!("answered {s}"), ra),
        }
    }
}

/// An endpoint and the task that runs its delivery slots.
pub(super) struct Running {
    pub(super) endpoint: Arc<Endpoint>,
    task: JoinHandle<()>,
}

impl Running {
    /// Spawns the delivery slots. With a predecessor (same name, previous config) it first
    /// stops that one and takes its undelivered events, so order holds across a reload.
    pub(super) fn start(endpoint: Arc<Endpoint>, predecessor: Option<Running>) -> Running {
        let ep = endpoint.clone();
        let task = tokio::spawn(async move {
            if let Some(old) = predecessor {
                let _ = old.endpoint.successor.set(Arc::downgrade(&ep));
                old.endpoint.stop.cancel();
                let _ = old.task.await;
                let events = old.endpoint.queue.lock().drain();
                old.endpoint.m.depth.set(0);
                ep.unshift(events);
            }
            let mut slots = JoinSet::new();
            for _ in 0..ep.cfg.max_in_flight {
                slots.spawn(ep.clone().slot());
            }
            while slots.join_next().await.is_some() {}
        });
        Running { endpoint, task }
    }

    /// Tells the task to stop, without waiting for it.
    pub(super) fn cancel(&self) {
        self.endpoint.stop.cancel();
    }

    /// Stops the slots (events in flight go back to the queue); returns what was left.
    pub(super) async fn stop(self) -> usize {
        self.endpoint.stop.cancel();
        let _ = self.task.await;
        if self.endpoint.disabled.load(Ordering::Relaxed) {
            return 0;
        }
        self.endpoint.queue.lock().len
    }

    /// A reload removed this endpoint: stop it in the background and log what it still held.
    pub(super) fn retire(self, metrics: Arc<Metrics>) {
        tokio::spawn(async move {
            let name = self.endpoint.cfg.name.clone();
            let left = self.stop().await;
            if left > 0 {
                tracing::warn!("webhook {name:?} removed by reload: {left} event(s) not delivered");
            }
            for outcome in ["delivered", "retried", "failed", "dropped", "disabled"] {
                let _ = metrics
                    .webhook_deliveries
                    .remove_label_values(&[name.as_str(), outcome]);
            }
            let _ = metrics.webhook_queue_depth.remove_label_values(&[&name]);
            let _ = metrics.webhook_duration.remove_label_values(&[&name]);
        });
    }
}
