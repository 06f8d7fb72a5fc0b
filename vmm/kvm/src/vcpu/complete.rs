//! Finishing instructions KVM could not: on PVM some kernel-mode instructions end in an
//! emulation failure (`KVM_EXIT_INTERNAL_ERROR`, suberror 1). The VMM reads the
//! instruction and does what the CPU would have done:
//! - `int3`: RIP past it, #BP injected with `KVM_SET_VCPU_EVENTS` (Linux's boot-time
//!   `int3_selftest` and every `text_poke_bp`);
//! - `fwait`: skipped (no x87 exception is ever pending in our guests' kernels);
//! - `clac` / `stac`: RFLAGS.AC cleared / set, skipped.

use crate::engine::translate;
use kvm_bindings::{kvm_regs, kvm_sregs};
use ornament_engine::{Gva, PhysMemory};

/// `int3`.
pub const INT3: u8 = 0xcc;
/// `fwait`.
pub const FWAIT: u8 = 0x9b;
/// `clac`.
pub const CLAC: [u8; 3] = [0x0f, 0x01, 0xca];
/// `stac`.
pub const STAC: [u8; 3] = [0x0f, 0x01, 0xcb];
/// RFLAGS.AC.
pub const RFLAGS_AC: u64 = 1 << 18;
/// Longest instruction [`decide`] looks at.
pub const MAX_INSN: usize = 3;
/// The #BP vector.
pub const BP_VECTOR: u8 = 3;
/// `KVM_INTERNAL_ERROR_EMULATION`.
pub const SUBERROR_EMULATION: u32 = 1;

/// What the VMM does in the guest's place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// Deliver #BP with RIP at `resume_rip` (the byte after the `int3`).
    InjectBreakpoint {
        /// Where the guest's handler returns to.
        resume_rip: u64,
    },
    /// Continue at `resume_rip` with `rflags`.
    Skip {
        /// The next instruction.
        resume_rip: u64,
        /// RFLAGS after the instruction.
        rflags: u64,
    },
}

/// What to do about the instruction `insn` (bytes at RIP) that KVM failed to emulate;
/// `None` when it is nothing we complete.
pub fn decide(insn: &[u8], regs: &kvm_regs, sregs: &kvm_sregs) -> Option<Completion> {
    if sregs.cs.selector & 3 != 0 {
        return None;
    }
    let skip = |len: u64, rflags: u64| Completion::Skip {
        resume_rip: regs.rip.wrapping_add(len),
        rflags,
    };
    match insn {
        [INT3, ..] => Some(Completion::InjectBreakpoint {
            resume_rip: regs.rip.wrapping_add(1),
        }),
        [FWAIT, ..] => Some(skip(1, regs.rflags)),
        [a, b, c, ..] if [*a, *b, *c] == CLAC => Some(skip(3, regs.rflags & !RFLAGS_AC)),
        [a, b, c, ..] if [*a, *b, *c] == STAC => Some(skip(3, regs.rflags | RFLAGS_AC)),
        _ => None,
    }
}

/// Read up to [`MAX_INSN`] instruction bytes at RIP through the guest's page tables
/// (identity when paging is off), stopping at a page boundary.
pub fn fetch(mem: &dyn PhysMemory, regs: &kvm_regs, sregs: &kvm_sregs) -> Option<Vec<u8>> {
    fetch_n(mem, regs, sregs, MAX_INSN)
}

/// Read up to `n` bytes at RIP, as [`fetch`] does (for error messages).
pub fn fetch_n(
    mem: &dyn PhysMemory,
    regs: &kvm_regs,
    sregs: &kvm_sregs,
    n: usize,
) -> Option<Vec<u8>> {
    let gpa = if sregs.cr0 & crate::boot::CR0_PG != 0 {
        translate(mem, sregs.cr3, Gva(regs.rip))?
    } else {
        ornament_engine::Gpa(regs.rip)
    };
    let to_page_end = 0x1000 - (gpa.raw() & 0xfff);
    let len = usize::try_from(to_page_end).map_or(n, |p| p.min(n));
    let mut b = vec![0u8; len];
    mem.read_phys(gpa, &mut b).ok()?;
    Some(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_kernel_mode_int3_is_completed() {
        let regs = kvm_regs {
            rip: 0xffff_ffff_8100_0000,
            ..Default::default()
        };
        let mut sregs = kvm_sregs::default();
        sregs.cs.selector = 0x10;
        assert_eq!(
            decide(&[INT3], &regs, &sregs),
            Some(Completion::InjectBreakpoint {
                resume_rip: 0xffff_ffff_8100_0001
            })
        );
        assert_eq!(decide(&[0x0f, 0xc7], &regs, &sregs), None);
        let r = kvm_regs {
            rflags: 0x46 | RFLAGS_AC,
            ..regs
        };
        assert_eq!(
            decide(&[FWAIT, 0x65], &r, &sregs),
            Some(Completion::Skip {
                resume_rip: r.rip + 1,
                rflags: r.rflags
            })
        );
        assert_eq!(
            decide(&CLAC, &r, &sregs),
            Some(Completion::Skip {
                resume_rip: r.rip + 3,
                rflags: 0x46
            })
        );
        assert_eq!(
            decide(&STAC, &regs, &sregs),
            Some(Completion::Skip {
                resume_rip: regs.rip + 3,
                rflags: RFLAGS_AC
            })
        );
        assert_eq!(decide(&CLAC[..2], &r, &sregs), None);
        assert_eq!(decide(&[], &regs, &sregs), None);
        sregs.cs.selector = 0x33;
        assert_eq!(decide(&[INT3], &regs, &sregs), None);
    }

    #[test]
    fn fetch_without_paging_is_physical() {
        let m = ornament_engine::SliceMemory::new(0x100);
        m.write_phys(ornament_engine::Gpa(0x10), &[INT3])
            .expect("in range");
        let regs = kvm_regs {
            rip: 0x10,
            ..Default::default()
        };
        assert_eq!(
            fetch(&m, &regs, &kvm_sregs::default()),
            Some(vec![INT3, 0, 0])
        );
        let at_page_end = kvm_regs {
            rip: 0xfff,
            ..Default::default()
        };
        let m = ornament_engine::SliceMemory::new(0x2000);
        assert_eq!(
            fetch(&m, &at_page_end, &kvm_sregs::default()),
            Some(vec![0])
        );
    }
}
