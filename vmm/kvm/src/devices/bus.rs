//! The port-I/O bus: port -> (device, offset). Only this bus knows addresses.

use super::DevicesError;
use crate::layout::PortRange;
use std::sync::{Arc, Mutex};

/// What a device write asks of the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PioEffect {
    /// Nothing beyond the write itself.
    None,
    /// The guest asked for a CPU reset (i8042 command 0xfe): the run ends.
    Reset,
}

/// A device on the port-I/O bus; it sees offsets from its base port, never ports.
pub trait PioDevice: Send + std::fmt::Debug {
    /// Fill `data` from register `offset`.
    fn read(&mut self, offset: u16, data: &mut [u8]);
    /// Write `data` to register `offset`.
    fn write(&mut self, offset: u16, data: &[u8]) -> Result<PioEffect, DevicesError>;
}

/// A shared device handle.
pub type SharedDevice = Arc<Mutex<dyn PioDevice>>;

/// Port ranges and the devices behind them; cheap to clone (one per vCPU thread).
#[derive(Debug, Clone, Default)]
pub struct PioBus {
    devices: Vec<(PortRange, SharedDevice)>,
}

impl PioBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Put `device` at `range`; ranges must not overlap.
    pub fn insert(&mut self, range: PortRange, device: SharedDevice) -> Result<(), DevicesError> {
        let end = u32::from(range.base) + u32::from(range.len);
        let overlaps = self.devices.iter().any(|(r, _)| {
            let r_end = u32::from(r.base) + u32::from(r.len);
            u32::from(range.base) < r_end && u32::from(r.base) < end
        });
        if overlaps {
            return Err(DevicesError::Overlap(range.base));
        }
        self.devices.push((range, device));
        Ok(())
    }

    fn find(&self, port: u16) -> Option<(u16, &SharedDevice)> {
        self.devices
            .iter()
            .find(|(r, _)| r.contains(port))
            .map(|(r, d)| (port - r.base, d))
    }

    /// An `in`: fill `data` from the device at `port`; all ones when there is none
    /// (what an empty ISA bus reads). Returns whether a device answered.
    pub fn read(&self, port: u16, data: &mut [u8]) -> bool {
        match self.find(port) {
            Some((offset, dev)) => {
                dev.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// An `out` to `port`; `Ok(None)` when no device sits there.
    pub fn write(&self, port: u16, data: &[u8]) -> Result<Option<PioEffect>, DevicesError> {
        match self.find(port) {
            Some((offset, dev)) => dev
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .write(offset, data)
                .map(Some),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default)]
    struct Recorder(Vec<(u16, Vec<u8>)>);
    impl PioDevice for Recorder {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data.fill(u8::try_from(offset).expect("small offset"));
        }
        fn write(&mut self, offset: u16, data: &[u8]) -> Result<PioEffect, DevicesError> {
            self.0.push((offset, data.to_vec()));
            Ok(PioEffect::None)
        }
    }

    #[test]
    fn routes_by_offset_and_rejects_overlap() {
        let rec = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = PioBus::new();
        bus.insert(
            PortRange {
                base: 0x100,
                len: 4,
            },
            rec.clone(),
        )
        .expect("free range");
        assert!(matches!(
            bus.insert(
                PortRange {
                    base: 0x103,
                    len: 1
                },
                rec.clone()
            ),
            Err(DevicesError::Overlap(0x103))
        ));
        assert_eq!(
            bus.write(0x102, &[7]).expect("write"),
            Some(PioEffect::None)
        );
        assert_eq!(bus.write(0x104, &[7]).expect("write"), None);
        let mut b = [0u8; 1];
        assert!(bus.read(0x103, &mut b));
        assert_eq!(b, [3]);
        assert!(!bus.read(0x99, &mut b));
        assert_eq!(b, [0xff]);
        assert_eq!(rec.lock().expect("lock").0, vec![(2, vec![7])]);
    }
}
