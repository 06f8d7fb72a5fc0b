//! The watch configuration's names made numbers: syscall names ([`syscall_numbers`]), deny
//! rules ([`deny_rules`], [`parse_deny`]), errno names ([`parse_errno`], [`errno_name`]),
//! and `--watch` lists ([`WatchConfig::add_watch_list`]).

use super::{ProbesError, SyscallWatch, WatchConfig, MAX_ERRNO};
use crate::profile::Profile;
use std::collections::BTreeMap;

/// Resolve syscall names to numbers; unknown names are errors.
pub fn syscall_numbers(profile: &Profile, names: &[String]) -> Result<Vec<u32>, ProbesError> {
    names
        .iter()
        .map(|n| {
            profile
                .syscall_nr(n)
                .ok_or_else(|| ProbesError::UnknownSyscall { name: n.clone() })
        })
        .collect()
}

/// Resolve and check deny rules: syscall number -> errno.
pub fn deny_rules(
    profile: &Profile,
    deny: &[(String, i32)],
) -> Result<BTreeMap<u32, i32>, ProbesError> {
    let mut out = BTreeMap::new();
    for (name, errno) in deny {
        let nr = profile
            .syscall_nr(name)
            .ok_or_else(|| ProbesError::UnknownSyscall { name: name.clone() })?;
        if !(1..=MAX_ERRNO).contains(errno) {
            return Err(ProbesError::BadErrno {
                syscall: name.clone(),
                errno: *errno,
            });
        }
        out.insert(nr, *errno);
    }
    Ok(out)
}

/// Linux errno names (x86-64; asm-generic numbering) accepted by [`parse_errno`].
pub const ERRNO_NAMES: &[(&str, i32)] = &[
    ("EPERM", 1),
    ("ENOENT", 2),
    ("ESRCH", 3),
    ("EINTR", 4),
    ("EIO", 5),
    ("ENXIO", 6),
    ("E2BIG", 7),
    ("ENOEXEC", 8),
    ("EBADF", 9),
    ("ECHILD", 10),
    ("EAGAIN", 11),
    ("EWOULDBLOCK", 11),
    ("ENOMEM", 12),
    ("EACCES", 13),
    ("EFAULT", 14),
    ("ENOTBLK", 15),
    ("EBUSY", 16),
    ("EEXIST", 17),
    ("EXDEV", 18),
    ("ENODEV", 19),
    ("ENOTDIR", 20),
    ("EISDIR", 21),
    ("EINVAL", 22),
    ("ENFILE", 23),
    ("EMFILE", 24),
    ("ENOTTY", 25),
    ("ETXTBSY", 26),
    ("EFBIG", 27),
    ("ENOSPC", 28),
    ("ESPIPE", 29),
    ("EROFS", 30),
    ("EMLINK", 31),
    ("EPIPE", 32),
    ("EDOM", 33),
    ("ERANGE", 34),
    ("EDEADLK", 35),
    ("ENAMETOOLONG", 36),
    ("ENOLCK", 37),
    ("ENOSYS", 38),
    ("ENOTEMPTY", 39),
    ("ELOOP", 40),
    ("ENOMSG", 42),
    ("ENODATA", 61),
    ("ETIME", 62),
    ("EPROTO", 71),
    ("EOVERFLOW", 75),
    ("EILSEQ", 84),
    ("ENOTSOCK", 88),
    ("EOPNOTSUPP", 95),
    ("ENOTSUP", 95),
    ("EAFNOSUPPORT", 97),
    ("EADDRINUSE", 98),
    ("EADDRNOTAVAIL", 99),
    ("ENETDOWN", 100),
    ("ENETUNREACH", 101),
    ("ECONNABORTED", 103),
    ("ECONNRESET", 104),
    ("ETIMEDOUT", 110),
    ("ECONNREFUSED", 111),
    ("EHOSTUNREACH", 113),
    ("EDQUOT", 122),
    ("ECANCELED", 125),
    // Kernel-internal: seen at a syscall's return before the signal code restarts it or
    // turns it into EINTR.
    ("ERESTARTSYS", 512),
    ("ERESTARTNOINTR", 513),
    ("ERESTARTNOHAND", 514),
    ("ERESTART_RESTARTBLOCK", 516),
];

/// The first name of an errno number (`EPERM` for 1), if it has one here.
pub fn errno_name(n: i32) -> Option<&'static str> {
    ERRNO_NAMES
        .iter()
        .find(|&&(_, v)| v == n)
        .map(|&(name, _)| name)
}

/// An errno from a name (`EPERM`, case-insensitive) or a number, checked to be in
/// 1..=4095.
pub fn parse_errno(text: &str) -> Result<i32, ProbesError> {
    let t = text.trim();
    let n = match t.parse::<i32>() {
        Ok(n) => n,
        Err(_) => ERRNO_NAMES
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(t))
            .map(|&(_, n)| n)
            .ok_or_else(|| ProbesError::UnknownErrno { name: t.to_owned() })?,
    };
    if !(1..=MAX_ERRNO).contains(&n) {
        return Err(ProbesError::UnknownErrno { name: t.to_owned() });
    }
    Ok(n)
}

/// A deny rule from `NAME[:ERRNO]` (errno by name or number; default `EPERM`). The
/// syscall name is checked by [`ProbeSet::new`].
pub fn parse_deny(spec: &str) -> Result<(String, i32), ProbesError> {
    match spec.split_once(':') {
        Some((name, errno)) => Ok((name.trim().to_owned(), parse_errno(errno)?)),
        None => Ok((spec.trim().to_owned(), 1)),
    }
}

impl WatchConfig {
    /// Add the events of a watch list: `fork,exec,exit,setid,syscall` (all syscalls) or
    /// `syscall=NAME,NAME...` (the names after `syscall=` run to the next event name).
    /// Syscall names are checked by [`ProbeSet::new`]. Event names win over syscall
    /// names after the first (`syscall=openat,exit` watches exit events): put a syscall
    /// that shares an event's name first (`syscall=exit,openat`).
    pub fn add_watch_list(&mut self, list: &str) -> Result<(), ProbesError> {
        let mut in_syscalls = false;
        for item in list.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            match item {
                "fork" => self.fork = true,
                "exec" => self.exec = true,
                "exit" => self.exit = true,
                "setid" => self.setid = true,
                "signal" | "signals" => self.signals = true,
                "syscall" | "syscalls" => self.syscalls = SyscallWatch::All,
                _ => {
                    let name = match item.split_once('=') {
                        Some(("syscall" | "syscalls", first)) => {
                            in_syscalls = true;
                            first
                        }
                        Some(_) => {
                            return Err(ProbesError::UnknownWatch {
                                name: item.to_owned(),
                            })
                        }
                        None if in_syscalls => item,
                        None => {
                            return Err(ProbesError::UnknownWatch {
                                name: item.to_owned(),
                            })
                        }
                    };
                    match &mut self.syscalls {
                        SyscallWatch::All => {}
                        SyscallWatch::Named(v) => v.push(name.to_owned()),
                        none => *none = SyscallWatch::Named(vec![name.to_owned()]),
                    }
                    continue;
                }
            }
            in_syscalls = false;
        }
        Ok(())
    }
}
