//! What a probe reads at a hit: memory reads, a byte range, a value filter ([`ProbeSpec`]).

use super::{Reg, RegMask, FILTER_BITS, MAX_BYTES_READ, MAX_MEM_READS};

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
/// guest-virtual `mem[start]`, read page by page up to the first unreadable page. With
/// `start == end`, `max` bytes at `mem[start]` (a C string of unknown length, e.g. a file
/// name: the reader cuts it at its NUL). `max == 0`: none.
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
        if self.start == self.end {
            let max = usize::try_from(self.max.min(MAX_BYTES_READ)).ok()?;
            return Some((start, max, false));
        }
        let end = mem(usize::from(self.end))?;
        let len = end.checked_sub(start)?;
        let max = u64::from(self.max.min(MAX_BYTES_READ));
        Some((start, usize::try_from(len.min(max)).ok()?, len > max))
    }
}

/// The value a probe's filter tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterOn {
    /// A register, read before anything else (a hit it drops costs no memory read).
    Reg(Reg),
    /// A memory read of the probe (its index), tested once the reads are done.
    Mem(u8),
}

/// Bit in [`ArmRecord::flags`](super::ArmRecord::flags): the probe is live (a disarmed probe keeps its callback but
/// does nothing).
pub const ARM_ENABLED: u32 = 1 << 0;

/// A probe's part in a window: a probe armed (by the plugin itself, with no round trip to
/// the host) from the first hit of an opening probe until as many of its own hits have
/// closed it, or the host closed them for tasks that will never make that hit
/// ([`Msg::CloseWindow`](super::Msg::CloseWindow)). Used for the failed-exec return probe,
/// which would cost every syscall a filter test if it were always on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Window {
    /// No window.
    #[default]
    None,
    /// Each reported hit opens one more of the window of probe `0`, arming it.
    Opens(u32),
    /// Each reported hit (one that passed the filter) closes one of this probe's own
    /// window; the last disarms it.
    Closes,
}

/// What a probe reads and does: everything the plugin needs to know about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProbeSpec {
    /// Registers to read at each hit.
    pub regs: RegMask,
    /// Memory reads at each hit (unused entries have base `None`).
    pub mem: [MemRead; MAX_MEM_READS],
    /// Hold the vCPU after each reported hit until the host answers.
    pub hold: bool,
    /// Report only hits where this value is below [`FILTER_BITS`] and its bit is set in
    /// `filter_bits` (e.g. `rsi` = syscall number at `do_syscall_64`, or the memory read of
    /// `pt_regs->orig_ax` at `syscall_exit_to_user_mode`).
    pub filter: Option<FilterOn>,
    /// The filter's bitmap, bit `v` = word `v / 64`, bit `v % 64`.
    pub filter_bits: [u64; FILTER_BITS / 64],
    /// A byte range read after the memory reads (none by default).
    pub bytes: BytesRead,
    /// Its part in a window (none by default).
    pub window: Window,
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
    pub fn with_filter(self, reg: Reg, values: &[u64]) -> Self {
        self.with_filter_on(FilterOn::Reg(reg), values)
    }

    /// Restrict to hits where the value `on` names is one of `values` (values >=
    /// [`FILTER_BITS`] are ignored). A filter on a memory read drops hits whose read failed.
    pub fn with_filter_on(mut self, on: FilterOn, values: &[u64]) -> Self {
        self.filter = Some(on);
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
