//! [`FakeEngine`]: an [`Engine`] with no VM, for tests of sessions and ornaments. It replays
//! a script of hits over a synthetic guest ([`crate::testing::SynthGuest`]): before each hit
//! it makes the scripted task current on the scripted vCPU, so the session reads that
//! task from guest memory exactly as it would from a real guest. It records what the
//! session asked of it (arms, answers, pauses, resumes) for the test to check.

use crate::testing::SynthGuest;
use ornament_engine::{
    Action, Capabilities, DenyAt, DenyOffsets, Engine, EngineError, EngineEvent, GuestExit, Gva,
    MemError, PhysMemory, ProbeHit, ProbeId, ProbeRequest, Regs,
};
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Guest memory of a synthetic guest shared between a test and what it tests.
#[derive(Debug, Clone)]
pub struct SharedGuest(pub Arc<SynthGuest>);

impl PhysMemory for SharedGuest {
    fn read_phys(&self, gpa: ornament_engine::Gpa, buf: &mut [u8]) -> Result<(), MemError> {
        self.0.phys.mem.read_phys(gpa, buf)
    }
    fn write_phys(&self, gpa: ornament_engine::Gpa, buf: &[u8]) -> Result<(), MemError> {
        self.0.phys.mem.write_phys(gpa, buf)
    }
    fn size(&self) -> u64 {
        self.0.phys.mem.size()
    }
}

/// One step of a script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// `vcpu` reaches the probe armed at `symbol` with `current` as its current task and
    /// `rdi`/`rsi` as the hook's arguments. Skipped when no probe is armed there (nothing
    /// traps an unarmed site).
    Hit {
        /// The kernel function.
        symbol: String,
        /// The vCPU.
        vcpu: u32,
        /// The task current on it.
        current: Gva,
        /// First argument.
        rdi: u64,
        /// Second argument.
        rsi: u64,
    },
    /// The guest powers off.
    PowerOff,
}

impl Step {
    /// A hit of `symbol` by `current` on vCPU 0 with first argument `rdi`.
    pub fn hit(symbol: &str, current: Gva, rdi: u64) -> Self {
        Self::Hit {
            symbol: symbol.to_owned(),
            vcpu: 0,
            current,
            rdi,
            rsi: 0,
        }
    }
}

/// What the session asked of the engine, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Logged {
    /// A probe was armed.
    Armed {
        /// Its function.
        symbol: String,
        /// It holds its vCPU.
        hold: bool,
        /// The session denies there.
        deny: bool,
    },
    /// Deny offsets were given.
    DenyEnabled,
    /// A held hit of `symbol` was answered.
    Answered {
        /// The hit's function.
        symbol: String,
        /// The answer.
        action: Action,
    },
    /// The guest ran (first start or after a pause).
    Resumed,
    /// A pause was asked for.
    Pause,
    /// The engine was told to kill the guest.
    Stopped,
    /// A task's part of a probe's window was closed by the session.
    WindowClosed(ProbeId),
}

/// A scripted engine over a synthetic guest.
#[derive(Debug)]
pub struct FakeEngine {
    guest: Arc<SynthGuest>,
    caps: Capabilities,
    vcpus: u32,
    script: VecDeque<Step>,
    armed: BTreeMap<ProbeId, ProbeRequest>,
    log: Arc<Mutex<Vec<Logged>>>,
    held: Option<ProbeHit>,
    running: bool,
    pausing: bool,
    ended: bool,
    seq: u64,
}

impl FakeEngine {
    /// An engine with `caps` replaying `script` over `guest`.
    pub fn new(guest: Arc<SynthGuest>, caps: Capabilities, script: Vec<Step>) -> Self {
        Self {
            guest,
            caps,
            vcpus: 2,
            script: script.into(),
            armed: BTreeMap::new(),
            log: Arc::new(Mutex::new(Vec::new())),
            held: None,
            running: false,
            pausing: false,
            ended: false,
            seq: 0,
        }
    }

    /// What a KVM-like engine offers: every hit held, deny at the entry function, no
    /// dispatcher probes.
    pub fn kvm_like() -> Capabilities {
        Capabilities {
            deny_at: DenyAt::FunctionEntry,
            dispatcher_probes: false,
            captures_at_hit: false,
            pause: true,
            probe_windows: false,
        }
    }

    /// What the QEMU plugin offers: captures at the hit, deny at the dispatcher.
    pub fn plugin_like() -> Capabilities {
        Capabilities {
            deny_at: DenyAt::Dispatcher,
            dispatcher_probes: true,
            captures_at_hit: true,
            pause: true,
            probe_windows: true,
        }
    }

    /// The log, shared (it fills while a session runs the engine).
    pub fn log(&self) -> Arc<Mutex<Vec<Logged>>> {
        self.log.clone()
    }

    /// The answers given, in order: (symbol, action).
    pub fn answers(&self) -> Vec<(String, Action)> {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(|l| match l {
                Logged::Answered { symbol, action } => Some((symbol.clone(), *action)),
                _ => None,
            })
            .collect()
    }

    fn record(&self, l: Logged) {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).push(l);
    }

    fn probe_at(&self, symbol: &str) -> Option<&ProbeRequest> {
        self.armed.values().find(|r| r.symbol == symbol)
    }
}

impl Engine for FakeEngine {
    fn clock_origin(&self) -> std::time::SystemTime {
        // Its hits are at `seq` microseconds of a clock that starts at the epoch.
        std::time::UNIX_EPOCH
    }

    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    fn memory(&self) -> Arc<dyn PhysMemory> {
        Arc::new(SharedGuest(self.guest.clone()))
    }

    fn vcpu_count(&self) -> u32 {
        self.vcpus
    }

    fn registers(&mut self, vcpu: u32) -> Result<Regs, EngineError> {
        if vcpu >= self.vcpus {
            return Err(EngineError::NoSuchVcpu(vcpu));
        }
        Ok(self.guest.regs_kernel(vcpu, Gva(0)))
    }

    fn arm(&mut self, probe: &ProbeRequest) -> Result<(), EngineError> {
        if probe.deny && self.caps.deny_at == DenyAt::Nowhere {
            return Err(EngineError::Unsupported("this engine cannot deny"));
        }
        self.record(Logged::Armed {
            symbol: probe.symbol.clone(),
            hold: probe.capture.hold,
            deny: probe.deny,
        });
        self.armed.insert(probe.id, probe.clone());
        Ok(())
    }

    fn disarm(&mut self, probe: ProbeId) -> Result<(), EngineError> {
        self.armed
            .remove(&probe)
            .map(|_| ())
            .ok_or(EngineError::NoSuchProbe(probe))
    }

    fn close_window(&mut self, probe: ProbeId) -> Result<(), EngineError> {
        if !self.caps.probe_windows {
            return Err(EngineError::Unsupported("probe windows"));
        }
        self.record(Logged::WindowClosed(probe));
        Ok(())
    }

    fn enable_deny(&mut self, _offsets: &DenyOffsets) -> Result<(), EngineError> {
        self.record(Logged::DenyEnabled);
        Ok(())
    }

    fn resume(&mut self) -> Result<(), EngineError> {
        self.running = true;
        self.record(Logged::Resumed);
        Ok(())
    }

    fn pause(&mut self) -> Result<(), EngineError> {
        self.pausing = true;
        self.record(Logged::Pause);
        Ok(())
    }

    fn next_event(&mut self, _timeout: Duration) -> Result<EngineEvent, EngineError> {
        if self.ended {
            return Err(EngineError::GuestGone);
        }
        // Only held hits are kept: the session must answer one before asking for more.
        if self.held.is_some() {
            return Err(EngineError::Unsupported("a held hit was not answered"));
        }
        if self.pausing {
            self.pausing = false;
            self.running = false;
            return Ok(EngineEvent::Paused);
        }
        if !self.running {
            std::thread::sleep(Duration::from_millis(1));
            return Ok(EngineEvent::Idle);
        }
        loop {
            match self.script.pop_front() {
                None => return Ok(EngineEvent::Idle),
                Some(Step::PowerOff) => {
                    self.ended = true;
                    return Ok(EngineEvent::Exited(GuestExit::PowerOff));
                }
                Some(Step::Hit {
                    symbol,
                    vcpu,
                    current,
                    rdi,
                    rsi,
                }) => {
                    let Some(req) = self.probe_at(&symbol) else {
                        continue;
                    };
                    let (id, at, hold) = (req.id, req.at, req.capture.hold);
                    self.guest
                        .set_current(vcpu, current)
                        .map_err(EngineError::backend)?;
                    let mut regs = self.guest.regs_kernel(vcpu, at);
                    regs.rdi = rdi;
                    regs.rsi = rsi;
                    self.seq += 1;
                    let hit = ProbeHit {
                        probe: id,
                        vcpu,
                        seq: self.seq,
                        time_ns: self.seq * 1000,
                        regs,
                        held: hold || !self.caps.captures_at_hit,
                        mem: [None; ornament_engine::wire::MAX_MEM_READS],
                        bytes: None,
                    };
                    if hit.held {
                        self.held = Some(hit.clone());
                    }
                    return Ok(EngineEvent::Hit(Box::new(hit)));
                }
            }
        }
    }

    fn answer(&mut self, hit: &ProbeHit, action: Action) -> Result<(), EngineError> {
        let Some(h) = self.held.take().filter(|h| h.seq == hit.seq) else {
            return Err(EngineError::Unsupported("answer to a hit that is not held"));
        };
        if matches!(action, Action::DenySyscall { .. }) && self.caps.deny_at == DenyAt::Nowhere {
            return Err(EngineError::Unsupported("this engine cannot deny"));
        }
        let symbol = self
            .armed
            .get(&h.probe)
            .map(|r| r.symbol.clone())
            .unwrap_or_default();
        self.record(Logged::Answered { symbol, action });
        Ok(())
    }

    fn stop(&mut self) {
        self.ended = true;
        self.record(Logged::Stopped);
    }
}
