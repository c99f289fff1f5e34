//! The test guest's disk stamps (guest/src/stamp.rs), read back from a raw
//! image on the host, and the check they exist for: two copies of a VM
//! never wrote its disk at once.
//!
//! Each writer (one `disk-stamp` start in one guest) read the whole region
//! before its first record, took the highest slot there as its `base`, and
//! numbered its own records from `first` = base + half the region + 1. The
//! slots in (base, first) are a gap no honest writer fills: any record
//! found there was written by another writer that was still writing after
//! this one had looked, i.e. the two overlapped. Slots are absolute, so a
//! record's slot says where it stands in the order of writers even after
//! the region wrapped.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::time::{Duration, Instant};

const SECTOR: usize = 512;
const MAGIC: &[u8; 4] = b"FSTP";
const VERSION: u32 = 1;
const CHECKSUM_AT: usize = SECTOR - 8;

/// The guest's default region (cmdline.rs: DEFAULT_STAMP_AT/SECTORS).
pub const DEFAULT_AT: u64 = 16384;
pub const DEFAULT_SECTORS: u64 = 8192;

/// One record as the guest wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub slot: u64,
    pub base: u64,
    pub first: u64,
    pub seq: u64,
    pub tsc: u64,
    pub writer: u64,
    pub tsc_khz: u64,
    pub tag: String,
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

fn word(buf: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
}

/// A record, if `sector` holds a valid one.
pub fn parse(sector: &[u8]) -> Option<Stamp> {
    if sector.len() != SECTOR
        || &sector[0..4] != MAGIC
        || sector[4..8] != VERSION.to_le_bytes()
        || word(sector, CHECKSUM_AT) != fnv(&sector[..CHECKSUM_AT])
    {
        return None;
    }
    let tag = &sector[64..72];
    let len = tag.iter().position(|&b| b == 0).unwrap_or(tag.len());
    Some(Stamp {
        slot: word(sector, 8),
        base: word(sector, 16),
        first: word(sector, 24),
        seq: word(sector, 32),
        tsc: word(sector, 40),
        writer: word(sector, 48),
        tsc_khz: word(sector, 56),
        tag: String::from_utf8_lossy(&tag[..len]).into_owned(),
    })
}

/// The inverse of [`parse`], for unit tests of the check.
pub fn encode(s: &Stamp) -> Vec<u8> {
    let mut b = vec![0u8; SECTOR];
    b[0..4].copy_from_slice(MAGIC);
    b[4..8].copy_from_slice(&VERSION.to_le_bytes());
    for (i, w) in [s.slot, s.base, s.first, s.seq, s.tsc, s.writer, s.tsc_khz].iter().enumerate() {
        b[8 + i * 8..16 + i * 8].copy_from_slice(&w.to_le_bytes());
    }
    let tag = s.tag.as_bytes();
    b[64..64 + tag.len().min(8)].copy_from_slice(&tag[..tag.len().min(8)]);
    let sum = fnv(&b[..CHECKSUM_AT]);
    b[CHECKSUM_AT..].copy_from_slice(&sum.to_le_bytes());
    b
}

/// Every valid record in `sectors` sectors from `at` of the raw image
/// `image` (read through the page cache, which holds whatever the VMMs'
/// direct writes put on the volume).
pub fn read(image: &Path, at: u64, sectors: u64) -> std::io::Result<Vec<Stamp>> {
    let mut f = std::fs::File::open(image)?;
    f.seek(SeekFrom::Start(at * SECTOR as u64))?;
    let mut buf = vec![0u8; sectors as usize * SECTOR];
    f.read_exact(&mut buf)?;
    Ok(buf.chunks_exact(SECTOR).filter_map(parse).collect())
}

/// The image file of disk `disk` on the shared volume at `volume`.
pub fn volume_image(volume: &Path, disk: &str) -> std::path::PathBuf {
    let vol = csv_fs::Volume::open(volume).unwrap_or_else(|e| panic!("volume {}: {e}", volume.display()));
    vol.disk_path(disk).unwrap_or_else(|e| panic!("disk {disk}: {e}"))
}

/// What one writer left on the disk.
#[derive(Clone, Debug, PartialEq)]
pub struct Writer {
    pub writer: u64,
    /// Its last tag (the `disk-stamp TAG` command can change it).
    pub tag: String,
    pub base: u64,
    pub first: u64,
    /// Its lowest and highest slot still on the disk.
    pub low: u64,
    pub high: u64,
    pub records: usize,
    /// TSC of its first and last record still on the disk.
    pub first_tsc: u64,
    pub last_tsc: u64,
    pub tsc_khz: u64,
}

/// The writers on the disk, in the order they started (by first slot).
pub fn writers(stamps: &[Stamp]) -> Vec<Writer> {
    let mut by: BTreeMap<u64, Writer> = BTreeMap::new();
    for s in stamps {
        let w = by.entry(s.writer).or_insert_with(|| Writer {
            writer: s.writer,
            tag: s.tag.clone(),
            base: s.base,
            first: s.first,
            low: s.slot,
            high: s.slot,
            records: 0,
            first_tsc: s.tsc,
            last_tsc: s.tsc,
            tsc_khz: s.tsc_khz,
        });
        w.records += 1;
        if s.slot < w.low {
            (w.low, w.first_tsc) = (s.slot, s.tsc);
        }
        if s.slot >= w.high {
            (w.high, w.last_tsc, w.tag) = (s.slot, s.tsc, s.tag.clone());
        }
    }
    let mut out: Vec<Writer> = by.into_values().collect();
    out.sort_by_key(|w| w.first);
    out
}

/// Checks that no two writers overlapped: no record of one writer lies
/// in another's gap (after the other had read the region), and the
/// writers' slots do not interleave. Returns the writers in order, or
/// every violation found.
pub fn check_no_overlap(stamps: &[Stamp]) -> Result<Vec<Writer>, Vec<String>> {
    let ws = writers(stamps);
    let mut bad = vec![];
    for w in &ws {
        for s in stamps.iter().filter(|s| s.writer != w.writer && s.slot > w.base && s.slot < w.first) {
            bad.push(format!(
                "writer {:#x} ({}) wrote slot {} after writer {:#x} ({}) had read the region (its gap {}..{})",
                s.writer, s.tag, s.slot, w.writer, w.tag, w.base, w.first
            ));
        }
    }
    for pair in ws.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        if a.high >= b.low {
            bad.push(format!(
                "writer {:#x} ({}) has slot {} at or after the first slot {} of writer {:#x} ({})",
                a.writer, a.tag, a.high, b.low, b.writer, b.tag
            ));
        }
    }
    if bad.is_empty() {
        Ok(ws)
    } else {
        Err(bad)
    }
}

/// The writer id of a `disk-stamp started ... writer=0x...` console line.
pub fn started_line_writer(line: &str) -> Option<u64> {
    let rest = line.strip_prefix("disk-stamp started ")?;
    let hex = rest.split_whitespace().find_map(|w| w.strip_prefix("writer=0x"))?;
    u64::from_str_radix(hex, 16).ok()
}

/// The writer id on the last `disk-stamp started` line of the console
/// file `console` (one guest boot's), waiting at most `timeout` for one.
pub fn started_writer(console: &Path, timeout: Duration) -> Result<u64, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(console).unwrap_or_default();
        // Complete lines only: the guest writes a byte at a time.
        let complete = text.split_inclusive('\n').filter(|l| l.ends_with('\n'));
        let writer = complete.rev().find_map(started_line_writer);
        if let Some(w) = writer {
            return Ok(w);
        }
        if Instant::now() >= deadline {
            return Err(format!("no 'disk-stamp started' line on {} within {timeout:?}", console.display()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Milliseconds from `a`'s last record to `b`'s first, by their TSCs (one
/// clock only where the guests' TSC is the host's: PVM).
pub fn quiet_ms(a: &Writer, b: &Writer) -> f64 {
    (b.first_tsc as f64 - a.last_tsc as f64) / b.tsc_khz.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const HALF: u64 = 4096;

    fn run(writer: u64, tag: &str, base: u64, n: u64, tsc0: u64) -> Vec<Stamp> {
        let first = base + HALF + 1;
        (0..n)
            .map(|i| Stamp {
                slot: first + i,
                base,
                first,
                seq: i,
                tsc: tsc0 + i * 1000,
                writer,
                tsc_khz: 1000,
                tag: tag.into(),
            })
            .collect()
    }

    #[test]
    fn records_round_trip_and_garbage_is_not_one() {
        let s = run(7, "a", 0, 1, 5)[0].clone();
        assert_eq!(parse(&encode(&s)), Some(s.clone()));
        let mut torn = encode(&s);
        torn[100] ^= 1;
        assert_eq!(parse(&torn), None, "a checksum mismatch");
        assert_eq!(parse(&[0u8; SECTOR]), None);
    }

    #[test]
    fn writers_one_after_the_other_pass() {
        let mut all = run(1, "a", 0, 50, 0);
        let a_high = all.last().unwrap().slot;
        all.extend(run(2, "b", a_high, 30, 100_000));
        let ws = check_no_overlap(&all).unwrap();
        assert_eq!(ws.iter().map(|w| w.tag.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!((ws[0].records, ws[1].records), (50, 30));
        assert_eq!(quiet_ms(&ws[0], &ws[1]), 51.0);
    }

    #[test]
    fn an_old_writer_still_writing_after_the_new_one_looked_is_caught() {
        let mut all = run(1, "a", 0, 50, 0);
        let a_high = all.last().unwrap().slot;
        all.extend(run(2, "b", a_high, 30, 100_000));
        // a goes on after b's scan: its next slots land in b's gap.
        all.extend(run(1, "a", 0, 53, 0).into_iter().skip(50));
        let bad = check_no_overlap(&all).unwrap_err();
        assert_eq!(bad.len(), 3, "{bad:?}");
        assert!(bad[0].contains("after writer 0x2 (b) had read the region"), "{bad:?}");
    }

    #[test]
    fn a_writer_that_missed_another_is_caught_by_interleaving() {
        // b never saw a (same base): their slots interleave.
        let mut all = run(1, "a", 0, 50, 0);
        all.extend(run(2, "b", 0, 30, 100_000));
        assert!(check_no_overlap(&all).is_err());
    }
}
