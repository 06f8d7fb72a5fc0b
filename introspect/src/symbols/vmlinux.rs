//! The ELF symbol table (`.symtab` + `.strtab`) of a vmlinux, read through goblin.

use super::{Symbol, SymbolKind, SymbolTable, SymbolsError};
use crate::elf::ElfSections;
use goblin::elf::section_header::SHN_ABS;
use goblin::elf::sym::{Sym, STB_GLOBAL, STB_LOCAL, STB_WEAK, STT_FILE, STT_FUNC, STT_SECTION};
use ornament_engine::Gva;
use std::path::Path;

impl SymbolTable {
    /// Read the ELF symbol table of the vmlinux at `path` (only its section headers,
    /// `.symtab` and `.strtab` are read).
    pub fn from_vmlinux(path: &Path) -> Result<Self, SymbolsError> {
        let mut elf = ElfSections::open(path).map_err(|source| SymbolsError::Elf {
            path: path.to_path_buf(),
            source,
        })?;
        symbols_from_vmlinux(&mut elf)
    }
}

/// Read the symbols of an already opened ELF file.
pub fn symbols_from_vmlinux(elf: &mut ElfSections) -> Result<SymbolTable, SymbolsError> {
    let path = elf.path().to_path_buf();
    let elf_err = |source| SymbolsError::Elf {
        path: path.clone(),
        source,
    };
    let symtab = elf.read_section(".symtab").map_err(elf_err)?;
    let strtab = elf.read_section(".strtab").map_err(elf_err)?;
    let ctx = elf.ctx();
    let entsize = if ctx.is_big() { 24 } else { 16 };
    let count = symtab.len() / entsize;
    let syms = Sym::parse(&symtab, 0, count, ctx).map_err(|source| SymbolsError::ElfSyms {
        path: path.clone(),
        source,
    })?;
    let sections = elf.sections();
    let mut out = Vec::with_capacity(syms.len());
    for s in syms {
        if s.st_name == 0 || matches!(s.st_type(), STT_FILE | STT_SECTION) {
            continue;
        }
        let Some(name) = strtab
            .get(s.st_name..)
            .map(|b| &b[..b.iter().position(|&c| c == 0).unwrap_or(b.len())])
        else {
            continue;
        };
        let section = sections.get(s.st_shndx).map(|sec| sec.header.clone());
        let letter = nm_letter(&s, section.as_ref());
        out.push(Symbol {
            name: String::from_utf8_lossy(name).into_owned(),
            addr: Gva(s.st_value),
            kind: SymbolKind(letter),
        });
    }
    if out.is_empty() {
        return Err(SymbolsError::Empty { path });
    }
    // nm order (by address) so that duplicate resolution matches System.map.
    out.sort_by_key(|s| s.addr);
    Ok(SymbolTable::new(out))
}

/// The `nm` letter for an ELF symbol, as far as vmlinux needs it.
fn nm_letter(s: &Sym, section: Option<&goblin::elf::SectionHeader>) -> char {
    use goblin::elf::section_header::{SHF_ALLOC, SHF_EXECINSTR, SHF_WRITE, SHT_NOBITS};
    let upper = match s.st_bind() {
        STB_LOCAL => false,
        STB_GLOBAL => true,
        STB_WEAK => return if s.st_type() == STT_FUNC { 'W' } else { 'V' },
        _ => true,
    };
    let base = if s.st_shndx == usize::from(u16::try_from(SHN_ABS).unwrap_or(u16::MAX)) {
        'a'
    } else {
        match section {
            Some(h) if h.sh_flags & u64::from(SHF_EXECINSTR) != 0 => 't',
            Some(h) if h.sh_type == SHT_NOBITS => 'b',
            Some(h) if h.sh_flags & u64::from(SHF_WRITE) != 0 => 'd',
            Some(h) if h.sh_flags & u64::from(SHF_ALLOC) != 0 => 'r',
            _ => '?',
        }
    };
    if upper {
        base.to_ascii_uppercase()
    } else {
        base
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_system_map_from_kallsyms() {
        // Debian's 6.1 cloud kernel from the image cache (built when missing). Its
        // vmlinux is the bzImage's payload (no symbol table); its System.map was
        // written from the kernel's kallsyms.
        let img = ornament_test_gate::require!(
            "the default guest image",
            ornament_images::build_image(
                ornament_images::DEFAULT_IMAGE,
                // The reference kernel (6.1.0-50-cloud): the addresses below are its.
                &ornament_images::BuildOptions::reference(ornament_images::DEFAULT_IMAGE),
            )
        );
        let vmlinux = img.path(ornament_images::image::files::VMLINUX);
        let e = SymbolTable::from_vmlinux(&vmlinux).expect_err("the payload has no .symtab");
        assert!(
            e.to_string().contains(&vmlinux.display().to_string()),
            "{e}"
        );
        let sm = SymbolTable::from_system_map(&img.system_map()).expect("System.map");
        assert_eq!(sm.percpu_offset("current_task"), Some(0x1fb80));
        assert_eq!(
            sm.lookup("proc_fork_connector"),
            Some(Gva(0xffff_ffff_816e_dd10))
        );
        let get = sm.lookup("do_exit").expect("do_exit");
        assert_eq!(sm.symbolize(get.wrapping_add(3)), Some(("do_exit", 3)));
    }
}
