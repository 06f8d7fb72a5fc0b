//! kallsyms: the kernel's own symbol table, found and decoded in its ELF image (the
//! decompressed bzImage payload, which has no ELF symbol table).
//!
//! `scripts/kallsyms` emits, in `.rodata`: `kallsyms_num_syms`, then `kallsyms_names`
//! (per symbol: its length in tokens, one byte or two for "big" symbols, then token
//! numbers; the first character of the expansion is the `nm` type letter),
//! `kallsyms_markers` (the offset in the names of every 256th symbol),
//! `kallsyms_token_table` (256 NUL-terminated strings) and `kallsyms_token_index`
//! (their 256 `u16` offsets), and the addresses: `kallsyms_offsets` (`i32`) with
//! `kallsyms_relative_base` (`u64`), or `kallsyms_addresses` (`u64`) on kernels built
//! without base-relative kallsyms. Where the address tables sit changed: before
//! `kallsyms_num_syms` up to 6.3 (6.1 as Debian builds it has `kallsyms_seqs_of_names`
//! between the markers and the token table), after the token index since. Both are
//! tried, each checked (addresses in order, a kernel-half base) before it is taken.
//!
//! The tables are found without any symbol: the token table holds the digits as
//! single-character tokens at their own codes (`"0\0" "1\0" ... "9\0"`), which gives its
//! start; the token index is the table's offsets; `kallsyms_num_syms` is the `u32`
//! whose following names decode, symbol after symbol, to exactly the offsets the
//! markers after them record.

use crate::bytes::{le_u32, le_u64};
use crate::symbols::{Symbol, SymbolKind};
use goblin::elf::section_header::{SHF_ALLOC, SHT_NOBITS};
use ornament_engine::Gva;
use std::path::{Path, PathBuf};

/// Longest token accepted.
const MAX_TOKEN: usize = 255;

/// Why no symbol table could be read from a kernel image.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum KallsymsError {
    /// {path} is not an ELF file this reader can parse
    Elf {
        /// The kernel file.
        path: PathBuf,
        /// What goblin said.
        #[source]
        source: goblin::error::Error,
    },
    /// {path}: no kallsyms token table found (a kernel built without CONFIG_KALLSYMS?)
    NoTokenTable {
        /// The kernel file.
        path: PathBuf,
    },
    /// {path}: a kallsyms token table is at {token_table:#x}, but no symbol-name table (kallsyms_num_syms, kallsyms_names, kallsyms_markers) decodes with it
    NoNames {
        /// The kernel file.
        path: PathBuf,
        /// Address of the token table.
        token_table: u64,
    },
    /// {path}: kallsyms names of {count} symbols are at {names:#x}, but no address table (offsets and relative base, or absolute addresses) fits them
    NoAddresses {
        /// The kernel file.
        path: PathBuf,
        /// Address of `kallsyms_names`.
        names: u64,
        /// Number of symbols.
        count: u32,
    },
}

/// How the addresses are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Addressing {
    /// `kallsyms_offsets` (`i32`) against `kallsyms_relative_base`.
    Relative {
        /// The value of `kallsyms_relative_base`.
        base: u64,
        /// Where `kallsyms_relative_base` is.
        base_at: u64,
        /// `CONFIG_KALLSYMS_ABSOLUTE_PERCPU`: non-negative offsets are absolute values
        /// (the per-CPU symbols), negative ones count down from `base - 1`.
        absolute_percpu: bool,
    },
    /// `kallsyms_addresses` (`u64`).
    Absolute,
}

/// Where each table was found (virtual addresses as linked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// `kallsyms_num_syms`.
    pub num_syms: u64,
    /// `kallsyms_names`.
    pub names: u64,
    /// `kallsyms_markers`.
    pub markers: u64,
    /// `kallsyms_token_table`.
    pub token_table: u64,
    /// `kallsyms_token_index`.
    pub token_index: u64,
    /// `kallsyms_offsets` or `kallsyms_addresses`.
    pub addresses: u64,
    /// How addresses are stored.
    pub addressing: Addressing,
    /// The address tables follow the token index (6.4 and later) rather than precede
    /// `kallsyms_num_syms`.
    pub addresses_after_tokens: bool,
}

/// A decoded kallsyms table.
#[derive(Debug, Clone)]
pub struct Kallsyms {
    /// Every symbol in table order (by address), with its type letter.
    pub symbols: Vec<Symbol>,
    /// Where the tables are.
    pub layout: Layout,
}

/// The bytes of one allocated section.
struct Sect<'a> {
    addr: u64,
    data: &'a [u8],
}

impl Sect<'_> {
    fn u32_at(&self, o: usize) -> Option<u32> {
        le_u32(self.data, o)
    }
    fn u64_at(&self, o: usize) -> Option<u64> {
        le_u64(self.data, o)
    }
    /// `o` moved up to the next `a`-aligned virtual address.
    fn align_up(&self, o: usize, a: u64) -> usize {
        let v = self.addr.wrapping_add(o as u64);
        o + usize::try_from((a - v % a) % a).unwrap_or(0)
    }
    fn vaddr(&self, o: usize) -> u64 {
        self.addr.wrapping_add(o as u64)
    }
}

/// The 256 tokens and where their tables are (section offsets).
struct Tokens {
    table: usize,
    index: usize,
    tokens: Vec<Vec<u8>>,
}

/// Find and decode the kallsyms tables of the ELF kernel image `elf`; `path` names
/// the file in errors.
pub fn read(elf: &[u8], path: &Path) -> Result<Kallsyms, KallsymsError> {
    let parsed = goblin::elf::Elf::parse(elf).map_err(|source| KallsymsError::Elf {
        path: path.to_path_buf(),
        source,
    })?;
    let sections: Vec<Sect<'_>> = parsed
        .section_headers
        .iter()
        .filter(|h| h.sh_flags & u64::from(SHF_ALLOC) != 0 && h.sh_type != SHT_NOBITS)
        .filter_map(|h| {
            let start = usize::try_from(h.sh_offset).ok()?;
            let len = usize::try_from(h.sh_size).ok()?;
            let data = elf.get(start..start.checked_add(len)?)?;
            Some(Sect {
                addr: h.sh_addr,
                data,
            })
        })
        .collect();
    let mut token_table = None;
    for s in &sections {
        let Some(tok) = find_tokens(s) else { continue };
        token_table = Some(s.vaddr(tok.table));
        let Some(names) = find_names(s, &tok) else {
            continue;
        };
        return decode(s, &tok, &names).ok_or_else(|| KallsymsError::NoAddresses {
            path: path.to_path_buf(),
            names: s.vaddr(names.names),
            count: names.count,
        });
    }
    Err(match token_table {
        Some(token_table) => KallsymsError::NoNames {
            path: path.to_path_buf(),
            token_table,
        },
        None => KallsymsError::NoTokenTable {
            path: path.to_path_buf(),
        },
    })
}

const DIGITS: &[u8] = b"0\x001\x002\x003\x004\x005\x006\x007\x008\x009\x00";

/// Token 0 may follow anything (the last bytes of `kallsyms_seqs_of_names` on 6.1), so
/// the walk back from `'0'` stops at token 1; token 0's length comes from the index.
fn find_tokens(s: &Sect<'_>) -> Option<Tokens> {
    let d = s.data;
    let u16_at = |o: usize| {
        d.get(o..o + 2)
            .map(|b| usize::from(u16::from_le_bytes([b[0], b[1]])))
    };
    for hit in memchr::memmem::find_iter(d, DIGITS) {
        let Some(t1) = walk_back(d, hit, 0x2f) else {
            continue;
        };
        let Some((rest, rel, end)) = parse_tokens(d, t1, 255) else {
            continue;
        };
        if rel[0x2f] != hit - t1 {
            continue;
        }
        // The index follows the table (aligned): 256 little-endian u16 offsets, the
        // first 0, the second token 0's length plus its NUL.
        for index in end..end + 16 {
            if u16_at(index) != Some(0) {
                continue;
            }
            let Some(l0) = u16_at(index + 2).filter(|&l| (2..=MAX_TOKEN + 1).contains(&l)) else {
                continue;
            };
            let fits = rel
                .iter()
                .enumerate()
                .all(|(k, &r)| u16_at(index + 2 + 2 * k) == Some(l0 + r));
            let Some(table) = t1.checked_sub(l0) else {
                continue;
            };
            let Some((first, _, _)) = parse_tokens(d, table, 1) else {
                continue;
            };
            if !fits || first[0].len() + 1 != l0 {
                continue;
            }
            let mut tokens = first;
            tokens.extend(rest);
            return Some(Tokens {
                table,
                index,
                tokens,
            });
        }
    }
    None
}

/// The start of the token `count` tokens before the one at `pos`.
fn walk_back(d: &[u8], pos: usize, count: usize) -> Option<usize> {
    let mut p = pos;
    for _ in 0..count {
        if p < 2 || d[p - 1] != 0 {
            return None;
        }
        let end = p - 1;
        let mut q = end;
        while q > 0 && d[q - 1] != 0 && end - q <= MAX_TOKEN {
            q -= 1;
        }
        if q == end || end - q > MAX_TOKEN {
            return None;
        }
        p = q;
    }
    Some(p)
}

/// `n` tokens from `start`: the tokens, their offsets from `start`, the offset past
/// the last.
fn parse_tokens(d: &[u8], start: usize, n: usize) -> Option<(Vec<Vec<u8>>, Vec<usize>, usize)> {
    let mut tokens = Vec::with_capacity(n);
    let mut offsets = Vec::with_capacity(n);
    let mut p = start;
    for _ in 0..n {
        let rest = d.get(p..)?;
        let len = rest.iter().take(MAX_TOKEN + 1).position(|&b| b == 0)?;
        let tok = &rest[..len];
        if len == 0 || !tok.iter().all(|b| (0x20..0x7f).contains(b)) {
            return None;
        }
        offsets.push(p - start);
        tokens.push(tok.to_vec());
        p += len + 1;
    }
    if p - start > usize::from(u16::MAX) {
        return None;
    }
    Some((tokens, offsets, p))
}

/// The names table (section offsets).
struct Names {
    num_syms: usize,
    names: usize,
    count: u32,
    markers: usize,
}

/// Read one entry's token count at `p`: (count, bytes of the length field).
fn entry_len(d: &[u8], p: usize) -> Option<(usize, usize)> {
    let b0 = *d.get(p)?;
    if b0 & 0x80 == 0 {
        return Some((usize::from(b0), 1));
    }
    let b1 = *d.get(p + 1)?;
    Some((usize::from(b0 & 0x7f) | usize::from(b1) << 7, 2))
}

/// Is the expansion of `toks` a plausible `<type letter><name>`?
fn plausible(toks: &[u8], tokens: &[Vec<u8>]) -> bool {
    let mut chars = toks.iter().flat_map(|&t| tokens[usize::from(t)].iter());
    let Some(t) = chars.next() else { return false };
    if !t.is_ascii_alphabetic() {
        return false;
    }
    let mut n = 0usize;
    for c in chars {
        if !(0x21..0x7f).contains(c) {
            return false;
        }
        n += 1;
    }
    n > 0
}

/// Walk `count` names from `q`: the offsets of every 256th entry and the end.
fn walk_names(d: &[u8], q: usize, count: u32, tokens: &[Vec<u8>]) -> Option<(Vec<u32>, usize)> {
    const CHECKED: u32 = 64;
    let mut marks = Vec::with_capacity(usize::try_from(count / 256 + 1).ok()?);
    let mut p = q;
    for i in 0..count {
        if i % 256 == 0 {
            marks.push(u32::try_from(p - q).ok()?);
        }
        let (len, lb) = entry_len(d, p)?;
        let body = d.get(p + lb..p + lb + len)?;
        if len == 0 || (i < CHECKED && !plausible(body, tokens)) {
            return None;
        }
        p += lb + len;
    }
    Some((marks, p))
}

/// Bounds on the bytes 256 names take (each at least a length and one token).
const GROUP_MIN: u64 = 256 * 2;
const GROUP_MAX: u64 = 256 * 300;

/// The markers array starting at `m` (`u32`, or `u64` when `wide`): 0, then strictly
/// increasing by a plausible group size. Returns the markers.
fn markers_at(s: &Sect<'_>, m: usize, wide: bool) -> Vec<u64> {
    let step = if wide { 8 } else { 4 };
    let read = |o: usize| {
        if wide {
            s.u64_at(o)
        } else {
            s.u32_at(o).map(u64::from)
        }
    };
    let mut out = vec![0u64];
    let mut o = m + step;
    while let Some(v) = read(o) {
        let prev = out[out.len() - 1];
        if v <= prev || !(GROUP_MIN..=GROUP_MAX).contains(&(v - prev)) {
            break;
        }
        out.push(v);
        o += step;
    }
    out
}

/// Find `kallsyms_markers` first, scanning down from the token table: a run of
/// increasing offsets starting at 0 that ends right before the token table, or before
/// `kallsyms_seqs_of_names` (3 bytes a symbol) and then the token table. Then the
/// `kallsyms_num_syms` before it whose count fits the markers and whose names walk to
/// exactly those offsets, ending where the markers begin.
fn find_names(s: &Sect<'_>, tok: &Tokens) -> Option<Names> {
    let mut m = tok.table - (s.vaddr(tok.table) % 4) as usize;
    while let Some(here) = m.checked_sub(4) {
        m = here;
        if s.u32_at(here) != Some(0) {
            continue;
        }
        for wide in [false, true] {
            if wide && !s.vaddr(here).is_multiple_of(8) {
                continue;
            }
            let marks = markers_at(s, here, wide);
            let k = marks.len() as u64;
            if k < 2 {
                continue;
            }
            let (lo, hi) = ((k - 1) * 256 + 1, k * 256);
            let end = (here + marks.len() * if wide { 8 } else { 4 }) as u64;
            let Some(gap) = (tok.table as u64).checked_sub(end) else {
                continue;
            };
            if gap >= 8 && !(3 * lo..=3 * hi + 16).contains(&gap) {
                continue;
            }
            let last = usize::try_from(marks[marks.len() - 1]).ok()?;
            // Names start at most `last` + one group before the markers.
            let Some(top) = here.checked_sub(last + 4) else {
                continue;
            };
            let bottom = top.saturating_sub(usize::try_from(GROUP_MAX).ok()? + 16);
            let mut p = top - (s.vaddr(top) % 4) as usize;
            while p >= bottom {
                if let Some(count) = s.u32_at(p).filter(|&c| (lo..=hi).contains(&u64::from(c))) {
                    if let Some(n) = names_at(s, tok, p, count, here, &marks) {
                        return Some(n);
                    }
                }
                let Some(next) = p.checked_sub(4) else { break };
                p = next;
            }
        }
    }
    None
}

/// Do `count` names after `kallsyms_num_syms` at `p` walk to `marks` and end just
/// before the markers at `m`?
fn names_at(
    s: &Sect<'_>,
    tok: &Tokens,
    p: usize,
    count: u32,
    m: usize,
    marks: &[u64],
) -> Option<Names> {
    let mut qs = vec![p + 4];
    let q8 = s.align_up(p + 4, 8);
    if q8 != p + 4 {
        qs.push(q8);
    }
    for q in qs {
        let Some((got, end)) = walk_names(s.data, q, count, &tok.tokens) else {
            continue;
        };
        let same =
            got.len() == marks.len() && got.iter().zip(marks).all(|(&a, &b)| u64::from(a) == b);
        if same && end <= m && m - end < 8 {
            return Some(Names {
                num_syms: p,
                names: q,
                count,
                markers: m,
            });
        }
    }
    None
}

/// Decode the symbols once the names are known: try each place the address tables
/// can be, take the first whose addresses are in order.
fn decode(s: &Sect<'_>, tok: &Tokens, names: &Names) -> Option<Kallsyms> {
    let n = usize::try_from(names.count).ok()?;
    let idx_end = tok.index + 512;
    // (addresses at, relative base at (None: absolute), after the tokens?)
    let mut candidates: Vec<(usize, Option<usize>, bool)> = Vec::new();
    if let Some(base_at) = names.num_syms.checked_sub(8) {
        for off in [base_at.checked_sub(4 * n), base_at.checked_sub(4 * n + 4)]
            .into_iter()
            .flatten()
        {
            candidates.push((off, Some(base_at), false));
        }
    }
    for a in [4, 8] {
        let off = s.align_up(idx_end, a);
        for b in [4, 8] {
            candidates.push((off, Some(s.align_up(off + 4 * n, b)), true));
        }
    }
    for off in [
        names.num_syms.checked_sub(8 * n),
        names.num_syms.checked_sub(8 * n + 4),
    ]
    .into_iter()
    .flatten()
    {
        candidates.push((off, None, false));
    }
    candidates.push((s.align_up(idx_end, 8), None, true));
    candidates.dedup();
    for (at, base_at, after) in candidates {
        let Some((addrs, addressing)) = addresses(s, at, base_at, n) else {
            continue;
        };
        if !addrs.windows(2).all(|w| w[0] <= w[1]) {
            continue;
        }
        let symbols = symbols(s, names, &tok.tokens, &addrs)?;
        return Some(Kallsyms {
            symbols,
            layout: Layout {
                num_syms: s.vaddr(names.num_syms),
                names: s.vaddr(names.names),
                markers: s.vaddr(names.markers),
                token_table: s.vaddr(tok.table),
                token_index: s.vaddr(tok.index),
                addresses: s.vaddr(at),
                addressing,
                addresses_after_tokens: after,
            },
        });
    }
    None
}

/// Lowest value a kernel address (and a relative base) can have on x86-64.
const KERNEL_HALF: u64 = 0xffff_8000_0000_0000;

fn addresses(
    s: &Sect<'_>,
    at: usize,
    base_at: Option<usize>,
    n: usize,
) -> Option<(Vec<u64>, Addressing)> {
    let Some(base_at) = base_at else {
        let addrs: Vec<u64> = (0..n)
            .map(|i| s.u64_at(at + 8 * i))
            .collect::<Option<_>>()?;
        // Most symbols of a kernel are kernel addresses.
        let high = addrs.iter().filter(|&&a| a >= KERNEL_HALF).count();
        return (high * 2 > n).then_some((addrs, Addressing::Absolute));
    };
    let base = s.u64_at(base_at)?;
    // A kernel-half base, not overlapping the offsets.
    if base < KERNEL_HALF || (at < base_at + 8 && base_at < at + 4 * n) {
        return None;
    }
    let offsets: Vec<i32> = (0..n)
        .map(|i| {
            s.u32_at(at + 4 * i)
                .map(|v| i32::from_le_bytes(v.to_le_bytes()))
        })
        .collect::<Option<_>>()?;
    let absolute_percpu = offsets.iter().any(|&o| o < 0);
    let addrs = offsets
        .iter()
        .map(|&o| {
            if !absolute_percpu {
                base.wrapping_add(u64::from(o.cast_unsigned()))
            } else if o >= 0 {
                u64::from(o.cast_unsigned())
            } else {
                base.wrapping_sub(1)
                    .wrapping_sub(i64::from(o).cast_unsigned())
            }
        })
        .collect();
    Some((
        addrs,
        Addressing::Relative {
            base,
            base_at: s.vaddr(base_at),
            absolute_percpu,
        },
    ))
}

fn symbols(s: &Sect<'_>, names: &Names, tokens: &[Vec<u8>], addrs: &[u64]) -> Option<Vec<Symbol>> {
    let mut out = Vec::with_capacity(addrs.len());
    let mut p = names.names;
    let mut buf = Vec::with_capacity(128);
    for &addr in addrs {
        let (len, lb) = entry_len(s.data, p)?;
        let body = s.data.get(p + lb..p + lb + len)?;
        p += lb + len;
        buf.clear();
        for &t in body {
            buf.extend_from_slice(&tokens[usize::from(t)]);
        }
        let (&kind, name) = buf.split_first()?;
        out.push(Symbol {
            name: String::from_utf8_lossy(name).into_owned(),
            addr: Gva(addr),
            kind: SymbolKind(char::from(kind)),
        });
    }
    Some(out)
}

/// The symbols as System.map text (`nm -n` format: address, type, name), in order.
pub fn system_map_text(symbols: &[Symbol]) -> String {
    let mut out = String::with_capacity(symbols.len() * 40);
    for s in symbols {
        out.push_str(&format!("{:016x} {} {}\n", s.addr.raw(), s.kind.0, s.name));
    }
    out
}

#[cfg(test)]
mod tests;
