//! Loading a kernel and handing it what its boot protocol promises.
//!
//! - `pvh`: an ELF with a Xen PVH note (the test guest; Linux vmlinux too)
//!   entered in 32-bit protected mode with an `hvm_start_info`.
//! - `linux`: the Linux 64-bit boot protocol, for a bzImage or an ELF
//!   vmlinux, entered in long mode with a `boot_params` zero page.

pub mod linux;
pub mod pvh;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::{self, BzImage, Elf, KernelLoader, KernelLoaderResult, PvhBootCapability};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::arch::x86_64::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START};
use crate::arch::x86_64::regs::BootEntry;
use crate::memory::GuestMemory;

/// Which boot protocol to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootProtocol {
    /// PVH when the ELF has a PVH note, otherwise the Linux 64-bit protocol.
    #[default]
    Auto,
    Pvh,
    Linux64,
}

impl std::str::FromStr for BootProtocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "pvh" => Ok(Self::Pvh),
            "linux64" | "linux" => Ok(Self::Linux64),
            _ => Err(format!("unknown boot protocol '{s}' (expected auto, pvh or linux64)")),
        }
    }
}

/// What kind of image a kernel file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageKind {
    Elf,
    BzImage,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read kernel {path}: {source}")]
    ReadKernel { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a kernel: it is neither an x86_64 ELF (vmlinux, PVH) nor a bzImage")]
    NotAKernel { path: PathBuf },
    #[error("cannot load kernel {path}: {source}")]
    Load { path: PathBuf, source: loader::Error },
    #[error("{path} has no PVH entry note; boot it with the linux64 protocol")]
    NoPvhNote { path: PathBuf },
    #[error("a bzImage cannot be booted with PVH; use the linux64 protocol")]
    BzImagePvh,
    #[error("cannot read initrd {path}: {source}")]
    ReadInitrd { path: PathBuf, source: std::io::Error },
    #[error("initrd {path} ({size} bytes) does not fit in guest memory below {limit:#x}")]
    InitrdTooLarge { path: PathBuf, size: u64, limit: u64 },
    #[error("invalid kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    #[error("cannot write boot data into guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    #[error("cannot write the kernel command line into guest memory: {0}")]
    LoadCmdline(loader::Error),
}

/// Everything needed to boot.
#[derive(Clone, Debug)]
pub struct BootSpec<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
    pub protocol: BootProtocol,
    pub mem_bytes: u64,
    /// Where the ACPI RSDP is, for the boot protocol to hand over.
    pub acpi_rsdp: Option<u64>,
}

/// What the loader did, for logs and tests.
#[derive(Clone, Copy, Debug)]
pub struct Booted {
    pub entry: BootEntry,
    pub image: ImageKind,
    pub kernel_load: u64,
    pub kernel_end: u64,
    pub initrd: Option<(u64, u64)>,
}

pub fn sniff(kernel: &mut File, path: &Path) -> Result<ImageKind, Error> {
    let read_err = |source| Error::ReadKernel { path: path.to_owned(), source };
    let mut head = [0u8; 0x206];
    kernel.seek(SeekFrom::Start(0)).map_err(read_err)?;
    let n = read_up_to(kernel, &mut head).map_err(read_err)?;
    if n >= 20 && head[0..4] == *b"\x7fELF" {
        return Ok(ImageKind::Elf);
    }
    if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        return Ok(ImageKind::BzImage);
    }
    Err(Error::NotAKernel { path: path.to_owned() })
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

pub fn load(mem: &GuestMemory, spec: &BootSpec) -> Result<Booted, Error> {
    let path = spec.kernel;
    let mut kernel = File::open(path).map_err(|source| Error::ReadKernel { path: path.to_owned(), source })?;
    let image = sniff(&mut kernel, path)?;
    let load_err = |source| Error::Load { path: path.to_owned(), source };
    let result: KernelLoaderResult = match image {
        ImageKind::Elf => Elf::load(mem, None, &mut kernel, Some(GuestAddress(HIMEM_START))).map_err(load_err)?,
        ImageKind::BzImage => {
            BzImage::load(mem, None, &mut kernel, Some(GuestAddress(HIMEM_START))).map_err(load_err)?
        }
    };

    let cmdline = Cmdline::try_from(spec.cmdline, CMDLINE_MAX_SIZE).map_err(Error::Cmdline)?;
    loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline).map_err(Error::LoadCmdline)?;
    let cmdline_len = spec.cmdline.len() as u32 + 1;

    let initrd = match spec.initrd {
        Some(p) => Some(load_initrd(mem, p, result.kernel_end)?),
        None => None,
    };

    let pvh_entry = match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => Some(addr.0),
        _ => None,
    };
    let use_pvh = match (spec.protocol, image, pvh_entry) {
        (BootProtocol::Linux64, _, _) => false,
        (BootProtocol::Auto, _, entry) => entry.is_some(),
        (BootProtocol::Pvh, ImageKind::BzImage, _) => return Err(Error::BzImagePvh),
        (BootProtocol::Pvh, _, None) => return Err(Error::NoPvhNote { path: path.to_owned() }),
        (BootProtocol::Pvh, _, Some(_)) => true,
    };
    let entry = if use_pvh {
        let start_info = pvh::write_start_info(mem, spec.mem_bytes, initrd, spec.acpi_rsdp)?;
        BootEntry::Pvh { entry: pvh_entry.expect("checked above"), start_info }
    } else {
        let boot_params =
            linux::write_boot_params(mem, spec.mem_bytes, result.setup_header, cmdline_len, initrd, spec.acpi_rsdp)?;
        let entry = match image {
            // startup_64 sits 0x200 into the protected-mode kernel.
            ImageKind::BzImage => result.kernel_load.0 + 0x200,
            ImageKind::Elf => result.kernel_load.0,
        };
        BootEntry::Linux64 { entry, boot_params }
    };
    Ok(Booted { entry, image, kernel_load: result.kernel_load.0, kernel_end: result.kernel_end, initrd })
}

/// Places the initrd as high as possible below 2 GiB (Linux's default
/// initrd_addr_max) and the end of low RAM, page-aligned, above the kernel.
fn load_initrd(mem: &GuestMemory, path: &Path, kernel_end: u64) -> Result<(u64, u64), Error> {
    let mut f = File::open(path).map_err(|source| Error::ReadInitrd { path: path.to_owned(), source })?;
    let size = f.metadata().map_err(|source| Error::ReadInitrd { path: path.to_owned(), source })?.len();
    let low_end = mem.iter().next().map(vm_memory::GuestMemoryRegion::len).unwrap_or(0);
    let limit = low_end.min(0x8000_0000);
    let too_large = || Error::InitrdTooLarge { path: path.to_owned(), size, limit };
    let addr = limit.checked_sub(size).ok_or_else(too_large)? & !0xfff;
    if addr < kernel_end {
        return Err(too_large());
    }
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(|e| Error::ReadInitrd { path: path.to_owned(), source: std::io::Error::other(e.to_string()) })?;
    Ok((addr, size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::ZERO_PAGE_START;
    use linux_loader::loader::bootparam::boot_params;

    /// A minimal bzImage: one setup sector after the boot sector, then a
    /// recognisable "protected-mode kernel".
    fn fake_bzimage(dir: &Path) -> (PathBuf, Vec<u8>) {
        let mut img = vec![0u8; 2 * 512];
        img[0x1f1] = 1; // setup_sects
        img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // protocol 2.15
        img[0x211] = 0x1; // loadflags: LOADED_HIGH
        img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        img[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes()); // kernel_alignment
        let payload: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        img.extend_from_slice(&payload);
        let path = dir.join("bzImage");
        std::fs::write(&path, &img).unwrap();
        (path, payload)
    }

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ferry-boot-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn bzimage_lands_at_code32_start_with_a_complete_zero_page() {
        let dir = scratch("bz");
        let (path, payload) = fake_bzimage(&dir);
        let initrd = dir.join("initrd");
        std::fs::write(&initrd, vec![0xabu8; 10_000]).unwrap();
        let ram = crate::memory::create(64).unwrap();
        let spec = BootSpec {
            kernel: &path,
            initrd: Some(&initrd),
            cmdline: "console=ttyS0 quiet",
            protocol: BootProtocol::Auto,
            mem_bytes: ram.size,
            acpi_rsdp: Some(0xe0000),
        };
        let booted = load(&ram.memory, &spec).unwrap();
        assert_eq!(booted.image, ImageKind::BzImage);
        assert_eq!(booted.kernel_load, 0x10_0000);
        assert_eq!(booted.entry, BootEntry::Linux64 { entry: 0x10_0200, boot_params: ZERO_PAGE_START });

        let mut loaded = vec![0u8; payload.len()];
        ram.memory.read_slice(&mut loaded, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(loaded, payload, "protected-mode kernel copied verbatim");

        let params: boot_params = ram.memory.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        let hdr = params.hdr;
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.kernel_alignment }, 0x20_0000, "the image's own header is kept");
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ hdr.cmdline_size }, "console=ttyS0 quiet".len() as u32 + 1);
        let (initrd_addr, initrd_size) = booted.initrd.unwrap();
        assert_eq!(({ hdr.ramdisk_image }, { hdr.ramdisk_size }), (initrd_addr as u32, 10_000));
        assert_eq!(initrd_addr % 4096, 0);
        assert!(initrd_addr + initrd_size <= 64 << 20 && initrd_addr >= booted.kernel_end);
        assert_eq!({ params.acpi_rsdp_addr }, 0xe0000);
        assert_eq!(params.e820_entries, 3);
        let e820 = params.e820_table;
        assert_eq!(
            ({ e820[2].addr }, { e820[2].size }, { e820[2].r#type }),
            (HIMEM_START, (64 << 20) - HIMEM_START, 1)
        );

        let mut cmdline = [0u8; 20];
        ram.memory.read_slice(&mut cmdline, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&cmdline, b"console=ttyS0 quiet\0");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn protocol_mismatches_and_non_kernels_are_refused() {
        let dir = scratch("bad");
        let (bz, _) = fake_bzimage(&dir);
        let ram = crate::memory::create(32).unwrap();
        let spec = |kernel, protocol| BootSpec {
            kernel,
            initrd: None,
            cmdline: "",
            protocol,
            mem_bytes: ram.size,
            acpi_rsdp: None,
        };
        assert!(matches!(load(&ram.memory, &spec(&bz, BootProtocol::Pvh)), Err(Error::BzImagePvh)));
        let junk = dir.join("junk");
        std::fs::write(&junk, b"#!/bin/sh\necho not a kernel\n").unwrap();
        let err = load(&ram.memory, &spec(&junk, BootProtocol::Auto)).unwrap_err();
        assert!(matches!(err, Error::NotAKernel { .. }), "{err}");
        assert!(err.to_string().contains("junk is not a kernel"));
        let _ = std::fs::remove_dir_all(dir);
    }
}
