//! Tests of the kallsyms reader: a minimal ELF kernel with synthetic tables in each
//! order, and inputs it must refuse.

use super::*;

#[test]
fn an_elf_without_kallsyms_is_refused_naming_it() {
    let exe = std::env::current_exe().expect("own executable");
    let bytes = std::fs::read(&exe).expect("read own executable");
    let e = read(&bytes, Path::new("/k/vmlinux")).expect_err("no kallsyms in a test binary");
    assert_eq!(
        e.to_string(),
        "/k/vmlinux: no kallsyms token table found (a kernel built without CONFIG_KALLSYMS?)"
    );
    let e = read(b"not an elf at all", Path::new("/k/x")).expect_err("not elf");
    assert!(e.to_string().starts_with("/k/x is not an ELF file"), "{e}");
}

/// Where the address tables go in a synthetic kernel.
#[derive(Clone, Copy, PartialEq)]
enum Order {
    /// Offsets and relative base before `kallsyms_num_syms`, seqs after the markers (6.1).
    RelativeBefore,
    /// Offsets, relative base and seqs after the token index (6.4+).
    RelativeAfter,
    /// Absolute `u64` addresses before `kallsyms_num_syms`, no seqs (old kernels).
    AbsoluteBefore,
}

const BASE: u64 = 0xffff_ffff_8100_0000;
const RODATA: u64 = 0xffff_ffff_8200_0000;

fn pad(v: &mut Vec<u8>, a: usize) {
    while !v.len().is_multiple_of(a) {
        v.push(0);
    }
}

/// 600 symbols: 3 per-CPU (`A`, small values), then text symbols.
fn synth_symbols() -> Vec<(u64, char, String)> {
    let mut v: Vec<(u64, char, String)> = (0..3u64)
        .map(|i| (i * 0x40, 'A', format!("pcpu_{i}")))
        .collect();
    v.extend((0..597u64).map(|i| {
        let kind = if i % 5 == 0 { 't' } else { 'T' };
        (BASE + i * 0x30, kind, format!("sym_{i}"))
    }));
    v
}

/// The `.rodata` of a kernel with these kallsyms tables.
fn synth_rodata(order: Order) -> Vec<u8> {
    let syms = synth_symbols();
    let n = syms.len();
    // Tokens: printable characters stand for themselves; other codes are pairs.
    let tokens: Vec<Vec<u8>> = (0..=255u8)
        .map(|c| {
            if (0x21..0x7f).contains(&c) {
                vec![c]
            } else {
                vec![b'q', b'a' + c % 26]
            }
        })
        .collect();
    let mut names = Vec::new();
    let mut marks = Vec::new();
    for (i, (_, kind, name)) in syms.iter().enumerate() {
        if i % 256 == 0 {
            marks.push(u32::try_from(names.len()).expect("small"));
        }
        let text: Vec<u8> = std::iter::once(*kind as u8).chain(name.bytes()).collect();
        names.push(u8::try_from(text.len()).expect("short"));
        names.extend_from_slice(&text);
    }
    let offsets: Vec<u8> = syms
        .iter()
        .flat_map(|&(a, k, _)| {
            let o: i64 = if k == 'A' {
                i64::try_from(a).expect("small")
            } else {
                -i64::try_from(a - (BASE - 1)).expect("small")
            };
            i32::try_from(o).expect("fits").to_le_bytes()
        })
        .collect();
    let mut table = Vec::new();
    let mut index = Vec::new();
    for t in &tokens {
        index.extend_from_slice(&u16::try_from(table.len()).expect("small").to_le_bytes());
        table.extend_from_slice(t);
        table.push(0);
    }
    let mut d = vec![0xaau8; 0x40];
    let rel_before = |d: &mut Vec<u8>| {
        d.extend_from_slice(&offsets);
        pad(d, 8);
        d.extend_from_slice(&BASE.to_le_bytes());
    };
    match order {
        Order::RelativeBefore => rel_before(&mut d),
        Order::AbsoluteBefore => {
            for (a, _, _) in &syms {
                d.extend_from_slice(&a.to_le_bytes());
            }
        }
        Order::RelativeAfter => {}
    }
    d.extend_from_slice(&u32::try_from(n).expect("small").to_le_bytes());
    pad(&mut d, 8);
    d.extend_from_slice(&names);
    pad(&mut d, 8);
    for m in &marks {
        d.extend_from_slice(&m.to_le_bytes());
    }
    pad(&mut d, 8);
    if order == Order::RelativeBefore {
        d.extend(std::iter::repeat_n(0x11u8, 3 * n));
        pad(&mut d, 8);
    }
    d.extend_from_slice(&table);
    pad(&mut d, 8);
    d.extend_from_slice(&index);
    pad(&mut d, 8);
    if order == Order::RelativeAfter {
        d.extend_from_slice(&offsets);
        pad(&mut d, 8);
        d.extend_from_slice(&BASE.to_le_bytes());
        d.extend(std::iter::repeat_n(0x11u8, 3 * n));
    }
    d.extend_from_slice(&[0x55; 64]);
    d
}

/// A minimal ELF64 file: `.rodata` at [`RODATA`] and `.shstrtab`.
fn elf_with(rodata: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 0x1000];
    f[..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
    f[16..18].copy_from_slice(&2u16.to_le_bytes());
    f[18..20].copy_from_slice(&62u16.to_le_bytes());
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[52..54].copy_from_slice(&64u16.to_le_bytes());
    f[54..56].copy_from_slice(&56u16.to_le_bytes());
    f[58..60].copy_from_slice(&64u16.to_le_bytes());
    f[60..62].copy_from_slice(&3u16.to_le_bytes());
    f[62..64].copy_from_slice(&2u16.to_le_bytes());
    f.extend_from_slice(rodata);
    let strtab_off = f.len() as u64;
    let strtab = b"\0.rodata\0.shstrtab\0";
    f.extend_from_slice(strtab);
    pad(&mut f, 8);
    let shoff = f.len() as u64;
    f[40..48].copy_from_slice(&shoff.to_le_bytes());
    let sh = |name: u32, ty: u32, flags: u64, addr: u64, off: u64, size: u64| {
        let mut h = Vec::with_capacity(64);
        h.extend_from_slice(&name.to_le_bytes());
        h.extend_from_slice(&ty.to_le_bytes());
        h.extend_from_slice(&flags.to_le_bytes());
        h.extend_from_slice(&addr.to_le_bytes());
        h.extend_from_slice(&off.to_le_bytes());
        h.extend_from_slice(&size.to_le_bytes());
        h.extend_from_slice(&[0u8; 8]);
        h.extend_from_slice(&1u64.to_le_bytes());
        h.extend_from_slice(&0u64.to_le_bytes());
        h
    };
    f.extend(vec![0u8; 64]);
    f.extend(sh(1, 1, 2, RODATA, 0x1000, rodata.len() as u64));
    f.extend(sh(9, 3, 0, 0, strtab_off, strtab.len() as u64));
    f
}

#[test]
fn synthetic_tables_in_every_order_decode_exactly() {
    let want: Vec<(u64, char, String)> = synth_symbols();
    for order in [
        Order::RelativeBefore,
        Order::RelativeAfter,
        Order::AbsoluteBefore,
    ] {
        let elf = elf_with(&synth_rodata(order));
        let k = read(&elf, Path::new("synth")).expect("decodes");
        let got: Vec<(u64, char, String)> = k
            .symbols
            .iter()
            .map(|s| (s.addr.raw(), s.kind.0, s.name.clone()))
            .collect();
        assert_eq!(got, want);
        assert_eq!(k.layout.names, k.layout.num_syms + 8);
        match (order, k.layout.addressing) {
            (
                Order::RelativeBefore | Order::RelativeAfter,
                Addressing::Relative {
                    base,
                    absolute_percpu,
                    ..
                },
            ) => {
                assert_eq!((base, absolute_percpu), (BASE, true));
                assert_eq!(
                    k.layout.addresses_after_tokens,
                    order == Order::RelativeAfter
                );
            }
            (Order::AbsoluteBefore, Addressing::Absolute) => {}
            (_, a) => panic!("addressing {a:?}"),
        }
    }
}

#[test]
fn tables_without_addresses_or_names_are_refused() {
    // Names and tokens but the address tables overwritten.
    let mut ro = synth_rodata(Order::RelativeBefore);
    ro[0x40..0x40 + 600 * 4 + 8].fill(0);
    let e = read(&elf_with(&ro), Path::new("/k/z")).expect_err("no addresses");
    assert!(
        e.to_string()
            .starts_with("/k/z: kallsyms names of 600 symbols are at 0x"),
        "{e}"
    );
    // A token table but no names that decode with it
    // (the first name's type letter made a '+').
    let mut ro = synth_rodata(Order::RelativeAfter);
    ro[0x40 + 8 + 1] ^= 0x7f;
    let e = read(&elf_with(&ro), Path::new("/k/y")).expect_err("no names");
    assert!(
        e.to_string().contains("a kallsyms token table is at 0x"),
        "{e}"
    );
}

#[test]
fn entry_lengths_one_and_two_bytes() {
    assert_eq!(entry_len(&[0x05], 0), Some((5, 1)));
    assert_eq!(entry_len(&[0x81, 0x02], 0), Some((0x101, 2)));
    assert_eq!(entry_len(&[0x81], 0), None);
}

#[test]
fn system_map_lines() {
    let syms = [Symbol {
        name: "_text".into(),
        addr: Gva(0xffff_ffff_8100_0000),
        kind: SymbolKind('T'),
    }];
    assert_eq!(system_map_text(&syms), "ffffffff81000000 T _text\n");
}

#[test]
fn a_kernel_without_btf_is_refused_naming_it() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("vmlinux-no-btf");
    std::fs::write(&path, elf_with(&synth_rodata(Order::RelativeAfter))).expect("write");
    let e = crate::profile::generate_from_kernel(&path).expect_err("no .BTF");
    assert_eq!(
        e.to_string(),
        format!(
            "{}: the kernel has no .BTF section (built without CONFIG_DEBUG_INFO_BTF?), so it has no struct layouts",
            path.display()
        )
    );
}
