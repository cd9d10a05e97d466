//! Raw config values → typed ones, collecting every problem with its key and `line:column`.

use super::raw::*;
use super::*;

pub(super) struct Validator<'a> {
    pub(super) text: &'a str,
    pub(super) name: String,
    pub(super) problems: Vec<String>,
}

impl Validator<'_> {
    pub(super) fn err<T>(&mut self, key: &str, at: &S<T>, msg: impl fmt::Display) {
        self.err_at(key, at.span().start, msg);
    }

    /// A problem at a byte offset (a table rather than one value).
    pub(super) fn err_at(&mut self, key: &str, offset: usize, msg: impl fmt::Display) {
        let (l, c) = line_col(self.text, offset);
        self.problems
            .push(format!("{}:{l}:{c}: {key}: {msg}", self.name));
    }

    /// A key file named at `at`: its path (resolved against the config's directory) and where
    /// the config names it, for `keys` to report problems with.
    pub(super) fn key_file(&self, key: &'static str, at: &S<String>, base: &Path) -> KeyFile {
        let (line, col) = line_col(self.text, at.span().start);
        KeyFile {
            path: resolve(base, at.get_ref()),
            origin: Origin {
                file: self.name.as_str().into(),
                line,
                col,
                key,
            },
        }
    }

    pub(super) fn duration(
        &mut self,
        key: &str,
        v: Option<S<String>>,
        default: Duration,
    ) -> Duration {
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

    pub(super) fn size(&mut self, key: &str, v: Option<S<String>>, default: usize) -> usize {
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

    pub(super) fn count(
        &mut self,
        key: &str,
        v: Option<S<i64>>,
        range: (i64, i64),
        default: usize,
    ) -> usize {
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

    pub(super) fn build(&mut self, raw: RawConfig, path: Option<&Path>) -> Config {
        let base = path.and_then(Path::parent).unwrap_or(Path::new(""));
        let server = self.server(raw.server.map(Spanned::into_inner), base);
        let upstream = self.upstream(raw.upstream.map(Spanned::into_inner));
        let publish = self.publish(raw.publish.map(Spanned::into_inner), base);
        let store_at = raw
            .channels
            .as_ref()
            .and_then(|c| c.get_ref().store.as_ref().map(|s| s.span().start));
        let channels = self.channels(raw.channels.map(Spanned::into_inner), base);
        let cluster = raw
            .cluster
            .and_then(|c| self.cluster(c, base, &channels, store_at));
        let webrtc = raw.webrtc.map(|w| self.webrtc(w));
        let push = match raw.push {
            None => vec![default_push_location(&channels, webrtc.is_some())],
            Some(list) => {
                let mut seen = BTreeSet::new();
                let mut out: Vec<PushLocation> = Vec::new();
                for p in list.into_inner() {
                    let span_holder = Spanned::clone(&p.get_ref().path);
                    let loc = self.push_location(p.into_inner(), &channels, base, webrtc.is_some());
                    if let Some(loc) = loc {
                        if !seen.insert(loc.path.clone()) {
                            self.err("push.path", &span_holder, "the same path is used twice");
                        }
                        // Same prefix, same channels: the first owns them, and its checks
                        // would silently apply to the other's subscribers.
                        if let Some(first) = out.iter().find(|o| {
                            o.channel_prefix == loc.channel_prefix && !o.checks_like(&loc)
                        }) {
                            self.err(
                                "push.path",
                                &span_holder,
                                format!(
                                    "serves the same channels as {} (channel_prefix {:?}) but checks subscribers differently (allow_origins, auth_request, [push.jwt]); give one of them its own channel_prefix",
                                    first.path, loc.channel_prefix
                                ),
                            );
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
        let webhooks = self.webhooks(raw.webhook, base);
        let ingress = self.ingresses(raw.ingress, &server, base);
        let webpush = raw.webpush.and_then(|w| self.webpush(w, base, &push));
        let publish_on = self.publish_on_rules(raw.publish_on);
        let polls = self.polls(raw.poll, base);
        Config {
            server,
            upstream,
            publish,
            channels,
            push,
            admin,
            webhooks,
            ingress,
            webpush,
            webrtc,
            publish_on,
            polls,
            cluster,
            source: path.map(Path::to_path_buf),
        }
    }

    fn webrtc(&mut self, raw: S<RawWebRtc>) -> WebRtcConfig {
        let table = raw.span();
        let raw = raw.into_inner();
        let listen_at = raw.listen.clone();
        let default_listen: SocketAddr = ([0, 0, 0, 0], 3478).into();
        let listen = match raw.listen {
            None => default_listen,
            Some(l) => parse_addr(l.get_ref()).unwrap_or_else(|e| {
                self.err("webrtc.listen", &l, e);
                default_listen
            }),
        };
        let mut candidates = Vec::new();
        if let Some(list) = raw.candidates {
            for c in list.into_inner() {
                match parse_addr(c.get_ref()) {
                    Ok(a) if a.ip().is_unspecified() => self.err(
                        "webrtc.candidates",
                        &c,
                        "a browser cannot reach 0.0.0.0; give the address it should use",
                    ),
                    Ok(a) => candidates.push(a),
                    Err(e) => self.err("webrtc.candidates", &c, e),
                }
            }
        }
        if candidates.is_empty() && listen.ip().is_unspecified() {
            let msg = "needed when webrtc.listen is a wildcard address: the address browsers reach crier's UDP port at, like [\"203.0.113.7:3478\"]";
            match &listen_at {
                Some(l) => self.err("webrtc.candidates", l, msg),
                None => {
                    let (l, c) = line_col(self.text, table.start);
                    self.problems
                        .push(format!("{}:{l}:{c}: webrtc.candidates: {msg}", self.name));
                }
            }
        }
        WebRtcConfig {
            listen,
            candidates,
            max_sessions: self.count(
                "webrtc.max_sessions",
                raw.max_sessions,
                (1, 10_000_000),
                10_000,
            ),
            ice_timeout: self.duration(
                "webrtc.ice_timeout",
                raw.ice_timeout,
                Duration::from_secs(30),
            ),
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
            event_loops: None,
            access_log: None,
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
            // Off by default: on a burst to 10,000 SSE subscribers the loops cost ~15 % of the
            // deliveries/s (every wake-up crosses from the publishing thread to a loop), for
            // ~9 % more proxied requests/s (README, "Performance").
            event_loops: self.count("server.event_loops", raw.event_loops, (0, 1024), 0),
            access_log: match raw.access_log {
                None => AccessLogFormat::Off,
                Some(v) => match v.get_ref().as_str() {
                    "off" => AccessLogFormat::Off,
                    "combined" => AccessLogFormat::Combined,
                    "json" => AccessLogFormat::Json,
                    other => {
                        self.err(
                            "server.access_log",
                            &v,
                            format!("{other:?}: one of \"off\", \"combined\", \"json\""),
                        );
                        AccessLogFormat::Off
                    }
                },
            },
        }
    }

    fn upstream(&mut self, raw: Option<RawUpstream>) -> UpstreamConfig {
        let raw = raw.unwrap_or(RawUpstream {
            url: None,
            connect_timeout: None,
            response_timeout: None,
            read_timeout: None,
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
        let response_timeout = self.duration(
            "upstream.response_timeout",
            raw.response_timeout,
            Duration::from_secs(60),
        );
        UpstreamConfig {
            url,
            connect_timeout: self.duration(
                "upstream.connect_timeout",
                raw.connect_timeout,
                Duration::from_secs(2),
            ),
            response_timeout,
            read_timeout: self.duration(
                "upstream.read_timeout",
                raw.read_timeout,
                response_timeout,
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
        let token_file = raw
            .token_file
            .map(|f| self.key_file("publish.token_file", &f, base));
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
            token_file,
        }
    }

    fn channels(&mut self, raw: Option<RawChannels>, base: &Path) -> ChannelDefaults {
        let raw = raw.unwrap_or(RawChannels {
            buffer_messages: None,
            buffer_ttl: None,
            max_message_size: None,
            max_channels: None,
            store: None,
        });
        let store = match raw.store {
            None => None,
            Some(s) if s.get_ref().is_empty() || s.get_ref().ends_with('/') => {
                self.err(
                    "channels.store",
                    &s,
                    "must name a file, like \"/var/lib/crier/channels.redb\"",
                );
                None
            }
            Some(s) => Some(resolve(base, s.get_ref())),
        };
        ChannelDefaults {
            store,
            buffer: BufferPolicy {
                buffer_messages: self.count(
                    "channels.buffer_messages",
                    raw.buffer_messages,
                    (1, 10_000_000),
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

    /// `channels`: the `[channels]` defaults (the buffer policy, for the half a location does
    /// not override; the message size a client message may not exceed).
    fn push_location(
        &mut self,
        raw: RawPush,
        channels: &ChannelDefaults,
        base: &Path,
        webrtc: bool,
    ) -> Option<PushLocation> {
        let defaults = &channels.buffer;
        let path = raw.path.get_ref().clone();
        let mut ok = true;
        let (prefix, suffix) = match path.split_once("{channel}") {
            Some((p, s)) if p.starts_with('/') && !s.contains("{channel}") => {
                (p.to_string(), s.to_string())
            }
            _ => {
                let msg = match misspelt_placeholder(&path) {
                    Some(bad) => format!(
                        "unknown placeholder {bad}: the channel's place is written {{channel}}"
                    ),
                    None => "must start with '/' and contain {channel} exactly once".into(),
                };
                self.err("push.path", &raw.path, msg);
                ok = false;
                (String::new(), String::new())
            }
        };
        let channel_prefix = match raw.channel_prefix {
            None => String::new(),
            Some(p) => {
                if !p.get_ref().chars().all(crate::model::is_channel_char) || p.get_ref().len() > 64
                {
                    self.err(
                        "push.channel_prefix",
                        &p,
                        "may hold only A-Z a-z 0-9 . _ - : ~ (at most 64)",
                    );
                }
                p.into_inner()
            }
        };
        // "webrtc" is served by default only where a [webrtc] section opens the UDP socket.
        let mut transports = [true, true, true, webrtc];
        if let Some(list) = raw.transports {
            transports = [false; Transport::COUNT];
            if list.get_ref().is_empty() {
                self.err("push.transports", &list, "needs at least one transport");
            }
            for t in list.into_inner() {
                match t.get_ref().as_str() {
                    "websocket" => transports[0] = true,
                    "sse" => transports[1] = true,
                    "longpoll" => transports[2] = true,
                    "webrtc" if webrtc => transports[3] = true,
                    "webrtc" => self.err(
                        "push.transports",
                        &t,
                        "\"webrtc\" needs a [webrtc] section (its UDP listen address)",
                    ),
                    other => self.err(
                        "push.transports",
                        &t,
                        format!("unknown transport {other:?} (websocket, sse, longpoll, webrtc)"),
                    ),
                }
            }
        }
        let buffer_override = if raw.buffer_messages.is_some() || raw.buffer_ttl.is_some() {
            Some(BufferPolicy {
                buffer_messages: self.count(
                    "push.buffer_messages",
                    raw.buffer_messages,
                    (1, 10_000_000),
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
        let on_lag = match raw.on_lag {
            None => OnLag::Skip,
            Some(v) => match v.get_ref().as_str() {
                "skip" => OnLag::Skip,
                "disconnect" => OnLag::Disconnect,
                other => {
                    self.err(
                        "push.on_lag",
                        &v,
                        format!("{other:?} is neither \"skip\" nor \"disconnect\""),
                    );
                    OnLag::Skip
                }
            },
        };
        let max_channels_per_subscription = self.count(
            "push.max_channels_per_subscription",
            raw.max_channels_per_subscription,
            (1, 256),
            16,
        );
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
        let client = self.client_messages(
            raw.client_messages,
            raw.forward_to,
            raw.max_client_message,
            raw.client_rate,
            raw.echo,
            channels.max_message_size,
        );
        ok.then_some(PushLocation {
            path,
            prefix,
            suffix,
            channel_prefix,
            transports,
            buffer_override,
            first_message,
            on_lag,
            max_channels_per_subscription,
            keepalive,
            longpoll_timeout,
            allow_origins,
            forward_auth,
            jwt,
            client_messages: client.mode,
            max_client_message: client.max,
            client_rate: client.rate,
            echo: client.echo,
        })
    }

    /// `client_messages` and the keys that go with it; each key that only applies to another
    /// mode is an error (it would silently do nothing).
    fn client_messages(
        &mut self,
        mode: Option<S<String>>,
        forward_to: Option<S<String>>,
        max: Option<S<String>>,
        rate: Option<S<i64>>,
        echo: Option<S<bool>>,
        max_message_size: usize,
    ) -> ClientSettings {
        let mut out = ClientSettings {
            mode: ClientMessages::Refuse,
            max: DEFAULT_MAX_CLIENT_MESSAGE,
            rate: DEFAULT_CLIENT_RATE,
            echo: true,
        };
        let named = mode.as_ref().map(|m| m.get_ref().as_str());
        match named {
            None | Some("refuse") => {}
            Some("publish") => out.mode = ClientMessages::Publish,
            Some("forward") => match &forward_to {
                None => {
                    if let Some(m) = &mode {
                        self.err(
                            "push.client_messages",
                            m,
                            "\"forward\" needs forward_to, the upstream path each client message is POSTed to (e.g. \"/ws-in/{channel}\")",
                        );
                    }
                }
                Some(t) => {
                    if let Some(f) = self.forward_to(t) {
                        out.mode = ClientMessages::Forward(f);
                    }
                }
            },
            Some(other) => {
                if let Some(m) = &mode {
                    self.err(
                        "push.client_messages",
                        m,
                        format!("{other:?} is not one of \"refuse\", \"publish\", \"forward\""),
                    );
                }
            }
        }
        let mode_name = named.unwrap_or("refuse");
        if let (Some(t), false) = (&forward_to, mode_name == "forward") {
            self.err(
                "push.forward_to",
                t,
                "only applies with client_messages = \"forward\"",
            );
        }
        if let (Some(r), "refuse") = (&rate, mode_name) {
            self.err(
                "push.client_rate",
                r,
                "only applies with client_messages = \"publish\" or \"forward\"",
            );
        }
        if let Some(e) = &echo {
            if mode_name != "publish" {
                self.err(
                    "push.echo",
                    e,
                    "only applies with client_messages = \"publish\"",
                );
            }
            out.echo = *e.get_ref();
        }
        out.rate = self.count("push.client_rate", rate, (1, 1_000_000), out.rate as usize) as u32;
        let at = max.clone();
        out.max = self.size("push.max_client_message", max, out.max);
        if let Some(at) = at {
            if out.max > MAX_CLIENT_MESSAGE_LIMIT {
                self.err(
                    "push.max_client_message",
                    &at,
                    "at most \"16MiB\" (crier holds a client's frame in memory while it reads it)",
                );
                out.max = DEFAULT_MAX_CLIENT_MESSAGE;
            } else if mode_name == "publish" && out.max > max_message_size {
                self.err(
                    "push.max_client_message",
                    &at,
                    format!("is larger than channels.max_message_size ({max_message_size} bytes), which a published message may not exceed"),
                );
            }
        }
        out
    }

    /// `forward_to`: a path (and query) on the upstream, naming `{channel}` at most once.
    fn forward_to(&mut self, t: &S<String>) -> Option<ForwardTo> {
        let s = t.get_ref();
        let f = match s.split_once("{channel}") {
            None => ForwardTo {
                prefix: s.clone(),
                suffix: None,
            },
            Some((p, rest)) => ForwardTo {
                prefix: p.to_string(),
                suffix: Some(rest.to_string()),
            },
        };
        let valid = s.starts_with('/')
            && !s.contains('#')
            && f.suffix.as_ref().is_none_or(|r| !r.contains("{channel}"))
            && f.target("c").parse::<http::uri::PathAndQuery>().is_ok();
        if !valid {
            self.err(
                "push.forward_to",
                t,
                "is a path on the upstream app naming {channel} at most once, like \"/ws-in/{channel}\"",
            );
            return None;
        }
        Some(f)
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
        Some(JwtConfig {
            algorithm,
            key_file: self.key_file(file_key, &file, base),
            cookie,
            leeway,
        })
    }
}

pub(super) fn default_push_location(channels: &ChannelDefaults, webrtc: bool) -> PushLocation {
    let _ = channels;
    PushLocation {
        path: "/live/{channel}".into(),
        prefix: "/live/".into(),
        suffix: String::new(),
        channel_prefix: String::new(),
        transports: [true, true, true, webrtc],
        buffer_override: None,
        first_message: FirstMessage::Newest,
        on_lag: OnLag::Skip,
        max_channels_per_subscription: 16,
        keepalive: Duration::from_secs(15),
        longpoll_timeout: Duration::from_secs(30),
        allow_origins: Vec::new(),
        forward_auth: None,
        jwt: None,
        client_messages: ClientMessages::Refuse,
        max_client_message: DEFAULT_MAX_CLIENT_MESSAGE,
        client_rate: DEFAULT_CLIENT_RATE,
        echo: true,
    }
}

/// `max_client_message` unless set: client frames are small (commands, chat lines).
pub(super) const DEFAULT_MAX_CLIENT_MESSAGE: usize = 16 * 1024;
/// The largest `max_client_message`: tungstenite holds a frame whole while it reads it.
const MAX_CLIENT_MESSAGE_LIMIT: usize = 16 << 20;
/// `client_rate` unless set: messages per second per connection.
pub(super) const DEFAULT_CLIENT_RATE: u32 = 20;

/// What `client_messages` and its keys come to.
pub(super) struct ClientSettings {
    mode: ClientMessages,
    max: usize,
    rate: u32,
    echo: bool,
}

pub(super) fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// A group name (or a numeric gid) → the gid, from the system's group database.
pub(super) fn lookup_group(name: &str) -> Result<u32, String> {
    if !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit()) {
        return name
            .parse()
            .map_err(|_| format!("{name:?} is not a valid gid"));
    }
    // nix's getgrnam_r wrapper grows its buffer as the group database needs.
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(format!(
            "unknown group {name:?} (not in the system's group database)"
        )),
        Err(e) => Err(format!("cannot look up group {name:?}: {e}")),
    }
}

pub(super) fn parse_addr(s: &str) -> Result<SocketAddr, String> {
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

pub(super) fn parse_upstream(s: &str) -> Result<UpstreamAddr, String> {
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

/// The first `{...}` in a push path that is not `{channel}` (a typo such as `{chanel}`).
fn misspelt_placeholder(path: &str) -> Option<&str> {
    let mut rest = path;
    while let Some(open) = rest.find('{') {
        let tail = &rest[open..];
        let close = tail.find('}')?;
        let ph = &tail[..=close];
        if ph != "{channel}" {
            return Some(ph);
        }
        rest = &tail[close + 1..];
    }
    None
}
