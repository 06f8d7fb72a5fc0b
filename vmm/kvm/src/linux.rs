//! [`run_linux`]: boot a Linux kernel with an initramfs, run ornament's `/init` to its
//! report on ttyS1 (`ornament-exit N`), and stop. The entry point of
//! `ornament run --engine kvm`; with `pvm_compat` it boots an unmodified kernel on a
//! PVM host ([`crate::pvm`]), slowly (kernel mode emulated: minutes).
//!
//! Optional probes (kernel functions by address, e.g. from System.map with `nokaslr`)
//! are armed with a trap backend at the arm point ([`crate::arm_point`]: the first
//! `kernel_execve`, found in System.map), that is after the kernel has rewritten its
//! fentry sites to NOPs and before any user code runs, on the vCPU that reached it;
//! without a System.map, or when `arm_probes_after` names console text, when the
//! console shows that text (default `Run /init`). Every hit is counted.

use crate::builder::{build_with_console, BuildError, ConsoleOutput, MachineConfig};
use crate::devices::SharedBuffer;
use crate::engine::regs_from_kvm;
use crate::machine::{MachineError, RunControl};
use crate::memory::KvmMemory;
use crate::pvm::{compat_cmdline_for_tsc, host_tsc_khz, LineWatch, ARM_HOOK_AFTER};
use crate::trap::debugreg::DebugRegs;
use crate::trap::patch::PatchedSites;
use crate::trap::{Site, TrapBackend, TrapError, TrapKind};
use crate::vcpu::exit::{ExitStats, StopReason};
use crate::vcpu::{VcpuError, VcpuEvent};
use ornament_engine::{Action, Gpa, Gva, ProbeHit, ProbeId};
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Where the kernel's text mapping starts: with `nokaslr`, gpa = gva - this.
pub const KERNEL_MAP_START: u64 = 0xffff_ffff_8000_0000;
use ornament_engine::report::last_exit_report;
pub use ornament_engine::report::EXIT_REPORT;

/// What to boot and how.
pub struct LinuxRunConfig {
    /// Uncompressed ELF vmlinux (a bzImage works too, but on PVM its decompressor
    /// alone takes minutes).
    pub kernel: PathBuf,
    /// Initramfs; on PVM give it uncompressed (gunzip in emulated kernel mode takes
    /// more than a minute per MB).
    pub initrd: Option<PathBuf>,
    /// Kernel command line; `pvm_compat` appends [`crate::pvm::COMPAT_CMDLINE`].
    pub cmdline: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest RAM in MiB.
    pub mem_size_mib: u32,
    /// Where the guest's console (ttyS0) goes, as it comes.
    pub console: Box<dyn Write + Send>,
    /// PVM compatibility mode (use it when `/dev/kvm` is PVM and the kernel is not
    /// PVM-aware).
    pub pvm_compat: bool,
    /// System.map, to name the function of an instruction the VMM cannot complete.
    pub system_map: Option<PathBuf>,
    /// Probes to arm once user space starts, and the backend to arm them with.
    pub probes: Vec<LinuxProbe>,
    /// The trap backend for `probes` ([`TrapKind::Int3`] is not offered).
    pub trap: TrapKind,
    /// Console text after which the probes are armed and hits counted (`None`: at the
    /// arm point, [`crate::arm_point`], when `system_map` names it, else the kernel's
    /// `Run /init` line). Counting ends when ttyS1 gets the exit report.
    pub arm_probes_after: Option<String>,
    /// Receives every hit once the probes are armed (probe ids are indices into
    /// `probes`).
    pub observer: Option<Arc<dyn HitObserver>>,
}

/// Sees every probe hit while the hitting vCPU waits: our VMM's hits are always held,
/// so the task the hit is about cannot change until [`HitObserver::on_hit`] returns.
pub trait HitObserver: Send + Sync {
    /// Guest memory exists (called once, before the first hit).
    fn attach(&self, memory: Arc<KvmMemory>);
    /// A hit (`held` is true, `mem` is empty: read guest memory through what
    /// `attach` gave). The returned action is applied before the vCPU resumes.
    fn on_hit(&self, hit: &ProbeHit) -> Action;
}

impl std::fmt::Debug for LinuxRunConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinuxRunConfig")
            .field("kernel", &self.kernel)
            .field("initrd", &self.initrd)
            .field("cmdline", &self.cmdline)
            .field("vcpus", &self.vcpus)
            .field("mem_size_mib", &self.mem_size_mib)
            .field("pvm_compat", &self.pvm_compat)
            .field("probes", &self.probes)
            .field("trap", &self.trap)
            .field("arm_probes_after", &self.arm_probes_after)
            .field("observer", &self.observer.is_some())
            .finish_non_exhaustive()
    }
}

/// A kernel function to count hits of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinuxProbe {
    /// Its name (for the outcome).
    pub name: String,
    /// Its address (the fentry site, the function's first byte).
    pub gva: u64,
}

/// How the run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LinuxStop {
    /// /init reported on ttyS1.
    Reported,
    /// The caller's stop flag.
    Stopped,
    /// The time box ran out.
    TimedOut,
    /// The guest stopped by itself (reset, shutdown).
    Guest(StopReason),
    /// The kernel said it halted or powered off (`reboot: System halted` / `Power
    /// down`): with no ACPI power-off it then idles forever, so the run stops.
    Halted,
    /// The kernel panicked (`Kernel panic - not syncing`).
    Panicked,
}

/// Console lines after which the guest does nothing more, and what they mean.
pub const END_LINES: [(&str, LinuxStop); 3] = [
    ("reboot: System halted", LinuxStop::Halted),
    ("reboot: Power down", LinuxStop::Halted),
    ("Kernel panic - not syncing", LinuxStop::Panicked),
];

/// Instructions and entries the VMM completed for PVM, summed over vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct FixupCounts {
    /// Kernel-mode `int3` delivered as #BP.
    pub int3: u64,
    /// `fwait` skipped.
    pub fwait: u64,
    /// `clac` / `stac`.
    pub clac_stac: u64,
    /// User-mode `syscall` entries completed.
    pub syscall_entries: u64,
    /// Page faults passed on to the guest's handler by the #PF breakpoint.
    pub page_faults_passed: u64,
}

impl FixupCounts {
    /// Sum the per-vCPU counters.
    pub fn from_stats<'a>(stats: impl IntoIterator<Item = &'a ExitStats>) -> Self {
        stats.into_iter().fold(Self::default(), |a, s| Self {
            int3: a.int3 + s.completed_int3,
            fwait: a.fwait + s.completed_fwait,
            clac_stac: a.clac_stac + s.completed_clac_stac,
            syscall_entries: a.syscall_entries + s.syscall_entries,
            page_faults_passed: a.page_faults_passed + s.page_faults_passed,
        })
    }
}

/// What a run did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LinuxRunOutcome {
    /// `N` from `ornament-exit N` on ttyS1, when /init reported.
    pub guest_status: Option<i32>,
    /// How it ended.
    pub stop: LinuxStop,
    /// The VMM's completions.
    pub fixups: FixupCounts,
    /// Hits per probe, in `probes` order.
    pub probe_hits: Vec<(String, u64)>,
    /// From start to the console's `Run /init`.
    pub boot_to_init: Option<Duration>,
    /// The whole run.
    pub wall: Duration,
}

/// Why a Linux run failed.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum LinuxRunError {
    /// cannot build the machine
    Build(#[source] BuildError),
    /// the machine could not run
    Machine(#[source] MachineError),
    /// vCPU {vcpu} stopped at an instruction KVM cannot emulate and the VMM cannot complete: rip {rip:#x} ({symbol}), cs {cs:#x}, bytes [{bytes}]
    EmulationFailure {
        /// The vCPU.
        vcpu: u32,
        /// RIP.
        rip: u64,
        /// CS selector.
        cs: u16,
        /// Instruction bytes, hex.
        bytes: String,
        /// `name+0xoff` from System.map, or `no System.map`/`unknown`.
        symbol: String,
    },
    /// a vCPU failed
    Vcpu(#[source] VcpuError),
    /// a vCPU failed: {0}
    VcpuFailed(String),
    /// cannot start the vCPUs
    Engine(#[source] crate::engine::KvmEngineError),
    /// cannot arm a probe: {0}
    ArmFailed(String),
    /// cannot arm probe {0} at {1:#x}
    Probe(String, u64, #[source] TrapError),
    /// the software int3 backend cannot run Linux probes here; use debug-regs or patched-site
    Int3Backend,
    /// cannot prepare the uncompressed initramfs from {0:?}
    Initrd(PathBuf, #[source] std::io::Error),
}

/// `bytes` with a leading gzip member inflated: what an initramfs made of a gzipped
/// base archive plus an uncompressed overlay archive (`RunOverlay::write_combined`)
/// becomes, so that an emulated kernel does not spend minutes in gunzip. The rest
/// follows after zero padding to 4 bytes (which the kernel's unpacker skips).
/// `None` when `bytes` does not start with a gzip member.
pub fn inflate_leading_gzip(bytes: &[u8]) -> Result<Option<Vec<u8>>, std::io::Error> {
    use std::io::Read;
    if !bytes.starts_with(&[0x1f, 0x8b]) {
        return Ok(None);
    }
    let mut dec = flate2::bufread::GzDecoder::new(bytes);
    let mut out = Vec::with_capacity(bytes.len() * 3);
    dec.read_to_end(&mut out)?;
    // The next archive must start 4-aligned in the whole buffer: drop the zeros that
    // aligned it after the gzip member and re-align after the inflated archive.
    let rest = dec.into_inner();
    let rest = &rest[rest.iter().take_while(|&&b| b == 0).count()..];
    out.resize(out.len().div_ceil(4) * 4, 0);
    out.extend_from_slice(rest);
    Ok(Some(out))
}

/// The nearest symbol at or below `addr` in System.map text, as `name+0xoff`.
pub fn nearest_symbol(map: &str, addr: u64) -> Option<String> {
    let mut best: Option<(u64, &str)> = None;
    for line in map.lines() {
        let mut it = line.split_whitespace();
        let (Some(a), Some(_), Some(name)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        let Ok(a) = u64::from_str_radix(a, 16) else {
            continue;
        };
        if a <= addr && best.is_none_or(|(b, _)| a >= b) {
            best = Some((a, name));
        }
    }
    best.map(|(a, n)| format!("{n}+{:#x}", addr - a))
}

/// Look `name` up in System.map text.
pub fn symbol_address(map: &str, name: &str) -> Option<u64> {
    map.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        let a = it.next()?;
        let _ = it.next()?;
        (it.next()? == name).then(|| u64::from_str_radix(a, 16).ok())?
    })
}

/// The site of a kernel-text address under `nokaslr`.
pub fn kernel_site(gva: u64) -> Site {
    Site {
        gva: Gva(gva),
        gpa: Gpa(gva.wrapping_sub(KERNEL_MAP_START)),
    }
}

static INFLATED: AtomicU64 = AtomicU64::new(0);

/// A file removed when dropped.
#[derive(Debug)]
pub(crate) struct TempFile(PathBuf);

/// What a boot needs prepared: the command line (with PVM's compatibility options) and
/// the initramfs to load (on PVM, a gzipped one inflated here at native speed rather than
/// in emulated kernel mode; the file is removed when this is dropped).
#[derive(Debug)]
pub(crate) struct Prepared {
    pub(crate) cmdline: String,
    pub(crate) initrd: Option<PathBuf>,
    _inflated: Option<TempFile>,
}

pub(crate) fn prepare(
    cmdline: &str,
    initrd: Option<&PathBuf>,
    pvm_compat: bool,
) -> Result<Prepared, LinuxRunError> {
    let cmdline = if pvm_compat {
        compat_cmdline_for_tsc(cmdline, host_tsc_khz())
    } else {
        cmdline.to_owned()
    };
    let mut inflated = None;
    if let (true, Some(path)) = (pvm_compat, initrd) {
        let err = |e| LinuxRunError::Initrd(path.clone(), e);
        if let Some(bytes) =
            inflate_leading_gzip(&std::fs::read(path).map_err(err)?).map_err(err)?
        {
            let tmp = std::env::temp_dir().join(format!(
                "ornament-kvm-initrd-{}-{}.cpio",
                std::process::id(),
                INFLATED.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::write(&tmp, bytes).map_err(err)?;
            inflated = Some(TempFile(tmp));
        }
    }
    let initrd = match &inflated {
        Some(t) => Some(t.0.clone()),
        None => initrd.cloned(),
    };
    Ok(Prepared {
        cmdline,
        initrd,
        _inflated: inflated,
    })
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Stamps the time of `Run /init` and arms the probes at `arm_after`, on the vCPU
/// thread that writes the console (so before the guest runs on).
pub(crate) struct InitWatch {
    end_watch: Vec<LineWatch>,
    ended: Arc<Mutex<Option<LinuxStop>>>,
    watch: LineWatch,
    arm_watch: LineWatch,
    seen: bool,
    start: Instant,
    boot_to_init: Arc<Mutex<Option<Duration>>>,
    arm_after: String,
    arm: Option<Box<dyn FnOnce() + Send>>,
    inner: Box<dyn Write + Send>,
}

impl InitWatch {
    /// Watch the console for the end lines (into `ended`) and `Run /init` (its time from
    /// `start` into `boot_to_init`); call `arm` at `arm_after`; pass everything to `inner`.
    pub(crate) fn new(
        start: Instant,
        ended: Arc<Mutex<Option<LinuxStop>>>,
        boot_to_init: Arc<Mutex<Option<Duration>>>,
        arm_after: Option<String>,
        arm: Option<Box<dyn FnOnce() + Send>>,
        inner: Box<dyn Write + Send>,
    ) -> Self {
        Self {
            end_watch: END_LINES.iter().map(|_| LineWatch::default()).collect(),
            ended,
            watch: LineWatch::default(),
            arm_watch: LineWatch::default(),
            seen: false,
            start,
            boot_to_init,
            arm_after: arm_after.unwrap_or_else(|| ARM_HOOK_AFTER.to_owned()),
            arm,
            inner,
        }
    }
}

impl Write for InitWatch {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        for (w, (line, stop)) in self.end_watch.iter_mut().zip(END_LINES) {
            if w.feed(b, line.as_bytes()) {
                let mut e = self.ended.lock().unwrap_or_else(|p| p.into_inner());
                e.get_or_insert(stop);
            }
        }
        if !self.seen && self.watch.feed(b, ARM_HOOK_AFTER.as_bytes()) {
            self.seen = true;
            *self.boot_to_init.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(self.start.elapsed());
        }
        if self.seen && self.arm.is_some() {
            let now = self.arm_after == ARM_HOOK_AFTER
                || self.arm_watch.feed(b, self.arm_after.as_bytes());
            if now {
                if let Some(arm) = self.arm.take() {
                    arm();
                }
            }
        }
        self.inner.write_all(b)?;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Ends the counting window when ttyS1 gets the exit report (on the vCPU thread
/// that writes it, so no later hit is counted).
struct ReportWatch {
    watch: LineWatch,
    counting: Arc<AtomicBool>,
}

impl Write for ReportWatch {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.watch.feed(b, EXIT_REPORT.as_bytes()) {
            self.counting.store(false, Ordering::SeqCst);
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The first reason a vCPU stopped by itself (not on request), or the error of the
/// first vCPU that failed (an instruction the VMM cannot complete, named from
/// `system_map`).
pub(crate) fn guest_stop(
    outcomes: &[crate::machine::VcpuOutcome],
    system_map: Option<&Path>,
) -> Result<Option<StopReason>, LinuxRunError> {
    let mut guest_stop = None;
    for o in outcomes {
        match &o.result {
            Ok(StopReason::Stopped) => {}
            Ok(r) => guest_stop = guest_stop.or(Some(*r)),
            Err(VcpuError::Uncompleted {
                vcpu,
                rip,
                cs,
                bytes,
            }) => {
                let symbol = match map_text(system_map) {
                    Some(t) => nearest_symbol(&t, *rip).unwrap_or_else(|| "unknown".into()),
                    None => "no System.map".into(),
                };
                return Err(LinuxRunError::EmulationFailure {
                    vcpu: *vcpu,
                    rip: *rip,
                    cs: *cs,
                    bytes: bytes.clone(),
                    symbol,
                });
            }
            Err(e) => return Err(LinuxRunError::VcpuFailed(crate::support::error_chain(e))),
        }
    }
    Ok(guest_stop)
}

fn map_text(path: Option<&Path>) -> Option<String> {
    std::fs::read_to_string(path?).ok()
}

/// Boot `cfg`, run until /init reports on ttyS1 (then stop the guest), `stop` is set,
/// the guest stops, or `timeout` passes.
pub fn run_linux(
    cfg: LinuxRunConfig,
    stop: &AtomicBool,
    timeout: Duration,
) -> Result<LinuxRunOutcome, LinuxRunError> {
    let traps: Option<Arc<dyn TrapBackend>> = match (cfg.probes.is_empty(), cfg.trap) {
        (true, _) => None,
        (false, TrapKind::DebugRegs) => Some(Arc::new(DebugRegs::skipping_nops())),
        (false, TrapKind::PatchedSite) => Some(Arc::new(PatchedSites::new())),
        (false, TrapKind::Int3) => return Err(LinuxRunError::Int3Backend),
    };
    let prepared = prepare(&cfg.cmdline, cfg.initrd.as_ref(), cfg.pvm_compat)?;
    let (cmdline, initrd) = (prepared.cmdline.clone(), prepared.initrd.clone());
    let mc = MachineConfig {
        kernel: cfg.kernel.clone(),
        initrd,
        cmdline,
        vcpu_count: cfg.vcpus,
        mem_size_mib: cfg.mem_size_mib,
        console: ConsoleOutput::Capture,
        pvm_compat: cfg.pvm_compat,
    };
    let start = Instant::now();
    let boot_to_init = Arc::new(Mutex::new(None));
    let memory: Arc<OnceLock<Arc<KvmMemory>>> = Arc::new(OnceLock::new());
    let arm_error: Arc<Mutex<Option<LinuxRunError>>> = Arc::new(Mutex::new(None));
    // Hits count from the arming to the exit report on ttyS1.
    let counting = Arc::new(AtomicBool::new(false));
    let arm: Option<Box<dyn FnOnce() + Send>> = traps.clone().map(|t| {
        let probes = cfg.probes.clone();
        let memory = memory.clone();
        let arm_error = arm_error.clone();
        let counting = counting.clone();
        Box::new(move || {
            counting.store(true, Ordering::SeqCst);
            let Some(mem) = memory.get() else { return };
            for (i, p) in (0u32..).zip(&probes) {
                if let Err(e) = t.arm(ProbeId(i), kernel_site(p.gva), mem.as_ref()) {
                    *arm_error.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(LinuxRunError::Probe(p.name.clone(), p.gva, e));
                    return;
                }
            }
            tracing::info!(n = probes.len(), "probes armed");
        }) as Box<dyn FnOnce() + Send>
    });
    // Armed at the arm point the VMM sees itself when System.map names it, else (or
    // when the caller names console text) at the console line.
    let (traps, arm) = match (traps, arm) {
        (Some(t), Some(a)) if cfg.arm_probes_after.is_none() => {
            let (t, a) = crate::arm_point::install(t, cfg.system_map.as_deref(), a);
            (Some(t), a)
        }
        other => other,
    };
    let ended: Arc<Mutex<Option<LinuxStop>>> = Arc::new(Mutex::new(None));
    let tee = InitWatch::new(
        start,
        ended.clone(),
        boot_to_init.clone(),
        cfg.arm_probes_after.clone(),
        arm,
        cfg.console,
    );
    let tee2 = ReportWatch {
        watch: LineWatch::default(),
        counting: counting.clone(),
    };
    let mut m = build_with_console(&mc, Some(Box::new(tee)), Some(Box::new(tee2)))
        .map_err(LinuxRunError::Build)?;
    let _ = memory.set(m.vm.memory().clone());
    if let Some(o) = &cfg.observer {
        o.attach(m.vm.memory().clone());
    }
    let seq = AtomicU64::new(0);
    let serial2: SharedBuffer = m.serial2.clone();
    let control = RunControl::new();
    let done = AtomicBool::new(false);
    let hits: Vec<AtomicU64> = cfg.probes.iter().map(|_| AtomicU64::new(0)).collect();
    let (outcomes, watcher_stop, status) = std::thread::scope(|s| {
        let watcher = s.spawn(|| loop {
            if let Some(st) = last_exit_report(&serial2.contents()) {
                control.request_stop();
                return (LinuxStop::Reported, Some(st));
            }
            let ended = *ended.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(end) = ended {
                // The UART output of the last moments is already out: stop.
                control.request_stop();
                return (end, None);
            }
            if arm_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some()
            {
                control.request_stop();
                return (LinuxStop::Stopped, None);
            }
            if stop.load(Ordering::SeqCst) {
                control.request_stop();
                return (LinuxStop::Stopped, None);
            }
            if start.elapsed() > timeout {
                control.request_stop();
                return (LinuxStop::TimedOut, None);
            }
            if done.load(Ordering::SeqCst) {
                return (LinuxStop::Stopped, None);
            }
            std::thread::sleep(Duration::from_millis(20));
        });
        let out = m.run(
            traps.clone(),
            &|vcpu, ev| {
                let VcpuEvent::Hit { hit, regs, sregs } = ev else {
                    return false;
                };
                if counting.load(Ordering::Relaxed) {
                    if let Some(h) = usize::try_from(hit.probe.0).ok().and_then(|i| hits.get(i)) {
                        h.fetch_add(1, Ordering::Relaxed);
                    }
                }
                let Some(o) = &cfg.observer else {
                    return false;
                };
                let probe_hit = ProbeHit {
                    probe: hit.probe,
                    vcpu,
                    seq: seq.fetch_add(1, Ordering::Relaxed) + 1,
                    time_ns: u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX),
                    regs: regs_from_kvm(regs, sregs),
                    held: true,
                    mem: [None; ornament_engine::wire::MAX_MEM_READS],
                    bytes: None,
                };
                match o.on_hit(&probe_hit) {
                    Action::Continue => {}
                    other => tracing::warn!(
                        ?other,
                        "the KVM engine does not apply this action yet; continuing"
                    ),
                }
                false
            },
            &control,
        );
        done.store(true, Ordering::SeqCst);
        let (st, status) = watcher.join().unwrap_or((LinuxStop::Stopped, None));
        (out, st, status)
    });
    if let Some(e) = arm_error.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(e);
    }
    let outcomes = outcomes.map_err(LinuxRunError::Machine)?;
    let guest_stop = guest_stop(&outcomes, cfg.system_map.as_deref())?;
    let stop = match (watcher_stop, guest_stop) {
        (LinuxStop::Reported, _) => LinuxStop::Reported,
        (_, Some(r)) => LinuxStop::Guest(r),
        (w, None) => w,
    };
    let boot_to_init = *boot_to_init.lock().unwrap_or_else(|p| p.into_inner());
    Ok(LinuxRunOutcome {
        guest_status: status,
        stop,
        fixups: FixupCounts::from_stats(outcomes.iter().map(|o| &o.stats)),
        probe_hits: cfg
            .probes
            .iter()
            .zip(&hits)
            .map(|(p, h)| (p.name.clone(), h.load(Ordering::Relaxed)))
            .collect(),
        boot_to_init,
        wall: start.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: &str = "ffffffff81000000 T _text\n\
                       ffffffff816edd10 T proc_fork_connector\n\
                       ffffffff816ede30 T proc_exec_connector\n\
                       ffffffff81c00be0 T asm_exc_page_fault\n";

    #[test]
    fn symbols_by_address_and_name() {
        assert_eq!(
            nearest_symbol(MAP, 0xffff_ffff_816e_dd15).as_deref(),
            Some("proc_fork_connector+0x5")
        );
        assert_eq!(
            nearest_symbol(MAP, 0xffff_ffff_81c0_0be0).as_deref(),
            Some("asm_exc_page_fault+0x0")
        );
        assert_eq!(nearest_symbol(MAP, 0x1000), None);
        assert_eq!(
            symbol_address(MAP, "proc_exec_connector"),
            Some(0xffff_ffff_816e_de30)
        );
        assert_eq!(symbol_address(MAP, "proc_exit_connector"), None);
    }

    #[test]
    fn kernel_sites_are_offset_from_the_text_map() {
        let s = kernel_site(0xffff_ffff_816e_dd10);
        assert_eq!(s.gpa, Gpa(0x16e_dd10));
        assert_eq!(s.gva, Gva(0xffff_ffff_816e_dd10));
    }

    #[test]
    fn gzip_then_plain_archive_is_inflated_and_kept() {
        use std::io::Write as _;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(b"070701base").expect("gzip");
        let mut bytes = gz.finish().expect("gzip");
        bytes.extend_from_slice(&[0, 0]);
        bytes.extend_from_slice(b"070701overlay");
        let out = inflate_leading_gzip(&bytes)
            .expect("inflate")
            .expect("gzip");
        assert_eq!(&out[..10], b"070701base");
        // The overlay starts 4-aligned right after the inflated archive's padding.
        assert_eq!(&out[10..12], &[0, 0]);
        assert_eq!(&out[12..], b"070701overlay");
        assert_eq!(inflate_leading_gzip(b"070701").expect("plain"), None);
    }

    #[test]
    fn fixups_sum_over_vcpus() {
        let a = ExitStats {
            completed_int3: 2,
            syscall_entries: 5,
            ..Default::default()
        };
        let b = ExitStats {
            completed_int3: 1,
            completed_fwait: 3,
            page_faults_passed: 7,
            ..Default::default()
        };
        assert_eq!(
            FixupCounts::from_stats([&a, &b]),
            FixupCounts {
                int3: 3,
                fwait: 3,
                clac_stac: 0,
                syscall_entries: 5,
                page_faults_passed: 7
            }
        );
    }
}
