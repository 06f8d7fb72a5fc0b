//! \[3\] The probe set: which kernel functions to trap for the events asked for, with
//! fallbacks when a hook is missing from the profile.
//!
//! | event   | hook (argument)                                     | fallback |
//! |---------|-----------------------------------------------------|----------|
//! | fork    | `proc_fork_connector(child)`, current = parent       | `wake_up_new_task(child)` |
//! | exec    | `proc_exec_connector(task)` after a successful exec | `begin_new_exec(bprm)`: the point of no return (an exec can still fail there if de_thread is killed) |
//! | exit    | `proc_exit_connector(task)`, `task->exit_code` set   | `do_exit(code)`, current = exiting task |
//! | setid   | `proc_id_connector(task, which)` after commit_creds  | none |
//! | syscall | named: `__x64_sys_NAME(regs)`, one per syscall       | `do_syscall_64` filtered to those numbers |
//! | syscall | all: `do_syscall_64(regs, nr)`                       | none |
//! | deny    | held `do_syscall_64(regs, nr)` filtered to the denied numbers | none: an error |
//!
//! A hook missing from the profile disables only the events that need it, with a
//! warning naming it. Lifecycle probes hold the vCPU (the task cannot vanish while it is
//! read); syscall probes hold only where a deny rule applies (or
//! [`WatchConfig::hold_syscalls`]).
//!
//! This module also owns the layout of the memory reads an engine may do at the hit
//! ([`hit_reads`]: `ProbeHit::mem`, and [`hit_bytes`]: `ProbeHit::bytes`): the syscall
//! arguments, the current task, and for fork, exec and exit every value those events report
//! that could vanish once the vCPU runs on ([`captured_at_hit`]); with them an engine need not
//! hold the vCPU for those events.

use crate::event::EventKind;
use crate::kaslr::KernelLayout;
use crate::profile::{Profile, ProfileError};
use ornament_engine::wire::{BytesRead, MemBase, MemRead, Reg, MAX_MEM_READS};
use ornament_engine::{Gva, ProbeId};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// `which_id` of `proc_id_connector` for a user-id change (`PROC_EVENT_UID`).
pub const PROC_EVENT_UID: u64 = 0x4;
/// `which_id` of `proc_id_connector` for a group-id change (`PROC_EVENT_GID`).
pub const PROC_EVENT_GID: u64 = 0x40;
/// Largest errno a denied syscall may return (`MAX_ERRNO`).
pub const MAX_ERRNO: i32 = 4095;

/// Why a probe set could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, displaydoc::Display)]
pub enum ProbesError {
    /// unknown syscall {name:?}: this kernel has no such x86-64 syscall
    UnknownSyscall {
        /// The name given.
        name: String,
    },
    /// errno {errno} for syscall {syscall} is outside 1..=4095
    BadErrno {
        /// The syscall.
        syscall: String,
        /// The errno given.
        errno: i32,
    },
    /// unknown errno {name:?}: give a number in 1..=4095 or a name such as EPERM
    UnknownErrno {
        /// The text given.
        name: String,
    },
    /// unknown event {name:?} in the watch list: expected fork, exec, exit, setid, syscall or syscall=NAME,...
    UnknownWatch {
        /// The item given.
        name: String,
    },
    /// cannot deny syscalls: the profile has no {symbol}
    NoDenyHook {
        /// The missing symbol.
        symbol: &'static str,
    },
    /// cannot deny syscall {name}: the profile has no {symbol}, its entry function
    NoDenyEntry {
        /// The syscall.
        name: String,
        /// The missing entry function.
        symbol: String,
    },
    /// every-syscall watching and denying at entry functions together are not supported
    AllWithEntryDeny,
}

/// Where an engine that reads guest memory at the hit (the TCG plugin) puts what a
/// syscall probe needs, so that the vCPU need not be held: `ProbeHit::mem[0..6]` are the
/// six arguments (`pt_regs` `di, si, dx, r10, r8, r9`, at the `pt_regs` in `rdi`) ...
pub const MEM_SYSCALL_ARGS: std::ops::Range<usize> = 0..6;
/// ... and `ProbeHit::mem[6]` is the current task (the per-CPU `current_task` at GS base).
pub const MEM_CURRENT_TASK: usize = 6;
/// The `pt_regs` fields of the six syscall arguments, in order.
pub const SYSCALL_ARG_FIELDS: [&str; 6] = ["di", "si", "dx", "r10", "r8", "r9"];

/// Fork, exit and syscall probes read at the hit a task header (the parent, current, for
/// fork; the exiting task, rdi, for exit; the caller, current, for a syscall):
/// `ProbeHit::mem[7]` `task->pid`, ...
pub const MEM_HDR_PID: usize = 7;
/// ... `[8]` `task->tgid`, ...
pub const MEM_HDR_TGID: usize = 8;
/// ... `[9]` and `[10]` the 16 bytes of `task->comm`, ...
pub const MEM_HDR_COMM: [usize; 2] = [9, 10];
/// ... `[11]` `task->real_parent`, ...
pub const MEM_HDR_REAL_PARENT: usize = 11;
/// ... `[12]` `task->real_parent->tgid`, ...
pub const MEM_HDR_PPID: usize = 12;
/// ... `[13]` `task->cred`, ...
pub const MEM_HDR_CRED: usize = 13;
/// ... and `[14]` `task->cred->uid`.
pub const MEM_HDR_UID: usize = 14;
/// Fork probes read the child (rdi): `ProbeHit::mem[0]` `child->pid`, ...
pub const MEM_CHILD_PID: usize = 0;
/// ... `[1]` `child->tgid`, ...
pub const MEM_CHILD_TGID: usize = 1;
/// ... `[2]` `child->flags`, ...
pub const MEM_CHILD_FLAGS: usize = 2;
/// ... `[3]` `child->mm`.
pub const MEM_CHILD_MM: usize = 3;
/// Exit probes (`proc_exit_connector`) read `ProbeHit::mem[0]` `task->exit_code`, ...
pub const MEM_EXIT_CODE: usize = 0;
/// ... `[1]` `task->signal`, ...
pub const MEM_EXIT_SIGNAL: usize = 1;
/// ... `[2]` `task->signal->live` (when the profile has it).
pub const MEM_EXIT_LIVE: usize = 2;
/// Exec probes (`proc_exec_connector`) read `ProbeHit::mem[0]` `task->mm`, ...
pub const MEM_EXEC_MM: usize = 0;
/// ... `[1]` `mm->exe_file`, ...
pub const MEM_EXEC_EXE_FILE: usize = 1;
/// ... `[2]` `exe_file->f_path.dentry`, ...
pub const MEM_EXEC_DENTRY: usize = 2;
/// ... `[3]` `mm->arg_start` and `[4]` `mm->arg_end`; the bytes between them (the new
/// command line, at most [`MAX_ARGV_BYTES_AT_HIT`]) are the probe's byte range ([`hit_bytes`]).
pub const MEM_EXEC_ARG_START: usize = 3;
/// ... `[4]` `mm->arg_end`, ...
pub const MEM_EXEC_ARG_END: usize = 4;
/// ... `[5]` the dentry's `d_name.hash` and `[15]` its `d_parent`: stamps the host checks
/// when it reads the dentry's path after the vCPU ran on (a dentry freed and reused for
/// another file in between reads differently, and the event then has no filename).
pub const MEM_EXEC_NAME_HASH: usize = 5;
/// ... `[15]` the dentry's `d_parent`.
pub const MEM_EXEC_PARENT: usize = 15;
/// Most bytes of `argv` an exec probe reads at the hit: the task reader's own default cap,
/// so an event built from them is the one built from memory.
pub const MAX_ARGV_BYTES_AT_HIT: u32 = 32 << 10;

/// True when a probe of `kind` gets, from [`hit_reads`] and [`hit_bytes`], everything its
/// event reports that could change or vanish once the vCPU runs on: an engine that does those
/// reads at the hit need not hold the vCPU for it (unless an ornament must act at the hit).
/// Fork, `proc_exit_connector` and `proc_exec_connector` are: exec reads the new command line
/// (user memory of a task that may exit at once) as the probe's byte range, and the
/// executable's dentry, whose path the host reads later (a dentry outlives the task in the
/// dentry cache). `begin_new_exec`, `do_exit`, setid and syscall probes are not (a syscall
/// event's path argument is read when it is delivered; its arguments and header are read at
/// the hit).
pub fn captured_at_hit(kind: ProbeKind) -> bool {
    matches!(
        kind,
        ProbeKind::Fork(_)
            | ProbeKind::Exit(ExitHook::ProcExitConnector)
            | ProbeKind::Exec(ExecHook::ProcExecConnector)
    )
}

/// Offsets in `struct dentry` of `d_name.hash` (4 bytes) and `d_parent` (8 bytes): what an
/// exec probe reads at the hit to recognise the same dentry later ([`MEM_EXEC_NAME_HASH`]).
pub fn dentry_stamp(profile: &Profile) -> Option<(u64, u64)> {
    let d_name = profile.offset("dentry", "d_name").ok()?;
    let hash = profile.offset("qstr", "hash").ok()?;
    let parent = profile.offset("dentry", "d_parent").ok()?;
    Some((d_name.wrapping_add(hash), parent))
}

/// The byte range a probe of `kind` reads at the hit, beside [`hit_reads`]: for
/// `proc_exec_connector` the new command line (`mm->arg_start..arg_end`, at most
/// [`MAX_ARGV_BYTES_AT_HIT`]); none for the others.
pub fn hit_bytes(kind: ProbeKind) -> BytesRead {
    match kind {
        ProbeKind::Exec(ExecHook::ProcExecConnector) => BytesRead {
            start: u8::try_from(MEM_EXEC_ARG_START).unwrap_or(u8::MAX),
            end: u8::try_from(MEM_EXEC_ARG_END).unwrap_or(u8::MAX),
            max: MAX_ARGV_BYTES_AT_HIT,
        },
        _ => BytesRead::default(),
    }
}

/// The memory reads an engine that reads guest memory in its probe callback (the TCG plugin)
/// does for a probe of `kind`, in the layout the monitor reads `ProbeHit::mem` with: the current
/// task at [`MEM_CURRENT_TASK`] for every probe, the six syscall arguments at
/// [`MEM_SYSCALL_ARGS`] and the caller's header at `MEM_HDR_*` for syscall probes, and for
/// fork and exit the task header at `MEM_HDR_*` and the event's own fields
/// (`MEM_CHILD_*`, `MEM_EXIT_*`). `current_task` is the
/// per-CPU offset of `current_task` (added to GS base).
pub fn hit_reads(
    kind: ProbeKind,
    profile: &Profile,
) -> Result<[MemRead; MAX_MEM_READS], ProfileError> {
    let mut m = [MemRead::default(); MAX_MEM_READS];
    let cur = &profile.percpu_current_task;
    let current = cur.symbol_offset.wrapping_add(cur.field_offset);
    m[MEM_CURRENT_TASK] = MemRead::at_reg(Reg::GsBase, current, 8);
    let t = |f: &str| profile.offset("task_struct", f);
    let chain = |j: usize, offset: u64, len: u8| {
        MemRead::at_mem(u8::try_from(j).unwrap_or(u8::MAX), offset, len)
    };
    // The header of the task whose address is `base` (a read or a register).
    let header = |m: &mut [MemRead; MAX_MEM_READS], base: MemBase| -> Result<(), ProfileError> {
        let at = |offset: u64, len: u8| MemRead { base, offset, len };
        m[MEM_HDR_PID] = at(t("pid")?, 4);
        m[MEM_HDR_TGID] = at(t("tgid")?, 4);
        // 16 bytes (TASK_COMM_LEN) in two reads; another size is left to the reader.
        if profile.field("task_struct", "comm")?.size == 16 {
            let comm = t("comm")?;
            m[MEM_HDR_COMM[0]] = at(comm, 8);
            m[MEM_HDR_COMM[1]] = at(comm.wrapping_add(8), 8);
        }
        m[MEM_HDR_REAL_PARENT] = at(t("real_parent")?, 8);
        m[MEM_HDR_PPID] = chain(MEM_HDR_REAL_PARENT, t("tgid")?, 4);
        m[MEM_HDR_CRED] = at(t("cred")?, 8);
        m[MEM_HDR_UID] = chain(MEM_HDR_CRED, profile.offset("cred", "uid")?, 4);
        Ok(())
    };
    match kind {
        ProbeKind::Syscall(_) => {
            for (i, f) in SYSCALL_ARG_FIELDS.iter().enumerate() {
                m[MEM_SYSCALL_ARGS.start + i] =
                    MemRead::at_reg(Reg::Rdi, profile.offset("pt_regs", f)?, 8);
            }
            // The caller's header too: the host then walks no page table per event.
            header(
                &mut m,
                MemBase::Mem(u8::try_from(MEM_CURRENT_TASK).unwrap_or(u8::MAX)),
            )?;
        }
        ProbeKind::Fork(_) => {
            header(
                &mut m,
                MemBase::Mem(u8::try_from(MEM_CURRENT_TASK).unwrap_or(u8::MAX)),
            )?;
            m[MEM_CHILD_PID] = MemRead::at_reg(Reg::Rdi, t("pid")?, 4);
            m[MEM_CHILD_TGID] = MemRead::at_reg(Reg::Rdi, t("tgid")?, 4);
            m[MEM_CHILD_FLAGS] = MemRead::at_reg(Reg::Rdi, t("flags")?, 4);
            m[MEM_CHILD_MM] = MemRead::at_reg(Reg::Rdi, t("mm")?, 8);
        }
        ProbeKind::Exit(ExitHook::ProcExitConnector) => {
            header(&mut m, MemBase::Reg(Reg::Rdi))?;
            m[MEM_EXIT_CODE] = MemRead::at_reg(Reg::Rdi, t("exit_code")?, 4);
            m[MEM_EXIT_SIGNAL] = MemRead::at_reg(Reg::Rdi, t("signal")?, 8);
            if let Ok(live) = profile.offset("signal_struct", "live") {
                m[MEM_EXIT_LIVE] = chain(MEM_EXIT_SIGNAL, live, 4);
            }
        }
        ProbeKind::Exec(ExecHook::ProcExecConnector) => {
            header(&mut m, MemBase::Reg(Reg::Rdi))?;
            let mm = |f: &str| profile.offset("mm_struct", f);
            m[MEM_EXEC_MM] = MemRead::at_reg(Reg::Rdi, t("mm")?, 8);
            m[MEM_EXEC_EXE_FILE] = chain(MEM_EXEC_MM, mm("exe_file")?, 8);
            let dentry = profile
                .offset("file", "f_path")?
                .wrapping_add(profile.offset("path", "dentry")?);
            m[MEM_EXEC_DENTRY] = chain(MEM_EXEC_EXE_FILE, dentry, 8);
            m[MEM_EXEC_ARG_START] = chain(MEM_EXEC_MM, mm("arg_start")?, 8);
            m[MEM_EXEC_ARG_END] = chain(MEM_EXEC_MM, mm("arg_end")?, 8);
            if let Some((hash, parent)) = dentry_stamp(profile) {
                m[MEM_EXEC_NAME_HASH] = chain(MEM_EXEC_DENTRY, hash, 4);
                m[MEM_EXEC_PARENT] = chain(MEM_EXEC_DENTRY, parent, 8);
            }
        }
        ProbeKind::Exec(ExecHook::BeginNewExec)
        | ProbeKind::Exit(ExitHook::DoExit)
        | ProbeKind::Setid => {}
    }
    Ok(m)
}

/// Which syscalls to report.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SyscallWatch {
    /// None.
    #[default]
    None,
    /// Every syscall (one trap per syscall: costly).
    All,
    /// Only these (by name, e.g. `openat`); the others cost nothing.
    Named(Vec<String>),
}

/// What to watch (plain data, validated by [`ProbeSet::new`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WatchConfig {
    /// Fork/clone events.
    pub fork: bool,
    /// Exec events.
    pub exec: bool,
    /// Exit events.
    pub exit: bool,
    /// Setid events.
    pub setid: bool,
    /// Syscall-entry events.
    pub syscalls: SyscallWatch,
    /// Syscalls to refuse: (name, errno in 1..=4095).
    pub deny: Vec<(String, i32)>,
    /// Hold the vCPU at every syscall probe (an ornament may pause the guest before the
    /// syscall runs); otherwise only probes covering a denied syscall hold.
    pub hold_syscalls: bool,
    /// Syscalls an ornament may decide to deny (by its own rule, say a path), with no
    /// rule of their own: their probes are placed and held as for `deny`.
    pub may_deny: Vec<String>,
    /// Deny at a held probe on each denied syscall's own entry function
    /// (`__x64_sys_NAME`, for engines that return from it early) instead of at the
    /// dispatcher `do_syscall_64` (for engines that deny through guest memory).
    pub deny_at_entry: bool,
}

/// Where a fork event is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ForkHook {
    /// `proc_fork_connector(struct task_struct *child)`, end of `copy_process`.
    ProcForkConnector,
    /// `wake_up_new_task(struct task_struct *child)`, in `kernel_clone`.
    WakeUpNewTask,
}

/// Where an exec event is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExecHook {
    /// `proc_exec_connector(struct task_struct *task)`, after a successful exec.
    ProcExecConnector,
    /// `begin_new_exec(struct linux_binprm *bprm)`: exec's point of no return, the new
    /// program's argv in `bprm->mm` at `bprm->p`.
    BeginNewExec,
}

/// Where an exit event is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExitHook {
    /// `proc_exit_connector(struct task_struct *task)`, `task->exit_code` set.
    ProcExitConnector,
    /// `do_exit(long code)`, current is the exiting task.
    DoExit,
}

/// Where a syscall event is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SyscallHook {
    /// `__x64_sys_NAME(const struct pt_regs *regs)`: one syscall.
    Function {
        /// Its number.
        nr: u32,
    },
    /// `do_syscall_64(struct pt_regs *regs, int nr)`: every syscall (or those of
    /// [`ArmSpec::syscall_filter`]).
    DoSyscall64,
}

/// What a probe reports, and how its hit is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProbeKind {
    /// Fork.
    Fork(ForkHook),
    /// Exec.
    Exec(ExecHook),
    /// Exit.
    Exit(ExitHook),
    /// `proc_id_connector(struct task_struct *task, int which_id)`.
    Setid,
    /// Syscall entry.
    Syscall(SyscallHook),
}

impl ProbeKind {
    /// The event kind the probe produces.
    pub fn event(&self) -> EventKind {
        match self {
            ProbeKind::Fork(_) => EventKind::Fork,
            ProbeKind::Exec(_) => EventKind::Exec,
            ProbeKind::Exit(_) => EventKind::Exit,
            ProbeKind::Setid => EventKind::Setid,
            ProbeKind::Syscall(_) => EventKind::Syscall,
        }
    }
}

/// One probe to arm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArmSpec {
    /// Its id (the index in [`ProbeSet::specs`]).
    pub id: ProbeId,
    /// Runtime (slid) address of the function's first instruction.
    pub at: Gva,
    /// The kernel symbol.
    pub symbol: String,
    /// What it reports.
    pub kind: ProbeKind,
    /// Hold the vCPU until the hit is answered.
    pub hold: bool,
    /// For `do_syscall_64`: report only hits whose `nr` (the low 32 bits of rsi at the
    /// probe) is one of these (sorted); `None`: all. An engine that cannot filter delivers every hit and the monitor drops the
    /// others (answering `Continue`).
    pub syscall_filter: Option<Vec<u32>>,
}

/// A hook that was missing from the profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeWarning {
    /// The event concerned.
    pub event: EventKind,
    /// The missing symbol.
    pub symbol: String,
    /// The symbol used instead, or `None` when the event is disabled.
    pub fallback: Option<String>,
}

impl fmt::Display for ProbeWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.fallback {
            Some(fb) => write!(
                f,
                "the profile has no {}: {} events come from {} instead",
                self.symbol, self.event, fb
            ),
            None => write!(
                f,
                "the profile has no {}: {} events are disabled",
                self.symbol, self.event
            ),
        }
    }
}

/// Which syscall numbers are reported as events.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Reported {
    /// None.
    #[default]
    None,
    /// All.
    All,
    /// These.
    Only(BTreeSet<u32>),
}

/// The probes to arm for a [`WatchConfig`] on one kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSet {
    specs: Vec<ArmSpec>,
    warnings: Vec<ProbeWarning>,
    reported: Reported,
    deny: BTreeMap<u32, i32>,
    deniable: BTreeSet<u32>,
}

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

struct Builder<'a> {
    profile: &'a Profile,
    layout: KernelLayout,
    specs: Vec<ArmSpec>,
    warnings: Vec<ProbeWarning>,
}

impl Builder<'_> {
    fn addr(&self, symbol: &str) -> Option<Gva> {
        self.profile
            .symbol(symbol)
            .ok()
            .or_else(|| self.profile.syscall_entry_points.get(symbol).copied())
            .map(|a| self.layout.virt(a))
    }

    fn push(&mut self, at: Gva, symbol: &str, kind: ProbeKind, hold: bool, f: Option<Vec<u32>>) {
        let id = ProbeId(u32::try_from(self.specs.len()).unwrap_or(u32::MAX));
        self.specs.push(ArmSpec {
            id,
            at,
            symbol: symbol.to_owned(),
            kind,
            hold,
            syscall_filter: f,
        });
    }

    /// A held probe on the entry function of each denied syscall not already probed
    /// (`done`); every entry exists (checked before).
    fn deny_entries(
        &mut self,
        deny: &BTreeMap<u32, i32>,
        done: &BTreeSet<u32>,
        entry_of: impl Fn(u32) -> (String, String),
    ) {
        for &nr in deny.keys() {
            if done.contains(&nr) {
                continue;
            }
            let (_, sym) = entry_of(nr);
            if let Some(at) = self.addr(&sym) {
                self.push(
                    at,
                    &sym,
                    ProbeKind::Syscall(SyscallHook::Function { nr }),
                    true,
                    None,
                );
            }
        }
    }

    fn warn(&mut self, event: EventKind, symbol: &str, fallback: Option<&str>) {
        let w = ProbeWarning {
            event,
            symbol: symbol.to_owned(),
            fallback: fallback.map(str::to_owned),
        };
        tracing::warn!("{w}");
        self.warnings.push(w);
    }

    /// The first present of `hooks` (symbol, kind), warning for each missing one.
    fn lifecycle(&mut self, event: EventKind, hooks: &[(&str, ProbeKind)]) {
        for (i, (sym, kind)) in hooks.iter().enumerate() {
            if let Some(at) = self.addr(sym) {
                self.push(at, sym, *kind, true, None);
                return;
            }
            self.warn(event, sym, hooks.get(i + 1).map(|h| h.0));
        }
    }
}

impl ProbeSet {
    /// The probes for `cfg` on the kernel of `profile`, moved by `layout`. Unknown
    /// syscall names and errno values outside 1..=4095 are errors; a missing hook only
    /// disables its events (see [`ProbeSet::warnings`]).
    pub fn new(
        profile: &Profile,
        layout: KernelLayout,
        cfg: &WatchConfig,
    ) -> Result<Self, ProbesError> {
        let rules = deny_rules(profile, &cfg.deny)?;
        // Where a deny must be possible: the rules' syscalls and those ornaments may deny.
        let mut deny = rules.clone();
        for nr in syscall_numbers(profile, &cfg.may_deny)? {
            deny.entry(nr).or_insert(0);
        }
        let named = match &cfg.syscalls {
            SyscallWatch::Named(names) => Some(syscall_numbers(profile, names)?),
            _ => None,
        };
        let mut b = Builder {
            profile,
            layout,
            specs: Vec::new(),
            warnings: Vec::new(),
        };
        if cfg.fork {
            b.lifecycle(
                EventKind::Fork,
                &[
                    (
                        "proc_fork_connector",
                        ProbeKind::Fork(ForkHook::ProcForkConnector),
                    ),
                    ("wake_up_new_task", ProbeKind::Fork(ForkHook::WakeUpNewTask)),
                ],
            );
        }
        if cfg.exec {
            b.lifecycle(
                EventKind::Exec,
                &[
                    (
                        "proc_exec_connector",
                        ProbeKind::Exec(ExecHook::ProcExecConnector),
                    ),
                    ("begin_new_exec", ProbeKind::Exec(ExecHook::BeginNewExec)),
                ],
            );
        }
        if cfg.exit {
            b.lifecycle(
                EventKind::Exit,
                &[
                    (
                        "proc_exit_connector",
                        ProbeKind::Exit(ExitHook::ProcExitConnector),
                    ),
                    ("do_exit", ProbeKind::Exit(ExitHook::DoExit)),
                ],
            );
        }
        if cfg.setid {
            b.lifecycle(EventKind::Setid, &[("proc_id_connector", ProbeKind::Setid)]);
        }

        const DO_SYSCALL_64: &str = "do_syscall_64";
        let dispatcher = b.addr(DO_SYSCALL_64);
        // Denied syscalls go through the dispatcher, or each through its entry function.
        let deny_via_dispatcher = !cfg.deny_at_entry && !deny.is_empty();
        if deny_via_dispatcher && dispatcher.is_none() {
            return Err(ProbesError::NoDenyHook {
                symbol: DO_SYSCALL_64,
            });
        }
        let entry_of = |nr: u32| {
            let name = profile.syscall_name(nr).unwrap_or_default().to_owned();
            let sym = format!("__x64_sys_{name}");
            (name, sym)
        };
        if cfg.deny_at_entry {
            for &nr in deny.keys() {
                let (name, symbol) = entry_of(nr);
                if b.addr(&symbol).is_none() {
                    return Err(ProbesError::NoDenyEntry { name, symbol });
                }
            }
        }
        let kind = ProbeKind::Syscall(SyscallHook::DoSyscall64);
        let reported = match (&cfg.syscalls, named) {
            (SyscallWatch::All, _) => {
                if cfg.deny_at_entry && !deny.is_empty() {
                    return Err(ProbesError::AllWithEntryDeny);
                }
                match dispatcher {
                    Some(at) => {
                        let hold = cfg.hold_syscalls || deny_via_dispatcher;
                        b.push(at, DO_SYSCALL_64, kind, hold, None);
                        Reported::All
                    }
                    None => {
                        b.warn(EventKind::Syscall, DO_SYSCALL_64, None);
                        Reported::None
                    }
                }
            }
            (SyscallWatch::Named(_), Some(nrs)) => {
                let mut reported = BTreeSet::new();
                // Through do_syscall_64: the denied ones (unless denied at entry), and
                // watched ones with no __x64_sys_ entry point.
                let mut via_dispatcher: BTreeSet<u32> = if deny_via_dispatcher {
                    deny.keys().copied().collect()
                } else {
                    BTreeSet::new()
                };
                for nr in nrs {
                    let (_, sym) = entry_of(nr);
                    if !reported.insert(nr) || via_dispatcher.contains(&nr) {
                        continue;
                    }
                    match b.addr(&sym) {
                        Some(at) => b.push(
                            at,
                            &sym,
                            ProbeKind::Syscall(SyscallHook::Function { nr }),
                            cfg.hold_syscalls || deny.contains_key(&nr),
                            None,
                        ),
                        None if dispatcher.is_some() => {
                            b.warn(EventKind::Syscall, &sym, Some(DO_SYSCALL_64));
                            via_dispatcher.insert(nr);
                        }
                        None => {
                            b.warn(EventKind::Syscall, &sym, None);
                            reported.remove(&nr);
                        }
                    }
                }
                if cfg.deny_at_entry {
                    b.deny_entries(&deny, &reported, entry_of);
                }
                if let (Some(at), false) = (dispatcher, via_dispatcher.is_empty()) {
                    let hold = cfg.hold_syscalls || deny_via_dispatcher;
                    b.push(
                        at,
                        DO_SYSCALL_64,
                        kind,
                        hold,
                        Some(via_dispatcher.into_iter().collect()),
                    );
                }
                Reported::Only(reported)
            }
            _ => {
                if cfg.deny_at_entry {
                    b.deny_entries(&deny, &BTreeSet::new(), entry_of);
                } else if let (Some(at), true) = (dispatcher, deny_via_dispatcher) {
                    b.push(
                        at,
                        DO_SYSCALL_64,
                        kind,
                        true,
                        Some(deny.keys().copied().collect()),
                    );
                }
                Reported::None
            }
        };
        Ok(Self {
            specs: b.specs,
            warnings: b.warnings,
            reported,
            deniable: deny.keys().copied().collect(),
            deny: rules,
        })
    }

    /// The probes to arm, in id order.
    pub fn specs(&self) -> &[ArmSpec] {
        &self.specs
    }

    /// The probe with id `id`.
    pub fn get(&self, id: ProbeId) -> Option<&ArmSpec> {
        self.specs
            .get(usize::try_from(id.0).ok()?)
            .filter(|s| s.id == id)
    }

    /// Hooks that were missing, with what was done instead.
    pub fn warnings(&self) -> &[ProbeWarning] {
        &self.warnings
    }

    /// The event kinds some probe reports.
    pub fn events(&self) -> BTreeSet<EventKind> {
        let mut k: BTreeSet<EventKind> = self.specs.iter().map(|s| s.kind.event()).collect();
        if self.reported == Reported::None {
            k.remove(&EventKind::Syscall);
        }
        k
    }

    /// Which syscalls are reported as events.
    pub fn reported_syscalls(&self) -> &Reported {
        &self.reported
    }

    /// True when syscall `nr` is reported as an event.
    pub fn reports_syscall(&self, nr: u32) -> bool {
        match &self.reported {
            Reported::None => false,
            Reported::All => true,
            Reported::Only(s) => s.contains(&nr),
        }
    }

    /// The deny rules: syscall number -> errno.
    pub fn deny_rules(&self) -> &BTreeMap<u32, i32> {
        &self.deny
    }

    /// The syscalls whose probes can deny: the rules' and `may_deny`'s.
    pub fn deniable(&self) -> &BTreeSet<u32> {
        &self.deniable
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::committed_profiles;

    const LAYOUT: KernelLayout = KernelLayout {
        virt_slide: 0x1e00_0000,
        phys_slide: 0x0200_0000,
    };

    fn lifecycle() -> WatchConfig {
        WatchConfig {
            fork: true,
            exec: true,
            exit: true,
            setid: true,
            ..WatchConfig::default()
        }
    }

    #[test]
    fn lifecycle_hooks_from_real_profiles() {
        for p in committed_profiles() {
            let set = ProbeSet::new(&p, LAYOUT, &lifecycle()).expect("set");
            assert!(set.warnings().is_empty(), "{:?}", set.warnings());
            let syms: Vec<_> = set.specs().iter().map(|s| s.symbol.as_str()).collect();
            assert_eq!(
                syms,
                [
                    "proc_fork_connector",
                    "proc_exec_connector",
                    "proc_exit_connector",
                    "proc_id_connector"
                ]
            );
            for (i, s) in set.specs().iter().enumerate() {
                assert_eq!(s.id, ProbeId(u32::try_from(i).expect("few probes")));
                assert!(s.hold);
                assert_eq!(s.syscall_filter, None);
                let link = p.symbol(&s.symbol).expect("sym");
                assert_eq!(s.at, link.wrapping_add(LAYOUT.virt_slide));
                assert_eq!(set.get(s.id), Some(s));
            }
            assert_eq!(set.get(ProbeId(99)), None);
            assert!(!set.reports_syscall(0));
            assert_eq!(set.events().len(), 4);
        }
    }

    #[test]
    fn missing_symbols_disable_only_their_events() {
        let mut p = committed_profiles().remove(0);
        p.symbols.remove("proc_fork_connector");
        p.symbols.remove("proc_exec_connector");
        p.symbols.remove("begin_new_exec");
        p.symbols.remove("proc_id_connector");
        let set = ProbeSet::new(&p, LAYOUT, &lifecycle()).expect("set");
        let kinds: Vec<_> = set.specs().iter().map(|s| s.kind).collect();
        assert_eq!(
            kinds,
            [
                ProbeKind::Fork(ForkHook::WakeUpNewTask),
                ProbeKind::Exit(ExitHook::ProcExitConnector)
            ]
        );
        let w: Vec<String> = set.warnings().iter().map(|w| w.to_string()).collect();
        assert_eq!(
            w,
            [
                "the profile has no proc_fork_connector: fork events come from wake_up_new_task instead",
                "the profile has no proc_exec_connector: exec events come from begin_new_exec instead",
                "the profile has no begin_new_exec: exec events are disabled",
                "the profile has no proc_id_connector: setid events are disabled",
            ]
        );
        assert_eq!(
            set.events().into_iter().collect::<Vec<_>>(),
            [EventKind::Fork, EventKind::Exit]
        );
    }

    #[test]
    fn named_syscalls_and_deny() {
        for p in committed_profiles() {
            let cfg = WatchConfig {
                syscalls: SyscallWatch::Named(vec!["openat".into(), "mkdirat".into()]),
                deny: vec![("mkdirat".into(), 1), ("unlinkat".into(), 13)],
                ..WatchConfig::default()
            };
            let set = ProbeSet::new(&p, LAYOUT, &cfg).expect("set");
            let openat = p.syscall_nr("openat").expect("openat");
            let mkdirat = p.syscall_nr("mkdirat").expect("mkdirat");
            let unlinkat = p.syscall_nr("unlinkat").expect("unlinkat");
            let specs = set.specs();
            assert_eq!(specs.len(), 2, "{specs:?}");
            assert_eq!(specs[0].symbol, "__x64_sys_openat");
            assert_eq!(
                specs[0].kind,
                ProbeKind::Syscall(SyscallHook::Function { nr: openat })
            );
            assert!(!specs[0].hold);
            assert_eq!(
                specs[0].at,
                LAYOUT.virt(p.syscall_entry_points["__x64_sys_openat"])
            );
            assert_eq!(specs[1].symbol, "do_syscall_64");
            assert!(specs[1].hold);
            let mut want = vec![mkdirat, unlinkat];
            want.sort_unstable();
            assert_eq!(specs[1].syscall_filter, Some(want));
            assert!(set.reports_syscall(openat) && set.reports_syscall(mkdirat));
            assert!(!set.reports_syscall(unlinkat));
            assert_eq!(set.deny_rules()[&unlinkat], 13);
        }
    }

    #[test]
    fn all_syscalls_and_deny_only() {
        let p = committed_profiles().remove(1);
        let all = WatchConfig {
            syscalls: SyscallWatch::All,
            ..WatchConfig::default()
        };
        let set = ProbeSet::new(&p, LAYOUT, &all).expect("set");
        assert_eq!(set.specs().len(), 1);
        assert!(!set.specs()[0].hold && set.specs()[0].syscall_filter.is_none());
        assert!(set.reports_syscall(0) && set.reports_syscall(300));
        let deny_only = WatchConfig {
            deny: vec![("mkdirat".into(), 1)],
            ..WatchConfig::default()
        };
        let set = ProbeSet::new(&p, LAYOUT, &deny_only).expect("set");
        assert_eq!(set.specs().len(), 1);
        assert!(set.specs()[0].hold);
        assert_eq!(set.specs()[0].syscall_filter, Some(vec![258]));
        assert!(!set.reports_syscall(258));
        assert!(set.events().is_empty());
        // A named syscall with no entry point goes through do_syscall_64.
        let mut q = p.clone();
        q.syscall_entry_points.remove("__x64_sys_openat");
        let named = WatchConfig {
            syscalls: SyscallWatch::Named(vec!["openat".into()]),
            ..WatchConfig::default()
        };
        let set = ProbeSet::new(&q, LAYOUT, &named).expect("set");
        assert_eq!(set.specs().len(), 1);
        assert_eq!(set.specs()[0].syscall_filter, Some(vec![257]));
        assert!(!set.specs()[0].hold);
        assert_eq!(set.warnings().len(), 1);
        // Deny with no do_syscall_64 is refused, never silently dropped.
        q.symbols.remove("do_syscall_64");
        assert_eq!(
            ProbeSet::new(&q, LAYOUT, &deny_only),
            Err(ProbesError::NoDenyHook {
                symbol: "do_syscall_64"
            })
        );
    }

    #[test]
    fn hit_reads_layout() {
        for p in committed_profiles() {
            let kinds = [
                ProbeKind::Fork(ForkHook::ProcForkConnector),
                ProbeKind::Fork(ForkHook::WakeUpNewTask),
                ProbeKind::Exec(ExecHook::ProcExecConnector),
                ProbeKind::Exit(ExitHook::ProcExitConnector),
                ProbeKind::Exit(ExitHook::DoExit),
                ProbeKind::Setid,
                ProbeKind::Syscall(SyscallHook::DoSyscall64),
            ];
            for kind in kinds {
                let m = hit_reads(kind, &p).expect("reads");
                // Every probe reads the current task; chains only reach back.
                assert_eq!(m[MEM_CURRENT_TASK].base, MemBase::Reg(Reg::GsBase));
                for (i, r) in m.iter().enumerate() {
                    if let MemBase::Mem(j) = r.base {
                        assert!(usize::from(j) < i, "{kind:?} read {i} chains to {j}");
                    }
                    if r.base != MemBase::None {
                        assert!((1..=8).contains(&r.len));
                    }
                }
                let used = m.iter().filter(|r| r.base != MemBase::None).count();
                let want = match kind {
                    ProbeKind::Fork(_) => 13,
                    ProbeKind::Exit(ExitHook::ProcExitConnector) => 12,
                    // The task's 8-read header, mm, exe_file, its dentry, arg_start, arg_end,
                    // the dentry's name hash and parent.
                    ProbeKind::Exec(ExecHook::ProcExecConnector) => 16,
                    // Six arguments, the current task and its 8-read header.
                    ProbeKind::Syscall(_) => 15,
                    _ => 1,
                };
                assert_eq!(used, want, "{kind:?}");
                assert_eq!(
                    captured_at_hit(kind),
                    matches!(
                        kind,
                        ProbeKind::Fork(_)
                            | ProbeKind::Exit(ExitHook::ProcExitConnector)
                            | ProbeKind::Exec(ExecHook::ProcExecConnector)
                    )
                );
                // Only exec reads a byte range, between two of its own reads.
                let b = hit_bytes(kind);
                if kind == ProbeKind::Exec(ExecHook::ProcExecConnector) {
                    assert_eq!(m[usize::from(b.start)].base, MemBase::Mem(0));
                    assert_eq!(m[usize::from(b.end)].base, MemBase::Mem(0));
                    assert_eq!(b.max, MAX_ARGV_BYTES_AT_HIT);
                    assert_eq!(m[MEM_EXEC_MM].base, MemBase::Reg(Reg::Rdi));
                } else {
                    assert!(!b.is_some(), "{kind:?}");
                }
            }
            let fork = hit_reads(ProbeKind::Fork(ForkHook::ProcForkConnector), &p).expect("r");
            let cur = u8::try_from(MEM_CURRENT_TASK).expect("small");
            assert_eq!(fork[MEM_HDR_PID].base, MemBase::Mem(cur));
            assert_eq!(
                fork[MEM_HDR_PPID],
                MemRead {
                    base: MemBase::Mem(u8::try_from(MEM_HDR_REAL_PARENT).expect("small")),
                    offset: p.offset("task_struct", "tgid").expect("tgid"),
                    len: 4
                }
            );
            assert_eq!(fork[MEM_CHILD_PID].base, MemBase::Reg(Reg::Rdi));
            let sys = hit_reads(ProbeKind::Syscall(SyscallHook::DoSyscall64), &p).expect("r");
            assert_eq!(sys[MEM_HDR_PID].base, MemBase::Mem(cur));
            assert_eq!(sys[MEM_HDR_UID].base, fork[MEM_HDR_UID].base);
            let exit = hit_reads(ProbeKind::Exit(ExitHook::ProcExitConnector), &p).expect("r");
            assert_eq!(exit[MEM_HDR_PID].base, MemBase::Reg(Reg::Rdi));
            assert_eq!(
                exit[MEM_EXIT_LIVE].base,
                MemBase::Mem(u8::try_from(MEM_EXIT_SIGNAL).expect("small"))
            );
        }
    }

    #[test]
    fn parsing_watch_lists_and_errnos() {
        let mut w = WatchConfig::default();
        w.add_watch_list("fork,exec,syscall=openat,mkdirat,exit")
            .expect("list");
        assert!(w.fork && w.exec && w.exit && !w.setid);
        assert_eq!(
            w.syscalls,
            SyscallWatch::Named(vec!["openat".into(), "mkdirat".into()])
        );
        w.add_watch_list("setid,syscall").expect("list");
        assert!(w.setid);
        assert_eq!(w.syscalls, SyscallWatch::All);
        assert_eq!(
            WatchConfig::default().add_watch_list("fork,openat"),
            Err(ProbesError::UnknownWatch {
                name: "openat".into()
            })
        );
        assert_eq!(parse_deny("mkdirat:EPERM"), Ok(("mkdirat".into(), 1)));
        assert_eq!(parse_deny("mkdirat:eacces"), Ok(("mkdirat".into(), 13)));
        assert_eq!(parse_deny("mkdirat:38"), Ok(("mkdirat".into(), 38)));
        assert_eq!(parse_deny("unlinkat"), Ok(("unlinkat".into(), 1)));
        for bad in ["mkdirat:EWHAT", "mkdirat:0", "mkdirat:4096", "mkdirat:-1"] {
            assert!(
                matches!(parse_deny(bad), Err(ProbesError::UnknownErrno { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn bad_input_is_a_typed_error() {
        let p = committed_profiles().remove(0);
        let cfg = WatchConfig {
            syscalls: SyscallWatch::Named(vec!["openat".into(), "frobnicate".into()]),
            ..WatchConfig::default()
        };
        let e = ProbeSet::new(&p, LAYOUT, &cfg).expect_err("unknown");
        assert_eq!(
            e,
            ProbesError::UnknownSyscall {
                name: "frobnicate".into()
            }
        );
        assert_eq!(
            e.to_string(),
            "unknown syscall \"frobnicate\": this kernel has no such x86-64 syscall"
        );
        for errno in [0, -1, 4096] {
            let cfg = WatchConfig {
                deny: vec![("mkdirat".into(), errno)],
                ..WatchConfig::default()
            };
            assert_eq!(
                ProbeSet::new(&p, LAYOUT, &cfg),
                Err(ProbesError::BadErrno {
                    syscall: "mkdirat".into(),
                    errno
                })
            );
        }
        let cfg = WatchConfig {
            deny: vec![("nosuch".into(), 1)],
            ..WatchConfig::default()
        };
        assert!(matches!(
            ProbeSet::new(&p, LAYOUT, &cfg),
            Err(ProbesError::UnknownSyscall { .. })
        ));
    }
}
