//! How the Redis engine fails: at start (a clear, one-line reason naming the shard) and at run
//! time (the hub's `Unavailable`, which the APIs answer with 503 and `Retry-After`).

use crate::hub::HubError;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cluster.redis {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("cluster.ca_file {path}: {reason}")]
    CaFile { path: String, reason: String },
}

/// A URL as logs and errors show it: without the password.
pub(super) fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let authority_end = rest.find('/').unwrap_or(rest.len());
            match rest[..authority_end].rfind('@') {
                Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
                None => url.to_string(),
            }
        }
        None => url.to_string(),
    }
}

/// A command that failed or did not answer in time: nothing is known to be accepted.
pub(super) fn unavailable(shard: &str, e: impl std::fmt::Display) -> HubError {
    HubError::Unavailable(format!("Redis {shard}: {e}"))
}

/// Why a command got no answer: its error, or the deadline.
pub(super) fn reason<T>(
    r: Result<::redis::RedisResult<T>, tokio::time::error::Elapsed>,
    deadline: std::time::Duration,
) -> Result<T, String> {
    match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {}ms", deadline.as_millis())),
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_are_not_shown() {
        assert_eq!(
            redact("redis://user:s3cret@10.0.0.1:6379/0"),
            "redis://***@10.0.0.1:6379/0"
        );
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(redact("unix:///run/r.sock"), "unix:///run/r.sock");
    }
}
