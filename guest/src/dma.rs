//! Memory shared with devices. Guest memory is identity mapped, so a static
//! array's address is its guest-physical address: the drivers carve their
//! rings and buffers out of one page-aligned arena in .bss (not in the ELF
//! file, and below the workload's working set).

use core::cell::UnsafeCell;

pub const PAGE: usize = 4096;
const ARENA_SIZE: usize = 1 << 20;

#[repr(C, align(4096))]
struct Arena(UnsafeCell<[u8; ARENA_SIZE]>);

// SAFETY: the guest is single-threaded; the arena is only reached through
// the one `DmaArena` that `guest_main` creates, which hands out disjoint
// regions.
unsafe impl Sync for Arena {}

static ARENA: Arena = Arena(UnsafeCell::new([0; ARENA_SIZE]));

/// A region of device-visible memory: `len` bytes at guest-physical `addr`.
#[derive(Clone, Copy)]
pub struct Dma {
    pub addr: u64,
    pub len: usize,
}

impl Dma {
    /// The region as bytes. The caller must not hold it while a device may
    /// write the same bytes (i.e. only while the buffer is not posted).
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the region lies inside ARENA, was handed out once, and the
        // drivers only look at a buffer the device has given back.
        unsafe { core::slice::from_raw_parts(self.addr as *const u8, self.len) }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for `bytes`. `Dma` is Copy, so `&mut self` does not
        // prevent aliasing by itself: each driver keeps exactly one handle
        // per buffer and never holds two views of it at once.
        unsafe { core::slice::from_raw_parts_mut(self.addr as *mut u8, self.len) }
    }

    /// A sub-region; `None` if it does not fit.
    pub fn slice(&self, offset: usize, len: usize) -> Option<Dma> {
        let end = offset.checked_add(len)?;
        (end <= self.len).then_some(Dma { addr: self.addr + offset as u64, len })
    }

    pub fn read_u8(&self, offset: usize) -> u8 {
        assert_in(offset, 1, self.len);
        // SAFETY: bounds checked above; volatile because a device writes it.
        unsafe { ((self.addr as usize + offset) as *const u8).read_volatile() }
    }

    pub fn write_u8(&self, offset: usize, v: u8) {
        assert_in(offset, 1, self.len);
        // SAFETY: bounds checked above; the region belongs to this driver.
        unsafe { ((self.addr as usize + offset) as *mut u8).write_volatile(v) }
    }

    pub fn read_u16(&self, offset: usize) -> u16 {
        assert_in(offset, 2, self.len);
        // SAFETY: bounds checked above; ring fields are naturally aligned.
        unsafe { ((self.addr as usize + offset) as *const u16).read_volatile() }
    }

    pub fn write_u16(&self, offset: usize, v: u16) {
        assert_in(offset, 2, self.len);
        // SAFETY: as for `read_u16`.
        unsafe { ((self.addr as usize + offset) as *mut u16).write_volatile(v) }
    }

    pub fn read_u32(&self, offset: usize) -> u32 {
        assert_in(offset, 4, self.len);
        // SAFETY: as for `read_u16`.
        unsafe { ((self.addr as usize + offset) as *const u32).read_volatile() }
    }

    pub fn write_u32(&self, offset: usize, v: u32) {
        assert_in(offset, 4, self.len);
        // SAFETY: as for `read_u16`.
        unsafe { ((self.addr as usize + offset) as *mut u32).write_volatile(v) }
    }

    pub fn write_u64(&self, offset: usize, v: u64) {
        assert_in(offset, 8, self.len);
        // SAFETY: as for `read_u16`.
        unsafe { ((self.addr as usize + offset) as *mut u64).write_volatile(v) }
    }

    pub fn zero(&mut self) {
        self.bytes_mut().fill(0);
    }
}

/// Offsets are computed by the drivers from constants; a bad one is a bug in
/// this guest, reported and ended cleanly instead of corrupting memory.
fn assert_in(offset: usize, size: usize, len: usize) {
    if offset > len || len - offset < size {
        crate::println!("dma: access at {} size {} outside region of {} bytes", offset, size, len);
        crate::ports::debug_exit(4);
    }
}

/// Bump allocator over the arena. Never frees: devices are set up once.
pub struct DmaArena {
    next: u64,
    end: u64,
}

impl DmaArena {
    /// # Safety
    /// Call once: every `DmaArena` hands out the same memory.
    pub unsafe fn take() -> DmaArena {
        let start = ARENA.0.get() as u64;
        DmaArena { next: start, end: start + ARENA_SIZE as u64 }
    }

    /// `len` zeroed bytes aligned to `align` (a power of two).
    pub fn alloc(&mut self, len: usize, align: usize) -> Option<Dma> {
        let addr = self.next.checked_next_multiple_of(align as u64)?;
        let end = addr.checked_add(len as u64)?;
        if end > self.end {
            return None;
        }
        self.next = end;
        let mut d = Dma { addr, len };
        // Zeroed even though .bss starts zeroed: a reset guest may find old rings.
        d.zero();
        Some(d)
    }
}
