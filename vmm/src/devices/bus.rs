//! Address dispatch for port I/O and MMIO exits: an access goes to the
//! device whose range holds the address. Addresses nobody claims read as
//! all-ones (an empty bus) and swallow writes, which is what Linux's probes
//! expect.

use std::sync::{Arc, Mutex};

pub trait BusDevice: Send {
    /// `offset` is relative to the device's base address.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

struct Slot {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// One address space: port I/O or MMIO.
#[derive(Default)]
pub struct Bus {
    slots: Vec<Slot>,
}

#[derive(Debug, thiserror::Error)]
#[error("address range {base:#x}+{len:#x} overlaps a device already on the bus")]
pub struct Overlap {
    pub base: u64,
    pub len: u64,
}

impl Bus {
    pub fn insert(&mut self, base: u64, len: u64, device: Arc<Mutex<dyn BusDevice>>) -> Result<(), Overlap> {
        let end = base.checked_add(len).ok_or(Overlap { base, len })?;
        if len == 0 || self.slots.iter().any(|s| base < s.base + s.len && s.base < end) {
            return Err(Overlap { base, len });
        }
        self.slots.push(Slot { base, len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(&Slot, u64)> {
        self.slots.iter().find(|s| addr >= s.base && addr - s.base < s.len).map(|s| (s, addr - s.base))
    }

    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr) {
            Some((slot, offset)) => lock(&slot.device).read(offset, data),
            None => data.fill(0xff),
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) {
        if let Some((slot, offset)) = self.find(addr) {
            lock(&slot.device).write(offset, data);
        }
    }
}

/// The two address spaces a vCPU exit can land in.
#[derive(Default)]
pub struct Buses {
    pub pio: Bus,
    pub mmio: Bus,
}

/// A device mutex is only poisoned if a device panicked; keep serving.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn dispatches_by_range_and_floats_unclaimed_addresses() {
        let mut bus = Bus::default();
        bus.insert(0x100, 4, Arc::new(Mutex::new(Echo(7)))).unwrap();
        let mut b = [0u8; 1];
        bus.read(0x102, &mut b);
        assert_eq!(b, [9]);
        bus.write(0x100, &[20]);
        bus.read(0x103, &mut b);
        assert_eq!(b, [23]);
        bus.read(0x104, &mut b);
        assert_eq!(b, [0xff]);
        assert!(bus.insert(0x103, 2, Arc::new(Mutex::new(Echo(0)))).is_err());
        assert!(bus.insert(u64::MAX, 2, Arc::new(Mutex::new(Echo(0)))).is_err());
    }
}
