//! Mutual challenge-response on the cluster's pre-shared key, before any
//! other byte of a migration: each side proves it holds the key with an
//! HMAC-SHA256 over both sides' fresh nonces. A peer without the key learns
//! nothing and touches nothing. (Encryption is not provided; run migration
//! networks you trust.)

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::wire::{self, Kind};

pub const DEFAULT_KEY_FILE: &str = "/etc/ferry/cluster.key";
const MIN_KEY_BYTES: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the cluster key {path}: {source} (create one with `ferry keygen --out {path}` and copy it to every host)")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cluster key {0} is shorter than {MIN_KEY_BYTES} bytes")]
    Short(PathBuf),
    #[error("authentication failed: the peer does not hold this cluster's key")]
    Failed,
    #[error(transparent)]
    Wire(#[from] wire::Error),
}

/// The cluster's pre-shared key.
#[derive(Clone)]
pub struct Key(Vec<u8>);

impl Key {
    /// Reads a key file: hex (as `ferry keygen` writes) or raw bytes.
    pub fn load(path: &Path) -> Result<Key, Error> {
        let raw = std::fs::read(path).map_err(|source| Error::Read { path: path.to_owned(), source })?;
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

    fn mac(&self, label: &[u8], a: &[u8; 32], b: &[u8; 32]) -> Hmac<Sha256> {
        let mut m = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(label);
        m.update(a);
        m.update(b);
        m
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

#[derive(Serialize, Deserialize)]
struct Challenge {
    nonce: [u8; 32],
}

#[derive(Serialize, Deserialize)]
struct Response {
    nonce: [u8; 32],
    mac: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct Proof {
    mac: Vec<u8>,
}

/// Destination side: challenge the source, check its answer, prove itself.
pub fn accept(stream: &mut (impl Read + Write), key: &Key) -> Result<(), Error> {
    let nonce_d = random_bytes().map_err(wire::Error::Io)?;
    wire::send(stream, Kind::AuthChallenge, &Challenge { nonce: nonce_d })?;
    let r: Response = wire::read_frame(stream)?.expect(Kind::AuthResponse, "AuthResponse")?.decode()?;
    if key.mac(b"ferry-migrate-source", &nonce_d, &r.nonce).verify_slice(&r.mac).is_err() {
        let _ = wire::send(stream, Kind::Refuse, &wire::Reason { reason: "authentication failed".into() });
        return Err(Error::Failed);
    }
    let mac = key.mac(b"ferry-migrate-destination", &r.nonce, &nonce_d).finalize().into_bytes().to_vec();
    wire::send(stream, Kind::AuthProof, &Proof { mac })?;
    Ok(())
}

/// Source side: answer the challenge, check the destination's proof.
pub fn connect(stream: &mut (impl Read + Write), key: &Key) -> Result<(), Error> {
    let c: Challenge = wire::read_frame(stream)?.expect(Kind::AuthChallenge, "AuthChallenge")?.decode()?;
    let nonce_s = random_bytes().map_err(wire::Error::Io)?;
    let mac = key.mac(b"ferry-migrate-source", &c.nonce, &nonce_s).finalize().into_bytes().to_vec();
    wire::send(stream, Kind::AuthResponse, &Response { nonce: nonce_s, mac })?;
    stream.flush().map_err(wire::Error::Io)?;
    let reply = wire::read_frame(stream)?;
    if reply.kind == Kind::Refuse {
        return Err(Error::Failed);
    }
    let p: Proof = reply.expect(Kind::AuthProof, "AuthProof")?.decode()?;
    if key.mac(b"ferry-migrate-destination", &nonce_s, &c.nonce).verify_slice(&p.mac).is_err() {
        return Err(Error::Failed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn run(src_key: &[u8], dst_key: &[u8]) -> (Result<(), Error>, Result<(), Error>) {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let (ks, kd) = (Key(src_key.to_vec()), Key(dst_key.to_vec()));
        let t = std::thread::spawn(move || accept(&mut b, &kd));
        let src = connect(&mut a, &ks);
        drop(a);
        (src, t.join().unwrap())
    }

    #[test]
    fn same_key_passes_and_a_wrong_key_fails_both_ways() {
        let (s, d) = run(&[7; 32], &[7; 32]);
        assert!(s.is_ok() && d.is_ok());
        let (s, d) = run(&[7; 32], &[8; 32]);
        assert!(matches!(s, Err(Error::Failed)));
        assert!(matches!(d, Err(Error::Failed)));
    }
}
