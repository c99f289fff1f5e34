//! TAP devices (TUNSETIFF). Hand-written: the ioctls are three constants and
//! an ifreq, and no rust-vmm crate covers them.
//!
//! Ferry opens an existing tap by name (the lab creates persistent taps on
//! each host's bridge) with IFF_VNET_HDR and a 12-byte header, so frames
//! pass between tap and guest with the virtio-net header unchanged.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// virtio_net_hdr_v1 (with num_buffers), what VIRTIO_F_VERSION_1 drivers use.
pub const VNET_HDR_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("tap name '{0}' is not valid (1 to 15 characters, no '/' or whitespace)")]
    BadName(String),
    #[error("tap {0} does not exist in this network namespace (create it first, e.g. `ferry lab tap add HOST {0}`)")]
    Missing(String),
    #[error("tap {0} is in use by another process")]
    Busy(String),
    #[error("not allowed to attach to tap {0} (check its owner, or run as root)")]
    Permission(String),
    #[error("{0} is not a tap device")]
    NotTap(String),
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(std::io::Error),
    #[error("cannot set up tap {name}: {source}")]
    Ioctl { name: String, source: std::io::Error },
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    pub fn open(name: &str) -> Result<Tap, Error> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', ' ', '\0']) {
            return Err(Error::BadName(name.to_owned()));
        }
        let cname = std::ffi::CString::new(name).map_err(|_| Error::BadName(name.to_owned()))?;
        // SAFETY: if_nametoindex reads a NUL-terminated string.
        if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
            return Err(Error::Missing(name.to_owned()));
        }
        // SAFETY: open(2) with a static path; the result is checked.
        let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(Error::OpenTun(std::io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh descriptor we own.
        let file = unsafe { File::from_raw_fd(fd) };
        let mut req = IfReq { name: [0; libc::IFNAMSIZ], flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, _pad: [0; 22] };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is laid out as.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EBUSY) => Error::Busy(name.to_owned()),
                Some(libc::EPERM) | Some(libc::EACCES) => Error::Permission(name.to_owned()),
                Some(libc::EINVAL) => Error::NotTap(name.to_owned()),
                _ => Error::Ioctl { name: name.to_owned(), source: e },
            });
        }
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int through the pointer.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &hdr_len) } < 0 {
            return Err(Error::Ioctl { name: name.to_owned(), source: std::io::Error::last_os_error() });
        }
        // No offloads: the guest driver negotiates none.
        // SAFETY: TUNSETOFFLOAD takes an unsigned int by value.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD, 0 as libc::c_uint) } < 0 {
            return Err(Error::Ioctl { name: name.to_owned(), source: std::io::Error::last_os_error() });
        }
        Ok(Tap { file, name: name.to_owned() })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame (virtio-net header first); `Ok(None)` if none waits.
    pub fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        match self.file.read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes one frame (virtio-net header first).
    pub fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.file.write(frame).map(|_| ())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
