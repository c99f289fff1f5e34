//! The cluster's pre-shared key: the one secret every host holds (made by
//! `ferry keygen`, copied to each host). The migration stream derives its
//! session keys from it (see `secure`): a peer without it learns nothing
//! and touches nothing.

use std::io::Read;
use std::path::{Path, PathBuf};

pub const DEFAULT_KEY_FILE: &str = "/etc/ferry/cluster.key";
const MIN_KEY_BYTES: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the cluster key {path}: {source} (create one with `ferry keygen --out {path}` and copy it to every host)")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cluster key {0} is shorter than {MIN_KEY_BYTES} bytes")]
    Short(PathBuf),
    #[error(
        "cluster key {path} is readable or writable by other users (mode {mode:04o}): anyone who reads it can \
         read and forge migrations. Run `chmod 600 {path}` (`ferry keygen` writes keys so)"
    )]
    Exposed { path: PathBuf, mode: u32 },
}

/// The cluster's pre-shared key.
#[derive(Clone)]
pub struct Key(Vec<u8>);

impl Key {
    /// Reads a key file: hex (as `ferry keygen` writes) or raw bytes.
    /// Refused if other users may read it or anyone but its owner may
    /// write it, as ssh refuses a private key.
    pub fn load(path: &Path) -> Result<Key, Error> {
        use std::io::Read;
        use std::os::unix::fs::PermissionsExt;
        let read_err = |source| Error::Read { path: path.to_owned(), source };
        // One open: the mode checked is the mode of the file read.
        let mut file = std::fs::File::open(path).map_err(read_err)?;
        let mode = file.metadata().map_err(read_err)?.permissions().mode() & 0o7777;
        if mode & 0o026 != 0 {
            return Err(Error::Exposed { path: path.to_owned(), mode });
        }
        let mut raw = Vec::new();
        file.read_to_end(&mut raw).map_err(read_err)?;
        let text = String::from_utf8_lossy(&raw);
        let trimmed = text.trim();
        let bytes =
            if !trimmed.is_empty() && trimmed.len().is_multiple_of(2) && trimmed.bytes().all(|b| b.is_ascii_hexdigit())
            {
                (0..trimmed.len()).step_by(2).map(|i| u8::from_str_radix(&trimmed[i..i + 2], 16).unwrap()).collect()
            } else {
                raw
            };
        if bytes.len() < MIN_KEY_BYTES {
            return Err(Error::Short(path.to_owned()));
        }
        Ok(Key(bytes))
    }

    /// The key's bytes, for deriving other keys (the secure channel's PSK).
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.0
    }

    #[cfg(test)]
    pub(crate) fn from_bytes(bytes: &[u8]) -> Key {
        Key(bytes.to_vec())
    }
}

/// 32 random bytes. Hand-written: /dev/urandom is all a nonce needs.
pub fn random_bytes() -> std::io::Result<[u8; 32]> {
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b)
}

/// A new key as hex, for `ferry keygen`.
pub fn new_key_hex() -> std::io::Result<String> {
    Ok(random_bytes()?.iter().map(|b| format!("{b:02x}")).collect())
}
