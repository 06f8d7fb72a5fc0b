//! Questions over parsed BTF: strings, types by id and name, sizes, members and dotted member
//! paths (through anonymous unions and typedefs, with a depth bound).

use super::{Btf, BtfError, BtfType, Detail, FieldInfo, Kind, Member, TypeId, MAX_DEPTH};

impl Btf {
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
