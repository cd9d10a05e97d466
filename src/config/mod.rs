//! TOML → validated, typed [`Config`].
//!
//! Parsing happens in two steps: serde reads the file into `Raw*` structs that keep the
//! span of every value (`toml::Spanned`) and reject unknown keys, then [`Config::from_toml`]
//! validates each value and collects *every* problem, each naming the key and the
//! `line:column` it sits at, so an operator fixes a config in one pass.

mod cluster;
mod publish_on;
mod raw;
mod validate;
mod webhook;
mod webpush;

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

use raw::read_raw;
use validate::Validator;

pub use cluster::ClusterConfig;
pub use publish_on::{
    is_event_name, BodySource, NameTemplate, PathTemplate, PollConfig, PublishOnConfig, StatusMatch,
};
pub use webpush::{HostPattern, WebPushConfig, DEFAULT_PUSH_HOSTS};

use crate::model::Transport;
pub use webhook::{
    ChannelSource, ChannelTemplate, IngressConfig, Verify, WebhookConfig, WebhookEvent,
};

/// The whole, validated configuration. Read by every module, written by none after load.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub publish: PublishConfig,
    pub channels: ChannelDefaults,
    pub push: Vec<PushLocation>,
    pub admin: AdminConfig,
    /// `[[webhook]]`: endpoints crier POSTs signed events to.
    pub webhooks: Vec<WebhookConfig>,
    /// `[[ingress]]`: public paths where verified webhooks are published.
    pub ingress: Vec<IngressConfig>,
    /// `[webpush]`; None: Web Push is off.
    pub webpush: Option<WebPushConfig>,
    /// `[webrtc]`: None (the default) serves no WebRTC and opens no UDP socket.
    pub webrtc: Option<WebRtcConfig>,
    /// `[[publish_on]]`: proxied writes that publish a message, in config order.
    pub publish_on: Vec<PublishOnConfig>,
    /// `[[poll]]`: upstream URLs polled, published when their answer changes.
    pub polls: Vec<PollConfig>,
    /// `[cluster]`: channels shared with other nodes through Redis. None (the default): this
    /// node alone. Read at start; a reload that changes it waits for a restart.
    pub cluster: Option<ClusterConfig>,
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
    /// Single-threaded event loops that serve the public listeners' connections (see
    /// `crate::event_loop`); 0 (the default) = those connections run on the runtime's worker
    /// threads.
    pub event_loops: usize,
    /// Proxied requests and subscriber connects/disconnects on stdout.
    pub access_log: AccessLogFormat,
}

/// `server.access_log`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccessLogFormat {
    #[default]
    Off,
    /// The Combined Log Format of Apache and nginx; subscriber lines as key=value after the
    /// same address and time.
    Combined,
    /// One JSON object per line.
    Json,
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

impl std::fmt::Display for UpstreamAddr {
    /// As the config writes it: `http://host:port` or `unix:/path`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamAddr::Http { authority } => write!(f, "http://{authority}"),
            UpstreamAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    pub url: UpstreamAddr,
    pub connect_timeout: Duration,
    /// Time from the request (head and whole body) sent to the upstream's response headers;
    /// past it 504. An upload still moving is never cut (see `Proxy::send`).
    pub response_timeout: Duration,
    /// Longest wait between two reads of an upstream response body (nginx's
    /// `proxy_read_timeout`), on both engines; past it the response is cut. Defaults to
    /// `response_timeout`.
    pub read_timeout: Duration,
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
    /// When set, TCP publishes need `Authorization: Bearer <the token in it>`; the Unix socket
    /// does not. Read by `keys` (and by `crier publish`).
    pub token_file: Option<KeyFile>,
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
    /// `store`: the file that keeps every channel's buffer across restarts (redb). None: the
    /// buffers live in memory only. Read at start; a reload that changes it waits for a restart.
    pub store: Option<PathBuf>,
}

/// `[webrtc]`: one UDP socket (ICE-lite) for every WebRTC DataChannel subscriber.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebRtcConfig {
    pub listen: SocketAddr,
    /// Addresses announced in SDP answers. Empty: the listen address (as bound, so port 0
    /// announces the real port). A candidate with port 0 takes the bound port too.
    pub candidates: Vec<SocketAddr>,
    /// Sessions at once; past it an offer gets 503 and nothing is allocated.
    pub max_sessions: usize,
    /// A session that hears nothing from its peer (consent checks included) this long ends.
    pub ice_timeout: Duration,
}

/// `on_lag`: a subscriber whose next message already left the buffer (it read slower than
/// the channel was published to).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnLag {
    /// Move it to the oldest buffered message and tell it of the gap in band (the default).
    Skip,
    /// End its stream (it reconnects with its last id and learns of the gap then).
    Disconnect,
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
    pub transports: [bool; Transport::COUNT],
    /// Buffer policy for the channels this location serves, when it overrides the defaults.
    pub buffer_override: Option<BufferPolicy>,
    pub first_message: FirstMessage,
    /// What happens to a subscriber that falls behind the buffer.
    pub on_lag: OnLag,
    /// Most channels one request may name (`/live/a,b,c`).
    pub max_channels_per_subscription: usize,
    pub keepalive: Duration,
    pub longpoll_timeout: Duration,
    /// Empty: same origin only. `*` allows any origin.
    pub allow_origins: Vec<String>,
    /// `auth_request`: ask the upstream app before a subscription starts.
    pub forward_auth: Option<ForwardAuthConfig>,
    /// `[push.jwt]`: require a signed token that names the channel.
    pub jwt: Option<JwtConfig>,
    /// What a WebSocket client's own frames do here (`client_messages`, `forward_to`).
    pub client_messages: ClientMessages,
    /// The largest frame a WebSocket client may send (`max_client_message`): 1009 past it.
    pub max_client_message: usize,
    /// Client messages per second per connection (`client_rate`; a burst of twice as many).
    pub client_rate: u32,
    /// `echo`: a publishing client receives its own messages too.
    pub echo: bool,
}

/// `client_messages`: what the text and binary frames a WebSocket client sends do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMessages {
    /// Ignored (the default): subscribers only read.
    Refuse,
    /// Published to the channel, as the publish API would.
    Publish,
    /// POSTed to the upstream app at `forward_to`.
    Forward(ForwardTo),
}

impl ClientMessages {
    /// The `location_kind` label of `crier_client_messages_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientMessages::Refuse => "refuse",
            ClientMessages::Publish => "publish",
            ClientMessages::Forward(_) => "forward",
        }
    }
}

/// `forward_to`: a path (and query) on the upstream, perhaps naming `{channel}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardTo {
    /// The template split at `{channel}` (None: the template does not name it).
    pub prefix: String,
    pub suffix: Option<String>,
}

impl ForwardTo {
    /// The target for a client message on `channel` (a channel name needs no escaping: its
    /// characters are all allowed in a path and a query).
    pub fn target(&self, channel: &str) -> String {
        match &self.suffix {
            None => self.prefix.clone(),
            Some(s) => format!("{}{channel}{s}", self.prefix),
        }
    }
}

/// `auth_request` and its knobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardAuthConfig {
    /// Path (and query) on the upstream, e.g. `/auth/can-subscribe`.
    pub path: String,
    /// Bounds the whole check; past it the subscriber gets 503.
    pub timeout: Duration,
    /// None: every subscription asks the upstream (the default).
    pub cache_ttl: Option<Duration>,
}

/// `[push.jwt]`. The key file is read by `keys` after validation (a missing or bad file is a
/// config error there, and SIGHUP re-reads it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtConfig {
    pub algorithm: JwtAlgorithm,
    pub key_file: KeyFile,
    /// A cookie that may carry the token (besides `Authorization: Bearer` and `access_token`).
    pub cookie: Option<String>,
    pub leeway: Duration,
}

/// The algorithms a `[push.jwt]` location may be configured with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtAlgorithm {
    Hs256,
    Rs256,
    Es256,
}

impl JwtAlgorithm {
    pub fn parse(s: &str) -> Option<JwtAlgorithm> {
        match s {
            "HS256" => Some(JwtAlgorithm::Hs256),
            "RS256" => Some(JwtAlgorithm::Rs256),
            "ES256" => Some(JwtAlgorithm::Es256),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JwtAlgorithm::Hs256 => "HS256",
            JwtAlgorithm::Rs256 => "RS256",
            JwtAlgorithm::Es256 => "ES256",
        }
    }
}

/// A file of key material the config names (a token, a secret, a key). The config only says
/// where it is; `keys` reads it after validation, and a problem with it points at `origin`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFile {
    pub path: PathBuf,
    pub origin: Origin,
}

/// Where in the config file a value is: for problems found after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The config file as messages name it.
    pub file: std::sync::Arc<str>,
    pub line: usize,
    pub col: usize,
    /// The dotted key, e.g. `push.jwt.secret_file`.
    pub key: &'static str,
}

impl Origin {
    /// A problem at this place, in the same `file:line:col: key: reason` shape as every
    /// config error.
    pub fn problem(&self, msg: impl fmt::Display) -> String {
        format!(
            "{}:{}:{}: {}: {msg}",
            self.file, self.line, self.col, self.key
        )
    }
}

impl PushLocation {
    pub fn allows(&self, t: Transport) -> bool {
        self.transports[t.index()]
    }

    /// Whether two locations check subscribers the same way (Origin, forward auth, JWT): the
    /// condition for sharing a `channel_prefix`, since the channels' owner's checks apply.
    /// (What a client's messages do may differ: that follows the location it connected to,
    /// see `push::inbound`.)
    pub fn checks_like(&self, other: &PushLocation) -> bool {
        self.allow_origins == other.allow_origins
            && self.forward_auth == other.forward_auth
            && self.jwt == other.jwt
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
        let name = path.map_or("<config>".to_string(), |p| p.display().to_string());
        match Config::parse(text, path) {
            (Some(cfg), problems) if problems.is_empty() => Ok(cfg),
            (_, mut problems) => {
                sort_problems(&name, &mut problems);
                Err(ConfigError { problems })
            }
        }
    }

    /// Parses and validates, returning what could be built (None when the TOML itself does
    /// not read) and every problem found, unsorted.
    pub(crate) fn parse(text: &str, path: Option<&Path>) -> (Option<Config>, Vec<String>) {
        let name = path
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "<config>".into());
        let mut problems = Vec::new();
        let Some(raw) = read_raw(text, &name, &mut problems) else {
            return (None, problems);
        };
        let mut v = Validator {
            text,
            name,
            problems,
        };
        let cfg = v.build(raw, path);
        (Some(cfg), v.problems)
    }

    /// The config file as messages name it.
    pub fn display_name(&self) -> String {
        self.source
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "<config>".into())
    }

    /// What `crier check` tells about channel ownership: for each location whose channel
    /// names a longer prefix claims, who owns those channels (their checks apply however a
    /// channel is reached).
    pub fn ownership_notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        for owner in &self.push {
            for other in &self.push {
                let p = owner.channel_prefix.as_str();
                if other.channel_prefix.len() < p.len() && p.starts_with(&other.channel_prefix) {
                    notes.push(format!(
                        "channels {p:?}… belong to {} (channel_prefix {p:?}); {} names them too and applies the checks of {} to them",
                        owner.path, other.path, owner.path
                    ));
                }
            }
        }
        notes
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

/// Puts problems (`file:line:col: ...`) in file order, so the operator reads them top to bottom.
pub fn sort_problems(file: &str, problems: &mut [String]) {
    let at = |p: &String| -> (usize, usize) {
        let rest = p.strip_prefix(file).unwrap_or(p);
        let mut nums = rest
            .split(':')
            .skip(1)
            .map_while(|n| n.parse::<usize>().ok());
        (nums.next().unwrap_or(0), nums.next().unwrap_or(0))
    };
    problems.sort_by_key(at);
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
                "{s:?} has an unknown unit {u:?} (B, KiB, MiB, GiB, or KB, kB, MB, GB in powers of 1000)"
            ))
        }
    };
    n.checked_mul(mult)
        .filter(|b| *b <= 1 << 40)
        .map(|b| b as usize)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::validate::parse_upstream;
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
        assert_eq!(
            c.server.listen,
            vec!["127.0.0.1:8080".parse().expect("test setup")]
        );
        assert_eq!(c.push.len(), 1);
        assert_eq!(c.push[0].prefix, "/live/");
        assert_eq!(c.channels.buffer.buffer_messages, 100);
        assert_eq!(c.upstream.response_timeout, Duration::from_secs(60));
        assert_eq!(c.upstream.read_timeout, c.upstream.response_timeout);
    }

    #[test]
    fn channels_store_is_a_file_next_to_the_config() {
        assert_eq!(Config::default().channels.store, None, "memory by default");
        let c = Config::from_toml(
            "[channels]\nstore = \"state/channels.redb\"\n",
            Some(Path::new("/etc/crier/crier.toml")),
        )
        .expect("test setup");
        assert_eq!(
            c.channels.store.as_deref(),
            Some(Path::new("/etc/crier/state/channels.redb"))
        );
        for bad in ["\"\"", "\"/var/lib/crier/\""] {
            let e = errs(&format!("[channels]\nstore = {bad}\n"));
            assert!(
                e.contains("channels.store") && e.contains("must name a file"),
                "{e}"
            );
        }
    }

    #[test]
    fn cluster_is_off_by_default_and_checked() {
        assert_eq!(Config::default().cluster, None, "one node by default");
        let c = Config::from_toml(
            "[cluster]\nredis = [\"redis://127.0.0.1:6379/0\", \"unix:///run/r.sock\"]\npassword_file = \"pw\"\n",
            Some(Path::new("/etc/crier/crier.toml")),
        )
        .expect("test setup");
        let cl = c.cluster.expect("test setup");
        assert_eq!(cl.redis.len(), 2);
        assert_eq!(cl.key_prefix, "crier:");
        assert_eq!(
            cl.password_file.map(|f| f.path),
            Some(PathBuf::from("/etc/crier/pw"))
        );
        let e = errs("[cluster]\nkey_prefix = \"x\"\n");
        assert!(e.contains("c.toml:1:1: cluster.redis: required"), "{e}");
        let e = errs("[cluster]\nredis = []\n");
        assert!(
            e.contains("c.toml:2:9: cluster.redis: needs at least one URL"),
            "{e}"
        );
        let e = errs("[cluster]\nredis = [\"redis://a\", \"http://b\"]\n");
        assert!(
            e.contains("c.toml:2:23: cluster.redis: \"http://b\": unknown scheme"),
            "{e}"
        );
        let e = errs("[cluster]\nredis = [\"redis://a\"]\nkey_prefix = \"{x}\"\n");
        assert!(e.contains("c.toml:3:14: cluster.key_prefix"), "{e}");
        let e = errs("[channels]\nstore = \"c.redb\"\n[cluster]\nredis = [\"redis://a\"]\n");
        assert!(
            e.contains("c.toml:2:9: channels.store: cannot be used with [cluster]"),
            "{e}"
        );
        let c = Config::from_toml(
            "[cluster]\nredis = [\"rediss://r:6380\"]\nca_file = \"ca.pem\"\n",
            Some(Path::new("/etc/crier/crier.toml")),
        )
        .expect("test setup");
        assert_eq!(
            c.cluster.and_then(|c| c.ca_file),
            Some(PathBuf::from("/etc/crier/ca.pem"))
        );
        let e = errs("[cluster]\nredis = [\"redis://a\"]\nnodes = 3\n");
        assert!(e.contains("cluster.nodes: unknown key"), "{e}");
    }

    #[test]
    fn shipped_example_is_the_defaults() {
        let c = Config::from_toml(include_str!("../../conf/crier.toml"), None).expect("test setup");
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
        assert!(c.webpush.is_none() && d.webpush.is_none());
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(
            parse_duration("250ms").expect("test setup"),
            Duration::from_millis(250)
        );
        assert_eq!(
            parse_duration("15s").expect("test setup"),
            Duration::from_secs(15)
        );
        assert_eq!(
            parse_duration("10m").expect("test setup"),
            Duration::from_secs(600)
        );
        assert!(parse_duration("-5s").unwrap_err().contains("negative"));
        assert!(parse_duration("5").unwrap_err().contains("unit"));
        assert!(parse_duration("5 fortnights").is_err());
        assert_eq!(parse_size("64KiB").expect("test setup"), 65536);
        assert_eq!(parse_size("1MiB").expect("test setup"), 1 << 20);
        assert_eq!(parse_size("100").expect("test setup"), 100);
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
            parse_upstream("unix:/run/app.sock").expect("test setup"),
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
        .expect("test setup");
        let fa = c.push[0].forward_auth.as_ref().expect("test setup");
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
    fn client_message_keys() {
        let d = Config::default();
        assert_eq!(d.push[0].client_messages, ClientMessages::Refuse);
        assert_eq!(d.push[0].max_client_message, 16 * 1024);
        assert_eq!((d.push[0].client_rate, d.push[0].echo), (20, true));
        let c = Config::from_toml(
            "[[push]]\npath = \"/room/{channel}\"\nclient_messages = \"publish\"\nmax_client_message = \"4KiB\"\nclient_rate = 5\necho = false\n[[push]]\npath = \"/doc/{channel}\"\nchannel_prefix = \"doc:\"\nclient_messages = \"forward\"\nforward_to = \"/ws-in/{channel}?v=1\"\n",
            None,
        )
        .expect("test setup");
        let room = &c.push[0];
        assert_eq!(room.client_messages, ClientMessages::Publish);
        assert_eq!(
            (room.max_client_message, room.client_rate, room.echo),
            (4096, 5, false)
        );
        let ClientMessages::Forward(to) = &c.push[1].client_messages else {
            panic!("forward: {:?}", c.push[1].client_messages);
        };
        assert_eq!(to.target("doc:a"), "/ws-in/doc:a?v=1");

        let e = errs("[[push]]\npath = \"/a/{channel}\"\nclient_messages = \"shout\"\nforward_to = \"/in\"\nclient_rate = 0\necho = false\n");
        let lines: Vec<_> = e.lines().collect();
        assert_eq!(lines.len(), 4, "{e}");
        assert!(
            lines[0].starts_with("c.toml:3:19: push.client_messages: \"shout\" is not one of"),
            "{e}"
        );
        assert!(
            lines[1].starts_with(
                "c.toml:4:14: push.forward_to: only applies with client_messages = \"forward\""
            ),
            "{e}"
        );
        assert!(
            lines[2].starts_with("c.toml:5:15: push.client_rate: 0 is out of range"),
            "{e}"
        );
        assert!(
            lines[3].starts_with(
                "c.toml:6:8: push.echo: only applies with client_messages = \"publish\""
            ),
            "{e}"
        );
        let e = errs("[[push]]\npath = \"/a/{channel}\"\nclient_messages = \"forward\"\n");
        assert!(
            e.starts_with("c.toml:3:19: push.client_messages: \"forward\" needs forward_to"),
            "{e}"
        );
        let e = errs("[[push]]\npath = \"/a/{channel}\"\nclient_messages = \"forward\"\nforward_to = \"in/{channel}/{channel}\"\n");
        assert!(
            e.starts_with("c.toml:4:14: push.forward_to: is a path"),
            "{e}"
        );
        let e = errs("[[push]]\npath = \"/a/{channel}\"\nclient_messages = \"publish\"\nmax_client_message = \"2MiB\"\nclient_rate = 0\n");
        let lines: Vec<_> = e.lines().collect();
        assert_eq!(lines.len(), 2, "{e}");
        assert!(
            lines[0].contains("push.max_client_message: is larger than channels.max_message_size"),
            "{e}"
        );
        assert!(
            lines[1].contains("push.client_rate: 0 is out of range"),
            "{e}"
        );
        let e = errs("[[push]]\npath = \"/a/{channel}\"\nmax_client_message = \"1GiB\"\n");
        assert!(
            e.contains("push.max_client_message: at most \"16MiB\""),
            "{e}"
        );
        // A publishing location beside a reading one on the same channels (the issue's
        // example next to the default /live): allowed, each takes its own clients' messages.
        let c = Config::from_toml("[[push]]\npath = \"/live/{channel}\"\n[[push]]\npath = \"/room/{channel}\"\nclient_messages = \"publish\"\n", None);
        assert!(c.is_ok(), "{:?}", c.err());
    }

    #[test]
    fn webrtc_section() {
        let c = Config::from_toml(
            "[webrtc]\nlisten = \"0.0.0.0:3478\"\ncandidates = [\"203.0.113.7:3478\"]\nmax_sessions = 5\nice_timeout = \"10s\"\n",
            None,
        )
        .expect("test setup");
        let w = c.webrtc.as_ref().expect("test setup");
        assert_eq!(
            w.candidates,
            vec!["203.0.113.7:3478".parse().expect("test setup")]
        );
        assert_eq!(
            (w.max_sessions, w.ice_timeout),
            (5, Duration::from_secs(10))
        );
        assert!(
            c.push[0].allows(Transport::WebRtc),
            "on by default with [webrtc]"
        );
        assert!(Config::default().webrtc.is_none());
        assert!(!Config::default().push[0].allows(Transport::WebRtc));

        let e = errs("[[push]]\npath = \"/a/{channel}\"\ntransports = [\"webrtc\"]\n");
        assert!(
            e.contains("push.transports: \"webrtc\" needs a [webrtc] section"),
            "{e}"
        );
        let e = errs("[webrtc]\nlisten = \"0.0.0.0:3478\"\n");
        assert!(
            e.starts_with("c.toml:2:10: webrtc.candidates: needed when"),
            "{e}"
        );
        let e = errs("[webrtc]\n");
        assert!(
            e.starts_with("c.toml:1:1: webrtc.candidates: needed when"),
            "{e}"
        );
        let e = errs("[webrtc]\nlisten = \"127.0.0.1:1\"\ncandidates = [\"0.0.0.0:1\", \"x\"]\nmax_sessions = 0\nice_timeout = \"0s\"\nturn = 1\n");
        let lines: Vec<_> = e.lines().collect();
        assert_eq!(lines.len(), 5, "{e}");
        assert!(
            lines[0].contains("webrtc.candidates: a browser cannot reach 0.0.0.0"),
            "{e}"
        );
        assert!(
            lines[1].contains("webrtc.candidates: \"x\" is not an address"),
            "{e}"
        );
        assert!(
            lines[2].contains("webrtc.max_sessions: 0 is out of range"),
            "{e}"
        );
        assert!(
            lines[3].contains("webrtc.ice_timeout: must be greater than zero"),
            "{e}"
        );
        assert!(lines[4].contains("webrtc.turn: unknown key"), "{e}");
    }

    #[test]
    fn on_lag_and_channel_lists() {
        let c = Config::default();
        assert_eq!(c.push[0].on_lag, OnLag::Skip);
        assert_eq!(c.push[0].max_channels_per_subscription, 16);
        let shipped =
            Config::from_toml(include_str!("../../conf/crier.toml"), None).expect("valid");
        assert_eq!(shipped.push[0].on_lag, OnLag::Skip);
        let e = errs("[[push]]\npath = \"/a/{channel}\"\non_lag = \"drop\"\nmax_channels_per_subscription = 0\n");
        let lines: Vec<_> = e.lines().collect();
        assert_eq!(lines.len(), 2, "{e}");
        assert!(
            lines[0].starts_with("c.toml:3:10: push.on_lag: \"drop\" is neither"),
            "{e}"
        );
        assert!(
            lines[1].contains("push.max_channels_per_subscription: 0 is out of range"),
            "{e}"
        );
    }

    #[test]
    fn buffer_override_by_channel_prefix() {
        let c = Config::from_toml(
            "[[push]]\npath = \"/live/{channel}\"\n[[push]]\npath = \"/chat/{channel}\"\nchannel_prefix = \"chat:\"\nbuffer_messages = 5\n",
            None,
        )
        .expect("test setup");
        assert_eq!(c.buffer_policy_for("chat:x").buffer_messages, 5);
        assert_eq!(c.buffer_policy_for("news").buffer_messages, 100);
    }
}
