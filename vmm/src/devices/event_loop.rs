//! The device event loop: one thread per VM that waits (epoll) on the host
//! side of devices, today the taps, and moves their input into the guest.
//! It pauses with the vCPUs, so nothing touches guest memory while a VM is
//! paused: a paused VM's state is frozen, which snapshots and migration need.
//! While paused it drains and drops tap input, as a stopped machine's NIC
//! would: a resumed guest gets fresh traffic, not a burst of stale frames
//! (and a ping sent to a paused VM is lost, not answered late).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::bus::lock;
use super::virtio::mmio::MmioTransport;

/// While input waits for guest buffers, look again this often (ms). The
/// waiting fd is taken out of epoll meanwhile: it stays readable and would
/// otherwise spin the loop.
const RETRY_MS: i32 = 1;
const WAKE_TOKEN: u64 = u64::MAX;

#[derive(Default)]
struct LoopState {
    paused: bool,
    parked: bool,
    stop: bool,
}

struct Shared {
    state: Mutex<LoopState>,
    changed: Condvar,
    wake: EventFd,
}

pub struct EventLoop {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl EventLoop {
    /// Starts the loop over the transports whose devices have a backend fd.
    pub fn start(transports: Vec<Arc<Mutex<MmioTransport>>>) -> std::io::Result<EventLoop> {
        let shared = Arc::new(Shared {
            state: Mutex::new(LoopState::default()),
            changed: Condvar::new(),
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
        });
        let epoll = Epoll::new()?;
        epoll.ctl(ControlOperation::Add, shared.wake.as_raw_fd(), EpollEvent::new(EventSet::IN, WAKE_TOKEN))?;
        let mut sources = Vec::new();
        for t in transports {
            let fd: Option<RawFd> = lock(&t).device().backend_fd();
            if let Some(fd) = fd {
                epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, sources.len() as u64))?;
                sources.push(t);
            }
        }
        let s = shared.clone();
        let thread = crate::seccomp::spawn("devices".into(), crate::seccomp::ThreadKind::Devices, move || {
            run(s, epoll, sources)
        })?;
        Ok(EventLoop { shared, thread: Some(thread) })
    }

    fn set(&self, f: impl FnOnce(&mut LoopState)) {
        f(&mut lock(&self.shared.state));
        self.shared.changed.notify_all();
        let _ = self.shared.wake.write(1);
    }

    /// Returns once the loop no longer touches guest memory.
    pub fn pause(&self) {
        self.set(|s| s.paused = true);
        let mut st = lock(&self.shared.state);
        while !st.parked && !st.stop {
            st = self.shared.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    pub fn resume(&self) {
        // Clear the acknowledgement too: a later pause must wait for a fresh one.
        self.set(|s| {
            s.paused = false;
            s.parked = false;
        });
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        self.set(|s| s.stop = true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(shared: Arc<Shared>, epoll: Epoll, sources: Vec<Arc<Mutex<MmioTransport>>>) {
    let mut events = vec![EpollEvent::default(); sources.len() + 1];
    let mut waiting = vec![false; sources.len()];
    let fds: Vec<RawFd> = sources.iter().map(|t| lock(t).device().backend_fd().expect("filtered in start")).collect();
    let rearm = |i: usize, on: bool| {
        let interest = if on { EventSet::IN } else { EventSet::empty() };
        if let Err(e) = epoll.ctl(ControlOperation::Modify, fds[i], EpollEvent::new(interest, i as u64)) {
            tracing::warn!("device event loop: cannot re-arm a backend: {e}");
        }
    };
    loop {
        let paused = {
            let mut st = lock(&shared.state);
            if st.stop {
                return;
            }
            if st.paused && !st.parked {
                st.parked = true;
                shared.changed.notify_all();
            } else if !st.paused {
                st.parked = false;
            }
            st.paused
        };
        if paused {
            // Drain every backend, waiting or not.
            for (i, w) in waiting.iter_mut().enumerate() {
                if *w {
                    rearm(i, true);
                    *w = false;
                }
            }
        }
        let timeout = if waiting.iter().any(|w| *w) { RETRY_MS } else { -1 };
        let n = match epoll.wait(timeout, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("device event loop: epoll failed: {e}; network input stops");
                // Never touches guest memory again: a pause must not wait.
                let mut st = lock(&shared.state);
                st.parked = true;
                st.stop = true;
                shared.changed.notify_all();
                return;
            }
        };
        let mut ready = waiting.clone();
        for ev in &events[..n] {
            match ev.data() {
                WAKE_TOKEN => {
                    let _ = shared.wake.read();
                }
                i => ready[i as usize] = true,
            }
        }
        // A pause requested while we slept must not see guest memory touched.
        let paused = paused || lock(&shared.state).paused;
        for (i, t) in sources.iter().enumerate() {
            if !ready[i] {
                continue;
            }
            if paused {
                lock(t).device_mut().discard_backend_input();
                continue;
            }
            let was_waiting = waiting[i];
            waiting[i] = lock(t).backend_ready();
            if waiting[i] != was_waiting {
                rearm(i, !waiting[i]);
            }
        }
    }
}
