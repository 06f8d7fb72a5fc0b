//! ornament-tcg-plugin: a QEMU TCG plugin (GPL-2.0-or-later).
