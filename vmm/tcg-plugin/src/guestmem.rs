//! Guest memory for the probe callbacks: QEMU's guest RAM file mapped read-only into the
//! plugin, and page walks over it (the seam crate's `paging::walk`, entries read from the mapping).
//!
//! ```text
//! RamRecord + fd (host)  ->  RamMapping::map (mmap, MAP_SHARED, PROT_READ, checked regions)
//! probe hit: cr3 (+ CR4.LA57)  ->  read_virt: translate (4/5-level, 2M/1G pages) -> RAM bytes
//! ```
//!
//! This replaces `qemu_plugin_read_memory_vaddr` (a debug page walk through QEMU's
//! address-space API, about 400 ns per read) with a few loads from shared memory. There is no
//! translation cache across hits: the guest's page tables change under us (kernel stacks are
//! vmalloc'd and reused), so every hit walks from `cr3`. Within one hit (the vCPU is stopped in
//! its callback) a [`Walker`] keeps the last translation, so reads of one task in the direct
//! map's large pages walk once. Everything read from the guest is hostile: every
//! table entry and data address is checked against the RAM regions before it is dereferenced,
//! and anything that does not fit is a failed read (`None`), never a host fault.

use ornament_engine::paging;
pub use ornament_engine::paging::CR4_LA57;
use ornament_engine::wire::{RamPaging, RamRecord, RamRegion, PAGE_SIZE};
use std::fs::File;
use std::marker::PhantomData;
use std::os::fd::AsRawFd;

/// A read-only view of guest RAM: host bytes plus the guest-physical regions they back.
#[derive(Debug, Clone, Copy)]
pub struct Ram<'a> {
    base: *const u8,
    size: usize,
    regions: &'a [RamRegion],
    _bytes: PhantomData<&'a [u8]>,
}

impl<'a> Ram<'a> {
    /// A view of `bytes` (the RAM file's contents) with `regions` mapping guest-physical
    /// addresses to offsets in it.
    pub fn from_slice(bytes: &'a [u8], regions: &'a [RamRegion]) -> Self {
        Self {
            base: bytes.as_ptr(),
            size: bytes.len(),
            regions,
            _bytes: PhantomData,
        }
    }

    /// A view of `size` bytes at `base`.
    ///
    /// # Safety
    /// `base..base + size` must stay mapped and readable for `'a` (another party, the guest,
    /// may write it concurrently: reads are volatile).
    pub unsafe fn from_raw(base: *const u8, size: usize, regions: &'a [RamRegion]) -> Self {
        Self {
            base,
            size,
            regions,
            _bytes: PhantomData,
        }
    }

    /// Host offset of `[gpa, gpa + len)`, when the whole range lies in one region and in the
    /// mapped bytes.
    fn offset(&self, gpa: u64, len: u64) -> Option<usize> {
        let r = self
            .regions
            .iter()
            .find(|r| gpa >= r.gpa && gpa - r.gpa < r.len)?;
        let off = gpa - r.gpa;
        if off.checked_add(len)? > r.len {
            return None;
        }
        let host = usize::try_from(r.file_offset.checked_add(off)?).ok()?;
        let end = host.checked_add(usize::try_from(len).ok()?)?;
        (end <= self.size).then_some(host)
    }

    /// The little-endian `u64` at 8-aligned `gpa` (a page-table entry).
    fn read_u64(&self, gpa: u64) -> Option<u64> {
        let host = self.offset(gpa, 8)?;
        let mut b = [0u8; 8];
        self.copy(host, &mut b);
        Some(u64::from_le_bytes(b))
    }

    /// `out.len()` bytes at `gpa`.
    fn read_into(&self, gpa: u64, out: &mut [u8]) -> Option<()> {
        let host = self.offset(gpa, u64::try_from(out.len()).ok()?)?;
        self.copy(host, out);
        Some(())
    }

    /// Copy bytes from checked host offset `host` (`offset` verified the range).
    fn copy(&self, host: usize, out: &mut [u8]) {
        for (i, o) in out.iter_mut().enumerate() {
            // SAFETY: `offset` checked `host + out.len() <= size`, and `from_slice`/`from_raw`
            // guarantee `base..base + size` is readable for the view's lifetime. Volatile:
            // the guest may write the byte at the same time.
            *o = unsafe { std::ptr::read_volatile(self.base.add(host + i)) };
        }
    }
}

/// Translate `va` through the page tables rooted at `cr3` (4-level, or 5-level with `la57`);
/// `None` when a level is not present, an entry lies outside RAM, or `va` is not canonical.
pub fn translate(ram: &Ram<'_>, cr3: u64, la57: bool, va: u64) -> Option<u64> {
    translate_page(ram, cr3, la57, va).map(|(gpa, _)| gpa)
}

/// [`translate`], with the size of the page that maps `va` (4 KiB, 2 MiB or 1 GiB): the
/// seam crate's walk, each entry read from the mapped RAM (bounds-checked, volatile).
fn translate_page(ram: &Ram<'_>, cr3: u64, la57: bool, va: u64) -> Option<(u64, u64)> {
    paging::walk(|gpa| ram.read_u64(gpa), cr3, la57, va)
}

/// The page walks of one hit: `cr3`, the paging mode, and the last translation (valid only
/// while the vCPU is stopped in this callback; never kept across hits).
#[derive(Debug)]
pub struct Walker<'a> {
    ram: Ram<'a>,
    cr3: u64,
    la57: bool,
    /// (virtual page base, page size, physical page base) of the last translation.
    last: Option<(u64, u64, u64)>,
}

impl<'a> Walker<'a> {
    /// Walks over `ram` from `cr3`.
    pub fn new(ram: Ram<'a>, cr3: u64, la57: bool) -> Self {
        Self {
            ram,
            cr3,
            la57,
            last: None,
        }
    }

    fn translate(&mut self, va: u64) -> Option<u64> {
        if let Some((vbase, size, pbase)) = self.last {
            if va & !(size - 1) == vbase {
                return Some(pbase | (va & (size - 1)));
            }
        }
        let (gpa, size) = translate_page(&self.ram, self.cr3, self.la57, va)?;
        self.last = Some((va & !(size - 1), size, gpa & !(size - 1)));
        Some(gpa)
    }

    /// [`read_virt`] through this hit's walks.
    pub fn read(&mut self, va: u64, len: usize) -> Option<u64> {
        let len = len.clamp(1, 8);
        let mut b = [0u8; 8];
        (self.read_bytes(va, &mut b[..len]) == len).then(|| u64::from_le_bytes(b))
    }

    /// Fill `buf` from guest-virtual `va`, page by page; returns how many bytes were read
    /// before the first page that does not translate (all of `buf` when none).
    pub fn read_bytes(&mut self, va: u64, buf: &mut [u8]) -> usize {
        let mut got = 0usize;
        while got < buf.len() {
            let Ok(off) = u64::try_from(got) else { break };
            let at = va.wrapping_add(off);
            let in_page = usize::try_from(PAGE_SIZE - (at & (PAGE_SIZE - 1))).unwrap_or(1);
            let n = in_page.min(buf.len() - got);
            let ok = self
                .translate(at)
                .and_then(|gpa| self.ram.read_into(gpa, &mut buf[got..got + n]));
            if ok.is_none() {
                break;
            }
            got += n;
        }
        got
    }
}

/// Read `len` bytes (1..=8) at guest-virtual `va` as a little-endian value (zero-extended);
/// a read crossing a 4 KiB page is split, each part translated on its own.
pub fn read_virt(ram: &Ram<'_>, cr3: u64, la57: bool, va: u64, len: usize) -> Option<u64> {
    Walker::new(*ram, cr3, la57).read(va, len)
}

/// Why the RAM file could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error, displaydoc::Display)]
pub enum RamMapError {
    /// the RAM record came without a file descriptor
    NoFd,
    /// cannot stat the RAM file (errno {0})
    Stat(i32),
    /// a RAM region lies outside the RAM file
    OutsideFile,
    /// cannot map the RAM file (errno {0})
    Map(i32),
}

impl RamMapError {
    /// The errno for the error record's detail (0 when there is none).
    pub fn errno(self) -> i32 {
        match self {
            RamMapError::Stat(e) | RamMapError::Map(e) => e,
            RamMapError::NoFd | RamMapError::OutsideFile => 0,
        }
    }
}

/// Guest RAM mapped from the host's descriptor; lives as long as the plugin (never unmapped:
/// vCPU callbacks may hold views of it at any time).
#[derive(Debug)]
pub struct RamMapping {
    base: *const u8,
    size: usize,
    regions: Vec<RamRegion>,
    /// How to find the paging mode.
    pub paging: RamPaging,
}

// SAFETY: the mapping is read-only shared memory that is never unmapped; it is only read
// (volatile) through bounds-checked views.
unsafe impl Send for RamMapping {}
// SAFETY: as above; concurrent reads are fine.
unsafe impl Sync for RamMapping {}

impl RamMapping {
    /// Map `fd` (the RAM file) read-only and check `rec`'s regions against its size. The
    /// descriptor is closed when this returns (the mapping keeps the file).
    pub fn map(rec: &RamRecord, fd: Option<File>) -> Result<Self, RamMapError> {
        let f = fd.ok_or(RamMapError::NoFd)?;
        let len = f
            .metadata()
            .map_err(|e| RamMapError::Stat(e.raw_os_error().unwrap_or(0)))?
            .len();
        let size = usize::try_from(len).map_err(|_| RamMapError::OutsideFile)?;
        if size == 0 {
            return Err(RamMapError::OutsideFile);
        }
        for r in &rec.regions {
            if r.file_offset.checked_add(r.len).is_none_or(|e| e > len) {
                return Err(RamMapError::OutsideFile);
            }
        }
        // SAFETY: a fresh read-only shared mapping of the whole file, whose length we just
        // read; the result is checked against MAP_FAILED. PROT_READ: the plugin never writes
        // guest memory.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(RamMapError::Map(
                std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
            ));
        }
        Ok(Self {
            base: base.cast_const().cast(),
            size,
            regions: rec.regions.clone(),
            paging: rec.paging,
        })
    }

    /// A view for reads.
    pub fn ram(&self) -> Ram<'_> {
        // SAFETY: `base..base + size` is our read-only mapping, never unmapped.
        unsafe { Ram::from_raw(self.base, self.size, &self.regions) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ornament_engine::paging::{PTE_PRESENT, PTE_PS};

    /// A synthetic guest: `pages` 4 KiB pages of RAM, file offset == gpa, with helpers to
    /// write tables.
    struct Guest {
        bytes: Vec<u8>,
        regions: Vec<RamRegion>,
    }

    impl Guest {
        fn new(pages: u64) -> Self {
            Self {
                bytes: vec![0; usize::try_from(pages * PAGE_SIZE).expect("size")],
                regions: vec![RamRegion {
                    gpa: 0,
                    len: pages * PAGE_SIZE,
                    file_offset: 0,
                }],
            }
        }
        fn w64(&mut self, gpa: u64, v: u64) {
            let i = usize::try_from(gpa).expect("gpa");
            self.bytes[i..i + 8].copy_from_slice(&v.to_le_bytes());
        }
        fn ram(&self) -> Ram<'_> {
            Ram::from_slice(&self.bytes, &self.regions)
        }
        /// Entry `va`'s index at `level` of `table` = `next | flags`.
        fn set(&mut self, table: u64, level: u32, va: u64, next: u64) {
            let idx = (va >> (12 + 9 * (level - 1))) & 0x1ff;
            self.w64(table + idx * 8, next);
        }
    }

    const P: u64 = PTE_PRESENT | 2;
    const VA: u64 = 0xffff_c900_0012_3000;
    const DIRECT: u64 = 0xffff_8880_0000_0000;

    /// 4-level: PML4 0x1000, PDPT 0x2000, PD 0x3000, PT 0x4000; VA -> 0x10000 and
    /// VA + 4K -> 0x12000; DIRECT -> 0 through a 1 GiB page (covers all RAM).
    fn four_level() -> Guest {
        let mut g = Guest::new(0x40);
        g.set(0x1000, 4, VA, 0x2000 | P);
        g.set(0x2000, 3, VA, 0x3000 | P);
        g.set(0x3000, 2, VA, 0x4000 | P);
        g.set(0x4000, 1, VA, 0x10000 | P);
        g.set(0x4000, 1, VA + 0x1000, 0x12000 | P);
        g.set(0x1000, 4, DIRECT, 0x5000 | P);
        g.set(0x5000, 3, DIRECT, PTE_PS | P);
        g
    }

    #[test]
    fn four_level_walk_and_large_pages() {
        let mut g = four_level();
        g.w64(0x10008, 0x1122_3344_5566_7788);
        let ram = g.ram();
        // PCID bits in cr3 are ignored.
        let cr3 = 0x1000 | 0x5;
        assert_eq!(translate(&ram, cr3, false, VA + 0x10), Some(0x10010));
        assert_eq!(translate(&ram, cr3, false, VA + 0x1ff8), Some(0x12ff8));
        assert_eq!(
            read_virt(&ram, cr3, false, VA + 8, 8),
            Some(0x1122_3344_5566_7788)
        );
        assert_eq!(read_virt(&ram, cr3, false, VA + 8, 2), Some(0x7788));
        // 1 GiB page.
        assert_eq!(
            translate(&ram, cr3, false, DIRECT + 0x1_2345),
            Some(0x1_2345)
        );
        assert_eq!(
            read_virt(&ram, cr3, false, DIRECT + 0x10008, 4),
            Some(0x5566_7788)
        );
        // 2 MiB page: PD entry with PS.
        let mut g = four_level();
        let va2 = 0xffff_c900_4000_0000u64;
        g.set(0x2000, 3, va2, 0x6000 | P);
        g.set(0x6000, 2, va2, 0x20_0000 | PTE_PS | P | (1 << 12)); // PAT bit in a large page
        let ram = g.ram();
        assert_eq!(translate(&ram, cr3, false, va2 + 0x1_2345), Some(0x21_2345));
    }

    #[test]
    fn byte_ranges_cross_pages_and_stop_at_a_hole() {
        let mut g = four_level();
        // "ab\0" ending VA's page, "cd\0" starting the next (mapped elsewhere: 0x12000).
        let i = usize::try_from(0x10000 + 0xffd).expect("i");
        g.bytes[i..i + 3].copy_from_slice(b"ab\0");
        g.bytes[0x12000..0x12003].copy_from_slice(b"cd\0");
        let ram = g.ram();
        let mut w = Walker::new(ram, 0x1000, false);
        let mut buf = [0u8; 6];
        assert_eq!(w.read_bytes(VA + 0xffd, &mut buf), 6);
        assert_eq!(&buf, b"ab\0cd\0");
        // The page after VA + 4K is not mapped: the read stops there.
        let mut long = vec![0u8; 0x1000 + 16];
        assert_eq!(w.read_bytes(VA + 0x1000 - 8, &mut long), 0x1000 + 8);
        let mut none = [0u8; 4];
        assert_eq!(w.read_bytes(VA + 0x2000, &mut none), 0);
        assert_eq!(w.read_bytes(VA, &mut []), 0);
    }

    #[test]
    fn five_level_walk() {
        let mut g = Guest::new(0x40);
        let va = 0xff11_0000_0000_1000u64;
        g.set(0x1000, 5, va, 0x2000 | P);
        g.set(0x2000, 4, va, 0x3000 | P);
        g.set(0x3000, 3, va, 0x4000 | P);
        g.set(0x4000, 2, va, 0x5000 | P);
        g.set(0x5000, 1, va, 0x30000 | P);
        g.w64(0x30040, 42);
        let ram = g.ram();
        assert_eq!(translate(&ram, 0x1000, true, va + 0x40), Some(0x30040));
        assert_eq!(read_virt(&ram, 0x1000, true, va + 0x40, 8), Some(42));
        // The same tables read as 4-level: that address is not canonical for 4 levels.
        assert_eq!(translate(&ram, 0x1000, false, va), None);
        // Non-canonical for 5 levels.
        assert_eq!(translate(&ram, 0x1000, true, 0x0100_0000_0000_0000), None);
    }

    #[test]
    fn non_present_and_out_of_range() {
        let mut g = four_level();
        let cr3 = 0x1000;
        // Not present at the PT level.
        assert_eq!(translate(&g.ram(), cr3, false, VA + 0x2000), None);
        // Not present at the top.
        assert_eq!(translate(&g.ram(), cr3, false, 0x1000), None);
        // A table pointer outside RAM.
        g.set(0x3000, 2, VA, 0x7fff_f000 | P);
        assert_eq!(translate(&g.ram(), cr3, false, VA), None);
        // A leaf outside RAM translates but cannot be read.
        let mut g = four_level();
        g.set(0x4000, 1, VA, 0x7fff_f000 | P);
        assert_eq!(translate(&g.ram(), cr3, false, VA), Some(0x7fff_f000));
        assert_eq!(read_virt(&g.ram(), cr3, false, VA, 8), None);
        // cr3 itself outside RAM.
        assert_eq!(translate(&g.ram(), 0x9000_0000, false, VA), None);
        // A region hole: a second region further up, the hole between is not RAM; a leaf
        // whose read would run past the end of its region fails.
        let mut g = four_level();
        g.regions[0].len = 0x11000;
        assert_eq!(read_virt(&g.ram(), cr3, false, VA + 0xffc, 8), None);
        assert_eq!(read_virt(&g.ram(), cr3, false, VA + 0xff8, 8), Some(0));
    }

    #[test]
    fn walker_reuses_the_last_page_within_a_hit() {
        let mut g = four_level();
        g.w64(0x10010, 1);
        g.w64(0x12010, 2);
        g.w64(0x20_000, 3);
        let ram = g.ram();
        let mut w = Walker::new(ram, 0x1000, false);
        assert_eq!(w.read(VA + 0x10, 8), Some(1));
        assert_eq!(
            w.read(VA + 0x1010, 8),
            Some(2),
            "next 4K page: walked again"
        );
        assert_eq!(w.read(DIRECT + 0x20_000, 8), Some(3));
        assert_eq!(w.last, Some((DIRECT, 1 << 30, 0)), "1 GiB page kept");
        assert_eq!(w.read(DIRECT + 0x12010, 8), Some(2));
        assert_eq!(w.read(VA + 0x2000, 8), None, "not present");
        assert_eq!(w.read(DIRECT + 0x10010, 8), Some(1));
    }

    #[test]
    fn page_crossing_read_is_split() {
        let mut g = four_level();
        // VA+0xffc..VA+0x1004 spans frame 0x10000 (last 4 bytes) and 0x12000 (first 4): not
        // physically contiguous.
        g.w64(0x10ff8, 0xaabb_ccdd_0000_0000);
        g.w64(0x12000, 0x1122_3344);
        g.w64(0x11000, 0xdead_beef);
        let ram = g.ram();
        assert_eq!(
            read_virt(&ram, 0x1000, false, VA + 0xffc, 8),
            Some(0x1122_3344_aabb_ccdd)
        );
        // The second page not mapped: the whole read fails.
        assert_eq!(read_virt(&ram, 0x1000, false, VA + 0x1ffc, 8), None);
    }

    #[test]
    fn regions_with_file_offsets() {
        // gpa 0x100000.. sits at file offset 0x1000.
        let mut bytes = vec![0u8; 0x3000];
        bytes[0x1010] = 7;
        let regions = [
            RamRegion {
                gpa: 0,
                len: 0x1000,
                file_offset: 0,
            },
            RamRegion {
                gpa: 0x10_0000,
                len: 0x2000,
                file_offset: 0x1000,
            },
        ];
        let ram = Ram::from_slice(&bytes, &regions);
        let mut b = [0u8; 1];
        assert_eq!(ram.read_into(0x10_0010, &mut b), Some(()));
        assert_eq!(b[0], 7);
        assert_eq!(ram.read_into(0x1000, &mut b), None, "hole");
        // A region claiming more than the bytes: refused.
        let long = [RamRegion {
            gpa: 0,
            len: 0x10000,
            file_offset: 0,
        }];
        let ram = Ram::from_slice(&bytes, &long);
        assert_eq!(ram.read_u64(0x2ff8), Some(0));
        assert_eq!(ram.read_u64(0x3000), None);
    }

    #[test]
    fn mapping_a_file() {
        use std::io::Write;
        let path = std::env::temp_dir().join(format!("ornament-guestmem-{}", std::process::id()));
        let mut f = File::create(&path).expect("create");
        let mut data = vec![0u8; 0x2000];
        data[0x1008] = 0x5a;
        f.write_all(&data).expect("write");
        drop(f);
        let rec = RamRecord {
            paging: RamPaging::Level4,
            regions: vec![RamRegion {
                gpa: 0x10_0000,
                len: 0x2000,
                file_offset: 0,
            }],
        };
        let m = RamMapping::map(&rec, Some(File::open(&path).expect("open"))).expect("map");
        let mut b = [0u8; 1];
        assert_eq!(m.ram().read_into(0x10_1008, &mut b), Some(()));
        assert_eq!(b[0], 0x5a);
        let mut bad = rec.clone();
        bad.regions[0].len = 0x3000;
        assert_eq!(
            RamMapping::map(&bad, Some(File::open(&path).expect("open"))).err(),
            Some(RamMapError::OutsideFile)
        );
        assert_eq!(RamMapping::map(&rec, None).err(), Some(RamMapError::NoFd));
        let _ = std::fs::remove_file(&path);
    }
}
