//! A vCPU and its run loop: enter the guest, hand each exit to [`exit::handle_exit`],
//! apply the action (hits to the caller, step-over, stop). Registers come through
//! `KVM_CAP_SYNC_REGS`, so a hit costs no extra ioctl.

pub mod complete;
pub mod exit;

use crate::trap::{GuestDebug, TrapHit};
use exit::{handle_exit, ExitAction, ExitCtx, ExitError, StopReason};
use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::{SyncReg, VcpuExit, VcpuFd};

/// Why a vCPU stopped with an error.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum VcpuError {
    /// KVM_RUN failed on vCPU {0}
    Run(u32, #[source] kvm_ioctls::Error),
    /// KVM could not emulate an instruction on vCPU {vcpu} at rip {rip:#x} (suberror {suberror})
    InternalError {
        /// The vCPU.
        vcpu: u32,
        /// RIP at the exit.
        rip: u64,
        /// `kvm_run.internal.suberror` (1: emulation failure).
        suberror: u32,
    },
    /// vCPU {0} exit could not be handled
    Exit(u32, #[source] ExitError),
    /// cannot set up guest debugging on vCPU {0}
    SetGuestDebug(u32, #[source] kvm_ioctls::Error),
    /// cannot read or write the registers of vCPU {0}
    Registers(u32, #[source] kvm_ioctls::Error),
}

/// What the run loop tells its caller about, between entering the guest.
#[derive(Debug)]
pub enum VcpuEvent<'a> {
    /// A probe hit. Change `regs` to change the guest; return `true` from the callback
    /// to write them back.
    Hit {
        /// The hit.
        hit: &'a TrapHit,
        /// General-purpose registers (RIP at the probe site).
        regs: &'a mut kvm_regs,
        /// Special registers (CR3, segment bases).
        sregs: &'a kvm_sregs,
    },
    /// A test guest reported a value on the report port.
    Report(u32),
}

/// Where a vCPU waits while the guest is paused; implemented by the engine.
pub trait PauseGate: Send + Sync + std::fmt::Debug {
    /// True when the vCPU should park now.
    fn should_park(&self) -> bool;
    /// Park: publish the registers (from the last exit), wait until resumed or stopped.
    fn park(&self, vcpu: u32, regs: &kvm_regs, sregs: &kvm_sregs);
}

/// One vCPU.
#[derive(Debug)]
pub struct KvmVcpu {
    fd: VcpuFd,
    index: u32,
    /// The trap generation whose guest-debug setting is loaded.
    debug_generation: Option<u64>,
}

impl KvmVcpu {
    pub(crate) fn new(mut fd: VcpuFd, index: u32) -> Self {
        fd.set_sync_valid_reg(SyncReg::Register);
        fd.set_sync_valid_reg(SyncReg::SystemRegister);
        Self {
            fd,
            index,
            debug_generation: None,
        }
    }

    /// The vCPU index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The vCPU fd (for setup: registers, CPUID, MSRs).
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Load a guest-debug setting.
    pub fn set_guest_debug(&self, debug: GuestDebug) -> Result<(), VcpuError> {
        self.fd
            .set_guest_debug(&debug.to_kvm())
            .map_err(|e| VcpuError::SetGuestDebug(self.index, e))
    }

    /// Enter the guest once and classify the exit.
    pub fn run_once(&mut self, ctx: &mut ExitCtx) -> Result<ExitAction, VcpuError> {
        let index = self.index;
        if let Some(traps) = &ctx.traps {
            let generation = traps.generation();
            if self.debug_generation != Some(generation) && !ctx.stepping {
                let debug = traps.guest_debug();
                self.set_guest_debug(debug)?;
                self.debug_generation = Some(generation);
            }
        }
        let res = match self.fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                // Copy the (at most 4) bytes out, so the registers can be read before
                // the handler sees the exit.
                let mut buf = [0u8; 8];
                let n = data.len().min(buf.len());
                buf[..n].copy_from_slice(&data[..n]);
                ctx.rip = self.fd.sync_regs().regs.rip;
                handle_exit(VcpuExit::IoOut(port, &buf[..n]), ctx)
            }
            Ok(exit) => handle_exit(exit, ctx),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                Ok(ExitAction::Continue)
            }
            Err(e) => return Err(VcpuError::Run(index, e)),
        };
        match res {
            Ok(a) => Ok(a),
            Err(ExitError::InternalError) => {
                let run = self.fd.get_kvm_run();
                // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, for which the kernel
                // fills the `internal` member of the exit union.
                let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
                Err(VcpuError::InternalError {
                    vcpu: index,
                    rip: self.fd.sync_regs().regs.rip,
                    suberror,
                })
            }
            Err(e) => Err(VcpuError::Exit(index, e)),
        }
    }

    /// After an emulation failure: finish the instruction in the guest's place when
    /// [`complete::decide`] knows how (and `ctx.memory` is set). True when done.
    fn try_complete(&mut self, ctx: &mut ExitCtx) -> Result<bool, VcpuError> {
        let Some(mem) = ctx.memory.clone() else {
            return Ok(false);
        };
        let sync = self.fd.sync_regs();
        let (mut regs, sregs) = (sync.regs, sync.sregs);
        let Some(insn) = complete::fetch(mem.as_ref(), &regs, &sregs) else {
            return Ok(false);
        };
        match complete::decide(&insn, &regs, &sregs) {
            Some(complete::Completion::InjectBreakpoint { resume_rip }) => {
                let e = |e| VcpuError::Registers(self.index, e);
                let mut events = self.fd.get_vcpu_events().map_err(e)?;
                events.exception.injected = 1;
                events.exception.nr = complete::BP_VECTOR;
                events.exception.has_error_code = 0;
                events.exception.error_code = 0;
                self.fd.set_vcpu_events(&events).map_err(e)?;
                regs.rip = resume_rip;
                self.fd.sync_regs_mut().regs = regs;
                self.fd.set_sync_dirty_reg(SyncReg::Register);
                ctx.stats.completed += 1;
                Ok(true)
            }
            Some(complete::Completion::Skip { resume_rip, rflags }) => {
                regs.rip = resume_rip;
                regs.rflags = rflags;
                self.fd.sync_regs_mut().regs = regs;
                self.fd.set_sync_dirty_reg(SyncReg::Register);
                ctx.stats.completed += 1;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Run until the guest stops; hits and reports go to `on_event`.
    pub fn run(
        &mut self,
        ctx: &mut ExitCtx,
        on_event: &mut dyn FnMut(u32, VcpuEvent<'_>) -> bool,
    ) -> Result<StopReason, VcpuError> {
        loop {
            if ctx.stop_requested() {
                return Ok(StopReason::Stopped);
            }
            if let Some(gate) = ctx.gate.clone() {
                if gate.should_park() {
                    let sync = self.fd.sync_regs();
                    gate.park(self.index, &sync.regs, &sync.sregs);
                    continue;
                }
            }
            let action = match self.run_once(ctx) {
                Err(VcpuError::InternalError {
                    suberror: complete::SUBERROR_EMULATION,
                    ..
                }) if self.try_complete(ctx)? => continue,
                other => other?,
            };
            match action {
                ExitAction::Continue => {}
                ExitAction::Report(v) => {
                    on_event(self.index, VcpuEvent::Report(v));
                }
                ExitAction::Hit(hit) => {
                    let sync = self.fd.sync_regs();
                    let mut regs = sync.regs;
                    let sregs = sync.sregs;
                    let mut write_back = on_event(
                        self.index,
                        VcpuEvent::Hit {
                            hit: &hit,
                            regs: &mut regs,
                            sregs: &sregs,
                        },
                    );
                    if hit.skip_bytes != 0 && regs.rip == hit.site.gva.raw() {
                        regs.rip += hit.skip_bytes;
                        write_back = true;
                    }
                    if write_back {
                        self.fd.sync_regs_mut().regs = regs;
                        self.fd.set_sync_dirty_reg(SyncReg::Register);
                    }
                    if let Some(step) = hit.step_over {
                        self.set_guest_debug(step)?;
                        ctx.stepping = true;
                        self.debug_generation = None;
                    }
                }
                ExitAction::StepDone => {
                    ctx.stepping = false;
                }
                ExitAction::Stop(reason) => return Ok(reason),
            }
        }
    }
}
