//! Our own parser of the BTF format (kernel `.BTF` section): types, strings, member offsets.
//!
//! Every length and offset is checked against the data, so hostile input gives a
//! [`BtfError`], never a panic. Reference: the kernel's `Documentation/bpf/btf.rst`.

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
    fn from_raw(k: u32) -> Option<Self> {
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

/// Parsed BTF data.
#[derive(Debug, Clone)]
pub struct Btf {
    types: Vec<BtfType>,
    strings: Vec<u8>,
    by_name: HashMap<String, Vec<TypeId>>,
}

/// A little-endian cursor over a byte slice that never reads out of bounds.
struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn u32(&mut self) -> Option<u32> {
        let end = self.pos.checked_add(4)?;
        let s = self.b.get(self.pos..end)?;
        self.pos = end;
        Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl Btf {
    /// Parse raw BTF data (the bytes of a `.BTF` section, or `/sys/kernel/btf/vmlinux`).
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        if data.len() < HEADER_LEN {
            return Err(BtfError::TooShort { len: data.len() });
        }
        let magic = le_u16(data, 0);
        if magic != BTF_MAGIC {
            return Err(BtfError::BadMagic { magic });
        }
        if data[2] != 1 {
            return Err(BtfError::Version { version: data[2] });
        }
        let hdr_len = le_u32(data, 4);
        let [type_off, type_len, str_off, str_len] =
            [8, 12, 16, 20].map(|at| u64::from(le_u32(data, at)));
        if (hdr_len as usize) < HEADER_LEN || hdr_len as usize > data.len() {
            return Err(BtfError::HeaderLen { hdr_len });
        }
        let section = |what, off: u64, len: u64| {
            let start = u64::from(hdr_len) + off;
            let err = BtfError::SectionOutOfBounds {
                what,
                off: start,
                len,
                total: data.len(),
            };
            let end = start.checked_add(len).ok_or_else(|| err.clone())?;
            let (Ok(s), Ok(e)) = (usize::try_from(start), usize::try_from(end)) else {
                return Err(err);
            };
            data.get(s..e).ok_or(err)
        };
        let type_bytes = section("types", type_off, type_len)?;
        let strings = section("strings", str_off, str_len)?.to_vec();
        let mut btf = Btf {
            types: Vec::new(),
            strings,
            by_name: HashMap::new(),
        };
        btf.parse_types(type_bytes)?;
        for (i, t) in btf.types.iter().enumerate() {
            if t.name_off == 0 {
                continue;
            }
            let name = btf.str_at(t.name_off)?.to_owned();
            let id = TypeId::try_from(i + 1).map_err(|_| BtfError::BadTypeId { id: u32::MAX })?;
            btf.by_name.entry(name).or_default().push(id);
        }
        tracing::debug!(types = btf.types.len(), "BTF parsed");
        Ok(btf)
    }

    fn parse_types(&mut self, b: &[u8]) -> Result<(), BtfError> {
        let mut c = Cursor { b, pos: 0 };
        while c.pos < b.len() {
            let at = c.pos;
            let id = TypeId::try_from(self.types.len() + 1).unwrap_or(TypeId::MAX);
            let trunc = BtfError::Truncated { id, at };
            let (Some(name_off), Some(info), Some(size_or_type)) = (c.u32(), c.u32(), c.u32())
            else {
                return Err(trunc);
            };
            let raw_kind = (info >> 24) & 0x1f;
            let kind =
                Kind::from_raw(raw_kind).ok_or(BtfError::UnknownKind { id, kind: raw_kind })?;
            let kind_flag = info >> 31 == 1;
            let vlen = (info & 0xffff) as u16;
            let n = usize::from(vlen);
            // Refuse a vlen that cannot fit in what is left, before allocating.
            let per = match kind {
                Kind::Struct | Kind::Union | Kind::Datasec | Kind::Enum64 => 12,
                Kind::Enum | Kind::FuncProto => 8,
                _ => 0,
            };
            if n * per > b.len() - c.pos {
                return Err(trunc);
            }
            let detail = match kind {
                Kind::Int => {
                    let v = c.u32().ok_or(trunc.clone())?;
                    Detail::Int {
                        encoding: ((v >> 24) & 0x0f) as u8,
                        offset: ((v >> 16) & 0xff) as u8,
                        bits: (v & 0xff) as u8,
                    }
                }
                Kind::Array => {
                    let (Some(elem), Some(index), Some(nelems)) = (c.u32(), c.u32(), c.u32())
                    else {
                        return Err(trunc);
                    };
                    Detail::Array {
                        elem,
                        index,
                        nelems,
                    }
                }
                Kind::Struct | Kind::Union => {
                    let mut ms = Vec::with_capacity(n);
                    for _ in 0..n {
                        let (Some(name_off), Some(type_id), Some(off)) =
                            (c.u32(), c.u32(), c.u32())
                        else {
                            return Err(trunc);
                        };
                        let (bit_offset, bitfield_size) = if kind_flag {
                            let size = (off >> 24) as u8;
                            (off & 0x00ff_ffff, (size != 0).then_some(size))
                        } else {
                            (off, None)
                        };
                        self.str_at(name_off)?;
                        ms.push(Member {
                            name_off,
                            type_id,
                            bit_offset,
                            bitfield_size,
                        });
                    }
                    Detail::Members(ms)
                }
                Kind::Enum => {
                    let mut vs = Vec::with_capacity(n);
                    for _ in 0..n {
                        let (Some(name_off), Some(val)) = (c.u32(), c.u32()) else {
                            return Err(trunc);
                        };
                        self.str_at(name_off)?;
                        let value = if kind_flag {
                            i128::from(val)
                        } else {
                            i128::from(val as i32)
                        };
                        vs.push(Enumerator { name_off, value });
                    }
                    Detail::Enum(vs)
                }
                Kind::Enum64 => {
                    let mut vs = Vec::with_capacity(n);
                    for _ in 0..n {
                        let (Some(name_off), Some(lo), Some(hi)) = (c.u32(), c.u32(), c.u32())
                        else {
                            return Err(trunc);
                        };
                        self.str_at(name_off)?;
                        let v = (u64::from(hi) << 32) | u64::from(lo);
                        let value = if kind_flag {
                            i128::from(v)
                        } else {
                            i128::from(v as i64)
                        };
                        vs.push(Enumerator { name_off, value });
                    }
                    Detail::Enum(vs)
                }
                Kind::FuncProto => {
                    let mut ps = Vec::with_capacity(n);
                    for _ in 0..n {
                        let (Some(name_off), Some(type_id)) = (c.u32(), c.u32()) else {
                            return Err(trunc);
                        };
                        self.str_at(name_off)?;
                        ps.push(Param { name_off, type_id });
                    }
                    Detail::Params(ps)
                }
                Kind::Var => Detail::Var {
                    linkage: c.u32().ok_or(trunc.clone())?,
                },
                Kind::Datasec => {
                    let mut vs = Vec::with_capacity(n);
                    for _ in 0..n {
                        let (Some(type_id), Some(offset), Some(size)) = (c.u32(), c.u32(), c.u32())
                        else {
                            return Err(trunc);
                        };
                        vs.push(VarSecInfo {
                            type_id,
                            offset,
                            size,
                        });
                    }
                    Detail::Datasec(vs)
                }
                Kind::DeclTag => Detail::DeclTag {
                    component_idx: c.u32().ok_or(trunc.clone())? as i32,
                },
                _ => Detail::None,
            };
            self.str_at(name_off)?;
            self.types.push(BtfType {
                name_off,
                kind,
                kind_flag,
                vlen,
                size_or_type,
                detail,
            });
        }
        Ok(())
    }

    /// Number of types (ids are 1..=len).
    pub fn len(&self) -> usize {
        self.types.len()
    }

    /// True when there are no types.
    pub fn is_empty(&self) -> bool {
        self.types.is_empty()
    }

    /// The string at `off` in the string section.
    pub fn str_at(&self, off: u32) -> Result<&str, BtfError> {
        let bad = BtfError::BadString { off };
        let s = self.strings.get(off as usize..).ok_or(bad.clone())?;
        let end = s.iter().position(|&b| b == 0).ok_or(bad.clone())?;
        std::str::from_utf8(&s[..end]).map_err(|_| bad)
    }

    /// The type with id `id` (0, `void`, has no entry).
    pub fn type_by_id(&self, id: TypeId) -> Result<&BtfType, BtfError> {
        (id as usize)
            .checked_sub(1)
            .and_then(|i| self.types.get(i))
            .ok_or(BtfError::BadTypeId { id })
    }

    /// Name of type `id` ("" when anonymous or invalid).
    pub fn name_of(&self, id: TypeId) -> &str {
        self.type_by_id(id)
            .and_then(|t| self.str_at(t.name_off))
            .unwrap_or("")
    }

    /// Ids of all types called `name`.
    pub fn ids_by_name(&self, name: &str) -> &[TypeId] {
        self.by_name.get(name).map_or(&[], Vec::as_slice)
    }

    /// The struct or union called `name` (a full definition, not a forward declaration).
    pub fn find_struct(&self, name: &str) -> Result<TypeId, BtfError> {
        self.ids_by_name(name)
            .iter()
            .copied()
            .find(|&id| {
                self.type_by_id(id)
                    .is_ok_and(|t| matches!(t.kind, Kind::Struct | Kind::Union))
            })
            .ok_or_else(|| BtfError::NoStruct { name: name.into() })
    }

    /// Follow typedefs and modifiers (const, volatile, restrict, type tags) to the real type.
    pub fn resolve(&self, id: TypeId) -> Result<TypeId, BtfError> {
        let mut cur = id;
        for _ in 0..MAX_DEPTH {
            if cur == 0 {
                return Ok(0);
            }
            let t = self.type_by_id(cur)?;
            match t.kind {
                Kind::Typedef | Kind::Volatile | Kind::Const | Kind::Restrict | Kind::TypeTag => {
                    cur = t.size_or_type;
                }
                _ => return Ok(cur),
            }
        }
        Err(BtfError::TooDeep { id })
    }

    /// Size in bytes of type `id`.
    pub fn size_of(&self, id: TypeId) -> Result<u64, BtfError> {
        self.size_of_depth(id, 0)
    }

    fn size_of_depth(&self, id: TypeId, depth: usize) -> Result<u64, BtfError> {
        if depth > MAX_DEPTH {
            return Err(BtfError::TooDeep { id });
        }
        let r = self.resolve(id)?;
        if r == 0 {
            return Err(BtfError::NoSize { id });
        }
        let t = self.type_by_id(r)?;
        match (&t.kind, &t.detail) {
            (Kind::Ptr, _) => Ok(8),
            (Kind::Array, Detail::Array { elem, nelems, .. }) => {
                let e = self.size_of_depth(*elem, depth + 1)?;
                e.checked_mul(u64::from(*nelems))
                    .ok_or(BtfError::NoSize { id })
            }
            (
                Kind::Int
                | Kind::Struct
                | Kind::Union
                | Kind::Enum
                | Kind::Enum64
                | Kind::Float
                | Kind::Datasec,
                _,
            ) => Ok(u64::from(t.size_or_type)),
            _ => Err(BtfError::NoSize { id }),
        }
    }

    /// Find member `name` directly in struct/union `id`, or inside its anonymous
    /// struct/union members (recursively). Returns the member and its bit offset from
    /// the start of `id`.
    pub fn find_member(&self, id: TypeId, name: &str) -> Result<Option<(Member, u64)>, BtfError> {
        self.find_member_depth(id, name, 0)
    }

    fn find_member_depth(
        &self,
        id: TypeId,
        name: &str,
        depth: usize,
    ) -> Result<Option<(Member, u64)>, BtfError> {
        if depth > MAX_DEPTH {
            return Err(BtfError::TooDeep { id });
        }
        let r = self.resolve(id)?;
        let t = self.type_by_id(r)?;
        let Detail::Members(ms) = &t.detail else {
            return Ok(None);
        };
        for m in ms {
            if m.name_off != 0 {
                if self.str_at(m.name_off)? == name {
                    return Ok(Some((m.clone(), u64::from(m.bit_offset))));
                }
                continue;
            }
            let inner = self.resolve(m.type_id)?;
            if inner == 0 || !matches!(self.type_by_id(inner)?.kind, Kind::Struct | Kind::Union) {
                continue;
            }
            if let Some((found, bits)) = self.find_member_depth(inner, name, depth + 1)? {
                return Ok(Some((found, bits + u64::from(m.bit_offset))));
            }
        }
        Ok(None)
    }

    /// Resolve a dotted member path (`"pcpu_hot.current_task"` style, without the
    /// struct name: `member_path("pcpu_hot", "current_task")`), looking through
    /// anonymous structs and unions. Offsets are from the start of `struct_name`.
    pub fn member_path(&self, struct_name: &str, path: &str) -> Result<FieldInfo, BtfError> {
        let root = self.find_struct(struct_name)?;
        self.member_path_in(root, struct_name, path)
    }

    /// Like [`Btf::member_path`] from type `root`; `root_name` is used in errors.
    pub fn member_path_in(
        &self,
        root: TypeId,
        root_name: &str,
        path: &str,
    ) -> Result<FieldInfo, BtfError> {
        let mut cur = root;
        let mut bits: u64 = 0;
        let mut seen = root_name.to_owned();
        let mut last: Option<Member> = None;
        for part in path.split('.') {
            let r = self.resolve(cur)?;
            let composite =
                r != 0 && matches!(self.type_by_id(r)?.kind, Kind::Struct | Kind::Union);
            if !composite {
                return Err(BtfError::NotComposite { path: seen });
            }
            let Some((m, off)) = self.find_member(r, part)? else {
                return Err(BtfError::NoMember {
                    ty: seen,
                    member: part.into(),
                });
            };
            bits = bits.saturating_add(off);
            cur = m.type_id;
            seen.push('.');
            seen.push_str(part);
            last = Some(m);
        }
        let m = last.ok_or_else(|| BtfError::NoMember {
            ty: root_name.into(),
            member: path.into(),
        })?;
        Ok(FieldInfo {
            offset: bits / 8,
            size: self.size_of(m.type_id)?,
            bit_offset: bits,
            bitfield_size: m.bitfield_size,
            type_id: m.type_id,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Builds BTF bytes for tests.
    #[derive(Debug, Default)]
    pub(crate) struct Builder {
        types: Vec<u8>,
        strings: Vec<u8>,
        next: TypeId,
    }

    impl Builder {
        pub(crate) fn new() -> Self {
            Self {
                types: Vec::new(),
                strings: vec![0],
                next: 1,
            }
        }
        pub(crate) fn s(&mut self, name: &str) -> u32 {
            if name.is_empty() {
                return 0;
            }
            let off = u32::try_from(self.strings.len()).expect("small");
            self.strings.extend_from_slice(name.as_bytes());
            self.strings.push(0);
            off
        }
        fn words(&mut self, w: &[u32]) {
            for x in w {
                self.types.extend_from_slice(&x.to_le_bytes());
            }
        }
        fn head(&mut self, name: &str, kind: u32, kflag: bool, vlen: u32, st: u32) -> TypeId {
            let n = self.s(name);
            self.words(&[n, (u32::from(kflag) << 31) | (kind << 24) | vlen, st]);
            let id = self.next;
            self.next += 1;
            id
        }
        pub(crate) fn int(&mut self, name: &str, size: u32) -> TypeId {
            let id = self.head(name, 1, false, 0, size);
            self.words(&[size * 8]);
            id
        }
        pub(crate) fn ptr(&mut self, to: TypeId) -> TypeId {
            self.head("", 2, false, 0, to)
        }
        pub(crate) fn typedef(&mut self, name: &str, to: TypeId) -> TypeId {
            self.head(name, 8, false, 0, to)
        }
        pub(crate) fn konst(&mut self, to: TypeId) -> TypeId {
            self.head("", 10, false, 0, to)
        }
        pub(crate) fn array(&mut self, elem: TypeId, index: TypeId, n: u32) -> TypeId {
            let id = self.head("", 3, false, 0, 0);
            self.words(&[elem, index, n]);
            id
        }
        /// members: (name, type, bit offset, bitfield size)
        pub(crate) fn composite(
            &mut self,
            union: bool,
            name: &str,
            size: u32,
            members: &[(&str, TypeId, u32, u8)],
        ) -> TypeId {
            let kflag = members.iter().any(|m| m.3 != 0);
            let vlen = u32::try_from(members.len()).expect("small");
            let id = self.head(name, if union { 5 } else { 4 }, kflag, vlen, size);
            for &(n, t, off, bits) in members {
                let n = self.s(n);
                let off = if kflag {
                    (u32::from(bits) << 24) | off
                } else {
                    off
                };
                self.words(&[n, t, off]);
            }
            id
        }
        pub(crate) fn fwd(&mut self, name: &str) -> TypeId {
            self.head(name, 7, false, 0, 0)
        }
        pub(crate) fn enum32(&mut self, name: &str, vals: &[(&str, i32)]) -> TypeId {
            let vlen = u32::try_from(vals.len()).expect("small");
            let id = self.head(name, 6, false, vlen, 4);
            for &(n, v) in vals {
                let n = self.s(n);
                self.words(&[n, v as u32]);
            }
            id
        }
        pub(crate) fn enum64(&mut self, name: &str, vals: &[(&str, u64)]) -> TypeId {
            let vlen = u32::try_from(vals.len()).expect("small");
            let id = self.head(name, 19, true, vlen, 8);
            for &(n, v) in vals {
                let n = self.s(n);
                self.words(&[n, (v & 0xffff_ffff) as u32, (v >> 32) as u32]);
            }
            id
        }
        pub(crate) fn func_proto(&mut self, ret: TypeId, params: &[(&str, TypeId)]) -> TypeId {
            let vlen = u32::try_from(params.len()).expect("small");
            let id = self.head("", 13, false, vlen, ret);
            for &(n, t) in params {
                let n = self.s(n);
                self.words(&[n, t]);
            }
            id
        }
        pub(crate) fn func(&mut self, name: &str, proto: TypeId) -> TypeId {
            self.head(name, 12, false, 1, proto)
        }
        pub(crate) fn var(&mut self, name: &str, t: TypeId) -> TypeId {
            let id = self.head(name, 14, false, 0, t);
            self.words(&[1]);
            id
        }
        pub(crate) fn datasec(&mut self, name: &str, vars: &[(TypeId, u32, u32)]) -> TypeId {
            let vlen = u32::try_from(vars.len()).expect("small");
            let id = self.head(name, 15, false, vlen, 0);
            for &(t, o, s) in vars {
                self.words(&[t, o, s]);
            }
            id
        }
        pub(crate) fn misc(&mut self, kind: u32, name: &str, st: u32) -> TypeId {
            self.head(name, kind, false, 0, st)
        }
        pub(crate) fn decl_tag(&mut self, name: &str, to: TypeId, idx: i32) -> TypeId {
            let id = self.head(name, 17, false, 0, to);
            self.words(&[idx as u32]);
            id
        }
        pub(crate) fn build(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&BTF_MAGIC.to_le_bytes());
            out.extend_from_slice(&[1, 0]);
            let tl = u32::try_from(self.types.len()).expect("small");
            let sl = u32::try_from(self.strings.len()).expect("small");
            for w in [24u32, 0, tl, tl, sl] {
                out.extend_from_slice(&w.to_le_bytes());
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    /// A miniature kernel: task_struct with an anonymous union, pcpu_hot, a bitfield.
    fn sample() -> (Vec<u8>, TypeId) {
        let mut b = Builder::new();
        let int = b.int("int", 4);
        let u64t = b.int("long long unsigned int", 8);
        let char_t = b.int("char", 1);
        let pid_t = b.typedef("pid_t", int);
        let fwd = b.fwd("task_struct");
        let task_ptr = b.ptr(fwd);
        let comm = b.array(char_t, int, 16);
        let cpid = b.konst(pid_t);
        let inner = b.composite(
            false,
            "",
            16,
            &[("arg_start", u64t, 0, 0), ("arg_end", u64t, 64, 0)],
        );
        let anon_union = b.composite(true, "", 16, &[("", inner, 0, 0), ("pad", comm, 0, 0)]);
        let task = b.composite(
            false,
            "task_struct",
            64,
            &[
                ("flags", int, 0, 0),
                ("pid", cpid, 32, 0),
                ("bits", int, 64, 3),
                ("more", int, 67, 5),
                ("", anon_union, 128, 0),
                ("comm", comm, 256, 0),
                ("real_parent", task_ptr, 384, 0),
            ],
        );
        let hot_inner = b.composite(
            false,
            "",
            16,
            &[
                ("current_task", task_ptr, 0, 0),
                ("preempt_count", int, 64, 0),
            ],
        );
        let hot_u = b.composite(true, "", 64, &[("", hot_inner, 0, 0), ("pad", comm, 0, 0)]);
        let hot = b.composite(false, "pcpu_hot", 64, &[("", hot_u, 0, 0)]);
        let td = b.typedef("hot_t", hot);
        let _ = b.enum32("e", &[("A", -1), ("B", 2)]);
        let _ = b.enum64("e64", &[("BIG", 1 << 40)]);
        let fp = b.func_proto(int, &[("t", task_ptr), ("", int)]);
        let _ = b.func("do_exit", fp);
        let v = b.var("current_task", task_ptr);
        let _ = b.datasec(".data..percpu", &[(v, 0x1fb80, 8)]);
        let _ = b.misc(16, "double", 8);
        let _ = b.misc(9, "", int);
        let _ = b.misc(11, "", task_ptr);
        let _ = b.misc(18, "user", int);
        let _ = b.decl_tag("tag", task, -1);
        (b.build(), td)
    }

    #[test]
    fn parses_all_kinds_and_resolves_paths() {
        let (bytes, td) = sample();
        let btf = Btf::parse(&bytes).expect("valid");
        assert_eq!(btf.len(), 26);
        let f = btf.member_path("task_struct", "pid").expect("pid");
        assert_eq!((f.offset, f.size), (4, 4));
        let f = btf.member_path("task_struct", "arg_end").expect("anon");
        assert_eq!((f.offset, f.size), (24, 8));
        let f = btf.member_path("task_struct", "comm").expect("comm");
        assert_eq!((f.offset, f.size), (32, 16));
        let f = btf.member_path("task_struct", "more").expect("bitfield");
        assert_eq!((f.bit_offset, f.bitfield_size, f.offset), (67, Some(5), 8));
        let f = btf.member_path("pcpu_hot", "current_task").expect("hot");
        assert_eq!((f.offset, f.size), (0, 8));
        let f = btf.member_path("pcpu_hot", "preempt_count").expect("hot");
        assert_eq!((f.offset, f.size), (8, 4));
        // Through a typedef'd root.
        let f = btf
            .member_path_in(td, "hot_t", "preempt_count")
            .expect("typedef");
        assert_eq!(f.offset, 8);
        assert_eq!(btf.size_of(td), Ok(64));
        // Errors name what is missing.
        assert_eq!(
            btf.member_path("task_struct", "nope"),
            Err(BtfError::NoMember {
                ty: "task_struct".into(),
                member: "nope".into()
            })
        );
        assert_eq!(
            btf.member_path("task_struct", "pid.x"),
            Err(BtfError::NotComposite {
                path: "task_struct.pid".into()
            })
        );
        assert_eq!(
            btf.member_path("mm_struct", "pgd"),
            Err(BtfError::NoStruct {
                name: "mm_struct".into()
            })
        );
        let e64 = btf.ids_by_name("e64")[0];
        assert_eq!(
            btf.type_by_id(e64).map(|t| t.detail.clone()),
            Ok(Detail::Enum(vec![Enumerator {
                name_off: find_str(&btf, "BIG"),
                value: 1 << 40
            }]))
        );
        let e = btf.ids_by_name("e")[0];
        let Ok(BtfType {
            detail: Detail::Enum(v),
            ..
        }) = btf.type_by_id(e)
        else {
            panic!("enum");
        };
        assert_eq!(v[0].value, -1);
        assert_eq!(btf.type_by_id(0), Err(BtfError::BadTypeId { id: 0 }));
        assert_eq!(btf.type_by_id(1000), Err(BtfError::BadTypeId { id: 1000 }));
    }

    fn find_str(btf: &Btf, s: &str) -> u32 {
        (0..u32::try_from(btf.strings.len()).expect("small"))
            .find(|&o| btf.str_at(o) == Ok(s))
            .expect("string present")
    }

    #[test]
    fn header_errors() {
        assert_eq!(
            Btf::parse(&[0; 10]).unwrap_err(),
            BtfError::TooShort { len: 10 }
        );
        let (mut bytes, _) = sample();
        bytes[0] = 0;
        assert!(matches!(Btf::parse(&bytes), Err(BtfError::BadMagic { .. })));
        let (mut bytes, _) = sample();
        bytes[2] = 2;
        assert_eq!(
            Btf::parse(&bytes).unwrap_err(),
            BtfError::Version { version: 2 }
        );
        let (mut bytes, _) = sample();
        bytes[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Btf::parse(&bytes),
            Err(BtfError::SectionOutOfBounds {
                what: "strings",
                ..
            })
        ));
        // A type cut in the middle.
        let (mut bytes, _) = sample();
        let tl = le_u32(&bytes, 12);
        bytes[12..16].copy_from_slice(&(tl - 2).to_le_bytes());
        assert!(matches!(
            Btf::parse(&bytes),
            Err(BtfError::Truncated { .. })
        ));
    }

    #[test]
    fn cyclic_typedefs_are_refused() {
        let mut b = Builder::new();
        // id 1 -> 2 -> 1
        let _ = b.typedef("a", 2);
        let _ = b.typedef("b", 1);
        let s = b.composite(false, "s", 8, &[("x", 1, 0, 0)]);
        let btf = Btf::parse(&b.build()).expect("parses");
        assert_eq!(btf.resolve(1), Err(BtfError::TooDeep { id: 1 }));
        assert!(matches!(
            btf.member_path("s", "x"),
            Err(BtfError::TooDeep { .. })
        ));
        assert_eq!(btf.find_struct("s"), Ok(s));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Btf::parse(&data);
        }

        #[test]
        fn mutated_valid_btf_never_panics(
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)
        ) {
            let (mut bytes, _) = sample();
            for (at, v) in flips {
                let i = at % bytes.len();
                bytes[i] = v;
            }
            if let Ok(btf) = Btf::parse(&bytes) {
                for path in ["pid", "arg_end", "comm", "more", "real_parent.x"] {
                    let _ = btf.member_path("task_struct", path);
                }
                let _ = btf.member_path("pcpu_hot", "current_task");
                for id in 0..40 {
                    let _ = btf.size_of(id);
                }
            }
        }
    }
}
