//! Turns SIGTERM, SIGINT and SIGHUP into a clean exit: they are blocked in
//! every thread and one thread waits for them with sigwait.
//!
//! A process that waits before it has a VM (`ferry receive`) first has them
//! raise a stop flag ([`stop_flag`]); once it serves a VM they become that
//! VM's exit ([`forward_to`]). One thread does both, so a signal is never
//! caught by a waiter nobody reads any more.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, Once};

use vmm::{ExitReason, VmEvent};

const HANDLED: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

fn handled_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill a local sigset_t.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in HANDLED {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Blocks the signals in this thread and every thread it starts afterwards.
/// Call before starting any thread.
pub fn block() {
    let set = handled_set();
    // SAFETY: changes only this thread's signal mask, with a valid set.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// Where the relay thread delivers a signal.
enum Target {
    None,
    /// Raised on every signal; the waiter polls it.
    Flag(Arc<AtomicBool>),
    /// The first signal stops the VM.
    Vm(Sender<VmEvent>),
}

static TARGET: Mutex<Target> = Mutex::new(Target::None);
static RELAY: Once = Once::new();

fn start_relay() {
    RELAY.call_once(|| {
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(|| {
                let set = handled_set();
                loop {
                    let mut sig: libc::c_int = 0;
                    // SAFETY: sigwait with a valid set and out-pointer.
                    if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                        return;
                    }
                    match &*TARGET.lock().unwrap_or_else(|e| e.into_inner()) {
                        Target::None => {}
                        Target::Flag(flag) => flag.store(true, Ordering::SeqCst),
                        Target::Vm(events) => {
                            let _ = events.send(VmEvent::Exit(ExitReason::Signal(sig)));
                        }
                    }
                }
            })
            .expect("spawn the signal thread");
    });
}

fn set_target(target: Target) {
    *TARGET.lock().unwrap_or_else(|e| e.into_inner()) = target;
    start_relay();
}

/// From now on the signals stop this VM (a clean exit).
pub fn forward_to(events: Sender<VmEvent>) {
    set_target(Target::Vm(events));
}

/// From now on the signals raise the returned flag, until [`forward_to`].
pub fn stop_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    set_target(Target::Flag(flag.clone()));
    flag
}

/// Starts a thread that hands each of them, as it arrives, to `f` (for the
/// node agent, which outlives a signal only to report it).
pub fn forward_with(f: impl Fn(libc::c_int) + Send + 'static) {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let set = handled_set();
            loop {
                let mut sig: libc::c_int = 0;
                // SAFETY: sigwait with a valid set and out-pointer.
                if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                    return;
                }
                f(sig);
            }
        })
        .expect("spawn the signal thread");
}
