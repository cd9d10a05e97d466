//! One webhook endpoint: its bounded queue and the task that delivers it, one event at a time
//! (so the endpoint sees publish order), retrying on the configured schedule.

use std::collections::VecDeque;
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
use tokio::task::JoinHandle;
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

pub(super) struct Endpoint {
    pub(super) cfg: WebhookConfig,
    /// The HMAC key every event is signed with (from `keys`).
    secret: Secret,
    client: HttpsClient,
    /// parking_lot: push/pop only, never across `.await`. Bounded by `cfg.max_queue`: when
    /// full, the oldest event is dropped (and counted), so the hub never waits.
    queue: Mutex<VecDeque<Arc<Event>>>,
    /// Woken after an enqueue; a permit is kept when the task is busy, so no wake-up is lost.
    wake: Notify,
    /// Set by `410 Gone`: nothing more is queued or sent until a reload.
    disabled: AtomicBool,
    /// An event is being delivered (taken off the queue, not yet done).
    busy: AtomicBool,
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
            pool_max_idle_per_host: 4,
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
            queue: Mutex::new(VecDeque::new()),
            wake: Notify::new(),
            disabled: AtomicBool::new(false),
            busy: AtomicBool::new(false),
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
        if q.len() >= self.cfg.max_queue {
            q.pop_front();
            self.m.dropped.inc();
        }
        q.push_back(e);
        self.m.depth.set(q.len() as i64);
        drop(q);
        self.wake.notify_one(); // after unlocking: the woken task takes the lock at once
    }

    fn pop(&self) -> Option<Arc<Event>> {
        let mut q = self.queue.lock();
        let e = q.pop_front();
        if e.is_some() {
            self.busy.store(true, Ordering::SeqCst);
        }
        self.m.depth.set(q.len() as i64);
        e
    }

    /// Puts events back at the front, oldest first, trimming to `max_queue` (oldest dropped).
    fn unshift(&self, events: impl DoubleEndedIterator<Item = Arc<Event>>) {
        let mut q = self.queue.lock();
        for e in events.rev() {
            q.push_front(e);
        }
        while q.len() > self.cfg.max_queue {
            q.pop_front();
            self.m.dropped.inc();
        }
        self.m.depth.set(q.len() as i64);
        drop(q);
        self.wake.notify_one();
    }

    /// Nothing queued and nothing in flight (or disabled: nothing will go out).
    pub(super) fn is_idle(&self) -> bool {
        self.disabled.load(Ordering::Relaxed)
            || (!self.busy.load(Ordering::SeqCst) && self.queue.lock().is_empty())
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
        serde_json::json!({
            "name": self.cfg.name,
            "url": self.cfg.url.to_string(),
            "state": state,
            "queue_depth": self.queue.lock().len(),
            "in_flight": self.busy.load(Ordering::Relaxed),
            "delivered": self.m.delivered.get(),
            "retried": self.m.retried.get(),
            "failed": self.m.failed.get(),
            "dropped": self.m.dropped.get(),
            "last_error": last.as_ref().map(|(e, _)| e.as_str()),
            "last_error_at": last.map(|(_, t)| sign::rfc3339(t)),
        })
    }

    /// The delivery loop: one event at a time, in queue order, until stopped. An event in
    /// flight when the endpoint is stopped goes back to the front of the queue.
    async fn run(self: Arc<Self>) {
        loop {
            let Some(event) = self.pop() else {
                tokio::select! {
                    _ = self.wake.notified() => continue,
                    _ = self.stop.cancelled() => return,
                }
            };
            let done = tokio::select! {
                _ = self.deliver(&event) => true,
                _ = self.stop.cancelled() => false,
            };
            if !done {
                self.unshift(std::iter::once(event));
            }
            self.busy.store(false, Ordering::SeqCst);
            if !done {
                return;
            }
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
    fn disable(&self) {
        self.disabled.store(true, Ordering::Relaxed);
        self.m.disabled.inc();
        let dropped = {
            let mut q = self.queue.lock();
            let n = q.len();
            q.clear();
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

/// An endpoint and its delivery task.
pub(super) struct Running {
    pub(super) endpoint: Arc<Endpoint>,
    task: JoinHandle<()>,
}

impl Running {
    /// Spawns the delivery task. With a predecessor (same name, previous config) the task
    /// first stops it and takes its undelivered events, so order holds across a reload.
    pub(super) fn start(endpoint: Arc<Endpoint>, predecessor: Option<Running>) -> Running {
        let ep = endpoint.clone();
        let task = tokio::spawn(async move {
            if let Some(old) = predecessor {
                let _ = old.endpoint.successor.set(Arc::downgrade(&ep));
                old.endpoint.stop.cancel();
                let _ = old.task.await;
                let events: Vec<_> = old.endpoint.queue.lock().drain(..).collect();
                old.endpoint.m.depth.set(0);
                ep.unshift(events.into_iter());
            }
            ep.run().await;
        });
        Running { endpoint, task }
    }

    /// Tells the task to stop, without waiting for it.
    pub(super) fn cancel(&self) {
        self.endpoint.stop.cancel();
    }

    /// Stops the task (an event in flight goes back to the queue); returns what was left.
    pub(super) async fn stop(self) -> usize {
        self.endpoint.stop.cancel();
        let _ = self.task.await;
        if self.endpoint.disabled.load(Ordering::Relaxed) {
            return 0;
        }
        self.endpoint.queue.lock().len()
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
