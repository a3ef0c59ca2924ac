//! Accept loops with limits: a cap on connections overall and per peer, a
//! deadline for a connection to become useful, and back-off when the process
//! runs out of file descriptors (instead of spinning on `EMFILE`).

use std::collections::HashMap;
use std::hash::Hash;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Limits on one listening socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Open connections at most.
    pub max_connections: usize,
    /// Open connections per peer (uid on a Unix socket, IP address on TCP).
    pub max_per_peer: usize,
    /// A connection that has not sent its first request (Unix) or finished
    /// its TLS handshake (TCP) by then is closed.
    pub first_request_timeout: Duration,
    /// HTTP/2 streams at once on one connection.
    pub max_streams_per_connection: u32,
}

impl ConnLimits {
    /// The workload socket: any local user may connect.
    pub const WORKLOAD: ConnLimits = ConnLimits {
        max_connections: 4096,
        max_per_peer: 256,
        first_request_timeout: Duration::from_secs(10),
        max_streams_per_connection: 256,
    };
    /// The admin socket (owner only).
    pub const ADMIN: ConnLimits = ConnLimits {
        max_connections: 256,
        max_per_peer: 128,
        first_request_timeout: Duration::from_secs(10),
        max_streams_per_connection: 256,
    };
    /// The node API: unauthenticated peers may connect to attest.
    pub const NODE: ConnLimits = ConnLimits {
        max_connections: 8192,
        max_per_peer: 512,
        first_request_timeout: Duration::from_secs(10),
        max_streams_per_connection: 256,
    };

    /// HTTP/2 keepalive: ping an idle peer this often...
    pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
    /// ...and close the connection when a ping is not answered within this.
    pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

    /// A tonic server builder with this socket's HTTP/2 limits.
    pub fn server_builder(&self) -> tonic::transport::Server {
        tonic::transport::Server::builder()
            .max_concurrent_streams(Some(self.max_streams_per_connection))
            .http2_keepalive_interval(Some(Self::KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(Self::KEEPALIVE_TIMEOUT))
    }
}

/// Counts open connections, overall and per peer.
pub(super) struct Limiter<K> {
    name: &'static str,
    total: Arc<Semaphore>,
    max_per_peer: usize,
    per_peer: Mutex<HashMap<K, usize>>,
    refusals: Mutex<RefusalLog>,
}

/// Holds one connection's place; dropping it frees the place.
pub(super) struct Slot<K: Hash + Eq + Copy> {
    _permit: OwnedSemaphorePermit,
    peer: K,
    limiter: Arc<Limiter<K>>,
}

impl<K: Hash + Eq + Copy> Drop for Slot<K> {
    fn drop(&mut self) {
        let mut counts = self
            .limiter
            .per_peer
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.peer);
            }
        }
    }
}

impl<K: Hash + Eq + Copy + std::fmt::Debug> Limiter<K> {
    pub(super) fn new(name: &'static str, limits: &ConnLimits) -> Arc<Self> {
        Arc::new(Limiter {
            name,
            total: Arc::new(Semaphore::new(limits.max_connections)),
            max_per_peer: limits.max_per_peer,
            per_peer: Mutex::new(HashMap::new()),
            refusals: Mutex::new(RefusalLog::default()),
        })
    }

    /// A place for a connection from `peer`, or `None` (logged, rate-limited).
    pub(super) fn admit(self: &Arc<Self>, peer: K) -> Option<Slot<K>> {
        let Ok(permit) = self.total.clone().try_acquire_owned() else {
            self.refused(peer, "too many connections");
            return None;
        };
        let mut counts = self.per_peer.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(peer).or_insert(0);
        if *n >= self.max_per_peer {
            drop(counts);
            self.refused(peer, "too many connections from this peer");
            return None;
        }
        *n += 1;
        Some(Slot {
            _permit: permit,
            peer,
            limiter: self.clone(),
        })
    }

    fn refused(&self, peer: K, why: &'static str) {
        crate::metrics::metrics()
            .connections_refused
            .get_or_create(&crate::metrics::label("listener", self.name))
            .inc();
        let mut log = self.refusals.lock().unwrap_or_else(|e| e.into_inner());
        log.suppressed += 1;
        if log
            .last
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            tracing::warn!(socket = self.name, peer = ?peer, reason = why, refused = log.suppressed, "connection refused by limits");
            log.last = Some(Instant::now());
            log.suppressed = 0;
        }
    }
}

#[derive(Default)]
struct RefusalLog {
    last: Option<Instant>,
    suppressed: u64,
}

/// What to do after a failed `accept`.
pub(super) struct AcceptBackoff {
    delay: Duration,
    name: &'static str,
}

impl AcceptBackoff {
    pub(super) fn new(name: &'static str) -> Self {
        AcceptBackoff {
            delay: Duration::ZERO,
            name,
        }
    }

    pub(super) fn reset(&mut self) {
        self.delay = Duration::ZERO;
    }

    /// Waits before the next `accept`: out of descriptors or memory, back off
    /// (10 ms doubling to 1 s) so connections already open can finish.
    pub(super) async fn wait(&mut self, e: &io::Error) {
        let exhausted = matches!(
            e.raw_os_error(),
            Some(code) if code == rustix::io::Errno::MFILE.raw_os_error()
                || code == rustix::io::Errno::NFILE.raw_os_error()
                || code == rustix::io::Errno::NOBUFS.raw_os_error()
                || code == rustix::io::Errno::NOMEM.raw_os_error()
        );
        self.delay = if exhausted {
            (self.delay * 2).clamp(Duration::from_millis(10), Duration::from_secs(1))
        } else {
            Duration::from_millis(1)
        };
        if exhausted && self.delay == Duration::from_millis(10) {
            tracing::error!(socket = self.name, error = %e, "accept failed: out of resources; backing off");
        }
        tokio::time::sleep(self.delay).await;
    }
}

/// An accepted connection holding its place under the limits.
pub struct Admitted<IO> {
    io: IO,
    _slot: Box<dyn Send + Sync>,
}

impl<IO> Admitted<IO> {
    pub(super) fn new<K: Hash + Eq + Copy + Send + Sync + 'static>(io: IO, slot: Slot<K>) -> Self {
        Admitted {
            io,
            _slot: Box::new(slot),
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Admitted<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

forward_write!(Admitted);
forward_connect_info!(Admitted);

/// Raises the soft limit on open files to the hard limit, so the connection
/// caps, not the descriptor limit, decide when to refuse. Returns the limit now
/// in force.
pub fn raise_fd_limit() -> Option<u64> {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let (Some(current), max) = (limit.current, limit.maximum) else {
        return None;
    };
    let wanted = max.unwrap_or(u64::MAX).min(1 << 20);
    if wanted <= current {
        return Some(current);
    }
    let raised = rustix::process::Rlimit {
        current: Some(wanted),
        maximum: max,
    };
    match rustix::process::setrlimit(rustix::process::Resource::Nofile, raised) {
        Ok(()) => Some(wanted),
        Err(e) => {
            tracing::warn!(error = %e, current, "could not raise the open-file limit");
            Some(current)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn caps_apply_overall_and_per_peer_and_free_on_drop() {
        let limits = ConnLimits {
            max_connections: 3,
            max_per_peer: 2,
            ..ConnLimits::WORKLOAD
        };
        let l = Limiter::new("test", &limits);
        let a1 = l.admit(1u32).unwrap();
        let _a2 = l.admit(1).unwrap();
        assert!(l.admit(1).is_none(), "third from the same peer");
        let _b1 = l.admit(2).unwrap();
        assert!(l.admit(3).is_none(), "over the total");
        drop(a1);
        let _a3 = l.admit(1).unwrap();
        assert!(l.admit(2).is_none());
    }

    #[test]
    fn the_fd_limit_is_raised_to_the_hard_limit() {
        let now = raise_fd_limit().unwrap();
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        assert_eq!(limit.current, Some(now));
    }
}
