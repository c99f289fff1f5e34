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
//! | PUT    | /api/v1/vm.migrate   | `{"mode", "to", "key_file", ...}`: move the VM; figures |
//! | GET    | /api/v1/vm.migration | progress of the running migration      |
//!
//! Errors are `{"error": "..."}` with a 4xx/5xx status.
//!
//! [`VmInfo`]: crate::vmm::VmInfo

pub mod client;
pub mod server;

pub const API_PREFIX: &str = "/api/v1";
