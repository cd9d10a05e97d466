//! Secrets read from files: the bytes of a file without the newline an editor adds, and the
//! `whsec_` webhook secrets (Standard Webhooks).

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use base64::Engine;

/// Reads a secret from a file: its bytes without trailing whitespace (the newline an editor
/// or `echo` adds). Empty is an error. The message names the file.
pub fn read_secret_file(path: &Path) -> Result<Vec<u8>, String> {
    let mut bytes =
        std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    while bytes.last().is_some_and(|b| b.is_ascii_whitespace()) {
        bytes.pop();
    }
    if bytes.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(bytes)
}

/// An HMAC key. Debug never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub Arc<[u8]>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

/// The secret file's text without surrounding whitespace.
pub(super) fn read_text(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|e| format!("{}: cannot read: {e}", path.display()))
}

/// `whsec_<base64>` → the key bytes, as every Standard Webhooks library decodes it.
pub fn decode_whsec(text: &str) -> Result<Secret, String> {
    let bad = "bad secret format: expected \"whsec_<base64>\" (e.g. whsec_ and 24 to 64 random bytes in base64)";
    let b64 = text.strip_prefix("whsec_").ok_or(bad)?;
    let key = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| bad)?;
    if key.len() < 16 {
        return Err("secret too short: the base64 after whsec_ must hold at least 16 bytes".into());
    }
    Ok(Secret(key.into()))
}
