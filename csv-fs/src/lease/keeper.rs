//! Keeps a lease alive from a background thread, renewing it every third
//! of its TTL, and notices when it is lost.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{Lease, LeaseStore};
use crate::error::{now_ms, Error};

struct State {
    lease: Lease,
    /// Until when the lease is surely ours, on this host's monotonic clock:
    /// the start of the renewal that granted it, plus its TTL (a wall-clock
    /// step must not stretch what the fence allows).
    valid_until: Instant,
    /// Why the lease is gone, once it is: no more renewals after that.
    lost: Option<String>,
    stop: bool,
}

pub struct LeaseKeeper {
    shared: Arc<(Mutex<State>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl LeaseKeeper {
    pub fn start(store: Arc<dyn LeaseStore>, lease: Lease) -> LeaseKeeper {
        LeaseKeeper::start_with(store, lease, || Ok(()))
    }

    /// As `start`, with `init` run first on the keeper's thread (the VMM
    /// installs its seccomp filter there). If `init` fails the lease
    /// counts as lost at once: the disk stops writing rather than run
    /// without its keeper.
    pub fn start_with(
        store: Arc<dyn LeaseStore>,
        lease: Lease,
        init: impl FnOnce() -> Result<(), String> + Send + 'static,
    ) -> LeaseKeeper {
        let left = Duration::from_millis(lease.expires_unix_ms.saturating_sub(now_ms()).min(lease.ttl_ms));
        let valid_until = Instant::now() + left;
        let shared = Arc::new((Mutex::new(State { lease, valid_until, lost: None, stop: false }), Condvar::new()));
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("lease-keeper".into())
            .spawn(move || match init() {
                Ok(()) => renew_loop(store, s),
                Err(e) => {
                    tracing::error!("lease keeper not started: {e}");
                    s.0.lock().unwrap().lost = Some(format!("lease keeper not started: {e}"));
                }
            })
            .expect("spawn the lease keeper thread");
        LeaseKeeper { shared, thread: Some(thread) }
    }

    /// The current lease, or why it was lost (taken over, expired, stale).
    pub fn lease(&self) -> Result<Lease, String> {
        let st = self.shared.0.lock().unwrap();
        match &st.lost {
            Some(why) => Err(why.clone()),
            None => Ok(st.lease.clone()),
        }
    }

    /// How long the current lease surely lasts (monotonic) and its TTL, or
    /// why it was lost: the per-write fence check, without cloning the lease.
    pub fn validity(&self) -> Result<(Duration, Duration), String> {
        let st = self.shared.0.lock().unwrap();
        match &st.lost {
            Some(why) => Err(why.clone()),
            None => {
                Ok((st.valid_until.saturating_duration_since(Instant::now()), Duration::from_millis(st.lease.ttl_ms)))
            }
        }
    }

    /// Stops renewing and returns the last lease (to release or hand off).
    pub fn stop(mut self) -> Result<Lease, String> {
        self.halt();
        self.lease()
    }

    fn halt(&mut self) {
        self.shared.0.lock().unwrap().stop = true;
        self.shared.1.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.halt();
    }
}

fn renew_loop(store: Arc<dyn LeaseStore>, shared: Arc<(Mutex<State>, Condvar)>) {
    let (lock, cv) = &*shared;
    let period = Duration::from_millis((store.ttl().as_millis() as u64 / 3).max(1));
    let mut st = lock.lock().unwrap();
    // A lease not yet marked kept is renewed at once, so an operator's
    // release by hand is refused from the start (see `apply_by_hand`); an
    // adopted one is kept already (no second write in the switchover).
    let mut wait = if st.lease.kept { period } else { Duration::ZERO };
    loop {
        st = cv.wait_timeout(st, wait).unwrap().0;
        wait = period;
        if st.stop {
            return;
        }
        let lease = st.lease.clone();
        drop(st);
        let asked = Instant::now();
        let result = store.keep(&lease);
        st = lock.lock().unwrap();
        match result {
            Ok(l) => {
                // Counted from before the request: the store's clock started
                // the new TTL no earlier than that.
                st.valid_until = asked + Duration::from_millis(l.ttl_ms);
                st.lease = l;
            }
            // Someone else owns it now: final.
            Err(e @ (Error::StaleEpoch { .. } | Error::NotOwner { .. })) => {
                tracing::error!(disk = lease.disk, host = lease.host, "lease lost: {e}");
                st.lost = Some(e.to_string());
                return;
            }
            // Storage trouble: keep trying until the lease runs out.
            Err(e) if Instant::now() < st.valid_until => {
                tracing::warn!(disk = lease.disk, "lease renewal failed, retrying: {e}")
            }
            Err(e) => {
                tracing::error!(disk = lease.disk, "lease expired while renewals failed: {e}");
                st.lost = Some(format!("lease expired while renewals failed: {e}"));
                return;
            }
        }
    }
}
