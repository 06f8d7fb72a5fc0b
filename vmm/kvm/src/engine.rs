//! \[2\] `KvmEngine`: the KVM machine behind ornament's `Engine` seam. One thread per vCPU
//! runs the machine; hits travel to the owner over a channel as `ProbeHit`s, and a held
//! hit blocks only its own vCPU until it is answered.

use crate::machine::{Machine, MachineError, RunControl, VcpuOutcome};
use crate::memory::KvmMemory;
use crate::support::error_chain;
use crate::trap::{Site, TrapBackend};
use crate::vcpu::exit::StopReason;
use crate::vcpu::{PauseGate, VcpuEvent};
use kvm_bindings::{kvm_regs, kvm_sregs};
use ornament_engine::{
    Action, Capabilities, DenyAt, Engine, EngineError, EngineEvent, Gpa, GuestExit, Gva,
    PhysMemory, ProbeHit, ProbeId, ProbeRequest, Regs,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Why the engine could not start.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum KvmEngineError {
    /// cannot read the initial registers of vCPU {0}
    Registers(u32, #[source] kvm_ioctls::Error),
    /// cannot start the vCPU threads
    Spawn(#[source] std::io::Error),
    /// no probe site for {0}: it is not mapped in the guest page tables
    Unmapped(Gva),
    /// the machine has no vCPU
    NoVcpus,
}

/// The registers ornament sees, from KVM's structs. `kernel_gs_base` is an MSR that
/// SYNC_REGS does not carry: it stays 0.
pub fn regs_from_kvm(r: &kvm_regs, s: &kvm_sregs) -> Regs {
    Regs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rbp: r.rbp,
        rsp: r.rsp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
        cs: u64::from(s.cs.selector),
        cr0: s.cr0,
        cr3: s.cr3,
        cr4: s.cr4,
        efer: s.efer,
        gs_base: s.gs.base,
        kernel_gs_base: 0,
        fs_base: s.fs.base,
    }
}

/// Translate `gva` through 4-level page tables rooted at `cr3` (4 KiB, 2 MiB and 1 GiB
/// pages); `None` when unmapped or the tables are unreadable.
pub fn translate(mem: &dyn PhysMemory, cr3: u64, gva: Gva) -> Option<Gpa> {
    ornament_engine::paging::translate(mem, cr3, false, gva)
}

/// Shared between the engine and its vCPU threads.
#[derive(Debug)]
struct Shared {
    /// Last registers seen per vCPU (at a hit, or when it paused).
    regs: Mutex<Vec<Option<Regs>>>,
    /// True while the guest should be paused.
    paused: Mutex<bool>,
    wake: Condvar,
    /// vCPUs parked at the gate now.
    parked: AtomicU64,
    seq: AtomicU64,
    start: Instant,
    control: Arc<RunControl>,
    /// Values test guests reported on the report port, in order.
    reports: Mutex<Vec<u32>>,
}

impl Shared {
    fn set_regs(&self, vcpu: u32, r: Regs) {
        if let Some(slot) = self
            .regs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(vcpu as usize)
        {
            *slot = Some(r);
        }
    }
}

impl PauseGate for Shared {
    fn should_park(&self) -> bool {
        *self.paused.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn park(&self, vcpu: u32, regs: &kvm_regs, sregs: &kvm_sregs) {
        self.set_regs(vcpu, regs_from_kvm(regs, sregs));
        let mut p = self.paused.lock().unwrap_or_else(|p| p.into_inner());
        self.parked.fetch_add(1, Ordering::SeqCst);
        self.wake.notify_all();
        // A timed wait: a stop requested from a vCPU thread does not notify the condvar.
        while *p && !self.control.stop_requested() {
            p = self
                .wake
                .wait_timeout(p, Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        self.parked.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Our KVM machine as an [`Engine`].
#[derive(Debug)]
pub struct KvmEngine {
    memory: Arc<KvmMemory>,
    vcpu_count: u32,
    traps: Arc<dyn TrapBackend>,
    control: Arc<RunControl>,
    shared: Arc<Shared>,
    events: Receiver<EngineEvent>,
    answers: Vec<SyncSender<Action>>,
    runner: Option<JoinHandle<()>>,
    hold_hits: bool,
    exited: bool,
    /// A pause was asked for and not all vCPUs have parked yet.
    pausing: bool,
    /// Where probes go when armed: now, or at the engine's safe point.
    arming: Arming,
    /// How the vCPUs ended, once they have.
    outcomes: Arc<Mutex<Option<RunResult>>>,
}

/// How the vCPUs of a run ended.
type RunResult = Result<Vec<VcpuOutcome>, MachineError>;

/// When and where [`Engine::arm`] puts a probe.
#[derive(Debug, Clone)]
pub enum Arming {
    /// At once, at the address vCPU 0's page tables give.
    Now,
    /// At the engine's own safe point (a Linux kernel that has finished patching its
    /// text), at the physical address the layout gives.
    Deferred(Arc<DeferredArms>),
}

/// Probes asked for before the safe point, armed all at once when it is reached; after
/// it, each at once.
pub struct DeferredArms {
    traps: Arc<dyn TrapBackend>,
    memory: std::sync::OnceLock<Arc<KvmMemory>>,
    /// The probes waiting, and whether the safe point was reached (one lock: a probe is
    /// either armed by `reach` or by `arm`, never by neither).
    state: Mutex<(Vec<(ProbeId, Site)>, bool)>,
    /// The site of a guest-virtual address (the kernel's fixed layout).
    site_of: fn(Gva) -> Site,
    error: Mutex<Option<String>>,
    kicker: Mutex<Option<crate::machine::Kicker>>,
}

impl std::fmt::Debug for DeferredArms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f.debug_struct("DeferredArms")
            .field("waiting", &st.0.len())
            .field("reached", &st.1)
            .finish_non_exhaustive()
    }
}

impl DeferredArms {
    /// Arming with `traps` at sites `site_of` gives.
    pub fn new(traps: Arc<dyn TrapBackend>, site_of: fn(Gva) -> Site) -> Arc<Self> {
        Arc::new(Self {
            traps,
            memory: std::sync::OnceLock::new(),
            state: Mutex::new((Vec::new(), false)),
            site_of,
            error: Mutex::new(None),
            kicker: Mutex::new(None),
        })
    }

    /// Guest memory exists.
    pub fn set_memory(&self, memory: Arc<KvmMemory>) {
        let _ = self.memory.set(memory);
    }

    /// The safe point is reached (called on the vCPU thread that saw it, before the guest
    /// runs on): arm every probe waiting.
    pub fn reach(&self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.1 = true;
        let Some(mem) = self.memory.get() else {
            return;
        };
        for (id, site) in st.0.drain(..) {
            if let Err(e) = self.traps.arm(id, site, mem.as_ref()) {
                let mut err = self.error.lock().unwrap_or_else(|p| p.into_inner());
                err.get_or_insert(format!("probe at {}: {e}", site.gva));
            }
        }
        tracing::info!("probes armed at the safe point");
    }

    /// True once the safe point was reached.
    pub fn reached(&self) -> bool {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).1
    }

    /// The first arming error, if any.
    pub fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn arm(&self, id: ProbeId, at: Gva) -> Result<(), EngineError> {
        let site = (self.site_of)(at);
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !st.1 {
            st.0.push((id, site));
            return Ok(());
        }
        let mem = self
            .memory
            .get()
            .ok_or(EngineError::Unsupported("guest memory is not there yet"))?;
        self.traps.arm(id, site, mem.as_ref()).map_err(backend)?;
        if let Some(k) = &*self.kicker.lock().unwrap_or_else(|p| p.into_inner()) {
            k.kick();
        }
        Ok(())
    }
}

/// How long [`KvmEngine::pause_and_wait`] waits for the vCPUs to park.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

impl KvmEngine {
    /// Start `machine` (as built: paused before its first instruction) with `traps`.
    /// With `hold_hits`, each hit blocks its vCPU until [`Engine::answer`]; otherwise the
    /// vCPU runs on and the hit is only reported. The guest stays paused until
    /// [`Engine::resume`], so probes can be armed first.
    pub fn start(
        machine: Machine,
        traps: Arc<dyn TrapBackend>,
        hold_hits: bool,
    ) -> Result<Self, KvmEngineError> {
        Self::start_with(
            machine,
            traps,
            hold_hits,
            Arc::new(RunControl::new()),
            Arming::Now,
        )
    }

    /// [`KvmEngine::start`] with a stop control shared with the machine's devices (a
    /// console that ends the run) and a choice of [`Arming`].
    pub fn start_with(
        mut machine: Machine,
        traps: Arc<dyn TrapBackend>,
        hold_hits: bool,
        control: Arc<RunControl>,
        arming: Arming,
    ) -> Result<Self, KvmEngineError> {
        let n = u32::try_from(machine.vcpus.len()).map_err(|_| KvmEngineError::NoVcpus)?;
        if n == 0 {
            return Err(KvmEngineError::NoVcpus);
        }
        let mut initial = Vec::new();
        for v in &machine.vcpus {
            let e = |e| KvmEngineError::Registers(v.index(), e);
            let r = v.fd().get_regs().map_err(e)?;
            let s = v.fd().get_sregs().map_err(e)?;
            initial.push(Some(regs_from_kvm(&r, &s)));
        }
        if let Arming::Deferred(d) = &arming {
            d.set_memory(machine.vm.memory().clone());
            *d.kicker.lock().unwrap_or_else(|p| p.into_inner()) = Some(control.kicker());
        }
        let outcomes = Arc::new(Mutex::new(None));
        let shared = Arc::new(Shared {
            regs: Mutex::new(initial),
            paused: Mutex::new(true),
            wake: Condvar::new(),
            parked: AtomicU64::new(0),
            seq: AtomicU64::new(0),
            start: Instant::now(),
            control: control.clone(),
            reports: Mutex::new(Vec::new()),
        });
        let (ev_tx, events) = mpsc::channel();
        let mut answers = Vec::new();
        let mut answer_rx = Vec::new();
        for _ in 0..n {
            let (tx, rx) = mpsc::sync_channel(1);
            answers.push(tx);
            answer_rx.push(Mutex::new(rx));
        }
        let memory = machine.vm.memory().clone();
        let runner = {
            let traps = traps.clone();
            let control = control.clone();
            let shared = shared.clone();
            let memory = memory.clone();
            let outcomes = outcomes.clone();
            std::thread::Builder::new()
                .name("ornament-kvm".into())
                .spawn(move || {
                    let tx = Mutex::new(ev_tx.clone());
                    let vcpu_side = VcpuSide {
                        shared: &shared,
                        tx: &tx,
                        answers: &answer_rx,
                        hold: hold_hits,
                        control: &control,
                        memory: &memory,
                    };
                    let on_event = |vcpu: u32, ev: VcpuEvent<'_>| vcpu_side.on_event(vcpu, ev);
                    let result =
                        run_gated(&mut machine, traps, &on_event, &control, shared.clone());
                    let exit = guest_exit(&result);
                    *outcomes.lock().unwrap_or_else(|p| p.into_inner()) = Some(result);
                    // The receiver may be gone (engine dropped): nothing to tell then.
                    let _ = ev_tx.send(EngineEvent::Exited(exit));
                })
                .map_err(KvmEngineError::Spawn)?
        };
        Ok(Self {
            memory,
            vcpu_count: n,
            traps,
            control,
            shared,
            events,
            answers,
            runner: Some(runner),
            hold_hits,
            exited: false,
            pausing: false,
            arming,
            outcomes,
        })
    }

    /// How the vCPUs ended (once the guest has: after [`EngineEvent::Exited`]).
    pub fn take_outcomes(&self) -> Option<RunResult> {
        self.outcomes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// What test guests reported on the report port so far, in order.
    pub fn reports(&self) -> Vec<u32> {
        self.shared
            .reports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The stop control shared with the vCPU threads.
    pub fn control(&self) -> &Arc<RunControl> {
        &self.control
    }

    /// Stop every vCPU and wait until each has parked (a vCPU held at a hit parks once
    /// answered, so answer them first). For tests and callers that hold no hits.
    pub fn pause_and_wait(&mut self) -> Result<(), EngineError> {
        Engine::pause(self)?;
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        while !self.all_parked() {
            if self.runner.as_ref().is_none_or(|r| r.is_finished()) {
                return Err(EngineError::GuestGone);
            }
            if Instant::now() > deadline {
                return Err(EngineError::Unsupported(
                    "vCPUs did not pause in time (one may be held at a hit)",
                ));
            }
            self.control.kick();
            std::thread::sleep(Duration::from_millis(1));
        }
        self.pausing = false;
        Ok(())
    }

    fn all_parked(&self) -> bool {
        self.shared.parked.load(Ordering::SeqCst) >= u64::from(self.vcpu_count)
    }

    /// Arm `probe` at a site whose guest-physical address the caller knows (kernel
    /// text before the kernel's own page tables are live: with `nokaslr`,
    /// gpa = gva - 0xffffffff80000000). [`Engine::arm`] instead walks the page tables
    /// of vCPU 0's last known CR3.
    pub fn arm_site(&mut self, probe: ProbeId, site: Site) -> Result<(), EngineError> {
        self.traps
            .arm(probe, site, self.memory.as_ref())
            .map_err(backend)?;
        self.control.kick();
        Ok(())
    }

    /// The trap backend in use.
    pub fn traps(&self) -> &Arc<dyn TrapBackend> {
        &self.traps
    }

    /// True when hits hold their vCPU until answered.
    pub fn holds_hits(&self) -> bool {
        self.hold_hits
    }
}

/// Wait while paused before the first instruction, then run the machine with `shared`
/// as the pause gate (checked before every entry into the guest).
fn run_gated(
    machine: &mut Machine,
    traps: Arc<dyn TrapBackend>,
    on_event: &(dyn Fn(u32, VcpuEvent<'_>) -> bool + Sync),
    control: &RunControl,
    shared: Arc<Shared>,
) -> Result<Vec<VcpuOutcome>, MachineError> {
    {
        let mut p = shared.paused.lock().unwrap_or_else(|p| p.into_inner());
        while *p && !control.stop_requested() {
            p = shared.wake.wait(p).unwrap_or_else(|p| p.into_inner());
        }
    }
    machine.run_gated(Some(traps), on_event, control, Some(shared))
}

/// What a vCPU thread's hit handler needs.
struct VcpuSide<'a> {
    shared: &'a Shared,
    tx: &'a Mutex<Sender<EngineEvent>>,
    answers: &'a [Mutex<Receiver<Action>>],
    hold: bool,
    control: &'a RunControl,
    memory: &'a Arc<KvmMemory>,
}

impl VcpuSide<'_> {
    /// A hit on `vcpu`: wait out a pause first (the hit then comes after it, as if the
    /// vCPU had stopped just before), send it, and when held wait for its answer and
    /// apply it. True when the registers changed.
    fn on_event(&self, vcpu: u32, ev: VcpuEvent<'_>) -> bool {
        let (hit, regs, sregs) = match ev {
            VcpuEvent::Hit { hit, regs, sregs } => (hit, regs, sregs),
            VcpuEvent::Report(v) => {
                self.shared
                    .reports
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(v);
                return false;
            }
        };
        if self.shared.should_park() {
            self.shared.park(vcpu, regs, sregs);
        }
        let mut r = regs_from_kvm(regs, sregs);
        // Every backend reports the probe address as RIP, whatever KVM showed.
        r.rip = hit.site.gva.raw();
        self.shared.set_regs(vcpu, r);
        let time_ns = u64::try_from(self.shared.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        {
            // Number and send under one lock, so sequence numbers follow delivery order.
            let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
            let seq = self.shared.seq.fetch_add(1, Ordering::SeqCst);
            let event = EngineEvent::Hit(Box::new(ProbeHit {
                probe: hit.probe,
                vcpu,
                seq,
                time_ns,
                regs: r,
                held: self.hold,
                mem: [None; ornament_engine::wire::MAX_MEM_READS],
                bytes: None,
            }));
            if tx.send(event).is_err() {
                return false;
            }
        }
        if !self.hold {
            return false;
        }
        let Some(rx) = self.answers.get(vcpu as usize) else {
            return false;
        };
        let rx = rx.lock().unwrap_or_else(|p| p.into_inner());
        // Wait for the answer, but give up when the engine stops.
        while !self.control.stop_requested() {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(Action::DenySyscall { errno }) => {
                    return return_early(self.memory.as_ref(), regs, sregs.cr3, errno)
                }
                Ok(_) => return false,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return false,
            }
        }
        false
    }
}

/// Deny a syscall at the first instruction of its entry function: return from it at once
/// with `-errno` (pop the return address the call pushed). False (nothing changed) when
/// the stack cannot be read.
fn return_early(mem: &dyn PhysMemory, regs: &mut kvm_regs, cr3: u64, errno: i32) -> bool {
    let Some(gpa) = translate(mem, cr3, Gva(regs.rsp)) else {
        tracing::warn!(
            rsp = regs.rsp,
            "deny: the stack is not mapped; the syscall runs"
        );
        return false;
    };
    let mut ret = [0u8; 8];
    if mem.read_phys(gpa, &mut ret).is_err() {
        tracing::warn!(
            rsp = regs.rsp,
            "deny: the stack cannot be read; the syscall runs"
        );
        return false;
    }
    regs.rip = u64::from_le_bytes(ret);
    regs.rsp = regs.rsp.wrapping_add(8);
    regs.rax = i64::from(errno).wrapping_neg() as u64;
    true
}

fn guest_exit(result: &RunResult) -> GuestExit {
    let outcomes = match result {
        Ok(o) => o,
        Err(e) => {
            return GuestExit::Died {
                reason: error_chain(e),
            }
        }
    };
    for o in outcomes {
        match &o.result {
            Ok(StopReason::Reset) => return GuestExit::PowerOff,
            Ok(StopReason::SystemEvent(_)) => return GuestExit::PowerOff,
            _ => {}
        }
    }
    let reason = outcomes
        .iter()
        .map(|o| match &o.result {
            Ok(r) => format!("{r:?}"),
            Err(e) => error_chain(e),
        })
        .collect::<Vec<_>>()
        .join("; ");
    GuestExit::Died { reason }
}

fn backend(e: impl std::error::Error + Send + Sync + 'static) -> EngineError {
    EngineError::Backend(Box::new(e))
}

impl Engine for KvmEngine {
    fn clock_origin(&self) -> std::time::SystemTime {
        ornament_engine::engine::wall_clock_at(self.shared.start)
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            deny_at: if self.hold_hits {
                DenyAt::FunctionEntry
            } else {
                DenyAt::Nowhere
            },
            dispatcher_probes: false,
            captures_at_hit: false,
            pause: true,
            probe_windows: false,
        }
    }

    fn memory(&self) -> Arc<dyn PhysMemory> {
        self.memory.clone()
    }

    fn vcpu_count(&self) -> u32 {
        self.vcpu_count
    }

    fn registers(&mut self, vcpu: u32) -> Result<Regs, EngineError> {
        let regs = self.shared.regs.lock().unwrap_or_else(|p| p.into_inner());
        regs.get(vcpu as usize)
            .ok_or(EngineError::NoSuchVcpu(vcpu))?
            .ok_or(EngineError::Unsupported(
                "registers are known at a hit or before the first run",
            ))
    }

    fn arm(&mut self, probe: &ProbeRequest) -> Result<(), EngineError> {
        if let Arming::Deferred(d) = &self.arming {
            return d.arm(probe.id, probe.at);
        }
        let cr3 = self.registers(0)?.cr3;
        let gpa = translate(self.memory.as_ref(), cr3, probe.at)
            .ok_or_else(|| backend(KvmEngineError::Unmapped(probe.at)))?;
        // A running vCPU picks the new guest-debug setting up at its next exit (kick).
        self.arm_site(probe.id, Site { gva: probe.at, gpa })
    }

    fn disarm(&mut self, probe: ProbeId) -> Result<(), EngineError> {
        self.traps.disarm(probe).map_err(|e| match e {
            crate::trap::TrapError::NotArmed(p) => EngineError::NoSuchProbe(p),
            e => backend(e),
        })?;
        self.control.kick();
        Ok(())
    }

    fn resume(&mut self) -> Result<(), EngineError> {
        let mut p = self.shared.paused.lock().unwrap_or_else(|p| p.into_inner());
        *p = false;
        self.shared.wake.notify_all();
        self.pausing = false;
        Ok(())
    }

    fn pause(&mut self) -> Result<(), EngineError> {
        {
            let mut p = self.shared.paused.lock().unwrap_or_else(|p| p.into_inner());
            if *p {
                return Ok(());
            }
            *p = true;
        }
        self.pausing = true;
        self.control.kick();
        Ok(())
    }

    fn next_event(&mut self, timeout: Duration) -> Result<EngineEvent, EngineError> {
        if self.exited {
            return Err(EngineError::GuestGone);
        }
        let deadline = Instant::now() + timeout;
        loop {
            // While pausing, look often: the pause completes when every vCPU has parked
            // (kicked out of KVM_RUN, halted ones too).
            let wait = if self.pausing {
                Duration::from_millis(1)
            } else {
                deadline.saturating_duration_since(Instant::now())
            };
            match self.events.recv_timeout(wait) {
                Ok(ev) => {
                    if matches!(ev, EngineEvent::Exited(_)) {
                        self.exited = true;
                    }
                    return Ok(ev);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return Err(EngineError::GuestGone),
            }
            if self.pausing {
                if self.all_parked() {
                    self.pausing = false;
                    return Ok(EngineEvent::Paused);
                }
                self.control.kick();
            }
            if Instant::now() >= deadline {
                return Ok(EngineEvent::Idle);
            }
        }
    }

    fn answer(&mut self, hit: &ProbeHit, action: Action) -> Result<(), EngineError> {
        if !hit.held {
            return match action {
                Action::Continue => Ok(()),
                Action::PauseGuest => self.pause(),
                Action::DenySyscall { .. } => Err(EngineError::Unsupported(
                    "denying needs a held hit at a syscall-entry probe",
                )),
            };
        }
        let tx = self
            .answers
            .get(hit.vcpu as usize)
            .ok_or(EngineError::NoSuchVcpu(hit.vcpu))?;
        tx.send(action).map_err(|_| EngineError::GuestGone)
    }

    fn stop(&mut self) {
        self.control.request_stop();
        self.shared.wake.notify_all();
    }
}

impl Drop for KvmEngine {
    fn drop(&mut self) {
        self.control.request_stop();
        self.shared.wake.notify_all();
        if let Some(r) = self.runner.take() {
            // Keep kicking until the vCPU threads have noticed.
            while !r.is_finished() {
                self.control.kick();
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = r.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ornament_engine::SliceMemory;

    #[test]
    fn walk_4k_2m_1g_pages() {
        let m = SliceMemory::new(0x10_0000);
        let w = |a: u64, v: u64| m.write_phys(Gpa(a), &v.to_le_bytes()).expect("in range");
        // cr3 = 0x1000; PML4[511] -> PDPT 0x2000; PDPT[510] -> PD 0x3000;
        // PD[0] -> PT 0x4000; PT[1] -> 0x9000. PD[1]: 2 MiB page at 0x20_0000.
        // PDPT[0]: 1 GiB page at 0x4000_0000.
        w(0x1000 + 511 * 8, 0x2003);
        w(0x2000 + 510 * 8, 0x3003);
        w(0x3000, 0x4003);
        w(0x4000 + 8, 0x9003);
        w(0x3000 + 8, 0x20_0083);
        w(0x1000, 0x5003);
        w(0x5000, 0x4000_0083);
        assert_eq!(
            translate(&m, 0x1000, Gva(0xffff_ffff_8000_1234)),
            Some(Gpa(0x9234))
        );
        assert_eq!(
            translate(&m, 0x1000, Gva(0xffff_ffff_8020_5678)),
            Some(Gpa(0x20_5678))
        );
        assert_eq!(
            translate(&m, 0x1000, Gva(0x1234_5678)),
            Some(Gpa(0x5234_5678))
        );
        assert_eq!(translate(&m, 0x1000, Gva(0xffff_ffff_8000_2000)), None);
        assert_eq!(translate(&m, 0xf_f000_0000, Gva(0)), None);
    }

    #[test]
    fn regs_conversion() {
        let r = kvm_regs {
            rdi: 1,
            rsi: 2,
            rip: 3,
            ..Default::default()
        };
        let mut s = kvm_sregs::default();
        s.cs.selector = 0x10;
        s.cr3 = 0x9000;
        s.gs.base = 0xffff_8880_0000_0000;
        let x = regs_from_kvm(&r, &s);
        assert_eq!((x.rdi, x.rsi, x.rip, x.cs, x.cr3), (1, 2, 3, 0x10, 0x9000));
        assert_eq!(x.gs_base, 0xffff_8880_0000_0000);
        assert!(x.in_kernel_mode());
    }
}
