//! COM1 output and polled input. Every port access is a VM exit (15-20 us on
//! PVM), so output does not wait on the line status register: the VMM's UART
//! accepts a byte at any time.

use crate::io::{inb, outb};
use crate::ports::COM1;

const LSR: u16 = COM1 + 5;
const LSR_DATA_READY: u8 = 0x01;

pub struct Serial;

impl core::fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                outb(COM1, b'\r');
            }
            outb(COM1, b);
        }
        Ok(())
    }
}

#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = writeln!($crate::serial::Serial, $($arg)*);
    }};
}

/// Collects bytes from COM1 into a line. Polled by the main loop.
pub struct LineReader {
    buf: [u8; 128],
    len: usize,
}

impl LineReader {
    pub const fn new() -> Self {
        LineReader { buf: [0; 128], len: 0 }
    }

    /// Drains the UART; returns a complete line (without its terminator).
    pub fn poll(&mut self) -> Option<&str> {
        while inb(LSR) & LSR_DATA_READY != 0 {
            let b = inb(COM1);
            if b == b'\n' || b == b'\r' {
                if self.len == 0 {
                    continue;
                }
                let n = core::mem::replace(&mut self.len, 0);
                return core::str::from_utf8(&self.buf[..n]).ok();
            }
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
        None
    }
}
