//! Ferry's VMM library: a KVM VM with guest memory, vCPU threads, PVH and
//! Linux boot, legacy devices and an HTTP API on a Unix socket.
//!
//! Layout follows the system: `vstate` (KVM VM and vCPUs), `arch` (x86_64
//! layout, CPUID, registers, MP table), `boot` (one module per boot
//! protocol), `devices` (one module per device), `api` (the control socket).

pub mod api;
pub mod arch;
pub mod boot;
pub mod config;
pub mod devices;
pub mod memory;
pub mod snapshot;
pub mod state;
pub mod vmm;
pub mod vstate;

pub use config::VmConfig;
pub use vmm::{RunState, VmInfo, Vmm};
pub use vstate::{ExitReason, VmEvent};
