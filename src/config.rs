//! TOML → validated, typed [`Config`].
//!
//! Parsing happens in two steps: serde reads the file into `Raw*` structs that keep the
//! span of every value (`toml::Spanned`) and reject unknown keys, then [`Config::from_toml`]
//! validates each value and collects *every* problem, each naming the key and the
//! `line:column` it sits at, so an operator fixes a config in one pass.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::auth::jwt::{JwtAlgorithm, JwtVerifier};
use crate::auth::PublishToken;

/// The whole, validated configuration. Read by every module, written by none after load.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub publish: PublishConfig,
    pub channels: ChannelDefaults,
    pub push: Vec<PushLocation>,
    pub admin: AdminConfig,
    /// Where the config came from (None: built-in defaults), for reload and messages.
    pub source: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: Vec<SocketAddr>,
    pub tls: Option<TlsConfig>,
    /// Open client connections (all public listeners together); past it a new connection
    /// gets a 503 and is closed.
    pub max_connections: usize,
    /// Time a client has to send a whole request head; for HTTP/1.1 it also bounds the idle
    /// wait between keep-alive requests (slow-loris protection).
    pub header_timeout: Duration,
    /// Largest request head (request line + headers) accepted; larger gets 431.
    pub max_header_bytes: usize,
    /// Most request headers accepted; more gets 431.
    pub max_headers: usize,
    pub h2_max_concurrent_streams: u32,
    /// How long SIGTERM waits for in-flight proxied requests before exiting.
    pub shutdown_timeout: Duration,
    /// Runtime worker threads; 0 = one per core.
    pub worker_threads: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub listen: Vec<SocketAddr>,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamAddr {
    /// `http://host:port` (the authority as written).
    Http { authority: String },
    /// `unix:/path/to/app.sock`
    Unix(PathBuf),
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub url: UpstreamAddr,
    pub connect_timeout: Duration,
    /// Time from the request (head and whole body) sent to the upstream's response headers;
    /// past it 504. An upload still moving is never cut (see `Proxy::send`).
    pub response_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle: usize,
}

#[derive(Debug, Clone)]
pub struct PublishConfig {
    pub unix: Option<PathBuf>,
    pub unix_mode: u32,
    /// The group the socket file is given (`chown :group`), so the app's user can reach it.
    pub unix_group: Option<UnixGroup>,
    pub listen: Vec<SocketAddr>,
    /// When set, TCP publishes need `Authorization: Bearer <token>`; the Unix socket does not.
    pub token: Option<PublishToken>,
    /// Where `token` was read from (`crier publish` reads it too).
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixGroup {
    pub name: String,
    pub gid: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferPolicy {
    pub buffer_messages: usize,
    pub buffer_ttl: Duration,
}

#[derive(Debug, Clone)]
pub struct ChannelDefaults {
    pub buffer: BufferPolicy,
    pub max_message_size: usize,
    pub max_channels: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    WebSocket,
    Sse,
    LongPoll,
}

impl Transport {
    pub const ALL: [Transport; 3] = [Transport::WebSocket, Transport::Sse, Transport::LongPoll];

    pub fn as_str(self) -> &'static str {
        match self {
            Transport::WebSocket => "websocket",
            Transport::Sse => "sse",
            Transport::LongPoll => "longpoll",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstMessage {
    /// A subscriber without a position gets only what is published after it connects.
    Newest,
    /// A subscriber without a position first gets the whole buffer.
    Oldest,
}

/// One `[[push]]` location: a path template whose `{channel}` names the channel.
#[derive(Debug, Clone)]
pub struct PushLocation {
    pub path: String,
    /// The template split at `{channel}`.
    pub prefix: String,
    pub suffix: String,
    /// Prepended to the channel name taken from the path (`chat:` + `room1`).
    pub channel_prefix: String,
    pub transports: [bool; 3],
    /// Buffer policy for the channels this location serves, when it overrides the defaults.
    pub buffer_override: Option<BufferPolicy>,
    pub first_message: FirstMessage,
    pub keepalive: Duration,
    pub longpoll_timeout: Duration,
    /// Empty: same origin only. `*` allows any origin.
    pub allow_origins: Vec<String>,
    /// `auth_request`: ask the upstream app before a subscription starts.
    pub forward_auth: Option<ForwardAuthConfig>,
    /// `[push.jwt]`: require a signed token that names the channel.
    pub jwt: Option<JwtConfig>,
}

/// `auth_request` and its knobs.
#[derive(Debug, Clone)]
pub struct ForwardAuthConfig {
    /// Path (and query) on the upstream, e.g. `/auth/can-subscribe`.
    pub path: String,
    /// Bounds the whole check; past it the subscriber gets 503.
    pub timeout: Duration,
    /// None: every subscription asks the upstream (the default).
    pub cache_ttl: Option<Duration>,
}

/// `[push.jwt]`: the key is read (and checked) when the config is loaded, so a missing or bad
/// key file is a config error, and SIGHUP re-reads it.
#[derive(Debug, Clone)]
pub struct JwtConfig {
    pub verifier: JwtVerifier,
    pub key_file: PathBuf,
    /// A cookie that may carry the token (besides `Authorization: Bearer` and `access_token`).
    pub cookie: Option<String>,
    pub leeway: Duration,
}

impl PushLocation {
    pub fn allows(&self, t: Transport) -> bool {
        self.transports[t.index()]
    }
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: Option<SocketAddr>,
}

/// Every problem found in one config file.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            f.write_str(p)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Raw, spanned input as serde reads it.

type S<T> = Spanned<T>;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: Option<S<RawServer>>,
    upstream: Option<S<RawUpstream>>,
    publish: Option<S<RawPublish>>,
    channels: Option<S<RawChannels>>,
    push: Option<S<Vec<S<RawPush>>>>,
    admin: Option<S<RawAdmin>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<S<Vec<S<String>>>>,
    tls: Option<S<RawTls>>,
    max_connections: Option<S<i64>>,
    header_timeout: Option<S<String>>,
    max_header_size: Option<S<String>>,
    max_headers: Option<S<i64>>,
    h2_max_concurrent_streams: Option<S<i64>>,
    shutdown_timeout: Option<S<String>>,
    worker_threads: Option<S<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    listen: Option<S<Vec<S<String>>>>,
    cert: S<String>,
    key: S<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    url: Option<S<String>>,
    connect_timeout: Option<S<String>>,
    response_timeout: Option<S<String>>,
    pool_idle_timeout: Option<S<String>>,
    pool_max_idle: Option<S<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPublish {
    unix: Option<S<String>>,
    unix_mode: Option<S<String>>,
    unix_group: Option<S<String>>,
    listen: Option<S<Vec<S<String>>>>,
    token_file: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawChannels {
    buffer_messages: Option<S<i64>>,
    buffer_ttl: Option<S<String>>,
    max_message_size: Option<S<String>>,
    max_channels: Option<S<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPush {
    path: S<String>,
    channel_prefix: Option<S<String>>,
    transports: Option<S<Vec<S<String>>>>,
    buffer_messages: Option<S<i64>>,
    buffer_ttl: Option<S<String>>,
    first_message: Option<S<String>>,
    keepalive: Option<S<String>>,
    longpoll_timeout: Option<S<String>>,
    allow_origins: Option<S<Vec<S<String>>>>,
    auth_request: Option<S<String>>,
    auth_timeout: Option<S<String>>,
    auth_cache_ttl: Option<S<String>>,
    jwt: Option<S<RawJwt>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJwt {
    secret_file: Option<S<String>>,
    public_key_file: Option<S<String>>,
    algorithm: Option<S<String>>,
    cookie: Option<S<String>>,
    leeway: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<S<String>>,
}

// ---------------------------------------------------------------------------------------

impl Default for Config {
    /// The built-in defaults: a working demo that needs no other service.
    fn default() -> Self {
        Config::from_toml("", None).expect("built-in defaults are valid") // ok: constant input
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            problems: vec![format!("{}: cannot read config: {e}", path.display())],
        })?;
        Config::from_toml(&text, Some(path))
    }

    /// The config the CLI runs with when given no `--config`: `conf/crier.toml` in the working
    /// directory, else `/etc/crier/crier.toml`, else the built-in defaults.
    pub fn default_path() -> Option<PathBuf> {
        ["conf/crier.toml", "/etc/crier/crier.toml"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
    }

    /// Parses and validates TOML text. `path` only names the file in messages.
    pub fn from_toml(text: &str, path: Option<&Path>) -> Result<Config, ConfigError> {
        let name = path
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "<config>".into());
        let mut problems = Vec::new();
        let Some(raw) = read_raw(text, &name, &mut problems) else {
            return Err(ConfigError { problems });
        };
        let mut v = Validator {
            text,
            name,
            problems,
        };
        let cfg = v.build(raw, path);
        if v.problems.is_empty() {
            return Ok(cfg);
        }
        // In file order, so the operator reads them top to bottom.
        let at = |p: &String| -> (usize, usize) {
            let mut nums = p[v.name.len()..]
                .split(':')
                .skip(1)
                .map_while(|n| n.parse::<usize>().ok());
            (nums.next().unwrap_or(0), nums.next().unwrap_or(0))
        };
        v.problems.sort_by_key(at);
        Err(ConfigError {
            problems: v.problems,
        })
    }

    /// The buffer policy of a channel: the override of the location with the longest
    /// `channel_prefix` matching the name, else the `[channels]` defaults.
    pub fn buffer_policy_for(&self, channel: &str) -> BufferPolicy {
        self.push
            .iter()
            .filter(|p| p.buffer_override.is_some() && channel.starts_with(&p.channel_prefix))
            .max_by_key(|p| p.channel_prefix.len())
            .and_then(|p| p.buffer_override)
            .unwrap_or(self.channels.buffer)
    }
}

/// TOML text → the raw structs, reporting *every* unknown key and wrongly typed value, each
/// with its dotted key. serde stops at the first such error, so the offending entry is removed
/// from the parsed document and the document read again, until it reads cleanly. Returns None
/// (with the problem recorded) when the text is not TOML or an error cannot be pinned to a key.
fn read_raw(text: &str, name: &str, problems: &mut Vec<String>) -> Option<RawConfig> {
    let at = |span: Option<std::ops::Range<usize>>| {
        span.map(|s| line_col(text, s.start))
            .map(|(l, c)| format!("{l}:{c}: "))
            .unwrap_or_default()
    };
    let mut doc = match toml::de::DeTable::parse(text) {
        Ok(doc) => doc,
        Err(e) => {
            problems.push(format!("{name}:{}{}", at(e.span()), e.message().trim_end()));
            return None;
        }
    };
    // Each pass removes one entry, so this ends; the bound only guards against a surprise.
    for _ in 0..1000 {
        let e = match RawConfig::deserialize(toml::de::Deserializer::from(doc.clone())) {
            Ok(raw) => return Some(raw),
            Err(e) => e,
        };
        let key = e
            .span()
            .and_then(|span| remove_entry_at(doc.get_mut(), &span, ""));
        // serde's words → TOML's words (and no internal type names).
        let mut message = e
            .message()
            .trim_end()
            .replace("unknown field", "unknown key")
            .replace("expected i64", "expected an integer")
            .replace("expected a sequence", "expected an array");
        if let Some(i) = message.find("expected struct ") {
            message.truncate(i);
            message.push_str("expected a table");
        }
        let Some(key) = key else {
            problems.push(format!("{name}:{}{message}", at(e.span())));
            return None;
        };
        problems.push(format!("{name}:{}{key}: {message}", at(e.span())));
    }
    None
}

/// Removes the entry that an error at `span` is about (its key is the span, or its value holds
/// it), looking into nested tables and arrays of tables first; returns its dotted key.
fn remove_entry_at(
    table: &mut toml::de::DeTable<'_>,
    span: &std::ops::Range<usize>,
    prefix: &str,
) -> Option<String> {
    let dotted = |key: &str| {
        if prefix.is_empty() {
            key.to_string()
        } else {
            format!("{prefix}.{key}")
        }
    };
    for (key, value) in table.iter_mut() {
        let path = dotted(key.get_ref());
        let found = match value.get_mut() {
            toml::de::DeValue::Table(t) => remove_entry_at(t, span, &path),
            toml::de::DeValue::Array(items) => {
                items.iter_mut().find_map(|item| match item.get_mut() {
                    toml::de::DeValue::Table(t) => remove_entry_at(t, span, &path),
                    _ => None,
                })
            }
            _ => None,
        };
        if found.is_some() {
            return found;
        }
    }
    let holds = |outer: std::ops::Range<usize>| outer.start <= span.start && span.end <= outer.end;
    let key = table
        .iter()
        .find(|(k, v)| k.span() == *span || holds(v.span()))
        .map(|(k, _)| k.get_ref().to_string())?;
    table.remove(key.as_str());
    Some(dotted(&key))
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

struct Validator<'a> {
    text: &'a str,
    name: String,
    problems: Vec<String>,
}

impl Validator<'_> {
    fn err<T>(&mut self, key: &str, at: &S<T>, msg: impl fmt::Display) {
        let (l, c) = line_col(self.text, at.span().start);
        self.problems
            .push(format!("{}:{l}:{c}: {key}: {msg}", self.name));
    }

    fn duration(&mut self, key: &str, v: Option<S<String>>, default: Duration) -> Duration {
        let Some(v) = v else { return default };
        match parse_duration(v.get_ref()) {
            Ok(d) if d.is_zero() => {
                self.err(key, &v, "must be greater than zero");
                default
            }
            Ok(d) => d,
            Err(e) => {
                self.err(key, &v, e);
                default
            }
        }
    }

    fn size(&mut self, key: &str, v: Option<S<String>>, default: usize) -> usize {
        let Some(v) = v else { return default };
        match parse_size(v.get_ref()) {
            Ok(0) => {
                self.err(key, &v, "must be greater than zero");
                default
            }
            Ok(n) => n,
            Err(e) => {
                self.err(key, &v, e);
                default
            }
        }
    }

    fn count(&mut self, key: &str, v: Option<S<i64>>, range: (i64, i64), default: usize) -> usize {
        let Some(v) = v else { return default };
        let n = *v.get_ref();
        if n < range.0 || n > range.1 {
            self.err(
                key,
                &v,
                format!("{n} is out of range ({}..={})", range.0, range.1),
            );
            return default;
        }
        n as usize
    }

    fn addrs(
        &mut self,
        key: &str,
        v: Option<S<Vec<S<String>>>>,
        default: &[&str],
        allow_empty: bool,
    ) -> Vec<SocketAddr> {
        let Some(list) = v else {
            return default.iter().filter_map(|a| a.parse().ok()).collect();
        };
        if list.get_ref().is_empty() && !allow_empty {
            self.err(key, &list, "needs at least one address");
        }
        let mut out = Vec::new();
        for a in list.into_inner() {
            match parse_addr(a.get_ref()) {
                Ok(addr) => out.push(addr),
                Err(e) => self.err(key, &a, e),
            }
        }
        out
    }

    fn build(&mut self, raw: RawConfig, path: Option<&Path>) -> Config {
        let base = path.and_then(Path::parent).unwrap_or(Path::new(""));
        let server = self.server(raw.server.map(Spanned::into_inner), base);
        let upstream = self.upstream(raw.upstream.map(Spanned::into_inner));
        let publish = self.publish(raw.publish.map(Spanned::into_inner), base);
        let channels = self.channels(raw.channels.map(Spanned::into_inner));
        let push = match raw.push {
            None => vec![default_push_location(&channels)],
            Some(list) => {
                let mut seen = BTreeSet::new();
                let mut out = Vec::new();
                for p in list.into_inner() {
                    let span_holder = Spanned::clone(&p.get_ref().path);
                    if let Some(loc) = self.push_location(p.into_inner(), &channels.buffer, base) {
                        if !seen.insert(loc.path.clone()) {
                            self.err("push.path", &span_holder, "the same path is used twice");
                        }
                        out.push(loc);
                    }
                }
                out
            }
        };
        let admin = match raw.admin.map(Spanned::into_inner) {
            None => AdminConfig {
                listen: "127.0.0.1:9090".parse().ok(),
            },
            Some(a) => AdminConfig {
                listen: a.listen.and_then(|l| {
                    if l.get_ref().is_empty() {
                        return None; // "" turns the admin listener off
                    }
                    match parse_addr(l.get_ref()) {
                        Ok(a) => Some(a),
                        Err(e) => {
                            self.err("admin.listen", &l, e);
                            None
                        }
                    }
                }),
            },
        };
        Config {
            server,
            upstream,
            publish,
            channels,
            push,
            admin,
            source: path.map(Path::to_path_buf),
        }
    }

    fn server(&mut self, raw: Option<RawServer>, base: &Path) -> ServerConfig {
        let raw = raw.unwrap_or(RawServer {
            listen: None,
            tls: None,
            max_connections: None,
            header_timeout: None,
            max_header_size: None,
            max_headers: None,
            h2_max_concurrent_streams: None,
            shutdown_timeout: None,
            worker_threads: None,
        });
        let tls = raw.tls.map(|t| {
            let t = t.into_inner();
            TlsConfig {
                listen: self.addrs("server.tls.listen", t.listen, &["0.0.0.0:8443"], false),
                cert: resolve(base, t.cert.get_ref()),
                key: resolve(base, t.key.get_ref()),
            }
        });
        let max_header_at = raw.max_header_size.clone();
        let max_header_bytes = self.size("server.max_header_size", raw.max_header_size, 16 * 1024);
        if let Some(at) = max_header_at.filter(|_| max_header_bytes < 8192) {
            self.err("server.max_header_size", &at, "must be at least 8KiB");
        }
        ServerConfig {
            listen: self.addrs("server.listen", raw.listen, &["127.0.0.1:8080"], false),
            tls,
            max_connections: self.count(
                "server.max_connections",
                raw.max_connections,
                (1, 10_000_000),
                50_000,
            ),
            header_timeout: self.duration(
                "server.header_timeout",
                raw.header_timeout,
                Duration::from_secs(10),
            ),
            max_header_bytes: max_header_bytes.max(8192),
            max_headers: self.count("server.max_headers", raw.max_headers, (1, 10_000), 100),
            h2_max_concurrent_streams: self.count(
                "server.h2_max_concurrent_streams",
                raw.h2_max_concurrent_streams,
                (1, 100_000),
                256,
            ) as u32,
            shutdown_timeout: self.duration(
                "server.shutdown_timeout",
                raw.shutdown_timeout,
                Duration::from_secs(30),
            ),
            worker_threads: self.count("server.worker_threads", raw.worker_threads, (0, 1024), 0),
        }
    }

    fn upstream(&mut self, raw: Option<RawUpstream>) -> UpstreamConfig {
        let raw = raw.unwrap_or(RawUpstream {
            url: None,
            connect_timeout: None,
            response_timeout: None,
            pool_idle_timeout: None,
            pool_max_idle: None,
        });
        let url = match raw.url {
            None => UpstreamAddr::Http {
                authority: "127.0.0.1:3000".into(),
            },
            Some(u) => match parse_upstream(u.get_ref()) {
                Ok(a) => a,
                Err(e) => {
                    self.err("upstream.url", &u, e);
                    UpstreamAddr::Http {
                        authority: "127.0.0.1:3000".into(),
                    }
                }
            },
        };
        UpstreamConfig {
            url,
            connect_timeout: self.duration(
                "upstream.connect_timeout",
                raw.connect_timeout,
                Duration::from_secs(2),
            ),
            response_timeout: self.duration(
                "upstream.response_timeout",
                raw.response_timeout,
                Duration::from_secs(60),
            ),
            pool_idle_timeout: self.duration(
                "upstream.pool_idle_timeout",
                raw.pool_idle_timeout,
                Duration::from_secs(90),
            ),
            pool_max_idle: self.count(
                "upstream.pool_max_idle",
                raw.pool_max_idle,
                (0, 100_000),
                256,
            ),
        }
    }

    fn publish(&mut self, raw: Option<RawPublish>, base: &Path) -> PublishConfig {
        let Some(raw) = raw else {
            return PublishConfig {
                unix: Some(default_publish_socket()),
                unix_mode: 0o660,
                unix_group: None,
                listen: vec![SocketAddr::from(([127, 0, 0, 1], 8081))],
                token: None,
                token_file: None,
            };
        };
        let unix = match raw.unix {
            None => Some(default_publish_socket()),
            Some(u) if u.get_ref().is_empty() => None, // "" turns the Unix socket off
            Some(u) => Some(PathBuf::from(u.into_inner())),
        };
        let unix_mode = match raw.unix_mode {
            None => 0o660,
            Some(m) => match u32::from_str_radix(m.get_ref().trim_start_matches("0o"), 8) {
                Ok(n) if n <= 0o777 => n,
                _ => {
                    self.err(
                        "publish.unix_mode",
                        &m,
                        format!("{:?} is not an octal file mode like \"0660\"", m.get_ref()),
                    );
                    0o660
                }
            },
        };
        let unix_group = raw
            .unix_group
            .and_then(|g| match lookup_group(g.get_ref()) {
                Ok(gid) => Some(UnixGroup {
                    name: g.get_ref().clone(),
                    gid,
                }),
                Err(e) => {
                    self.err("publish.unix_group", &g, e);
                    None
                }
            });
        let (token, token_file) = match raw.token_file {
            None => (None, None),
            Some(f) => {
                let path = resolve(base, f.get_ref());
                match PublishToken::load(&path) {
                    Ok(t) => (Some(t), Some(path)),
                    Err(e) => {
                        self.err("publish.token_file", &f, e);
                        (None, Some(path))
                    }
                }
            }
        };
        let has_token_file = token_file.is_some();
        let mut listen = Vec::new();
        if let Some(list) = raw.listen {
            for a in list.get_ref() {
                let Ok(addr) = parse_addr(a.get_ref()) else {
                    continue; // reported by `addrs` below
                };
                if !addr.ip().to_canonical().is_loopback() && !has_token_file {
                    self.err(
                        "publish.listen",
                        a,
                        format!(
                            "{addr} is not a loopback address: anyone who reaches it could publish; \
                             set publish.token_file to require a token, or listen on 127.0.0.1"
                        ),
                    );
                }
            }
            listen = self.addrs("publish.listen", Some(list), &[], true);
        } else {
            listen.push(SocketAddr::from(([127, 0, 0, 1], 8081)));
        }
        PublishConfig {
            unix,
            unix_mode,
            unix_group,
            listen,
            token,
            token_file,
        }
    }

    fn channels(&mut self, raw: Option<RawChannels>) -> ChannelDefaults {
        let raw = raw.unwrap_or(RawChannels {
            buffer_messages: None,
            buffer_ttl: None,
            max_message_size: None,
            max_channels: None,
        });
        ChannelDefaults {
            buffer: BufferPolicy {
                buffer_messages: self.count(
                    "channels.buffer_messages",
                    raw.buffer_messages,
                    (0, 10_000_000),
                    100,
                ),
                buffer_ttl: self.duration(
                    "channels.buffer_ttl",
                    raw.buffer_ttl,
                    Duration::from_secs(600),
                ),
            },
            max_message_size: self.size(
                "channels.max_message_size",
                raw.max_message_size,
                64 * 1024,
            ),
            max_channels: self.count(
                "channels.max_channels",
                raw.max_channels,
                (1, 100_000_000),
                100_000,
            ),
        }
    }

    /// `defaults`: the `[channels]` buffer policy, for the half a location does not override.
    fn push_location(
        &mut self,
        raw: RawPush,
        defaults: &BufferPolicy,
        base: &Path,
    ) -> Option<PushLocation> {
        let path = raw.path.get_ref().clone();
        let mut ok = true;
        let (prefix, suffix) = match path.split_once("{channel}") {
            Some((p, s)) if p.starts_with('/') && !s.contains("{channel}") => {
                (p.to_string(), s.to_string())
            }
            _ => {
                self.err(
                    "push.path",
                    &raw.path,
                    "must start with '/' and contain {channel} exactly once",
                );
                ok = false;
                (String::new(), String::new())
            }
        };
        let channel_prefix = match raw.channel_prefix {
            None => String::new(),
            Some(p) => {
                if !p.get_ref().chars().all(is_channel_char) || p.get_ref().len() > 64 {
                    self.err(
                        "push.channel_prefix",
                        &p,
                        "may hold only A-Z a-z 0-9 . _ - : ~ (at most 64)",
                    );
                }
                p.into_inner()
            }
        };
        let mut transports = [true; 3];
        if let Some(list) = raw.transports {
            transports = [false; 3];
            if list.get_ref().is_empty() {
                self.err("push.transports", &list, "needs at least one transport");
            }
            for t in list.into_inner() {
                match t.get_ref().as_str() {
                    "websocket" => transports[0] = true,
                    "sse" => transports[1] = true,
                    "longpoll" => transports[2] = true,
                    other => self.err(
                        "push.transports",
                        &t,
                        format!("unknown transport {other:?} (websocket, sse, longpoll)"),
                    ),
                }
            }
        }
        let buffer_override = if raw.buffer_messages.is_some() || raw.buffer_ttl.is_some() {
            Some(BufferPolicy {
                buffer_messages: self.count(
                    "push.buffer_messages",
                    raw.buffer_messages,
                    (0, 10_000_000),
                    defaults.buffer_messages,
                ),
                buffer_ttl: self.duration("push.buffer_ttl", raw.buffer_ttl, defaults.buffer_ttl),
            })
        } else {
            None
        };
        let first_message = match raw.first_message {
            None => FirstMessage::Newest,
            Some(f) => match f.get_ref().as_str() {
                "newest" => FirstMessage::Newest,
                "oldest" => FirstMessage::Oldest,
                other => {
                    self.err(
                        "push.first_message",
                        &f,
                        format!("{other:?} is neither \"newest\" nor \"oldest\""),
                    );
                    FirstMessage::Newest
                }
            },
        };
        let keepalive = self.duration("push.keepalive", raw.keepalive, Duration::from_secs(15));
        let longpoll_timeout = self.duration(
            "push.longpoll_timeout",
            raw.longpoll_timeout,
            Duration::from_secs(30),
        );
        let mut allow_origins = Vec::new();
        if let Some(list) = raw.allow_origins {
            for o in list.into_inner() {
                let s = o.get_ref().trim_end_matches('/');
                if s != "*" && !(s.starts_with("http://") || s.starts_with("https://")) {
                    self.err(
                        "push.allow_origins",
                        &o,
                        "an origin is \"*\" or scheme://host[:port]",
                    );
                }
                allow_origins.push(s.to_ascii_lowercase());
            }
        }
        let forward_auth =
            self.forward_auth(raw.auth_request, raw.auth_timeout, raw.auth_cache_ttl);
        let jwt = raw.jwt.and_then(|j| self.jwt(j, base));
        ok.then_some(PushLocation {
            path,
            prefix,
            suffix,
            channel_prefix,
            transports,
            buffer_override,
            first_message,
            keepalive,
            longpoll_timeout,
            allow_origins,
            forward_auth,
            jwt,
        })
    }

    fn forward_auth(
        &mut self,
        request: Option<S<String>>,
        timeout: Option<S<String>>,
        cache_ttl: Option<S<String>>,
    ) -> Option<ForwardAuthConfig> {
        let Some(request) = request else {
            for (key, v) in [
                ("push.auth_timeout", &timeout),
                ("push.auth_cache_ttl", &cache_ttl),
            ] {
                if let Some(v) = v {
                    self.err(key, v, "only applies with push.auth_request");
                }
            }
            return None;
        };
        let path = request.get_ref();
        let valid = path.starts_with('/')
            && !path.contains('#')
            && path.parse::<http::uri::PathAndQuery>().is_ok();
        if !valid {
            self.err(
                "push.auth_request",
                &request,
                "is a path on the upstream app, like \"/auth/can-subscribe\"",
            );
        }
        Some(ForwardAuthConfig {
            path: path.clone(),
            timeout: self.duration("push.auth_timeout", timeout, Duration::from_secs(5)),
            cache_ttl: cache_ttl
                .map(|t| self.duration("push.auth_cache_ttl", Some(t), Duration::ZERO)),
        })
    }

    fn jwt(&mut self, raw: S<RawJwt>, base: &Path) -> Option<JwtConfig> {
        let at = raw.span();
        let raw = raw.into_inner();
        let leeway = match raw.leeway {
            None => Duration::from_secs(30),
            Some(l) => match parse_duration(l.get_ref()) {
                Ok(d) if d <= Duration::from_secs(3600) => d,
                Ok(_) => {
                    self.err("push.jwt.leeway", &l, "at most \"1h\"");
                    Duration::from_secs(30)
                }
                Err(e) => {
                    self.err("push.jwt.leeway", &l, e);
                    Duration::from_secs(30)
                }
            },
        };
        let cookie = raw.cookie.map(|c| {
            let ok = !c.get_ref().is_empty()
                && c.get_ref()
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
            if !ok {
                self.err("push.jwt.cookie", &c, "is not a cookie name");
            }
            c.into_inner()
        });
        let algorithm = match &raw.algorithm {
            None => None,
            Some(a) => match JwtAlgorithm::parse(a.get_ref()) {
                Some(alg) => Some(alg),
                None => {
                    self.err(
                        "push.jwt.algorithm",
                        a,
                        format!(
                            "{:?} is not one of \"HS256\", \"RS256\", \"ES256\"",
                            a.get_ref()
                        ),
                    );
                    return None;
                }
            },
        };
        let (algorithm, file, file_key) = match (raw.secret_file, raw.public_key_file) {
            (Some(_), Some(p)) => {
                self.err(
                    "push.jwt.public_key_file",
                    &p,
                    "give secret_file (HS256) or public_key_file (RS256, ES256), not both",
                );
                return None;
            }
            (None, None) => {
                let (l, c) = line_col(self.text, at.start);
                self.problems.push(format!(
                    "{}:{l}:{c}: push.jwt: needs secret_file (HS256) or public_key_file with algorithm = \"RS256\" or \"ES256\"",
                    self.name
                ));
                return None;
            }
            (Some(f), None) => match algorithm {
                None | Some(JwtAlgorithm::Hs256) => {
                    (JwtAlgorithm::Hs256, f, "push.jwt.secret_file")
                }
                Some(other) => {
                    let a = raw.algorithm.as_ref().unwrap_or(&f);
                    self.err(
                        "push.jwt.algorithm",
                        a,
                        format!("{} needs public_key_file, not secret_file", other.as_str()),
                    );
                    return None;
                }
            },
            (None, Some(p)) => match algorithm {
                Some(alg @ (JwtAlgorithm::Rs256 | JwtAlgorithm::Es256)) => {
                    (alg, p, "push.jwt.public_key_file")
                }
                Some(JwtAlgorithm::Hs256) => {
                    self.err(
                        "push.jwt.algorithm",
                        raw.algorithm.as_ref().unwrap_or(&p),
                        "HS256 takes secret_file; public_key_file is for \"RS256\" or \"ES256\"",
                    );
                    return None;
                }
                None => {
                    self.err(
                        "push.jwt.algorithm",
                        &p,
                        "needed with public_key_file: \"RS256\" or \"ES256\"",
                    );
                    return None;
                }
            },
        };
        let key_file = resolve(base, file.get_ref());
        match JwtVerifier::load(algorithm, &key_file, leeway) {
            Ok(verifier) => Some(JwtConfig {
                verifier,
                key_file,
                cookie,
                leeway,
            }),
            Err(e) => {
                self.err(file_key, &file, e);
                None
            }
        }
    }
}

fn default_push_location(channels: &ChannelDefaults) -> PushLocation {
    let _ = channels;
    PushLocation {
        path: "/live/{channel}".into(),
        prefix: "/live/".into(),
        suffix: String::new(),
        channel_prefix: String::new(),
        transports: [true; 3],
        buffer_override: None,
        first_message: FirstMessage::Newest,
        keepalive: Duration::from_secs(15),
        longpoll_timeout: Duration::from_secs(30),
        allow_origins: Vec::new(),
        forward_auth: None,
        jwt: None,
    }
}

/// `$XDG_RUNTIME_DIR/crier/publish.sock`, else `/tmp/crier-<uid>/publish.sock`.
pub fn default_publish_socket() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("crier/publish.sock"),
        _ => {
            // SAFETY: getuid has no preconditions and cannot fail.
            let uid = unsafe { libc::getuid() };
            PathBuf::from(format!("/tmp/crier-{uid}/publish.sock"))
        }
    }
}

fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// `A-Z a-z 0-9 . _ - : ~`
pub fn is_channel_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '~')
}

/// Parses `"250ms"`, `"15s"`, `"10m"`, `"2h"`, `"1d"` (a whole number and a unit).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.starts_with('-') {
        return Err(format!("{s:?} is negative; a duration is like \"15s\""));
    }
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like \"250ms\", \"15s\", \"10m\""))?;
    let ms = match unit.trim() {
        "ms" => Some(n),
        "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        "d" => n.checked_mul(86_400_000),
        "" => return Err(format!("{s:?} needs a unit: ms, s, m, h or d")),
        u => return Err(format!("{s:?} has an unknown unit {u:?} (ms, s, m, h, d)")),
    };
    ms.filter(|ms| *ms <= 365 * 86_400_000)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{s:?} is longer than a year"))
}

/// Parses `"64KiB"`, `"1MiB"`, `"1GiB"`, `"512B"`, `"10KB"` (powers of 1000) or a plain number of bytes.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    if s.starts_with('-') {
        return Err(format!("{s:?} is negative; a size is like \"64KiB\""));
    }
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like \"64KiB\" or \"1MiB\""))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        u => {
            return Err(format!(
                "{s:?} has an unknown unit {u:?} (B, KiB, MiB, GiB)"
            ))
        }
    };
    n.checked_mul(mult)
        .filter(|b| *b <= 1 << 40)
        .map(|b| b as usize)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// A group name (or a numeric gid) → the gid, from the system's group database.
fn lookup_group(name: &str) -> Result<u32, String> {
    if !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit()) {
        return name
            .parse()
            .map_err(|_| format!("{name:?} is not a valid gid"));
    }
    let unknown = || format!("unknown group {name:?} (not in the system's group database)");
    let Ok(cname) = std::ffi::CString::new(name) else {
        return Err(unknown());
    };
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: every pointer is to a live local of the right type; getgrnam_r writes the
        // group's strings into `buf` (of the length we pass) and nowhere else.
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        let rc = unsafe {
            libc::getgrnam_r(
                cname.as_ptr(),
                &mut grp,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut found,
            )
        };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        if rc != 0 {
            return Err(format!(
                "cannot look up group {name:?}: {}",
                std::io::Error::from_raw_os_error(rc)
            ));
        }
        if found.is_null() {
            return Err(unknown());
        }
        return Ok(grp.gr_gid);
    }
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    // Give the common mistakes a precise message.
    if let Some((host, port)) = s.rsplit_once(':') {
        if let Ok(p) = port.parse::<u64>() {
            if p > 65535 {
                return Err(format!("port {p} is out of range (0..=65535)"));
            }
        }
        if host == "localhost" {
            return Err(format!("{s:?}: use an IP address (127.0.0.1:{port})"));
        }
    }
    Err(format!("{s:?} is not an address like \"127.0.0.1:8080\""))
}

fn parse_upstream(s: &str) -> Result<UpstreamAddr, String> {
    if let Some(path) = s.strip_prefix("unix:") {
        let path = path.trim_start_matches("//");
        if path.is_empty() || !path.starts_with('/') {
            return Err(format!(
                "{s:?}: a Unix socket is \"unix:/absolute/path.sock\""
            ));
        }
        return Ok(UpstreamAddr::Unix(PathBuf::from(path)));
    }
    let Some(rest) = s.strip_prefix("http://") else {
        return Err(format!(
            "{s:?}: the upstream is \"http://host:port\" or \"unix:/path.sock\""
        ));
    };
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains('/') {
        return Err(format!("{s:?}: the upstream URL takes no path"));
    }
    let uri: http::uri::Authority = authority
        .parse()
        .map_err(|_| format!("{s:?} is not a valid host:port"))?;
    if let Some(p) = authority
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u64>().ok())
    {
        if p == 0 || p > 65535 {
            return Err(format!("port {p} is out of range (1..=65535)"));
        }
    }
    Ok(UpstreamAddr::Http {
        authority: uri.as_str().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errs(text: &str) -> String {
        Config::from_toml(text, Some(Path::new("c.toml")))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::default();
        assert_eq!(c.server.listen, vec!["127.0.0.1:8080".parse().unwrap()]);
        assert_eq!(c.push.len(), 1);
        assert_eq!(c.push[0].prefix, "/live/");
        assert_eq!(c.channels.buffer.buffer_messages, 100);
        assert_eq!(c.upstream.response_timeout, Duration::from_secs(60));
    }

    #[test]
    fn shipped_example_is_the_defaults() {
        let c = Config::from_toml(include_str!("../conf/crier.toml"), None).unwrap();
        let d = Config::default();
        assert_eq!(c.server.listen, d.server.listen);
        assert_eq!(c.upstream.url, d.upstream.url);
        assert_eq!(c.publish.listen, d.publish.listen);
        assert_eq!(c.publish.unix, d.publish.unix);
        assert_eq!(c.channels.buffer, d.channels.buffer);
        assert_eq!(c.push.len(), 1);
        assert_eq!(c.push[0].path, d.push[0].path);
        assert_eq!(c.push[0].keepalive, d.push[0].keepalive);
        assert_eq!(c.admin.listen, d.admin.listen);
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("15s").unwrap(), Duration::from_secs(15));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert!(parse_duration("-5s").unwrap_err().contains("negative"));
        assert!(parse_duration("5").unwrap_err().contains("unit"));
        assert!(parse_duration("5 fortnights").is_err());
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("100").unwrap(), 100);
        assert!(parse_size("12XB").is_err());
    }

    #[test]
    fn unknown_key_names_line_and_column() {
        let e = errs("[server]\nlisten = [\"127.0.0.1:1\"]\nlisen = 3\n");
        assert!(e.starts_with("c.toml:3:1:"), "{e}");
        assert!(e.contains("lisen"), "{e}");
    }

    #[test]
    fn wrong_type_is_an_error() {
        let e = errs("[upstream]\nconnect_timeout = 5\n");
        assert!(e.starts_with("c.toml:2:"), "{e}");
    }

    #[test]
    fn every_bad_value_is_reported() {
        let e = errs(
            "[server]\nlisten = [\"127.0.0.1:70000\"]\n[upstream]\nconnect_timeout = \"-1s\"\nresponse_timeout = \"0s\"\n",
        );
        let lines: Vec<_> = e.lines().collect();
        assert_eq!(lines.len(), 3, "{e}");
        assert!(
            lines[0].contains("c.toml:2:11: server.listen: port 70000"),
            "{e}"
        );
        assert!(
            lines[1].contains("c.toml:4:19: upstream.connect_timeout"),
            "{e}"
        );
        assert!(
            lines[2].contains("upstream.response_timeout: must be greater than zero"),
            "{e}"
        );
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_all_reported_with_their_key() {
        let e = errs(
            "[server]\nlisen = 1\nmax_connections = \"many\"\nlisten = [\"127.0.0.1:70000\"]\n[upstream]\nconnect_timeout = 5\n",
        );
        let lines: Vec<_> = e.lines().collect();
        assert_eq!(lines.len(), 4, "{e}");
        assert!(
            lines[0].starts_with("c.toml:2:1: server.lisen: unknown key"),
            "{e}"
        );
        assert!(
            lines[1].starts_with("c.toml:3:19: server.max_connections: invalid type"),
            "{e}"
        );
        assert!(
            lines[2].starts_with("c.toml:4:11: server.listen: port 70000"),
            "{e}"
        );
        assert!(
            lines[3].starts_with("c.toml:6:19: upstream.connect_timeout: invalid type"),
            "{e}"
        );
    }

    #[test]
    fn empty_listen_list() {
        let e = errs("[server]\nlisten = []\n");
        assert!(
            e.contains("server.listen: needs at least one address"),
            "{e}"
        );
    }

    #[test]
    fn push_path_needs_channel() {
        let e = errs("[[push]]\npath = \"/live\"\n");
        assert!(e.contains("push.path"), "{e}");
        let e = errs("[[push]]\npath = \"/a/{channel}\"\ntransports = [\"carrier-pigeon\"]\n");
        assert!(e.contains("unknown transport"), "{e}");
    }

    #[test]
    fn upstream_forms() {
        assert_eq!(
            parse_upstream("unix:/run/app.sock").unwrap(),
            UpstreamAddr::Unix("/run/app.sock".into())
        );
        assert!(parse_upstream("https://x").is_err());
        assert!(parse_upstream("http://127.0.0.1:99999").is_err());
    }

    #[test]
    fn forward_auth_keys() {
        let c = Config::from_toml(
            "[[push]]\npath = \"/live/{channel}\"\nauth_request = \"/auth/check?x=1\"\n",
            None,
        )
        .unwrap();
        let fa = c.push[0].forward_auth.as_ref().unwrap();
        assert_eq!(fa.path, "/auth/check?x=1");
        assert_eq!(fa.timeout, Duration::from_secs(5), "default auth_timeout");
        assert_eq!(fa.cache_ttl, None, "the cache is off by default");
        assert!(Config::default().push[0].forward_auth.is_none());

        let e = errs(
            "[[push]]\npath = \"/a/{channel}\"\nauth_timeout = \"1s\"\nauth_cache_ttl = \"5s\"\n",
        );
        let lines: Vec<_> = e.lines().collect();
        assert_eq!(lines.len(), 2, "{e}");
        assert!(
            lines[0]
                .starts_with("c.toml:3:16: push.auth_timeout: only applies with push.auth_request"),
            "{e}"
        );
        assert!(
            lines[1].starts_with("c.toml:4:18: push.auth_cache_ttl"),
            "{e}"
        );
        let e = errs("[[push]]\npath = \"/a/{channel}\"\nauth_request = \"auth check\"\nauth_cache_ttl = \"0s\"\nauth_timeout = \"soon\"\n");
        let lines: Vec<_> = e.lines().collect();
        assert_eq!(lines.len(), 3, "{e}");
        assert!(
            lines[0].starts_with("c.toml:3:16: push.auth_request: is a path"),
            "{e}"
        );
        assert!(
            lines[1].starts_with("c.toml:4:18: push.auth_cache_ttl: must be greater than zero"),
            "{e}"
        );
        assert!(
            lines[2].starts_with("c.toml:5:16: push.auth_timeout"),
            "{e}"
        );
    }

    #[test]
    fn buffer_override_by_channel_prefix() {
        let c = Config::from_toml(
            "[[push]]\npath = \"/live/{channel}\"\n[[push]]\npath = \"/chat/{channel}\"\nchannel_prefix = \"chat:\"\nbuffer_messages = 5\n",
            None,
        )
        .unwrap();
        assert_eq!(c.buffer_policy_for("chat:x").buffer_messages, 5);
        assert_eq!(c.buffer_policy_for("news").buffer_messages, 100);
    }
}
