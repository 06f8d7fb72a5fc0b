//! BTF bytes to [`Btf`]: the header, the string section and every type record, each length
//! and offset checked against the data.

use super::{
    Btf, BtfError, BtfType, Detail, Enumerator, Kind, Member, Param, TypeId, VarSecInfo, BTF_MAGIC,
    HEADER_LEN,
};
use crate::bytes::{le_u16, le_u32};
use std::collections::HashMap;

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

impl Btf {
    /// Parse raw BTF data (the bytes of a `.BTF` section, or `/sys/kernel/btf/vmlinux`).
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        if data.len() < HEADER_LEN {
            return Err(BtfError::TooShort { len: data.len() });
        }
        // The header's fields, all inside the HEADER_LEN bytes checked above.
        let short = || BtfError::TooShort { len: data.len() };
        let magic = le_u16(data, 0).ok_or_else(short)?;
        if magic != BTF_MAGIC {
            return Err(BtfError::BadMagic { magic });
        }
        if data[2] != 1 {
            return Err(BtfError::Version { version: data[2] });
        }
        let hdr_len = le_u32(data, 4).ok_or_else(short)?;
        let field = |at| le_u32(data, at).map(u64::from).ok_or_else(short);
        let (type_off, type_len, str_off, str_len) =
            (field(8)?, field(12)?, field(16)?, field(20)?);
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
}
