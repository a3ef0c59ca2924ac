//! File safety: keys written whole and private whatever was at the path,
//! private directories, and socket directories nobody else can tamper with.

use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;

/// Writes `data` to `path` atomically with exactly `mode`: a fresh, uniquely
/// named temp file in the same directory (created 0600), fsynced, chmodded
/// through its descriptor, then renamed over `path`. Whatever file or mode
/// was at `path` before, a reader sees the old content or the new, never a
/// half-written key or a loose mode.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    write_atomic_with(path, mode, |w| w.write_all(data))
}

/// [`write_atomic`] with the content written by `fill` through a buffer.
pub fn write_atomic_with(
    path: &Path,
    mode: u32,
    fill: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".sigil-")
        .suffix(".tmp")
        .permissions(std::fs::Permissions::from_mode(0o600))
        .tempfile_in(dir)?;
    {
        let mut w = io::BufWriter::new(tmp.as_file_mut());
        fill(&mut w)?;
        w.flush()?;
    }
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Creates `dir` (and missing parents) 0700; an existing `dir` owned by this
/// user is tightened to 0700.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = std::fs::metadata(dir)?;
    if meta.uid() == rustix::process::geteuid().as_raw() && meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Creates the directory of a socket with `mode` if missing, then checks it
/// is safe: a directory, owned by this user, writable by no one else (or
/// another user could replace the socket under clients' feet).
pub fn socket_dir(dir: &Path, mode: u32) -> Result<(), String> {
    // Create missing ancestors one by one with `mode` set explicitly (the
    // process umask would otherwise narrow it, and a 0700 parent would lock
    // workloads of other users out of a world-connectable socket).
    let missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
    for d in missing.into_iter().rev() {
        std::fs::create_dir(d)
            .and_then(|()| std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode)))
            .map_err(|e| format!("cannot create {}: {e}", d.display()))?;
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if !meta.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(format!(
            "{} is owned by uid {}, not by this process (uid {me}); refusing to put a socket there",
            dir.display(),
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "{} is writable by group or others (mode {:o}); refusing to put a socket there",
            dir.display(),
            meta.mode() & 0o777
        ));
    }
    Ok(())
}

/// Makes every file this process creates private from here on (umask 0077):
/// the store, keys and sockets start 0600/0700 and are opened up explicitly
/// where intended (the workload socket).
pub fn private_umask() {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn keys_end_up_private_whatever_was_there() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("svid.key");
        std::fs::write(&key, "old").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        // A leftover world-readable temp file of the old naming scheme.
        std::fs::write(dir.path().join("svid.tmp"), "x").unwrap();
        write_atomic(&key, b"secret", 0o600).unwrap();
        assert_eq!(std::fs::read(&key).unwrap(), b"secret");
        assert_eq!(std::fs::metadata(&key).unwrap().mode() & 0o777, 0o600);
        write_atomic(&dir.path().join("svid.pem"), b"cert", 0o644).unwrap();
        assert_eq!(
            std::fs::metadata(dir.path().join("svid.pem"))
                .unwrap()
                .mode()
                & 0o777,
            0o644
        );
        // No temp file left behind.
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!names.iter().any(|n| n.starts_with(".sigil-")), "{names:?}");
    }

    #[test]
    fn data_dirs_are_0700_and_socket_dirs_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("a/b");
        private_dir(&data).unwrap();
        assert_eq!(std::fs::metadata(&data).unwrap().mode() & 0o777, 0o700);
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&data).unwrap();
        assert_eq!(std::fs::metadata(&data).unwrap().mode() & 0o777, 0o700);

        let sock_dir = dir.path().join("agent/public");
        private_umask();
        socket_dir(&sock_dir, 0o755).unwrap();
        for d in [dir.path().join("agent"), sock_dir.clone()] {
            assert_eq!(
                std::fs::metadata(&d).unwrap().mode() & 0o777,
                0o755,
                "{d:?}"
            );
        }
        std::fs::set_permissions(&sock_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = socket_dir(&sock_dir, 0o755).unwrap_err();
        assert!(e.contains("writable by group or others"), "{e}");
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        assert!(
            socket_dir(&file, 0o755)
                .unwrap_err()
                .contains("not a directory")
        );
        // Owned by someone else (root's /): refused.
        if rustix::process::geteuid().as_raw() != 0 {
            assert!(
                socket_dir(Path::new("/"), 0o755)
                    .unwrap_err()
                    .contains("owned by uid")
            );
        }
    }
}
