//! Notices when this server can no longer read its store (a datastore it is
//! cut off from), so that its agents move to another server of the cluster
//! instead of waiting on a stream that will bring nothing. While the store
//! is unreadable the server ends its sync streams and refuses new ones with
//! `UNAVAILABLE`; a Sigil agent then tries the next server it lists.
//!
//! It follows the reads the readiness probe already makes (every second),
//! and only reads: a full disk (writes failing) still lets a lone sled
//! server sync and sign, and must not send its agents away.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// How long the store must have been unreadable, every read failing, before
/// the server gives up on it.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(10);

/// Whether the store can be read, from the reads made of it.
#[derive(Debug)]
pub struct StoreWatch {
    /// When the reads started failing (none: the last read succeeded).
    failing_since: Mutex<Option<Instant>>,
    /// Why the store counts as unreadable, while it does.
    down: watch::Sender<Option<String>>,
}

impl Default for StoreWatch {
    fn default() -> Self {
        StoreWatch {
            failing_since: Mutex::new(None),
            down: watch::channel(None).0,
        }
    }
}

impl StoreWatch {
    /// Takes in a read of the store made at `now`: failures for
    /// [`GIVE_UP_AFTER`] in a row make the store unreadable; one success
    /// makes it readable again.
    pub fn observe<T, E: std::fmt::Display>(&self, read: &Result<T, E>, now: Instant) {
        let mut since = self
            .failing_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match read {
            Ok(_) => {
                *since = None;
                self.down.send_if_modified(|down| {
                    let was = down.take().is_some();
                    if was {
                        tracing::info!("the store is readable again; accepting sync streams");
                    }
                    was
                });
            }
            Err(e) => {
                let first = *since.get_or_insert(now);
                if now.saturating_duration_since(first) >= GIVE_UP_AFTER {
                    self.down.send_if_modified(|down| {
                        if down.is_some() {
                            return false;
                        }
                        tracing::error!(error = %e, "the store cannot be read; ending sync streams so that agents move to another server");
                        *down = Some(e.to_string());
                        true
                    });
                }
            }
        }
    }

    /// Why the store is unreadable, if it is.
    pub fn down(&self) -> Option<String> {
        self.down.borrow().clone()
    }

    /// Follows [`down`](Self::down).
    pub fn subscribe(&self) -> watch::Receiver<Option<String>> {
        self.down.subscribe()
    }
}

/// The status for a stream ended (or refused) while the store is unreadable.
pub fn unavailable(reason: &str) -> tonic::Status {
    tonic::Status::unavailable(format!(
        "this server cannot read its store ({reason}); try another server"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_is_given_up_after_failing_for_a_while_and_taken_back_at_once() {
        let watch = StoreWatch::default();
        let mut seen = watch.subscribe();
        let t0 = Instant::now();
        let failed: Result<u64, &str> = Err("PostgreSQL did not answer within 10s");
        let second = Duration::from_secs(1);
        for s in 0..10 {
            watch.observe(&failed, t0 + second * s);
        }
        assert_eq!(watch.down(), None, "9 s of failures");
        watch.observe(&failed, t0 + GIVE_UP_AFTER);
        assert_eq!(
            watch.down().as_deref(),
            Some("PostgreSQL did not answer within 10s")
        );
        assert!(seen.has_changed().unwrap());
        seen.mark_unchanged();
        // Said once, not on every later failure.
        watch.observe(&failed, t0 + GIVE_UP_AFTER + second);
        assert!(!seen.has_changed().unwrap());

        // One good read takes it back, and the count starts over.
        watch.observe(&Ok::<u64, &str>(7), t0 + GIVE_UP_AFTER * 2);
        assert_eq!(watch.down(), None);
        watch.observe(&failed, t0 + GIVE_UP_AFTER * 3);
        assert_eq!(watch.down(), None, "a single failure after a success");
    }
}
