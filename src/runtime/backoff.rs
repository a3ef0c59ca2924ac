//! Jittered waits: capped exponential backoff, shared by the agent's
//! reconnects and the server's federation polling.

use std::time::Duration;

/// A random jitter in [-1, 1].
pub fn random_jitter() -> f64 {
    let bytes = crate::registry::random_bytes(4).unwrap_or_else(|_| vec![0; 4]);
    let v = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    f64::from(v) / f64::from(u32::MAX) * 2.0 - 1.0
}

/// Capped exponential backoff with full jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// A backoff from `base` doubling up to `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max,
            attempt: 0,
        }
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The next delay: uniform in [cap/2, cap] where cap doubles each time.
    pub fn next_delay(&mut self) -> Duration {
        let cap = self
            .base
            .saturating_mul(2u32.saturating_pow(self.attempt))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        cap.mul_f64(0.75 + random_jitter() / 4.0)
    }
}
