//! `ornament run --engine kvm`: the guest on ornament's own VMM (`ornament-kvm`).
//! On a PVM host (`--force`) in PVM compatibility mode: the ELF vmlinux booted
//! directly, an uncompressed initramfs, and the VMM completing what PVM's
//! kernel-mode emulator refuses. Events are not wired through this engine yet.

use anyhow::{bail, Context, Result};
use ornament_kvm::linux::{run_linux, LinuxRunConfig};
use ornament_kvm::trap::TrapKind;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
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
}

/// How long a PVM boot may take unless `--timeout` says otherwise.
pub const PVM_DEFAULT_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Boot and run; returns the guest command's status.
pub fn run(b: KvmBoot, stop: &AtomicBool, timeout: Option<Duration>) -> Result<u8> {
    let cfg = LinuxRunConfig {
        kernel: b.kernel,
        initrd: Some(b.initrd),
        cmdline: b.cmdline,
        vcpus: b.vcpus,
        mem_size_mib: b.mem_size_mib,
        console: Box::new(std::io::stderr()),
        pvm_compat: b.pvm_compat,
        system_map: b.system_map,
        probes: Vec::new(),
        trap: TrapKind::PatchedSite,
        arm_probes_after: None,
    };
    let out = run_linux(cfg, stop, timeout.unwrap_or(PVM_DEFAULT_TIMEOUT))
        .context("running the guest on ornament's KVM VMM")?;
    if let Some(t) = out.boot_to_init {
        eprintln!(
            "ornament: kvm: /init after {:.1} s; completions: {:?}",
            t.as_secs_f64(),
            out.fixups
        );
    }
    match out.guest_status {
        Some(code) => Ok(u8::try_from(code.clamp(0, 255)).unwrap_or(255)),
        None => bail!(
            "the guest stopped without reporting the command's exit status ({:?} after {:.0} s)",
            out.stop,
            out.wall.as_secs_f64()
        ),
    }
}
