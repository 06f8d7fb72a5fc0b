//! Guest RAM shared with QEMU: the mapped RAM file (whose descriptor stays open so it can be
//! handed to the TCG plugin), and the guest-physical to file-offset map parsed from QEMU's own
//! `info mtree -f`.

use ornament_engine::{Gpa, MemError, PhysMemory};
use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

/// Why the RAM file could not be used.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum RamError {
    /// cannot open guest RAM file {path}
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// cannot map guest RAM file {path}
    Map {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// QEMU's memory tree has no RAM region named {region}
    NoRegion {
        /// The memory-backend id looked for.
        region: String,
    },
    /// a RAM range of QEMU's memory tree lies outside the RAM file ({size} bytes)
    RangeOutsideFile {
        /// The file size.
        size: u64,
    },
}

/// One contiguous guest-physical range backed by the RAM file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRange {
    /// First guest-physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
    /// Offset of `gpa` in the RAM file.
    pub file_offset: u64,
}

/// Guest-physical address -> RAM-file offset, sorted by address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamMap {
    ranges: Vec<RamRange>,
}

impl RamMap {
    /// Parse `info mtree -f` text: the flat view of address space "memory", the
    /// lines whose region is `region` (our memory-backend id).
    pub fn from_mtree(text: &str, region: &str) -> Result<Self, RamError> {
        let mut ranges = Vec::new();
        let mut in_memory_view = false;
        for line in text.lines() {
            if line.starts_with("FlatView") {
                if in_memory_view && !ranges.is_empty() {
                    break;
                }
                in_memory_view = false;
                continue;
            }
            if line.trim_start().starts_with("AS \"memory\"") {
                in_memory_view = true;
                continue;
            }
            if !in_memory_view {
                continue;
            }
            if let Some(r) = parse_line(line, region) {
                ranges.push(r);
            }
        }
        if ranges.is_empty() {
            return Err(RamError::NoRegion {
                region: region.to_owned(),
            });
        }
        ranges.sort_by_key(|r| r.gpa);
        Ok(Self { ranges })
    }

    /// The ranges, by address.
    pub fn ranges(&self) -> &[RamRange] {
        &self.ranges
    }

    /// File offset of `[gpa, gpa+len)`, if the whole access lies in one range.
    pub fn translate(&self, gpa: u64, len: u64) -> Option<u64> {
        let i = self
            .ranges
            .partition_point(|r| r.gpa <= gpa)
            .checked_sub(1)?;
        let r = self.ranges[i];
        let off = gpa - r.gpa;
        let end = off.checked_add(len)?;
        (end <= r.len).then(|| r.file_offset + off)
    }

    /// Highest mapped guest-physical address + 1.
    pub fn end(&self) -> u64 {
        self.ranges.last().map(|r| r.gpa + r.len).unwrap_or(0)
    }
}

/// `  0000000000100000-00000000bfffffff (prio 0, ram): NAME @0000000000100000`
fn parse_line(line: &str, region: &str) -> Option<RamRange> {
    let line = line.trim();
    let (span, rest) = line.split_once(' ')?;
    let (start, end) = span.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    let (kind, tail) = rest.split_once("): ")?;
    if !kind.ends_with(", ram") {
        return None;
    }
    let mut words = tail.split_whitespace();
    if words.next()? != region {
        return None;
    }
    let file_offset = match words.next() {
        Some(w) if w.starts_with('@') => u64::from_str_radix(&w[1..], 16).ok()?,
        _ => 0,
    };
    let len = end.checked_sub(start)?.checked_add(1)?;
    Some(RamRange {
        gpa: start,
        len,
        file_offset,
    })
}

/// The RAM file mapped into our address space.
#[derive(Debug)]
pub struct RamFile {
    path: PathBuf,
    /// Kept open: the file is unlinked once mapped, and the plugin gets this descriptor.
    file: File,
    base: *mut u8,
    size: usize,
    map: RamMap,
}

// SAFETY: the mapping is plain shared memory; accesses go through volatile-free
// byte copies of bounded ranges, and the pointer is never exposed.
unsafe impl Send for RamFile {}
// SAFETY: as above; concurrent reads of shared memory are fine (the guest may
// change the bytes under us, which is why callers treat guest data as hostile).
unsafe impl Sync for RamFile {}

impl RamFile {
    /// Map `path` (read-write, shared) with the address map `map`.
    pub fn map(path: &Path, map: RamMap) -> Result<Self, RamError> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| RamError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        Self::from_file(f, path, map)
    }

    /// Map an open RAM file (read-write, shared) with the address map `map`; `path`
    /// names it in errors (a memfd has no path).
    pub fn from_file(f: File, path: &Path, map: RamMap) -> Result<Self, RamError> {
        let len = f
            .metadata()
            .map_err(|source| RamError::Open {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        let size = usize::try_from(len).map_err(|_| RamError::RangeOutsideFile { size: len })?;
        for r in map.ranges() {
            if r.file_offset.checked_add(r.len).is_none_or(|e| e > len) {
                return Err(RamError::RangeOutsideFile { size: len });
            }
        }
        // SAFETY: a fresh shared mapping of a regular file we just opened, with the
        // file's own length; the result is checked against MAP_FAILED below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(RamError::Map {
                path: path.to_path_buf(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            file: f,
            base: base.cast(),
            size,
            map,
        })
    }

    /// The file this maps.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The address map.
    pub fn ram_map(&self) -> &RamMap {
        &self.map
    }

    /// The RAM file's descriptor (open read-write; still valid after the file is unlinked).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// The address map as the plugin's wire regions; `None` when it has more ranges than a
    /// RAM record carries.
    pub fn wire_regions(&self) -> Option<Vec<ornament_engine::wire::RamRegion>> {
        let r = self.map.ranges();
        (r.len() <= ornament_engine::wire::MAX_RAM_REGIONS).then(|| {
            r.iter()
                .map(|r| ornament_engine::wire::RamRegion {
                    gpa: r.gpa,
                    len: r.len,
                    file_offset: r.file_offset,
                })
                .collect()
        })
    }

    fn offset(&self, gpa: Gpa, len: usize) -> Result<usize, MemError> {
        let err = MemError::OutOfRange {
            gpa,
            len: len as u64,
        };
        let off = self
            .map
            .translate(gpa.raw(), len as u64)
            .ok_or(err.clone())?;
        let off = usize::try_from(off).map_err(|_| err.clone())?;
        // RamFile::map checked every range against the file size.
        if off.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(err);
        }
        Ok(off)
    }
}

impl PhysMemory for RamFile {
    fn read_phys(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), MemError> {
        let off = self.offset(gpa, buf.len())?;
        // SAFETY: `offset` checked that [off, off+len) lies inside the mapping,
        // which lives as long as self; `buf` is a distinct host buffer.
        unsafe { std::ptr::copy_nonoverlapping(self.base.add(off), buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    fn write_phys(&self, gpa: Gpa, buf: &[u8]) -> Result<(), MemError> {
        let off = self.offset(gpa, buf.len())?;
        // SAFETY: as in read_phys; the mapping is writable and shared with QEMU.
        unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), self.base.add(off), buf.len()) };
        Ok(())
    }

    fn size(&self) -> u64 {
        self.map.end()
    }
}

impl crate::plugin_link::GuestRam for RamFile {
    fn fetch_or_u64(&self, gpa: Gpa, bits: u64) -> Result<u64, MemError> {
        Ok(self
            .atomic_u64(gpa)?
            .fetch_or(bits, std::sync::atomic::Ordering::SeqCst))
    }

    fn fetch_and_u64(&self, gpa: Gpa, mask: u64) -> Result<u64, MemError> {
        Ok(self
            .atomic_u64(gpa)?
            .fetch_and(mask, std::sync::atomic::Ordering::SeqCst))
    }
}

impl RamFile {
    /// The aligned guest `u64` at `gpa` as a host atomic (coherent with the guest's
    /// locked instructions on the same shared page).
    fn atomic_u64(&self, gpa: Gpa) -> Result<&std::sync::atomic::AtomicU64, MemError> {
        let err = MemError::OutOfRange { gpa, len: 8 };
        if !gpa.raw().is_multiple_of(8) {
            return Err(err);
        }
        let off = self.offset(gpa, 8)?;
        // SAFETY: `offset` checked [off, off+8) is inside the live mapping; the mapping
        // base is page-aligned and `off` has the guest address's alignment (8, checked
        // above, and ranges start page-aligned), so the pointer is aligned for AtomicU64;
        // the memory is shared and only ever accessed atomically or by plain copies of
        // guest data, which is what the guest itself does.
        Ok(unsafe { std::sync::atomic::AtomicU64::from_ptr(self.base.add(off).cast()) })
    }
}

impl Drop for RamFile {
    fn drop(&mut self) {
        // SAFETY: base/size are exactly what mmap returned and nothing uses the
        // mapping after drop.
        unsafe {
            libc::munmap(self.base.cast(), self.size);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PC_4G: &str = include_str!("../tests/data/mtree-pc-4g.txt");

    #[test]
    fn parses_captured_pc_tree() {
        let m = RamMap::from_mtree(PC_4G, "ornament-ram").expect("has RAM");
        assert_eq!(
            m.ranges(),
            &[
                RamRange {
                    gpa: 0,
                    len: 0xc0000,
                    file_offset: 0
                },
                RamRange {
                    gpa: 0x10_0000,
                    len: 0xbff0_0000,
                    file_offset: 0x10_0000
                },
                RamRange {
                    gpa: 0x1_0000_0000,
                    len: 0x4000_0000,
                    file_offset: 0xc000_0000
                },
            ]
        );
        assert_eq!(m.translate(0x1000, 8), Some(0x1000));
        assert_eq!(m.translate(0xc0000, 1), None, "ROM hole");
        assert_eq!(
            m.translate(0xbfff_fffc, 8),
            None,
            "crosses the end of low RAM"
        );
        assert_eq!(m.translate(0x1_0000_0010, 8), Some(0xc000_0010));
        assert_eq!(m.end(), 0x1_4000_0000);
        assert!(RamFile::map(Path::new("/nonexistent"), m).is_err());
    }

    #[test]
    fn no_region_is_an_error() {
        assert!(matches!(
            RamMap::from_mtree(PC_4G, "other"),
            Err(RamError::NoRegion { .. })
        ));
    }

    #[test]
    fn file_reads_and_writes() {
        let f = tempfile::NamedTempFile::new().expect("tmp");
        f.as_file().set_len(0x3000).expect("len");
        let map = RamMap {
            ranges: vec![
                RamRange {
                    gpa: 0,
                    len: 0x1000,
                    file_offset: 0,
                },
                RamRange {
                    gpa: 0x10000,
                    len: 0x2000,
                    file_offset: 0x1000,
                },
            ],
        };
        let ram = RamFile::map(f.path(), map).expect("map");
        ram.write_phys(Gpa(0x10ff8), &7u64.to_le_bytes())
            .expect("in range");
        let mut b = [0u8; 8];
        ram.read_phys(Gpa(0x10ff8), &mut b).expect("in range");
        assert_eq!(u64::from_le_bytes(b), 7);
        use crate::plugin_link::GuestRam;
        assert_eq!(ram.fetch_or_u64(Gpa(0x10ff8), 8).expect("aligned"), 7);
        assert_eq!(ram.fetch_and_u64(Gpa(0x10ff8), !1).expect("aligned"), 15);
        assert!(ram.fetch_or_u64(Gpa(0x10ff9), 1).is_err(), "unaligned");
        let on_disk = std::fs::read(f.path()).expect("read");
        assert_eq!(on_disk[0x1ff8], 14);
        assert!(ram.read_phys(Gpa(0x2000), &mut b).is_err());
        assert!(ram.read_phys(Gpa(0x11ffc), &mut b).is_err());
        let bad = RamMap {
            ranges: vec![RamRange {
                gpa: 0,
                len: 0x4000,
                file_offset: 0,
            }],
        };
        assert!(matches!(
            RamFile::map(f.path(), bad),
            Err(RamError::RangeOutsideFile { .. })
        ));
    }
}
