//! \[1\]->\[2\] The byte format on the socket between the TCG plugin and the QEMU engine.
//!
//! Both sides link this module: the GPL plugin (`ornament-tcg-plugin`) and the permissive host
//! (`ornament-qemu::plugin_link`), so the format lives here, in the permissive seam crate.
//!
//! Every message is a little-endian record that starts with an 8-byte header:
//!
//! ```text
//! offset 0  u16  kind   (MsgKind)
//! offset 2  u16  flags  (kind-specific)
//! offset 4  u32  len    total record length in bytes, header included, multiple of 8
//! ```
//!
//! All records but [`HitRecord`] have one fixed size per kind. A hit record is a fixed
//! 40-byte head followed by one `u64` per register named in its mask (in [`Reg`] order) and one
//! `u64` per memory read of its probe, so its length is known from its head. Records are
//! written back to back; a reader takes the header, then `len - 8` more bytes.
//!
//! Session: the plugin connects, sends [`Hello`]; the host sends any number of [`ArmRecord`]s
//! and then a `Go`; the plugin returns from its install hook and the guest starts. From then
//! on the plugin sends hits (batched, in the order they happened), vCPU-init and error records;
//! the host sends arm, disarm and answer records at any time, and once a [`RamRecord`] (guest
//! RAM's layout, with the RAM file's descriptor as `SCM_RIGHTS` ancillary data on the same
//! `sendmsg`) so the plugin can read guest memory without QEMU's debug accessors.

use crate::regs::Regs;

/// Version of this format; the plugin sends it in [`Hello`] and the host checks it.
pub const WIRE_VERSION: u32 = 4;
/// Size of the common record header.
pub const HEADER_LEN: usize = 8;
/// Largest record: a hit with every register, every memory read and the largest byte range.
pub const MAX_RECORD_LEN: usize =
    HIT_HEAD_LEN + 8 * (Reg::COUNT + MAX_MEM_READS) + 8 + MAX_BYTES_READ as usize;
/// Most bytes a probe's [`BytesRead`] may ask for.
pub const MAX_BYTES_READ: u32 = 64 << 10;
/// Memory reads a probe may ask for.
pub const MAX_MEM_READS: usize = 16;
/// Largest single memory read, in bytes (it is returned as one little-endian `u64`).
pub const MAX_MEM_READ_LEN: u8 = 8;
/// Number of values the syscall-style filter bitmap covers (`0..FILTER_BITS`).
pub const FILTER_BITS: usize = 512;
/// Fixed part of a hit record (header included).
pub const HIT_HEAD_LEN: usize = 40;
/// Length of an [`ArmRecord`].
pub const ARM_LEN: usize = HEADER_LEN + 24 + 16 * MAX_MEM_READS + 8 + FILTER_BITS / 8 + 8;
/// Most guest RAM regions a [`RamRecord`] carries.
pub const MAX_RAM_REGIONS: usize = 8;
/// Length of a [`RamRecord`].
pub const RAM_LEN: usize = HEADER_LEN + 8 + 24 * MAX_RAM_REGIONS;
/// Guest pages are 4 KiB: RAM regions start, end and sit in the file at this alignment.
pub const PAGE_SIZE: u64 = 4096;

/// Why a record could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, displaydoc::Display)]
pub enum WireError {
    /// record is {got} bytes, at least {need} needed
    Short {
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        got: usize,
    },
    /// unknown record kind {0}
    UnknownKind(u16),
    /// record of kind {kind} has length {len}, expected {expected}
    BadLength {
        /// The record kind.
        kind: u16,
        /// Length in the header.
        len: u32,
        /// Length that kind must have.
        expected: usize,
    },
    /// field {0} holds an invalid value
    BadField(&'static str),
}

/// Record kinds. Plugin-to-host kinds are below 0x100, host-to-plugin kinds from 0x100.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum MsgKind {
    /// Plugin to host, first record: [`Hello`].
    Hello = 1,
    /// Plugin to host: a probe hit, [`HitRecord`].
    Hit = 2,
    /// Plugin to host: a vCPU was initialised, [`VcpuInitRecord`].
    VcpuInit = 3,
    /// Plugin to host: something went wrong, [`ErrorRecord`].
    Error = 4,
    /// Plugin to host: QEMU is exiting, [`ByeRecord`].
    Bye = 5,
    /// Host to plugin: add or change a probe, [`ArmRecord`].
    Arm = 0x101,
    /// Host to plugin: disable a probe, [`DisarmRecord`].
    Disarm = 0x102,
    /// Host to plugin: resume a held vCPU, [`AnswerRecord`].
    Answer = 0x103,
    /// Host to plugin: the initial probe set is complete; the guest may start.
    Go = 0x104,
    /// Host to plugin: guest RAM's layout, with the RAM file descriptor attached,
    /// [`RamRecord`].
    Ram = 0x105,
}

impl MsgKind {
    /// The kind for a raw value.
    pub fn from_raw(raw: u16) -> Result<Self, WireError> {
        Ok(match raw {
            1 => Self::Hello,
            2 => Self::Hit,
            3 => Self::VcpuInit,
            4 => Self::Error,
            5 => Self::Bye,
            0x101 => Self::Arm,
            0x102 => Self::Disarm,
            0x103 => Self::Answer,
            0x104 => Self::Go,
            0x105 => Self::Ram,
            other => return Err(WireError::UnknownKind(other)),
        })
    }

    /// The fixed record length of this kind; `None` for hits (variable).
    pub const fn fixed_len(self) -> Option<usize> {
        match self {
            Self::Hello => Some(24),
            Self::Hit => None,
            Self::VcpuInit => Some(24),
            Self::Error => Some(32),
            Self::Bye => Some(48),
            Self::Arm => Some(ARM_LEN),
            Self::Disarm => Some(16),
            Self::Answer => Some(24),
            Self::Go => Some(8),
            Self::Ram => Some(RAM_LEN),
        }
    }
}

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

/// Where a memory read's address comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MemBase {
    /// The read is unused.
    #[default]
    None,
    /// `offset` is the guest-virtual address itself.
    Absolute,
    /// The address is the value of a register plus `offset` (e.g. `gs_base` + per-CPU offset).
    Reg(Reg),
    /// The address is the value of an earlier memory read of the same hit plus `offset` (a
    /// pointer chain, e.g. `task->real_parent->tgid`). The index must be below this read's own;
    /// when that read failed, this one fails too.
    Mem(u8),
}

/// One small guest-virtual memory read done in the probe callback.
///
/// Its result travels in the hit record as a little-endian `u64` (zero-extended).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemRead {
    /// Base of the address.
    pub base: MemBase,
    /// Added to the base, modulo 2^64.
    pub offset: u64,
    /// Bytes to read, 1..=8.
    pub len: u8,
}

impl MemRead {
    /// Read `len` bytes at register `reg` + `offset`.
    pub const fn at_reg(reg: Reg, offset: u64, len: u8) -> Self {
        Self {
            base: MemBase::Reg(reg),
            offset,
            len,
        }
    }

    /// Read `len` bytes at the value of earlier read `j` + `offset` (a pointer chain).
    pub const fn at_mem(j: u8, offset: u64, len: u8) -> Self {
        Self {
            base: MemBase::Mem(j),
            offset,
            len,
        }
    }
}

/// A byte range read at each hit, between the values of two of its memory reads (e.g. a
/// task's `mm->arg_start` and `mm->arg_end`): `min(mem[end] - mem[start], max)` bytes at
/// guest-virtual `mem[start]`, read page by page up to the first unreadable page. `max == 0`:
/// none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BytesRead {
    /// Index of the memory read whose value is the start address.
    pub start: u8,
    /// Index of the memory read whose value is the end address (exclusive).
    pub end: u8,
    /// Most bytes to read, at most [`MAX_BYTES_READ`]; 0 when the probe reads none.
    pub max: u32,
}

impl BytesRead {
    /// True when the probe asks for a byte range.
    pub const fn is_some(&self) -> bool {
        self.max != 0
    }

    /// The range to read for these memory-read values: `(start address, bytes, cut)`, where
    /// `cut` says the range was longer than `max`. `None` when the probe reads no range,
    /// either read failed or the end lies before the start.
    pub fn range(&self, mem: impl Fn(usize) -> Option<u64>) -> Option<(u64, usize, bool)> {
        if !self.is_some() {
            return None;
        }
        let start = mem(usize::from(self.start))?;
        let end = mem(usize::from(self.end))?;
        let len = end.checked_sub(start)?;
        let max = u64::from(self.max.min(MAX_BYTES_READ));
        Some((start, usize::try_from(len.min(max)).ok()?, len > max))
    }
}

/// Bit in [`ArmRecord::flags`]: the probe is live (a disarmed probe keeps its callback but
/// does nothing).
pub const ARM_ENABLED: u32 = 1 << 0;

/// What a probe reads and does: everything the plugin needs to know about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProbeSpec {
    /// Registers to read at each hit.
    pub regs: RegMask,
    /// Memory reads at each hit (unused entries have base `None`).
    pub mem: [MemRead; MAX_MEM_READS],
    /// Hold the vCPU after each reported hit until the host answers.
    pub hold: bool,
    /// Report only hits where this register's value is below [`FILTER_BITS`] and its bit is set
    /// in `filter_bits` (e.g. `rsi` = syscall number at `do_syscall_64`).
    pub filter: Option<Reg>,
    /// The filter's bitmap, bit `v` = word `v / 64`, bit `v % 64`.
    pub filter_bits: [u64; FILTER_BITS / 64],
    /// A byte range read after the memory reads (none by default).
    pub bytes: BytesRead,
}

impl ProbeSpec {
    /// A spec that reads `regs` and reports every hit without holding.
    pub fn regs(regs: RegMask) -> Self {
        Self {
            regs,
            ..Self::default()
        }
    }

    /// Restrict to hits where `reg`'s value is one of `values` (values >= [`FILTER_BITS`] are
    /// ignored).
    pub fn with_filter(mut self, reg: Reg, values: &[u64]) -> Self {
        self.filter = Some(reg);
        self.filter_bits = [0; FILTER_BITS / 64];
        for v in values {
            if let Ok(i) = usize::try_from(*v) {
                if i < FILTER_BITS {
                    self.filter_bits[i / 64] |= 1 << (i % 64);
                }
            }
        }
        self
    }

    /// True when a hit with this register value passes the filter.
    pub fn filter_passes(&self, value: u64) -> bool {
        match usize::try_from(value) {
            Ok(i) if i < FILTER_BITS => self.filter_bits[i / 64] & (1 << (i % 64)) != 0,
            _ => false,
        }
    }

    /// Number of memory reads in use.
    pub fn mem_count(&self) -> usize {
        self.mem.iter().filter(|m| m.base != MemBase::None).count()
    }
}

/// Host to plugin: put a probe at `addr` (or update it), enabled or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArmRecord {
    /// Host-chosen probe id.
    pub probe: u32,
    /// Guest-virtual address of the instruction.
    pub addr: u64,
    /// [`ARM_ENABLED`].
    pub flags: u32,
    /// What to read.
    pub spec: ProbeSpec,
}

/// Host to plugin: disable probe `probe` (its callback stays, checking a flag).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DisarmRecord {
    /// Probe id.
    pub probe: u32,
}

/// Host to plugin: resume vCPU `vcpu` held at its hit number `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnswerRecord {
    /// vCPU index.
    pub vcpu: u32,
    /// Action code (informational for the plugin: it only resumes): 0 continue, 1 pause,
    /// 2 deny.
    pub action: u32,
    /// The plugin's per-vCPU sequence number of the held hit.
    pub seq: u64,
}

/// Plugin to host: first record of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// [`WIRE_VERSION`] of the plugin.
    pub version: u32,
    /// QEMU's process id.
    pub pid: u32,
    /// CLOCK_MONOTONIC in the plugin when it connected, nanoseconds.
    pub mono_ns: u64,
}

/// Bit in a hit's header flags: the vCPU is held until answered.
pub const HIT_HELD: u16 = 1 << 0;
/// Bit in a hit's header flags: a byte range ([`HitBytes`]) follows the memory reads.
pub const HIT_BYTES: u16 = 1 << 1;

/// The bytes a probe's [`BytesRead`] got at a hit.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct HitBytes {
    /// The bytes read, from the range's start.
    pub data: Vec<u8>,
    /// True when `data` is the whole range; false when the range was longer than the probe's
    /// `max` or an unreadable page ended it.
    pub complete: bool,
}

/// Plugin to host: a probe was hit.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HitRecord {
    /// [`HIT_HELD`].
    pub flags: u16,
    /// Probe id.
    pub probe: u32,
    /// vCPU index.
    pub vcpu: u32,
    /// Per-vCPU sequence number, from 1, counting reported hits of that vCPU.
    pub seq: u64,
    /// CLOCK_MONOTONIC of the hit in the plugin, nanoseconds.
    pub mono_ns: u64,
    /// Which registers follow.
    pub regs: RegMask,
    /// Bit `i` set: memory read `i` was requested (a value follows).
    pub mem_present: u16,
    /// Bit `i` set: memory read `i` succeeded (its value is meaningful).
    pub mem_ok: u16,
    /// Register values by [`Reg`] index (on the wire only those in `regs`, in mask order;
    /// the others are 0 here).
    pub reg_values: [u64; Reg::COUNT],
    /// Memory read values by read index (on the wire only the present ones, in index order;
    /// the others are 0 here).
    pub mem_values: [u64; MAX_MEM_READS],
    /// The probe's byte range, when it asked for one and its start and end reads succeeded
    /// (flag [`HIT_BYTES`]).
    pub bytes: Option<HitBytes>,
}

impl HitRecord {
    /// True when the vCPU waits for an answer.
    pub fn held(&self) -> bool {
        self.flags & HIT_HELD != 0
    }

    /// The registers as an engine [`Regs`] (registers not in the mask are 0).
    pub fn to_regs(&self) -> Regs {
        let mut regs = Regs::default();
        for r in self.regs.iter() {
            r.set(&mut regs, self.reg_values[usize::from(r.index())]);
        }
        regs
    }

    /// Value of memory read `i`, if it was requested and succeeded.
    pub fn mem(&self, i: usize) -> Option<u64> {
        mem_value(self.mem_present, self.mem_ok, &self.mem_values, i)
    }
}

/// Value of memory read `i` among `values`, if bit `i` is set in both `present` (it was
/// requested) and `ok` (it succeeded).
pub fn mem_value(present: u16, ok: u16, values: &[u64; MAX_MEM_READS], i: usize) -> Option<u64> {
    let bit = 1u16.checked_shl(u32::try_from(i).ok()?)?;
    if present & ok & bit == 0 {
        return None;
    }
    values.get(i).copied()
}

/// Plugin to host: vCPU `vcpu` started; `resolved` is the set of registers QEMU offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuInitRecord {
    /// vCPU index.
    pub vcpu: u32,
    /// Registers found by name.
    pub resolved: RegMask,
    /// Number of registers QEMU listed.
    pub qemu_regs: u32,
}

/// Error codes in an [`ErrorRecord`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum PluginErrorCode {
    /// A held vCPU waited longer than the hold timeout and went on (`detail` = hit seq).
    HoldTimeout = 1,
    /// A callback panicked; the panic was caught (`detail` = 0).
    Panic = 2,
    /// A requested register could not be read (`detail` = register index).
    RegRead = 3,
    /// The plugin got a record it could not decode (`detail` = raw kind).
    BadRecord = 4,
    /// A per-vCPU hit buffer could not be written to the socket (`detail` = bytes lost).
    SendFailed = 5,
    /// A vCPU index beyond the plugin's table (`detail` = index).
    VcpuRange = 6,
    /// The [`RamRecord`] came but cannot be used (no descriptor, mapping failed, regions
    /// outside the file): memory reads go through QEMU's slower accessor (`detail` = errno, or
    /// 0). Sent once.
    RamFallback = 7,
}

impl PluginErrorCode {
    /// The code for a raw value.
    pub fn from_raw(raw: u32) -> Option<Self> {
        Some(match raw {
            1 => Self::HoldTimeout,
            2 => Self::Panic,
            3 => Self::RegRead,
            4 => Self::BadRecord,
            5 => Self::SendFailed,
            6 => Self::VcpuRange,
            7 => Self::RamFallback,
            _ => return None,
        })
    }
}

/// Plugin to host: an error the plugin survived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorRecord {
    /// What happened ([`PluginErrorCode`] as raw, so new codes decode).
    pub code: u32,
    /// vCPU index, or `u32::MAX` when none.
    pub vcpu: u32,
    /// Probe id, or `u32::MAX` when none.
    pub probe: u32,
    /// Code-specific value.
    pub detail: u64,
}

/// Plugin to host: QEMU is exiting; totals for the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ByeRecord {
    /// Hits reported over the whole session.
    pub hits: u64,
    /// Time spent in reported hits' callbacks, nanoseconds (registers, memory reads and the
    /// record; not the wait of a held hit).
    pub callback_ns: u64,
    /// Of those, time spent in memory reads, nanoseconds.
    pub mem_ns: u64,
    /// The longest single callback, nanoseconds.
    pub max_callback_ns: u64,
    /// Time the vCPUs spent in reported hits' callbacks in all, nanoseconds: `callback_ns`
    /// plus sending records and waiting for the answers to held hits. What the plugin took
    /// from the guest.
    pub stall_ns: u64,
}

/// How the plugin learns the guest's paging mode for its own page walks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RamPaging {
    /// From CR4.LA57 at each hit (the host does not know yet: the guest had not set up
    /// paging when RAM was mapped).
    #[default]
    FromCr4,
    /// 4-level.
    Level4,
    /// 5-level (LA57).
    Level5,
}

/// One guest-physical range backed by the RAM file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RamRegion {
    /// First guest-physical address (page-aligned).
    pub gpa: u64,
    /// Length in bytes (a non-zero multiple of the page size).
    pub len: u64,
    /// Offset of `gpa` in the RAM file (page-aligned).
    pub file_offset: u64,
}

/// Host to plugin: guest RAM's layout. The RAM file's descriptor travels as `SCM_RIGHTS`
/// ancillary data with this record's bytes; the plugin maps it read-only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamRecord {
    /// The paging mode for the plugin's page walks.
    pub paging: RamPaging,
    /// 1..=[`MAX_RAM_REGIONS`] regions, sorted by address, not overlapping.
    pub regions: Vec<RamRegion>,
}

impl RamRecord {
    /// Check the fields as the decoder does (the encoder writes what it is given).
    pub fn validate(&self) -> Result<(), WireError> {
        if self.regions.is_empty() || self.regions.len() > MAX_RAM_REGIONS {
            return Err(WireError::BadField("ram.count"));
        }
        let mut prev_end = 0u64;
        for (i, r) in self.regions.iter().enumerate() {
            let aligned = |v: u64| v.is_multiple_of(PAGE_SIZE);
            if r.len == 0 || !aligned(r.gpa) || !aligned(r.len) || !aligned(r.file_offset) {
                return Err(WireError::BadField("ram.region"));
            }
            let end = r
                .gpa
                .checked_add(r.len)
                .ok_or(WireError::BadField("ram.region"))?;
            r.file_offset
                .checked_add(r.len)
                .ok_or(WireError::BadField("ram.region"))?;
            if i > 0 && r.gpa < prev_end {
                return Err(WireError::BadField("ram.order"));
            }
            prev_end = end;
        }
        Ok(())
    }
}

/// Any record.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Msg {
    Hello(Hello),
    Hit(HitRecord),
    VcpuInit(VcpuInitRecord),
    Error(ErrorRecord),
    Bye(ByeRecord),
    Arm(ArmRecord),
    Disarm(DisarmRecord),
    Answer(AnswerRecord),
    Go,
    Ram(RamRecord),
}

fn put_header(out: &mut Vec<u8>, kind: MsgKind, flags: u16, len: usize) {
    out.extend_from_slice(&(kind as u16).to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Length of a hit record for `regs`, `mem_present` and a byte range of `bytes` bytes.
pub const fn hit_len(regs: RegMask, mem_present: u16, bytes: Option<usize>) -> usize {
    let fixed = HIT_HEAD_LEN + 8 * (regs.count() + mem_present.count_ones() as usize);
    match bytes {
        Some(n) => fixed + 8 + n.div_ceil(8) * 8,
        None => fixed,
    }
}

/// Append the head of a hit record; the caller then appends the values with
/// [`put_hit_value`] and, when `bytes` is `Some(n)`, the `n` bytes with [`put_hit_bytes`]
/// (this split lets the plugin write straight into its batch buffer).
#[allow(clippy::too_many_arguments)]
pub fn put_hit_head(
    out: &mut Vec<u8>,
    flags: u16,
    probe: u32,
    vcpu: u32,
    seq: u64,
    mono_ns: u64,
    regs: RegMask,
    mem_present: u16,
    mem_ok: u16,
    bytes: Option<usize>,
) {
    let flags = if bytes.is_some() {
        flags | HIT_BYTES
    } else {
        flags & !HIT_BYTES
    };
    put_header(out, MsgKind::Hit, flags, hit_len(regs, mem_present, bytes));
    put_u32(out, probe);
    put_u32(out, vcpu);
    put_u64(out, seq);
    put_u64(out, mono_ns);
    // Bits 0..26 register mask, 32..48 mem_present, 48..64 mem_ok.
    put_u64(
        out,
        (regs.0 & RegMask::ALL.0) | u64::from(mem_present) << 32 | u64::from(mem_ok) << 48,
    );
}

/// Append one value of a hit record.
pub fn put_hit_value(out: &mut Vec<u8>, v: u64) {
    put_u64(out, v);
}

/// Append a hit record's byte range (after its values): length, completeness, the bytes,
/// zeros up to a multiple of 8.
pub fn put_hit_bytes(out: &mut Vec<u8>, data: &[u8], complete: bool) {
    put_u32(out, u32::try_from(data.len()).unwrap_or(u32::MAX));
    put_u32(out, u32::from(complete));
    out.extend_from_slice(data);
    out.resize(out.len() + data.len().div_ceil(8) * 8 - data.len(), 0);
}

impl Msg {
    /// Append the record to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Msg::Hello(h) => {
                put_header(out, MsgKind::Hello, 0, 24);
                put_u32(out, h.version);
                put_u32(out, h.pid);
                put_u64(out, h.mono_ns);
            }
            Msg::Hit(h) => {
                put_hit_head(
                    out,
                    h.flags,
                    h.probe,
                    h.vcpu,
                    h.seq,
                    h.mono_ns,
                    h.regs,
                    h.mem_present,
                    h.mem_ok,
                    h.bytes.as_ref().map(|b| b.data.len()),
                );
                for r in h.regs.iter() {
                    put_u64(out, h.reg_values[usize::from(r.index())]);
                }
                for (i, v) in h.mem_values.iter().enumerate() {
                    if h.mem_present & (1 << i) != 0 {
                        put_u64(out, *v);
                    }
                }
                if let Some(b) = &h.bytes {
                    put_hit_bytes(out, &b.data, b.complete);
                }
            }
            Msg::VcpuInit(v) => {
                put_header(out, MsgKind::VcpuInit, 0, 24);
                put_u32(out, v.vcpu);
                put_u32(out, v.qemu_regs);
                put_u64(out, v.resolved.0);
            }
            Msg::Error(e) => {
                put_header(out, MsgKind::Error, 0, 32);
                put_u32(out, e.code);
                put_u32(out, e.vcpu);
                put_u32(out, e.probe);
                put_u32(out, 0);
                put_u64(out, e.detail);
            }
            Msg::Bye(b) => {
                put_header(out, MsgKind::Bye, 0, 48);
                put_u64(out, b.hits);
                put_u64(out, b.callback_ns);
                put_u64(out, b.mem_ns);
                put_u64(out, b.max_callback_ns);
                put_u64(out, b.stall_ns);
            }
            Msg::Arm(a) => {
                put_header(out, MsgKind::Arm, 0, ARM_LEN);
                put_u32(out, a.probe);
                put_u32(out, a.flags);
                put_u64(out, a.addr);
                put_u64(out, a.spec.regs.0);
                for m in &a.spec.mem {
                    let (kind, reg) = match m.base {
                        MemBase::None => (0u8, 0u8),
                        MemBase::Absolute => (1, 0),
                        MemBase::Reg(r) => (2, r.index()),
                        MemBase::Mem(j) => (3, j),
                    };
                    out.extend_from_slice(&[kind, reg, m.len, 0, 0, 0, 0, 0]);
                    put_u64(out, m.offset);
                }
                let (has, reg) = match a.spec.filter {
                    Some(r) => (1u8, r.index()),
                    None => (0, 0),
                };
                let hold = u8::from(a.spec.hold);
                out.extend_from_slice(&[has, reg, hold, 0, 0, 0, 0, 0]);
                for w in &a.spec.filter_bits {
                    put_u64(out, *w);
                }
                let b = a.spec.bytes;
                out.extend_from_slice(&[b.start, b.end, 0, 0]);
                put_u32(out, b.max);
            }
            Msg::Disarm(d) => {
                put_header(out, MsgKind::Disarm, 0, 16);
                put_u32(out, d.probe);
                put_u32(out, 0);
            }
            Msg::Answer(a) => {
                put_header(out, MsgKind::Answer, 0, 24);
                put_u32(out, a.vcpu);
                put_u32(out, a.action);
                put_u64(out, a.seq);
            }
            Msg::Go => put_header(out, MsgKind::Go, 0, 8),
            Msg::Ram(r) => {
                put_header(out, MsgKind::Ram, 0, RAM_LEN);
                put_u32(out, u32::try_from(r.regions.len()).unwrap_or(u32::MAX));
                put_u32(
                    out,
                    match r.paging {
                        RamPaging::FromCr4 => 0,
                        RamPaging::Level4 => 4,
                        RamPaging::Level5 => 5,
                    },
                );
                for i in 0..MAX_RAM_REGIONS {
                    let g = r.regions.get(i).copied().unwrap_or_default();
                    put_u64(out, g.gpa);
                    put_u64(out, g.len);
                    put_u64(out, g.file_offset);
                }
            }
        }
    }

    /// The record as a new byte vector.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(64);
        self.encode(&mut v);
        v
    }
}

/// The header of a record: its kind, flags and total length (validated against the kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Record kind.
    pub kind: MsgKind,
    /// Kind-specific flags.
    pub flags: u16,
    /// Total record length, header included.
    pub len: usize,
}

/// Decode the 8-byte header at the start of `buf`.
pub fn decode_header(buf: &[u8]) -> Result<Header, WireError> {
    let mut r = Reader::new(buf);
    let raw_kind = r.u16()?;
    let flags = r.u16()?;
    let raw_len = r.u32()?;
    let kind = MsgKind::from_raw(raw_kind)?;
    let len = usize::try_from(raw_len).map_err(|_| WireError::BadField("len"))?;
    let bad = |expected| WireError::BadLength {
        kind: raw_kind,
        len: raw_len,
        expected,
    };
    match kind.fixed_len() {
        Some(fixed) if fixed != len => return Err(bad(fixed)),
        None if !(HIT_HEAD_LEN..=MAX_RECORD_LEN).contains(&len) || len % 8 != 0 => {
            return Err(bad(HIT_HEAD_LEN))
        }
        _ => {}
    }
    Ok(Header { kind, flags, len })
}

/// Decode one record from the start of `buf`; returns it and its length.
pub fn decode(buf: &[u8]) -> Result<(Msg, usize), WireError> {
    if buf.len() < HEADER_LEN {
        return Err(WireError::Short {
            need: HEADER_LEN,
            got: buf.len(),
        });
    }
    let h = decode_header(buf)?;
    if buf.len() < h.len {
        return Err(WireError::Short {
            need: h.len,
            got: buf.len(),
        });
    }
    let mut r = Reader::new(&buf[HEADER_LEN..h.len]);
    let msg = match h.kind {
        MsgKind::Hello => Msg::Hello(Hello {
            version: r.u32()?,
            pid: r.u32()?,
            mono_ns: r.u64()?,
        }),
        MsgKind::Hit => {
            let probe = r.u32()?;
            let vcpu = r.u32()?;
            let seq = r.u64()?;
            let mono_ns = r.u64()?;
            let packed = r.u64()?;
            let regs = RegMask(packed & 0xffff_ffff);
            if !regs.is_valid() {
                return Err(WireError::BadField("regs"));
            }
            let mem_present = u16::try_from((packed >> 32) & 0xffff).unwrap_or(0);
            if usize::from(mem_present) >> MAX_MEM_READS != 0 {
                return Err(WireError::BadField("mem_present"));
            }
            let mem_ok = u16::try_from((packed >> 48) & 0xffff).unwrap_or(0);
            let fixed = hit_len(regs, mem_present, None);
            let has_bytes = h.flags & HIT_BYTES != 0;
            let length_is_bad = if has_bytes {
                h.len < fixed + 8
            } else {
                h.len != fixed
            };
            if length_is_bad {
                return Err(WireError::BadLength {
                    kind: MsgKind::Hit as u16,
                    len: u32::try_from(h.len).unwrap_or(u32::MAX),
                    expected: fixed,
                });
            }
            let mut reg_values = [0u64; Reg::COUNT];
            for reg in regs.iter() {
                reg_values[usize::from(reg.index())] = r.u64()?;
            }
            let mut mem_values = [0u64; MAX_MEM_READS];
            for (i, v) in mem_values.iter_mut().enumerate() {
                if mem_present & (1 << i) != 0 {
                    *v = r.u64()?;
                }
            }
            let bytes = if has_bytes {
                let n = usize::try_from(r.u32()?).map_err(|_| WireError::BadField("bytes.len"))?;
                let complete = match r.u32()? {
                    0 => false,
                    1 => true,
                    _ => return Err(WireError::BadField("bytes.complete")),
                };
                if n > MAX_BYTES_READ as usize || hit_len(regs, mem_present, Some(n)) != h.len {
                    return Err(WireError::BadField("bytes.len"));
                }
                Some(HitBytes {
                    data: r.slice(n)?.to_vec(),
                    complete,
                })
            } else {
                None
            };
            Msg::Hit(HitRecord {
                flags: h.flags,
                probe,
                vcpu,
                seq,
                mono_ns,
                regs,
                mem_present,
                mem_ok,
                reg_values,
                mem_values,
                bytes,
            })
        }
        MsgKind::VcpuInit => {
            let vcpu = r.u32()?;
            let qemu_regs = r.u32()?;
            let resolved = RegMask(r.u64()?);
            Msg::VcpuInit(VcpuInitRecord {
                vcpu,
                resolved,
                qemu_regs,
            })
        }
        MsgKind::Error => {
            let code = r.u32()?;
            let vcpu = r.u32()?;
            let probe = r.u32()?;
            let _pad = r.u32()?;
            Msg::Error(ErrorRecord {
                code,
                vcpu,
                probe,
                detail: r.u64()?,
            })
        }
        MsgKind::Bye => Msg::Bye(ByeRecord {
            hits: r.u64()?,
            callback_ns: r.u64()?,
            mem_ns: r.u64()?,
            max_callback_ns: r.u64()?,
            stall_ns: r.u64()?,
        }),
        MsgKind::Arm => {
            let probe = r.u32()?;
            let flags = r.u32()?;
            let addr = r.u64()?;
            let regs = RegMask(r.u64()?);
            if !regs.is_valid() {
                return Err(WireError::BadField("regs"));
            }
            let mut mem = [MemRead::default(); MAX_MEM_READS];
            for (i, m) in mem.iter_mut().enumerate() {
                let b = r.bytes8()?;
                let offset = r.u64()?;
                let base = match b[0] {
                    0 => MemBase::None,
                    1 => MemBase::Absolute,
                    2 => MemBase::Reg(Reg::from_index(b[1]).ok_or(WireError::BadField("mem.reg"))?),
                    // A chain only reaches back: no cycles, one pass in index order.
                    3 if usize::from(b[1]) < i => MemBase::Mem(b[1]),
                    3 => return Err(WireError::BadField("mem.chain")),
                    _ => return Err(WireError::BadField("mem.base")),
                };
                if base != MemBase::None && !(1..=MAX_MEM_READ_LEN).contains(&b[2]) {
                    return Err(WireError::BadField("mem.len"));
                }
                *m = MemRead {
                    base,
                    offset,
                    len: b[2],
                };
            }
            let f = r.bytes8()?;
            let filter = match f[0] {
                0 => None,
                1 => Some(Reg::from_index(f[1]).ok_or(WireError::BadField("filter.reg"))?),
                _ => return Err(WireError::BadField("filter")),
            };
            let mut filter_bits = [0u64; FILTER_BITS / 64];
            for w in &mut filter_bits {
                *w = r.u64()?;
            }
            let b = r.bytes8()?;
            let max = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
            let reads = usize::from(b[0]).max(usize::from(b[1]));
            if max > MAX_BYTES_READ || (max != 0 && reads >= MAX_MEM_READS) {
                return Err(WireError::BadField("bytes"));
            }
            let bytes = BytesRead {
                start: b[0],
                end: b[1],
                max,
            };
            Msg::Arm(ArmRecord {
                probe,
                addr,
                flags,
                spec: ProbeSpec {
                    regs,
                    mem,
                    hold: f[2] != 0,
                    filter,
                    filter_bits,
                    bytes,
                },
            })
        }
        MsgKind::Disarm => Msg::Disarm(DisarmRecord { probe: r.u32()? }),
        MsgKind::Answer => Msg::Answer(AnswerRecord {
            vcpu: r.u32()?,
            action: r.u32()?,
            seq: r.u64()?,
        }),
        MsgKind::Go => Msg::Go,
        MsgKind::Ram => {
            let count = usize::try_from(r.u32()?).unwrap_or(usize::MAX);
            let paging = match r.u32()? {
                0 => RamPaging::FromCr4,
                4 => RamPaging::Level4,
                5 => RamPaging::Level5,
                _ => return Err(WireError::BadField("ram.paging")),
            };
            if count == 0 || count > MAX_RAM_REGIONS {
                return Err(WireError::BadField("ram.count"));
            }
            let mut regions = Vec::with_capacity(count);
            for i in 0..MAX_RAM_REGIONS {
                let g = RamRegion {
                    gpa: r.u64()?,
                    len: r.u64()?,
                    file_offset: r.u64()?,
                };
                if i < count {
                    regions.push(g);
                } else if g != RamRegion::default() {
                    return Err(WireError::BadField("ram.unused"));
                }
            }
            let rec = RamRecord { paging, regions };
            rec.validate()?;
            Msg::Ram(rec)
        }
    };
    Ok((msg, h.len))
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let end = self.pos.saturating_add(N);
        let s = self.buf.get(self.pos..end).ok_or(WireError::Short {
            need: end,
            got: self.buf.len(),
        })?;
        self.pos = end;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        self.take::<2>().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        self.take::<4>().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        self.take::<8>().map(u64::from_le_bytes)
    }

    fn bytes8(&mut self) -> Result<[u8; 8], WireError> {
        self.take::<8>()
    }

    fn slice(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self.pos.saturating_add(n);
        let got = self.buf.get(self.pos..end).ok_or(WireError::Short {
            need: end,
            got: self.buf.len(),
        })?;
        self.pos = end;
        Ok(got)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(pairs: &[(Reg, u64)]) -> [u64; Reg::COUNT] {
        let mut v = [0; Reg::COUNT];
        for (r, x) in pairs {
            v[usize::from(r.index())] = *x;
        }
        v
    }

    fn mems(pairs: &[(usize, u64)]) -> [u64; MAX_MEM_READS] {
        let mut v = [0; MAX_MEM_READS];
        for (i, x) in pairs {
            v[*i] = *x;
        }
        v
    }

    fn sample_ram() -> RamRecord {
        RamRecord {
            paging: RamPaging::Level5,
            regions: vec![
                RamRegion {
                    gpa: 0,
                    len: 0xc_0000,
                    file_offset: 0,
                },
                RamRegion {
                    gpa: 0x10_0000,
                    len: 0xbff0_0000,
                    file_offset: 0x10_0000,
                },
                RamRegion {
                    gpa: 0x1_0000_0000,
                    len: 0x4000_0000,
                    file_offset: 0xc000_0000,
                },
            ],
        }
    }

    fn round_trip(m: Msg) {
        let bytes = m.to_bytes();
        assert_eq!(bytes.len() % 8, 0, "{m:?}");
        let h = decode_header(&bytes).expect("header");
        assert_eq!(h.len, bytes.len());
        let (back, used) = decode(&bytes).expect("decode");
        assert_eq!(used, bytes.len());
        assert_eq!(back, m);
    }

    fn sample_spec() -> ProbeSpec {
        let mut spec = ProbeSpec::regs(RegMask::of(&[Reg::Rip, Reg::Rdi, Reg::GsBase]))
            .with_filter(Reg::Rsi, &[39, 62, 511, 512, u64::MAX]);
        spec.hold = true;
        spec.mem[0] = MemRead::at_reg(Reg::GsBase, 0x1fb80, 8);
        spec.mem[2] = MemRead {
            base: MemBase::Absolute,
            offset: 0xffff_ffff_8239_6960,
            len: 4,
        };
        spec.mem[15] = MemRead::at_mem(0, 0x9a0, 8);
        spec.bytes = BytesRead {
            start: 2,
            end: 15,
            max: 32 << 10,
        };
        spec
    }

    #[test]
    fn byte_ranges_are_checked() {
        let hit = |data: Vec<u8>| {
            Msg::Hit(HitRecord {
                probe: 1,
                seq: 1,
                bytes: Some(HitBytes {
                    data,
                    complete: true,
                }),
                ..HitRecord::default()
            })
            .to_bytes()
        };
        let good = hit(b"abc".to_vec());
        assert!(decode(&good).is_ok());
        // The length inside says more bytes than the record holds.
        let mut b = good.clone();
        b[HIT_HEAD_LEN..HIT_HEAD_LEN + 4].copy_from_slice(&9u32.to_le_bytes());
        assert_eq!(decode(&b), Err(WireError::BadField("bytes.len")));
        // Completeness is 0 or 1.
        let mut b = good.clone();
        b[HIT_HEAD_LEN + 4] = 2;
        assert_eq!(decode(&b), Err(WireError::BadField("bytes.complete")));
        // The flag without room for the range's own header.
        let mut b = hit(vec![]);
        b.truncate(HIT_HEAD_LEN);
        b[4..8].copy_from_slice(&u32::try_from(HIT_HEAD_LEN).expect("small").to_le_bytes());
        assert!(matches!(decode(&b), Err(WireError::BadLength { .. })));
        // Arm: more than MAX_BYTES_READ, or a read index out of range.
        for (start, end, max) in [(0, 1, MAX_BYTES_READ + 1), (0, 16, 8), (16, 0, 8)] {
            let spec = ProbeSpec {
                bytes: BytesRead { start, end, max },
                ..ProbeSpec::default()
            };
            let b = Msg::Arm(ArmRecord {
                probe: 1,
                addr: 0,
                flags: ARM_ENABLED,
                spec,
            })
            .to_bytes();
            assert_eq!(
                decode(&b),
                Err(WireError::BadField("bytes")),
                "{start} {end} {max}"
            );
        }
        // The range from two reads: cut at max, refused when a read failed or end < start.
        let r = BytesRead {
            start: 3,
            end: 4,
            max: 16,
        };
        let vals = |a: Option<u64>, b: Option<u64>| move |i: usize| if i == 3 { a } else { b };
        assert_eq!(r.range(vals(Some(100), Some(110))), Some((100, 10, false)));
        assert_eq!(r.range(vals(Some(100), Some(117))), Some((100, 16, true)));
        assert_eq!(r.range(vals(Some(100), Some(99))), None);
        assert_eq!(r.range(vals(None, Some(110))), None);
        assert!(!ProbeSpec::default().bytes.is_some());
        assert_eq!(BytesRead::default().range(|_| Some(1)), None);
    }

    #[test]
    fn every_kind_round_trips() {
        round_trip(Msg::Hello(Hello {
            version: WIRE_VERSION,
            pid: 1234,
            mono_ns: u64::MAX - 1,
        }));
        round_trip(Msg::Hit(HitRecord {
            flags: HIT_HELD,
            probe: 7,
            vcpu: 1,
            seq: 99,
            mono_ns: 123_456_789,
            regs: RegMask::of(&[Reg::Rax, Reg::Rip, Reg::FsBase]),
            mem_present: 0b1000_0000_0000_0101,
            mem_ok: 0b1000_0000_0000_0001,
            reg_values: vals(&[
                (Reg::Rax, 1),
                (Reg::Rip, 0xffff_ffff_810b_0de0),
                (Reg::FsBase, 3),
            ]),
            mem_values: mems(&[(0, 0xffff_8880_0123_4000), (15, 9)]),
            bytes: None,
        }));
        round_trip(Msg::Hit(HitRecord {
            seq: 1,
            ..HitRecord::default()
        }));
        // A byte range: 13 bytes (padded to 16 on the wire), an empty one, a cut one.
        for (data, complete) in [
            (b"/bin/sh\0-c\0x\0".to_vec(), true),
            (vec![], true),
            (vec![7; 4096], false),
        ] {
            round_trip(Msg::Hit(HitRecord {
                flags: HIT_BYTES,
                probe: 3,
                vcpu: 0,
                seq: 2,
                mono_ns: 5,
                regs: RegMask::of(&[Reg::Rdi]),
                mem_present: 0b11,
                mem_ok: 0b11,
                reg_values: vals(&[(Reg::Rdi, 0xffff_8880_0000_1000)]),
                mem_values: mems(&[(0, 0x7ffd_0000_0000), (1, 0x7ffd_0000_000d)]),
                bytes: Some(HitBytes { data, complete }),
            }));
        }
        round_trip(Msg::VcpuInit(VcpuInitRecord {
            vcpu: 3,
            resolved: RegMask::ALL,
            qemu_regs: 120,
        }));
        round_trip(Msg::Error(ErrorRecord {
            code: PluginErrorCode::HoldTimeout as u32,
            vcpu: 0,
            probe: 5,
            detail: 17,
        }));
        round_trip(Msg::Bye(ByeRecord {
            hits: 1 << 40,
            callback_ns: 12_345,
            mem_ns: 678,
            max_callback_ns: 900,
            stall_ns: 99_999,
        }));
        round_trip(Msg::Ram(sample_ram()));
        round_trip(Msg::Arm(ArmRecord {
            probe: 42,
            addr: 0xffff_ffff_819f_9cc0,
            flags: ARM_ENABLED,
            spec: sample_spec(),
        }));
        round_trip(Msg::Disarm(DisarmRecord { probe: 42 }));
        round_trip(Msg::Answer(AnswerRecord {
            vcpu: 1,
            action: 2,
            seq: 5,
        }));
        round_trip(Msg::Go);
    }

    #[test]
    fn records_concatenate() {
        let mut buf = Vec::new();
        Msg::Go.encode(&mut buf);
        Msg::Disarm(DisarmRecord { probe: 1 }).encode(&mut buf);
        put_hit_head(
            &mut buf,
            0,
            2,
            0,
            1,
            5,
            RegMask::of(&[Reg::Rdi]),
            0,
            0,
            None,
        );
        put_hit_value(&mut buf, 0xabc);
        let mut pos = 0;
        let mut got = Vec::new();
        while pos < buf.len() {
            let (m, n) = decode(&buf[pos..]).expect("decode");
            got.push(m);
            pos += n;
        }
        assert_eq!(got.len(), 3);
        match &got[2] {
            Msg::Hit(h) => {
                assert_eq!(h.to_regs().rdi, 0xabc);
                assert_eq!(h.mem(0), None);
            }
            other => panic!("not a hit: {other:?}"),
        }
    }

    #[test]
    fn hit_values_land_in_regs_and_mem() {
        let h = HitRecord {
            flags: 0,
            probe: 1,
            vcpu: 0,
            seq: 1,
            mono_ns: 0,
            regs: RegMask::of(&[Reg::Rsi, Reg::Cr3, Reg::KernelGsBase]),
            mem_present: 0b110,
            mem_ok: 0b100,
            reg_values: vals(&[
                (Reg::Rsi, 39),
                (Reg::Cr3, 0x1000),
                (Reg::KernelGsBase, 0xffff_8880_1fc0_0000),
            ]),
            mem_values: mems(&[(1, 11), (2, 22)]),
            bytes: None,
        };
        let r = h.to_regs();
        assert_eq!(
            (r.rsi, r.cr3, r.kernel_gs_base),
            (39, 0x1000, 0xffff_8880_1fc0_0000)
        );
        assert_eq!(h.mem(0), None);
        assert_eq!(h.mem(1), None, "present but failed");
        assert_eq!(h.mem(2), Some(22));
        assert_eq!(h.mem(9), None);
    }

    #[test]
    fn filter_bitmap() {
        let s = sample_spec();
        assert!(s.filter_passes(39) && s.filter_passes(62) && s.filter_passes(511));
        assert!(!s.filter_passes(0) && !s.filter_passes(512) && !s.filter_passes(u64::MAX));
        assert_eq!(s.mem_count(), 3);
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        assert!(matches!(decode(&[1, 0]), Err(WireError::Short { .. })));
        let mut b = Msg::Go.to_bytes();
        b[0] = 0x77;
        b[1] = 0;
        assert_eq!(decode(&b), Err(WireError::UnknownKind(0x77)));
        let mut b = Msg::Disarm(DisarmRecord { probe: 1 }).to_bytes();
        b[4] = 24;
        assert!(matches!(decode(&b), Err(WireError::BadLength { .. })));
        let mut b = Msg::Hit(HitRecord {
            flags: 0,
            probe: 0,
            vcpu: 0,
            seq: 0,
            mono_ns: 0,
            regs: RegMask::of(&[Reg::Rax]),
            mem_present: 0,
            mem_ok: 0,
            reg_values: vals(&[(Reg::Rax, 1)]),
            mem_values: [0; MAX_MEM_READS],
            bytes: None,
        })
        .to_bytes();
        b[32] = 0b11; // mask now says two registers, length says one
        assert!(matches!(decode(&b), Err(WireError::BadLength { .. })));
        b.truncate(20);
        assert!(matches!(decode(&b), Err(WireError::Short { .. })));
        // Random bytes never panic.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2000 {
            let mut buf = Vec::new();
            for _ in 0..(x % 200) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                buf.push(x.to_le_bytes()[0]);
            }
            if buf.len() >= 2 {
                buf[0] = [1u8, 2, 3, 4, 5, 1, 2, 3, 4][usize::from(buf[1] % 9)];
                buf[1] = if buf[0] == 1 && x & 1 == 1 { 1 } else { 0 };
            }
            let _ = decode(&buf);
        }
    }

    #[test]
    fn chained_reads_only_reach_back() {
        let arm = |mem15: [u8; 2]| {
            let mut b = Msg::Arm(ArmRecord {
                probe: 1,
                addr: 2,
                flags: ARM_ENABLED,
                spec: sample_spec(),
            })
            .to_bytes();
            // Read 15's base bytes: header, probe/flags/addr/regs, then 16 bytes per read.
            let at = HEADER_LEN + 24 + 16 * 15;
            b[at] = mem15[0];
            b[at + 1] = mem15[1];
            decode(&b).map(|(m, _)| m)
        };
        match arm([3, 14]) {
            Ok(Msg::Arm(a)) => assert_eq!(a.spec.mem[15].base, MemBase::Mem(14)),
            other => panic!("{other:?}"),
        }
        assert_eq!(arm([3, 15]), Err(WireError::BadField("mem.chain")));
        assert_eq!(arm([3, 200]), Err(WireError::BadField("mem.chain")));
        assert_eq!(arm([4, 0]), Err(WireError::BadField("mem.base")));
        // Read 0 cannot chain at all.
        let mut spec = sample_spec();
        spec.mem[0].base = MemBase::Mem(0);
        let b = Msg::Arm(ArmRecord {
            probe: 1,
            addr: 2,
            flags: 0,
            spec,
        })
        .to_bytes();
        assert_eq!(decode(&b), Err(WireError::BadField("mem.chain")));
    }

    #[test]
    fn ram_record_fields_are_checked() {
        let enc = |r: &RamRecord| Msg::Ram(r.clone()).to_bytes();
        let good = sample_ram();
        assert_eq!(enc(&good).len(), RAM_LEN);
        assert_eq!(good.validate(), Ok(()));
        let bad = |f: &dyn Fn(&mut RamRecord), why: &'static str| {
            let mut r = sample_ram();
            f(&mut r);
            assert_eq!(r.validate(), Err(WireError::BadField(why)), "{r:?}");
            assert_eq!(decode(&enc(&r)), Err(WireError::BadField(why)), "{r:?}");
        };
        bad(&|r| r.regions.clear(), "ram.count");
        bad(&|r| r.regions[1].len = 0, "ram.region");
        bad(&|r| r.regions[1].gpa += 1, "ram.region");
        bad(&|r| r.regions[2].file_offset = 0x10, "ram.region");
        bad(&|r| r.regions[2].len = 0x1001, "ram.region");
        bad(&|r| r.regions[2].gpa = !0xfff_u64, "ram.region");
        bad(&|r| r.regions[2].file_offset = !0xfff_u64, "ram.region");
        bad(&|r| r.regions.swap(0, 1), "ram.order");
        bad(&|r| r.regions[1].gpa = 0x1000, "ram.order");
        // Too many regions: the encoder writes the count, the decoder refuses it.
        let mut many = sample_ram();
        many.regions = (0..9)
            .map(|i| RamRegion {
                gpa: i * 0x1000,
                len: 0x1000,
                file_offset: 0,
            })
            .collect();
        assert_eq!(many.validate(), Err(WireError::BadField("ram.count")));
        let mut b = enc(&sample_ram());
        b[HEADER_LEN] = 9;
        assert_eq!(decode(&b), Err(WireError::BadField("ram.count")));
        // Paging mode, unused slots, length.
        let mut b = enc(&sample_ram());
        b[HEADER_LEN + 4] = 3;
        assert_eq!(decode(&b), Err(WireError::BadField("ram.paging")));
        let mut b = enc(&sample_ram());
        let last = RAM_LEN - 8;
        b[last] = 1;
        assert_eq!(decode(&b), Err(WireError::BadField("ram.unused")));
        let mut b = enc(&sample_ram());
        b[4] = 200;
        assert!(matches!(
            decode(&b),
            Err(WireError::BadLength {
                expected: RAM_LEN,
                ..
            })
        ));
        b.truncate(RAM_LEN - 8);
        b[4] = u8::try_from(RAM_LEN & 0xff).expect("fits");
        assert!(matches!(decode(&b), Err(WireError::Short { .. })));
    }

    #[test]
    fn reg_names_cover_all() {
        assert_eq!(Reg::ALL.len(), Reg::COUNT);
        for (i, r) in Reg::ALL.iter().enumerate() {
            assert_eq!(usize::from(r.index()), i);
            assert!(!r.qemu_names().is_empty());
        }
        assert_eq!(RegMask::ALL.count(), Reg::COUNT);
    }
}

#[cfg(test)]
mod speed {
    use super::*;

    #[test]
    #[ignore = "measurement"]
    fn decode_speed() {
        let regs = RegMask::of(&[Reg::Rip, Reg::Rdi, Reg::Rsi, Reg::GsBase, Reg::Cr3]);
        let mut buf = Vec::new();
        for seq in 0..1_000_000u64 {
            put_hit_head(&mut buf, 0, 1, 0, seq, seq, regs, 0, 0, None);
            for v in 0..5 {
                put_hit_value(&mut buf, v);
            }
        }
        let t0 = std::time::Instant::now();
        let mut pos = 0;
        let mut sum = 0u64;
        while pos < buf.len() {
            let (m, n) = decode(&buf[pos..]).expect("decode");
            if let Msg::Hit(h) = m {
                sum = sum.wrapping_add(h.to_regs().rip);
            }
            pos += n;
        }
        eprintln!("decode: {:?} per record ({sum})", t0.elapsed() / 1_000_000);
    }
}
