//! The few instructions the guest needs at CPL3: port I/O and rdtsc. (CPUID
//! is read at CPL0, in `probe.rs`: at CPL3 a PVM host does not intercept it.)

use core::arch::asm;

pub fn outb(port: u16, val: u8) {
    // SAFETY: IOPL=3 makes port I/O legal at CPL3; the VMM owns every port.
    unsafe { asm!("out dx, al", in("dx") port, in("al") val, options(nomem, nostack, preserves_flags)) }
}

pub fn outl(port: u16, val: u32) {
    // SAFETY: as for `outb`.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") val, options(nomem, nostack, preserves_flags)) }
}

pub fn inb(port: u16) -> u8 {
    let val: u8;
    // SAFETY: as for `outb`.
    unsafe { asm!("in al, dx", in("dx") port, out("al") val, options(nomem, nostack, preserves_flags)) }
    val
}

pub fn rdtsc() -> u64 {
    // SAFETY: CR4.TSD is clear, so rdtsc is allowed at CPL3.
    unsafe { core::arch::x86_64::_rdtsc() }
}
