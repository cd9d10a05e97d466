//! Forward auth (`auth_request`): a GET to the upstream app, with the subscriber's credentials,
//! decides whether a subscription may start.
//!
//! The request is built from scratch, not copied: it carries `Host`, `Cookie`, `Authorization`,
//! `X-Forwarded-For/-Proto/-Host` (as the proxy sends them), `X-Crier-Channel`,
//! `X-Crier-Action` (`subscribe`, or `publish` for a WebSocket client's message) and
//! `X-Original-URI`, and nothing else, so a client cannot smuggle a header the app might trust.
//! The whole exchange (connect, response, a denial's body) is bounded by `auth_timeout`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use parking_lot::Mutex;

use super::{Action, Ask, Denial};
use crate::config::{ForwardAuthConfig, UpstreamConfig};
use crate::log_limit::{held_back_note, LogLimit};
use crate::proxy::{self, UpstreamConnector};

/// A denial's body is passed on up to this size; a larger one is replaced by a one-line reason.
pub const MAX_DENIAL_BODY: usize = 8 * 1024;

/// The app's answer.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// 2xx.
    Allow,
    /// 401 or 403, as the app sent it (status, body, `WWW-Authenticate`, `Content-Type`).
    Deny(Arc<Denial>),
    /// Anything else: another status, an error, no answer within `auth_timeout`. 503.
    Unavailable,
}

impl Verdict {
    pub fn into_result(self) -> Result<(), Denial> {
        match self {
            Verdict::Allow => Ok(()),
            Verdict::Deny(d) => Err((*d).clone()),
            Verdict::Unavailable => Err(Denial::unavailable()),
        }
    }
}

/// Why the app's answer could not be had (logged; the subscriber sees 503).
#[derive(Debug, thiserror::Error)]
enum AskError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("upstream unreachable or failed: {0}")]
    Upstream(#[from] hyper_util::client::legacy::Error),
    #[error("upstream answered {0}; only 2xx, 401 and 403 are understood")]
    Status(StatusCode),
    #[error("bad auth request: {0}")]
    Request(#[from] http::Error),
}

/// The pooled client that asks the upstream. Its own pool: checks never wait behind a proxied
/// download for a connection.
pub struct ForwardAuth {
    client: Client<UpstreamConnector, Empty<Bytes>>,
    base: String,
}

impl ForwardAuth {
    pub fn new(cfg: &UpstreamConfig) -> ForwardAuth {
        let (client, base) = proxy::upstream_client(cfg);
        ForwardAuth { client, base }
    }

    /// Asks the upstream whether the subscriber of `ask` may read `channel`.
    pub async fn ask(&self, cfg: &ForwardAuthConfig, channel: &str, ask: &Ask<'_>) -> Verdict {
        // A backend that is down fails every subscriber: one line per 10 s, not one each.
        static WARN: LogLimit = LogLimit::new(Duration::from_secs(10));
        let e = match tokio::time::timeout(cfg.timeout, self.exchange(cfg, channel, ask)).await {
            Ok(Ok(v)) => return v,
            Ok(Err(e)) => e,
            Err(_) => AskError::Timeout(cfg.timeout),
        };
        if let Some(n) = WARN.allow() {
            tracing::warn!(
                "auth_request {}: {e}; answering 503{}",
                cfg.path,
                held_back_note(n)
            );
        }
        Verdict::Unavailable
    }

    async fn exchange(
        &self,
        cfg: &ForwardAuthConfig,
        channel: &str,
        ask: &Ask<'_>,
    ) -> Result<Verdict, AskError> {
        let req = self.request(cfg, channel, ask)?;
        let resp = self.client.request(req).await?;
        let status = resp.status();
        if status.is_success() {
            // The body is not needed, but a connection goes back to the pool only once its
            // body is read to the end; a large one is dropped (and its connection closed).
            let _ = Limited::new(resp.into_body(), MAX_DENIAL_BODY)
                .collect()
                .await;
            return Ok(Verdict::Allow);
        }
        if status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN {
            return Err(AskError::Status(status));
        }
        let (parts, body) = resp.into_parts();
        let mut headers = HeaderMap::new();
        for name in [header::WWW_AUTHENTICATE, header::CONTENT_TYPE] {
            for v in parts.headers.get_all(&name) {
                headers.append(name.clone(), v.clone());
            }
        }
        let body = match Limited::new(body, MAX_DENIAL_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => {
                // Too large (or broken): a one-line reason instead of a truncated body.
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; charset=utf-8"),
                );
                Bytes::from(format!(
                    "{}\n",
                    status.canonical_reason().unwrap_or("denied")
                ))
            }
        };
        Ok(Verdict::Deny(Arc::new(Denial {
            status,
            headers: Box::new(headers),
            body,
        })))
    }

    fn request(
        &self,
        cfg: &ForwardAuthConfig,
        channel: &str,
        ask: &Ask<'_>,
    ) -> Result<Request<Empty<Bytes>>, http::Error> {
        let uri: Uri = format!("{}{}", self.base, cfg.path).parse()?;
        let mut h = HeaderMap::new();
        for name in [
            header::HOST,
            header::COOKIE,
            header::AUTHORIZATION,
            header::HeaderName::from_static("x-forwarded-for"),
        ] {
            for v in ask.headers.get_all(&name) {
                h.append(name.clone(), v.clone());
            }
        }
        proxy::add_forwarded_headers(&mut h, ask.conn);
        if let Ok(v) = HeaderValue::from_str(channel) {
            h.insert("x-crier-channel", v);
        }
        h.insert(
            "x-crier-action",
            HeaderValue::from_static(ask.action.as_str()),
        );
        if let Ok(v) = HeaderValue::from_str(ask.target) {
            h.insert("x-original-uri", v);
        }
        let mut req = Request::get(uri).body(Empty::new())?;
        *req.headers_mut() = h;
        Ok(req)
    }
}

/// Most answers one location's cache holds. When full, expired entries are dropped; if that
/// frees nothing the cache is emptied: a cache thrashing at its bound costs auth requests,
/// never memory.
pub const MAX_CACHE_ENTRIES: usize = 10_000;

/// `auth_cache_ttl`: the app's 2xx/401/403 per (credentials, channel, action), for a short
/// time. Errors are never cached. The key is a SHA-256 of `Cookie`, `Authorization`, the
/// channel and the action,
/// so the cache holds no credentials and its entries have a fixed size.
pub struct AuthCache {
    ttl: Duration,
    /// parking_lot: held for one map lookup or insert, never across `.await`.
    entries: Mutex<HashMap<[u8; 32], (Instant, Verdict)>>,
}

impl AuthCache {
    pub fn new(ttl: Duration) -> AuthCache {
        AuthCache {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// A fresh cached answer: Ok for allow, Err for a denial.
    pub fn get(&self, key: &[u8; 32]) -> Option<Result<(), Arc<Denial>>> {
        let entries = self.entries.lock();
        let (at, v) = entries.get(key)?;
        if at.elapsed() >= self.ttl {
            return None;
        }
        match v {
            Verdict::Allow => Some(Ok(())),
            Verdict::Deny(d) => Some(Err(d.clone())),
            Verdict::Unavailable => None,
        }
    }

    pub fn put(&self, key: [u8; 32], v: &Verdict) {
        if matches!(v, Verdict::Unavailable) {
            return;
        }
        let mut entries = self.entries.lock();
        if entries.len() >= MAX_CACHE_ENTRIES && !entries.contains_key(&key) {
            let ttl = self.ttl;
            entries.retain(|_, (at, _)| at.elapsed() < ttl);
            if entries.len() >= MAX_CACHE_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(key, (Instant::now(), v.clone()));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.lock().len()
    }
}

/// SHA-256 over the `Cookie` values, the `Authorization` values, the channel and the action,
/// each length-prefixed so that no two different inputs run together into the same bytes.
pub fn cache_key(h: &HeaderMap, channel: &str, action: Action) -> [u8; 32] {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut field = |b: &[u8]| {
        ctx.update(&(b.len() as u64).to_be_bytes());
        ctx.update(b);
    };
    for name in [header::COOKIE, header::AUTHORIZATION] {
        let values = h.get_all(&name);
        field(name.as_str().as_bytes());
        for v in values {
            field(v.as_bytes());
        }
    }
    field(b"channel");
    field(channel.as_bytes());
    field(b"action");
    field(action.as_str().as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn cache_key_separates_credentials_and_channels() {
        const S: Action = Action::Subscribe;
        let a = cache_key(&headers(&[("cookie", "s=1")]), "c", S);
        assert_eq!(a, cache_key(&headers(&[("cookie", "s=1")]), "c", S));
        assert_ne!(a, cache_key(&headers(&[("cookie", "s=2")]), "c", S));
        assert_ne!(a, cache_key(&headers(&[("cookie", "s=1")]), "d", S));
        assert_ne!(a, cache_key(&headers(&[("authorization", "s=1")]), "c", S));
        assert_ne!(a, cache_key(&headers(&[]), "c", S));
        // A cookie cannot be split across fields to collide.
        assert_ne!(
            cache_key(&headers(&[("cookie", "ab")]), "c", S),
            cache_key(&headers(&[("cookie", "a"), ("cookie", "b")]), "c", S)
        );
        assert_ne!(
            a,
            cache_key(&headers(&[("cookie", "s=1")]), "c", Action::Publish),
            "a subscribe answer never says whether publishing is allowed"
        );
    }

    #[test]
    fn cache_expires_and_stays_bounded() {
        // Long enough that a test thread descheduled on a busy machine does not see it expire.
        let c = AuthCache::new(Duration::from_millis(500));
        c.put([1; 32], &Verdict::Allow);
        c.put([2; 32], &Verdict::Unavailable);
        assert!(matches!(c.get(&[1; 32]), Some(Ok(()))));
        assert!(c.get(&[2; 32]).is_none(), "errors are not cached");
        std::thread::sleep(Duration::from_millis(510));
        assert!(c.get(&[1; 32]).is_none(), "expired");

        let c = AuthCache::new(Duration::from_secs(60));
        for i in 0..(MAX_CACHE_ENTRIES + 5) {
            let mut k = [0u8; 32];
            k[..8].copy_from_slice(&(i as u64).to_be_bytes());
            c.put(k, &Verdict::Allow);
            assert!(c.len() <= MAX_CACHE_ENTRIES);
        }
    }
}
