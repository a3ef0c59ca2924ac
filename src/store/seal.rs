//! Sealing with AES-256-GCM under a key-encryption key (KEK) from a file.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use super::StoreError;

const KEK_LEN: usize = 32;
const SEAL_VERSION: u8 = 1;

/// A key-encryption key. `Debug` shows only where it came from.
pub struct Kek {
    key: LessSafeKey,
    source: String,
}

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kek")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

fn random<const N: usize>() -> Result<[u8; N], StoreError> {
    let mut out = [0u8; N];
    SystemRandom::new()
        .fill(&mut out)
        .map_err(|_| StoreError::Crypto("random number generator failed".into()))?;
    Ok(out)
}

impl Kek {
    /// Reads the KEK from `path`, creating it (mode 0600) with fresh random
    /// bytes if the file does not exist.
    pub fn load_or_create(path: &Path) -> Result<Self, StoreError> {
        let err = |reason: String| StoreError::Kek {
            path: path.to_path_buf(),
            reason,
        };
        let bytes = match std::fs::read(path) {
            Ok(b) => Zeroizing::new(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Self::create(path).map_err(|e| err(format!("cannot create: {e}")))?
            }
            Err(e) => return Err(err(format!("cannot read: {e}"))),
        };
        refuse_if_readable_by_others(path).map_err(err)?;
        if bytes.len() != KEK_LEN {
            return Err(err(format!(
                "must hold exactly {KEK_LEN} bytes, found {}",
                bytes.len()
            )));
        }
        Self::from_bytes(&bytes, path.display().to_string())
    }

    fn create(path: &Path) -> std::io::Result<Zeroizing<Vec<u8>>> {
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            crate::runtime::files::private_dir(dir)?;
        }
        let bytes = Zeroizing::new(
            random::<KEK_LEN>()
                .map_err(|e| std::io::Error::other(e.to_string()))?
                .to_vec(),
        );
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        Ok(bytes)
    }

    /// A KEK from raw bytes (in-memory stores, tests).
    pub fn from_bytes(bytes: &[u8], source: String) -> Result<Self, StoreError> {
        let unbound = UnboundKey::new(&AES_256_GCM, bytes)
            .map_err(|_| StoreError::Crypto(format!("KEK from {source} is not {KEK_LEN} bytes")))?;
        Ok(Kek {
            key: LessSafeKey::new(unbound),
            source,
        })
    }

    /// A fresh random KEK that lives only in memory.
    pub fn ephemeral() -> Result<Self, StoreError> {
        let bytes = Zeroizing::new(random::<KEK_LEN>()?);
        Self::from_bytes(bytes.as_slice(), "memory".into())
    }

    /// Where the KEK was read from, for error messages.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Encrypts `plaintext`, binding it to `context` (authenticated, not encrypted).
    pub fn seal(&self, context: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, StoreError> {
        let nonce_bytes = random::<NONCE_LEN>()?;
        let mut buf = plaintext.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce_bytes),
                Aad::from(context),
                &mut buf,
            )
            .map_err(|_| StoreError::Crypto("AES-GCM seal failed".into()))?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + buf.len());
        out.push(SEAL_VERSION);
        out.extend_from_slice(&nonce_bytes);
        out.extend_from_slice(&buf);
        Ok(out)
    }

    /// Decrypts what [`Kek::seal`] produced with the same `context`. A wrong
    /// KEK, a wrong context or any tampering gives [`StoreError::Unseal`].
    pub fn open(&self, context: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, StoreError> {
        let unseal = || StoreError::Unseal {
            context: String::from_utf8_lossy(context).into_owned(),
            kek: self.source.clone(),
        };
        let [version, rest @ ..] = sealed else {
            return Err(unseal());
        };
        if *version != SEAL_VERSION || rest.len() < NONCE_LEN {
            return Err(unseal());
        }
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| unseal())?;
        let mut buf = Zeroizing::new(ciphertext.to_vec());
        let len = self
            .key
            .open_in_place(nonce, Aad::from(context), &mut buf)
            .map_err(|_| unseal())?
            .len();
        buf.truncate(len);
        Ok(buf)
    }
}

/// A KEK anyone else can read unseals every CA key: refuse it.
fn refuse_if_readable_by_others(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot stat: {e}"))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "is readable or writable by group or others (mode {mode:o}); run `chmod 600 {}`",
            path.display()
        ));
    }
    Ok(())
}

/// The default KEK location inside a data directory.
pub fn default_kek_path(data_dir: &Path) -> PathBuf {
    data_dir.join("kek")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn seal_open_round_trip_and_tamper() {
        let kek = Kek::ephemeral().unwrap();
        let sealed = kek.seal(b"ctx", b"secret").unwrap();
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(kek.open(b"ctx", &sealed).unwrap().as_slice(), b"secret");
        assert!(matches!(
            kek.open(b"other", &sealed),
            Err(StoreError::Unseal { .. })
        ));
        let mut bad = sealed.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(matches!(
            kek.open(b"ctx", &bad),
            Err(StoreError::Unseal { .. })
        ));
        let other = Kek::ephemeral().unwrap();
        assert!(matches!(
            other.open(b"ctx", &sealed),
            Err(StoreError::Unseal { .. })
        ));
        assert!(matches!(
            kek.open(b"ctx", &[]),
            Err(StoreError::Unseal { .. })
        ));
    }

    #[test]
    fn kek_file_is_created_0600_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/kek");
        let a = Kek::load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = Kek::load_or_create(&path).unwrap();
        let sealed = a.seal(b"c", b"x").unwrap();
        assert_eq!(b.open(b"c", &sealed).unwrap().as_slice(), b"x");
    }

    #[test]
    fn kek_file_of_wrong_size_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek");
        std::fs::write(&path, b"short").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = Kek::load_or_create(&path).unwrap_err().to_string();
        assert!(err.contains("exactly 32 bytes"), "{err}");
        assert!(err.contains(&path.display().to_string()), "{err}");
    }

    #[test]
    fn a_kek_readable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek");
        Kek::load_or_create(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = Kek::load_or_create(&path).unwrap_err().to_string();
        assert!(
            err.contains("mode 640") && err.contains("chmod 600"),
            "{err}"
        );
    }
}
