//! ornament-images: builds guest images.
#![forbid(unsafe_code)]
