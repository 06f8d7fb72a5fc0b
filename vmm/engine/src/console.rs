//! The guest's serial console as a person reads it: [`CrlfToLf`] turns the UART's `\r\n`
//! line ends into `\n`, the same on every engine.

use std::io::Write;

/// Turns the serial console's `\r\n` line ends into `\n` (a lone `\r` stays).
#[derive(Debug)]
pub struct CrlfToLf<W: Write> {
    inner: W,
    pending_cr: bool,
}

impl<W: Write> CrlfToLf<W> {
    /// Wrap a writer.
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            pending_cr: false,
        }
    }

    /// The wrapped writer.
    pub fn into_inner(self) -> W {
        self.inner
    }
}

impl<W: Write> Write for CrlfToLf<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut out = Vec::with_capacity(buf.len() + 1);
        for &b in buf {
            if self.pending_cr && b != b'\n' {
                out.push(b'\r');
            }
            self.pending_cr = b == b'\r';
            if !self.pending_cr {
                out.push(b);
            }
        }
        self.inner.write_all(&out)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_line_ends() {
        let mut w = CrlfToLf::new(Vec::new());
        w.write_all(b"a\r\nb\r").expect("vec");
        w.write_all(b"\nc\rd").expect("vec");
        assert_eq!(w.into_inner(), b"a\nb\nc\rd");
    }
}
