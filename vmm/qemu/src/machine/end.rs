//! How a QEMU process ended, told in words, and the status channel's tail.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

/// How a QEMU process ended, in words: "exited with code N" or "was killed by signal N (NAME)".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QemuEnd(pub ExitStatus);

impl std::fmt::Display for QemuEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.0.code(), self.0.signal()) {
            (Some(c), _) => write!(f, "exited with code {c}"),
            (None, Some(s)) => write!(f, "was killed by signal {s} ({})", signal_name(s)),
            (None, None) => write!(f, "ended ({:?})", self.0),
        }
    }
}

/// QEMU's last lines on stderr, shown after "; QEMU said:" (nothing when it said nothing).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QemuSaid(pub String);

impl std::fmt::Display for QemuSaid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.trim() {
            "" => Ok(()),
            said => write!(f, "; QEMU said:\n{said}"),
        }
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        _ => "another signal",
    }
}

/// Most of the status channel read at the end (the guest can write any amount to it).
pub(super) const STATUS_TAIL: u64 = 64 * 1024;

/// The last `max` bytes of a file, as text.
pub(super) fn read_tail(f: &mut File, max: u64) -> std::io::Result<String> {
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(max)))?;
    let mut buf = Vec::new();
    f.take(max).read_to_end(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_end_in_words() {
        assert_eq!(
            QemuEnd(ExitStatus::from_raw(1 << 8)).to_string(),
            "exited with code 1"
        );
        assert_eq!(
            QemuEnd(ExitStatus::from_raw(9)).to_string(),
            "was killed by signal 9 (SIGKILL)"
        );
        assert_eq!(QemuSaid(" \n".into()).to_string(), "");
        assert_eq!(QemuSaid("no".into()).to_string(), "; QEMU said:\nno");
    }
}
