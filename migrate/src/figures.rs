//! The figures every migration reports: one JSON object with at least
//! mode, mem_mib, total_ms, downtime_ms, rounds, bytes_sent, pages_zero and
//! pages_sent. The ping figures are filled in by whoever ran a pinger.

use serde::Serialize;

#[derive(Clone, Debug, Default, Serialize)]
pub struct Figures {
    pub mode: &'static str,
    /// How memory moved: "copy" (pages over the stream) or "shared-fd"
    /// (same host: the destination mapped the source's memory file).
    pub memory: &'static str,
    pub mem_mib: u64,
    pub total_ms: f64,
    /// Source pause to the destination's "resumed" reaching the source.
    pub downtime_ms: f64,
    pub rounds: u32,
    pub bytes_sent: u64,
    pub pages_zero: u64,
    pub pages_sent: u64,
    /// Before the pause (not in the downtime): waiting for the destination
    /// to apply what was still in flight (`CatchUp`).
    pub catch_up_ms: f64,
    /// Of the downtime: from the pause to the state sent (last dirty sync
    /// and pages, saving the state).
    pub pause_to_state_ms: f64,
    /// Of the downtime: restoring the VM on the destination.
    pub restore_ms: f64,
    /// Of the downtime: flushing disks and handing their leases over.
    pub handoff_ms: f64,
    /// The commit gate's answer (the cluster's owner transaction), inside
    /// the downtime; 0 without a gate.
    pub commit_ms: f64,
    /// Of the downtime: from `Commit` sent to `Resumed` (the destination
    /// takes the disks and resumes; this side retires meanwhile).
    pub commit_to_resumed_ms: f64,
    pub destination: String,
    /// Connections memory travelled on (the control stream included).
    pub streams: u8,
    /// Round-0 throughput, MiB/s.
    pub round0_mib_s: f64,
    /// Pages sent with the VM paused (the last dirty set).
    pub final_pages: u64,
    /// The highest auto-converge throttle used, %.
    pub throttle_pct: u32,
    /// Switched over by policy `force` before converging.
    pub forced: bool,
    /// KVM dirty log mode (ManualProtect or GetDirtyLog).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dirty_log: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pings_sent: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pings_lost: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_gap_ms: Option<f64>,
}
