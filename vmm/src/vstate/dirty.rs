//! Dirty page tracking for live migration: KVM's dirty log for what the
//! guest writes, ORed with vm-memory's bitmap for what the VMM writes
//! (virtio rings, received frames, disk reads), which KVM cannot see.
//!
//! With KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (and INITIALLY_SET) turning the
//! log on is cheap: pages are write-protected only when we clear their bits
//! (KVM_CLEAR_DIRTY_LOG), just before we send them. Without it,
//! KVM_GET_DIRTY_LOG gets and re-protects in one call.

use kvm_bindings::{
    kvm_enable_cap, kvm_userspace_memory_region, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::memory::{GuestMemory, PAGE_SIZE};

const MANUAL_PROTECT_ENABLE: u64 = 1;
const INITIALLY_SET: u64 = 2;

/// `_IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)`; kvm-ioctls lacks it.
const KVM_CLEAR_DIRTY_LOG: libc::c_ulong = 0xc018_aec0;

#[repr(C)]
struct ClearDirtyLog {
    slot: u32,
    num_pages: u32,
    first_page: u64,
    dirty_bitmap: *mut u64,
}

#[derive(Debug, thiserror::Error)]
#[error("KVM cannot {op}: {source}")]
pub struct Error {
    op: &'static str,
    source: std::io::Error,
}

fn err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |e| Error { op, source: std::io::Error::from_raw_os_error(e.errno()) }
}

/// How the log works on this host, for the figures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum DirtyLogMode {
    ManualProtect,
    GetDirtyLog,
}

/// Asks for MANUAL_DIRTY_LOG_PROTECT2 at VM creation; returns the mode.
pub fn enable_manual_protect(vm: &mut VmFd) -> DirtyLogMode {
    let supported = vm.check_extension_raw(libc::c_ulong::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2));
    if supported <= 0 {
        return DirtyLogMode::GetDirtyLog;
    }
    let mut flags = MANUAL_PROTECT_ENABLE;
    if supported as u64 & INITIALLY_SET != 0 {
        flags |= INITIALLY_SET;
    }
    let mut cap = kvm_enable_cap { cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, ..Default::default() };
    cap.args[0] = flags;
    match vm.enable_cap(&cap) {
        Ok(()) => DirtyLogMode::ManualProtect,
        Err(_) => DirtyLogMode::GetDirtyLog,
    }
}

/// Turns KVM's dirty logging on or off for every memory slot.
pub fn set_logging(vm: &VmFd, mem: &GuestMemory, on: bool) -> Result<(), Error> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|_| Error { op: "map guest memory", source: std::io::Error::from_raw_os_error(libc::EFAULT) })?
            as u64;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host,
            flags: if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
        };
        // SAFETY: same mapping as registered at VM creation, owned by `mem`.
        unsafe { vm.set_user_memory_region(r) }.map_err(err("switch dirty logging"))?;
    }
    Ok(())
}

/// Dirty pages of all of guest RAM, by page index in the memory file.
#[derive(Clone, Debug, Default)]
pub struct DirtyBitmap {
    words: Vec<u64>,
}

impl DirtyBitmap {
    pub fn pages(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Memory-file offsets of dirty pages, in order.
    pub fn offsets(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = w.trailing_zeros() as u64;
                w &= w - 1;
                Some((i as u64 * 64 + bit) * PAGE_SIZE)
            })
        })
    }

    /// Adds every page of `other`.
    pub fn merge(&mut self, other: &DirtyBitmap) {
        self.merge_at(0, &other.words);
    }

    /// Adds `bits` (one per page) starting at page `first_page`.
    fn merge_at(&mut self, first_page: u64, bits: &[u64]) {
        let shift = (first_page % 64) as u32;
        let base = (first_page / 64) as usize;
        let need = base + bits.len() + 1;
        if self.words.len() < need {
            self.words.resize(need, 0);
        }
        for (i, &b) in bits.iter().enumerate() {
            if shift == 0 {
                self.words[base + i] |= b;
            } else {
                self.words[base + i] |= b << shift;
                self.words[base + i + 1] |= b >> (64 - shift);
            }
        }
    }

    /// Merges a KVM dirty log of a slot that starts at `file_offset`.
    pub fn merge_kvm_log(&mut self, file_offset: u64, log: &[u64]) {
        self.merge_at(file_offset / PAGE_SIZE, log);
    }
}

/// Collects (and re-protects) the pages dirtied since the last call.
pub fn take_dirty(vm: &VmFd, mem: &GuestMemory, mode: DirtyLogMode) -> Result<DirtyBitmap, Error> {
    let mut dirty = DirtyBitmap::default();
    let mut file_offset = 0u64;
    for (slot, region) in mem.iter().enumerate() {
        let len = region.len();
        let mut log = vm.get_dirty_log(slot as u32, len as usize).map_err(err("read the dirty log"))?;
        if mode == DirtyLogMode::ManualProtect {
            let pages = len / PAGE_SIZE;
            let mut clear = ClearDirtyLog {
                slot: slot as u32,
                num_pages: pages as u32,
                first_page: 0,
                dirty_bitmap: log.as_mut_ptr(),
            };
            // SAFETY: KVM reads `pages` bits from the bitmap, which
            // get_dirty_log sized for exactly this slot.
            if unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(vm), KVM_CLEAR_DIRTY_LOG, &mut clear) } < 0 {
                return Err(Error { op: "clear the dirty log", source: std::io::Error::last_os_error() });
            }
        }
        dirty.merge_kvm_log(file_offset, &log);
        // What the VMM wrote into this region.
        let vmm_bits = region.get_mmap().bitmap().get_and_reset();
        dirty.merge_kvm_log(file_offset, &vmm_bits);
        file_offset += len;
    }
    Ok(dirty)
}

/// Forgets what the VMM wrote so far (round 0 sends everything anyway).
pub fn reset_vmm_bitmap(mem: &GuestMemory) {
    for region in mem.iter() {
        region.get_mmap().bitmap().reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmaps_merge_at_any_page_and_list_offsets() {
        let mut d = DirtyBitmap::default();
        d.merge_kvm_log(0, &[0b101]);
        d.merge_kvm_log(3 * PAGE_SIZE, &[0b1, 1 << 63]);
        let offs: Vec<u64> = d.offsets().collect();
        assert_eq!(offs, vec![0, 2 * PAGE_SIZE, 3 * PAGE_SIZE, (3 + 127) * PAGE_SIZE]);
        assert_eq!(d.pages(), 4);
    }
}
