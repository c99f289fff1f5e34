//! A split virtqueue: descriptor table, available ring (driver to device) and
//! used ring (device to driver), each on its own page of DMA memory. The
//! driver polls the used ring with volatile reads: no interrupts here.

use core::sync::atomic::{fence, Ordering};

use crate::dma::{Dma, DmaArena, PAGE};

pub const MAX_SIZE: u16 = 256;

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
/// In used.flags: the device asks not to be notified.
const USED_F_NO_NOTIFY: u16 = 1;

const DESC_SIZE: usize = 16;

/// One descriptor as the driver writes it.
#[derive(Clone, Copy)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// A used-ring entry that broke the protocol.
pub enum UsedError {
    /// used.idx ran ahead of what was ever made available.
    IndexJump { used_idx: u16, last_used: u16 },
}

impl core::fmt::Display for UsedError {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        match self {
            UsedError::IndexJump { used_idx, last_used } => {
                write!(f, "used.idx jumped from {} to {}", last_used, used_idx)
            }
        }
    }
}

pub struct Queue {
    size: u16,
    desc: Dma,
    avail: Dma,
    used: Dma,
    /// Next free avail ring slot (published by `publish`).
    avail_idx: u16,
    /// Next used ring entry to look at.
    last_used: u16,
    /// Buffers made available and not yet returned.
    outstanding: u16,
}

impl Queue {
    /// A queue of `MAX_SIZE` or the device's maximum if smaller, rounded down
    /// to a power of two so the free-running 16-bit indices wrap cleanly.
    pub fn new(arena: &mut DmaArena, device_max: u32) -> Option<Queue> {
        let want = device_max.min(MAX_SIZE as u32);
        if want == 0 {
            return None;
        }
        let size = 1u16 << (31 - want.leading_zeros());
        Some(Queue {
            size,
            desc: arena.alloc(PAGE, PAGE)?,
            avail: arena.alloc(PAGE, PAGE)?,
            used: arena.alloc(PAGE, PAGE)?,
            avail_idx: 0,
            last_used: 0,
            outstanding: 0,
        })
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// Guest-physical addresses of the descriptor table, avail and used ring.
    pub fn addresses(&self) -> (u64, u64, u64) {
        (self.desc.addr, self.avail.addr, self.used.addr)
    }

    /// Forgets all state, for a device that was reset.
    pub fn clear(&mut self) {
        self.desc.zero();
        self.avail.zero();
        self.used.zero();
        self.avail_idx = 0;
        self.last_used = 0;
        self.outstanding = 0;
    }

    pub fn set_desc(&mut self, i: u16, d: Desc) {
        let off = (i % self.size) as usize * DESC_SIZE;
        self.desc.write_u64(off, d.addr);
        self.desc.write_u32(off + 8, d.len);
        self.desc.write_u16(off + 12, d.flags);
        self.desc.write_u16(off + 14, d.next);
    }

    /// Puts the chain starting at `head` in the avail ring (not yet visible).
    pub fn push(&mut self, head: u16) {
        let slot = (self.avail_idx % self.size) as usize;
        self.avail.write_u16(4 + 2 * slot, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.outstanding = self.outstanding.saturating_add(1);
    }

    /// Makes everything pushed visible to the device.
    pub fn publish(&mut self) {
        // Buffer contents and ring entries before the index (x86 keeps stores
        // in order; this stops the compiler reordering them).
        fence(Ordering::Release);
        self.avail.write_u16(2, self.avail_idx);
    }

    /// Whether the device wants a QueueNotify for what was just published.
    pub fn needs_notify(&self) -> bool {
        // The avail.idx store must be visible before used.flags is read, or
        // a device going to sleep could be missed.
        fence(Ordering::SeqCst);
        self.used.read_u16(0) & USED_F_NO_NOTIFY == 0
    }

    /// The next used entry as (descriptor id, length written), if any.
    pub fn pop_used(&mut self) -> Option<Result<(u32, u32), UsedError>> {
        let used_idx = self.used.read_u16(2);
        if used_idx == self.last_used {
            return None;
        }
        if used_idx.wrapping_sub(self.last_used) > self.outstanding {
            return Some(Err(UsedError::IndexJump { used_idx, last_used: self.last_used }));
        }
        // The entry and the buffer it names are read after the index.
        fence(Ordering::Acquire);
        let slot = (self.last_used % self.size) as usize;
        let id = self.used.read_u32(4 + 8 * slot);
        let len = self.used.read_u32(4 + 8 * slot + 4);
        self.last_used = self.last_used.wrapping_add(1);
        self.outstanding -= 1;
        Some(Ok((id, len)))
    }
}
