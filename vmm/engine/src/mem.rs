//! Guest-physical memory as `introspect` sees it: one read (and one write) call.
//!
//! Where the bytes come from (KVM's mapping, QEMU's shared RAM file, a test slice)
//! is the engine's business; what they mean is `introspect`'s.

use crate::addr::Gpa;

/// Why a guest-physical access failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, displaydoc::Display)]
pub enum MemError {
    /// guest-physical range {gpa} + {len} bytes is outside guest RAM
    OutOfRange {
        /// First address of the access.
        gpa: Gpa,
        /// Length of the access.
        len: u64,
    },
    /// this memory source cannot be written
    ReadOnly,
}

/// Guest-physical memory.
pub trait PhysMemory: Send + Sync {
    /// Fill `buf` from guest-physical address `gpa`; all or nothing.
    fn read_phys(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), MemError>;
    /// Write `buf` at guest-physical address `gpa`; all or nothing.
    fn write_phys(&self, gpa: Gpa, buf: &[u8]) -> Result<(), MemError>;
    /// Size of guest RAM in bytes as this source sees it (highest address + 1).
    fn size(&self) -> u64;
}

/// Guest memory held in a byte vector: for tests and synthetic guests.
#[derive(Debug, Default)]
pub struct SliceMemory {
    bytes: std::sync::RwLock<Vec<u8>>,
}

impl SliceMemory {
    /// Zeroed memory of `size` bytes.
    pub fn new(size: usize) -> Self {
        Self {
            bytes: std::sync::RwLock::new(vec![0; size]),
        }
    }

    fn range(&self, gpa: Gpa, len: usize, size: usize) -> Result<std::ops::Range<usize>, MemError> {
        let err = MemError::OutOfRange {
            gpa,
            len: len as u64,
        };
        let start = usize::try_from(gpa.raw()).map_err(|_| err.clone())?;
        let end = start.checked_add(len).ok_or_else(|| err.clone())?;
        if end > size {
            return Err(err);
        }
        Ok(start..end)
    }
}

impl PhysMemory for SliceMemory {
    fn read_phys(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), MemError> {
        let bytes = self.bytes.read().unwrap_or_else(|p| p.into_inner());
        let r = self.range(gpa, buf.len(), bytes.len())?;
        buf.copy_from_slice(&bytes[r]);
        Ok(())
    }

    fn write_phys(&self, gpa: Gpa, buf: &[u8]) -> Result<(), MemError> {
        let mut bytes = self.bytes.write().unwrap_or_else(|p| p.into_inner());
        let len = bytes.len();
        let r = self.range(gpa, buf.len(), len)?;
        bytes[r].copy_from_slice(buf);
        Ok(())
    }

    fn size(&self) -> u64 {
        self.bytes.read().unwrap_or_else(|p| p.into_inner()).len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slice_memory_bounds() {
        let m = SliceMemory::new(16);
        m.write_phys(Gpa(12), &[1, 2, 3, 4]).expect("in range");
        let mut b = [0u8; 4];
        m.read_phys(Gpa(12), &mut b).expect("in range");
        assert_eq!(b, [1, 2, 3, 4]);
        assert_eq!(
            m.read_phys(Gpa(13), &mut b),
            Err(MemError::OutOfRange {
                gpa: Gpa(13),
                len: 4
            })
        );
        assert!(m.read_phys(Gpa(u64::MAX), &mut b).is_err());
        assert_eq!(m.size(), 16);
    }
}
