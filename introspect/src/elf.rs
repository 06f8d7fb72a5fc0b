//! Reads chosen sections of a (possibly very large) ELF file without loading the whole file.
//!
//! A `vmlinux` with DWARF is about 600 MB; what we need of it (`.BTF`, `.symtab`,
//! `.strtab`, a few bytes of `.rodata`) is a few MB. This module reads the ELF header
//! and the section header table, then only the bytes asked for.

use goblin::container::{Container, Ctx};
use goblin::elf::header::header64::Header;
use goblin::elf::header::{EI_CLASS, EI_DATA, ELFCLASS64, ELFDATA2LSB};
use goblin::elf::section_header::SHT_NOBITS;
use goblin::elf::SectionHeader;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Largest section this reader will load into memory (256 MiB).
pub const MAX_SECTION_BYTES: u64 = 256 << 20;

/// Why an ELF file could not be read.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum ElfError {
    /// cannot read {path}
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// {path} is not a valid ELF file
    Parse {
        /// The file.
        path: PathBuf,
        /// What goblin said.
        #[source]
        source: goblin::error::Error,
    },
    /// {path}: section {name} is missing
    NoSection {
        /// The file.
        path: PathBuf,
        /// The section asked for.
        name: &'static str,
    },
    /// {path}: section {name} is {size} bytes, larger than this reader accepts
    SectionTooLarge {
        /// The file.
        path: PathBuf,
        /// The section.
        name: String,
        /// Its size in bytes.
        size: u64,
    },
    /// {path}: no section holds virtual address {addr:#x}
    NoSectionAt {
        /// The file.
        path: PathBuf,
        /// The virtual address looked for.
        addr: u64,
    },
}

/// One section: its name and header.
#[derive(Debug, Clone)]
pub struct Section {
    /// Name from `.shstrtab`.
    pub name: String,
    /// The raw section header.
    pub header: SectionHeader,
}

/// An open ELF file whose section headers have been read.
#[derive(Debug)]
pub struct ElfSections {
    path: PathBuf,
    file: File,
    ctx: Ctx,
    sections: Vec<Section>,
}

impl ElfSections {
    /// Open `path` and read its ELF header and section header table.
    pub fn open(path: &Path) -> Result<Self, ElfError> {
        let io = |source| ElfError::Io {
            path: path.to_path_buf(),
            source,
        };
        let parse = |source| ElfError::Parse {
            path: path.to_path_buf(),
            source,
        };
        let mut file = File::open(path).map_err(io)?;
        let mut ehdr = [0u8; 64];
        file.read_exact(&mut ehdr).map_err(io)?;
        // Only 64-bit ELF is supported (x86-64 kernels).
        if ehdr[..4] != *b"\x7fELF" || ehdr[EI_CLASS] != ELFCLASS64 {
            return Err(parse(goblin::error::Error::Malformed(
                "not a 64-bit ELF file".into(),
            )));
        }
        let endian = match ehdr[EI_DATA] {
            ELFDATA2LSB => scroll::Endian::Little,
            _ => scroll::Endian::Big,
        };
        let header = Header::parse(&ehdr).map_err(parse)?;
        let ctx = Ctx::new(Container::Big, endian);
        let entsize = u64::from(header.e_shentsize);
        if entsize < 64 {
            return Err(parse(goblin::error::Error::Malformed(
                "section header entry size too small".into(),
            )));
        }
        // Section 0 may carry the real count when e_shnum is 0.
        let mut count = u64::from(header.e_shnum);
        if count == 0 && header.e_shoff != 0 {
            let first = read_at(&mut file, header.e_shoff, entsize).map_err(io)?;
            let sh0 = SectionHeader::parse_from(&first, 0, 1, ctx).map_err(parse)?;
            count = sh0.first().map_or(0, |s| s.sh_size);
        }
        let table_len = count.saturating_mul(entsize);
        if table_len > MAX_SECTION_BYTES {
            return Err(ElfError::SectionTooLarge {
                path: path.to_path_buf(),
                name: "<section header table>".into(),
                size: table_len,
            });
        }
        let table = read_at(&mut file, header.e_shoff, table_len).map_err(io)?;
        let count = usize::try_from(count).unwrap_or(usize::MAX);
        let headers = if count == 0 {
            Vec::new()
        } else {
            SectionHeader::parse_from(&table, 0, count, ctx).map_err(parse)?
        };
        let mut this = Self {
            path: path.to_path_buf(),
            file,
            ctx,
            sections: Vec::new(),
        };
        let shstrndx = usize::from(header.e_shstrndx);
        let names = match headers.get(shstrndx) {
            Some(sh) if sh.sh_type != SHT_NOBITS => this.read_header_bytes(".shstrtab", sh)?,
            _ => Vec::new(),
        };
        this.sections = headers
            .into_iter()
            .map(|header| {
                let name = names
                    .get(header.sh_name..)
                    .map(|s| {
                        let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
                        String::from_utf8_lossy(&s[..end]).into_owned()
                    })
                    .unwrap_or_default();
                Section { name, header }
            })
            .collect();
        Ok(this)
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// goblin's parsing context (word size, endianness) of this file.
    pub fn ctx(&self) -> Ctx {
        self.ctx
    }

    /// All sections, in file order.
    pub fn sections(&self) -> &[Section] {
        &self.sections
    }

    /// The first section named `name`.
    pub fn section(&self, name: &str) -> Option<&Section> {
        self.sections.iter().find(|s| s.name == name)
    }

    /// The bytes of the section named `name`.
    pub fn read_section(&mut self, name: &'static str) -> Result<Vec<u8>, ElfError> {
        let sh = self
            .section(name)
            .map(|s| s.header.clone())
            .ok_or_else(|| ElfError::NoSection {
                path: self.path.clone(),
                name,
            })?;
        self.read_header_bytes(name, &sh)
    }

    fn read_header_bytes(&mut self, name: &str, sh: &SectionHeader) -> Result<Vec<u8>, ElfError> {
        if sh.sh_type == SHT_NOBITS {
            return Ok(Vec::new());
        }
        if sh.sh_size > MAX_SECTION_BYTES {
            return Err(ElfError::SectionTooLarge {
                path: self.path.clone(),
                name: name.to_owned(),
                size: sh.sh_size,
            });
        }
        read_at(&mut self.file, sh.sh_offset, sh.sh_size).map_err(|source| ElfError::Io {
            path: self.path.clone(),
            source,
        })
    }

    /// Up to `len` bytes of the file image at virtual address `addr` (clipped at the
    /// end of the section holding it).
    pub fn read_vaddr(&mut self, addr: u64, len: u64) -> Result<Vec<u8>, ElfError> {
        let sh = self
            .sections
            .iter()
            .map(|s| &s.header)
            .find(|h| {
                h.sh_type != SHT_NOBITS
                    && h.sh_addr != 0
                    && addr >= h.sh_addr
                    && addr - h.sh_addr < h.sh_size
            })
            .cloned()
            .ok_or_else(|| ElfError::NoSectionAt {
                path: self.path.clone(),
                addr,
            })?;
        let within = addr - sh.sh_addr;
        let len = len.min(sh.sh_size - within);
        let off = sh.sh_offset.saturating_add(within);
        read_at(&mut self.file, off, len).map_err(|source| ElfError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

/// The bytes of section `name` of the in-memory ELF `elf` (`None` when it has none);
/// `path` names the file in errors.
pub fn section_in<'a>(
    elf: &'a [u8],
    name: &str,
    path: &Path,
) -> Result<Option<&'a [u8]>, ElfError> {
    let parsed = parse_in(elf, path)?;
    let sh = parsed
        .section_headers
        .iter()
        .find(|h| parsed.shdr_strtab.get_at(h.sh_name) == Some(name));
    let Some(sh) = sh else { return Ok(None) };
    if sh.sh_type == SHT_NOBITS {
        return Ok(Some(&[]));
    }
    Ok(Some(bytes_in(elf, sh.sh_offset, sh.sh_size, path)?))
}

/// Up to `len` bytes at virtual address `addr` of the in-memory ELF `elf` (clipped at
/// the end of the section holding it; `None` when no section holds it).
pub fn vaddr_in<'a>(
    elf: &'a [u8],
    addr: u64,
    len: u64,
    path: &Path,
) -> Result<Option<&'a [u8]>, ElfError> {
    let parsed = parse_in(elf, path)?;
    let sh = parsed.section_headers.iter().find(|h| {
        h.sh_type != SHT_NOBITS
            && h.sh_addr != 0
            && addr >= h.sh_addr
            && addr - h.sh_addr < h.sh_size
    });
    let Some(sh) = sh else { return Ok(None) };
    let within = addr - sh.sh_addr;
    let len = len.min(sh.sh_size - within);
    Ok(Some(bytes_in(
        elf,
        sh.sh_offset.saturating_add(within),
        len,
        path,
    )?))
}

fn parse_in<'a>(elf: &'a [u8], path: &Path) -> Result<goblin::elf::Elf<'a>, ElfError> {
    goblin::elf::Elf::parse(elf).map_err(|source| ElfError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

fn bytes_in<'a>(elf: &'a [u8], offset: u64, len: u64, path: &Path) -> Result<&'a [u8], ElfError> {
    let range = usize::try_from(offset)
        .ok()
        .zip(usize::try_from(len).ok())
        .and_then(|(o, l)| elf.get(o..o.checked_add(l)?));
    range.ok_or_else(|| ElfError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "a section lies past the end of the file",
        ),
    })
}

fn read_at(file: &mut File, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
    let len = usize::try_from(len).map_err(|_| std::io::Error::other("length too large"))?;
    file.seek(SeekFrom::Start(offset))?;
    let mut buf = vec![0u8; len];
    file.read_exact(&mut buf)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_non_elf() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("x");
        std::fs::write(&p, [0u8; 100]).expect("write");
        assert!(matches!(ElfSections::open(&p), Err(ElfError::Parse { .. })));
        std::fs::write(&p, b"\x7fELF").expect("write");
        assert!(matches!(ElfSections::open(&p), Err(ElfError::Io { .. })));
    }

    #[test]
    fn reads_own_test_binary() {
        // The running test executable is an ELF with a symbol table.
        let exe = std::env::current_exe().expect("current exe");
        let mut elf = ElfSections::open(&exe).expect("own binary parses");
        assert!(elf.section(".text").is_some());
        let strtab = elf.read_section(".shstrtab").expect("shstrtab");
        assert!(strtab.windows(5).any(|w| w == b".text"));
        assert!(matches!(
            elf.read_section(".no-such-section"),
            Err(ElfError::NoSection { .. })
        ));
    }
}
