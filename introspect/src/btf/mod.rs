//! Our own parser of the BTF format (kernel `.BTF` section): types, strings, member offsets.
//!
//! Every length and offset is checked against the data, so hostile input gives a
//! [`BtfError`], never a panic. Reference: the kernel's `Documentation/bpf/btf.rst`.
//!
//! Parts: `types` (what a parsed type is), `parse` (bytes to types, every bound checked),
//! `query` (names, sizes and member paths over the parsed types).

mod parse;
mod query;
#[cfg(test)]
pub(crate) mod tests;
mod types;

pub use types::{BtfType, Detail, Enumerator, FieldInfo, Kind, Member, Param, VarSecInfo};

use std::collections::HashMap;

/// BTF magic number (little-endian data starts `9f eb`).
pub const BTF_MAGIC: u16 = 0xeb9f;
/// Size of the fixed header (version 1).
const HEADER_LEN: usize = 24;
/// Longest chain of typedefs/modifiers or nesting of anonymous members followed.
const MAX_DEPTH: usize = 64;

/// A BTF type id (0 is `void`).
pub type TypeId = u32;

/// Why BTF data could not be parsed or a lookup failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, displaydoc::Display)]
pub enum BtfError {
    /// BTF data is {len} bytes, too short for its header
    TooShort {
        /// Bytes available.
        len: usize,
    },
    /// bad BTF magic {magic:#06x}
    BadMagic {
        /// What was found.
        magic: u16,
    },
    /// unsupported BTF version {version}
    Version {
        /// What was found.
        version: u8,
    },
    /// BTF header length {hdr_len} is invalid
    HeaderLen {
        /// What the header says.
        hdr_len: u32,
    },
    /// BTF {what} section ({off} + {len}) lies outside the {total} bytes of data
    SectionOutOfBounds {
        /// `types` or `strings`.
        what: &'static str,
        /// Offset from the start of the data.
        off: u64,
        /// Length.
        len: u64,
        /// Total data length.
        total: usize,
    },
    /// BTF type {id} (at byte {at} of the type section) is truncated
    Truncated {
        /// Type id being parsed.
        id: TypeId,
        /// Its offset in the type section.
        at: usize,
    },
    /// BTF type {id} has unknown kind {kind}
    UnknownKind {
        /// Type id.
        id: TypeId,
        /// The kind number.
        kind: u32,
    },
    /// BTF string offset {off} is outside the string section or not NUL-terminated
    BadString {
        /// The offset.
        off: u32,
    },
    /// BTF type id {id} does not exist
    BadTypeId {
        /// The id.
        id: TypeId,
    },
    /// no struct or union named {name} in the BTF data
    NoStruct {
        /// The name asked for.
        name: String,
    },
    /// {ty} has no member {member}
    NoMember {
        /// The struct (or path prefix) searched.
        ty: String,
        /// The missing member.
        member: String,
    },
    /// {path} is not a struct or union, so it has no members
    NotComposite {
        /// The path prefix.
        path: String,
    },
    /// type chain or nesting from type {id} is too deep or cyclic
    TooDeep {
        /// Where it started.
        id: TypeId,
    },
    /// type {id} has no size
    NoSize {
        /// The type.
        id: TypeId,
    },
}

/// Parsed BTF data.
#[derive(Debug, Clone)]
pub struct Btf {
    types: Vec<BtfType>,
    strings: Vec<u8>,
    by_name: HashMap<String, Vec<TypeId>>,
}
