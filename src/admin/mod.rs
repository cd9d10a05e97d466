//! The admin listener: the live status page (`/`, fed by `/stats/stream`), `/metrics`,
//! `/healthz`, `/readyz`, `/channels`, `/webhooks`, `/webpush`. Never served on the public
//! listeners. It reads the running server through a narrow view ([`ServerView`]), which the
//! server implements.

pub mod status;

use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::config::Config;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::response::{self, Body};

/// What the admin endpoints and the status page read of the running server.
pub trait ServerView: Send + Sync + 'static {
    fn hub(&self) -> &Hub;
    fn metrics(&self) -> &Metrics;
    /// The config in force (it changes on reload).
    fn config(&self) -> Arc<Config>;
    /// The addresses listened on, as the status page shows them.
    fn listeners(&self) -> status::Listeners;
    /// From the start of the draining shutdown.
    fn draining(&self) -> bool;
    /// Once the drain is over (the status stream then ends).
    fn stopped(&self) -> bool;
    /// `/webhooks`: each endpoint's state and queue.
    fn webhooks(&self) -> serde_json::Value;
    /// `/webpush`, when Web Push is on.
    fn webpush(&self) -> Option<serde_json::Value>;
}

pub fn handle(v: Arc<dyn ServerView>, req: &Request<Incoming>) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return response::method_not_allowed("GET, HEAD", false);
    }
    match req.uri().path() {
        "/" => status::page(),
        "/stats/stream" => status::stream(v),
        "/metrics" => {
            let mut r = Response::new(response::full(v.metrics().render()));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        "/healthz" => response::text(StatusCode::OK, "ok"),
        "/readyz" if !v.draining() => response::text(StatusCode::OK, "ready"),
        "/readyz" => response::text(StatusCode::SERVICE_UNAVAILABLE, "draining"),
        "/channels" => channels(v.hub(), req.uri().query()),
        "/webhooks" => response::json(StatusCode::OK, &v.webhooks()),
        "/webpush" => match v.webpush() {
            Some(status) => response::json(StatusCode::OK, &status),
            None => response::json_error(
                StatusCode::NOT_FOUND,
                "Web Push is off (no [webpush] section)",
            ),
        },
        _ => response::text(
            StatusCode::NOT_FOUND,
            "not found (try /, /metrics, /healthz, /readyz, /channels, /webhooks, /stats/stream)",
        ),
    }
}

fn channels(hub: &Hub, query: Option<&str>) -> Response<Body> {
    let prefix = crate::query::param(query, "prefix").unwrap_or_default();
    let limit = match crate::query::param(query, "limit") {
        None => 1000usize,
        Some(l) => match l.parse() {
            Ok(n) => n,
            Err(_) => {
                return response::json_error(StatusCode::BAD_REQUEST, "limit must be a number")
            }
        },
    };
    // total: the channels that match the prefix (all of them when there is none), so a
    // client can tell that `limit` cut the list.
    let (total, list) = hub.list(&prefix, limit);
    response::json(
        StatusCode::OK,
        &serde_json::json!({ "total": total, "channels": list }),
    )
}
