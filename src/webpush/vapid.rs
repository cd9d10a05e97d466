//! VAPID (RFC 8292): a cache of the ES256 JWTs every push request carries, one per push
//! service. The key itself is `keys::VapidKey`.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderValue;
use parking_lot::Mutex;

use crate::keys::{VapidError, VapidKey};

/// How long a VAPID JWT is valid (RFC 8292 allows at most 24 hours).
const JWT_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// A cached JWT is replaced when it has less than this left, so none expires in flight.
const JWT_RENEW_BEFORE: Duration = Duration::from_secs(3600);

/// JWTs by audience, reused until [`JWT_RENEW_BEFORE`] before they expire: signing is per
/// push service and hour, not per message.
pub struct VapidCache {
    key: VapidKey,
    subject: String,
    /// parking_lot: a map lookup or insert, never held while signing or across `.await`.
    by_audience: Mutex<HashMap<String, (HeaderValue, u64)>>,
}

impl VapidCache {
    pub fn new(key: VapidKey, subject: String) -> VapidCache {
        VapidCache {
            key,
            subject,
            by_audience: Mutex::new(HashMap::new()),
        }
    }

    pub fn key(&self) -> &VapidKey {
        &self.key
    }

    pub fn authorization(&self, audience: &str) -> Result<HeaderValue, VapidError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        if let Some((v, exp)) = self.by_audience.lock().get(audience) {
            if *exp > now + JWT_RENEW_BEFORE.as_secs() {
                return Ok(v.clone());
            }
        }
        let exp = now + JWT_LIFETIME.as_secs();
        let v = HeaderValue::try_from(self.key.authorization(audience, &self.subject, exp)?)
            .map_err(|_| VapidError::Other("the subject makes an invalid header".into()))?;
        self.by_audience
            .lock()
            .insert(audience.to_string(), (v.clone(), exp));
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_reuses_a_jwt_per_audience() {
        let dir = tempfile::tempdir().expect("tempdir");
        let k = VapidKey::generate(&dir.path().join("k.pem")).expect("generates");
        let c = VapidCache::new(k, "mailto:a@example.com".into());
        let a1 = c.authorization("https://a.example").expect("signs");
        let a2 = c.authorization("https://a.example").expect("signs");
        let b = c.authorization("https://b.example").expect("signs");
        assert_eq!(a1, a2, "same audience: the cached JWT");
        assert_ne!(a1, b);
    }
}
