//! Ferry's VMM library: a KVM VM with guest memory, vCPU threads, PVH and
//! Linux boot, devices and an HTTP API on a Unix socket.
//!
//! Where each concept lives:
//! - `config`: the machine (guest-visible, travels) and host (local) configs;
//! - `lifecycle`: the VM's one state machine, which every action goes through;
//! - `builder`: making a VM, for boot or from saved state;
//! - `vmm`: a running VM and its operations;
//! - `migration`: the traits a migration uses (source, destination, memory);
//! - `snapshot`: save to and load from a directory;
//! - `state`: the versioned saved-state model (one module per state kind);
//! - `vstate`: KVM VM, vCPU threads, dirty log;
//! - `arch`: x86_64 layout, CPUID, MSRs, registers, MP table;
//! - `boot`: one module per boot protocol;
//! - `devices`: one module per device, `backend` (the host side: flush,
//!   hand over, announce), `disk` (images and who may write them);
//! - `api`: the control socket (routes, server, client, report types).

pub mod api;
pub mod arch;
pub mod boot;
pub mod builder;
pub mod config;
pub mod devices;
pub mod lifecycle;
pub mod mac;
pub mod memory;
pub mod migration;
pub mod seccomp;
pub mod snapshot;
pub mod state;
pub mod vmm;
pub mod vstate;

pub use config::{HostConfig, MachineConfig, VmConfig};
pub use lifecycle::{Lifecycle, RunState};
pub use vmm::Vmm;
pub use vstate::{ExitReason, VmEvent};
