//! The parsed form of BTF types: kinds, members, enumerators, parameters, variables.

use super::TypeId;

/// The kind of a BTF type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum Kind {
    Int,
    Ptr,
    Array,
    Struct,
    Union,
    Enum,
    Fwd,
    Typedef,
    Volatile,
    Const,
    Restrict,
    Func,
    FuncProto,
    Var,
    Datasec,
    Float,
    DeclTag,
    TypeTag,
    Enum64,
}

impl Kind {
    pub(super) fn from_raw(k: u32) -> Option<Self> {
        Some(match k {
            1 => Kind::Int,
            2 => Kind::Ptr,
            3 => Kind::Array,
            4 => Kind::Struct,
            5 => Kind::Union,
            6 => Kind::Enum,
            7 => Kind::Fwd,
            8 => Kind::Typedef,
            9 => Kind::Volatile,
            10 => Kind::Const,
            11 => Kind::Restrict,
            12 => Kind::Func,
            13 => Kind::FuncProto,
            14 => Kind::Var,
            15 => Kind::Datasec,
            16 => Kind::Float,
            17 => Kind::DeclTag,
            18 => Kind::TypeTag,
            19 => Kind::Enum64,
            _ => return None,
        })
    }
}

/// A struct or union member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Name offset in the string section (0: anonymous).
    pub name_off: u32,
    /// Member type.
    pub type_id: TypeId,
    /// Offset from the start of the struct, in bits.
    pub bit_offset: u32,
    /// Width of a bitfield member (kind_flag structs only), else `None`.
    pub bitfield_size: Option<u8>,
}

/// One enumerator (`ENUM` or `ENUM64`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enumerator {
    /// Name offset.
    pub name_off: u32,
    /// Value (sign-extended for signed 32-bit enums).
    pub value: i128,
}

/// One `FUNC_PROTO` parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Param {
    /// Name offset.
    pub name_off: u32,
    /// Parameter type.
    pub type_id: TypeId,
}

/// One `DATASEC` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VarSecInfo {
    /// The `VAR` type.
    pub type_id: TypeId,
    /// Offset in the section.
    pub offset: u32,
    /// Size.
    pub size: u32,
}

/// What follows the common part of a type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detail {
    /// Nothing (PTR, FWD, TYPEDEF, modifiers, FUNC, FLOAT, TYPE_TAG).
    None,
    /// INT encoding word.
    Int {
        /// `BTF_INT_SIGNED` (1), `CHAR` (2), `BOOL` (4).
        encoding: u8,
        /// Bit offset of the value.
        offset: u8,
        /// Number of bits.
        bits: u8,
    },
    /// ARRAY description.
    Array {
        /// Element type.
        elem: TypeId,
        /// Index type.
        index: TypeId,
        /// Number of elements.
        nelems: u32,
    },
    /// STRUCT / UNION members.
    Members(Vec<Member>),
    /// ENUM / ENUM64 values.
    Enum(Vec<Enumerator>),
    /// FUNC_PROTO parameters.
    Params(Vec<Param>),
    /// VAR linkage.
    Var {
        /// 0 static, 1 global, 2 extern.
        linkage: u32,
    },
    /// DATASEC variables.
    Datasec(Vec<VarSecInfo>),
    /// DECL_TAG component index (-1: the declaration itself).
    DeclTag {
        /// Component index.
        component_idx: i32,
    },
}

/// One BTF type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BtfType {
    /// Name offset in the string section.
    pub name_off: u32,
    /// Kind.
    pub kind: Kind,
    /// The kind_flag bit.
    pub kind_flag: bool,
    /// `vlen` from the info word.
    pub vlen: u16,
    /// Size in bytes (INT, STRUCT, UNION, ENUM, DATASEC, FLOAT, ENUM64) or referenced type id.
    pub size_or_type: u32,
    /// Kind-specific data.
    pub detail: Detail,
}

/// Where a member lies in its outermost struct.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldInfo {
    /// Byte offset from the start of the outermost struct (bit offset / 8).
    pub offset: u64,
    /// Size in bytes of the member's type (bitfields: of the underlying type).
    pub size: u64,
    /// Bit offset from the start of the outermost struct.
    pub bit_offset: u64,
    /// Bitfield width, when the member is a bitfield.
    pub bitfield_size: Option<u8>,
    /// The member's type.
    pub type_id: TypeId,
}
