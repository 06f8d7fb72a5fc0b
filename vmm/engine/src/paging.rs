//! The minimal x86-64 page walk the VMM crates need while a vCPU waits at a hit (the
//! plugin link's syscall deny, the KVM engine's probe sites and completions, the TCG
//! plugin's reads over the RAM file): a guest-virtual address to guest-physical under a
//! CR3, 4- or 5-level, 4K/2M/1G pages. `introspect::paging` is the full walker
//! (permissions, caching).

use crate::addr::{Gpa, Gva};
use crate::mem::PhysMemory;

/// CR4.LA57: 5-level paging.
pub const CR4_LA57: u64 = 1 << 12;
/// Page-table entry: present.
pub const PTE_PRESENT: u64 = 1 << 0;
/// Page-table entry: a large page (at levels 2 and 3; PAT at level 1).
pub const PTE_PS: u64 = 1 << 7;
/// Page-table entry: the physical address bits.
pub const PTE_ADDR: u64 = 0x000f_ffff_ffff_f000;
const PAGE_4K: u64 = 0x1000;

/// True when `va` is canonical for the paging mode (bits above 47, or 56, all equal).
pub fn canonical(va: u64, la57: bool) -> bool {
    let bits = if la57 { 57 } else { 48 };
    // Reinterpreting as signed to sign-extend the top bits is the point.
    #[allow(clippy::cast_possible_wrap)]
    let top = (va as i64) >> (bits - 1);
    top == 0 || top == -1
}

/// Walk the page tables rooted at `cr3` (4-level, or 5-level with `la57`) for `va`, reading
/// each entry with `entry(gpa)`; returns the guest-physical address and the size of the
/// page that maps it (4 KiB, 2 MiB or 1 GiB). `None` when `va` is not canonical, a level
/// is not present, or an entry cannot be read.
pub fn walk(
    mut entry: impl FnMut(u64) -> Option<u64>,
    cr3: u64,
    la57: bool,
    va: u64,
) -> Option<(u64, u64)> {
    if !canonical(va, la57) {
        return None;
    }
    let levels: u32 = if la57 { 5 } else { 4 };
    let mut table = cr3 & PTE_ADDR;
    for level in (1..=levels).rev() {
        let shift = 12 + 9 * (level - 1);
        let idx = (va >> shift) & 0x1ff;
        let e = entry(table + idx * 8)?;
        if e & PTE_PRESENT == 0 {
            return None;
        }
        if (2..=3).contains(&level) && e & PTE_PS != 0 {
            let size = 1u64 << shift;
            return Some(((e & PTE_ADDR & !(size - 1)) | (va & (size - 1)), size));
        }
        table = e & PTE_ADDR;
    }
    Some((table | (va & (PAGE_4K - 1)), PAGE_4K))
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
