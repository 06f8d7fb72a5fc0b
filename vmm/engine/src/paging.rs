//! The minimal x86-64 page walk the VMM crates need while a vCPU waits at a hit (the
//! plugin link's syscall deny, the KVM engine's probe sites and completions, the TCG
//! plugin's reads over the RAM file): a guest-virtual address to guest-physical under a
//! CR3, 4- or 5-level, 4K/2M/1G pages. It is the one walker of the workspace:
//! [`walk_checked`] says why a walk stopped and what the levels allowed, and
//! `introspect::paging` builds its typed translation and cache on it.

use crate::addr::{Gpa, Gva};
use crate::mem::PhysMemory;

/// CR4.LA57: 5-level paging.
pub const CR4_LA57: u64 = 1 << 12;
/// Page-table entry: present.
pub const PTE_PRESENT: u64 = 1 << 0;
/// Page-table entry: writable.
pub const PTE_WRITABLE: u64 = 1 << 1;
/// Page-table entry: user-accessible.
pub const PTE_USER: u64 = 1 << 2;
/// Page-table entry: a large page (at levels 2 and 3; PAT at level 1).
pub const PTE_PS: u64 = 1 << 7;
/// Page-table entry: the physical address bits.
pub const PTE_ADDR: u64 = 0x000f_ffff_ffff_f000;
/// Large-page entry: the PAT bit, the one address bit below the page's size that is not
/// reserved.
const PTE_LARGE_PAT: u64 = 1 << 12;

/// True when `va` is canonical for the paging mode (bits above 47, or 56, all equal).
pub fn canonical(va: u64, la57: bool) -> bool {
    if la57 {
        Gva(va).is_canonical_57()
    } else {
        Gva(va).is_canonical_48()
    }
}

/// The page a walk ended in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageWalk {
    /// Guest-physical address of the byte at the virtual address.
    pub gpa: u64,
    /// Size of the page that maps it: 4 KiB, 2 MiB or 1 GiB.
    pub size: u64,
    /// Every level's entry is writable.
    pub writable: bool,
    /// Every level's entry is user-accessible.
    pub user: bool,
}

/// Why a walk stopped, as the CPU would fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkFault<E> {
    /// The address is not canonical for the paging mode.
    NonCanonical,
    /// The entry at `level` (5 = PML5 ... 1 = PT) is not present.
    NotPresent {
        /// Paging level of the entry.
        level: u8,
    },
    /// The entry at `level` sets a reserved bit: a large page at level 4 or 5, or address
    /// bits below a large page's size other than PAT.
    Reserved {
        /// Paging level of the entry.
        level: u8,
        /// The entry.
        entry: u64,
    },
    /// Reading an entry failed.
    Read(E),
}

/// Walk the page tables rooted at `cr3` (4-level, or 5-level with `la57`) for `va`, reading
/// each entry with `entry(gpa)`: the page that maps it and what its levels allow, or why
/// there is none.
pub fn walk_checked<E>(
    mut entry: impl FnMut(u64) -> Result<u64, E>,
    cr3: u64,
    la57: bool,
    va: u64,
) -> Result<PageWalk, WalkFault<E>> {
    if !canonical(va, la57) {
        return Err(WalkFault::NonCanonical);
    }
    let levels: u8 = if la57 { 5 } else { 4 };
    let mut table = cr3 & PTE_ADDR;
    let mut writable = true;
    let mut user = true;
    for level in (1..=levels).rev() {
        let shift = 12 + 9 * u32::from(level - 1);
        let idx = (va >> shift) & 0x1ff;
        let e = entry(table + idx * 8).map_err(WalkFault::Read)?;
        if e & PTE_PRESENT == 0 {
            return Err(WalkFault::NotPresent { level });
        }
        writable &= e & PTE_WRITABLE != 0;
        user &= e & PTE_USER != 0;
        let large = level > 1 && e & PTE_PS != 0;
        if large && level >= 4 {
            return Err(WalkFault::Reserved { level, entry: e });
        }
        if level == 1 || large {
            let size = 1u64 << shift;
            let below = e & PTE_ADDR & (size - 1);
            if large && below & !PTE_LARGE_PAT != 0 {
                return Err(WalkFault::Reserved { level, entry: e });
            }
            return Ok(PageWalk {
                gpa: (e & PTE_ADDR & !(size - 1)) | (va & (size - 1)),
                size,
                writable,
                user,
            });
        }
        table = e & PTE_ADDR;
    }
    // Unreachable: the loop returns at level 1.
    Err(WalkFault::NotPresent { level: 1 })
}

/// [`walk_checked`] for callers that only need where: the guest-physical address and the size
/// of the page that maps `va`; `None` when `va` is not canonical, a level is not present or
/// sets a reserved bit, or an entry cannot be read.
pub fn walk(
    mut entry: impl FnMut(u64) -> Option<u64>,
    cr3: u64,
    la57: bool,
    va: u64,
) -> Option<(u64, u64)> {
    walk_checked(|gpa| entry(gpa).ok_or(()), cr3, la57, va)
        .ok()
        .map(|w| (w.gpa, w.size))
}

/// [`walk`] over guest-physical memory `mem`.
pub fn translate(mem: &dyn PhysMemory, cr3: u64, la57: bool, va: Gva) -> Option<Gpa> {
    let entry = |gpa: u64| {
        let mut e = [0u8; 8];
        mem.read_phys(Gpa(gpa), &mut e).ok()?;
        Some(u64::from_le_bytes(e))
    };
    walk(entry, cr3, la57, va.raw()).map(|(gpa, _)| Gpa(gpa))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn walk_in(m: &HashMap<u64, u64>, va: u64) -> Result<PageWalk, WalkFault<u64>> {
        walk_checked(|g| m.get(&g).copied().ok_or(g), 0x1000, false, va)
    }

    #[test]
    fn checked_walk_says_what_levels_allow_and_why_it_stopped() {
        // PML4 0x1000 -> PDPT 0x2000 (not user) -> PD 0x3000: 2 MiB page at 0 -> 0x20_0000.
        let mut m = HashMap::from([
            (0x1000, 0x2000 | 7),
            (0x2000, 0x3000 | 3),
            (0x3000, 0x20_0000 | PTE_PS | 3),
        ]);
        let page = PageWalk {
            gpa: 0x20_1234,
            size: 2 << 20,
            writable: true,
            user: false,
        };
        assert_eq!(walk_in(&m, 0x1234), Ok(page));
        assert_eq!(
            walk(|g| m.get(&g).copied(), 0x1000, false, 0x1234),
            Some((0x20_1234, 2 << 20))
        );
        // PAT is the one address bit a large page may set below its size.
        m.insert(0x3000, 0x20_0000 | PTE_LARGE_PAT | PTE_PS | 3);
        assert_eq!(walk_in(&m, 0x1234), Ok(page));
        let bad = 0x20_0000 | 0x2000 | PTE_PS | 3;
        m.insert(0x3000, bad);
        let reserved = WalkFault::Reserved {
            level: 2,
            entry: bad,
        };
        assert_eq!(walk_in(&m, 0x1234), Err(reserved));
        assert_eq!(walk(|g| m.get(&g).copied(), 0x1000, false, 0x1234), None);
        m.insert(0x1000, 0x2000 | PTE_PS | 7);
        assert!(matches!(
            walk_in(&m, 0x1234),
            Err(WalkFault::Reserved { level: 4, .. })
        ));
        assert_eq!(
            walk_in(&m, 0x80_0000_0000),
            Err(WalkFault::Read(0x1000 + 8))
        );
        m.insert(0x1008, 0x4000);
        assert_eq!(
            walk_in(&m, 0x80_0000_0000),
            Err(WalkFault::NotPresent { level: 4 })
        );
        assert_eq!(walk_in(&m, 0x8000_0000_0000), Err(WalkFault::NonCanonical));
    }
}
