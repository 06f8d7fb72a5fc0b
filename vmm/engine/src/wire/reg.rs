//! The registers a probe may read, and sets of them ([`RegMask`]), in hit-record order.

use crate::regs::Regs;

/// The registers a probe may ask for; bit `n` of a [`RegMask`] is `Reg` number `n`.
///
/// The order is that of [`Regs`]'s fields, and it is the order of values in a hit record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
#[allow(missing_docs)]
pub enum Reg {
    Rax = 0,
    Rbx,
    Rcx,
    Rdx,
    Rsi,
    Rdi,
    Rbp,
    Rsp,
    R8,
    R9,
    R10,
    R11,
    R12,
    R13,
    R14,
    R15,
    Rip,
    Rflags,
    Cs,
    Cr0,
    Cr3,
    Cr4,
    Efer,
    GsBase,
    KernelGsBase,
    FsBase,
}

impl Reg {
    /// Number of registers.
    pub const COUNT: usize = 26;
    /// All registers, in bit order.
    pub const ALL: [Reg; Reg::COUNT] = [
        Reg::Rax,
        Reg::Rbx,
        Reg::Rcx,
        Reg::Rdx,
        Reg::Rsi,
        Reg::Rdi,
        Reg::Rbp,
        Reg::Rsp,
        Reg::R8,
        Reg::R9,
        Reg::R10,
        Reg::R11,
        Reg::R12,
        Reg::R13,
        Reg::R14,
        Reg::R15,
        Reg::Rip,
        Reg::Rflags,
        Reg::Cs,
        Reg::Cr0,
        Reg::Cr3,
        Reg::Cr4,
        Reg::Efer,
        Reg::GsBase,
        Reg::KernelGsBase,
        Reg::FsBase,
    ];

    /// The register with bit number `n`.
    pub fn from_index(n: u8) -> Option<Reg> {
        Reg::ALL.get(usize::from(n)).copied()
    }

    /// Bit number in a [`RegMask`].
    pub const fn index(self) -> u8 {
        self as u8
    }

    /// The names QEMU's x86-64 gdb register description uses for this register, in order of
    /// preference (the plugin resolves the first one QEMU offers).
    pub const fn qemu_names(self) -> &'static [&'static str] {
        match self {
            Reg::Rax => &["rax"],
            Reg::Rbx => &["rbx"],
            Reg::Rcx => &["rcx"],
            Reg::Rdx => &["rdx"],
            Reg::Rsi => &["rsi"],
            Reg::Rdi => &["rdi"],
            Reg::Rbp => &["rbp"],
            Reg::Rsp => &["rsp"],
            Reg::R8 => &["r8"],
            Reg::R9 => &["r9"],
            Reg::R10 => &["r10"],
            Reg::R11 => &["r11"],
            Reg::R12 => &["r12"],
            Reg::R13 => &["r13"],
            Reg::R14 => &["r14"],
            Reg::R15 => &["r15"],
            Reg::Rip => &["rip", "pc"],
            Reg::Rflags => &["eflags", "rflags"],
            Reg::Cs => &["cs"],
            Reg::Cr0 => &["cr0"],
            Reg::Cr3 => &["cr3"],
            Reg::Cr4 => &["cr4"],
            Reg::Efer => &["efer"],
            Reg::GsBase => &["gs_base"],
            Reg::KernelGsBase => &["k_gs_base", "kernel_gs_base"],
            Reg::FsBase => &["fs_base"],
        }
    }

    /// Store `value` into the matching field of `regs`.
    pub fn set(self, regs: &mut Regs, value: u64) {
        let field = match self {
            Reg::Rax => &mut regs.rax,
            Reg::Rbx => &mut regs.rbx,
            Reg::Rcx => &mut regs.rcx,
            Reg::Rdx => &mut regs.rdx,
            Reg::Rsi => &mut regs.rsi,
            Reg::Rdi => &mut regs.rdi,
            Reg::Rbp => &mut regs.rbp,
            Reg::Rsp => &mut regs.rsp,
            Reg::R8 => &mut regs.r8,
            Reg::R9 => &mut regs.r9,
            Reg::R10 => &mut regs.r10,
            Reg::R11 => &mut regs.r11,
            Reg::R12 => &mut regs.r12,
            Reg::R13 => &mut regs.r13,
            Reg::R14 => &mut regs.r14,
            Reg::R15 => &mut regs.r15,
            Reg::Rip => &mut regs.rip,
            Reg::Rflags => &mut regs.rflags,
            Reg::Cs => &mut regs.cs,
            Reg::Cr0 => &mut regs.cr0,
            Reg::Cr3 => &mut regs.cr3,
            Reg::Cr4 => &mut regs.cr4,
            Reg::Efer => &mut regs.efer,
            Reg::GsBase => &mut regs.gs_base,
            Reg::KernelGsBase => &mut regs.kernel_gs_base,
            Reg::FsBase => &mut regs.fs_base,
        };
        *field = value;
    }
}

/// A set of [`Reg`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct RegMask(pub u64);

impl RegMask {
    /// No register.
    pub const NONE: RegMask = RegMask(0);
    /// Every register.
    pub const ALL: RegMask = RegMask((1 << Reg::COUNT) - 1);

    /// The mask of the given registers.
    pub fn of(regs: &[Reg]) -> RegMask {
        RegMask(regs.iter().fold(0, |m, r| m | 1 << r.index()))
    }

    /// True when `reg` is in the set.
    pub const fn contains(self, reg: Reg) -> bool {
        self.0 & (1 << reg.index()) != 0
    }

    /// Number of registers in the set.
    pub const fn count(self) -> usize {
        self.0.count_ones() as usize
    }

    /// The registers in the set, in bit order.
    pub fn iter(self) -> impl Iterator<Item = Reg> {
        Reg::ALL.into_iter().filter(move |r| self.contains(*r))
    }

    /// True when only known register bits are set.
    pub const fn is_valid(self) -> bool {
        self.0 & !Self::ALL.0 == 0
    }
}
