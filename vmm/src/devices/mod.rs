//! Emulated devices, one module each, the buses they sit on, and the event
//! loop that feeds host-side input (tap frames) to them.

pub mod backend;
pub mod bus;
pub mod debug_exit;
pub mod disk;
pub mod event_loop;
pub mod i8042;
pub mod serial;
pub mod tap;
pub mod virtio;
