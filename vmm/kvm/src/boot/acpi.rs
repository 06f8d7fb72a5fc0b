//! ACPI tables, so Linux finds every vCPU (its cloud config has no MP tables): RSDP,
//! XSDT, FADT (hardware-reduced), a DSDT describing the two UARTs and the RTC, and a MADT with one
//! local APIC per vCPU, the I/O APIC and the PC's IRQ 0 -> GSI 2 override. Pure: bytes
//! out. The DSDT's AML comes from rust-vmm's `acpi_tables`.

use acpi_tables::{aml, Aml, AmlSink};

use crate::layout::{
    PortRange, ACPI_TABLES_SIZE, ACPI_TABLES_START, APIC_START, IOAPIC_START, RSDP_START, RTC,
    SERIAL_COM1, SERIAL_COM1_IRQ, SERIAL_COM2, SERIAL_COM2_IRQ,
};

/// OEM id written in every table.
pub const OEM_ID: [u8; 6] = *b"ORNAMT";
/// OEM table id.
pub const OEM_TABLE_ID: [u8; 8] = *b"ORNAMENT";
/// Length of the common table header.
pub const HEADER_LEN: usize = 36;
/// FADT flag: hardware-reduced ACPI (no PM timer, no SCI, no legacy fixed hardware).
pub const FADT_HW_REDUCED_ACPI: u32 = 1 << 20;
/// FADT flags: power and sleep buttons are control-method devices (none).
pub const FADT_PWR_SLP_BUTTON: u32 = (1 << 4) | (1 << 5);
/// ISA IRQs given identity overrides in the MADT: COM2 (3) and COM1 (4).
pub const ISA_IRQS_MAPPED: [u8; 2] = [3, 4];
/// MADT flag: the machine also has dual 8259 PICs.
pub const MADT_PCAT_COMPAT: u32 = 1;

/// Why the tables could not be laid out.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum AcpiError {
    /// {0} vCPUs do not fit the MADT (at most 255 xAPIC ids)
    TooManyCpus(u32),
    /// the ACPI tables need {0} bytes, more than their reserved area
    TooBig(usize),
}

/// Sum-to-zero checksum byte of `bytes` (computed with the checksum field at 0).
pub fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

fn header(sig: &[u8; 4], len: usize, revision: u8) -> Vec<u8> {
    let mut h = Vec::with_capacity(len);
    h.extend_from_slice(sig);
    h.extend_from_slice(&u32::try_from(len).expect("small table").to_le_bytes());
    h.push(revision);
    h.push(0); // checksum, filled last
    h.extend_from_slice(&OEM_ID);
    h.extend_from_slice(&OEM_TABLE_ID);
    h.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    h.extend_from_slice(b"ORNA"); // creator id
    h.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    h
}

fn finish(mut t: Vec<u8>) -> Vec<u8> {
    let len = u32::try_from(t.len()).expect("small table").to_le_bytes();
    t[4..8].copy_from_slice(&len);
    t[9] = 0;
    t[9] = checksum(&t);
    t
}

/// One ISA device under `\_SB` (`_HID`, `_UID`, and a `_CRS` of its ports and, when it
/// has one, its interrupt).
fn isa_device_aml(
    name: &str,
    hid: &str,
    uid: u8,
    ports: PortRange,
    irq: Option<u32>,
    out: &mut Vec<u8>,
) {
    let len = u8::try_from(ports.len).unwrap_or(8);
    let hid = aml::EISAName::new(hid);
    let io = aml::IO::new(ports.base, ports.base, 1, len);
    // Consumer, edge-triggered, active high, exclusive: the ISA line the VMM's irqfd
    // raises.
    let int = irq.map(|irq| aml::Interrupt::new(true, true, false, false, irq));
    let mut resources: Vec<&dyn Aml> = vec![&io];
    if let Some(int) = &int {
        resources.push(int);
    }
    let crs = aml::ResourceTemplate::new(resources);
    let hid_name = aml::Name::new("_HID".into(), &hid);
    let uid_name = aml::Name::new("_UID".into(), &uid);
    let crs_name = aml::Name::new("_CRS".into(), &crs);
    aml::Device::new(name.into(), vec![&hid_name, &uid_name, &crs_name]).to_aml_bytes(out);
}

/// The DSDT: COM1, COM2 and the CMOS RTC under `\_SB`. With a hardware-reduced FADT
/// Linux has no legacy PIC and maps no ISA IRQ by itself, so the legacy 8250 ports'
/// `request_irq` fails and user space gets no console; described here, `8250_pnp` takes
/// the ports over with an interrupt mapped through the I/O APIC (as Firecracker and
/// Cloud Hypervisor describe theirs). The RTC (`PNP0B00`) is described without an
/// interrupt (its alarms and periodic interrupt are not modelled): left to the
/// kernel's own platform device, `rtc_cmos` asks for ISA IRQ 8, which no legacy PIC
/// backs here, and its probe fails (-EINVAL), so nothing sets the clock from it.
pub fn dsdt() -> Vec<u8> {
    let mut devices = Vec::new();
    let com1 = Some(SERIAL_COM1_IRQ);
    isa_device_aml("COM1", "PNP0501", 1, SERIAL_COM1, com1, &mut devices);
    let com2 = Some(SERIAL_COM2_IRQ);
    isa_device_aml("COM2", "PNP0501", 2, SERIAL_COM2, com2, &mut devices);
    isa_device_aml("RTC_", "PNP0B00", 0, RTC, None, &mut devices);
    let mut t = header(b"DSDT", HEADER_LEN, 2);
    let body = RawAml(&devices);
    aml::Scope::new("\\_SB_".into(), vec![&body]).to_aml_bytes(&mut t);
    finish(t)
}

/// Already-encoded AML, nested as one child.
struct RawAml<'a>(&'a [u8]);

impl Aml for RawAml<'_> {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        for b in self.0 {
            sink.byte(*b);
        }
    }
}

/// A hardware-reduced FADT (revision 6.5) pointing at the DSDT.
pub fn fadt(dsdt_addr: u64) -> Vec<u8> {
    const LEN: usize = 276;
    let mut t = header(b"FACP", LEN, 6);
    t.resize(LEN, 0);
    let dsdt32 = u32::try_from(dsdt_addr).unwrap_or(0);
    t[40..44].copy_from_slice(&dsdt32.to_le_bytes());
    t[112..116].copy_from_slice(&(FADT_HW_REDUCED_ACPI | FADT_PWR_SLP_BUTTON).to_le_bytes());
    t[131] = 5; // FADT minor version
    t[140..148].copy_from_slice(&dsdt_addr.to_le_bytes()); // X_DSDT
    t[268..276].copy_from_slice(b"ORNAMENT"); // hypervisor vendor identity
    finish(t)
}

/// The MADT: one enabled local APIC per vCPU (ids 0..n), the I/O APIC (id n, GSI 0),
/// and the ISA IRQ 0 -> GSI 2 override KVM's default routing implies.
pub fn madt(vcpus: u32) -> Result<Vec<u8>, AcpiError> {
    if vcpus == 0 || vcpus > 254 {
        return Err(AcpiError::TooManyCpus(vcpus));
    }
    let mut t = header(b"APIC", HEADER_LEN, 5);
    t.extend_from_slice(
        &u32::try_from(APIC_START.0)
            .expect("below 4 GiB")
            .to_le_bytes(),
    );
    t.extend_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    for i in 0..vcpus {
        let id = u8::try_from(i).map_err(|_| AcpiError::TooManyCpus(vcpus))?;
        t.extend_from_slice(&[0, 8, id, id]); // type 0: processor local APIC, uid, APIC id
        t.extend_from_slice(&1u32.to_le_bytes()); // enabled
    }
    let ioapic_id = u8::try_from(vcpus).map_err(|_| AcpiError::TooManyCpus(vcpus))?;
    t.extend_from_slice(&[1, 12, ioapic_id, 0]); // type 1: I/O APIC
    t.extend_from_slice(
        &u32::try_from(IOAPIC_START.0)
            .expect("below 4 GiB")
            .to_le_bytes(),
    );
    t.extend_from_slice(&0u32.to_le_bytes()); // GSI base
    t.extend_from_slice(&[2, 10, 0, 0]); // type 2: override, ISA bus, IRQ 0
    t.extend_from_slice(&2u32.to_le_bytes()); // -> GSI 2
    t.extend_from_slice(&0u16.to_le_bytes()); // flags: bus defaults
                                              // Identity entries for the UARTs' ISA IRQs: with a hardware-reduced FADT Linux has
                                              // no legacy PIC and maps no ISA IRQ by default, so without these `request_irq(4)`
                                              // fails and the tty on ttyS0 (user space's console) cannot be opened.
    for irq in ISA_IRQS_MAPPED {
        t.extend_from_slice(&[2, 10, 0, irq]); // type 2: override, ISA bus, IRQ n
        t.extend_from_slice(&u32::from(irq).to_le_bytes()); // -> GSI n
        t.extend_from_slice(&0u16.to_le_bytes()); // flags: bus defaults (edge, high)
    }
    Ok(finish(t))
}

/// The XSDT listing `tables`.
pub fn xsdt(tables: &[u64]) -> Vec<u8> {
    let mut t = header(b"XSDT", HEADER_LEN, 1);
    for a in tables {
        t.extend_from_slice(&a.to_le_bytes());
    }
    finish(t)
}

/// The ACPI 2.0 RSDP pointing at the XSDT.
pub fn rsdp(xsdt_addr: u64) -> Vec<u8> {
    let mut r = Vec::with_capacity(36);
    r.extend_from_slice(b"RSD PTR ");
    r.push(0); // checksum over the first 20 bytes
    r.extend_from_slice(&OEM_ID);
    r.push(2); // revision: ACPI 2.0+
    r.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    r.extend_from_slice(&36u32.to_le_bytes());
    r.extend_from_slice(&xsdt_addr.to_le_bytes());
    r.push(0); // extended checksum over all 36 bytes
    r.extend_from_slice(&[0; 3]);
    r[8] = checksum(&r[..20]);
    r[32] = checksum(&r);
    r
}

/// Every table with its guest-physical address: the RSDP at [`RSDP_START`], the rest
/// packed from [`ACPI_TABLES_START`] (8-byte aligned).
pub fn tables(vcpus: u32) -> Result<Vec<(u64, Vec<u8>)>, AcpiError> {
    let mut at = ACPI_TABLES_START.0;
    let mut out = Vec::new();
    let mut place = |bytes: Vec<u8>, out: &mut Vec<(u64, Vec<u8>)>| {
        let a = at;
        at += (bytes.len() as u64).div_ceil(8) * 8;
        out.push((a, bytes));
        a
    };
    let dsdt_at = place(dsdt(), &mut out);
    let fadt_at = place(fadt(dsdt_at), &mut out);
    let madt_at = place(madt(vcpus)?, &mut out);
    let xsdt_at = place(xsdt(&[fadt_at, madt_at]), &mut out);
    let used = usize::try_from(at - ACPI_TABLES_START.0).unwrap_or(usize::MAX);
    if used as u64 > ACPI_TABLES_SIZE {
        return Err(AcpiError::TooBig(used));
    }
    out.push((RSDP_START.0, rsdp(xsdt_at)));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sums_to_zero(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x)) == 0
    }

    #[test]
    fn every_table_checks_out() {
        let t = tables(2).expect("tables");
        assert_eq!(t.len(), 5);
        for (_, b) in &t[..4] {
            assert!(sums_to_zero(b), "{:?}", &b[..4]);
            let len = u32::from_le_bytes([b[4], b[5], b[6], b[7]]) as usize;
            assert_eq!(len, b.len());
        }
        let (at, r) = &t[4];
        assert_eq!(*at, RSDP_START.0);
        assert_eq!(&r[..8], b"RSD PTR ");
        assert!(sums_to_zero(&r[..20]));
        assert!(sums_to_zero(r));
        let xsdt_at = u64::from_le_bytes(r[24..32].try_into().expect("8 bytes"));
        assert_eq!(xsdt_at, t[3].0);
        // The XSDT lists the FADT and MADT.
        let x = &t[3].1;
        assert_eq!(x[HEADER_LEN..].len(), 16);
        assert_eq!(u64::from_le_bytes(x[36..44].try_into().expect("8")), t[1].0);
        assert_eq!(u64::from_le_bytes(x[44..52].try_into().expect("8")), t[2].0);
    }

    #[test]
    fn madt_entries() {
        let m = madt(2).expect("madt");
        // header, LAPIC address + flags, 2 x 8, 12, 10 (IRQ 0), 2 x 10 (IRQs 3, 4).
        assert_eq!(m.len(), 36 + 8 + 16 + 12 + 10 + 20);
        assert_eq!(&m[82..86], &[2, 10, 0, 3]);
        assert_eq!(&m[92..96], &[2, 10, 0, 4]);
        assert_eq!(&m[44..52], &[0, 8, 0, 0, 1, 0, 0, 0]);
        assert_eq!(&m[52..60], &[0, 8, 1, 1, 1, 0, 0, 0]);
        assert_eq!(&m[60..64], &[1, 12, 2, 0]);
        assert!(matches!(madt(0), Err(AcpiError::TooManyCpus(0))));
        assert!(matches!(madt(300), Err(AcpiError::TooManyCpus(300))));
    }

    #[test]
    fn fadt_points_at_dsdt() {
        let f = fadt(0xe1000);
        assert_eq!(f.len(), 276);
        assert_eq!(
            u32::from_le_bytes(f[112..116].try_into().expect("4")) & FADT_HW_REDUCED_ACPI,
            FADT_HW_REDUCED_ACPI
        );
        assert_eq!(
            u64::from_le_bytes(f[140..148].try_into().expect("8")),
            0xe1000
        );
    }

    #[test]
    fn dsdt_describes_both_uarts_and_the_rtc() {
        let d = dsdt();
        assert!(sums_to_zero(&d));
        assert_eq!(&d[..4], b"DSDT");
        let body = &d[HEADER_LEN..];
        // Scope(\_SB_) then three Device()s (ExtOpPrefix 0x5b, DeviceOp 0x82).
        assert_eq!(body[0], 0x10);
        assert_eq!(body.windows(2).filter(|w| w == &[0x5b, 0x82]).count(), 3);
        for (name, port, irq) in [(b"COM1", 0x3f8u16, 4u8), (b"COM2", 0x2f8, 3)] {
            assert!(body.windows(4).any(|w| w == name));
            // IO port descriptor: decode16, min, max, alignment 1, 8 ports.
            let [lo, hi] = port.to_le_bytes();
            let io = [0x47, 1, lo, hi, lo, hi, 1, 8];
            assert!(body.windows(8).any(|w| w == io), "{}", port);
            // Extended IRQ descriptor: consumer + edge, one GSI.
            let int = [0x89, 6, 0, 0b11, 1, irq, 0, 0, 0];
            assert!(body.windows(9).any(|w| w == int), "{}", irq);
        }
        // EISA id PNP0501 (compressed "PNP" + 0x0501).
        assert_eq!(
            body.windows(5)
                .filter(|w| w == &[0x0c, 0x41, 0xd0, 0x05, 0x01])
                .count(),
            2
        );
        // The RTC: EISA id PNP0B00, ports 0x70-0x71, and no interrupt descriptor
        // (0x89) between its IO descriptor and the end of its resource template.
        assert!(body.windows(4).any(|w| w == b"RTC_"));
        assert!(body.windows(5).any(|w| w == [0x0c, 0x41, 0xd0, 0x0b, 0x00]));
        let io = [0x47, 1, 0x70, 0, 0x70, 0, 1, 2];
        let at = body
            .windows(8)
            .position(|w| w == io)
            .expect("the RTC's ports");
        assert_eq!(body[at + 8], 0x79, "end tag right after the RTC's ports");
        if let Some(path) = std::env::var_os("ORNAMENT_DUMP_DSDT") {
            std::fs::write(path, &d).expect("write the DSDT");
        }
    }
}
