//! The minimal x86-64 page walk the VMM crates need while a vCPU waits at a hit (the
//! plugin link's syscall deny, the KVM engine's probe sites and completions): a
//! guest-virtual address to guest-physical under a CR3, 4- or 5-level, 4K/2M/1G pages.
//! `introspect::paging` is the full walker (permissions, canonical checks, caching).

use crate::addr::{Gpa, Gva};
use crate::mem::PhysMemory;

/// CR4.LA57: 5-level paging.
pub const CR4_LA57: u64 = 1 << 12;
const PTE_PRESENT: u64 = 1 << 0;
const PTE_PS: u64 = 1 << 7;
const PTE_ADDR: u64 = 0x000f_ffff_ffff_f000;

/// Walk the page tables rooted at `cr3` (4-level, or 5-level with `la57`) for `va`;
/// `None` when a level is not present or the tables are unreadable.
pub fn translate(mem: &dyn PhysMemory, cr3: u64, la57: bool, va: Gva) -> Option<Gpa> {
    let levels: u32 = if la57 { 5 } else { 4 };
    let mut table = cr3 & PTE_ADDR;
    for level in (1..=levels).rev() {
        let shift = 12 + 9 * (level - 1);
        let idx = (va.raw() >> shift) & 0x1ff;
        let mut e = [0u8; 8];
        mem.read_phys(Gpa(table + idx * 8), &mut e).ok()?;
        let e = u64::from_le_bytes(e);
        if e & PTE_PRESENT == 0 {
            return None;
        }
        if (2..=3).contains(&level) && e & PTE_PS != 0 {
            let size = 1u64 << shift;
            return Some(Gpa((e & PTE_ADDR & !(size - 1)) | (va.raw() & (size - 1))));
        }
        table = e & PTE_ADDR;
    }
    Some(Gpa(table | (va.raw() & 0xfff)))
}
