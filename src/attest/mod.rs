//! Workload attestation: who is calling, as selectors. The unix attestor
//! turns a Unix socket peer's credentials into `unix:*` selectors by reading
//! `/proc`, `/etc/passwd` and `/etc/group`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use ring::digest::{Context, SHA256};

use crate::spiffe::Selector;

pub mod x509pop;

/// Why a caller could not be attested.
#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    /// The socket gave no peer PID (needed to inspect the process).
    #[error("the caller's PID is unknown (peer credentials without a PID)")]
    NoPid,
    /// The process could not be inspected.
    #[error("cannot inspect process {pid}: {reason}")]
    Proc {
        /// The PID.
        pid: i32,
        /// Why.
        reason: String,
    },
    /// The PID now belongs to another process than the one that connected.
    #[error("process {pid} changed during attestation (PID reused)")]
    PidReused {
        /// The PID.
        pid: i32,
    },
    /// The executable is larger than the configured hashing limit.
    #[error("executable {path} is {size} bytes, over the unix:sha256 limit of {limit}")]
    TooLargeToHash {
        /// The path.
        path: String,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
}

/// A Unix peer's credentials, as the socket reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCredentials {
    /// Process ID, when the platform reports it.
    pub pid: Option<i32>,
    /// Effective user ID.
    pub uid: u32,
    /// Effective group ID.
    pub gid: u32,
}

/// An executable's identity on disk: (device, inode, mtime, size).
type FileKey = (u64, u64, i64, u64);

/// The unix workload attestor.
#[derive(Clone)]
pub struct UnixAttestor {
    /// Emit `unix:sha256:<hex>` of the executable (reads the whole file).
    pub sha256: bool,
    /// Largest executable hashed, in bytes.
    pub sha256_max_bytes: u64,
    /// Root of the proc filesystem (tests may point elsewhere).
    pub proc_root: PathBuf,
    /// Digests already computed, by the executable's (dev, inode, mtime, size).
    digests: Arc<Mutex<HashMap<FileKey, String>>>,
    /// Whether "executable path unreadable" was already logged.
    path_warned: Arc<AtomicBool>,
    /// Recent attestations by (pid, start time), reused for a short while.
    recent: Arc<Mutex<HashMap<(i32, u64), Recent>>>,
    /// How long they are reused ([`REUSE_FOR`]; zero: never).
    pub reuse_for: std::time::Duration,
}

/// One process's attestation, kept for [`REUSE_FOR`].
#[derive(Debug, Clone)]
struct Recent {
    uid: u32,
    gid: u32,
    started: u64,
    exe: Option<PathBuf>,
    selectors: Vec<Selector>,
    at: std::time::Instant,
}

/// The workload attestation of one connection's process, shared by the
/// connection's calls (see [`UnixAttestor::attest_connection`]).
#[derive(Debug, Default)]
pub struct ConnectionAttestation(Mutex<Option<Recent>>);

impl ConnectionAttestation {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Recent>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How long an attestation of a process is reused for its later calls (a
/// burst of streams from one process is attested once). The process must
/// still be the same one: same PID and start time (the PID-reuse guard),
/// same peer UID and GID, same executable (an `execve` re-attests). A
/// change of supplementary groups shows within this window.
pub const REUSE_FOR: std::time::Duration = std::time::Duration::from_secs(5);

/// Processes remembered at most.
const RECENT_CACHE: usize = 4096;

impl std::fmt::Debug for UnixAttestor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnixAttestor")
            .field("sha256", &self.sha256)
            .field("sha256_max_bytes", &self.sha256_max_bytes)
            .field("proc_root", &self.proc_root)
            .finish_non_exhaustive()
    }
}

impl PartialEq for UnixAttestor {
    fn eq(&self, other: &Self) -> bool {
        (self.sha256, self.sha256_max_bytes, &self.proc_root)
            == (other.sha256, other.sha256_max_bytes, &other.proc_root)
    }
}

impl UnixAttestor {
    /// An attestor that also emits `unix:sha256` when `sha256` is set.
    pub fn with_sha256(sha256: bool) -> Self {
        UnixAttestor {
            sha256,
            ..UnixAttestor::default()
        }
    }
}

/// Digests cached at most (a node runs far fewer distinct executables).
const DIGEST_CACHE: usize = 4096;

impl Default for UnixAttestor {
    fn default() -> Self {
        UnixAttestor {
            sha256: false,
            sha256_max_bytes: 128 * 1024 * 1024,
            proc_root: PathBuf::from("/proc"),
            digests: Arc::default(),
            path_warned: Arc::default(),
            recent: Arc::default(),
            reuse_for: REUSE_FOR,
        }
    }
}

fn selector(value: String) -> Option<Selector> {
    Selector::from_parts("unix", &value).ok()
}

/// `name` of `id` in an `/etc/passwd`- or `/etc/group`-style file.
fn name_of(file: &str, id: u32) -> Option<String> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let _password = fields.next()?;
        let value: u32 = fields.next()?.parse().ok()?;
        (value == id).then(|| name.to_string())
    })
}

impl UnixAttestor {
    fn proc_file(&self, pid: i32, name: &str) -> PathBuf {
        self.proc_root.join(pid.to_string()).join(name)
    }

    fn read(&self, pid: i32, name: &str) -> Result<String, AttestError> {
        std::fs::read_to_string(self.proc_file(pid, name)).map_err(|e| AttestError::Proc {
            pid,
            reason: format!("{name}: {e}"),
        })
    }

    /// The process start time (field 22 of `/proc/<pid>/stat`), which changes
    /// when a PID is reused.
    fn start_time(&self, pid: i32) -> Result<u64, AttestError> {
        let stat = self.read(pid, "stat")?;
        // The command name (field 2) is in parentheses and may hold spaces.
        let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
        after
            .split_whitespace()
            .nth(19)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| AttestError::Proc {
                pid,
                reason: "unreadable stat".into(),
            })
    }

    /// Effective UID and the supplementary groups from `/proc/<pid>/status`.
    fn status(&self, pid: i32) -> Result<(u32, Vec<u32>), AttestError> {
        let status = self.read(pid, "status")?;
        let mut uid = None;
        let mut groups = Vec::new();
        for line in status.lines() {
            if let Some(v) = line.strip_prefix("Uid:") {
                uid = v.split_whitespace().nth(1).and_then(|u| u.parse().ok());
            } else if let Some(v) = line.strip_prefix("Groups:") {
                groups = v
                    .split_whitespace()
                    .filter_map(|g| g.parse().ok())
                    .collect();
            }
        }
        let uid = uid.ok_or_else(|| AttestError::Proc {
            pid,
            reason: "no Uid in status".into(),
        })?;
        Ok((uid, groups))
    }

    fn sha256(&self, pid: i32, path: &str) -> Result<String, AttestError> {
        use std::io::Read;
        use std::os::unix::fs::MetadataExt;
        let exe = self.proc_file(pid, "exe");
        let mut f = std::fs::File::open(&exe).map_err(|e| AttestError::Proc {
            pid,
            reason: format!("exe: {e}"),
        })?;
        let meta = f.metadata().map_err(|e| AttestError::Proc {
            pid,
            reason: format!("exe: {e}"),
        })?;
        let size = meta.len();
        if size > self.sha256_max_bytes {
            return Err(AttestError::TooLargeToHash {
                path: path.to_string(),
                size,
                limit: self.sha256_max_bytes,
            });
        }
        // The same file, unchanged: hashed once.
        let key = (meta.dev(), meta.ino(), meta.mtime(), size);
        let mut digests = self.digests.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = digests.get(&key) {
            return Ok(d.clone());
        }
        drop(digests);
        let mut ctx = Context::new(&SHA256);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = f.read(&mut buf).map_err(|e| AttestError::Proc {
                pid,
                reason: format!("exe: {e}"),
            })?;
            if n == 0 {
                break;
            }
            ctx.update(&buf[..n]);
        }
        let digest: String = ctx
            .finish()
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        digests = self.digests.lock().unwrap_or_else(|p| p.into_inner());
        if digests.len() >= DIGEST_CACHE {
            digests.clear();
        }
        digests.insert(key, digest.clone());
        Ok(digest)
    }

    /// Attests the peer: `unix:uid`, `unix:gid`, `unix:user`, `unix:group`,
    /// `unix:supplementary_gid`, `unix:path` and, if enabled, `unix:sha256`.
    /// The process's start time and UID are checked before and after, so a
    /// PID reused mid-attestation is refused.
    ///
    /// The same process calling again within [`REUSE_FOR`] gets the same
    /// selectors from one `/proc` read and one `readlink`, provided its start
    /// time, UID, GID and executable are unchanged.
    pub fn attest(&self, peer: PeerCredentials) -> Result<Vec<Selector>, AttestError> {
        self.attest_recent(peer).map(|r| r.selectors)
    }

    /// Attests a call on one connection. The peer's credentials are those of
    /// the process that connected, fixed for the connection's life; its later
    /// calls within [`REUSE_FOR`] reuse the connection's attestation while
    /// the executable is unchanged (an `execve` re-attests), without reading
    /// `/proc/<pid>/stat` again. Past that, the call is attested again, and a
    /// process with another start time than the one first attested on this
    /// connection is refused: its PID was reused, and the connection is held
    /// by someone else than the process that opened it.
    pub fn attest_connection(
        &self,
        conn: &ConnectionAttestation,
        peer: PeerCredentials,
    ) -> Result<Vec<Selector>, AttestError> {
        let pid = peer.pid.ok_or(AttestError::NoPid)?;
        // The lock is this connection's only: holding it over the readlink
        // spares copying the attestation for every call.
        let first_started = {
            let held = conn.lock();
            if let Some(h) = held.as_ref().filter(|h| h.at.elapsed() < self.reuse_for) {
                if std::fs::read_link(self.proc_file(pid, "exe")).ok() == h.exe {
                    return Ok(h.selectors.clone());
                }
            }
            held.as_ref().map(|h| h.started)
        };
        let fresh = self.attest_recent(peer)?;
        if first_started.is_some_and(|started| started != fresh.started) {
            return Err(AttestError::PidReused { pid });
        }
        let selectors = fresh.selectors.clone();
        *conn.lock() = Some(fresh);
        Ok(selectors)
    }

    fn attest_recent(&self, peer: PeerCredentials) -> Result<Recent, AttestError> {
        let pid = peer.pid.ok_or(AttestError::NoPid)?;
        let started = self.start_time(pid)?;
        if let Some(hit) = self.reuse(pid, started, peer) {
            return Ok(hit);
        }
        let fresh = Recent {
            uid: peer.uid,
            gid: peer.gid,
            started,
            selectors: self.attest_afresh(pid, started, peer)?,
            exe: std::fs::read_link(self.proc_file(pid, "exe")).ok(),
            at: std::time::Instant::now(),
        };
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() >= RECENT_CACHE {
            recent.retain(|_, r| r.at.elapsed() < self.reuse_for);
            if recent.len() >= RECENT_CACHE {
                recent.clear();
            }
        }
        recent.insert((pid, started), fresh.clone());
        Ok(fresh)
    }

    /// A recent attestation of this very process, if it still holds.
    fn reuse(&self, pid: i32, started: u64, peer: PeerCredentials) -> Option<Recent> {
        let hit = self
            .recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(pid, started))
            .filter(|r| r.uid == peer.uid && r.gid == peer.gid && r.at.elapsed() < self.reuse_for)
            .cloned()?;
        // An exec keeps the PID and start time but not the executable.
        (std::fs::read_link(self.proc_file(pid, "exe")).ok() == hit.exe).then_some(hit)
    }

    fn attest_afresh(
        &self,
        pid: i32,
        started: u64,
        peer: PeerCredentials,
    ) -> Result<Vec<Selector>, AttestError> {
        let (uid, groups) = self.status(pid)?;
        if uid != peer.uid {
            return Err(AttestError::PidReused { pid });
        }
        // Best effort, as SPIRE without discover_workload_path: an agent that
        // may not read another user's /proc/<pid>/exe still attests the uid
        // and gids; entries that need path or sha256 then do not match.
        let path = match std::fs::read_link(self.proc_file(pid, "exe")) {
            Ok(p) => Some(p.to_string_lossy().into_owned()),
            Err(e) => {
                if !self.path_warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(pid, error = %e, "cannot read a workload's executable path; unix:path and unix:sha256 selectors are left out for such callers (logged once)");
                }
                None
            }
        };
        let mut out: Vec<Selector> = Vec::new();
        out.extend(selector(format!("uid:{}", peer.uid)));
        out.extend(selector(format!("gid:{}", peer.gid)));
        if let Some(user) = name_of("/etc/passwd", peer.uid) {
            out.extend(selector(format!("user:{user}")));
        }
        if let Some(group) = name_of("/etc/group", peer.gid) {
            out.extend(selector(format!("group:{group}")));
        }
        for g in groups {
            out.extend(selector(format!("supplementary_gid:{g}")));
        }
        if let Some(path) = path {
            out.extend(selector(format!("path:{path}")));
            if self.sha256 {
                let digest = self.sha256(pid, &path)?;
                out.extend(selector(format!("sha256:{digest}")));
            }
        }
        // Same process at the end as at the start?
        if self.start_time(pid)? != started || self.status(pid)?.0 != uid {
            return Err(AttestError::PidReused { pid });
        }
        out.sort();
        out.dedup();
        Ok(out)
    }
}

/// The current user's name, from `/etc/passwd` (`uid<N>` if absent).
pub fn user_name(uid: u32) -> String {
    name_of("/etc/passwd", uid).unwrap_or_else(|| format!("uid{uid}"))
}

/// The calling process's effective UID, from `/proc/self/status`.
pub fn current_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> PeerCredentials {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let field = |name: &str| -> u32 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().nth(1))
                .unwrap()
                .parse()
                .unwrap()
        };
        PeerCredentials {
            pid: Some(std::process::id() as i32),
            uid: field("Uid:"),
            gid: field("Gid:"),
        }
    }

    /// A proc tree holding only this process's `stat` and `status` (so its
    /// executable link is unreadable, as for another user's process seen by
    /// a non-root agent): the tree and this process's directory in it.
    fn fake_proc() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let pid = std::process::id().to_string();
        let own = std::path::Path::new("/proc").join(&pid);
        let fake = dir.path().join(&pid);
        std::fs::create_dir(&fake).unwrap();
        for f in ["stat", "status"] {
            std::fs::copy(own.join(f), fake.join(f)).unwrap();
        }
        (dir, fake)
    }

    #[test]
    fn attests_this_process() {
        let peer = me();
        let sels = UnixAttestor {
            sha256: true,
            sha256_max_bytes: u64::MAX,
            ..UnixAttestor::default()
        }
        .attest(peer)
        .unwrap();
        let has = |s: &str| sels.iter().any(|x| x.as_str() == s);
        assert!(has(&format!("unix:uid:{}", peer.uid)), "{sels:?}");
        assert!(has(&format!("unix:gid:{}", peer.gid)));
        let exe = std::env::current_exe().unwrap();
        assert!(has(&format!("unix:path:{}", exe.display())), "{sels:?}");
        assert!(
            sels.iter()
                .any(|s| s.value().starts_with("sha256:") && s.value().len() == 7 + 64)
        );
    }

    #[test]
    fn refuses_wrong_uid_missing_pid_and_large_files() {
        let mut peer = me();
        peer.uid = peer.uid.wrapping_add(12345);
        assert!(matches!(
            UnixAttestor::default().attest(peer),
            Err(AttestError::PidReused { .. })
        ));
        let mut peer = me();
        peer.pid = None;
        assert!(matches!(
            UnixAttestor::default().attest(peer),
            Err(AttestError::NoPid)
        ));
        let limited = UnixAttestor {
            sha256: true,
            sha256_max_bytes: 10,
            ..UnixAttestor::default()
        };
        assert!(matches!(
            limited.attest(me()),
            Err(AttestError::TooLargeToHash { .. })
        ));
        let mut gone = me();
        gone.pid = Some(i32::MAX - 1);
        assert!(matches!(
            UnixAttestor::default().attest(gone),
            Err(AttestError::Proc { .. })
        ));
    }

    #[test]
    fn sha256_is_opt_in() {
        let sels = UnixAttestor::default().attest(me()).unwrap();
        assert!(!sels.iter().any(|s| s.value().starts_with("sha256:")));
    }

    #[test]
    fn path_and_sha256_are_best_effort_and_hashes_are_cached() {
        // A proc tree where the executable link is unreadable (as for another
        // user's process seen by a non-root agent).
        let (dir, _) = fake_proc();
        let peer = me();
        let a = UnixAttestor {
            sha256: true,
            proc_root: dir.path().to_path_buf(),
            ..UnixAttestor::default()
        };
        let sels = a.attest(peer).unwrap();
        assert!(
            sels.iter()
                .any(|s| s.as_str() == format!("unix:uid:{}", peer.uid))
        );
        assert!(
            !sels
                .iter()
                .any(|s| s.value().starts_with("path:") || s.value().starts_with("sha256:")),
            "{sels:?}"
        );

        let a = UnixAttestor {
            sha256_max_bytes: u64::MAX,
            ..UnixAttestor::with_sha256(true)
        };
        let first = a.attest(peer).unwrap();
        assert_eq!(a.digests.lock().unwrap().len(), 1);
        assert_eq!(
            a.attest(peer).unwrap(),
            first,
            "the cached digest is the same"
        );
        assert_eq!(a.digests.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_recent_attestation_is_reused_only_for_the_same_process() {
        let (_dir, fake, a) = reusing_attestor();
        let peer = me();
        let first = a.attest(peer).unwrap();
        // Reused: a changed status is not read again...
        let status = std::fs::read_to_string(fake.join("status")).unwrap();
        let other_uid = status.replace(
            &format!("Uid:\t{}\t{}", peer.uid, peer.uid),
            &format!("Uid:\t{}\t{}", peer.uid + 1, peer.uid + 1),
        );
        assert_ne!(other_uid, status, "the fake status names the uid");
        std::fs::write(fake.join("status"), &other_uid).unwrap();
        assert_eq!(a.attest(peer).unwrap(), first);
        // ...but a different peer UID or GID is never served from it.
        let mut stranger = peer;
        stranger.gid += 1;
        assert!(
            a.attest(stranger).is_err(),
            "uid in status differs: attested afresh"
        );
        // A PID reused by another process (new start time) is attested
        // afresh, and the guard still refuses what does not add up.
        bump_start_time(&fake);
        assert!(matches!(a.attest(peer), Err(AttestError::PidReused { .. })));
        std::fs::write(fake.join("status"), &status).unwrap();
        assert_eq!(a.attest(peer).unwrap(), first);
    }

    /// An attestor on a fake proc tree (see [`fake_proc`]) that reuses
    /// attestations long enough that a slow machine never lets one lapse
    /// mid-test: the tree, this process's directory in it, the attestor.
    fn reusing_attestor() -> (tempfile::TempDir, std::path::PathBuf, UnixAttestor) {
        let (dir, fake) = fake_proc();
        let a = UnixAttestor {
            proc_root: dir.path().to_path_buf(),
            reuse_for: std::time::Duration::from_secs(3600),
            ..UnixAttestor::default()
        };
        (dir, fake, a)
    }

    /// Moves the fake process's start time (field 22 of its `stat`) by one.
    fn bump_start_time(fake: &std::path::Path) {
        let stat = std::fs::read_to_string(fake.join("stat")).unwrap();
        let (head, tail) = stat.rsplit_once(')').unwrap();
        let mut fields: Vec<String> = tail.split_whitespace().map(str::to_string).collect();
        fields[19] = (fields[19].parse::<u64>().unwrap() + 1).to_string();
        std::fs::write(fake.join("stat"), format!("{head}) {}", fields.join(" "))).unwrap();
    }

    #[test]
    fn a_connection_keeps_its_attestation_until_an_exec_and_refuses_a_reused_pid() {
        let (_dir, fake, a) = reusing_attestor();
        let peer = me();
        let conn = ConnectionAttestation::default();
        let first = a.attest_connection(&conn, peer).unwrap();
        // Later calls on the connection read no /proc/<pid>/stat...
        let stat = std::fs::read_to_string(fake.join("stat")).unwrap();
        std::fs::remove_file(fake.join("stat")).unwrap();
        assert_eq!(a.attest_connection(&conn, peer).unwrap(), first);
        assert!(
            a.attest(peer).is_err(),
            "a call outside the connection reads it"
        );
        // ...but an exec (another executable) attests again.
        std::fs::write(fake.join("stat"), &stat).unwrap();
        std::os::unix::fs::symlink("/opt/first", fake.join("exe")).unwrap();
        let after_exec = a.attest_connection(&conn, peer).unwrap();
        assert!(
            after_exec
                .iter()
                .any(|s| s.as_str() == "unix:path:/opt/first"),
            "{after_exec:?}"
        );
        // Another process on the same PID (new start time) is refused on this
        // connection, though it attests on a connection of its own.
        bump_start_time(&fake);
        std::fs::remove_file(fake.join("exe")).unwrap();
        std::os::unix::fs::symlink("/opt/second", fake.join("exe")).unwrap();
        assert!(matches!(
            a.attest_connection(&conn, peer),
            Err(AttestError::PidReused { .. })
        ));
        let own = a
            .attest_connection(&ConnectionAttestation::default(), peer)
            .unwrap();
        assert!(own.iter().any(|s| s.as_str() == "unix:path:/opt/second"));
        // Past the reuse window the start time is read again, executable unchanged or not.
        let b = UnixAttestor {
            reuse_for: std::time::Duration::ZERO,
            ..a.clone()
        };
        let conn = ConnectionAttestation::default();
        b.attest_connection(&conn, peer).unwrap();
        bump_start_time(&fake);
        assert!(matches!(
            b.attest_connection(&conn, peer),
            Err(AttestError::PidReused { .. })
        ));
    }
}
