//! Forwarded client messages (`client_messages = "forward"`): a frame a WebSocket client sends
//! is POSTed to the upstream app at the owning location's `forward_to`, and a 2xx answer's
//! body goes back to that client as a frame. The small, plain-HTTP cousin of Pushpin's
//! WebSocket-over-HTTP: the app answers one message at a time and publishes to channels
//! through the publish API as usual; it gets no open/close events and cannot steer the
//! connection from its answer.
//!
//! The request is built from scratch, like forward auth's (see `inbound::forward_headers`), so
//! a client cannot smuggle a header the app might trust. Each connection sends its messages
//! one at a time, in the order the client sent them (see `inbound`); this client only makes
//! the exchange, bounded by the upstream's `response_timeout`.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;

use crate::config::UpstreamConfig;
use crate::proxy::{self, UpstreamConnector};

/// The most of an answer's body passed back to the client; a larger answer is an error (the
/// client's frame limit is small too: this is a reply to one message, not a download).
pub const MAX_REPLY: usize = 1 << 20;

/// One client message to POST.
pub struct Job {
    /// Path and query on the upstream (`forward_to` with the channel in it).
    pub target: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// The app's 2xx answer.
pub struct Reply {
    pub content_type: Option<HeaderValue>,
    pub body: Bytes,
}

/// Why a forwarded message did not get a 2xx answer (the client sees this line).
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("the app did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the app is unreachable or failed")]
    Upstream(#[from] hyper_util::client::legacy::Error),
    #[error("the app answered {status}{detail}")]
    Status { status: u16, detail: String },
    #[error("the app's answer is larger than {MAX_REPLY} bytes or broke off")]
    Body,
    #[error("bad forward request: {0}")]
    Request(#[from] http::Error),
}

/// The pooled client that POSTs client messages. Its own pool: a chat message never waits
/// behind a proxied download for a connection.
pub struct Relay {
    client: Client<UpstreamConnector, Full<Bytes>>,
    base: String,
    timeout: Duration,
}

impl Relay {
    pub fn new(cfg: &UpstreamConfig) -> Relay {
        let (client, base) = proxy::upstream_client(cfg);
        Relay {
            client,
            base,
            timeout: cfg.response_timeout,
        }
    }

    /// POSTs one message and reads the answer, within the upstream's `response_timeout`.
    pub async fn post(&self, job: Job) -> Result<Reply, RelayError> {
        match tokio::time::timeout(self.timeout, self.exchange(job)).await {
            Ok(r) => r,
            Err(_) => Err(RelayError::Timeout(self.timeout)),
        }
    }

    async fn exchange(&self, job: Job) -> Result<Reply, RelayError> {
        let uri: Uri = format!("{}{}", self.base, job.target)
            .parse()
            .map_err(http::Error::from)?;
        let mut req = Request::post(uri).body(Full::new(job.body))?;
        *req.headers_mut() = job.headers;
        let resp = self.client.request(req).await?;
        let status = resp.status();
        let content_type = resp.headers().get(header::CONTENT_TYPE).cloned();
        let body = Limited::new(resp.into_body(), MAX_REPLY).collect().await;
        if !status.is_success() {
            // The first line of the app's answer says why, when it says anything.
            let detail = body
                .ok()
                .map(|b| b.to_bytes())
                .and_then(|b| {
                    let text = String::from_utf8_lossy(&b);
                    let line = text.lines().next().unwrap_or("").trim();
                    (!line.is_empty()).then(|| format!(": {}", truncate(line, 100)))
                })
                .unwrap_or_default();
            return Err(RelayError::Status {
                status: status.as_u16(),
                detail,
            });
        }
        let body = body.map_err(|_| RelayError::Body)?.to_bytes();
        Ok(Reply { content_type, body })
    }
}

/// At most `max` bytes of `s`, cut at a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncates_at_a_character_boundary() {
        assert_eq!(truncate("abc", 5), "abc");
        assert_eq!(truncate("abcdef", 3), "abc");
        assert_eq!(truncate("aé", 2), "a", "é is two bytes");
    }
}
