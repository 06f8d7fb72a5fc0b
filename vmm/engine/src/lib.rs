//! ornament-engine: the seam between the engines and `introspect`.
//!
//! Data flow of ornament, and the stages this crate names:
//!
//! ```text
//! [1] vCPU exit / plugin callback  (ornament-kvm, ornament-qemu, tcg-plugin)
//! [2] engine  -> ProbeHit           (this crate: hit.rs)
//! [3] probe lookup, [4] task read, [5] event, [6] ornaments  (ornament-introspect)
//! [7] Action back to the engine     (this crate: action.rs)
//! ```
//!
//! Nothing here knows about KVM or QEMU; nothing here uses `unsafe`.
#![forbid(unsafe_code)]

pub mod action;
pub mod addr;
pub mod clock;
pub mod console;
pub mod engine;
pub mod hit;
pub mod mem;
pub mod paging;
pub mod regs;
pub mod report;
pub mod wire;

pub use action::Action;
pub use addr::{Gpa, Gva};
pub use engine::{
    Capabilities, DenyAt, DenyOffsets, Engine, EngineError, EngineEvent, GuestExit, ProbeRequest,
};
pub use hit::{ProbeHit, ProbeId};
pub use mem::{MemError, PhysMemory, SliceMemory};
pub use regs::Regs;

/// The 5-byte NOP (`nopl 0x0(%rax,%rax,1)`) every traceable kernel function starts with
/// once the kernel has patched its `call __fentry__` sites: where ornament's probes go.
pub const FENTRY_NOP: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
