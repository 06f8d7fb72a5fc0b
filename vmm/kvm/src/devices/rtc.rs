//! A minimal CMOS real-time clock (MC146818) on ports 0x70 (index) / 0x71 (data): the
//! host's UTC time in BCD, 24-hour mode, "update in progress" always clear, and 128
//! bytes of CMOS RAM for everything else.
//!
//! Without it every read of 0x71 is 0xff, so status register A shows "update in
//! progress" for ever and the kernel's boot-time clock read (`mach_get_cmos_time`
//! waiting for the update to end) spends seconds polling before giving up; the guest
//! then also starts in 1970. Alarms, periodic interrupts and writes to the time are
//! not modelled (writes land in CMOS RAM and the time keeps following the host).

use super::{DevicesError, PioDevice, PioEffect};
use std::time::{SystemTime, UNIX_EPOCH};

/// Register numbers (the index written to port 0x70).
pub mod reg {
    /// Seconds.
    pub const SECONDS: u8 = 0x00;
    /// Minutes.
    pub const MINUTES: u8 = 0x02;
    /// Hours.
    pub const HOURS: u8 = 0x04;
    /// Day of the week, 1 = Sunday.
    pub const WEEKDAY: u8 = 0x06;
    /// Day of the month.
    pub const DAY: u8 = 0x07;
    /// Month.
    pub const MONTH: u8 = 0x08;
    /// Year within the century.
    pub const YEAR: u8 = 0x09;
    /// Status A: bit 7 "update in progress", divider and rate.
    pub const STATUS_A: u8 = 0x0a;
    /// Status B: bit 1 24-hour mode, bit 2 binary (clear: BCD).
    pub const STATUS_B: u8 = 0x0b;
    /// Status C: interrupt flags (read clears).
    pub const STATUS_C: u8 = 0x0c;
    /// Status D: bit 7 "valid RAM and time".
    pub const STATUS_D: u8 = 0x0d;
    /// Century (the register ACPI's FADT names by default on PCs).
    pub const CENTURY: u8 = 0x32;
}

/// Status A: 32.768 kHz time base, 1024 Hz rate, update never in progress.
const STATUS_A_VALUE: u8 = 0x26;
/// Status B: 24-hour mode, BCD, no interrupts.
const STATUS_B_24H: u8 = 0x02;
/// Status D: valid RAM and time.
const STATUS_D_VALID: u8 = 0x80;
/// The index port's bit 7 masks NMIs; the register number is the low 7 bits.
const INDEX_MASK: u8 = 0x7f;
const CMOS_SIZE: usize = 128;

/// A broken-down UTC time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateTime {
    /// Full year, e.g. 2026.
    pub year: u32,
    /// 1-12.
    pub month: u8,
    /// 1-31.
    pub day: u8,
    /// 0-23.
    pub hour: u8,
    /// 0-59.
    pub minute: u8,
    /// 0-59.
    pub second: u8,
    /// 1 = Sunday .. 7 = Saturday.
    pub weekday: u8,
}

impl DateTime {
    /// The UTC date and time `secs` seconds after 1970-01-01 00:00:00.
    pub fn from_unix(secs: u64) -> Self {
        let days = secs / 86_400;
        let rem = secs % 86_400;
        // Civil-from-days on the proleptic Gregorian calendar, in 400-year eras
        // counted from 0000-03-01 (so that the leap day ends each year).
        let z = days + 719_468;
        let era = z / 146_097;
        let doe = z % 146_097;
        let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + u64::from(month <= 2);
        let narrow = |v: u64| u8::try_from(v).expect("a date field fits a byte");
        Self {
            year: u32::try_from(year).unwrap_or(u32::MAX),
            month: narrow(month),
            day: narrow(day),
            hour: narrow(rem / 3_600),
            minute: narrow(rem / 60 % 60),
            second: narrow(rem % 60),
            // 1970-01-01 was a Thursday (5 with Sunday = 1).
            weekday: narrow((days + 4) % 7 + 1),
        }
    }
}

/// Two decimal digits as BCD.
pub fn bcd(v: u8) -> u8 {
    ((v / 10) << 4) | (v % 10)
}

/// The clock: the selected register, CMOS RAM, and where the time comes from.
#[derive(Debug)]
pub struct Rtc {
    index: u8,
    ram: [u8; CMOS_SIZE],
    now: fn() -> u64,
}

impl Default for Rtc {
    fn default() -> Self {
        Self::new()
    }
}

fn host_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Rtc {
    /// A clock following the host's time.
    pub fn new() -> Self {
        Self::with_clock(host_now)
    }

    /// A clock reading seconds since the epoch from `now` (tests).
    pub fn with_clock(now: fn() -> u64) -> Self {
        let mut ram = [0u8; CMOS_SIZE];
        ram[usize::from(reg::STATUS_A)] = STATUS_A_VALUE;
        ram[usize::from(reg::STATUS_B)] = STATUS_B_24H;
        ram[usize::from(reg::STATUS_D)] = STATUS_D_VALID;
        Self { index: 0, ram, now }
    }

    /// The value of register `r`.
    pub fn register(&self, r: u8) -> u8 {
        let t = DateTime::from_unix((self.now)());
        let year = u8::try_from(t.year % 100).expect("below 100");
        let century = u8::try_from(t.year / 100 % 100).expect("below 100");
        match r {
            reg::SECONDS => bcd(t.second),
            reg::MINUTES => bcd(t.minute),
            reg::HOURS => bcd(t.hour),
            reg::WEEKDAY => bcd(t.weekday),
            reg::DAY => bcd(t.day),
            reg::MONTH => bcd(t.month),
            reg::YEAR => bcd(year),
            reg::CENTURY => bcd(century),
            // Update never in progress, whatever the guest wrote.
            reg::STATUS_A => self.ram[usize::from(r)] & !0x80,
            reg::STATUS_C => 0,
            _ => self.ram[usize::from(r & INDEX_MASK)],
        }
    }
}

impl PioDevice for Rtc {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let v = match offset {
            1 => self.register(self.index),
            _ => 0xff,
        };
        data.fill(v);
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> Result<PioEffect, DevicesError> {
        let Some(&v) = data.first() else {
            return Ok(PioEffect::None);
        };
        match offset {
            0 => self.index = v & INDEX_MASK,
            1 => {
                let r = self.index;
                // The time registers follow the host; status C and D are read-only.
                let time = [
                    reg::SECONDS,
                    reg::MINUTES,
                    reg::HOURS,
                    reg::WEEKDAY,
                    reg::DAY,
                    reg::MONTH,
                    reg::YEAR,
                    reg::CENTURY,
                    reg::STATUS_C,
                    reg::STATUS_D,
                ];
                if !time.contains(&r) {
                    self.ram[usize::from(r)] = v;
                }
            }
            _ => {}
        }
        Ok(PioEffect::None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-12-02 17:45:09 UTC, a Wednesday.
    const WHEN: u64 = 1_796_233_509;

    fn read(rtc: &mut Rtc, r: u8) -> u8 {
        rtc.write(0, &[r | 0x80]).expect("index");
        let mut b = [0u8];
        rtc.read(1, &mut b);
        b[0]
    }

    #[test]
    fn dates_from_unix_time() {
        assert_eq!(
            DateTime::from_unix(0),
            DateTime {
                year: 1970,
                month: 1,
                day: 1,
                hour: 0,
                minute: 0,
                second: 0,
                weekday: 5
            }
        );
        assert_eq!(
            DateTime::from_unix(WHEN),
            DateTime {
                year: 2026,
                month: 12,
                day: 2,
                hour: 17,
                minute: 45,
                second: 9,
                weekday: 4
            }
        );
        // A leap day, and the day after it.
        let feb29 = DateTime::from_unix(951_782_400);
        assert_eq!((feb29.year, feb29.month, feb29.day), (2000, 2, 29));
        let mar1 = DateTime::from_unix(951_782_400 + 86_400);
        assert_eq!((mar1.month, mar1.day), (3, 1));
        let eoy = DateTime::from_unix(1_798_761_599);
        assert_eq!(
            (eoy.year, eoy.month, eoy.day, eoy.hour, eoy.minute, eoy.second),
            (2026, 12, 31, 23, 59, 59)
        );
    }

    #[test]
    fn registers_read_as_a_pc_clock() {
        let mut rtc = Rtc::with_clock(|| WHEN);
        assert_eq!(read(&mut rtc, reg::SECONDS), 0x09);
        assert_eq!(read(&mut rtc, reg::MINUTES), 0x45);
        assert_eq!(read(&mut rtc, reg::HOURS), 0x17);
        assert_eq!(read(&mut rtc, reg::WEEKDAY), 0x04);
        assert_eq!(read(&mut rtc, reg::DAY), 0x02);
        assert_eq!(read(&mut rtc, reg::MONTH), 0x12);
        assert_eq!(read(&mut rtc, reg::YEAR), 0x26);
        assert_eq!(read(&mut rtc, reg::CENTURY), 0x20);
        // No update in progress (what the kernel polls for), 24-hour BCD, valid.
        assert_eq!(read(&mut rtc, reg::STATUS_A), 0x26);
        assert_eq!(read(&mut rtc, reg::STATUS_B), 0x02);
        assert_eq!(read(&mut rtc, reg::STATUS_D), 0x80);
        // The index port itself reads as nothing.
        let mut b = [0u8];
        rtc.read(0, &mut b);
        assert_eq!(b[0], 0xff);
    }

    #[test]
    fn cmos_ram_keeps_writes_but_not_over_the_clock() {
        let mut rtc = Rtc::with_clock(|| WHEN);
        rtc.write(0, &[0x40]).expect("index");
        rtc.write(1, &[0x5a]).expect("data");
        assert_eq!(read(&mut rtc, 0x40), 0x5a);
        rtc.write(0, &[reg::SECONDS]).expect("index");
        rtc.write(1, &[0x30]).expect("data");
        assert_eq!(read(&mut rtc, reg::SECONDS), 0x09);
        // Setting UIP in status A does not make an update appear to run.
        rtc.write(0, &[reg::STATUS_A]).expect("index");
        rtc.write(1, &[0xa6]).expect("data");
        assert_eq!(read(&mut rtc, reg::STATUS_A), 0x26);
    }
}
