//! ornament-introspect: understands a Linux guest from outside.
#![forbid(unsafe_code)]
