//! The virtio-mmio transport, register layout version 2 (virtio 1.x
//! "modern"). One 4 KiB window per device; Linux finds it from
//! `virtio_mmio.device=4K@<base>:<irq>` on its command line.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Weak};

use kvm_ioctls::{IoEventAddress, VmFd};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{Interrupt, VirtioDevice, QUEUE_SIZE, VIRTIO_F_VERSION_1};
use crate::devices::bus::BusDevice;
use crate::memory::GuestMemory;
use crate::state::devices::{QueueSnapshot, TransportSnapshot};

pub const MMIO_WINDOW: u64 = 0x1000;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x5952_5246; // "FRRY"

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const REG_CONFIG: u64 = 0x100;

pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_FAILED: u32 = 0x80;

/// One eventfd per queue that KVM signals when the driver writes that
/// queue's index to QUEUE_NOTIFY (KVM_IOEVENTFD with the index as
/// datamatch): the vCPU does not leave the guest, the device thread does
/// the queue's work. Registered while the driver is up (DRIVER_OK to
/// reset); a notify KVM does not match (none registered, another size)
/// still reaches [`MmioTransport`] as an MMIO exit and is served there.
pub struct QueueEvents {
    vm: Weak<VmFd>,
    addr: IoEventAddress,
    fds: Vec<EventFd>,
    registered: Vec<bool>,
}

impl QueueEvents {
    /// Eventfds for `queues` queues of the transport at MMIO `base`.
    pub fn new(vm: Weak<VmFd>, base: u64, queues: usize) -> std::io::Result<QueueEvents> {
        let fds = (0..queues).map(|_| EventFd::new(libc::EFD_NONBLOCK)).collect::<Result<Vec<_>, _>>()?;
        Ok(QueueEvents {
            vm,
            addr: IoEventAddress::Mmio(base + REG_QUEUE_NOTIFY),
            fds,
            registered: vec![false; queues],
        })
    }

    /// Registers the eventfd of every ready queue with KVM. One that KVM
    /// refuses stays on the vCPU path (logged).
    fn register(&mut self, queues: &[Queue]) {
        let Some(vm) = self.vm.upgrade() else { return };
        for (i, q) in queues.iter().enumerate() {
            if !q.ready() || self.registered[i] {
                continue;
            }
            match vm.register_ioevent(&self.fds[i], &self.addr, i as u32) {
                Ok(()) => self.registered[i] = true,
                Err(e) => tracing::warn!("virtio-mmio: no ioeventfd for queue {i} ({e}); notifies exit to the vCPU"),
            }
        }
    }

    fn unregister(&mut self) {
        let Some(vm) = self.vm.upgrade() else { return };
        for (i, fd) in self.fds.iter().enumerate() {
            if std::mem::take(&mut self.registered[i]) {
                if let Err(e) = vm.unregister_ioevent(fd, &self.addr, i as u32) {
                    tracing::warn!("virtio-mmio: cannot unregister the ioeventfd of queue {i}: {e}");
                }
            }
        }
    }
}

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    /// None: every notify is an MMIO exit served on the vCPU.
    events: Option<QueueEvents>,
}

impl MmioTransport {
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemory, interrupt: Arc<Interrupt>) -> MmioTransport {
        let queues = (0..device.queue_count()).map(|_| Queue::new(QUEUE_SIZE).expect("power-of-two size")).collect();
        MmioTransport {
            device,
            mem,
            interrupt,
            queues,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            events: None,
        }
    }

    /// Serves notifies through `events` from now on (before any restore).
    pub fn with_queue_events(mut self, events: QueueEvents) -> MmioTransport {
        self.events = Some(events);
        self
    }

    /// Each queue's notify eventfd, by queue index (none on the vCPU path).
    pub fn notify_fds(&self) -> Vec<RawFd> {
        self.events.as_ref().map_or_else(Vec::new, |e| e.fds.iter().map(|f| f.as_raw_fd()).collect())
    }

    /// Takes a notify of queue `index` the device thread got from its
    /// eventfd (whose count it has read) and does the queue's work.
    pub fn notified(&mut self, index: usize) {
        if let Some(fd) = self.events.as_ref().and_then(|e| e.fds.get(index)) {
            let _ = fd.read();
        }
        self.notify(index as u32);
    }

    /// The device for `vm.info`, with where its notifies are served
    /// (`ioeventfd` once KVM took a queue's eventfd, else `vcpu`).
    pub fn describe(&self) -> serde_json::Value {
        let mut d = self.device.describe();
        let registered = self.events.as_ref().map_or(0, |e| e.registered.iter().filter(|r| **r).count());
        d["notify"] = serde_json::json!(if registered > 0 { "ioeventfd" } else { "vcpu" });
        d["notify_queues"] = serde_json::json!(registered);
        d
    }

    /// Signals queue `index`'s notify eventfd, as KVM would.
    #[cfg(test)]
    pub(crate) fn signal_notify(&self, index: usize) {
        self.events.as_ref().expect("queue events").fds[index].write(1).expect("eventfd write");
    }

    /// Looks at every ready queue once, as if the driver had notified each:
    /// after a resume, a restore or an incoming migration a notify may have
    /// been taken (or left in an eventfd) on the other side of the pause.
    pub fn kick_all(&mut self) {
        for i in 0..self.queues.len() {
            self.notify(i as u32);
        }
    }

    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    pub fn save(&self) -> TransportSnapshot {
        TransportSnapshot {
            device_type: self.device.device_type(),
            status: self.status,
            acked_features: self.acked_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt.status(),
            queues: self.queues.iter().map(|q| QueueSnapshot::from(q.state())).collect(),
            backend: self.device.identity(),
        }
    }

    /// Takes on a saved register file and queues. The device must be of the
    /// same type with the same number of queues; queue addresses are
    /// checked against this VM's memory.
    pub fn restore(&mut self, s: &TransportSnapshot) -> Result<(), String> {
        if s.device_type != self.device.device_type() || s.queues.len() != self.queues.len() {
            return Err(format!(
                "saved virtio device (type {}, {} queues) does not match this one (type {}, {} queues)",
                s.device_type,
                s.queues.len(),
                self.device.device_type(),
                self.queues.len()
            ));
        }
        let mut queues = Vec::with_capacity(s.queues.len());
        for (i, q) in s.queues.iter().enumerate() {
            let offered = self.queues[i].max_size();
            if q.max_size != offered {
                return Err(format!(
                    "saved virtio queue {i} has {} entries at most, this device offers {offered}",
                    q.max_size
                ));
            }
            let queue = Queue::try_from(virtio_queue::QueueState::from(q))
                .map_err(|e| format!("saved virtio queue {i} is invalid: {e}"))?;
            if queue.ready() && !queue.is_valid(&self.mem) {
                return Err(format!("saved virtio queue {i} lies outside guest memory"));
            }
            queues.push(queue);
        }
        self.queues = queues;
        self.status = s.status;
        self.acked_features = s.acked_features;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.queue_sel = s.queue_sel;
        self.interrupt.set_status(s.interrupt_status);
        if self.driver_ok() {
            self.device.activate(self.acked_features);
            if let Some(e) = &mut self.events {
                e.register(&self.queues);
            }
        }
        Ok(())
    }

    fn driver_ok(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0 && self.status & STATUS_FAILED == 0
    }

    /// Lets the backend move host input into the queues (called by the
    /// device event loop). Returns true if input waits for the driver (no
    /// free buffers, or no driver yet).
    pub fn backend_ready(&mut self) -> bool {
        if !self.driver_ok() {
            return true;
        }
        self.device.backend_ready(&mut self.queues, &self.mem, &self.interrupt)
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        self.status = 0;
        self.acked_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        for q in &mut self.queues {
            q.reset();
        }
        self.interrupt.ack(u32::MAX);
        self.device.reset();
        if let Some(e) = &mut self.events {
            e.unregister();
        }
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let mut value = value;
        if value & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            let offered = self.device.features();
            if self.acked_features & !offered != 0 || self.acked_features & VIRTIO_F_VERSION_1 == 0 {
                tracing::warn!(
                    "virtio: driver acked features {:#x} not within {:#x} or without VERSION_1",
                    self.acked_features,
                    offered
                );
                value &= !STATUS_FEATURES_OK;
            }
        }
        if value & STATUS_DRIVER_OK != 0 && self.status & STATUS_DRIVER_OK == 0 {
            let bad = self.queues.iter().position(|q| q.ready() && !q.is_valid(&self.mem));
            if let Some(i) = bad {
                tracing::warn!("virtio: queue {i} addresses are outside guest memory or misaligned");
                value |= STATUS_FAILED;
            } else {
                self.device.activate(self.acked_features);
                if let Some(e) = &mut self.events {
                    e.register(&self.queues);
                }
            }
        }
        self.status = value;
    }

    fn notify(&mut self, index: u32) {
        let i = index as usize;
        if !self.driver_ok() || !self.queues.get(i).is_some_and(|q| q.ready()) {
            return;
        }
        self.device.queue_notify(i, &mut self.queues, &self.mem, &self.interrupt);
    }
}

fn read_u32(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= REG_CONFIG {
            self.device.read_config(offset - REG_CONFIG, data);
            return;
        }
        if data.len() != 4 {
            data.fill(0);
            return;
        }
        let value = match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => 0,
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= REG_CONFIG {
            // No device here has writable configuration.
            return;
        }
        if data.len() != 4 {
            return;
        }
        let v = read_u32(data);
        // Queue and feature registers may change only while the driver sets
        // the device up (before DRIVER_OK), as the spec requires.
        let setting_up = self.status & STATUS_DRIVER_OK == 0;
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_DRIVER_FEATURES if setting_up && self.status & STATUS_FEATURES_OK == 0 => {
                match self.driver_features_sel {
                    0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(v),
                    1 => self.acked_features = (self.acked_features & 0xffff_ffff) | (u64::from(v) << 32),
                    _ => {}
                }
            }
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NUM if setting_up => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(v as u16);
                }
            }
            REG_QUEUE_READY if setting_up => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH
                if setting_up =>
            {
                let (lo, hi) = if offset & 4 == 0 { (Some(v), None) } else { (None, Some(v)) };
                if let Some(q) = self.selected_queue() {
                    match offset & !4 {
                        REG_QUEUE_DESC_LOW => q.set_desc_table_address(lo, hi),
                        REG_QUEUE_DRIVER_LOW => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
                }
            }
            REG_QUEUE_NOTIFY => self.notify(v),
            REG_INTERRUPT_ACK => self.interrupt.ack(v),
            REG_STATUS => self.set_status(v),
            _ => tracing::debug!("virtio-mmio: ignored write of {v:#x} at {offset:#x}"),
        }
    }
}
