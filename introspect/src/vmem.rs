//! `VirtMem`: typed, bounded reads of guest-virtual memory over `PhysMemory` and a page root.

use crate::paging::{translate, PageRoot, PagingError, TranslationCache, PAGE_SIZE};
use ornament_engine::{Gpa, Gva, PhysMemory};

/// Reads guest-virtual memory of one address space. Errors are [`PagingError`]s: a
/// failed translation or a failed physical read.
#[derive(Clone, Copy)]
pub struct VirtMem<'a> {
    mem: &'a dyn PhysMemory,
    root: PageRoot,
    cache: Option<&'a TranslationCache>,
}

impl std::fmt::Debug for VirtMem<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtMem")
            .field("root", &self.root)
            .field("cached", &self.cache.is_some())
            .finish()
    }
}

/// A NUL-terminated string read with a cap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapString {
    /// The text, decoded lossily.
    pub text: String,
    /// True when no NUL was found within the cap.
    pub truncated: bool,
}

impl<'a> VirtMem<'a> {
    /// Reads through the tables under `root`, walking them on every access.
    pub fn new(mem: &'a dyn PhysMemory, root: PageRoot) -> Self {
        Self {
            mem,
            root,
            cache: None,
        }
    }

    /// The same, with translations remembered in `cache`.
    pub fn with_cache(mut self, cache: &'a TranslationCache) -> Self {
        self.cache = Some(cache);
        self
    }

    /// The address space read.
    pub fn root(&self) -> PageRoot {
        self.root
    }

    /// The physical memory underneath.
    pub fn phys(&self) -> &'a dyn PhysMemory {
        self.mem
    }

    /// The same physical memory and cache, another address space.
    pub fn with_root(&self, root: PageRoot) -> Self {
        Self { root, ..*self }
    }

    /// Physical address of `gva`.
    pub fn translate(&self, gva: Gva) -> Result<Gpa, PagingError> {
        match self.cache {
            Some(c) => c.translate(self.mem, self.root, gva).map(|t| t.gpa),
            None => translate(self.mem, self.root, gva).map(|t| t.gpa),
        }
    }

    /// Fill `buf` from `gva`; reads that cross page boundaries translate each page.
    pub fn read(&self, gva: Gva, buf: &mut [u8]) -> Result<(), PagingError> {
        let len = buf.len() as u64;
        if len == 0 {
            return Ok(());
        }
        if gva.raw().checked_add(len - 1).is_none() {
            return Err(PagingError::Overflow { gva, len });
        }
        let mut done = 0usize;
        while done < buf.len() {
            let at = gva.wrapping_add(done as u64);
            let in_page = PAGE_SIZE - (at.raw() & (PAGE_SIZE - 1));
            let rest = buf.len() - done;
            let n = usize::try_from(in_page).map_or(rest, |p| p.min(rest));
            let gpa = self.translate(at)?;
            self.mem.read_phys(gpa, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    /// A little-endian u64.
    pub fn read_u64(&self, gva: Gva) -> Result<u64, PagingError> {
        let mut b = [0u8; 8];
        self.read(gva, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// A little-endian u32.
    pub fn read_u32(&self, gva: Gva) -> Result<u32, PagingError> {
        let mut b = [0u8; 4];
        self.read(gva, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// A little-endian i32.
    pub fn read_i32(&self, gva: Gva) -> Result<i32, PagingError> {
        let mut b = [0u8; 4];
        self.read(gva, &mut b)?;
        Ok(i32::from_le_bytes(b))
    }

    /// A pointer.
    pub fn read_ptr(&self, gva: Gva) -> Result<Gva, PagingError> {
        self.read_u64(gva).map(Gva)
    }

    /// A NUL-terminated string of at most `max` bytes (without the NUL), decoded as
    /// [`crate::guest_text::decode`] does (losslessly).
    /// Reads page by page, so an unmapped page after the NUL does no harm.
    pub fn read_cstr(&self, gva: Gva, max: usize) -> Result<CapString, PagingError> {
        let mut out = Vec::new();
        let mut at = gva;
        while out.len() < max {
            let in_page = PAGE_SIZE - (at.raw() & (PAGE_SIZE - 1));
            let n = usize::try_from(in_page).map_or(max - out.len(), |p| p.min(max - out.len()));
            let mut chunk = vec![0u8; n];
            self.read(at, &mut chunk)?;
            if let Some(nul) = chunk.iter().position(|&b| b == 0) {
                out.extend_from_slice(&chunk[..nul]);
                return Ok(CapString {
                    text: crate::guest_text::decode(&out),
                    truncated: false,
                });
            }
            out.extend_from_slice(&chunk);
            at = at.checked_add(n as u64).ok_or(PagingError::Overflow {
                gva,
                len: max as u64,
            })?;
        }
        Ok(CapString {
            text: crate::guest_text::decode(&out),
            truncated: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paging::{PageSize, PagingMode};
    use crate::testing::PhysAlloc;

    fn setup() -> (PhysAlloc, PageRoot) {
        let mut a = PhysAlloc::new(8 << 20, 0x10_0000, 0x40_0000);
        let root = a.new_root(PagingMode::Level4).expect("root");
        // Two virtually adjacent pages on physically distant frames.
        a.map(root, Gva(0x40_0000), Gpa(0x60_0000), PageSize::Size4K, true)
            .expect("p0");
        a.map(root, Gva(0x40_1000), Gpa(0x50_0000), PageSize::Size4K, true)
            .expect("p1");
        (a, root)
    }

    #[test]
    fn reads_cross_page_boundaries() {
        let (a, root) = setup();
        let data: Vec<u8> = (0..32u8).collect();
        a.write_virt(root, Gva(0x40_0ff0), &data).expect("write");
        let vm = VirtMem::new(&a.mem, root);
        let mut buf = [0u8; 32];
        vm.read(Gva(0x40_0ff0), &mut buf).expect("read");
        assert_eq!(buf.to_vec(), data);
        assert_eq!(
            vm.read_u64(Gva(0x40_0ffc)),
            Ok(u64::from_le_bytes([12, 13, 14, 15, 16, 17, 18, 19]))
        );
        assert_eq!(vm.read_u32(Gva(0x40_0ff0)), Ok(0x0302_0100));
        // The second half is on another frame.
        let mut b = [0u8; 1];
        a.mem.read_phys(Gpa(0x50_0000), &mut b).expect("phys");
        assert_eq!(b[0], 16);
        // Into an unmapped page: level-1 entry missing.
        assert_eq!(
            vm.read_u64(Gva(0x40_1ffc)),
            Err(PagingError::NotPresent {
                level: 1,
                gva: Gva(0x40_2000)
            })
        );
        assert_eq!(
            vm.read_u64(Gva(u64::MAX - 3)),
            Err(PagingError::Overflow {
                gva: Gva(u64::MAX - 3),
                len: 8
            })
        );
        vm.read(Gva(0xdead_0000_0000_0000), &mut [])
            .expect("empty read");
    }

    #[test]
    fn cstr_is_bounded_and_keeps_every_byte() {
        let (a, root) = setup();
        let cache = TranslationCache::new();
        let vm = VirtMem::new(&a.mem, root).with_cache(&cache);
        // Ends exactly before the unmapped page: NUL is the last mapped byte.
        a.write_virt(root, Gva(0x40_1ffb), b"abcd\0").expect("w");
        assert_eq!(
            vm.read_cstr(Gva(0x40_1ffb), 100),
            Ok(CapString {
                text: "abcd".into(),
                truncated: false
            })
        );
        a.write_virt(root, Gva(0x40_0ffe), b"x\xffyz\0").expect("w");
        let s = vm.read_cstr(Gva(0x40_0ffe), 100).expect("crosses");
        assert_eq!(s.text, "x\u{10ffff}yz");
        assert_eq!(crate::guest_text::encode(&s.text), b"x\xffyz");
        let s = vm.read_cstr(Gva(0x40_0ffe), 2).expect("capped");
        assert_eq!((s.text.as_str(), s.truncated), ("x\u{10ffff}", true));
        // No NUL before the mapping ends: an error, not a runaway read.
        a.write_virt(root, Gva(0x40_1ff0), &[b'a'; 16]).expect("w");
        assert!(matches!(
            vm.read_cstr(Gva(0x40_1ff0), 1 << 20),
            Err(PagingError::NotPresent { level: 1, .. })
        ));
        assert!(!cache.is_empty());
    }
}
