//! `[[publish_on]]`: a proxied write that the upstream accepted becomes a message, with no
//! publish call from the app.
//!
//! The order of one exchange: the rule matches the request (method, path template; the
//! channel comes from the path's captures) → the request goes to the upstream as any other,
//! its body copied when the rule publishes it → the response's status is checked → its body
//! streams to the client as it comes (copied when the rule publishes it, never held back) →
//! once the response went out in full, one message is published through the hub (the same
//! way as the publish API: ids, fan-out, webhooks and Web Push all apply). A response that
//! the upstream cut or the client left before its end publishes nothing.
//!
//! A copy is bounded by `channels.max_message_size`. A body over it is not cut into a
//! message: the message is then the small JSON of `body = "none"` with `"truncated": true`,
//! so subscribers learn something changed and can fetch it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Method, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use prometheus::IntCounter;

use super::EVENT_HEADER;
use crate::config::{is_event_name, BodySource, PublishOnConfig};
use crate::hub::{Hub, NewMessage};
use crate::metrics::Metrics;
use crate::model::{ChannelName, ConnInfo};
use crate::proxy::tee::{Tee, TeeBody};
use crate::proxy::Proxy;
use crate::response::Body;

/// The rules of one config, matched in config order; replaced as a whole on reload.
pub struct PublishOn {
    rules: Vec<Arc<Rule>>,
}

struct Rule {
    cfg: PublishOnConfig,
    counts: Counts,
    /// Its last publish failed (logged once until one works again).
    failing: AtomicBool,
}

/// `crier_publish_on_total{rule, result}`, resolved once per rule.
struct Counts {
    published: IntCounter,
    truncated: IntCounter,
    status: IntCounter,
    aborted: IntCounter,
    bad_channel: IntCounter,
    failed: IntCounter,
}

/// A request a rule claims, with the channel its path names.
pub struct Matched {
    rule: Arc<Rule>,
    channel: Result<ChannelName, String>,
}

impl PublishOn {
    pub fn new(rules: &[PublishOnConfig], metrics: &Metrics) -> PublishOn {
        let counter =
            |name: &str, result: &str| metrics.publish_on.with_label_values(&[name, result]);
        PublishOn {
            rules: rules
                .iter()
                .map(|cfg| {
                    let n = cfg.name.as_str();
                    Arc::new(Rule {
                        counts: Counts {
                            published: counter(n, "published"),
                            truncated: counter(n, "truncated"),
                            status: counter(n, "status"),
                            aborted: counter(n, "aborted"),
                            bad_channel: counter(n, "bad_channel"),
                            failed: counter(n, "failed"),
                        },
                        cfg: cfg.clone(),
                        failing: AtomicBool::new(false),
                    })
                })
                .collect(),
        }
    }

    /// True when a rule takes this request: the proxy fast path hands it to hyper, which can
    /// publish. Costs nothing without rules, and one comparison per rule for a method no
    /// rule names.
    pub fn catches(&self, method: &str, path: &str) -> bool {
        self.rules.iter().any(|r| {
            r.cfg.methods.iter().any(|m| m.as_str() == method)
                && r.cfg.path.captures(path).is_some()
        })
    }

    /// The first rule (in config order) that takes this request.
    pub fn find(&self, method: &Method, path: &str) -> Option<Matched> {
        self.rules.iter().find_map(|r| {
            if !r.cfg.methods.contains(method) {
                return None;
            }
            let caps = r.cfg.path.captures(path)?;
            Some(Matched {
                rule: r.clone(),
                channel: r.cfg.channel.render(&caps),
            })
        })
    }
}

/// What the message needs from the request, read before it goes upstream.
struct Exchange {
    method: Method,
    path: String,
    request_type: Option<HeaderValue>,
    request_event: Option<HeaderValue>,
}

/// Proxies a request a rule took and publishes once the response went out in full.
pub async fn forward(
    hub: &Hub,
    proxy: &Proxy,
    m: Matched,
    req: Request<Incoming>,
    conn: &ConnInfo,
    max_message_size: usize,
) -> Response<Body> {
    let Matched { rule, channel } = m;
    let channel = match channel {
        Ok(c) => c,
        Err(e) => {
            rule.counts.bad_channel.inc();
            tracing::debug!(
                "publish_on {:?}: no channel for {}: {e}",
                rule.cfg.name,
                req.uri().path()
            );
            return proxy.forward(req, conn).await;
        }
    };
    let ex = Exchange {
        method: req.method().clone(),
        path: req.uri().path().to_string(),
        request_type: req.headers().get(header::CONTENT_TYPE).cloned(),
        request_event: req.headers().get(EVENT_HEADER).cloned(),
    };
    let request_copy = (rule.cfg.body == BodySource::Request)
        .then(|| Tee::new(max_message_size, http_body::Body::is_end_stream(req.body())));
    let resp = proxy.forward_copying(req, conn, request_copy.clone()).await;
    let status = resp.status().as_u16();
    if !rule.cfg.status.matches(status) {
        rule.counts.status.inc();
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let response_copy =
        (rule.cfg.body == BodySource::Response).then(|| Tee::new(max_message_size, false));
    let hub = hub.clone();
    let response_type = parts.headers.get(header::CONTENT_TYPE).cloned();
    let response_event = parts.headers.get(EVENT_HEADER).cloned();
    let copy = response_copy.clone();
    let on_end = Box::new(move |complete: bool| {
        if !complete {
            rule.counts.aborted.inc();
            return;
        }
        let (source, content_type, event_header) = match rule.cfg.body {
            BodySource::Response => (copy.map(|t| t.take()), response_type, response_event),
            BodySource::Request => (
                request_copy.map(|t| t.take()),
                ex.request_type.clone(),
                ex.request_event.clone(),
            ),
            BodySource::None => (None, response_type, response_event),
        };
        let (body, content_type, truncated) = match source {
            // The upstream answered before it read the whole request: what it acted on is
            // not known, so the body is not passed off as the request.
            Some(c) if c.cut || !c.complete => (summary(&ex, status, true), json(), true),
            Some(c) => (
                c.bytes,
                rule.cfg
                    .content_type
                    .clone()
                    .or(content_type)
                    .unwrap_or(HeaderValue::from_static("application/octet-stream")),
                false,
            ),
            None => (
                summary(&ex, status, false),
                rule.cfg.content_type.clone().unwrap_or_else(json),
                false,
            ),
        };
        let event = rule.cfg.event.clone().map(Into::into).or_else(|| {
            event_header
                .as_ref()
                .and_then(|v| v.to_str().ok())
                .filter(|e| is_event_name(e))
                .map(Into::into)
        });
        let msg = NewMessage {
            event,
            content_type,
            body,
            headers: HeaderMap::new(),
        };
        // Called from the client connection's task as the response ends: the append runs on
        // its own, so the connection never waits on it.
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            rule.counts.failed.inc();
            return;
        };
        rt.spawn(async move {
            match hub.publish(&channel, msg).await {
                Ok(_) => {
                    if truncated {
                        rule.counts.truncated.inc();
                    } else {
                        rule.counts.published.inc();
                    }
                    if rule.failing.swap(false, Ordering::Relaxed) {
                        tracing::info!("publish_on {:?}: publishing again", rule.cfg.name);
                    }
                }
                Err(e) => {
                    rule.counts.failed.inc();
                    // One line when a rule starts failing, not one per write.
                    if !rule.failing.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            "publish_on {:?}: publish to {channel} failed: {e} (counted in crier_publish_on_total{{result=\"failed\"}} until it works again)",
                            rule.cfg.name
                        );
                    }
                }
            }
        });
    });
    let body = TeeBody::new(body, response_copy, on_end).boxed_unsync();
    Response::from_parts(parts, body)
}

fn json() -> HeaderValue {
    HeaderValue::from_static("application/json")
}

/// `{"method","path","status"}` (and `"truncated": true` for a body over the limit).
fn summary(ex: &Exchange, status: u16, truncated: bool) -> Bytes {
    let mut v = serde_json::json!({
        "method": ex.method.as_str(),
        "path": ex.path,
        "status": status,
    });
    if truncated {
        v["truncated"] = true.into();
    }
    Bytes::from(v.to_string())
}
