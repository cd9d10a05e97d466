//! Push with no publish call: `[[publish_on]]` (publish when a matching proxied write
//! succeeds) and `[[poll]]` (poll an upstream URL, publish when its answer changes). The raw
//! serde input, the typed values and their validation.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};
use serde::Deserialize;
use toml::Spanned;

use super::raw::S;
use super::validate::{resolve, Validator};
use crate::model::{is_channel_char, ChannelName};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPublishOn {
    pub(super) name: Option<S<String>>,
    pub(super) method: Option<S<Vec<S<String>>>>,
    pub(super) path: S<String>,
    pub(super) status: Option<S<RawStatus>>,
    pub(super) channel: S<String>,
    pub(super) body: Option<S<String>>,
    pub(super) event: Option<S<String>>,
    pub(super) content_type: Option<S<String>>,
}

/// `status = "2xx"` or `status = [200, 201]`.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum RawStatus {
    Class(String),
    List(Vec<i64>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPoll {
    pub(super) name: Option<S<String>>,
    pub(super) url: S<String>,
    pub(super) channel: S<String>,
    pub(super) interval: Option<S<String>>,
    pub(super) timeout: Option<S<String>>,
    pub(super) only_while_subscribed: Option<S<bool>>,
    pub(super) linger: Option<S<String>>,
    pub(super) event: Option<S<String>>,
    pub(super) headers: Option<S<BTreeMap<String, S<String>>>>,
    pub(super) headers_file: Option<S<String>>,
}

/// A path template: `/api/orders/{id}`. Each `{name}` is one whole, non-empty path segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate {
    pub text: String,
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Capture(String),
}

impl PathTemplate {
    /// `/a/{x}/b` → a template; an error says what is wrong with it.
    pub fn parse(s: &str) -> Result<PathTemplate, String> {
        let Some(rest) = s.strip_prefix('/') else {
            return Err(format!("{s:?} is a path like \"/api/orders/{{id}}\""));
        };
        if s.contains(['?', '#']) {
            return Err(format!(
                "{s:?}: no query or fragment (the path alone is matched)"
            ));
        }
        let mut segments = Vec::new();
        for seg in rest.split('/') {
            if let Some(name) = seg.strip_prefix('{').and_then(|n| n.strip_suffix('}')) {
                let ok =
                    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !ok {
                    return Err(format!(
                        "{seg:?}: a capture is {{name}} with name of A-Z a-z 0-9 _"
                    ));
                }
                if segments.contains(&Segment::Capture(name.to_string())) {
                    return Err(format!("{{{name}}} is captured twice"));
                }
                segments.push(Segment::Capture(name.to_string()));
            } else if seg.contains(['{', '}']) {
                return Err(format!(
                    "{seg:?}: a capture is a whole path segment, like /orders/{{id}}"
                ));
            } else {
                segments.push(Segment::Literal(seg.to_string()));
            }
        }
        Ok(PathTemplate {
            text: s.to_string(),
            segments,
        })
    }

    /// The captured segments, in template order, when `path` (without query) matches.
    pub fn captures<'p>(&self, path: &'p str) -> Option<Vec<&'p str>> {
        let rest = path.strip_prefix('/')?;
        let mut out = Vec::new();
        let mut parts = rest.split('/');
        for seg in &self.segments {
            let part = parts.next()?;
            match seg {
                Segment::Literal(l) if l == part => {}
                Segment::Literal(_) => return None,
                Segment::Capture(_) if part.is_empty() => return None,
                Segment::Capture(_) => out.push(part),
            }
        }
        parts.next().is_none().then_some(out)
    }

    fn capture_index(&self, name: &str) -> Option<usize> {
        self.segments
            .iter()
            .filter(|s| matches!(s, Segment::Capture(_)))
            .position(|s| matches!(s, Segment::Capture(n) if n == name))
    }
}

/// A channel name over a path's captures: `orders.{id}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameTemplate {
    pieces: Vec<Piece>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    /// The index of a capture of the path template.
    Capture(usize),
}

impl NameTemplate {
    fn parse(s: &str, path: &PathTemplate) -> Result<NameTemplate, String> {
        let mut pieces = Vec::new();
        let mut rest = s;
        while !rest.is_empty() {
            match rest.find('{') {
                None => {
                    pieces.push(Piece::Text(rest.to_string()));
                    break;
                }
                Some(i) => {
                    if i > 0 {
                        pieces.push(Piece::Text(rest[..i].to_string()));
                    }
                    let Some(end) = rest[i..].find('}') else {
                        return Err(format!("{s:?}: unclosed {{"));
                    };
                    let name = &rest[i + 1..i + end];
                    let Some(idx) = path.capture_index(name) else {
                        return Err(format!(
                            "{{{name}}} is not captured by path {:?}",
                            path.text
                        ));
                    };
                    pieces.push(Piece::Capture(idx));
                    rest = &rest[i + end + 1..];
                }
            }
        }
        for p in &pieces {
            if let Piece::Text(t) = p {
                if !t.chars().all(is_channel_char) {
                    return Err(format!(
                        "{s:?}: a channel name holds only A-Z a-z 0-9 . _ - : ~ (and {{captures}})"
                    ));
                }
            }
        }
        if pieces.is_empty() {
            return Err("needs a channel name".into());
        }
        Ok(NameTemplate { pieces })
    }

    /// The channel for these captures; an error when a capture makes it no channel name.
    pub fn render(&self, captures: &[&str]) -> Result<ChannelName, String> {
        let mut s = String::new();
        for p in &self.pieces {
            match p {
                Piece::Text(t) => s.push_str(t),
                Piece::Capture(i) => s.push_str(captures.get(*i).copied().unwrap_or("")),
            }
        }
        ChannelName::new(&s).map_err(|e| format!("{e} ({s:?})"))
    }
}

/// Which upstream statuses publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatusMatch {
    /// `"2xx"`: 200..=299 (the class digit).
    Class(u16),
    List(Vec<u16>),
}

impl StatusMatch {
    pub fn matches(&self, status: u16) -> bool {
        match self {
            StatusMatch::Class(c) => status / 100 == *c,
            StatusMatch::List(l) => l.contains(&status),
        }
    }
}

/// What a `[[publish_on]]` message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodySource {
    /// The upstream's response body (the default).
    Response,
    /// The client's request body.
    Request,
    /// `{"method","path","status"}` as JSON.
    None,
}

/// One `[[publish_on]]` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishOnConfig {
    /// The `rule` metric label: `name`, else the path template.
    pub name: String,
    pub methods: Vec<Method>,
    pub path: PathTemplate,
    pub status: StatusMatch,
    pub channel: NameTemplate,
    pub body: BodySource,
    /// Overrides a `Crier-Event` header of the response (or request).
    pub event: Option<String>,
    /// Overrides the response's (or request's) `Content-Type`.
    pub content_type: Option<HeaderValue>,
}

/// One `[[poll]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PollConfig {
    /// The `poll` metric label and log name: `name`, else the channel.
    pub name: String,
    /// Path and query on the upstream.
    pub url: String,
    pub channel: ChannelName,
    pub interval: Duration,
    /// Bounds one poll (connect, response, body).
    pub timeout: Duration,
    pub only_while_subscribed: bool,
    /// With `only_while_subscribed`: how long polling goes on after the last subscriber left.
    pub linger: Duration,
    pub event: Option<String>,
    /// Sent with every poll (`headers` and `headers_file`, read at validation).
    pub headers: PollHeaders,
}

/// A poll's headers. They may hold credentials, so `Debug` shows their names only.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct PollHeaders(pub Vec<(HeaderName, HeaderValue)>);

impl std::fmt::Debug for PollHeaders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(k, _)| k))
            .finish()
    }
}

const DEFAULT_METHODS: [Method; 4] = [Method::POST, Method::PUT, Method::PATCH, Method::DELETE];

/// `Crier-Event`'s rule: 1 to 64 characters of `A-Z a-z 0-9 . _ - :`.
pub fn is_event_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'))
}

impl Validator<'_> {
    pub(super) fn publish_on_rules(
        &mut self,
        raw: Option<S<Vec<S<RawPublishOn>>>>,
    ) -> Vec<PublishOnConfig> {
        let mut out: Vec<PublishOnConfig> = Vec::new();
        for r in raw.map(Spanned::into_inner).unwrap_or_default() {
            let at = Spanned::clone(&r.get_ref().path);
            if let Some(c) = self.publish_on(r.into_inner()) {
                if out.iter().any(|o| o.name == c.name) {
                    self.err(
                        "publish_on.path",
                        &at,
                        format!(
                            "two rules are both named {:?}; give one a distinct `name`",
                            c.name
                        ),
                    );
                }
                out.push(c);
            }
        }
        out
    }

    fn publish_on(&mut self, r: RawPublishOn) -> Option<PublishOnConfig> {
        let path = match PathTemplate::parse(r.path.get_ref()) {
            Ok(p) => Some(p),
            Err(e) => {
                self.err("publish_on.path", &r.path, e);
                None
            }
        };
        let channel = path.as_ref().and_then(|p| {
            NameTemplate::parse(r.channel.get_ref(), p)
                .map_err(|e| self.err("publish_on.channel", &r.channel, e))
                .ok()
        });
        let methods = match r.method {
            None => DEFAULT_METHODS.to_vec(),
            Some(list) => {
                if list.get_ref().is_empty() {
                    self.err("publish_on.method", &list, "needs at least one method");
                }
                let mut out = Vec::new();
                for m in list.into_inner() {
                    let ok = !m.get_ref().is_empty()
                        && m.get_ref().bytes().all(|b| b.is_ascii_uppercase());
                    match Method::from_bytes(m.get_ref().as_bytes()) {
                        Ok(method) if ok => out.push(method),
                        _ => self.err(
                            "publish_on.method",
                            &m,
                            format!("{:?} is not a method like \"POST\"", m.get_ref()),
                        ),
                    }
                }
                out
            }
        };
        let status = match r.status {
            None => StatusMatch::Class(2),
            Some(s) => match s.get_ref() {
                RawStatus::Class(c) => {
                    let b = c.as_bytes();
                    if b.len() == 3 && (b'1'..=b'5').contains(&b[0]) && &c[1..] == "xx" {
                        StatusMatch::Class(u16::from(b[0] - b'0'))
                    } else {
                        self.err(
                            "publish_on.status",
                            &s,
                            format!("{c:?} is neither a class like \"2xx\" nor a list of codes"),
                        );
                        StatusMatch::Class(2)
                    }
                }
                RawStatus::List(l) => {
                    if l.is_empty() || l.iter().any(|c| !(100..=599).contains(c)) {
                        self.err(
                            "publish_on.status",
                            &s,
                            "a list of status codes (100 to 599), like [200, 201]",
                        );
                    }
                    StatusMatch::List(l.iter().map(|c| *c as u16).collect())
                }
            },
        };
        let body = match r.body.as_ref().map(|b| b.get_ref().as_str()) {
            None | Some("response") => BodySource::Response,
            Some("request") => BodySource::Request,
            Some("none") => BodySource::None,
            Some(other) => {
                if let Some(b) = &r.body {
                    self.err(
                        "publish_on.body",
                        b,
                        format!("{other:?} is none of \"response\", \"request\", \"none\""),
                    );
                }
                BodySource::Response
            }
        };
        let event = self.event_name("publish_on.event", r.event);
        let content_type = r.content_type.and_then(|c| {
            HeaderValue::from_str(c.get_ref())
                .ok()
                .filter(|_| !c.get_ref().is_empty())
                .or_else(|| {
                    self.err("publish_on.content_type", &c, "is not a header value");
                    None
                })
        });
        let name = match &r.name {
            Some(n) => {
                self.label("publish_on.name", n);
                n.get_ref().clone()
            }
            None => r.path.get_ref().clone(),
        };
        Some(PublishOnConfig {
            name,
            methods,
            path: path?,
            status,
            channel: channel?,
            body,
            event,
            content_type,
        })
    }

    fn event_name(&mut self, key: &str, v: Option<S<String>>) -> Option<String> {
        let v = v?;
        if !is_event_name(v.get_ref()) {
            self.err(key, &v, "1 to 64 characters of A-Z a-z 0-9 . _ - :");
            return None;
        }
        Some(v.into_inner())
    }

    fn label(&mut self, key: &str, n: &S<String>) {
        let ok = !n.get_ref().is_empty()
            && n.get_ref().len() <= 128
            && !n.get_ref().chars().any(char::is_control);
        if !ok {
            self.err(key, n, "1 to 128 printable characters");
        }
    }

    pub(super) fn polls(
        &mut self,
        raw: Option<S<Vec<S<RawPoll>>>>,
        base: &Path,
    ) -> Vec<PollConfig> {
        let mut out: Vec<PollConfig> = Vec::new();
        for p in raw.map(Spanned::into_inner).unwrap_or_default() {
            let at = Spanned::clone(&p.get_ref().url);
            if let Some(c) = self.poll(p.into_inner(), base) {
                if out.iter().any(|o| o.name == c.name) {
                    self.err(
                        "poll.url",
                        &at,
                        format!(
                            "two polls are both named {:?}; give one a distinct `name` (or channel)",
                            c.name
                        ),
                    );
                }
                out.push(c);
            }
        }
        out
    }

    fn poll(&mut self, p: RawPoll, base: &Path) -> Option<PollConfig> {
        let url = p.url.get_ref();
        let url_ok = url.starts_with('/') && url.parse::<http::uri::PathAndQuery>().is_ok();
        if !url_ok {
            self.err(
                "poll.url",
                &p.url,
                "is a path (and query) on the upstream, like \"/api/scoreboard\"",
            );
        }
        let channel = ChannelName::new(p.channel.get_ref())
            .map_err(|e| self.err("poll.channel", &p.channel, e))
            .ok();
        let interval = self.duration("poll.interval", p.interval, Duration::from_secs(2));
        let timeout = self.duration("poll.timeout", p.timeout, Duration::from_secs(5));
        let only_while_subscribed = p
            .only_while_subscribed
            .as_ref()
            .is_none_or(|b| *b.get_ref());
        if let (Some(l), false) = (&p.linger, only_while_subscribed) {
            self.err(
                "poll.linger",
                l,
                "only applies with only_while_subscribed = true",
            );
        }
        let linger = self.duration("poll.linger", p.linger, Duration::from_secs(30));
        let event = self.event_name("poll.event", p.event);
        let mut headers = Vec::new();
        for (k, v) in p.headers.map(Spanned::into_inner).unwrap_or_default() {
            match parse_header(&k, v.get_ref()) {
                Ok(h) => headers.push(h),
                Err(e) => self.err("poll.headers", &v, e),
            }
        }
        if let Some(f) = &p.headers_file {
            let path = resolve(base, f.get_ref());
            match std::fs::read_to_string(&path) {
                Err(e) => self.err("poll.headers_file", f, format!("{}: {e}", path.display())),
                Ok(text) => {
                    for line in text
                        .lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    {
                        let parsed = line
                            .split_once(':')
                            .ok_or_else(|| "a line is not \"Name: value\"".to_string())
                            .and_then(|(k, v)| parse_header(k.trim(), v.trim()));
                        match parsed {
                            Ok(h) => headers.push(h),
                            // The line itself may be a secret: it is not repeated.
                            Err(e) => {
                                self.err("poll.headers_file", f, format!("{}: {e}", path.display()))
                            }
                        }
                    }
                }
            }
        }
        let name = match &p.name {
            Some(n) => {
                self.label("poll.name", n);
                n.get_ref().clone()
            }
            None => p.channel.get_ref().clone(),
        };
        Some(PollConfig {
            name,
            url: p.url.into_inner(),
            channel: channel?,
            interval,
            timeout,
            only_while_subscribed,
            linger,
            event,
            headers: PollHeaders(headers),
        })
        .filter(|_| url_ok)
    }
}

fn parse_header(name: &str, value: &str) -> Result<(HeaderName, HeaderValue), String> {
    let n = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("{name:?} is not a header name"))?;
    let v = HeaderValue::from_str(value)
        .map_err(|_| format!("the value of {name:?} is not a header value"))?;
    Ok((n, v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn errs(text: &str) -> String {
        Config::from_toml(text, Some(Path::new("c.toml")))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn path_templates_capture_whole_segments() {
        let t = PathTemplate::parse("/api/orders/{id}/items/{item}").expect("valid");
        assert_eq!(t.captures("/api/orders/7/items/x"), Some(vec!["7", "x"]));
        assert_eq!(t.captures("/api/orders/7/items/"), None);
        assert_eq!(t.captures("/api/orders/7/items/x/y"), None);
        assert_eq!(t.captures("/api/orders/7"), None);
        assert_eq!(t.captures("/api/order/7/items/x"), None);
        let plain = PathTemplate::parse("/api/orders").expect("valid");
        assert_eq!(plain.captures("/api/orders"), Some(vec![]));
        assert_eq!(plain.captures("/api/orders/"), None);
        for bad in [
            "api",
            "/a/{}",
            "/a/x{id}",
            "/a/{id}/{id}",
            "/a?x=1",
            "/a/{i-d}",
        ] {
            assert!(PathTemplate::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn channel_templates_render_captures() {
        let p = PathTemplate::parse("/shops/{shop}/orders/{id}").expect("valid");
        let t = NameTemplate::parse("orders.{shop}.{id}", &p).expect("valid");
        assert_eq!(
            t.render(&["s1", "42"]).expect("ok").as_str(),
            "orders.s1.42"
        );
        assert!(
            t.render(&["s 1", "42"]).is_err(),
            "a capture that is no channel name"
        );
        assert!(NameTemplate::parse("orders.{nope}", &p).is_err());
        assert!(NameTemplate::parse("orders {id}", &p).is_err());
        assert!(NameTemplate::parse("orders.{id", &p).is_err());
    }

    #[test]
    fn publish_on_defaults_and_errors() {
        let c = Config::from_toml(
            "[[publish_on]]\npath = \"/api/orders/{id}\"\nchannel = \"orders.{id}\"\n",
            None,
        )
        .expect("valid");
        let r = &c.publish_on[0];
        assert_eq!(r.methods, DEFAULT_METHODS.to_vec());
        assert_eq!(r.status, StatusMatch::Class(2));
        assert_eq!(r.body, BodySource::Response);
        assert_eq!(r.name, "/api/orders/{id}");
        assert!(r.status.matches(204) && !r.status.matches(302));

        let e = errs("[[publish_on]]\npath = \"orders\"\nchannel = \"x\"\nmethod = [\"post\"]\nstatus = \"2xy\"\nbody = \"all\"\nevent = \"a b\"\n");
        let lines: Vec<_> = e.lines().collect();
        assert_eq!(lines.len(), 5, "{e}");
        assert!(lines[0].starts_with("c.toml:2:8: publish_on.path"), "{e}");
        assert!(
            lines[1].starts_with("c.toml:4:11: publish_on.method: \"post\""),
            "{e}"
        );
        assert!(
            lines[2].starts_with("c.toml:5:10: publish_on.status: \"2xy\""),
            "{e}"
        );
        assert!(
            lines[3].starts_with("c.toml:6:8: publish_on.body: \"all\""),
            "{e}"
        );
        assert!(lines[4].starts_with("c.toml:7:9: publish_on.event"), "{e}");
        let e = errs(
            "[[publish_on]]\npath = \"/o/{id}\"\nchannel = \"o.{oid}\"\nstatus = [200, 700]\n",
        );
        assert!(
            e.contains("publish_on.channel: {oid} is not captured"),
            "{e}"
        );
        assert!(
            e.contains("publish_on.status: a list of status codes"),
            "{e}"
        );
    }

    #[test]
    fn poll_defaults_and_errors() {
        let c = Config::from_toml(
            "[[poll]]\nurl = \"/api/score?x=1\"\nchannel = \"score\"\nheaders = { Authorization = \"Bearer t\" }\n",
            None,
        )
        .expect("valid");
        let p = &c.polls[0];
        assert_eq!(p.interval, Duration::from_secs(2));
        assert!(p.only_while_subscribed);
        assert_eq!(p.headers.0[0].0.as_str(), "authorization");
        assert_eq!(
            format!("{:?}", p.headers),
            "[\"authorization\"]",
            "no secret in Debug"
        );
        let e = errs("[[poll]]\nurl = \"http://x/\"\nchannel = \"a b\"\ninterval = \"0s\"\nonly_while_subscribed = false\nlinger = \"5s\"\n");
        let lines: Vec<_> = e.lines().collect();
        assert_eq!(lines.len(), 4, "{e}");
        assert!(lines[0].starts_with("c.toml:2:7: poll.url"), "{e}");
        assert!(lines[1].starts_with("c.toml:3:11: poll.channel"), "{e}");
        assert!(lines[2].starts_with("c.toml:4:12: poll.interval"), "{e}");
        assert!(lines[3].starts_with("c.toml:6:10: poll.linger"), "{e}");
        let e = errs("[[poll]]\nurl = \"/a\"\nchannel = \"a\"\n[[poll]]\nurl = \"/b\"\nchannel = \"a\"\nheaders_file = \"/nonexistent/h\"\n");
        assert!(e.contains("two polls are both named \"a\""), "{e}");
        assert!(e.contains("poll.headers_file: /nonexistent/h"), "{e}");

        let dir = tempfile::tempdir().expect("test setup");
        let f = dir.path().join("h");
        std::fs::write(&f, "# the app's key\nX-Token: s3cret\n\n").expect("test setup");
        let toml = format!(
            "[[poll]]\nurl = \"/a\"\nchannel = \"a\"\nheaders_file = \"{}\"\n",
            f.display()
        );
        let c = Config::from_toml(&toml, None).expect("valid");
        assert_eq!(c.polls[0].headers.0.len(), 1);
        assert_eq!(c.polls[0].headers.0[0].1, "s3cret");
        std::fs::write(&f, "X-Token s3cret\n").expect("test setup");
        let e = errs(&toml);
        assert!(e.contains("a line is not") && !e.contains("s3cret"), "{e}");
    }
}
