//! The virtio-mmio transport, version 2 (virtio 1.x). Every register access
//! is a VM exit (15-20 us on PVM), so this is used for setup and
//! notifications only; completions are found by polling the rings in memory.

use super::queue::Queue;
use super::{status, F_VERSION_1};
use crate::cmdline::VirtioMmioDevice;
use crate::io::rdtsc;

const MAGIC_VALUE: usize = 0x000;
const VERSION: usize = 0x004;
const DEVICE_ID: usize = 0x008;
const DEVICE_FEATURES: usize = 0x010;
const DEVICE_FEATURES_SEL: usize = 0x014;
const DRIVER_FEATURES: usize = 0x020;
const DRIVER_FEATURES_SEL: usize = 0x024;
const QUEUE_SEL: usize = 0x030;
const QUEUE_NUM_MAX: usize = 0x034;
const QUEUE_NUM: usize = 0x038;
const QUEUE_READY: usize = 0x044;
const QUEUE_NOTIFY: usize = 0x050;
const STATUS: usize = 0x070;
const QUEUE_DESC_LOW: usize = 0x080;
const QUEUE_DESC_HIGH: usize = 0x084;
const QUEUE_DRIVER_LOW: usize = 0x090;
const QUEUE_DRIVER_HIGH: usize = 0x094;
const QUEUE_DEVICE_LOW: usize = 0x0a0;
const QUEUE_DEVICE_HIGH: usize = 0x0a4;
const CONFIG_GENERATION: usize = 0x0fc;
const CONFIG: usize = 0x100;

const MAGIC: u32 = 0x7472_6976; // "virt"
/// Register window plus the largest device config we read.
const MIN_WINDOW: u64 = 0x200;
/// The identity map covers 0..64 GiB; anything above would fault.
const MAPPED_END: u64 = 64 << 30;

pub struct Transport {
    base: u64,
    pub device_id: u32,
}

/// Why a transport was not taken.
pub enum ProbeError {
    OutsideMap,
    BadMagic(u32),
    Version(u32),
    NoDevice,
}

impl core::fmt::Display for ProbeError {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        match self {
            ProbeError::OutsideMap => write!(f, "window outside the guest's address map"),
            ProbeError::BadMagic(m) => write!(f, "bad magic {:#x}", m),
            ProbeError::Version(1) => write!(f, "legacy transport (version 1) not supported"),
            ProbeError::Version(v) => write!(f, "unknown transport version {}", v),
            ProbeError::NoDevice => write!(f, "no device behind the transport"),
        }
    }
}

impl Transport {
    pub fn probe(dev: &VirtioMmioDevice) -> Result<Transport, ProbeError> {
        let size = dev.size.max(MIN_WINDOW);
        if !dev.base.is_multiple_of(4) || dev.base.checked_add(size).is_none_or(|end| end > MAPPED_END) {
            return Err(ProbeError::OutsideMap);
        }
        let t = Transport { base: dev.base, device_id: 0 };
        let magic = t.read(MAGIC_VALUE);
        if magic != MAGIC {
            return Err(ProbeError::BadMagic(magic));
        }
        let version = t.read(VERSION);
        if version != 2 {
            return Err(ProbeError::Version(version));
        }
        let device_id = t.read(DEVICE_ID);
        if device_id == 0 {
            return Err(ProbeError::NoDevice);
        }
        Ok(Transport { base: dev.base, device_id })
    }

    pub fn base(&self) -> u64 {
        self.base
    }

    fn read(&self, off: usize) -> u32 {
        // SAFETY: `probe` checked the window lies in the identity map (the
        // 3-4 GiB hole is mapped uncached); a register read has no effect on
        // guest memory.
        unsafe { ((self.base + off as u64) as *const u32).read_volatile() }
    }

    fn write(&self, off: usize, v: u32) {
        // SAFETY: as for `read`; the device decides what a write means.
        unsafe { ((self.base + off as u64) as *mut u32).write_volatile(v) }
    }

    pub fn config_u8(&self, off: usize) -> u8 {
        // SAFETY: as for `read`; config space is byte-addressable.
        unsafe { ((self.base + (CONFIG + off) as u64) as *const u8).read_volatile() }
    }

    /// A 64-bit config field, read as two 32-bit halves and retried until
    /// the config generation shows a consistent snapshot.
    pub fn config_u64(&self, off: usize) -> u64 {
        let mut v = 0;
        for _ in 0..8 {
            let gen = self.read(CONFIG_GENERATION);
            let lo = self.read(CONFIG + off) as u64;
            let hi = self.read(CONFIG + off + 4) as u64;
            v = hi << 32 | lo;
            if self.read(CONFIG_GENERATION) == gen {
                break;
            }
        }
        v
    }

    /// Resets the device and waits (bounded) until it reads back 0.
    pub fn reset(&self, tsc_khz: u64) -> bool {
        self.write(STATUS, 0);
        let deadline = rdtsc() + tsc_khz * 100;
        while self.read(STATUS) != 0 {
            if rdtsc() > deadline {
                return false;
            }
        }
        true
    }

    /// Reset, ACKNOWLEDGE|DRIVER, feature negotiation and FEATURES_OK.
    /// Returns the negotiated features; VERSION_1 is required.
    pub fn negotiate(&self, wanted: u64, tsc_khz: u64) -> Result<u64, &'static str> {
        if !self.reset(tsc_khz) {
            return Err("reset did not complete");
        }
        self.write(STATUS, status::ACKNOWLEDGE as u32);
        self.write(STATUS, (status::ACKNOWLEDGE | status::DRIVER) as u32);
        let mut offered = 0u64;
        for sel in 0..2u32 {
            self.write(DEVICE_FEATURES_SEL, sel);
            offered |= (self.read(DEVICE_FEATURES) as u64) << (32 * sel);
        }
        if offered & F_VERSION_1 == 0 {
            self.fail();
            return Err("device does not offer VIRTIO_F_VERSION_1");
        }
        let features = offered & (wanted | F_VERSION_1);
        for sel in 0..2u32 {
            self.write(DRIVER_FEATURES_SEL, sel);
            self.write(DRIVER_FEATURES, (features >> (32 * sel)) as u32);
        }
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.write(STATUS, s as u32);
        if self.read(STATUS) & status::FEATURES_OK as u32 == 0 {
            self.fail();
            return Err("device refused FEATURES_OK");
        }
        Ok(features)
    }

    /// Largest queue the device offers at `index`; 0 if there is none.
    pub fn queue_max(&self, index: u32) -> u32 {
        self.write(QUEUE_SEL, index);
        if self.read(QUEUE_READY) != 0 {
            return 0;
        }
        self.read(QUEUE_NUM_MAX)
    }

    /// Hands the rings of `q` to the device as queue `index`.
    pub fn setup_queue(&self, index: u32, q: &Queue) -> Result<(), &'static str> {
        self.write(QUEUE_SEL, index);
        if self.read(QUEUE_READY) != 0 {
            return Err("queue already live");
        }
        self.write(QUEUE_NUM, q.size() as u32);
        let (desc, driver, device) = q.addresses();
        self.write(QUEUE_DESC_LOW, desc as u32);
        self.write(QUEUE_DESC_HIGH, (desc >> 32) as u32);
        self.write(QUEUE_DRIVER_LOW, driver as u32);
        self.write(QUEUE_DRIVER_HIGH, (driver >> 32) as u32);
        self.write(QUEUE_DEVICE_LOW, device as u32);
        self.write(QUEUE_DEVICE_HIGH, (device >> 32) as u32);
        self.write(QUEUE_READY, 1);
        if self.read(QUEUE_READY) != 1 {
            return Err("queue did not become ready");
        }
        Ok(())
    }

    pub fn driver_ok(&self) -> Result<(), &'static str> {
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        self.write(STATUS, s as u32);
        let now = self.read(STATUS);
        if now & status::DEVICE_NEEDS_RESET as u32 != 0 || now & status::DRIVER_OK as u32 == 0 {
            self.fail();
            return Err("device did not accept DRIVER_OK");
        }
        Ok(())
    }

    pub fn notify(&self, index: u32) {
        self.write(QUEUE_NOTIFY, index);
    }

    /// Tells the device the driver gave up on it.
    pub fn fail(&self) {
        let s = self.read(STATUS);
        self.write(STATUS, s | status::FAILED as u32);
    }
}
