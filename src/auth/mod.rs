//! Who may subscribe and publish.
//!
//! A push location may ask two questions before a subscription starts, both once per
//! subscription (WebSocket and SSE at connect, long-poll at every request), never per message:
//! - JWT (`[push.jwt]`, `jwt.rs`): a signed token that names the channels it may read
//!   (`crier.subscribe`) and those it may publish to (`crier.publish`);
//! - forward auth (`auth_request`, `forward.rs`): a GET to the upstream app with the subscriber's
//!   credentials; the app's 2xx allows, its 401/403 reach the subscriber as they are, and
//!   anything else (an error, no answer in time) is 503: never an open door.
//!
//! A WebSocket client that sends a message (`client_messages`) is asked the same questions
//! for the action `publish`, once per channel and connection.
//!
//! The Origin check runs before both (in `push::admission`), so a cross-site page never makes
//! crier send the victim's cookies to the app. The keys (JWT verification keys) come from
//! [`crate::keys`], read after the config validated.

pub mod forward;
pub mod jwt;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};

use crate::config::{Config, PushLocation};
use crate::keys::{bearer_token, Keys};
use crate::metrics::{AuthMethod, AuthResult, Metrics};
use crate::model::ConnInfo;
use crate::response::{self, Body};
use forward::{AuthCache, ForwardAuth};
use jwt::{JwtRejection, JwtVerifier};

/// What a check is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Reading a channel: every subscription.
    Subscribe,
    /// Publishing to it: a WebSocket client's message (`client_messages`).
    Publish,
}

impl Action {
    /// As forward auth says it (`X-Crier-Action`).
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Subscribe => "subscribe",
            Action::Publish => "publish",
        }
    }
}

/// What the checks see of a subscriber's request.
pub struct Ask<'a> {
    pub action: Action,
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
            response::add_cors(r.headers_mut(), origin);
        }
        r
    }
}

/// The subscriber checks of one config: the forward-auth client (pooled, to the upstream),
/// the JWT verifiers and the per-location caches. Rebuilt on reload, which also empties the
/// caches.
pub struct Gatekeeper {
    forward: ForwardAuth,
    /// By location path: the locations with `[push.jwt]`.
    verifiers: HashMap<String, JwtVerifier>,
    /// By location path, for the locations with `auth_cache_ttl`.
    caches: HashMap<String, AuthCache>,
    metrics: Arc<Metrics>,
}

impl Gatekeeper {
    pub fn new(config: &Config, keys: &Keys, metrics: Arc<Metrics>) -> Gatekeeper {
        let caches = config
            .push
            .iter()
            .filter_map(|loc| {
                let ttl = loc.forward_auth.as_ref()?.cache_ttl?;
                Some((loc.path.clone(), AuthCache::new(ttl)))
            })
            .collect();
        let verifiers = config
            .push
            .iter()
            .filter_map(|loc| {
                let j = loc.jwt.as_ref()?;
                let key = keys.jwt.get(&loc.path)?.clone();
                Some((loc.path.clone(), JwtVerifier::new(key, j.leeway)))
            })
            .collect();
        Gatekeeper {
            forward: ForwardAuth::new(&config.upstream),
            verifiers,
            caches,
            metrics,
        }
    }

    /// Whether `loc` checks subscribers at all.
    pub fn guards(loc: &PushLocation) -> bool {
        loc.jwt.is_some() || loc.forward_auth.is_some()
    }

    /// Runs the location's checks: JWT first (local, cheap), then forward auth. Both must pass.
    /// Ok holds when the permission ends (a JWT's `exp` plus leeway), if it does: an open
    /// stream must end then.
    pub async fn check(
        &self,
        loc: &PushLocation,
        channel: &str,
        ask: &Ask<'_>,
    ) -> Result<Option<std::time::SystemTime>, Denial> {
        let mut until = None;
        if let Some(j) = &loc.jwt {
            // Keys are loaded with the config that made this gatekeeper: a location without
            // its verifier cannot happen, and would fail closed.
            let Some(verifier) = self.verifiers.get(&loc.path) else {
                return Err(Denial::unavailable());
            };
            let token = find_token(ask.headers, ask.query, j.cookie.as_deref());
            let verdict = match token {
                None => Err(JwtRejection::Missing),
                Some(t) => verifier.verify(&t, channel, ask.action),
            };
            match verdict {
                Err(e) => {
                    self.metrics.auth_check(AuthMethod::Jwt, AuthResult::Deny);
                    return Err(jwt_denial(&e));
                }
                Ok(exp) => until = Some(exp),
            }
            self.metrics.auth_check(AuthMethod::Jwt, AuthResult::Allow);
        }
        if let Some(fa) = &loc.forward_auth {
            let cache = self.caches.get(&loc.path);
            let key = cache.map(|_| forward::cache_key(ask.headers, channel, ask.action));
            if let (Some(cache), Some(key)) = (cache, &key) {
                if let Some(v) = cache.get(key) {
                    self.metrics.auth_cache_hits.inc();
                    return v.map(|()| until).map_err(|d| (*d).clone());
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
            return verdict.into_result().map(|()| until);
        }
        Ok(until)
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
        JwtRejection::ChannelNotAllowed | JwtRejection::PublishNotAllowed => Denial::bearer(
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
) -> Option<Cow<'a, str>> {
    let bearer = h
        .get_all(header::AUTHORIZATION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(bearer_token)
        .map(Cow::Borrowed);
    let from_query = || crate::query::param(query, "access_token").filter(|v| !v.is_empty());
    let from_cookie = || {
        let name = cookie?;
        h.get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|s| s.split(';'))
            .filter_map(|c| c.trim().split_once('='))
            .find(|(k, v)| *k == name && !v.is_empty())
            .map(|(_, v)| Cow::Borrowed(v.trim_matches('"')))
    };
    bearer.or_else(from_query).or_else(from_cookie)
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
        assert_eq!(
            find_token(&h, None, Some("tok")).as_deref(),
            Some("from-cookie")
        );
        assert_eq!(find_token(&h, None, None), None, "no cookie configured");
        assert_eq!(
            find_token(&h, Some("x=1&access_token=from-query"), Some("tok")).as_deref(),
            Some("from-query")
        );
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer from-header"),
        );
        assert_eq!(
            find_token(&h, Some("access_token=q"), Some("tok")).as_deref(),
            Some("from-header")
        );
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic xyz"));
        assert_eq!(
            find_token(&h, Some("access_token=q"), None).as_deref(),
            Some("q")
        );
    }
}
