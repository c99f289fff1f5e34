//! Device state: the serial UART and each virtio-mmio transport with its
//! queues and the identity of its backend.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::mac::MacAddr;

/// vm-superio's `SerialState`, as plain serde data.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<vm_superio::serial::SerialState> for SerialSnapshot {
    fn from(s: vm_superio::serial::SerialState) -> Self {
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialSnapshot> for vm_superio::serial::SerialState {
    fn from(s: &SerialSnapshot) -> Self {
        vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// virtio-queue's `QueueState`, as plain serde data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<virtio_queue::QueueState> for QueueSnapshot {
    fn from(q: virtio_queue::QueueState) -> Self {
        QueueSnapshot {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<&QueueSnapshot> for virtio_queue::QueueState {
    fn from(q: &QueueSnapshot) -> Self {
        virtio_queue::QueueState {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// Which backend a virtio device had, to check it against the one the
/// restoring host opens.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BackendSnapshot {
    Net { tap: String, mac: MacAddr },
    Block { path: PathBuf, sectors: u64, readonly: bool },
}

/// The virtio-mmio register file and queues of one device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportSnapshot {
    pub device_type: u32,
    pub status: u32,
    pub acked_features: u64,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub queue_sel: u32,
    pub interrupt_status: u32,
    pub queues: Vec<QueueSnapshot>,
    pub backend: BackendSnapshot,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicesState {
    pub serial: SerialSnapshot,
    pub virtio: Vec<TransportSnapshot>,
    /// Interrupt lines (GSIs) raised through an irqfd whose device still
    /// shows the interrupt unacknowledged. KVM injects an irqfd from a
    /// kernel work item, so the IOAPIC state saved beside this may not have
    /// seen the edge yet; the restoring host raises each line once more
    /// (a driver that already took it finds nothing new: harmless).
    pub pending_irqs: Vec<u32>,
}

/// vm-superio's IIR bit 0: set when no interrupt is pending.
const IIR_NONE: u8 = 1;

impl DevicesState {
    /// The lines whose device has an interrupt the guest has not
    /// acknowledged: the serial port's (IIR) and each virtio device's
    /// (InterruptStatus), on the lines this machine model wires them to.
    pub fn unacknowledged_irqs(serial: &SerialSnapshot, virtio: &[TransportSnapshot]) -> Vec<u32> {
        use crate::arch::x86_64::layout::{COM1_IRQ, VIRTIO_FIRST_IRQ};
        let serial = (serial.interrupt_identification & IIR_NONE == 0).then_some(COM1_IRQ);
        let virtio = virtio
            .iter()
            .enumerate()
            .filter(|(_, t)| t.interrupt_status != 0)
            .map(|(i, _)| VIRTIO_FIRST_IRQ + i as u32);
        serial.into_iter().chain(virtio).collect()
    }
}
