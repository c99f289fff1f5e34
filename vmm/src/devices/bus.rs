//! Port I/O dispatch: a vCPU's IN/OUT exit goes to the device whose range
//! holds the port. Ports nobody claims read as all-ones (an empty ISA bus)
//! and swallow writes, which is what Linux's probes expect.

use std::sync::{Arc, Mutex};

pub trait PioDevice: Send {
    /// `offset` is relative to the device's base port.
    fn read(&mut self, offset: u16, data: &mut [u8]);
    fn write(&mut self, offset: u16, data: &[u8]);
}

struct Slot {
    base: u16,
    len: u16,
    device: Arc<Mutex<dyn PioDevice>>,
}

#[derive(Default)]
pub struct PioBus {
    slots: Vec<Slot>,
}

#[derive(Debug, thiserror::Error)]
#[error("port range {base:#x}+{len} overlaps a device already on the bus")]
pub struct Overlap {
    pub base: u16,
    pub len: u16,
}

impl PioBus {
    pub fn insert(&mut self, base: u16, len: u16, device: Arc<Mutex<dyn PioDevice>>) -> Result<(), Overlap> {
        let end = u32::from(base) + u32::from(len);
        if self.slots.iter().any(|s| u32::from(base) < u32::from(s.base) + u32::from(s.len) && u32::from(s.base) < end)
        {
            return Err(Overlap { base, len });
        }
        self.slots.push(Slot { base, len, device });
        Ok(())
    }

    fn find(&self, port: u16) -> Option<(&Slot, u16)> {
        self.slots.iter().find(|s| port >= s.base && port - s.base < s.len).map(|s| (s, port - s.base))
    }

    pub fn read(&self, port: u16, data: &mut [u8]) {
        match self.find(port) {
            Some((slot, offset)) => lock(&slot.device).read(offset, data),
            None => data.fill(0xff),
        }
    }

    pub fn write(&self, port: u16, data: &[u8]) {
        if let Some((slot, offset)) = self.find(port) {
            lock(&slot.device).write(offset, data);
        }
    }
}

/// A device mutex is only poisoned if a device panicked; keep serving.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl PioDevice for Echo {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _offset: u16, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn dispatches_by_range_and_floats_unclaimed_ports() {
        let mut bus = PioBus::default();
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
    }
}
