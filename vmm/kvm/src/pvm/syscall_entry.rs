//! The user-mode `SYSCALL` entry completed by the VMM: the #PF handler watched through a
//! debug register, the fault frame read and decided on, the registers the CPU should have set.

use crate::engine::translate;
use crate::trap::debugreg::{control, dr7_enable, dr7_local_enable, SLOTS};
use crate::trap::GuestDebug;
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use ornament_engine::{Gva, PhysMemory};

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
}
