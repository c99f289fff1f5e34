//! virtio queue restore: a virtio-blk transport takes on a saved register
//! file and queue from arbitrary bytes (as a tampered VM state would carry
//! it), then serves every queue once (as after a restore) and takes MMIO
//! register accesses. A saved queue must be refused or stay inside guest
//! memory; nothing may panic.

use std::cell::RefCell;
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};
use vmm::devices::bus::BusDevice;
use vmm::devices::disk::Disk;
use vmm::devices::virtio::blk::Block;
use vmm::devices::virtio::mmio::MmioTransport;
use vmm::devices::virtio::Interrupt;
use vmm::state::devices::{QueueSnapshot, TransportSnapshot};
use vmm_sys_util::eventfd::EventFd;

/// Rings and buffers live in this window unless an address asks for more.
const WINDOW: u64 = 0x1000;
const WINDOW_LEN: u64 = 0x20000;

struct Rig {
    ram: vmm::memory::GuestRam,
    transport: MmioTransport,
}

thread_local! {
    static RIG: RefCell<Option<Rig>> = const { RefCell::new(None) };
}

fn rig() -> Rig {
    let tid = std::thread::current().id();
    let img = super::scratch().join(format!("queue-{tid:?}.img").replace(['(', ')'], ""));
    std::fs::write(&img, vec![0x22u8; 64 * 1024]).expect("disk image");
    let ram = vmm::memory::create(16).expect("guest RAM");
    let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")));
    let blk = Block::new(Disk::open(&img, false).expect("disk"));
    let transport = MmioTransport::new(Box::new(blk), ram.memory.clone(), irq);
    Rig { ram, transport }
}

/// Reads little-endian integers off the input, zeros past its end.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut b = [0u8; N];
        let n = N.min(self.0.len());
        b[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
    /// A guest address: mostly inside the window (so rings meet real
    /// descriptors); a 0xff top byte keeps it as given.
    fn addr(&mut self) -> u64 {
        let raw = self.u64();
        if raw >> 56 == 0xff {
            raw
        } else {
            WINDOW + raw % WINDOW_LEN
        }
    }
}

/// Input: the register file (status, features, selectors, interrupt
/// status), then the queue (sizes, flags, indices, ring addresses), a
/// length-prefixed chunk of guest memory for the window, then MMIO
/// accesses (offset, value) to the end.
pub fn fuzz_virtio_queue_restore(data: &[u8]) {
    let _ = queue_restore_outcome(data);
}

/// Whether the saved transport was taken, and the queue's used index in
/// guest memory after the kick (requests the device completed).
pub fn queue_restore_outcome(data: &[u8]) -> (bool, u16) {
    RIG.with(|cell| {
        let mut cell = cell.borrow_mut();
        let rig = cell.get_or_insert_with(rig);
        run(rig, data)
    })
}

fn run(rig: &mut Rig, data: &[u8]) -> (bool, u16) {
    let mut input = Input(data);
    let device_type = rig.transport.device().device_type();
    let backend = rig.transport.device().identity();
    let mut snapshot = TransportSnapshot {
        device_type,
        status: input.u32(),
        acked_features: input.u64(),
        device_features_sel: input.u32(),
        driver_features_sel: input.u32(),
        queue_sel: input.u32(),
        interrupt_status: input.u32(),
        queues: Vec::new(),
        backend,
    };
    let flags = input.take::<1>()[0];
    snapshot.queues.push(QueueSnapshot {
        max_size: input.u16(),
        size: input.u16(),
        ready: flags & 1 != 0,
        next_avail: input.u16(),
        next_used: input.u16(),
        event_idx_enabled: flags & 2 != 0,
        desc_table: input.addr(),
        avail_ring: input.addr(),
        used_ring: input.addr(),
    });
    if flags & 4 != 0 {
        // A foreign shape: one queue too many.
        snapshot.queues.push(snapshot.queues[0]);
    }
    let len = usize::from(input.u16());
    let chunk = &input.0[..len.min(input.0.len())];
    input.0 = &input.0[chunk.len()..];
    // The window starts clean for each input, then takes the chunk.
    let mem = rig.ram.memory.clone();
    mem.write_slice(&vec![0u8; WINDOW_LEN as usize], GuestAddress(WINDOW)).expect("clear window");
    mem.write_slice(chunk, GuestAddress(WINDOW)).expect("window");
    let used_ring = snapshot.queues[0].used_ring;
    let restored = rig.transport.restore(&snapshot).is_ok();
    if restored {
        rig.transport.kick_all();
    }
    let used = mem.read_obj::<u16>(GuestAddress(used_ring.wrapping_add(2))).unwrap_or(0);
    for _ in 0..32 {
        if input.0.is_empty() {
            break;
        }
        let offset = u64::from(input.u16() % 0x200);
        let value = input.u32();
        if value & 1 == 0 {
            rig.transport.write(offset, &value.to_le_bytes());
        } else {
            let mut out = [0u8; 4];
            rig.transport.read(offset, &mut out);
        }
    }
    (restored, used)
}
