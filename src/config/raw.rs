//! The config file as serde reads it: `Raw*` structs that keep every value's span and reject
//! unknown keys, and [`read_raw`], which reports *every* unknown key and wrong type at once.

use serde::Deserialize;
use toml::Spanned;

pub(super) type S<T> = Spanned<T>;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) server: Option<S<RawServer>>,
    pub(super) upstream: Option<S<RawUpstream>>,
    pub(super) publish: Option<S<RawPublish>>,
    pub(super) channels: Option<S<RawChannels>>,
    pub(super) push: Option<S<Vec<S<RawPush>>>>,
    pub(super) admin: Option<S<RawAdmin>>,
    pub(super) webhook: Option<S<Vec<S<super::webhook::RawWebhook>>>>,
    pub(super) ingress: Option<S<Vec<S<super::webhook::RawIngress>>>>,
    pub(super) webpush: Option<S<super::webpush::RawWebPush>>,
    pub(super) webrtc: Option<S<RawWebRtc>>,
    pub(super) publish_on: Option<S<Vec<S<super::publish_on::RawPublishOn>>>>,
    pub(super) poll: Option<S<Vec<S<super::publish_on::RawPoll>>>>,
    pub(super) cluster: Option<S<super::cluster::RawCluster>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWebRtc {
    pub(super) listen: Option<S<String>>,
    pub(super) candidates: Option<S<Vec<S<String>>>>,
    pub(super) max_sessions: Option<S<i64>>,
    pub(super) ice_timeout: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub(super) listen: Option<S<Vec<S<String>>>>,
    pub(super) tls: Option<S<RawTls>>,
    pub(super) max_connections: Option<S<i64>>,
    pub(super) header_timeout: Option<S<String>>,
    pub(super) max_header_size: Option<S<String>>,
    pub(super) max_headers: Option<S<i64>>,
    pub(super) h2_max_concurrent_streams: Option<S<i64>>,
    pub(super) shutdown_timeout: Option<S<String>>,
    pub(super) worker_threads: Option<S<i64>>,
    pub(super) event_loops: Option<S<i64>>,
    pub(super) access_log: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) listen: Option<S<Vec<S<String>>>>,
    pub(super) cert: S<String>,
    pub(super) key: S<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    pub(super) url: Option<S<String>>,
    pub(super) connect_timeout: Option<S<String>>,
    pub(super) response_timeout: Option<S<String>>,
    pub(super) read_timeout: Option<S<String>>,
    pub(super) pool_idle_timeout: Option<S<String>>,
    pub(super) pool_max_idle: Option<S<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPublish {
    pub(super) unix: Option<S<String>>,
    pub(super) unix_mode: Option<S<String>>,
    pub(super) unix_group: Option<S<String>>,
    pub(super) listen: Option<S<Vec<S<String>>>>,
    pub(super) token_file: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawChannels {
    pub(super) buffer_messages: Option<S<i64>>,
    pub(super) buffer_ttl: Option<S<String>>,
    pub(super) max_message_size: Option<S<String>>,
    pub(super) max_channels: Option<S<i64>>,
    pub(super) store: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPush {
    pub(super) path: S<String>,
    pub(super) channel_prefix: Option<S<String>>,
    pub(super) transports: Option<S<Vec<S<String>>>>,
    pub(super) buffer_messages: Option<S<i64>>,
    pub(super) buffer_ttl: Option<S<String>>,
    pub(super) first_message: Option<S<String>>,
    pub(super) on_lag: Option<S<String>>,
    pub(super) max_channels_per_subscription: Option<S<i64>>,
    pub(super) keepalive: Option<S<String>>,
    pub(super) longpoll_timeout: Option<S<String>>,
    pub(super) allow_origins: Option<S<Vec<S<String>>>>,
    pub(super) auth_request: Option<S<String>>,
    pub(super) auth_timeout: Option<S<String>>,
    pub(super) auth_cache_ttl: Option<S<String>>,
    pub(super) jwt: Option<S<RawJwt>>,
    pub(super) client_messages: Option<S<String>>,
    pub(super) forward_to: Option<S<String>>,
    pub(super) max_client_message: Option<S<String>>,
    pub(super) client_rate: Option<S<i64>>,
    pub(super) echo: Option<S<bool>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawJwt {
    pub(super) secret_file: Option<S<String>>,
    pub(super) public_key_file: Option<S<String>>,
    pub(super) algorithm: Option<S<String>>,
    pub(super) cookie: Option<S<String>>,
    pub(super) leeway: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub(super) listen: Option<S<String>>,
}

/// TOML text → the raw structs, reporting *every* unknown key and wrongly typed value, each
/// with its dotted key. serde stops at the first such error, so the offending entry is removed
/// from the parsed document and the document read again, until it reads cleanly. Returns None
/// (with the problem recorded) when the text is not TOML or an error cannot be pinned to a key.
pub(super) fn read_raw(text: &str, name: &str, problems: &mut Vec<String>) -> Option<RawConfig> {
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
        // `[push]` where `[[push]]` was meant: the one TOML slip every newcomer makes once.
        let plural = ["push", "webhook", "publish_on", "poll"];
        if message.starts_with("invalid type: map, expected an array")
            && plural.contains(&key.as_str())
        {
            message = format!("{message} (write [[{key}]], one block per entry, not [{key}])");
        }
        problems.push(format!("{name}:{}{key}: {message}", at(e.span())));
    }
    None
}

/// Removes the entry that an error at `span` is about (its key is the span, or its value holds
/// it), looking into nested tables and arrays of tables first; returns its dotted key.
pub(super) fn remove_entry_at(
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

pub(super) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}
