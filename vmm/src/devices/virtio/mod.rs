//! virtio devices over the virtio-mmio transport (virtio 1.x, register
//! layout version 2). The transport (`mmio`) owns the queues and the
//! register file; each device (`net`, `blk`) turns available descriptor
//! chains into work. Every write into guest memory goes through vm-memory,
//! so the AtomicBitmap records it for live migration.

pub mod blk;
pub mod mmio;
pub mod net;

use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMemory;

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
/// Queue size offered to drivers.
pub const QUEUE_SIZE: u16 = 256;

/// InterruptStatus bit: the device used a buffer.
pub const INTERRUPT_USED_RING: u32 = 1;

/// A device's interrupt: the status register drivers read, and the irqfd
/// that raises its IOAPIC line for drivers that take interrupts. Polling
/// drivers (the test guest) never look at either.
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    pub fn new(irqfd: EventFd) -> Interrupt {
        Interrupt { status: AtomicU32::new(0), irqfd }
    }

    pub fn signal_used(&self) {
        self.status.fetch_or(INTERRUPT_USED_RING, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            tracing::warn!("virtio interrupt: {e}");
        }
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Sets the status register as a restored device had it.
    pub fn set_status(&self, status: u32) {
        self.status.store(status, Ordering::SeqCst);
    }
}

/// What a device behind the MMIO transport provides.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// Feature bits offered to the driver (VIRTIO_F_VERSION_1 included).
    fn features(&self) -> u64;
    fn queue_count(&self) -> usize;
    /// Reads from the device configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver set DRIVER_OK with these features.
    fn activate(&mut self, _acked_features: u64) {}
    /// The driver notified queue `index` (it made buffers available).
    fn queue_notify(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemory, irq: &Interrupt);
    /// The host side has input (a tap frame): move it into the queues.
    /// Returns true if input is waiting for the driver to post buffers.
    fn backend_ready(&mut self, _queues: &mut [Queue], _mem: &GuestMemory, _irq: &Interrupt) -> bool {
        false
    }
    /// The VM is paused: read and drop host input (nothing touches guest
    /// memory).
    fn discard_backend_input(&mut self) {}
    /// The host file descriptor whose readability calls `backend_ready`.
    fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// The driver reset the device.
    fn reset(&mut self) {}
    /// What the device is, for `vm.info`.
    fn describe(&self) -> serde_json::Value;
    /// Its backend's identity, saved with the VM state.
    fn identity(&self) -> crate::state::devices::BackendSnapshot;
    /// Which disk image backs it (disks only; see `devices::disk`).
    fn disk_identity(&self) -> Option<String> {
        None
    }
    /// The host side to flush, hand over, take, give up or announce.
    fn backend_mut(&mut self) -> Option<&mut dyn crate::devices::backend::Backend>;
}

/// Copies `value`'s bytes at `offset` of a config space into `data`,
/// leaving bytes beyond the space as zero.
pub fn read_config_bytes(space: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else { return };
    if start >= space.len() {
        return;
    }
    let n = data.len().min(space.len() - start);
    data[..n].copy_from_slice(&space[start..start + n]);
}

/// Chains a device serves per notify: one ring's worth. A driver cannot have
/// more outstanding at once, so everything available when a notify starts is
/// served; more can only be requests added meanwhile (each with its own
/// kick: these devices never suppress notifications, no EVENT_IDX or
/// NO_NOTIFY; add either and a notify that stops here must look again) or a
/// ring that changes under the device (a used ring laid over the avail index
/// "adds" a request per completion, forever). Those wait for the next kick
/// instead of holding the thread that must also answer a pause.
pub fn notify_budget(queue: &Queue) -> usize {
    use virtio_queue::QueueT;
    usize::from(queue.size()).max(1)
}

/// Adds a used element and signals the driver if it wants to know.
pub fn complete(queue: &mut Queue, mem: &GuestMemory, head: u16, len: u32, irq: &Interrupt) {
    use virtio_queue::QueueT;
    if let Err(e) = queue.add_used(mem, head, len) {
        tracing::warn!("virtio: cannot return descriptor {head}: {e}");
        return;
    }
    if queue.needs_notification(mem).unwrap_or(true) {
        irq.signal_used();
    }
}
