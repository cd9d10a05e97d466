//! `[[ingress]]`: other systems publish by webhook. A POST to an ingress path is read (up to
//! `max_body`), verified, and only then published to its channel; the answer is 202 with the
//! message id. Crier answers these paths itself: the upstream app never sees them.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use super::sign::{self, VerifyError};
use crate::config::{ChannelSource, ChannelTemplate, IngressConfig, Verify};
use crate::hub::{Hub, NewMessage};
use crate::keys::{Keys, Secret};
use crate::model::ChannelName;
use crate::publish::hub_error;
use crate::response::{self, Body};

/// How long a delivery id is remembered (senders retry within minutes).
const DEDUP_TTL: Duration = Duration::from_secs(600);
/// Ids remembered per ingress path at most; past it the oldest is forgotten first.
const DEDUP_MAX: usize = 100_000;

/// The ingress paths of one config.
#[derive(Default)]
pub struct Ingress {
    points: Vec<IngressPoint>,
}

pub struct IngressPoint {
    cfg: IngressConfig,
    /// None only with `verify = "none"`.
    secret: Option<Secret>,
    /// Shared with the same path's point of the previous config, so a reload does not let a
    /// retried delivery through twice. A Tokio mutex: held across the publish, so that two
    /// copies of one delivery arriving together are published once.
    seen: Arc<tokio::sync::Mutex<Seen>>,
}

/// Delivery ids seen lately → the id of the message they were published as.
#[derive(Default)]
struct Seen {
    ids: HashMap<Box<str>, Box<str>>,
    /// Insertion order, for expiry and the size bound.
    order: VecDeque<(Box<str>, Instant)>,
}

impl Seen {
    fn expire(&mut self, now: Instant) {
        while let Some((id, at)) = self.order.front() {
            if now.duration_since(*at) < DEDUP_TTL && self.order.len() <= DEDUP_MAX {
                break;
            }
            self.ids.remove(id);
            self.order.pop_front();
        }
    }

    fn get(&self, id: &str) -> Option<&str> {
        self.ids.get(id).map(|s| &**s)
    }

    fn insert(&mut self, id: &str, message: &str) {
        self.ids.insert(id.into(), message.into());
        self.order.push_back((id.into(), Instant::now()));
    }
}

impl Ingress {
    pub fn new(configs: &[IngressConfig], keys: &Keys) -> Ingress {
        Ingress {
            points: configs
                .iter()
                .map(|c| IngressPoint {
                    cfg: c.clone(),
                    secret: keys.ingress.get(&c.path).cloned(),
                    seen: Arc::default(),
                })
                .collect(),
        }
    }

    /// Keeps the remembered delivery ids of `previous` for the paths both configs have.
    pub fn keep_seen(&mut self, previous: &Ingress) {
        for p in &mut self.points {
            if let Some(old) = previous.points.iter().find(|o| o.cfg.path == p.cfg.path) {
                p.seen = old.seen.clone();
            }
        }
    }

    pub fn find(&self, path: &str) -> Option<&IngressPoint> {
        self.points.iter().find(|p| p.cfg.path == path)
    }
}

fn error(status: StatusCode, reason: &str) -> Response<Body> {
    response::json_error(status, reason)
}

fn unauthorized(e: VerifyError) -> Response<Body> {
    error(
        StatusCode::UNAUTHORIZED,
        &format!("webhook not verified: {e}"),
    )
}

/// Serves one request to an ingress path.
pub async fn serve(
    hub: &Hub,
    point: &IngressPoint,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Body> {
    let cfg = &point.cfg;
    if req.method() != Method::POST {
        return response::method_not_allowed("POST", true);
    }
    // Belt and braces: config only allows "none" with loopback listeners.
    if cfg.verify == Verify::None && !peer.ip().is_loopback() {
        return error(
            StatusCode::FORBIDDEN,
            "this ingress accepts loopback peers only",
        );
    }
    let too_big = || {
        let mut r = error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("body larger than ingress.max_body ({} bytes)", cfg.max_body),
        );
        // The rest of the body stays unread: the connection cannot carry another request.
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        r
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > cfg.max_body as u64) {
        return too_big();
    }
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, cfg.max_body).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return too_big(),
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("reading the body failed: {e}"),
            )
        }
    };
    let headers = &parts.headers;
    let secret = point.secret.as_ref().map_or(&[][..], |s| &s.0[..]);
    // The delivery id used to recognise a sender's retry.
    let delivery_id = match &cfg.verify {
        Verify::Standard => {
            match sign::verify_standard(secret, headers, &body, SystemTime::now()) {
                Ok(id) => Some(id),
                Err(e) => return unauthorized(e),
            }
        }
        Verify::Github => match sign::verify_hex(secret, headers, "x-hub-signature-256", &body) {
            Ok(()) => header_str(headers, "x-github-delivery"),
            Err(e) => return unauthorized(e),
        },
        Verify::HmacSha256 { header } => {
            match sign::verify_hex_value(secret, headers.get(header), "signature", &body) {
                Ok(()) => header_str(headers, "webhook-id"),
                Err(e) => return unauthorized(e),
            }
        }
        Verify::None => header_str(headers, "webhook-id"),
    };
    let channel = match channel_for(&cfg.channel, headers, &body) {
        Ok(c) => c,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .cloned()
        .unwrap_or(HeaderValue::from_static("application/octet-stream"));
    let msg = NewMessage {
        event: None,
        content_type,
        body,
        headers: parts.headers.clone(),
    };
    let Some(id) = delivery_id.filter(|id| !id.is_empty() && id.len() <= 256) else {
        return match hub.publish(&channel, msg).await {
            Ok(r) => accepted(&r.id, &channel, false),
            Err(e) => hub_error(e),
        };
    };
    // Checked and published under one lock, so two copies of a delivery arriving together
    // are still published once.
    let mut seen = point.seen.lock().await;
    seen.expire(Instant::now());
    if let Some(first) = seen.get(id) {
        return accepted(first, &channel, true);
    }
    match hub.publish(&channel, msg).await {
        Ok(r) => {
            seen.insert(id, &r.id);
            accepted(&r.id, &channel, false)
        }
        Err(e) => hub_error(e),
    }
}

fn header_str<'a>(h: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn accepted(id: &str, channel: &str, duplicate: bool) -> Response<Body> {
    response::json(
        StatusCode::ACCEPTED,
        &serde_json::json!({ "id": id, "channel": channel, "duplicate": duplicate }),
    )
}

/// The channel a verified request goes to.
fn channel_for(
    t: &ChannelTemplate,
    headers: &http::HeaderMap,
    body: &[u8],
) -> Result<ChannelName, String> {
    let middle = match &t.source {
        ChannelSource::Fixed => String::new(),
        ChannelSource::Header(name) => headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| format!("the channel comes from the {name} header, which is missing"))?
            .to_string(),
        ChannelSource::Json(pointer) => {
            let v: serde_json::Value = serde_json::from_slice(body)
                .map_err(|_| "the channel comes from the JSON body, which is not JSON")?;
            match v.pointer(pointer) {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(n @ serde_json::Value::Number(_)) => n.to_string(),
                _ => return Err(format!("the body has no string at {pointer}")),
            }
        }
    };
    // A slash-separated value (`owner/repo`) becomes a dotted name (`owner.repo`).
    let channel = format!("{}{}{}", t.prefix, middle.replace('/', "."), t.suffix);
    ChannelName::new(&channel).map_err(|e| format!("channel {channel:?}: {e}"))
}
