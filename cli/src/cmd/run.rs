//! `ornament run`: boot a guest, run a command in it, exit with its status.

use crate::banner::{self, Verdict};
use crate::identify;
use crate::select::{self, EngineChoice, Selected};
use crate::status;
use crate::watch::Extra;
use anyhow::{bail, Context, Result};
use ornament_engine::Engine;
use ornament_images::image::files;
use ornament_images::kernel_file;
use ornament_images::overlay::{parse_add, RunOverlay};
use ornament_images::{build_image, BuildOptions, DEFAULT_IMAGE};
use ornament_introspect::command::CommandView;
use ornament_introspect::session::{Limits, SessionError};
use ornament_qemu::{Accel, MachineError, QemuConfig, QemuEngine, QemuMachine, RunPaths};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Smallest guest memory we start a guest with.
pub const MIN_MEMORY_MIB: u32 = 128;
/// Most vCPUs QEMU's `pc` machine takes.
pub const MAX_VCPUS: u32 = 255;
/// Kernel command line every guest gets before `--append`.
pub const BASE_CMDLINE: &str = "console=ttyS0 panic=-1 quiet";

/// Boot a guest and run COMMAND in it as a child of ornament's /init. The guest
/// console goes to stderr; ornament exits with COMMAND's exit status (128+N if
/// killed by signal N), or 125 if ornament itself failed.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Guest image to boot (see `ornament image list`); built on first use.
    #[arg(long, default_value = DEFAULT_IMAGE, conflicts_with = "kernel")]
    image: String,
    /// Build the image's kernel from this Debian package instead of the newest of the
    /// image's meta-packages: a meta-package or a kernel package, at VERSION if given.
    #[arg(long, value_name = "NAME[=VERSION]", conflicts_with = "kernel")]
    kernel_package: Option<String>,
    /// Boot this kernel (bzImage or ELF vmlinux) instead of an image's.
    #[arg(long, value_name = "FILE")]
    kernel: Option<PathBuf>,
    /// Initramfs for --kernel (default: the default image's, which has ornament's /init).
    #[arg(long, value_name = "FILE", requires = "kernel")]
    initrd: Option<PathBuf>,
    /// System.map of --kernel (optional: the kernel's own kallsyms are read), checked
    /// against the kernel and the running kernel.
    #[arg(long, value_name = "FILE", requires = "kernel")]
    system_map: Option<PathBuf>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 512)]
    memory: u32,
    /// Which engine runs the guest.
    #[arg(long, value_enum, default_value_t = EngineChoice::Auto)]
    engine: EngineChoice,
    /// Use the chosen engine even where it would be very slow (PVM KVM).
    #[arg(long)]
    force: bool,
    /// Extra kernel command-line arguments (after "console=ttyS0 panic=-1 quiet").
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    append: Option<String>,
    /// Add a host file to the guest: HOST:GUEST (repeatable).
    #[arg(long = "add", value_name = "HOST:GUEST")]
    add: Vec<String>,
    /// Image cache directory (default: $ORNAMENT_CACHE_DIR, else $XDG_CACHE_HOME/ornament).
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Give up (and stop the guest) after this many seconds.
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,
    /// QEMU binary (default: $ORNAMENT_QEMU, else qemu-system-x86_64 on PATH).
    #[arg(long, value_name = "FILE")]
    qemu: Option<PathBuf>,
    /// Kernel profile for --kernel (see `ornament profile generate`); without it the
    /// profile is made from the kernel file and cached by its SHA-256. Images have their own.
    #[arg(long, value_name = "FILE", requires = "kernel")]
    profile: Option<PathBuf>,
    /// Serve a control socket (JSON lines) at SOCKET, e.g. for `ornament ps`.
    #[arg(long, value_name = "SOCKET")]
    control: Option<PathBuf>,
    #[command(flatten)]
    watch: crate::watch::WatchArgs,
    /// The command to run in the guest, after `--`.
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

/// The run was interrupted by a signal.
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
pub struct Interrupted;

/// The guest's kernel command line: ours, then `--append`.
fn kernel_cmdline(append: Option<&str>) -> String {
    match append {
        Some(extra) => format!("{BASE_CMDLINE} {extra}"),
        None => BASE_CMDLINE.to_owned(),
    }
}

/// The image's initramfs with this run's command and `--add` files laid over it.
fn write_initrd(
    a: &RunArgs,
    add: &[(PathBuf, String)],
    base: &std::path::Path,
    out: &std::path::Path,
) -> Result<()> {
    RunOverlay {
        command: a.command.clone(),
        add: add.to_vec(),
    }
    .write_combined(base, out)?;
    Ok(())
}

/// Signal handling for a run: `stop` is set by SIGINT and SIGTERM, and the run loops
/// check it and stop the guest. While `immediate` is set (before QEMU or our VMM is
/// started: image build, initramfs), the signal ends the process at once with 130;
/// what it leaves (a partial image, a run directory) the next start removes.
struct Signals {
    stop: Arc<AtomicBool>,
    immediate: Arc<AtomicBool>,
}

impl Signals {
    fn install() -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let immediate = Arc::new(AtomicBool::new(true));
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register_conditional_shutdown(
                sig,
                i32::from(EXIT_INTERRUPTED),
                immediate.clone(),
            )
            .context("installing signal handler")?;
            signal_hook::flag::register(sig, stop.clone()).context("installing signal handler")?;
        }
        Ok(Self { stop, immediate })
    }

    /// From now on a signal stops the guest (and the run returns `Interrupted`).
    fn guest_starting(&self) -> Arc<AtomicBool> {
        self.immediate.store(false, Ordering::SeqCst);
        self.stop.clone()
    }
}

/// Exit status of an interrupted run (128 + SIGINT).
pub const EXIT_INTERRUPTED: u8 = 130;

/// A private (0700) temporary directory for sockets of this run.
pub fn private_dir() -> Result<tempfile::TempDir> {
    Ok(ornament_qemu::machine::run_dir()?)
}

struct Boot {
    kernel: PathBuf,
    initrd: PathBuf,
    system_map: Option<PathBuf>,
    /// The image directory (for its profile), when booting an image.
    image_dir: Option<PathBuf>,
}

fn resolve(a: &RunArgs) -> Result<Boot> {
    let opts = BuildOptions {
        cache_dir: a.cache_dir.clone(),
        ..BuildOptions::default()
    };
    match &a.kernel {
        Some(k) => {
            let initrd = match &a.initrd {
                Some(i) => i.clone(),
                None => {
                    let img = build_image(DEFAULT_IMAGE, &opts)
                        .context("building the default image for its initramfs")?;
                    super::image::announce_skipped(&img);
                    img.initramfs()
                }
            };
            Ok(Boot {
                kernel: k.clone(),
                initrd,
                system_map: a.system_map.clone(),
                image_dir: None,
            })
        }
        None => {
            let opts = BuildOptions {
                kernel_package: a.kernel_package.clone(),
                ..opts
            };
            let img = build_image(&a.image, &opts)
                .with_context(|| format!("preparing image {}", a.image))?;
            super::image::announce_skipped(&img);
            Ok(Boot {
                kernel: img.kernel(),
                initrd: img.initramfs(),
                system_map: Some(img.path(files::SYSTEM_MAP)),
                image_dir: Some(img.dir.clone()),
            })
        }
    }
}

/// Run; returns the exit status for the process.
pub fn run(a: RunArgs) -> Result<u8> {
    run_with(a, None)
}

/// `ornament run` with ornaments of a program's own ([`Extra`]), on whichever engine
/// the arguments choose.
pub fn run_with(a: RunArgs, extra: Option<Extra>) -> Result<u8> {
    let signals = Signals::install()?;
    // What killed runs left (run directories, old RAM files) goes first.
    ornament_qemu::machine::sweep_debris();
    if a.vcpus == 0 || a.vcpus > MAX_VCPUS {
        bail!("--vcpus {}: must be between 1 and {MAX_VCPUS}", a.vcpus);
    }
    if a.memory < MIN_MEMORY_MIB {
        bail!(
            "--memory {} MiB is too small: a Linux guest needs at least {MIN_MEMORY_MIB} MiB",
            a.memory
        );
    }
    let add = a
        .add
        .iter()
        .map(|s| parse_add(s))
        .collect::<Result<Vec<_>, _>>()?;
    for (host, _) in &add {
        if !host.is_file() {
            bail!("--add {}: no such file on the host", host.display());
        }
    }
    let mut watch = a.watch.plan()?;
    if let Some(x) = &extra {
        watch.extend(x);
    }
    let needs_qemu = watch
        .needs_qemu()
        .or_else(|| a.qemu.as_ref().map(|q| format!("--qemu {}", q.display())));
    let (selected, why) = select::select(a.engine, a.force, needs_qemu.as_deref())?;
    eprintln!("ornament: {why}");

    let boot = resolve(&a)?;
    let kind = kernel_file::inspect(&boot.kernel)?;
    let initrd_len = std::fs::metadata(&boot.initrd)
        .with_context(|| format!("initramfs {}", boot.initrd.display()))?
        .len();
    let kernel_len = std::fs::metadata(&boot.kernel)?.len();
    // The kernel unpacks itself and the initramfs (about 4x compressed) in RAM.
    let need_mib = 64 + (kernel_len * 4 + initrd_len * 5) / (1 << 20);
    if u64::from(a.memory) < need_mib {
        bail!(
            "--memory {} MiB is too small for kernel {} and initramfs {}: they need at least {need_mib} MiB",
            a.memory,
            boot.kernel.display(),
            boot.initrd.display()
        );
    }
    check_add_fits(&add, need_mib, a.memory)?;
    let anchors = boot
        .system_map
        .as_deref()
        .map(banner::anchors)
        .transpose()?;
    tracing::info!(?kind, "kernel");

    // Every run observes the command's exit, so every run wants the kernel's profile:
    // the image's, --profile, or one made from the --kernel file itself (cached).
    let made = match (&a.profile, &boot.image_dir) {
        (Some(p), _) => identify::load_profile(p),
        (None, Some(dir)) => identify::image_profile(dir),
        (None, None) => identify::kernel_profile(&boot.kernel, a.cache_dir.as_deref()),
    };
    let profile = match made {
        Ok(p) => {
            if let (Some(map), None) = (&boot.system_map, &boot.image_dir) {
                identify::check_system_map(map, &boot.kernel, &p)?;
            }
            Some(Arc::new(p))
        }
        Err(e)
            if a.profile.is_none()
                && boot.image_dir.is_none()
                && !(a.watch.asked() || a.control.is_some() || extra.is_some()) =>
        {
            eprintln!("ornament: warning: no profile for {}: {e:#}; ornament cannot observe the command's exit, and takes the status the guest reports", boot.kernel.display());
            None
        }
        Err(e) => return Err(e),
    };
    if let Selected::Kvm { pvm_compat } = selected {
        // Our VMM boots the ELF vmlinux directly (the bzImage decompressor alone
        // takes minutes in emulated kernel mode, and the layout is the link-time one
        // either way: `nokaslr` below): a bzImage is decompressed here, as the image
        // build does.
        let dir = private_dir()?;
        let kernel = match (&boot.image_dir, &kind) {
            (Some(image), _) => image.join(files::VMLINUX),
            (None, kernel_file::KernelKind::Elf) => boot.kernel.clone(),
            (None, _) => {
                let v = ornament_introspect::bzimage::read_vmlinux(&boot.kernel)?;
                let elf = dir.path().join("vmlinux");
                std::fs::write(&elf, &v.bytes).with_context(|| {
                    format!("writing the decompressed kernel {}", elf.display())
                })?;
                tracing::info!(compression = ?v.compression, bytes = v.bytes.len(), "bzImage decompressed for our VMM");
                elf
            }
        };
        let initrd = dir.path().join("initramfs");
        write_initrd(&a, &add, &boot.initrd, &initrd)?;
        let mut cmdline = kernel_cmdline(a.append.as_deref());
        let watch = profile.map(|p| {
            // The events need the kernel's layout: without KASLR it is the link-time
            // one.
            cmdline.push_str(" nokaslr");
            (watch, p)
        });
        let stop = signals.guest_starting();
        return crate::kvm_run::run(
            crate::kvm_run::KvmBoot {
                kernel,
                initrd,
                system_map: boot.system_map.clone(),
                cmdline,
                vcpus: a.vcpus,
                mem_size_mib: a.memory,
                pvm_compat,
                watch,
                output_target: output_target(&a),
                control: a.control.clone(),
            },
            &stop,
            a.timeout.map(Duration::from_secs),
            extra,
        );
    }

    let qemu = ornament_qemu::qemu_binary(a.qemu.as_deref());
    let qemu_info = ornament_qemu::probe(&qemu)?;
    tracing::info!(version = %qemu_info.version_line, "QEMU");
    let trap = match &profile {
        Some(_) => {
            let (trap, why) = ornament_qemu::choose_trap(watch.trap.engine(), &qemu_info)?;
            eprintln!("ornament: {why}");
            Some(trap)
        }
        None => None,
    };
    let paths = RunPaths::new()?;
    let initrd = paths.dir.path().join("initramfs");
    write_initrd(&a, &add, &boot.initrd, &initrd)?;
    let cmdline = kernel_cmdline(a.append.as_deref());
    let accel = if selected == Selected::QemuKvm {
        Accel::Kvm
    } else {
        Accel::Tcg
    };
    let cfg = QemuConfig::boot(
        qemu,
        boot.kernel.clone(),
        initrd,
        cmdline,
        a.vcpus,
        a.memory,
        accel,
    );

    let stop = signals.guest_starting();
    let started = |e: anyhow::Error| {
        // QEMU was started and stopped again: a Ctrl-C meanwhile is still a Ctrl-C.
        if stop.load(Ordering::Relaxed) {
            anyhow::Error::from(Interrupted)
        } else {
            e
        }
    };
    if let (Some(profile), Some(trap)) = (profile, trap) {
        let mut engine = QemuEngine::start(cfg, paths, Some(Box::new(std::io::stderr())), &trap)
            .map_err(|e| started(e.into()))?;
        // Identify the kernel (guest stopped once), then arm and serve, then run.
        let kernel = match identify::identify(&mut engine, profile, &stop) {
            Ok(k) => k,
            Err(e) => return Err(why_failed(engine.machine(), &stop, e)),
        };
        if let Some(anch) = anchors {
            // A --system-map is checked against the running kernel with a profile too.
            let map = boot.system_map.clone().unwrap_or_default();
            let ram = engine.memory();
            let refused = match banner::check(ram.as_ref(), anch, true) {
                Verdict::Match(_) => None,
                Verdict::Mismatch(running) => Some(running),
                Verdict::NotYet => Some(format!(
                    "no banner where this map puts it; profile of {}",
                    kernel.profile.kernel.release
                )),
            };
            if let Some(running) = refused {
                engine.stop();
                return Err(banner::BannerError::Mismatch { path: map, running }.into());
            }
        }
        let limits = Limits {
            stop: stop.clone(),
            timeout: a.timeout.map(Duration::from_secs),
        };
        let (record, waited) = crate::watch::watch(
            &mut engine,
            &kernel,
            &watch,
            a.control.as_deref(),
            &limits,
            extra,
        )?;
        match status::check_output(&record, &output_target(&a)) {
            Ok(None) => {}
            lost => {
                // Events were lost: the run ends here, whatever the guest does.
                engine.stop();
                return lost.map(|code| code.unwrap_or(status::BROKEN_PIPE_STATUS));
            }
        }
        if let Err(e) = waited {
            return Err(why_failed(engine.machine(), &stop, e));
        }
        if stop.load(Ordering::Relaxed) {
            // The guest ended as the Ctrl-C came: still a Ctrl-C.
            engine.stop();
            return Err(Interrupted.into());
        }
        return exit_status(engine.finish(), Some(&record.command));
    }
    let mut machine = QemuMachine::start(cfg, paths, Some(Box::new(std::io::stderr())), None)
        .map_err(|e| started(e.into()))?;
    let mismatch: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let done = Arc::new(AtomicBool::new(false));
    let identity = anchors.map(|anch| {
        let ram = machine.ram();
        let stop = stop.clone();
        let mismatch = mismatch.clone();
        let done = done.clone();
        std::thread::spawn(move || {
            // A banner elsewhere may be seen while the kernel is still unpacking
            // itself; only one that stays unmatched for SETTLE is a mismatch.
            const SETTLE: Duration = Duration::from_secs(3);
            let begin = Instant::now();
            let mut seen: Option<(Instant, String)> = None;
            let mut round = 0u32;
            while begin.elapsed() < Duration::from_secs(120) {
                let finished = done.load(Ordering::Relaxed) || stop.load(Ordering::Relaxed);
                // The aligned places are cheap to look at; the full scan for a
                // banner elsewhere reads all of RAM, so it runs once a second.
                let full = finished || round % 10 == 9;
                round += 1;
                match banner::check(ram.as_ref(), anch, full) {
                    Verdict::Match(b) => {
                        tracing::info!(banner = %b, "System.map matches the running kernel");
                        return;
                    }
                    Verdict::Mismatch(running) => {
                        let first = seen
                            .get_or_insert_with(|| (Instant::now(), running.clone()))
                            .0;
                        if finished || first.elapsed() > SETTLE {
                            *mismatch.lock().unwrap_or_else(|p| p.into_inner()) = Some(running);
                            stop.store(true, Ordering::Relaxed);
                            return;
                        }
                    }
                    Verdict::NotYet => {}
                }
                if finished {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    });
    machine.resume()?;
    let outcome = machine.wait(&stop, a.timeout.map(Duration::from_secs));
    done.store(true, Ordering::Relaxed);
    if let Some(t) = identity {
        let _ = t.join();
    }
    if let Some(running) = mismatch.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(banner::BannerError::Mismatch {
            path: boot.system_map.unwrap_or_default(),
            running,
        }
        .into());
    }
    exit_status(outcome, None)
}

/// The error to report for a run that failed with `e` after QEMU started: an
/// interruption if one was asked for, else QEMU's own death or a guest panic if that is
/// what happened (the trap backend's error it caused says less), else `e`. QEMU is
/// stopped.
fn why_failed(machine: &mut QemuMachine, stop: &AtomicBool, e: anyhow::Error) -> anyhow::Error {
    let interrupted = stop.load(Ordering::Relaxed)
        || matches!(
            e.downcast_ref::<MachineError>(),
            Some(MachineError::Interrupted)
        )
        || e.downcast_ref::<Interrupted>().is_some()
        || matches!(
            e.downcast_ref::<SessionError>(),
            Some(SessionError::Interrupted)
        );
    if interrupted {
        machine.kill();
        return Interrupted.into();
    }
    let ended = machine.early_end();
    machine.kill();
    match ended {
        Some(end) => end.into(),
        None => e,
    }
}

/// Refuse `--add` files that cannot fit: the kernel holds the initramfs in guest memory
/// while it unpacks it into its RAM file system, so each added byte needs two.
/// `base_mib` is what the kernel and the image's initramfs need.
fn check_add_fits(add: &[(PathBuf, String)], base_mib: u64, memory_mib: u32) -> Result<()> {
    let mut total = 0u64;
    let mut largest: Option<(&PathBuf, u64)> = None;
    for (host, _) in add {
        let len = std::fs::metadata(host)
            .with_context(|| format!("--add {}", host.display()))?
            .len();
        total = total.saturating_add(len);
        if largest.is_none_or(|(_, l)| len > l) {
            largest = Some((host, len));
        }
    }
    let need_mib = base_mib.saturating_add(total.saturating_mul(2).div_ceil(1 << 20));
    match largest {
        Some((host, len)) if need_mib > u64::from(memory_mib) => bail!(
            "--add {} ({} MiB{}): the guest needs about {need_mib} MiB of memory for the kernel, its initramfs and the added files (held twice while the kernel unpacks them), more than --memory {memory_mib} MiB; give --memory {need_mib} or more, or add less",
            host.display(),
            len.div_ceil(1 << 20),
            if add.len() > 1 {
                format!(", {} MiB in all", total.div_ceil(1 << 20))
            } else {
                String::new()
            }
        ),
        _ => Ok(()),
    }
}

/// Where events go, for messages: the `--output` file or stdout.
fn output_target(a: &RunArgs) -> String {
    match a.watch.output_path() {
        Some(p) => p.display().to_string(),
        None => "stdout".to_owned(),
    }
}

/// The process exit status for a run's outcome: the command's observed status (see
/// [`status::decide`]).
fn exit_status(
    outcome: Result<ornament_qemu::RunOutcome, MachineError>,
    observed: Option<&CommandView>,
) -> Result<u8> {
    let outcome = match outcome {
        Err(MachineError::Interrupted) => return Err(Interrupted.into()),
        other => other?,
    };
    status::decide(observed, outcome.guest_status, || {
        format!(
            "QEMU exit code {:?}{}",
            outcome.qemu_code,
            if outcome.qemu_stderr.is_empty() {
                String::new()
            } else {
                format!("; QEMU said:\n{}", outcome.qemu_stderr)
            }
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn added_files_are_sized_against_memory() {
        let dir = tempfile::tempdir().expect("tmp");
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        for (f, mib) in [(&a, 100u64), (&b, 50)] {
            std::fs::File::create(f)
                .and_then(|h| h.set_len(mib << 20))
                .expect("sparse file");
        }
        let add = |fs: &[&PathBuf]| -> Vec<(PathBuf, String)> {
            fs.iter().map(|f| ((*f).clone(), "/x".to_owned())).collect()
        };
        // 112 + 2 * 100 = 312 MiB.
        assert!(check_add_fits(&add(&[&a]), 112, 312).is_ok());
        let e = check_add_fits(&add(&[&a]), 112, 311).expect_err("one MiB short");
        assert_eq!(
            e.to_string(),
            format!(
                "--add {} (100 MiB): the guest needs about 312 MiB of memory for the kernel, its initramfs and the added files (held twice while the kernel unpacks them), more than --memory 311 MiB; give --memory 312 or more, or add less",
                a.display()
            )
        );
        // Several files: the largest is named, with the total.
        let e = check_add_fits(&add(&[&b, &a]), 112, 400).expect_err("412 MiB needed");
        assert!(
            e.to_string().starts_with(&format!(
                "--add {} (100 MiB, 150 MiB in all): the guest needs about 412 MiB",
                a.display()
            )),
            "{e}"
        );
        assert!(check_add_fits(&[], 112, 128).is_ok());
    }
}
