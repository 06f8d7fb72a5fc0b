//! \[2\] [`LinuxEngine`]: a Linux guest on our VMM behind ornament's `Engine` seam, the
//! engine of `ornament run --engine kvm`. It boots the kernel with an initramfs (on PVM in
//! compatibility mode), holds every hit, denies a syscall by returning from its entry
//! function, pauses by parking every vCPU, and arms probes at its own safe point: once
//! the kernel has finished patching its text, before the first user process runs (the
//! arm point, [`crate::arm_point`], seen by the VMM itself; the console's `Run /init`
//! line only when no arm point is known).
//! The run ends when ornament's `/init` reports on ttyS1, when the kernel says it halted
//! or panicked, or when the guest stops by itself.

use crate::arm_point::{ArmFn, ArmPoint};
use crate::builder::{build_with_console, ConsoleOutput, MachineConfig};
use crate::devices::SharedBuffer;
use crate::engine::{Arming, DeferredArms, KvmEngine};
use crate::linux::{
    guest_stop, kernel_site, prepare, FixupCounts, InitWatch, LinuxRunError, LinuxStop, Prepared,
};
use crate::machine::RunControl;
use crate::trap::debugreg::DebugRegs;
use crate::trap::patch::PatchedSites;
use crate::trap::{TrapBackend, TrapKind};
use ornament_engine::report::last_exit_report;
use ornament_engine::{
    Action, Capabilities, Engine, EngineError, EngineEvent, Gva, PhysMemory, ProbeHit, ProbeId,
    ProbeRequest, Regs,
};
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What to boot.
pub struct LinuxBoot {
    /// ELF vmlinux (a bzImage works too, but on PVM its decompressor alone takes minutes).
    pub kernel: PathBuf,
    /// Initramfs (gzipped, or gzipped base + uncompressed overlay).
    pub initrd: Option<PathBuf>,
    /// Kernel command line (the kernel must run without KASLR: probes go at link-time
    /// addresses).
    pub cmdline: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest RAM in MiB.
    pub mem_size_mib: u32,
    /// Where the guest's console (ttyS0) goes.
    pub console: Box<dyn Write + Send>,
    /// PVM compatibility mode.
    pub pvm_compat: bool,
    /// System.map, to name an instruction the VMM cannot complete.
    pub system_map: Option<PathBuf>,
    /// Trap backend for probes ([`TrapKind::Int3`] is not offered).
    pub trap: TrapKind,
    /// The arm point (`kernel_execve` at its link-time address, see [`crate::arm_point`]):
    /// probes are armed when a vCPU first reaches it. `None`: at the console's
    /// `Run /init`, which a `quiet` kernel does not print.
    pub arm_point: Option<Gva>,
}

impl std::fmt::Debug for LinuxBoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinuxBoot")
            .field("kernel", &self.kernel)
            .field("initrd", &self.initrd)
            .field("cmdline", &self.cmdline)
            .field("vcpus", &self.vcpus)
            .field("pvm_compat", &self.pvm_compat)
            .field("trap", &self.trap)
            .finish_non_exhaustive()
    }
}

/// How a Linux run on our VMM ended.
#[derive(Debug, Clone, PartialEq)]
pub struct LinuxEnd {
    /// `N` of `/init`'s `ornament-exit N` on ttyS1: the guest's word, a cross-check.
    pub guest_status: Option<i32>,
    /// How it ended.
    pub stop: LinuxStop,
    /// The VMM's completions (PVM).
    pub fixups: FixupCounts,
    /// From start to the console's `Run /init`.
    pub boot_to_init: Option<Duration>,
    /// The whole run.
    pub wall: Duration,
}

/// A Linux guest on our VMM as an [`Engine`].
pub struct LinuxEngine {
    engine: KvmEngine,
    arms: Arc<DeferredArms>,
    control: Arc<RunControl>,
    ended: Arc<Mutex<Option<LinuxStop>>>,
    boot_to_init: Arc<Mutex<Option<Duration>>>,
    serial2: SharedBuffer,
    /// Why this engine stopped the guest, when it did.
    stopped_for: Option<LinuxStop>,
    system_map: Option<PathBuf>,
    start: Instant,
    _prepared: Prepared,
}

impl std::fmt::Debug for LinuxEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinuxEngine")
            .field("engine", &self.engine)
            .field("stopped_for", &self.stopped_for)
            .finish_non_exhaustive()
    }
}

impl LinuxEngine {
    /// Build the machine, ready to run (call [`Engine::resume`]; arm probes before).
    pub fn boot(cfg: LinuxBoot) -> Result<Self, LinuxRunError> {
        let traps: Arc<dyn TrapBackend> = match cfg.trap {
            TrapKind::DebugRegs => Arc::new(DebugRegs::skipping_nops()),
            TrapKind::PatchedSite => Arc::new(PatchedSites::new()),
            TrapKind::Int3 => return Err(LinuxRunError::Int3Backend),
        };
        let prepared = prepare(&cfg.cmdline, cfg.initrd.as_ref(), cfg.pvm_compat)?;
        let mc = MachineConfig {
            kernel: cfg.kernel.clone(),
            initrd: prepared.initrd.clone(),
            cmdline: prepared.cmdline.clone(),
            vcpu_count: cfg.vcpus,
            mem_size_mib: cfg.mem_size_mib,
            console: ConsoleOutput::Capture,
            pvm_compat: cfg.pvm_compat,
        };
        let start = Instant::now();
        let arms = DeferredArms::new(traps.clone(), |gva| kernel_site(gva.raw()));
        let ended = Arc::new(Mutex::new(None));
        let boot_to_init = Arc::new(Mutex::new(None));
        let reach = {
            let arms = arms.clone();
            Box::new(move || arms.reach()) as ArmFn
        };
        // The probes are armed on `traps` itself; the machine runs with the arm point's
        // breakpoint around it.
        let (machine_traps, console_arm) = match cfg.arm_point {
            Some(at) => (
                Arc::new(ArmPoint::new(traps.clone(), at, reach)) as Arc<dyn TrapBackend>,
                None,
            ),
            None => {
                tracing::warn!("no arm point: probes are armed at the console's `Run /init`, which `quiet` hides");
                (traps.clone(), Some(reach))
            }
        };
        let tee = InitWatch::new(
            start,
            ended.clone(),
            boot_to_init.clone(),
            None,
            console_arm,
            // Line ends as under QEMU: the person reading stderr sees one console.
            Box::new(ornament_engine::console::CrlfToLf::new(cfg.console)),
        );
        let m = build_with_console(&mc, Some(Box::new(tee)), None).map_err(LinuxRunError::Build)?;
        let serial2 = m.serial2.clone();
        let control = Arc::new(RunControl::new());
        let engine = KvmEngine::start_with(
            m,
            machine_traps,
            true,
            control.clone(),
            Arming::Deferred(arms.clone()),
        )
        .map_err(LinuxRunError::Engine)?;
        Ok(Self {
            engine,
            arms,
            control,
            ended,
            boot_to_init,
            serial2,
            stopped_for: None,
            system_map: cfg.system_map,
            start,
            _prepared: prepared,
        })
    }

    /// Stop the guest once `/init` has reported, the kernel said it is done, or a probe
    /// could not be armed.
    fn check_end(&mut self) {
        if self.stopped_for.is_some() {
            return;
        }
        let why = if last_exit_report(&self.serial2.contents()).is_some() {
            Some(LinuxStop::Reported)
        } else if let Some(e) = self.arms.error() {
            tracing::error!(error = %e, "arming failed; stopping the guest");
            Some(LinuxStop::Stopped)
        } else {
            *self.ended.lock().unwrap_or_else(|p| p.into_inner())
        };
        if let Some(why) = why {
            self.stopped_for = Some(why);
            self.control.request_stop();
        }
    }

    /// How the run ended (after [`EngineEvent::Exited`], or after [`Engine::stop`]).
    pub fn finish(&mut self) -> Result<LinuxEnd, LinuxRunError> {
        if let Some(e) = self.arms.error() {
            return Err(LinuxRunError::ArmFailed(e));
        }
        let outcomes = match self.engine.take_outcomes() {
            Some(o) => o.map_err(LinuxRunError::Machine)?,
            None => Vec::new(),
        };
        let guest = guest_stop(&outcomes, self.system_map.as_deref())?;
        let stop = match (self.stopped_for, guest) {
            (Some(LinuxStop::Reported), _) => LinuxStop::Reported,
            (_, Some(r)) => LinuxStop::Guest(r),
            (Some(w), None) => w,
            (None, None) => LinuxStop::Stopped,
        };
        Ok(LinuxEnd {
            guest_status: last_exit_report(&self.serial2.contents()),
            stop,
            fixups: FixupCounts::from_stats(outcomes.iter().map(|o| &o.stats)),
            boot_to_init: *self.boot_to_init.lock().unwrap_or_else(|p| p.into_inner()),
            wall: self.start.elapsed(),
        })
    }
}

impl Engine for LinuxEngine {
    fn clock_origin(&self) -> std::time::SystemTime {
        self.engine.clock_origin()
    }

    fn capabilities(&self) -> Capabilities {
        self.engine.capabilities()
    }

    fn memory(&self) -> Arc<dyn PhysMemory> {
        self.engine.memory()
    }

    fn vcpu_count(&self) -> u32 {
        self.engine.vcpu_count()
    }

    fn registers(&mut self, vcpu: u32) -> Result<Regs, EngineError> {
        self.engine.registers(vcpu)
    }

    fn arm(&mut self, probe: &ProbeRequest) -> Result<(), EngineError> {
        self.engine.arm(probe)
    }

    fn disarm(&mut self, probe: ProbeId) -> Result<(), EngineError> {
        self.engine.disarm(probe)
    }

    fn resume(&mut self) -> Result<(), EngineError> {
        self.engine.resume()
    }

    fn pause(&mut self) -> Result<(), EngineError> {
        self.engine.pause()
    }

    fn next_event(&mut self, timeout: Duration) -> Result<EngineEvent, EngineError> {
        self.check_end();
        self.engine
            .next_event(timeout.min(Duration::from_millis(50)))
    }

    fn answer(&mut self, hit: &ProbeHit, action: Action) -> Result<(), EngineError> {
        self.engine.answer(hit, action)
    }

    fn stop(&mut self) {
        self.stopped_for.get_or_insert(LinuxStop::Stopped);
        self.engine.stop();
    }
}
