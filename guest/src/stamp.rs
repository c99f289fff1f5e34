//! Disk stamps: a background writer that proves, from the disk alone, that
//! two copies of this VM never wrote its disk at the same time (a failover
//! restarts it elsewhere; the old copy must have stopped first).
//!
//! Every `every_ms` the main loop writes one record (one sector) into a
//! region of the disk. Records carry a slot number that grows across every
//! writer the region ever had: a writer starts by reading the whole region,
//! takes the highest slot it finds (`base`), and numbers its own records
//! from `base + sectors / 2 + 1` on (slot `s` lives in sector
//! `at + s % sectors`). So the slots between `base` and its first slot are
//! a gap no honest writer ever fills: a record found there was written by
//! someone who was still writing after this writer looked, which is two
//! writers at once. The gap is only overwritten after this writer wrapped
//! half the region (4096 records, 80 s at the default 20 ms), long after a
//! test has read the region back.
//!
//! Record layout (little-endian): 0..4 "FSTP", 4..8 version, 8..16 slot,
//! 16..24 base, 24..32 first slot, 32..40 seq (this writer's count, from
//! 0), 40..48 TSC at the write, 48..56 writer id (the TSC when it started,
//! unique per start), 56..64 TSC kHz, 64..72 tag (ASCII, NUL-padded),
//! zeros, 504..512 FNV-1a of bytes 0..504. `tests/src/stamps.rs` reads it.

use crate::io::rdtsc;
use crate::println;
use crate::virtio::blk::{BlkDevice, BlkError, MAX_SECTORS, SECTOR};

const MAGIC: u32 = u32::from_le_bytes(*b"FSTP");
const VERSION: u32 = 1;
const CHECKSUM_AT: usize = SECTOR - 8;
pub const TAG_BYTES: usize = 8;

/// Where the records go and how often.
#[derive(Clone, Copy)]
pub struct Region {
    pub at: u64,
    pub sectors: u64,
    pub every_ms: u64,
}

pub struct Stamper {
    region: Region,
    tag: [u8; TAG_BYTES],
    writer: u64,
    base: u64,
    first: u64,
    next_slot: u64,
    seq: u64,
    tsc_khz: u64,
    next_due: u64,
    written: u64,
    errors: u64,
    last_error: Option<BlkError>,
}

fn fnv(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn u64_at(buf: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(w)
}

/// The slot of a valid record, if `buf` holds one.
fn slot_of(buf: &[u8]) -> Option<u64> {
    let valid = buf[0..4] == MAGIC.to_le_bytes()
        && buf[4..8] == VERSION.to_le_bytes()
        && u64_at(buf, CHECKSUM_AT) == fnv(&buf[..CHECKSUM_AT]);
    valid.then(|| u64_at(buf, 8))
}

/// A tag from the first `TAG_BYTES` of `word` (printable ASCII only).
pub fn tag_from(word: &str) -> [u8; TAG_BYTES] {
    let mut tag = [0u8; TAG_BYTES];
    for (t, b) in tag.iter_mut().zip(word.bytes().filter(|b| b.is_ascii_graphic())) {
        *t = b;
    }
    tag
}

fn tag_str(tag: &[u8; TAG_BYTES]) -> &str {
    let len = tag.iter().position(|&b| b == 0).unwrap_or(TAG_BYTES);
    core::str::from_utf8(&tag[..len]).unwrap_or("?")
}

pub enum StartError {
    /// The region does not fit the disk, or is too small to leave a gap.
    Region {
        capacity: u64,
    },
    Io {
        err: BlkError,
        sector: u64,
    },
}

impl core::fmt::Display for StartError {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        match self {
            StartError::Region { capacity } => write!(f, "reason=region capacity_sectors={}", capacity),
            StartError::Io { err, sector } => write!(f, "{} sector={}", err, sector),
        }
    }
}

impl Stamper {
    /// Reads the whole region for the highest slot any writer left, and
    /// starts numbering past the gap. The first record is due at once.
    pub fn start(
        blk: &mut BlkDevice,
        region: Region,
        tag: [u8; TAG_BYTES],
        tsc_khz: u64,
    ) -> Result<Stamper, StartError> {
        let fits = region.at.checked_add(region.sectors).is_some_and(|end| end <= blk.capacity);
        if !fits || region.sectors < 4 || region.every_ms == 0 {
            return Err(StartError::Region { capacity: blk.capacity });
        }
        let writer = rdtsc();
        let mut base = 0;
        let end = region.at + region.sectors;
        let mut s = region.at;
        while s < end {
            let n = (end - s).min(MAX_SECTORS as u64) as usize;
            let data = blk.read(s, n).map_err(|err| StartError::Io { err, sector: s })?;
            for sec in data.chunks_exact(SECTOR) {
                if let Some(slot) = slot_of(sec) {
                    base = base.max(slot);
                }
            }
            s += n as u64;
        }
        let first = base + region.sectors / 2 + 1;
        Ok(Stamper {
            region,
            tag,
            writer,
            base,
            first,
            next_slot: first,
            seq: 0,
            tsc_khz,
            next_due: rdtsc(),
            written: 0,
            errors: 0,
            last_error: None,
        })
    }

    pub fn set_tag(&mut self, tag: [u8; TAG_BYTES]) {
        self.tag = tag;
    }

    fn fill(&self, buf: &mut [u8], now: u64) {
        buf[..SECTOR].fill(0);
        buf[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        buf[4..8].copy_from_slice(&VERSION.to_le_bytes());
        let words = [self.next_slot, self.base, self.first, self.seq, now, self.writer, self.tsc_khz];
        for (i, w) in words.iter().enumerate() {
            buf[8 + i * 8..16 + i * 8].copy_from_slice(&w.to_le_bytes());
        }
        buf[64..64 + TAG_BYTES].copy_from_slice(&self.tag);
        let sum = fnv(&buf[..CHECKSUM_AT]);
        buf[CHECKSUM_AT..SECTOR].copy_from_slice(&sum.to_le_bytes());
    }

    /// Writes the next record if it is due; true if it wrote (or tried).
    /// A failed write (a fenced disk answers with I/O errors) is counted
    /// and its slot not reused: the next record takes the next slot.
    pub fn due(&mut self, now: u64, blk: &mut BlkDevice) -> bool {
        if now < self.next_due {
            return false;
        }
        let every = self.region.every_ms * self.tsc_khz;
        self.next_due += every;
        if self.next_due <= now {
            // Behind (the guest was stopped): no burst, just the next one.
            self.next_due = now + every;
        }
        let sector = self.region.at + self.next_slot % self.region.sectors;
        let stamp_tsc = rdtsc();
        self.fill(blk.buffer(), stamp_tsc);
        match blk.write(sector, 1) {
            Ok(()) => self.written += 1,
            Err(e) => {
                if self.errors == 0 {
                    println!("disk-stamp: write of slot {} failed: {}", self.next_slot, e);
                }
                self.errors += 1;
                self.last_error = Some(e);
            }
        }
        self.next_slot += 1;
        self.seq += 1;
        true
    }

    pub fn print_started(&self) {
        println!(
            "disk-stamp started tag={} writer={:#x} at={} sectors={} base={} first_slot={} every_ms={}",
            tag_str(&self.tag),
            self.writer,
            self.region.at,
            self.region.sectors,
            self.base,
            self.first,
            self.region.every_ms
        );
    }

    pub fn print_status(&self) {
        println!(
            "disk-stamp tag={} writer={:#x} base={} first_slot={} next_slot={} written={} errors={}{}{}",
            tag_str(&self.tag),
            self.writer,
            self.base,
            self.first,
            self.next_slot,
            self.written,
            self.errors,
            if self.last_error.is_some() { " last_error=" } else { "" },
            LastError(&self.last_error)
        );
    }
}

struct LastError<'a>(&'a Option<BlkError>);

impl core::fmt::Display for LastError<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        match self.0 {
            Some(BlkError::Status(s)) => write!(f, "io-error-{}", s),
            Some(BlkError::Timeout) => write!(f, "timeout"),
            Some(BlkError::Disabled) => write!(f, "device-disabled"),
            Some(BlkError::OutOfRange) => write!(f, "out-of-range"),
            None => Ok(()),
        }
    }
}
