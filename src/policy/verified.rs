//! JWTs whose signature has been verified, so a token presented again costs
//! a hash lookup instead of an ECDSA or RSA verification. Bounded, keyed by
//! the token's SHA-256, each entry dropped at the token's `exp`; an entry
//! only counts while the key that verified it is still in the JWKS (a
//! rotated-out key invalidates what it verified).

use std::collections::HashMap;
use std::sync::Mutex;

use crate::jwt::JwtPublicKey;

/// The verified-token cache.
#[derive(Debug, Default)]
pub struct VerifiedTokens {
    map: Mutex<HashMap<[u8; 32], (JwtPublicKey, u64)>>,
}

impl VerifiedTokens {
    /// Entries held at most.
    pub const CAP: usize = 10_000;

    /// The cache key of a token.
    pub fn digest(token: &str) -> [u8; 32] {
        let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        out
    }

    /// The key that verified this token, if it is cached and not expired at
    /// `now` (seconds since the epoch).
    pub fn verified_with(&self, digest: &[u8; 32], now: u64) -> Option<JwtPublicKey> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(digest)
            .filter(|(_, exp)| *exp > now)
            .map(|(k, _)| k.clone())
    }

    /// Records that `key` verified the token until `exp`.
    pub fn insert(&self, digest: [u8; 32], key: JwtPublicKey, exp: u64, now: u64) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= Self::CAP {
            map.retain(|_, (_, e)| *e > now);
            if map.len() >= Self::CAP {
                // Still full of live tokens: start over rather than grow.
                map.clear();
            }
        }
        map.insert(digest, (key, exp));
    }

    /// How many tokens are held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jwt::EcCurve;
    use crate::x509::{KeyAlgorithm, PrivateKey};

    fn key() -> JwtPublicKey {
        let k = PrivateKey::generate(KeyAlgorithm::EcP256).unwrap();
        JwtPublicKey::ec(EcCurve::P256, k.public_key_point().unwrap()).unwrap()
    }

    #[test]
    fn entries_expire_and_the_cache_stays_bounded() {
        let c = VerifiedTokens::default();
        let k = key();
        let d = VerifiedTokens::digest("a.b.c");
        c.insert(d, k.clone(), 100, 50);
        assert_eq!(c.verified_with(&d, 99), Some(k.clone()));
        assert_eq!(c.verified_with(&d, 100), None, "expired at exp");
        for i in 0..VerifiedTokens::CAP + 10 {
            c.insert(VerifiedTokens::digest(&i.to_string()), k.clone(), 1_000, 50);
        }
        assert!(c.len() <= VerifiedTokens::CAP);
    }
}
