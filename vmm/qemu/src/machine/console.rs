//! The console stream: line ends made Unix, and the kernel's panic line watched for
//! (a guest that panics with `panic=0` would otherwise spin forever).

use super::ConsoleSink;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

pub use ornament_engine::console::CrlfToLf;

/// The start of the kernel's panic message on the console.
const PANIC_MARK: &[u8] = b"Kernel panic - not syncing";
/// How long a panicked guest may go on (printing its trace, rebooting by `panic=`)
/// before QEMU is stopped: with `panic=0` the kernel would spin forever.
const PANIC_GRACE: Duration = Duration::from_secs(2);
/// Longest console line kept while looking for the panic line.
const LINE_MAX: usize = 512;

/// Finds the kernel's panic line in the console stream: a line that starts with
/// `Kernel panic - not syncing`, after the printk time stamp `[    1.234567] ` if any.
#[derive(Debug, Default)]
pub(super) struct PanicScan {
    line: Vec<u8>,
}

impl PanicScan {
    /// Feed console bytes; the panic line (from the mark on, control bytes dropped) when
    /// one ends in them.
    pub(super) fn feed(&mut self, bytes: &[u8]) -> Option<String> {
        let mut found = None;
        for &b in bytes {
            if b == b'\n' || b == b'\r' {
                if found.is_none() {
                    found = Self::panic_line(&self.line);
                }
                self.line.clear();
            } else if self.line.len() < LINE_MAX {
                self.line.push(b);
            }
        }
        found
    }

    fn panic_line(line: &[u8]) -> Option<String> {
        let mut rest = line;
        if let Some(after) = rest.strip_prefix(b"[") {
            let end = after.iter().position(|&b| b == b']')?;
            if !after[..end]
                .iter()
                .all(|&b| b == b' ' || b == b'.' || b.is_ascii_digit())
            {
                return None;
            }
            rest = after[end + 1..].strip_prefix(b" ")?;
        }
        rest.starts_with(PANIC_MARK).then(|| {
            rest.iter()
                .filter(|b| (0x20..0x7f).contains(*b))
                .map(|&b| char::from(b))
                .collect()
        })
    }
}

/// What a console reader does besides keeping and forwarding the bytes: look for the
/// kernel's panic line and, once seen, stop QEMU after `PANIC_GRACE` (through a pidfd,
/// so a reaped and reused pid is never signalled).
pub(super) struct PanicWatch {
    pub(super) scan: PanicScan,
    pub(super) seen: Arc<Mutex<Option<String>>>,
    pub(super) qemu: Option<OwnedFd>,
}

pub(super) fn spawn_reader<R: Read + Send + 'static>(
    mut r: R,
    mut sink: Option<ConsoleSink>,
    keep: Arc<Mutex<Vec<u8>>>,
    keep_max: usize,
    mut panic: Option<PanicWatch>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if let Some(s) = sink.as_mut() {
                        let _ = s.write_all(&buf[..n]);
                        let _ = s.flush();
                    }
                    if let Some(w) = panic.as_mut() {
                        if let Some(line) = w.scan.feed(&buf[..n]) {
                            let mut seen = w.seen.lock().unwrap_or_else(|p| p.into_inner());
                            if seen.is_none() {
                                tracing::debug!(%line, "guest kernel panic on the console");
                                *seen = Some(line);
                                if let Some(fd) = w.qemu.take() {
                                    std::thread::spawn(move || {
                                        std::thread::sleep(PANIC_GRACE);
                                        pidfd_kill(&fd);
                                    });
                                }
                            }
                        }
                    }
                    if keep_max > 0 {
                        let mut k = keep.lock().unwrap_or_else(|p| p.into_inner());
                        k.extend_from_slice(&buf[..n]);
                        if k.len() > keep_max {
                            let cut = k.len() - keep_max;
                            k.drain(..cut);
                        }
                    }
                }
            }
        }
    })
}

/// A pidfd for our (not yet reaped) child, or None where the kernel has no pidfd_open.
pub(super) fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).ok()?;
    // SAFETY: pidfd_open(pid, 0) takes two integers and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = i32::try_from(fd).ok().filter(|&fd| fd >= 0)?;
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// SIGKILL the process of a pidfd (nothing when it has already ended).
fn pidfd_kill(fd: &OwnedFd) {
    // SAFETY: pidfd_send_signal(fd, sig, NULL, 0) on a pidfd we own; the result is ignored
    // (ESRCH when the process has already exited).
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_line_is_found_in_any_chunking() {
        let console = b"[    1.000000] ok\r\n[    5.174918] Kernel panic - not syncing: sysrq triggered crash\r\nCPU: 0\r\n";
        for cut in 0..console.len() {
            let mut scan = PanicScan::default();
            let found = [scan.feed(&console[..cut]), scan.feed(&console[cut..])];
            assert_eq!(
                found.into_iter().flatten().collect::<Vec<_>>(),
                vec!["Kernel panic - not syncing: sysrq triggered crash".to_owned()],
                "cut at {cut}"
            );
        }
        let mut scan = PanicScan::default();
        assert_eq!(
            scan.feed(b"Kernel panic - not syncing: Attempted to kill init!\n"),
            Some("Kernel panic - not syncing: Attempted to kill init!".into())
        );
        // Not at the start of a line (after a time stamp): a command's output, not the kernel.
        assert_eq!(scan.feed(b"grep: Kernel panic - not syncing\n"), None);
        assert_eq!(scan.feed(b"[x] Kernel panic - not syncing\n"), None);
        // The end-of-trace line does not count again.
        assert_eq!(
            scan.feed(b"---[ end Kernel panic - not syncing: x ]---\n"),
            None
        );
    }
}
