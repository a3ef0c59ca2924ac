//! JWT-SVIDs the agent already holds, per (SPIFFE ID, audiences): bounded,
//! expired tokens dropped, the least recently used evicted past the cap, so
//! callers asking for ever new audiences cannot grow the agent's memory.

use std::collections::HashMap;
use std::time::SystemTime;

/// (SPIFFE ID, sorted audiences).
pub(super) type Key = (String, Vec<String>);

/// A token and its lifetime.
#[derive(Debug, Clone)]
pub(super) struct CachedJwt {
    pub(super) token: String,
    /// The signing key's ID (dropped from use if that authority is tainted).
    pub(super) kid: String,
    pub(super) issued: SystemTime,
    pub(super) expires: SystemTime,
}

struct Slot {
    jwt: CachedJwt,
    last_used: u64,
}

/// The cache; callers hold it under a mutex.
pub(super) struct JwtCache {
    slots: HashMap<Key, Slot>,
    cap: usize,
    clock: u64,
}

impl JwtCache {
    /// Tokens held at most.
    pub(super) const CAP: usize = 4096;

    pub(super) fn new(cap: usize) -> Self {
        JwtCache {
            slots: HashMap::new(),
            cap,
            clock: 0,
        }
    }

    pub(super) fn get(&mut self, key: &Key) -> Option<CachedJwt> {
        self.clock += 1;
        let slot = self.slots.get_mut(key)?;
        slot.last_used = self.clock;
        Some(slot.jwt.clone())
    }

    pub(super) fn insert(&mut self, key: Key, jwt: CachedJwt, now: SystemTime) {
        self.insert_bounded(key, jwt, now);
        crate::metrics::metrics()
            .cache_size
            .get_or_create(&crate::metrics::label("cache", "jwt"))
            .set(i64::try_from(self.slots.len()).unwrap_or(i64::MAX));
    }

    fn insert_bounded(&mut self, key: Key, jwt: CachedJwt, now: SystemTime) {
        self.clock += 1;
        self.slots.insert(
            key,
            Slot {
                jwt,
                last_used: self.clock,
            },
        );
        if self.slots.len() <= self.cap {
            return;
        }
        self.slots.retain(|_, s| s.jwt.expires > now);
        while self.slots.len() > self.cap {
            let oldest = self
                .slots
                .iter()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => self.slots.remove(&k),
                None => break,
            };
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.slots.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::Duration;

    fn jwt(now: SystemTime, ttl: u64) -> CachedJwt {
        CachedJwt {
            token: "t".into(),
            kid: "k".into(),
            issued: now,
            expires: now + Duration::from_secs(ttl),
        }
    }

    fn key(i: usize) -> Key {
        ("spiffe://example.org/w".into(), vec![format!("aud-{i}")])
    }

    #[test]
    fn bounded_expired_first_then_least_recently_used() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut c = JwtCache::new(3);
        c.insert(key(0), jwt(now, 300), now);
        c.insert(key(1), jwt(now, 1), now);
        c.insert(key(2), jwt(now, 300), now);
        assert!(c.get(&key(0)).is_some(), "touch 0: now the most recent");
        // Over the cap, later: 1 has expired and goes first.
        let later = now + Duration::from_secs(10);
        c.insert(key(3), jwt(later, 300), later);
        assert_eq!(c.len(), 3);
        assert!(c.get(&key(1)).is_none());
        // Nothing expired: the least recently used (2) goes.
        c.insert(key(4), jwt(later, 300), later);
        assert!(c.get(&key(2)).is_none());
        assert!(c.get(&key(0)).is_some() && c.get(&key(3)).is_some() && c.get(&key(4)).is_some());

        let mut big = JwtCache::new(JwtCache::CAP);
        for i in 0..20_000 {
            big.insert(key(i), jwt(now, 300), now);
        }
        assert_eq!(big.len(), JwtCache::CAP);
    }
}
