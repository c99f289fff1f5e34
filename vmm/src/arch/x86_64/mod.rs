//! x86_64: the guest-physical layout, CPUID and MSR setup, boot-time
//! registers and tables, and the MP table.

pub mod cpu_features;
pub mod cpu_profile;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
