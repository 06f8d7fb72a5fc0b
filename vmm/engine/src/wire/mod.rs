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
//!
//! The module's parts: `reg` names the registers a probe reads, `probe` what it reads at a
//! hit, `record` the records themselves, `encode` and `decode` their bytes.

mod decode;
mod encode;
mod probe;
mod record;
mod reg;
#[cfg(test)]
mod tests;

pub use decode::{decode, decode_header, Header};
pub use encode::{hit_len, put_hit_bytes, put_hit_head, put_hit_value};
pub use probe::{BytesRead, FilterOn, MemBase, MemRead, ProbeSpec, Window, ARM_ENABLED};
pub use record::{
    mem_value, AnswerRecord, ArmRecord, ByeRecord, DisarmRecord, ErrorRecord, Hello, HitBytes,
    HitRecord, PluginErrorCode, RamPaging, RamRecord, RamRegion, VcpuInitRecord, HIT_BYTES,
    HIT_HELD,
};
pub use reg::{Reg, RegMask};

/// Version of this format; the plugin sends it in [`Hello`] and the host checks it.
pub const WIRE_VERSION: u32 = 6;
/// Size of the common record header.
pub const HEADER_LEN: usize = 8;
/// Largest record: a hit with every register, every memory read and the largest byte range.
pub const MAX_RECORD_LEN: usize =
    HIT_HEAD_LEN + 8 * (Reg::COUNT + MAX_MEM_READS) + 8 + MAX_BYTES_READ as usize;
/// Most bytes a probe's [`BytesRead`] may ask for.
pub const MAX_BYTES_READ: u32 = 64 << 10;
/// Memory reads a probe may ask for.
pub const MAX_MEM_READS: usize = 24;
/// Largest single memory read, in bytes (it is returned as one little-endian `u64`).
pub const MAX_MEM_READ_LEN: u8 = 8;
/// Number of values the syscall-style filter bitmap covers (`0..FILTER_BITS`).
pub const FILTER_BITS: usize = 512;
/// Fixed part of a hit record (header included).
pub const HIT_HEAD_LEN: usize = 48;
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
    /// Host to plugin: one task left probe `probe`'s window without its closing hit (it
    /// exited inside), [`DisarmRecord`] naming the window's probe (see [`Window`]).
    CloseWindow = 0x106,
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
            0x106 => Self::CloseWindow,
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
            Self::CloseWindow => Some(16),
        }
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
    CloseWindow(DisarmRecord),
}
