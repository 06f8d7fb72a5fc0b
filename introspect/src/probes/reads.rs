//! What a probe reads at the hit, for engines that capture there (the TCG plugin): the
//! slots of `ProbeHit::mem` ([`MEM_CURRENT_TASK`], [`MEM_SYSCALL_ARGS`], `MEM_HDR_*`, ...),
//! [`hit_reads`] and [`hit_bytes`] that fill them, and [`captured_at_hit`]: which events
//! are complete from them, so their probes need not hold the vCPU.

use super::{ExecHook, ExitHook, ProbeKind, ReturnHook, SignalHook};
use crate::profile::{Profile, ProfileError};
use ornament_engine::wire::FilterOn;
use ornament_engine::wire::{BytesRead, MemBase, MemRead, Reg, MAX_MEM_READS};

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
/// ... and `[14]` `task->cred->uid`, with `gid` in its high half where the profile has
/// `gid` right after `uid` (it always has: `struct cred` keeps them side by side) ...
pub const MEM_HDR_UID: usize = 14;
/// ... and for fork, exit and syscall probes `[15]` `task->cred->euid`, with `egid` in its
/// high half likewise (exec probes use `[15]` for [`MEM_EXEC_PARENT`]: their `euid` and
/// `egid` are read from the cred read at the hit, when the event is built).
pub const MEM_HDR_EUID: usize = 15;
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
/// ... `[16]` `task->fs`, ...
pub const MEM_EXEC_FS: usize = 16;
/// ... `[17]` `fs->pwd.mnt` and `[18]` `fs->pwd.dentry` (the working directory), ...
pub const MEM_EXEC_PWD_MNT: usize = 17;
/// ... `[18]` `fs->pwd.dentry`, ...
pub const MEM_EXEC_PWD_DENTRY: usize = 18;
/// ... and `[19]` that dentry's `d_name.hash` and `[20]` its `d_parent`: the same stamps
/// as the executable's, for the working directory's path read after the vCPU ran on.
pub const MEM_EXEC_PWD_HASH: usize = 19;
/// ... `[20]` the working directory's `d_parent`.
pub const MEM_EXEC_PWD_PARENT: usize = 20;
/// Return probes (`syscall_exit_to_user_mode`) read `ProbeHit::mem[0]` `regs->ax`, the
/// value the syscall returns, ...
pub const MEM_RET_AX: usize = 0;
/// ... and `[1]` `regs->orig_ax`, the syscall's number (what their filter tests); with the
/// caller's header at `MEM_HDR_*`. The failed-exec probes also read `[2]` the file-name
/// argument (`regs->di` of `execve`, `regs->si` of `execveat`), and the name itself as
/// their byte range ([`MAX_EXEC_NAME_AT_HIT`] bytes from there, cut at the NUL by the
/// reader): the kernel's own copy of it has been freed by then, and the user's may change
/// once the task runs on.
pub const MEM_RET_ORIG_AX: usize = 1;
/// The file-name argument at a failed-exec probe.
pub const MEM_RET_NAME: usize = 2;
/// Most bytes of the file name the failed-exec probe reads (`PATH_MAX`).
pub const MAX_EXEC_NAME_AT_HIT: u32 = 4096;
/// Signal-generation probes (`__send_signal_locked`) read the target (rdx):
/// `ProbeHit::mem[0]` `t->pid`, ...
pub const MEM_SIG_TARGET_PID: usize = 0;
/// ... `[1]` `t->tgid`, ...
pub const MEM_SIG_TARGET_TGID: usize = 1;
/// ... `[2]` the siginfo's (rsi) `si_code`, ...
pub const MEM_SIG_CODE: usize = 2;
/// ... `[3]` its first 8 bytes of fields (`si_addr`; `si_pid` and `si_uid`), ...
pub const MEM_SIG_FIELDS: usize = 3;
/// ... and `[4]`, `[5]` the 16 bytes of `t->comm`. `signal_setup_done` probes read
/// `[0]` `ksig->sig`. The sender's (current's) header is at `MEM_HDR_*`.
pub const MEM_SIG_TARGET_COMM: [usize; 2] = [4, 5];
/// `do_group_exit` probes read `[0]` the current task again (a read chains only to a
/// lower index), `[1]` its `signal`, ...
pub const MEM_KILL_SIGNAL: usize = 1;
/// ... `[2]` that one's `flags` (`SIGNAL_GROUP_EXIT`: the group is already dying, of
/// `group_exit_code`, whatever the argument says), ...
pub const MEM_KILL_FLAGS: usize = 2;
/// ... and `[3]` its `group_exit_code`.
pub const MEM_KILL_GROUP_CODE: usize = 3;
/// Offsets in the kernel's `struct kernel_siginfo`, which is the user ABI's `siginfo_t`
/// (include/uapi/asm-generic/siginfo.h: `si_signo`, `si_errno`, `si_code`, then the union,
/// 8-aligned): `si_code` ...
pub const SIGINFO_CODE: u64 = 8;
/// ... and the union (`si_pid` then `si_uid` for a signal from a task, `si_addr` for a fault).
pub const SIGINFO_FIELDS: u64 = 16;
/// Most bytes of `argv` an exec probe reads at the hit: the task reader's own default cap,
/// so an event built from them is the one built from memory.
pub const MAX_ARGV_BYTES_AT_HIT: u32 = 32 << 10;

/// What the syscall-number filter of a probe of `kind` tests: `rsi` (`do_syscall_64`'s
/// `nr`) at an entry, the read of `regs->orig_ax` at a return.
pub fn filter_on(kind: ProbeKind) -> FilterOn {
    match kind {
        ProbeKind::Return(_) => FilterOn::Mem(u8::try_from(MEM_RET_ORIG_AX).unwrap_or(u8::MAX)),
        _ => FilterOn::Reg(Reg::Rsi),
    }
}

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
            | ProbeKind::Signal(_)
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
        ProbeKind::Return(ReturnHook::Exec | ReturnHook::ExecAt) => BytesRead {
            start: u8::try_from(MEM_RET_NAME).unwrap_or(u8::MAX),
            end: u8::try_from(MEM_RET_NAME).unwrap_or(u8::MAX),
            max: MAX_EXEC_NAME_AT_HIT,
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
    // The header of the task whose address is `base` (a read or a register), with its
    // euid and egid unless `MEM_HDR_EUID` is taken.
    let header = |m: &mut [MemRead; MAX_MEM_READS],
                  base: MemBase,
                  with_euid: bool|
     -> Result<(), ProfileError> {
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
        let pair = |a: &str, b: &str| -> Result<(u64, u8), ProfileError> {
            let first = profile.offset("cred", a)?;
            let len = if profile.offset("cred", b)? == first.wrapping_add(4) {
                8
            } else {
                4
            };
            Ok((first, len))
        };
        let (uid, len) = pair("uid", "gid")?;
        m[MEM_HDR_UID] = chain(MEM_HDR_CRED, uid, len);
        if with_euid {
            let (euid, len) = pair("euid", "egid")?;
            m[MEM_HDR_EUID] = chain(MEM_HDR_CRED, euid, len);
        }
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
                true,
            )?;
        }
        ProbeKind::Return(_) => {
            m[MEM_RET_AX] = MemRead::at_reg(Reg::Rdi, profile.offset("pt_regs", "ax")?, 8);
            m[MEM_RET_ORIG_AX] =
                MemRead::at_reg(Reg::Rdi, profile.offset("pt_regs", "orig_ax")?, 8);
            let name_arg = match kind {
                ProbeKind::Return(ReturnHook::Exec) => Some("di"),
                ProbeKind::Return(ReturnHook::ExecAt) => Some("si"),
                _ => None,
            };
            if let Some(arg) = name_arg {
                m[MEM_RET_NAME] = MemRead::at_reg(Reg::Rdi, profile.offset("pt_regs", arg)?, 8);
            }
            header(
                &mut m,
                MemBase::Mem(u8::try_from(MEM_CURRENT_TASK).unwrap_or(u8::MAX)),
                true,
            )?;
        }
        ProbeKind::Signal(hook) => {
            header(
                &mut m,
                MemBase::Mem(u8::try_from(MEM_CURRENT_TASK).unwrap_or(u8::MAX)),
                true,
            )?;
            match hook {
                SignalHook::SendLocked | SignalHook::SendLockedOuter => {
                    m[MEM_SIG_TARGET_PID] = MemRead::at_reg(Reg::Rdx, t("pid")?, 4);
                    m[MEM_SIG_TARGET_TGID] = MemRead::at_reg(Reg::Rdx, t("tgid")?, 4);
                    m[MEM_SIG_CODE] = MemRead::at_reg(Reg::Rsi, SIGINFO_CODE, 4);
                    m[MEM_SIG_FIELDS] = MemRead::at_reg(Reg::Rsi, SIGINFO_FIELDS, 8);
                    if profile.field("task_struct", "comm")?.size == 16 {
                        let comm = t("comm")?;
                        m[MEM_SIG_TARGET_COMM[0]] = MemRead::at_reg(Reg::Rdx, comm, 8);
                        m[MEM_SIG_TARGET_COMM[1]] =
                            MemRead::at_reg(Reg::Rdx, comm.wrapping_add(8), 8);
                    }
                }
                SignalHook::Handler => {
                    m[0] = MemRead::at_reg(Reg::Rsi, profile.offset("ksignal", "sig")?, 4);
                }
                SignalHook::Kill => {
                    let sig = |f: &str| profile.offset("signal_struct", f);
                    if let (Ok(flags), Ok(code)) = (sig("flags"), sig("group_exit_code")) {
                        m[0] = MemRead::at_reg(Reg::GsBase, current, 8);
                        m[MEM_KILL_SIGNAL] = chain(0, t("signal")?, 8);
                        m[MEM_KILL_FLAGS] = chain(MEM_KILL_SIGNAL, flags, 4);
                        m[MEM_KILL_GROUP_CODE] = chain(MEM_KILL_SIGNAL, code, 4);
                    }
                }
                SignalHook::Stop => {}
            }
        }
        ProbeKind::Fork(_) => {
            header(
                &mut m,
                MemBase::Mem(u8::try_from(MEM_CURRENT_TASK).unwrap_or(u8::MAX)),
                true,
            )?;
            m[MEM_CHILD_PID] = MemRead::at_reg(Reg::Rdi, t("pid")?, 4);
            m[MEM_CHILD_TGID] = MemRead::at_reg(Reg::Rdi, t("tgid")?, 4);
            m[MEM_CHILD_FLAGS] = MemRead::at_reg(Reg::Rdi, t("flags")?, 4);
            m[MEM_CHILD_MM] = MemRead::at_reg(Reg::Rdi, t("mm")?, 8);
        }
        ProbeKind::Exit(ExitHook::ProcExitConnector) => {
            header(&mut m, MemBase::Reg(Reg::Rdi), true)?;
            m[MEM_EXIT_CODE] = MemRead::at_reg(Reg::Rdi, t("exit_code")?, 4);
            m[MEM_EXIT_SIGNAL] = MemRead::at_reg(Reg::Rdi, t("signal")?, 8);
            if let Ok(live) = profile.offset("signal_struct", "live") {
                m[MEM_EXIT_LIVE] = chain(MEM_EXIT_SIGNAL, live, 4);
            }
        }
        ProbeKind::Exec(ExecHook::ProcExecConnector) => {
            header(&mut m, MemBase::Reg(Reg::Rdi), false)?;
            let mm = |f: &str| profile.offset("mm_struct", f);
            m[MEM_EXEC_MM] = MemRead::at_reg(Reg::Rdi, t("mm")?, 8);
            m[MEM_EXEC_EXE_FILE] = chain(MEM_EXEC_MM, mm("exe_file")?, 8);
            let dentry = profile
                .offset("file", "f_path")?
                .wrapping_add(profile.offset("path", "dentry")?);
            m[MEM_EXEC_DENTRY] = chain(MEM_EXEC_EXE_FILE, dentry, 8);
            m[MEM_EXEC_ARG_START] = chain(MEM_EXEC_MM, mm("arg_start")?, 8);
            m[MEM_EXEC_ARG_END] = chain(MEM_EXEC_MM, mm("arg_end")?, 8);
            let stamp = dentry_stamp(profile);
            if let Some((hash, parent)) = stamp {
                m[MEM_EXEC_NAME_HASH] = chain(MEM_EXEC_DENTRY, hash, 4);
                m[MEM_EXEC_PARENT] = chain(MEM_EXEC_DENTRY, parent, 8);
            }
            // The working directory, where the profile has `task->fs->pwd`.
            if let (Ok(fs), Ok(pwd)) = (t("fs"), profile.offset("fs_struct", "pwd")) {
                let in_pwd = |f: &str| profile.offset("path", f).map(|o| pwd.wrapping_add(o));
                m[MEM_EXEC_FS] = MemRead::at_reg(Reg::Rdi, fs, 8);
                m[MEM_EXEC_PWD_MNT] = chain(MEM_EXEC_FS, in_pwd("mnt")?, 8);
                m[MEM_EXEC_PWD_DENTRY] = chain(MEM_EXEC_FS, in_pwd("dentry")?, 8);
                if let Some((hash, parent)) = stamp {
                    m[MEM_EXEC_PWD_HASH] = chain(MEM_EXEC_PWD_DENTRY, hash, 4);
                    m[MEM_EXEC_PWD_PARENT] = chain(MEM_EXEC_PWD_DENTRY, parent, 8);
                }
            }
        }
        ProbeKind::Exec(ExecHook::BeginNewExec)
        | ProbeKind::Exit(ExitHook::DoExit)
        | ProbeKind::Setid
        | ProbeKind::ExecAttempt => {}
    }
    Ok(m)
}
