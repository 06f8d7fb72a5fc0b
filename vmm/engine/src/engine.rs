//! The `Engine` trait: everything a watch session needs from a machine running a guest
//! (KVM, QEMU), and nothing engine-specific. An engine traps, reads and resumes; what a
//! hit means and what to do about it is decided by the session in `introspect`.
//!
//! ```text
//! session                         engine
//!   capabilities()          <-    where it can deny, what it captures at a hit
//!   arm(ProbeRequest)...    ->    probe sites (armed now, or at the engine's safe point)
//!   enable_deny(offsets)    ->    kernel facts for engines that deny through memory
//!   resume()                ->    the guest runs
//!   next_event(timeout)     <-    Hit | Paused | Exited | Idle
//!   answer(hit, Action)     ->    a held vCPU goes on (continue, deny, return early)
//!   pause() / resume()      ->    the whole guest stops (EngineEvent::Paused) / runs
//!   stop()                  ->    the guest is killed
//! ```

use crate::action::Action;
use crate::addr::Gva;
use crate::hit::{ProbeHit, ProbeId};
use crate::mem::PhysMemory;
use crate::regs::Regs;
use crate::wire::{MemRead, ProbeSpec, Reg, RegMask};
use std::sync::Arc;
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

impl EngineError {
    /// Wrap a backend's own error.
    pub fn backend(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Backend(Box::new(e))
    }
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
    /// A pause asked for with [`Engine::pause`] is complete: no vCPU runs.
    Paused,
    /// The guest ended.
    Exited(GuestExit),
    /// Nothing happened within the timeout.
    Idle,
}

/// Where an engine can make a syscall fail without running it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyAt {
    /// At a held hit of the syscall dispatcher (`do_syscall_64`), through guest memory
    /// (the QEMU plugin: it cannot write registers). Needs [`Engine::enable_deny`].
    Dispatcher,
    /// At a held hit on the first instruction of the syscall's own entry function
    /// (`__x64_sys_NAME`): the engine returns from it at once with `-errno` in `rax`.
    FunctionEntry,
    /// Nowhere: this engine only observes.
    Nowhere,
}

/// What an engine can do, for the session to place its probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Where a syscall can be denied.
    pub deny_at: DenyAt,
    /// The engine can trap the syscall dispatcher (`do_syscall_64`, which has no fentry
    /// site): needed for every-syscall watching.
    pub dispatcher_probes: bool,
    /// Hits carry the registers and memory the probe's capture asked for, read at the
    /// hit ([`ProbeHit::mem`], [`ProbeHit::bytes`]), so a probe need not hold its vCPU.
    /// Without it, every hit is held and memory is read while the vCPU waits.
    pub captures_at_hit: bool,
    /// The engine can stop the whole guest and let it go on ([`Engine::pause`]).
    pub pause: bool,
    /// The engine arms and disarms probes in windows by itself
    /// ([`Window`](crate::wire::Window), [`Engine::close_window`]).
    pub probe_windows: bool,
}

/// One probe the session wants: where, what to capture, and whether it must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeRequest {
    /// The id hits of it carry.
    pub id: ProbeId,
    /// The kernel address (slide applied).
    pub at: Gva,
    /// The kernel function, for messages.
    pub symbol: String,
    /// Registers and memory to capture at a hit, the syscall-number filter, and in
    /// `hold` whether the session must see the vCPU held (to read memory that may change,
    /// or to act). Engines that hold every hit may ignore the captures.
    pub capture: ProbeSpec,
    /// The session denies syscalls at this probe (see [`DenyAt`]).
    pub deny: bool,
}

/// Kernel facts an engine that denies through guest memory needs ([`DenyAt::Dispatcher`]),
/// all from the guest's profile: nothing here is a constant of one kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DenyOffsets {
    /// Address of `syscall_exit_to_user_mode` (slide applied).
    pub syscall_exit: Gva,
    /// Per-CPU offset of `current_task` (added to `gs_base` in kernel mode).
    pub current_task_offset: u64,
    /// Offset of `thread_info.syscall_work` in `task_struct` (x86-64: thread_info is at 0).
    pub syscall_work_offset: u64,
    /// `SYSCALL_WORK_BIT_SYSCALL_EMU`.
    pub syscall_emu_bit: u32,
    /// Offset of `ax` in `struct pt_regs`.
    pub pt_regs_ax_offset: u64,
}

impl DenyOffsets {
    /// The spec for a held probe at `do_syscall_64` that reports only the listed syscall
    /// numbers (`rsi`) and carries what a deny through memory needs: rdi (pt_regs), rsi,
    /// cr3, cr4, gs_base plus `extra` registers, and memory read 0 = the current task.
    pub fn entry_spec(&self, syscalls: &[u64], extra: RegMask) -> ProbeSpec {
        let mut spec = ProbeSpec::regs(RegMask(
            RegMask::of(&[
                Reg::Rdi,
                Reg::Rsi,
                Reg::Cr3,
                Reg::Cr4,
                Reg::GsBase,
                Reg::Rip,
            ])
            .0 | extra.0,
        ))
        .with_filter(Reg::Rsi, syscalls);
        spec.hold = true;
        spec.mem[0] = MemRead::at_reg(Reg::GsBase, self.current_task_offset, 8);
        spec
    }

    /// The spec for the held probe at `syscall_exit_to_user_mode` where a deny is undone:
    /// the page tables and memory read 0 = the current task.
    pub fn exit_spec(&self) -> ProbeSpec {
        let mut spec = ProbeSpec::regs(RegMask::of(&[Reg::Cr3, Reg::Cr4, Reg::GsBase]));
        spec.hold = true;
        spec.mem[0] = MemRead::at_reg(Reg::GsBase, self.current_task_offset, 8);
        spec
    }
}

/// A machine running a guest, seen from `introspect`.
pub trait Engine: Send {
    /// What this engine can do.
    fn capabilities(&self) -> Capabilities;
    /// Guest-physical memory (readable while the guest runs).
    fn memory(&self) -> Arc<dyn PhysMemory>;
    /// Number of vCPUs.
    fn vcpu_count(&self) -> u32;
    /// Registers of one vCPU; the guest must be paused (or the vCPU held at a hit).
    fn registers(&mut self, vcpu: u32) -> Result<Regs, EngineError>;
    /// Arm a probe. Engines that must wait for the kernel to finish patching its text
    /// arm it at their own safe point, before the first user process runs.
    fn arm(&mut self, probe: &ProbeRequest) -> Result<(), EngineError>;
    /// Disarm a probe.
    fn disarm(&mut self, probe: ProbeId) -> Result<(), EngineError>;
    /// One task left probe `probe`'s window without its closing hit (it exited inside):
    /// only engines with [`Capabilities::probe_windows`].
    fn close_window(&mut self, _probe: ProbeId) -> Result<(), EngineError> {
        Err(EngineError::Unsupported("probe windows"))
    }
    /// Give the kernel facts a [`DenyAt::Dispatcher`] engine needs; others ignore them.
    fn enable_deny(&mut self, _offsets: &DenyOffsets) -> Result<(), EngineError> {
        Ok(())
    }
    /// Let the guest run: the first time after arming, or after a pause.
    fn resume(&mut self) -> Result<(), EngineError>;
    /// Ask every vCPU to stop. Hits already on their way still come; then
    /// [`EngineEvent::Paused`] says no vCPU runs. Held hits must still be answered.
    fn pause(&mut self) -> Result<(), EngineError>;
    /// Wait up to `timeout` for the next hit, a completed pause, or the guest's end.
    fn next_event(&mut self, timeout: Duration) -> Result<EngineEvent, EngineError>;
    /// Answer a held hit (see `ProbeHit::held`).
    fn answer(&mut self, hit: &ProbeHit, action: Action) -> Result<(), EngineError>;
    /// Kill the guest now (an interrupted or failed run).
    fn stop(&mut self);
    /// The host's wall clock at this engine's time 0, the origin of
    /// [`ProbeHit::time_ns`]: a hit happened at `clock_origin() + time_ns`. (The time at
    /// which an event is handled is later, by however long it queued.)
    fn clock_origin(&self) -> std::time::SystemTime;
}

/// The wall-clock time at which `start` was taken: now, less the time since.
pub fn wall_clock_at(start: std::time::Instant) -> std::time::SystemTime {
    std::time::SystemTime::now()
        .checked_sub(start.elapsed())
        .unwrap_or(std::time::UNIX_EPOCH)
}
