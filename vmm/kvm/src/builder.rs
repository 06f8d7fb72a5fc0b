//! The one boot recipe: `MachineConfig` (plain, validated data) -> named steps ->
//! a paused [`Machine`] whose vCPU 0 starts at the kernel's 64-bit entry point.
//!
//! Steps, in order: memory, kernel (bzImage or ELF vmlinux via linux-loader), initrd,
//! command line, zero page (boot_params + e820), ACPI (RSDP/XSDT/FADT/DSDT/MADT, one
//! local APIC per vCPU), boot GDT and identity page tables,
//! VM (memory slots, TSS, irqchip + PIT), devices (COM1 on IRQ 4 and COM2 on IRQ 3
//! through irqfds, i8042), vCPUs (CPUID from KVM_GET_SUPPORTED_CPUID with fixups, MSRs, FPU, LAPIC
//! LINT pins, long-mode registers on the BSP).
//! vCPUs other than 0 wait (in KVM's in-kernel LAPIC) for the kernel's INIT/SIPI.

use crate::boot::acpi::{self, AcpiError};
use crate::boot::linux::{
    bzimage_has_64bit_entry, elf_setup_header, entry_point, fixup_cpuid, setup_lint, zero_page,
    InitrdPlacement,
};
use crate::boot::{long_mode_sregs, write_gdt, write_identity_page_tables, BootError};
use crate::devices::{DevicesError, PioBus, Rtc, Serial, SharedBuffer, I8042};
use crate::layout::{
    initrd_placement, BOOT_STACK_POINTER, CMDLINE_MAX_SIZE, CMDLINE_START, I8042 as I8042_PORTS,
    INITRD_DEFAULT_ADDR_MAX, KVM_TSS_ADDRESS, MAX_MEM_SIZE, MIB, PAGE_SIZE, RSDP_START,
    RTC as RTC_PORTS, SERIAL_COM1, SERIAL_COM1_IRQ, SERIAL_COM2, SERIAL_COM2_IRQ, ZERO_PAGE_START,
};
use crate::machine::Machine;
use crate::memory::{KvmMemory, MemoryError};
use crate::pvm::{HookArmingConsole, PvmShared};
use crate::support::{kvm_kind, KvmKind};
use crate::vm::{open_kvm, KvmVm, VmError};
use kvm_bindings::{kvm_fpu, kvm_pit_config, kvm_regs, Msrs, KVM_PIT_SPEAKER_DUMMY};
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Least guest RAM we accept.
pub const MIN_MEM_SIZE_MIB: u32 = 32;
/// MSR_IA32_MISC_ENABLE and its fast-string bit.
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;

/// Where the guest's console goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConsoleOutput {
    /// Kept in [`Machine::serial`] only.
    #[default]
    Capture,
    /// Kept, and copied to the VMM's stdout.
    CaptureAndStdout,
}

/// What to boot, plain data; [`MachineConfig::validate`] checks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineConfig {
    /// bzImage or uncompressed ELF vmlinux.
    pub kernel: PathBuf,
    /// Initramfs (given uncompressed, it saves minutes of emulated gunzip on PVM).
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// vCPUs to create.
    pub vcpu_count: u32,
    /// Guest RAM in MiB.
    pub mem_size_mib: u32,
    /// Console destination.
    pub console: ConsoleOutput,
    /// PVM compatibility mode ([`crate::pvm`]): CMPXCHG16B hidden and the user-mode
    /// `syscall` entry completed by the VMM. The caller adds
    /// [`crate::pvm::COMPAT_CMDLINE`] to the command line (see [`crate::linux`]).
    pub pvm_compat: bool,
}

/// Which build step failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildStep {
    /// Mapping guest RAM.
    Memory,
    /// Loading the kernel.
    Kernel,
    /// Loading the initrd.
    Initrd,
    /// Writing the command line.
    Cmdline,
    /// Writing the zero page.
    ZeroPage,
    /// Writing the ACPI tables.
    Acpi,
    /// GDT and page tables.
    BootTables,
    /// VM, irqchip, PIT.
    Vm,
    /// Devices.
    Devices,
    /// vCPU registers, CPUID, MSRs, FPU, LAPIC.
    Vcpus,
}

/// Why the machine could not be built.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum BuildError {
    /// vcpu_count must be at least 1
    ZeroVcpus,
    /// {requested} vCPUs asked for, KVM allows at most {max}
    TooManyVcpus {
        /// Asked for.
        requested: u32,
        /// KVM_CAP_MAX_VCPUS.
        max: u32,
    },
    /// mem_size_mib {0} is outside 32..=3072 (RAM ends at the MMIO hole at 3 GiB)
    BadMemSize(u32),
    /// the command line is {0} bytes; at most 4095 fit
    CmdlineTooLong(usize),
    /// the command line contains a NUL byte
    CmdlineNul,
    /// cannot read {path:?}
    ReadFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// {mem_mib} MiB of RAM is too small for the kernel and initrd ({need_mib} MiB needed)
    MemoryTooSmall {
        /// RAM given.
        mem_mib: u64,
        /// At least this much is needed.
        need_mib: u64,
    },
    /// the kernel does not fit in {0} MiB of RAM
    KernelDoesNotFit(u32),
    /// the kernel loader rejected {0:?} (neither a bzImage with a 64-bit entry nor an x86-64 ELF)
    KernelRejected(PathBuf, #[source] linux_loader::loader::Error),
    /// the bzImage {0:?} has no 64-bit entry point (xloadflags)
    No64BitEntry(PathBuf),
    /// KVM is unusable
    Kvm(#[source] VmError),
    /// cannot lay out the ACPI tables
    Acpi(#[source] AcpiError),
    /// step {0:?} failed in guest memory
    Memory(BuildStep, #[source] MemoryError),
    /// step {0:?} failed writing boot tables
    Boot(BuildStep, #[source] BootError),
    /// step {0:?} failed in a KVM ioctl
    Ioctl(BuildStep, #[source] kvm_ioctls::Error),
    /// step {0:?} failed setting up a device
    Devices(BuildStep, #[source] DevicesError),
    /// step {0:?} could not create an eventfd
    EventFd(BuildStep, #[source] std::io::Error),
}

impl MachineConfig {
    /// Check the plain data against `max_vcpus` (KVM's limit) and the files on disk.
    pub fn validate(&self, max_vcpus: u32) -> Result<(), BuildError> {
        if self.vcpu_count == 0 {
            return Err(BuildError::ZeroVcpus);
        }
        if self.vcpu_count > max_vcpus {
            return Err(BuildError::TooManyVcpus {
                requested: self.vcpu_count,
                max: max_vcpus,
            });
        }
        let mem = u64::from(self.mem_size_mib) * MIB;
        if self.mem_size_mib < MIN_MEM_SIZE_MIB || mem > MAX_MEM_SIZE {
            return Err(BuildError::BadMemSize(self.mem_size_mib));
        }
        if self.cmdline.len() as u64 + 1 > CMDLINE_MAX_SIZE {
            return Err(BuildError::CmdlineTooLong(self.cmdline.len()));
        }
        if self.cmdline.contains('\0') {
            return Err(BuildError::CmdlineNul);
        }
        file_size(&self.kernel)?;
        let initrd = match &self.initrd {
            Some(p) => file_size(p)?,
            None => 0,
        };
        // The kernel runs from 1 MiB (bzImage) or 16 MiB (Debian's vmlinux); the initrd
        // goes above it: a floor, not an exact need (the kernel step checks the rest).
        let need = 16 * MIB + initrd;
        if need > mem {
            return Err(BuildError::MemoryTooSmall {
                mem_mib: mem / MIB,
                need_mib: need.div_ceil(MIB),
            });
        }
        Ok(())
    }
}

fn file_size(path: &Path) -> Result<u64, BuildError> {
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|source| BuildError::ReadFile {
            path: path.to_owned(),
            source,
        })
}

fn open(path: &Path) -> Result<File, BuildError> {
    File::open(path).map_err(|source| BuildError::ReadFile {
        path: path.to_owned(),
        source,
    })
}

/// A writer into the capture buffer and, optionally, stdout and a caller's writer.
struct Console {
    buf: SharedBuffer,
    stdout: bool,
    tee: Option<Box<dyn Write + Send>>,
}

impl Write for Console {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.write_all(b)?;
        if self.stdout {
            std::io::stdout().write_all(b)?;
        }
        if let Some(t) = &mut self.tee {
            // The caller's writer failing must not stop the guest's console.
            if let Err(e) = t.write_all(b) {
                tracing::warn!("console tee: {e}");
                self.tee = None;
            }
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        if self.stdout {
            std::io::stdout().flush()?;
        }
        if let Some(t) = &mut self.tee {
            t.flush()?;
        }
        Ok(())
    }
}

/// What the kernel step produced.
#[derive(Debug)]
struct LoadedKernel {
    entry: GuestAddress,
    end: u64,
    hdr: linux_loader::loader::bootparam::setup_header,
    initrd_addr_max: u64,
}

fn step_kernel(cfg: &MachineConfig, mem: &KvmMemory) -> Result<LoadedKernel, BuildError> {
    let mut f = open(&cfg.kernel)?;
    let mut magic = [0u8; 4];
    f.read_exact(&mut magic)
        .map_err(|source| BuildError::ReadFile {
            path: cfg.kernel.clone(),
            source,
        })?;
    let gm = mem.guest_memory();
    let himem = Some(crate::layout::HIMEM_START);
    let res = if magic == *b"\x7fELF" {
        Elf::load(gm, None, &mut f, himem)
    } else {
        BzImage::load(gm, None, &mut f, himem)
    }
    .map_err(|e| {
        use linux_loader::loader::{bzimage, elf, Error as L};
        match e {
            L::Elf(elf::Error::ReadKernelImage)
            | L::Bzimage(bzimage::Error::ReadBzImageCompressedKernel) => {
                BuildError::KernelDoesNotFit(cfg.mem_size_mib)
            }
            e => BuildError::KernelRejected(cfg.kernel.clone(), e),
        }
    })?;
    match res.setup_header {
        Some(hdr) => {
            if !bzimage_has_64bit_entry(&hdr) {
                return Err(BuildError::No64BitEntry(cfg.kernel.clone()));
            }
            // The decompressor runs in place and needs init_size bytes from the load address.
            let end = res.kernel_load.0 + u64::from(hdr.init_size).max(res.kernel_end);
            let max = match hdr.initrd_addr_max {
                0 => INITRD_DEFAULT_ADDR_MAX,
                m => u64::from(m) + 1,
            };
            Ok(LoadedKernel {
                entry: entry_point(res.kernel_load, Some(&hdr)),
                end,
                hdr,
                initrd_addr_max: max,
            })
        }
        None => Ok(LoadedKernel {
            entry: entry_point(res.kernel_load, None),
            end: res.kernel_end,
            hdr: elf_setup_header(),
            initrd_addr_max: INITRD_DEFAULT_ADDR_MAX,
        }),
    }
}

fn mem_bytes(cfg: &MachineConfig) -> u64 {
    u64::from(cfg.mem_size_mib) * MIB
}

fn step_initrd(
    cfg: &MachineConfig,
    mem: &KvmMemory,
    kernel: &LoadedKernel,
) -> Result<Option<InitrdPlacement>, BuildError> {
    let Some(path) = &cfg.initrd else {
        return Ok(None);
    };
    let bytes = std::fs::read(path).map_err(|source| BuildError::ReadFile {
        path: path.clone(),
        source,
    })?;
    let size = bytes.len() as u64;
    let lowest = kernel.end.div_ceil(PAGE_SIZE) * PAGE_SIZE;
    let too_small = || BuildError::MemoryTooSmall {
        mem_mib: u64::from(cfg.mem_size_mib),
        need_mib: (lowest + size).div_ceil(MIB),
    };
    let addr = initrd_placement(mem_bytes(cfg), kernel.initrd_addr_max, lowest, size)
        .ok_or_else(too_small)?;
    mem.write(addr, &bytes)
        .map_err(|e| BuildError::Memory(BuildStep::Initrd, e))?;
    Ok(Some(InitrdPlacement {
        addr,
        size: u32::try_from(size).map_err(|_| too_small())?,
    }))
}

/// Build the machine `cfg` describes, paused before the kernel's first instruction.
pub fn build(cfg: &MachineConfig) -> Result<Machine, BuildError> {
    build_with_console(cfg, None, None)
}

/// [`build`], with the console (COM1) also copied to `tee` and ttyS1 (COM2) to `tee2`;
/// both writers run on the vCPU thread that writes the UART.
pub fn build_with_console(
    cfg: &MachineConfig,
    tee: Option<Box<dyn Write + Send>>,
    tee2: Option<Box<dyn Write + Send>>,
) -> Result<Machine, BuildError> {
    let kvm = open_kvm().map_err(BuildError::Kvm)?;
    let max_vcpus = u32::try_from(kvm.get_max_vcpus()).unwrap_or(u32::MAX);
    drop(kvm);
    cfg.validate(max_vcpus)?;
    let hide_cx16 = cfg.pvm_compat || kvm_kind() == KvmKind::Pvm;

    tracing::debug!(step = ?BuildStep::Memory, "build");
    let mem =
        KvmMemory::new(mem_bytes(cfg)).map_err(|e| BuildError::Memory(BuildStep::Memory, e))?;

    tracing::debug!(step = ?BuildStep::Kernel, "build");
    let kernel = step_kernel(cfg, &mem)?;

    tracing::debug!(step = ?BuildStep::Initrd, "build");
    let initrd = step_initrd(cfg, &mem, &kernel)?;

    tracing::debug!(step = ?BuildStep::Cmdline, "build");
    let mut cmdline = cfg.cmdline.clone().into_bytes();
    cmdline.push(0);
    mem.write(CMDLINE_START, &cmdline)
        .map_err(|e| BuildError::Memory(BuildStep::Cmdline, e))?;

    tracing::debug!(step = ?BuildStep::ZeroPage, "build");
    let cmdline_len =
        u32::try_from(cmdline.len()).map_err(|_| BuildError::CmdlineTooLong(cmdline.len()))?;
    let mut zp = zero_page(kernel.hdr, cmdline_len, initrd, mem_bytes(cfg));
    zp.0.acpi_rsdp_addr = RSDP_START.0;
    mem.guest_memory()
        .write_obj(zp, ZERO_PAGE_START)
        .map_err(|e| {
            BuildError::Memory(
                BuildStep::ZeroPage,
                MemoryError::Write(ZERO_PAGE_START.0, e),
            )
        })?;

    tracing::debug!(step = ?BuildStep::Acpi, "build");
    for (at, bytes) in acpi::tables(cfg.vcpu_count).map_err(BuildError::Acpi)? {
        mem.write(GuestAddress(at), &bytes)
            .map_err(|e| BuildError::Memory(BuildStep::Acpi, e))?;
    }

    tracing::debug!(step = ?BuildStep::BootTables, "build");
    write_gdt(&mem).map_err(|e| BuildError::Boot(BuildStep::BootTables, e))?;
    write_identity_page_tables(&mem).map_err(|e| BuildError::Boot(BuildStep::BootTables, e))?;

    tracing::debug!(step = ?BuildStep::Vm, "build");
    let vm = KvmVm::new(mem).map_err(BuildError::Kvm)?;
    let ioctl = |step| move |e| BuildError::Ioctl(step, e);
    vm.fd()
        .set_tss_address(usize::try_from(KVM_TSS_ADDRESS.0).expect("64-bit host"))
        .map_err(ioctl(BuildStep::Vm))?;
    vm.fd().create_irq_chip().map_err(ioctl(BuildStep::Vm))?;
    vm.fd()
        .create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(ioctl(BuildStep::Vm))?;

    tracing::debug!(step = ?BuildStep::Devices, "build");
    let serial_buf = SharedBuffer::default();
    let irq = EventFd::new(EFD_NONBLOCK).map_err(|e| BuildError::EventFd(BuildStep::Devices, e))?;
    vm.fd()
        .register_irqfd(&irq, SERIAL_COM1_IRQ)
        .map_err(ioctl(BuildStep::Devices))?;
    let console = Console {
        buf: serial_buf.clone(),
        stdout: cfg.console == ConsoleOutput::CaptureAndStdout,
        tee,
    };
    let pvm = cfg.pvm_compat.then(|| Arc::new(PvmShared::default()));
    let console: Box<dyn Write + Send> = match &pvm {
        Some(shared) => Box::new(HookArmingConsole::new(Box::new(console), shared.clone())),
        None => Box::new(console),
    };
    let mut bus = PioBus::new();
    bus.insert(
        SERIAL_COM1,
        Arc::new(Mutex::new(Serial::new(console, Some(irq)))),
    )
    .map_err(|e| BuildError::Devices(BuildStep::Devices, e))?;
    let serial2 = SharedBuffer::default();
    let irq2 =
        EventFd::new(EFD_NONBLOCK).map_err(|e| BuildError::EventFd(BuildStep::Devices, e))?;
    vm.fd()
        .register_irqfd(&irq2, SERIAL_COM2_IRQ)
        .map_err(ioctl(BuildStep::Devices))?;
    bus.insert(
        SERIAL_COM2,
        Arc::new(Mutex::new(Serial::new(
            Box::new(Console {
                buf: serial2.clone(),
                stdout: false,
                tee: tee2,
            }),
            Some(irq2),
        ))),
    )
    .map_err(|e| BuildError::Devices(BuildStep::Devices, e))?;
    bus.insert(I8042_PORTS, Arc::new(Mutex::new(I8042::new())))
        .map_err(|e| BuildError::Devices(BuildStep::Devices, e))?;
    bus.insert(RTC_PORTS, Arc::new(Mutex::new(Rtc::new())))
        .map_err(|e| BuildError::Devices(BuildStep::Devices, e))?;

    tracing::debug!(step = ?BuildStep::Vcpus, "build");
    let mut vcpus = Vec::new();
    for i in 0..cfg.vcpu_count {
        let vcpu = vm.create_vcpu(i).map_err(BuildError::Kvm)?;
        let step = ioctl(BuildStep::Vcpus);
        let mut cpuid = vm
            .kvm()
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(step)?;
        fixup_cpuid(&mut cpuid, i, cfg.vcpu_count, hide_cx16);
        vcpu.fd().set_cpuid2(&cpuid).map_err(step)?;
        let msrs = Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
            index: MSR_IA32_MISC_ENABLE,
            data: MISC_ENABLE_FAST_STRING,
            ..Default::default()
        }])
        .expect("one MSR fits");
        vcpu.fd().set_msrs(&msrs).map_err(step)?;
        vcpu.fd()
            .set_fpu(&kvm_fpu {
                fcw: 0x37f,
                mxcsr: 0x1f80,
                ..Default::default()
            })
            .map_err(step)?;
        let mut lapic = vcpu.fd().get_lapic().map_err(step)?;
        setup_lint(&mut lapic);
        vcpu.fd().set_lapic(&lapic).map_err(step)?;
        if i == 0 {
            let mut sregs = vcpu.fd().get_sregs().map_err(step)?;
            long_mode_sregs(&mut sregs);
            vcpu.fd().set_sregs(&sregs).map_err(step)?;
            vcpu.fd()
                .set_regs(&kvm_regs {
                    rip: kernel.entry.0,
                    rsp: BOOT_STACK_POINTER.0,
                    rbp: BOOT_STACK_POINTER.0,
                    rsi: ZERO_PAGE_START.0,
                    rflags: 2,
                    ..Default::default()
                })
                .map_err(step)?;
        }
        vcpus.push(vcpu);
    }
    Ok(Machine {
        vm,
        vcpus,
        bus,
        serial: serial_buf,
        stop_all_on_exit: true,
        complete_instructions: true,
        pvm,
        serial2,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(kernel: &Path) -> MachineConfig {
        MachineConfig {
            kernel: kernel.to_owned(),
            initrd: None,
            cmdline: "console=ttyS0".into(),
            vcpu_count: 1,
            mem_size_mib: 128,
            console: ConsoleOutput::Capture,
            pvm_compat: false,
        }
    }

    #[test]
    fn validation_names_the_problem() {
        let exe = std::env::current_exe().expect("test binary");
        let ok = cfg(&exe);
        ok.validate(4).expect("valid");
        assert!(matches!(
            MachineConfig {
                vcpu_count: 0,
                ..ok.clone()
            }
            .validate(4),
            Err(BuildError::ZeroVcpus)
        ));
        assert!(matches!(
            MachineConfig {
                vcpu_count: 5,
                ..ok.clone()
            }
            .validate(4),
            Err(BuildError::TooManyVcpus {
                requested: 5,
                max: 4
            })
        ));
        assert!(matches!(
            MachineConfig {
                mem_size_mib: 8,
                ..ok.clone()
            }
            .validate(4),
            Err(BuildError::BadMemSize(8))
        ));
        assert!(matches!(
            MachineConfig {
                mem_size_mib: 4096,
                ..ok.clone()
            }
            .validate(4),
            Err(BuildError::BadMemSize(4096))
        ));
        assert!(matches!(
            MachineConfig {
                cmdline: "x".repeat(4096),
                ..ok.clone()
            }
            .validate(4),
            Err(BuildError::CmdlineTooLong(4096))
        ));
        let missing = MachineConfig {
            kernel: "/nonexistent/vmlinux".into(),
            ..ok.clone()
        };
        let e = missing.validate(4).expect_err("missing kernel");
        assert_eq!(e.to_string(), "cannot read \"/nonexistent/vmlinux\"");
        // A 20 MiB initrd in 32 MiB of RAM: too small (16 MiB floor + 20 MiB).
        let initrd =
            std::env::temp_dir().join(format!("ornament-kvm-initrd-{}", std::process::id()));
        std::fs::File::create(&initrd)
            .and_then(|f| f.set_len(20 * MIB))
            .expect("sparse initrd");
        let big = MachineConfig {
            mem_size_mib: 32,
            initrd: Some(initrd.clone()),
            ..ok.clone()
        };
        let e = big.validate(4);
        std::fs::remove_file(&initrd).expect("clean up");
        assert!(matches!(
            e,
            Err(BuildError::MemoryTooSmall {
                mem_mib: 32,
                need_mib: 36
            })
        ));
    }
}
