//! The pure rules for when credentials rotate, retry back-off, and reading
//! cached SVIDs back.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::registry::Entry;
use crate::workload_api::CachedSvid;
use crate::x509::PrivateKey;

/// An SVID read back from the agent's cache: its validity from the leaf,
/// its rotation due as if received at its NotBefore (plus the backdating).
pub fn restore_svid(
    entry: std::sync::Arc<Entry>,
    mut chain: Vec<Vec<u8>>,
    key: PrivateKey,
) -> Option<CachedSvid> {
    chain.shrink_to_fit();
    let (not_before, not_after) = validity(chain.first()?)?;
    let issued = (not_before + crate::x509::BACKDATE).min(not_after);
    let issuer = crate::workload_api::issuer_of(chain.first()?);
    Some(CachedSvid {
        issuer,
        entry,
        chain,
        key,
        not_before,
        not_after,
        rotate_at: rotation_time(issued, not_after, random_jitter()),
    })
}

/// A certificate's NotBefore and NotAfter.
pub fn validity(der: &[u8]) -> Option<(SystemTime, SystemTime)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let at = |ts: i64| UNIX_EPOCH + Duration::from_secs(u64::try_from(ts).unwrap_or(0));
    Some((
        at(cert.validity().not_before.timestamp()),
        at(cert.validity().not_after.timestamp()),
    ))
}

/// When to rotate a credential valid from `not_before` to `not_after`: at
/// half its lifetime, moved by `jitter` ∈ [-1, 1] times a tenth of it, so a
/// fleet does not renew in lockstep.
pub fn rotation_time(not_before: SystemTime, not_after: SystemTime, jitter: f64) -> SystemTime {
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    let half = lifetime.as_secs_f64() / 2.0;
    let spread = lifetime.as_secs_f64() / 10.0 * jitter.clamp(-1.0, 1.0);
    not_before + Duration::from_secs_f64((half + spread).max(0.0))
}

pub use crate::runtime::backoff::{Backoff, random_jitter};

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn t(s: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(s)
    }

    #[test]
    fn rotation_table() {
        // (not_before, not_after, jitter) -> rotate at
        let cases = [
            (0, 3600, 0.0, 1800),
            (0, 3600, 1.0, 2160),
            (0, 3600, -1.0, 1440),
            (0, 3600, 5.0, 2160),
            (100, 160, 0.0, 130),
            (100, 100, 0.0, 100),
            (200, 100, 0.0, 200),
        ];
        for (nb, na, j, want) in cases {
            assert_eq!(rotation_time(t(nb), t(na), j), t(want), "{nb} {na} {j}");
        }
    }

    #[test]
    fn jitter_in_range_and_backoff_capped() {
        for _ in 0..100 {
            let j = random_jitter();
            assert!((-1.0..=1.0).contains(&j));
        }
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let delays: Vec<Duration> = (0..10).map(|_| b.next_delay()).collect();
        assert!(delays[0] <= Duration::from_millis(100) && delays[0] >= Duration::from_millis(50));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(2)));
        assert!(delays[9] >= Duration::from_secs(1));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
