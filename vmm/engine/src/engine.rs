//! The `Engine` trait: the small surface every machine (KVM, QEMU) offers.

use crate::action::Action;
use crate::addr::Gva;
use crate::hit::{ProbeHit, ProbeId};
use crate::mem::PhysMemory;
use crate::regs::Regs;
use std::time::Duration;

/// Why an engine call failed.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum EngineError {
    /// the guest is no longer running
    GuestGone,
    /// vCPU {0} does not exist
    NoSuchVcpu(u32),
    /// probe {0:?} is not armed
    NoSuchProbe(ProbeId),
    /// this engine cannot do that: {0}
    Unsupported(&'static str),
    /// engine backend failed
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// How the guest ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest powered itself off (ACPI, i8042 reset with no-reboot).
    PowerOff,
    /// The engine's process or thread ended for another reason.
    Died {
        /// What is known about why.
        reason: String,
    },
}

/// What `Engine::next_event` returns.
#[derive(Debug, Clone)]
pub enum EngineEvent {
    /// A probe was hit.
    Hit(Box<ProbeHit>),
    /// The guest ended.
    Exited(GuestExit),
    /// Nothing happened within the timeout.
    Idle,
}

/// A machine running a guest, seen from `introspect`.
pub trait Engine: Send {
    /// Guest-physical memory (readable while the guest runs).
    fn memory(&self) -> &dyn PhysMemory;
    /// Number of vCPUs.
    fn vcpu_count(&self) -> u32;
    /// Registers of one vCPU; the guest must be paused (or the vCPU held at a hit).
    fn registers(&mut self, vcpu: u32) -> Result<Regs, EngineError>;
    /// Arm a probe at a guest-virtual (kernel) address.
    fn arm(&mut self, probe: ProbeId, at: Gva) -> Result<(), EngineError>;
    /// Disarm a probe.
    fn disarm(&mut self, probe: ProbeId) -> Result<(), EngineError>;
    /// Wait up to `timeout` for the next hit or for the guest to end.
    fn next_event(&mut self, timeout: Duration) -> Result<EngineEvent, EngineError>;
    /// Answer a held hit (see `ProbeHit::held`).
    fn answer(&mut self, hit: &ProbeHit, action: Action) -> Result<(), EngineError>;
    /// Stop all vCPUs (`pause == true`) or let them run again.
    fn set_paused(&mut self, pause: bool) -> Result<(), EngineError>;
}
