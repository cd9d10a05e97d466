//! Who may subscribe and publish.
//!
//! A push location may ask two questions before a subscription starts, both once per
//! subscription (WebSocket and SSE at connect, long-poll at every request), never per message:
//! - JWT (`[push.jwt]`, `jwt.rs`): a signed token that names the channels it may read;
//! - forward auth (`auth_request`, `forward.rs`): a GET to the upstream app with the subscriber's
//!   credentials; the app's 2xx allows, its 401/403 reach the subscriber as they are, and
//!   anything else (an error, no answer in time) is 503: never an open door.
//!
//! The Origin check runs before both (in `push`), so a cross-site page never makes crier send
//! the victim's cookies to the app. Publishing over TCP may need a bearer token
//! ([`PublishToken`]); the Unix socket relies on its file permissions.

pub mod forward;
pub mod jwt;

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use subtle::ConstantTimeEq;

use crate::config::{Config, PushLocation};
use crate::metrics::{AuthMethod, AuthResult, Metrics};
use crate::proxy::ConnInfo;
use crate::response::{self, Body};
use forward::{AuthCache, ForwardAuth};
use jwt::JwtRejection;

/// What the checks see of a subscriber's request.
pub struct Ask<'a> {
    pub headers: &'a HeaderMap,
    /// The request target as the client sent it: path and query.
    pub target: &'a str,
    pub query: Option<&'a str>,
    pub conn: &'a ConnInfo,
}

/// A refusal: the response the subscriber gets instead of a subscription.
#[derive(Debug, Clone)]
pub struct Denial {
    pub status: StatusCode,
    /// `Content-Type`, `WWW-Authenticate`, `Retry-After`: the only headers a denial carries.
    /// Boxed: a denial travels in `Result`s, whose size its `Err` sets.
    pub headers: Box<HeaderMap>,
    pub body: Bytes,
}

impl Denial {
    /// A plain-text denial with a one-line reason.
    pub fn text(status: StatusCode, reason: &str) -> Denial {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        Denial {
            status,
            headers: Box::new(headers),
            body: Bytes::from(format!("{reason}\n")),
        }
    }

    /// 503: the check could not be made. Never an open door.
    pub fn unavailable() -> Denial {
        let mut d = Denial::text(
            StatusCode::SERVICE_UNAVAILABLE,
            "authorization check unavailable; try again later",
        );
        d.headers
            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        d
    }

    fn bearer(status: StatusCode, reason: &str, challenge: &'static str) -> Denial {
        let mut d = Denial::text(status, reason);
        d.headers.insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(challenge),
        );
        d
    }

    /// The response through hyper; `cors` when the page is an allowed cross-origin one, so
    /// its script can read the status.
    pub fn into_response(self, cors: Option<&HeaderValue>) -> Response<Body> {
        let mut r = Response::new(response::full(self.body));
        *r.status_mut() = self.status;
        *r.headers_mut() = *self.headers;
        if let Some(origin) = cors {
            for (name, value) in crate::push::cors_headers(origin) {
                r.headers_mut().append(name, value);
            }
        }
        r
    }
}

/// The subscriber checks of one config: the forward-auth client (pooled, to the upstream) and
/// the per-location caches. Rebuilt on reload, which also empties the caches.
pub struct Gatekeeper {
    forward: ForwardAuth,
    /// By location path, for the locations with `auth_cache_ttl`.
    caches: std::collections::HashMap<String, AuthCache>,
    metrics: Arc<Metrics>,
}

impl Gatekeeper {
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Gatekeeper {
        let caches = config
            .push
            .iter()
            .filter_map(|loc| {
                let ttl = loc.forward_auth.as_ref()?.cache_ttl?;
                Some((loc.path.clone(), AuthCache::new(ttl)))
            })
            .collect();
        Gatekeeper {
            forward: ForwardAuth::new(&config.upstream),
            caches,
            metrics,
        }
    }

    /// Whether `loc` checks subscribers at all.
    pub fn guards(loc: &PushLocation) -> bool {
        loc.jwt.is_some() || loc.forward_auth.is_some()
    }

    /// Runs the location's checks: JWT first (local, cheap), then forward auth. Both must pass.
    pub async fn check(
        &self,
        loc: &PushLocation,
        channel: &str,
        ask: &Ask<'_>,
    ) -> Result<(), Denial> {
        if let Some(j) = &loc.jwt {
            let token = find_token(ask.headers, ask.query, j.cookie.as_deref());
            let verdict = match token {
                None => Err(JwtRejection::Missing),
                Some(t) => j.verifier.verify(t, channel),
            };
            if let Err(e) = verdict {
                self.metrics.auth_check(AuthMethod::Jwt, AuthResult::Deny);
                return Err(jwt_denial(&e));
            }
            self.metrics.auth_check(AuthMethod::Jwt, AuthResult::Allow);
        }
        if let Some(fa) = &loc.forward_auth {
            let cache = self.caches.get(&loc.path);
            let key = cache.map(|_| forward::cache_key(ask.headers, channel));
            if let (Some(cache), Some(key)) = (cache, &key) {
                if let Some(v) = cache.get(key) {
                    self.metrics.auth_cache_hits.inc();
                    return v.map_err(|d| (*d).clone());
                }
            }
            let verdict = self.forward.ask(fa, channel, ask).await;
            let result = match &verdict {
                forward::Verdict::Allow => AuthResult::Allow,
                forward::Verdict::Deny(_) => AuthResult::Deny,
                forward::Verdict::Unavailable => AuthResult::Error,
            };
            self.metrics.auth_check(AuthMethod::Forward, result);
            if let (Some(cache), Some(key)) = (cache, key) {
                cache.put(key, &verdict);
            }
            return verdict.into_result();
        }
        Ok(())
    }
}

fn jwt_denial(e: &JwtRejection) -> Denial {
    match e {
        JwtRejection::Missing => Denial::bearer(
            StatusCode::UNAUTHORIZED,
            "missing token (Authorization: Bearer, access_token or the token cookie)",
            "Bearer realm=\"crier\"",
        ),
        JwtRejection::Invalid(_) => Denial::bearer(
            StatusCode::UNAUTHORIZED,
            &e.to_string(),
            "Bearer realm=\"crier\", error=\"invalid_token\"",
        ),
        JwtRejection::ChannelNotAllowed => Denial::bearer(
            StatusCode::FORBIDDEN,
            &e.to_string(),
            "Bearer realm=\"crier\", error=\"insufficient_scope\"",
        ),
    }
}

/// The subscriber's token: `Authorization: Bearer`, else the `access_token` query parameter
/// (browsers cannot set headers on a WebSocket or an EventSource), else the configured cookie.
pub fn find_token<'a>(
    h: &'a HeaderMap,
    query: Option<&'a str>,
    cookie: Option<&str>,
) -> Option<&'a str> {
    let bearer = h
        .get_all(header::AUTHORIZATION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(bearer_token);
    let from_query = || {
        query?
            .split('&')
            .filter_map(|p| p.split_once('='))
            .find(|(k, v)| *k == "access_token" && !v.is_empty())
            .map(|(_, v)| v)
    };
    let from_cookie = || {
        let name = cookie?;
        h.get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|s| s.split(';'))
            .filter_map(|c| c.trim().split_once('='))
            .find(|(k, v)| *k == name && !v.is_empty())
            .map(|(_, v)| v.trim_matches('"'))
    };
    bearer.or_else(from_query).or_else(from_cookie)
}

/// `Bearer <token>` (the scheme is case-insensitive) → the token.
pub fn bearer_token(v: &str) -> Option<&str> {
    let (scheme, token) = v.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Reads a secret from a file: its bytes without trailing whitespace (the newline an editor
/// or `echo` adds). Empty is an error. The message names the file.
pub fn read_secret_file(path: &Path) -> Result<Vec<u8>, String> {
    let mut bytes =
        std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    while bytes.last().is_some_and(|b| b.is_ascii_whitespace()) {
        bytes.pop();
    }
    if bytes.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(bytes)
}

/// The publish API's bearer token (`[publish] token_file`). Only its SHA-256 is kept, and a
/// presented token is hashed and compared in constant time: neither the token's bytes nor its
/// length show in the time an answer takes.
#[derive(Clone)]
pub struct PublishToken {
    digest: [u8; 32],
}

impl std::fmt::Debug for PublishToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PublishToken(..)")
    }
}

/// Shortest publish token accepted.
pub const MIN_PUBLISH_TOKEN: usize = 16;

impl PublishToken {
    /// Reads the token file; the token must be at least 16 visible ASCII characters (it
    /// travels in an HTTP header).
    pub fn load(path: &Path) -> Result<PublishToken, String> {
        let token = read_secret_file(path)?;
        if !token.iter().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "{}: the token must be visible ASCII characters without spaces",
                path.display()
            ));
        }
        if token.len() < MIN_PUBLISH_TOKEN {
            return Err(format!(
                "{}: the token needs at least {MIN_PUBLISH_TOKEN} characters; make one with: openssl rand -hex 32",
                path.display()
            ));
        }
        Ok(PublishToken {
            digest: sha256(&token),
        })
    }

    pub fn matches(&self, presented: &[u8]) -> bool {
        bool::from(sha256(presented).ct_eq(&self.digest))
    }

    /// Whether the request's `Authorization: Bearer` carries this token.
    pub fn authorizes(&self, h: &HeaderMap) -> bool {
        h.get_all(header::AUTHORIZATION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(bearer_token)
            .any(|t| self.matches(t.as_bytes()))
    }
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_sources_in_order() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; tok=from-cookie; b=2"),
        );
        assert_eq!(find_token(&h, None, Some("tok")), Some("from-cookie"));
        assert_eq!(find_token(&h, None, None), None, "no cookie configured");
        assert_eq!(
            find_token(&h, Some("x=1&access_token=from-query"), Some("tok")),
            Some("from-query")
        );
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer from-header"),
        );
        assert_eq!(
            find_token(&h, Some("access_token=q"), Some("tok")),
            Some("from-header")
        );
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic xyz"));
        assert_eq!(find_token(&h, Some("access_token=q"), None), Some("q"));
    }

    #[test]
    fn publish_token_compare() {
        let dir = tempfile::tempdir().expect("test setup");
        let p = dir.path().join("t");
        std::fs::write(&p, "0123456789abcdef0123\n").expect("test setup");
        let t = PublishToken::load(&p).expect("test setup");
        assert!(t.matches(b"0123456789abcdef0123"));
        assert!(!t.matches(b"0123456789abcdef012"));
        assert!(!t.matches(b""));
        std::fs::write(&p, "short\n").expect("test setup");
        assert!(PublishToken::load(&p).unwrap_err().contains("at least 16"));
        std::fs::write(&p, "\n").expect("test setup");
        assert!(PublishToken::load(&p).unwrap_err().contains("empty"));
        assert!(format!("{t:?}").contains(".."));
    }
}
