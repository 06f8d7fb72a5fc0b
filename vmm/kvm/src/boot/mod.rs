//! Pure boot setup over guest memory and register structs: GDT, identity page tables,
//! the long-mode special registers. Tested without `/dev/kvm`.

pub mod acpi;
pub mod linux;

use crate::layout::{
    BOOT_GDT_ENTRIES, BOOT_GDT_START, BOOT_IDT_SIZE, BOOT_IDT_START, PAGE_SIZE, PDE_PAGES,
    PDE_START, PDPTE_START, PML4_START,
};
use crate::memory::{KvmMemory, MemoryError};
use kvm_bindings::{kvm_segment, kvm_sregs};
use vm_memory::GuestAddress;

/// CR0.PE: protected mode.
pub const CR0_PE: u64 = 1 << 0;
/// CR0.ET: extension type (always 1 on modern CPUs).
pub const CR0_ET: u64 = 1 << 4;
/// CR0.PG: paging.
pub const CR0_PG: u64 = 1 << 31;
/// CR4.PAE: physical address extension (needed for long mode).
pub const CR4_PAE: u64 = 1 << 5;
/// EFER.LME: long mode enable.
pub const EFER_LME: u64 = 1 << 8;
/// EFER.LMA: long mode active.
pub const EFER_LMA: u64 = 1 << 10;

/// Page-table entry: present.
const PTE_PRESENT: u64 = 1 << 0;
/// Page-table entry: writable.
const PTE_WRITE: u64 = 1 << 1;
/// Page-directory entry: 2 MiB page.
const PDE_PS: u64 = 1 << 7;

/// GDT index of the 64-bit code segment (selector 0x10, Linux's `__BOOT_CS`).
pub const GDT_CODE: u16 = 2;
/// GDT index of the data segment (selector 0x18, `__BOOT_DS`).
pub const GDT_DATA: u16 = 3;
/// GDT index of the TSS (selector 0x20).
pub const GDT_TSS: u16 = 4;

/// Why boot setup failed.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum BootError {
    /// cannot write a boot structure into guest memory
    Memory(#[source] MemoryError),
}

/// A GDT descriptor from the flags word (as in Linux's `GDT_ENTRY`), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let flags = flags as u64;
    let base = base as u64;
    let limit = limit as u64;
    ((base & 0xff00_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
        | ((limit & 0x000f_0000) << 32)
        | ((flags & 0xf0ff) << 40)
}

/// Number of boot GDT entries as an array length.
const GDT_LEN: usize = 5;
const _: () = assert!(GDT_LEN as u64 == BOOT_GDT_ENTRIES);

/// The boot GDT: null, null, code, data, TSS.
pub const fn boot_gdt() -> [u64; GDT_LEN] {
    [
        0,
        0,
        gdt_entry(0xa09b, 0, 0xfffff), // code: G, L, present, DPL0, exec/read, accessed
        gdt_entry(0xc093, 0, 0xfffff), // data: G, D/B, present, DPL0, read/write, accessed
        gdt_entry(0x808b, 0, 0xfffff), // TSS: G, present, busy 64-bit TSS
    ]
}

/// The `kvm_segment` that loading GDT entry `index` with `entry` would produce.
// Every cast below is of a value first masked to the width of its field.
#[allow(clippy::cast_possible_truncation)]
pub fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let bits = |shift: u32, mask: u64| ((entry >> shift) & mask) as u8;
    let base = (((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000)) as u32;
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = bits(55, 1);
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    kvm_segment {
        base: u64::from(base),
        limit,
        selector: index * 8,
        type_: bits(40, 0xf),
        present: bits(47, 1),
        dpl: bits(45, 3),
        db: bits(54, 1),
        s: bits(44, 1),
        l: bits(53, 1),
        g,
        avl: bits(52, 1),
        unusable: u8::from(bits(47, 1) == 0),
        padding: 0,
    }
}

/// Write the boot GDT and an empty IDT into guest memory.
pub fn write_gdt(mem: &KvmMemory) -> Result<(), BootError> {
    let bytes: Vec<u8> = boot_gdt().iter().flat_map(|e| e.to_le_bytes()).collect();
    mem.write(BOOT_GDT_START, &bytes)
        .map_err(BootError::Memory)?;
    // One zero descriptor-sized word: an IDT with no usable gate.
    const _: () = assert!(BOOT_IDT_SIZE == 8);
    mem.write(BOOT_IDT_START, &0u64.to_le_bytes())
        .map_err(BootError::Memory)
}

/// Write identity page tables mapping `[0, IDENTITY_MAP_SIZE)` with 2 MiB pages.
pub fn write_identity_page_tables(mem: &KvmMemory) -> Result<(), BootError> {
    let w = |at: GuestAddress, v: u64| mem.write(at, &v.to_le_bytes()).map_err(BootError::Memory);
    w(PML4_START, PDPTE_START.0 | PTE_PRESENT | PTE_WRITE)?;
    for i in 0..PDE_PAGES {
        let pd = PDE_START.0 + i * PAGE_SIZE;
        w(
            GuestAddress(PDPTE_START.0 + i * 8),
            pd | PTE_PRESENT | PTE_WRITE,
        )?;
        for j in 0..512u64 {
            let page = ((i << 9) + j) << 21;
            w(
                GuestAddress(pd + j * 8),
                page | PTE_PRESENT | PTE_WRITE | PDE_PS,
            )?;
        }
    }
    Ok(())
}

/// Edit `sregs` for 64-bit long mode on the boot GDT and identity page tables.
pub fn long_mode_sregs(sregs: &mut kvm_sregs) {
    let gdt = boot_gdt();
    let code = segment_from_gdt(gdt[usize::from(GDT_CODE)], GDT_CODE);
    let data = segment_from_gdt(gdt[usize::from(GDT_DATA)], GDT_DATA);
    let tss = segment_from_gdt(gdt[usize::from(GDT_TSS)], GDT_TSS);
    sregs.gdt.base = BOOT_GDT_START.0;
    sregs.gdt.limit = u16::try_from(BOOT_GDT_ENTRIES * 8 - 1).expect("the boot GDT is small");
    sregs.idt.base = BOOT_IDT_START.0;
    sregs.idt.limit = u16::try_from(BOOT_IDT_SIZE - 1).expect("the boot IDT is small");
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr3 = PML4_START.0;
    sregs.cr4 |= CR4_PAE;
    sregs.cr0 |= CR0_PE | CR0_ET | CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let gdt = boot_gdt();
        assert_eq!(gdt[2], 0x00af_9b00_0000_ffff);
        assert_eq!(gdt[3], 0x00cf_9300_0000_ffff);
        let code = segment_from_gdt(gdt[2], GDT_CODE);
        assert_eq!(
            (
                code.selector,
                code.type_,
                code.l,
                code.db,
                code.g,
                code.present,
                code.s
            ),
            (0x10, 0xb, 1, 0, 1, 1, 1)
        );
        assert_eq!((code.base, code.limit), (0, 0xffff_ffff));
        let data = segment_from_gdt(gdt[3], GDT_DATA);
        assert_eq!(
            (data.selector, data.type_, data.db, data.l),
            (0x18, 3, 1, 0)
        );
        assert_eq!(segment_from_gdt(0, 0).unusable, 1);
    }

    #[test]
    fn identity_tables_map_4_gib() {
        let mem = KvmMemory::new(crate::layout::TEST_MEM_SIZE).expect("memory");
        write_identity_page_tables(&mem).expect("tables");
        let m = mem.guest_memory();
        let pml4: u64 = m.read_obj(PML4_START).expect("pml4");
        assert_eq!(pml4, PDPTE_START.0 | 3);
        let pdpte3: u64 = m.read_obj(GuestAddress(PDPTE_START.0 + 24)).expect("pdpte");
        assert_eq!(pdpte3, (PDE_START.0 + 3 * PAGE_SIZE) | 3);
        // The last 2 MiB page of the fourth GiB.
        let last: u64 = m
            .read_obj(GuestAddress(PDE_START.0 + 3 * PAGE_SIZE + 511 * 8))
            .expect("pde");
        assert_eq!(
            last,
            (4 * crate::layout::GIB - 2 * crate::layout::MIB) | 0x83
        );
    }

    #[test]
    fn long_mode_bits() {
        let mut s = kvm_sregs::default();
        long_mode_sregs(&mut s);
        assert_eq!(s.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, PML4_START.0);
        assert_eq!(s.cs.selector, 0x10);
        assert_eq!(s.gdt.limit, 39);
    }
}
