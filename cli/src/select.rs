//! Which engine runs the guest, and why (printed to the user).

use std::path::Path;

/// `--engine` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineChoice {
    /// Our KVM VMM on hardware KVM (unless the run needs QEMU), else QEMU.
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

/// Decide, and say why. `needs_qemu` names what the run asks for that only QEMU
/// offers (every-syscall watching, a QEMU trap backend, a QEMU binary), if anything:
/// `auto` then takes QEMU even on hardware KVM.
pub fn select(
    choice: EngineChoice,
    force: bool,
    needs_qemu: Option<&str>,
) -> Result<(Selected, String), SelectError> {
    decide(kvm_kind(), choice, force, needs_qemu)
}

fn decide(
    kind: KvmKind,
    choice: EngineChoice,
    force: bool,
    needs_qemu: Option<&str>,
) -> Result<(Selected, String), SelectError> {
    match choice {
        EngineChoice::Auto if kind == KvmKind::Hardware => Ok(match needs_qemu {
            None => (
                Selected::Kvm { pvm_compat: false },
                "engine kvm: KVM is hardware virtualization here, so ornament's own VMM runs the guest (probes trapped by KVM exits; --engine qemu for QEMU)".to_owned(),
            ),
            Some(what) => (
                Selected::QemuKvm,
                format!("engine qemu with KVM acceleration: KVM is hardware here, but {what} needs QEMU"),
            ),
        }),
        EngineChoice::Qemu | EngineChoice::Auto => Ok(match kind {
            KvmKind::Hardware => (
                Selected::QemuKvm,
                "engine qemu with KVM acceleration (KVM is hardware here)".to_owned(),
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
                "engine kvm (ornament's own VMM on hardware KVM)".to_owned(),
            )),
            KvmKind::Unknown => Err(SelectError::KvmEngineNotReady),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_takes_our_vmm_on_hardware_kvm_unless_the_run_needs_qemu() {
        let (s, why) = decide(KvmKind::Hardware, EngineChoice::Auto, false, None).unwrap();
        assert_eq!(s, Selected::Kvm { pvm_compat: false });
        assert!(why.starts_with("engine kvm: KVM is hardware"), "{why}");
        let (s, why) = decide(
            KvmKind::Hardware,
            EngineChoice::Auto,
            false,
            Some("--watch syscall (every syscall)"),
        )
        .unwrap();
        assert_eq!(s, Selected::QemuKvm);
        assert!(
            why.ends_with("--watch syscall (every syscall) needs QEMU"),
            "{why}"
        );
        let (s, _) = decide(KvmKind::Hardware, EngineChoice::Qemu, false, None).unwrap();
        assert_eq!(s, Selected::QemuKvm);
    }

    #[test]
    fn auto_takes_qemu_tcg_on_pvm_and_without_kvm() {
        for kind in [
            KvmKind::Pvm,
            KvmKind::Absent,
            KvmKind::Inaccessible,
            KvmKind::Unknown,
        ] {
            let (s, _) = decide(kind, EngineChoice::Auto, false, None).unwrap();
            assert_eq!(s, Selected::QemuTcg, "{kind:?}");
        }
        assert!(matches!(
            decide(KvmKind::Pvm, EngineChoice::Kvm, false, None),
            Err(SelectError::KvmIsPvm)
        ));
        let (s, _) = decide(KvmKind::Pvm, EngineChoice::Kvm, true, None).unwrap();
        assert_eq!(s, Selected::Kvm { pvm_compat: true });
    }
}
