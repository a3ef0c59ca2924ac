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
    /// Bumped whenever a stream opens or closes.
    generation: AtomicU64,
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
            self.demand.generation.fetch_add(1, Ordering::Relaxed);
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
            self.generation.fetch_add(1, Ordering::Relaxed);
            self.opened.notify_one();
            id
        });
        Subscribed {
            demand: self.clone(),
            id,
        }
    }

    /// Changes whenever a stream opens or closes (the selectors may differ).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generation_moves_when_a_stream_opens_or_closes_and_only_with_a_cap() {
        let selectors = [Selector::new("unix:uid:1000").unwrap()];
        let capped = Demand::new(true);
        let before = capped.generation();
        let open = capped.subscribe(&selectors);
        let opened = capped.generation();
        assert_ne!(opened, before);
        assert_eq!(capped.selectors().len(), 1);
        drop(open);
        assert_ne!(capped.generation(), opened);
        assert!(capped.selectors().is_empty());

        // Without a cap nothing is tracked, so nothing wakes the agent.
        let uncapped = Demand::new(false);
        drop(uncapped.subscribe(&selectors));
        assert_eq!(uncapped.generation(), 0);
    }
}
