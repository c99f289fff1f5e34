//! Emulated devices, one module each, and the port I/O bus they sit on.

pub mod bus;
pub mod debug_exit;
pub mod i8042;
pub mod serial;
