//! Guest RAM: one memfd, mapped in ranges around the MMIO hole, with a
//! vm-memory `AtomicBitmap` that records every page the VMM itself writes
//! (KVM's dirty log cannot see those; live migration ORs both).

use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::layout;

pub type GuestMemory = GuestMemoryMmap<AtomicBitmap>;

pub const MIB: u64 = 1 << 20;
/// Below this a guest has no room for the boot tables and an image.
pub const MIN_MEM_MIB: u64 = 16;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("guest memory must be at least {MIN_MEM_MIB} MiB, {0} MiB asked")]
    TooSmall(u64),
    #[error("guest memory of {asked} MiB is more than this host has available ({available} MiB)")]
    TooLarge { asked: u64, available: u64 },
    #[error("cannot create the guest memory file: {0}")]
    Memfd(std::io::Error),
    #[error("cannot map guest memory: {0}")]
    Map(#[from] vm_memory::mmap::FromRangesError),
}

/// Guest RAM and the memfd behind it (kept for sharing with a later process).
pub struct GuestRam {
    pub memory: GuestMemory,
    pub memfd: File,
    pub size: u64,
}

/// MemAvailable from /proc/meminfo, in MiB.
pub fn host_available_mib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

pub fn check_size(mem_mib: u64) -> Result<(), Error> {
    if mem_mib < MIN_MEM_MIB {
        return Err(Error::TooSmall(mem_mib));
    }
    if let Some(available) = host_available_mib() {
        if mem_mib > available {
            return Err(Error::TooLarge { asked: mem_mib, available });
        }
    }
    Ok(())
}

pub fn create(mem_mib: u64) -> Result<GuestRam, Error> {
    check_size(mem_mib)?;
    let size = mem_mib * MIB;
    // SAFETY: memfd_create takes a NUL-terminated name and flags; the
    // returned descriptor is checked and then owned by `File`.
    let fd = unsafe { libc::memfd_create(c"ferry-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let memfd = unsafe { File::from_raw_fd(fd) };
    memfd.set_len(size).map_err(Error::Memfd)?;

    let mut offset = 0u64;
    let mut ranges = Vec::new();
    for (start, len) in layout::ram_ranges(size) {
        let file = memfd.try_clone().map_err(Error::Memfd)?;
        ranges.push((GuestAddress(start), len as usize, Some(FileOffset::new(file, offset))));
        offset += len;
    }
    let memory = GuestMemoryMmap::from_ranges_with_files(ranges)?;
    Ok(GuestRam { memory, memfd, size })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::bitmap::Bitmap;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn vmm_writes_are_recorded_in_the_bitmap() {
        let ram = create(64).unwrap();
        ram.memory.write_obj(0xdead_beefu32, GuestAddress(0x5000)).unwrap();
        let region = ram.memory.find_region(GuestAddress(0)).unwrap();
        assert!(region.bitmap().dirty_at(0x5000));
        assert!(!region.bitmap().dirty_at(0x6000));
    }

    #[test]
    fn refuses_absurd_sizes() {
        assert!(matches!(create(1), Err(Error::TooSmall(1))));
        assert!(matches!(create(1 << 40), Err(Error::TooLarge { .. })));
    }
}
