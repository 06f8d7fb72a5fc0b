//! Parser for `System.map` (`nm -n` output: `<hex address> <type letter> <name>`).

use super::{Symbol, SymbolKind, SymbolTable, SymbolsError};
use ornament_engine::Gva;
use std::path::Path;

impl SymbolTable {
    /// Read and parse the System.map at `path`.
    pub fn from_system_map(path: &Path) -> Result<Self, SymbolsError> {
        let text = std::fs::read(path).map_err(|source| SymbolsError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        parse_system_map(&String::from_utf8_lossy(&text), path)
    }
}

/// Parse System.map text; `origin` names the file in errors.
///
/// Blank lines are skipped; every other line must be `address type name`, optionally
/// followed by a `[module]` column, which is ignored.
pub fn parse_system_map(text: &str, origin: &Path) -> Result<SymbolTable, SymbolsError> {
    let bad = |line: usize, what: &'static str| SymbolsError::BadLine {
        path: origin.to_path_buf(),
        line,
        what,
    };
    let mut symbols = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let mut cols = raw.split_whitespace();
        let (Some(addr), Some(kind), Some(name)) = (cols.next(), cols.next(), cols.next()) else {
            return Err(bad(line, "expected `address type name`"));
        };
        if let Some(extra) = cols.next() {
            if !(extra.starts_with('[') && extra.ends_with(']')) || cols.next().is_some() {
                return Err(bad(line, "unexpected text after the name"));
            }
        }
        if addr.is_empty() || addr.len() > 16 {
            return Err(bad(line, "address is not 1 to 16 hex digits"));
        }
        let addr = u64::from_str_radix(addr, 16).map_err(|_| bad(line, "address is not hex"))?;
        let mut k = kind.chars();
        let (Some(letter), None) = (k.next(), k.next()) else {
            return Err(bad(line, "type is not one letter"));
        };
        if !(letter.is_ascii_alphabetic() || letter == '?' || letter == '-') {
            return Err(bad(line, "type is not a letter"));
        }
        symbols.push(Symbol {
            name: name.to_owned(),
            addr: Gva(addr),
            kind: SymbolKind(letter),
        });
    }
    if symbols.is_empty() {
        return Err(SymbolsError::Empty {
            path: origin.to_path_buf(),
        });
    }
    tracing::debug!(count = symbols.len(), file = %origin.display(), "System.map parsed");
    Ok(SymbolTable::new(symbols))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
0000000000000000 D __per_cpu_start
0000000000035000 D pcpu_hot
0000000000036000 D __per_cpu_end
0000000000000040 A some_abs
ffffffff81000000 T _text
ffffffff81000000 T startup_64
ffffffff8144fcf0 t bprm_execve
ffffffff8144fd00 W weak_fn
ffffffff821529e0 D linux_banner
ffffffff82200000 r __ksymtab_foo
ffffffff82300000 b bss_thing
ffffffff82300010 B big_bss
ffffffff82300020 R ro
ffffffff82300030 V weak_obj
ffffffff82300040 d static_data
ffffffff82400000 t dup_name
ffffffff82400100 t dup_name

";

    #[test]
    fn parses_all_letters_and_duplicates() {
        let t = parse_system_map(SAMPLE, Path::new("System.map-test")).expect("parses");
        assert_eq!(t.len(), 17);
        assert_eq!(t.lookup("linux_banner"), Some(Gva(0xffff_ffff_8215_29e0)));
        assert_eq!(t.lookup("bprm_execve"), Some(Gva(0xffff_ffff_8144_fcf0)));
        assert_eq!(t.percpu_offset("pcpu_hot"), Some(0x35000));
        assert_eq!(t.lookup("some_abs"), Some(Gva(0x40)));
        let kinds: String = t.iter().map(|s| s.kind.0).collect();
        assert_eq!(kinds, "DDDATTtWDrbBRVdtt");
        let dups: Vec<Gva> = t.lookup_all("dup_name").map(|s| s.addr).collect();
        assert_eq!(
            dups,
            vec![Gva(0xffff_ffff_8240_0000), Gva(0xffff_ffff_8240_0100)]
        );
        assert_eq!(t.lookup("dup_name"), Some(Gva(0xffff_ffff_8240_0000)));
        assert_eq!(t.symbolize(Gva(0xffff_ffff_8100_0005)), Some(("_text", 5)));
    }

    #[test]
    fn bad_lines_name_file_and_line() {
        let cases = [
            ("ffffffff81000000 T\n", "expected `address type name`"),
            ("zzzz T x\n", "address is not hex"),
            (
                "ffffffff810000001 T x\n",
                "address is not 1 to 16 hex digits",
            ),
            ("ffffffff81000000 TT x\n", "type is not one letter"),
            ("ffffffff81000000 1 x\n", "type is not a letter"),
            ("ffffffff81000000 T x y\n", "unexpected text after the name"),
        ];
        for (text, want) in cases {
            let full = format!("ffffffff81000000 T ok\n{text}");
            match parse_system_map(&full, Path::new("/x/System.map")) {
                Err(SymbolsError::BadLine { path, line, what }) => {
                    assert_eq!(path, Path::new("/x/System.map"));
                    assert_eq!(line, 2);
                    assert_eq!(what, want);
                }
                other => panic!("{text:?}: {other:?}"),
            }
        }
        let e = parse_system_map("\n\n", Path::new("e")).expect_err("empty");
        assert_eq!(e.to_string(), "e holds no symbols");
        let e = parse_system_map("x", Path::new("/m")).expect_err("bad");
        assert_eq!(
            e.to_string(),
            "/m:1: malformed System.map line (expected `address type name`)"
        );
    }

    #[test]
    fn module_column_is_ignored() {
        let t = parse_system_map("ffffffffc0000000 t f [mod]\n", Path::new("m")).expect("ok");
        assert_eq!(t.lookup("f"), Some(Gva(0xffff_ffff_c000_0000)));
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn random_text_never_panics(s in "\\PC{0,200}") {
            let _ = parse_system_map(&s, Path::new("m"));
        }

        #[test]
        fn well_formed_lines_round_trip(
            lines in proptest::collection::vec((any::<u64>(), "[TtDdBbRrAWwVv]", "[a-z_][a-z0-9_]{0,20}"), 1..50)
        ) {
            let text: String = lines
                .iter()
                .map(|(a, k, n)| format!("{a:016x} {k} {n}\n"))
                .collect();
            let t = parse_system_map(&text, Path::new("m")).expect("valid");
            prop_assert_eq!(t.len(), lines.len());
            for (a, k, n) in &lines {
                prop_assert!(t.lookup_all(n).any(|s| s.addr == Gva(*a) && s.kind.0.to_string() == *k));
            }
        }
    }
}
