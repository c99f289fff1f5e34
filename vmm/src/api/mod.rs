//! The VM's HTTP API on a Unix socket, in the manner of Cloud Hypervisor:
//!
//! | method | path                 | does                                   |
//! |--------|----------------------|----------------------------------------|
//! | GET    | /api/v1/vmm.ping     | `{"version", "pid"}`                   |
//! | GET    | /api/v1/vm.info      | state, config, uptime ([`VmInfo`])     |
//! | PUT    | /api/v1/vm.pause     | 204 once no vCPU is in the guest       |
//! | PUT    | /api/v1/vm.resume    | 204 once every vCPU runs again         |
//! | PUT    | /api/v1/vm.shutdown  | 204, then the VMM stops the VM, exits  |
//! | PUT    | /api/v1/vm.console   | body typed on the serial console       |
//! | PUT    | /api/v1/vm.announce  | RARP for the guest's MAC on every tap  |
//! | PUT    | /api/v1/vm.snapshot  | `{"dir"}`: state + memory; VM left paused |
//! | PUT    | /api/v1/vm.migrate   | a `MigrateRequest` (migrate crate): move the VM; figures |
//! | GET    | /api/v1/vm.migration | progress of the running migration      |
//! | PUT    | /api/v1/vm.migration-cancel | stop the running migration before its commit |
//!
//! Errors are `{"error": "..."}`: 400 for a bad request body (malformed
//! JSON included), 403 for a peer that is neither root nor the VMM's uid,
//! 404 for an unknown endpoint, 405 for a known one with the wrong method,
//! 408 for a request that did not arrive within its deadline, 409 for an
//! action the VM's lifecycle refuses now (e.g. `vm.pause` during a
//! migration), 413 for a body over 1 MiB, 500 for a failure.

pub mod client;
pub mod http;
pub mod server;

use std::path::PathBuf;

use serde::Serialize;

use crate::config::VmConfig;
use crate::lifecycle::{Lifecycle, RunState};

pub const API_PREFIX: &str = "/api/v1";

/// What `GET vm.info` reports.
#[derive(Clone, Debug, Serialize)]
pub struct VmInfo {
    /// Running, Paused, Migrating, Retired or Stopped.
    pub state: &'static str,
    /// The same, with what the vCPUs do during a migration.
    pub lifecycle: Lifecycle,
    /// What a snapshot or migration of the VM now would carry.
    pub run_state: RunState,
    pub config: VmConfig,
    pub boot_protocol: &'static str,
    pub kernel_load: u64,
    pub uptime_ms: u64,
    pub pid: u32,
    pub pvm_host: bool,
    /// The guest's TSC frequency as KVM runs it (0 if unknown).
    pub tsc_khz: u32,
    pub devices: Vec<serde_json::Value>,
    /// Why the VM is held paused for an operator, if it is (a migration
    /// committed here whose disks could not be taken: `vm.resume` takes
    /// them first).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held: Option<String>,
}

/// What `vm.snapshot` reports.
#[derive(Clone, Debug, Serialize)]
pub struct SnapshotReport {
    pub dir: PathBuf,
    pub state_bytes: u64,
    pub mem_mib: u64,
    pub pages_data: u64,
    pub pages_zero: u64,
    pub pause_ms: f64,
    pub total_ms: f64,
}
