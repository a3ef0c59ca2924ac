//! Admission for signing. Each agent has a token bucket of CSRs (and
//! JWT-SVIDs), and the server holds at most a bounded number of CSRs queued
//! for its signers. A refusal is `RESOURCE_EXHAUSTED` with a `retry-after-ms`
//! trailer, which the agent honours with jitter, so a storm drains at the
//! signing rate instead of piling up memory and latency.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::Status;
use tonic::metadata::{MetadataMap, MetadataValue};

use crate::spiffe::SpiffeId;

/// The trailer that says how long to wait before asking again.
pub const RETRY_AFTER: &str = "retry-after-ms";

/// A `RESOURCE_EXHAUSTED` status that says when to come back.
pub fn exhausted(message: String, retry: Duration) -> Status {
    let ms = retry.as_millis().max(1);
    let mut md = MetadataMap::new();
    if let Ok(v) = MetadataValue::try_from(ms.to_string()) {
        md.insert(RETRY_AFTER, v);
    }
    Status::with_metadata(
        tonic::Code::ResourceExhausted,
        format!("{message}; retry after {ms} ms"),
        md,
    )
}

/// The wait a `RESOURCE_EXHAUSTED` status asks for, if it names one.
pub fn retry_after(status: &Status) -> Option<Duration> {
    if status.code() != tonic::Code::ResourceExhausted {
        return None;
    }
    let ms: u64 = status
        .metadata()
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    Some(Duration::from_millis(ms))
}

/// CPU time the calling thread has used so far.
pub fn thread_cpu_time() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

/// How long a refused client waits before coming back when asked to wait
/// `asked`: the server gives each refused request its own turn, so only a
/// little jitter (up to a tenth more) is added, against identical clocks.
pub fn come_back_after(asked: Duration) -> Duration {
    asked.mul_f64(1.05 + crate::runtime::backoff::random_jitter() / 20.0)
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Per-agent buckets and the signing queue bound.
#[derive(Debug)]
pub struct SigningLimits {
    /// Tokens per second per agent (0: no per-agent limit).
    rate: f64,
    /// Bucket size.
    burst: f64,
    buckets: Mutex<HashMap<SpiffeId, Bucket>>,
    /// CSRs admitted and not yet signed.
    queued: AtomicUsize,
    max_queued: usize,
    /// Signers running at once.
    workers: usize,
    /// Batches admitted and not yet signed.
    batches: AtomicUsize,
    /// Measured CPU cost of one CSR on one signer, in ns: a moving average
    /// over batches of at least [`FULL_BATCH`] CSRs.
    cost_ns: AtomicU64,
    /// Measured CPU cost of a batch beyond its CSRs (the agent's record,
    /// the task), in ns: a moving average over smaller batches.
    batch_ns: AtomicU64,
    /// When the turns already handed to refused requests end: each refusal
    /// gets the next turn after the queue and after those before it.
    turns_end: Mutex<Option<Instant>>,
}

/// CSRs admitted to the queue; dropping it (signed or abandoned) frees them.
#[derive(Debug)]
pub struct Admitted {
    limits: Arc<SigningLimits>,
    n: usize,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.limits.queued.fetch_sub(self.n, Ordering::AcqRel);
        self.limits.batches.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Batches at least this large measure the cost of a CSR; smaller ones the
/// fixed cost of a batch.
const FULL_BATCH: usize = 50;

/// Moves a moving average an eighth of the way to `sample`.
fn average(cell: &AtomicU64, sample: u64) {
    let old = cell.load(Ordering::Relaxed);
    cell.store(old - old / 8 + sample / 8, Ordering::Relaxed);
}

impl SigningLimits {
    /// `rate` tokens per second per agent with buckets of `burst` (rate 0
    /// turns the per-agent limit off); at most `max_queued` CSRs waiting
    /// for `workers` signers.
    pub fn new(rate: u32, burst: u32, max_queued: usize, workers: usize) -> Self {
        SigningLimits {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::default(),
            queued: AtomicUsize::new(0),
            max_queued: max_queued.max(1),
            workers: workers.max(1),
            batches: AtomicUsize::new(0),
            // First guesses (≈ 7k/s per core) until batches are measured.
            cost_ns: AtomicU64::new(140_000),
            batch_ns: AtomicU64::new(0),
            turns_end: Mutex::default(),
        }
    }

    /// Takes `n` tokens from `agent`'s bucket, or says when they will be there.
    pub fn take(&self, agent: &SpiffeId, n: usize, now: Instant) -> Result<(), Status> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let want = n as f64;
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        // Forget full buckets now and then, so the map stays the size of the
        // agents that are actually busy.
        if buckets.len() >= 4096 && buckets.len().is_power_of_two() {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < burst
            });
        }
        let b = buckets.entry(agent.clone()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let refill = now.saturating_duration_since(b.at).as_secs_f64() * self.rate;
        b.tokens = (b.tokens + refill).min(self.burst);
        b.at = now.max(b.at);
        if want > self.burst {
            return Err(Status::invalid_argument(format!(
                "{n} signings in one request exceed the per-agent burst of {}",
                self.burst
            )));
        }
        if b.tokens < want {
            let wait = Duration::from_secs_f64((want - b.tokens) / self.rate);
            return Err(exhausted(
                format!(
                    "agent {agent} is over its signing rate ({} per second, burst {})",
                    self.rate, self.burst
                ),
                wait,
            ));
        }
        b.tokens -= want;
        Ok(())
    }

    /// Admits `n` CSRs to the signing queue, or gives the request a turn:
    /// when the queue will have drained to half at the measured signing
    /// rate, after the turns given to the requests refused before it.
    /// Refused agents then come back one after another as the signers free
    /// up, instead of all at once (a refused request has already cost its
    /// upload, so asking it back too soon only adds refusals). Half, not
    /// empty: the signers still have work queued when the turns come,
    /// though the measured rate be off by a quarter either way. Turns timed
    /// for an empty queue left the signers underfed by as much as the
    /// rate was underestimated (a fifth of a storm's drain rate, measured).
    pub fn admit(self: &Arc<Self>, n: usize) -> Result<Admitted, Status> {
        self.admit_at(n, Instant::now())
    }

    fn admit_at(self: &Arc<Self>, n: usize, now: Instant) -> Result<Admitted, Status> {
        let mut queued = self.queued.load(Ordering::Acquire);
        loop {
            if queued > 0 && queued + n > self.max_queued {
                let batches = self.batches.load(Ordering::Acquire);
                let over_half = queued.saturating_sub(self.max_queued / 2);
                let drained = now + self.signing_time(over_half, batches * over_half / queued);
                let mut turns_end = self.turns_end.lock().unwrap_or_else(|p| p.into_inner());
                let turn = turns_end.map_or(drained, |end| end.max(drained));
                *turns_end = Some(turn + self.signing_time(n, 1));
                return Err(exhausted(
                    format!(
                        "the server is signing at capacity ({queued} CSRs queued, about {:.0} per second)",
                        self.signing_rate()
                    ),
                    (turn - now).max(Duration::from_millis(50)),
                ));
            }
            match self.queued.compare_exchange_weak(
                queued,
                queued + n,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    self.batches.fetch_add(1, Ordering::AcqRel);
                    return Ok(Admitted {
                        limits: self.clone(),
                        n,
                    });
                }
                Err(now) => queued = now,
            }
        }
    }

    /// Records that one signer used `elapsed` of CPU for `n` CSRs. CPU time,
    /// not wall time: while the cores are shared (the accept loops decoding
    /// a storm of requests), a signer's wall time grows with the others'
    /// work, and a rate from it made the server look several times slower
    /// than it signs once it has its cores, handing refused agents turns
    /// seconds too late (measured: the signers idle for 2 s, then fed at
    /// half their rate).
    ///
    /// A batch also has a fixed cost (the agent's record, the task), which
    /// is measured apart: spread over one CSR it made a server that had
    /// signed single renewals think it signs a third as fast as it does in
    /// a storm of full batches, and its first refusals got turns 5 s late.
    pub fn record(&self, n: usize, elapsed: Duration) {
        if n == 0 {
            return;
        }
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        if n >= FULL_BATCH {
            average(&self.cost_ns, (ns / n as u64).max(1));
        } else {
            let csrs = self
                .cost_ns
                .load(Ordering::Relaxed)
                .saturating_mul(n as u64);
            average(&self.batch_ns, ns.saturating_sub(csrs));
        }
    }

    /// How long all signers together take for `csrs` CSRs in `batches`.
    fn signing_time(&self, csrs: usize, batches: usize) -> Duration {
        let ns = csrs as f64 * self.cost_ns.load(Ordering::Relaxed).max(1) as f64
            + batches as f64 * self.batch_ns.load(Ordering::Relaxed) as f64;
        Duration::from_secs_f64(ns / 1e9 / self.workers as f64)
    }

    /// CSRs per second all signers together manage in full batches, as
    /// measured.
    pub fn signing_rate(&self) -> f64 {
        let cost = self.cost_ns.load(Ordering::Relaxed).max(1) as f64;
        self.workers as f64 * 1e9 / cost
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn agent(n: u32) -> SpiffeId {
        SpiffeId::new(&format!("spiffe://example.org/sigil/agent/join_token/a{n}")).unwrap()
    }

    #[test]
    fn a_bucket_refuses_past_its_burst_and_refills_at_its_rate() {
        let limits = SigningLimits::new(100, 500, 10_000, 2);
        let t0 = Instant::now();
        limits.take(&agent(1), 500, t0).unwrap();
        let refused = limits.take(&agent(1), 100, t0).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        // 100 tokens at 100/s: one second.
        assert_eq!(retry_after(&refused), Some(Duration::from_millis(1000)));
        assert!(
            refused.message().contains("signing rate"),
            "{}",
            refused.message()
        );
        // Another agent has its own bucket.
        limits.take(&agent(2), 500, t0).unwrap();
        // Half a second refills 50: still short of 100, and the wait shrinks.
        let later = t0 + Duration::from_millis(500);
        let refused = limits.take(&agent(1), 100, later).unwrap_err();
        assert_eq!(retry_after(&refused), Some(Duration::from_millis(500)));
        limits
            .take(&agent(1), 100, t0 + Duration::from_secs(1))
            .unwrap();
        // Never more than the burst, however long it waited.
        let much_later = t0 + Duration::from_secs(3600);
        limits.take(&agent(1), 500, much_later).unwrap();
        assert!(limits.take(&agent(1), 1, much_later).is_err());
        // A request larger than the burst could never pass: a plain error.
        let too_big = limits.take(&agent(3), 501, t0).unwrap_err();
        assert_eq!(too_big.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn thread_cpu_time_counts_this_threads_work_only() {
        let before = thread_cpu_time();
        // Another thread's work is not this thread's.
        std::thread::spawn(|| {
            let t = thread_cpu_time();
            let mut x = 1u64;
            while thread_cpu_time() - t < Duration::from_millis(20) {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
        })
        .join()
        .unwrap();
        let idle = thread_cpu_time() - before;
        let mut x = 1u64;
        while thread_cpu_time() - before < idle + Duration::from_millis(20) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        assert!(
            idle < Duration::from_millis(20),
            "{idle:?} while another thread worked"
        );
    }

    #[test]
    fn rate_zero_turns_the_per_agent_limit_off() {
        let limits = SigningLimits::new(0, 1, 10, 1);
        let t0 = Instant::now();
        for _ in 0..100 {
            limits.take(&agent(1), 1_000_000, t0).unwrap();
        }
    }

    #[test]
    fn a_batch_fixed_cost_is_measured_apart_from_the_csrs() {
        let limits = Arc::new(SigningLimits::new(0, 1, 2000, 2));
        // Full batches at 100 µs per CSR: 2 signers, 20,000 per second.
        for _ in 0..100 {
            limits.record(100, Duration::from_millis(10));
        }
        // Single renewals at 500 µs each: 100 µs of CSR, 400 µs per batch.
        for _ in 0..100 {
            limits.record(1, Duration::from_micros(500));
        }
        let rate = limits.signing_rate();
        assert!((19_000.0..=21_000.0).contains(&rate), "{rate}");
        let us = |d: Duration| d.as_micros();
        // 1,000 CSRs in 10 batches: (100 ms + 4 ms) / 2 signers.
        assert!((51_000..=53_000).contains(&us(limits.signing_time(1000, 10))));
        // 100 single CSRs: (10 ms + 40 ms) / 2.
        assert!((24_000..=26_000).contains(&us(limits.signing_time(100, 100))));
        // A refusal's turn counts the batches queued: it comes when half of
        // the 2,000 CSRs in 200 batches are signed, (100 ms + 40 ms) / 2.
        let queued: Vec<_> = (0..200).map(|_| limits.admit(10).unwrap()).collect();
        let wait = retry_after(&limits.admit(1).unwrap_err()).unwrap();
        assert!((65..=75).contains(&wait.as_millis()), "{wait:?}");
        drop(queued);
        assert_eq!(limits.batches.load(Ordering::Acquire), 0);
    }

    #[test]
    fn the_queue_is_bounded_and_frees_what_was_signed() {
        let limits = Arc::new(SigningLimits::new(0, 1, 1000, 2));
        let a = limits.admit(600).unwrap();
        let b = limits.admit(400).unwrap();
        let refused = limits.admit(1).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused.message().contains("1000 CSRs queued"),
            "{}",
            refused.message()
        );
        // 1000 queued at the measured rate: 2 signers at 1 ms each = 2000/s,
        // so a quarter of a second to drain to half.
        for _ in 0..200 {
            limits.record(100, Duration::from_millis(100));
        }
        let t0 = Instant::now();
        let wait = retry_after(&limits.admit_at(1, t0).unwrap_err()).unwrap();
        assert!((225..=275).contains(&wait.as_millis()), "{wait:?}");
        // The next refusals get the turns after it, one batch (100 CSRs =
        // 50 ms at 2000/s) apart, not the same moment.
        let turns: Vec<u128> = (0..3)
            .map(|_| {
                retry_after(&limits.admit_at(100, t0).unwrap_err())
                    .unwrap()
                    .as_millis()
            })
            .collect();
        assert!(turns[0] >= wait.as_millis(), "{turns:?}");
        assert!(
            turns.windows(2).all(|w| (45..=55).contains(&(w[1] - w[0]))),
            "{turns:?}"
        );
        // Once those turns are past, a refusal waits for the queue again.
        let later = t0 + Duration::from_secs(5);
        let wait = retry_after(&limits.admit_at(1, later).unwrap_err()).unwrap();
        assert!((225..=275).contains(&wait.as_millis()), "{wait:?}");
        drop(a);
        let c = limits.admit(600).unwrap();
        drop((b, c));
        // An empty queue always takes a request, even one above the bound.
        limits.admit(5000).unwrap();
    }
}
