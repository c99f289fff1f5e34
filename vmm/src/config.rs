//! What a VM is made of, as the CLI and the API describe it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::boot::BootProtocol;
use crate::devices::serial::SerialOutput;
use crate::vstate::vm::DEFAULT_KVM_DEVICE;

pub const DEFAULT_MEM_MIB: u64 = 128;
pub const MAX_VCPUS: u8 = 64;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub mem_mib: u64,
    pub vcpus: u8,
    pub boot: BootProtocol,
    pub serial: SerialOutput,
    pub kvm_device: PathBuf,
}

impl VmConfig {
    pub fn new(kernel: impl Into<PathBuf>) -> VmConfig {
        VmConfig {
            kernel: kernel.into(),
            initrd: None,
            cmdline: String::new(),
            mem_mib: DEFAULT_MEM_MIB,
            vcpus: 1,
            boot: BootProtocol::Auto,
            serial: SerialOutput::Stdout,
            kvm_device: PathBuf::from(DEFAULT_KVM_DEVICE),
        }
    }
}
