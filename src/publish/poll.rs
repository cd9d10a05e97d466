//! `[[poll]]`: crier polls an upstream URL for the app's browsers and publishes its answer
//! when it changed, so 10,000 subscribers cost the app one request per interval.
//!
//! One task per poll, which does one request at a time (a poll is never in flight twice):
//! GET with `If-None-Match` / `If-Modified-Since` when the app gave `ETag` / `Last-Modified`;
//! a 304 or the same body is no change; the first answer and every change are published
//! through the hub like any publish. "Changed" is the ETag when both answers carry one, else
//! a SHA-256 of the body. Errors (refused, timed out, a status other than 2xx/304, a body
//! over `max_message_size`) publish nothing, are counted, back the poll off, and log one line
//! when the poll starts or stops failing, never one per attempt.
//!
//! With `only_while_subscribed` (the default) a poll runs while its channel has subscribers
//! on this node and for `linger` after the last left; the first subscriber wakes it at once
//! (a hub observer). Polls are per node: with several nodes each polls (see the README).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use parking_lot::Mutex;
use prometheus::IntCounter;
use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, PollConfig, UpstreamAddr, UpstreamConfig};
use crate::hub::{Hub, HubObserver, NewMessage, SubscriberEvent};
use crate::metrics::Metrics;
use crate::model::ConnInfo;
use crate::proxy::{add_forwarded_headers, upstream_client, UpstreamConnector};

/// The polls of the running config.
pub struct Polls {
    hub: Hub,
    metrics: Arc<Metrics>,
    /// parking_lot: touched at start, reload and shutdown only, never across `.await`.
    running: Mutex<Vec<Running>>,
}

struct Running {
    cfg: PollConfig,
    upstream: UpstreamConfig,
    max: usize,
    cancel: CancellationToken,
    wake: Arc<Notify>,
}

impl Polls {
    pub fn new(hub: Hub, metrics: Arc<Metrics>) -> Polls {
        Polls {
            hub,
            metrics,
            running: Mutex::new(Vec::new()),
        }
    }

    /// Runs the polls `config` asks for: a poll whose settings (and upstream) did not change
    /// keeps running with what it knows (no republish); the others stop or start.
    pub fn apply(&self, config: &Config) {
        let max = config.channels.max_message_size;
        let mut running = self.running.lock();
        running.retain(|r| {
            let keep =
                r.upstream == config.upstream && r.max == max && config.polls.contains(&r.cfg);
            if !keep {
                r.cancel.cancel();
            }
            keep
        });
        for cfg in &config.polls {
            if running.iter().any(|r| r.cfg == *cfg) {
                continue;
            }
            let r = Running {
                cfg: cfg.clone(),
                upstream: config.upstream.clone(),
                max,
                cancel: CancellationToken::new(),
                wake: Arc::new(Notify::new()),
            };
            let job = Job::new(&r, &self.hub, &self.metrics);
            tokio::spawn(job.run());
            running.push(r);
        }
        let mut wakers: HashMap<Arc<str>, Vec<Arc<Notify>>> = HashMap::new();
        for r in running.iter().filter(|r| r.cfg.only_while_subscribed) {
            wakers
                .entry(r.cfg.channel.as_arc().clone())
                .or_default()
                .push(r.wake.clone());
        }
        let observer =
            (!wakers.is_empty()).then(|| Arc::new(Wakers(wakers)) as Arc<dyn HubObserver>);
        self.hub.set_observer("poll", observer);
    }

    /// Stops every poll (shutdown).
    pub fn stop(&self) {
        for r in self.running.lock().drain(..) {
            r.cancel.cancel();
        }
        self.hub.set_observer("poll", None);
    }
}

/// Wakes a paused poll when its channel gets a subscriber.
struct Wakers(HashMap<Arc<str>, Vec<Arc<Notify>>>);

impl HubObserver for Wakers {
    fn subscribed(&self, e: &SubscriberEvent<'_>) {
        if let Some(list) = self.0.get(e.channel) {
            for n in list {
                n.notify_one();
            }
        }
    }
}

/// `crier_poll_total{poll, result}`, resolved once per poll.
struct Counts {
    changed: IntCounter,
    unchanged: IntCounter,
    not_modified: IntCounter,
    status: IntCounter,
    error: IntCounter,
    timeout: IntCounter,
    too_large: IntCounter,
    failed: IntCounter,
}

/// One poll's task and what it knows of the last answer.
struct Job {
    cfg: PollConfig,
    client: Client<UpstreamConnector, Empty<Bytes>>,
    base: String,
    host: HeaderValue,
    max: usize,
    hub: Hub,
    counts: Counts,
    cancel: CancellationToken,
    wake: Arc<Notify>,
    etag: Option<HeaderValue>,
    last_modified: Option<HeaderValue>,
    hash: Option<[u8; 32]>,
    /// The failure being reported, so each change of state is logged once.
    failing: Option<&'static str>,
}

/// How one poll ended.
enum Outcome {
    Changed,
    Unchanged,
    NotModified,
    Failed(&'static str, String),
}

impl Job {
    fn new(r: &Running, hub: &Hub, metrics: &Metrics) -> Job {
        let (client, base) = upstream_client(&r.upstream);
        let host = match &r.upstream.url {
            UpstreamAddr::Http { authority } => HeaderValue::from_str(authority).ok(),
            UpstreamAddr::Unix(_) => None,
        }
        .unwrap_or(HeaderValue::from_static("localhost"));
        let c = |result: &str| metrics.polls.with_label_values(&[&r.cfg.name, result]);
        Job {
            cfg: r.cfg.clone(),
            client,
            base,
            host,
            max: r.max,
            hub: hub.clone(),
            counts: Counts {
                changed: c("changed"),
                unchanged: c("unchanged"),
                not_modified: c("not_modified"),
                status: c("status"),
                error: c("error"),
                timeout: c("timeout"),
                too_large: c("too_large"),
                failed: c("failed"),
            },
            cancel: r.cancel.clone(),
            wake: r.wake.clone(),
            etag: None,
            last_modified: None,
            hash: None,
            failing: None,
        }
    }

    async fn run(mut self) {
        // When this node last saw a subscriber on the channel (or was woken by one).
        let mut seen: Option<Instant> = None;
        let mut errors: u32 = 0;
        loop {
            if self.cfg.only_while_subscribed {
                let now = Instant::now();
                let subs = self
                    .hub
                    .get(self.cfg.channel.as_str())
                    .map_or(0, |c| c.subscriber_count());
                if subs > 0 {
                    seen = Some(now);
                }
                if seen.is_none_or(|t| now.duration_since(t) >= self.cfg.linger) {
                    tokio::select! {
                        _ = self.wake.notified() => seen = Some(Instant::now()),
                        _ = self.cancel.cancelled() => return,
                    }
                    continue;
                }
            }
            let cancel = self.cancel.clone();
            let outcome = tokio::select! {
                o = self.poll_once() => o,
                _ = cancel.cancelled() => return,
            };
            let wait = match outcome {
                Outcome::Failed(kind, reason) => {
                    errors = errors.saturating_add(1);
                    if self.failing != Some(kind) {
                        tracing::warn!(
                            "poll {:?}: {} {}: {reason}; retrying with backoff",
                            self.cfg.name,
                            self.cfg.url,
                            kind
                        );
                        self.failing = Some(kind);
                    }
                    backoff(self.cfg.interval, errors)
                }
                _ => {
                    errors = 0;
                    if self.failing.take().is_some() {
                        tracing::info!("poll {:?}: {} answers again", self.cfg.name, self.cfg.url);
                    }
                    self.cfg.interval
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.cancel.cancelled() => return,
            }
        }
    }

    async fn poll_once(&mut self) -> Outcome {
        let outcome = match tokio::time::timeout(self.cfg.timeout, self.fetch()).await {
            Ok(o) => o,
            Err(_) => Outcome::Failed(
                "timeout",
                format!("no whole answer within {:?}", self.cfg.timeout),
            ),
        };
        match &outcome {
            Outcome::Changed => self.counts.changed.inc(),
            Outcome::Unchanged => self.counts.unchanged.inc(),
            Outcome::NotModified => self.counts.not_modified.inc(),
            Outcome::Failed(kind, _) => match *kind {
                "status" => self.counts.status.inc(),
                "timeout" => self.counts.timeout.inc(),
                "too_large" => self.counts.too_large.inc(),
                "failed" => self.counts.failed.inc(),
                _ => self.counts.error.inc(),
            },
        }
        outcome
    }

    fn request(&self) -> Result<Request<Empty<Bytes>>, String> {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, self.host.clone());
        for (k, v) in &self.cfg.headers.0 {
            h.insert(k.clone(), v.clone());
        }
        // The same rules as a proxied request, crier itself being the client (loopback).
        let me = ConnInfo {
            peer: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            tls: false,
        };
        add_forwarded_headers(&mut h, &me);
        // What the config sets explicitly wins (e.g. X-Forwarded-Proto: https).
        for (k, v) in &self.cfg.headers.0 {
            if k.as_str().starts_with("x-forwarded-") {
                h.insert(k.clone(), v.clone());
            }
        }
        if let Some(e) = &self.etag {
            h.insert(header::IF_NONE_MATCH, e.clone());
        }
        if let Some(m) = &self.last_modified {
            h.insert(header::IF_MODIFIED_SINCE, m.clone());
        }
        let mut req = Request::get(format!("{}{}", self.base, self.cfg.url))
            .body(Empty::new())
            .map_err(|e| e.to_string())?;
        *req.headers_mut() = h;
        Ok(req)
    }

    async fn fetch(&mut self) -> Outcome {
        let req = match self.request() {
            Ok(r) => r,
            Err(e) => return Outcome::Failed("error", e),
        };
        let resp = match self.client.request(req).await {
            Ok(r) => r,
            Err(e) => return Outcome::Failed("error", format!("upstream unreachable ({e})")),
        };
        let status = resp.status();
        if status == StatusCode::NOT_MODIFIED {
            return Outcome::NotModified;
        }
        if !status.is_success() {
            return Outcome::Failed("status", format!("answered {status}"));
        }
        let (parts, body) = resp.into_parts();
        let body = match Limited::new(body, self.max).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return Outcome::Failed(
                    "too_large",
                    format!("body over channels.max_message_size ({} bytes)", self.max),
                )
            }
            Err(e) => return Outcome::Failed("error", format!("body cut short ({e})")),
        };
        let etag = parts.headers.get(header::ETAG).cloned();
        let hash: [u8; 32] = Sha256::digest(&body).into();
        let changed = match (&self.etag, &etag) {
            (Some(old), Some(new)) => old != new,
            _ => self.hash != Some(hash),
        };
        if !changed {
            return Outcome::Unchanged;
        }
        let msg = NewMessage {
            event: self.cfg.event.clone().map(Into::into),
            content_type: parts
                .headers
                .get(header::CONTENT_TYPE)
                .cloned()
                .unwrap_or(HeaderValue::from_static("application/octet-stream")),
            body,
            headers: HeaderMap::new(),
        };
        if let Err(e) = self.hub.publish(&self.cfg.channel, msg).await {
            // Not remembered as seen: the next poll tries to publish it again.
            return Outcome::Failed(
                "failed",
                format!("publish to {} failed: {e}", self.cfg.channel),
            );
        }
        self.etag = etag;
        self.last_modified = parts.headers.get(header::LAST_MODIFIED).cloned();
        self.hash = Some(hash);
        Outcome::Changed
    }
}

/// After `errors` failures in a row: the interval doubled each time, up to a minute (or the
/// interval, when that is longer).
fn backoff(interval: Duration, errors: u32) -> Duration {
    let cap = interval.max(Duration::from_secs(60));
    interval
        .checked_mul(1 << errors.min(16))
        .map_or(cap, |d| d.min(cap))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_a_cap() {
        let s = Duration::from_secs;
        assert_eq!(backoff(s(2), 1), s(4));
        assert_eq!(backoff(s(2), 3), s(16));
        assert_eq!(backoff(s(2), 10), s(60));
        assert_eq!(backoff(s(120), 5), s(120));
    }
}
