//! The push locations of one config: which location a request path names (and the channel in
//! it), and which location owns a channel name.
//!
//! Channel names are global, so the two can differ: `/live/chat:room` names the channel
//! `chat:room` through `/live/{channel}`, but `chat:room` belongs to the location whose
//! `channel_prefix` is the longest that the name extends (`chat:` → `/chat/{channel}`; the
//! first in config order among equals). Its checks (Origin, JWT, forward auth) are the ones that
//! apply, whichever way the channel is reached (see `admission`).

use std::sync::Arc;

use crate::config::{Config, PushLocation};
use crate::model::ChannelName;

/// The push locations of one config, matched in config order.
pub struct Locations {
    list: Vec<Arc<PushLocation>>,
}

#[derive(Debug)]
pub enum Route {
    /// A push location claims the path; `channels` are the full channel names (one, or the
    /// several of a multiplexed `/live/a,b,c`), in the order the path names them.
    Push {
        location: Arc<PushLocation>,
        channels: Vec<ChannelName>,
    },
    /// A push location claims the path, but its channel list is not valid (the reason).
    BadChannel(String),
    /// No push location claims the path: it goes to the upstream.
    Proxy,
}

impl Locations {
    pub fn new(config: &Config) -> Locations {
        Locations {
            list: config.push.iter().cloned().map(Arc::new).collect(),
        }
    }

    /// The location whose path template matches `path` (without the query), and the channel
    /// the path names.
    pub fn route(&self, path: &str) -> Route {
        for loc in &self.list {
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
            return match channel_list(loc, middle) {
                Ok(channels) => Route::Push {
                    location: loc.clone(),
                    channels,
                },
                Err(e) => Route::BadChannel(e),
            };
        }
        Route::Proxy
    }

    /// The location that owns `channel`: the longest `channel_prefix` the name extends (with at
    /// least one character after it), the first in config order among equals. None when no
    /// location's prefix fits (then no push location serves the channel).
    pub fn owner(&self, channel: &str) -> Option<&Arc<PushLocation>> {
        let mut best: Option<&Arc<PushLocation>> = None;
        for loc in &self.list {
            let prefix = loc.channel_prefix.as_str();
            let fits = channel
                .strip_prefix(prefix)
                .is_some_and(|rest| !rest.is_empty());
            if fits && best.is_none_or(|b| prefix.len() > b.channel_prefix.len()) {
                best = Some(loc);
            }
        }
        best
    }
}

/// `a,b,c` → the location's channels `prefix+a`, … (`,` is not a channel character): at
/// most `max_channels_per_subscription`, none empty, bad or twice.
fn channel_list(loc: &PushLocation, names: &str) -> Result<Vec<ChannelName>, String> {
    if !names.contains(',') {
        return ChannelName::with_prefix(&loc.channel_prefix, names)
            .map(|c| vec![c])
            .map_err(|e| e.to_string());
    }
    let count = names.split(',').count();
    if count > loc.max_channels_per_subscription {
        return Err(format!(
            "{count} channels named; this location takes at most {} (max_channels_per_subscription)",
            loc.max_channels_per_subscription
        ));
    }
    let mut out: Vec<ChannelName> = Vec::with_capacity(count);
    for n in names.split(',') {
        let c = ChannelName::with_prefix(&loc.channel_prefix, n).map_err(|e| {
            let n: String = n.chars().take(140).collect();
            format!("{e} in the channel list (at {n:?})")
        })?;
        if out.contains(&c) {
            return Err(format!("channel {n:?} is named twice"));
        }
        out.push(c);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn locations(toml: &str) -> Locations {
        Locations::new(&Config::from_toml(toml, None).expect("test setup"))
    }

    #[test]
    fn matches_template() {
        let r = locations("[[push]]\npath = \"/live/{channel}\"\n[[push]]\npath = \"/rooms/{channel}/events\"\nchannel_prefix = \"room:\"\n");
        assert!(
            matches!(r.route("/live/news"), Route::Push { channels, .. } if channels[0].as_str() == "news")
        );
        assert!(
            matches!(r.route("/rooms/a1/events"), Route::Push { channels, .. } if channels[0].as_str() == "room:a1")
        );
        assert!(matches!(
            r.route("/rooms/a,b/events"),
            Route::Push { channels, .. } if channels.iter().map(|c| c.as_str()).collect::<Vec<_>>() == ["room:a", "room:b"]
        ));
        for bad in ["/live/a,,b", "/live/a,b,a", "/live/a,", "/live/a,b c"] {
            assert!(matches!(r.route(bad), Route::BadChannel(_)), "{bad}");
        }
        let many = (0..17).map(|i| i.to_string()).collect::<Vec<_>>().join(",");
        assert!(
            matches!(r.route(&format!("/live/{many}")), Route::BadChannel(e) if e.contains("at most 16"))
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

    #[test]
    fn the_longest_prefix_owns_a_channel() {
        let r = locations("[[push]]\npath = \"/live/{channel}\"\n[[push]]\npath = \"/chat/{channel}\"\nchannel_prefix = \"chat:\"\n[[push]]\npath = \"/also/{channel}\"\n");
        let owner = |c: &str| r.owner(c).map(|l| l.path.clone());
        assert_eq!(owner("news").as_deref(), Some("/live/{channel}"));
        assert_eq!(owner("chat:room").as_deref(), Some("/chat/{channel}"));
        assert_eq!(
            owner("chat:").as_deref(),
            Some("/live/{channel}"),
            "the prefix alone is not a channel of /chat"
        );
    }
}
