//! Turns SIGTERM, SIGINT and SIGHUP into a clean VM exit: they are blocked
//! in every thread and one thread waits for them with sigwait.

use std::sync::mpsc::Sender;

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

/// Starts the thread that forwards the first of them as a VM exit.
pub fn forward_to(events: Sender<VmEvent>) {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let set = handled_set();
            let mut sig: libc::c_int = 0;
            // SAFETY: sigwait with a valid set and out-pointer.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                let _ = events.send(VmEvent::Exit(ExitReason::Signal(sig)));
            }
        })
        .expect("spawn the signal thread");
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
