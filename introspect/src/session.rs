//! A watch session: one ordered list of ornaments, told of every fork, exec, exit and
//! syscall entry of a guest and able to act, over whatever engine runs the guest.
//!
//! ```text
//! Session::new(engine caps, profile, layout, WatchConfig)   probes placed for this engine
//!   .attach(ornament)...                                    in delivery order
//!   .arm(engine)                                            ProbeRequests (+ deny offsets)
//!   .run(engine, limits)    engine hit -> monitor (task read, event) -> ornaments
//!                           -> Action back to the held vCPU; pause/resume by ornaments
//!                           or through Control
//!   .finish()                                               ornaments told the run is over
//! ```
//!
//! Nothing here knows how an engine traps: deny, pause and control are written once, here,
//! and work on every engine that offers them ([`ornament_engine::Capabilities`]).

pub mod capture;
pub mod scope;

use crate::kaslr::KernelLayout;
use crate::monitor::{HitOutcome, Monitor, MonitorError, MonitorStats};
use crate::ornament::{Ornament, OrnamentHandle, Registry};
use crate::probes::{ProbeSet, ProbesError, SyscallWatch, WatchConfig};
use crate::profile::{Profile, ProfileError};
use ornament_engine::{
    Action, Capabilities, DenyAt, Engine, EngineError, EngineEvent, GuestExit, ProbeHit, ProbeId,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use scope::{scoped, OnlyPid, PauseOnExec, Scope};

/// Why a session could not start or ended early.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum SessionError {
    /// the probes cannot be placed
    Probes(#[from] ProbesError),
    /// the profile lacks what a probe needs
    Profile(#[from] ProfileError),
    /// the monitor cannot start
    Monitor(#[from] MonitorError),
    /// {0}
    Unsupported(String),
    /// probe {symbol} at {at}
    Arm {
        /// The probe's function.
        symbol: String,
        /// Its address.
        at: ornament_engine::Gva,
        /// What the engine said.
        #[source]
        source: EngineError,
    },
    /// the engine failed
    Engine(#[from] EngineError),
    /// interrupted
    Interrupted,
    /// the guest did not finish within {0:?}
    Timeout(Duration),
}

/// Pause and resume requests from outside the run (a control socket), and whether the
/// guest is paused now. Shared; the session polls it between events.
#[derive(Debug, Default)]
pub struct Control {
    /// The guest is stopped by an ornament's (or a request's) pause.
    pub paused: AtomicBool,
    /// Someone asked to pause the guest.
    pub pause_requested: AtomicBool,
    /// Someone asked to resume a paused guest.
    pub resume_requested: AtomicBool,
}

/// Something a person watching the run should be told as it happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    /// The guest is paused: by an ornament (`true`) or a control request.
    Paused {
        /// An ornament asked for it.
        by_ornament: bool,
    },
    /// The guest runs again.
    Resumed,
}

/// When to give up on a run.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Set from outside (Ctrl-C, a failed event output): the guest is stopped.
    pub stop: Arc<AtomicBool>,
    /// Most wall time for the run.
    pub timeout: Option<Duration>,
}

/// One watch session.
pub struct Session {
    monitor: Monitor,
    caps: Capabilities,
    profile: Arc<Profile>,
    layout: KernelLayout,
    exec_acts: bool,
    control: Arc<Control>,
    notice: Option<Box<dyn FnMut(Notice) + Send>>,
    paused_by_ornament: bool,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("caps", &self.caps)
            .field("ornaments", &self.monitor.registry().names())
            .finish_non_exhaustive()
    }
}

impl Session {
    /// A session for the kernel of `profile` (moved by `layout`) on `engine`, watching
    /// what `cfg` asks. Probes go where this engine can trap and deny; what it cannot do
    /// is refused here, before the guest runs on.
    pub fn new(
        engine: &dyn Engine,
        profile: Arc<Profile>,
        layout: KernelLayout,
        cfg: &WatchConfig,
    ) -> Result<Self, SessionError> {
        let caps = engine.capabilities();
        let mut cfg = cfg.clone();
        if !cfg.deny.is_empty() || !cfg.may_deny.is_empty() {
            match caps.deny_at {
                DenyAt::Dispatcher => cfg.deny_at_entry = false,
                DenyAt::FunctionEntry => cfg.deny_at_entry = true,
                DenyAt::Nowhere => {
                    return Err(SessionError::Unsupported(
                        "this engine cannot deny syscalls (QEMU's gdbstub backend): use the TCG plugin (QEMU >= 10.0) or --engine kvm".into(),
                    ))
                }
            }
        }
        if cfg.results && !(caps.dispatcher_probes && caps.captures_at_hit && caps.probe_windows) {
            // syscall_exit_to_user_mode has no fentry site, and runs at every syscall: only
            // an engine that traps any instruction and filters at the hit can afford it.
            cfg.results = false;
            let what = "syscall results (syscall_return events) and failed execs (exec_failed events) need an engine that traps syscall_exit_to_user_mode and filters at the hit (--engine qemu with the TCG plugin)";
            if cfg.syscalls == SyscallWatch::None {
                tracing::info!("{what}");
            } else {
                tracing::warn!("{what}: this run reports syscall entries only");
            }
        }
        let probes = ProbeSet::new(&profile, layout, &cfg)?;
        if !caps.dispatcher_probes {
            if let Some(s) = probes.specs().iter().find(|s| s.symbol == "do_syscall_64") {
                return Err(SessionError::Unsupported(format!(
                    "this engine traps only fentry sites, and {} (every syscall, or a syscall without its own __x64_sys_ function) has none: name the syscalls (--watch syscall=NAME,...) or use --engine qemu",
                    s.symbol
                )));
            }
        }
        let mut monitor = Monitor::new(engine.memory(), profile.clone(), layout, probes)?;
        monitor.set_lineage(crate::lineage::Lineage::with_origin(
            crate::lineage::RunInfo::new(),
            engine.clock_origin(),
        ));
        Ok(Self {
            monitor,
            caps,
            profile,
            layout,
            exec_acts: false,
            control: Arc::new(Control::default()),
            notice: None,
            paused_by_ornament: false,
        })
    }

    /// Attach an ornament after those attached before (it sees what they decided).
    pub fn attach(&mut self, ornament: Box<dyn Ornament>) -> OrnamentHandle {
        self.monitor.registry_mut().attach(ornament)
    }

    /// The ornaments.
    pub fn registry(&self) -> &Registry {
        self.monitor.registry()
    }

    /// The kernel profile the session reads the guest with.
    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// The probes placed.
    pub fn probes(&self) -> &ProbeSet {
        self.monitor.probes()
    }

    /// Hold exec hits so an ornament can pause the guest before the new program runs
    /// (`PauseOnExec`); costs a held vCPU per exec on engines that capture at the hit.
    pub fn set_exec_acts(&mut self, on: bool) {
        self.exec_acts = on;
    }

    /// Pause and resume from outside.
    pub fn control(&self) -> Arc<Control> {
        self.control.clone()
    }

    /// Be told of pauses and resumes as they happen.
    pub fn on_notice(&mut self, f: impl FnMut(Notice) + Send + 'static) {
        self.notice = Some(Box::new(f));
    }

    /// The run the events are stamped with (its id and host).
    pub fn run_info(&self) -> &crate::lineage::RunInfo {
        self.monitor.run_info()
    }

    /// Stamp events with `lineage` (a given run or clock) from now on.
    pub fn set_lineage(&mut self, lineage: crate::lineage::Lineage) {
        self.monitor.set_lineage(lineage);
    }

    /// What the monitor counted.
    pub fn stats(&self) -> MonitorStats {
        self.monitor.stats()
    }

    /// Arm every probe on `engine` (the guest is stopped, or not started).
    pub fn arm(&self, engine: &mut dyn Engine) -> Result<(), SessionError> {
        let probes = self.monitor.probes();
        if !probes.deniable().is_empty() && self.caps.deny_at == DenyAt::Dispatcher {
            engine.enable_deny(&capture::deny_offsets(&self.profile, self.layout)?)?;
        }
        for spec in probes.specs() {
            let req = capture::request(spec, probes, &self.profile, self.caps, self.exec_acts)?;
            engine.arm(&req).map_err(|source| SessionError::Arm {
                symbol: spec.symbol.clone(),
                at: spec.at,
                source,
            })?;
            // Placed (an engine that translates code knows the address from the start)
            // but off until its window opens (the engine arms it: `ArmSpec::window`).
            if !spec.armed_at_start() {
                engine.disarm(spec.id)?;
            }
            tracing::debug!(probe = ?spec.id, symbol = %spec.symbol, at = %spec.at, hold = req.capture.hold, deny = req.deny, armed = spec.armed_at_start(), "armed");
        }
        Ok(())
    }

    /// Close the window parts the monitor found left open (tasks that exited inside).
    fn close_windows(&self, engine: &mut dyn Engine, close: &[ProbeId]) {
        for &id in close {
            if let Err(e) = engine.close_window(id) {
                tracing::warn!(probe = ?id, error = %e, "closing a probe window failed");
            }
        }
    }

    /// One hit through the monitor and the ornaments: the action for its vCPU, and whether
    /// an ornament asked to pause the whole guest.
    pub fn deliver(&mut self, hit: &ProbeHit) -> (Action, bool) {
        let (action, pause, _) = self.deliver_outcome(hit);
        (action, pause)
    }

    fn deliver_outcome(&mut self, hit: &ProbeHit) -> (Action, bool, HitOutcome) {
        let out = self.monitor.on_hit(hit);
        let pause = out.pause || out.action == Action::PauseGuest;
        let action = match out.action {
            // The pause is applied to the whole guest; this vCPU just goes on.
            Action::PauseGuest => Action::Continue,
            a => a,
        };
        (action, pause, out)
    }

    /// Run the guest to its end, delivering every hit: held hits are decided and answered
    /// at once; pauses asked for by an ornament or through [`Control`] stop the whole
    /// guest until a resume request. The guest is stopped when `limits` say so.
    pub fn run(
        &mut self,
        engine: &mut dyn Engine,
        limits: &Limits,
    ) -> Result<GuestExit, SessionError> {
        let begin = Instant::now();
        engine.resume()?;
        loop {
            if limits.stop.load(Ordering::Relaxed) {
                engine.stop();
                return Err(SessionError::Interrupted);
            }
            if let Some(t) = limits.timeout {
                if begin.elapsed() > t {
                    engine.stop();
                    return Err(SessionError::Timeout(t));
                }
            }
            if self.control.pause_requested.swap(false, Ordering::SeqCst) {
                if self.caps.pause {
                    self.paused_by_ornament = false;
                    engine.pause()?;
                } else {
                    tracing::warn!("this engine cannot pause the guest");
                }
            }
            match engine.next_event(Duration::from_millis(20))? {
                EngineEvent::Hit(hit) => {
                    let (action, pause, out) = self.deliver_outcome(&hit);
                    self.close_windows(engine, &out.close);
                    if hit.held {
                        if let Err(e) = engine.answer(&hit, action) {
                            tracing::warn!(error = %e, ?action, "answering a held hit failed");
                        }
                    }
                    if pause && !self.control.paused.load(Ordering::SeqCst) {
                        self.paused_by_ornament = true;
                        engine.pause()?;
                    }
                }
                EngineEvent::Paused => self.stay_paused(engine, limits)?,
                EngineEvent::Exited(how) => return Ok(how),
                EngineEvent::Idle => {}
            }
        }
    }

    /// The guest is paused: wait for a resume request (or the end of the run).
    fn stay_paused(
        &mut self,
        engine: &mut dyn Engine,
        limits: &Limits,
    ) -> Result<(), SessionError> {
        self.control.paused.store(true, Ordering::SeqCst);
        let by_ornament = self.paused_by_ornament;
        if let Some(n) = &mut self.notice {
            n(Notice::Paused { by_ornament });
        }
        tracing::info!(by_ornament, "guest paused");
        while !self.control.resume_requested.swap(false, Ordering::SeqCst) {
            if limits.stop.load(Ordering::Relaxed) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.control.paused.store(false, Ordering::SeqCst);
        self.control.pause_requested.store(false, Ordering::SeqCst);
        if let Some(n) = &mut self.notice {
            n(Notice::Resumed);
        }
        tracing::info!("guest resumed");
        engine.resume()?;
        Ok(())
    }

    /// Tell the ornaments the run is over (they flush what they kept).
    pub fn finish(&mut self) {
        self.monitor.finish();
        tracing::info!(stats = ?self.monitor.stats(), "monitor");
    }
}

#[cfg(test)]
mod lineage_tests;
#[cfg(test)]
mod tests;
