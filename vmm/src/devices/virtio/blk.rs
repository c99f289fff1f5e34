//! virtio-blk backed by a disk image (raw, VHD fixed or dynamic, qcow2; see
//! csv-fs). Requests are served on the thread that notified (the vCPU), so
//! a FLUSH returns to the guest only once the data is durable. A disk on a
//! shared volume is written only while this host holds its lease.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use csv_fs::image::{BlockBackend, Image, OpenMode};
use csv_fs::volume::Volume;
use csv_fs::{Lease, LeaseKeeper, LeaseStore};

use serde::Serialize;
use virtio_queue::{Queue, QueueT};

use super::{complete, read_config_bytes, Interrupt, VirtioDevice, TYPE_BLOCK, VIRTIO_F_VERSION_1};
use crate::config::DiskConfig;
use crate::memory::GuestMemory;

pub const SECTOR: u64 = 512;
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
const ID_BYTES: usize = 20;
/// Data moves through a bounce buffer of this size, whatever the request.
const CHUNK: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("disk image {path} does not exist")]
    Missing { path: PathBuf },
    #[error("disk image {path} is read-only (add ',readonly' to attach it read-only): {source}")]
    ReadOnly { path: PathBuf, source: std::io::Error },
    #[error("cannot open disk image {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("disk image {path} is {size} bytes: a disk must be a non-zero multiple of 512 bytes")]
    BadSize { path: PathBuf, size: u64 },
    #[error("disk image {path} is in use by another VMM")]
    Locked { path: PathBuf },
    #[error("{0}")]
    Image(csv_fs::Error),
    #[error("{0}")]
    Lease(csv_fs::Error),
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct BlockStats {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub errors: u64,
    pub bad_chains: u64,
}

/// Who this host is to the volume's lease store.
#[derive(Clone, Debug)]
pub struct HostSide {
    pub host_id: String,
    pub lease_ttl: std::time::Duration,
    /// Take a crashed host's expired lease rather than refusing it.
    pub takeover: bool,
}

/// A disk on a shared volume: written only while its lease is live. The
/// keeper renews it; a lease that is lost or past its expiry stops all
/// writes (self-fencing) before another host can have taken the disk.
struct Fence {
    store: Arc<dyn LeaseStore>,
    disk: String,
    host: String,
    keeper: Option<LeaseKeeper>,
    /// Logged once, when writes are first refused.
    refused: bool,
}

impl Fence {
    fn start(&mut self, lease: Lease) {
        self.keeper = Some(LeaseKeeper::start(self.store.clone(), lease));
    }

    /// Why this host may not write now, if it may not.
    fn refusal(&self) -> Option<String> {
        let Some(keeper) = &self.keeper else {
            return Some("no lease held (standby)".into());
        };
        match keeper.validity() {
            Err(why) => Some(why),
            // Stop a third of the TTL before expiry: a healthy keeper renews
            // every third, and the margin covers a stall between this check
            // and the write, so nothing lands after another host may take over.
            Ok((expires, ttl)) if csv_fs::error::now_ms() + ttl / 3 >= expires => {
                Some(format!("lease not renewed in time (it expires at unix ms {expires})"))
            }
            Ok(_) => None,
        }
    }
}

pub struct Block {
    image: Image,
    /// A second descriptor on the image file for the host-local flock.
    lock_file: File,
    path: PathBuf,
    sectors: u64,
    readonly: bool,
    id: [u8; ID_BYTES],
    buf: Vec<u8>,
    fence: Option<Fence>,
    pub stats: BlockStats,
}

fn image_error(path: &Path, e: csv_fs::Error) -> Error {
    match e {
        csv_fs::Error::Io { source, .. } => match source.raw_os_error() {
            Some(libc::ENOENT) => Error::Missing { path: path.to_owned() },
            Some(libc::EROFS) | Some(libc::EACCES) | Some(libc::EPERM) => {
                Error::ReadOnly { path: path.to_owned(), source }
            }
            _ => Error::Open { path: path.to_owned(), source },
        },
        other => Error::Image(other),
    }
}

impl Block {
    /// Opens `path`, taking an exclusive lock so no second VMM on this host
    /// writes the same image.
    pub fn open(path: &Path, readonly: bool) -> Result<Block, Error> {
        let block = Block::open_standby(path, readonly)?;
        block.lock()?;
        block.activated()
    }

    /// Opens `path` without taking its lock or writing: a migration
    /// destination holds the image this way until the source hands it over.
    pub fn open_standby(path: &Path, readonly: bool) -> Result<Block, Error> {
        if !path.exists() {
            return Err(Error::Missing { path: path.to_owned() });
        }
        let mode = if readonly { OpenMode::ReadOnly } else { OpenMode::Standby };
        let image = Image::open(path, mode).map_err(|e| image_error(path, e))?;
        let lock_file = File::open(path).map_err(|source| Error::Open { path: path.to_owned(), source })?;
        let size = image.len();
        if size == 0 || !size.is_multiple_of(SECTOR) {
            return Err(Error::BadSize { path: path.to_owned(), size });
        }
        Ok(Block {
            id: disk_id(path),
            image,
            lock_file,
            path: path.to_owned(),
            sectors: size / SECTOR,
            readonly,
            buf: vec![0; CHUNK],
            fence: None,
            stats: BlockStats::default(),
        })
    }

    /// Opens a configured disk: on a shared volume under its lease
    /// (acquired, or taken over with `host.takeover`), else under the
    /// host-local lock. `standby` defers both to `acquire_backend`.
    pub fn from_config(cfg: &DiskConfig, host: &HostSide, standby: bool) -> Result<Block, Error> {
        let Some(vd) = &cfg.volume else {
            return if standby {
                Block::open_standby(&cfg.path, cfg.readonly)
            } else {
                Block::open(&cfg.path, cfg.readonly)
            };
        };
        let volume = Volume::open(&vd.volume).map_err(Error::Image)?;
        let path = volume.disk_path(&vd.name).map_err(Error::Image)?;
        let mut block = Block::open_standby(&path, cfg.readonly)?;
        let store: Arc<dyn LeaseStore> = Arc::new(volume.lease_store(host.lease_ttl));
        block.fence =
            Some(Fence { store, disk: vd.name.clone(), host: host.host_id.clone(), keeper: None, refused: false });
        if standby || cfg.readonly {
            return Ok(block);
        }
        let fence = block.fence.as_mut().expect("set above");
        let lease = if host.takeover {
            fence.store.takeover(&vd.name, &host.host_id)
        } else {
            fence.store.acquire(&vd.name, &host.host_id)
        }
        .map_err(Error::Lease)?;
        fence.start(lease);
        // No host-local flock here: the lease is the authority, and a hung
        // previous owner on the same kernel must not block a takeover.
        block.activated()
    }

    fn activated(mut self) -> Result<Block, Error> {
        if !self.readonly {
            self.image.activate().map_err(Error::Image)?;
        }
        Ok(self)
    }

    /// Takes the image's host-local lock (exclusive unless read-only).
    pub fn lock(&self) -> Result<(), Error> {
        let lock = if self.readonly { libc::LOCK_SH } else { libc::LOCK_EX };
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(self.lock_file.as_raw_fd(), lock | libc::LOCK_NB) } != 0 {
            return Err(Error::Locked { path: self.path.clone() });
        }
        Ok(())
    }

    /// True if writes may go to the image now; logs the first refusal.
    fn may_write(&mut self) -> bool {
        let Some(fence) = &mut self.fence else { return true };
        match fence.refusal() {
            None => true,
            Some(why) => {
                if !fence.refused {
                    fence.refused = true;
                    tracing::error!(
                        "disk {} on the shared volume: writes refused, this host no longer owns it ({why}); \
                         the guest sees I/O errors (self-fencing)",
                        fence.disk
                    );
                }
                false
            }
        }
    }

    /// Hands the disk over at a migration's commit: the lease to `to_host`
    /// (epoch + 1) or the local lock released. The caller has flushed
    /// (`Vmm::release_backends` flushes every disk before any handoff).
    pub fn hand_over(&mut self, to_host: &str) -> Result<(), String> {
        let path = self.path.display().to_string();
        if !self.readonly && !self.may_write() {
            return Err(format!("disk {path}: this host no longer owns it; nothing to hand over"));
        }
        if let Some(fence) = &mut self.fence {
            if !self.readonly {
                let lease = fence
                    .keeper
                    .take()
                    .ok_or_else(|| format!("disk {path}: no lease to hand over"))?
                    .stop()
                    .map_err(|why| format!("disk {path}: lease lost before handoff: {why}"))?;
                fence.store.handoff(&lease, to_host).map_err(|e| e.to_string())?;
            }
        }
        // SAFETY: flock on a descriptor we own.
        unsafe { libc::flock(self.lock_file.as_raw_fd(), libc::LOCK_UN) };
        Ok(())
    }

    /// Takes a disk opened in standby: adopts the lease the source handed
    /// this host (or takes the local lock) and re-reads the image.
    pub fn take_over_from_standby(&mut self) -> Result<(), String> {
        match &mut self.fence {
            Some(fence) => {
                if !self.readonly {
                    let lease = fence.store.adopt(&fence.disk, &fence.host).map_err(|e| e.to_string())?;
                    fence.start(lease);
                }
            }
            None => self.lock().map_err(|e| e.to_string())?,
        }
        if !self.readonly {
            self.image.activate().map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// The lease epoch this device writes under (shared-volume disks).
    pub fn lease_epoch(&self) -> Option<u64> {
        self.fence.as_ref().and_then(|f| f.keeper.as_ref()).and_then(|k| k.lease().ok()).map(|l| l.epoch)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Serves one request; returns the bytes written into the chain's
    /// writable part (data + status).
    fn serve(&mut self, chain: virtio_queue::DescriptorChain<&GuestMemory>, mem: &GuestMemory) -> u32 {
        let mut reader = match chain.clone().reader(mem) {
            Ok(r) => r,
            Err(_) => return self.bad_chain(chain, mem),
        };
        let mut writer = match chain.clone().writer(mem) {
            Ok(w) if w.available_bytes() >= 1 => w,
            _ => return self.bad_chain(chain, mem),
        };
        let mut header = [0u8; 16];
        if reader.read_exact(&mut header).is_err() {
            return self.bad_chain(chain, mem);
        }
        let kind = u32::from_le_bytes(header[0..4].try_into().unwrap());
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap());
        let data_len = writer.available_bytes() - 1;
        let mut status_writer = match writer.split_at(data_len) {
            Ok(s) => s,
            Err(_) => return self.bad_chain(chain, mem),
        };
        let (status, written) = match kind {
            T_IN => self.read(sector, &mut writer),
            T_OUT => (self.write(sector, &mut reader), 0),
            T_FLUSH => (self.flush(), 0),
            T_GET_ID => {
                let n = data_len.min(ID_BYTES);
                match writer.write_all(&self.id[..n]) {
                    Ok(()) => (S_OK, n),
                    Err(_) => (S_IOERR, 0),
                }
            }
            _ => (S_UNSUPP, 0),
        };
        if status != S_OK {
            self.stats.errors += 1;
        }
        match status_writer.write_all(&[status]) {
            Ok(()) => written as u32 + 1,
            Err(_) => written as u32,
        }
    }

    /// The offset of `len` bytes at `sector`, if it lies within the disk.
    fn range(&self, sector: u64, len: usize) -> Option<u64> {
        let start = sector.checked_mul(SECTOR)?;
        let end = start.checked_add(len as u64)?;
        (end <= self.sectors * SECTOR && (len as u64).is_multiple_of(SECTOR)).then_some(start)
    }

    fn read(
        &mut self,
        sector: u64,
        writer: &mut virtio_queue::Writer<'_, impl vm_memory::bitmap::BitmapSlice>,
    ) -> (u8, usize) {
        let len = writer.available_bytes();
        let Some(mut offset) = self.range(sector, len) else { return (S_IOERR, 0) };
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            if self.image.read_at(&mut self.buf[..n], offset).is_err() || writer.write_all(&self.buf[..n]).is_err() {
                return (S_IOERR, done);
            }
            done += n;
            offset += n as u64;
        }
        self.stats.reads += 1;
        (S_OK, done)
    }

    fn write(&mut self, sector: u64, reader: &mut virtio_queue::Reader<'_, impl vm_memory::bitmap::BitmapSlice>) -> u8 {
        if self.readonly || !self.may_write() {
            return S_IOERR;
        }
        let len = reader.available_bytes();
        let Some(mut offset) = self.range(sector, len) else { return S_IOERR };
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            if reader.read_exact(&mut self.buf[..n]).is_err() || self.image.write_at(&self.buf[..n], offset).is_err() {
                return S_IOERR;
            }
            done += n;
            offset += n as u64;
        }
        self.stats.writes += 1;
        S_OK
    }

    fn flush(&mut self) -> u8 {
        self.stats.flushes += 1;
        if !self.readonly && !self.may_write() {
            return S_IOERR;
        }
        match self.image.flush() {
            Ok(()) => S_OK,
            Err(e) => {
                tracing::error!("disk {}: flush failed: {e}", self.path.display());
                S_IOERR
            }
        }
    }

    /// A chain we cannot parse: if its last descriptor is a writable byte
    /// inside guest memory, report IOERR there; otherwise return it empty.
    fn bad_chain(&mut self, chain: virtio_queue::DescriptorChain<&GuestMemory>, mem: &GuestMemory) -> u32 {
        use vm_memory::Bytes;
        self.stats.bad_chains += 1;
        tracing::debug!("disk {}: malformed request", self.path.display());
        let last = chain.take(64).last();
        match last {
            Some(d) if d.is_write_only() && d.len() >= 1 => {
                let at = vm_memory::GuestAddress(d.addr().0.wrapping_add(u64::from(d.len()) - 1));
                u32::from(mem.write_obj(S_IOERR, at).is_ok())
            }
            _ => 0,
        }
    }
}

impl Block {
    /// A VM that stops here gives its shared disk back, so the next host
    /// can acquire it at once instead of waiting for a takeover. (After a
    /// handoff the keeper is gone and there is nothing to release.)
    fn close(&mut self) {
        // A host that lost the lease must not even flush (qcow2 metadata).
        let owned = self.readonly || self.may_write();
        if let Some(fence) = &mut self.fence {
            if let Some(keeper) = fence.keeper.take() {
                if let (true, Ok(lease)) = (owned, keeper.stop()) {
                    let _ = self.image.flush();
                    if let Err(e) = fence.store.release(&lease) {
                        tracing::warn!("disk {}: lease not released: {e}", fence.disk);
                    }
                }
            }
        }
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.close();
    }
}

/// 20 bytes naming the image, from its file name (what `GET_ID` returns).
fn disk_id(path: &Path) -> [u8; ID_BYTES] {
    let mut id = [0u8; ID_BYTES];
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let n = name.len().min(ID_BYTES);
    id[..n].copy_from_slice(&name.as_bytes()[..n]);
    id
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn release_backend(&mut self, to_host: &str) -> Result<(), String> {
        self.hand_over(to_host)
    }

    fn acquire_backend(&mut self) -> Result<(), String> {
        self.take_over_from_standby()
    }

    fn close_backend(&mut self) {
        self.close();
    }

    fn flush_backend(&mut self) -> Result<(), String> {
        if self.readonly {
            return Ok(());
        }
        if !self.may_write() {
            return Err(format!("disk {}: this host no longer owns it", self.path.display()));
        }
        self.image.flush().map_err(|e| format!("disk {}: flush failed: {e}", self.path.display()))
    }

    fn features(&self) -> u64 {
        let ro = if self.readonly { VIRTIO_BLK_F_RO } else { 0 };
        VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH | ro
    }

    fn queue_count(&self) -> usize {
        1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut space = [0u8; 8];
        space.copy_from_slice(&self.sectors.to_le_bytes());
        read_config_bytes(&space, offset, data);
    }

    fn backend(&self) -> crate::state::devices::BackendSnapshot {
        crate::state::devices::BackendSnapshot::Block {
            path: self.path.clone(),
            sectors: self.sectors,
            readonly: self.readonly,
        }
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "type": "block",
            "path": self.path,
            "sectors": self.sectors,
            "readonly": self.readonly,
            "format": self.image.format().name(),
            "lease_epoch": self.lease_epoch(),
            "stats": self.stats,
        })
    }

    fn queue_notify(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemory, irq: &Interrupt) {
        let Some(q) = queues.get_mut(index) else { return };
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let len = self.serve(chain, mem);
            complete(q, mem, head, len, irq);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_checks_name_the_problem() {
        let dir = std::env::temp_dir().join(format!("ferry-blk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.img");
        assert!(matches!(Block::open(&missing, false), Err(Error::Missing { .. })));
        let odd = dir.join("odd.img");
        std::fs::write(&odd, vec![0u8; 1000]).unwrap();
        let e = Block::open(&odd, false).err().unwrap();
        assert!(e.to_string().contains("1000 bytes"), "{e}");
        let good = dir.join("good.img");
        std::fs::write(&good, vec![0u8; 4096]).unwrap();
        let b = Block::open(&good, false).unwrap();
        assert_eq!(b.sectors(), 8);
        assert!(matches!(Block::open(&good, false), Err(Error::Locked { .. })), "a second writer is refused");
        drop(b);
        assert!(Block::open(&good, true).is_ok());
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Requests a hostile or buggy driver could make, driven through a real
/// split queue in guest memory.
#[cfg(test)]
mod queue_tests {
    use std::sync::Arc;

    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

    use super::*;

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const HDR: u64 = 0x4000;
    const DATA: u64 = 0x5000;
    const STATUS: u64 = 0x6000;
    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;

    struct Rig {
        ram: crate::memory::GuestRam,
        queue: Queue,
        blk: Block,
        irq: Arc<Interrupt>,
        _dir: PathBuf,
    }

    fn rig(tag: &str) -> Rig {
        let dir = std::env::temp_dir().join(format!("ferry-blkq-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("disk.img");
        std::fs::write(&img, vec![0x11u8; 64 * 1024]).unwrap();
        let ram = crate::memory::create(16).unwrap();
        let mut queue = Queue::new(16).unwrap();
        queue.set_size(16);
        queue.set_desc_table_address(Some(DESC as u32), Some(0));
        queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        queue.set_used_ring_address(Some(USED as u32), Some(0));
        queue.set_ready(true);
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        Rig { ram, queue, blk: Block::open(&img, false).unwrap(), irq, _dir: dir }
    }

    impl Rig {
        fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let at = GuestAddress(DESC + u64::from(i) * 16);
            let m = &self.ram.memory;
            m.write_obj(addr, at).unwrap();
            m.write_obj(len, at.unchecked_add(8)).unwrap();
            m.write_obj(flags, at.unchecked_add(12)).unwrap();
            m.write_obj(next, at.unchecked_add(14)).unwrap();
        }

        fn header(&self, kind: u32, sector: u64) {
            self.ram.memory.write_obj(kind, GuestAddress(HDR)).unwrap();
            self.ram.memory.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
        }

        /// Makes chain `head` available, notifies, returns (status, used len).
        fn submit(&mut self, head: u16) -> (u8, u32) {
            let m = &self.ram.memory;
            let idx: u16 = m.read_obj(GuestAddress(AVAIL + 2)).unwrap();
            m.write_obj(STATUS_UNTOUCHED, GuestAddress(STATUS)).unwrap();
            m.write_obj(head, GuestAddress(AVAIL + 4 + u64::from(idx % 16) * 2)).unwrap();
            m.write_obj(idx.wrapping_add(1), GuestAddress(AVAIL + 2)).unwrap();
            let mut queues = [std::mem::replace(&mut self.queue, Queue::new(16).unwrap())];
            self.blk.queue_notify(0, &mut queues, m, &self.irq);
            let [q] = queues;
            self.queue = q;
            let used_idx: u16 = m.read_obj(GuestAddress(USED + 2)).unwrap();
            assert_eq!(used_idx, idx.wrapping_add(1), "every request is returned, good or bad");
            let len: u32 = m.read_obj(GuestAddress(USED + 4 + u64::from(idx % 16) * 8 + 4)).unwrap();
            (m.read_obj(GuestAddress(STATUS)).unwrap(), len)
        }
    }

    use vm_memory::Address;
    const STATUS_UNTOUCHED: u8 = 0xee;

    #[test]
    fn well_formed_read_and_write_round_trip() {
        let mut r = rig("ok");
        r.ram.memory.write_slice(&[0xabu8; 1024], GuestAddress(DATA)).unwrap();
        r.header(T_OUT, 4);
        r.desc(0, HDR, 16, F_NEXT, 1);
        r.desc(1, DATA, 1024, F_NEXT, 2);
        r.desc(2, STATUS, 1, F_WRITE, 0);
        assert_eq!(r.submit(0), (S_OK, 1));
        r.ram.memory.write_slice(&[0u8; 1024], GuestAddress(DATA)).unwrap();
        r.header(T_IN, 4);
        r.desc(1, DATA, 1024, F_NEXT | F_WRITE, 2);
        assert_eq!(r.submit(0), (S_OK, 1025));
        let mut back = [0u8; 1024];
        r.ram.memory.read_slice(&mut back, GuestAddress(DATA)).unwrap();
        assert_eq!(back, [0xab; 1024]);
    }

    #[test]
    fn out_of_range_address_gets_an_error_status() {
        let mut r = rig("oob");
        r.header(T_IN, 0);
        r.desc(0, HDR, 16, F_NEXT, 1);
        r.desc(1, 0x7f_0000_0000, 512, F_NEXT | F_WRITE, 2);
        r.desc(2, STATUS, 1, F_WRITE, 0);
        assert_eq!(r.submit(0).0, S_IOERR);
        assert_eq!(r.blk.stats.bad_chains, 1);
    }

    #[test]
    fn descriptor_loop_terminates() {
        let mut r = rig("loop");
        r.header(T_IN, 0);
        r.desc(0, HDR, 16, F_NEXT, 1);
        r.desc(1, DATA, 512, F_NEXT | F_WRITE, 2);
        r.desc(2, DATA, 512, F_NEXT | F_WRITE, 1); // 1 -> 2 -> 1 ...
                                                   // The walk stops after queue-size descriptors; what it saw is not a
                                                   // valid request (its data is not whole sectors), so it fails.
        let (status, len) = r.submit(0);
        assert_eq!(status, STATUS_UNTOUCHED, "nothing written outside the chain");
        assert_eq!(len, 1, "only the error status byte was written");
        assert_eq!(r.blk.stats.errors, 1);
        let mut last = [0u8; 1];
        r.ram.memory.read_slice(&mut last, GuestAddress(DATA + 511)).unwrap();
        assert_eq!(last, [S_IOERR]);
    }

    #[test]
    fn oversized_descriptor_is_refused() {
        let mut r = rig("huge");
        r.header(T_IN, 0);
        r.desc(0, HDR, 16, F_NEXT, 1);
        r.desc(1, DATA, 0x7fff_ffff, F_NEXT | F_WRITE, 2);
        r.desc(2, STATUS, 1, F_WRITE, 0);
        assert_eq!(r.submit(0).0, S_IOERR);
    }

    #[test]
    fn sector_past_the_end_is_an_io_error_not_a_short_read() {
        let mut r = rig("sector");
        r.header(T_IN, 127); // the disk has 128 sectors; 2 asked
        r.desc(0, HDR, 16, F_NEXT, 1);
        r.desc(1, DATA, 1024, F_NEXT | F_WRITE, 2);
        r.desc(2, STATUS, 1, F_WRITE, 0);
        assert_eq!(r.submit(0).0, S_IOERR);
        r.header(T_IN, u64::MAX / 256);
        assert_eq!(r.submit(0).0, S_IOERR, "sector * 512 overflow is caught");
        r.header(99, 0);
        assert_eq!(r.submit(0).0, S_UNSUPP);
    }
}
