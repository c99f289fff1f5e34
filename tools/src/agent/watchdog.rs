//! The agent's watchdog: a thread of its own that fences the node (kills
//! its VMMs, as [`super::Agent::fence`] does) and ends the agent with
//! [`EXIT_HUNG`] when the agent's main task stops running.
//!
//! The main task fences on lease loss itself, but only while it runs: an
//! agent stuck in a syscall (an `ip` command that never returns, a hung
//! read on the shared volume) or deadlocked would leave its VMMs running
//! past its own deadline, unmanaged, and a down node's VMs are restarted
//! elsewhere once their disk leases expire (or [`super::leader::DISKLESS_WAIT`]
//! after it was seen down, for VMs without disks).
//!
//! What counts as progress: the main task is *polled*. It pets on a
//! ticker that runs inside the task ([`petted`]), so an await (an etcd
//! call during an outage, bounded by the store's op timeout; the 200 ms
//! steps of a lease-loss wait) is not a hang: only code of the task that
//! does not return to the runtime is. A healthy agent cut off from etcd
//! is thus never killed by its watchdog, and the witness alone decides
//! what a node that lost its lease does with its VMs (a node alone keeps
//! them running).
//!
//! The deadline, [`deadline_for`]: the node lease TTL minus the fencing
//! margin, the same budget the main task has from its last renewal to its
//! own fence. A hung agent whose keepalive stopped with it (the lease then
//! expires at most a TTL after the last renewal, which was at most a
//! third of a TTL before the hang) is fenced within a few hundred ms of
//! the lease's expiry; whatever the keepalive does, its VMMs die long
//! before the leader could restart a VM: their disk leases, which they
//! renew themselves, must expire first (plus 500 ms), and a VM without
//! disks waits 10 s.
//!
//! It is armed when the main loop starts: before that (registration,
//! adopting a previous agent's VMMs, which asks each one's API with a 2 s
//! bound) the agent has no lease-loss fence either.
//!
//! The kernel's softdog (`/dev/watchdog`) would also cover a hang of the
//! whole host, but it reboots the host when it fires: it is not armed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The agent's exit status when its watchdog fenced it (3 is a fence on
/// lease loss).
pub const EXIT_HUNG: i32 = 4;

/// Not armed yet: the watchdog does nothing.
const DISARMED: u64 = u64::MAX;

/// How long the main task may go without being polled.
pub fn deadline_for(ttl: Duration) -> Duration {
    ttl.saturating_sub(super::fence_margin(ttl)).max(Duration::from_millis(500))
}

/// How often the watchdog looks (and the main task pets): a tenth of the
/// deadline, 50-250 ms.
pub fn period_for(deadline: Duration) -> Duration {
    (deadline / 10).clamp(Duration::from_millis(50), Duration::from_millis(250))
}

pub struct Watchdog {
    origin: Instant,
    /// When the main task last ran, in ms since `origin` (DISARMED before
    /// the main loop starts).
    last_pet_ms: AtomicU64,
    deadline: Duration,
    /// The VMMs to kill: the agent's, as of its last look.
    vmms: Mutex<Vec<u32>>,
}

impl Watchdog {
    pub fn new(deadline: Duration) -> Arc<Watchdog> {
        Arc::new(Watchdog {
            origin: Instant::now(),
            last_pet_ms: AtomicU64::new(DISARMED),
            deadline,
            vmms: Mutex::new(vec![]),
        })
    }

    pub fn deadline(&self) -> Duration {
        self.deadline
    }

    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    /// The main task ran (arms the watchdog on the first call).
    pub fn pet(&self) {
        self.last_pet_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// The VMMs the agent supervises now.
    pub fn track(&self, pids: impl IntoIterator<Item = u32>) {
        let mut v = self.vmms.lock().unwrap_or_else(PoisonError::into_inner);
        v.clear();
        v.extend(pids);
    }

    /// Starts the watchdog thread. When the main task is overdue it kills
    /// the tracked VMMs, calls `fired` (the agent: log and exit; tests:
    /// record) and stops.
    pub fn start(self: &Arc<Watchdog>, fired: impl FnOnce(String, Vec<u32>) + Send + 'static) {
        let w = self.clone();
        let period = period_for(self.deadline);
        std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || {
                let mut prev_look = w.now_ms();
                loop {
                    std::thread::sleep(period);
                    let now = w.now_ms();
                    let last = w.last_pet_ms.load(Ordering::Relaxed);
                    let late = overdue(now, last, prev_look, w.deadline, period);
                    prev_look = now;
                    if let Some(stalled) = late {
                        // Killed first: reporting may block (stderr is a
                        // lock the hung thread may hold).
                        let pids = w.vmms.lock().unwrap_or_else(PoisonError::into_inner).clone();
                        for &pid in &pids {
                            super::process::kill(pid);
                        }
                        let why = format!(
                            "the agent's main loop has not run for {:.1} s (its watchdog's deadline is {:?})",
                            stalled.as_secs_f64(),
                            w.deadline
                        );
                        fired(why, pids);
                        return;
                    }
                }
            })
            .expect("spawn the watchdog thread");
    }
}

/// Whether the main task is overdue at `now` (ms): not polled since
/// `last_pet` for longer than `deadline`. Returns how long it stalled.
///
/// A look that comes much later than its period (`prev_look` is the one
/// before) means the whole process, watchdog included, was not running
/// (SIGSTOP, a host pause): not a hang of the loop, which gets a period
/// to run before the next look may fire.
fn overdue(now: u64, last_pet: u64, prev_look: u64, deadline: Duration, period: Duration) -> Option<Duration> {
    if last_pet == DISARMED {
        return None;
    }
    let stalled = now.saturating_sub(last_pet);
    let watchdog_stalled = now.saturating_sub(prev_look) > 2 * period.as_millis() as u64;
    (stalled > deadline.as_millis() as u64 && !watchdog_stalled).then(|| Duration::from_millis(stalled))
}

/// Runs `work`, petting `w` every `period` while the task runs: a task
/// that waits (an await) keeps petting; one stuck outside an await does
/// not.
pub async fn petted<T>(w: &Watchdog, period: Duration, work: impl std::future::Future<Output = T>) -> T {
    tokio::pin!(work);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            r = &mut work => return r,
            _ = tick.tick() => {
                if w.last_pet_ms.load(Ordering::Relaxed) != DISARMED {
                    w.pet();
                }
            }
        }
    }
}

/// Ends the agent after its watchdog fired: says why and leaves a fence
/// note in `state_dir` for the next agent (both bounded: the hung thread
/// may hold stderr's lock, and the local disk may be what hangs), and
/// exits without running destructors or atexit handlers, which could wait
/// on that thread too.
pub fn exit_hung(why: String, pids: Vec<u32>, state_dir: &std::path::Path) {
    let (tx, rx) = std::sync::mpsc::channel();
    let state_dir = state_dir.to_owned();
    std::thread::spawn(move || {
        let note = super::fence_note::FenceNote {
            at_unix_ms: cluster::records::unix_ms(),
            why: why.clone(),
            killed: pids.iter().map(|p| format!("pid {p}")).collect(),
            exit_code: EXIT_HUNG,
        };
        let _ = super::fence_note::write(&state_dir, &note);
        eprintln!("ferry node: watchdog: {why}; fenced: killed {} VMM(s) {pids:?}; exiting", pids.len());
        let _ = tx.send(());
    });
    let _ = rx.recv_timeout(Duration::from_millis(500));
    // SAFETY: _exit ends the process at once; nothing is left to run.
    unsafe { libc::_exit(EXIT_HUNG) };
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Duration = Duration::from_millis(2400);
    const P: Duration = Duration::from_millis(240);

    #[test]
    fn the_deadline_is_the_ttl_minus_the_fencing_margin() {
        assert_eq!(deadline_for(Duration::from_secs(3)), Duration::from_millis(2400));
        assert_eq!(deadline_for(Duration::from_secs(10)), Duration::from_secs(8));
        assert_eq!(deadline_for(Duration::from_secs(1)), Duration::from_millis(500));
        assert_eq!(period_for(D), P);
    }

    #[test]
    fn fires_only_when_the_loop_is_overdue_and_the_watchdog_kept_time() {
        // Disarmed: never.
        assert_eq!(overdue(100_000, DISARMED, 99_900, D, P), None);
        // Petted recently.
        assert_eq!(overdue(10_000, 9_000, 9_760, D, P), None);
        // Exactly at the deadline: not yet.
        assert_eq!(overdue(12_400, 10_000, 12_160, D, P), None);
        // Overdue, the previous look on time: fires.
        assert_eq!(overdue(12_500, 10_000, 12_260, D, P), Some(Duration::from_millis(2500)));
        // Overdue, but the watchdog itself was stopped for 5 s: the loop
        // gets a period first.
        assert_eq!(overdue(15_000, 10_000, 10_000, D, P), None);
        // ... and if it still did not run at the next look, fires.
        assert_eq!(overdue(15_240, 10_000, 15_000, D, P), Some(Duration::from_millis(5240)));
    }

    fn fired_channel() -> (impl FnOnce(String, Vec<u32>) + Send + 'static, std::sync::mpsc::Receiver<Vec<u32>>) {
        let (tx, rx) = std::sync::mpsc::channel();
        (move |_why: String, pids: Vec<u32>| tx.send(pids).unwrap(), rx)
    }

    #[test]
    fn a_task_blocked_outside_an_await_is_fenced_and_one_that_awaits_is_not() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let d = Duration::from_millis(600);
        let w = Watchdog::new(d);
        let mut child = std::process::Command::new("sleep").arg("60").spawn().unwrap();
        w.track([child.id()]);
        let (fired, rx) = fired_channel();
        w.start(fired);
        let w2 = w.clone();
        let started = Instant::now();
        rt.spawn(async move {
            petted(&w2, period_for(d), async {
                w2.pet();
                // Awaiting for three deadlines (an etcd call in an
                // outage) is no hang...
                tokio::time::sleep(d * 3).await;
                // ... blocking the thread is.
                std::thread::sleep(Duration::from_secs(10));
            })
            .await
        });
        let pids = rx.recv_timeout(Duration::from_secs(10)).expect("the watchdog fires");
        let at = started.elapsed();
        // Not during the 3 deadlines awaited; a deadline after the block
        // (less the last pet's age, at most a period).
        assert!(at > d * 3 && at < d * 4 + Duration::from_secs(2), "fired {at:?} after the start");
        assert_eq!(pids, [child.id()]);
        let st = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(st.signal(), Some(libc::SIGKILL), "the tracked process was killed");
        rt.shutdown_background();
    }

    #[test]
    fn a_disarmed_watchdog_never_fires() {
        let w = Watchdog::new(Duration::from_millis(500));
        let (fired, rx) = fired_channel();
        w.start(fired);
        assert!(rx.recv_timeout(Duration::from_millis(1500)).is_err());
    }
}
