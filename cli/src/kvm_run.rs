//! `ornament run --engine kvm`: the guest on ornament's own VMM (`ornament-kvm`'s
//! [`LinuxEngine`]). On a PVM host (`--force`) in PVM compatibility mode: the ELF vmlinux
//! booted directly, an uncompressed initramfs, and the VMM completing what PVM's
//! kernel-mode emulator refuses.
//!
//! Events, deny, pause and the control socket go through the same watch session as under
//! QEMU ([`crate::watch::watch`]). The kernel runs with `nokaslr` here, so the layout is
//! the link-time one.

use crate::status;
use crate::watch::{Extra, Kernel, WatchPlan};
use anyhow::{Context, Result};
use ornament_engine::{Engine, EngineEvent};
use ornament_introspect::kaslr::KernelLayout;
use ornament_introspect::profile::Profile;
use ornament_introspect::session::{Limits, SessionError};
use ornament_introspect::symbols::SymbolTable;
use ornament_kvm::arm_point::ARM_POINT_SYMBOL;
use ornament_kvm::linux_engine::{LinuxBoot, LinuxEngine};
use ornament_kvm::trap::TrapKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    /// Serve the control socket here.
    pub control: Option<PathBuf>,
}

/// How long a PVM boot may take unless `--timeout` says otherwise.
pub const PVM_DEFAULT_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Boot and run; returns the guest command's status.
pub fn run(
    b: KvmBoot,
    stop: &Arc<AtomicBool>,
    timeout: Option<Duration>,
    extra: Option<Extra>,
) -> Result<u8> {
    // Probes are armed when the kernel first reaches kernel_execve (link-time address:
    // the kernel runs with nokaslr), whatever the console prints: from the profile, else
    // from the kernel's System.map.
    let arm_point = b.watch.as_ref().and_then(|(_, p)| {
        p.symbol(ARM_POINT_SYMBOL).ok().or_else(|| {
            let map = b.system_map.as_deref()?;
            match SymbolTable::from_system_map(map) {
                Ok(t) => t.lookup(ARM_POINT_SYMBOL),
                Err(e) => {
                    tracing::warn!(map = %map.display(), error = %e, "cannot read the System.map");
                    None
                }
            }
        })
    });
    let mut engine = LinuxEngine::boot(LinuxBoot {
        kernel: b.kernel,
        initrd: Some(b.initrd),
        cmdline: b.cmdline,
        vcpus: b.vcpus,
        mem_size_mib: b.mem_size_mib,
        console: Box::new(std::io::stderr()),
        pvm_compat: b.pvm_compat,
        system_map: b.system_map,
        trap: TrapKind::PatchedSite,
        arm_point,
    })
    .context("starting the guest on ornament's KVM VMM")?;
    let limits = Limits {
        stop: stop.clone(),
        timeout: Some(timeout.unwrap_or(PVM_DEFAULT_TIMEOUT)),
    };
    let record = match b.watch {
        Some((plan, profile)) => {
            let kernel = Kernel {
                profile,
                layout: KernelLayout::NONE,
                regs: ornament_engine::Regs::default(),
            };
            let (record, ran) = crate::watch::watch(
                &mut engine,
                &kernel,
                &plan,
                b.control.as_deref(),
                &limits,
                extra,
            )?;
            if let Some(code) = status::check_output(&record, &b.output_target)? {
                engine.stop();
                return Ok(code);
            }
            if let Err(e) = ran {
                engine.stop();
                if matches!(e.downcast_ref(), Some(SessionError::Interrupted)) {
                    return Err(crate::cmd::run::Interrupted.into());
                }
                let end = engine.finish();
                return Err(match end {
                    Err(why) => anyhow::Error::from(why).context(e.to_string()),
                    Ok(_) => e,
                });
            }
            Some(record)
        }
        None => {
            unwatched(&mut engine, &limits, b.control.as_deref())?;
            None
        }
    };
    let end = engine
        .finish()
        .context("running the guest on ornament's KVM VMM")?;
    if let Some(t) = end.boot_to_init {
        eprintln!(
            "ornament: kvm: /init after {:.1} s; completions: {:?}",
            t.as_secs_f64(),
            end.fixups
        );
    }
    status::decide(
        record.as_ref().map(|r| &r.command),
        end.guest_status,
        || format!("{:?} after {:.0} s", end.stop, end.wall.as_secs_f64()),
    )
}

/// Run a guest nobody watches (no profile) to its end.
fn unwatched(engine: &mut LinuxEngine, limits: &Limits, control: Option<&Path>) -> Result<()> {
    if control.is_some() {
        anyhow::bail!("--control needs the kernel's profile (give --profile)");
    }
    let begin = Instant::now();
    engine.resume()?;
    loop {
        if limits.stop.load(Ordering::Relaxed) {
            engine.stop();
            return Err(crate::cmd::run::Interrupted.into());
        }
        if limits.timeout.is_some_and(|t| begin.elapsed() > t) {
            engine.stop();
            return Ok(());
        }
        if let EngineEvent::Exited(_) = engine.next_event(Duration::from_millis(50))? {
            return Ok(());
        }
    }
}
