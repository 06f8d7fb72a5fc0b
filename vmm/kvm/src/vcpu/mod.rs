//! A vCPU and its run loop: enter the guest, hand each exit to [`exit::handle_exit`],
//! apply the action (hits to the caller, step-over, stop). Registers come through
//! `KVM_CAP_SYNC_REGS`, so a hit costs no extra ioctl.

pub mod complete;
pub mod exit;

use crate::trap::{GuestDebug, TrapHit, TrapKind};
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
    /// vCPU {vcpu}: KVM could not emulate the instruction at rip {rip:#x} (cs {cs:#x}), bytes {bytes}, and the VMM cannot complete it
    Uncompleted {
        /// The vCPU.
        vcpu: u32,
        /// RIP at the exit.
        rip: u64,
        /// CS selector (RPL 3: user mode).
        cs: u16,
        /// The instruction bytes at RIP, hex (empty when unreadable).
        bytes: String,
    },
    /// vCPU {0}: PVM compatibility cannot find the guest's #PF handler (IDT gate 14) or a free debug register
    PfHook(u32),
    /// vCPU {0}: cannot read the #PF frame at rsp {1:#x}
    PfFrame(u32, u64),
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
    /// What the loaded guest-debug setting was made from: the trap generation and
    /// the #PF hook; `None` forces a reload.
    debug_generation: Option<(Option<u64>, Option<u64>)>,
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

    /// The guest-debug setting: the trap backend's, plus the #PF hook's slot.
    fn wanted_debug(&self, ctx: &ExitCtx) -> GuestDebug {
        let base = ctx
            .traps
            .as_ref()
            .map(|t| t.guest_debug())
            .unwrap_or_default();
        match ctx.pf_hook {
            Some(h) => crate::pvm::with_hook(base, &h),
            None => base,
        }
    }

    /// Load the guest-debug setting when the traps or the #PF hook changed; arm the
    /// hook when PVM compatibility asks for it.
    fn sync_guest_debug(&mut self, ctx: &mut ExitCtx) -> Result<(), VcpuError> {
        if ctx.pf_hook.is_none() && ctx.pvm.as_ref().is_some_and(|p| p.hook_wanted()) {
            self.arm_pf_hook(ctx)?;
        }
        let key = (
            ctx.traps.as_ref().map(|t| t.generation()),
            ctx.pf_hook.map(|h| h.handler),
        );
        if key == (None, None) && self.debug_generation.is_none() {
            // Nothing of ours to load: leave any setting made from outside alone.
            return Ok(());
        }
        if self.debug_generation != Some(key) {
            let debug = self.wanted_debug(ctx);
            self.set_guest_debug(debug)?;
            self.debug_generation = Some(key);
        }
        if let (Some(k), Some(g)) = (&ctx.kicker, key.0) {
            k.ack(g);
        }
        Ok(())
    }

    /// Find the #PF handler through the guest's IDT, read the syscall MSRs, pick a
    /// free debug-register slot; then kick the other vCPUs so they arm theirs.
    fn arm_pf_hook(&mut self, ctx: &mut ExitCtx) -> Result<(), VcpuError> {
        let Some(mem) = ctx.memory.clone() else {
            return Ok(());
        };
        let e = |e| VcpuError::Registers(self.index, e);
        // The ioctl, not SYNC_REGS: before the first KVM_RUN those are not filled in.
        let sregs = self.fd.get_sregs().map_err(e)?;
        let mut msrs = kvm_bindings::Msrs::from_entries(&[
            kvm_bindings::kvm_msr_entry {
                index: crate::pvm::MSR_STAR,
                ..Default::default()
            },
            kvm_bindings::kvm_msr_entry {
                index: crate::pvm::MSR_LSTAR,
                ..Default::default()
            },
            kvm_bindings::kvm_msr_entry {
                index: crate::pvm::MSR_SFMASK,
                ..Default::default()
            },
        ])
        .expect("three MSRs fit");
        let n = self.fd.get_msrs(&mut msrs).map_err(e)?;
        let m = msrs.as_slice();
        let base = ctx
            .traps
            .as_ref()
            .map(|t| t.guest_debug())
            .unwrap_or_default();
        let hook = (n == 3)
            .then(|| crate::pvm::SyscallMsrs {
                star: m[0].data,
                lstar: m[1].data,
                sfmask: m[2].data,
            })
            .and_then(|msrs| crate::pvm::locate_pf_hook(mem.as_ref(), &sregs, msrs, &base));
        match hook {
            Some(h) => {
                tracing::info!(
                    vcpu = self.index,
                    handler = format_args!("{:#x}", h.handler),
                    lstar = format_args!("{:#x}", h.msrs.lstar),
                    slot = h.slot,
                    skip = h.skip,
                    "PVM: #PF handler breakpoint armed"
                );
                ctx.pf_hook = Some(h);
                if let Some(k) = &ctx.kicker {
                    k.kick();
                }
            }
            None => {
                return Err(VcpuError::PfHook(self.index));
            }
        }
        Ok(())
    }

    /// At the #PF handler breakpoint: complete a stuck `syscall` entry, or let the
    /// handler run.
    fn on_pf_hook(&mut self, ctx: &mut ExitCtx) -> Result<(), VcpuError> {
        let (Some(hook), Some(mem)) = (ctx.pf_hook, ctx.memory.clone()) else {
            return Ok(());
        };
        let sync = self.fd.sync_regs();
        let (regs, mut sregs) = (sync.regs, sync.sregs);
        let frame = crate::pvm::read_pf_frame(mem.as_ref(), sregs.cr3, regs.rsp)
            .ok_or(VcpuError::PfFrame(self.index, regs.rsp))?;
        match crate::pvm::decide_pf(&frame, &hook) {
            crate::pvm::PfDecision::SyscallEntry => {
                let (r, cs, ss) = crate::pvm::complete_syscall_entry(&regs, &frame, &hook.msrs);
                if ctx.stats.syscall_entries == 0 {
                    tracing::info!(
                        vcpu = self.index,
                        rcx = format_args!("{:#x}", regs.rcx),
                        r11 = format_args!("{:#x}", regs.r11),
                        rax = regs.rax,
                        user_rsp = format_args!("{:#x}", frame.rsp),
                        after_syscall =
                            crate::pvm::follows_syscall(mem.as_ref(), sregs.cr3, regs.rcx),
                        "PVM: first user syscall entry completed"
                    );
                }
                sregs.cs = cs;
                sregs.ss = ss;
                let sync = self.fd.sync_regs_mut();
                sync.regs = r;
                sync.sregs = sregs;
                self.fd.set_sync_dirty_reg(SyncReg::Register);
                self.fd.set_sync_dirty_reg(SyncReg::SystemRegister);
                ctx.stats.syscall_entries += 1;
            }
            crate::pvm::PfDecision::PassThrough {
                resume_rip: Some(rip),
            } => {
                self.fd.sync_regs_mut().regs.rip = rip;
                self.fd.set_sync_dirty_reg(SyncReg::Register);
                ctx.stats.page_faults_passed += 1;
            }
            crate::pvm::PfDecision::PassThrough { resume_rip: None } => {
                let mut step = self.wanted_debug(ctx);
                step.debugreg[7] = crate::trap::debugreg::dr7_disable(step.debugreg[7], hook.slot);
                step.control |= kvm_bindings::KVM_GUESTDBG_SINGLESTEP;
                self.set_guest_debug(step)?;
                ctx.stepping = true;
                self.debug_generation = None;
                ctx.stats.page_faults_passed += 1;
            }
        }
        Ok(())
    }

    /// Enter the guest once and classify the exit.
    pub fn run_once(&mut self, ctx: &mut ExitCtx) -> Result<ExitAction, VcpuError> {
        let index = self.index;
        if !ctx.stepping {
            self.sync_guest_debug(ctx)?;
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
                // Only kicks interrupt KVM_RUN: a cheap sample of where the guest is.
                tracing::debug!(
                    vcpu = index,
                    rip = format_args!("{:#x}", self.fd.sync_regs().regs.rip),
                    "kicked"
                );
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

    /// The error for an emulation failure nobody can complete, with the bytes at RIP.
    fn uncompleted(&self, ctx: &ExitCtx, rip: u64) -> VcpuError {
        let sync = self.fd.sync_regs();
        let bytes = ctx
            .memory
            .as_ref()
            .and_then(|m| complete::fetch_n(m.as_ref(), &sync.regs, &sync.sregs, 15))
            .map(|b| {
                b.iter()
                    .map(|x| format!("{x:02x}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        VcpuError::Uncompleted {
            vcpu: self.index,
            rip,
            cs: sync.sregs.cs.selector,
            bytes,
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
                ctx.stats.completed_int3 += 1;
                Ok(true)
            }
            Some(complete::Completion::Skip { resume_rip, rflags }) => {
                if insn.first() == Some(&complete::FWAIT) {
                    ctx.stats.completed_fwait += 1;
                } else {
                    ctx.stats.completed_clac_stac += 1;
                }
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
                    // Outside KVM_RUN until it syncs again: no arm waits for it.
                    if let Some(k) = &ctx.kicker {
                        k.ack(crate::machine::ACK_OUTSIDE);
                    }
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
                Err(VcpuError::InternalError {
                    suberror: complete::SUBERROR_EMULATION,
                    rip,
                    ..
                }) if ctx.memory.is_some() => return Err(self.uncompleted(ctx, rip)),
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
                ExitAction::PageFaultHook => self.on_pf_hook(ctx)?,
                ExitAction::Stop(reason) => return Ok(reason),
            }
            // An arm or disarm during this exit (the arm point, an observer) must reach
            // every vCPU, halted ones too.
            // Debug registers are per vCPU: this vCPU's guest waits until the others
            // hold the new probes too, or a hit there right after the arm is missed
            // (memory patches need no wait: every vCPU sees them at once).
            if let (Some(t), Some(k)) = (&ctx.traps, &ctx.kicker) {
                let g = t.generation();
                if k.kick_if_moved(g) && t.kind() == TrapKind::DebugRegs {
                    k.ack(crate::machine::ACK_OUTSIDE);
                    k.kick_and_wait(g, crate::machine::ARM_BARRIER_TIMEOUT);
                }
            }
        }
    }
}
