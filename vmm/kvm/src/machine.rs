//! A built machine (test guest or Linux): VM, vCPUs, devices; runs one thread per vCPU
//! and can be stopped from outside (a flag plus a signal that interrupts `KVM_RUN`).

use crate::devices::{PioBus, SharedBuffer};
use crate::trap::TrapBackend;
use crate::vcpu::exit::{ExitCtx, ExitStats, StopReason};
use crate::vcpu::{KvmVcpu, PauseGate, VcpuError, VcpuEvent};
use crate::vm::KvmVm;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

/// Why a machine could not run.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum MachineError {
    /// a vCPU thread panicked
    ThreadPanicked,
    /// cannot install the vCPU kick signal handler
    Signal(#[source] vmm_sys_util::errno::Error),
}

/// How one vCPU's run ended.
#[derive(Debug)]
pub struct VcpuOutcome {
    /// Stop reason or error.
    pub result: Result<StopReason, VcpuError>,
    /// The exit handler's counters.
    pub stats: ExitStats,
}

/// Lets another thread stop a running machine.
#[derive(Debug, Default)]
pub struct RunControl {
    stop: Arc<AtomicBool>,
    /// The pthread of each running vCPU thread; cleared (under the lock) before it ends.
    threads: Arc<Mutex<Vec<Option<libc::pthread_t>>>>,
    /// The trap generation the vCPUs were last kicked for ([`Kicker::kick_if_moved`]).
    kicked_generation: Arc<AtomicU64>,
    /// Per vCPU slot, the trap generation its guest-debug state holds ([`Kicker::ack`]).
    acks: Arc<Mutex<Arc<[AtomicU64]>>>,
}

/// An acknowledgement that says "not in `KVM_RUN`: syncs before it enters the guest"
/// (a parked or finished vCPU).
pub const ACK_OUTSIDE: u64 = u64::MAX;

/// How long a vCPU that moved the trap generation waits for the others to load it
/// before it lets its guest go on ([`Kicker::kick_and_wait`]).
pub const ARM_BARRIER_TIMEOUT: Duration = Duration::from_millis(500);

/// How often the barrier re-kicks: a kick that lands just before a vCPU enters
/// `KVM_RUN` does not interrupt it, the next one does.
const ARM_BARRIER_REKICK: Duration = Duration::from_micros(200);

/// Interrupts every running vCPU's `KVM_RUN` once (a handle vCPU threads can keep).
#[derive(Debug, Clone)]
pub struct Kicker {
    threads: Arc<Mutex<Vec<Option<libc::pthread_t>>>>,
    kicked_generation: Arc<AtomicU64>,
    acks: Arc<[AtomicU64]>,
    /// The vCPU slot this handle belongs to (`None`: not a vCPU thread).
    slot: Option<usize>,
}

impl Kicker {
    /// Interrupt every vCPU thread's `KVM_RUN` once.
    pub fn kick(&self) {
        kick_threads(&self.threads);
    }

    /// Kick every vCPU when the trap backend's `generation` differs from the one they
    /// were last kicked for: an arm or disarm done on one vCPU's thread (or anywhere)
    /// then reaches the others, halted ones included (a vCPU idling in `hlt` stays in
    /// `KVM_RUN` and would keep its old debug registers until its next exit to us).
    /// Only the first vCPU to see a new generation kicks. True when it kicked.
    pub fn kick_if_moved(&self, generation: u64) -> bool {
        if self.kicked_generation.swap(generation, Ordering::SeqCst) == generation {
            return false;
        }
        self.kick();
        true
    }

    /// Record that this handle's vCPU holds `generation` in its guest-debug state
    /// ([`ACK_OUTSIDE`] while it is parked, outside `KVM_RUN`).
    pub fn ack(&self, generation: u64) {
        if let Some(a) = self.slot.and_then(|s| self.acks.get(s)) {
            a.store(generation, Ordering::SeqCst);
        }
    }

    /// Kick until every other running vCPU has acknowledged `generation` (or a later
    /// one), at most `timeout`: per-vCPU state such as debug registers then holds
    /// the new probes on every vCPU before the caller's guest runs on, so a hit on
    /// another vCPU right after an arm is not missed. True when all acknowledged.
    pub fn kick_and_wait(&self, generation: u64, timeout: Duration) -> bool {
        let start = Instant::now();
        loop {
            let waiting: Vec<usize> = {
                let threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
                (0..self.acks.len())
                    .filter(|&i| Some(i) != self.slot)
                    .filter(|&i| threads.get(i).is_some_and(Option::is_some))
                    .filter(|&i| {
                        let a = self.acks[i].load(Ordering::SeqCst);
                        a != ACK_OUTSIDE && a < generation
                    })
                    .collect()
            };
            if waiting.is_empty() {
                return true;
            }
            if start.elapsed() >= timeout {
                tracing::warn!(
                    ?waiting,
                    generation,
                    "vCPUs did not load the new probes in time"
                );
                return false;
            }
            self.kick();
            std::thread::sleep(ARM_BARRIER_REKICK);
        }
    }
}

fn kick_threads(threads: &Mutex<Vec<Option<libc::pthread_t>>>) {
    let threads = threads.lock().unwrap_or_else(|p| p.into_inner());
    for t in threads.iter().flatten() {
        // SAFETY: `t` is the pthread of a vCPU thread that is still running: each
        // thread clears its entry under this same lock before it returns, so the
        // handle cannot be stale; the signal has a no-op handler (installed by
        // `install_kick_handler`), so it only interrupts the ioctl with EINTR.
        unsafe {
            libc::pthread_kill(*t, kick_signal());
        }
    }
}

impl RunControl {
    /// A control with no stop requested.
    pub fn new() -> Self {
        Self::default()
    }

    /// Ask every vCPU to stop: set the flag and interrupt `KVM_RUN` with a signal.
    /// The vCPUs end with [`StopReason::Stopped`].
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.kick();
    }

    /// Interrupt every vCPU thread's `KVM_RUN` once.
    pub fn kick(&self) {
        kick_threads(&self.threads);
    }

    /// A handle that kicks the same threads (not a vCPU's own: it acknowledges
    /// nothing).
    pub fn kicker(&self) -> Kicker {
        self.kicker_for(None)
    }

    /// The handle of the vCPU thread in `slot` (`None`: of no vCPU).
    fn kicker_for(&self, slot: Option<usize>) -> Kicker {
        Kicker {
            threads: self.threads.clone(),
            kicked_generation: self.kicked_generation.clone(),
            acks: self.acks.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            slot,
        }
    }

    /// True once a stop was requested.
    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn noop_signal_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() -> Result<(), MachineError> {
    static ONCE: Once = Once::new();
    let mut res = Ok(());
    ONCE.call_once(|| {
        res = vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_signal_handler)
            .map_err(MachineError::Signal);
    });
    res
}

/// VM, vCPUs and devices, ready to run (paused until [`Machine::run`]).
#[derive(Debug)]
pub struct Machine {
    /// The VM (memory, fds).
    pub vm: KvmVm,
    /// Its vCPUs.
    pub vcpus: Vec<KvmVcpu>,
    /// The port-I/O bus.
    pub bus: PioBus,
    /// Everything the guest wrote to COM1 (when the machine was built to capture it).
    pub serial: SharedBuffer,
    /// When one vCPU stops (reset, shutdown), stop the others too, as a real machine
    /// would. Test guests turn it off so each vCPU runs to its own end. A vCPU error
    /// always stops the others.
    pub stop_all_on_exit: bool,
    /// Finish instructions KVM fails to emulate (kernel-mode `int3` on PVM) instead
    /// of stopping with an error; see `vcpu::complete`.
    pub complete_instructions: bool,
    /// PVM compatibility (the syscall-entry completion); `None`: off.
    pub pvm: Option<Arc<crate::pvm::PvmShared>>,
    /// Everything the guest wrote to COM2 (ttyS1), where ornament's /init reports.
    pub serial2: SharedBuffer,
}

impl Machine {
    /// Run every vCPU on its own thread until each stops; `on_event` sees hits and
    /// reports of all of them (the vCPU index comes first). `control` stops it early.
    pub fn run(
        &mut self,
        traps: Option<Arc<dyn TrapBackend>>,
        on_event: &(dyn Fn(u32, VcpuEvent<'_>) -> bool + Sync),
        control: &RunControl,
    ) -> Result<Vec<VcpuOutcome>, MachineError> {
        self.run_gated(traps, on_event, control, None)
    }

    /// [`Machine::run`], with the vCPUs parking at `gate` while it says so.
    pub fn run_gated(
        &mut self,
        traps: Option<Arc<dyn TrapBackend>>,
        on_event: &(dyn Fn(u32, VcpuEvent<'_>) -> bool + Sync),
        control: &RunControl,
        gate: Option<Arc<dyn PauseGate>>,
    ) -> Result<Vec<VcpuOutcome>, MachineError> {
        install_kick_handler()?;
        let bus = &self.bus;
        let stop_all = self.stop_all_on_exit;
        let memory = self.complete_instructions.then(|| self.vm.memory().clone());
        let pvm = self.pvm.clone();
        let n = self.vcpus.len();
        *control.threads.lock().unwrap_or_else(|p| p.into_inner()) = vec![None; n];
        *control.acks.lock().unwrap_or_else(|p| p.into_inner()) =
            (0..n).map(|_| AtomicU64::new(0)).collect();
        std::thread::scope(|s| {
            let handles: Vec<_> = self
                .vcpus
                .iter_mut()
                .enumerate()
                .map(|(slot, vcpu)| {
                    let traps = traps.clone();
                    let gate = gate.clone();
                    let memory = memory.clone();
                    let pvm = pvm.clone();
                    s.spawn(move || {
                        {
                            let mut t = control.threads.lock().unwrap_or_else(|p| p.into_inner());
                            // SAFETY: pthread_self has no preconditions.
                            t[slot] = Some(unsafe { libc::pthread_self() });
                        }
                        let mut ctx = ExitCtx::new(bus.clone(), traps);
                        ctx.stop = Some(control.stop.clone());
                        ctx.gate = gate;
                        ctx.memory = memory;
                        ctx.pvm = pvm;
                        ctx.kicker = Some(control.kicker_for(Some(slot)));
                        let result = vcpu.run(&mut ctx, &mut |i, ev| on_event(i, ev));
                        control.threads.lock().unwrap_or_else(|p| p.into_inner())[slot] = None;
                        if let Some(k) = &ctx.kicker {
                            k.ack(ACK_OUTSIDE);
                        }
                        let ends_machine = match &result {
                            Ok(StopReason::Stopped) => false,
                            Ok(_) => stop_all,
                            Err(_) => true,
                        };
                        if ends_machine {
                            control.request_stop();
                        }
                        VcpuOutcome {
                            result,
                            stats: ctx.stats,
                        }
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().map_err(|_| MachineError::ThreadPanicked))
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kicks_once_per_new_trap_generation() {
        let control = RunControl::new();
        let (a, b) = (control.kicker(), control.kicker());
        // No vCPU thread runs, so a kick signals nobody; what matters is who kicks.
        assert!(
            !a.kick_if_moved(0),
            "generation 0 is where the machine starts"
        );
        assert!(
            a.kick_if_moved(3),
            "the first vCPU to see generation 3 kicks"
        );
        assert!(!b.kick_if_moved(3), "the others do not kick again");
        assert!(!a.kick_if_moved(3));
        assert!(b.kick_if_moved(4));
    }

    #[test]
    fn an_arm_waits_until_the_other_vcpus_acknowledge() {
        install_kick_handler().expect("handler");
        let control = RunControl::new();
        *control.acks.lock().expect("acks") = (0..3).map(|_| AtomicU64::new(0)).collect();
        let (me, other, parked) = (
            control.kicker_for(Some(0)),
            control.kicker_for(Some(1)),
            control.kicker_for(Some(2)),
        );
        // Nobody runs: nothing to wait for.
        assert!(me.kick_and_wait(5, Duration::ZERO));
        // Slot 1 is a running thread (kicks reach it) that holds generation 4; slot 2
        // is parked (outside KVM_RUN), which never holds an arm up.
        parked.ack(ACK_OUTSIDE);
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            // SAFETY: pthread_self has no preconditions.
            tx.send(unsafe { libc::pthread_self() }).expect("send");
            other.ack(4);
            std::thread::sleep(Duration::from_millis(50));
            other.ack(5);
        });
        let pthread = rx.recv().expect("thread");
        {
            let mut threads = control.threads.lock().expect("threads");
            *threads = vec![None, Some(pthread), Some(pthread)];
        }
        std::thread::sleep(Duration::from_millis(5));
        assert!(!me.kick_and_wait(5, Duration::from_millis(1)), "4 < 5");
        assert!(me.kick_and_wait(5, Duration::from_secs(5)), "acknowledged");
        control.threads.lock().expect("threads").fill(None);
        t.join().expect("join");
    }
}
