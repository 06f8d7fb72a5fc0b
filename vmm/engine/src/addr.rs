//! Typed guest addresses: guest-physical (`Gpa`) and guest-virtual (`Gva`).

use serde::{Deserialize, Serialize};
use std::fmt;

/// A guest-physical address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct Gpa(pub u64);

/// A guest-virtual address (kernel or user, depending on the page tables used).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct Gva(pub u64);

macro_rules! addr_impl {
    ($t:ident, $name:literal) => {
        impl $t {
            /// The raw 64-bit value.
            pub const fn raw(self) -> u64 {
                self.0
            }
            /// `self + off`, or `None` on overflow.
            pub fn checked_add(self, off: u64) -> Option<Self> {
                self.0.checked_add(off).map($t)
            }
            /// `self + off` modulo 2^64 (KASLR arithmetic).
            pub const fn wrapping_add(self, off: u64) -> Self {
                $t(self.0.wrapping_add(off))
            }
            /// `self - off` modulo 2^64 (KASLR arithmetic).
            pub const fn wrapping_sub(self, off: u64) -> Self {
                $t(self.0.wrapping_sub(off))
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($name, "({:#x})"), self.0)
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
        impl fmt::LowerHex for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::LowerHex::fmt(&self.0, f)
            }
        }
    };
}
addr_impl!(Gpa, "Gpa");
addr_impl!(Gva, "Gva");

impl Gva {
    /// True when bits 63..47 are all equal (4-level canonical form).
    pub const fn is_canonical_48(self) -> bool {
        let top = self.0 >> 47;
        top == 0 || top == 0x1_ffff
    }
    /// True when bits 63..56 are all equal (5-level canonical form).
    pub const fn is_canonical_57(self) -> bool {
        let top = self.0 >> 56;
        top == 0 || top == 0xff
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_forms() {
        assert!(Gva(0xffff_ffff_8100_0000).is_canonical_48());
        assert!(Gva(0x7fff_ffff_f000).is_canonical_48());
        assert!(!Gva(0x8000_0000_0000).is_canonical_48());
        assert!(Gva(0x00ff_ffff_ffff_f000).is_canonical_57());
        assert!(!Gva(0x0100_0000_0000_0000).is_canonical_57());
    }

    #[test]
    fn arithmetic() {
        assert_eq!(Gva(u64::MAX).checked_add(1), None);
        assert_eq!(Gva(u64::MAX).wrapping_add(2), Gva(1));
        assert_eq!(Gpa(0x1000).wrapping_sub(0x2000), Gpa(u64::MAX - 0xfff));
        assert_eq!(format!("{:?}", Gpa(0x10)), "Gpa(0x10)");
    }
}
