//! Every guest-physical address, size and I/O port of our machine, in address order.
//!
//! Nothing else in the crate writes a literal address or port: the boot code, the
//! device bus, the test harness and the trap backends all name a constant from here.
//! Ranges are derived from one another where they can be, and
//! [`memory_map`] / [`port_map`] list them for the non-overlap tests below.

use vm_memory::GuestAddress;

/// One KiB.
pub const KIB: u64 = 1 << 10;
/// One MiB.
pub const MIB: u64 = 1 << 20;
/// One GiB.
pub const GIB: u64 = 1 << 30;
/// Size of a 4 KiB page.
pub const PAGE_SIZE: u64 = 4 * KIB;

// ---------------------------------------------------------------------------
// Low memory (below 1 MiB): boot structures.
// ---------------------------------------------------------------------------

/// Real-mode interrupt vector table and BIOS data area; left untouched and reserved.
pub const REAL_MODE_IVT_START: GuestAddress = GuestAddress(0);
/// Size of the IVT + BDA area.
pub const REAL_MODE_IVT_SIZE: u64 = 0x500;

/// The boot GDT: null, null, 64-bit code (selector 0x10 = `__BOOT_CS`), data
/// (0x18 = `__BOOT_DS`), TSS (0x20); 8 bytes each, as the Linux boot protocol asks.
pub const BOOT_GDT_START: GuestAddress = GuestAddress(REAL_MODE_IVT_START.0 + REAL_MODE_IVT_SIZE);
/// Number of descriptors in the boot GDT.
pub const BOOT_GDT_ENTRIES: u64 = 5;
/// Size of the boot GDT in bytes.
pub const BOOT_GDT_SIZE: u64 = BOOT_GDT_ENTRIES * 8;
/// The boot IDT: empty (limit 0); the guest installs its own.
pub const BOOT_IDT_START: GuestAddress = GuestAddress(BOOT_GDT_START.0 + BOOT_GDT_SIZE);
/// Size reserved for the boot IDT.
pub const BOOT_IDT_SIZE: u64 = 8;

/// The Linux zero page (`struct boot_params`, one page).
pub const ZERO_PAGE_START: GuestAddress = GuestAddress(0x7000);
/// Size of the zero page.
pub const ZERO_PAGE_SIZE: u64 = PAGE_SIZE;

/// Top of the boot stack (grows down from here into the page below `PML4_START`).
pub const BOOT_STACK_POINTER: GuestAddress = GuestAddress(0x8ff0);
/// Bottom of the boot stack page.
pub const BOOT_STACK_START: GuestAddress = GuestAddress(0x8000);
/// Size of the boot stack page.
pub const BOOT_STACK_SIZE: u64 = PAGE_SIZE;

/// Identity page tables: PML4 (one page).
pub const PML4_START: GuestAddress = GuestAddress(0x9000);
/// Identity page tables: the PDPT (one page).
pub const PDPTE_START: GuestAddress = GuestAddress(PML4_START.0 + PAGE_SIZE);
/// Identity page tables: first page directory; there are [`PDE_PAGES`] of them.
pub const PDE_START: GuestAddress = GuestAddress(PDPTE_START.0 + PAGE_SIZE);
/// Number of page directories: each maps 1 GiB with 2 MiB pages.
pub const PDE_PAGES: u64 = 4;
/// How much the identity page tables map, from address 0.
pub const IDENTITY_MAP_SIZE: u64 = PDE_PAGES * GIB;
/// Total size of the page-table area.
pub const PAGE_TABLES_SIZE: u64 = (2 + PDE_PAGES) * PAGE_SIZE;

/// The kernel command line (NUL-terminated).
pub const CMDLINE_START: GuestAddress = GuestAddress(0x20000);
/// Largest command line we pass, terminator included.
pub const CMDLINE_MAX_SIZE: u64 = 4 * KIB;

/// Extended BIOS data area (reserved in the e820 map).
pub const EBDA_START: GuestAddress = GuestAddress(0x9_fc00);
/// End of conventional low memory (640 KiB); usable low RAM is `[0, EBDA_START)`.
pub const LOW_MEMORY_END: GuestAddress = GuestAddress(0xa_0000);
/// Size of the EBDA.
pub const EBDA_SIZE: u64 = LOW_MEMORY_END.0 - EBDA_START.0;

/// ACPI RSDP: the kernel scans `0xe0000..0x100000` for it.
pub const RSDP_START: GuestAddress = GuestAddress(0xe_0000);
/// Space reserved for the RSDP (36 bytes for revision 2).
pub const RSDP_SIZE: u64 = 64;
/// The other ACPI tables (XSDT, MADT, FADT, DSDT), one after another.
pub const ACPI_TABLES_START: GuestAddress = GuestAddress(RSDP_START.0 + PAGE_SIZE);
/// Space reserved for the ACPI tables.
pub const ACPI_TABLES_SIZE: u64 = 0x1_0000 - PAGE_SIZE;

/// Start of high memory: the bzImage's protected-mode kernel is loaded here.
pub const HIMEM_START: GuestAddress = GuestAddress(MIB);
/// Where a bzImage's protected-mode kernel goes (an ELF vmlinux uses its own
/// physical addresses, 16 MiB for Debian kernels).
pub const KERNEL_LOAD_START: GuestAddress = HIMEM_START;

// ---------------------------------------------------------------------------
// Test guests (hand-written code, no kernel); they reuse high memory.
// ---------------------------------------------------------------------------

/// Where hand-written test code is loaded.
pub const TEST_CODE_START: GuestAddress = HIMEM_START;
/// Space for test code.
pub const TEST_CODE_SIZE: u64 = 64 * KIB;
/// Test data area (counters, strings).
pub const TEST_DATA_START: GuestAddress = GuestAddress(TEST_CODE_START.0 + TEST_CODE_SIZE);
/// Size of the test data area.
pub const TEST_DATA_SIZE: u64 = 64 * KIB;
/// Per-vCPU stacks of test guests, [`TEST_STACK_SIZE`] each; vCPU `i`'s stack top is
/// [`test_stack_top`]`(i)`.
pub const TEST_STACKS_START: GuestAddress = GuestAddress(TEST_DATA_START.0 + TEST_DATA_SIZE);
/// Stack size per test vCPU.
pub const TEST_STACK_SIZE: u64 = 16 * KIB;
/// Most vCPUs a test guest has stacks for.
pub const TEST_MAX_VCPUS: u64 = 8;
/// Guest RAM given to test guests.
pub const TEST_MEM_SIZE: u64 = 4 * MIB;

/// Top of test vCPU `index`'s stack (16-byte aligned), or `None` past [`TEST_MAX_VCPUS`].
pub const fn test_stack_top(index: u64) -> Option<GuestAddress> {
    if index >= TEST_MAX_VCPUS {
        return None;
    }
    Some(GuestAddress(
        TEST_STACKS_START.0 + (index + 1) * TEST_STACK_SIZE - 16,
    ))
}

// ---------------------------------------------------------------------------
// The 32-bit MMIO hole: no RAM between 3 GiB and 4 GiB.
// ---------------------------------------------------------------------------

/// Start of the MMIO hole below 4 GiB; guest RAM ends here (we place no RAM above 4 GiB).
pub const MMIO_GAP_START: GuestAddress = GuestAddress(3 * GIB);
/// Size of the MMIO hole.
pub const MMIO_GAP_SIZE: u64 = GIB;
/// The I/O APIC's registers.
pub const IOAPIC_START: GuestAddress = GuestAddress(0xfec0_0000);
/// The local APICs' registers (each vCPU sees its own here).
pub const APIC_START: GuestAddress = GuestAddress(0xfee0_0000);
/// KVM's TSS area (three pages, `KVM_SET_TSS_ADDR`), needed on VMX; at the top of the hole.
pub const KVM_TSS_ADDRESS: GuestAddress = GuestAddress(0xfffb_d000);
/// Most guest RAM we give: everything below the MMIO hole.
pub const MAX_MEM_SIZE: u64 = MMIO_GAP_START.0;

/// Highest end address (exclusive) of an initrd: the boot protocol's default
/// `initrd_addr_max` (0x37ffffff) + 1, used when the kernel header says nothing else.
pub const INITRD_DEFAULT_ADDR_MAX: u64 = 0x3800_0000;

/// Where the initrd goes: the highest page-aligned address at which `size` bytes fit
/// below both the end of RAM and `addr_max` (exclusive), and above `lowest` (the end of
/// the kernel); `None` when it does not fit.
pub fn initrd_placement(
    mem_end: u64,
    addr_max: u64,
    lowest: u64,
    size: u64,
) -> Option<GuestAddress> {
    let top = mem_end.min(addr_max);
    let start = top.checked_sub(size)? & !(PAGE_SIZE - 1);
    (start >= lowest).then_some(GuestAddress(start))
}

// ---------------------------------------------------------------------------
// I/O ports.
// ---------------------------------------------------------------------------

/// A range of I/O ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    /// First port.
    pub base: u16,
    /// Number of ports.
    pub len: u16,
}

impl PortRange {
    /// True when `port` lies in the range.
    pub const fn contains(self, port: u16) -> bool {
        port >= self.base && (port - self.base) < self.len
    }
}

/// The i8042 keyboard controller: data port 0x60 .. command port 0x64.
pub const I8042: PortRange = PortRange { base: 0x60, len: 5 };
/// The i8042 command port (write 0xfe: reset the CPU, which ends our guest).
pub const I8042_COMMAND_PORT: u16 = I8042.base + 4;
/// The i8042 command that resets the CPU.
pub const I8042_CMD_RESET_CPU: u8 = 0xfe;
/// The CMOS real-time clock: index port 0x70, data port 0x71.
pub const RTC: PortRange = PortRange { base: 0x70, len: 2 };
/// The POST diagnostic port: Linux writes it as an I/O delay; we put no device there,
/// and the benchmark's bare exits use it.
pub const POST_PORT: u16 = 0x80;
/// Test guests report values (a `u32` in EAX: the exit names this port, size 4) on
/// this port; it has no device.
pub const TEST_REPORT_PORT: u16 = 0xee;
/// A patched probe site exits on this port (`out PROBE_PORT, al`, encoded `e6 ef`).
/// Nothing in Linux uses it; it fits the `imm8` form of `out`.
pub const PROBE_PORT: u16 = 0xef;
/// COM1, the serial console (16550 UART, 8 registers).
pub const SERIAL_COM1: PortRange = PortRange {
    base: 0x3f8,
    len: 8,
};
/// COM1's interrupt line (ISA IRQ 4).
pub const SERIAL_COM1_IRQ: u32 = 4;
/// COM2 (the guest's ttyS1): ornament's /init reports `ornament-exit N` here.
pub const SERIAL_COM2: PortRange = PortRange {
    base: 0x2f8,
    len: 8,
};
/// COM2's interrupt line (ISA IRQ 3).
pub const SERIAL_COM2_IRQ: u32 = 3;

/// A named guest-physical range, for the overlap test and for documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// What lives there.
    pub name: &'static str,
    /// First address.
    pub start: GuestAddress,
    /// Size in bytes.
    pub size: u64,
}

/// The fixed guest-physical ranges of a Linux guest, in address order.
pub const fn memory_map() -> [Region; 12] {
    [
        Region {
            name: "real-mode IVT/BDA",
            start: REAL_MODE_IVT_START,
            size: REAL_MODE_IVT_SIZE,
        },
        Region {
            name: "boot GDT",
            start: BOOT_GDT_START,
            size: BOOT_GDT_SIZE,
        },
        Region {
            name: "boot IDT",
            start: BOOT_IDT_START,
            size: BOOT_IDT_SIZE,
        },
        Region {
            name: "zero page",
            start: ZERO_PAGE_START,
            size: ZERO_PAGE_SIZE,
        },
        Region {
            name: "boot stack",
            start: BOOT_STACK_START,
            size: BOOT_STACK_SIZE,
        },
        Region {
            name: "page tables",
            start: PML4_START,
            size: PAGE_TABLES_SIZE,
        },
        Region {
            name: "cmdline",
            start: CMDLINE_START,
            size: CMDLINE_MAX_SIZE,
        },
        Region {
            name: "EBDA",
            start: EBDA_START,
            size: EBDA_SIZE,
        },
        Region {
            name: "ACPI RSDP",
            start: RSDP_START,
            size: RSDP_SIZE,
        },
        Region {
            name: "ACPI tables",
            start: ACPI_TABLES_START,
            size: ACPI_TABLES_SIZE,
        },
        Region {
            name: "kernel (from 1 MiB)",
            start: KERNEL_LOAD_START,
            size: MMIO_GAP_START.0 - KERNEL_LOAD_START.0,
        },
        Region {
            name: "MMIO hole",
            start: MMIO_GAP_START,
            size: MMIO_GAP_SIZE,
        },
    ]
}

/// The fixed ranges of a test guest (no kernel), in address order.
pub const fn test_memory_map() -> [Region; 5] {
    [
        Region {
            name: "boot GDT",
            start: BOOT_GDT_START,
            size: BOOT_GDT_SIZE,
        },
        Region {
            name: "page tables",
            start: PML4_START,
            size: PAGE_TABLES_SIZE,
        },
        Region {
            name: "test code",
            start: TEST_CODE_START,
            size: TEST_CODE_SIZE,
        },
        Region {
            name: "test data",
            start: TEST_DATA_START,
            size: TEST_DATA_SIZE,
        },
        Region {
            name: "test stacks",
            start: TEST_STACKS_START,
            size: TEST_STACK_SIZE * TEST_MAX_VCPUS,
        },
    ]
}

/// Every port we give meaning to, in port order.
pub const fn port_map() -> [(&'static str, PortRange); 7] {
    [
        ("i8042", I8042),
        ("CMOS RTC", RTC),
        (
            "POST diagnostics (no device)",
            PortRange {
                base: POST_PORT,
                len: 1,
            },
        ),
        (
            "test report",
            PortRange {
                base: TEST_REPORT_PORT,
                len: 1,
            },
        ),
        (
            "probe",
            PortRange {
                base: PROBE_PORT,
                len: 1,
            },
        ),
        ("serial COM2", SERIAL_COM2),
        ("serial COM1", SERIAL_COM1),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_ordered_disjoint(regions: &[Region]) {
        for w in regions.windows(2) {
            let end = w[0].start.0.checked_add(w[0].size).expect("no overflow");
            assert!(
                end <= w[1].start.0,
                "{} [{:#x}, {:#x}) overlaps or follows {} at {:#x}",
                w[0].name,
                w[0].start.0,
                end,
                w[1].name,
                w[1].start.0
            );
        }
    }

    #[test]
    fn linux_memory_map_is_ordered_and_disjoint() {
        assert_ordered_disjoint(&memory_map());
    }

    #[test]
    fn test_memory_map_is_ordered_disjoint_and_fits() {
        let map = test_memory_map();
        assert_ordered_disjoint(&map);
        let last = map[map.len() - 1];
        assert!(last.start.0 + last.size <= TEST_MEM_SIZE);
    }

    #[test]
    fn ports_are_ordered_and_disjoint() {
        let ports = port_map();
        for w in ports.windows(2) {
            assert!(
                u32::from(w[0].1.base) + u32::from(w[0].1.len) <= u32::from(w[1].1.base),
                "{} overlaps {}",
                w[0].0,
                w[1].0
            );
        }
        const { assert!(PROBE_PORT <= 0xff, "the probe port must fit `out imm8, al`") };
        assert_eq!(SERIAL_COM1.base, 0x3f8);
        assert_eq!(SERIAL_COM2.base, 0x2f8);
        assert_eq!(I8042.base, 0x60);
        assert_eq!(I8042_COMMAND_PORT, 0x64);
        assert!(SERIAL_COM1.contains(0x3ff) && !SERIAL_COM1.contains(0x400));
    }

    #[test]
    fn devices_sit_in_the_mmio_hole() {
        let hole = MMIO_GAP_START.0..MMIO_GAP_START.0 + MMIO_GAP_SIZE;
        assert!(hole.contains(&IOAPIC_START.0));
        assert!(hole.contains(&APIC_START.0));
        assert!(hole.contains(&(KVM_TSS_ADDRESS.0 + 3 * PAGE_SIZE - 1)));
        assert_eq!(MMIO_GAP_START.0 + MMIO_GAP_SIZE, 4 * GIB);
        const { assert!(IDENTITY_MAP_SIZE >= MAX_MEM_SIZE) };
    }

    #[test]
    fn stacks() {
        assert_eq!(
            test_stack_top(0),
            Some(GuestAddress(TEST_STACKS_START.0 + TEST_STACK_SIZE - 16))
        );
        assert_eq!(test_stack_top(TEST_MAX_VCPUS), None);
        assert_eq!(test_stack_top(1).map(|a| a.0 % 16), Some(0));
    }

    #[test]
    fn initrd_goes_high_and_aligned() {
        // 64 MiB of RAM, 1 MiB + 0x1234 initrd: top of RAM, page-aligned.
        let at = initrd_placement(64 * MIB, INITRD_DEFAULT_ADDR_MAX, 16 * MIB, MIB + 0x1234);
        assert_eq!(at, Some(GuestAddress((64 * MIB - MIB - 0x1234) & !0xfff)));
        // The kernel's addr_max caps it.
        let at = initrd_placement(2 * GIB, INITRD_DEFAULT_ADDR_MAX, 16 * MIB, MIB);
        assert_eq!(at, Some(GuestAddress(INITRD_DEFAULT_ADDR_MAX - MIB)));
        // Does not fit above the kernel.
        assert_eq!(
            initrd_placement(32 * MIB, INITRD_DEFAULT_ADDR_MAX, 16 * MIB, 17 * MIB),
            None
        );
        assert_eq!(
            initrd_placement(MIB, INITRD_DEFAULT_ADDR_MAX, 0, 2 * MIB),
            None
        );
    }
}
