//! Little-endian integers at byte offsets of untrusted data (kernel files, BTF, kallsyms
//! tables): `None` past the end, never a panic; and the low half of a register or 8-byte
//! read as the C ABI's `unsigned int` or `int`.

/// The low 32 bits of a register or an 8-byte read (an `unsigned int` argument).
pub fn low32(v: u64) -> u32 {
    u32::try_from(v & 0xffff_ffff).unwrap_or(0)
}

/// The low 32 bits as the C ABI's `int` (an `int` argument: a signal, a pid).
pub fn low32_signed(v: u64) -> i32 {
    i32::from_le_bytes(low32(v).to_le_bytes())
}

/// `N` bytes at `at`, if the slice holds them.
fn array<const N: usize>(b: &[u8], at: usize) -> Option<[u8; N]> {
    b.get(at..at.checked_add(N)?)?.try_into().ok()
}

/// The little-endian `u16` at `at`.
pub fn le_u16(b: &[u8], at: usize) -> Option<u16> {
    array(b, at).map(u16::from_le_bytes)
}

/// The little-endian `u32` at `at`.
pub fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    array(b, at).map(u32::from_le_bytes)
}

/// The little-endian `u64` at `at`.
pub fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    array(b, at).map(u64::from_le_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_in_bounds_and_refuses_past_the_end() {
        let b = [1, 2, 3, 4, 5, 6, 7, 8, 9];
        assert_eq!(le_u16(&b, 0), Some(0x0201));
        assert_eq!(le_u32(&b, 5), Some(0x0908_0706));
        assert_eq!(le_u64(&b, 1), Some(0x0908_0706_0504_0302));
        assert_eq!(le_u32(&b, 6), None);
        assert_eq!(le_u64(&b, 2), None);
        assert_eq!(le_u16(&b, usize::MAX), None);
    }
}
