//! Channel names and channel patterns.
//!
//! A [`ChannelName`] is checked once, where it enters crier (a request path, the publish API,
//! an ingress template, a Web Push request); everything downstream takes the type and checks
//! nothing again. A [`ChannelPattern`] is the one meaning of `*` for every list of channels
//! (JWT claims, webhook filters).

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

/// A valid channel name: 1 to 128 characters of `A-Z a-z 0-9 . _ - : ~`. Cheap to clone (the
/// hub keys its channel table with the same allocation).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelName(Arc<str>);

/// Why a name is not a channel name; the message is the one-line reason a client sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadChannelName {
    #[error("empty channel name")]
    Empty,
    #[error("channel name longer than 128 characters")]
    TooLong,
    #[error("channel name may hold only A-Z a-z 0-9 . _ - : ~")]
    BadCharacter,
}

impl ChannelName {
    pub const MAX_LEN: usize = 128;

    pub fn new(name: &str) -> Result<ChannelName, BadChannelName> {
        Self::check(name)?;
        Ok(ChannelName(name.into()))
    }

    /// `prefix` + `name` (a location's `channel_prefix` and the name from its path), checked
    /// as a whole: the name part must not be empty.
    pub fn with_prefix(prefix: &str, name: &str) -> Result<ChannelName, BadChannelName> {
        Self::check(name)?;
        if prefix.len() + name.len() > Self::MAX_LEN {
            return Err(BadChannelName::TooLong);
        }
        if !prefix.chars().all(is_channel_char) {
            return Err(BadChannelName::BadCharacter);
        }
        let mut s = String::with_capacity(prefix.len() + name.len());
        s.push_str(prefix);
        s.push_str(name);
        Ok(ChannelName(s.into()))
    }

    fn check(name: &str) -> Result<(), BadChannelName> {
        if name.is_empty() {
            return Err(BadChannelName::Empty);
        }
        if name.len() > Self::MAX_LEN {
            return Err(BadChannelName::TooLong);
        }
        if !name.chars().all(is_channel_char) {
            return Err(BadChannelName::BadCharacter);
        }
        Ok(())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The shared allocation (the hub's table key).
    pub fn as_arc(&self) -> &Arc<str> {
        &self.0
    }
}

/// `A-Z a-z 0-9 . _ - : ~`
pub fn is_channel_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '~')
}

impl Deref for ChannelName {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for ChannelName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for ChannelName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl serde::Serialize for ChannelName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// A set of channels: a name, or a name prefix followed by `*`, where `*` stands for at least
/// one more character: `orders.*` selects `orders.1` and `orders.1.items`, but neither
/// `orders.` nor `orders`; `*` alone selects every channel.
#[derive(Clone, PartialEq, Eq)]
pub struct ChannelPattern(Box<str>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a channel name (A-Z a-z 0-9 . _ - : ~) with an optional trailing '*'")]
pub struct BadChannelPattern(pub String);

impl ChannelPattern {
    /// A pattern from config: a valid name, optionally ending in `*`.
    pub fn new(s: &str) -> Result<ChannelPattern, BadChannelPattern> {
        let bad = || BadChannelPattern(s.chars().take(140).collect());
        let name = s.strip_suffix('*').unwrap_or(s);
        let exact = name.len() == s.len();
        if (exact && name.is_empty())
            || name.len() > ChannelName::MAX_LEN
            || !name.chars().all(is_channel_char)
        {
            return Err(bad());
        }
        Ok(ChannelPattern(s.into()))
    }

    pub fn matches(&self, channel: &str) -> bool {
        pattern_matches(&self.0, channel)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ChannelPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// Whether the pattern text `pattern` selects `channel` (see [`ChannelPattern`]). For patterns
/// that come from outside the config (a token's claim): a pattern with a `*` anywhere but at
/// the end selects nothing, since no channel name holds a `*`.
pub fn pattern_matches(pattern: &str, channel: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => channel.len() > prefix.len() && channel.starts_with(prefix),
        None => pattern == channel,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_once() {
        assert!(ChannelName::new("news").is_ok());
        assert!(ChannelName::new("a.b_c-d:e~f").is_ok());
        assert_eq!(ChannelName::new(""), Err(BadChannelName::Empty));
        assert_eq!(ChannelName::new("a b"), Err(BadChannelName::BadCharacter));
        assert_eq!(ChannelName::new("a,b"), Err(BadChannelName::BadCharacter));
        assert_eq!(ChannelName::new("a*"), Err(BadChannelName::BadCharacter));
        assert!(ChannelName::new(&"x".repeat(128)).is_ok());
        assert_eq!(
            ChannelName::new(&"x".repeat(129)),
            Err(BadChannelName::TooLong)
        );
        let c = ChannelName::with_prefix("chat:", "room1").expect("valid");
        assert_eq!(c.as_str(), "chat:room1");
        assert_eq!(
            ChannelName::with_prefix("chat:", ""),
            Err(BadChannelName::Empty)
        );
        assert_eq!(
            ChannelName::with_prefix("p:", &"x".repeat(127)),
            Err(BadChannelName::TooLong)
        );
    }

    #[test]
    fn one_meaning_of_star() {
        let p = |s: &str| ChannelPattern::new(s).expect("valid pattern");
        assert!(p("orders.*").matches("orders.1"));
        assert!(p("orders.*").matches("orders.1.items"));
        assert!(!p("orders.*").matches("orders"));
        assert!(!p("orders.*").matches("orders."));
        assert!(!p("orders.*").matches("ordersX"));
        assert!(!p("orders.*").matches("xorders.1"));
        assert!(p("*").matches("anything"));
        assert!(!p("*").matches(""));
        assert!(p("news").matches("news"));
        assert!(!p("news").matches("news2"));
        assert!(!p("news").matches("new"));
        // Outside config (token claims), a misplaced star selects nothing.
        assert!(!pattern_matches("or*ders", "orXders"));
        assert!(!pattern_matches("", "x"));
        for bad in ["", "a*b*", "a b*", "**", "a*b"] {
            assert!(ChannelPattern::new(bad).is_err(), "{bad:?}");
        }
    }
}
