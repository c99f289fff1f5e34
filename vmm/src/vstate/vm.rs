//! The KVM VM: /dev/kvm, guest memory slots, in-kernel irqchip and PIT.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::arch::x86_64::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};
use crate::memory::GuestMemory;

pub const DEFAULT_KVM_DEVICE: &str = "/dev/kvm";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} does not exist: KVM is not available on this host (load kvm_intel, kvm_amd or kvm_pvm)")]
    NoKvm(PathBuf),
    #[error("permission denied opening {0}: run as root or join the group that owns it (usually 'kvm')")]
    KvmPermission(PathBuf),
    #[error("cannot open {path}: {source}")]
    OpenKvm { path: PathBuf, source: kvm_ioctls::Error },
    #[error("{0} is not a KVM device (KVM_GET_API_VERSION failed)")]
    NotKvm(PathBuf),
    #[error("KVM API version {0} is not the stable version 12")]
    KvmApiVersion(i32),
    #[error("KVM cannot {what}: {source}")]
    Kvm { what: &'static str, source: kvm_ioctls::Error },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

/// Opens the KVM device with errors a person can act on.
pub fn open_kvm(path: &Path) -> Result<Kvm, Error> {
    let cpath =
        std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| Error::NoKvm(path.to_owned()))?;
    let kvm = Kvm::new_with_path(&cpath).map_err(|source| match source.errno() {
        libc::ENOENT => Error::NoKvm(path.to_owned()),
        libc::EACCES | libc::EPERM => Error::KvmPermission(path.to_owned()),
        _ => Error::OpenKvm { path: path.to_owned(), source },
    })?;
    // Kvm::get_api_version swallows errors as -1 on non-KVM files.
    match kvm.get_api_version() {
        12 => Ok(kvm),
        v if v < 0 => Err(Error::NotKvm(path.to_owned())),
        v => Err(Error::KvmApiVersion(v)),
    }
}

/// True when this host's KVM is PVM (kvm_pvm): CPL0 guest code is emulated
/// and exceptions are not delivered.
pub fn is_pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

pub struct Vm {
    pub kvm: Kvm,
    /// Shared (weakly) with the virtio transports, which register their
    /// queue-notify ioeventfds when a driver gets ready.
    pub fd: Arc<VmFd>,
    pub supported_cpuid: CpuId,
    pub dirty_log_mode: super::dirty::DirtyLogMode,
    /// The vCPUs' dirty rings, when the VM tracks dirty pages that way.
    pub dirty_rings: Option<Arc<super::dirty::Rings>>,
}

impl Vm {
    pub fn new(kvm_device: &Path, tracking: super::dirty::DirtyTracking) -> Result<Vm, Error> {
        use super::dirty::{DirtyLogMode, DirtyTracking};
        let kvm = open_kvm(kvm_device)?;
        let mut fd = kvm.create_vm().map_err(kvm_err("create a VM"))?;
        let dirty_rings = match tracking {
            DirtyTracking::Ring(entries) => {
                let rings = super::dirty::enable_ring(&fd, entries);
                if rings.is_none() {
                    tracing::warn!("KVM here has no dirty ring of {entries} entries; dirty tracking uses the log");
                }
                rings
            }
            DirtyTracking::Log => None,
        };
        let dirty_log_mode = match &dirty_rings {
            Some(_) => DirtyLogMode::Ring,
            None => super::dirty::enable_manual_protect(&mut fd),
        };
        fd.set_tss_address(KVM_TSS_ADDRESS).map_err(kvm_err("set the TSS address"))?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS).map_err(kvm_err("set the identity map address"))?;
        fd.create_irq_chip().map_err(kvm_err("create the in-kernel irqchip"))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        fd.create_pit2(pit).map_err(kvm_err("create the in-kernel PIT"))?;
        let supported_cpuid =
            kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("report its supported CPUID"))?;
        Ok(Vm { kvm, fd: Arc::new(fd), supported_cpuid, dirty_log_mode, dirty_rings })
    }

    /// Registers every region of guest memory as a KVM memory slot.
    pub fn register_memory(&self, mem: &GuestMemory) -> Result<(), Error> {
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|_| Error::Kvm { what: "map guest memory", source: kvm_ioctls::Error::new(libc::EFAULT) })?
                as u64;
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host,
                flags: 0,
            };
            // SAFETY: the mapping is owned by `mem`, which outlives the VM
            // (the Vmm holds both and drops the VM fd first).
            unsafe { self.fd.set_user_memory_region(region) }.map_err(kvm_err("register guest memory"))?;
        }
        Ok(())
    }
}
