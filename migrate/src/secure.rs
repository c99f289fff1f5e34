//! The encrypted, authenticated migration channel.
//!
//! Every byte of a migration after the TCP or Unix connect travels inside a
//! Noise session (`snow`): pattern `NNpsk0` with X25519, AES-256-GCM (or
//! ChaCha20-Poly1305) and SHA-256, the cluster key as pre-shared key and a
//! prologue naming this protocol. Both sides contribute a fresh ephemeral
//! key, so the session keys are bound to the two real ends: a relay that
//! forwards the handshake learns nothing and cannot produce one valid byte
//! afterwards. A peer without the cluster key fails the first handshake
//! message (`Error::Auth`).
//!
//! ```text
//! handshake  -> u16 BE len | e, AEAD_psk("")            (initiator = source)
//!            <- u16 BE len | e, AEAD("")  or  u16 0     (0: "your key is wrong")
//! record     =  u16 BE len | AEAD(plaintext)            (len <= 65535, >= 16)
//! close      =  a record whose plaintext is empty
//! ```
//!
//! Each direction numbers its records with an implicit counter (the AEAD
//! nonce), so a record that is modified, injected, replayed, reordered or
//! dropped fails to open, and the stream is dead from then on. The end of the
//! stream is authenticated: `SecureReader` returns `Ok(0)` only after the
//! peer's close record (`SecureWriter::finish`); a raw EOF before it is an
//! error ("stream truncated").
//!
//! The two halves are independent (own socket clone, own nonce counter, the
//! transport keys shared read-only through an `Arc`), so the source can send
//! memory on one thread while reading replies on another.

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hkdf::Hkdf;
use sha2::Sha256;
use snow::resolvers::{BoxedCryptoResolver, DefaultResolver, FallbackResolver, RingResolver};
use snow::{HandshakeState, StatelessTransportState};

use crate::auth::Key;
use crate::transport::Stream;

/// Mixed into the handshake hash: both ends must speak exactly this.
pub const PROLOGUE: &[u8] = b"ferry-migrate/2 secure/1";
/// The prologue of a session whose records are not encrypted (both ends
/// asked for it): a mismatch with [`PROLOGUE`] fails the handshake.
pub const PROLOGUE_PLAIN: &[u8] = b"ferry-migrate/2 plain/1";
/// Largest ciphertext in one record (the Noise message limit).
pub const MAX_RECORD: usize = 65535;
const TAG: usize = 16;
/// Largest plaintext in one record.
pub const MAX_PLAIN: usize = MAX_RECORD - TAG;
const HEADER: usize = 2;
const FULL_RECORD: usize = HEADER + MAX_RECORD;
/// Sealed records are batched into one socket write of up to this much.
const OUT_BUF: usize = 4 * FULL_RECORD;
/// Bytes read from the socket at a time, at most (several records).
const IN_BUF: usize = 4 * FULL_RECORD;
/// Handshake messages are 48 bytes; anything longer is not this protocol.
const MAX_HANDSHAKE_MSG: usize = 256;
const PSK_SALT: &[u8] = b"ferry-migrate psk/1";
const PSK_INFO: &[u8] = b"noise NNpsk0 psk";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "authentication failed: the peer does not hold this cluster's key \
         (or only one side runs with --no-encryption)"
    )]
    Auth,
    #[error("secure handshake did not finish by its deadline")]
    Deadline,
    #[error("the peer closed the connection during the secure handshake")]
    Closed,
    #[error("secure handshake: {0} (does the peer run an older Ferry?)")]
    Protocol(&'static str),
    #[error("secure handshake: {0}")]
    Io(#[from] io::Error),
    #[error("secure handshake: noise: {0}")]
    Noise(#[from] snow::Error),
}

/// The AEAD that protects records. Both ends must choose the same one (it is
/// part of the Noise protocol name, so a mismatch fails the handshake).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cipher {
    AesGcm,
    ChaChaPoly,
}

/// Whose implementation of the cipher and hash: `ring` (assembly, much
/// faster) or RustCrypto's. X25519 is always RustCrypto's (ring's resolver
/// has none). Interoperable: the two ends may differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Ring,
    RustCrypto,
}

/// What protects the records after the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Records {
    /// Encrypted and authenticated (the default).
    Sealed,
    /// Sent as they are, framed the same way: only the handshake proves the
    /// cluster key. For a link the operator trusts, and to measure what
    /// encryption costs. Both ends must ask for it.
    Plain,
}

/// The cipher suite. `Suite::default()` is what migrations use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Suite {
    pub cipher: Cipher,
    pub backend: Backend,
    pub records: Records,
}

impl Default for Suite {
    /// AES-256-GCM from ring: the fastest here (AES-NI, VAES, PCLMULQDQ).
    fn default() -> Self {
        Suite { cipher: Cipher::AesGcm, backend: Backend::Ring, records: Records::Sealed }
    }
}

impl Suite {
    /// The Noise protocol name.
    pub fn pattern(&self) -> &'static str {
        match self.cipher {
            Cipher::AesGcm => "Noise_NNpsk0_25519_AESGCM_SHA256",
            Cipher::ChaChaPoly => "Noise_NNpsk0_25519_ChaChaPoly_SHA256",
        }
    }

    fn builder<'a>(&self, psk: &'a [u8; 32]) -> Result<snow::Builder<'a>, Error> {
        let resolver: BoxedCryptoResolver = match self.backend {
            Backend::Ring => Box::new(FallbackResolver::new(Box::new(RingResolver), Box::new(DefaultResolver))),
            Backend::RustCrypto => Box::new(DefaultResolver),
        };
        let params = self.pattern().parse()?;
        let prologue = match self.records {
            Records::Sealed => PROLOGUE,
            Records::Plain => PROLOGUE_PLAIN,
        };
        Ok(snow::Builder::with_resolver(params, resolver).prologue(prologue)?.psk(0, psk)?)
    }
}

/// The Noise PSK: HKDF-SHA256 over the key file's bytes (any length >= 16).
fn psk(key: &Key) -> [u8; 32] {
    let mut out = [0u8; 32];
    // 32 bytes is far below HKDF-SHA256's limit of 255 * 32: never fails.
    if Hkdf::<Sha256>::new(Some(PSK_SALT), key.bytes()).expand(PSK_INFO, &mut out).is_err() {
        unreachable!("HKDF-SHA256 can always produce 32 bytes");
    }
    out
}

/// Source side (Noise initiator): runs the handshake on `stream`, all of it
/// by `deadline`, and returns the two halves of the secure channel. On
/// success the socket's timeouts are cleared; set your own with
/// `set_timeout` on either half.
pub fn connect(stream: Stream, key: &Key, deadline: Instant) -> Result<(SecureReader, SecureWriter), Error> {
    connect_with(stream, key, deadline, Suite::default())
}

/// Destination side (Noise responder); see `connect`.
pub fn accept(stream: Stream, key: &Key, deadline: Instant) -> Result<(SecureReader, SecureWriter), Error> {
    accept_with(stream, key, deadline, Suite::default())
}

/// `connect` with a chosen cipher suite (benchmarks, tests).
pub fn connect_with(
    mut stream: Stream,
    key: &Key,
    deadline: Instant,
    suite: Suite,
) -> Result<(SecureReader, SecureWriter), Error> {
    let psk = psk(key);
    let mut hs = suite.builder(&psk)?.build_initiator()?;
    let mut msg = [0u8; HEADER + MAX_HANDSHAKE_MSG];
    let n = hs.write_message(&[], &mut msg[HEADER..])?;
    msg[..HEADER].copy_from_slice(&(n as u16).to_be_bytes());
    hs_write(&mut stream, deadline, &msg[..HEADER + n])?;
    let reply = hs_recv(&mut stream, deadline, &mut msg)?;
    if reply.is_empty() {
        return Err(Error::Auth); // the responder could not open our message
    }
    let mut payload = [0u8; MAX_HANDSHAKE_MSG];
    hs.read_message(reply, &mut payload).map_err(|_| Error::Auth)?;
    split(stream, hs, suite.records)
}

/// `accept` with a chosen cipher suite (benchmarks, tests).
pub fn accept_with(
    mut stream: Stream,
    key: &Key,
    deadline: Instant,
    suite: Suite,
) -> Result<(SecureReader, SecureWriter), Error> {
    let psk = psk(key);
    let mut hs = suite.builder(&psk)?.build_responder()?;
    let mut msg = [0u8; HEADER + MAX_HANDSHAKE_MSG];
    let mut payload = [0u8; MAX_HANDSHAKE_MSG];
    let first = hs_recv(&mut stream, deadline, &mut msg)?;
    if hs.read_message(first, &mut payload).is_err() {
        // Tell the initiator why (forgeable, but it can only cause a failure
        // that cutting the connection would cause anyway).
        let _ = hs_write(&mut stream, deadline, &0u16.to_be_bytes());
        return Err(Error::Auth);
    }
    let n = hs.write_message(&[], &mut msg[HEADER..])?;
    msg[..HEADER].copy_from_slice(&(n as u16).to_be_bytes());
    hs_write(&mut stream, deadline, &msg[..HEADER + n])?;
    split(stream, hs, suite.records)
}

fn split(mut stream: Stream, hs: HandshakeState, records: Records) -> Result<(SecureReader, SecureWriter), Error> {
    stream.set_timeout(None)?;
    let keys = Arc::new(hs.into_stateless_transport_mode()?);
    let reader = SecureReader::new(stream.try_clone()?, keys.clone(), records);
    Ok((reader, SecureWriter::new(stream, keys, records)))
}

/// Time left before `deadline`, or `Error::Deadline`.
fn remaining(deadline: Instant) -> Result<Duration, Error> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(Error::Deadline)
    } else {
        Ok(left)
    }
}

fn hs_io_error(e: io::Error) -> Error {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Error::Deadline,
        _ => Error::Io(e),
    }
}

/// Writes all of `bytes`, each write bounded by the time left.
fn hs_write(stream: &mut Stream, deadline: Instant, bytes: &[u8]) -> Result<(), Error> {
    let mut done = 0;
    while done < bytes.len() {
        stream.set_timeout(Some(remaining(deadline)?))?;
        match stream.write(&bytes[done..]) {
            Ok(0) => return Err(Error::Closed),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(hs_io_error(e)),
        }
    }
    Ok(())
}

/// Fills `buf`, each read bounded by the time left: a peer dribbling bytes
/// is cut at the deadline, not after it.
fn hs_read_exact(stream: &mut Stream, deadline: Instant, buf: &mut [u8]) -> Result<(), Error> {
    let mut done = 0;
    while done < buf.len() {
        stream.set_timeout(Some(remaining(deadline)?))?;
        match stream.read(&mut buf[done..]) {
            Ok(0) => return Err(Error::Closed),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(hs_io_error(e)),
        }
    }
    Ok(())
}

/// One length-prefixed handshake message (possibly empty: a refusal).
fn hs_recv<'a>(stream: &mut Stream, deadline: Instant, buf: &'a mut [u8]) -> Result<&'a [u8], Error> {
    let mut len = [0u8; HEADER];
    hs_read_exact(stream, deadline, &mut len)?;
    let len = u16::from_be_bytes(len) as usize;
    if len > MAX_HANDSHAKE_MSG.min(buf.len()) {
        return Err(Error::Protocol("oversized handshake message"));
    }
    hs_read_exact(stream, deadline, &mut buf[..len])?;
    Ok(&buf[..len])
}

/// The AEAD tag each record carries (none when records are plain).
fn tag_len(records: Records) -> usize {
    match records {
        Records::Sealed => TAG,
        Records::Plain => 0,
    }
}

fn broken(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, format!("secure stream: {what}"))
}

/// The sending half: a `Write` that seals plaintext into records. Writes are
/// buffered; `flush` seals the partial record and sends everything, and
/// `finish` also sends the authenticated close. Dropping a writer without
/// `finish` sends nothing more: the peer sees a truncated stream, never a
/// clean end. After any error the writer refuses further writes.
pub struct SecureWriter {
    stream: Stream,
    keys: Arc<StatelessTransportState>,
    records: Records,
    nonce: u64,
    /// Plaintext waiting for a full record (or a flush).
    plain: Box<[u8]>,
    plain_len: usize,
    /// Sealed records waiting for the socket.
    out: Box<[u8]>,
    out_len: usize,
    state: WriterState,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum WriterState {
    Open,
    Finished,
    Failed,
}

impl SecureWriter {
    fn new(stream: Stream, keys: Arc<StatelessTransportState>, records: Records) -> SecureWriter {
        SecureWriter {
            stream,
            keys,
            records,
            nonce: 0,
            plain: vec![0u8; MAX_PLAIN].into_boxed_slice(),
            plain_len: 0,
            out: vec![0u8; OUT_BUF].into_boxed_slice(),
            out_len: 0,
            state: WriterState::Open,
        }
    }

    /// Read and write timeouts of the underlying socket (shared with the
    /// reader half: it is one socket).
    pub fn set_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        self.stream.set_timeout(t)
    }

    /// A total deadline for this half's writes (see `Stream::set_deadline`).
    pub fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.stream.set_deadline(deadline);
    }

    /// Records sealed so far (including a close).
    pub fn records(&self) -> u64 {
        self.nonce
    }

    fn check_open(&self) -> io::Result<()> {
        match self.state {
            WriterState::Open => Ok(()),
            WriterState::Finished => Err(broken("write after finish")),
            WriterState::Failed => Err(broken("an earlier write failed; the stream is unusable")),
        }
    }

    /// Sends the sealed records to the socket.
    fn drain(&mut self) -> io::Result<()> {
        if self.out_len > 0 {
            if let Err(e) = self.stream.write_all(&self.out[..self.out_len]) {
                self.state = WriterState::Failed;
                return Err(e);
            }
            self.out_len = 0;
        }
        Ok(())
    }

    /// Seals `len` bytes of plaintext, taken from `user` if given (a full
    /// record straight from the caller's buffer), else from `self.plain`.
    fn seal(&mut self, user: Option<&[u8]>) -> io::Result<()> {
        if self.out_len + FULL_RECORD > self.out.len() {
            self.drain()?;
        }
        let plaintext = match user {
            Some(u) => u,
            None => &self.plain[..self.plain_len],
        };
        let tag = tag_len(self.records);
        let body = &mut self.out[self.out_len + HEADER..self.out_len + HEADER + plaintext.len() + tag];
        let sealed = match self.records {
            Records::Sealed => self.keys.write_message(self.nonce, plaintext, body),
            Records::Plain => {
                body.copy_from_slice(plaintext);
                Ok(plaintext.len())
            }
        };
        let n = match sealed {
            Ok(n) => n,
            Err(e) => {
                self.state = WriterState::Failed;
                return Err(io::Error::other(format!("secure stream: cannot seal a record: {e}")));
            }
        };
        self.out[self.out_len..self.out_len + HEADER].copy_from_slice(&(n as u16).to_be_bytes());
        self.out_len += HEADER + n;
        self.nonce += 1;
        if user.is_none() {
            self.plain_len = 0;
        }
        Ok(())
    }

    /// Passes a descriptor to the peer on the socket itself (SCM_RIGHTS,
    /// `Stream::send_fd`), after everything written so far. It is not
    /// inside a record, so the protocol must authenticate it: the sealed
    /// stream says which file it must be (see `wire::MemFdId`), and the
    /// peer checks the one it got against that.
    pub fn send_fd(&mut self, fd: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
        self.flush()?;
        self.stream.send_fd(fd).inspect_err(|_| self.state = WriterState::Failed)
    }

    /// Flushes everything and sends the authenticated end of stream. The
    /// writer accepts nothing afterwards.
    pub fn finish(&mut self) -> io::Result<()> {
        self.flush()?;
        self.seal(None)?; // plain is empty: the close record
        self.state = WriterState::Finished;
        self.drain()?;
        self.stream.flush()
    }
}

impl Write for SecureWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.check_open()?;
        if buf.is_empty() {
            return Ok(0);
        }
        if self.plain_len == MAX_PLAIN {
            self.seal(None)?;
        }
        if self.plain_len == 0 && buf.len() >= MAX_PLAIN {
            // A whole record straight from the caller's buffer: one copy
            // (into the record, where it is encrypted in place).
            self.seal(Some(&buf[..MAX_PLAIN]))?;
            return Ok(MAX_PLAIN);
        }
        let n = buf.len().min(MAX_PLAIN - self.plain_len);
        self.plain[self.plain_len..self.plain_len + n].copy_from_slice(&buf[..n]);
        self.plain_len += n;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.check_open()?;
        if self.plain_len > 0 {
            self.seal(None)?;
        }
        self.drain()?;
        self.stream.flush()
    }
}

/// The receiving half: a `Read` that opens records in order. A record that
/// fails to open (tampered, injected, replayed, reordered, or one before it
/// dropped) is an `InvalidData` error, and so is every read after it. `Ok(0)`
/// means the peer's authenticated close; an EOF before it is an
/// `UnexpectedEof` error ("stream truncated"). Timeouts (`WouldBlock`,
/// `TimedOut`) may be retried: a partly received record is kept.
pub struct SecureReader {
    stream: Stream,
    keys: Arc<StatelessTransportState>,
    records: Records,
    nonce: u64,
    /// Bytes from the socket: `input[in_start..in_end]` not yet opened.
    input: Box<[u8]>,
    in_start: usize,
    in_end: usize,
    /// An opened record the caller has not taken all of:
    /// `plain[p_start..p_end]`. (Room for the tag too: ring opens in place.)
    plain: Box<[u8]>,
    p_start: usize,
    p_end: usize,
    state: ReaderState,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ReaderState {
    Open,
    Closed,
    Tampered,
    Truncated,
}

impl SecureReader {
    fn new(stream: Stream, keys: Arc<StatelessTransportState>, records: Records) -> SecureReader {
        SecureReader {
            stream,
            keys,
            records,
            nonce: 0,
            input: vec![0u8; IN_BUF].into_boxed_slice(),
            in_start: 0,
            in_end: 0,
            plain: vec![0u8; MAX_RECORD].into_boxed_slice(),
            p_start: 0,
            p_end: 0,
            state: ReaderState::Open,
        }
    }

    /// Read and write timeouts of the underlying socket (shared with the
    /// writer half: it is one socket).
    pub fn set_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        self.stream.set_timeout(t)
    }

    /// A total deadline for this half's reads (see `Stream::set_deadline`).
    pub fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.stream.set_deadline(deadline);
    }

    /// True if the peer closed or reset the connection (nothing consumed).
    pub fn peer_gone(&self) -> bool {
        self.stream.peer_gone()
    }

    /// Takes a descriptor the peer passed with `SecureWriter::send_fd`. Only
    /// between records, with nothing read ahead: the peer must be waiting
    /// for us (the protocol is in turns there), or its marker byte could
    /// already sit in our buffer, its descriptor lost.
    pub fn recv_fd(&mut self) -> io::Result<std::os::fd::OwnedFd> {
        if self.state != ReaderState::Open || self.in_start != self.in_end || self.p_start != self.p_end {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "secure stream: data where a descriptor was due"));
        }
        self.stream.recv_fd()
    }

    /// True once the peer's authenticated close has been read.
    pub fn is_closed(&self) -> bool {
        self.state == ReaderState::Closed
    }

    fn failure(&self) -> io::Error {
        match self.state {
            ReaderState::Truncated => io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "secure stream truncated: the connection ended without the peer's authenticated close",
            ),
            _ => io::Error::new(
                io::ErrorKind::InvalidData,
                "secure stream: a record failed authentication (modified, injected, replayed, reordered or dropped)",
            ),
        }
    }

    /// Reads until `input` holds a whole record; returns its ciphertext length.
    fn next_record(&mut self) -> io::Result<usize> {
        loop {
            let avail = self.in_end - self.in_start;
            if avail >= HEADER {
                let len = u16::from_be_bytes([self.input[self.in_start], self.input[self.in_start + 1]]) as usize;
                if len < tag_len(self.records) {
                    self.state = ReaderState::Tampered;
                    return Err(self.failure());
                }
                if avail >= HEADER + len {
                    return Ok(len);
                }
            }
            if self.in_start == self.in_end {
                (self.in_start, self.in_end) = (0, 0);
            } else if self.in_start + FULL_RECORD > self.input.len() {
                // Not enough room after the partial record for all of it.
                self.input.copy_within(self.in_start..self.in_end, 0);
                self.in_end -= self.in_start;
                self.in_start = 0;
            }
            match self.stream.read(&mut self.input[self.in_end..]) {
                Ok(0) => {
                    self.state = ReaderState::Truncated;
                    return Err(self.failure());
                }
                Ok(n) => self.in_end += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl Read for SecureReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.p_start < self.p_end {
                let n = buf.len().min(self.p_end - self.p_start);
                buf[..n].copy_from_slice(&self.plain[self.p_start..self.p_start + n]);
                self.p_start += n;
                return Ok(n);
            }
            match self.state {
                ReaderState::Open => {}
                ReaderState::Closed => return Ok(0),
                ReaderState::Tampered | ReaderState::Truncated => return Err(self.failure()),
            }
            let len = self.next_record()?;
            let record = &self.input[self.in_start + HEADER..self.in_start + HEADER + len];
            // Open straight into the caller's buffer when the whole record
            // (with its tag: ring opens in place) fits there.
            let direct = buf.len() >= len;
            let out: &mut [u8] = if direct { &mut buf[..len] } else { &mut self.plain[..len] };
            let opened = match self.records {
                Records::Sealed => self.keys.read_message(self.nonce, record, out),
                Records::Plain => {
                    out.copy_from_slice(record);
                    Ok(len)
                }
            };
            self.in_start += HEADER + len;
            let n = match opened {
                Ok(n) => n,
                Err(_) => {
                    out.fill(0); // unauthenticated bytes never reach the caller
                    self.state = ReaderState::Tampered;
                    return Err(self.failure());
                }
            };
            self.nonce += 1;
            if n == 0 {
                self.state = ReaderState::Closed;
                return Ok(0);
            }
            if direct {
                return Ok(n);
            }
            (self.p_start, self.p_end) = (0, n);
        }
    }
}

/// Both halves as one `Read + Write`, for a side that talks in turns (the
/// destination, and test peers).
pub struct Duplex {
    pub reader: SecureReader,
    pub writer: SecureWriter,
}

impl Duplex {
    pub fn new((reader, writer): (SecureReader, SecureWriter)) -> Duplex {
        Duplex { reader, writer }
    }

    pub fn set_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        self.reader.set_timeout(t)?;
        self.writer.set_timeout(t)
    }

    pub fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.reader.set_deadline(deadline);
        self.writer.set_deadline(deadline);
    }
}

impl Read for Duplex {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reader.read(buf)
    }
}

impl Write for Duplex {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.writer.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.writer.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn pair() -> (Stream, Stream) {
        Stream::pair().expect("socketpair")
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    /// One end after its handshake.
    type End = Result<(SecureReader, SecureWriter), Error>;

    /// Initiator and responder over a socketpair, with these keys.
    fn handshake(ks: &[u8], kd: &[u8]) -> (End, End) {
        let (a, b) = pair();
        let kd = Key::from_bytes(kd);
        let t = thread::spawn(move || accept(b, &kd, soon()));
        let src = connect(a, &Key::from_bytes(ks), soon());
        (src, t.join().expect("responder thread"))
    }

    fn pattern(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn a_descriptor_passes_between_records_and_the_stream_goes_on() {
        use std::io::Seek;
        use std::os::fd::AsFd;
        let (src, dst) = handshake(KEY, KEY);
        let ((_, mut w), (mut r, _)) = (src.unwrap(), dst.unwrap());
        let mut file = tempfile_with(b"guest ram");
        // In turns, as the protocol runs: nothing is in flight behind the
        // descriptor, so the reader cannot have read its byte ahead.
        w.write_all(b"before").unwrap();
        w.flush().unwrap();
        let mut got = [0u8; 6];
        r.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"before");
        w.send_fd(file.as_fd()).unwrap();
        let fd = r.recv_fd().unwrap();
        w.write_all(b"after").unwrap();
        w.flush().unwrap();
        let mut passed = std::fs::File::from(fd);
        let mut text = String::new();
        file.rewind().unwrap();
        passed.read_to_string(&mut text).unwrap();
        assert_eq!(text, "guest ram", "the same file");
        let mut got = [0u8; 5];
        r.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"after", "records resume after the descriptor");
        // Records where a descriptor is due are refused, not swallowed.
        w.write_all(b"x").unwrap();
        w.flush().unwrap();
        let mut one = [0u8; 1];
        r.read_exact(&mut one).unwrap();
        w.write_all(b"yz").unwrap();
        w.flush().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let _ = r.read(&mut one).unwrap();
        assert!(r.recv_fd().is_err(), "data already buffered where a descriptor was due");
    }

    fn tempfile_with(bytes: &[u8]) -> std::fs::File {
        let path = std::env::temp_dir().join(format!("ferry-fd-{}-{:?}", std::process::id(), thread::current().id()));
        let mut f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        f.write_all(bytes).unwrap();
        f
    }

    const ODD_SIZES: [usize; 9] = [1, 7, 4093, MAX_PLAIN, MAX_PLAIN + 1, 200_001, 3, 65536, 12];

    fn write_odd(w: &mut SecureWriter, data: &[u8]) {
        let mut off = 0;
        for i in 0.. {
            if off == data.len() {
                break;
            }
            let n = ODD_SIZES[i % ODD_SIZES.len()].min(data.len() - off);
            w.write_all(&data[off..off + n]).expect("write");
            off += n;
            if i % 5 == 4 {
                w.flush().expect("flush");
            }
        }
    }

    fn read_odd(r: &mut SecureReader) -> io::Result<Vec<u8>> {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 300_000];
        for i in 0.. {
            let want = ODD_SIZES[(i * 7 + 3) % ODD_SIZES.len()];
            let n = r.read(&mut buf[..want])?;
            if n == 0 {
                return Ok(got);
            }
            got.extend_from_slice(&buf[..n]);
        }
        unreachable!()
    }

    #[test]
    fn several_mib_round_trip_both_ways_in_odd_sizes() {
        let (src, dst) = handshake(KEY, KEY);
        let ((mut sr, mut sw), (mut dr, mut dw)) = (src.expect("connect"), dst.expect("accept"));
        let there = pattern(5 << 20, 1);
        let back = pattern(3 << 20, 2);
        let (t, b) = (there.clone(), back.clone());
        let dest = thread::spawn(move || {
            let echo = thread::spawn(move || {
                write_odd(&mut dw, &b);
                dw.finish().expect("finish");
                dw
            });
            let got = read_odd(&mut dr).expect("destination reads");
            assert!(got == t, "destination got {} bytes, not the {} sent", got.len(), t.len());
            assert!(dr.is_closed());
            assert_eq!(dr.read(&mut [0u8; 10]).expect("read after close"), 0);
            echo.join().expect("echo thread")
        });
        write_odd(&mut sw, &there);
        sw.flush().expect("empty flush");
        sw.flush().expect("second empty flush sends nothing");
        sw.finish().expect("finish");
        assert!(sw.write(b"x").is_err(), "write after finish");
        let got = read_odd(&mut sr).expect("source reads");
        assert!(got == back);
        dest.join().expect("destination thread");
    }

    /// Both ends with these record settings, over a socketpair.
    fn handshake_records(src: Records, dst: Records) -> (End, End) {
        let (a, b) = pair();
        let key = Key::from_bytes(KEY);
        let k = key.clone();
        let suite = |records| Suite { records, ..Suite::default() };
        let t = thread::spawn(move || accept_with(b, &k, soon(), suite(dst)));
        let src = connect_with(a, &key, soon(), suite(src));
        (src, t.join().expect("responder thread"))
    }

    #[test]
    fn plain_records_round_trip_and_end_with_a_close() {
        let (src, dst) = handshake_records(Records::Plain, Records::Plain);
        let ((_sr, mut sw), (mut dr, _dw)) = (src.expect("connect"), dst.expect("accept"));
        let data = pattern(2 << 20, 3);
        let t = data.clone();
        let dest = thread::spawn(move || {
            let got = read_odd(&mut dr).expect("destination reads");
            assert!(got == t, "destination got {} bytes, not the {} sent", got.len(), t.len());
            assert!(dr.is_closed());
        });
        write_odd(&mut sw, &data);
        sw.finish().expect("finish");
        dest.join().expect("destination thread");
    }

    #[test]
    fn plain_on_one_side_only_fails_the_handshake_on_both() {
        for (s, d) in [(Records::Plain, Records::Sealed), (Records::Sealed, Records::Plain)] {
            let (src, dst) = handshake_records(s, d);
            let err = src.err().expect("source refused");
            assert!(matches!(err, Error::Auth), "source {s:?}/{d:?}: {err:?}");
            assert!(err.to_string().contains("--no-encryption"), "{err}");
            assert!(matches!(dst, Err(Error::Auth)), "destination {s:?}/{d:?}");
        }
    }

    #[test]
    fn a_wrong_key_fails_on_both_sides() {
        let (src, dst) = handshake(KEY, b"another cluster's key, 32 bytes!");
        assert!(matches!(src, Err(Error::Auth)), "source: {:?}", src.err());
        assert!(matches!(dst, Err(Error::Auth)), "destination: {:?}", dst.err());
        let e = Error::Auth.to_string();
        assert!(e.contains("does not hold this cluster's key"), "{e}");
    }

    #[test]
    fn a_cipher_mismatch_fails_the_handshake() {
        let (a, b) = pair();
        let t = thread::spawn(move || {
            let chacha = Suite { cipher: Cipher::ChaChaPoly, backend: Backend::Ring, records: Records::Sealed };
            accept_with(b, &Key::from_bytes(KEY), soon(), chacha).map(|_| ())
        });
        assert!(matches!(connect(a, &Key::from_bytes(KEY), soon()), Err(Error::Auth)));
        assert!(matches!(t.join().expect("thread"), Err(Error::Auth)));
    }

    #[test]
    fn ring_and_rustcrypto_interoperate_for_both_ciphers() {
        for cipher in [Cipher::AesGcm, Cipher::ChaChaPoly] {
            let (a, b) = pair();
            let t = thread::spawn(move || {
                let s = Suite { cipher, backend: Backend::RustCrypto, records: Records::Sealed };
                let (mut r, _w) = accept_with(b, &Key::from_bytes(KEY), soon(), s).expect("accept");
                let mut got = Vec::new();
                r.read_to_end(&mut got).map(|_| got)
            });
            let s = Suite { cipher, backend: Backend::Ring, records: Records::Sealed };
            let (_r, mut w) = connect_with(a, &Key::from_bytes(KEY), soon(), s).expect("connect");
            let data = pattern(300_000, 3);
            w.write_all(&data).expect("write");
            w.finish().expect("finish");
            assert!(t.join().expect("thread").expect("read") == data, "{cipher:?}");
        }
    }

    /// What a man in the middle does to the records from the source.
    type Tamper = fn(&mut Vec<Vec<u8>>);

    fn read_unit(s: &mut Stream) -> Option<Vec<u8>> {
        let mut len = [0u8; 2];
        s.read_exact(&mut len).ok()?;
        let mut unit = vec![0u8; HEADER + u16::from_be_bytes(len) as usize];
        unit[..HEADER].copy_from_slice(&len);
        s.read_exact(&mut unit[HEADER..]).ok()?;
        Some(unit)
    }

    /// A relay between a real source and a real destination: it forwards the
    /// handshake, collects the source's records (the source sends 5 data
    /// records and a close), tampers with them and delivers the result.
    /// Returns what the destination reads.
    fn through_relay(tamper: Tamper) -> io::Result<Vec<u8>> {
        let (src_end, mut relay_src) = pair();
        let (dst_end, mut relay_dst) = pair();
        let relay = thread::spawn(move || {
            let m1 = read_unit(&mut relay_src).expect("message 1");
            relay_dst.write_all(&m1).expect("forward message 1");
            let m2 = read_unit(&mut relay_dst).expect("message 2");
            relay_src.write_all(&m2).expect("forward message 2");
            let mut records = Vec::new();
            while let Some(r) = read_unit(&mut relay_src) {
                records.push(r);
            }
            assert_eq!(records.len(), 6, "5 data records and a close");
            tamper(&mut records);
            for r in &records {
                relay_dst.write_all(r).expect("deliver");
            }
        });
        let source = thread::spawn(move || {
            let (_r, mut w) = connect(src_end, &Key::from_bytes(KEY), soon()).expect("connect");
            for i in 0..5 {
                w.write_all(&pattern(1000, i)).expect("write");
                w.flush().expect("flush");
            }
            w.finish().expect("finish");
        });
        let (mut r, _w) = accept(dst_end, &Key::from_bytes(KEY), soon()).expect("accept through the relay");
        source.join().expect("source thread");
        relay.join().expect("relay thread");
        let mut got = Vec::new();
        r.read_to_end(&mut got).map(|_| got)
    }

    fn expect_rejected(tamper: Tamper, kind: io::ErrorKind) {
        match through_relay(tamper) {
            Ok(got) => panic!("tampered stream accepted ({} bytes)", got.len()),
            Err(e) => assert_eq!(e.kind(), kind, "{e}"),
        }
    }

    #[test]
    fn an_honest_relay_changes_nothing() {
        let got = through_relay(|_| {}).expect("untouched stream");
        assert!(got == (0..5).flat_map(|i| pattern(1000, i)).collect::<Vec<_>>());
    }

    #[test]
    fn a_relay_that_flips_one_byte_is_detected() {
        expect_rejected(|r| r[2][500] ^= 0x01, io::ErrorKind::InvalidData);
        // The first ciphertext byte.
        expect_rejected(|r| r[0][HEADER] ^= 0x80, io::ErrorKind::InvalidData);
        // The last byte of a tag.
        expect_rejected(|r| *r[3].last_mut().expect("tag") ^= 1, io::ErrorKind::InvalidData);
    }

    #[test]
    fn a_relay_that_injects_a_record_is_detected() {
        expect_rejected(
            |r| {
                let mut forged = vec![0u8; HEADER + 100];
                forged[..HEADER].copy_from_slice(&100u16.to_be_bytes());
                r.insert(2, forged);
            },
            io::ErrorKind::InvalidData,
        );
        // A length that is not a record at all.
        expect_rejected(|r| r.insert(1, vec![0, 3, 1, 2, 3]), io::ErrorKind::InvalidData);
    }

    #[test]
    fn a_replayed_record_fails() {
        expect_rejected(|r| r.insert(2, r[1].clone()), io::ErrorKind::InvalidData);
        // Replaying the first record in place of a later one.
        expect_rejected(|r| r[3] = r[0].clone(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn swapped_records_fail() {
        expect_rejected(|r| r.swap(1, 2), io::ErrorKind::InvalidData);
    }

    #[test]
    fn a_dropped_record_fails() {
        expect_rejected(
            |r| {
                r.remove(2);
            },
            io::ErrorKind::InvalidData,
        );
    }

    #[test]
    fn truncation_without_close_is_an_error() {
        // The close record dropped.
        expect_rejected(
            |r| {
                r.pop();
            },
            io::ErrorKind::UnexpectedEof,
        );
        // Cut inside a record.
        expect_rejected(
            |r| {
                r.truncate(4);
                r[3].truncate(40);
            },
            io::ErrorKind::UnexpectedEof,
        );
        // A writer dropped without finish.
        let (src, dst) = handshake(KEY, KEY);
        let ((_sr, mut sw), (mut dr, _dw)) = (src.expect("connect"), dst.expect("accept"));
        sw.write_all(b"hello").expect("write");
        sw.flush().expect("flush");
        drop(sw);
        drop(_sr);
        let mut got = Vec::new();
        let e = dr.read_to_end(&mut got).expect_err("truncated");
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(e.to_string().contains("truncated"), "{e}");
        assert_eq!(got, b"hello");
    }

    #[test]
    fn a_dribbling_handshake_is_cut_at_the_deadline() {
        // A "source" that sends a plausible length and then a byte every
        // 150 ms: each read succeeds, the total deadline still holds.
        let (a, mut b) = pair();
        let t0 = Instant::now();
        let dest = thread::spawn(move || accept(a, &Key::from_bytes(KEY), Instant::now() + Duration::from_millis(600)));
        let dribbler = thread::spawn(move || {
            let _ = b.write_all(&48u16.to_be_bytes());
            for _ in 0..20 {
                if b.write_all(&[0]).is_err() {
                    break;
                }
                thread::sleep(Duration::from_millis(150));
            }
        });
        let r = dest.join().expect("destination thread");
        let took = t0.elapsed();
        assert!(matches!(r, Err(Error::Deadline)), "{:?}", r.err());
        assert!(took < Duration::from_millis(900), "cut after {took:?}");
        dribbler.join().expect("dribbler");

        // The source side too: a destination that never answers.
        let (a, _b) = pair();
        let t0 = Instant::now();
        let r = connect(a, &Key::from_bytes(KEY), Instant::now() + Duration::from_millis(300));
        assert!(matches!(r, Err(Error::Deadline)), "{:?}", r.err());
        assert!(t0.elapsed() < Duration::from_millis(600));
    }

    #[test]
    fn an_old_peer_is_refused_quickly() {
        // A pre-secure destination starts with a plaintext "FMIG" frame.
        let (a, mut b) = pair();
        let t = thread::spawn(move || {
            let _ = b.write_all(b"FMIG\x0b\0\0\0\x20\0\0\0");
            let mut sink = [0u8; 64];
            let _ = b.read(&mut sink);
        });
        let r = connect(a, &Key::from_bytes(KEY), soon());
        assert!(matches!(r, Err(Error::Protocol(_))), "{:?}", r.err());
        t.join().expect("thread");
    }
}
