//! Where a migration goes: `tcp:HOST:PORT` between hosts, `unix:PATH` on
//! one host.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Tcp(String),
    Unix(PathBuf),
}

impl std::str::FromStr for Endpoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(addr) = s.strip_prefix("tcp:") {
            if addr.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()) {
                return Ok(Endpoint::Tcp(addr.to_owned()));
            }
        } else if let Some(path) = s.strip_prefix("unix:").filter(|p| !p.is_empty()) {
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        Err(format!("bad endpoint '{s}' (expected tcp:HOST:PORT or unix:PATH)"))
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A connected migration stream. Besides a per-operation timeout it can
/// hold a total deadline: every read and write then gets only the time
/// left, so a peer that dribbles a byte now and then cannot stretch a
/// handshake or a switchover past it.
pub struct Stream {
    inner: Inner,
    timeout: Option<Duration>,
    deadline: Option<Instant>,
}

enum Inner {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn new(inner: Inner) -> Stream {
        Stream { inner, timeout: None, deadline: None }
    }

    /// A connected pair on this host (for tests of what runs over a stream).
    pub fn pair() -> std::io::Result<(Stream, Stream)> {
        let (a, b) = UnixStream::pair()?;
        Ok((Stream::new(Inner::Unix(a)), Stream::new(Inner::Unix(b))))
    }

    pub fn try_clone(&self) -> std::io::Result<Stream> {
        let inner = match &self.inner {
            Inner::Tcp(s) => Inner::Tcp(s.try_clone()?),
            Inner::Unix(s) => Inner::Unix(s.try_clone()?),
        };
        let s = Stream { inner, timeout: self.timeout, deadline: None };
        s.apply(self.timeout)?;
        Ok(s)
    }

    /// The longest any single read or write may take.
    pub fn set_timeout(&mut self, t: Option<Duration>) -> std::io::Result<()> {
        self.timeout = t;
        self.apply(t)
    }

    /// Everything from now on must be done by `deadline` (None: no limit
    /// beyond the per-operation timeout).
    /// Clearing it puts the per-operation timeout back.
    pub fn set_deadline(&mut self, deadline: Option<Instant>) {
        if deadline.is_none() && self.deadline.is_some() {
            if let Err(e) = self.apply(self.timeout) {
                tracing::warn!("cannot restore the migration socket's timeout: {e}");
            }
        }
        self.deadline = deadline;
    }

    fn apply(&self, t: Option<Duration>) -> std::io::Result<()> {
        match &self.inner {
            Inner::Tcp(s) => s.set_read_timeout(t).and_then(|_| s.set_write_timeout(t)),
            Inner::Unix(s) => s.set_read_timeout(t).and_then(|_| s.set_write_timeout(t)),
        }
    }

    /// Ends the connection both ways at once (from another thread too,
    /// through a clone): a thread blocked on it wakes with an error.
    pub fn shutdown(&self) {
        let _ = match &self.inner {
            Inner::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Inner::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }

    /// Ends the receiving half only: a thread blocked reading wakes with
    /// an end of stream, and this side can still write (an `Abort`).
    pub fn shutdown_read(&self) {
        let _ = match &self.inner {
            Inner::Tcp(s) => s.shutdown(std::net::Shutdown::Read),
            Inner::Unix(s) => s.shutdown(std::net::Shutdown::Read),
        };
    }

    /// The peer's address, for logs (`unix` for a Unix socket).
    pub fn peer_name(&self) -> String {
        match &self.inner {
            Inner::Tcp(s) => s.peer_addr().map_or_else(|_| "tcp:?".into(), |a| format!("tcp:{a}")),
            Inner::Unix(_) => "unix".into(),
        }
    }

    /// True if the peer has closed or reset the connection (checked
    /// without blocking or consuming anything).
    pub fn peer_gone(&self) -> bool {
        use std::os::fd::AsRawFd;
        let fd = match &self.inner {
            Inner::Tcp(s) => s.as_raw_fd(),
            Inner::Unix(s) => s.as_raw_fd(),
        };
        let mut pfd = libc::pollfd { fd, events: libc::POLLRDHUP, revents: 0 };
        // SAFETY: poll on one pollfd we own, without waiting.
        let r = unsafe { libc::poll(&mut pfd, 1, 0) };
        r > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
    }

    /// Narrows the timeout of the direction about to be used to what the
    /// deadline leaves (one setsockopt, and only while a deadline is set).
    fn before_io(&self, reading: bool) -> std::io::Result<()> {
        let Some(deadline) = self.deadline else { return Ok(()) };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "deadline passed"));
        }
        let t = Some(self.timeout.map_or(left, |t| t.min(left)));
        match (&self.inner, reading) {
            (Inner::Tcp(s), true) => s.set_read_timeout(t),
            (Inner::Tcp(s), false) => s.set_write_timeout(t),
            (Inner::Unix(s), true) => s.set_read_timeout(t),
            (Inner::Unix(s), false) => s.set_write_timeout(t),
        }
    }
}

/// The one byte that carries a passed descriptor (a stream socket needs at
/// least one byte of data for ancillary data to ride on).
const FD_MARKER: u8 = b'F';

impl Stream {
    /// True on a Unix socket: only there can a descriptor be passed.
    pub fn is_unix(&self) -> bool {
        matches!(self.inner, Inner::Unix(_))
    }

    /// Passes `fd` to the peer (SCM_RIGHTS) with one marker byte, outside
    /// whatever record stream runs on top: the caller must know the peer
    /// reads exactly that byte with [`Stream::recv_fd`] next.
    pub fn send_fd(&mut self, fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<()> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
        use std::os::fd::AsRawFd;
        let Inner::Unix(s) = &self.inner else {
            return Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "descriptors pass only over unix:"));
        };
        self.before_io(false)?;
        let fds = [fd.as_raw_fd()];
        let iov = [std::io::IoSlice::new(&[FD_MARKER])];
        loop {
            match sendmsg::<UnixAddr>(s.as_raw_fd(), &iov, &[ControlMessage::ScmRights(&fds)], MsgFlags::empty(), None)
            {
                Ok(1) => return Ok(()),
                Ok(_) => return Err(std::io::Error::new(std::io::ErrorKind::WriteZero, "descriptor not sent")),
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Receives the descriptor [`Stream::send_fd`] passed: exactly its
    /// marker byte is read, so the stream behind it is untouched. The
    /// descriptor comes close-on-exec.
    pub fn recv_fd(&mut self) -> std::io::Result<std::os::fd::OwnedFd> {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let Inner::Unix(s) = &self.inner else {
            return Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "descriptors pass only over unix:"));
        };
        self.before_io(true)?;
        let mut byte = [0u8; 1];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let (n, fds, truncated) = loop {
            let mut iov = [std::io::IoSliceMut::new(&mut byte)];
            match recvmsg::<UnixAddr>(s.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC) {
                Ok(msg) => {
                    let mut fds = Vec::new();
                    for c in msg.cmsgs().map_err(std::io::Error::from)? {
                        if let ControlMessageOwned::ScmRights(f) = c {
                            fds.extend(f);
                        }
                    }
                    break (msg.bytes, fds, msg.flags.contains(MsgFlags::MSG_CTRUNC));
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        };
        // SAFETY: each descriptor came to this process in SCM_RIGHTS just
        // now and nothing else owns it; wrapping them closes any extra.
        let mut owned: Vec<OwnedFd> = fds.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }).collect();
        match (n, byte[0], owned.len(), truncated) {
            (0, _, _, _) => {
                Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "peer closed before the descriptor"))
            }
            (1, FD_MARKER, 1, false) => Ok(owned.remove(0)),
            (1, FD_MARKER, _, _) => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("expected one passed descriptor, got {} (is a relay between the two ends?)", owned.len()),
            )),
            _ => Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "no descriptor marker where one was due")),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.before_io(true)?;
        match &mut self.inner {
            Inner::Tcp(s) => s.read(buf),
            Inner::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.before_io(false)?;
        match &mut self.inner {
            Inner::Tcp(s) => s.write(buf),
            Inner::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.inner {
            Inner::Tcp(s) => s.flush(),
            Inner::Unix(s) => s.flush(),
        }
    }
}

pub fn connect(endpoint: &Endpoint, timeout: Duration) -> std::io::Result<Stream> {
    match endpoint {
        Endpoint::Tcp(addr) => {
            let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, format!("{addr} resolves to nothing"));
            for a in addr.to_socket_addrs()? {
                match TcpStream::connect_timeout(&a, timeout) {
                    Ok(s) => {
                        s.set_nodelay(true)?;
                        return Ok(Stream::new(Inner::Tcp(s)));
                    }
                    Err(e) => last = e,
                }
            }
            Err(last)
        }
        Endpoint::Unix(p) => UnixStream::connect(p).map(|s| Stream::new(Inner::Unix(s))),
    }
}

pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    pub fn bind(endpoint: &Endpoint) -> std::io::Result<Listener> {
        match endpoint {
            Endpoint::Tcp(addr) => TcpListener::bind(addr.as_str()).map(Listener::Tcp),
            Endpoint::Unix(p) => {
                let _ = std::fs::remove_file(p);
                UnixListener::bind(p).map(|l| Listener::Unix(l, p.clone()))
            }
        }
    }

    pub fn accept(&self) -> std::io::Result<Stream> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nodelay(true)?;
                Ok(Stream::new(Inner::Tcp(s)))
            }
            Listener::Unix(l, _) => l.accept().map(|(s, _)| Stream::new(Inner::Unix(s))),
        }
    }

    /// Waits at most `wait` for a connection (None: none came).
    pub fn accept_timeout(&self, wait: Duration) -> std::io::Result<Option<Stream>> {
        use std::os::fd::AsRawFd;
        let fd = match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
        };
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        let ms = libc::c_int::try_from(wait.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: poll on one pollfd we own, for at most `ms` milliseconds.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        match r {
            0 => Ok(None),
            r if r < 0 => {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    Ok(None)
                } else {
                    Err(e)
                }
            }
            _ => self.accept().map(Some),
        }
    }

    pub fn local_addr(&self) -> String {
        match self {
            Listener::Tcp(l) => l.local_addr().map(|a| format!("tcp:{a}")).unwrap_or_default(),
            Listener::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        assert_eq!("tcp:10.0.0.1:7000".parse(), Ok(Endpoint::Tcp("10.0.0.1:7000".into())));
        assert_eq!("unix:/run/m.sock".parse(), Ok(Endpoint::Unix("/run/m.sock".into())));
        assert!("tcp:10.0.0.1".parse::<Endpoint>().is_err());
        assert!("http://x".parse::<Endpoint>().is_err());
    }
}
