//! qcow2 through `imago` (sync mode): QEMU's own format, written in a way
//! `qemu-img check` accepts. Backing files and external data files are
//! refused: a disk on the volume is self-contained.
//!
//! imago trusts the metadata it reads: a crafted refcount table makes it
//! recurse without bound allocating refcount blocks (a stack overflow on
//! the first write), and refcounts of zero on metadata let it allocate data
//! over the header or its tables. So [`validate`] checks the header and the
//! whole metadata layout (header, L1 table, refcount table, refcount blocks,
//! L2 tables: aligned, inside the file, disjoint, and each with a non-zero
//! refcount; every data cluster an L2 table maps: inside the file, off the
//! metadata, counted) before imago sees the image, and refuses by name.
//! This reads every L2 table once per open (about 1/8192 of the allocated
//! data with 64 KiB clusters). Not checked: two L2 entries sharing one data
//! cluster (the guest sees aliased data; the metadata stays intact).

use std::collections::hash_map::{Entry, HashMap};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use imago::file::File;
use imago::{DenyImplicitOpenGate, FormatAccess, FormatCreateBuilder, FormatDriverBuilder, Storage};
use imago::{StorageCreateOptions, StorageOpenOptions};

use super::file::Cache;
use super::BlockBackend;
use crate::error::{Error, Qcow2Problem, Result};

type Driver = imago::qcow2::Qcow2<File>;

pub struct Qcow2 {
    access: FormatAccess<File>,
    path: PathBuf,
    /// Sync after every write (`Cache::Direct` where `O_DIRECT` is missing).
    write_through: bool,
}

/// imago reports bad images as `InvalidData`/`InvalidInput`/`Other`
/// errors with a message; those are corrupt images, not I/O trouble.
fn map_err(path: &Path, e: io::Error) -> Error {
    match e.kind() {
        io::ErrorKind::InvalidData
        | io::ErrorKind::InvalidInput
        | io::ErrorKind::UnexpectedEof
        | io::ErrorKind::Other => Error::CorruptImage { path: path.to_owned(), format: "qcow2", reason: e.to_string() },
        io::ErrorKind::Unsupported => Error::Unsupported { path: path.to_owned(), reason: e.to_string() },
        _ => Error::io(path, e),
    }
}

impl Qcow2 {
    pub fn open(path: &Path, writable: bool, cache: Cache) -> Result<Qcow2> {
        validate(path)?;
        let options = || StorageOpenOptions::new().filename(path).write(writable);
        // imago bounces unaligned requests itself under O_DIRECT.
        let mut write_through = false;
        let file = match cache {
            Cache::Host => File::open(options()),
            Cache::Direct => File::open(options().direct(true)).or_else(|e| match e.raw_os_error() {
                Some(libc::EINVAL) => {
                    tracing::warn!(path = %path.display(), "no O_DIRECT on this filesystem: writing through");
                    write_through = true;
                    File::open(options())
                }
                _ => Err(e),
            }),
        }
        .map_err(|e| Error::io(path, e))?;
        let driver = Driver::builder(file)
            .backing(None)
            .data_file(None)
            .write(writable)
            .open(DenyImplicitOpenGate::default())
            .map_err(|e| map_err(path, e))?;
        if driver.implicit_backing_file().is_some() || driver.requires_external_data_file() {
            return Err(Error::Unsupported {
                path: path.to_owned(),
                reason: "qcow2 with a backing file or an external data file".into(),
            });
        }
        Ok(Qcow2 { access: FormatAccess::new(driver), path: path.to_owned(), write_through })
    }
}

pub fn create(path: &Path, size: u64) -> Result<()> {
    let file = File::create_open(StorageCreateOptions::new().filename(path)).map_err(|e| Error::io(path, e))?;
    let result = Driver::create_builder(file).size(size).create();
    if let Err(e) = result {
        let _ = std::fs::remove_file(path);
        return Err(map_err(path, e));
    }
    // Creation wrote through its own handle; make it durable by path.
    std::fs::File::open(path).and_then(|f| f.sync_all()).map_err(|e| Error::io(path, e))
}

impl BlockBackend for Qcow2 {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.access.read(buf, offset).map_err(|e| map_err(&self.path, e))
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.access.write(buf, offset).map_err(|e| map_err(&self.path, e))?;
        // Write the metadata the write changed (new L2 entries, refcounts)
        // out of imago's cache into the file now: a VMM killed with
        // SIGKILL then leaves a consistent image (the page cache keeps what
        // reached the file; only `flush` makes it durable against power
        // loss). Without it a kill left L1 pointing at an L2 table whose
        // refcount was still in the dead process's cache.
        self.access.flush().map_err(|e| map_err(&self.path, e))?;
        if self.write_through {
            self.access.sync().map_err(|e| map_err(&self.path, e))?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        // flush writes cached metadata out; sync makes it durable.
        self.access.flush().and_then(|_| self.access.sync()).map_err(|e| map_err(&self.path, e))
    }

    fn len(&self) -> u64 {
        self.access.size()
    }
}

const MAGIC: u32 = 0x5146_49fb;
const V2_HEADER: u64 = 72;
const V3_HEADER: u32 = 104;
/// imago's and QEMU's range: 512 bytes to 2 MiB.
const CLUSTER_BITS: std::ops::RangeInclusive<u32> = 9..=21;
/// Ferry's limit on the virtual size (64 TiB).
pub const MAX_SIZE: u64 = 64 << 40;
/// QEMU's limits on the tables (`QCOW_MAX_L1_SIZE`, `QCOW_MAX_REFTABLE_SIZE`).
const MAX_L1_BYTES: u64 = 32 << 20;
const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Offset bits of L1, L2-pointer and refcount-table entries (bits 9-55);
/// bit 63 of an L1 entry is the "copied" flag.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L1_COPIED: u64 = 1 << 63;
/// L2 entries: bit 62 marks a compressed cluster (whose descriptor holds
/// a byte offset and a sector count), bit 0 reads as zeros.
const L2_COMPRESSED: u64 = 1 << 62;
const L2_ZERO: u64 = 1;
/// Incompatible feature bits by name; imago reads none of them (external
/// data files aside, which Ferry refuses), so every set bit is refused.
const INCOMPATIBLE: [&str; 5] = ["dirty", "corrupt", "external data file", "compression type", "extended L2 entries"];
const EXT_END: u32 = 0;
const EXT_DATA_FILE: u32 = 0x4441_5441;
const EXT_ENCRYPTION: u32 = 0x0537_be77;

fn bad(path: &Path, problem: Qcow2Problem) -> Error {
    Error::BadQcow2 { path: path.to_owned(), problem }
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// One metadata structure: where it lies, whole clusters.
struct Extent {
    what: &'static str,
    start: u64,
    clusters: u64,
}

/// Sorts `extents` and refuses the first two that overlap.
fn disjoint(path: &Path, extents: &mut [Extent], cs: u64) -> Result<()> {
    extents.sort_by_key(|e| e.start);
    for w in extents.windows(2) {
        if w[0].start + w[0].clusters * cs > w[1].start {
            let (first, first_at, second, second_at) = (w[0].what, w[0].start, w[1].what, w[1].start);
            return Err(bad(path, Qcow2Problem::Overlap { first, first_at, second, second_at }));
        }
    }
    Ok(())
}

/// Checks the header and metadata layout of the qcow2 image at `path`
/// before imago reads it; see the module comment.
pub(super) fn validate(path: &Path) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let read = |buf: &mut [u8], at: u64, what: &str| {
        file.read_exact_at(buf, at).map_err(|e| super::read_error(path, "qcow2", what, e))
    };
    if len < V2_HEADER {
        return Err(bad(path, Qcow2Problem::TooShort { len, min: V2_HEADER, what: "a qcow2 header" }));
    }
    let mut h = vec![0u8; V2_HEADER as usize];
    read(&mut h, 0, "the header")?;
    let magic = be32(&h, 0);
    if magic != MAGIC {
        return Err(bad(path, Qcow2Problem::Magic { found: magic }));
    }
    let version = be32(&h, 4);
    if version != 2 && version != 3 {
        return Err(bad(path, Qcow2Problem::Version { found: version }));
    }
    let cluster_bits = be32(&h, 20);
    if !CLUSTER_BITS.contains(&cluster_bits) {
        let (min, max) = (*CLUSTER_BITS.start(), *CLUSTER_BITS.end());
        return Err(bad(path, Qcow2Problem::ClusterBits { found: cluster_bits, min, max }));
    }
    let cs = 1u64 << cluster_bits;
    if be64(&h, 8) != 0 || be32(&h, 16) != 0 {
        return Err(bad(path, Qcow2Problem::BackingFile));
    }
    let size = be64(&h, 24);
    if size > MAX_SIZE {
        return Err(bad(path, Qcow2Problem::DiskTooLarge { size, max: MAX_SIZE }));
    }
    let method = be32(&h, 32);
    if method != 0 {
        return Err(bad(path, Qcow2Problem::Encrypted { method }));
    }
    let snapshots = be32(&h, 60);
    if snapshots != 0 {
        return Err(bad(path, Qcow2Problem::Snapshots { count: snapshots }));
    }
    let (l1_entries, l1_offset) = (be32(&h, 36), be64(&h, 40));
    let (rt_offset, rt_clusters) = (be64(&h, 48), be32(&h, 56));

    if version == 3 {
        let min = u64::from(V3_HEADER);
        if len < min {
            return Err(bad(path, Qcow2Problem::TooShort { len, min, what: "a qcow2 v3 header" }));
        }
        let mut v3 = vec![0u8; (min - V2_HEADER) as usize];
        read(&mut v3, V2_HEADER, "the v3 header")?;
        let incompatible = be64(&v3, 0);
        if let Some(bit) = (0..64).find(|b| incompatible & (1 << b) != 0) {
            let name = INCOMPATIBLE.get(bit as usize).copied().unwrap_or("unknown");
            return Err(bad(path, Qcow2Problem::IncompatibleFeature { bit, name }));
        }
        let order = be32(&v3, 24);
        if order != 4 {
            let bits = 1u64.checked_shl(order).unwrap_or(0);
            return Err(bad(path, Qcow2Problem::RefcountOrder { found: order, bits }));
        }
        let header_len = be32(&v3, 28);
        if header_len < V3_HEADER || u64::from(header_len) > cs || !header_len.is_multiple_of(8) {
            return Err(bad(path, Qcow2Problem::HeaderLength { found: header_len, min: V3_HEADER, max: cs }));
        }
        // Header extensions, up to the end marker, inside the first cluster.
        let mut at = u64::from(header_len);
        loop {
            let mut e = [0u8; 8];
            if at + 8 > cs.min(len) {
                return Err(bad(path, Qcow2Problem::ExtensionsOverflow { offset: at }));
            }
            read(&mut e, at, "a header extension")?;
            let (kind, ext_len) = (be32(&e, 0), u64::from(be32(&e, 4)));
            if kind == EXT_END {
                break;
            }
            let name = match kind {
                EXT_DATA_FILE => Some("external data file"),
                EXT_ENCRYPTION => Some("full disk encryption"),
                _ => None,
            };
            if let Some(name) = name {
                return Err(bad(path, Qcow2Problem::Extension { kind, name }));
            }
            at += 8 + ext_len.next_multiple_of(8);
            if at > cs {
                return Err(bad(path, Qcow2Problem::ExtensionsOverflow { offset: at }));
            }
        }
    }

    // The L1 table: aligned, as large as the disk needs, inside the file.
    let l2_entries = cs / 8;
    let needed = size.div_ceil(cs * l2_entries);
    let max = MAX_L1_BYTES / 8;
    if u64::from(l1_entries) < needed || u64::from(l1_entries) > max {
        return Err(bad(path, Qcow2Problem::L1Size { entries: l1_entries, needed, max, size }));
    }
    let l1_bytes = u64::from(l1_entries) * 8;
    if !l1_offset.is_multiple_of(cs) {
        return Err(bad(path, Qcow2Problem::Unaligned { what: "the L1 table", offset: l1_offset }));
    }
    if l1_offset.checked_add(l1_bytes).is_none_or(|end| end > len) {
        let what = "the L1 table";
        return Err(bad(path, Qcow2Problem::OutsideFile { what, offset: l1_offset, len: l1_bytes, file_len: len }));
    }
    // The refcount table: aligned, bounded, wholly inside the file.
    let rt_bytes = u64::from(rt_clusters) * cs;
    if rt_clusters == 0 || rt_bytes > MAX_REFTABLE_BYTES {
        return Err(bad(path, Qcow2Problem::RefcountTableSize { clusters: rt_clusters, max: MAX_REFTABLE_BYTES / cs }));
    }
    if !rt_offset.is_multiple_of(cs) {
        return Err(bad(path, Qcow2Problem::Unaligned { what: "the refcount table", offset: rt_offset }));
    }
    if rt_offset.checked_add(rt_bytes).is_none_or(|end| end > len) {
        let what = "the refcount table";
        return Err(bad(path, Qcow2Problem::OutsideFile { what, offset: rt_offset, len: rt_bytes, file_len: len }));
    }

    let mut extents = vec![
        Extent { what: "the header", start: 0, clusters: 1 },
        Extent { what: "the L1 table", start: l1_offset, clusters: l1_bytes.div_ceil(cs) },
        Extent { what: "the refcount table", start: rt_offset, clusters: u64::from(rt_clusters) },
    ];
    // Before reading the tables: the header and the two tables apart.
    disjoint(path, &mut extents, cs)?;
    // A table's entries: each a cluster-aligned offset (or 0) to a whole
    // cluster inside the file.
    let entries = |offset: u64, bytes: u64, what: &'static str, flags: u64| -> Result<Vec<u64>> {
        let mut t = vec![0u8; bytes as usize];
        read(&mut t, offset, what)?;
        let mut out = Vec::new();
        for (i, e) in t.chunks_exact(8).map(|c| u64::from_be_bytes(c.try_into().unwrap())).enumerate() {
            if e & !(OFFSET_MASK | flags) != 0 {
                return Err(bad(path, Qcow2Problem::ReservedBits { what, index: i as u64, entry: e }));
            }
            out.push(e & OFFSET_MASK);
        }
        Ok(out)
    };
    let table_cluster = |offset: u64, what: &'static str| -> Result<()> {
        if !offset.is_multiple_of(cs) {
            return Err(bad(path, Qcow2Problem::Unaligned { what, offset }));
        }
        if offset.checked_add(cs).is_none_or(|end| end > len) {
            return Err(bad(path, Qcow2Problem::OutsideFile { what, offset, len: cs, file_len: len }));
        }
        Ok(())
    };
    let refblocks = entries(rt_offset, rt_bytes, "refcount table", 0)?;
    for &rb in refblocks.iter().filter(|&&rb| rb != 0) {
        table_cluster(rb, "a refcount block")?;
        extents.push(Extent { what: "a refcount block", start: rb, clusters: 1 });
    }
    for &l2 in entries(l1_offset, l1_bytes, "L1 table", L1_COPIED)?.iter().filter(|&&l2| l2 != 0) {
        table_cluster(l2, "an L2 table")?;
        extents.push(Extent { what: "an L2 table", start: l2, clusters: 1 });
    }
    disjoint(path, &mut extents, cs)?;
    // Every metadata cluster must be counted as used, or imago's allocator
    // hands it out again (and, for a refcount block's own range, recurses
    // trying to allocate the block that would count it).
    // Refcounts, each refcount block read once.
    let per_block = cs / 2;
    let mut blocks: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut referenced = |offset: u64| -> Result<bool> {
        let index = offset / cs;
        let rb = refblocks.get((index / per_block) as usize).copied().unwrap_or(0);
        if rb == 0 {
            return Ok(false);
        }
        let block = match blocks.entry(rb) {
            Entry::Occupied(o) => o.into_mut(),
            Entry::Vacant(v) => {
                let mut b = vec![0u8; cs as usize];
                read(&mut b, rb, "a refcount block")?;
                v.insert(b)
            }
        };
        let at = ((index % per_block) * 2) as usize;
        Ok(block[at..at + 2] != [0, 0])
    };
    for e in &extents {
        for c in 0..e.clusters {
            let offset = e.start + c * cs;
            if !referenced(offset)? {
                return Err(bad(path, Qcow2Problem::Unreferenced { what: e.what, offset }));
            }
        }
    }
    // Data clusters the L2 tables map: inside the file, off the metadata,
    // and counted, or imago would allocate over them (or them over its
    // metadata) on a write.
    let l2_tables: Vec<u64> = extents.iter().filter(|e| e.what == "an L2 table").map(|e| e.start).collect();
    let compressed_bits = 62 - (cluster_bits - 8);
    let mut table = vec![0u8; cs as usize];
    for l2 in l2_tables {
        read(&mut table, l2, "an L2 table")?;
        for (i, c) in table.chunks_exact(8).enumerate() {
            let e = u64::from_be_bytes(c.try_into().unwrap());
            let (what, offset) = if e & L2_COMPRESSED != 0 {
                ("a compressed cluster", e & ((1 << compressed_bits) - 1))
            } else {
                if e & !(OFFSET_MASK | L1_COPIED | L2_ZERO) != 0 {
                    return Err(bad(path, Qcow2Problem::ReservedBits { what: "L2 table", index: i as u64, entry: e }));
                }
                let offset = e & OFFSET_MASK;
                if !offset.is_multiple_of(cs) {
                    return Err(bad(path, Qcow2Problem::Unaligned { what: "a data cluster", offset }));
                }
                ("a data cluster", offset)
            };
            // Offset 0 is "unallocated" for a standard entry; a compressed
            // one always points somewhere (at 0: into the header).
            if offset == 0 && e & L2_COMPRESSED == 0 {
                continue;
            }
            if offset >= len {
                return Err(bad(path, Qcow2Problem::OutsideFile { what, offset, len: cs, file_len: len }));
            }
            let at = extents.partition_point(|m| m.start <= offset);
            if let Some(m) = at.checked_sub(1).map(|k| &extents[k]) {
                if offset < m.start + m.clusters * cs {
                    let (first, first_at, second, second_at) = (m.what, m.start, what, offset);
                    return Err(bad(path, Qcow2Problem::Overlap { first, first_at, second, second_at }));
                }
            }
            if !referenced(offset)? {
                return Err(bad(path, Qcow2Problem::Unreferenced { what, offset }));
            }
        }
    }
    Ok(())
}
