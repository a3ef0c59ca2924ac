//! Which selectors the connected workloads have, for an agent that caches
//! a bounded number of SVIDs (`svid_cache_max`): SVIDs for them are always
//! signed and kept, the rest fill the cache up to its limit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::spiffe::Selector;

/// The selectors of every open workload stream.
#[derive(Debug, Default)]
pub struct Demand {
    /// Off (no cap): nothing is recorded and nobody is woken.
    enabled: bool,
    streams: Mutex<HashMap<u64, Vec<Selector>>>,
    next: AtomicU64,
    /// Woken when a stream opens (the agent may have to sign for it).
    pub opened: Notify,
}

/// An open stream's place in [`Demand`]; dropping it leaves.
#[derive(Debug)]
pub struct Subscribed {
    demand: Arc<Demand>,
    id: Option<u64>,
}

impl Drop for Subscribed {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.demand
                .streams
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
        }
    }
}

impl Demand {
    /// Demand tracking, on when the agent caps its SVID cache.
    pub fn new(enabled: bool) -> Arc<Self> {
        Arc::new(Demand {
            enabled,
            ..Demand::default()
        })
    }

    /// Records an open stream of a workload with `selectors`.
    pub fn subscribe(self: &Arc<Self>, selectors: &[Selector]) -> Subscribed {
        let id = self.enabled.then(|| {
            let id = self.next.fetch_add(1, Ordering::Relaxed);
            self.streams
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, selectors.to_vec());
            self.opened.notify_one();
            id
        });
        Subscribed {
            demand: self.clone(),
            id,
        }
    }

    /// The selector sets of the open streams.
    pub fn selectors(&self) -> Vec<Vec<Selector>> {
        self.streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }
}
