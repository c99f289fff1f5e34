//! I/O ports the guest talks to. The VMM side of each lives in
//! `vmm/src/devices/`; keep the numbers in step with `vmm::arch::layout`.

/// COM1, an 8250 UART.
pub const COM1: u16 = 0x3f8;
/// i8042 command port: writing 0xfe pulses the CPU reset line.
pub const I8042_COMMAND: u16 = 0x64;
/// Ferry debug-exit port (QEMU's isa-debug-exit address): a byte written
/// here ends the VM with that exit status.
pub const DEBUG_EXIT: u16 = 0x501;
/// Ferry idle port: a 32-bit write asks the VMM to hold the vCPU for that
/// many microseconds. It is the polling guest's `hlt`: it gives the host CPU
/// back when there is nothing to do, without interrupts.
pub const IDLE: u16 = 0x510;

pub fn debug_exit(code: u8) -> ! {
    crate::io::outb(DEBUG_EXIT, code);
    // The VMM stops the vCPU on that write; never fall through.
    loop {
        core::hint::spin_loop();
    }
}

pub fn i8042_reset() -> ! {
    crate::io::outb(I8042_COMMAND, 0xfe);
    loop {
        core::hint::spin_loop();
    }
}
