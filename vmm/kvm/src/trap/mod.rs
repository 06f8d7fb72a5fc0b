//! \[1\] Trap backends: how a probe address is made to exit to the VMM, and how the exit
//! is recognised as a hit of that probe.
//!
//! - [`debugreg::DebugRegs`]: DR0-DR3, nothing written into the guest, four probes,
//!   a single-step over each hit;
//! - [`patch::PatchedSites`]: the fentry NOP replaced by `out PROBE_PORT, al`, any number
//!   of probes, no single-step;
//! - software `int3` only where `KVM_GUESTDBG_USE_SW_BP` reports `KVM_EXIT_DEBUG`; the
//!   self-test in [`crate::support`] decides (it does not on PVM, so there is no backend).

pub mod debugreg;
pub mod patch;

use ornament_engine::{Gpa, Gva, MemError, PhysMemory, ProbeId};
use serde::Serialize;

/// Which kind of trap a backend plants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrapKind {
    /// Hardware debug registers.
    DebugRegs,
    /// Patched fentry sites exiting through port I/O.
    PatchedSite,
    /// Software breakpoints (`int3` with `KVM_GUESTDBG_USE_SW_BP`).
    Int3,
}

/// Why a probe could not be armed or disarmed.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum TrapError {
    /// probe {0:?} is already armed
    AlreadyArmed(ProbeId),
    /// probe {0:?} is not armed
    NotArmed(ProbeId),
    /// no free debug register for a probe at {0}
    NoFreeSlot(Gva),
    /// another probe is armed at {0}
    SiteTaken(Gva),
    /// probe address {0} is unusable
    BadSite(Gva),
    /// probe site {gva} holds {found:02x?}, not the fentry NOP [0f, 1f, 44, 00, 00]
    NotFentryNop {
        /// The probe address.
        gva: Gva,
        /// The five bytes found there.
        found: [u8; 5],
    },
    /// cannot access the probe site at guest-physical {0}
    Memory(Gpa, #[source] MemError),
}

/// Where a probe sits: its guest-virtual address (what RIP shows) and the
/// guest-physical address of its bytes (what a patch writes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Site {
    /// The address the vCPU executes.
    pub gva: Gva,
    /// The same byte in guest-physical memory.
    pub gpa: Gpa,
}

/// A `KVM_SET_GUEST_DEBUG` setting: control bits and DR0-DR7.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GuestDebug {
    /// `KVM_GUESTDBG_*` bits; 0 turns guest debugging off.
    pub control: u32,
    /// DR0-DR3 addresses, DR6 (unused), DR7 at index 7.
    pub debugreg: [u64; 8],
}

impl GuestDebug {
    /// The kvm-bindings struct.
    pub fn to_kvm(self) -> kvm_bindings::kvm_guest_debug {
        kvm_bindings::kvm_guest_debug {
            control: self.control,
            pad: 0,
            arch: kvm_bindings::kvm_guest_debug_arch {
                debugreg: self.debugreg,
            },
        }
    }
}

/// The part of a vCPU exit a trap backend looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrapExit {
    /// An `out` to [`crate::layout::PROBE_PORT`] with RIP as KVM reported it.
    ProbePort {
        /// RIP at the exit.
        rip: u64,
    },
    /// `KVM_EXIT_DEBUG`.
    Debug {
        /// DR6 at the exit.
        dr6: u64,
        /// RIP at the exit.
        pc: u64,
    },
}

/// An exit recognised as a probe hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrapHit {
    /// Which probe.
    pub probe: ProbeId,
    /// Where it sits.
    pub site: Site,
    /// The guest-debug setting to single-step over the site with, when the trap
    /// would fire again on resume (hardware breakpoints); `None` when the vCPU can
    /// simply run on.
    pub step_over: Option<GuestDebug>,
    /// Bytes to skip instead of stepping: the site is a verified 5-byte NOP, so
    /// resuming at site + 5 is the same as executing it (0: no skip).
    pub skip_bytes: u64,
}

/// A way of trapping probe addresses; shared by all vCPU threads (interior mutability).
pub trait TrapBackend: Send + Sync + std::fmt::Debug {
    /// Which kind this is.
    fn kind(&self) -> TrapKind;
    /// Arm `probe` at `site`; `mem` is guest-physical memory (for backends that patch).
    fn arm(&self, probe: ProbeId, site: Site, mem: &dyn PhysMemory) -> Result<(), TrapError>;
    /// Disarm `probe`.
    fn disarm(&self, probe: ProbeId) -> Result<(), TrapError>;
    /// Bumped on every arm/disarm: vCPUs reload [`TrapBackend::guest_debug`] when it moves.
    fn generation(&self) -> u64;
    /// The guest-debug setting every vCPU runs with.
    fn guest_debug(&self) -> GuestDebug;
    /// The hit this exit is, if any.
    fn recognise(&self, exit: TrapExit) -> Option<TrapHit>;
}
