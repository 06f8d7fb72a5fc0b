//! Which engine runs the guest, and why (printed to the user).

use std::path::Path;

/// `--engine` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineChoice {
    /// Our KVM VMM where KVM can run an unmodified kernel, else QEMU.
    Auto,
    /// Our own KVM VMM.
    Kvm,
    /// QEMU (TCG software emulation, or KVM acceleration where KVM is hardware).
    Qemu,
}

/// The kind of KVM this host has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KvmKind {
    /// No /dev/kvm.
    Absent,
    /// /dev/kvm exists but cannot be opened.
    Inaccessible,
    /// PVM (kvm_pvm): kernel mode of an unmodified guest is emulated.
    Pvm,
    /// VT-x / AMD-V.
    Hardware,
    /// Something else.
    Unknown,
}

/// Look at /dev/kvm, the loaded modules and the CPU flags.
pub fn kvm_kind() -> KvmKind {
    let dev = Path::new("/dev/kvm");
    if !dev.exists() {
        return KvmKind::Absent;
    }
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)
        .is_err()
    {
        return KvmKind::Inaccessible;
    }
    match ornament_kvm::support::kvm_kind() {
        ornament_kvm::support::KvmKind::Pvm => KvmKind::Pvm,
        ornament_kvm::support::KvmKind::Hardware => KvmKind::Hardware,
        ornament_kvm::support::KvmKind::Unknown => KvmKind::Unknown,
    }
}

/// What `run` will use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selected {
    /// QEMU with TCG.
    QemuTcg,
    /// QEMU with KVM acceleration.
    QemuKvm,
    /// ornament's own KVM VMM; `pvm_compat` on PVM hosts (`--force`).
    Kvm {
        /// PVM compatibility mode.
        pvm_compat: bool,
    },
}

/// Why an engine cannot be used.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum SelectError {
    /// --engine kvm: this host's KVM is PVM (kvm_pvm module, no VT-x/AMD-V), which runs an unmodified kernel's kernel mode through an instruction emulator and takes minutes to boot; use --engine qemu (or --engine auto), or add --force to boot it anyway in PVM compatibility mode
    KvmIsPvm,
    /// --engine kvm: /dev/kvm is missing; use --engine qemu (software emulation)
    NoKvm,
    /// --engine kvm: /dev/kvm cannot be opened (permission?); add yourself to the kvm group or use --engine qemu
    KvmInaccessible,
    /// --engine kvm: this KVM is neither hardware virtualization nor PVM; use --engine qemu
    KvmEngineNotReady,
}

/// Decide, and say why.
pub fn select(choice: EngineChoice, force: bool) -> Result<(Selected, String), SelectError> {
    let kind = kvm_kind();
    match choice {
        EngineChoice::Qemu | EngineChoice::Auto => Ok(match kind {
            KvmKind::Hardware => (
                Selected::QemuKvm,
                "engine qemu with KVM acceleration: KVM is hardware here, and ornament's own KVM VMM does not boot Linux yet".to_owned(),
            ),
            KvmKind::Pvm if choice == EngineChoice::Auto => (
                Selected::QemuTcg,
                "engine qemu (TCG): /dev/kvm here is PVM, which cannot run an unmodified kernel at usable speed".to_owned(),
            ),
            KvmKind::Absent if choice == EngineChoice::Auto => (
                Selected::QemuTcg,
                "engine qemu (TCG): no /dev/kvm on this host".to_owned(),
            ),
            _ => (Selected::QemuTcg, "engine qemu (TCG software emulation)".to_owned()),
        }),
        EngineChoice::Kvm => match kind {
            KvmKind::Pvm if !force => Err(SelectError::KvmIsPvm),
            KvmKind::Pvm => Ok((
                Selected::Kvm { pvm_compat: true },
                "engine kvm, PVM compatibility mode (--force): this KVM emulates the guest kernel's kernel mode, so the boot takes minutes (5-8 to /init); events, --deny-syscall, --pause-on-exec and --control as under QEMU (syscalls by name only)".to_owned(),
            )),
            KvmKind::Absent => Err(SelectError::NoKvm),
            KvmKind::Inaccessible => Err(SelectError::KvmInaccessible),
            KvmKind::Hardware => Ok((
                Selected::Kvm { pvm_compat: false },
                "engine kvm (ornament's own VMM on hardware KVM; not yet tested on such a host)".to_owned(),
            )),
            KvmKind::Unknown => Err(SelectError::KvmEngineNotReady),
        },
    }
}
