//! Request path → push location + channel, or the proxy.

use std::sync::Arc;

use crate::config::{is_channel_char, Config, PushLocation};

/// The push locations of one config, matched in config order.
pub struct Router {
    locations: Vec<Arc<PushLocation>>,
}

#[derive(Debug)]
pub enum Route {
    /// A push location claims the path; `channel` is the full channel name.
    Push {
        location: Arc<PushLocation>,
        channel: String,
    },
    /// A push location claims the path, but the channel name is not valid.
    BadChannel(&'static str),
    /// Everything else goes to the upstream.
    Proxy,
}

pub const MAX_CHANNEL_LEN: usize = 128;

/// Checks a channel name: 1 to 128 characters of `A-Z a-z 0-9 . _ - : ~`.
pub fn validate_channel(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty channel name");
    }
    if name.len() > MAX_CHANNEL_LEN {
        return Err("channel name longer than 128 characters");
    }
    if !name.chars().all(is_channel_char) {
        return Err("channel name may hold only A-Z a-z 0-9 . _ - : ~");
    }
    Ok(())
}

impl Router {
    pub fn new(config: &Config) -> Router {
        Router {
            locations: config.push.iter().cloned().map(Arc::new).collect(),
        }
    }

    pub fn route(&self, path: &str) -> Route {
        for loc in &self.locations {
            let Some(rest) = path.strip_prefix(loc.prefix.as_str()) else {
                continue;
            };
            let Some(middle) = rest.strip_suffix(loc.suffix.as_str()) else {
                continue;
            };
            // `{channel}` is one path segment: deeper paths belong to the app.
            if middle.contains('/') {
                continue;
            }
            if let Err(e) = validate_channel(middle) {
                return Route::BadChannel(e);
            }
            let mut channel = String::with_capacity(loc.channel_prefix.len() + middle.len());
            channel.push_str(&loc.channel_prefix);
            channel.push_str(middle);
            if channel.len() > MAX_CHANNEL_LEN {
                return Route::BadChannel("channel name longer than 128 characters");
            }
            return Route::Push {
                location: loc.clone(),
                channel,
            };
        }
        Route::Proxy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(toml: &str) -> Router {
        Router::new(&Config::from_toml(toml, None).expect("test setup"))
    }

    #[test]
    fn matches_template() {
        let r = router("[[push]]\npath = \"/live/{channel}\"\n[[push]]\npath = \"/rooms/{channel}/events\"\nchannel_prefix = \"room:\"\n");
        assert!(matches!(r.route("/live/news"), Route::Push { channel, .. } if channel == "news"));
        assert!(
            matches!(r.route("/rooms/a1/events"), Route::Push { channel, .. } if channel == "room:a1")
        );
        assert!(matches!(r.route("/live/a/b"), Route::Proxy));
        assert!(matches!(r.route("/rooms/a1"), Route::Proxy));
        assert!(matches!(r.route("/"), Route::Proxy));
        assert!(matches!(r.route("/live/"), Route::BadChannel(_)));
        assert!(matches!(r.route("/live/a%20b"), Route::BadChannel(_)));
        assert!(matches!(
            r.route(&format!("/live/{}", "x".repeat(129))),
            Route::BadChannel(_)
        ));
        assert!(matches!(
            r.route(&format!("/live/{}", "x".repeat(128))),
            Route::Push { .. }
        ));
    }
}
