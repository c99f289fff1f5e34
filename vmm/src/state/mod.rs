//! The VM state model: plain serde structs, one module per state kind, that
//! serve snapshots, quick migration and live migration alike.
//!
//! Encoded as: magic `FERRYVM\0`, format version (u32 LE), payload length
//! (u64 LE), CRC-32 of the payload (u32 LE), then the payload (postcard).
//! A reader refuses any other version by name: formats change by bumping
//! `FORMAT_VERSION`, never silently.

pub mod devices;
pub mod vcpu;
pub mod vm;

use serde::{Deserialize, Serialize};

use crate::config::MachineConfig;
use crate::lifecycle::RunState;

pub const MAGIC: &[u8; 8] = b"FERRYVM\0";
/// 2: the machine config alone (no host choices) and the run state.
pub const FORMAT_VERSION: u32 = 2;
const HEADER_LEN: usize = 8 + 4 + 8 + 4;
/// No VM state comes near this; a larger length is corruption.
pub const MAX_STATE_BYTES: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("not a Ferry VM state (bad magic)")]
    BadMagic,
    #[error("VM state format version {found} is not supported: this ferry reads version {FORMAT_VERSION}")]
    UnsupportedVersion { found: u32 },
    #[error("VM state is truncated: {got} of {expected} bytes")]
    Truncated { expected: u64, got: u64 },
    #[error("VM state is corrupted (checksum mismatch)")]
    Checksum,
    #[error("VM state claims {0} bytes, more than any VM state ({MAX_STATE_BYTES} bytes)")]
    TooLarge(u64),
    #[error("VM state does not decode: {0}")]
    Decode(postcard::Error),
    #[error("cannot encode VM state: {0}")]
    Encode(postcard::Error),
}

/// Everything but guest memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    /// The guest-visible machine; each host supplies its own host config.
    pub machine: MachineConfig,
    /// What the VM was doing when it was saved: a paused VM comes back paused.
    pub run_state: RunState,
    pub mem_bytes: u64,
    pub vcpus: Vec<vcpu::VcpuState>,
    pub vm: vm::VmArchState,
    pub devices: devices::DevicesState,
}

impl VmState {
    pub fn encode(&self) -> Result<Vec<u8>, Error> {
        let payload = postcard::to_stdvec(self).map_err(Error::Encode)?;
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        out.extend_from_slice(&payload);
        Ok(out)
    }

    pub fn decode(bytes: &[u8]) -> Result<VmState, Error> {
        if bytes.len() < 8 || &bytes[..8] != MAGIC {
            return Err(if bytes.len() < 8 && MAGIC.starts_with(bytes) {
                Error::Truncated { expected: HEADER_LEN as u64, got: bytes.len() as u64 }
            } else {
                Error::BadMagic
            });
        }
        if bytes.len() < HEADER_LEN {
            return Err(Error::Truncated { expected: HEADER_LEN as u64, got: bytes.len() as u64 });
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
        if version != FORMAT_VERSION {
            return Err(Error::UnsupportedVersion { found: version });
        }
        let len = u64::from_le_bytes(bytes[12..20].try_into().unwrap());
        if len > MAX_STATE_BYTES {
            return Err(Error::TooLarge(len));
        }
        let crc = u32::from_le_bytes(bytes[20..24].try_into().unwrap());
        let payload = &bytes[HEADER_LEN..];
        if (payload.len() as u64) < len {
            return Err(Error::Truncated { expected: HEADER_LEN as u64 + len, got: bytes.len() as u64 });
        }
        let payload = &payload[..len as usize];
        if crc32fast::hash(payload) != crc {
            return Err(Error::Checksum);
        }
        postcard::from_bytes(payload).map_err(Error::Decode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VmState {
        VmState {
            machine: MachineConfig::new("/k"),
            run_state: RunState::Paused,
            mem_bytes: 64 << 20,
            vcpus: Vec::new(),
            vm: vm::VmArchState {
                pic_master: Default::default(),
                pic_slave: Default::default(),
                ioapic: Default::default(),
                pit: Default::default(),
                clock: Default::default(),
            },
            devices: devices::DevicesState { serial: Default::default(), virtio: Vec::new() },
        }
    }

    #[test]
    fn round_trips_and_names_every_kind_of_damage() {
        let bytes = sample().encode().unwrap();
        let back = VmState::decode(&bytes).unwrap();
        assert_eq!(back.mem_bytes, 64 << 20);

        assert!(matches!(VmState::decode(b"garbage!garbage!garbage!"), Err(Error::BadMagic)));
        assert!(matches!(VmState::decode(&bytes[..bytes.len() - 3]), Err(Error::Truncated { .. })));
        assert!(matches!(VmState::decode(&bytes[..10]), Err(Error::Truncated { .. })));
        let mut flipped = bytes.clone();
        *flipped.last_mut().unwrap() ^= 0x40;
        assert!(matches!(VmState::decode(&flipped), Err(Error::Checksum)));
        let mut future = bytes.clone();
        future[8..12].copy_from_slice(&3u32.to_le_bytes());
        let e = VmState::decode(&future).unwrap_err();
        assert!(e.to_string().contains("version 3 is not supported: this ferry reads version 2"), "{e}");
        let mut huge = bytes.clone();
        huge[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(VmState::decode(&huge), Err(Error::TooLarge(_))));
    }
}
