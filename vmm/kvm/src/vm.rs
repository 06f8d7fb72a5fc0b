//! The VM: `/dev/kvm`, one VM fd, guest RAM registered as memory slots, vCPU creation.

use crate::memory::KvmMemory;
use crate::vcpu::KvmVcpu;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Cap, Kvm, VmFd};
use std::sync::Arc;

/// Capabilities every machine of ours needs, with their names for error messages.
pub const REQUIRED_CAPS: [(Cap, &str); 4] = [
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SyncRegs, "KVM_CAP_SYNC_REGS"),
    (Cap::SetGuestDebug, "KVM_CAP_SET_GUEST_DEBUG"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
];

/// The KVM API version every KVM since 2.6.22 reports.
pub const KVM_API_VERSION: i32 = 12;

/// Why the VM could not be made.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum VmError {
    /// /dev/kvm does not exist: is the kvm module (kvm_intel, kvm_amd or kvm_pvm) loaded?
    NoKvm,
    /// no permission to open /dev/kvm: add the user to the `kvm` group or run as root
    KvmPermission,
    /// cannot open /dev/kvm
    OpenKvm(#[source] std::io::Error),
    /// KVM API version {0} is not the expected 12
    ApiVersion(i32),
    /// KVM lacks a capability this VMM needs: {0}
    MissingCap(&'static str),
    /// cannot create the VM
    CreateVm(#[source] kvm_ioctls::Error),
    /// cannot register guest memory with KVM
    SetMemory(#[source] kvm_ioctls::Error),
    /// {requested} vCPUs asked for, KVM allows at most {max}
    TooManyVcpus {
        /// What was asked for.
        requested: u32,
        /// KVM_CAP_MAX_VCPUS.
        max: u32,
    },
    /// cannot create vCPU {0}
    CreateVcpu(u32, #[source] kvm_ioctls::Error),
    /// cannot read the supported CPUID
    SupportedCpuid(#[source] kvm_ioctls::Error),
}

/// Open `/dev/kvm`, telling "missing" and "no permission" apart.
pub fn open_kvm() -> Result<Kvm, VmError> {
    Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT | libc::ENODEV | libc::ENXIO => VmError::NoKvm,
        libc::EACCES | libc::EPERM => VmError::KvmPermission,
        n => VmError::OpenKvm(std::io::Error::from_raw_os_error(n)),
    })
}

/// Check the API version and [`REQUIRED_CAPS`].
pub fn check_kvm(kvm: &Kvm) -> Result<(), VmError> {
    let v = kvm.get_api_version();
    if v != KVM_API_VERSION {
        return Err(VmError::ApiVersion(v));
    }
    match REQUIRED_CAPS.iter().find(|(c, _)| !kvm.check_extension(*c)) {
        Some((_, name)) => Err(VmError::MissingCap(name)),
        None => Ok(()),
    }
}

/// A VM with its guest memory registered.
#[derive(Debug)]
pub struct KvmVm {
    kvm: Kvm,
    fd: VmFd,
    memory: Arc<KvmMemory>,
}

impl KvmVm {
    /// Open KVM, check it, create a VM and register `memory` as its RAM.
    pub fn new(memory: KvmMemory) -> Result<Self, VmError> {
        let kvm = open_kvm()?;
        check_kvm(&kvm)?;
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        for (slot, (gpa, size, host)) in (0u32..).zip(memory.regions()) {
            let region = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: gpa,
                memory_size: size,
                userspace_addr: host,
            };
            // SAFETY: `host` is the start of a live anonymous mapping of `size` bytes
            // owned by `memory`, which this VM keeps (in an Arc) for as long as the VM
            // fd exists, so KVM never sees the mapping go away under it.
            unsafe { fd.set_user_memory_region(region) }.map_err(VmError::SetMemory)?;
        }
        Ok(Self {
            kvm,
            fd,
            memory: Arc::new(memory),
        })
    }

    /// Guest memory.
    pub fn memory(&self) -> &Arc<KvmMemory> {
        &self.memory
    }

    /// The system fd.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM fd.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Most vCPUs KVM allows in one VM.
    pub fn max_vcpus(&self) -> u32 {
        u32::try_from(self.kvm.get_max_vcpus()).unwrap_or(u32::MAX)
    }

    /// Create vCPU `index` with the host's supported CPUID loaded.
    pub fn create_vcpu(&self, index: u32) -> Result<KvmVcpu, VmError> {
        if index >= self.max_vcpus() {
            return Err(VmError::TooManyVcpus {
                requested: index + 1,
                max: self.max_vcpus(),
            });
        }
        let fd = self
            .fd
            .create_vcpu(u64::from(index))
            .map_err(|e| VmError::CreateVcpu(index, e))?;
        let cpuid = self
            .kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(VmError::SupportedCpuid)?;
        fd.set_cpuid2(&cpuid)
            .map_err(|e| VmError::CreateVcpu(index, e))?;
        Ok(KvmVcpu::new(fd, index))
    }
}
