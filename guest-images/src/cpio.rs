//! A writer for the `newc` cpio format the kernel unpacks as initramfs.

use std::io::{self, Write};

/// File type bits of `c_mode`.
const S_IFREG: u32 = 0o100_000;
const S_IFDIR: u32 = 0o040_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// Writes a newc archive entry by entry; `finish` adds the trailer.
#[derive(Debug)]
pub struct CpioWriter<W: Write> {
    out: W,
    ino: u32,
    written: u64,
}

impl<W: Write> CpioWriter<W> {
    /// Start an archive on `out`.
    pub fn new(out: W) -> Self {
        Self {
            out,
            ino: 1,
            written: 0,
        }
    }

    /// A directory (parents must be added first).
    pub fn dir(&mut self, path: &str, perm: u32) -> io::Result<()> {
        self.entry(path, S_IFDIR | (perm & 0o7777), 0, &[])
    }

    /// A regular file.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(path, S_IFREG | (perm & 0o7777), 0, data)
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        self.entry(path, S_IFLNK | 0o777, 0, target.as_bytes())
    }

    /// A character device node.
    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(path, S_IFCHR | (perm & 0o7777), (major << 8) | minor, &[])
    }

    fn entry(&mut self, path: &str, mode: u32, rdev: u32, data: &[u8]) -> io::Result<()> {
        let name = path.trim_start_matches('/');
        let filesize = u32::try_from(data.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "cpio entry over 4 GiB"))?;
        let namesize = u32::try_from(name.len() + 1)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "cpio name too long"))?;
        let ino = self.ino;
        self.ino += 1;
        let header = format!(
            "070701{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{filesize:08x}\
             {devmajor:08x}{devminor:08x}{rmajor:08x}{rminor:08x}{namesize:08x}{check:08x}",
            uid = 0,
            gid = 0,
            nlink = if mode & S_IFDIR != 0 { 2 } else { 1 },
            mtime = 0,
            devmajor = 0,
            devminor = 0,
            rmajor = rdev >> 8,
            rminor = rdev & 0xff,
            check = 0,
        );
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad4()?;
        self.put(data)?;
        self.pad4()
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad4(&mut self) -> io::Result<()> {
        let pad = (4 - (self.written % 4)) % 4;
        let zeros = [0u8; 3];
        // pad < 4 by construction.
        self.put(&zeros[..usize::try_from(pad).unwrap_or(0)])
    }

    /// Write the trailer and return the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.ino = 0;
        self.entry("TRAILER!!!", 0, 0, &[])?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout_is_exact() {
        let mut w = CpioWriter::new(Vec::new());
        w.file("/init", 0o755, b"hi").expect("vec write");
        let out = w.finish().expect("vec write");
        // Header is 110 bytes; "init\0" pads 115 -> 116; data 2 pads to 120.
        assert_eq!(&out[..6], b"070701");
        assert_eq!(&out[14..22], b"000081ed");
        assert_eq!(&out[54..62], b"00000002");
        assert_eq!(&out[110..115], b"init\0");
        assert_eq!(&out[116..118], b"hi");
        assert_eq!(out.len() % 4, 0);
        let trailer = String::from_utf8_lossy(&out[120..]);
        assert!(trailer.contains("TRAILER!!!"));
    }

    #[test]
    fn cpio_tool_reads_it_back() {
        let out = ornament_test_gate::require!(
            "the cpio tool (apt-get install cpio)",
            std::process::Command::new("cpio").arg("--version").output()
        );
        assert!(out.status.success());
        let mut w = CpioWriter::new(Vec::new());
        w.dir("/bin", 0o755).expect("vec");
        w.file("/bin/x", 0o644, b"abc").expect("vec");
        w.symlink("/y", "bin/x").expect("vec");
        let bytes = w.finish().expect("vec");
        let mut child = std::process::Command::new("cpio")
            .args(["-t", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn cpio");
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(&bytes)
            .expect("write");
        let listing = child.wait_with_output().expect("cpio output");
        assert_eq!(String::from_utf8_lossy(&listing.stdout), "bin\nbin/x\ny\n");
    }
}
