//! The Linux x86-64 boot protocol, as pure functions: the zero page (`boot_params`),
//! the e820 map, CPUID fixups, the LAPIC's LINT pins.

use crate::layout::{
    CMDLINE_START, EBDA_START, HIMEM_START, KERNEL_LOAD_START, REAL_MODE_IVT_START,
};
use kvm_bindings::{kvm_lapic_state, CpuId};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{ByteValued, GuestAddress};

/// e820 type: usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type: reserved.
pub const E820_RESERVED: u32 = 2;
/// `setup_header.boot_flag` magic.
pub const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `setup_header.header` magic ("HdrS").
pub const HDRS_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader`: undefined/other boot loader.
pub const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// `loadflags`: the protected-mode kernel is loaded at 1 MiB.
pub const LOADFLAGS_LOADED_HIGH: u8 = 0x01;
/// `xloadflags`: the kernel has a 64-bit entry point at `code32_start + 0x200`.
pub const XLF_KERNEL_64: u16 = 1 << 0;
/// Offset of the 64-bit entry point of a bzImage's protected-mode code.
pub const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// `kernel_alignment` for an ELF boot (the x86-64 default, 16 MiB... 2 MiB minimum).
pub const ELF_KERNEL_ALIGNMENT: u32 = 0x0100_0000;

/// CPUID leaf 1 ECX bit 13: CMPXCHG16B.
pub const CPUID_1_ECX_CX16: u32 = 1 << 13;
/// CPUID leaf 1 ECX bit 31: running under a hypervisor.
pub const CPUID_1_ECX_HYPERVISOR: u32 = 1 << 31;

/// LAPIC register offset: LVT LINT0.
pub const APIC_LVT0: usize = 0x350;
/// LAPIC register offset: LVT LINT1.
pub const APIC_LVT1: usize = 0x360;
/// LVT delivery mode ExtINT.
pub const APIC_MODE_EXTINT: u32 = 0x7;
/// LVT delivery mode NMI.
pub const APIC_MODE_NMI: u32 = 0x4;

/// `boot_params` as vm-memory bytes.
#[derive(Clone, Copy, Default)]
pub struct BootParams(pub boot_params);

impl std::fmt::Debug for BootParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BootParams").finish_non_exhaustive()
    }
}

// SAFETY: `boot_params` is a `repr(C, packed)` struct of integers and arrays of
// integers (bindgen output of the kernel's uapi header): no padding, no pointers, and
// every bit pattern is a valid value.
unsafe impl ByteValued for BootParams {}

/// Where the initrd sits in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitrdPlacement {
    /// First byte.
    pub addr: GuestAddress,
    /// Size in bytes.
    pub size: u32,
}

/// The e820 map for `mem_size` bytes of RAM from 0 (below the MMIO hole): low RAM up
/// to the EBDA, and everything from 1 MiB.
pub fn e820_map(mem_size: u64) -> Vec<boot_e820_entry> {
    vec![
        boot_e820_entry {
            addr: REAL_MODE_IVT_START.0,
            size: EBDA_START.0,
            r#type: E820_RAM,
        },
        boot_e820_entry {
            addr: HIMEM_START.0,
            size: mem_size.saturating_sub(HIMEM_START.0),
            r#type: E820_RAM,
        },
    ]
}

/// The setup header for an ELF vmlinux, which has none: the fields the kernel reads.
pub fn elf_setup_header() -> setup_header {
    setup_header {
        boot_flag: BOOT_FLAG_MAGIC,
        header: HDRS_MAGIC,
        kernel_alignment: ELF_KERNEL_ALIGNMENT,
        loadflags: LOADFLAGS_LOADED_HIGH,
        ..Default::default()
    }
}

/// Fill the zero page: setup header (from the bzImage, or [`elf_setup_header`]),
/// command line, initrd, e820.
pub fn zero_page(
    hdr: setup_header,
    cmdline_len_with_nul: u32,
    initrd: Option<InitrdPlacement>,
    mem_size: u64,
) -> BootParams {
    let mut p = boot_params {
        hdr,
        ..Default::default()
    };
    p.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    p.hdr.cmd_line_ptr = u32::try_from(CMDLINE_START.0).expect("the command line sits below 4 GiB");
    p.hdr.cmdline_size = cmdline_len_with_nul;
    if let Some(i) = initrd {
        p.hdr.ramdisk_image = u32::try_from(i.addr.0).expect("initrd placed below 4 GiB");
        p.hdr.ramdisk_size = i.size;
    }
    let map = e820_map(mem_size);
    for (slot, e) in p.e820_table.iter_mut().zip(&map) {
        *slot = *e;
    }
    p.e820_entries = u8::try_from(map.len()).expect("a short e820 map");
    BootParams(p)
}

/// Where a kernel loaded by linux-loader starts in 64-bit mode.
pub fn entry_point(kernel_load: GuestAddress, bzimage_hdr: Option<&setup_header>) -> GuestAddress {
    match bzimage_hdr {
        Some(_) => GuestAddress(kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET),
        None => kernel_load,
    }
}

/// True when a bzImage header says the kernel can be entered in 64-bit mode.
pub fn bzimage_has_64bit_entry(hdr: &setup_header) -> bool {
    hdr.xloadflags & XLF_KERNEL_64 != 0 && u64::from(hdr.code32_start) >= KERNEL_LOAD_START.0
}

/// Edit the supported CPUID for vCPU `index` of `count`: APIC IDs, the hypervisor bit,
/// and (for PVM, whose emulator lacks it) CMPXCHG16B hidden.
pub fn fixup_cpuid(cpuid: &mut CpuId, index: u32, count: u32, hide_cx16: bool) {
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                // EBX[31:24] initial APIC ID, EBX[23:16] logical processors per package.
                e.ebx = (e.ebx & 0x0000_ffff) | (index << 24) | ((count & 0xff) << 16);
                e.ecx |= CPUID_1_ECX_HYPERVISOR;
                if hide_cx16 {
                    e.ecx &= !CPUID_1_ECX_CX16;
                }
            }
            0xb | 0x1f => e.edx = index,
            _ => {}
        }
    }
}

fn lapic_reg(l: &kvm_lapic_state, off: usize) -> u32 {
    let b: Vec<u8> = l.regs[off..off + 4]
        .iter()
        .map(|&c| c.to_ne_bytes()[0])
        .collect();
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn set_lapic_reg(l: &mut kvm_lapic_state, off: usize, v: u32) {
    for (d, s) in l.regs[off..off + 4].iter_mut().zip(v.to_le_bytes()) {
        *d = std::os::raw::c_char::from_ne_bytes([s]);
    }
}

/// LINT0 as ExtINT (the PIC's interrupts), LINT1 as NMI, as a PC's BIOS leaves them.
pub fn setup_lint(l: &mut kvm_lapic_state) {
    let set_mode = |v: u32, mode: u32| (v & !0x700) | (mode << 8);
    let lvt0 = lapic_reg(l, APIC_LVT0);
    set_lapic_reg(l, APIC_LVT0, set_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(l, APIC_LVT1);
    set_lapic_reg(l, APIC_LVT1, set_mode(lvt1, APIC_MODE_NMI));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::MIB;

    #[test]
    fn zero_page_fields() {
        let p = zero_page(
            elf_setup_header(),
            20,
            Some(InitrdPlacement {
                addr: GuestAddress(0x3000_0000),
                size: 0x1234,
            }),
            256 * MIB,
        )
        .0;
        let hdr = p.hdr;
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!({ hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ hdr.cmdline_size }, 20);
        assert_eq!({ hdr.ramdisk_image }, 0x3000_0000);
        assert_eq!({ hdr.ramdisk_size }, 0x1234);
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!(p.e820_entries, 2);
        let e1 = p.e820_table[1];
        assert_eq!(
            ({ e1.addr }, { e1.size }, { e1.r#type }),
            (MIB, 255 * MIB, E820_RAM)
        );
        // The zero page is exactly one page.
        assert_eq!(std::mem::size_of::<boot_params>(), 4096);
    }

    #[test]
    fn entry_points() {
        let hdr = setup_header {
            xloadflags: 1,
            code32_start: 0x10_0000,
            ..Default::default()
        };
        assert!(bzimage_has_64bit_entry(&hdr));
        assert_eq!(
            entry_point(GuestAddress(0x10_0000), Some(&hdr)),
            GuestAddress(0x10_0200)
        );
        assert_eq!(
            entry_point(GuestAddress(0x100_0000), None),
            GuestAddress(0x100_0000)
        );
        assert!(!bzimage_has_64bit_entry(&setup_header::default()));
    }

    #[test]
    fn cpuid_fixups() {
        let mut c = CpuId::new(2).expect("cpuid");
        c.as_mut_slice()[0].function = 1;
        c.as_mut_slice()[0].ebx = 0xff00_1234;
        c.as_mut_slice()[0].ecx = CPUID_1_ECX_CX16 | 1;
        c.as_mut_slice()[1].function = 0xb;
        fixup_cpuid(&mut c, 3, 4, true);
        let e = c.as_slice()[0];
        assert_eq!(e.ebx, 0x0304_1234);
        assert_eq!(e.ecx, CPUID_1_ECX_HYPERVISOR | 1);
        assert_eq!(c.as_slice()[1].edx, 3);
    }

    #[test]
    fn lint_pins() {
        let mut l = kvm_lapic_state::default();
        set_lapic_reg(&mut l, APIC_LVT0, 0x0001_0000);
        setup_lint(&mut l);
        assert_eq!(lapic_reg(&l, APIC_LVT0), 0x0001_0700);
        assert_eq!(lapic_reg(&l, APIC_LVT1), 0x400);
    }
}
