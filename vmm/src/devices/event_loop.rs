//! The device event loop: one thread per VM that waits (epoll) on the host
//! side of devices (the taps), moving their input into the guest, and on
//! the queue notify eventfds (`--virtio-notify ioeventfd`), doing the
//! queues' work off the vCPU.
//! It pauses with the vCPUs, so nothing touches guest memory while a VM is
//! paused: a paused VM's state is frozen, which snapshots and migration need.
//! While paused it drains and drops tap input, as a stopped machine's NIC
//! would: a catch_up guest gets fresh traffic, not a burst of stale frames
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
/// Tokens with this bit are queue notifies: transport index << 16 | queue.
const NOTIFY_TOKEN: u64 = 1 << 62;

fn notify_token(transport: usize, queue: usize) -> u64 {
    NOTIFY_TOKEN | (transport as u64) << 16 | queue as u64
}

/// The queue notify eventfds. Disarmed (out of epoll's interest, never
/// read) while the VM is paused, so a notify then keeps its count and is
/// served after the resume instead of being lost.
struct Notifies {
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// Each eventfd with its epoll token.
    fds: Vec<(RawFd, u64)>,
    armed: bool,
}

impl Notifies {
    fn arm(&mut self, epoll: &Epoll, on: bool) {
        let interest = if on { EventSet::IN } else { EventSet::empty() };
        for &(fd, token) in &self.fds {
            if let Err(e) = epoll.ctl(ControlOperation::Modify, fd, EpollEvent::new(interest, token)) {
                tracing::warn!("device event loop: cannot (dis)arm a queue notify: {e}");
            }
        }
        self.armed = on;
    }
}

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
    /// Starts the loop over the transports' backend fds (taps) and queue
    /// notify eventfds (`--virtio-notify ioeventfd`); `paused`: as a
    /// restored VM starts, touching nothing until the first resume.
    pub fn start(transports: Vec<Arc<Mutex<MmioTransport>>>, paused: bool) -> std::io::Result<EventLoop> {
        EventLoop::start_on(None, transports, paused)
    }

    /// [`start`](EventLoop::start) on a thread already started (`None`: a
    /// new one).
    pub fn start_on(
        thread: Option<crate::seccomp::Waiting>,
        transports: Vec<Arc<Mutex<MmioTransport>>>,
        paused: bool,
    ) -> std::io::Result<EventLoop> {
        let shared = Arc::new(Shared {
            state: Mutex::new(LoopState { paused, ..LoopState::default() }),
            changed: Condvar::new(),
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
        });
        let epoll = Epoll::new()?;
        epoll.ctl(ControlOperation::Add, shared.wake.as_raw_fd(), EpollEvent::new(EventSet::IN, WAKE_TOKEN))?;
        let mut sources = Vec::new();
        let mut notifies = Vec::new();
        for (ti, t) in transports.iter().enumerate() {
            let (fd, queue_fds) = {
                let t = lock(t);
                (t.device().backend_fd(), t.notify_fds())
            };
            if let Some(fd) = fd {
                epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, sources.len() as u64))?;
                sources.push(t.clone());
            }
            for (q, fd) in queue_fds.into_iter().enumerate() {
                // Armed at the first resume (or now, if running).
                let interest = if paused { EventSet::empty() } else { EventSet::IN };
                epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(interest, notify_token(ti, q)))?;
                notifies.push((fd, notify_token(ti, q)));
            }
        }
        let s = shared.clone();
        let work = move || run(s, epoll, sources, Notifies { transports, fds: notifies, armed: !paused });
        let thread = match thread {
            Some(waiting) => waiting.run(work),
            None => crate::seccomp::spawn("devices".into(), crate::seccomp::ThreadKind::Devices, work)?,
        };
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

fn run(shared: Arc<Shared>, epoll: Epoll, sources: Vec<Arc<Mutex<MmioTransport>>>, mut notifies: Notifies) {
    let mut events = vec![EpollEvent::default(); sources.len() + notifies.fds.len() + 1];
    let mut waiting = vec![false; sources.len()];
    let fds: Vec<RawFd> = sources.iter().map(|t| lock(t).device().backend_fd().expect("filtered in start")).collect();
    let rearm = |i: usize, on: bool| {
        let interest = if on { EventSet::IN } else { EventSet::empty() };
        if let Err(e) = epoll.ctl(ControlOperation::Modify, fds[i], EpollEvent::new(interest, i as u64)) {
            tracing::warn!("device event loop: cannot re-arm a backend: {e}");
        }
    };
    // Set while paused: the first iteration after the resume kicks every
    // queue. A loop that starts running has nothing to catch up on; one
    // born paused (a restore) does, even if the resume comes before its
    // first iteration (nobody waits for it to park).
    let mut catch_up = !notifies.armed;
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
        if paused && notifies.armed {
            notifies.arm(&epoll, false);
        } else if !paused && !notifies.armed {
            notifies.arm(&epoll, true);
        }
        if !paused && catch_up {
            // Whatever was notified across the pause (here, or on a source
            // host before a migration) is served now.
            catch_up = false;
            for t in &notifies.transports {
                lock(t).kick_all();
            }
        }
        if paused {
            catch_up = true;
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
        // A pause requested while we slept must not see guest memory touched.
        let paused = paused || lock(&shared.state).paused;
        for ev in &events[..n] {
            match ev.data() {
                WAKE_TOKEN => {
                    let _ = shared.wake.read();
                }
                t if t & NOTIFY_TOKEN != 0 => {
                    // Paused: left unread, served after the resume.
                    if !paused {
                        let (ti, q) = (((t & !NOTIFY_TOKEN) >> 16) as usize, (t & 0xffff) as usize);
                        lock(&notifies.transports[ti]).notified(q);
                    }
                }
                i => ready[i as usize] = true,
            }
        }
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use virtio_queue::Queue;

    use super::*;
    use crate::devices::bus::BusDevice;
    use crate::devices::virtio::mmio::{QueueEvents, STATUS_DRIVER_OK, STATUS_FEATURES_OK};
    use crate::devices::virtio::{Interrupt, VirtioDevice};
    use crate::memory::GuestMemory;

    /// Counts the times its queue's work runs.
    struct Counter(Arc<AtomicUsize>);

    impl VirtioDevice for Counter {
        fn device_type(&self) -> u32 {
            2
        }
        fn features(&self) -> u64 {
            crate::devices::virtio::VIRTIO_F_VERSION_1
        }
        fn queue_count(&self) -> usize {
            1
        }
        fn read_config(&self, _: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn queue_notify(&mut self, _: usize, _: &mut [Queue], _: &GuestMemory, _: &Interrupt) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
        fn describe(&self) -> serde_json::Value {
            serde_json::json!({})
        }
        fn identity(&self) -> crate::state::devices::BackendSnapshot {
            crate::state::devices::BackendSnapshot::Block { path: "/c".into(), sectors: 0, readonly: false }
        }
        fn backend_mut(&mut self) -> Option<&mut dyn crate::devices::backend::Backend> {
            None
        }
    }

    /// A transport with queue 0 ready and DRIVER_OK, its notifies on an
    /// eventfd (no KVM: the test signals it).
    fn transport(count: Arc<AtomicUsize>) -> (crate::memory::GuestRam, Arc<Mutex<MmioTransport>>) {
        let ram = crate::memory::create(16).unwrap();
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let events = QueueEvents::new(std::sync::Weak::new(), 0, 1).unwrap();
        let mut t = MmioTransport::new(Box::new(Counter(count)), ram.memory.clone(), irq).with_queue_events(events);
        let w = |t: &mut MmioTransport, reg: u64, v: u32| t.write(reg, &v.to_le_bytes());
        w(&mut t, 0x024, 1); // DRIVER_FEATURES_SEL: high word
        w(&mut t, 0x020, 1); // VERSION_1
        w(&mut t, 0x070, 3 | STATUS_FEATURES_OK);
        w(&mut t, 0x038, 16); // QUEUE_NUM
        for (reg, addr) in [(0x080, 0x1000), (0x090, 0x2000), (0x0a0, 0x3000)] {
            w(&mut t, reg, addr);
        }
        w(&mut t, 0x044, 1); // QUEUE_READY
        w(&mut t, 0x070, 3 | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        (ram, Arc::new(Mutex::new(t)))
    }

    fn wait_for(count: &AtomicUsize, at_least: usize) -> usize {
        let deadline = Instant::now() + Duration::from_secs(2);
        while count.load(Ordering::SeqCst) < at_least && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        count.load(Ordering::SeqCst)
    }

    #[test]
    fn a_notify_while_paused_waits_for_the_resume_and_every_resume_looks_at_every_queue() {
        let count = Arc::new(AtomicUsize::new(0));
        let (_ram, t) = transport(count.clone());
        let el = EventLoop::start(vec![t.clone()], false).unwrap();
        lock(&t).signal_notify(0);
        assert_eq!(wait_for(&count, 1), 1, "a notify is served on the device thread");

        el.pause();
        lock(&t).signal_notify(0);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(count.load(Ordering::SeqCst), 1, "nothing runs while paused");
        el.resume();
        // The catch-up look, then the notify that waited in its eventfd.
        assert_eq!(wait_for(&count, 3), 3, "the notify made while paused is served after the resume");
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(count.load(Ordering::SeqCst), 3, "served once, not again and again");

        // A notify consumed elsewhere (a migration source): the resume's
        // look at every queue finds the work.
        el.pause();
        el.resume();
        assert_eq!(wait_for(&count, 4), 4);
    }

    #[test]
    fn a_loop_started_paused_touches_nothing_until_resumed() {
        let count = Arc::new(AtomicUsize::new(0));
        let (_ram, t) = transport(count.clone());
        lock(&t).signal_notify(0);
        let el = EventLoop::start(vec![t.clone()], true).unwrap();
        el.pause();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(count.load(Ordering::SeqCst), 0, "a restored VM's queues wait for its resume");
        el.resume();
        assert_eq!(wait_for(&count, 2), 2, "the resume's look, then the waiting notify");
    }
}
