//! x86-64 page-table walk (4- and 5-level, 4 KiB / 2 MiB / 1 GiB pages): `Gva` -> `Gpa`,
//! typed and cached over the seam crate's one walker (`ornament_engine::paging`).

use ornament_engine::paging::{self, WalkFault};
use ornament_engine::{Gpa, Gva, MemError, PhysMemory};
use std::sync::Mutex;

/// CR4.LA57: 5-level paging is on.
pub const CR4_LA57: u64 = paging::CR4_LA57;
/// Page-table entry: present.
pub const PTE_PRESENT: u64 = paging::PTE_PRESENT;
/// Page-table entry: writable.
pub const PTE_WRITABLE: u64 = paging::PTE_WRITABLE;
/// Page-table entry: user-accessible.
pub const PTE_USER: u64 = paging::PTE_USER;
/// Page-directory entry: maps a large page (2 MiB at level 2, 1 GiB at level 3).
pub const PTE_PAGE_SIZE: u64 = paging::PTE_PS;
/// Page-table entry: no-execute.
pub const PTE_NX: u64 = 1 << 63;
/// Physical-address bits of an entry or of CR3 (bits 12..=51).
pub const ADDR_MASK: u64 = paging::PTE_ADDR;
/// CR3 bit that selects the user half of a PTI page-table pair (the kernel PGD is the
/// 8 KiB-aligned first page, the user PGD the second).
pub const CR3_PTI_USER: u64 = 1 << 12;
/// Size of a base page.
pub const PAGE_SIZE: u64 = 4096;

/// Why a translation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, displaydoc::Display)]
pub enum PagingError {
    /// {gva} is not a canonical address
    NonCanonical {
        /// The address.
        gva: Gva,
    },
    /// {gva} is not mapped (level-{level} entry not present)
    NotPresent {
        /// Paging level whose entry was not present (5 = PML5 ... 1 = PT).
        level: u8,
        /// The address.
        gva: Gva,
    },
    /// {gva}: level-{level} entry {entry:#x} sets a reserved bit
    Reserved {
        /// Level of the entry.
        level: u8,
        /// The address.
        gva: Gva,
        /// The entry.
        entry: u64,
    },
    /// range at {gva} of {len} bytes wraps around the address space
    Overflow {
        /// First address.
        gva: Gva,
        /// Length asked for.
        len: u64,
    },
    /// reading guest-physical memory failed
    Mem(#[from] MemError),
}

/// 4- or 5-level paging.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PagingMode {
    /// PML4 root, 48-bit virtual addresses.
    Level4,
    /// PML5 root (CR4.LA57), 57-bit virtual addresses.
    Level5,
}

impl PagingMode {
    /// The mode CR4 selects.
    pub fn from_cr4(cr4: u64) -> Self {
        if cr4 & CR4_LA57 != 0 {
            PagingMode::Level5
        } else {
            PagingMode::Level4
        }
    }

    /// True when `gva` is canonical in this mode.
    pub fn is_canonical(self, gva: Gva) -> bool {
        match self {
            PagingMode::Level4 => gva.is_canonical_48(),
            PagingMode::Level5 => gva.is_canonical_57(),
        }
    }
}

/// Size of the page a translation landed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PageSize {
    /// 4 KiB (level-1 entry).
    Size4K,
    /// 2 MiB (level-2 entry with PS).
    Size2M,
    /// 1 GiB (level-3 entry with PS).
    Size1G,
}

impl PageSize {
    /// The page size in bytes.
    pub const fn bytes(self) -> u64 {
        match self {
            PageSize::Size4K => 1 << 12,
            PageSize::Size2M => 1 << 21,
            PageSize::Size1G => 1 << 30,
        }
    }
}

/// The root of one address space: the physical address of its top-level table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PageRoot {
    /// Physical address of the PML4 (or PML5) table.
    pub table: Gpa,
    /// 4- or 5-level.
    pub mode: PagingMode,
}

impl PageRoot {
    /// The root CR3 and CR4 select (PCID and flag bits dropped).
    pub fn from_cr3(cr3: u64, cr4: u64) -> Self {
        Self {
            table: Gpa(cr3 & ADDR_MASK),
            mode: PagingMode::from_cr4(cr4),
        }
    }

    /// The kernel half of a PTI pair: like [`PageRoot::from_cr3`] with the PTI user bit
    /// cleared, so kernel addresses resolve even when the vCPU was in user mode.
    pub fn kernel_from_cr3(cr3: u64, cr4: u64) -> Self {
        Self::from_cr3(cr3 & !CR3_PTI_USER, cr4)
    }
}

/// A completed translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    /// The physical address of the byte at the virtual address.
    pub gpa: Gpa,
    /// Size of the page that maps it.
    pub size: PageSize,
    /// Accumulated writable permission (every level writable).
    pub writable: bool,
    /// Accumulated user permission (every level user).
    pub user: bool,
}

/// Translate `gva` by walking the tables under `root` in `mem`.
pub fn translate(
    mem: &dyn PhysMemory,
    root: PageRoot,
    gva: Gva,
) -> Result<Translation, PagingError> {
    let entry = |gpa: u64| {
        let mut buf = [0u8; 8];
        mem.read_phys(Gpa(gpa), &mut buf)
            .map(|()| u64::from_le_bytes(buf))
    };
    let la57 = root.mode == PagingMode::Level5;
    match paging::walk_checked(entry, root.table.raw(), la57, gva.raw()) {
        Ok(w) => Ok(Translation {
            gpa: Gpa(w.gpa),
            size: match w.size {
                s if s == PageSize::Size1G.bytes() => PageSize::Size1G,
                s if s == PageSize::Size2M.bytes() => PageSize::Size2M,
                _ => PageSize::Size4K,
            },
            writable: w.writable,
            user: w.user,
        }),
        Err(WalkFault::NonCanonical) => Err(PagingError::NonCanonical { gva }),
        Err(WalkFault::NotPresent { level }) => Err(PagingError::NotPresent { level, gva }),
        Err(WalkFault::Reserved { level, entry }) => {
            Err(PagingError::Reserved { level, gva, entry })
        }
        Err(WalkFault::Read(e)) => Err(PagingError::Mem(e)),
    }
}

/// Number of slots of the translation cache (direct-mapped).
const CACHE_SLOTS: usize = 4096;

/// One cached 4 KiB translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CacheEntry {
    root: Gpa,
    page: u64,
    frame: Gpa,
    writable: bool,
    user: bool,
}

/// A small direct-mapped cache of 4 KiB-page translations keyed by (root, virtual page).
///
/// Guest page tables change: invalidate (all, or one root) when the guest may have
/// changed them (for example after resuming it). Nothing is invalidated automatically.
/// Worth it where physical reads are slow (a `pread` per read, a gdbstub round trip);
/// over directly mapped memory a 4-level walk costs about as much as a lookup.
#[derive(Debug)]
pub struct TranslationCache {
    slots: Mutex<Vec<Option<CacheEntry>>>,
}

impl Default for TranslationCache {
    fn default() -> Self {
        Self {
            // Allocated on the first insert: a cache made per probe hit costs nothing
            // until it is used.
            slots: Mutex::new(Vec::new()),
        }
    }
}

fn slot_of(root: Gpa, page: u64) -> usize {
    let h = page ^ (root.raw() >> 12).rotate_left(17);
    usize::try_from(h % CACHE_SLOTS as u64).unwrap_or(0)
}

impl TranslationCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Translate through the cache, walking on a miss.
    pub fn translate(
        &self,
        mem: &dyn PhysMemory,
        root: PageRoot,
        gva: Gva,
    ) -> Result<Translation, PagingError> {
        let page = gva.raw() >> 12;
        let off = gva.raw() & (PAGE_SIZE - 1);
        let slot = slot_of(root.table, page);
        if let Some(&Some(e)) = self.lock().get(slot) {
            if e.root == root.table && e.page == page {
                return Ok(Translation {
                    gpa: Gpa(e.frame.raw() | off),
                    size: PageSize::Size4K,
                    writable: e.writable,
                    user: e.user,
                });
            }
        }
        let t = translate(mem, root, gva)?;
        let mut slots = self.lock();
        if slots.is_empty() {
            slots.resize(CACHE_SLOTS, None);
        }
        slots[slot] = Some(CacheEntry {
            root: root.table,
            page,
            frame: Gpa(t.gpa.raw() & !(PAGE_SIZE - 1)),
            writable: t.writable,
            user: t.user,
        });
        Ok(t)
    }

    /// Forget everything.
    pub fn invalidate_all(&self) {
        self.lock().iter_mut().for_each(|s| *s = None);
    }

    /// Forget the translations of one address space.
    pub fn invalidate_root(&self, table: Gpa) {
        self.lock()
            .iter_mut()
            .filter(|s| s.is_some_and(|e| e.root == table))
            .for_each(|s| *s = None);
    }

    /// Number of cached pages.
    pub fn len(&self) -> usize {
        self.lock().iter().filter(|s| s.is_some()).count()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Option<CacheEntry>>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::PhysAlloc;

    fn alloc() -> PhysAlloc {
        PhysAlloc::new(8 << 20, 0x10_0000, 0x40_0000)
    }

    #[test]
    fn four_level_4k_2m_1g() {
        let mut a = alloc();
        let root = a.new_root(PagingMode::Level4).expect("root");
        let k4 = Gva(0xffff_ffff_8100_3000);
        a.map(root, k4, Gpa(0x50_0000), PageSize::Size4K, false)
            .expect("4k");
        let k2 = Gva(0xffff_ffff_8120_0000);
        a.map(root, k2, Gpa(0x60_0000), PageSize::Size2M, false)
            .expect("2m");
        let k1 = Gva(0xffff_8880_0000_0000);
        a.map(root, k1, Gpa(0), PageSize::Size1G, false)
            .expect("1g");
        let u = Gva(0x7fff_0000_1000);
        a.map(root, u, Gpa(0x70_0000), PageSize::Size4K, true)
            .expect("user");

        let t = translate(&a.mem, root, Gva(k4.raw() + 0x123)).expect("4k");
        assert_eq!(
            (t.gpa, t.size, t.user),
            (Gpa(0x50_0123), PageSize::Size4K, false)
        );
        let t = translate(&a.mem, root, Gva(k2.raw() + 0x1f_fff8)).expect("2m");
        assert_eq!((t.gpa, t.size), (Gpa(0x7f_fff8), PageSize::Size2M));
        let t = translate(&a.mem, root, Gva(k1.raw() + 0x3fff_0001)).expect("1g");
        assert_eq!((t.gpa, t.size), (Gpa(0x3fff_0001), PageSize::Size1G));
        let t = translate(&a.mem, root, Gva(u.raw() + 8)).expect("user");
        assert_eq!((t.gpa, t.user, t.writable), (Gpa(0x70_0008), true, true));
    }

    #[test]
    fn not_present_at_each_level_and_non_canonical() {
        let mut a = alloc();
        let root = a.new_root(PagingMode::Level4).expect("root");
        let g = Gva(0xffff_ffff_8100_0000);
        a.map(root, g, Gpa(0x50_0000), PageSize::Size4K, false)
            .expect("map");
        let cases = [
            (Gva(0xffff_8000_0000_0000), 4), // other PML4 slot
            (Gva(0xffff_ff80_0000_0000), 3), // same PML4 slot, other PDPT slot
            (Gva(0xffff_ffff_c000_0000 - 0x4000_0000 + 0x20_0000 * 3), 2),
            (Gva(0xffff_ffff_8100_1000), 1),
        ];
        for (gva, level) in cases {
            assert_eq!(
                translate(&a.mem, root, gva),
                Err(PagingError::NotPresent { level, gva }),
                "{gva:?}"
            );
        }
        let bad = Gva(0x0000_8000_0000_0000);
        assert_eq!(
            translate(&a.mem, root, bad),
            Err(PagingError::NonCanonical { gva: bad })
        );
        // A root outside guest RAM is a memory error, not a panic.
        let far = PageRoot {
            table: Gpa(1 << 40),
            mode: PagingMode::Level4,
        };
        assert!(matches!(
            translate(&a.mem, far, g),
            Err(PagingError::Mem(_))
        ));
    }

    #[test]
    fn five_level_walk() {
        let mut a = alloc();
        let root = a.new_root(PagingMode::Level5).expect("root");
        // Only valid with LA57: bits 48..56 used.
        let g = Gva(0xff11_2233_4455_6000);
        a.map(root, g, Gpa(0x55_5000), PageSize::Size4K, false)
            .expect("map");
        let t = translate(&a.mem, root, Gva(g.raw() + 7)).expect("5-level");
        assert_eq!(t.gpa, Gpa(0x55_5007));
        assert!(!PagingMode::Level4.is_canonical(g));
        let four = PageRoot {
            mode: PagingMode::Level4,
            ..root
        };
        assert_eq!(
            translate(&a.mem, four, g),
            Err(PagingError::NonCanonical { gva: g })
        );
        let nc = Gva(0x0100_0000_0000_0000);
        assert_eq!(
            translate(&a.mem, root, nc),
            Err(PagingError::NonCanonical { gva: nc })
        );
        assert_eq!(PagingMode::from_cr4(CR4_LA57 | 0x20), PagingMode::Level5);
        assert_eq!(PagingMode::from_cr4(0x20), PagingMode::Level4);
    }

    #[test]
    fn large_page_at_top_level_is_reserved() {
        let a = alloc();
        let root = PageRoot {
            table: Gpa(0x20_0000),
            mode: PagingMode::Level4,
        };
        let e = PTE_PRESENT | PTE_PAGE_SIZE;
        a.write(Gpa(0x20_0000), &e.to_le_bytes()).expect("write");
        assert_eq!(
            translate(&a.mem, root, Gva(0x1000)),
            Err(PagingError::Reserved {
                level: 4,
                gva: Gva(0x1000),
                entry: e
            })
        );
    }

    #[test]
    fn cr3_roots_drop_pcid_and_pti_bits() {
        let r = PageRoot::from_cr3(0x8000_0000_0123_5001, 0);
        assert_eq!(r.table, Gpa(0x123_5000));
        let k = PageRoot::kernel_from_cr3(0x123_5001 | CR3_PTI_USER, CR4_LA57);
        assert_eq!((k.table, k.mode), (Gpa(0x123_4000), PagingMode::Level5));
    }

    #[test]
    fn cache_hits_and_invalidation() {
        let mut a = alloc();
        let root = a.new_root(PagingMode::Level4).expect("root");
        let g = Gva(0xffff_ffff_8100_0000);
        a.map(root, g, Gpa(0x50_0000), PageSize::Size4K, false)
            .expect("map");
        let c = TranslationCache::new();
        assert_eq!(
            c.translate(&a.mem, root, g).map(|t| t.gpa),
            Ok(Gpa(0x50_0000))
        );
        assert_eq!(c.len(), 1);
        // Remap behind the cache's back: the cache still answers the old frame...
        let mut b = a;
        let pt_slot = translate_slot(&b, root, g);
        b.write(pt_slot, &(0x51_0000 | PTE_PRESENT).to_le_bytes())
            .expect("w");
        assert_eq!(
            c.translate(&b.mem, root, Gva(g.raw() + 4)).map(|t| t.gpa),
            Ok(Gpa(0x50_0004))
        );
        // ...until invalidated.
        c.invalidate_root(root.table);
        assert!(c.is_empty());
        assert_eq!(
            c.translate(&b.mem, root, g).map(|t| t.gpa),
            Ok(Gpa(0x51_0000))
        );
        c.invalidate_all();
        assert!(c.is_empty());
        let _ = &mut b;
    }

    /// Physical address of the level-1 entry for `gva`.
    fn translate_slot(a: &PhysAlloc, root: PageRoot, gva: Gva) -> Gpa {
        let mut table = root.table.raw();
        for level in (2..=4u32).rev() {
            let idx = (gva.raw() >> (12 + 9 * (level - 1))) & 0x1ff;
            let mut b = [0u8; 8];
            a.mem.read_phys(Gpa(table + idx * 8), &mut b).expect("read");
            table = u64::from_le_bytes(b) & ADDR_MASK;
        }
        Gpa(table + ((gva.raw() >> 12) & 0x1ff) * 8)
    }
}
