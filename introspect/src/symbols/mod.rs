//! Kernel symbols: one lookup table filled from System.map or from vmlinux's ELF symbol table.

mod system_map;
mod vmlinux;

use ornament_engine::Gva;
use std::collections::HashMap;
use std::path::PathBuf;

pub use system_map::parse_system_map;
pub use vmlinux::symbols_from_vmlinux;

/// Why a symbol source could not be read.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum SymbolsError {
    /// cannot read {path}
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// {path}:{line}: malformed System.map line ({what})
    BadLine {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What was wrong with it.
        what: &'static str,
    },
    /// {path} holds no symbols
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// cannot read the ELF symbol table of {path}
    Elf {
        /// The file.
        path: PathBuf,
        /// The ELF reader's error.
        #[source]
        source: crate::elf::ElfError,
    },
    /// {path}: malformed ELF symbol table
    ElfSyms {
        /// The file.
        path: PathBuf,
        /// What goblin said.
        #[source]
        source: goblin::error::Error,
    },
}

/// The type letter of a symbol as `nm` prints it (`T`, `t`, `D`, `d`, `B`, `b`, `R`, `r`,
/// `A`, `W`, `w`, `V`, `v`, ...). Upper case is global, lower case local.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SymbolKind(pub char);

impl SymbolKind {
    /// Code (`T`/`t`, and weak `W`/`w`, which in vmlinux are functions).
    pub fn is_text(self) -> bool {
        matches!(self.0, 'T' | 't' | 'W' | 'w')
    }
    /// Absolute (`A`/`a`): not relocated by KASLR.
    pub fn is_absolute(self) -> bool {
        matches!(self.0, 'A' | 'a')
    }
    /// Global (upper-case letter).
    pub fn is_global(self) -> bool {
        self.0.is_ascii_uppercase()
    }
}

/// One symbol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Symbol {
    /// Its name.
    pub name: String,
    /// Its address as linked (no KASLR slide); for per-CPU symbols, the offset in the
    /// per-CPU area.
    pub addr: Gva,
    /// Its `nm` type letter.
    pub kind: SymbolKind,
}

/// Highest address still taken as a per-CPU offset when the table has no `__per_cpu_end`.
const PERCPU_LIMIT_FALLBACK: u64 = 1 << 32;

/// Symbols by name and by address.
#[derive(Debug, Clone, Default)]
pub struct SymbolTable {
    symbols: Vec<Symbol>,
    by_name: HashMap<String, Vec<usize>>,
    /// Indices of non-per-CPU, non-absolute symbols sorted by address (stable: file order
    /// among equal addresses).
    by_addr: Vec<usize>,
    percpu_end: u64,
}

impl SymbolTable {
    /// Build a table from symbols in source order.
    pub fn new(symbols: Vec<Symbol>) -> Self {
        let mut by_name: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, s) in symbols.iter().enumerate() {
            by_name.entry(s.name.clone()).or_default().push(i);
        }
        let mut this = Self {
            symbols,
            by_name,
            by_addr: Vec::new(),
            percpu_end: PERCPU_LIMIT_FALLBACK,
        };
        let end = this
            .lookup_all("__per_cpu_end")
            .next()
            .map(|s| s.addr.raw())
            .filter(|&e| e < PERCPU_LIMIT_FALLBACK);
        if let Some(end) = end {
            this.percpu_end = end;
        }
        let mut by_addr: Vec<usize> = (0..this.symbols.len())
            .filter(|&i| {
                let s = &this.symbols[i];
                !s.kind.is_absolute() && !this.is_percpu(s)
            })
            .collect();
        by_addr.sort_by_key(|&i| this.symbols[i].addr);
        this.by_addr = by_addr;
        this
    }

    /// Number of symbols (duplicates included).
    pub fn len(&self) -> usize {
        self.symbols.len()
    }

    /// True when there are no symbols.
    pub fn is_empty(&self) -> bool {
        self.symbols.is_empty()
    }

    /// All symbols in source order.
    pub fn iter(&self) -> impl Iterator<Item = &Symbol> {
        self.symbols.iter()
    }

    /// Every symbol called `name`, in source order.
    pub fn lookup_all<'a>(&'a self, name: &str) -> impl Iterator<Item = &'a Symbol> + 'a {
        self.by_name
            .get(name)
            .map(|v| v.as_slice())
            .unwrap_or(&[])
            .iter()
            .map(move |&i| &self.symbols[i])
    }

    /// The symbol called `name`: the first text one if any, else the first one.
    pub fn get(&self, name: &str) -> Option<&Symbol> {
        self.lookup_all(name)
            .find(|s| s.kind.is_text())
            .or_else(|| self.lookup_all(name).next())
    }

    /// Address of `name` (see [`SymbolTable::get`] for which one among duplicates).
    pub fn lookup(&self, name: &str) -> Option<Gva> {
        self.get(name).map(|s| s.addr)
    }

    /// True when `sym` is an offset into the per-CPU area rather than an address.
    pub fn is_percpu(&self, sym: &Symbol) -> bool {
        !sym.kind.is_text() && sym.addr.raw() < self.percpu_end
    }

    /// Offset of per-CPU variable `name` within a CPU's per-CPU area.
    pub fn percpu_offset(&self, name: &str) -> Option<u64> {
        self.lookup_all(name)
            .find(|s| self.is_percpu(s))
            .map(|s| s.addr.raw())
    }

    /// The symbol at or below `addr` (per-CPU and absolute symbols excluded) and the
    /// offset of `addr` from it.
    pub fn symbolize(&self, addr: Gva) -> Option<(&str, u64)> {
        let pos = self
            .by_addr
            .partition_point(|&i| self.symbols[i].addr <= addr);
        let last = *self.by_addr.get(pos.checked_sub(1)?)?;
        let base = self.symbols[last].addr;
        // Among symbols at the same address, name the first in source order.
        let first = self.by_addr[..pos]
            .iter()
            .rev()
            .take_while(|&&i| self.symbols[i].addr == base)
            .last()
            .copied()
            .unwrap_or(last);
        let s = &self.symbols[first];
        Some((s.name.as_str(), addr.raw() - base.raw()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sym(name: &str, addr: u64, kind: char) -> Symbol {
        Symbol {
            name: name.into(),
            addr: Gva(addr),
            kind: SymbolKind(kind),
        }
    }

    #[test]
    fn lookup_prefers_first_text() {
        let t = SymbolTable::new(vec![
            sym("dup", 0xffff_ffff_8200_0000, 'd'),
            sym("dup", 0xffff_ffff_8100_1000, 't'),
            sym("dup", 0xffff_ffff_8100_2000, 't'),
        ]);
        assert_eq!(t.lookup("dup"), Some(Gva(0xffff_ffff_8100_1000)));
        assert_eq!(t.lookup_all("dup").count(), 3);
        assert_eq!(t.lookup("none"), None);
        let d = SymbolTable::new(vec![sym("x", 5, 'D'), sym("x", 0xffff_ffff_8200_0000, 'D')]);
        assert_eq!(d.lookup("x"), Some(Gva(5)));
    }

    #[test]
    fn percpu_and_symbolize() {
        let t = SymbolTable::new(vec![
            sym("__per_cpu_start", 0, 'D'),
            sym("current_task", 0x1fb80, 'D'),
            sym("__per_cpu_end", 0x36000, 'D'),
            sym("_text", 0xffff_ffff_8100_0000, 'T'),
            sym("alias", 0xffff_ffff_8100_0000, 'T'),
            sym("f", 0xffff_ffff_8100_0100, 't'),
            sym("abs", 0x40, 'A'),
        ]);
        assert_eq!(t.percpu_offset("current_task"), Some(0x1fb80));
        assert_eq!(t.percpu_offset("_text"), None);
        assert_eq!(
            t.symbolize(Gva(0xffff_ffff_8100_0010)),
            Some(("_text", 0x10))
        );
        assert_eq!(t.symbolize(Gva(0xffff_ffff_8100_0100)), Some(("f", 0)));
        assert_eq!(t.symbolize(Gva(0xffff_ffff_8100_0180)), Some(("f", 0x80)));
        assert_eq!(t.symbolize(Gva(0x1fb80)), None);
        assert_eq!(t.symbolize(Gva(0x10)), None);
    }
}
