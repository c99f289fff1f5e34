//! KVM state: the VM (memory slots, irqchip, PIT) and its vCPU threads.

pub mod dirty;
pub mod vcpu;
pub mod vm;

/// Why a VM stopped running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest shut itself down (ACPI-less: KVM_EXIT_SHUTDOWN, HLT with
    /// nothing to wake it, a system event).
    GuestShutdown,
    /// The guest pulsed the reset line (i8042) or asked for a reset.
    GuestReset,
    /// The guest wrote this status to the debug-exit port.
    DebugExit(u8),
    /// The API asked for a shutdown.
    Api,
    /// The VMM process got this signal.
    Signal(i32),
    /// A vCPU hit something it cannot continue from.
    Error(String),
    /// The VM now runs elsewhere.
    Migrated(String),
}

impl ExitReason {
    /// The VMM's process exit status for this reason.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::GuestShutdown
            | ExitReason::GuestReset
            | ExitReason::Api
            | ExitReason::Signal(_)
            | ExitReason::Migrated(_) => 0,
            ExitReason::DebugExit(code) => i32::from(*code),
            ExitReason::Error(_) => 1,
        }
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::GuestShutdown => write!(f, "guest shut down"),
            ExitReason::GuestReset => write!(f, "guest reset (treated as shutdown)"),
            ExitReason::DebugExit(code) => write!(f, "guest wrote {code} to the debug-exit port"),
            ExitReason::Api => write!(f, "shutdown requested through the API"),
            ExitReason::Signal(sig) => write!(f, "VMM got signal {sig}"),
            ExitReason::Error(e) => write!(f, "vCPU error: {e}"),
            ExitReason::Migrated(to) => write!(f, "migrated to {to}"),
        }
    }
}

/// What vCPUs, devices, the API and signal handling tell the VMM's main loop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmEvent {
    Exit(ExitReason),
}
