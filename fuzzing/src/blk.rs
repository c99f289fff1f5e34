//! virtio-blk descriptor chains from arbitrary bytes, driven the way the
//! queue tests in `vmm/src/devices/virtio/blk.rs` drive them.

use std::cell::RefCell;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm::devices::disk::Disk;
use vmm::devices::virtio::blk::Block;
use vmm::devices::virtio::{Interrupt, VirtioDevice};
use vmm_sys_util::eventfd::EventFd;

const QUEUE: u16 = 16;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
/// Guest memory the input fills: request headers, data and status bytes.
const AREA: u64 = 0x4000;
const AREA_LEN: usize = 0x10000;

struct Rig {
    ram: vmm::memory::GuestRam,
    blk: Block,
    irq: Arc<Interrupt>,
}

thread_local! {
    static RIG: RefCell<Option<Rig>> = const { RefCell::new(None) };
}

fn rig() -> Rig {
    // One disk per thread: the disk takes an exclusive lock.
    let tid = std::thread::current().id();
    let img = super::scratch().join(format!("blk-{tid:?}.img").replace(['(', ')'], ""));
    std::fs::write(&img, vec![0x11u8; 64 * 1024]).expect("disk image");
    let ram = vmm::memory::create(16).expect("guest RAM");
    let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")));
    Rig { ram, blk: Block::new(Disk::open(&img, false).expect("disk")), irq }
}

fn u64_at(d: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    for (i, v) in b.iter_mut().enumerate() {
        *v = d.get(at + i).copied().unwrap_or(0);
    }
    u64::from_le_bytes(b)
}

/// Input: 16 descriptors of 16 bytes (address and length mostly folded
/// into the request area so chains reach real memory; a 0xff top byte keeps
/// them as given), a byte of head count and up to 8 head indices, then the
/// bytes of the request area (headers, data, status).
pub fn fuzz_virtio_blk_chain(data: &[u8]) {
    RIG.with(|cell| {
        let mut cell = cell.borrow_mut();
        let rig = cell.get_or_insert_with(rig);
        run(rig, data);
    });
}

fn run(rig: &mut Rig, data: &[u8]) {
    let m = &rig.ram.memory;
    m.write_slice(&vec![0u8; (AREA - DESC) as usize + AREA_LEN], GuestAddress(DESC)).expect("clear");
    for i in 0..QUEUE as usize {
        let raw = u64_at(data, i * 16);
        let len_raw = u64_at(data, i * 16 + 8);
        let addr = if raw >> 56 == 0xff { raw } else { AREA + raw % AREA_LEN as u64 };
        let len = len_raw as u32;
        let len = if len >> 24 == 0xff { len } else { len % (AREA_LEN as u32 + 1024) };
        let flags = (len_raw >> 32) as u16;
        let next = (len_raw >> 48) as u16;
        let at = GuestAddress(DESC + i as u64 * 16);
        m.write_obj(addr, at).expect("desc");
        m.write_obj(len, GuestAddress(at.0 + 8)).expect("desc");
        m.write_obj(flags, GuestAddress(at.0 + 12)).expect("desc");
        m.write_obj(next, GuestAddress(at.0 + 14)).expect("desc");
    }
    let tail = data.get(256..).unwrap_or(&[]);
    let heads = tail.first().map_or(1, |n| n % 8 + 1) as u16;
    for h in 0..heads {
        let head = tail.get(1 + h as usize).copied().unwrap_or(0) as u16;
        // Out-of-range heads too: the device must refuse them, not index past the table.
        let head = if head >= 0xf0 { head } else { head % QUEUE };
        m.write_obj(head, GuestAddress(AVAIL + 4 + u64::from(h) * 2)).expect("avail");
    }
    m.write_obj(heads, GuestAddress(AVAIL + 2)).expect("avail idx");
    let area = tail.get(9..).unwrap_or(&[]);
    let area = &area[..area.len().min(AREA_LEN)];
    m.write_slice(area, GuestAddress(AREA)).expect("area");

    let mut queue = Queue::new(QUEUE).expect("queue");
    queue.set_size(QUEUE);
    queue.set_desc_table_address(Some(DESC as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    queue.set_used_ring_address(Some(USED as u32), Some(0));
    queue.set_ready(true);
    let mut queues = [queue];
    rig.blk.queue_notify(0, &mut queues, m, &rig.irq);
    let used: u16 = m.read_obj(GuestAddress(USED + 2)).expect("used idx");
    assert!(used <= heads, "{used} used entries for {heads} requests");
}
