//! Guest RAM: one anonymous mapping (vm-memory), registered with KVM, read by `introspect`.

use ornament_engine::{Gpa, MemError, PhysMemory};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Why guest memory could not be set up.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum MemoryError {
    /// guest memory of {0} bytes is empty or larger than this machine allows
    BadSize(u64),
    /// cannot map guest memory
    Mmap(#[source] vm_memory::mmap::FromRangesError),
    /// guest-physical write at {0:#x} is outside guest RAM
    Write(u64, #[source] vm_memory::GuestMemoryError),
}

/// Guest RAM starting at guest-physical 0, shared by all vCPUs.
#[derive(Debug)]
pub struct KvmMemory {
    mem: GuestMemoryMmap,
}

impl KvmMemory {
    /// Map `size` bytes of zeroed guest RAM at guest-physical 0.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        if size == 0 || size > crate::layout::MAX_MEM_SIZE {
            return Err(MemoryError::BadSize(size));
        }
        let len = usize::try_from(size).map_err(|_| MemoryError::BadSize(size))?;
        let mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), len)]).map_err(MemoryError::Mmap)?;
        Ok(Self { mem })
    }

    /// The vm-memory view (for linux-loader and the boot code).
    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Write `bytes` at `addr`, all or nothing.
    pub fn write(&self, addr: GuestAddress, bytes: &[u8]) -> Result<(), MemoryError> {
        self.mem
            .write_slice(bytes, addr)
            .map_err(|e| MemoryError::Write(addr.0, e))
    }

    /// Each region as (guest-physical start, size, host address), for KVM memory slots.
    pub(crate) fn regions(&self) -> Vec<(u64, u64, u64)> {
        self.mem
            .iter()
            .map(|r| {
                let host = r
                    .get_host_address(vm_memory::MemoryRegionAddress(0))
                    .expect("a mapped region has a host address");
                (r.start_addr().0, r.len(), host as u64)
            })
            .collect()
    }
}

fn out_of_range(gpa: Gpa, len: usize) -> MemError {
    MemError::OutOfRange {
        gpa,
        len: len as u64,
    }
}

impl PhysMemory for KvmMemory {
    fn read_phys(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), MemError> {
        self.mem
            .read_slice(buf, GuestAddress(gpa.raw()))
            .map_err(|_| out_of_range(gpa, buf.len()))
    }

    fn write_phys(&self, gpa: Gpa, buf: &[u8]) -> Result<(), MemError> {
        self.mem
            .write_slice(buf, GuestAddress(gpa.raw()))
            .map_err(|_| out_of_range(gpa, buf.len()))
    }

    fn size(&self) -> u64 {
        self.mem.last_addr().0 + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_writes_within_bounds() {
        let m = KvmMemory::new(0x2000).expect("small mapping");
        m.write_phys(Gpa(0x1ffc), &[1, 2, 3, 4]).expect("in range");
        let mut b = [0u8; 4];
        m.read_phys(Gpa(0x1ffc), &mut b).expect("in range");
        assert_eq!(b, [1, 2, 3, 4]);
        assert_eq!(
            m.read_phys(Gpa(0x1ffd), &mut b),
            Err(MemError::OutOfRange {
                gpa: Gpa(0x1ffd),
                len: 4
            })
        );
        assert_eq!(m.size(), 0x2000);
        assert!(matches!(KvmMemory::new(0), Err(MemoryError::BadSize(0))));
    }
}
