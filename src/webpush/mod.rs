//! Web Push (RFC 8030/8291/8292): browsers get a channel's messages as push notifications
//! even with the page closed.
//!
//! - `api.rs`: `GET {path}/key`, `POST/DELETE {path}/{channel}` on the public listener, each
//!   channel authorised as a subscriber of the push location that serves it.
//! - `store.rs`: the subscriptions, in a redb file (or, with `[cluster]`, a Redis hash every
//!   node shares) and an in-memory index.
//! - `deliver.rs`: the hub observer, the bounded queues (one per push service) and the POSTs.
//! - `crypto.rs` (RFC 8291 aes128gcm) and `vapid.rs` (RFC 8292 ES256 JWT, cached per service).

pub mod api;
pub mod crypto;
mod deliver;
pub mod store;
pub mod vapid;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{HostPattern, WebPushConfig};
use crate::https_client::vet::AddressPolicy;
use crate::https_client::{self, ClientOptions, HttpsClient};
use crate::hub::Hub;
use crate::keys::VapidKey;
use store::{Store, StoreError};
use vapid::VapidCache;

/// Messages waiting to be fanned out to their subscriptions. Past it a message's Web Push
/// deliveries are dropped (counted as `dropped`): publishing never waits for Web Push.
const JOB_QUEUE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum WebPushError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("webpush.ca_file: {0}")]
    Client(#[from] https_client::ClientError),
    #[error("webpush metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Where pushes may go: `push_ports`, `allow_addresses`, `resolve` (the SSRF guard).
fn address_policy(c: &WebPushConfig) -> AddressPolicy {
    AddressPolicy {
        allow: c.allow_addresses.clone(),
        ports: c.push_ports.clone(),
        fixed: c.resolve.clone().into_iter().collect(),
    }
}

fn follow_note(shared: bool) -> &'static str {
    if shared {
        "in Redis ([cluster]): every node's subscriptions"
    } else {
        "this node's file"
    }
}

/// What a reload may change without a restart.
struct Settings {
    path: String,
    vapid: VapidCache,
    ttl: Duration,
    push_hosts: Vec<HostPattern>,
    max_subscriptions: usize,
}

impl Settings {
    fn new(c: &WebPushConfig, key: &VapidKey) -> Settings {
        Settings {
            path: c.path.clone(),
            vapid: VapidCache::new(key.clone(), c.subject.clone()),
            ttl: c.ttl,
            push_hosts: c.push_hosts.clone(),
            max_subscriptions: c.max_subscriptions,
        }
    }
}

/// `crier_webpush_*`.
struct WebPushMetrics {
    subscriptions: IntGauge,
    /// [delivered, gone, too_large, rejected, failed, dropped]
    outcomes: [IntCounter; 6],
    retries: IntCounter,
    duration: Histogram,
}

/// How one delivery ended (`crier_webpush_deliveries_total{outcome}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx from the push service.
    Delivered,
    /// 404/410: the subscription is gone; crier deleted it.
    Gone,
    /// 413: the push service refused the size.
    TooLarge,
    /// Another 4xx (a VAPID or request problem): not retried.
    Rejected,
    /// 429/5xx/network errors after the last retry.
    Failed,
    /// Never sent: a queue was full.
    Dropped,
}

impl Outcome {
    const ALL: [Outcome; 6] = [
        Outcome::Delivered,
        Outcome::Gone,
        Outcome::TooLarge,
        Outcome::Rejected,
        Outcome::Failed,
        Outcome::Dropped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Gone => "gone",
            Outcome::TooLarge => "too_large",
            Outcome::Rejected => "rejected",
            Outcome::Failed => "failed",
            Outcome::Dropped => "dropped",
        }
    }
}

impl WebPushMetrics {
    fn register(r: &Registry) -> Result<WebPushMetrics, prometheus::Error> {
        let subscriptions = IntGauge::with_opts(
            Opts::new(
                "webpush_subscriptions",
                "Web Push subscriptions held (all channels).",
            )
            .namespace("crier"),
        )?;
        r.register(Box::new(subscriptions.clone()))?;
        let outcomes_vec = IntCounterVec::new(
            Opts::new(
                "webpush_deliveries_total",
                "Web Push deliveries, by how they ended.",
            )
            .namespace("crier"),
            &["outcome"],
        )?;
        r.register(Box::new(outcomes_vec.clone()))?;
        let retries = IntCounter::with_opts(
            Opts::new(
                "webpush_retries_total",
                "Web Push requests sent again after a 429, a 5xx or a network error.",
            )
            .namespace("crier"),
        )?;
        r.register(Box::new(retries.clone()))?;
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "webpush_duration_seconds",
                "Time from a delivery's first request to its final answer (retries included).",
            )
            .namespace("crier")
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
            ]),
        )?;
        r.register(Box::new(duration.clone()))?;
        Ok(WebPushMetrics {
            subscriptions,
            outcomes: Outcome::ALL.map(|o| outcomes_vec.with_label_values(&[o.as_str()])),
            retries,
            duration,
        })
    }

    fn outcome(&self, o: Outcome, n: u64) {
        self.outcomes[Outcome::ALL.iter().position(|x| *x == o).unwrap_or(0)].inc_by(n);
    }
}

/// A recent delivery that did not end in `delivered`, for `GET /webpush` on the admin listener.
#[derive(Debug, Clone, serde::Serialize)]
struct Failure {
    at_ms: u64,
    channel: String,
    /// The push service (the endpoint's origin; the full endpoint is a bearer capability).
    service: String,
    outcome: &'static str,
    status: Option<u16>,
    reason: String,
}

const RECENT_FAILURES: usize = 20;

struct Inner {
    /// parking_lot: read for an Arc clone, written on reload.
    settings: RwLock<Arc<Settings>>,
    store: Store,
    metrics: WebPushMetrics,
    client: HttpsClient,
    jobs: mpsc::Sender<deliver::Job>,
    /// One bounded queue per push service (endpoint origin), made on first use. parking_lot:
    /// a lookup or insert, never held across `.await`.
    services: Mutex<HashMap<String, deliver::ServiceQueue>>,
    failures: Mutex<VecDeque<Failure>>,
    stop: CancellationToken,
    /// The `ca_file` the outbound client was built with (a reload does not rebuild it).
    ca_file: Option<std::path::PathBuf>,
    /// Shared with the client's resolver; a reload swaps it.
    policy: Arc<arc_swap::ArcSwap<AddressPolicy>>,
}

impl Inner {
    fn settings(&self) -> Arc<Settings> {
        self.settings.read().clone()
    }

    fn record_failure(&self, f: Failure) {
        let mut q = self.failures.lock();
        if q.len() == RECENT_FAILURES {
            q.pop_front();
        }
        q.push_back(f);
    }
}

/// The Web Push service of a running crier. Cheap to clone.
#[derive(Clone)]
pub struct WebPush {
    inner: Arc<Inner>,
}

impl WebPush {
    /// Opens the store (the file, or with `[cluster]` the table every node shares), starts
    /// the delivery tasks and installs the hub observer.
    pub async fn start(
        cfg: &WebPushConfig,
        key: &VapidKey,
        hub: &Hub,
        registry: &Registry,
        shared: Option<crate::hub::store::SharedTable>,
    ) -> Result<WebPush, WebPushError> {
        let policy = Arc::new(arc_swap::ArcSwap::from_pointee(address_policy(cfg)));
        let client = https_client::build(&ClientOptions {
            ca_file: cfg.ca_file.clone(),
            connect_timeout: Some(Duration::from_secs(10)),
            pool_max_idle_per_host: deliver::PER_SERVICE_CONCURRENCY,
            vet: Some(policy.clone()),
        })?;
        let (store, follow) = match shared {
            None => (Store::open(&cfg.store, api::origin_of)?, None),
            Some(table) => {
                // Follow first, read second: a change made between the two is not missed.
                let follow = table.follow();
                (
                    Store::open_shared(table, &cfg.store, api::origin_of).await?,
                    Some(follow),
                )
            }
        };
        let metrics = WebPushMetrics::register(registry)?;
        metrics.subscriptions.set(store.total() as i64);
        let (tx, rx) = mpsc::channel(JOB_QUEUE);
        let inner = Arc::new(Inner {
            settings: RwLock::new(Arc::new(Settings::new(cfg, key))),
            store,
            metrics,
            client,
            jobs: tx,
            services: Mutex::new(HashMap::new()),
            failures: Mutex::new(VecDeque::new()),
            stop: CancellationToken::new(),
            ca_file: cfg.ca_file.clone(),
            policy,
        });
        tokio::spawn(deliver::dispatch(inner.clone(), rx));
        if let Some(changes) = follow {
            let i = inner.clone();
            tokio::spawn(async move {
                let gauge = i.metrics.subscriptions.clone();
                i.store
                    .follow(changes, api::origin_of, |n| gauge.set(n as i64))
                    .await
            });
        }
        hub.set_observer("webpush", Some(Arc::new(deliver::Observer(inner.clone()))));
        tracing::info!(
            store = %cfg.store.display(),
            shared = follow_note(inner.store.is_shared()),
            subscriptions = inner.store.total(),
            path = %cfg.path,
            "web push on"
        );
        Ok(WebPush { inner })
    }

    /// Applies a reloaded `[webpush]`: key, subject, ttl, push_hosts, path, limit. The store
    /// file and the client's `ca_file` stay those of the start (changing them needs a restart;
    /// said in the log).
    pub fn reload(&self, cfg: Option<&WebPushConfig>, key: Option<&VapidKey>) {
        let (Some(cfg), Some(key)) = (cfg, key) else {
            tracing::warn!("[webpush] was removed; Web Push stays on until crier restarts");
            return;
        };
        if cfg.store != self.inner.store.path() {
            tracing::warn!(
                "webpush.store changed; crier keeps using {} until it restarts",
                self.inner.store.path().display()
            );
        }
        if cfg.ca_file != self.inner.ca_file {
            tracing::warn!("webpush.ca_file changed; it takes effect when crier restarts");
        }
        *self.inner.settings.write() = Arc::new(Settings::new(cfg, key));
        self.inner.policy.store(Arc::new(address_policy(cfg)));
    }

    /// The part of `path` after the Web Push base path, when the API owns it.
    pub fn route<'p>(&self, path: &'p str) -> Option<&'p str> {
        let s = self.inner.settings();
        let rest = path.strip_prefix(s.path.as_str())?;
        match rest {
            "" => Some(""),
            r => r.strip_prefix('/'),
        }
    }

    pub fn subscribers(&self, channel: &str) -> usize {
        self.inner.store.count(channel)
    }

    /// `GET /webpush` on the admin listener.
    pub fn admin_json(&self) -> serde_json::Value {
        let m = &self.inner.metrics;
        let deliveries: serde_json::Map<String, serde_json::Value> = Outcome::ALL
            .iter()
            .zip(&m.outcomes)
            .map(|(o, c)| (o.as_str().to_string(), c.get().into()))
            .collect();
        let channels: serde_json::Map<String, serde_json::Value> = self
            .inner
            .store
            .per_channel(1000)
            .into_iter()
            .map(|(c, n)| (c, n.into()))
            .collect();
        serde_json::json!({
            "subscriptions": self.inner.store.total(),
            "channels": channels,
            "deliveries": deliveries,
            "retries": m.retries.get(),
            "recent_failures": self.inner.failures.lock().iter().cloned().collect::<Vec<_>>(),
        })
    }

    /// Stops the delivery tasks and closes the store file (shutdown).
    pub fn close(&self) {
        self.inner.stop.cancel();
        self.inner.store.close();
    }
}
