//! What a kernel file is, checked before anything boots it: a bzImage (with its
//! version string and expected length) or an ELF vmlinux.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Why a kernel file is unusable.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum KernelFileError {
    /// kernel file {path} cannot be read
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// kernel file {path} is neither a bzImage (no "HdrS" boot header) nor an ELF vmlinux
    UnknownFormat {
        /// The file.
        path: PathBuf,
    },
    /// kernel file {path} is truncated: {actual} bytes, its boot header says at least {expected}
    Truncated {
        /// The file.
        path: PathBuf,
        /// Size on disk.
        actual: u64,
        /// Size the header promises.
        expected: u64,
    },
    /// kernel file {path} is an ELF file but not a 64-bit x86 executable
    BadElf {
        /// The file.
        path: PathBuf,
    },
}

/// The kinds of kernel file we boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelKind {
    /// A bzImage; `version` is its embedded version string (release first).
    BzImage {
        /// E.g. "6.1.0-50-cloud-amd64 (debian-kernel@lists.debian.org) #1 SMP ...".
        version: Option<String>,
        /// Boot protocol version (e.g. 0x20f).
        protocol: u16,
    },
    /// An uncompressed ELF vmlinux.
    Elf,
}

impl KernelKind {
    /// The kernel release (first word of the version string), if known.
    pub fn release(&self) -> Option<&str> {
        match self {
            KernelKind::BzImage {
                version: Some(v), ..
            } => v.split_whitespace().next(),
            _ => None,
        }
    }
}

fn u16_at(b: &[u8], o: usize) -> Option<u16> {
    b.get(o..o + 2).map(|s| u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    b.get(o..o + 4)
        .and_then(|s| <[u8; 4]>::try_from(s).ok())
        .map(u32::from_le_bytes)
}

/// Check a kernel file and say what it is.
pub fn inspect(path: &Path) -> Result<KernelKind, KernelFileError> {
    let read_err = |source| KernelFileError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut f = fs::File::open(path).map_err(read_err)?;
    let size = f.metadata().map_err(read_err)?.len();
    let mut head = Vec::new();
    f.by_ref()
        .take(64 * 1024)
        .read_to_end(&mut head)
        .map_err(read_err)?;
    if head.starts_with(b"\x7fELF") {
        // ELFCLASS64, little-endian, EM_X86_64 (62).
        if head.get(4) == Some(&2) && head.get(5) == Some(&1) && u16_at(&head, 18) == Some(62) {
            return Ok(KernelKind::Elf);
        }
        return Err(KernelFileError::BadElf {
            path: path.to_path_buf(),
        });
    }
    if head.get(0x202..0x206) != Some(b"HdrS") {
        return Err(KernelFileError::UnknownFormat {
            path: path.to_path_buf(),
        });
    }
    let protocol = u16_at(&head, 0x206).unwrap_or(0);
    let setup_sects = match head.get(0x1f1).copied().unwrap_or(0) {
        0 => 4,
        n => u64::from(n),
    };
    let syssize = u64::from(u32_at(&head, 0x1f4).unwrap_or(0));
    let expected = (setup_sects + 1) * 512 + syssize * 16;
    if size < expected {
        return Err(KernelFileError::Truncated {
            path: path.to_path_buf(),
            actual: size,
            expected,
        });
    }
    let version = u16_at(&head, 0x20e).filter(|&o| o != 0).and_then(|o| {
        let start = usize::from(o) + 0x200;
        let bytes = head.get(start..)?;
        let end = bytes.iter().position(|&b| b == 0)?.min(256);
        Some(String::from_utf8_lossy(&bytes[..end]).into_owned())
    });
    Ok(KernelKind::BzImage { version, protocol })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bz(size: usize, syssize: u32) -> Vec<u8> {
        let mut b = vec![0u8; size];
        b[0x1f1] = 3;
        b[0x1f4..0x1f8].copy_from_slice(&syssize.to_le_bytes());
        b[0x202..0x206].copy_from_slice(b"HdrS");
        b[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        b[0x20e..0x210].copy_from_slice(&0x300u16.to_le_bytes());
        let v = b"6.1.0-50-cloud-amd64 (x@y) #1 SMP\0";
        b[0x500..0x500 + v.len()].copy_from_slice(v);
        b
    }

    fn write(b: &[u8]) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().expect("tmp");
        fs::write(f.path(), b).expect("write");
        f
    }

    #[test]
    fn bzimage_header() {
        let f = write(&bz(4 * 512 + 0x100 * 16, 0x100));
        let k = inspect(f.path()).expect("valid");
        assert_eq!(k.release(), Some("6.1.0-50-cloud-amd64"));
        assert!(matches!(
            k,
            KernelKind::BzImage {
                protocol: 0x20f,
                ..
            }
        ));
    }

    #[test]
    fn truncated_bzimage() {
        let f = write(&bz(4096, 0x1000));
        match inspect(f.path()) {
            Err(KernelFileError::Truncated {
                actual, expected, ..
            }) => assert_eq!((actual, expected), (4096, 4 * 512 + 0x10000)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn other_files() {
        let f = write(b"just some text, not a kernel at all");
        let e = inspect(f.path()).expect_err("not a kernel");
        assert!(e.to_string().contains("neither a bzImage"), "{e}");
        let f = write(b"\x7fELF\x01\x01\x01\0\0\0\0\0\0\0\0\0\x02\0\x03\0");
        assert!(matches!(
            inspect(f.path()),
            Err(KernelFileError::BadElf { .. })
        ));
        let e = inspect(Path::new("/nonexistent/vmlinuz")).expect_err("missing");
        assert!(e.to_string().contains("/nonexistent/vmlinuz"), "{e}");
    }
}
