//! Polling virtio drivers over the virtio-mmio transport (version 2).
//!
//! Devices come from the `virtio_mmio.device=` command line entries. The
//! first net and the first block device are driven; a device that breaks the
//! protocol is reported on the console and dropped, never trusted further.

pub mod blk;
pub mod mmio;
pub mod net;
pub mod queue;

use crate::cmdline::Config;
use crate::dma::DmaArena;
use crate::println;

pub const DEVICE_ID_NET: u32 = 1;
pub const DEVICE_ID_BLK: u32 = 2;

/// Device-independent feature bits.
pub const F_VERSION_1: u64 = 1 << 32;

/// Device status register bits.
pub mod status {
    pub const ACKNOWLEDGE: u8 = 1;
    pub const DRIVER: u8 = 2;
    pub const DRIVER_OK: u8 = 4;
    pub const FEATURES_OK: u8 = 8;
    pub const DEVICE_NEEDS_RESET: u8 = 64;
    pub const FAILED: u8 = 128;
}

pub struct Devices {
    pub net: Option<net::NetDevice>,
    pub blk: Option<blk::BlkDevice>,
}

/// Probes every transport on the command line and brings up the devices.
pub fn probe_all(cfg: &Config, arena: &mut DmaArena, tsc_khz: u64) -> Devices {
    let mut devs = Devices { net: None, blk: None };
    for d in cfg.virtio_devices() {
        let t = match mmio::Transport::probe(d) {
            Ok(t) => t,
            Err(e) => {
                println!("virtio-mmio {:#x}: {}; skipped", d.base, e);
                continue;
            }
        };
        match t.device_id {
            DEVICE_ID_NET if devs.net.is_none() => match net::NetDevice::new(t, arena, cfg.mac, tsc_khz) {
                Ok(n) => devs.net = Some(n),
                Err(e) => println!("virtio-net {:#x}: {}; device disabled", d.base, e),
            },
            DEVICE_ID_BLK if devs.blk.is_none() => match blk::BlkDevice::new(t, arena, tsc_khz) {
                Ok(b) => devs.blk = Some(b),
                Err(e) => println!("virtio-blk {:#x}: {}; device disabled", d.base, e),
            },
            DEVICE_ID_NET | DEVICE_ID_BLK => {
                println!("virtio-mmio {:#x}: another device of type {} ignored", d.base, t.device_id)
            }
            other => println!("virtio-mmio {:#x}: device type {} not supported; skipped", d.base, other),
        }
    }
    devs
}
