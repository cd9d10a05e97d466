//! The public Web Push endpoints, under `webpush.path`:
//! - `GET {path}/key`: the VAPID public key, base64url (the page's `applicationServerKey`);
//! - `POST {path}/{channel}` with `PushSubscription.toJSON()`: 201 new, 200 already there;
//! - `DELETE {path}/{channel}` with the same JSON or `?endpoint=`: 204.
//!
//! A channel is authorised exactly as a subscriber of it would be: the Origin check, forward
//! auth and JWT of the push location that owns it (`push::admission`).
//! The endpoint is a URL crier will POST to, so it must be https on a `push_hosts` host
//! (the guard against server-side request forgery); any bad input is a 400 and stores nothing.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use super::crypto::UaKeys;
use super::store::WebPushSubscription;
use super::WebPush;
use crate::config::HostPattern;
use crate::https_client::vet::AddressPolicy;
use crate::model::ChannelName;
use crate::push::admission::{self, Admission, RequestView};
use crate::push::ensure_host;
use crate::response::{self, Body};

/// A `PushSubscription.toJSON()` is a few hundred bytes.
const MAX_BODY: usize = 8 * 1024;
/// Real endpoints are under 1 KiB.
const MAX_ENDPOINT: usize = 2048;

/// Serves one request; `rest` is the path after `webpush.path` and its slash.
pub async fn handle(
    wp: &WebPush,
    ctx: &Admission,
    mut req: Request<Incoming>,
    rest: &str,
) -> Response<Body> {
    if rest == "key" && (req.method() == Method::GET || req.method() == Method::HEAD) {
        return public_key(wp);
    }
    let channel = match ChannelName::new(rest) {
        Ok(c) => c,
        Err(e) => {
            return response::json_error(
                StatusCode::NOT_FOUND,
                &format!("{e} (the Web Push API is {{path}}/key and {{path}}/{{channel}})"),
            )
        }
    };
    let Some(loc) = ctx.locations.owner(&channel) else {
        return response::json_error(
            StatusCode::NOT_FOUND,
            "no push location serves this channel",
        );
    };
    ensure_host(&mut req);
    let Ok(cors) = admission::check_origin(req.headers(), loc) else {
        return response::json_error(StatusCode::FORBIDDEN, "origin not allowed");
    };
    let mut resp = match *req.method() {
        Method::OPTIONS => preflight(),
        Method::POST | Method::DELETE => {
            match ctx.authorize(loc, &channel, RequestView::of(&req)).await {
                Err(refusal) => return refusal.into_response(cors.as_ref()),
                Ok(_) if req.method() == Method::POST => subscribe(wp, &channel, req).await,
                Ok(_) => unsubscribe(wp, &channel, req).await,
            }
        }
        _ => response::method_not_allowed("POST, DELETE, OPTIONS", true),
    };
    if let Some(origin) = cors {
        response::add_cors(resp.headers_mut(), &origin);
    }
    resp
}

fn public_key(wp: &WebPush) -> Response<Body> {
    let key = wp.inner.settings().vapid.key().public_key_b64().to_string();
    let mut r = response::text(StatusCode::OK, &key);
    // Any page may read it (it is public), and it changes only with the key file.
    r.headers_mut().insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

fn preflight() -> Response<Body> {
    let mut r = Response::new(response::empty());
    *r.status_mut() = StatusCode::NO_CONTENT;
    let h = r.headers_mut();
    h.insert(
        header::ALLOW,
        HeaderValue::from_static("POST, DELETE, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("POST, DELETE, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("Content-Type, Authorization"),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    r
}

/// The `PushSubscription.toJSON()` fields crier reads (others, like `expirationTime`, are
/// ignored).
#[derive(serde::Deserialize)]
pub(crate) struct SubscriptionJson {
    pub(crate) endpoint: String,
    keys: Option<KeysJson>,
}

#[derive(serde::Deserialize)]
struct KeysJson {
    p256dh: String,
    auth: String,
}

async fn read_json(req: Request<Incoming>) -> Result<SubscriptionJson, String> {
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                format!("body larger than {MAX_BODY} bytes")
            } else {
                format!("reading the body failed: {e}")
            }
        })?
        .to_bytes();
    parse_json(&body)
}

/// A `PushSubscription.toJSON()` body, read.
pub(crate) fn parse_json(body: &[u8]) -> Result<SubscriptionJson, String> {
    serde_json::from_slice(body)
        .map_err(|e| format!("body is not a PushSubscription JSON ({{\"endpoint\", \"keys\": {{\"p256dh\", \"auth\"}}}}): {e}"))
}

async fn subscribe(wp: &WebPush, channel: &str, req: Request<Incoming>) -> Response<Body> {
    let bad = |e: &str| response::json_error(StatusCode::BAD_REQUEST, e);
    let json = match read_json(req).await {
        Ok(j) => j,
        Err(e) => return bad(&e),
    };
    let settings = wp.inner.settings();
    let policy = wp.inner.policy.load();
    let (origin, keys) = match check_subscription(&json, &settings.push_hosts, &policy) {
        Ok(v) => v,
        Err(e) => return bad(&e),
    };
    let store = &wp.inner.store;
    if store.total() >= settings.max_subscriptions && !store.contains(channel, &json.endpoint) {
        let mut r = response::json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "webpush.max_subscriptions reached",
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("3600"));
        return r;
    }
    let sub = WebPushSubscription {
        channel: channel.into(),
        endpoint: json.endpoint.clone(),
        origin,
        keys,
    };
    let inner = wp.inner.clone();
    // redb commits with an fsync: off the runtime's worker threads.
    let put = tokio::task::spawn_blocking(move || inner.store.put(sub)).await;
    let new = match put {
        Ok(Ok(new)) => new,
        Ok(Err(e)) => {
            tracing::error!("{e}");
            return response::json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "cannot save the subscription",
            );
        }
        Err(e) => {
            tracing::error!("webpush store task: {e}");
            return response::json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "cannot save the subscription",
            );
        }
    };
    wp.inner
        .metrics
        .subscriptions
        .set(wp.inner.store.total() as i64);
    let status = if new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    response::json(
        status,
        &serde_json::json!({ "channel": channel, "subscribed": true, "new": new }),
    )
}

/// Checks a subscription as `POST` takes it: the endpoint (see [`check_endpoint`]) and the
/// browser's keys. Returns the endpoint's origin and the keys.
pub(crate) fn check_subscription(
    json: &SubscriptionJson,
    hosts: &[HostPattern],
    policy: &AddressPolicy,
) -> Result<(String, UaKeys), String> {
    let origin = check_endpoint(&json.endpoint, hosts, policy)?;
    let Some(keys) = &json.keys else {
        return Err("keys missing: {\"p256dh\", \"auth\"}".into());
    };
    let decode = |s: &str| URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')).ok();
    let (Some(p256dh), Some(auth)) = (decode(&keys.p256dh), decode(&keys.auth)) else {
        return Err("keys.p256dh and keys.auth must be base64url".into());
    };
    let keys = UaKeys::parse(&p256dh, &auth)?;
    Ok((origin, keys))
}

async fn unsubscribe(wp: &WebPush, channel: &str, req: Request<Incoming>) -> Response<Body> {
    // Decoded by the one query parser; bytes that are not UTF-8 become U+FFFD, which no
    // endpoint URL holds.
    let from_query = crate::query::param(req.uri().query(), "endpoint")
        .map(|e| (!e.contains('\u{FFFD}')).then(|| e.into_owned()));
    let endpoint = match from_query {
        Some(Some(e)) => e,
        Some(None) => {
            return response::json_error(
                StatusCode::BAD_REQUEST,
                "endpoint= is not valid percent-encoded UTF-8",
            )
        }
        None => match read_json(req).await {
            Ok(j) => j.endpoint,
            Err(e) => {
                return response::json_error(
                    StatusCode::BAD_REQUEST,
                    &format!("{e}; or give ?endpoint="),
                )
            }
        },
    };
    if endpoint.is_empty() || endpoint.len() > MAX_ENDPOINT {
        return response::json_error(StatusCode::BAD_REQUEST, "endpoint missing or too long");
    }
    let inner = wp.inner.clone();
    let ch = channel.to_string();
    let r = tokio::task::spawn_blocking(move || inner.store.remove(&ch, &endpoint)).await;
    match r {
        Ok(Ok(_)) => {
            wp.inner
                .metrics
                .subscriptions
                .set(wp.inner.store.total() as i64);
            let mut r = Response::new(response::empty());
            *r.status_mut() = StatusCode::NO_CONTENT;
            r
        }
        Ok(Err(e)) => {
            tracing::error!("{e}");
            response::json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "cannot delete the subscription",
            )
        }
        Err(e) => {
            tracing::error!("webpush store task: {e}");
            response::json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "cannot delete the subscription",
            )
        }
    }
}

/// Checks a subscription endpoint and returns its origin (`https://host[:port]`, lowercase):
/// https, no user info, a host that `push_hosts` allows. An IP address or `localhost` passes
/// only when listed exactly; a `*.` pattern never matches one.
pub fn check_endpoint(
    endpoint: &str,
    hosts: &[HostPattern],
    policy: &AddressPolicy,
) -> Result<String, String> {
    if endpoint.len() > MAX_ENDPOINT {
        return Err(format!("endpoint longer than {MAX_ENDPOINT} bytes"));
    }
    let uri: http::Uri = endpoint
        .parse()
        .map_err(|_| "endpoint is not a URL".to_string())?;
    if uri.scheme_str() != Some("https") {
        return Err("endpoint must be an https:// URL".into());
    }
    let Some(authority) = uri.authority() else {
        return Err("endpoint has no host".into());
    };
    if authority.as_str().contains('@') {
        return Err("endpoint must not carry user info".into());
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase();
    if !hosts.iter().any(|p| p.matches(&host)) {
        return Err(format!(
            "endpoint host {host:?} is not a known push service (webpush.push_hosts)"
        ));
    }
    // The port, and an address given as the host; what a name resolves to is checked when
    // crier connects (the resolver), since the answer may change.
    policy
        .check_uri(&uri)
        .map_err(|e| format!("endpoint: {e}"))?;
    origin_of(endpoint).ok_or_else(|| "endpoint has no host".into())
}

/// `https://host[:port]` of an endpoint, lowercase: the VAPID audience and the queue key.
pub fn origin_of(endpoint: &str) -> Option<String> {
    let uri: http::Uri = endpoint.parse().ok()?;
    let a = uri.authority()?;
    Some(format!(
        "{}://{}",
        uri.scheme_str()?,
        a.as_str().to_ascii_lowercase()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_rule() {
        let hosts: Vec<HostPattern> = ["*.googleapis.com", "127.0.0.1", "10.1.2.3"]
            .iter()
            .map(|h| HostPattern::parse(h).expect("valid"))
            .collect();
        let strict = AddressPolicy {
            allow: vec![],
            ports: vec![443],
            fixed: Default::default(),
        };
        let loopback_8443 = AddressPolicy {
            allow: vec!["127.0.0.0/8".parse().expect("net")],
            ports: vec![443, 8443],
            fixed: Default::default(),
        };
        assert_eq!(
            check_endpoint("https://fcm.googleapis.com/fcm/send/abc", &hosts, &strict).as_deref(),
            Ok("https://fcm.googleapis.com")
        );
        assert_eq!(
            check_endpoint("https://127.0.0.1:8443/p/1", &hosts, &loopback_8443).as_deref(),
            Ok("https://127.0.0.1:8443")
        );
        // Listed in push_hosts, yet refused: not a public address, or not port 443.
        for (bad, why) in [
            ("https://127.0.0.1/p/1", "not a public address"),
            ("https://10.1.2.3/p/1", "not a public address"),
            ("https://fcm.googleapis.com:8443/x", "port 8443"),
        ] {
            let e = check_endpoint(bad, &hosts, &strict).expect_err(bad);
            assert!(e.contains(why), "{bad}: {e}");
        }
        for bad in [
            "http://fcm.googleapis.com/x",
            "https://googleapis.com/x",
            "https://fcm.googleapis.com.evil.net/x",
            "https://user@fcm.googleapis.com/x",
            "https://127.0.0.2/x",
            "https://localhost/x",
            "https://[::1]/x",
            "https://169.254.169.254/latest",
            "ftp://fcm.googleapis.com/x",
            "fcm.googleapis.com/x",
            "",
        ] {
            assert!(
                check_endpoint(bad, &hosts, &loopback_8443).is_err(),
                "{bad} must be refused"
            );
        }
        let long = format!("https://fcm.googleapis.com/{}", "a".repeat(MAX_ENDPOINT));
        assert!(check_endpoint(&long, &hosts, &strict).is_err());
    }
}
