//! Named network namespaces, as iproute2 keeps them: bind mounts under
//! /run/netns. Entering one is `setns(2)` on this thread.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

/// Where `ip netns add` puts its bind mounts.
pub const NETNS_DIR: &str = "/run/netns";

pub fn path(name: &str) -> PathBuf {
    PathBuf::from(NETNS_DIR).join(name)
}

/// Identity of a named namespace: the (device, inode) of its nsfs file. A
/// namespace deleted and created again under the same name gets a new one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NsId {
    pub dev: u64,
    pub ino: u64,
}

/// The identity of `/run/netns/NAME`, or None if there is no such name.
pub fn identity(name: &str) -> io::Result<Option<NsId>> {
    match std::fs::metadata(path(name)) {
        Ok(m) => Ok(Some(NsId { dev: m.dev(), ino: m.ino() })),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Moves the calling thread into network namespace `name`. Sockets opened
/// afterwards belong to it (and stay there wherever they are used).
pub fn enter(name: &str) -> io::Result<()> {
    let file = File::open(path(name))?;
    // SAFETY: setns on a valid, open namespace fd; it changes only the
    // calling thread's network namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` on a short-lived thread inside namespace `name` (this thread
/// stays where it is).
pub fn run_in<T: Send>(name: &str, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(name)?;
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("thread panicked")))
    })
}

/// True if the effective user is root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
