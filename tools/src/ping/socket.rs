//! The probe socket: a raw ICMP socket, or a connected UDP socket.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// `SOL_RAW` / `ICMP_FILTER` from <linux/icmp.h> (not in the libc crate).
const SOL_RAW: libc::c_int = 255;
const ICMP_FILTER: libc::c_int = 1;
const ICMP_ECHO_REPLY: u32 = 0;

pub enum ProbeSocket {
    Icmp { fd: OwnedFd, target: Ipv4Addr },
    Udp(UdpSocket),
}

impl ProbeSocket {
    /// A raw ICMP socket that sees echo replies only. Needs CAP_NET_RAW.
    pub fn icmp(target: Ipv4Addr) -> io::Result<ProbeSocket> {
        // SAFETY: plain socket(2) call; the result is checked.
        let raw = unsafe {
            libc::socket(libc::AF_INET, libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, libc::IPPROTO_ICMP)
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // The filter's bits are the ICMP types to drop: everything but echo replies.
        let filter: u32 = !(1u32 << ICMP_ECHO_REPLY);
        setsockopt(fd.as_raw_fd(), SOL_RAW, ICMP_FILTER, &filter)?;
        let rcvbuf: libc::c_int = 1 << 20;
        setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, &rcvbuf)?;
        Ok(ProbeSocket::Icmp { fd, target })
    }

    /// A UDP socket connected to TARGET:PORT.
    pub fn udp(target: Ipv4Addr, port: u16) -> io::Result<ProbeSocket> {
        let s = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
        s.connect(SocketAddrV4::new(target, port))?;
        s.set_nonblocking(true)?;
        Ok(ProbeSocket::Udp(s))
    }

    fn fd(&self) -> RawFd {
        match self {
            ProbeSocket::Icmp { fd, .. } => fd.as_raw_fd(),
            ProbeSocket::Udp(s) => s.as_raw_fd(),
        }
    }

    pub fn send(&self, buf: &[u8]) -> io::Result<()> {
        match self {
            ProbeSocket::Icmp { fd, target } => {
                let addr = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: 0,
                    sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(target.octets()) },
                    sin_zero: [0; 8],
                };
                // SAFETY: buf and addr are valid for the lengths given.
                let n = unsafe {
                    libc::sendto(
                        fd.as_raw_fd(),
                        buf.as_ptr().cast(),
                        buf.len(),
                        0,
                        (&addr as *const libc::sockaddr_in).cast(),
                        std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                    )
                };
                if n < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            }
            ProbeSocket::Udp(s) => s.send(buf).map(|_| ()),
        }
    }

    /// One datagram if one is waiting (ICMP: the whole IPv4 packet), else None.
    pub fn try_recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let r = match self {
            ProbeSocket::Icmp { fd, .. } => {
                // SAFETY: buf is valid for writes of buf.len() bytes.
                let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            }
            ProbeSocket::Udp(s) => s.recv(buf),
        };
        match r {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Waits up to `timeout` (nanosecond resolution) for something to read.
    pub fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
        let mut pfd = libc::pollfd { fd: self.fd(), events: libc::POLLIN, revents: 0 };
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: one valid pollfd, a valid timespec, no signal mask change.
        let rc = unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted { Ok(false) } else { Err(e) };
        }
        Ok(rc > 0)
    }
}

fn setsockopt<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: value points to a live T of the size given.
    let rc = unsafe {
        libc::setsockopt(fd, level, name, (value as *const T).cast(), std::mem::size_of::<T>() as libc::socklen_t)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Asks the kernel for tight timer wake-ups (default slack is 50 us).
pub fn tighten_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes a plain integer and affects only this thread.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
}
