//! What a running migration reports while it runs (`GET vm.migration`).

use serde::Serialize;

#[derive(Clone, Debug, Default, Serialize)]
pub struct Progress {
    /// connecting, preflight, round, switchover, done, failed
    pub phase: String,
    pub round: u32,
    pub remaining_mib: f64,
    pub sent_mib: f64,
    pub rate_mib_s: f64,
    pub estimated_downtime_ms: f64,
    pub throttle_pct: u32,
    pub elapsed_ms: f64,
}

/// A shared progress record the engine updates and the API reads.
pub type Shared = std::sync::Arc<std::sync::Mutex<Progress>>;

pub fn update(p: &Shared, f: impl FnOnce(&mut Progress)) {
    f(&mut p.lock().unwrap_or_else(|e| e.into_inner()))
}
