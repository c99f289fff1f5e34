//! virtio-blk: one request at a time on queue 0, polled to completion with a
//! TSC deadline. A request is a 16-byte header, an optional data buffer and
//! a status byte, in descriptors 0, 1 and 2.

use core::fmt;

use super::mmio::Transport;
use super::queue::{Desc, Queue, DESC_F_NEXT, DESC_F_WRITE};
use crate::dma::{Dma, DmaArena, PAGE};
use crate::io::rdtsc;
use crate::println;

pub const F_FLUSH: u64 = 1 << 9;

pub const SECTOR: usize = 512;
/// Sectors moved per request: the data buffer is 64 KiB.
pub const MAX_SECTORS: usize = 128;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const ID_BYTES: usize = 20;

pub const S_OK: u8 = 0;
/// Written to the status byte before submission, so a request the device
/// completed without writing a status is visible as such.
const S_NOT_WRITTEN: u8 = 0xff;

const REQUEST_QUEUE: u32 = 0;
const TIMEOUT_MS: u64 = 5000;
const BAD_TIMEOUT_MS: u64 = 2000;
/// Beyond any guest's RAM, for `bad(Oob)`.
const OOB_ADDR: u64 = 0x7f_0000_0000;

pub enum BlkError {
    /// The device was disabled after breaking the protocol.
    Disabled,
    OutOfRange,
    /// Nothing came back before the deadline; the device was reset.
    Timeout,
    /// The device answered with this status byte.
    Status(u8),
}

impl fmt::Display for BlkError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            BlkError::Disabled => write!(f, "reason=device-disabled"),
            BlkError::OutOfRange => write!(f, "reason=out-of-range"),
            BlkError::Timeout => write!(f, "reason=timeout"),
            BlkError::Status(s) => write!(f, "reason=io-error status={}", s),
        }
    }
}

/// Malformed requests for testing the device's defences.
#[derive(Clone, Copy)]
pub enum BadKind {
    /// A data descriptor pointing beyond guest RAM.
    Oob,
    /// A descriptor chain whose next pointers loop.
    Loop,
    /// A data descriptor of 0x7fffffff bytes (a write: the device only reads
    /// guest memory, so a device that accepts it cannot overwrite the guest).
    Huge,
    /// A read one sector past the capacity.
    Sector,
}

impl BadKind {
    pub fn parse(s: &str) -> Option<BadKind> {
        match s {
            "oob" => Some(BadKind::Oob),
            "loop" => Some(BadKind::Loop),
            "huge" => Some(BadKind::Huge),
            "sector" => Some(BadKind::Sector),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            BadKind::Oob => "oob",
            BadKind::Loop => "loop",
            BadKind::Huge => "huge",
            BadKind::Sector => "sector",
        }
    }
}

pub struct BlkDevice {
    t: Transport,
    q: Queue,
    wanted: u64,
    pub capacity: u64,
    pub flush: bool,
    /// Header at offset 0, status byte at offset 16.
    req: Dma,
    data: Dma,
    tsc_khz: u64,
    failed: bool,
}

impl BlkDevice {
    pub fn new(t: Transport, arena: &mut DmaArena, tsc_khz: u64) -> Result<Self, &'static str> {
        let wanted = F_FLUSH;
        let features = t.negotiate(wanted, tsc_khz)?;
        let max = t.queue_max(REQUEST_QUEUE);
        let Some(q) = Queue::new(arena, max) else {
            t.fail();
            return Err(if max == 0 { "device has no request queue" } else { "out of DMA memory" });
        };
        if q.size() < 4 {
            t.fail();
            return Err("request queue too small");
        }
        let (Some(req), Some(data)) = (arena.alloc(PAGE, PAGE), arena.alloc(MAX_SECTORS * SECTOR, PAGE)) else {
            t.fail();
            return Err("out of DMA memory");
        };
        let capacity = t.config_u64(0);
        let dev =
            BlkDevice { t, q, wanted, capacity, flush: features & F_FLUSH != 0, req, data, tsc_khz, failed: false };
        if let Err(e) = dev.t.setup_queue(REQUEST_QUEUE, &dev.q) {
            dev.t.fail();
            return Err(e);
        }
        dev.t.driver_ok()?;
        Ok(dev)
    }

    fn status_addr(&self) -> u64 {
        self.req.addr + 16
    }

    /// The data buffer, for filling before `write`.
    pub fn buffer(&mut self) -> &mut [u8] {
        self.data.bytes_mut()
    }

    fn check_range(&self, sector: u64, count: usize) -> Result<(), BlkError> {
        if self.failed {
            return Err(BlkError::Disabled);
        }
        match sector.checked_add(count as u64) {
            Some(end) if count <= MAX_SECTORS && end <= self.capacity => Ok(()),
            _ => Err(BlkError::OutOfRange),
        }
    }

    /// Reads `count` sectors from `sector` into the data buffer.
    pub fn read(&mut self, sector: u64, count: usize) -> Result<&[u8], BlkError> {
        self.check_range(sector, count)?;
        let len = count * SECTOR;
        self.transfer(T_IN, sector, len, true)?;
        Ok(&self.data.bytes()[..len])
    }

    /// Writes the first `count` sectors of the data buffer at `sector`.
    pub fn write(&mut self, sector: u64, count: usize) -> Result<(), BlkError> {
        self.check_range(sector, count)?;
        self.transfer(T_OUT, sector, count * SECTOR, false)
    }

    /// Flushes the device's write cache; a no-op without VIRTIO_BLK_F_FLUSH.
    pub fn flush(&mut self) -> Result<(), BlkError> {
        if !self.flush {
            return Ok(());
        }
        self.transfer(T_FLUSH, 0, 0, false)
    }

    /// The device's id string (GET_ID): up to 20 bytes, NUL-padded.
    pub fn get_id(&mut self) -> Result<[u8; ID_BYTES], BlkError> {
        self.data.bytes_mut()[..ID_BYTES].fill(0);
        self.transfer(T_GET_ID, 0, ID_BYTES, true)?;
        let mut id = [0; ID_BYTES];
        id.copy_from_slice(&self.data.bytes()[..ID_BYTES]);
        Ok(id)
    }

    fn transfer(&mut self, kind: u32, sector: u64, len: usize, device_writes: bool) -> Result<(), BlkError> {
        let s = self.status_addr();
        let hdr = Desc { addr: self.req.addr, len: 16, flags: DESC_F_NEXT, next: 1 };
        let status = Desc { addr: s, len: 1, flags: DESC_F_WRITE, next: 0 };
        let status_byte = if len == 0 {
            self.submit(kind, sector, &[hdr, status], TIMEOUT_MS)?
        } else {
            let flags = DESC_F_NEXT | if device_writes { DESC_F_WRITE } else { 0 };
            let data = Desc { addr: self.data.addr, len: len as u32, flags, next: 2 };
            self.submit(kind, sector, &[hdr, data, status], TIMEOUT_MS)?
        };
        match status_byte {
            S_OK => Ok(()),
            s => Err(BlkError::Status(s)),
        }
    }

    /// Submits a malformed request; returns the status byte found after the
    /// device completed it (0xff if it wrote none), or `Timeout`.
    pub fn bad(&mut self, kind: BadKind) -> Result<u8, BlkError> {
        if self.failed {
            return Err(BlkError::Disabled);
        }
        let hdr = Desc { addr: self.req.addr, len: 16, flags: DESC_F_NEXT, next: 1 };
        let status = Desc { addr: self.status_addr(), len: 1, flags: DESC_F_WRITE, next: 0 };
        let data = Desc { addr: self.data.addr, len: SECTOR as u32, flags: DESC_F_NEXT | DESC_F_WRITE, next: 2 };
        let (t, sector, chain) = match kind {
            BadKind::Oob => (T_IN, 0, [hdr, Desc { addr: OOB_ADDR, ..data }, status]),
            BadKind::Loop => (T_IN, 0, [hdr, data, Desc { flags: DESC_F_WRITE | DESC_F_NEXT, next: 0, ..status }]),
            BadKind::Huge => (T_OUT, 0, [hdr, Desc { len: 0x7fff_ffff, flags: DESC_F_NEXT, ..data }, status]),
            BadKind::Sector => (T_IN, self.capacity, [hdr, data, status]),
        };
        self.submit(t, sector, &chain, BAD_TIMEOUT_MS)
    }

    /// Places `chain` in descriptors 0.., submits it and polls for its
    /// completion; returns the status byte.
    fn submit(&mut self, kind: u32, sector: u64, chain: &[Desc], timeout_ms: u64) -> Result<u8, BlkError> {
        if self.failed {
            return Err(BlkError::Disabled);
        }
        self.req.write_u32(0, kind);
        self.req.write_u32(4, 0);
        self.req.write_u64(8, sector);
        self.req.write_u8(16, S_NOT_WRITTEN);
        for (i, d) in chain.iter().enumerate() {
            self.q.set_desc(i as u16, *d);
        }
        self.q.push(0);
        self.q.publish();
        if self.q.needs_notify() {
            self.t.notify(REQUEST_QUEUE);
        }
        let deadline = rdtsc() + timeout_ms * self.tsc_khz;
        loop {
            match self.q.pop_used() {
                None if rdtsc() > deadline => {
                    self.recover(timeout_ms);
                    return Err(BlkError::Timeout);
                }
                None => core::hint::spin_loop(),
                Some(Err(e)) => {
                    self.give_up(format_args!("{}", e));
                    return Err(BlkError::Disabled);
                }
                Some(Ok((0, _))) => return Ok(self.req.read_u8(16)),
                Some(Ok((id, _))) => {
                    self.give_up(format_args!("used id {} was not submitted", id));
                    return Err(BlkError::Disabled);
                }
            }
        }
    }

    fn give_up(&mut self, why: fmt::Arguments) {
        println!("virtio-blk {:#x}: {}; device disabled", self.t.base(), why);
        self.failed = true;
        self.t.fail();
    }

    /// A request that never completes still owns its descriptors: reset the
    /// device and set it up again so the next request starts clean.
    fn recover(&mut self, timeout_ms: u64) {
        println!("virtio-blk {:#x}: no completion within {} ms; resetting the device", self.t.base(), timeout_ms);
        let r = self.t.negotiate(self.wanted, self.tsc_khz).and_then(|_| {
            self.q.clear();
            self.t.setup_queue(REQUEST_QUEUE, &self.q)?;
            self.t.driver_ok()
        });
        if let Err(e) = r {
            self.give_up(format_args!("reset failed: {}", e));
        }
    }
}
