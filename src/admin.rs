//! The admin listener: the live status page (`/`, fed by `/stats/stream`), `/metrics`,
//! `/healthz`, `/readyz`, `/channels`. Never served on the public listeners.

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::response::{self, Body};
use crate::server::ServerHandle;
use crate::status;

/// What the admin endpoints read.
pub struct AdminView<'a> {
    pub hub: &'a Hub,
    pub metrics: &'a Metrics,
    pub ready: bool,
    /// For the status stream, which outlives the request.
    pub server: ServerHandle,
    pub webpush: Option<&'a crate::webpush::WebPush>,
}

pub fn handle(v: AdminView<'_>, req: &Request<Incoming>) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return response::method_not_allowed("GET, HEAD", false);
    }
    match req.uri().path() {
        "/" => status::page(),
        "/stats/stream" => status::stream(v.server),
        "/metrics" => {
            let mut r = Response::new(response::full(v.metrics.render()));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        "/healthz" => response::text(StatusCode::OK, "ok"),
        "/readyz" if v.ready => response::text(StatusCode::OK, "ready"),
        "/readyz" => response::text(StatusCode::SERVICE_UNAVAILABLE, "draining"),
        "/channels" => channels(v.hub, req.uri().query().unwrap_or("")),
        "/webhooks" => response::json(StatusCode::OK, &v.server.webhooks().status()),
        "/webpush" => match v.webpush {
            Some(wp) => response::json(StatusCode::OK, &wp.admin_json()),
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

fn channels(hub: &Hub, query: &str) -> Response<Body> {
    let mut prefix = "";
    let mut limit = 1000usize;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("prefix", p)) => prefix = p,
            Some(("limit", l)) => match l.parse() {
                Ok(n) => limit = n,
                Err(_) => {
                    return response::json_error(StatusCode::BAD_REQUEST, "limit must be a number")
                }
            },
            _ => {}
        }
    }
    let list = hub.list(prefix, limit);
    response::json(
        StatusCode::OK,
        &serde_json::json!({ "total": hub.channel_count(), "channels": list }),
    )
}
