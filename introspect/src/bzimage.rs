//! bzImage payloads: find the compressed kernel from the x86 boot header, tell its
//! compression by magic, and decompress it (with well-kept crates) to the ELF vmlinux
//! the kernel's own decompressor would unpack.
//!
//! The boot header (protocol 2.08 and later) says where the payload is:
//! `payload_offset` (0x248) and `payload_length` (0x24c), counted from the start of
//! the protected-mode code at `(setup_sects + 1) * 512`. The kernel's build appends
//! the decompressed size as the payload's last four bytes (little-endian).

use crate::bytes::{le_u16, le_u32};
use std::fmt;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// Largest decompressed kernel accepted (the payload's trailer is guest-supplied data).
pub const MAX_VMLINUX_BYTES: u64 = 1 << 30;

/// Largest kernel file read.
const MAX_BZIMAGE_BYTES: u64 = 512 << 20;

/// The compressions a kernel build can choose (`CONFIG_KERNEL_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// gzip (`1f 8b`).
    Gzip,
    /// bzip2 (`BZh`).
    Bzip2,
    /// Legacy LZMA (`5d 00 00`).
    Lzma,
    /// xz (`fd 37 7a 58 5a 00`), with the x86 BCJ filter.
    Xz,
    /// lzop (`89 4c 5a 4f`).
    Lzo,
    /// LZ4 legacy frames (`02 21 4c 18`).
    Lz4,
    /// zstd (`28 b5 2f fd`).
    Zstd,
}

impl Compression {
    /// Tell the compression from the payload's first bytes.
    pub fn detect(payload: &[u8]) -> Option<Self> {
        const MAGICS: &[(&[u8], Compression)] = &[
            (b"\x1f\x8b", Compression::Gzip),
            (b"\x1f\x9e", Compression::Gzip),
            (b"BZh", Compression::Bzip2),
            (b"\x5d\x00\x00", Compression::Lzma),
            (b"\xfd7zXZ\x00", Compression::Xz),
            (b"\x89LZO", Compression::Lzo),
            (b"\x02\x21\x4c\x18", Compression::Lz4),
            (b"\x28\xb5\x2f\xfd", Compression::Zstd),
        ];
        MAGICS
            .iter()
            .find(|(m, _)| payload.starts_with(m))
            .map(|&(_, c)| c)
    }

    /// Its name as the kernel's config calls it.
    pub fn name(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Bzip2 => "bzip2",
            Compression::Lzma => "lzma",
            Compression::Xz => "xz",
            Compression::Lzo => "lzo",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a kernel file could not be turned into its ELF vmlinux.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum BzImageError {
    /// cannot read kernel file {path}
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// {path} is {size} bytes, more than a kernel file may be
    FileTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// {path} is neither a bzImage (no "HdrS" boot header at 0x202) nor an ELF vmlinux
    NotBzImage {
        /// The file.
        path: PathBuf,
    },
    /// {path}: boot protocol {protocol:#x} predates 2.08, which first records where the payload is
    OldProtocol {
        /// The file.
        path: PathBuf,
        /// Its boot protocol version.
        protocol: u16,
    },
    /// {path} is truncated: its boot header puts the payload at bytes {start}..{end}, the file has {size}
    Truncated {
        /// The file.
        path: PathBuf,
        /// Payload start (file offset).
        start: u64,
        /// Payload end (file offset).
        end: u64,
        /// File size.
        size: u64,
    },
    /// {path}: the payload starts with bytes {magic}, which is no compression a kernel uses
    UnknownCompression {
        /// The file.
        path: PathBuf,
        /// The payload's first bytes, in hex.
        magic: String,
    },
    /// {path}: the kernel is {compression}-compressed, which ornament cannot decompress (no well-kept crate); give its ELF vmlinux instead
    Unsupported {
        /// The file.
        path: PathBuf,
        /// The compression.
        compression: Compression,
    },
    /// {path}: the {compression} payload is damaged or truncated
    Decompress {
        /// The file.
        path: PathBuf,
        /// The compression.
        compression: Compression,
        /// What the decompressor said.
        #[source]
        source: io::Error,
    },
    /// {path}: the payload's trailer says it decompresses to {size} bytes, more than the {limit} accepted
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Size the trailer claims.
        size: u64,
        /// Our limit.
        limit: u64,
    },
    /// {path}: the {compression} payload decompressed to {actual} bytes, its trailer says {expected}
    SizeMismatch {
        /// The file.
        path: PathBuf,
        /// The compression.
        compression: Compression,
        /// Bytes produced (at most one past `expected`).
        actual: u64,
        /// Bytes the trailer promises.
        expected: u64,
    },
    /// {path}: the decompressed payload is not an ELF file (it starts with bytes {magic})
    NotElf {
        /// The file.
        path: PathBuf,
        /// Its first bytes, in hex.
        magic: String,
    },
}

/// A kernel's ELF vmlinux, read directly or decompressed from its bzImage.
#[derive(Debug, Clone)]
pub struct Vmlinux {
    /// The ELF bytes (for a bzImage, the decompressed payload whole: the ELF, then
    /// the relocation table the build appends on relocatable kernels).
    pub bytes: Vec<u8>,
    /// The compression of the bzImage's payload; `None` when the file was an ELF.
    pub compression: Option<Compression>,
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The fields of a bzImage's x86 boot (setup) header that we read, at their offsets in the
/// file (Linux `Documentation/arch/x86/boot.rst`). Fields past the bytes given read as 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetupHeader {
    /// `setup_sects` (0x1f1), with the protocol's rule that 0 means 4.
    pub setup_sects: u8,
    /// `syssize` (0x1f4): the protected-mode code's size in 16-byte paragraphs.
    pub syssize: u32,
    /// `version` (0x206): the boot protocol version, e.g. 0x20f.
    pub protocol: u16,
    /// `kernel_version` (0x20e): the version string's offset minus 0x200; 0 when none.
    pub kernel_version: u16,
    /// `payload_offset` (0x248), from the start of the protected-mode code.
    pub payload_offset: u32,
    /// `payload_length` (0x24c).
    pub payload_length: u32,
}

impl SetupHeader {
    /// The header of `image`; `None` without the `HdrS` magic at 0x202.
    pub fn parse(image: &[u8]) -> Option<Self> {
        if image.get(0x202..0x206) != Some(b"HdrS") {
            return None;
        }
        let u32_at = |o| le_u32(image, o).unwrap_or(0);
        Some(Self {
            setup_sects: match image.get(0x1f1).copied().unwrap_or(0) {
                0 => 4,
                n => n,
            },
            syssize: u32_at(0x1f4),
            protocol: le_u16(image, 0x206).unwrap_or(0),
            kernel_version: le_u16(image, 0x20e).unwrap_or(0),
            payload_offset: u32_at(0x248),
            payload_length: u32_at(0x24c),
        })
    }

    /// Where the protected-mode code starts in the file: after the boot sector and the setup
    /// sectors.
    pub fn protected_mode_offset(&self) -> u64 {
        (u64::from(self.setup_sects) + 1) * 512
    }

    /// The smallest file this header describes: setup plus `syssize` paragraphs.
    pub fn expected_len(&self) -> u64 {
        self.protected_mode_offset() + u64::from(self.syssize) * 16
    }

    /// Offset of the NUL-terminated version string in the file, if the header names one.
    pub fn version_offset(&self) -> Option<usize> {
        (self.kernel_version != 0).then(|| usize::from(self.kernel_version) + 0x200)
    }
}

/// Read `path`, a bzImage or an ELF vmlinux, and return the ELF vmlinux.
pub fn read_vmlinux(path: &Path) -> Result<Vmlinux, BzImageError> {
    let io = |source| BzImageError::Io {
        path: path.to_path_buf(),
        source,
    };
    let size = std::fs::metadata(path).map_err(io)?.len();
    if size > MAX_BZIMAGE_BYTES {
        return Err(BzImageError::FileTooLarge {
            path: path.to_path_buf(),
            size,
        });
    }
    let bytes = std::fs::read(path).map_err(io)?;
    if bytes.starts_with(b"\x7fELF") {
        return Ok(Vmlinux {
            bytes,
            compression: None,
        });
    }
    let (compression, bytes) = decompress(&bytes, path)?;
    Ok(Vmlinux {
        bytes,
        compression: Some(compression),
    })
}

/// The payload of a bzImage: its compression, the compressed bytes (trailer
/// removed) and the decompressed size the trailer promises.
pub fn payload<'a>(
    image: &'a [u8],
    path: &Path,
) -> Result<(Compression, &'a [u8], u64), BzImageError> {
    let Some(header) = SetupHeader::parse(image) else {
        return Err(BzImageError::NotBzImage {
            path: path.to_path_buf(),
        });
    };
    let protocol = header.protocol;
    if protocol < 0x208 {
        return Err(BzImageError::OldProtocol {
            path: path.to_path_buf(),
            protocol,
        });
    }
    let pm_start = header.protected_mode_offset();
    let offset = u64::from(header.payload_offset);
    let length = u64::from(header.payload_length);
    let start = pm_start + offset;
    let end = start + length;
    let size = image.len() as u64;
    let truncated = || BzImageError::Truncated {
        path: path.to_path_buf(),
        start,
        end,
        size,
    };
    if end > size || length < 8 {
        return Err(truncated());
    }
    let (Ok(s), Ok(e)) = (usize::try_from(start), usize::try_from(end)) else {
        return Err(truncated());
    };
    let data = &image[s..e];
    let Some(compression) = Compression::detect(data) else {
        return Err(BzImageError::UnknownCompression {
            path: path.to_path_buf(),
            magic: hex(&data[..data.len().min(8)]),
        });
    };
    let (body, trailer) = data.split_at(data.len() - 4);
    let expected = u64::from(le_u32(trailer, 0).unwrap_or(0));
    Ok((compression, body, expected))
}

/// Decompress a bzImage's payload to the ELF vmlinux; `path` names the file in errors.
pub fn decompress(image: &[u8], path: &Path) -> Result<(Compression, Vec<u8>), BzImageError> {
    let (compression, body, expected) = payload(image, path)?;
    if expected > MAX_VMLINUX_BYTES {
        return Err(BzImageError::TooLarge {
            path: path.to_path_buf(),
            size: expected,
            limit: MAX_VMLINUX_BYTES,
        });
    }
    let failed = |source| BzImageError::Decompress {
        path: path.to_path_buf(),
        compression,
        source,
    };
    // Bounded by the trailer: one byte more than promised is already a mismatch.
    let cap = expected + 1;
    let out = match compression {
        Compression::Gzip => read_capped(flate2::read::GzDecoder::new(body), cap),
        Compression::Bzip2 => read_capped(bzip2::read::BzDecoder::new(body), cap),
        Compression::Xz => read_capped(liblzma::read::XzDecoder::new(body), cap),
        Compression::Lzma => liblzma::stream::Stream::new_lzma_decoder(u64::MAX)
            .map_err(io::Error::other)
            .and_then(|s| read_capped(liblzma::read::XzDecoder::new_stream(body, s), cap)),
        Compression::Zstd => zstd::stream::read::Decoder::with_buffer(body).and_then(|mut d| {
            // The kernel's build compresses with `zstd -22 --ultra` (windows up to 2^27).
            d.window_log_max(31)?;
            read_capped(d.single_frame(), cap)
        }),
        Compression::Lz4 => lz4_legacy(body, cap),
        Compression::Lzo => {
            return Err(BzImageError::Unsupported {
                path: path.to_path_buf(),
                compression,
            })
        }
    }
    .map_err(failed)?;
    if out.len() as u64 != expected {
        return Err(BzImageError::SizeMismatch {
            path: path.to_path_buf(),
            compression,
            actual: out.len() as u64,
            expected,
        });
    }
    if !out.starts_with(b"\x7fELF") {
        return Err(BzImageError::NotElf {
            path: path.to_path_buf(),
            magic: hex(&out[..out.len().min(8)]),
        });
    }
    tracing::debug!(file = %path.display(), %compression, bytes = out.len(), "bzImage payload decompressed");
    Ok((compression, out))
}

fn read_capped(r: impl Read, cap: u64) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(usize::try_from(cap).unwrap_or(0));
    r.take(cap).read_to_end(&mut out)?;
    Ok(out)
}

/// The LZ4 legacy frame (`lz4 -l`) the kernel's build writes: the magic, then blocks,
/// each a little-endian compressed size and an LZ4 block of at most 8 MiB
/// decompressed; the magic may repeat (concatenated frames). The blocks are
/// decompressed by `lz4_flex`.
fn lz4_legacy(data: &[u8], cap: u64) -> io::Result<Vec<u8>> {
    const MAGIC: u32 = 0x184c_2102;
    const MAX_BLOCK: usize = 8 << 20;
    let cap = usize::try_from(cap).map_err(io::Error::other)?;
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let mut out: Vec<u8> = Vec::with_capacity(cap);
    let mut pos = 0usize;
    while pos < data.len() {
        let word = le_u32(data, pos).ok_or_else(|| bad("a block size is cut off"))?;
        pos += 4;
        if word == MAGIC {
            continue;
        }
        let n = usize::try_from(word).map_err(io::Error::other)?;
        let block = data
            .get(pos..pos.saturating_add(n))
            .ok_or_else(|| bad("an LZ4 block runs past the payload"))?;
        pos += n;
        let start = out.len();
        let room = MAX_BLOCK.min(cap.saturating_sub(start));
        if room == 0 {
            return Err(bad("more data than the trailer promises"));
        }
        out.resize(start + room, 0);
        let got = lz4_flex::block::decompress_into(block, &mut out[start..])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        out.truncate(start + got);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A bzImage-shaped buffer around `payload` (trailer included by the caller).
    fn bz(payload: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 5 * 512];
        b[0x1f1] = 4;
        b[0x202..0x206].copy_from_slice(b"HdrS");
        b[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        b[0x248..0x24c].copy_from_slice(&0x10u32.to_le_bytes());
        let len = u32::try_from(payload.len()).expect("small");
        b[0x24c..0x250].copy_from_slice(&len.to_le_bytes());
        b.extend_from_slice(&[0u8; 0x10]);
        b.extend_from_slice(payload);
        b
    }

    fn with_trailer(mut c: Vec<u8>, plain: &[u8]) -> Vec<u8> {
        let n = u32::try_from(plain.len()).expect("small");
        c.extend_from_slice(&n.to_le_bytes());
        c
    }

    fn elf() -> Vec<u8> {
        let mut v = b"\x7fELF\x02\x01\x01".to_vec();
        v.extend((0..20_000u32).flat_map(|i| (i % 251).to_le_bytes()));
        v
    }

    #[test]
    fn setup_header_fields() {
        let mut b = bz(&[0u8; 8]);
        b[0x1f4..0x1f8].copy_from_slice(&0x100u32.to_le_bytes());
        b[0x20e..0x210].copy_from_slice(&0x300u16.to_le_bytes());
        let h = SetupHeader::parse(&b).expect("HdrS");
        assert_eq!((h.setup_sects, h.protocol, h.syssize), (4, 0x20f, 0x100));
        assert_eq!((h.payload_offset, h.payload_length), (0x10, 8));
        assert_eq!(h.protected_mode_offset(), 5 * 512);
        assert_eq!(h.expected_len(), 5 * 512 + 0x1000);
        assert_eq!(h.version_offset(), Some(0x500));
        b[0x1f1] = 0;
        b[0x20e..0x210].copy_from_slice(&[0, 0]);
        let h = SetupHeader::parse(&b).expect("HdrS");
        assert_eq!((h.setup_sects, h.version_offset()), (4, None));
        assert_eq!(SetupHeader::parse(&b[..0x204]), None);
        assert_eq!(SetupHeader::parse(&elf()), None);
    }

    #[test]
    fn gzip_and_xz_and_zstd_and_bzip2_round_trip() {
        let plain = elf();
        let p = Path::new("vmlinuz-test");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&plain).expect("gz");
        let xz = {
            let mut e = liblzma::write::XzEncoder::new(Vec::new(), 1);
            e.write_all(&plain).expect("xz");
            e.finish().expect("xz")
        };
        let zs = zstd::stream::encode_all(&plain[..], 3).expect("zstd");
        let bz2 = {
            let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
            e.write_all(&plain).expect("bz2");
            e.finish().expect("bz2")
        };
        for (c, data) in [
            (Compression::Gzip, gz.finish().expect("gz")),
            (Compression::Xz, xz),
            (Compression::Zstd, zs),
            (Compression::Bzip2, bz2),
        ] {
            let img = bz(&with_trailer(data, &plain));
            let (got_c, out) = decompress(&img, p).expect("decompresses");
            assert_eq!(got_c, c);
            assert_eq!(out, plain, "{c}");
        }
    }

    #[test]
    fn lz4_legacy_frames() {
        let plain = elf();
        let (a, b) = plain.split_at(30_000);
        let mut frame = 0x184c_2102u32.to_le_bytes().to_vec();
        for part in [a, b] {
            let blk = lz4_flex::block::compress(part);
            frame.extend_from_slice(&u32::try_from(blk.len()).expect("small").to_le_bytes());
            frame.extend_from_slice(&blk);
        }
        let img = bz(&with_trailer(frame.clone(), &plain));
        let (c, out) = decompress(&img, Path::new("k")).expect("lz4");
        assert_eq!((c, out == plain), (Compression::Lz4, true));
        // Cut inside the last block: damaged, named.
        frame.truncate(frame.len() - 10);
        let img = bz(&with_trailer(frame, &plain));
        let e = decompress(&img, Path::new("/boot/k")).expect_err("truncated");
        assert!(
            e.to_string()
                .starts_with("/boot/k: the lz4 payload is damaged or truncated"),
            "{e}"
        );
    }

    #[test]
    fn bad_inputs_are_named() {
        let p = Path::new("/x/vmlinuz");
        let e = decompress(b"not a kernel", p).expect_err("not bz");
        assert_eq!(
            e.to_string(),
            "/x/vmlinuz is neither a bzImage (no \"HdrS\" boot header at 0x202) nor an ELF vmlinux"
        );
        let e = decompress(&bz(b"\x01\x02\x03\x04\x05\x06\x07\x08\0\0\0\0"), p).expect_err("magic");
        assert_eq!(
            e.to_string(),
            "/x/vmlinuz: the payload starts with bytes 01 02 03 04 05 06 07 08, which is no compression a kernel uses"
        );
        let e = decompress(&bz(b"\x89LZO\0\0\0\0\0\0\0\0"), p).expect_err("lzo");
        assert!(e.to_string().contains("lzo-compressed"), "{e}");
        let mut img = bz(&with_trailer(vec![0x1f, 0x8b, 8, 0, 0, 0], b"x"));
        img.truncate(img.len() - 3);
        assert!(matches!(
            decompress(&img, p),
            Err(BzImageError::Truncated { .. })
        ));
        // A trailer promising more than the limit is refused before decompressing.
        let mut huge = vec![0x28, 0xb5, 0x2f, 0xfd, 0, 0, 0, 0];
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decompress(&bz(&huge), p),
            Err(BzImageError::TooLarge { .. })
        ));
        // A payload that is not an ELF.
        let text = b"plain text, not an ELF file".to_vec();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&text).expect("gz");
        let img = bz(&with_trailer(gz.finish().expect("gz"), &text));
        assert!(matches!(
            decompress(&img, p),
            Err(BzImageError::NotElf { .. })
        ));
    }
}
