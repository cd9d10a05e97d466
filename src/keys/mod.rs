//! Key material, read after the config validated: the publish token, the JWT keys of push
//! locations, the webhook and ingress secrets, the VAPID key. The config only names the files
//! ([`KeyFile`]); [`Keys::load`] reads and checks them, and every problem names the config key
//! and its `line:column`, like a config error. SIGHUP reads them again with the new config.
//!
//! The runtime parts take what they need from [`Keys`] when they are built (the gatekeeper
//! its verifiers, webhooks their secrets, Web Push its key), so no key travels in `Config`.

mod jwt;
mod secret;
mod token;
mod vapid;

use std::collections::HashMap;
use std::path::Path;

pub use jwt::{JwtKey, MIN_SECRET_BYTES};
pub use secret::{decode_whsec, read_secret_file, Secret};
pub use token::{bearer_token, PublishToken, MIN_PUBLISH_TOKEN};
pub use vapid::{VapidError, VapidKey};

use crate::config::{sort_problems, Config, ConfigError, KeyFile, Verify};

/// Every key the config names, read and checked.
#[derive(Debug, Clone, Default)]
pub struct Keys {
    /// `[publish] token_file`.
    pub publish_token: Option<PublishToken>,
    /// `[push.jwt]` keys, by the location's path.
    pub jwt: HashMap<String, JwtKey>,
    /// `[[webhook]]` secrets, by the webhook's name.
    pub webhooks: HashMap<String, Secret>,
    /// `[[ingress]]` secrets, by the ingress path (none for `verify = "none"`).
    pub ingress: HashMap<String, Secret>,
    /// `[webpush] vapid_key_file`.
    pub vapid: Option<VapidKey>,
    /// `[cluster] password_file`: the Redis password of every shard.
    pub cluster_password: Option<Secret>,
}

impl Keys {
    /// Reads every key file `config` names; all problems at once, in file order.
    pub fn load(config: &Config) -> Result<Keys, ConfigError> {
        let mut problems = Vec::new();
        let keys = Keys::read(config, &mut problems);
        if problems.is_empty() {
            return Ok(keys);
        }
        sort_problems(&config.display_name(), &mut problems);
        Err(ConfigError { problems })
    }

    fn read(config: &Config, problems: &mut Vec<String>) -> Keys {
        let mut keys = Keys::default();
        let mut take = |f: &KeyFile, r: Result<(), String>| {
            if let Err(e) = r {
                problems.push(f.origin.problem(e));
            }
        };
        if let Some(f) = &config.publish.token_file {
            take(
                f,
                PublishToken::load(&f.path).map(|t| keys.publish_token = Some(t)),
            );
        }
        for loc in &config.push {
            if let Some(j) = &loc.jwt {
                let r = JwtKey::load(j.algorithm, &j.key_file.path).map(|k| {
                    keys.jwt.insert(loc.path.clone(), k);
                });
                take(&j.key_file, r);
            }
        }
        for w in &config.webhooks {
            let r = secret::read_text(&w.secret_file.path)
                .and_then(|t| decode_whsec(&t))
                .map(|s| {
                    keys.webhooks.insert(w.name.clone(), s);
                });
            take(&w.secret_file, r);
        }
        for i in &config.ingress {
            let Some(f) = &i.secret_file else { continue };
            let r = secret::read_text(&f.path)
                .and_then(|text| match &i.verify {
                    Verify::Standard => decode_whsec(&text),
                    _ if text.is_empty() => Err(format!("{}: is empty", f.path.display())),
                    _ => Ok(Secret(text.into_bytes().into())),
                })
                .map(|s| {
                    keys.ingress.insert(i.path.clone(), s);
                });
            take(f, r);
        }
        if let Some(w) = &config.webpush {
            let f = &w.vapid_key_file;
            let r = VapidKey::load(&f.path)
                .map(|k| keys.vapid = Some(k))
                .map_err(|e| format!("{}: {e}", f.path.display()));
            take(f, r);
        }
        if let Some(f) = config
            .cluster
            .as_ref()
            .and_then(|c| c.password_file.as_ref())
        {
            let r = secret::read_text(&f.path).and_then(|t| {
                if t.is_empty() {
                    return Err(format!("{}: is empty", f.path.display()));
                }
                keys.cluster_password = Some(Secret(t.into_bytes().into()));
                Ok(())
            });
            take(f, r);
        }
        keys
    }
}

/// A config file and the keys it names, checked together: every problem of both, in file
/// order (what `crier check` prints and `crier run` refuses to start on).
pub fn load_file(path: &Path) -> Result<(Config, Keys), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        problems: vec![format!("{}: cannot read config: {e}", path.display())],
    })?;
    load_str(&text, Some(path))
}

/// [`load_file`] for text (`path` only names the file in messages).
pub fn load_str(text: &str, path: Option<&Path>) -> Result<(Config, Keys), ConfigError> {
    let (config, mut problems) = Config::parse(text, path);
    let name = path.map_or("<config>".to_string(), |p| p.display().to_string());
    // Keys of the parts that validated are read even when others did not: one pass reports all.
    let keys = config
        .as_ref()
        .map(|c| Keys::read(c, &mut problems))
        .unwrap_or_default();
    match config {
        Some(c) if problems.is_empty() => Ok((c, keys)),
        _ => {
            sort_problems(&name, &mut problems);
            Err(ConfigError { problems })
        }
    }
}
