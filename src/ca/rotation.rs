//! When authorities rotate: pure functions of (now, the authority's validity),
//! asked by the rotation task on every tick. An authority living `L` is
//! followed by a prepared successor once less than `min(L/2, 30 d)` remains,
//! and hands signing over to it once less than `min(L/6, 7 d)` remains, so
//! the active authority always keeps at least a sixth of its life (SVIDs are
//! never cut short by it) and the successor sits in every bundle long before
//! it signs anything.

use std::time::{Duration, SystemTime};

/// The most lead time a successor gets before the active authority expires.
pub const MAX_PREPARE_LEAD: Duration = Duration::from_secs(30 * 86_400);
/// The most lead time before expiry at which the successor takes over.
pub const MAX_ACTIVATE_LEAD: Duration = Duration::from_secs(7 * 86_400);
/// How long an expired authority stays in the bundle (clock skew, late
/// verifiers) before it is dropped: this, or a sixth of its lifetime if less.
pub const EXPIRED_GRACE: Duration = Duration::from_secs(3600);

/// An authority's validity, as the schedule sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// NotBefore.
    pub not_before: SystemTime,
    /// NotAfter.
    pub not_after: SystemTime,
}

impl Validity {
    fn lifetime(&self) -> Duration {
        self.not_after
            .duration_since(self.not_before)
            .unwrap_or_default()
    }

    fn remaining(&self, now: SystemTime) -> Duration {
        self.not_after.duration_since(now).unwrap_or_default()
    }
}

/// Whether to prepare a successor to the active authority `active`.
pub fn should_prepare(now: SystemTime, active: Validity) -> bool {
    active.remaining(now) < (active.lifetime() / 2).min(MAX_PREPARE_LEAD)
}

/// Whether to make the prepared successor active in place of `active`.
/// The caller never prepares and activates in one tick: a successor prepared
/// now is activated on a later tick at the earliest, after agents had a
/// chance to receive it.
pub fn should_activate(now: SystemTime, active: Validity) -> bool {
    active.remaining(now) < (active.lifetime() / 6).min(MAX_ACTIVATE_LEAD)
}

/// Whether an authority that is no longer active may leave the bundle.
pub fn should_drop(now: SystemTime, authority: Validity) -> bool {
    let grace = EXPIRED_GRACE.min(authority.lifetime() / 6);
    now.duration_since(authority.not_after)
        .is_ok_and(|past| past >= grace)
}

/// The longest SVID TTL an authority lifetime supports: a sixth of it, the
/// least an active authority keeps, so SVIDs are never silently shortened.
pub fn max_svid_ttl(ca_ttl: Duration) -> Duration {
    ca_ttl / 6
}

/// The longest bundle refresh hint an authority lifetime supports: a quarter
/// of the time between preparing a successor and activating it, so a peer
/// polling at that hint sees the successor well before it signs anything.
pub fn max_refresh_hint(ca_ttl: Duration) -> Duration {
    let window = (ca_ttl / 2)
        .min(MAX_PREPARE_LEAD)
        .saturating_sub((ca_ttl / 6).min(MAX_ACTIVATE_LEAD));
    window / 4
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn refresh_hint_limit() {
        let h = Duration::from_secs(3600);
        // 24 h: prepared 12 h before expiry, active from 4 h: a quarter of 8 h.
        assert_eq!(max_refresh_hint(24 * h), 2 * h);
        // 90 s: 45 s - 15 s = 30 s, a quarter is 7.5 s.
        assert_eq!(
            max_refresh_hint(Duration::from_secs(90)),
            Duration::from_millis(7500)
        );
        // A year: 30 d - 7 d = 23 d.
        assert_eq!(max_refresh_hint(365 * 24 * h), 23 * 24 * h / 4);
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn validity(from: u64, to: u64) -> Validity {
        Validity {
            not_before: at(from),
            not_after: at(to),
        }
    }

    const DAY: u64 = 86_400;

    #[test]
    fn schedule_table() {
        // (lifetime from 0 to `to`, now) -> (prepare, activate, drop)
        let cases = [
            // A 24 h authority: prepare under 12 h left, activate under 4 h.
            (DAY, 0, (false, false, false)),
            (DAY, DAY / 2 - 1, (false, false, false)),
            (DAY, DAY / 2 + 1, (true, false, false)),
            (DAY, DAY - DAY / 6 - 1, (true, false, false)),
            (DAY, DAY - DAY / 6 + 1, (true, true, false)),
            (DAY, DAY, (true, true, false)),
            (DAY, DAY + 3599, (true, true, false)),
            (DAY, DAY + 3600, (true, true, true)),
            // A year: the leads are capped at 30 d and 7 d.
            (365 * DAY, 335 * DAY - 1, (false, false, false)),
            (365 * DAY, 335 * DAY + 1, (true, false, false)),
            (365 * DAY, 358 * DAY - 1, (true, false, false)),
            (365 * DAY, 358 * DAY + 1, (true, true, false)),
            // 90 s (a test deployment): 45 s and 15 s.
            (90, 44, (false, false, false)),
            (90, 46, (true, false, false)),
            (90, 76, (true, true, false)),
        ];
        for (to, now, (prep, act, drop)) in cases {
            let v = validity(0, to);
            assert_eq!(should_prepare(at(now), v), prep, "prepare {to} at {now}");
            assert_eq!(should_activate(at(now), v), act, "activate {to} at {now}");
            assert_eq!(should_drop(at(now), v), drop, "drop {to} at {now}");
        }
    }

    #[test]
    fn activation_always_comes_after_preparation() {
        // Over any lifetime, the activation threshold is inside the
        // preparation one, so there is always a tick between them.
        for life in [60, 3600, DAY, 30 * DAY, 400 * DAY] {
            let v = validity(0, life);
            for now in (0..=life).step_by((life / 997).max(1) as usize) {
                if should_activate(at(now), v) {
                    assert!(should_prepare(at(now), v), "{life} {now}");
                }
            }
        }
        assert_eq!(
            max_svid_ttl(Duration::from_secs(DAY)),
            Duration::from_secs(DAY / 6)
        );
    }
}
