//! A kernel's own kallsyms, read from its bzImage alone, against the real System.map of
//! its `-dbg` package, for both default kernels: every symbol the two share has the same
//! address and type, and what differs is exactly these classes:
//!
//! - absolute symbols (`A` in System.map: `phys_startup_64`, `text_size`,
//!   `init_per_cpu__*`, ...) are not in kallsyms (scripts/kallsyms drops them);
//! - per-CPU symbols (System.map `d`/`D` at offsets up to `__per_cpu_end`) are typed
//!   `A` in kallsyms (`CONFIG_KALLSYMS_ABSOLUTE_PERCPU`), at the same offset;
//! - on 6.1 the kallsyms tables themselves (`kallsyms_names`, ...) are not in kallsyms
//!   (6.1's scripts/kallsyms ignores them; 6.12's lists them);
//! - symbols at one address may come in another order.

use ornament_images::catalog;
use ornament_images::reference;
use ornament_introspect::symbols::{Symbol, SymbolTable};
use ornament_introspect::{bzimage, kallsyms};
use ornament_tests::{can_build_images, require, require_host};
use std::collections::BTreeMap;

/// (image, System.map symbols, absolute, per-CPU, kallsyms tables, kallsyms symbols)
const EXPECTED: [(&str, usize, usize, usize, usize, usize); 2] = [
    ("debian-6.1-cloud", 87196, 6, 358, 8, 87182),
    ("debian-6.12-cloud", 154691, 5, 387, 0, 154686),
];

fn key(s: &Symbol) -> (u64, String, char) {
    (s.addr.raw(), s.name.clone(), s.kind.0)
}

#[test]
fn kallsyms_from_the_bzimage_equals_the_real_system_map() {
    require_host!("apt-get and dpkg-deb", can_build_images());
    for (image, map_count, absolute, percpu, tables, ks_count) in EXPECTED {
        let spec = catalog::reference(image);
        let files = match reference::fetch(&spec, true, None) {
            Ok(f) => f,
            Err(e) => {
                let what = format!("the bzImage and -dbg System.map of {image} ({e})");
                if !require(&what, false) {
                    return;
                }
                unreachable!("require fails under CI");
            }
        };
        let map_path = files.system_map.expect("asked for the System.map");
        let real = SymbolTable::from_system_map(&map_path).expect("real System.map parses");
        let vmlinux = bzimage::read_vmlinux(&files.kernel).expect("bzImage decompresses");
        let ks = kallsyms::read(&vmlinux.bytes, &files.kernel).expect("kallsyms decodes");
        assert_eq!(real.len(), map_count, "{image}: System.map symbols");
        assert_eq!(ks.symbols.len(), ks_count, "{image}: kallsyms symbols");
        // Table order is address order.
        assert!(
            ks.symbols.windows(2).all(|w| w[0].addr <= w[1].addr),
            "{image}: kallsyms not in address order"
        );

        let percpu_end = real.lookup("__per_cpu_end").expect("__per_cpu_end").raw();
        let (mut n_abs, mut n_percpu, mut n_tables) = (0, 0, 0);
        let mut expected: BTreeMap<(u64, String, char), usize> = BTreeMap::new();
        for s in real.iter() {
            if s.kind.is_absolute() {
                n_abs += 1;
                continue;
            }
            let is_table = [
                "kallsyms_offsets",
                "kallsyms_relative_base",
                "kallsyms_num_syms",
                "kallsyms_names",
                "kallsyms_markers",
                "kallsyms_seqs_of_names",
                "kallsyms_token_table",
                "kallsyms_token_index",
            ]
            .contains(&s.name.as_str());
            if is_table && tables > 0 {
                n_tables += 1;
                continue;
            }
            let mut k = key(s);
            if matches!(s.kind.0, 'd' | 'D') && s.addr.raw() <= percpu_end {
                n_percpu += 1;
                k.2 = 'A';
            }
            *expected.entry(k).or_default() += 1;
        }
        assert_eq!(
            (n_abs, n_percpu, n_tables),
            (absolute, percpu, tables),
            "{image}: (absolute, per-CPU, kallsyms tables) in System.map"
        );
        let mut got: BTreeMap<(u64, String, char), usize> = BTreeMap::new();
        for s in &ks.symbols {
            *got.entry(key(s)).or_default() += 1;
        }
        let missing: Vec<_> = expected
            .iter()
            .filter(|(k, n)| got.get(*k) != Some(n))
            .take(10)
            .collect();
        let extra: Vec<_> = got
            .iter()
            .filter(|(k, n)| expected.get(*k) != Some(n))
            .take(10)
            .collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{image}: System.map has {missing:x?} that kallsyms lacks; kallsyms has {extra:x?} that System.map lacks"
        );
        let release = spec.release;
        eprintln!(
            "{image} ({release}): {ks_count} kallsyms symbols equal System.map's {map_count} less {absolute} absolute and {tables} table symbols; {percpu} per-CPU typed A; layout {:x?}",
            ks.layout
        );
    }
}
