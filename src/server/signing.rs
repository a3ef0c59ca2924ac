//! The signing pool: one thread per core, each taking the next queued batch
//! of CSRs the moment it is done with the last. Handing each batch to the
//! async runtime's blocking pool instead left a core idle between batches,
//! until a runtime worker (sharing the cores with the signers) got round to
//! starting the next one: about a tenth of the cores in a CSR storm.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, PoisonError, mpsc};

type Job = Box<dyn FnOnce() + Send>;

/// The signers' nice value: when the cores are busy signing a storm, a
/// thread with an interactive request to serve gets the CPU first.
const SIGNER_NICE: i32 = 5;

/// A fixed set of signing threads over one queue (first come, first served).
/// The threads end when the pool is dropped.
pub struct SigningPool {
    queue: mpsc::Sender<Job>,
}

impl std::fmt::Debug for SigningPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningPool").finish_non_exhaustive()
    }
}

impl SigningPool {
    /// Starts `threads` signers (at least one).
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let (queue, jobs) = mpsc::channel::<Job>();
        let jobs = Arc::new(Mutex::new(jobs));
        for i in 0..threads.max(1) {
            let jobs = jobs.clone();
            std::thread::Builder::new()
                .name(format!("sigil-signer-{i}"))
                .spawn(move || {
                    // Below the threads that answer health, attestation and
                    // sync (Linux applies this to the calling thread only).
                    let _ = rustix::process::setpriority_process(None, SIGNER_NICE);
                    loop {
                        let next = jobs.lock().unwrap_or_else(PoisonError::into_inner).recv();
                        let Ok(job) = next else { return };
                        // A panic fails that batch's call, not the signer.
                        let _ = std::panic::catch_unwind(AssertUnwindSafe(job));
                    }
                })?;
        }
        Ok(SigningPool { queue })
    }

    /// Runs `work` on the next free signer and returns what it returns;
    /// `None` if it panicked. Work whose caller went away while it waited in
    /// the queue is dropped unrun.
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let (done, result) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            if !done.is_closed() {
                let _ = done.send(work());
            }
        });
        self.queue.send(job).ok()?;
        result.await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn runs_work_and_survives_a_panic() {
        let pool = SigningPool::new(2).unwrap();
        assert_eq!(pool.run(|| 6 * 7).await, Some(42));
        assert_eq!(pool.run(|| -> u8 { panic!("bad batch") }).await, None);
        // Both signers are still there.
        let (a, b) = tokio::join!(pool.run(|| 1), pool.run(|| 2));
        assert_eq!((a, b), (Some(1), Some(2)));
    }

    #[tokio::test]
    async fn work_whose_caller_left_is_not_run() {
        let pool = Arc::new(SigningPool::new(1).unwrap());
        let ran = Arc::new(AtomicUsize::new(0));
        // Hold the only signer until the queued call below has been dropped.
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let busy = tokio::spawn({
            let pool = pool.clone();
            async move { pool.run(move || wait.recv().ok()).await }
        });
        tokio::task::yield_now().await;
        let queued = {
            let (pool, ran) = (pool.clone(), ran.clone());
            tokio::spawn(async move { pool.run(move || ran.fetch_add(1, Ordering::SeqCst)).await })
        };
        // (One thread: the spawned call runs up to its wait in the queue.)
        tokio::task::yield_now().await;
        queued.abort();
        let _ = queued.await;
        release.send(()).unwrap();
        assert_eq!(busy.await.unwrap(), Some(Some(())));
        // Anything queued after it runs, so the abandoned one was looked at.
        assert_eq!(pool.run(|| 0).await, Some(0));
        assert_eq!(ran.load(Ordering::SeqCst), 0);
    }
}
