//! The migration wire protocol: a stream of frames.
//!
//! ```text
//! frame   = magic "FMIG" | kind u8 | 3 reserved bytes | len u32 LE | payload | crc32 u32 LE
//! ```
//! The CRC covers kind, length and payload. A receiver treats every byte as
//! hostile: it refuses unknown kinds, lengths over `MAX_PAYLOAD` (before
//! allocating) and bad checksums, and the destination refuses any memory
//! range outside the guest.
//!
//! Frames travel inside the encrypted, authenticated session of `secure`
//! (the CRC then only catches our own bugs; a tampered byte fails the
//! session's AEAD first).
//!
//! A migration, in order (source → destination unless marked ←):
//! `Hello` (what the preflight checks: memory, devices, the guest's CPUID
//! and TSC; not the config, which travels once, inside `State`)
//! ← `HelloAck`|`Refuse`, then `MemZero`/`MemData` frames, `State` (the
//! encoded VM state with its machine config and run state),
//! ← `Ready` (restored, paused), `Commit` (the source will never run the VM
//! again), ← `Resumed`. Either side may send `Abort` before `Commit`.
//!
//! Before it pauses the guest, a live source sends `CatchUp` and waits for
//! ← `CatchUp`: the destination answers once it has applied every frame
//! before it, so the downtime never includes draining what was still in
//! the socket buffers (up to some 10 MiB, tens of ms at round-0 speed).
//! Only to a destination that offered it in `HelloAck`'s extension.
//!
//! Same host (`unix:`), memory by descriptor: the source offers its guest
//! memory's memfd in `Hello`'s extension ([`HelloExt`]), the destination
//! takes the offer in `HelloAck`'s ([`AckExt`]), the source passes the fd
//! (SCM_RIGHTS, one byte outside the records), ← `MemFd` says whether it
//! arrived, was the file named in the sealed `Hello` and is mapped; then
//! no memory frames at all, only `State` and the rest. If `MemFd` says no,
//! memory is copied as usual. Extensions are appended after the version-2
//! body: an older peer's decoder ignores trailing bytes, and a body without
//! them means nothing was offered, so old and new peers fall back to copying.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

pub const MAGIC: &[u8; 4] = b"FMIG";
/// Bumped on any incompatible change; peers must match exactly.
/// 2: `Hello` carries requirements instead of the config; the state
/// carries the run state.
pub const PROTOCOL_VERSION: u32 = 2;
/// Memory travels in frames of at most this much data.
pub const MEM_CHUNK: usize = 1 << 20;
/// Largest payload: a state blob or a memory chunk with its offset, with
/// room to spare (refused before allocating).
pub const MAX_PAYLOAD: u32 = 4 << 20;
const HEADER_LEN: usize = 12;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    HelloAck = 2,
    Refuse = 3,
    MemZero = 4,
    MemData = 5,
    State = 6,
    Ready = 7,
    Commit = 8,
    Resumed = 9,
    Abort = 10,
    MemFd = 11,
    CatchUp = 12,
    /// First frame on an extra memory stream: which session it joins.
    Join = 13,
    /// Last frame on an extra memory stream: nothing more comes on it.
    End = 14,
    /// Nothing to apply: a memory stream whose share of a round is done
    /// while others still send, so the receiver's read timeout holds.
    KeepAlive = 15,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        use Kind::*;
        const ALL: [Kind; 15] = [
            Hello, HelloAck, Refuse, MemZero, MemData, State, Ready, Commit, Resumed, Abort, MemFd, CatchUp, Join, End,
            KeepAlive,
        ];
        ALL.into_iter().find(|k| *k as u8 == v)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("peer closed the connection")]
    Closed,
    #[error("malformed stream: bad frame magic (not a Ferry migration peer?)")]
    BadMagic,
    #[error("malformed stream: unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("malformed stream: frame of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLarge(u32),
    #[error("malformed stream: frame checksum mismatch")]
    Checksum,
    #[error("malformed stream: {0}")]
    Payload(String),
    #[error("protocol: expected {expected}, got {got:?}")]
    Unexpected { expected: &'static str, got: Kind },
}

/// One received frame.
#[derive(Debug)]
pub struct Frame {
    pub kind: Kind,
    pub payload: Vec<u8>,
}

pub fn write_frame(w: &mut impl Write, kind: Kind, payload: &[u8]) -> Result<(), Error> {
    write_frame_parts(w, kind, &[payload])
}

/// Writes a frame whose payload is `parts` back to back, without joining
/// them first (a memory chunk goes out with its offset, uncopied).
pub fn write_frame_parts(w: &mut impl Write, kind: Kind, parts: &[&[u8]]) -> Result<(), Error> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let len = u32::try_from(total)
        .ok()
        .filter(|l| *l <= MAX_PAYLOAD)
        .ok_or(Error::TooLarge(total.min(u32::MAX as usize) as u32))?;
    let mut header = [0u8; HEADER_LEN];
    header[..4].copy_from_slice(MAGIC);
    header[4] = kind as u8;
    header[8..12].copy_from_slice(&len.to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header[4..12]);
    w.write_all(&header)?;
    for part in parts {
        crc.update(part);
        w.write_all(part)?;
    }
    w.write_all(&crc.finalize().to_le_bytes())?;
    Ok(())
}

/// Writes a `MemData` frame: `offset` then `bytes` (see [`mem_data_payload`]).
pub fn write_mem_data(w: &mut impl Write, offset: u64, bytes: &[u8]) -> Result<(), Error> {
    write_frame_parts(w, Kind::MemData, &[&offset.to_le_bytes(), bytes])
}

/// Writes a frame whose payload is a serde message.
pub fn send<T: Serialize>(w: &mut impl Write, kind: Kind, msg: &T) -> Result<(), Error> {
    let payload = postcard::to_stdvec(msg).map_err(|e| Error::Payload(e.to_string()))?;
    write_frame(w, kind, &payload)
}

pub fn read_frame(r: &mut impl Read) -> Result<Frame, Error> {
    let mut payload = Vec::new();
    let kind = read_frame_into(r, &mut payload)?;
    Ok(Frame { kind, payload })
}

/// Reads one frame into `payload` (reused across frames: a destination
/// taking gigabytes of memory allocates its buffer once).
pub fn read_frame_into(r: &mut impl Read, payload: &mut Vec<u8>) -> Result<Kind, Error> {
    let mut header = [0u8; HEADER_LEN];
    if let Err(e) = r.read_exact(&mut header) {
        return Err(if e.kind() == std::io::ErrorKind::UnexpectedEof { Error::Closed } else { Error::Io(e) });
    }
    if &header[..4] != MAGIC {
        return Err(Error::BadMagic);
    }
    let kind = Kind::from_u8(header[4]).ok_or(Error::UnknownKind(header[4]))?;
    let len = u32::from_le_bytes(header[8..12].try_into().unwrap());
    if len > MAX_PAYLOAD {
        return Err(Error::TooLarge(len));
    }
    // Sized only after the length was checked against the limit.
    payload.resize(len as usize, 0);
    let mut crc_bytes = [0u8; 4];
    r.read_exact(payload).and_then(|_| r.read_exact(&mut crc_bytes)).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::Closed
        } else {
            Error::Io(e)
        }
    })?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header[4..12]);
    crc.update(payload);
    if crc.finalize() != u32::from_le_bytes(crc_bytes) {
        return Err(Error::Checksum);
    }
    Ok(kind)
}

/// A frame whose payload lives in a reused buffer.
pub struct FrameRef<'a> {
    pub kind: Kind,
    pub payload: &'a [u8],
}

impl FrameRef<'_> {
    pub fn decode<'b, T: Deserialize<'b>>(&'b self) -> Result<T, Error> {
        postcard::from_bytes(self.payload).map_err(|e| Error::Payload(format!("{:?} frame: {e}", self.kind)))
    }
}

impl Frame {
    pub fn decode<'a, T: Deserialize<'a>>(&'a self) -> Result<T, Error> {
        postcard::from_bytes(&self.payload).map_err(|e| Error::Payload(format!("{:?} frame: {e}", self.kind)))
    }

    pub fn expect(self, kind: Kind, name: &'static str) -> Result<Frame, Error> {
        if self.kind == kind {
            Ok(self)
        } else {
            Err(Error::Unexpected { expected: name, got: self.kind })
        }
    }
}

/// What a migration is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Quick,
    Live,
}

/// The source's opening message.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u32,
    pub mode: Mode,
    /// What the destination must offer (the preflight's input).
    pub requirements: Requirements,
    /// Only run the preflight; no memory follows.
    pub check_only: bool,
    /// The source resumes the VM if its switchover takes longer: the
    /// destination waits for the commit at least this long after `Ready`.
    pub switchover_timeout_ms: u64,
}

pub use vmm::migration::Requirements;

/// The destination's `HelloAck`: who it is, so the source can hand shared
/// disks' leases to it at commit.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Ack {
    pub host_id: String,
}

/// What follows `Hello`'s version-2 body (see the module notes).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloExt {
    /// The source will pass its guest memory's memfd, this one.
    pub shared_memory: Option<MemFdId>,
    /// Memory streams the source would use (0 from an older peer: one).
    pub streams: u8,
}

/// Which file a passed descriptor must be: the source's memfd as fstat
/// names it. Sealed inside `Hello`, it authenticates the descriptor that
/// comes outside the records: an inode number of a live memfd on this
/// kernel cannot be produced by anyone who was not handed that file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemFdId {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
}

impl MemFdId {
    pub fn of(file: &std::fs::File) -> std::io::Result<MemFdId> {
        use std::os::unix::fs::MetadataExt;
        let m = file.metadata()?;
        Ok(MemFdId { dev: m.dev(), ino: m.ino(), size: m.len() })
    }
}

/// What follows `HelloAck`'s body.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckExt {
    /// Pass the memfd: this destination maps it instead of receiving pages.
    pub shared_memory: bool,
    /// This destination answers `CatchUp` (see the module docs).
    pub catch_up: bool,
    /// Memory streams agreed (at most what the source asked; 0 or 1: the
    /// control stream alone). Extra ones join with `session`.
    pub streams: u8,
    /// Names this migration to its extra streams (random per attempt;
    /// they present it inside their own authenticated sessions).
    pub session: [u8; 16],
}

/// `Join` payload: the session an extra memory stream belongs to, and its
/// place (1.. ; the control stream is 0).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Join {
    pub session: [u8; 16],
    pub index: u8,
}

/// Guest memory is split between streams in stripes of this many bytes:
/// stripe `k` always travels on stream `k % streams`, so every version of
/// a page takes the same stream and arrives in the order it was sent.
pub const STRIPE: u64 = 1 << 20;

/// The stream that carries the page at `offset`.
pub fn stream_of(offset: u64, streams: usize) -> usize {
    ((offset / STRIPE) % streams.max(1) as u64) as usize
}

/// `MemFd` payload: whether the destination took the passed memory.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MemFdVerdict {
    pub mapped: bool,
    /// Why not (then memory is copied).
    pub reason: String,
}

/// Writes a frame whose payload is `msg` then `ext` (an extension an older
/// peer ignores).
pub fn send_with_ext<T: Serialize, E: Serialize>(
    w: &mut impl Write,
    kind: Kind,
    msg: &T,
    ext: &E,
) -> Result<(), Error> {
    let mut payload = postcard::to_stdvec(msg).map_err(|e| Error::Payload(e.to_string()))?;
    payload.extend(postcard::to_stdvec(ext).map_err(|e| Error::Payload(e.to_string()))?);
    write_frame(w, kind, &payload)
}

/// Decodes `msg` and the extension after it (the default if the peer sent
/// none: an older Ferry).
pub fn decode_with_ext<'a, T: Deserialize<'a>, E: serde::de::DeserializeOwned + Default>(
    kind: Kind,
    payload: &'a [u8],
) -> Result<(T, E), Error> {
    let bad = |e: postcard::Error| Error::Payload(format!("{kind:?} frame: {e}"));
    let (msg, rest) = postcard::take_from_bytes(payload).map_err(bad)?;
    let ext = if rest.is_empty() {
        E::default()
    } else {
        // Fields added at the end of an extension after a peer was built
        // are missing from its frames: padded with zeros, they read as
        // false, None or 0 (postcard ignores what is left over). That holds
        // for up to EXT_PAD bytes of new fields; past that, an older peer's
        // extension fails to decode, so grow extensions by small fields.
        let mut padded = rest.to_vec();
        padded.extend_from_slice(&[0u8; EXT_PAD]);
        postcard::from_bytes(&padded).map_err(bad)?
    };
    Ok((msg, ext))
}

/// Zeros appended to a received extension (see [`decode_with_ext`]).
const EXT_PAD: usize = 64;

/// A reason, for `Refuse` and `Abort`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Reason {
    pub reason: String,
}

/// `MemZero` payload: a page-aligned range of the memory file that is zero.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct ZeroRange {
    pub offset: u64,
    pub len: u64,
}

/// `MemData` payload: offset (u64 LE) then the bytes.
pub fn mem_data_payload(offset: u64, bytes: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(8 + bytes.len());
    p.extend_from_slice(&offset.to_le_bytes());
    p.extend_from_slice(bytes);
    p
}

pub fn parse_mem_data(payload: &[u8]) -> Result<(u64, &[u8]), Error> {
    if payload.len() < 8 {
        return Err(Error::Payload("MemData frame shorter than its offset".into()));
    }
    Ok((u64::from_le_bytes(payload[..8].try_into().unwrap()), &payload[8..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extensions_are_ignored_by_old_peers_and_absent_from_old_ones() {
        let ack = Ack { host_id: "b".into() };
        let ext = AckExt { shared_memory: true, catch_up: true, streams: 2, session: [7; 16] };
        let mut buf = Vec::new();
        send_with_ext(&mut buf, Kind::HelloAck, &ack, &ext).unwrap();
        let f = read_frame(&mut &buf[..]).unwrap();
        // An older peer decodes only the body.
        assert_eq!(f.decode::<Ack>().unwrap().host_id, "b");
        let (a, e): (Ack, AckExt) = decode_with_ext(f.kind, &f.payload).unwrap();
        assert_eq!((a.host_id.as_str(), e), ("b", ext));
        // An older peer's frame: no extension, nothing offered.
        let mut buf = Vec::new();
        send(&mut buf, Kind::HelloAck, &ack).unwrap();
        let f = read_frame(&mut &buf[..]).unwrap();
        let (_, e): (Ack, AckExt) = decode_with_ext(f.kind, &f.payload).unwrap();
        assert_eq!(e, AckExt::default());
        // A peer built before `catch_up` existed: its extension is shorter,
        // and the field it lacks reads as false.
        #[derive(Serialize)]
        struct AckExtBeforeCatchUp {
            shared_memory: bool,
        }
        let mut buf = Vec::new();
        send_with_ext(&mut buf, Kind::HelloAck, &ack, &AckExtBeforeCatchUp { shared_memory: true }).unwrap();
        let f = read_frame(&mut &buf[..]).unwrap();
        let (_, e): (Ack, AckExt) = decode_with_ext(f.kind, &f.payload).unwrap();
        assert_eq!(e, AckExt { shared_memory: true, ..AckExt::default() });
    }

    #[test]
    fn frames_round_trip_and_damage_is_named() {
        let mut buf = Vec::new();
        send(&mut buf, Kind::Refuse, &Reason { reason: "no".into() }).unwrap();
        write_mem_data(&mut buf, 4096, &[1, 2, 3]).unwrap();
        let mut r = &buf[..];
        let f = read_frame(&mut r).unwrap();
        assert_eq!(f.kind, Kind::Refuse);
        assert_eq!(f.decode::<Reason>().unwrap().reason, "no");
        let f = read_frame(&mut r).unwrap();
        assert_eq!(parse_mem_data(&f.payload).unwrap(), (4096, &[1u8, 2, 3][..]));
        assert!(matches!(read_frame(&mut r), Err(Error::Closed)));

        let mut bad = buf.clone();
        bad[14] ^= 1;
        assert!(matches!(read_frame(&mut &bad[..]), Err(Error::Checksum)));
        let mut bad = buf.clone();
        bad[0] = b'X';
        assert!(matches!(read_frame(&mut &bad[..]), Err(Error::BadMagic)));
        let mut bad = buf.clone();
        bad[4] = 99;
        assert!(matches!(read_frame(&mut &bad[..]), Err(Error::UnknownKind(99))));
        let mut bad = buf.clone();
        bad[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(read_frame(&mut &bad[..]), Err(Error::TooLarge(_))), "no allocation sized by the peer");
        assert!(matches!(read_frame(&mut &buf[..7]), Err(Error::Closed)));
    }
}
