//! A throwaway PostgreSQL server for tests and benchmarks: `initdb` into a
//! temp dir, served on a loopback port, run as an unprivileged user (the
//! `postgres` account when the caller is root, which PostgreSQL refuses to
//! run as). Needs PostgreSQL's server binaries (Debian: `postgresql`).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A PostgreSQL server of its own, stopped and deleted when dropped.
#[derive(Debug)]
pub struct TempPostgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    run_as: Option<(u32, u32)>,
    child: Option<Child>,
    fsync: bool,
    tls: bool,
}

/// Where PostgreSQL's server binaries are: `SIGIL_PG_BIN`, else the newest
/// `/usr/lib/postgresql/*/bin`, else wherever `initdb` is on the `PATH`.
fn find_bin() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("SIGIL_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .find(|d| d.join("initdb").exists())
        .ok_or_else(|| {
            "PostgreSQL's server binaries (initdb, postgres) were not found: install Debian's \
             `postgresql` package (`bash .ci/run` does) or set SIGIL_PG_BIN; \
             SIGIL_SKIP_POSTGRES=1 skips the tests that need it"
                .to_string()
        })
}

/// The `postgres` account's UID and GID, from /etc/passwd.
fn postgres_account() -> Result<(u32, u32), String> {
    let passwd = std::fs::read_to_string("/etc/passwd").map_err(|e| e.to_string())?;
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.first() == Some(&"postgres") && f.len() > 3)
        .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
        .ok_or_else(|| {
            "running as root, and there is no `postgres` account to run PostgreSQL as".into()
        })
}

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

impl TempPostgres {
    /// Creates and starts a server; its superuser is `sigil`, trusted on
    /// loopback, with the database `postgres`. It does not fsync (tests).
    pub fn start() -> Result<Self, String> {
        Self::start_with(false)
    }

    /// As [`start`](Self::start), but flushing every commit to disk as a
    /// production server does (benchmarks).
    pub fn start_durable() -> Result<Self, String> {
        Self::start_with(true)
    }

    fn start_with(fsync: bool) -> Result<Self, String> {
        let bin = find_bin()?;
        let run_as = if rustix::process::geteuid().is_root() {
            Some(postgres_account()?)
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix("sigil-pg")
            .tempdir()
            .map_err(|e| e.to_string())?;
        if let Some((uid, gid)) = run_as {
            rustix::fs::chown(
                dir.path(),
                Some(rustix::fs::Uid::from_raw(uid)),
                Some(rustix::fs::Gid::from_raw(gid)),
            )
            .map_err(|e| format!("chown {}: {e}", dir.path().display()))?;
        }
        let mut pg = TempPostgres {
            bin,
            dir,
            port: free_port()?,
            run_as,
            child: None,
            fsync,
            tls: false,
        };
        let data = pg.data();
        let out = pg
            .command("initdb")
            .args([
                "-U",
                "sigil",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(&data)
            .output()
            .map_err(|e| format!("initdb: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        pg.resume()?;
        Ok(pg)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.run_as {
            c.uid(uid).gid(gid);
        }
        c.current_dir(self.dir.path());
        c
    }

    /// Restarts the server offering TLS with this certificate chain and key
    /// (PEM), beside plain connections.
    pub fn enable_tls(&mut self, chain_pem: &str, key_pem: &str) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt;
        self.stop()?;
        for (name, text) in [("server.crt", chain_pem), ("server.key", key_pem)] {
            let path = self.data().join(name);
            std::fs::write(&path, text).map_err(|e| format!("{name}: {e}"))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| format!("{name}: {e}"))?;
            if let Some((uid, gid)) = self.run_as {
                rustix::fs::chown(
                    &path,
                    Some(rustix::fs::Uid::from_raw(uid)),
                    Some(rustix::fs::Gid::from_raw(gid)),
                )
                .map_err(|e| format!("chown {name}: {e}"))?;
            }
        }
        self.tls = true;
        self.resume()
    }

    /// The loopback port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `db` for the `sigil` superuser.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://sigil@127.0.0.1:{}/{db}", self.port)
    }

    /// The directory it runs in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts the server again (after [`stop`](Self::stop)), on the same
    /// port, and waits until it accepts connections.
    pub fn resume(&mut self) -> Result<(), String> {
        let log = std::fs::File::create(self.dir.path().join("postgres.log"))
            .map_err(|e| e.to_string())?;
        if let Some((uid, gid)) = self.run_as {
            let _ = rustix::fs::chown(
                self.dir.path().join("postgres.log"),
                Some(rustix::fs::Uid::from_raw(uid)),
                Some(rustix::fs::Gid::from_raw(gid)),
            );
        }
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(self.data())
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!(
                "unix_socket_directories={}",
                self.dir.path().display()
            ))
            .args(["-c", if self.fsync { "fsync=on" } else { "fsync=off" }])
            .args(["-c", "max_connections=200"])
            .args(if self.tls {
                &[
                    "-c",
                    "ssl=on",
                    "-c",
                    "ssl_cert_file=server.crt",
                    "-c",
                    "ssl_key_file=server.key",
                ][..]
            } else {
                &[]
            })
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("postgres: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = self
                .command("pg_isready")
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q"])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    return Err(format!("postgres exited ({status}): {}", self.log()));
                }
            }
            if Instant::now() > deadline {
                return Err(format!("postgres did not start in 60 s: {}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// Stops the server (fast shutdown: open sessions are cut).
    pub fn stop(&mut self) -> Result<(), String> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let _ = self
            .command("pg_ctl")
            .args(["stop", "-m", "fast", "-w", "-D"])
            .arg(self.data())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = child.kill();
        child.wait().map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Runs SQL in database `db` with `psql`; returns what it printed
    /// (unaligned, tuples only).
    pub fn sql(&self, db: &str, sql: &str) -> Result<String, String> {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(self.url(db))
            .args(["-c", sql])
            .output()
            .map_err(|e| format!("psql: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = self
                .command("pg_ctl")
                .args(["stop", "-m", "immediate", "-D"])
                .arg(self.data())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
