//! Legacy devices behind a port-I/O bus: the serial console, the i8042 (reset only) and
//! the CMOS real-time clock.

pub mod bus;
pub mod i8042;
pub mod rtc;
pub mod serial;

pub use bus::{PioBus, PioDevice, PioEffect};
pub use i8042::I8042;
pub use rtc::Rtc;
pub use serial::{Serial, SharedBuffer};

/// Why a device access failed.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum DevicesError {
    /// the serial device failed to write its output or raise its interrupt
    Serial(#[source] std::io::Error),
    /// port range at {0:#x} overlaps a device already on the bus
    Overlap(u16),
}
