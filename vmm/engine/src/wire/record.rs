//! The records each side sends, one struct per kind, as the host and the plugin see them.

use super::{ProbeSpec, Reg, RegMask, WireError, MAX_MEM_READS, MAX_RAM_REGIONS, PAGE_SIZE};
use crate::regs::Regs;

/// Host to plugin: put a probe at `addr` (or update it), enabled or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArmRecord {
    /// Host-chosen probe id.
    pub probe: u32,
    /// Guest-virtual address of the instruction.
    pub addr: u64,
    /// [`ARM_ENABLED`](super::ARM_ENABLED).
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
    /// [`WIRE_VERSION`](super::WIRE_VERSION) of the plugin.
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

/// The bytes a probe's [`BytesRead`](super::BytesRead) got at a hit.
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
    pub mem_present: u32,
    /// Bit `i` set: memory read `i` succeeded (its value is meaningful).
    pub mem_ok: u32,
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
pub fn mem_value(present: u32, ok: u32, values: &[u64; MAX_MEM_READS], i: usize) -> Option<u64> {
    let bit = 1u32.checked_shl(u32::try_from(i).ok()?)?;
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
    /// An arm record named an address that already holds the most probes one address can
    /// (`detail` = the address); the probe was not armed.
    AddrFull = 8,
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
            8 => Self::AddrFull,
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
    /// record; not the wait of a held hit), and in the callbacks of hits a probe's filter
    /// dropped (what testing the filter took).
    pub callback_ns: u64,
    /// Of those, time spent in memory reads, nanoseconds.
    pub mem_ns: u64,
    /// The longest single callback, nanoseconds.
    pub max_callback_ns: u64,
    /// Time the vCPUs spent in reported hits' callbacks in all, nanoseconds: `callback_ns`
    /// (dropped hits' filter tests included) plus sending records and waiting for the
    /// answers to held hits. What the plugin took from the guest.
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
