//! virtio-net: receive queue 0 kept full of 2 KiB buffers, transmit queue 1
//! with one descriptor per frame. No offloads and no mergeable buffers, so a
//! frame always fits one buffer behind the 12-byte `virtio_net_hdr_v1`.

use super::mmio::Transport;
use super::queue::{Desc, Queue, DESC_F_WRITE};
use crate::dma::{Dma, DmaArena, PAGE};
use crate::io::rdtsc;
use crate::println;

pub const F_MAC: u64 = 1 << 5;

const RX_QUEUE: u32 = 0;
const TX_QUEUE: u32 = 1;
/// `virtio_net_hdr_v1`: flags, gso_type, hdr_len, gso_size, csum_start,
/// csum_offset, num_buffers.
const HDR_LEN: usize = 12;
const BUF_SIZE: usize = 2048;
const MAX_BUFS: usize = 128;
/// How long `send` waits for the device to free a tx buffer before dropping.
const TX_WAIT_US: u64 = 500;
/// Used when neither the device nor the command line names a MAC.
const DEFAULT_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

pub struct NetDevice {
    t: Transport,
    pub mac: [u8; 6],
    rx: Queue,
    tx: Queue,
    rx_pool: Dma,
    tx_pool: Dma,
    rx_bufs: u16,
    tx_bufs: u16,
    rx_posted: [bool; MAX_BUFS],
    tx_busy: [bool; MAX_BUFS],
    tx_free: [u16; MAX_BUFS],
    tx_free_len: usize,
    rx_recycled: bool,
    tx_queued: bool,
    failed: bool,
    tsc_khz: u64,
}

/// A received frame still owned by the driver until `rx_recycle`.
pub struct RxFrame {
    id: u16,
    /// The Ethernet frame, without the virtio header.
    pub data: Dma,
}

impl NetDevice {
    pub fn new(
        t: Transport,
        arena: &mut DmaArena,
        cmdline_mac: Option<[u8; 6]>,
        tsc_khz: u64,
    ) -> Result<Self, &'static str> {
        let features = t.negotiate(F_MAC, tsc_khz)?;
        let mut mac = DEFAULT_MAC;
        if features & F_MAC != 0 {
            for (i, b) in mac.iter_mut().enumerate() {
                *b = t.config_u8(i);
            }
        }
        if let Some(m) = cmdline_mac {
            mac = m;
        }
        let (rx_max, tx_max) = (t.queue_max(RX_QUEUE), t.queue_max(TX_QUEUE));
        let (Some(rx), Some(tx)) = (Queue::new(arena, rx_max), Queue::new(arena, tx_max)) else {
            t.fail();
            return Err(if rx_max == 0 || tx_max == 0 { "device has no rx/tx queue" } else { "out of DMA memory" });
        };
        let rx_bufs = rx.size().min(MAX_BUFS as u16);
        let tx_bufs = tx.size().min(MAX_BUFS as u16);
        let (Some(rx_pool), Some(tx_pool)) =
            (arena.alloc(rx_bufs as usize * BUF_SIZE, PAGE), arena.alloc(tx_bufs as usize * BUF_SIZE, PAGE))
        else {
            t.fail();
            return Err("out of DMA memory");
        };
        let mut dev = NetDevice {
            t,
            mac,
            rx,
            tx,
            rx_pool,
            tx_pool,
            rx_bufs,
            tx_bufs,
            rx_posted: [false; MAX_BUFS],
            tx_busy: [false; MAX_BUFS],
            tx_free: [0; MAX_BUFS],
            tx_free_len: 0,
            rx_recycled: false,
            tx_queued: false,
            failed: false,
            tsc_khz,
        };
        for i in 0..tx_bufs {
            dev.tx_free[i as usize] = i;
        }
        dev.tx_free_len = tx_bufs as usize;
        if let Err(e) = dev.t.setup_queue(RX_QUEUE, &dev.rx).and_then(|_| dev.t.setup_queue(TX_QUEUE, &dev.tx)) {
            dev.t.fail();
            return Err(e);
        }
        for i in 0..rx_bufs {
            let addr = dev.rx_pool.addr + i as u64 * BUF_SIZE as u64;
            dev.rx.set_desc(i, Desc { addr, len: BUF_SIZE as u32, flags: DESC_F_WRITE, next: 0 });
            dev.rx.push(i);
            dev.rx_posted[i as usize] = true;
        }
        dev.rx.publish();
        dev.t.driver_ok()?;
        dev.t.notify(RX_QUEUE);
        Ok(dev)
    }

    pub fn queues(&self) -> u32 {
        2
    }

    pub fn failed(&self) -> bool {
        self.failed
    }

    fn give_up(&mut self, why: core::fmt::Arguments) {
        println!("virtio-net {:#x}: {}; device disabled", self.t.base(), why);
        self.failed = true;
        self.t.fail();
    }

    /// The next received frame, if any. Hand it back with `rx_recycle`.
    pub fn rx_next(&mut self) -> Option<RxFrame> {
        while !self.failed {
            let (id, len) = match self.rx.pop_used()? {
                Ok(e) => e,
                Err(e) => {
                    self.give_up(format_args!("rx: {}", e));
                    return None;
                }
            };
            if id >= self.rx_bufs as u32 || !self.rx_posted[id as usize] {
                self.give_up(format_args!("rx: used id {} was not posted", id));
                return None;
            }
            if len as usize > BUF_SIZE {
                self.give_up(format_args!("rx: used len {} exceeds the {}-byte buffer", len, BUF_SIZE));
                return None;
            }
            let id = id as u16;
            self.rx_posted[id as usize] = false;
            if (len as usize) < HDR_LEN {
                // Nothing behind the header: drop it, keep the buffer in use.
                self.rx_recycle_id(id);
                continue;
            }
            let buf = self.rx_pool.slice(id as usize * BUF_SIZE + HDR_LEN, len as usize - HDR_LEN)?;
            return Some(RxFrame { id, data: buf });
        }
        None
    }

    pub fn rx_recycle(&mut self, f: RxFrame) {
        self.rx_recycle_id(f.id);
    }

    fn rx_recycle_id(&mut self, id: u16) {
        if self.failed {
            return;
        }
        self.rx_posted[id as usize] = true;
        self.rx.push(id);
        self.rx_recycled = true;
    }

    /// Queues `frame` for transmission (sent by `flush`); false if dropped.
    pub fn send(&mut self, frame: &[u8]) -> bool {
        if self.failed || frame.len() > BUF_SIZE - HDR_LEN {
            return false;
        }
        if self.tx_free_len == 0 {
            self.reclaim_tx();
        }
        if self.tx_free_len == 0 && !self.wait_for_tx_buffer() {
            return false;
        }
        self.tx_free_len -= 1;
        let slot = self.tx_free[self.tx_free_len];
        let Some(mut buf) = self.tx_pool.slice(slot as usize * BUF_SIZE, HDR_LEN + frame.len()) else {
            return false;
        };
        let bytes = buf.bytes_mut();
        bytes[..HDR_LEN].fill(0);
        bytes[HDR_LEN..].copy_from_slice(frame);
        self.tx_busy[slot as usize] = true;
        self.tx.set_desc(slot, Desc { addr: buf.addr, len: buf.len as u32, flags: 0, next: 0 });
        self.tx.push(slot);
        self.tx_queued = true;
        true
    }

    /// The tx ring is full (a burst): hand the device what is queued and
    /// give it a moment to send some of it.
    fn wait_for_tx_buffer(&mut self) -> bool {
        self.flush_tx();
        let deadline = rdtsc() + TX_WAIT_US * self.tsc_khz / 1000;
        while self.tx_free_len == 0 && !self.failed && rdtsc() < deadline {
            core::hint::spin_loop();
            self.reclaim_tx();
        }
        self.tx_free_len > 0
    }

    fn flush_tx(&mut self) {
        if core::mem::take(&mut self.tx_queued) {
            self.tx.publish();
            if self.tx.needs_notify() {
                self.t.notify(TX_QUEUE);
            }
        }
    }

    /// Publishes recycled rx buffers and queued tx frames, with at most one
    /// QueueNotify each (and none if the device said it does not want one).
    pub fn flush(&mut self) {
        if self.failed {
            return;
        }
        if core::mem::take(&mut self.rx_recycled) {
            self.rx.publish();
            if self.rx.needs_notify() {
                self.t.notify(RX_QUEUE);
            }
        }
        self.flush_tx();
    }

    /// Takes back the tx buffers the device has finished with.
    pub fn reclaim_tx(&mut self) {
        while !self.failed {
            let id = match self.tx.pop_used() {
                None => return,
                Some(Ok((id, _))) => id,
                Some(Err(e)) => return self.give_up(format_args!("tx: {}", e)),
            };
            if id >= self.tx_bufs as u32 || !self.tx_busy[id as usize] || self.tx_free_len >= MAX_BUFS {
                return self.give_up(format_args!("tx: used id {} was not in flight", id));
            }
            self.tx_busy[id as usize] = false;
            self.tx_free[self.tx_free_len] = id as u16;
            self.tx_free_len += 1;
        }
    }
}
