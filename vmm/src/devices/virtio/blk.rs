//! virtio-blk: the protocol over a [`Disk`] (raw, VHD fixed or dynamic,
//! qcow2; see csv-fs). Requests are served synchronously where the notify
//! lands (the vCPU, or the device thread with `--virtio-notify ioeventfd`),
//! and a FLUSH completes only once the data is durable.
//! Who may write the disk (locks, leases, fencing) is [`crate::devices::disk`]'s
//! business; a refused write is an I/O error to the guest.

use std::io::{Read, Write};
use std::path::Path;

use serde::Serialize;
use virtio_queue::{Queue, QueueT};

use super::{complete, notify_budget, read_config_bytes, Interrupt, VirtioDevice, TYPE_BLOCK, VIRTIO_F_VERSION_1};
use crate::devices::backend::Backend;
use crate::devices::disk::Disk;
pub use crate::devices::disk::SECTOR;
use crate::memory::GuestMemory;

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

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct BlockStats {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub errors: u64,
    pub bad_chains: u64,
}

pub struct Block {
    disk: Disk,
    id: [u8; ID_BYTES],
    buf: Vec<u8>,
    /// What the driver accepted (DRIVER_OK); FLUSH only if it took the
    /// feature.
    acked_features: u64,
    pub stats: BlockStats,
}

impl Block {
    pub fn new(disk: Disk) -> Block {
        Block { id: disk_id(disk.path()), disk, buf: vec![0; CHUNK], acked_features: 0, stats: BlockStats::default() }
    }

    pub fn path(&self) -> &Path {
        self.disk.path()
    }

    pub fn sectors(&self) -> u64 {
        self.disk.sectors()
    }

    pub fn disk(&self) -> &Disk {
        &self.disk
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
            // A driver that did not negotiate FLUSH gets no flush semantics.
            T_FLUSH if self.acked_features & VIRTIO_BLK_F_FLUSH == 0 => (S_UNSUPP, 0),
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
        (end <= self.disk.sectors() * SECTOR && (len as u64).is_multiple_of(SECTOR)).then_some(start)
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
            if self.disk.read_at(&mut self.buf[..n], offset).is_err() || writer.write_all(&self.buf[..n]).is_err() {
                return (S_IOERR, done);
            }
            done += n;
            offset += n as u64;
        }
        self.stats.reads += 1;
        (S_OK, done)
    }

    fn write(&mut self, sector: u64, reader: &mut virtio_queue::Reader<'_, impl vm_memory::bitmap::BitmapSlice>) -> u8 {
        if !self.disk.may_write() {
            return S_IOERR;
        }
        let len = reader.available_bytes();
        let Some(mut offset) = self.range(sector, len) else { return S_IOERR };
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            if reader.read_exact(&mut self.buf[..n]).is_err() || !self.disk.write_at(&self.buf[..n], offset) {
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
        if self.disk.guest_flush() {
            S_OK
        } else {
            S_IOERR
        }
    }

    /// A chain we cannot parse: if its last descriptor is a writable byte
    /// inside guest memory, report IOERR there; otherwise return it empty.
    fn bad_chain(&mut self, chain: virtio_queue::DescriptorChain<&GuestMemory>, mem: &GuestMemory) -> u32 {
        use vm_memory::Bytes;
        self.stats.bad_chains += 1;
        tracing::debug!("disk {}: malformed request", self.disk.path().display());
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

    fn backend_mut(&mut self) -> Option<&mut dyn Backend> {
        Some(&mut self.disk)
    }

    fn disk_identity(&self) -> Option<String> {
        Some(self.disk.identity().to_owned())
    }

    fn features(&self) -> u64 {
        let ro = if self.disk.readonly() { VIRTIO_BLK_F_RO } else { 0 };
        VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH | ro
    }

    fn queue_count(&self) -> usize {
        1
    }

    fn activate(&mut self, acked_features: u64) {
        self.acked_features = acked_features;
    }

    fn reset(&mut self) {
        self.acked_features = 0;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut space = [0u8; 8];
        space.copy_from_slice(&self.disk.sectors().to_le_bytes());
        read_config_bytes(&space, offset, data);
    }

    fn identity(&self) -> crate::state::devices::BackendSnapshot {
        crate::state::devices::BackendSnapshot::Block {
            path: self.disk.path().to_owned(),
            sectors: self.disk.sectors(),
            readonly: self.disk.readonly(),
        }
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "type": "block",
            "path": self.disk.path(),
            "sectors": self.disk.sectors(),
            "readonly": self.disk.readonly(),
            "format": self.disk.format_name(),
            "lease_epoch": self.disk.lease_epoch(),
            "stats": self.stats,
        })
    }

    fn queue_notify(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemory, irq: &Interrupt) {
        let Some(q) = queues.get_mut(index) else { return };
        for _ in 0..notify_budget(q) {
            let Some(chain) = q.pop_descriptor_chain(mem) else { break };
            let head = chain.head_index();
            let len = self.serve(chain, mem);
            complete(q, mem, head, len, irq);
        }
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
    use std::path::PathBuf;

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
        Rig { ram, queue, blk: Block::new(Disk::open(&img, false).unwrap()), irq, _dir: dir }
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
    fn a_ring_that_refills_itself_does_not_hold_the_thread() {
        // The used ring laid over the avail ring, one completion ahead: each
        // completion's used index write "makes available" another request.
        let mut r = rig("refill");
        r.queue.set_used_ring_address(Some(AVAIL as u32), Some(0));
        r.queue.set_next_used(1);
        r.header(T_IN, 0);
        r.desc(0, HDR, 16, F_NEXT, 1);
        r.desc(1, STATUS, 1, F_WRITE, 0);
        let m = &r.ram.memory;
        m.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
        let mut queues = [std::mem::replace(&mut r.queue, Queue::new(16).unwrap())];
        r.blk.queue_notify(0, &mut queues, m, &r.irq);
        let served: u16 = m.read_obj(GuestAddress(AVAIL + 2)).unwrap();
        assert_eq!(served, 1 + 16, "one ring's worth per notify, then back to the caller");
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
    fn flush_only_when_negotiated() {
        let mut r = rig("flush");
        r.header(T_FLUSH, 0);
        r.desc(0, HDR, 16, F_NEXT, 1);
        r.desc(1, STATUS, 1, F_WRITE, 0);
        r.blk.activate(VIRTIO_F_VERSION_1);
        assert_eq!(r.submit(0), (S_UNSUPP, 1), "FLUSH without VIRTIO_BLK_F_FLUSH");
        assert_eq!(r.blk.stats.flushes, 0, "nothing was flushed");
        r.blk.activate(VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH);
        assert_eq!(r.submit(0), (S_OK, 1));
        assert_eq!(r.blk.stats.flushes, 1);
        r.blk.reset();
        assert_eq!(r.submit(0).0, S_UNSUPP, "a reset forgets the negotiation");
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
