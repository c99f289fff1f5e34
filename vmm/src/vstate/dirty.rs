//! Dirty page tracking for live migration: KVM's dirty log for what the
//! guest writes, ORed with vm-memory's bitmap for what the VMM writes
//! (virtio rings, received frames, disk reads), which KVM cannot see.
//!
//! With KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (and INITIALLY_SET) turning the
//! log on is cheap: pages are write-protected only when we clear their bits
//! (KVM_CLEAR_DIRTY_LOG), just before we send them. Without it,
//! KVM_GET_DIRTY_LOG gets and re-protects in one call.
//!
//! Or, chosen when the VM is made (`--dirty-tracking ring`), KVM's dirty
//! ring: each vCPU appends the pages it dirties to a ring shared with us
//! ([`Rings`]), so a sync costs what was dirtied, not a scan of a bitmap
//! of all of memory. A vCPU whose ring fills exits
//! (KVM_EXIT_DIRTY_RING_FULL) and makes room itself before going on.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use kvm_bindings::{
    kvm_dirty_gfn, kvm_enable_cap, kvm_userspace_memory_region, KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_PAGE_OFFSET, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{VcpuFd, VmFd};
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
    /// KVM's per-vCPU dirty rings.
    Ring,
}

/// How a VM tracks dirty pages: a host-local choice made when the VM is
/// made (KVM fixes it before the first vCPU).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DirtyTracking {
    /// KVM's dirty bitmap per memory slot (manual protect where offered).
    #[default]
    Log,
    /// KVM's dirty ring per vCPU, of this many entries (a power of two).
    Ring(u32),
}

impl std::str::FromStr for DirtyTracking {
    type Err = String;
    /// `log`, `ring` ([`RING_ENTRIES`] entries) or `ring:N`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!("dirty tracking is log, ring or ring:ENTRIES (a power of two from {MIN_RING_ENTRIES} to {RING_ENTRIES}), not {s:?}")
        };
        match s.split_once(':') {
            None if s == "log" => Ok(DirtyTracking::Log),
            None if s == "ring" => Ok(DirtyTracking::Ring(RING_ENTRIES)),
            Some(("ring", n)) => match n.parse::<u32>() {
                Ok(n) if n.is_power_of_two() && (MIN_RING_ENTRIES..=RING_ENTRIES).contains(&n) => {
                    Ok(DirtyTracking::Ring(n))
                }
                _ => Err(bad()),
            },
            _ => Err(bad()),
        }
    }
}

/// Entries in each vCPU's ring by default (and at most): 64 Ki, 1 MiB of
/// ring per vCPU, so a guest dirtying 200 MiB/s (51 200 pages/s) fills it
/// in about a second and a migration's rounds, far more often, keep it from
/// filling. A vCPU whose ring fills exits and makes room itself.
pub const RING_ENTRIES: u32 = 1 << 16;
/// One page of ring.
pub const MIN_RING_ENTRIES: u32 = 256;

const GFN_DIRTY: u32 = 1;
const GFN_RESET: u32 = 2;

/// `_IO(KVMIO, 0xc7)`: kvm-ioctls lacks it.
const KVM_RESET_DIRTY_RINGS: libc::c_ulong = 0xaec7;

/// Turns on KVM's dirty ring of `entries` per vCPU for a VM that has no
/// vCPU yet (the acquire/release flavour where KVM offers it). None if KVM
/// refuses.
pub fn enable_ring(vm: &VmFd, entries: u32) -> Option<std::sync::Arc<Rings>> {
    let bytes = u64::from(entries) * std::mem::size_of::<kvm_dirty_gfn>() as u64;
    for cap in [KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING] {
        let max = vm.check_extension_raw(libc::c_ulong::from(cap));
        if max <= 0 || (max as u64) < bytes {
            continue;
        }
        let mut c = kvm_enable_cap { cap, ..Default::default() };
        c.args[0] = bytes;
        if vm.enable_cap(&c).is_ok() {
            return Some(std::sync::Arc::new(Rings { entries, rings: Mutex::new(Harvest::default()) }));
        }
    }
    None
}

/// One vCPU's ring, mapped from its fd.
struct Ring {
    gfns: *mut kvm_dirty_gfn,
    entries: u32,
    /// The next entry to look at.
    next: u32,
}

// SAFETY: the mapping is shared with KVM only; we touch it under the
// Rings mutex (entries' flags through atomics, as KVM does).
unsafe impl Send for Ring {}

impl Drop for Ring {
    fn drop(&mut self) {
        let bytes = self.entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: unmaps exactly what `Rings::map` mapped, once.
        unsafe { libc::munmap(self.gfns.cast(), bytes) };
    }
}

#[derive(Default)]
struct Harvest {
    rings: Vec<Ring>,
    /// (slot, page in slot) of every page harvested and not yet taken.
    pending: Vec<(u32, u64)>,
}

/// The dirty rings of one VM's vCPUs, and what was harvested from them.
pub struct Rings {
    entries: u32,
    rings: Mutex<Harvest>,
}

impl Rings {
    /// Maps vCPU `fd`'s ring (right after the vCPU is made).
    pub fn map(&self, fd: &VcpuFd) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let bytes = self.entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: maps KVM's ring of this vCPU at the offset KVM documents;
        // the result is checked, and unmapped by Ring's drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                i64::from(KVM_DIRTY_LOG_PAGE_OFFSET) * PAGE_SIZE as i64,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        self.lock().rings.push(Ring { gfns: p.cast(), entries: self.entries, next: 0 });
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Harvest> {
        self.rings.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves every dirty entry of every ring into `pending` and has KVM
    /// re-protect those pages. The vCPU whose ring filled calls this too.
    pub fn harvest(&self, vm_fd: std::os::fd::RawFd) -> Result<(), Error> {
        let mut h = self.lock();
        let Harvest { rings, pending } = &mut *h;
        let mut any = false;
        for ring in rings.iter_mut() {
            loop {
                let i = (ring.next % ring.entries) as usize;
                // SAFETY: i < entries, so the entry is inside the mapping.
                let gfn = unsafe { ring.gfns.add(i) };
                // SAFETY: the flags word is aligned and lives as long as the
                // mapping; KVM writes it too, so it is only used atomically.
                let flags = unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*gfn).flags)) };
                // Acquire: KVM wrote the slot and offset before DIRTY.
                if flags.load(Ordering::Acquire) & GFN_DIRTY == 0 {
                    break;
                }
                // SAFETY: a DIRTY entry's slot and offset stay as they are
                // until we hand the entry back (RESET below).
                let (slot, offset) = unsafe {
                    (
                        std::ptr::read_volatile(std::ptr::addr_of!((*gfn).slot)),
                        std::ptr::read_volatile(std::ptr::addr_of!((*gfn).offset)),
                    )
                };
                pending.push((slot, offset));
                // Release: KVM may reuse the entry once it sees RESET.
                flags.store(GFN_RESET, Ordering::Release);
                ring.next = ring.next.wrapping_add(1);
                any = true;
            }
        }
        if any {
            // SAFETY: KVM_RESET_DIRTY_RINGS on our VM fd takes no argument.
            if unsafe { libc::ioctl(vm_fd, KVM_RESET_DIRTY_RINGS) } < 0 {
                return Err(Error { op: "reset its dirty rings", source: std::io::Error::last_os_error() });
            }
        }
        Ok(())
    }

    /// Forgets what was harvested (a new migration starts from round 0).
    pub fn clear(&self, vm_fd: std::os::fd::RawFd) -> Result<(), Error> {
        self.harvest(vm_fd)?;
        self.lock().pending.clear();
        Ok(())
    }

    fn take(&self) -> Vec<(u32, u64)> {
        std::mem::take(&mut self.lock().pending)
    }
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
pub fn take_dirty(
    vm: &VmFd,
    mem: &GuestMemory,
    mode: DirtyLogMode,
    rings: Option<&Rings>,
) -> Result<DirtyBitmap, Error> {
    let mut dirty = DirtyBitmap::default();
    if let (DirtyLogMode::Ring, Some(rings)) = (mode, rings) {
        rings.harvest(std::os::fd::AsRawFd::as_raw_fd(vm))?;
        // Slot N's pages start in the memory file where slot N-1's end:
        // (first page, pages) per slot.
        let slots: Vec<(u64, u64)> = mem
            .iter()
            .scan(0u64, |at, r| {
                let first = *at / PAGE_SIZE;
                *at += r.len();
                Some((first, r.len() / PAGE_SIZE))
            })
            .collect();
        for (slot, page) in rings.take() {
            // The slot's low 16 bits; the address space (high bits) is 0.
            // An entry outside its slot would only grow the bitmap: skipped.
            match slots.get((slot & 0xffff) as usize) {
                Some(&(first, pages)) if page < pages => dirty.merge_at(first + page, &[1]),
                _ => tracing::warn!("dirty ring entry outside guest memory: slot {slot}, page {page}"),
            }
        }
        let mut file_offset = 0u64;
        for region in mem.iter() {
            let vmm_bits = region.get_mmap().bitmap().get_and_reset();
            dirty.merge_kvm_log(file_offset, &vmm_bits);
            file_offset += region.len();
        }
        return Ok(dirty);
    }
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
    fn dirty_tracking_parses_and_bounds_the_ring() {
        assert_eq!("log".parse::<DirtyTracking>(), Ok(DirtyTracking::Log));
        assert_eq!("ring".parse::<DirtyTracking>(), Ok(DirtyTracking::Ring(RING_ENTRIES)));
        assert_eq!("ring:1024".parse::<DirtyTracking>(), Ok(DirtyTracking::Ring(1024)));
        for bad in ["ring:1000", "ring:128", "ring:131072", "ring:", "bitmap", "log:4"] {
            assert!(bad.parse::<DirtyTracking>().is_err(), "{bad}");
        }
    }

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
