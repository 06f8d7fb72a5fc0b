//! Is the System.map we were given the one of the kernel that is running?
//!
//! Checked from guest-physical memory alone, so it works before any profile,
//! page walk or KASLR slide is known: the kernel text is loaded at a 2 MiB
//! aligned physical address, so `linux_banner` must sit at
//! `text_phys + (linux_banner - _text)` for some aligned `text_phys`. If the
//! running kernel's banner is in memory but not at such a place, the map belongs
//! to another kernel.

use ornament_engine::{Gpa, PhysMemory};
use std::path::{Path, PathBuf};

/// Alignment of the kernel's physical load address (CONFIG_PHYSICAL_ALIGN).
const KERNEL_ALIGN: u64 = 2 << 20;
const PREFIX: &[u8] = b"Linux version ";

/// Why the check failed.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum BannerError {
    /// System.map {path} cannot be read
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// System.map {path} has no `{symbol}` symbol; is it a System.map at all?
    MissingSymbol {
        /// The file.
        path: PathBuf,
        /// The symbol.
        symbol: &'static str,
    },
    /// System.map {path} does not belong to the running kernel (running: "{running}")
    Mismatch {
        /// The file.
        path: PathBuf,
        /// The running kernel's banner.
        running: String,
    },
}

/// The two addresses the check needs.
#[derive(Debug, Clone, Copy)]
pub struct Anchors {
    text: u64,
    banner: u64,
}

impl Anchors {
    /// The anchors of a kernel profile.
    pub fn from_profile(p: &ornament_introspect::profile::Profile) -> Result<Self, BannerError> {
        let get = |symbol: &'static str| {
            p.symbol(symbol)
                .map(|g| g.raw())
                .map_err(|_| BannerError::MissingSymbol {
                    path: PathBuf::from(format!("profile of {}", p.kernel.release)),
                    symbol,
                })
        };
        Ok(Self {
            text: get("_text")?,
            banner: get("linux_banner")?,
        })
    }
}

/// Read `_text` and `linux_banner` from a System.map.
pub fn anchors(path: &Path) -> Result<Anchors, BannerError> {
    let text = std::fs::read_to_string(path).map_err(|source| BannerError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let find = |symbol: &'static str| {
        text.lines()
            .find_map(|l| {
                let mut w = l.split_whitespace();
                let (a, _t, n) = (w.next()?, w.next()?, w.next()?);
                (n == symbol)
                    .then(|| u64::from_str_radix(a, 16).ok())
                    .flatten()
            })
            .ok_or(BannerError::MissingSymbol {
                path: path.to_path_buf(),
                symbol,
            })
    };
    Ok(Anchors {
        text: find("_text")?,
        banner: find("linux_banner")?,
    })
}

/// Outcome of one look at guest memory.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The banner is where the map says: the running kernel's banner text.
    Match(String),
    /// The kernel is not unpacked yet (no banner anywhere).
    NotYet,
    /// A banner is in memory, but not where the map puts it.
    Mismatch(String),
}

/// The banner line at `gpa`, if it is a whole one: printable ASCII ending in a
/// newline, with the `#N` build number. Fragments (e.g. literals inside the
/// compressed kernel) do not count.
fn read_line(mem: &dyn PhysMemory, gpa: u64) -> Option<String> {
    let mut buf = [0u8; 320];
    mem.read_phys(Gpa(gpa), &mut buf).ok()?;
    let end = buf.iter().position(|&b| b == b'\n')?;
    let line = &buf[..end];
    if !line.iter().all(|b| (0x20..0x7f).contains(b)) || memchr::memmem::find(line, b" #").is_none()
    {
        return None;
    }
    Some(String::from_utf8_lossy(line).into_owned())
}

/// Look once; `full` also scans all of RAM for a banner elsewhere.
pub fn check(mem: &dyn PhysMemory, a: Anchors, full: bool) -> Verdict {
    let off = a.banner.wrapping_sub(a.text);
    let size = mem.size();
    let mut c = 0u64;
    while c < size {
        let mut head = [0u8; 14];
        if let Some(g) = c.checked_add(off) {
            if mem.read_phys(Gpa(g), &mut head).is_ok() && head == PREFIX {
                if let Some(line) = read_line(mem, g) {
                    return Verdict::Match(line);
                }
            }
        }
        c += KERNEL_ALIGN;
    }
    if !full {
        return Verdict::NotYet;
    }
    // Not at any aligned place: is there a banner anywhere (kernel unpacked)?
    let chunk = 1u64 << 20;
    let mut buf = vec![0u8; usize::try_from(chunk).unwrap_or(1 << 20) + PREFIX.len()];
    let mut at = 0u64;
    while at < size {
        if mem.read_phys(Gpa(at), &mut buf).is_ok() {
            for i in memchr::memmem::find_iter(&buf, PREFIX) {
                if let Some(line) = read_line(mem, at + i as u64) {
                    return Verdict::Mismatch(line);
                }
            }
        }
        at += chunk;
    }
    Verdict::NotYet
}

#[cfg(test)]
mod tests {
    use super::*;
    use ornament_engine::SliceMemory;

    #[test]
    fn finds_banner_at_aligned_text() {
        let mem = SliceMemory::new(8 << 20);
        let a = Anchors {
            text: 0xffff_ffff_8100_0000,
            banner: 0xffff_ffff_8100_1234,
        };
        assert_eq!(check(&mem, a, true), Verdict::NotYet);
        // A fragment (as in the compressed kernel) is not a banner.
        mem.write_phys(Gpa(0x10_0000), b"Linux version 6.1.0-x (b@\x01\x02")
            .expect("in range");
        assert_eq!(check(&mem, a, true), Verdict::NotYet);
        mem.write_phys(Gpa((4 << 20) + 0x1234), b"Linux version 6.1.0-x (b@c) #1\n")
            .expect("in range");
        assert_eq!(
            check(&mem, a, true),
            Verdict::Match("Linux version 6.1.0-x (b@c) #1".into())
        );
        let wrong = Anchors {
            text: 0xffff_ffff_8100_0000,
            banner: 0xffff_ffff_8100_5678,
        };
        assert_eq!(
            check(&mem, wrong, true),
            Verdict::Mismatch("Linux version 6.1.0-x (b@c) #1".into())
        );
    }

    #[test]
    fn map_errors_name_the_file() {
        let f = tempfile::NamedTempFile::new().expect("tmp");
        std::fs::write(f.path(), "ffffffff81000000 T _text\n").expect("write");
        let e = anchors(f.path()).expect_err("no banner");
        assert!(e.to_string().contains("linux_banner"), "{e}");
        assert!(e.to_string().contains(&f.path().display().to_string()));
    }
}
