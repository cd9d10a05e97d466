//! `[webpush]`: the raw section, its typed form and its validation. In its own file so the
//! Web Push settings stay together; the section is off unless present.

use serde::Deserialize;

use super::raw::S;
use super::validate::{resolve, Validator};
use super::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWebPush {
    vapid_key_file: Option<S<String>>,
    subject: Option<S<String>>,
    path: Option<S<String>>,
    store: Option<S<String>>,
    push_hosts: Option<S<Vec<S<String>>>>,
    ttl: Option<S<String>>,
    max_subscriptions: Option<S<i64>>,
    ca_file: Option<S<String>>,
    push_ports: Option<S<Vec<S<i64>>>>,
    allow_addresses: Option<S<Vec<S<String>>>>,
    resolve: Option<S<RawResolve>>,
}

/// `resolve = { "host" = ["ip", ...] }`.
type RawResolve = std::collections::BTreeMap<String, S<Vec<S<String>>>>;

/// The push services of the major browsers: Chrome (FCM), Firefox, Edge, Safari.
pub const DEFAULT_PUSH_HOSTS: [&str; 4] = [
    "*.googleapis.com",
    "*.push.services.mozilla.com",
    "*.notify.windows.com",
    "*.push.apple.com",
];

/// `[webpush]`, validated. The VAPID key file is read by `keys` (a missing or bad one is a
/// config error there, and SIGHUP re-reads it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebPushConfig {
    pub vapid_key_file: KeyFile,
    /// The VAPID `sub` claim: `mailto:` or `https:` contact for the push services.
    pub subject: String,
    /// On the public listener: `{path}/key`, `{path}/{channel}`. No trailing slash.
    pub path: String,
    /// The subscription database (redb).
    pub store: PathBuf,
    /// Hosts a subscription's endpoint may name (the SSRF guard).
    pub push_hosts: Vec<HostPattern>,
    /// The `TTL` header: how long a push service keeps a message for an offline browser.
    pub ttl: Duration,
    pub max_subscriptions: usize,
    /// Extra CAs the outbound client trusts (a private push service; the tests' double).
    pub ca_file: Option<PathBuf>,
    /// Ports an endpoint may name (default 443 only).
    pub push_ports: Vec<u16>,
    /// Addresses crier may push to although they are not public (default none: loopback,
    /// private, link-local, unique-local and metadata addresses are refused).
    pub allow_addresses: Vec<ipnet::IpNet>,
    /// Fixed addresses for push host names (like /etc/hosts), vetted like DNS answers.
    pub resolve: std::collections::BTreeMap<String, Vec<std::net::IpAddr>>,
}

/// One `push_hosts` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// A host name or IP address, matched exactly. An IP or `localhost` passes only this way.
    Exact(String),
    /// `*.example.com`: any host strictly under `example.com` (never an IP address).
    Subdomain(String),
}

impl HostPattern {
    pub fn parse(s: &str) -> Result<HostPattern, String> {
        let s = s.trim().to_ascii_lowercase();
        if let Some(rest) = s.strip_prefix("*.") {
            if !is_dns_name(rest) || !rest.contains('.') {
                return Err(format!(
                    "{s:?}: a wildcard needs a domain of at least two labels, like \"*.push.apple.com\""
                ));
            }
            return Ok(HostPattern::Subdomain(rest.to_string()));
        }
        let bare = s.trim_start_matches('[').trim_end_matches(']');
        if bare.parse::<std::net::IpAddr>().is_ok() {
            return Ok(HostPattern::Exact(bare.to_string()));
        }
        if !is_dns_name(&s) {
            return Err(format!(
                "{s:?} is not a host name, an IP address or \"*.domain\""
            ));
        }
        Ok(HostPattern::Exact(s))
    }

    /// `host`: lowercase, IPv6 without brackets.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(h) => h == host,
            HostPattern::Subdomain(d) => {
                host.parse::<std::net::IpAddr>().is_err()
                    && host.len() > d.len() + 1
                    && host.ends_with(d.as_str())
                    && host.as_bytes()[host.len() - d.len() - 1] == b'.'
            }
        }
    }
}

fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

impl Validator<'_> {
    /// `push`: the locations, whose paths the Web Push path must not shadow.
    pub(super) fn webpush(
        &mut self,
        raw: S<RawWebPush>,
        base: &Path,
        push: &[PushLocation],
    ) -> Option<WebPushConfig> {
        let at = raw.span();
        let raw = raw.into_inner();
        let missing = |v: &mut Self, key: &str, what: &str| {
            let (l, c) = raw::line_col(v.text, at.start);
            v.problems.push(format!(
                "{}:{l}:{c}: webpush.{key}: required ({what})",
                v.name
            ));
        };
        let subject = match raw.subject {
            None => {
                missing(
                    self,
                    "subject",
                    "\"mailto:ops@example.com\" or an https:// URL",
                );
                String::new()
            }
            Some(s) => {
                let v = s.get_ref().trim();
                let valid = (v.starts_with("mailto:") && v.len() > 7)
                    || (v.starts_with("https://") && v.len() > 8);
                if !valid || http::HeaderValue::from_str(v).is_err() {
                    self.err(
                        "webpush.subject",
                        &s,
                        "a contact for the push services: \"mailto:ops@example.com\" or an https:// URL",
                    );
                }
                v.to_string()
            }
        };
        let path = match raw.path {
            None => "/_crier/webpush".to_string(),
            Some(p) => {
                let v = p.get_ref().trim_end_matches('/').to_string();
                let valid = v.starts_with('/')
                    && v.len() > 1
                    && !v.contains(['{', '}', '?', '#', '%'])
                    && v.parse::<http::uri::PathAndQuery>().is_ok();
                if !valid {
                    self.err(
                        "webpush.path",
                        &p,
                        "a path on the public listener like \"/_crier/webpush\"",
                    );
                }
                // The API is matched before the push locations: it must not hide one (all of
                // a location's paths under it, or one channel's path equal to it).
                let under = format!("{v}/");
                let hides = |l: &&PushLocation| {
                    l.prefix.starts_with(&under)
                        || (under.starts_with(&l.prefix)
                            && !under[l.prefix.len()..].trim_end_matches('/').contains('/'))
                };
                if let Some(loc) = push.iter().find(hides) {
                    self.err(
                        "webpush.path",
                        &p,
                        format!(
                            "hides paths of the push location {:?}; pick a path of its own",
                            loc.path
                        ),
                    );
                }
                v
            }
        };
        let store = match raw.store {
            None => {
                missing(
                    self,
                    "store",
                    "the subscription database file, like \"/var/lib/crier/webpush.redb\"",
                );
                PathBuf::new()
            }
            Some(s) if s.get_ref().is_empty() => {
                self.err("webpush.store", &s, "must name a file");
                PathBuf::new()
            }
            Some(s) => resolve(base, s.get_ref()),
        };
        let mut push_hosts = Vec::new();
        match raw.push_hosts {
            None => push_hosts.extend(
                DEFAULT_PUSH_HOSTS
                    .iter()
                    .filter_map(|h| HostPattern::parse(h).ok()),
            ),
            Some(list) => {
                if list.get_ref().is_empty() {
                    self.err(
                        "webpush.push_hosts",
                        &list,
                        "needs at least one host (no endpoint could be accepted)",
                    );
                }
                for h in list.into_inner() {
                    match HostPattern::parse(h.get_ref()) {
                        Ok(p) => push_hosts.push(p),
                        Err(e) => {
                            self.err("webpush.push_hosts", &h, e);
                        }
                    }
                }
            }
        }
        let ttl_at = raw.ttl.clone();
        let ttl = self.duration("webpush.ttl", raw.ttl, Duration::from_secs(3600));
        if let Some(t) = ttl_at.filter(|_| ttl > Duration::from_secs(28 * 86400)) {
            self.err(
                "webpush.ttl",
                &t,
                "at most \"28d\" (push services keep messages no longer)",
            );
        }
        let max_subscriptions = self.count(
            "webpush.max_subscriptions",
            raw.max_subscriptions,
            (1, 100_000_000),
            1_000_000,
        );
        let ca_file = raw.ca_file.map(|f| resolve(base, f.get_ref()));
        let mut push_ports = Vec::new();
        match raw.push_ports {
            None => push_ports.push(443),
            Some(list) => {
                if list.get_ref().is_empty() {
                    self.err("webpush.push_ports", &list, "needs at least one port (443)");
                }
                for p in list.into_inner() {
                    match u16::try_from(*p.get_ref()) {
                        Ok(n) if n > 0 => push_ports.push(n),
                        _ => self.err("webpush.push_ports", &p, "a port is 1 to 65535"),
                    }
                }
            }
        }
        let mut allow_addresses = Vec::new();
        for a in raw
            .allow_addresses
            .map(|l| l.into_inner())
            .unwrap_or_default()
        {
            let text = a.get_ref().trim();
            let net = text
                .parse::<ipnet::IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
            match net {
                Ok(n) => allow_addresses.push(n),
                Err(_) => self.err(
                    "webpush.allow_addresses",
                    &a,
                    format!("{text:?} is not an address or a range like \"10.0.0.0/8\""),
                ),
            }
        }
        let mut fixed = std::collections::BTreeMap::new();
        for (host, ips) in raw.resolve.map(|t| t.into_inner()).unwrap_or_default() {
            let mut list = Vec::new();
            for ip in ips.get_ref() {
                match ip.get_ref().trim().parse::<std::net::IpAddr>() {
                    Ok(a) => list.push(a),
                    Err(_) => self.err(
                        "webpush.resolve",
                        ip,
                        format!("{:?} is not an IP address", ip.get_ref()),
                    ),
                }
            }
            if list.is_empty() {
                self.err("webpush.resolve", &ips, "needs at least one address");
            }
            fixed.insert(host.trim_end_matches('.').to_ascii_lowercase(), list);
        }
        let vapid_key_file = match raw.vapid_key_file {
            None => {
                missing(
                    self,
                    "vapid_key_file",
                    "`crier vapid generate PATH` writes one",
                );
                return None;
            }
            Some(f) => self.key_file("webpush.vapid_key_file", &f, base),
        };
        // Built even when a value was bad (the problems fail the load anyway), so the key file
        // is still checked and reported in the same pass.
        Some(WebPushConfig {
            vapid_key_file,
            subject,
            path,
            store,
            push_hosts,
            ttl,
            max_subscriptions,
            ca_file,
            push_ports,
            allow_addresses,
            resolve: fixed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::VapidKey;

    #[test]
    fn host_patterns() {
        let w = HostPattern::parse("*.push.apple.com").expect("valid");
        assert!(w.matches("web.push.apple.com"));
        assert!(w.matches("a.b.push.apple.com"));
        assert!(!w.matches("push.apple.com"));
        assert!(!w.matches("evilpush.apple.com"));
        assert!(!w.matches("web.push.apple.com.evil.net"));
        let ip = HostPattern::parse("127.0.0.1").expect("valid");
        assert!(ip.matches("127.0.0.1"));
        assert!(!ip.matches("127.0.0.2"));
        assert_eq!(
            HostPattern::parse("[::1]").expect("valid"),
            HostPattern::Exact("::1".into())
        );
        assert!(HostPattern::parse("*.com").is_err());
        assert!(HostPattern::parse("*").is_err());
        assert!(HostPattern::parse("http://x.example").is_err());
        assert!(HostPattern::parse("a_b.example").is_err());
    }

    #[test]
    fn webpush_section_errors_name_key_and_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("k.pem");
        VapidKey::generate(&key).expect("key");
        let ok = format!(
            "[webpush]\nvapid_key_file = {key:?}\nsubject = \"mailto:a@example.com\"\nstore = \"wp.redb\"\n"
        );
        let c = Config::from_toml(&ok, Some(&dir.path().join("c.toml"))).expect("valid");
        let w = c.webpush.expect("on");
        assert_eq!(w.path, "/_crier/webpush");
        assert_eq!(w.ttl, Duration::from_secs(3600));
        assert_eq!(w.max_subscriptions, 1_000_000);
        assert_eq!(w.store, dir.path().join("wp.redb"));
        assert_eq!(w.push_hosts.len(), 4);
        assert!(Config::default().webpush.is_none());

        let bad = "[webpush]\nvapid_key_file = \"/nonexistent/k.pem\"\nsubject = \"ops\"\nstore = \"x\"\npush_hosts = [\"*.com\"]\nttl = \"60d\"\npath = \"nope\"\nmax_subscriptions = 0\npush_ports = [0]\nallow_addresses = [\"10.0.0.0/33\"]\nresolve = { \"a.b\" = [\"nope\"] }\n";
        let e = crate::keys::load_str(bad, Some(Path::new("c.toml")))
            .expect_err("invalid")
            .to_string();
        for want in [
            "c.toml:2:18: webpush.vapid_key_file: /nonexistent/k.pem: cannot read it",
            "c.toml:3:11: webpush.subject",
            "c.toml:5:15: webpush.push_hosts",
            "c.toml:6:7: webpush.ttl: at most",
            "c.toml:7:8: webpush.path",
            "c.toml:8:21: webpush.max_subscriptions",
            "c.toml:9:15: webpush.push_ports: a port is 1 to 65535",
            "c.toml:10:20: webpush.allow_addresses: \"10.0.0.0/33\" is not an address",
            "webpush.resolve: \"nope\" is not an IP address",
        ] {
            assert!(e.contains(want), "missing {want:?} in:\n{e}");
        }
        let e = Config::from_toml(
            "[webpush]\nsubject = \"mailto:a@b.c\"\n",
            Some(Path::new("c.toml")),
        )
        .expect_err("invalid")
        .to_string();
        assert!(e.contains("c.toml:1:1: webpush.store: required"), "{e}");
        assert!(e.contains("webpush.vapid_key_file: required"), "{e}");
        let e = Config::from_toml("[webpush]\nvapid_file = 1\n", Some(Path::new("c.toml")))
            .expect_err("invalid")
            .to_string();
        assert!(
            e.contains("c.toml:2:1: webpush.vapid_file: unknown key"),
            "{e}"
        );
    }

    #[test]
    fn the_api_path_must_not_hide_a_push_location() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("k.pem");
        VapidKey::generate(&key).expect("key");
        let conf = |push: &str, path: &str| {
            Config::from_toml(
                &format!(
                    "[[push]]\npath = \"{push}\"\n[webpush]\nvapid_key_file = {key:?}\n\
                     subject = \"mailto:a@b.c\"\nstore = \"s\"\npath = \"{path}\"\n"
                ),
                Some(Path::new("c.toml")),
            )
            .err()
            .map(|e| e.to_string())
        };
        let e = conf("/live/{channel}", "/live").expect("hides every channel");
        assert!(
            e.contains(
                "c.toml:7:8: webpush.path: hides paths of the push location \"/live/{channel}\""
            ),
            "{e}"
        );
        assert!(
            conf("/live/{channel}", "/live/news").is_some(),
            "hides channel news"
        );
        assert!(
            conf("/{channel}", "/webpush").is_some(),
            "hides channel webpush"
        );
        assert!(
            conf("/a/{channel}/events", "/a/x").is_some(),
            "hides /a/x/events"
        );
        assert_eq!(
            conf("/{channel}", "/_crier/webpush"),
            None,
            "two segments: no channel"
        );
        assert_eq!(conf("/live/{channel}", "/_crier/webpush"), None);
        assert_eq!(conf("/live/{channel}", "/lively"), None);
    }
}
