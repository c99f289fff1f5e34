//! x86_64: the guest-physical layout, CPUID and MSR setup, boot-time
//! registers and tables, the MP table and the ACPI tables.

pub mod acpi;
pub mod cpu_features;
pub mod cpu_profile;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
