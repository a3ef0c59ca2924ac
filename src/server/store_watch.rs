//! Notices when this server can no longer read its store (a datastore it is
//! cut off from), so that its agents move to another server of the cluster
//! instead of waiting on a stream that will bring nothing. While the store
//! is unreadable the server ends its sync streams and refuses new ones with
//! `UNAVAILABLE`; a Sigil agent then tries the next server it lists.
//!
//! Only reads are checked: a full disk (writes failing) still lets a lone
//! sled server sync and sign, and must not send its agents away.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::store::Store;

/// How often the store is read.
pub const CHECK_EVERY: Duration = Duration::from_secs(5);
/// Failed reads in a row before the store counts as unreachable (each read
/// is bounded by the store's own timeout: 10 s for PostgreSQL).
pub const FAILURES_TO_GIVE_UP: u32 = 2;

/// Reads the store's revision every [`CHECK_EVERY`] until shutdown. After
/// [`FAILURES_TO_GIVE_UP`] failures in a row, `down` holds why; the next
/// good read clears it.
pub async fn run(
    store: Arc<dyn Store>,
    down: watch::Sender<Option<String>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut failures = 0u32;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(CHECK_EVERY) => {}
            _ = shutdown.changed() => return,
        }
        let store = store.clone();
        let read = tokio::task::spawn_blocking(move || store.revision()).await;
        match read {
            Ok(Ok(_)) => {
                failures = 0;
                if down.borrow().is_some() {
                    tracing::info!("the store is readable again; accepting sync streams");
                    down.send_replace(None);
                }
            }
            Ok(Err(e)) => {
                failures += 1;
                tracing::warn!(error = %e, failures, "reading the store failed");
                if failures == FAILURES_TO_GIVE_UP {
                    tracing::error!(error = %e, "the store cannot be read; ending sync streams so that agents move to another server");
                    down.send_replace(Some(e.to_string()));
                }
            }
            // The blocking pool is shutting down with the runtime.
            Err(_) => return,
        }
    }
}

/// The status for a stream ended (or refused) while the store is unreadable.
pub fn unavailable(reason: &str) -> tonic::Status {
    tonic::Status::unavailable(format!(
        "this server cannot read its store ({reason}); try another server"
    ))
}
