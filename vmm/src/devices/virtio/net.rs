//! virtio-net backed by a TAP device. Queue 0 receives (tap → guest),
//! queue 1 transmits (guest → tap). Frames carry the 12-byte virtio-net
//! header both ways, which the tap understands as is (IFF_VNET_HDR).

use std::io::{Read, Write};

use serde::Serialize;
use virtio_queue::{Queue, QueueT};

use super::{complete, notify_budget, read_config_bytes, Interrupt, VirtioDevice, TYPE_NET, VIRTIO_F_VERSION_1};
use crate::devices::backend::{Backend, BackendError};
use crate::devices::tap::{Tap, VNET_HDR_LEN};
use crate::mac::MacAddr;
use crate::memory::GuestMemory;

pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
const VIRTIO_NET_S_LINK_UP: u16 = 1;
const RX: usize = 0;
const TX: usize = 1;
/// Header plus the largest frame without offloads (and a VLAN tag).
const MAX_FRAME: usize = VNET_HDR_LEN + 1518;

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct NetStats {
    pub rx_frames: u64,
    pub tx_frames: u64,
    pub rx_dropped: u64,
    pub tx_dropped: u64,
    pub bad_chains: u64,
}

pub struct Net {
    tap: Tap,
    mac: MacAddr,
    /// A frame read from the tap that no guest buffer was free for yet.
    pending: Option<usize>,
    frame: Vec<u8>,
    pub stats: NetStats,
}

impl Net {
    pub fn new(tap: Tap, mac: MacAddr) -> Net {
        Net { tap, mac, pending: None, frame: vec![0; 65_562], stats: NetStats::default() }
    }

    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    /// Sends a RARP announcement for the guest's MAC out of the tap, as
    /// QEMU's self-announce does, so bridges learn where the guest now is.
    pub fn announce(&mut self) -> std::io::Result<()> {
        let frame = rarp_announce(self.mac);
        self.tap.write_frame(&frame)
    }

    /// Moves frames from the tap into free RX buffers. True if a frame waits
    /// for the guest to post more buffers.
    fn receive(&mut self, rxq: &mut Queue, mem: &GuestMemory, irq: &Interrupt) -> bool {
        loop {
            let len = match self.pending.take() {
                Some(len) => len,
                None => match self.tap.read_frame(&mut self.frame) {
                    Ok(Some(len)) => len,
                    Ok(None) => return false,
                    Err(e) => {
                        tracing::warn!("tap {}: read failed: {e}", self.tap.name());
                        return false;
                    }
                },
            };
            let Some(chain) = rxq.pop_descriptor_chain(mem) else {
                self.pending = Some(len);
                return true;
            };
            let head = chain.head_index();
            let written = match chain.writer(mem) {
                Ok(mut w) if w.available_bytes() >= len => match w.write_all(&self.frame[..len]) {
                    Ok(()) => len as u32,
                    Err(_) => {
                        self.stats.bad_chains += 1;
                        0
                    }
                },
                Ok(_) => {
                    self.stats.rx_dropped += 1;
                    0
                }
                Err(_) => {
                    self.stats.bad_chains += 1;
                    0
                }
            };
            if written > 0 {
                self.stats.rx_frames += 1;
            }
            complete(rxq, mem, head, written, irq);
        }
    }

    fn transmit(&mut self, txq: &mut Queue, mem: &GuestMemory, irq: &Interrupt) {
        for _ in 0..notify_budget(txq) {
            let Some(chain) = txq.pop_descriptor_chain(mem) else { break };
            let head = chain.head_index();
            match chain.reader(mem) {
                Ok(mut r) if (VNET_HDR_LEN..=MAX_FRAME).contains(&r.available_bytes()) => {
                    let len = r.available_bytes();
                    match r.read_exact(&mut self.frame[..len]) {
                        Ok(()) => match self.tap.write_frame(&self.frame[..len]) {
                            Ok(()) => self.stats.tx_frames += 1,
                            Err(_) => self.stats.tx_dropped += 1,
                        },
                        Err(_) => self.stats.bad_chains += 1,
                    }
                }
                Ok(_) => self.stats.tx_dropped += 1,
                Err(_) => self.stats.bad_chains += 1,
            }
            complete(txq, mem, head, 0, irq);
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS
    }

    fn queue_count(&self) -> usize {
        2
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut space = [0u8; 10];
        space[..6].copy_from_slice(&self.mac.0);
        space[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        space[8..10].copy_from_slice(&1u16.to_le_bytes()); // max_virtqueue_pairs
        read_config_bytes(&space, offset, data);
    }

    fn queue_notify(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemory, irq: &Interrupt) {
        match index {
            RX => {
                // New buffers: deliver what waited for them.
                self.receive(&mut queues[RX], mem, irq);
            }
            TX => self.transmit(&mut queues[TX], mem, irq),
            _ => {}
        }
    }

    fn backend_ready(&mut self, queues: &mut [Queue], mem: &GuestMemory, irq: &Interrupt) -> bool {
        if !queues[RX].ready() {
            return false;
        }
        self.receive(&mut queues[RX], mem, irq)
    }

    fn discard_backend_input(&mut self) {
        if self.pending.take().is_some() {
            self.stats.rx_dropped += 1;
        }
        while let Ok(Some(_)) = self.tap.read_frame(&mut self.frame) {
            self.stats.rx_dropped += 1;
        }
    }

    fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        Some(self.tap.as_raw_fd())
    }

    fn reset(&mut self) {
        self.pending = None;
    }

    fn backend_mut(&mut self) -> Option<&mut dyn Backend> {
        Some(self)
    }

    fn identity(&self) -> crate::state::devices::BackendSnapshot {
        crate::state::devices::BackendSnapshot::Net { tap: self.tap.name().to_owned(), mac: self.mac }
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::json!({ "type": "net", "tap": self.tap.name(), "mac": self.mac.to_string(), "stats": self.stats })
    }
}

impl Backend for Net {
    fn announce(&mut self) -> Result<bool, BackendError> {
        Net::announce(self)
            .map(|()| true)
            .map_err(|source| BackendError::Announce { tap: self.tap.name().to_owned(), source })
    }
}

/// A RARP "request reverse" for `mac`, broadcast, with a zero virtio-net
/// header in front (QEMU's announce frame).
pub fn rarp_announce(mac: MacAddr) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac.0);
    f.extend_from_slice(&0x8035u16.to_be_bytes()); // RARP
    f.extend_from_slice(&1u16.to_be_bytes()); // Ethernet
    f.extend_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f.extend_from_slice(&[6, 4]);
    f.extend_from_slice(&3u16.to_be_bytes()); // request reverse
    f.extend_from_slice(&mac.0);
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(&mac.0);
    f.extend_from_slice(&[0; 4]);
    f.resize(VNET_HDR_LEN + 60, 0); // minimum Ethernet frame
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rarp_frame_announces_the_mac() {
        let mac = MacAddr([0x52, 0x54, 0, 1, 2, 3]);
        let f = rarp_announce(mac);
        let eth = &f[VNET_HDR_LEN..];
        assert_eq!(eth.len(), 60);
        assert_eq!(&eth[0..6], &[0xff; 6]);
        assert_eq!(&eth[6..12], &mac.0);
        assert_eq!(&eth[12..14], &[0x80, 0x35]);
        assert_eq!(&eth[20..22], &[0, 3]);
        assert_eq!(&eth[22..28], &mac.0);
    }
}
