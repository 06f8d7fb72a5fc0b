//! PVM compatibility: what it takes to run an unmodified (not PVM-aware) Linux kernel
//! on a host whose `/dev/kvm` is PVM (`kvm_pvm`, no VT-x/AMD-V), where the guest's
//! kernel mode runs through KVM's instruction emulator. See FIELD-NOTES, "The
//! unmodified Debian kernel CAN reach user space under this PVM, slowly".
//!
//! - [`COMPAT_CMDLINE`]: command-line levers (no XSAVE, no SSSE3/SMAP/POPCNT, no crypto
//!   self-tests, no KASLR, no PCI, no watchdog, no speculation mitigations);
//! - CMPXCHG16B hidden in CPUID (`boot::linux::fixup_cpuid`);
//! - emulation failures finished by the VMM (`vcpu::complete`: `int3`, `fwait`,
//!   `clac`, `stac`);
//! - the user-mode `SYSCALL` entry, completed here (below).
//!
//! # The SYSCALL entry
//!
//! Under PVM a user-mode `syscall` of a guest that did not register PVM's entry points
//! loads RIP from `MSR_LSTAR` (and RCX/R11 as `syscall` does) but leaves the vCPU at
//! user privilege, so fetching the kernel's `entry_SYSCALL_64` page-faults. The #PF is
//! delivered to the guest's IDT vector 14 (`asm_exc_page_fault`) with a frame that
//! shows `rip == LSTAR` from user mode.
//!
//! We watch that handler with a hardware breakpoint (one of DR0-DR3, through
//! `KVM_SET_GUEST_DEBUG`): **nothing is written into guest memory**. On each hit the
//! VMM reads the #PF frame from the guest's stack and either
//! - completes the syscall entry ([`complete_syscall_entry`]): RIP = LSTAR, CS/SS
//!   from `MSR_STAR[47:32]`, RSP = the user RSP from the frame, RFLAGS = the user
//!   RFLAGS masked by `MSR_SFMASK`, RCX = return RIP and R11 = user RFLAGS (as the
//!   CPU's `syscall` left them), discarding the #PF frame (it lies below the kernel
//!   stack's top, which `entry_SYSCALL_64` loads afresh); or
//! - lets the real fault handler run ([`PfDecision::PassThrough`]): RIP past the
//!   handler's first instruction when it is a NOP (`ASM_CLAC` patched out with SMAP
//!   hidden), so one exit per fault and no single-step.
//!
//! The breakpoint is armed once the console shows [`ARM_HOOK_AFTER`] (no user code
//! runs before), from the handler address in the guest's own IDT gate 14, so no
//! System.map is needed.
//!
//! Parts: [`cmdline`] (the kernel's levers), [`syscall_entry`] (the #PF hook and the entry it
//! completes), [`console`] (when to arm it), [`self_test`] (`ornament doctor`'s check).

pub mod cmdline;
pub mod console;
pub mod self_test;
pub mod syscall_entry;

pub use cmdline::{
    compat_cmdline, compat_cmdline_for_tsc, host_tsc_khz, COMPAT_CMDLINE, TSC_SLOWDOWN,
};
pub use console::{HookArmingConsole, LineWatch, PvmShared, ARM_HOOK_AFTER};
pub use self_test::{pvm_compat_self_test, SelfTestError, SelfTestReport};
pub use syscall_entry::{
    complete_syscall_entry, decide_pf, follows_syscall, free_slot, idt_gate_offset,
    leading_nop_len, locate_pf_hook, read_pf_frame, read_virt, syscall_segments, with_hook,
    PfDecision, PfFrame, PfHook, SyscallMsrs, IDT_GATE_SIZE, MSR_LSTAR, MSR_SFMASK, MSR_STAR,
    PF_VECTOR, RFLAGS_FIXED,
};
