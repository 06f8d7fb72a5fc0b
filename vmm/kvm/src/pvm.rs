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

use crate::engine::translate;
use crate::trap::debugreg::{control, dr7_enable, dr7_local_enable, SLOTS};
use crate::trap::GuestDebug;
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use ornament_engine::{Gva, PhysMemory};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Kernel command-line arguments PVM compatibility mode appends (measured needs plus
/// speed levers): `noxsave` (the emulator lacks `xrstor`), `clearcpuid=137` (SSSE3,
/// which the emulator lacks), `308` (SMAP: no `clac`/`stac` to complete), `151`
/// (POPCNT), `cryptomgr.notests` (minutes of emulated self-tests), `nokaslr` (fixed
/// addresses for System.map), `pci=off`, `nowatchdog`, `mitigations=off` (no return
/// thunks, retpolines or page-table isolation: far fewer emulated instructions, about
/// 2x faster to the initcalls), `lockdown=confidentiality` (tracefs is not set up:
/// minutes of emulated trace-event string rewriting skipped), `clocksource=tsc
/// tsc=reliable` and, from [`compat_cmdline_for_tsc`], `tsc_early_khz=` at
/// [`TSC_SLOWDOWN`] times the real TSC rate. (Not `noapic`: our FADT is
/// hardware-reduced, so Linux leaves the 8259 unprogrammed and IRQ 4 arrives as
/// vector 4, an "overflow" oops in `serial8250_init`.)
pub const COMPAT_CMDLINE: &str = "noxsave clearcpuid=137,308,151 cryptomgr.notests nokaslr \
                                  pci=off nowatchdog mitigations=off lockdown=confidentiality \
                                  clocksource=tsc tsc=reliable";

/// How much slower than real time the guest's clock runs in compatibility mode: the
/// guest is told its TSC runs this many times faster than it does, so its timer tick
/// (HZ=250, each tick thousands of emulated instructions) comes this many times less
/// often. Measured: without it the tick took about 60% of the emulated CPU during boot.
pub const TSC_SLOWDOWN: u64 = 4;

/// [`compat_cmdline`] plus `tsc_early_khz=` for a host TSC of `tsc_khz` (none when 0).
pub fn compat_cmdline_for_tsc(base: &str, tsc_khz: u64) -> String {
    let mut c = compat_cmdline(base);
    if tsc_khz != 0
        && !c
            .split_whitespace()
            .any(|a| a.starts_with("tsc_early_khz="))
    {
        c.push_str(&format!(" tsc_early_khz={}", tsc_khz * TSC_SLOWDOWN));
    }
    c
}

/// The host TSC rate KVM gives a vCPU (`KVM_GET_TSC_KHZ` on a scratch VM); 0 when
/// it cannot be read.
pub fn host_tsc_khz() -> u64 {
    let Ok(kvm) = crate::vm::open_kvm() else {
        return 0;
    };
    let Ok(vm) = kvm.create_vm() else { return 0 };
    vm.create_vcpu(0)
        .ok()
        .and_then(|v| v.get_tsc_khz().ok())
        .map_or(0, u64::from)
}

/// The console line after which the #PF breakpoint is armed: the kernel prints it
/// just before it starts user space.
pub const ARM_HOOK_AFTER: &str = "Run /init as init process";

/// `MSR_STAR`.
pub const MSR_STAR: u32 = 0xc000_0081;
/// `MSR_LSTAR`.
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// `MSR_SYSCALL_MASK` (SFMASK).
pub const MSR_SFMASK: u32 = 0xc000_0084;
/// The #PF vector.
pub const PF_VECTOR: u64 = 14;
/// Size of a 64-bit IDT gate.
pub const IDT_GATE_SIZE: u64 = 16;
/// RFLAGS bit 1 reads as one.
pub const RFLAGS_FIXED: u64 = 1 << 1;

/// `base` with the compat-mode arguments appended (those already there are kept once)
/// and `quiet` removed: the #PF hook is armed by the kernel's `Run /init` line, which
/// `quiet` would hide.
pub fn compat_cmdline(base: &str) -> String {
    let mut out = base
        .split_whitespace()
        .filter(|a| *a != "quiet")
        .collect::<Vec<_>>()
        .join(" ");
    for arg in COMPAT_CMDLINE.split_whitespace() {
        let key = arg.split('=').next().unwrap_or(arg);
        let present = out
            .split_whitespace()
            .any(|a| a.split('=').next() == Some(key));
        if !present {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(arg);
        }
    }
    out
}

/// The syscall MSRs of a vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SyscallMsrs {
    /// `MSR_STAR`: bits 47:32 the kernel CS (SS is CS + 8).
    pub star: u64,
    /// `MSR_LSTAR`: the 64-bit syscall entry.
    pub lstar: u64,
    /// `MSR_SYSCALL_MASK`: RFLAGS bits cleared on entry.
    pub sfmask: u64,
}

/// The watched #PF handler of one vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PfHook {
    /// The handler's address (IDT gate 14).
    pub handler: u64,
    /// Length of the NOP the handler starts with (resume there on pass-through);
    /// 0 when it starts with something else (then step over it).
    pub skip: u64,
    /// The debug-register slot watching it.
    pub slot: usize,
    /// The syscall MSRs.
    pub msrs: SyscallMsrs,
}

/// What the CPU pushed for the #PF (at RSP on the handler's first instruction).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PfFrame {
    /// Error code.
    pub error_code: u64,
    /// Faulting RIP.
    pub rip: u64,
    /// CS at the fault.
    pub cs: u64,
    /// RFLAGS at the fault.
    pub rflags: u64,
    /// RSP at the fault.
    pub rsp: u64,
    /// SS at the fault.
    pub ss: u64,
}

impl PfFrame {
    /// Size of the frame in bytes.
    pub const SIZE: usize = 48;

    /// Decode the six quadwords.
    pub fn from_bytes(b: &[u8; Self::SIZE]) -> Self {
        let q = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i * 8..i * 8 + 8]);
            u64::from_le_bytes(w)
        };
        Self {
            error_code: q(0),
            rip: q(1),
            cs: q(2),
            rflags: q(3),
            rsp: q(4),
            ss: q(5),
        }
    }
}

/// Read the #PF frame at `rsp` through the page tables at `cr3` (it may cross a page).
pub fn read_pf_frame(mem: &dyn PhysMemory, cr3: u64, rsp: u64) -> Option<PfFrame> {
    let mut b = [0u8; PfFrame::SIZE];
    read_virt(mem, cr3, rsp, &mut b)?;
    Some(PfFrame::from_bytes(&b))
}

/// Read `buf.len()` bytes at guest-virtual `gva` through the page tables at `cr3`.
pub fn read_virt(mem: &dyn PhysMemory, cr3: u64, gva: u64, buf: &mut [u8]) -> Option<()> {
    let mut done = 0usize;
    while done < buf.len() {
        let at = gva.wrapping_add(done as u64);
        let gpa = translate(mem, cr3, Gva(at))?;
        let in_page = usize::try_from(0x1000 - (at & 0xfff)).ok()?;
        let n = in_page.min(buf.len() - done);
        mem.read_phys(gpa, &mut buf[done..done + n]).ok()?;
        done += n;
    }
    Some(())
}

/// The handler offset of a 64-bit IDT gate.
pub fn idt_gate_offset(gate: &[u8; 16]) -> u64 {
    u64::from(u16::from_le_bytes([gate[0], gate[1]]))
        | (u64::from(u16::from_le_bytes([gate[6], gate[7]])) << 16)
        | (u64::from(u32::from_le_bytes([gate[8], gate[9], gate[10], gate[11]])) << 32)
}

/// Length of the NOP `bytes` starts with that a pass-through may skip (`nop`x3 or
/// `nopl (%rax)`, what `ASM_CLAC` becomes without SMAP), else 0.
pub fn leading_nop_len(bytes: &[u8]) -> u64 {
    match bytes {
        [0x90, 0x90, 0x90, ..] | [0x0f, 0x1f, 0x00, ..] => 3,
        _ => 0,
    }
}

/// The highest debug-register slot `debug` leaves free (DR7 enable bits clear).
pub fn free_slot(debug: &GuestDebug) -> Option<usize> {
    (0..SLOTS)
        .rev()
        .find(|&s| debug.debugreg[7] & (dr7_local_enable(s) | (dr7_local_enable(s) << 1)) == 0)
}

/// `base` with the #PF handler watched in `hook.slot` (hardware breakpoints on).
pub fn with_hook(base: GuestDebug, hook: &PfHook) -> GuestDebug {
    let mut d = base;
    d.debugreg[hook.slot] = hook.handler;
    d.debugreg[7] = dr7_enable(d.debugreg[7], hook.slot);
    d.control |= control(false);
    d
}

/// Build the hook from the guest's IDT (gate 14, read through the page tables) and
/// the syscall MSRs; `base` is the trap backend's setting (the hook takes a slot it
/// leaves free). `None` when the IDT is unreadable or no slot is free.
pub fn locate_pf_hook(
    mem: &dyn PhysMemory,
    sregs: &kvm_sregs,
    msrs: SyscallMsrs,
    base: &GuestDebug,
) -> Option<PfHook> {
    let mut gate = [0u8; 16];
    read_virt(
        mem,
        sregs.cr3,
        sregs.idt.base + PF_VECTOR * IDT_GATE_SIZE,
        &mut gate,
    )?;
    let handler = idt_gate_offset(&gate);
    let mut head = [0u8; 3];
    read_virt(mem, sregs.cr3, handler, &mut head)?;
    Some(PfHook {
        handler,
        skip: leading_nop_len(&head),
        slot: free_slot(base)?,
        msrs,
    })
}

/// What to do at a hit of the #PF handler breakpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PfDecision {
    /// The fault is a user-mode `syscall` stuck at LSTAR: complete its entry.
    SyscallEntry,
    /// A real page fault: let the guest's handler run, from `resume_rip` (None: step
    /// over the first instruction).
    PassThrough {
        /// Where to resume, past the handler's leading NOP.
        resume_rip: Option<u64>,
    },
}

/// Decide from the frame: `rip == LSTAR` in user mode (CS RPL 3) is our syscall.
pub fn decide_pf(frame: &PfFrame, hook: &PfHook) -> PfDecision {
    if frame.rip == hook.msrs.lstar && frame.cs & 3 == 3 {
        PfDecision::SyscallEntry
    } else {
        PfDecision::PassThrough {
            resume_rip: (hook.skip != 0).then(|| hook.handler + hook.skip),
        }
    }
}

/// The flat 64-bit kernel code and data segments `syscall` loads from `MSR_STAR`.
pub fn syscall_segments(star: u64) -> (kvm_segment, kvm_segment) {
    // Bits 47:32 of STAR, RPL forced to 0: the value is masked to 16 bits first.
    #[allow(clippy::cast_possible_truncation)]
    let cs_sel = ((star >> 32) & 0xfffc) as u16;
    let cs = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: cs_sel,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let ss = kvm_segment {
        selector: cs_sel + 8,
        type_: 0x3,
        db: 1,
        l: 0,
        ..cs
    };
    (cs, ss)
}

/// The registers after the syscall entry the CPU should have made: `regs` are those at
/// the handler's first instruction (RCX and R11 still as `syscall` set them: return RIP
/// and user RFLAGS), `frame` the #PF frame. Returns regs, CS and SS.
pub fn complete_syscall_entry(
    regs: &kvm_regs,
    frame: &PfFrame,
    msrs: &SyscallMsrs,
) -> (kvm_regs, kvm_segment, kvm_segment) {
    let (cs, ss) = syscall_segments(msrs.star);
    let out = kvm_regs {
        rip: msrs.lstar,
        rsp: frame.rsp,
        rflags: (frame.rflags & !msrs.sfmask) | RFLAGS_FIXED,
        ..*regs
    };
    (out, cs, ss)
}

/// True when `rcx` looks like the return address of a `syscall` (`0f 05` just before
/// it in user memory): the check that the CPU did set RCX.
pub fn follows_syscall(mem: &dyn PhysMemory, cr3: u64, rcx: u64) -> bool {
    let mut b = [0u8; 2];
    read_virt(mem, cr3, rcx.wrapping_sub(2), &mut b).is_some() && b == [0x0f, 0x05]
}

/// Watches the console for [`ARM_HOOK_AFTER`] (a line may arrive in pieces).
#[derive(Debug, Default)]
pub struct LineWatch {
    tail: Vec<u8>,
}

impl LineWatch {
    /// Feed console bytes; true when `needle` has appeared (in this chunk or across
    /// the previous one).
    pub fn feed(&mut self, bytes: &[u8], needle: &[u8]) -> bool {
        self.tail.extend_from_slice(bytes);
        let found = self.tail.windows(needle.len()).any(|w| w == needle);
        let keep = needle.len().saturating_sub(1);
        if self.tail.len() > keep {
            self.tail.drain(..self.tail.len() - keep);
        }
        found
    }
}

/// PVM compatibility state shared by a machine's vCPUs.
#[derive(Debug, Default)]
pub struct PvmShared {
    hook_wanted: AtomicBool,
}

impl PvmShared {
    /// Ask every vCPU to arm the #PF handler breakpoint (at its next exit).
    pub fn want_hook(&self) {
        self.hook_wanted.store(true, Ordering::SeqCst);
    }

    /// True once the hook was asked for.
    pub fn hook_wanted(&self) -> bool {
        self.hook_wanted.load(Ordering::SeqCst)
    }
}

/// A console writer that asks for the #PF hook when [`ARM_HOOK_AFTER`] goes by. It
/// runs on the vCPU thread that writes the UART, so the flag is set before that vCPU
/// enters the guest again, long before init's first `syscall`.
pub struct HookArmingConsole {
    inner: Box<dyn Write + Send>,
    watch: LineWatch,
    shared: Arc<PvmShared>,
}

impl std::fmt::Debug for HookArmingConsole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HookArmingConsole").finish_non_exhaustive()
    }
}

impl HookArmingConsole {
    /// Wrap `inner`.
    pub fn new(inner: Box<dyn Write + Send>, shared: Arc<PvmShared>) -> Self {
        Self {
            inner,
            watch: LineWatch::default(),
            shared,
        }
    }
}

impl Write for HookArmingConsole {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if !self.shared.hook_wanted() && self.watch.feed(b, ARM_HOOK_AFTER.as_bytes()) {
            tracing::info!("console shows {ARM_HOOK_AFTER:?}: arming the #PF hook");
            self.shared.want_hook();
        }
        self.inner.write_all(b)?;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Why the PVM compatibility self-test failed.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum SelfTestError {
    /// cannot set up the self-test guest
    Testing(#[source] crate::testing::TestingError),
    /// cannot write the self-test guest's tables
    Memory(#[source] crate::memory::MemoryError),
    /// cannot set the self-test guest's registers
    Registers(#[source] kvm_ioctls::Error),
    /// the self-test machine could not run
    Machine(#[source] crate::machine::MachineError),
    /// the self-test guest failed
    Vcpu(#[source] crate::vcpu::VcpuError),
    /// the self-test guest reported {got:x?}, expected {expected:x?}
    WrongReports {
        /// What it reported.
        got: Vec<u32>,
        /// What it should have.
        expected: Vec<u32>,
    },
}

/// What the self-test saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct SelfTestReport {
    /// Completions the VMM made (int3, fwait, clac/stac).
    pub completed: u64,
    /// Syscall entries completed.
    pub syscall_entries: u64,
    /// True when the host needed them (PVM); on hardware KVM nothing fails to emulate
    /// and the `syscall` enters kernel mode by itself.
    pub needed: bool,
}

/// Self-test guest, kernel part (loaded at `TEST_CODE_START`, CPL 0): `fwait`, `clac`,
/// `stac`, `int3` (its #BP handler increments R12), report R12 and RFLAGS.AC, then
/// `iretq` to user mode, where `mov eax, 110; syscall` enters `sys_entry`, which
/// reports CS.RPL, RCX (return RIP) and R11 (user RFLAGS) and resets.
const SELF_TEST_KERNEL: [u8; 0x110] = {
    let mut c = [0u8; 0x110];
    let start: [u8; 0x2c] = [
        0x45, 0x31, 0xe4, // xor r12d, r12d
        0x9b, // fwait
        0x0f, 0x01, 0xca, // clac
        0x0f, 0x01, 0xcb, // stac
        0xcc, // int3
        0x44, 0x89, 0xe0, // mov eax, r12d
        0xe7, 0xee, // out 0xee, eax   (report 1: #BP handled)
        0x9c, // pushfq
        0x58, // pop rax
        0xc1, 0xe8, 0x12, // shr eax, 18
        0x83, 0xe0, 0x01, // and eax, 1
        0xe7, 0xee, // out 0xee, eax   (report 2: AC after stac)
        0x6a, 0x33, // push 0x33        (user SS)
        0x68, 0xf0, 0x2f, 0x20, 0x00, // push 0x202ff0 (user RSP)
        0x6a, 0x02, // push 2           (RFLAGS)
        0x6a, 0x3b, // push 0x3b        (user CS)
        0x68, 0x00, 0x10, 0x20, 0x00, // push 0x201000 (user RIP)
        0x48, 0xcf, // iretq
    ];
    let sys_entry: [u8; 0x15] = [
        0x8c, 0xc8, // mov eax, cs
        0x83, 0xe0, 0x03, // and eax, 3
        0xe7, 0xee, // out 0xee, eax   (report 3: CPL)
        0x89, 0xc8, // mov eax, ecx
        0xe7, 0xee, // out 0xee, eax   (report 4: return RIP)
        0x44, 0x89, 0xd8, // mov eax, r11d
        0xe7, 0xee, // out 0xee, eax   (report 5: user RFLAGS)
        0xb0, 0xfe, // mov al, 0xfe
        0xe6, 0x64, // out 0x64, al    (i8042 reset: done)
        0xf4, // hlt
    ];
    let bp_handler: [u8; 5] = [
        0x41, 0xff, 0xc4, // inc r12d
        0x48, 0xcf, // iretq
    ];
    let pf_handler: [u8; 15] = [
        0x90, 0x90, 0x90, // nop x3 (as Linux's ASM_CLAC without SMAP)
        0xb8, 0xad, 0xde, 0x00, 0x00, // mov eax, 0xdead
        0xe7, 0xee, // out 0xee, eax   (a real #PF: the syscall was not completed)
        0xb0, 0xfe, // mov al, 0xfe
        0xe6, 0x64, // out 0x64, al
        0xf4, // hlt
    ];
    let mut i = 0;
    while i < start.len() {
        c[i] = start[i];
        i += 1;
    }
    i = 0;
    while i < sys_entry.len() {
        c[ST_SYS_ENTRY + i] = sys_entry[i];
        i += 1;
    }
    i = 0;
    while i < bp_handler.len() {
        c[ST_BP_HANDLER + i] = bp_handler[i];
        i += 1;
    }
    i = 0;
    while i < pf_handler.len() {
        c[ST_PF_HANDLER + i] = pf_handler[i];
        i += 1;
    }
    c
};
/// Self-test offsets in the kernel part.
const ST_SYS_ENTRY: usize = 0x80;
const ST_BP_HANDLER: usize = 0xc0;
const ST_PF_HANDLER: usize = 0x100;
/// Self-test user part, at [`ST_USER`] (a user-accessible 2 MiB page).
const SELF_TEST_USER: [u8; 9] = [
    0xb8, 0x6e, 0x00, 0x00, 0x00, // mov eax, 110
    0x0f, 0x05, // syscall
    0xeb, 0xf7, // jmp back
];
const ST_USER: u64 = 0x20_1000;
/// Length of the user code up to the end of its `syscall`.
const ST_USER_RET: u64 = 7;

/// Run a tiny guest that needs every completion of this mode (`fwait`, `clac`, `stac`,
/// `int3` in kernel mode, a user-mode `syscall`) and check it ran as a CPU would have
/// run it. For `ornament doctor`.
pub fn pvm_compat_self_test() -> Result<SelfTestReport, SelfTestError> {
    use crate::layout::{
        test_stack_top, PDE_START, PDPTE_START, PML4_START, TEST_CODE_START, TEST_DATA_START,
    };
    use crate::machine::RunControl;
    use crate::testing::TestGuest;
    use crate::vcpu::VcpuEvent;
    use vm_memory::GuestAddress;

    let guest = TestGuest::long_mode(&SELF_TEST_KERNEL);
    let mut m = guest.build(1).map_err(SelfTestError::Testing)?;
    let mem = m.vm.memory().clone();
    let w = |at: u64, b: &[u8]| {
        mem.write(GuestAddress(at), b)
            .map_err(SelfTestError::Memory)
    };
    w(ST_USER, &SELF_TEST_USER)?;
    // GDT: null, null, kernel code 0x10, kernel data 0x18, TSS 0x20 (16 bytes), user
    // data 0x30, user code 0x38 (both DPL 3).
    let gdt_at = TEST_DATA_START.0;
    let gdt: [u64; 8] = [
        0,
        0,
        0x00af_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x0080_8b00_0000_0067,
        0,
        0x00cf_f300_0000_ffff,
        0x00af_fb00_0000_ffff,
    ];
    let gdt_bytes: Vec<u8> = gdt.iter().flat_map(|e| e.to_le_bytes()).collect();
    w(gdt_at, &gdt_bytes)?;
    // IDT: #BP (3) and #PF (14) gates, kernel CS, present interrupt gates.
    let idt_at = gdt_at + 0x100;
    let gate = |handler: u64| {
        let mut g = [0u8; 16];
        g[0..2].copy_from_slice(&handler.to_le_bytes()[0..2]);
        g[2] = 0x10;
        g[5] = 0x8e;
        g[6..8].copy_from_slice(&handler.to_le_bytes()[2..4]);
        g[8..12].copy_from_slice(&handler.to_le_bytes()[4..8]);
        g
    };
    let base = TEST_CODE_START.0;
    w(
        idt_at + 3 * IDT_GATE_SIZE,
        &gate(base + ST_BP_HANDLER as u64),
    )?;
    w(
        idt_at + PF_VECTOR * IDT_GATE_SIZE,
        &gate(base + ST_PF_HANDLER as u64),
    )?;
    // The TSS (at guest-physical 0, what the boot TR says): RSP0 at offset 4 for the
    // #PF from user mode.
    let rsp0 = test_stack_top(1).map_or(0, |a| a.0);
    w(4, &rsp0.to_le_bytes())?;
    // User access through PML4[0], PDPT[0] and the 2 MiB page at 2 MiB only.
    let user = |at: u64| -> Result<(), SelfTestError> {
        let mut b = [0u8; 8];
        mem.read_phys(ornament_engine::Gpa(at), &mut b)
            .map_err(|_| SelfTestError::WrongReports {
                got: Vec::new(),
                expected: Vec::new(),
            })?;
        w(at, &(u64::from_le_bytes(b) | 4).to_le_bytes())
    };
    user(PML4_START.0)?;
    user(PDPTE_START.0)?;
    user(PDE_START.0 + 8)?;
    let fd = m.vcpus[0].fd();
    let mut sregs = fd.get_sregs().map_err(SelfTestError::Registers)?;
    sregs.gdt.base = gdt_at;
    sregs.gdt.limit = 8 * 8 - 1;
    sregs.idt.base = idt_at;
    sregs.idt.limit = u16::try_from(16 * IDT_GATE_SIZE - 1).unwrap_or(u16::MAX);
    sregs.efer |= 1; // EFER.SCE: syscall enabled
    fd.set_sregs(&sregs).map_err(SelfTestError::Registers)?;
    let msr = |index, data| kvm_bindings::kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let msrs = kvm_bindings::Msrs::from_entries(&[
        msr(MSR_STAR, (0x28 << 48) | (0x10 << 32)),
        msr(MSR_LSTAR, base + ST_SYS_ENTRY as u64),
        msr(MSR_SFMASK, 0x4_7700),
    ])
    .expect("three MSRs fit");
    fd.set_msrs(&msrs).map_err(SelfTestError::Registers)?;
    let shared = Arc::new(PvmShared::default());
    shared.want_hook();
    m.pvm = Some(shared);
    m.complete_instructions = true;
    let reports = std::sync::Mutex::new(Vec::new());
    let out = m
        .run(
            None,
            &|_, ev| {
                if let VcpuEvent::Report(v) = ev {
                    reports.lock().unwrap_or_else(|p| p.into_inner()).push(v);
                }
                false
            },
            &RunControl::new(),
        )
        .map_err(SelfTestError::Machine)?;
    let o = out.into_iter().next().expect("one vCPU");
    o.result.map_err(SelfTestError::Vcpu)?;
    let got = reports.into_inner().unwrap_or_else(|p| p.into_inner());
    let ret = u32::try_from(ST_USER + ST_USER_RET).unwrap_or(0);
    let expected = vec![1, 1, 0, ret, 2];
    // The user RFLAGS in R11: PVM runs user mode with IF set whatever `iretq` popped,
    // and some hosts add RF; compare without those two bits.
    let norm = |v: &[u32]| {
        let mut v = v.to_vec();
        if let Some(r11) = v.get_mut(4) {
            *r11 &= !((1 << 16) | (1 << 9));
        }
        v
    };
    if norm(&got) != expected {
        return Err(SelfTestError::WrongReports { got, expected });
    }
    Ok(SelfTestReport {
        completed: o.stats.completed,
        syscall_entries: o.stats.syscall_entries,
        needed: o.stats.completed > 0 || o.stats.syscall_entries > 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ornament_engine::{Gpa, SliceMemory};

    const LSTAR: u64 = 0xffff_ffff_81c0_0080;
    const HANDLER: u64 = 0xffff_ffff_81c0_0be0;
    // Linux: STAR = (__USER32_CS << 48) | (__KERNEL_CS << 32); SFMASK = TF|DF|IF|IOPL|AC|NT.
    const STAR: u64 = (0x23 << 48) | (0x10 << 32);
    const SFMASK: u64 = 0x47700;

    fn hook(skip: u64) -> PfHook {
        PfHook {
            handler: HANDLER,
            skip,
            slot: 3,
            msrs: SyscallMsrs {
                star: STAR,
                lstar: LSTAR,
                sfmask: SFMASK,
            },
        }
    }

    fn user_syscall_frame() -> PfFrame {
        PfFrame {
            error_code: 0x15, // present, user, instruction fetch
            rip: LSTAR,
            cs: 0x33,
            rflags: 0x246,
            rsp: 0x7ffc_0000_1000,
            ss: 0x2b,
        }
    }

    #[test]
    fn cmdline_appends_once() {
        let c = compat_cmdline("console=ttyS0 nokaslr");
        assert!(c.starts_with("console=ttyS0 nokaslr noxsave clearcpuid=137,308,151"));
        assert_eq!(c.matches("nokaslr").count(), 1);
        assert!(c.ends_with("tsc=reliable"));
        assert!(!compat_cmdline("quiet console=ttyS0").contains("quiet"));
        let t = compat_cmdline_for_tsc("console=ttyS0", 2_445_406);
        assert!(t.ends_with(" tsc_early_khz=9781624"), "{t}");
        assert_eq!(
            compat_cmdline_for_tsc("tsc_early_khz=1", 5)
                .matches("tsc_early")
                .count(),
            1
        );
        assert_eq!(
            compat_cmdline(""),
            COMPAT_CMDLINE
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        );
    }

    #[test]
    fn frame_and_gate_decode() {
        let mut b = [0u8; PfFrame::SIZE];
        for (i, v) in [0x15u64, LSTAR, 0x33, 0x246, 0x7ffc_0000_1000, 0x2b]
            .iter()
            .enumerate()
        {
            b[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        assert_eq!(PfFrame::from_bytes(&b), user_syscall_frame());
        // Gate for 0xffffffff81c00be0: offset 15:0, selector 0x10, type 0x8e, 31:16, 63:32.
        let gate = [
            0xe0, 0x0b, 0x10, 0x00, 0x00, 0x8e, 0xc0, 0x81, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0,
        ];
        assert_eq!(idt_gate_offset(&gate), HANDLER);
        assert_eq!(leading_nop_len(&[0x90, 0x90, 0x90, 0xfc]), 3);
        assert_eq!(leading_nop_len(&[0x0f, 0x1f, 0x00]), 3);
        assert_eq!(leading_nop_len(&[0x0f, 0x01, 0xca]), 0);
    }

    #[test]
    fn user_fault_at_lstar_is_a_syscall_entry() {
        assert_eq!(
            decide_pf(&user_syscall_frame(), &hook(3)),
            PfDecision::SyscallEntry
        );
        // A kernel-mode fault at the same RIP, or a user fault elsewhere, is a real #PF.
        let kernel = PfFrame {
            cs: 0x10,
            ..user_syscall_frame()
        };
        assert_eq!(
            decide_pf(&kernel, &hook(3)),
            PfDecision::PassThrough {
                resume_rip: Some(HANDLER + 3)
            }
        );
        let elsewhere = PfFrame {
            rip: 0x40_1000,
            ..user_syscall_frame()
        };
        assert_eq!(
            decide_pf(&elsewhere, &hook(0)),
            PfDecision::PassThrough { resume_rip: None }
        );
    }

    #[test]
    fn syscall_entry_registers() {
        let at_handler = kvm_regs {
            rax: 110, // getppid
            rcx: 0x40_1234,
            r11: 0x246,
            rsp: 0xffff_c900_0001_3f58,
            rip: HANDLER,
            rflags: 0x46,
            ..Default::default()
        };
        let (r, cs, ss) = complete_syscall_entry(&at_handler, &user_syscall_frame(), &hook(3).msrs);
        assert_eq!(r.rip, LSTAR);
        assert_eq!(r.rsp, 0x7ffc_0000_1000);
        assert_eq!(r.rflags, 0x246 & !SFMASK | 2);
        assert_eq!(r.rflags & (1 << 9), 0, "interrupts off, as SFMASK says");
        assert_eq!((r.rax, r.rcx, r.r11), (110, 0x40_1234, 0x246));
        assert_eq!((cs.selector, cs.l, cs.dpl, cs.type_), (0x10, 1, 0, 0xb));
        assert_eq!((ss.selector, ss.db, ss.dpl, ss.type_), (0x18, 1, 0, 0x3));
    }

    #[test]
    fn reads_cross_pages_and_check_the_syscall() {
        // Page tables at 0x1000.. mapping gva 0x40_0000.. (4 KiB pages) to gpa 0x8000..
        let m = SliceMemory::new(0x10000);
        let w = |a: u64, v: u64| m.write_phys(Gpa(a), &v.to_le_bytes()).expect("in range");
        w(0x1000, 0x2000 | 7);
        w(0x2000, 0x3000 | 7);
        w(0x3000 + 2 * 8, 0x4000 | 7);
        w(0x4000, 0x8000 | 7);
        w(0x4000 + 8, 0x9000 | 7);
        m.write_phys(Gpa(0x8ffe), &[0x0f, 0x05]).expect("in range");
        assert!(follows_syscall(&m, 0x1000, 0x40_1000));
        assert!(!follows_syscall(&m, 0x1000, 0x40_1001));
        let mut b = [0u8; 4];
        m.write_phys(Gpa(0x9000), &[0xaa, 0xbb]).expect("in range");
        read_virt(&m, 0x1000, 0x40_0ffe, &mut b).expect("mapped");
        assert_eq!(b, [0x0f, 0x05, 0xaa, 0xbb]);
        assert!(read_virt(&m, 0x1000, 0x40_2000, &mut b).is_none());
    }

    #[test]
    fn hook_takes_the_highest_free_slot() {
        let mut base = GuestDebug::default();
        assert_eq!(free_slot(&base), Some(3));
        base.debugreg[7] = dr7_enable(0, 3);
        assert_eq!(free_slot(&base), Some(2));
        let h = PfHook { slot: 2, ..hook(3) };
        let d = with_hook(base, &h);
        assert_eq!(d.debugreg[2], HANDLER);
        assert_eq!(d.debugreg[7], dr7_enable(dr7_enable(0, 3), 2));
        assert_eq!(d.control, control(false));
        let full = (0..SLOTS).fold(0, dr7_enable);
        base.debugreg[7] = full;
        assert_eq!(free_slot(&base), None);
    }

    #[test]
    fn locates_the_handler_through_the_idt() {
        // Identity-mapped 2 MiB page at 0 (PML4 0x1000 -> PDPT 0x2000 -> PD 0x3000).
        let m = SliceMemory::new(0x10000);
        let w = |a: u64, v: u64| m.write_phys(Gpa(a), &v.to_le_bytes()).expect("in range");
        w(0x1000, 0x2000 | 3);
        w(0x2000, 0x3000 | 3);
        w(0x3000, 0x83);
        let gate = [0x00, 0x60, 0x10, 0, 0, 0x8e, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        m.write_phys(Gpa(0x5000 + 14 * 16), &gate)
            .expect("in range");
        m.write_phys(Gpa(0x6000), &[0x90, 0x90, 0x90, 0xfc])
            .expect("in range");
        let mut sregs = kvm_sregs {
            cr3: 0x1000,
            ..Default::default()
        };
        sregs.idt.base = 0x5000;
        let msrs = hook(3).msrs;
        let h = locate_pf_hook(&m, &sregs, msrs, &GuestDebug::default()).expect("found");
        assert_eq!((h.handler, h.skip, h.slot), (0x6000, 3, 3));
        sregs.idt.base = 0x20_0000;
        assert_eq!(
            locate_pf_hook(&m, &sregs, msrs, &GuestDebug::default()),
            None
        );
    }

    #[test]
    fn line_watch_sees_split_lines() {
        let mut w = LineWatch::default();
        let n = ARM_HOOK_AFTER.as_bytes();
        assert!(!w.feed(b"[ 1.0] Run /in", n));
        assert!(w.feed(b"it as init process\n", n));
        assert!(!w.feed(b"other\n", n));
    }
}
