//! \[1\] `handle_exit`: one vCPU exit in, one [`ExitAction`] out. Touches no fd, so tests
//! feed it hand-built `VcpuExit` values.

use crate::arm_point::ARM_POINT_PROBE;
use crate::devices::{DevicesError, PioBus, PioEffect};
use crate::layout::{PROBE_PORT, TEST_REPORT_PORT};
use crate::trap::debugreg::dr6_single_step;
use crate::trap::{TrapBackend, TrapExit, TrapHit};
use kvm_ioctls::VcpuExit;
use std::sync::Arc;

/// Why the guest (or this vCPU) stopped running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum StopReason {
    /// The guest wrote the reset command to the i8042.
    Reset,
    /// `hlt` with no interrupt controller to wake the vCPU.
    Hlt,
    /// Triple fault (`KVM_EXIT_SHUTDOWN`).
    Shutdown,
    /// The VMM asked the vCPU to stop.
    Stopped,
    /// `KVM_EXIT_SYSTEM_EVENT` of this type (shutdown, reset, crash).
    SystemEvent(u32),
}

/// What the run loop does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitAction {
    /// Enter the guest again.
    Continue,
    /// A probe was hit: read registers, tell the owner, maybe step over, continue.
    Hit(TrapHit),
    /// The single-step over a hit finished.
    StepDone,
    /// A test guest reported a value on [`TEST_REPORT_PORT`].
    Report(u32),
    /// The guest's #PF handler was entered (PVM compatibility's breakpoint): look at
    /// the frame, complete a stuck `syscall` entry or pass the fault on.
    PageFaultHook,
    /// The run ended.
    Stop(StopReason),
}

/// Why an exit could not be handled.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum ExitError {
    /// KVM could not emulate a guest instruction (KVM_EXIT_INTERNAL_ERROR)
    InternalError,
    /// KVM failed to enter the guest (hardware reason {0:#x}, cpu {1})
    FailEntry(u64, u32),
    /// debug exit at {pc:#x} with DR6 {dr6:#x} matches no armed probe
    UnexpectedDebug {
        /// RIP at the exit.
        pc: u64,
        /// DR6 at the exit.
        dr6: u64,
    },
    /// unexpected vCPU exit: {0}
    Unexpected(&'static str),
    /// a device failed
    Device(#[source] DevicesError),
}

/// Counters the handler keeps (hot paths count, they do not log).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExitStats {
    /// Exits handled.
    pub exits: u64,
    /// Probe hits recognised.
    pub hits: u64,
    /// Exits on the probe port that matched no armed probe (disarmed patched sites).
    pub stale_probe_exits: u64,
    /// Port accesses with no device behind them.
    pub unclaimed_pio: u64,
    /// Instructions the VMM finished for KVM (all kinds below together).
    pub completed: u64,
    /// Of those: kernel-mode `int3` delivered as an injected #BP.
    pub completed_int3: u64,
    /// Of those: `fwait` skipped.
    pub completed_fwait: u64,
    /// Of those: `clac` / `stac` done on RFLAGS.AC.
    pub completed_clac_stac: u64,
    /// User-mode `syscall` entries completed by the VMM (PVM compatibility).
    pub syscall_entries: u64,
    /// Hits of the #PF handler breakpoint that were real page faults, passed on.
    pub page_faults_passed: u64,
}

/// What `handle_exit` may look at and change: no fd, only data.
#[derive(Debug)]
pub struct ExitCtx {
    /// The port-I/O devices.
    pub bus: PioBus,
    /// The armed trap backend, if any.
    pub traps: Option<Arc<dyn TrapBackend>>,
    /// RIP at this exit (from SYNC_REGS); the run loop sets it before each call.
    pub rip: u64,
    /// True while the run loop single-steps over a hit.
    pub stepping: bool,
    /// Counters.
    pub stats: ExitStats,
    /// Set from outside to make the run loop stop at its next exit.
    pub stop: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// Where the run loop parks while the guest is paused.
    pub gate: Option<Arc<dyn crate::vcpu::PauseGate>>,
    /// Guest memory, for finishing instructions KVM failed to emulate
    /// (`vcpu::complete`); `None` leaves such failures as errors.
    pub memory: Option<Arc<crate::memory::KvmMemory>>,
    /// PVM compatibility state shared by the machine's vCPUs (`None`: off).
    pub pvm: Option<Arc<crate::pvm::PvmShared>>,
    /// This vCPU's #PF handler breakpoint, once armed.
    pub pf_hook: Option<crate::pvm::PfHook>,
    /// Interrupts every vCPU's `KVM_RUN` (to make them all arm the hook).
    pub kicker: Option<crate::machine::Kicker>,
}

impl ExitCtx {
    /// A context over `bus` with `traps`.
    pub fn new(bus: PioBus, traps: Option<Arc<dyn TrapBackend>>) -> Self {
        Self {
            bus,
            traps,
            rip: 0,
            stepping: false,
            stats: ExitStats::default(),
            stop: None,
            gate: None,
            memory: None,
            pvm: None,
            pf_hook: None,
            kicker: None,
        }
    }

    /// True when a stop was requested.
    pub fn stop_requested(&self) -> bool {
        self.stop
            .as_ref()
            .is_some_and(|s| s.load(std::sync::atomic::Ordering::SeqCst))
    }

    fn recognise(&self, exit: TrapExit) -> Option<TrapHit> {
        self.traps.as_ref().and_then(|t| t.recognise(exit))
    }
}

/// Decide what one exit means.
pub fn handle_exit(exit: VcpuExit<'_>, ctx: &mut ExitCtx) -> Result<ExitAction, ExitError> {
    ctx.stats.exits += 1;
    match exit {
        VcpuExit::IoOut(PROBE_PORT, _) => match ctx.recognise(TrapExit::ProbePort { rip: ctx.rip })
        {
            Some(hit) => {
                ctx.stats.hits += 1;
                Ok(ExitAction::Hit(hit))
            }
            None => {
                ctx.stats.stale_probe_exits += 1;
                Ok(ExitAction::Continue)
            }
        },
        VcpuExit::IoOut(TEST_REPORT_PORT, data) => {
            let mut v = [0u8; 4];
            let n = data.len().min(4);
            v[..n].copy_from_slice(&data[..n]);
            Ok(ExitAction::Report(u32::from_le_bytes(v)))
        }
        VcpuExit::IoOut(port, data) => {
            match ctx.bus.write(port, data).map_err(ExitError::Device)? {
                Some(PioEffect::Reset) => Ok(ExitAction::Stop(StopReason::Reset)),
                Some(PioEffect::None) => Ok(ExitAction::Continue),
                None => {
                    ctx.stats.unclaimed_pio += 1;
                    Ok(ExitAction::Continue)
                }
            }
        }
        VcpuExit::IoIn(port, data) => {
            if !ctx.bus.read(port, data) {
                ctx.stats.unclaimed_pio += 1;
            }
            Ok(ExitAction::Continue)
        }
        VcpuExit::Debug(arch) => {
            if ctx.stepping && dr6_single_step(arch.dr6) {
                return Ok(ExitAction::StepDone);
            }
            if let Some(h) = ctx.pf_hook {
                if arch.dr6 & (1 << h.slot) != 0 && arch.pc == h.handler {
                    return Ok(ExitAction::PageFaultHook);
                }
            }
            match ctx.recognise(TrapExit::Debug {
                dr6: arch.dr6,
                pc: arch.pc,
            }) {
                // The probes were armed (or a stale breakpoint let through): nothing
                // to deliver; the run loop reloads the debug registers and kicks.
                Some(hit) if hit.probe == ARM_POINT_PROBE => Ok(ExitAction::Continue),
                Some(hit) => {
                    ctx.stats.hits += 1;
                    Ok(ExitAction::Hit(hit))
                }
                None => Err(ExitError::UnexpectedDebug {
                    pc: arch.pc,
                    dr6: arch.dr6,
                }),
            }
        }
        VcpuExit::Intr => Ok(ExitAction::Continue),
        VcpuExit::Hlt => Ok(ExitAction::Stop(StopReason::Hlt)),
        VcpuExit::Shutdown => Ok(ExitAction::Stop(StopReason::Shutdown)),
        VcpuExit::SystemEvent(kind, _) => Ok(ExitAction::Stop(StopReason::SystemEvent(kind))),
        VcpuExit::InternalError => Err(ExitError::InternalError),
        VcpuExit::FailEntry(reason, cpu) => Err(ExitError::FailEntry(reason, cpu)),
        VcpuExit::MmioRead(_, data) => {
            data.fill(0xff);
            ctx.stats.unclaimed_pio += 1;
            Ok(ExitAction::Continue)
        }
        VcpuExit::MmioWrite(..) => {
            ctx.stats.unclaimed_pio += 1;
            Ok(ExitAction::Continue)
        }
        VcpuExit::Exception => Err(ExitError::Unexpected("KVM_EXIT_EXCEPTION")),
        VcpuExit::Unknown => Err(ExitError::Unexpected("KVM_EXIT_UNKNOWN")),
        _ => Err(ExitError::Unexpected("unsupported exit reason")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::{Serial, SharedBuffer, I8042};
    use crate::layout::{I8042 as I8042_PORTS, I8042_COMMAND_PORT, SERIAL_COM1};
    use crate::trap::debugreg::DebugRegs;
    use crate::trap::patch::{PatchedSites, FENTRY_NOP, OUT_LEN};
    use crate::trap::Site;
    use kvm_bindings::kvm_debug_exit_arch;
    use ornament_engine::{Gpa, Gva, PhysMemory, ProbeId, SliceMemory};
    use std::sync::Mutex;

    fn ctx_with(traps: Option<Arc<dyn TrapBackend>>) -> (ExitCtx, SharedBuffer) {
        let out = SharedBuffer::default();
        let mut bus = PioBus::new();
        bus.insert(
            SERIAL_COM1,
            Arc::new(Mutex::new(Serial::new(Box::new(out.clone()), None))),
        )
        .expect("free");
        bus.insert(I8042_PORTS, Arc::new(Mutex::new(I8042::new())))
            .expect("free");
        (ExitCtx::new(bus, traps), out)
    }

    #[test]
    fn serial_output_reaches_the_writer() {
        let (mut ctx, out) = ctx_with(None);
        for b in b"ok\n" {
            let a =
                handle_exit(VcpuExit::IoOut(SERIAL_COM1.base, &[*b]), &mut ctx).expect("serial");
            assert_eq!(a, ExitAction::Continue);
        }
        assert_eq!(out.contents(), b"ok\n");
        let mut lsr = [0u8];
        handle_exit(VcpuExit::IoIn(SERIAL_COM1.base + 5, &mut lsr), &mut ctx).expect("lsr");
        assert_eq!(lsr[0] & 0x20, 0x20);
        assert_eq!(ctx.stats.exits, 4);
        assert_eq!(ctx.stats.unclaimed_pio, 0);
    }

    #[test]
    fn i8042_reset_stops() {
        let (mut ctx, _) = ctx_with(None);
        let a = handle_exit(VcpuExit::IoOut(I8042_COMMAND_PORT, &[0xfe]), &mut ctx).expect("i8042");
        assert_eq!(a, ExitAction::Stop(StopReason::Reset));
        let a = handle_exit(VcpuExit::IoOut(I8042_COMMAND_PORT, &[0xaa]), &mut ctx).expect("i8042");
        assert_eq!(a, ExitAction::Continue);
    }

    #[test]
    fn unclaimed_ports_and_reports() {
        let (mut ctx, _) = ctx_with(None);
        let mut b = [0u8; 2];
        assert_eq!(
            handle_exit(VcpuExit::IoIn(0x1234, &mut b), &mut ctx).expect("in"),
            ExitAction::Continue
        );
        assert_eq!(b, [0xff, 0xff]);
        assert_eq!(
            handle_exit(
                VcpuExit::IoOut(TEST_REPORT_PORT, &[0x78, 0x56, 0x34, 0x12]),
                &mut ctx
            )
            .expect("report"),
            ExitAction::Report(0x1234_5678)
        );
        assert_eq!(ctx.stats.unclaimed_pio, 1);
    }

    #[test]
    fn probe_port_exit_is_a_hit_only_at_an_armed_site() {
        let mem = SliceMemory::new(0x1000);
        mem.write_phys(Gpa(0x100), &FENTRY_NOP).expect("in range");
        let traps = Arc::new(PatchedSites::new());
        traps
            .arm(
                ProbeId(3),
                Site {
                    gva: Gva(0x100),
                    gpa: Gpa(0x100),
                },
                &mem,
            )
            .expect("armed");
        let (mut ctx, _) = ctx_with(Some(traps));
        ctx.rip = 0x100 + OUT_LEN;
        let a = handle_exit(VcpuExit::IoOut(PROBE_PORT, &[0]), &mut ctx).expect("probe");
        assert!(matches!(
            a,
            ExitAction::Hit(TrapHit {
                probe: ProbeId(3),
                step_over: None,
                ..
            })
        ));
        ctx.rip = 0x200;
        let a = handle_exit(VcpuExit::IoOut(PROBE_PORT, &[0]), &mut ctx).expect("probe");
        assert_eq!(a, ExitAction::Continue);
        assert_eq!((ctx.stats.hits, ctx.stats.stale_probe_exits), (1, 1));
    }

    #[test]
    fn debug_exits_by_dr6() {
        let mem = SliceMemory::new(0);
        let traps = Arc::new(DebugRegs::new());
        traps
            .arm(
                ProbeId(1),
                Site {
                    gva: Gva(0x5000),
                    gpa: Gpa(0x5000),
                },
                &mem,
            )
            .expect("slot 0");
        let (mut ctx, _) = ctx_with(Some(traps));
        let arch = |dr6, pc| kvm_debug_exit_arch {
            exception: 1,
            pad: 0,
            pc,
            dr6,
            dr7: 0x701,
        };
        let a = handle_exit(VcpuExit::Debug(arch(0xffff_0ff1, 0x5000)), &mut ctx).expect("hit");
        let ExitAction::Hit(hit) = a else {
            panic!("expected a hit, got {a:?}")
        };
        assert_eq!(hit.probe, ProbeId(1));
        assert_eq!(hit.step_over.map(|d| d.debugreg[7]), Some(0));
        // A single-step exit while stepping over.
        ctx.stepping = true;
        let a = handle_exit(VcpuExit::Debug(arch(0xffff_4ff0, 0x5005)), &mut ctx).expect("step");
        assert_eq!(a, ExitAction::StepDone);
        ctx.stepping = false;
        // DR6 naming a slot with nothing armed.
        let e = handle_exit(VcpuExit::Debug(arch(0xffff_0ff4, 0x6000)), &mut ctx)
            .expect_err("no probe");
        assert!(matches!(
            e,
            ExitError::UnexpectedDebug {
                pc: 0x6000,
                dr6: 0xffff_0ff4
            }
        ));
    }

    #[test]
    fn pf_handler_breakpoint_is_the_hook_not_a_probe() {
        let (mut ctx, _) = ctx_with(None);
        ctx.pf_hook = Some(crate::pvm::PfHook {
            handler: 0xffff_ffff_81c0_0be0,
            skip: 3,
            slot: 3,
            msrs: crate::pvm::SyscallMsrs::default(),
        });
        let arch = |dr6, pc| kvm_debug_exit_arch {
            exception: 1,
            pad: 0,
            pc,
            dr6,
            dr7: 0x7c0,
        };
        let a = handle_exit(
            VcpuExit::Debug(arch(0xffff_0ff8, 0xffff_ffff_81c0_0be0)),
            &mut ctx,
        )
        .expect("hook");
        assert_eq!(a, ExitAction::PageFaultHook);
        // Another slot at another address is no hook (and no probe is armed).
        assert!(handle_exit(VcpuExit::Debug(arch(0xffff_0ff1, 0x1000)), &mut ctx).is_err());
    }

    #[test]
    fn errors_and_stops() {
        let (mut ctx, _) = ctx_with(None);
        assert!(matches!(
            handle_exit(VcpuExit::InternalError, &mut ctx),
            Err(ExitError::InternalError)
        ));
        assert!(matches!(
            handle_exit(VcpuExit::FailEntry(0x21, 0), &mut ctx),
            Err(ExitError::FailEntry(0x21, 0))
        ));
        assert_eq!(
            handle_exit(VcpuExit::Hlt, &mut ctx).expect("hlt"),
            ExitAction::Stop(StopReason::Hlt)
        );
        assert_eq!(
            handle_exit(VcpuExit::Shutdown, &mut ctx).expect("shutdown"),
            ExitAction::Stop(StopReason::Shutdown)
        );
    }
}
