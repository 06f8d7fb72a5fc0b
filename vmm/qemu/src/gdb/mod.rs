//! QEMU's gdbstub as our control channel: stop, continue, registers, memory,
//! breakpoints and monitor commands, over a private unix socket.

pub mod client;
pub mod packet;
pub mod target;

pub use client::{GdbClient, GdbError, StopReply};
pub use target::RegLayout;
