//! VHD, Hyper-V's (and Virtual PC's) image format, fixed and dynamic.
//!
//! Fixed: the raw disk followed by a 512-byte footer. Dynamic: a copy of the
//! footer at offset 0, a 1024-byte dynamic header, the block allocation table
//! (BAT: one big-endian u32 sector offset per block, 0xFFFFFFFF = not
//! allocated), then blocks (a sector bitmap padded to 512 bytes, then the
//! block's data) and the footer again at the end. Every integer is big-endian.
//! Differencing disks (type 4) are refused.
//!
//! Reads ignore the sector bitmap, as QEMU does; writes keep it set for the
//! sectors they cover so that Hyper-V sees the data too.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::file::{Cache, ImageFile};
use super::{read_error, BlockBackend, Format};
use crate::error::{Error, Result, VhdProblem};
use crate::fsutil::random_bytes;

const COOKIE: &[u8; 8] = b"conectix";
const DYN_COOKIE: &[u8; 8] = b"cxsparse";
const FOOTER: u64 = 512;
const DYN_HEADER: usize = 1024;
const TYPE_FIXED: u32 = 2;
const TYPE_DYNAMIC: u32 = 3;
const TYPE_DIFFERENCING: u32 = 4;
const UNUSED: u32 = u32::MAX;
/// The format's own limit (Hyper-V and QEMU agree).
pub const MAX_SIZE: u64 = 2040 << 30;
const BLOCK_SIZE: u64 = 2 << 20;
/// Block sizes accepted on open. Hyper-V and QEMU write 2 MiB; the floor
/// keeps the BAT of the largest disk (2040 GiB) to 32 Mi entries.
const MIN_BLOCK_SIZE: u64 = 64 << 10;
const MAX_BLOCK_SIZE: u64 = 256 << 20;
/// Seconds from the Unix epoch to the VHD epoch, 2000-01-01 00:00 UTC.
const VHD_EPOCH: u64 = 946_684_800;
/// 65535 cylinders x 16 heads x 255 sectors: a geometry this large means
/// "use current_size".
const MAX_GEOMETRY_SECTORS: u64 = 65535 * 16 * 255;
const NAME: &str = "vhd";

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// One's complement of the byte sum, the checksum field counted as zero.
fn checksum(b: &[u8], field: usize) -> u32 {
    let sum = b.iter().enumerate().filter(|(i, _)| !(field..field + 4).contains(i)).map(|(_, &v)| v as u32);
    !sum.fold(0u32, u32::wrapping_add)
}

/// CHS geometry from the VHD specification's algorithm.
fn geometry(size: u64) -> (u16, u8, u8) {
    let total = (size / 512).min(MAX_GEOMETRY_SECTORS);
    let (spt, heads, cth);
    if total >= 65535 * 16 * 63 {
        spt = 255;
        heads = 16;
        cth = total / spt;
    } else {
        let mut s = 17;
        let mut c = total / s;
        let mut h = c.div_ceil(1024).max(4);
        if c >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            c = total / s;
        }
        if c >= h * 1024 {
            s = 63;
            h = 16;
            c = total / s;
        }
        spt = s;
        heads = h;
        cth = c;
    }
    ((cth / heads) as u16, heads as u8, spt as u8)
}

/// A new footer. The creator application is "win ", Hyper-V's: it tells
/// readers (QEMU included) to take the size from `current_size` rather
/// than from the CHS geometry, which cannot express every size.
fn footer(size: u64, disk_type: u32, data_offset: u64) -> [u8; 512] {
    let mut b = [0u8; 512];
    b[0..8].copy_from_slice(COOKIE);
    b[8..12].copy_from_slice(&2u32.to_be_bytes()); // features: reserved bit always set
    b[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    b[16..24].copy_from_slice(&data_offset.to_be_bytes());
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    b[24..28].copy_from_slice(&(now.saturating_sub(VHD_EPOCH) as u32).to_be_bytes());
    b[28..32].copy_from_slice(b"win ");
    b[32..36].copy_from_slice(&0x000a_0000u32.to_be_bytes());
    b[36..40].copy_from_slice(b"Wi2k");
    b[40..48].copy_from_slice(&size.to_be_bytes());
    b[48..56].copy_from_slice(&size.to_be_bytes());
    let (c, h, s) = geometry(size);
    b[56..58].copy_from_slice(&c.to_be_bytes());
    b[58] = h;
    b[59] = s;
    b[60..64].copy_from_slice(&disk_type.to_be_bytes());
    b[68..84].copy_from_slice(&random_bytes::<16>());
    let sum = checksum(&b, 64);
    b[64..68].copy_from_slice(&sum.to_be_bytes());
    b
}

struct Footer {
    data_offset: u64,
    disk_type: u32,
    /// The size the guest sees.
    size: u64,
    /// The larger of `current_size` and the CHS size: a BAT may cover
    /// either, never more.
    max_size: u64,
}

fn bad(path: &Path, problem: VhdProblem) -> Error {
    Error::BadVhd { path: path.to_owned(), problem }
}

fn parse_footer(path: &Path, b: &[u8; 512], at: &'static str) -> Result<Footer> {
    if &b[0..8] != COOKIE {
        return Err(bad(path, VhdProblem::NoFooter { at }));
    }
    let (stored, computed) = (be32(b, 64), checksum(b, 64));
    if stored != computed {
        return Err(bad(path, VhdProblem::FooterChecksum { at, stored, computed }));
    }
    let current_size = be64(b, 48);
    let chs_size = be16(b, 56) as u64 * b[58] as u64 * b[59] as u64 * 512;
    // QEMU's rule: images from Virtual PC and old QEMU ("vpc ", "qemu", ...)
    // are as large as their CHS geometry says; Hyper-V's ("win ") and the
    // like, or any image at the maximum geometry, use current_size.
    let by_size = matches!(&b[28..32], b"win " | b"qem2" | b"d2v " | b"CTXS" | b"tap\0");
    let size = if by_size || chs_size == MAX_GEOMETRY_SECTORS * 512 { current_size } else { chs_size };
    for s in [size, current_size] {
        if s > MAX_SIZE {
            return Err(bad(path, VhdProblem::DiskTooLarge { size: s, max: MAX_SIZE }));
        }
    }
    if !size.is_multiple_of(512) {
        return Err(bad(path, VhdProblem::SizeNotSectors { size }));
    }
    Ok(Footer { data_offset: be64(b, 16), disk_type: be32(b, 60), size, max_size: size.max(current_size) })
}

fn read_block<const N: usize>(file: &ImageFile, path: &Path, offset: u64, what: &str) -> Result<[u8; N]> {
    let mut b = [0u8; N];
    file.read_exact_at(&mut b, offset).map_err(|e| read_error(path, NAME, what, e))?;
    Ok(b)
}

/// Fixed or dynamic, from the footer at the end of the file. Only that
/// footer is read: in a fixed VHD the first sector is guest data, so a
/// guest that writes a dynamic footer there must not turn its disk into a
/// dynamic one on the next open. (A dynamic VHD's copy at offset 0 is then
/// checked against it by [`Vhd::open_dynamic`].)
pub fn probe(path: &Path) -> Result<Format> {
    let file = ImageFile::open(path, false, Cache::Host).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len < FOOTER {
        return Err(bad(path, VhdProblem::TooShort { len, min: FOOTER, what: "a VHD footer" }));
    }
    let tail: [u8; 512] = read_block(&file, path, len - FOOTER, "footer")?;
    let f = parse_footer(path, &tail, "at the end of the file")?;
    match f.disk_type {
        TYPE_FIXED => Ok(Format::VhdFixed),
        TYPE_DYNAMIC => Ok(Format::VhdDynamic),
        TYPE_DIFFERENCING => Err(Error::Unsupported { path: path.to_owned(), reason: "differencing VHD".into() }),
        found => Err(bad(path, VhdProblem::DiskType { found, expected: "fixed (2) or dynamic (3)" })),
    }
}

fn create_new(path: &Path) -> Result<File> {
    OpenOptions::new().read(true).write(true).create_new(true).mode(0o644).open(path).map_err(|e| Error::io(path, e))
}

fn check_size(size: u64) -> Result<()> {
    if size > MAX_SIZE {
        return Err(Error::BadSize { size, reason: format!("VHD disks are at most {MAX_SIZE} bytes (2040 GiB)") });
    }
    Ok(())
}

pub fn create_fixed(path: &Path, size: u64) -> Result<()> {
    check_size(size)?;
    let file = create_new(path)?;
    let io = |e| Error::io(path, e);
    file.set_len(size).map_err(io)?;
    file.write_all_at(&footer(size, TYPE_FIXED, u64::MAX), size).map_err(io)?;
    file.sync_all().map_err(io)
}

pub fn create_dynamic(path: &Path, size: u64) -> Result<()> {
    check_size(size)?;
    let entries = size.div_ceil(BLOCK_SIZE);
    let table_offset = FOOTER + DYN_HEADER as u64;
    let bat_bytes = (entries * 4).next_multiple_of(512);
    let foot = footer(size, TYPE_DYNAMIC, FOOTER);

    let mut header = [0u8; DYN_HEADER];
    header[0..8].copy_from_slice(DYN_COOKIE);
    header[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
    header[16..24].copy_from_slice(&table_offset.to_be_bytes());
    header[24..28].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    header[28..32].copy_from_slice(&(entries as u32).to_be_bytes());
    header[32..36].copy_from_slice(&(BLOCK_SIZE as u32).to_be_bytes());
    let sum = checksum(&header, 36);
    header[36..40].copy_from_slice(&sum.to_be_bytes());

    let file = create_new(path)?;
    let io = |e| Error::io(path, e);
    file.write_all_at(&foot, 0).map_err(io)?;
    file.write_all_at(&header, FOOTER).map_err(io)?;
    file.write_all_at(&vec![0xff; bat_bytes as usize], table_offset).map_err(io)?;
    file.write_all_at(&foot, table_offset + bat_bytes).map_err(io)?;
    file.sync_all().map_err(io)
}

struct Dynamic {
    /// The footer as found at offset 0; rewritten at the end on every
    /// allocation.
    footer: [u8; 512],
    table_offset: u64,
    block_size: u64,
    bitmap_size: u64,
    bat: Vec<u32>,
    /// Whether a block's sector bitmap is known to be all ones (then a
    /// write need not touch it).
    bitmap_full: Vec<bool>,
    /// Where the next block goes: where the trailing footer is now.
    next_block: u64,
}

pub struct Vhd {
    file: ImageFile,
    path: PathBuf,
    size: u64,
    dynamic: Option<Dynamic>,
}

impl Vhd {
    fn open_file(path: &Path, writable: bool, cache: Cache) -> Result<(ImageFile, u64)> {
        let file = ImageFile::open(path, writable, cache).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        Ok((file, len))
    }

    pub fn open_fixed(path: &Path, writable: bool, cache: Cache) -> Result<Vhd> {
        let (file, len) = Vhd::open_file(path, writable, cache)?;
        if len < FOOTER {
            return Err(bad(path, VhdProblem::TooShort { len, min: FOOTER, what: "a VHD footer" }));
        }
        let f = parse_footer(path, &read_block(&file, path, len - FOOTER, "footer")?, "at the end of the file")?;
        if f.disk_type != TYPE_FIXED {
            return Err(bad(path, VhdProblem::DiskType { found: f.disk_type, expected: "fixed (2)" }));
        }
        if f.size > len - FOOTER {
            return Err(bad(path, VhdProblem::FixedTruncated { size: f.size, available: len - FOOTER }));
        }
        Ok(Vhd { file, path: path.to_owned(), size: f.size, dynamic: None })
    }

    /// Opens a dynamic VHD, checking every field before use: both footers,
    /// the dynamic header's place and checksum, a block size that is a sane
    /// power of two, a BAT exactly as large as the disk needs (so a crafted
    /// header cannot make us allocate gigabytes), inside the file and clear
    /// of the header and footers, and blocks inside the data area that do
    /// not overlap one another.
    pub fn open_dynamic(path: &Path, writable: bool, cache: Cache) -> Result<Vhd> {
        let (file, len) = Vhd::open_file(path, writable, cache)?;
        let min = 2 * FOOTER + DYN_HEADER as u64;
        if len < min {
            return Err(bad(path, VhdProblem::TooShort { len, min, what: "a dynamic VHD" }));
        }
        let head: [u8; 512] = read_block(&file, path, 0, "footer copy")?;
        let f = parse_footer(path, &head, "at offset 0")?;
        match f.disk_type {
            TYPE_DYNAMIC => {}
            TYPE_DIFFERENCING => {
                return Err(Error::Unsupported { path: path.to_owned(), reason: "differencing VHD".into() })
            }
            found => return Err(bad(path, VhdProblem::DiskType { found, expected: "dynamic (3)" })),
        }
        let tail: [u8; 512] = read_block(&file, path, len - FOOTER, "footer")?;
        let t = parse_footer(path, &tail, "at the end of the file")?;
        if (t.disk_type, t.size, t.data_offset) != (f.disk_type, f.size, f.data_offset) {
            return Err(bad(path, VhdProblem::FootersDiffer));
        }
        // The footers occupy [0, 512) and [len - 512, len); everything
        // else the header describes must lie between them.
        let data_end = len - FOOTER;
        let within =
            |start: u64, bytes: u64| start >= FOOTER && start.checked_add(bytes).is_some_and(|e| e <= data_end);
        let header_at = f.data_offset;
        if !header_at.is_multiple_of(512) || !within(header_at, DYN_HEADER as u64) {
            return Err(bad(path, VhdProblem::HeaderOffset { offset: header_at }));
        }
        let h: [u8; DYN_HEADER] = read_block(&file, path, header_at, "dynamic header")?;
        if &h[0..8] != DYN_COOKIE {
            return Err(bad(path, VhdProblem::NoDynamicHeader { offset: header_at }));
        }
        let (stored, computed) = (be32(&h, 36), checksum(&h, 36));
        if stored != computed {
            return Err(bad(path, VhdProblem::HeaderChecksum { stored, computed }));
        }
        let table_offset = be64(&h, 16);
        let entries = be32(&h, 28) as u64;
        let block_size = be32(&h, 32) as u64;
        if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
            return Err(bad(
                path,
                VhdProblem::BlockSize { size: block_size, min: MIN_BLOCK_SIZE, max: MAX_BLOCK_SIZE },
            ));
        }
        // Both bounds: from below so every sector has an entry, from above
        // (by the disk size, not the file size: a sparse file can claim any
        // length) so the table we allocate is only as large as the disk.
        if entries * block_size < f.size {
            return Err(bad(path, VhdProblem::BatTooSmall { entries, block_size, size: f.size }));
        }
        let max = f.max_size.div_ceil(block_size).max(1);
        if entries > max {
            return Err(bad(path, VhdProblem::BatTooLarge { entries, max, size: f.max_size }));
        }
        let bat_bytes = entries * 4;
        let header_end = header_at + DYN_HEADER as u64;
        let overlaps_header = table_offset < header_end && header_at < table_offset.saturating_add(bat_bytes);
        if !within(table_offset, bat_bytes) || overlaps_header {
            return Err(bad(path, VhdProblem::BatOutsideFile { offset: table_offset, entries }));
        }
        let mut raw = vec![0u8; bat_bytes as usize];
        file.read_exact_at(&mut raw, table_offset).map_err(|e| read_error(path, NAME, "BAT", e))?;
        let bat: Vec<u32> = raw.chunks_exact(4).map(|c| u32::from_be_bytes(c.try_into().unwrap())).collect();
        drop(raw);
        let bitmap_size = (block_size / 512).div_ceil(8).next_multiple_of(512);
        let metadata_end = header_end.max(table_offset + bat_bytes);
        let mut next_block = data_end / 512 * 512;
        let mut used: Vec<(u64, usize)> = Vec::new();
        for (i, &e) in bat.iter().enumerate() {
            if e == UNUSED {
                continue;
            }
            let start = e as u64 * 512;
            let end = start + bitmap_size + block_size;
            if start < metadata_end || end > data_end {
                return Err(bad(path, VhdProblem::BlockOutsideData { index: i, start }));
            }
            used.push((start, i));
            next_block = next_block.max(end);
        }
        used.sort_unstable();
        for w in used.windows(2) {
            if w[0].0 + bitmap_size + block_size > w[1].0 {
                return Err(bad(path, VhdProblem::BlocksOverlap { first: w[0].1, second: w[1].1 }));
            }
        }
        let dynamic = Dynamic {
            footer: head,
            table_offset,
            block_size,
            bitmap_size,
            bitmap_full: vec![false; bat.len()],
            bat,
            next_block,
        };
        Ok(Vhd { file, path: path.to_owned(), size: f.size, dynamic: Some(dynamic) })
    }

    fn io(&self, e: std::io::Error) -> Error {
        Error::io(&self.path, e)
    }

    /// Appends a block for BAT entry `index`: the footer moves past it and
    /// its bitmap says every sector is present. The BAT entry itself is
    /// written by the caller after the data, so a crash in between leaks a
    /// block instead of exposing one that was never written.
    fn allocate(&mut self, index: usize) -> Result<u64> {
        let d = self.dynamic.as_ref().unwrap();
        let start = d.next_block;
        if start / 512 >= UNUSED as u64 {
            return Err(Error::CorruptImage {
                path: self.path.clone(),
                format: NAME,
                reason: "file too large for a 32-bit BAT sector offset".into(),
            });
        }
        let end = start + d.bitmap_size + d.block_size;
        self.file.write_all_at(&d.footer, end).map_err(|e| self.io(e))?;
        self.file.write_all_at(&vec![0xff; d.bitmap_size as usize], start).map_err(|e| self.io(e))?;
        let d = self.dynamic.as_mut().unwrap();
        d.next_block = end;
        d.bitmap_full[index] = true;
        Ok(start)
    }

    fn commit_bat(&mut self, index: usize, start: u64) -> Result<()> {
        let d = self.dynamic.as_mut().unwrap();
        let entry = (start / 512) as u32;
        d.bat[index] = entry;
        let at = d.table_offset + index as u64 * 4;
        self.file.write_all_at(&entry.to_be_bytes(), at).map_err(|e| Error::io(&self.path, e))
    }

    /// Sets the bitmap bits of sectors `[first, first + count)` in an
    /// already allocated block, unless the bitmap is known to be full.
    fn mark_sectors(&mut self, index: usize, block_start: u64, first: u64, count: u64) -> Result<()> {
        let d = self.dynamic.as_ref().unwrap();
        if d.bitmap_full[index] {
            return Ok(());
        }
        let mut bitmap = vec![0u8; d.bitmap_size as usize];
        self.file
            .read_exact_at(&mut bitmap, block_start)
            .map_err(|e| read_error(&self.path, NAME, "sector bitmap", e))?;
        let sectors = d.block_size / 512;
        let mut changed = false;
        for s in first..first + count {
            let (byte, bit) = ((s / 8) as usize, 7 - (s % 8)); // most significant bit first
            if bitmap[byte] & (1 << bit) == 0 {
                bitmap[byte] |= 1 << bit;
                changed = true;
            }
        }
        if changed {
            self.file.write_all_at(&bitmap, block_start).map_err(|e| self.io(e))?;
        }
        let full = (0..sectors).all(|s| bitmap[(s / 8) as usize] & (1 << (7 - s % 8)) != 0);
        self.dynamic.as_mut().unwrap().bitmap_full[index] = full;
        Ok(())
    }
}

impl BlockBackend for Vhd {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let Some(d) = &self.dynamic else {
            return self.file.read_exact_at(buf, offset).map_err(|e| self.io(e));
        };
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (index, within) = ((pos / d.block_size) as usize, pos % d.block_size);
            let n = ((d.block_size - within) as usize).min(buf.len() - done);
            let chunk = &mut buf[done..done + n];
            match d.bat[index] {
                UNUSED => chunk.fill(0),
                e => {
                    let at = e as u64 * 512 + d.bitmap_size + within;
                    self.file.read_exact_at(chunk, at).map_err(|e| read_error(&self.path, NAME, "data block", e))?
                }
            }
            done += n;
        }
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        let Some(d) = &self.dynamic else {
            return self.file.write_all_at(buf, offset).map_err(|e| self.io(e));
        };
        let block_size = d.block_size;
        let bitmap_size = d.bitmap_size;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (index, within) = ((pos / block_size) as usize, pos % block_size);
            let n = ((block_size - within) as usize).min(buf.len() - done);
            let chunk = &buf[done..done + n];
            let entry = self.dynamic.as_ref().unwrap().bat[index];
            if entry == UNUSED {
                // Zeros into an unallocated block change nothing: keep it sparse.
                if chunk.iter().all(|&b| b == 0) {
                    done += n;
                    continue;
                }
                let start = self.allocate(index)?;
                self.file.write_all_at(chunk, start + bitmap_size + within).map_err(|e| self.io(e))?;
                self.commit_bat(index, start)?;
            } else {
                let start = entry as u64 * 512;
                self.file.write_all_at(chunk, start + bitmap_size + within).map_err(|e| self.io(e))?;
                let first = within / 512;
                let last = (within + n as u64).div_ceil(512);
                self.mark_sectors(index, start, first, last - first)?;
            }
            done += n;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        // sync_all, not sync_data: allocation grows the file.
        self.file.sync_all().map_err(|e| self.io(e))
    }

    fn len(&self) -> u64 {
        self.size
    }
}

#[cfg(test)]
pub fn checksum_for_tests(footer: &[u8; 512]) -> u32 {
    checksum(footer, 64)
}

#[cfg(test)]
pub fn header_checksum_for_tests(header: &[u8]) -> u32 {
    checksum(header, 36)
}
