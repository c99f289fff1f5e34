//! Disk patterns for the `disk-write` and `disk-verify` commands. Each
//! sector's content follows from (sector number, seed) alone, so a pattern
//! written by one boot (or on one host) can be verified by another.
//!
//! Sector layout: bytes 0..4 magic "FDSK", 4..8 the seed's low 32 bits,
//! 8..16 the sector number (all little-endian), then 62 words of a hash of
//! (sector, seed, word index).

use core::fmt;

use crate::virtio::blk::{BlkDevice, BlkError, MAX_SECTORS, SECTOR};

const MAGIC: u32 = u32::from_le_bytes(*b"FDSK");
/// Keeps one command to a few seconds at most.
pub const MAX_COUNT: u64 = 16384;

pub enum Failure {
    OutOfRange { capacity: u64 },
    Io { err: BlkError, sector: u64 },
    Mismatch { first: u64, bad: u64 },
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Failure::OutOfRange { capacity } => {
                write!(f, "reason=out-of-range capacity_sectors={} max_count={}", capacity, MAX_COUNT)
            }
            Failure::Io { err, sector } => write!(f, "{} sector={}", err, sector),
            Failure::Mismatch { first, bad } => write!(f, "first_bad_sector={} bad_sectors={}", first, bad),
        }
    }
}

fn word(sector: u64, seed: u64, k: usize) -> u64 {
    let mut x =
        sector.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed.rotate_left(29) ^ (k as u64).wrapping_mul(0x632b_e59b);
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn fill_sector(buf: &mut [u8], sector: u64, seed: u64) {
    buf[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    buf[4..8].copy_from_slice(&(seed as u32).to_le_bytes());
    buf[8..16].copy_from_slice(&sector.to_le_bytes());
    for (k, w) in buf[16..].chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&word(sector, seed, k + 2).to_le_bytes());
    }
}

fn sector_ok(buf: &[u8], sector: u64, seed: u64) -> bool {
    let mut want = [0u8; SECTOR];
    fill_sector(&mut want, sector, seed);
    buf == want
}

fn check_range(blk: &BlkDevice, start: u64, count: u64) -> Result<(), Failure> {
    match start.checked_add(count) {
        Some(end) if count > 0 && count <= MAX_COUNT && end <= blk.capacity => Ok(()),
        _ => Err(Failure::OutOfRange { capacity: blk.capacity }),
    }
}

/// Chunks of at most one request's worth of sectors: (first sector, count).
fn chunks(start: u64, count: u64) -> impl Iterator<Item = (u64, usize)> {
    (start..start + count).step_by(MAX_SECTORS).map(move |s| (s, (start + count - s).min(MAX_SECTORS as u64) as usize))
}

/// Writes the pattern, flushes, then reads it back and verifies it.
pub fn write(blk: &mut BlkDevice, start: u64, count: u64, seed: u64) -> Result<(), Failure> {
    check_range(blk, start, count)?;
    for (s, n) in chunks(start, count) {
        let buf = blk.buffer();
        for (i, sec) in buf.chunks_exact_mut(SECTOR).take(n).enumerate() {
            fill_sector(sec, s + i as u64, seed);
        }
        blk.write(s, n).map_err(|err| Failure::Io { err, sector: s })?;
    }
    blk.flush().map_err(|err| Failure::Io { err, sector: start })?;
    verify(blk, start, count, seed)
}

/// Reads the range and checks every sector against the pattern.
pub fn verify(blk: &mut BlkDevice, start: u64, count: u64, seed: u64) -> Result<(), Failure> {
    check_range(blk, start, count)?;
    let mut first = None;
    let mut bad = 0;
    for (s, n) in chunks(start, count) {
        let data = blk.read(s, n).map_err(|err| Failure::Io { err, sector: s })?;
        for (i, sec) in data.chunks_exact(SECTOR).enumerate() {
            let sector = s + i as u64;
            if !sector_ok(sec, sector, seed) {
                bad += 1;
                first.get_or_insert(sector);
            }
        }
    }
    match first {
        None => Ok(()),
        Some(first) => Err(Failure::Mismatch { first, bad }),
    }
}
