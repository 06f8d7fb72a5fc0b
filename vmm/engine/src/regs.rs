//! The x86-64 register set a probe hit carries.

use serde::{Deserialize, Serialize};

/// General-purpose and system registers of one vCPU at one instant.
///
/// Engines fill what they can; a backend that cannot read a register leaves it 0
/// and says so in its documentation (the QEMU gdbstub has no MSRs, for example).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub rsp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
    pub cs: u64,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    /// GS base in effect (the per-CPU base while in kernel mode).
    pub gs_base: u64,
    /// The other GS base (MSR_KERNEL_GS_BASE; swapped by `swapgs`).
    pub kernel_gs_base: u64,
    pub fs_base: u64,
}

impl Regs {
    /// The n-th integer argument of the System V / kernel calling convention (0-based).
    pub fn arg(&self, n: usize) -> Option<u64> {
        [self.rdi, self.rsi, self.rdx, self.rcx, self.r8, self.r9]
            .get(n)
            .copied()
    }

    /// True when CS has requested privilege level 0 (the vCPU runs kernel code).
    pub fn in_kernel_mode(&self) -> bool {
        self.cs & 3 == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_in_order() {
        let r = Regs {
            rdi: 1,
            rsi: 2,
            rdx: 3,
            rcx: 4,
            r8: 5,
            r9: 6,
            cs: 0x10,
            ..Regs::default()
        };
        let args: Vec<u64> = (0..6).filter_map(|i| r.arg(i)).collect();
        assert_eq!(args, vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(r.arg(6), None);
        assert!(r.in_kernel_mode());
    }
}
