//! ornament-images: builds the guests that ornament boots.
//!
//! ```text
//! catalogue meta-packages ─(resolve: apt's lists)─► linux-image-<abi>-<flavour> <version>
//! linux-image .deb (apt-get download) ──► bzImage, config; its payload: vmlinux, vmlinux.btf,
//!                                          System.map (kallsyms), profile.json
//! guest/ (init.sh, *.c) ──────────► initramfs: busybox-static + /init + static workloads
//!                                   └─► cached under `cache::cache_root()`/images/<name>/<version>/
//! per run: `overlay::RunOverlay` ──► a second, uncompressed cpio appended to the initramfs
//! ```
#![forbid(unsafe_code)]

pub mod cache;
pub mod catalog;
pub mod cpio;
pub mod debian;
pub mod image;
pub mod kernel_file;
pub mod overlay;
pub mod progress;
pub mod reference;
pub mod resolve;
pub mod workloads;

pub use cache::cache_root;
pub use catalog::{ImageSpec, DEFAULT_IMAGE, IMAGES};
pub use image::{build_image, BuildOptions, Image, ImageError};
pub use overlay::{OverlayError, RunOverlay};
