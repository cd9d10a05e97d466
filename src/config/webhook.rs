//! `[[webhook]]` (crier calls out) and `[[ingress]]` (others publish by webhook): the raw
//! serde input, the typed values, and their validation. The secret files are read by `keys`
//! after validation (a missing or malformed one is a config error with its key and line, and
//! SIGHUP re-reads it).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::raw::S;
use super::validate::{resolve, Validator};
use super::{parse_duration, KeyFile, ServerConfig};
use crate::model::{is_channel_char, ChannelName, ChannelPattern};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWebhook {
    pub(super) name: Option<S<String>>,
    pub(super) url: S<String>,
    pub(super) allow_http: Option<S<bool>>,
    pub(super) events: Option<S<Vec<S<String>>>>,
    pub(super) channels: Option<S<Vec<S<String>>>>,
    pub(super) secret_file: Option<S<String>>,
    pub(super) timeout: Option<S<String>>,
    pub(super) retry: Option<S<Vec<S<String>>>>,
    pub(super) max_queue: Option<S<i64>>,
    pub(super) max_in_flight: Option<S<i64>>,
    pub(super) ca_file: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIngress {
    pub(super) path: S<String>,
    pub(super) channel: S<String>,
    pub(super) verify: S<String>,
    pub(super) secret_file: Option<S<String>>,
    pub(super) header: Option<S<String>>,
    pub(super) max_body: Option<S<String>>,
}

/// What a webhook is told about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookEvent {
    Message,
    Subscribe,
    Unsubscribe,
    ChannelDeleted,
}

impl WebhookEvent {
    pub const ALL: [WebhookEvent; 4] = [
        WebhookEvent::Message,
        WebhookEvent::Subscribe,
        WebhookEvent::Unsubscribe,
        WebhookEvent::ChannelDeleted,
    ];

    /// The `type` in the event body, and the name in `events = [...]`.
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookEvent::Message => "message",
            WebhookEvent::Subscribe => "subscribe",
            WebhookEvent::Unsubscribe => "unsubscribe",
            WebhookEvent::ChannelDeleted => "channel.deleted",
        }
    }
}

/// One `[[webhook]]`: an endpoint crier POSTs signed events to.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// The `webhook` metric label and the name in `/webhooks`: the `name` key, else the URL's
    /// host[:port] and path.
    pub name: String,
    pub url: http::Uri,
    /// Indexed by `WebhookEvent as usize`.
    pub events: [bool; 4],
    /// Empty: every channel.
    pub channels: Vec<ChannelPattern>,
    /// Holds the `whsec_` secret (the HMAC-SHA256 key), read by `keys`.
    pub secret_file: KeyFile,
    /// Bounds each attempt (connect, send, response).
    pub timeout: Duration,
    /// Delays after the first attempt; when they run out the event is given up.
    pub retry: Vec<Duration>,
    /// Undelivered events held; past it the oldest is dropped (and counted).
    pub max_queue: usize,
    /// Requests in flight at once, each for a different channel (a channel has one at a time,
    /// so each channel's events arrive in publish order).
    pub max_in_flight: usize,
    pub ca_file: Option<PathBuf>,
}

impl WebhookConfig {
    pub fn wants(&self, e: WebhookEvent) -> bool {
        self.events[e as usize]
    }

    pub fn wants_channel(&self, channel: &str) -> bool {
        self.channels.is_empty() || self.channels.iter().any(|p| p.matches(channel))
    }
}

/// Where an ingress request is published: literal text around at most one placeholder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelTemplate {
    pub prefix: String,
    pub source: ChannelSource,
    pub suffix: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelSource {
    /// No placeholder: the channel is `prefix`.
    Fixed,
    /// `{header:X-GitHub-Event}`
    Header(http::HeaderName),
    /// `{json:/repository/full_name}`: a JSON pointer into the body.
    Json(String),
}

/// How an ingress request proves who sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verify {
    /// Standard Webhooks: `webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64>`.
    Standard,
    /// GitHub: `X-Hub-Signature-256: sha256=<hex>`.
    Github,
    /// A named header holding the hex HMAC-SHA256 of the body (`sha256=` prefix allowed).
    HmacSha256 { header: http::HeaderName },
    /// Nothing: only allowed when every public listener is on loopback.
    None,
}

impl Verify {
    pub fn as_str(&self) -> &'static str {
        match self {
            Verify::Standard => "standard",
            Verify::Github => "github",
            Verify::HmacSha256 { .. } => "hmac-sha256",
            Verify::None => "none",
        }
    }
}

/// One `[[ingress]]`: a path on the public listener that publishes verified webhooks.
#[derive(Debug, Clone)]
pub struct IngressConfig {
    pub path: String,
    pub channel: ChannelTemplate,
    pub verify: Verify,
    /// The shared secret (read by `keys`); None only with `verify = "none"`.
    pub secret_file: Option<KeyFile>,
    pub max_body: usize,
}

const DEFAULT_RETRY: [u64; 5] = [5, 30, 120, 600, 3600];
/// One channel has one request in flight at a time, so an endpoint takes up to this many
/// events per round trip: 32 / 50 ms = 640 events/s from 32 or more busy channels (8 would
/// cap it at 160/s). Each is one kept-alive HTTP/1.1 connection to the receiver.
const DEFAULT_MAX_IN_FLIGHT: usize = 32;

impl Validator<'_> {
    pub(super) fn webhooks(
        &mut self,
        raw: Option<S<Vec<S<RawWebhook>>>>,
        base: &Path,
    ) -> Vec<WebhookConfig> {
        let mut out: Vec<WebhookConfig> = Vec::new();
        for w in raw.map(Spanned::into_inner).unwrap_or_default() {
            let at = Spanned::clone(&w.get_ref().url);
            if let Some(c) = self.webhook(w, base) {
                if out.iter().any(|o| o.name == c.name) {
                    self.err(
                        "webhook.url",
                        &at,
                        format!(
                            "two webhooks are both named {:?}; give one a distinct `name`",
                            c.name
                        ),
                    );
                }
                out.push(c);
            }
        }
        out
    }

    fn webhook(&mut self, w: S<RawWebhook>, base: &Path) -> Option<WebhookConfig> {
        let whole = w.span();
        let w = w.into_inner();
        let allow_http = w.allow_http.as_ref().is_some_and(|b| *b.get_ref());
        let url = match parse_webhook_url(w.url.get_ref(), allow_http) {
            Ok(u) => Some(u),
            Err(e) => {
                self.err("webhook.url", &w.url, e);
                None
            }
        };
        let name = match &w.name {
            Some(n) => {
                let ok = !n.get_ref().is_empty()
                    && n.get_ref().len() <= 128
                    && !n.get_ref().chars().any(char::is_control);
                if !ok {
                    self.err("webhook.name", n, "1 to 128 printable characters");
                }
                n.get_ref().clone()
            }
            None => url.as_ref().map(default_label).unwrap_or_default(),
        };
        let mut events = [true, false, false, false];
        if let Some(list) = w.events {
            events = [false; 4];
            if list.get_ref().is_empty() {
                self.err("webhook.events", &list, "needs at least one event");
            }
            for e in list.into_inner() {
                match WebhookEvent::ALL.iter().find(|k| k.as_str() == e.get_ref()) {
                    Some(k) => events[*k as usize] = true,
                    None => self.err(
                        "webhook.events",
                        &e,
                        format!(
                            "unknown event {:?} (message, subscribe, unsubscribe, channel.deleted)",
                            e.get_ref()
                        ),
                    ),
                }
            }
        }
        let mut channels = Vec::new();
        for c in w.channels.map(Spanned::into_inner).unwrap_or_default() {
            match ChannelPattern::new(c.get_ref()) {
                Ok(p) => channels.push(p),
                Err(e) => self.err("webhook.channels", &c, e),
            }
        }
        let timeout = self.duration("webhook.timeout", w.timeout, Duration::from_secs(5));
        let retry = match w.retry {
            None => DEFAULT_RETRY.map(Duration::from_secs).to_vec(),
            Some(list) => {
                if list.get_ref().len() > 100 {
                    self.err("webhook.retry", &list, "at most 100 delays");
                }
                let mut out = Vec::new();
                for d in list.into_inner() {
                    match parse_duration(d.get_ref()) {
                        Ok(v) => out.push(v),
                        Err(e) => self.err("webhook.retry", &d, e),
                    }
                }
                out
            }
        };
        let max_queue = self.count("webhook.max_queue", w.max_queue, (1, 10_000_000), 10_000);
        let max_in_flight = self.count(
            "webhook.max_in_flight",
            w.max_in_flight,
            (1, 1024),
            DEFAULT_MAX_IN_FLIGHT,
        );
        let ca_file = w.ca_file.map(|c| {
            let p = resolve(base, c.get_ref());
            if !p.is_file() {
                self.err(
                    "webhook.ca_file",
                    &c,
                    format!("{}: no such file", p.display()),
                );
            }
            p
        });
        let Some(secret_at) = w.secret_file else {
            self.err_at(
                "webhook",
                whole.start,
                "needs secret_file (a file holding \"whsec_<base64>\")",
            );
            return None;
        };
        let secret_file = self.key_file("webhook.secret_file", &secret_at, base);
        Some(WebhookConfig {
            name,
            url: url?,
            events,
            channels,
            secret_file,
            timeout,
            retry,
            max_queue,
            max_in_flight,
            ca_file,
        })
    }

    pub(super) fn ingresses(
        &mut self,
        raw: Option<S<Vec<S<RawIngress>>>>,
        server: &ServerConfig,
        base: &Path,
    ) -> Vec<IngressConfig> {
        let mut out: Vec<IngressConfig> = Vec::new();
        for i in raw.map(Spanned::into_inner).unwrap_or_default() {
            let at = Spanned::clone(&i.get_ref().path);
            if let Some(c) = self.ingress(i.into_inner(), server, base) {
                if out.iter().any(|o| o.path == c.path) {
                    self.err("ingress.path", &at, "the same path is used twice");
                }
                out.push(c);
            }
        }
        out
    }

    fn ingress(
        &mut self,
        i: RawIngress,
        server: &ServerConfig,
        base: &Path,
    ) -> Option<IngressConfig> {
        let path = i.path.get_ref().clone();
        let path_ok = path.starts_with('/')
            && !path.contains(['?', '#', '{', '}'])
            && path.parse::<http::uri::PathAndQuery>().is_ok();
        if !path_ok {
            self.err(
                "ingress.path",
                &i.path,
                "is an exact path like \"/hooks/github\" (no query, no {placeholders})",
            );
        }
        let channel = match parse_channel_template(i.channel.get_ref()) {
            Ok(t) => Some(t),
            Err(e) => {
                self.err("ingress.channel", &i.channel, e);
                None
            }
        };
        let max_body = self.size("ingress.max_body", i.max_body, 1 << 20);
        let verify = match i.verify.get_ref().as_str() {
            "standard" => Verify::Standard,
            "github" => Verify::Github,
            "hmac-sha256" => match &i.header {
                Some(h) => match http::HeaderName::from_bytes(h.get_ref().as_bytes()) {
                    Ok(name) => Verify::HmacSha256 { header: name },
                    Err(_) => {
                        self.err("ingress.header", h, "is not a header name");
                        return None;
                    }
                },
                None => {
                    self.err(
                        "ingress.verify",
                        &i.verify,
                        "\"hmac-sha256\" needs `header`: the header holding the hex signature",
                    );
                    return None;
                }
            },
            "none" => {
                let public = server
                    .listen
                    .iter()
                    .chain(server.tls.iter().flat_map(|t| t.listen.iter()));
                if let Some(a) = public.clone().find(|a| !a.ip().is_loopback()) {
                    self.err(
                        "ingress.verify",
                        &i.verify,
                        format!("\"none\" is only allowed when every public listener is on loopback ({a} is not)"),
                    );
                    return None;
                }
                Verify::None
            }
            other => {
                self.err(
                    "ingress.verify",
                    &i.verify,
                    format!("unknown scheme {other:?} (standard, github, hmac-sha256, none)"),
                );
                return None;
            }
        };
        if let (Some(h), false) = (&i.header, matches!(verify, Verify::HmacSha256 { .. })) {
            self.err(
                "ingress.header",
                h,
                "only applies with verify = \"hmac-sha256\"",
            );
        }
        let secret_file = match (&verify, i.secret_file) {
            (Verify::None, None) => None,
            (Verify::None, Some(s)) => {
                self.err(
                    "ingress.secret_file",
                    &s,
                    "verify = \"none\" takes no secret",
                );
                return None;
            }
            (_, None) => {
                self.err(
                    "ingress.verify",
                    &i.verify,
                    format!("{:?} needs secret_file", verify.as_str()),
                );
                return None;
            }
            (_, Some(s)) => Some(self.key_file("ingress.secret_file", &s, base)),
        };
        Some(IngressConfig {
            path,
            channel: channel?,
            verify,
            secret_file,
            max_body,
        })
        .filter(|_| path_ok)
    }
}

fn parse_webhook_url(s: &str, allow_http: bool) -> Result<http::Uri, String> {
    let uri: http::Uri = s
        .parse()
        .map_err(|_| format!("{s:?} is not a URL like \"https://hooks.example/crier\""))?;
    let host = uri
        .host()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| format!("{s:?} has no host"))?;
    match uri.scheme_str() {
        Some("https") => {}
        Some("http") => {
            let bare = host.trim_start_matches('[').trim_end_matches(']');
            let loopback =
                bare == "localhost" || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
            if !loopback && !allow_http {
                return Err(format!(
                    "{s:?}: http:// is only allowed to a loopback host; use https:// or set allow_http = true"
                ));
            }
        }
        _ => return Err(format!("{s:?}: the scheme must be https:// (or http://)")),
    }
    if s.contains('#') {
        return Err(format!("{s:?}: a webhook URL has no #fragment"));
    }
    Ok(uri)
}

/// `host[:port]/path` of a URL: the default metric label.
fn default_label(u: &http::Uri) -> String {
    let authority = u.authority().map_or("", |a| a.as_str());
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    format!("{authority}{}", u.path())
}

fn parse_channel_template(s: &str) -> Result<ChannelTemplate, String> {
    let literal_ok = |t: &str| t.chars().all(is_channel_char);
    let bad_literal = || {
        format!("{s:?}: a channel holds only A-Z a-z 0-9 . _ - : ~ besides one {{header:X}} or {{json:/pointer}}")
    };
    let Some(open) = s.find('{') else {
        if s.is_empty() || s.len() > ChannelName::MAX_LEN || !literal_ok(s) {
            return Err(bad_literal());
        }
        return Ok(ChannelTemplate {
            prefix: s.to_string(),
            source: ChannelSource::Fixed,
            suffix: String::new(),
        });
    };
    let close = s[open..]
        .find('}')
        .map(|i| open + i)
        .ok_or_else(|| format!("{s:?}: unclosed '{{'"))?;
    let (prefix, inner, suffix) = (&s[..open], &s[open + 1..close], &s[close + 1..]);
    if !literal_ok(prefix) || !literal_ok(suffix) {
        return Err(bad_literal());
    }
    let source = if let Some(h) = inner.strip_prefix("header:") {
        ChannelSource::Header(
            http::HeaderName::from_bytes(h.as_bytes())
                .map_err(|_| format!("{s:?}: {h:?} is not a header name"))?,
        )
    } else if let Some(p) = inner.strip_prefix("json:") {
        if !p.starts_with('/') {
            return Err(format!(
                "{s:?}: a JSON pointer starts with '/', like {{json:/repository/full_name}}"
            ));
        }
        ChannelSource::Json(p.to_string())
    } else {
        return Err(format!(
            "{s:?}: the placeholder is {{header:Name}} or {{json:/pointer}}"
        ));
    };
    Ok(ChannelTemplate {
        prefix: prefix.to_string(),
        source,
        suffix: suffix.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every problem of the config and the key files it names (what `crier check` prints).
    fn errs(text: &str) -> String {
        crate::keys::load_str(text, Some(Path::new("c.toml")))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    fn secret_file(dir: &Path, name: &str, text: &str) -> String {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write secret");
        p.display().to_string()
    }

    #[test]
    fn a_webhook_with_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = secret_file(dir.path(), "s", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n");
        let (c, keys) = crate::keys::load_str(
            &format!("[[webhook]]\nurl = \"http://127.0.0.1:9/hook?x=1\"\nsecret_file = \"{s}\"\n"),
            None,
        )
        .expect("valid");
        let w = &c.webhooks[0];
        assert_eq!(w.name, "127.0.0.1:9/hook");
        assert_eq!(w.events, [true, false, false, false]);
        assert!(w.wants_channel("anything"));
        assert_eq!(w.retry.len(), 5);
        assert_eq!(w.max_queue, 10_000);
        assert_eq!(w.max_in_flight, 32);
        assert_eq!(keys.webhooks[&w.name].0.len(), 24);
    }

    #[test]
    fn webhook_errors_name_key_and_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let good = secret_file(dir.path(), "good", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let bad = secret_file(dir.path(), "bad", "not-a-secret");
        let e = errs(&format!(
            "[[webhook]]\nurl = \"http://10.0.0.1/h\"\nsecret_file = \"{good}\"\nevents = [\"message\", \"publish\"]\nchannels = [\"a*b\"]\n\
             [[webhook]]\nurl = \"https://x.example/h\"\nsecret_file = \"{bad}\"\n\
             [[webhook]]\nurl = \"https://y.example/h\"\nsecret_file = \"/nonexistent/crier.secret\"\n\
             [[webhook]]\nurl = \"https://z.example/h\"\n"
        ));
        let lines: Vec<_> = e.lines().collect();
        assert_eq!(lines.len(), 6, "{e}");
        assert!(lines[0].starts_with("c.toml:2:7: webhook.url:"), "{e}");
        assert!(lines[0].contains("allow_http"), "{e}");
        assert!(
            lines[1].starts_with("c.toml:4:22: webhook.events: unknown event \"publish\""),
            "{e}"
        );
        assert!(
            lines[2].starts_with("c.toml:5:13: webhook.channels:"),
            "{e}"
        );
        assert!(
            lines[3].starts_with("c.toml:8:15: webhook.secret_file: bad secret format"),
            "{e}"
        );
        assert!(
            lines[4].starts_with(
                "c.toml:11:15: webhook.secret_file: /nonexistent/crier.secret: cannot read"
            ),
            "{e}"
        );
        assert!(
            lines[5].starts_with("c.toml:12:1: webhook: needs secret_file"),
            "{e}"
        );
        // allow_http lifts the loopback rule.
        assert!(errs(&format!(
            "[[webhook]]\nurl = \"http://10.0.0.1/h\"\nallow_http = true\nsecret_file = \"{good}\"\n"
        ))
        .is_empty());
    }

    #[test]
    fn ingress_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let gh = secret_file(dir.path(), "gh", "It's a Secret to Everybody\n");
        let (c, keys) = crate::keys::load_str(
            &format!(
                "[[ingress]]\npath = \"/hooks/gh\"\nchannel = \"gh.{{header:X-GitHub-Event}}\"\nverify = \"github\"\nsecret_file = \"{gh}\"\n\
                 [[ingress]]\npath = \"/hooks/open\"\nchannel = \"{{json:/repo/name}}\"\nverify = \"none\"\nmax_body = \"1KiB\"\n"
            ),
            None,
        )
        .expect("valid");
        assert_eq!(keys.ingress["/hooks/gh"].0.len(), 26);
        assert!(!keys.ingress.contains_key("/hooks/open"));
        assert_eq!(c.ingress[0].channel.prefix, "gh.");
        assert_eq!(c.ingress[0].max_body, 1 << 20);
        assert_eq!(c.ingress[1].verify, Verify::None);
        assert_eq!(
            c.ingress[1].channel.source,
            ChannelSource::Json("/repo/name".into())
        );
        assert_eq!(c.ingress[1].max_body, 1024);

        let e = errs(&format!(
            "[server]\nlisten = [\"0.0.0.0:80\"]\n\
             [[ingress]]\npath = \"/a\"\nchannel = \"x\"\nverify = \"none\"\n\
             [[ingress]]\npath = \"/b\"\nchannel = \"{{cookie:x}}\"\nverify = \"hmac-sha256\"\nsecret_file = \"{gh}\"\n\
             [[ingress]]\npath = \"/c\"\nchannel = \"c\"\nverify = \"rot13\"\n\
             [[ingress]]\npath = \"/d\"\nchannel = \"d\"\nverify = \"standard\"\nsecret_file = \"{gh}\"\n"
        ));
        let lines: Vec<_> = e.lines().collect();
        assert_eq!(lines.len(), 5, "{e}");
        assert!(
            lines[0].starts_with("c.toml:6:10: ingress.verify: \"none\" is only allowed"),
            "{e}"
        );
        assert!(lines[1].starts_with("c.toml:9:11: ingress.channel:"), "{e}");
        assert!(
            lines[2].starts_with("c.toml:10:10: ingress.verify: \"hmac-sha256\" needs `header`"),
            "{e}"
        );
        assert!(
            lines[3].starts_with("c.toml:15:10: ingress.verify: unknown scheme"),
            "{e}"
        );
        assert!(
            lines[4].starts_with("c.toml:20:15: ingress.secret_file: bad secret format"),
            "{e}"
        );
    }

    #[test]
    fn channel_templates() {
        assert!(parse_channel_template("a{header:X}b{json:/x}").is_err());
        assert!(parse_channel_template("{header:X").is_err());
        assert!(parse_channel_template("").is_err());
        assert!(parse_channel_template("a b").is_err());
        let t = parse_channel_template("{json:/a/b}.x").expect("valid");
        assert_eq!((t.prefix.as_str(), t.suffix.as_str()), ("", ".x"));
    }
}
