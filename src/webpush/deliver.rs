//! Delivery: the hub observer enqueues each message of a channel that has Web Push
//! subscriptions (never blocking the publisher); one dispatcher builds the payload once per
//! message and hands one delivery per subscription to the queue of its push service; each
//! service's worker runs at most [`PER_SERVICE_CONCURRENCY`] requests at a time, so a slow
//! service fills only its own queue and never slows another.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, StatusCode};
use http_body_util::Full;
use tokio::sync::{mpsc, Semaphore};

use super::{crypto, Failure, Inner, Outcome};
use crate::https_client::{error_chain, parse_retry_after};
use crate::hub::{HubObserver, Message, Published};
use crate::webpush::store::WebPushSubscription;

/// Requests in flight to one push service.
pub(super) const PER_SERVICE_CONCURRENCY: usize = 16;
/// Deliveries waiting for one push service (not yet started); past it a message's deliveries
/// to that service are dropped (counted). 2M Arc'd subscriptions: about 16 MB of pointers.
const MAX_WAITING_PER_SERVICE: usize = 2_000_000;
/// Attempts per delivery (the first and the retries after 429, 5xx or a network error).
const MAX_ATTEMPTS: u32 = 4;
/// First backoff when the service gives no Retry-After; doubles per attempt.
const BACKOFF: Duration = Duration::from_secs(1);
/// The longest wait before a retry, whatever Retry-After says: past it the delivery fails.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(60);
/// One request's whole exchange with the push service.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Publish headers that set a message's Web Push options.
pub const TTL_HEADER: &str = "crier-ttl";
pub const URGENCY_HEADER: &str = "crier-urgency";
pub const TOPIC_HEADER: &str = "crier-topic";

/// A message of a channel with Web Push subscriptions, as the observer took it.
pub(super) struct Job {
    channel: Arc<str>,
    message: Arc<Message>,
    options: PushOptions,
}

/// `TTL`, `Urgency`, `Topic` of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushOptions {
    pub ttl: u64,
    pub urgency: &'static str,
    pub topic: Option<HeaderValue>,
}

impl PushOptions {
    /// From the publish request's headers; a value crier cannot use is ignored (with a warning:
    /// the message itself was already accepted) and the default applies.
    pub fn from_headers(h: &HeaderMap, default_ttl: Duration) -> PushOptions {
        let ttl = match h.get(TTL_HEADER).and_then(|v| v.to_str().ok()) {
            None => default_ttl.as_secs(),
            Some(v) => match v
                .trim()
                .parse::<u64>()
                .ok()
                .or_else(|| crate::config::parse_duration(v).ok().map(|d| d.as_secs()))
            {
                Some(s) => s.min(28 * 86400),
                None => {
                    tracing::warn!(
                        value = v,
                        "Crier-TTL is not seconds or a duration; using webpush.ttl"
                    );
                    default_ttl.as_secs()
                }
            },
        };
        let urgency = match h.get(URGENCY_HEADER).and_then(|v| v.to_str().ok()) {
            None => "normal",
            Some(v) => match v.trim().to_ascii_lowercase().as_str() {
                "very-low" => "very-low",
                "low" => "low",
                "normal" => "normal",
                "high" => "high",
                _ => {
                    tracing::warn!(
                        value = v,
                        "Crier-Urgency is not very-low, low, normal or high; using normal"
                    );
                    "normal"
                }
            },
        };
        // RFC 8030 section 5.4: at most 32 characters of the base64url alphabet.
        let topic = h.get(TOPIC_HEADER).and_then(|v| {
            let ok = !v.is_empty()
                && v.len() <= 32
                && v.as_bytes()
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_');
            if !ok {
                tracing::warn!(
                    "Crier-Topic is not 1 to 32 base64url characters; sent without a Topic"
                );
            }
            ok.then(|| v.clone())
        });
        PushOptions {
            ttl,
            urgency,
            topic,
        }
    }
}

pub(super) struct Delivery {
    sub: Arc<WebPushSubscription>,
    payload: Bytes,
    options: PushOptions,
    pause: Arc<Pause>,
}

/// A push service's "not before": set by a 429 with Retry-After, so the service's worker
/// starts no new request until then (a rate limit is the sender's, not one subscription's).
#[derive(Default)]
pub(super) struct Pause(parking_lot::Mutex<Option<tokio::time::Instant>>);

impl Pause {
    fn until(&self, t: tokio::time::Instant) {
        let mut p = self.0.lock();
        if p.is_none_or(|cur| cur < t) {
            *p = Some(t);
        }
    }

    fn get(&self) -> Option<tokio::time::Instant> {
        let p = *self.0.lock();
        p.filter(|t| *t > tokio::time::Instant::now())
    }
}

/// The hub's view of Web Push: enqueue, never block.
pub(super) struct Observer(pub(super) Arc<Inner>);

impl HubObserver for Observer {
    fn message(&self, m: &Published<'_>) {
        let inner = &self.0;
        if !inner.store.has_channel(m.channel) {
            return;
        }
        let job = Job {
            channel: m.channel.into(),
            message: m.message.clone(),
            options: PushOptions::from_headers(m.headers, inner.settings().ttl),
        };
        if inner.jobs.try_send(job).is_err() {
            let n = inner.store.count(m.channel) as u64;
            inner.metrics.outcome(Outcome::Dropped, n);
            tracing::warn!(
                channel = m.channel,
                "web push queue full; message not pushed"
            );
        }
    }
}

/// `{"channel","id","event","data"}` (binary bodies as `data_b64`); when that would not fit
/// in one push message, the same without the data and with `"truncated": true`, so the
/// service worker fetches the message by id.
pub fn payload(channel: &str, m: &Message) -> Vec<u8> {
    let mut v = crate::push::envelope::fields(m);
    v.insert("channel".into(), channel.into());
    let full = serde_json::to_vec(&v).unwrap_or_default();
    if full.len() <= crypto::MAX_PLAINTEXT {
        return full;
    }
    v.remove("data");
    v.remove("data_b64");
    v.insert("truncated".into(), true.into());
    serde_json::to_vec(&v).unwrap_or_default()
}

/// Fans each message out to its channel's subscriptions, once per message.
pub(super) async fn dispatch(inner: Arc<Inner>, mut jobs: mpsc::Receiver<Job>) {
    loop {
        let job = tokio::select! {
            _ = inner.stop.cancelled() => return,
            j = jobs.recv() => match j { Some(j) => j, None => return },
        };
        let subs = inner.store.of_channel(&job.channel);
        if subs.is_empty() {
            continue;
        }
        let payload = Bytes::from(payload(&job.channel, &job.message));
        let mut by_service: HashMap<&str, Vec<Arc<WebPushSubscription>>> = HashMap::new();
        for sub in &subs {
            by_service
                .entry(sub.origin.as_str())
                .or_default()
                .push(sub.clone());
        }
        for (origin, subs) in by_service {
            enqueue(
                &inner,
                origin,
                ServiceJob {
                    subs,
                    payload: payload.clone(),
                    options: job.options.clone(),
                },
            );
        }
    }
}

/// One message for the subscriptions of one push service.
pub(super) struct ServiceJob {
    subs: Vec<Arc<WebPushSubscription>>,
    payload: Bytes,
    options: PushOptions,
}

/// A push service's queue: jobs, and the deliveries they hold that have not started yet.
pub(super) struct ServiceQueue {
    tx: mpsc::UnboundedSender<ServiceJob>,
    waiting: Arc<AtomicUsize>,
}

/// Whether `n` more deliveries fit behind `waiting` ones; counts them in if so.
fn admit(waiting: &AtomicUsize, n: usize, max: usize) -> bool {
    waiting
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
            (w + n <= max).then_some(w + n)
        })
        .is_ok()
}

fn enqueue(inner: &Arc<Inner>, origin: &str, job: ServiceJob) {
    let (tx, waiting) = {
        let mut services = inner.services.lock();
        let q = services.entry(origin.to_string()).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            let waiting = Arc::new(AtomicUsize::new(0));
            tokio::spawn(service(inner.clone(), rx, waiting.clone()));
            ServiceQueue { tx, waiting }
        });
        (q.tx.clone(), q.waiting.clone())
    };
    let n = job.subs.len();
    // The queue is bounded by deliveries, not jobs: one message to a million subscribers of
    // one service weighs what it holds.
    if !admit(&waiting, n, MAX_WAITING_PER_SERVICE) {
        drop_job(inner, &job, "push service queue full");
        return;
    }
    if let Err(e) = tx.send(job) {
        waiting.fetch_sub(n, Ordering::AcqRel);
        drop_job(inner, &e.0, "push service worker stopped");
    }
}

fn drop_job(inner: &Inner, job: &ServiceJob, why: &str) {
    inner
        .metrics
        .outcome(Outcome::Dropped, job.subs.len() as u64);
    if let Some(sub) = job.subs.first() {
        fail(
            inner,
            sub,
            Outcome::Dropped,
            None,
            format!("{why}: {} deliveries dropped", job.subs.len()),
        );
    }
    tracing::warn!(
        deliveries = job.subs.len(),
        "web push: {why}; deliveries dropped"
    );
}

/// One push service's worker: its jobs in order, up to [`PER_SERVICE_CONCURRENCY`]
/// deliveries in flight.
async fn service(
    inner: Arc<Inner>,
    mut rx: mpsc::UnboundedReceiver<ServiceJob>,
    waiting: Arc<AtomicUsize>,
) {
    let limit = Arc::new(Semaphore::new(PER_SERVICE_CONCURRENCY));
    let pause = Arc::new(Pause::default());
    loop {
        let job = tokio::select! {
            _ = inner.stop.cancelled() => return,
            j = rx.recv() => match j { Some(j) => j, None => return },
        };
        for sub in job.subs {
            let permit = tokio::select! {
                _ = inner.stop.cancelled() => return,
                p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            };
            if let Some(t) = pause.get() {
                tokio::select! {
                    _ = inner.stop.cancelled() => return,
                    _ = tokio::time::sleep_until(t) => {}
                }
            }
            waiting.fetch_sub(1, Ordering::AcqRel);
            let d = Delivery {
                sub,
                payload: job.payload.clone(),
                options: job.options.clone(),
                pause: pause.clone(),
            };
            let inner = inner.clone();
            tokio::spawn(async move {
                let stop = inner.stop.clone();
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = deliver(&inner, d) => {}
                }
                drop(permit);
            });
        }
    }
}

/// What one request got.
enum Answer {
    Status(StatusCode, Option<Duration>),
    Error(String),
    /// The address policy refuses the endpoint (webpush.allow_addresses, push_ports): trying
    /// again cannot help until the config changes.
    Refused(String),
}

async fn deliver(inner: &Arc<Inner>, d: Delivery) {
    // Unsubscribed (or gone) since the message was fanned out: nothing to do.
    if !inner.store.contains(&d.sub.channel, &d.sub.endpoint) {
        return;
    }
    let started = Instant::now();
    let body = match crypto::encrypt(&d.payload, &d.sub.keys) {
        Ok(b) => Bytes::from(b),
        Err(e) => {
            inner.metrics.outcome(Outcome::Failed, 1);
            fail(inner, &d.sub, Outcome::Failed, None, e.to_string());
            return;
        }
    };
    let mut attempt = 1;
    let outcome = loop {
        let answer = send(inner, &d, body.clone()).await;
        let (retry_after, status, reason) = match answer {
            Answer::Status(s, _) if s.is_success() => {
                break (Outcome::Delivered, Some(s), String::new())
            }
            Answer::Status(s @ (StatusCode::NOT_FOUND | StatusCode::GONE), _) => {
                remove_gone(inner, &d.sub).await;
                break (
                    Outcome::Gone,
                    Some(s),
                    "subscription expired or unsubscribed".into(),
                );
            }
            Answer::Status(s @ StatusCode::PAYLOAD_TOO_LARGE, _) => {
                tracing::warn!(service = %d.sub.origin, bytes = body.len(), "push service answered 413: payload too large");
                break (
                    Outcome::TooLarge,
                    Some(s),
                    format!("{} bytes refused", body.len()),
                );
            }
            Answer::Status(s, ra) if s == StatusCode::TOO_MANY_REQUESTS || s.is_server_error() => {
                if let (StatusCode::TOO_MANY_REQUESTS, Some(wait)) = (s, ra) {
                    d.pause
                        .until(tokio::time::Instant::now() + wait.min(MAX_RETRY_WAIT));
                }
                (ra, Some(s), format!("push service answered {s}"))
            }
            Answer::Status(s, _) => {
                tracing::warn!(service = %d.sub.origin, status = %s, "push service refused a message");
                break (
                    Outcome::Rejected,
                    Some(s),
                    format!("push service answered {s}"),
                );
            }
            Answer::Error(e) => (None, None, e),
            Answer::Refused(e) => {
                tracing::warn!(service = %d.sub.origin, "web push: {e}");
                break (Outcome::Failed, None, e);
            }
        };
        let wait = retry_after.unwrap_or(BACKOFF * 2u32.pow(attempt - 1));
        if attempt >= MAX_ATTEMPTS || wait > MAX_RETRY_WAIT {
            break (Outcome::Failed, status, reason);
        }
        attempt += 1;
        inner.metrics.retries.inc();
        tracing::debug!(service = %d.sub.origin, ?wait, %reason, "web push: retrying");
        tokio::time::sleep(wait).await;
    };
    let (outcome, status, reason) = outcome;
    inner
        .metrics
        .duration
        .observe(started.elapsed().as_secs_f64());
    inner.metrics.outcome(outcome, 1);
    if outcome != Outcome::Delivered {
        fail(inner, &d.sub, outcome, status, reason);
    }
}

async fn send(inner: &Inner, d: &Delivery, body: Bytes) -> Answer {
    let auth = match inner.settings().vapid.authorization(&d.sub.origin) {
        Ok(a) => a,
        Err(e) => return Answer::Error(e.to_string()),
    };
    // Subscriptions stored under an older config are held to today's rules; names are
    // vetted by the client's resolver when it connects.
    if let Ok(uri) = d.sub.endpoint.parse::<http::Uri>() {
        if let Err(e) = inner.policy.load().check_uri(&uri) {
            return Answer::Refused(format!("refused: {e}"));
        }
    }
    let mut req = Request::post(d.sub.endpoint.as_str())
        .header("ttl", d.options.ttl)
        .header("urgency", d.options.urgency)
        .header(header::CONTENT_ENCODING, "aes128gcm")
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::AUTHORIZATION, auth);
    if let Some(t) = &d.options.topic {
        req = req.header("topic", t.clone());
    }
    let req = match req.body(Full::new(body)) {
        Ok(r) => r,
        Err(e) => return Answer::Error(format!("bad request: {e}")),
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, inner.client.request(req)).await {
        Err(_) => Answer::Error("push service did not answer in time".into()),
        Ok(Err(e)) if refused_by_policy(&e) => {
            Answer::Refused(format!("refused: {}", error_chain(&e)))
        }
        Ok(Err(e)) => Answer::Error(format!("request failed: {}", error_chain(&e))),
        Ok(Ok(resp)) => {
            let retry_after = resp
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_retry_after);
            // The body is not needed; dropping the response releases the connection.
            Answer::Status(resp.status(), retry_after)
        }
    }
}

/// The client's resolver refused every address of the endpoint's host (vet.rs says so with
/// PermissionDenied; a connect that fails with EACCES is also not retried, as it would not
/// succeed on a retry either).
fn refused_by_policy(e: &hyper_util::client::legacy::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(c) = cur {
        if c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::PermissionDenied)
        {
            return true;
        }
        cur = c.source();
    }
    false
}

async fn remove_gone(inner: &Arc<Inner>, sub: &WebPushSubscription) {
    let (i, channel, endpoint) = (inner.clone(), sub.channel.clone(), sub.endpoint.clone());
    let r = tokio::task::spawn_blocking(move || i.store.remove(&channel, &endpoint)).await;
    match r {
        Ok(Ok(_)) => inner.metrics.subscriptions.set(inner.store.total() as i64),
        Ok(Err(e)) => tracing::warn!("web push: cannot delete a gone subscription: {e}"),
        Err(e) => tracing::warn!("web push: deleting a gone subscription failed: {e}"),
    }
}

fn fail(
    inner: &Inner,
    sub: &WebPushSubscription,
    o: Outcome,
    status: Option<StatusCode>,
    reason: String,
) {
    inner.record_failure(Failure {
        at_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64,
        channel: sub.channel.to_string(),
        service: sub.origin.clone(),
        outcome: o.as_str(),
        status: status.map(|s| s.as_u16()),
        reason,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::MessageId;

    fn msg(body: &[u8], event: Option<&str>) -> Message {
        Message::new(
            MessageId { ms: 5, seq: 1 },
            event.map(Into::into),
            HeaderValue::from_static("text/plain"),
            Bytes::copy_from_slice(body),
            std::time::Instant::now(),
        )
    }

    #[test]
    fn payload_envelope_and_truncation() {
        let p: serde_json::Value =
            serde_json::from_slice(&payload("news", &msg(b"hi", Some("ev")))).expect("json");
        assert_eq!(
            p,
            serde_json::json!({"channel":"news","id":"5-1","event":"ev","data":"hi"})
        );
        let p: serde_json::Value =
            serde_json::from_slice(&payload("n", &msg(b"\xff\x00", None))).expect("json");
        assert_eq!(p["data_b64"], "/wA=");
        let big = vec![b'a'; crypto::MAX_PLAINTEXT];
        let raw = payload("n", &msg(&big, None));
        assert!(raw.len() <= crypto::MAX_PLAINTEXT);
        let p: serde_json::Value = serde_json::from_slice(&raw).expect("json");
        assert_eq!(
            p,
            serde_json::json!({"channel":"n","id":"5-1","truncated":true})
        );
    }

    #[test]
    fn options_from_publish_headers() {
        let mut h = HeaderMap::new();
        let d = Duration::from_secs(3600);
        assert_eq!(
            PushOptions::from_headers(&h, d),
            PushOptions {
                ttl: 3600,
                urgency: "normal",
                topic: None
            }
        );
        h.insert(TTL_HEADER, HeaderValue::from_static("60"));
        h.insert(URGENCY_HEADER, HeaderValue::from_static("High"));
        h.insert(TOPIC_HEADER, HeaderValue::from_static("score-1"));
        let o = PushOptions::from_headers(&h, d);
        assert_eq!((o.ttl, o.urgency), (60, "high"));
        assert_eq!(
            o.topic.as_ref().map(|t| t.as_bytes()),
            Some(&b"score-1"[..])
        );
        h.insert(TTL_HEADER, HeaderValue::from_static("2m"));
        h.insert(URGENCY_HEADER, HeaderValue::from_static("asap"));
        h.insert(TOPIC_HEADER, HeaderValue::from_static("no spaces allowed"));
        let o = PushOptions::from_headers(&h, d);
        assert_eq!((o.ttl, o.urgency, o.topic), (120, "normal", None));
    }

    #[test]
    fn a_service_queue_admits_up_to_its_bound() {
        let w = AtomicUsize::new(0);
        assert!(admit(&w, 6, 10));
        assert!(!admit(&w, 5, 10), "6 + 5 > 10: dropped, not counted");
        assert!(admit(&w, 4, 10));
        assert_eq!(w.load(Ordering::Relaxed), 10);
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(100));
        let d = parse_retry_after(&later).expect("a date");
        assert!(
            d > Duration::from_secs(90) && d <= Duration::from_secs(100),
            "{d:?}"
        );
        assert_eq!(parse_retry_after("soon"), None);
    }
}
