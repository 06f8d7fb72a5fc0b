//! A BTF builder for tests, and the parser checked on built and on broken data.

use super::*;
use crate::bytes::le_u32;
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
    let tl = le_u32(&bytes, 12).expect("header");
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
