//! `[cluster]`: several crier nodes sharing channels through Redis. Plain data: the URLs are
//! checked for shape here (scheme, host, database), and connected to only at start.

use serde::Deserialize;

use super::raw::S;
use super::validate::Validator;
use super::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    redis: Option<S<Vec<S<String>>>>,
    key_prefix: Option<S<String>>,
    password_file: Option<S<String>>,
    ca_file: Option<S<String>>,
}

/// `[cluster]`, validated. None in [`Config`]: one node, the memory (or file) engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// One URL per shard (`redis://`, `rediss://`, `unix://`): channels are placed on them by a
    /// jump consistent hash of their name, so the order is part of the layout.
    pub redis: Vec<String>,
    /// Put before every key and fan-out topic, so several deployments can share a Redis.
    pub key_prefix: String,
    /// A file holding the password for every shard (instead of one in the URL); read by `keys`.
    pub password_file: Option<KeyFile>,
    /// The CA (PEM) that `rediss://` servers' certificates chain to, instead of the system
    /// roots (a private CA). Read at start.
    pub ca_file: Option<PathBuf>,
}

/// Longest prefix taken: every key carries it.
const MAX_PREFIX: usize = 64;

impl Validator<'_> {
    pub(super) fn cluster(
        &mut self,
        raw: S<RawCluster>,
        base: &Path,
        channels: &ChannelDefaults,
        store_at: Option<usize>,
    ) -> Option<ClusterConfig> {
        let table = raw.span();
        let raw = raw.into_inner();
        let mut redis = Vec::new();
        match raw.redis {
            None => {
                self.err_at(
                    "cluster.redis",
                    table.start,
                    "required: the Redis URLs, like [\"redis://127.0.0.1:6379/0\"]",
                );
                return None;
            }
            Some(list) if list.get_ref().is_empty() => {
                self.err("cluster.redis", &list, "needs at least one URL");
                return None;
            }
            Some(list) => {
                for u in list.into_inner() {
                    match check_url(u.get_ref()) {
                        Ok(()) if redis.contains(u.get_ref()) => {
                            self.err("cluster.redis", &u, "the same URL is listed twice")
                        }
                        Ok(()) => redis.push(u.get_ref().clone()),
                        Err(e) => self.err("cluster.redis", &u, e),
                    }
                }
            }
        }
        let key_prefix = match raw.key_prefix {
            None => "crier:".to_string(),
            Some(p) => {
                let v = p.get_ref();
                if v.len() > MAX_PREFIX
                    || !v
                        .bytes()
                        .all(|b| b.is_ascii_graphic() && b != b'{' && b != b'}')
                {
                    self.err(
                        "cluster.key_prefix",
                        &p,
                        format!("at most {MAX_PREFIX} printable ASCII characters, no spaces or braces (braces are the keys' hash tags)"),
                    );
                }
                v.clone()
            }
        };
        let password_file = raw
            .password_file
            .map(|f| self.key_file("cluster.password_file", &f, base));
        let ca_file = raw
            .ca_file
            .map(|f| super::validate::resolve(base, f.get_ref()));
        if channels.store.is_some() {
            // Two engines cannot both own the buffers: which one a 201 means would be a guess.
            let at = store_at.unwrap_or(table.start);
            self.err_at(
                "channels.store",
                at,
                "cannot be used with [cluster]: the cluster's buffers live in Redis (remove one of them)",
            );
        }
        Some(ClusterConfig {
            redis,
            key_prefix,
            password_file,
            ca_file,
        })
    }
}

/// The shape of one URL: a scheme crier connects with, then what that scheme needs.
fn check_url(url: &str) -> Result<(), String> {
    let shape = "expected redis://[user:password@]host[:port][/db], rediss://… (TLS) or unix:///path/to/redis.sock";
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(format!("{url:?}: {shape}"));
    };
    match scheme {
        "redis" | "rediss" => {
            let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
            let host = authority.rsplit('@').next().unwrap_or_default();
            let (host, port) = match host.strip_prefix('[') {
                // [v6]:port
                Some(v6) => match v6.split_once(']') {
                    Some((h, p)) => (h, p.strip_prefix(':')),
                    None => return Err(format!("{url:?}: unclosed [ in the host")),
                },
                None => match host.rsplit_once(':') {
                    Some((h, p)) => (h, Some(p)),
                    None => (host, None),
                },
            };
            if host.is_empty() {
                return Err(format!("{url:?}: no host; {shape}"));
            }
            if let Some(p) = port {
                if p.parse::<u16>().map_or(true, |p| p == 0) {
                    return Err(format!("{url:?}: the port must be 1..=65535"));
                }
            }
            let path = rest[authority.len()..]
                .split(['?', '#'])
                .next()
                .unwrap_or_default();
            let db = path.trim_start_matches('/');
            if !db.is_empty() && db.parse::<u16>().is_err() {
                return Err(format!(
                    "{url:?}: the path must be a database number, like /0"
                ));
            }
        }
        "unix" => {
            let path = rest.split(['?', '#']).next().unwrap_or_default();
            if !path.starts_with('/') || path.len() < 2 {
                return Err(format!(
                    "{url:?}: a unix:// URL names an absolute socket path, like unix:///run/redis/redis.sock"
                ));
            }
        }
        _ => return Err(format!("{url:?}: unknown scheme {scheme:?}; {shape}")),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check_url;

    #[test]
    fn url_shapes() {
        for ok in [
            "redis://127.0.0.1:6379/0",
            "redis://localhost",
            "redis://:secret@10.0.0.1:6380/3",
            "rediss://user:pw@redis.example.com:6380",
            "redis://[::1]:6379",
            "unix:///run/redis/redis.sock",
            "unix:///tmp/r.sock?db=2",
        ] {
            assert_eq!(check_url(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "127.0.0.1:6379",
            "http://127.0.0.1:6379",
            "redis://",
            "redis://:6379",
            "redis://host:0",
            "redis://host:99999",
            "redis://host/db",
            "unix://relative.sock",
            "redis://[::1",
        ] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
    }
}
