//! `ornament run --engine kvm`: the guest on ornament's own VMM (`ornament-kvm`).
//! On a PVM host (`--force`) in PVM compatibility mode: the ELF vmlinux booted
//! directly, an uncompressed initramfs, and the VMM completing what PVM's
//! kernel-mode emulator refuses.
//!
//! Events (`--watch`, `--tree`, `--pid`): the probes of introspect's probe set are
//! armed as patched fentry sites once user space starts, and every hit (held: the
//! vCPU waits) goes through the same monitor and ornaments as under QEMU
//! ([`KvmWatch`]). The kernel runs with `nokaslr` here, so the layout is known
//! without reading registers. Not wired yet: `--deny-syscall`, `--pause-on-exec`,
//! `--control`, and every-syscall watching (`do_syscall_64` has no fentry site to
//! patch).

use crate::guest::{GuestView, RunControl};
use crate::status;
use crate::watch::{Record, Session, WatchPlan};
use anyhow::{bail, Context, Result};
use ornament_engine::{Action, ProbeHit};
use ornament_introspect::kaslr::KernelLayout;
use ornament_introspect::probes::ProbeSet;
use ornament_introspect::profile::Profile;
use ornament_kvm::linux::{run_linux, HitObserver, LinuxProbe, LinuxRunConfig};
use ornament_kvm::memory::KvmMemory;
use ornament_kvm::trap::TrapKind;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What to boot on our VMM.
#[derive(Debug)]
pub struct KvmBoot {
    /// ELF vmlinux (or a bzImage, slow on PVM).
    pub kernel: PathBuf,
    /// Initramfs (gzipped base + uncompressed overlay; inflated by the VMM).
    pub initrd: PathBuf,
    /// System.map, to name an instruction the VMM cannot complete.
    pub system_map: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest RAM.
    pub mem_size_mib: u32,
    /// PVM compatibility mode.
    pub pvm_compat: bool,
    /// Events to observe and report, with the kernel's profile (`None`: no profile, so
    /// nothing is observed and the guest's own status report is taken).
    pub watch: Option<(WatchPlan, Arc<Profile>)>,
    /// Where events go, for messages.
    pub output_target: String,
}

/// The monitor and ornaments of a `--watch` run on our VMM: built when guest memory
/// exists, fed every held hit.
pub struct KvmWatch {
    plan: WatchPlan,
    profile: Arc<Profile>,
    vcpus: u32,
    probes: Vec<LinuxProbe>,
    /// The probe set `probes` came from, handed to the session when guest memory exists.
    set: Mutex<Option<ProbeSet>>,
    session: Mutex<Option<Session>>,
    error: Mutex<Option<anyhow::Error>>,
    stop: Arc<AtomicBool>,
}

impl KvmWatch {
    /// Check that this engine can do what `plan` asks, and resolve its probes.
    pub fn new(
        plan: WatchPlan,
        profile: Arc<Profile>,
        vcpus: u32,
        stop: Arc<AtomicBool>,
    ) -> Result<Self> {
        if !plan.cfg.deny.is_empty() {
            bail!("--deny-syscall is not wired through --engine kvm yet; use --engine qemu");
        }
        if plan.pause_on_exec.is_some() {
            bail!("--pause-on-exec is not wired through --engine kvm yet; use --engine qemu");
        }
        let set = ProbeSet::new(&profile, KernelLayout::NONE, &plan.cfg)?;
        let mut probes = Vec::new();
        for spec in set.specs() {
            if spec.symbol == "do_syscall_64" {
                bail!(
                    "--engine kvm traps patched fentry sites, and do_syscall_64 (every syscall, or a syscall without its own __x64_sys_ function) has none; name the syscalls (--watch syscall=NAME,...) or use --engine qemu"
                );
            }
            probes.push(LinuxProbe {
                name: spec.symbol.clone(),
                gva: spec.at.0,
            });
        }
        Ok(Self {
            plan,
            profile,
            vcpus,
            probes,
            set: Mutex::new(Some(set)),
            session: Mutex::new(None),
            error: Mutex::new(None),
            stop,
        })
    }

    /// The probes, in probe-id order.
    pub fn probes(&self) -> &[LinuxProbe] {
        &self.probes
    }

    /// Flush the ornaments (the tree, counters): what the session recorded (none if it
    /// never started), or the first error met.
    pub fn finish(&self) -> Result<Option<Record>> {
        let record = self
            .session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
            .map(Session::finish);
        match self.error.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(e) => Err(e),
            None => Ok(record),
        }
    }
}

impl HitObserver for KvmWatch {
    fn attach(&self, memory: Arc<KvmMemory>) {
        let view = GuestView {
            ram: memory,
            ram_for_writes: None,
            profile: self.profile.clone(),
            layout: KernelLayout::NONE,
            vcpus: self.vcpus,
            control: Arc::new(RunControl::default()),
            regs: ornament_engine::Regs::default(),
        };
        let set = self.set.lock().unwrap_or_else(|p| p.into_inner()).take();
        let session = match set {
            Some(set) => Session::with_probes(&self.plan, &view, set, &self.stop),
            None => Session::new(&self.plan, &view, &self.stop),
        };
        match session {
            Ok(s) => *self.session.lock().unwrap_or_else(|p| p.into_inner()) = Some(s),
            Err(e) => *self.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e),
        }
    }

    fn on_hit(&self, hit: &ProbeHit) -> Action {
        let mut s = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let Some(s) = s.as_mut() else {
            return Action::Continue;
        };
        let (action, pause) = s.deliver_full(hit);
        if pause {
            tracing::warn!(
                "an ornament asked to pause the guest: not wired through --engine kvm yet"
            );
        }
        action
    }
}

/// How long a PVM boot may take unless `--timeout` says otherwise.
pub const PVM_DEFAULT_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Boot and run; returns the guest command's status.
pub fn run(b: KvmBoot, stop: &Arc<AtomicBool>, timeout: Option<Duration>) -> Result<u8> {
    let watch = match b.watch {
        Some((plan, profile)) => Some(Arc::new(KvmWatch::new(
            plan,
            profile,
            b.vcpus,
            stop.clone(),
        )?)),
        None => None,
    };
    let cfg = LinuxRunConfig {
        kernel: b.kernel,
        initrd: Some(b.initrd),
        cmdline: b.cmdline,
        vcpus: b.vcpus,
        mem_size_mib: b.mem_size_mib,
        console: Box::new(std::io::stderr()),
        pvm_compat: b.pvm_compat,
        system_map: b.system_map,
        probes: watch
            .as_ref()
            .map(|w| w.probes().to_vec())
            .unwrap_or_default(),
        trap: TrapKind::PatchedSite,
        arm_probes_after: None,
        observer: watch.clone().map(|w| w as Arc<dyn HitObserver>),
    };
    let out = run_linux(cfg, stop, timeout.unwrap_or(PVM_DEFAULT_TIMEOUT));
    // Events seen so far are written out even when the run failed.
    let record = watch.as_ref().map(|w| w.finish()).transpose()?.flatten();
    if let Some(r) = &record {
        if let Some(code) = status::check_output(r, &b.output_target)? {
            return Ok(code);
        }
    }
    let out = out.context("running the guest on ornament's KVM VMM")?;
    if let Some(t) = out.boot_to_init {
        eprintln!(
            "ornament: kvm: /init after {:.1} s; completions: {:?}",
            t.as_secs_f64(),
            out.fixups
        );
    }
    if watch.is_some() && record.is_none() {
        bail!("the guest ran to its end but ornament never saw its memory to watch it");
    }
    status::decide(
        record.as_ref().map(|r| &r.command),
        out.guest_status,
        || format!("{:?} after {:.0} s", out.stop, out.wall.as_secs_f64()),
    )
}
