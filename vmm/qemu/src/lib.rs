//! ornament-qemu: the QEMU engine.
#![allow(missing_docs)]
