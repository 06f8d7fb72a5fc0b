//! \[2\] `QemuEngine`: a QEMU process behind ornament's `Engine` seam, with one of two trap
//! backends: ornament's TCG plugin (hits never stop the guest; held ones stop only their
//! vCPU; syscalls denied through guest memory) or QEMU's gdbstub breakpoints (every hit
//! stops the whole guest for milliseconds; observation only). Which backend, and why, is
//! chosen here too ([`choose_trap`]).

use crate::gdb::{GdbError, StopReply};
use crate::host::QemuInfo;
use crate::launch::QemuConfig;
use crate::machine::{ConsoleSink, MachineError, QemuMachine, RunOutcome, RunPaths};
use crate::plugin_link::{DenyConfig, PluginHit, PluginLink, PluginLinkError};
use crate::ram::RamFile;
use ornament_engine::wire::{RegMask, FILTER_BITS};
use ornament_engine::{
    Action, Capabilities, DenyAt, DenyOffsets, Engine, EngineError, EngineEvent, GuestExit,
    PhysMemory, ProbeHit, ProbeId, ProbeRequest, Regs, FENTRY_NOP,
};
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The plugin's file name.
pub const PLUGIN_SO: &str = "libornament_tcg_plugin.so";

/// How probes trap under QEMU, as asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrapChoice {
    /// The plugin where QEMU has plugin API v4 or later and the plugin is found, else
    /// the gdbstub.
    Auto,
    /// ornament's TCG plugin, or an error.
    Plugin,
    /// QEMU's gdbstub breakpoints.
    Gdbstub,
}

/// The trap backend chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trap {
    /// ornament's TCG plugin at this path.
    Plugin(PathBuf),
    /// QEMU's gdbstub breakpoints.
    Gdbstub,
}

/// Why the QEMU engine could not be set up.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum QemuEngineError {
    /// ORNAMENT_TCG_PLUGIN={0}: no such file
    PluginEnv(PathBuf),
    /// --trap plugin: {qemu} has TCG plugin API v{api}; ornament's plugin needs v4 (QEMU >= 10.0; on Debian 12: apt-get install -t bookworm-backports qemu-system-x86)
    PluginApi {
        /// The QEMU binary.
        qemu: PathBuf,
        /// Its plugin API version.
        api: u32,
    },
    /// --trap plugin: ornament's TCG plugin (libornament_tcg_plugin.so) was not found beside the ornament binary; build it with `cargo build -p ornament-tcg-plugin` or set ORNAMENT_TCG_PLUGIN
    PluginMissing,
    /// cannot open the plugin's socket
    Link(#[from] PluginLinkError),
    /// cannot start QEMU
    Machine(#[from] MachineError),
}

/// Where the TCG plugin library is: `$ORNAMENT_TCG_PLUGIN`, else beside the running
/// executable (cargo's target dir), else one up (cargo's `examples/`), else
/// `../lib/ornament/`.
pub fn find_plugin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ORNAMENT_TCG_PLUGIN") {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [
        dir.join(PLUGIN_SO),
        dir.join("..").join(PLUGIN_SO),
        dir.join("../lib/ornament").join(PLUGIN_SO),
    ]
    .into_iter()
    .find(|p| p.is_file())
}

/// Choose the trap backend for `choice` on this QEMU, and say why (a line for the user).
pub fn choose_trap(choice: TrapChoice, qemu: &QemuInfo) -> Result<(Trap, String), QemuEngineError> {
    let api = qemu.plugin_api.unwrap_or(0);
    if let Some(p) = std::env::var_os("ORNAMENT_TCG_PLUGIN") {
        if !Path::new(&p).is_file() {
            return Err(QemuEngineError::PluginEnv(PathBuf::from(p)));
        }
    }
    let so = find_plugin().filter(|p| p.is_file());
    Ok(match (choice, api >= 4, so) {
        (TrapChoice::Gdbstub, _, _) => (Trap::Gdbstub, "trap gdbstub (forced): every hit stops the guest and flushes QEMU's translation cache (milliseconds each)".to_owned()),
        (TrapChoice::Plugin, false, _) => {
            return Err(QemuEngineError::PluginApi {
                qemu: qemu.binary.clone(),
                api,
            })
        }
        (TrapChoice::Plugin, true, None) => return Err(QemuEngineError::PluginMissing),
        (TrapChoice::Auto, false, _) => (Trap::Gdbstub, format!("trap gdbstub: QEMU's plugin API is v{api} (the plugin needs v4, QEMU >= 10.0); every hit stops the guest (milliseconds each)")),
        (TrapChoice::Auto, true, None) => (Trap::Gdbstub, "trap gdbstub: libornament_tcg_plugin.so not found (cargo build -p ornament-tcg-plugin); every hit stops the guest (milliseconds each)".to_owned()),
        (_, true, Some(so)) => {
            let why = format!(
                "trap plugin ({}): QEMU {} offers plugin API v{api}; hits never stop the guest",
                so.display(),
                qemu.version_line
            );
            (Trap::Plugin(so), why)
        }
    })
}

/// How hits reach the engine.
enum Backend {
    /// ornament's TCG plugin over its socket.
    Plugin {
        link: Box<PluginLink>,
        /// Held hits waiting for their answer, by vCPU.
        held: HashMap<u32, PluginHit>,
        deny: Option<DenyConfig>,
        _dir: tempfile::TempDir,
    },
    /// QEMU's gdbstub breakpoints, resumed past the 5-byte fentry site.
    Gdbstub {
        by_addr: HashMap<u64, ProbeId>,
        seq: u64,
        /// Where the guest resumes after the hit being answered.
        resume_at: Option<u64>,
        /// A hit was delivered and not answered yet (the guest is stopped).
        awaiting: bool,
    },
}

/// A QEMU guest as an [`Engine`].
pub struct QemuEngine {
    machine: QemuMachine,
    ram: Arc<RamFile>,
    backend: Backend,
    /// A pause was asked for and has not completed.
    pausing: bool,
    /// The guest is paused (by [`Engine::pause`]), or not started yet.
    stopped: bool,
    /// Hits read after QEMU ended, still to deliver.
    tail: VecDeque<ProbeHit>,
    /// `Some` once the guest ended; `true` once that was reported.
    exited: Option<bool>,
}

impl std::fmt::Debug for QemuEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuEngine")
            .field("pausing", &self.pausing)
            .field("stopped", &self.stopped)
            .finish_non_exhaustive()
    }
}

impl QemuEngine {
    /// Start QEMU stopped before the guest's first instruction, with `trap`'s backend
    /// ready (the plugin connected). Call [`Engine::resume`] to run it.
    pub fn start(
        mut cfg: QemuConfig,
        paths: RunPaths,
        console: Option<ConsoleSink>,
        trap: &Trap,
    ) -> Result<Self, QemuEngineError> {
        let mut backend = match trap {
            Trap::Plugin(so) => {
                let dir = crate::machine::run_dir()?;
                let link = PluginLink::listen(&dir.path().join("plugin.sock"))?;
                cfg.plugin = Some((so.clone(), Vec::new()));
                Backend::Plugin {
                    link: Box::new(link),
                    held: HashMap::new(),
                    deny: None,
                    _dir: dir,
                }
            }
            Trap::Gdbstub => {
                cfg.plugin = None;
                Backend::Gdbstub {
                    by_addr: HashMap::new(),
                    seq: 0,
                    resume_at: None,
                    awaiting: false,
                }
            }
        };
        let link = match &mut backend {
            Backend::Plugin { link, .. } => Some(link.as_mut()),
            Backend::Gdbstub { .. } => None,
        };
        let machine = QemuMachine::start(cfg, paths, console, link)?;
        let ram = machine.ram();
        Ok(Self {
            machine,
            ram,
            backend,
            pausing: false,
            stopped: true,
            tail: VecDeque::new(),
            exited: None,
        })
    }

    /// The QEMU process, for what only QEMU has: its end ([`QemuMachine::early_end`]),
    /// its status report.
    pub fn machine(&mut self) -> &mut QemuMachine {
        &mut self.machine
    }

    /// Wait for QEMU to end and collect how it ended.
    pub fn finish(self) -> Result<RunOutcome, MachineError> {
        self.machine.finish()
    }

    fn pump_plugin(&mut self, timeout: Duration) -> Result<EngineEvent, EngineError> {
        let Backend::Plugin { link, held, .. } = &mut self.backend else {
            unreachable!("plugin backend");
        };
        match link.next_hit(timeout.min(Duration::from_millis(20))) {
            Ok(Some(h)) => {
                let hit = h.hit.clone();
                if hit.held {
                    held.insert(hit.vcpu, h);
                }
                return Ok(EngineEvent::Hit(Box::new(hit)));
            }
            Ok(None) | Err(PluginLinkError::Closed) => {}
            Err(e) => tracing::warn!(error = %e, "plugin link"),
        }
        if self.pausing {
            return match self.machine.gdb().wait_stop(Duration::from_millis(1)) {
                Ok(Some(StopReply::Exited(_) | StopReply::Terminated(_)))
                | Err(GdbError::Closed) => self.ended(),
                Ok(Some(_)) => {
                    self.pausing = false;
                    self.stopped = true;
                    Ok(EngineEvent::Paused)
                }
                Ok(None) => Ok(EngineEvent::Idle),
                Err(e) => Err(EngineError::backend(e)),
            };
        }
        match self.machine.poll_exit(Duration::from_millis(1)) {
            Ok(true) => self.ended(),
            Ok(false) => Ok(EngineEvent::Idle),
            Err(e) => Err(EngineError::backend(e)),
        }
    }

    /// QEMU ended: what the plugin sent before it went away comes first.
    fn ended(&mut self) -> Result<EngineEvent, EngineError> {
        if self.exited.is_none() {
            self.exited = Some(false);
            if let Backend::Plugin { link, .. } = &mut self.backend {
                while let Ok(Some(h)) = link.next_hit(Duration::from_millis(50)) {
                    let mut hit = h.hit;
                    // Nobody waits for an answer any more.
                    hit.held = false;
                    self.tail.push_back(hit);
                }
            }
        }
        if let Some(hit) = self.tail.pop_front() {
            return Ok(EngineEvent::Hit(Box::new(hit)));
        }
        self.exited = Some(true);
        Ok(EngineEvent::Exited(GuestExit::PowerOff))
    }

    fn pump_gdbstub(&mut self, timeout: Duration) -> Result<EngineEvent, EngineError> {
        let elapsed_ns = u64::try_from(self.machine.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let Backend::Gdbstub {
            by_addr,
            seq,
            resume_at,
            awaiting,
        } = &mut self.backend
        else {
            unreachable!("gdbstub backend");
        };
        if *awaiting {
            return Ok(EngineEvent::Idle);
        }
        let gdb = self.machine.gdb();
        if !gdb.is_running() {
            if self.pausing {
                self.pausing = false;
                self.stopped = true;
                return Ok(EngineEvent::Paused);
            }
            if self.stopped {
                return Ok(EngineEvent::Idle);
            }
            gdb.cont(resume_at.take()).map_err(EngineError::backend)?;
        }
        match gdb.wait_stop(timeout.min(Duration::from_millis(100))) {
            Ok(None) => Ok(EngineEvent::Idle),
            Ok(Some(StopReply::Exited(_) | StopReply::Terminated(_))) | Err(GdbError::Closed) => {
                self.ended()
            }
            Ok(Some(StopReply::Signal { vcpu, .. })) => {
                let vcpu = vcpu.unwrap_or(0);
                let regs = gdb.registers(vcpu).map_err(EngineError::backend)?;
                match by_addr.get(&regs.rip) {
                    Some(&probe) => {
                        *seq += 1;
                        *awaiting = true;
                        *resume_at = Some(regs.rip + FENTRY_NOP.len() as u64);
                        Ok(EngineEvent::Hit(Box::new(ProbeHit {
                            probe,
                            vcpu,
                            seq: *seq,
                            time_ns: elapsed_ns,
                            regs,
                            held: true,
                            mem: [None; ornament_engine::wire::MAX_MEM_READS],
                            bytes: None,
                        })))
                    }
                    None if self.pausing => {
                        self.pausing = false;
                        self.stopped = true;
                        Ok(EngineEvent::Paused)
                    }
                    None => {
                        tracing::debug!(rip = regs.rip, "stop outside a probe; resuming");
                        Ok(EngineEvent::Idle)
                    }
                }
            }
            Err(e) => Err(EngineError::backend(e)),
        }
    }

    /// The gdbstub resumes past a 5-byte fentry site: refuse any other.
    fn check_gdbstub_site(
        &self,
        probe: &ProbeRequest,
        cr3: u64,
        la57: bool,
    ) -> Result<(), EngineError> {
        let gpa = ornament_engine::paging::translate(&*self.ram, cr3, la57, probe.at).ok_or(
            EngineError::Unsupported("a probe address is not mapped in the kernel's page tables"),
        )?;
        let mut bytes = [0u8; 5];
        self.ram
            .read_phys(gpa, &mut bytes)
            .map_err(EngineError::backend)?;
        // Before ftrace has run at boot the site still holds `call __fentry__`, which is as
        // safe to skip: __fentry__ only returns.
        if bytes != FENTRY_NOP && bytes[0] != 0xe8 {
            tracing::warn!(symbol = %probe.symbol, at = %probe.at, ?bytes, "not a fentry site");
            return Err(EngineError::Unsupported(
                "the gdbstub backend resumes past a 5-byte fentry site (NOP or call __fentry__); every-syscall and deny probes need the plugin backend",
            ));
        }
        Ok(())
    }
}

/// The syscall numbers a probe's filter lets through (all of them without a filter).
fn filtered_numbers(probe: &ProbeRequest) -> Vec<u64> {
    match probe.capture.filter {
        None => (0..FILTER_BITS as u64).collect(),
        Some(_) => (0..FILTER_BITS as u64)
            .filter(|&v| probe.capture.filter_bits[(v / 64) as usize] & (1 << (v % 64)) != 0)
            .collect(),
    }
}

/// A link error of a call naming a probe, as the engine seam says it.
fn probe_error(e: PluginLinkError) -> EngineError {
    match e {
        PluginLinkError::NoSuchProbe(p) => EngineError::NoSuchProbe(p),
        e => EngineError::backend(e),
    }
}

impl Engine for QemuEngine {
    fn clock_origin(&self) -> std::time::SystemTime {
        // Each backend times its hits from its own start.
        match &self.backend {
            Backend::Plugin { link, .. } => link.clock_origin(),
            Backend::Gdbstub { .. } => self.machine.clock_origin(),
        }
    }

    fn capabilities(&self) -> Capabilities {
        match self.backend {
            Backend::Plugin { .. } => Capabilities {
                deny_at: DenyAt::Dispatcher,
                dispatcher_probes: true,
                captures_at_hit: true,
                pause: true,
                probe_windows: true,
            },
            Backend::Gdbstub { .. } => Capabilities {
                deny_at: DenyAt::Nowhere,
                dispatcher_probes: false,
                captures_at_hit: false,
                pause: true,
                probe_windows: false,
            },
        }
    }

    fn memory(&self) -> Arc<dyn PhysMemory> {
        self.ram.clone()
    }

    fn vcpu_count(&self) -> u32 {
        self.machine.vcpus()
    }

    fn registers(&mut self, vcpu: u32) -> Result<Regs, EngineError> {
        if self.machine.gdb().is_running() {
            return Err(EngineError::Unsupported(
                "registers are read while the guest is stopped",
            ));
        }
        self.machine
            .gdb()
            .registers(vcpu)
            .map_err(EngineError::backend)
    }

    fn arm(&mut self, probe: &ProbeRequest) -> Result<(), EngineError> {
        if matches!(self.backend, Backend::Gdbstub { .. }) {
            let regs = self.registers(0)?;
            self.check_gdbstub_site(
                probe,
                regs.cr3,
                regs.cr4 & ornament_engine::paging::CR4_LA57 != 0,
            )?;
        }
        match &mut self.backend {
            Backend::Plugin { link, deny, .. } => {
                let spec = match (probe.deny, deny) {
                    // The deny path needs its own spec: the registers and the current task
                    // it writes through (they cover what the session reads; it reads the
                    // rest from memory while held).
                    (true, Some(cfg)) => cfg.entry_spec(&filtered_numbers(probe), RegMask::NONE),
                    (true, None) => {
                        return Err(EngineError::Unsupported("a deny probe before enable_deny"))
                    }
                    (false, _) => probe.capture,
                };
                link.arm(probe.id, probe.at, spec)
                    .map_err(EngineError::backend)?;
                tracing::debug!(probe = ?probe.id, symbol = %probe.symbol, at = %probe.at, hold = spec.hold, "armed");
                Ok(())
            }
            Backend::Gdbstub { by_addr, .. } => {
                if probe.deny {
                    return Err(EngineError::Unsupported(
                        "the gdbstub backend cannot skip a syscall; --deny-syscall needs the plugin trap backend (QEMU >= 10.0)",
                    ));
                }
                self.machine
                    .gdb()
                    .breakpoint(probe.at.raw(), true)
                    .map_err(EngineError::backend)?;
                by_addr.insert(probe.at.raw(), probe.id);
                Ok(())
            }
        }
    }

    fn close_window(&mut self, probe: ProbeId) -> Result<(), EngineError> {
        match &mut self.backend {
            Backend::Plugin { link, .. } => link.close_window(probe).map_err(probe_error),
            Backend::Gdbstub { .. } => Err(EngineError::Unsupported("probe windows")),
        }
    }

    fn disarm(&mut self, probe: ProbeId) -> Result<(), EngineError> {
        match &mut self.backend {
            Backend::Plugin { link, .. } => link.disarm(probe).map_err(probe_error),
            Backend::Gdbstub { by_addr, .. } => {
                let at = by_addr
                    .iter()
                    .find(|(_, &id)| id == probe)
                    .map(|(&a, _)| a)
                    .ok_or(EngineError::NoSuchProbe(probe))?;
                by_addr.remove(&at);
                self.machine
                    .gdb()
                    .breakpoint(at, false)
                    .map_err(EngineError::backend)
            }
        }
    }

    fn enable_deny(&mut self, o: &DenyOffsets) -> Result<(), EngineError> {
        let ram = self.ram.clone();
        match &mut self.backend {
            Backend::Plugin { link, deny, .. } => {
                let cfg = *o;
                link.enable_deny(cfg, ram).map_err(EngineError::backend)?;
                *deny = Some(cfg);
                Ok(())
            }
            Backend::Gdbstub { .. } => Err(EngineError::Unsupported(
                "the gdbstub backend cannot skip a syscall; --deny-syscall needs the plugin trap backend (QEMU >= 10.0)",
            )),
        }
    }

    fn resume(&mut self) -> Result<(), EngineError> {
        self.stopped = false;
        self.pausing = false;
        match &self.backend {
            // The gdbstub backend continues in next_event, past the site of the last hit.
            Backend::Gdbstub { .. } => Ok(()),
            Backend::Plugin { .. } => self.machine.resume().map_err(EngineError::backend),
        }
    }

    fn pause(&mut self) -> Result<(), EngineError> {
        if self.stopped || self.pausing {
            return Ok(());
        }
        self.pausing = true;
        let gdb = self.machine.gdb();
        if gdb.is_running() {
            gdb.request_stop().map_err(EngineError::backend)?;
        }
        Ok(())
    }

    fn next_event(&mut self, timeout: Duration) -> Result<EngineEvent, EngineError> {
        match self.exited {
            Some(true) => return Err(EngineError::GuestGone),
            Some(false) => return self.ended(),
            None => {}
        }
        match self.backend {
            Backend::Plugin { .. } => self.pump_plugin(timeout),
            Backend::Gdbstub { .. } => self.pump_gdbstub(timeout),
        }
    }

    fn answer(&mut self, hit: &ProbeHit, action: Action) -> Result<(), EngineError> {
        if !hit.held {
            return Ok(());
        }
        match &mut self.backend {
            Backend::Plugin { link, held, .. } => {
                let Some(h) = held.remove(&hit.vcpu).filter(|h| h.hit.seq == hit.seq) else {
                    return Err(EngineError::Unsupported("answer to a hit that is not held"));
                };
                // A pause is the session's to apply to the whole guest; this vCPU goes on.
                let action = match action {
                    Action::PauseGuest => Action::Continue,
                    a => a,
                };
                link.answer(&h, action).map_err(EngineError::backend)
            }
            Backend::Gdbstub { awaiting, .. } => {
                *awaiting = false;
                if let Action::DenySyscall { .. } = action {
                    return Err(EngineError::Unsupported(
                        "the gdbstub backend cannot skip a syscall",
                    ));
                }
                Ok(())
            }
        }
    }

    fn stop(&mut self) {
        self.machine.kill();
    }
}
