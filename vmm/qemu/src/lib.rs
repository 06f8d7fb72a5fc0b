//! ornament-qemu: the QEMU engine.
//!
//! ```text
//! QemuConfig ─► launch (argv) ─► QEMU process ─┬─ ttyS0 console ─► our stderr
//!                                              ├─ ttyS1 status  ─► RunOutcome
//!                                              ├─ RAM file      ─► ram::RamFile (PhysMemory)
//!                                              └─ gdbstub       ─► gdb::GdbClient (stop, regs, breakpoints)
//! ```
//! Used where KVM cannot run an unmodified kernel (TCG), or with `-accel kvm`.

pub mod debris;
pub mod engine;
pub mod gdb;
pub mod host;
pub mod launch;
pub mod machine;
pub mod plugin_link;
pub mod ram;

pub use engine::{choose_trap, QemuEngine, QemuEngineError, Trap, TrapChoice};
pub use host::{probe, qemu_binary, QemuInfo};
pub use launch::{Accel, QemuConfig};
pub use machine::{MachineError, QemuEnd, QemuMachine, RunOutcome, RunPaths};
