//! \[5\] Typed events (fork, exec, exit, syscall, setid): one JSON object per line, and a
//! one-line text form. The schema is [`SCHEMA_DOC`] (also `introspect/EVENTS.md`).

mod text;

use serde::{Deserialize, Serialize};
use std::fmt;

pub use text::write_escaped;

/// The JSON-lines schema of every event, as documentation (the same text as
/// `introspect/EVENTS.md`).
pub const SCHEMA_DOC: &str = include_str!("../EVENTS.md");

/// The version of the JSON schema (`schema` in every line `ornament run` writes): a change
/// of a field's meaning is a new version.
pub const SCHEMA_VERSION: u32 = 2;

/// The JSON Schema (draft 2020-12) of the lines `ornament run --format json` writes.
pub const JSON_SCHEMA: &str = include_str!("../events.schema.json");

/// Most `argv` entries an exec event carries; more set `argv_truncated`.
pub const MAX_ARGV_ENTRIES: usize = 1024;

/// Most bytes of a decoded path argument (`PATH_MAX` less its NUL).
pub const MAX_PATH_BYTES: usize = 4095;

/// Why an event could not be encoded or decoded.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum EventError {
    /// cannot decode an event from JSON
    Json(#[from] serde_json::Error),
}

/// The kinds of events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A task was created (process or thread).
    Fork,
    /// A task executed a new program (successfully).
    Exec,
    /// A task exited.
    Exit,
    /// A task entered a system call.
    Syscall,
    /// A task's user or group ids changed.
    Setid,
    /// A watched system call returned (or its task exited inside it).
    SyscallReturn,
    /// An exec failed (`execve`/`execveat` returned an error).
    ExecFailed,
    /// A signal was generated (sent to a task or a process).
    Signal,
    /// A signal was delivered: a handler runs, the task stops, or it dies.
    SignalDeliver,
}

impl EventKind {
    /// Every kind, in schema order.
    pub const ALL: [EventKind; 9] = [
        EventKind::Fork,
        EventKind::Exec,
        EventKind::Exit,
        EventKind::Syscall,
        EventKind::Setid,
        EventKind::SyscallReturn,
        EventKind::ExecFailed,
        EventKind::Signal,
        EventKind::SignalDeliver,
    ];

    /// The value of the `event` field.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Fork => "fork",
            EventKind::Exec => "exec",
            EventKind::Exit => "exit",
            EventKind::Syscall => "syscall",
            EventKind::Setid => "setid",
            EventKind::SyscallReturn => "syscall_return",
            EventKind::ExecFailed => "exec_failed",
            EventKind::Signal => "signal",
            EventKind::SignalDeliver => "signal_deliver",
        }
    }

    /// This kind's bit in an [`EventMask`].
    pub fn bit(self) -> EventMask {
        match self {
            EventKind::Fork => EventMask::FORK,
            EventKind::Exec => EventMask::EXEC,
            EventKind::Exit => EventMask::EXIT,
            EventKind::Syscall => EventMask::SYSCALL,
            EventKind::Setid => EventMask::SETID,
            EventKind::SyscallReturn => EventMask::SYSCALL_RETURN,
            EventKind::ExecFailed => EventMask::EXEC_FAILED,
            EventKind::Signal => EventMask::SIGNAL,
            EventKind::SignalDeliver => EventMask::SIGNAL_DELIVER,
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of event kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct EventMask(u16);

impl EventMask {
    /// No events.
    pub const NONE: Self = Self(0);
    /// Fork events.
    pub const FORK: Self = Self(1);
    /// Exec events.
    pub const EXEC: Self = Self(2);
    /// Exit events.
    pub const EXIT: Self = Self(4);
    /// Syscall events.
    pub const SYSCALL: Self = Self(8);
    /// Setid events.
    pub const SETID: Self = Self(16);
    /// Syscall-return events.
    pub const SYSCALL_RETURN: Self = Self(32);
    /// Failed-exec events.
    pub const EXEC_FAILED: Self = Self(64);
    /// Signal-generation events.
    pub const SIGNAL: Self = Self(128);
    /// Signal-delivery events.
    pub const SIGNAL_DELIVER: Self = Self(256);
    /// Fork, exec (and failed exec) and exit.
    pub const LIFECYCLE: Self = Self(1 | 2 | 4 | 64);
    /// Every kind.
    pub const ALL: Self = Self(511);

    /// True when `kind` is in the set.
    pub fn contains(self, kind: EventKind) -> bool {
        self.0 & kind.bit().0 != 0
    }

    /// The union of two sets.
    pub const fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    /// The set of `kinds` (e.g. [`crate::probes::ProbeSet::events`]).
    pub fn of(kinds: impl IntoIterator<Item = EventKind>) -> Self {
        kinds.into_iter().fold(Self::NONE, |m, k| m.union(k.bit()))
    }
}

impl std::ops::BitOr for EventMask {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        self.union(rhs)
    }
}

/// Fields every event has: when, where, and the task it is about (for fork: the parent;
/// for exec: the task after the exec). A field that could not be read from guest
/// memory is `null`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TaskHeader {
    /// Host wall-clock time of the probe hit, RFC 3339 UTC with nanoseconds (filled in by
    /// [`crate::lineage::Lineage::stamp`]).
    pub time: Option<String>,
    /// Host monotonic time of the probe hit, nanoseconds since the engine started.
    pub time_ns: u64,
    /// The vCPU (0-based) that hit the probe.
    pub vcpu: u32,
    /// Thread id (`task->pid`; `gettid()` in the guest).
    pub pid: Option<i32>,
    /// Process id (`task->tgid`; `getpid()` in the guest).
    pub tgid: Option<i32>,
    /// Parent's process id (`task->real_parent->tgid`; `getppid()` in the guest).
    pub ppid: Option<i32>,
    /// `task->comm` (at most 15 bytes, decoded by [`crate::guest_text::decode`]).
    pub comm: Option<String>,
    /// Real user id.
    pub uid: Option<u32>,
    /// Real group id.
    pub gid: Option<u32>,
    /// Effective user id.
    pub euid: Option<u32>,
    /// Effective group id.
    pub egid: Option<u32>,
    /// The process's identity in this run, unique across pid reuse and runs
    /// (`RUN_ID:TGID:SERIAL`, [`crate::lineage`]); `None` when its tgid was unreadable.
    pub exec_id: Option<String>,
    /// The parent process's identity (`exec_id` of the process `ppid`).
    pub parent_exec_id: Option<String>,
}

/// A task was created: `fork`, `vfork`, `clone`, `clone3`, or a kernel thread. The
/// header describes the parent (the task that called fork).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ForkEvent {
    /// The parent.
    #[serde(flatten)]
    pub task: TaskHeader,
    /// Thread id of the new task.
    pub child_pid: Option<i32>,
    /// Process id of the new task (the parent's for a thread).
    pub child_tgid: Option<i32>,
    /// The new task is a thread of an existing process (`CLONE_THREAD`: `child_pid !=
    /// child_tgid`).
    pub thread: bool,
    /// The new task is a kernel thread (`PF_KTHREAD`, no mm).
    pub kernel_thread: bool,
    /// The new task's process identity (the `exec_id` its own events carry).
    pub child_exec_id: Option<String>,
}

/// A task executed a new program. Reported only for an exec that succeeded. The header's
/// `comm` is the one after the exec (the basename of the file, cut to 15 bytes).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ExecEvent {
    /// The task after the exec.
    #[serde(flatten)]
    pub task: TaskHeader,
    /// Path of the executable now running (`mm->exe_file`; for a script, the
    /// interpreter).
    pub filename: Option<String>,
    /// The new command line, at most [`MAX_ARGV_ENTRIES`] entries and 32 KiB.
    pub argv: Vec<String>,
    /// True when `argv` was cut short (by the caps, or an unreadable page).
    pub argv_truncated: bool,
    /// The working directory at the exec (`task->fs->pwd`), or `null` where it could not be
    /// read (a profile without `fs_struct`).
    pub cwd: Option<String>,
}

/// A task exited.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ExitEvent {
    /// The exiting task.
    #[serde(flatten)]
    pub task: TaskHeader,
    /// The exit status as `WEXITSTATUS` gives it (`(code >> 8) & 0xff`); 0 when killed.
    pub exit_code: u8,
    /// The signal that killed the task (`code & 0x7f`), or `null` for a normal exit.
    pub signal: Option<u8>,
    /// True when a core dump was written (`code & 0x80`).
    pub core_dumped: bool,
    /// True when this exit ends the thread group (the process): the last live thread of
    /// the group (`signal->live` reached 0) where the profile records
    /// `signal_struct.live`, otherwise the exit of the group leader (`pid == tgid`).
    pub group_exit: bool,
}

/// A task entered a system call (x86-64 ABI).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyscallEvent {
    /// The calling task.
    #[serde(flatten)]
    pub task: TaskHeader,
    /// The syscall number.
    pub nr: u32,
    /// Its name (`openat`), or `null` for a number this kernel does not have.
    pub name: Option<String>,
    /// The six argument registers: rdi, rsi, rdx, r10, r8, r9.
    pub args: [u64; 6],
    /// The first path argument, decoded from the task's user memory, for syscalls that
    /// take one (`open`, `openat`, `execve`, `mkdirat`, ...); `null` for other syscalls
    /// or when the string was not readable (not yet paged in).
    pub path: Option<String>,
    /// The errno the syscall was made to fail with, without running, when an ornament
    /// denied it (`--deny-syscall`); `null` when it ran.
    #[serde(default)]
    pub denied: Option<i32>,
    /// False when the syscall is not watched and was trapped only because a deny rule
    /// covers it: ornaments still see it (to deny it), event writers skip it. Not part
    /// of the JSON (always true there).
    #[serde(skip, default = "yes")]
    pub reported: bool,
}

fn yes() -> bool {
    true
}

impl Default for SyscallEvent {
    fn default() -> Self {
        Self {
            task: TaskHeader::default(),
            nr: 0,
            name: None,
            args: [0; 6],
            path: None,
            denied: None,
            reported: true,
        }
    }
}

/// A watched system call returned: what it returned, paired with its entry (the
/// `syscall` event of the same task just before, whose `time_ns` is `entry_time_ns`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SyscallReturnEvent {
    /// The calling task, as it is at the return (after a successful exec: the new program).
    #[serde(flatten)]
    pub task: TaskHeader,
    /// The syscall number.
    pub nr: u32,
    /// Its name, or `null` for a number this kernel does not have.
    pub name: Option<String>,
    /// The value returned (`rax`); `null` when the task exited inside the syscall
    /// (`exit`, `exit_group`, or killed while it waited): it never returned.
    pub ret: Option<i64>,
    /// For a return value in -4095..=-1: the errno's name (`ENOENT`), or `E<n>` for a
    /// number without one here.
    pub errno: Option<String>,
    /// `time_ns` of the `syscall` event this return pairs with, when it was seen.
    pub entry_time_ns: Option<u64>,
}

/// An exec failed: `execve` or `execveat` returned an error, and the task runs on with its
/// old program. Never reported as an `exec`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ExecFailedEvent {
    /// The task that tried.
    #[serde(flatten)]
    pub task: TaskHeader,
    /// `execve` or `execveat`.
    pub syscall: String,
    /// The file name as passed to the syscall (from the caller's memory; `null` when it
    /// was unreadable).
    pub filename: Option<String>,
    /// The positive errno value (2 for ENOENT).
    pub errno: i32,
    /// Its name (`ENOENT`), or `E<n>` for a number without one here.
    pub errno_name: String,
}

/// Who generated a signal, as the kernel's `si_code` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SignalOrigin {
    /// A task: `kill`, `tkill`, `tgkill`, `sigqueue` (`si_code <= 0`); the header is the
    /// sender.
    Task,
    /// The kernel: a fault (SIGSEGV, SIGBUS, ...), SIGCHLD, SIGPIPE, a timer (`si_code > 0`,
    /// or no siginfo at all); the header is the task the kernel ran for.
    Kernel,
}

/// Which tasks a signal was sent to (the kernel's `enum pid_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SignalScope {
    /// One thread (`tkill`, `tgkill`, a fault).
    Thread,
    /// A process: any of its threads takes it (`kill`).
    Process,
    /// A process group (delivered to each of its processes, one event each).
    ProcessGroup,
    /// A session.
    Session,
}

/// A signal was generated: the header is the task that sent it (for a signal from the
/// kernel, the task the kernel was running for).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignalEvent {
    /// The sender.
    #[serde(flatten)]
    pub task: TaskHeader,
    /// The signal number.
    pub signal: i32,
    /// Its name (`SIGTERM`), or `SIG<n>` (real-time signals: `SIGRTMIN+n`).
    pub signal_name: String,
    /// `si_code`: `SI_USER` (0) for `kill`, `SI_TKILL` (-6), `SEGV_MAPERR` (1), ...;
    /// `null` when the kernel gave no siginfo (`SEND_SIG_NOINFO` counts as `SI_USER`,
    /// `SEND_SIG_PRIV` as `SI_KERNEL`).
    pub code: Option<i32>,
    /// Who generated it.
    pub origin: SignalOrigin,
    /// The target thread's id, process id and comm.
    pub target_pid: Option<i32>,
    /// ...
    pub target_tgid: Option<i32>,
    /// ...
    pub target_comm: Option<String>,
    /// Thread- or process-directed.
    pub scope: Option<SignalScope>,
    /// For a fault (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGTRAP from the kernel): the faulting
    /// address (`si_addr`).
    pub addr: Option<u64>,
    /// For a signal from a task: the sender's process id as the kernel recorded it
    /// (`si_pid`, in the sender's pid namespace).
    pub sender_pid: Option<i32>,
}

/// What a delivered signal did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SignalAction {
    /// A handler runs (its frame was set up on the task's stack).
    Handler,
    /// A handler should have run but its frame could not be set up: the task gets SIGSEGV.
    HandlerFailed,
    /// The task stops (SIGSTOP, SIGTSTP, ...).
    Stop,
    /// The task's process dies of it (the default action; the `exit` events follow).
    Kill,
}

/// A signal was delivered: the header is the task that took it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignalDeliverEvent {
    /// The task that took the signal.
    #[serde(flatten)]
    pub task: TaskHeader,
    /// The signal number.
    pub signal: i32,
    /// Its name.
    pub signal_name: String,
    /// What it did.
    pub action: SignalAction,
}

/// The name of signal `n` on x86-64 Linux: `SIGTERM`, `SIGRTMIN+3`, else `SIG<n>`.
pub fn signal_name(n: i32) -> String {
    const NAMES: [&str; 32] = [
        "SIG0",
        "SIGHUP",
        "SIGINT",
        "SIGQUIT",
        "SIGILL",
        "SIGTRAP",
        "SIGABRT",
        "SIGBUS",
        "SIGFPE",
        "SIGKILL",
        "SIGUSR1",
        "SIGSEGV",
        "SIGUSR2",
        "SIGPIPE",
        "SIGALRM",
        "SIGTERM",
        "SIGSTKFLT",
        "SIGCHLD",
        "SIGCONT",
        "SIGSTOP",
        "SIGTSTP",
        "SIGTTIN",
        "SIGTTOU",
        "SIGURG",
        "SIGXCPU",
        "SIGXFSZ",
        "SIGVTALRM",
        "SIGPROF",
        "SIGWINCH",
        "SIGIO",
        "SIGPWR",
        "SIGSYS",
    ];
    match usize::try_from(n) {
        Ok(i) if i < NAMES.len() => NAMES[i].to_owned(),
        Ok(i) if (32..=64).contains(&i) => format!("SIGRTMIN+{}", i - 32),
        _ => format!("SIG{n}"),
    }
}

/// The name an event gives errno `n` (positive): `ENOENT`, else `E<n>`.
pub fn errno_text(n: i32) -> String {
    crate::probes::errno_name(n).map_or_else(|| format!("E{n}"), str::to_owned)
}

/// Which ids a setid event reports a change of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdChange {
    /// A user id (real, effective, saved or fs) changed.
    Uid,
    /// A group id changed.
    Gid,
}

/// A task's credentials changed (`setuid`, `setresgid`, a setuid exec, ...). The header's
/// `uid`, `gid`, `euid` and `egid` are the new ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetidEvent {
    /// The task.
    #[serde(flatten)]
    pub task: TaskHeader,
    /// Which ids changed.
    pub changed: IdChange,
}

/// One event. Its JSON form is one object whose `event` field names the kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// See [`ForkEvent`].
    Fork(ForkEvent),
    /// See [`ExecEvent`].
    Exec(ExecEvent),
    /// See [`ExitEvent`].
    Exit(ExitEvent),
    /// See [`SyscallEvent`].
    Syscall(SyscallEvent),
    /// See [`SetidEvent`].
    Setid(SetidEvent),
    /// See [`SyscallReturnEvent`].
    SyscallReturn(SyscallReturnEvent),
    /// See [`ExecFailedEvent`].
    ExecFailed(ExecFailedEvent),
    /// See [`SignalEvent`].
    Signal(SignalEvent),
    /// See [`SignalDeliverEvent`].
    SignalDeliver(SignalDeliverEvent),
}

impl Event {
    /// The kind.
    pub fn kind(&self) -> EventKind {
        match self {
            Event::Fork(_) => EventKind::Fork,
            Event::Exec(_) => EventKind::Exec,
            Event::Exit(_) => EventKind::Exit,
            Event::Syscall(_) => EventKind::Syscall,
            Event::Setid(_) => EventKind::Setid,
            Event::SyscallReturn(_) => EventKind::SyscallReturn,
            Event::ExecFailed(_) => EventKind::ExecFailed,
            Event::Signal(_) => EventKind::Signal,
            Event::SignalDeliver(_) => EventKind::SignalDeliver,
        }
    }

    /// The common fields.
    pub fn task(&self) -> &TaskHeader {
        match self {
            Event::Fork(e) => &e.task,
            Event::Exec(e) => &e.task,
            Event::Exit(e) => &e.task,
            Event::Syscall(e) => &e.task,
            Event::Setid(e) => &e.task,
            Event::SyscallReturn(e) => &e.task,
            Event::ExecFailed(e) => &e.task,
            Event::Signal(e) => &e.task,
            Event::SignalDeliver(e) => &e.task,
        }
    }

    /// The common fields, to fill in.
    pub fn task_mut(&mut self) -> &mut TaskHeader {
        match self {
            Event::Fork(e) => &mut e.task,
            Event::Exec(e) => &mut e.task,
            Event::Exit(e) => &mut e.task,
            Event::Syscall(e) => &mut e.task,
            Event::Setid(e) => &mut e.task,
            Event::SyscallReturn(e) => &mut e.task,
            Event::ExecFailed(e) => &mut e.task,
            Event::Signal(e) => &mut e.task,
            Event::SignalDeliver(e) => &mut e.task,
        }
    }

    /// False only for a syscall trapped for a deny rule alone (see
    /// [`SyscallEvent::reported`]): writers skip it.
    pub fn is_reported(&self) -> bool {
        match self {
            Event::Syscall(e) => e.reported,
            _ => true,
        }
    }

    /// The event as outputs report it after the ornaments decided: a syscall denied with
    /// `denied` carries that errno ([`SyscallEvent::denied`]); anything else as it is.
    pub fn as_decided(&self, denied: Option<i32>) -> std::borrow::Cow<'_, Event> {
        match (self, denied) {
            (Event::Syscall(s), Some(errno)) => {
                let mut s = s.clone();
                s.denied = Some(errno);
                std::borrow::Cow::Owned(Event::Syscall(s))
            }
            _ => std::borrow::Cow::Borrowed(self),
        }
    }

    /// One JSON object, no newline.
    pub fn to_json(&self) -> String {
        // Serialising these plain structs cannot fail (string keys, no maps).
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parse one JSON line.
    pub fn from_json(line: &str) -> Result<Self, EventError> {
        Ok(serde_json::from_str(line)?)
    }

    /// The compact one-line text form (the same as `Display`).
    pub fn to_text(&self) -> String {
        self.to_string()
    }
}

/// Index of the first path argument of a path-taking x86-64 syscall, by name.
pub fn path_arg(syscall: &str) -> Option<usize> {
    Some(match syscall {
        "open" | "creat" | "mkdir" | "rmdir" | "unlink" | "execve" | "stat" | "lstat"
        | "access" | "chdir" | "chroot" | "chmod" | "chown" | "lchown" | "rename" | "link"
        | "readlink" | "truncate" | "mknod" | "statfs" | "uselib" | "acct" | "swapon"
        | "swapoff" | "umount2" | "setxattr" | "lsetxattr" | "getxattr" | "lgetxattr"
        | "listxattr" | "llistxattr" | "removexattr" | "lremovexattr" | "utime" | "utimes"
        | "pivot_root" | "symlink" => 0,
        "openat" | "openat2" | "mkdirat" | "unlinkat" | "execveat" | "newfstatat" | "statx"
        | "faccessat" | "faccessat2" | "fchmodat" | "fchmodat2" | "fchownat" | "renameat"
        | "renameat2" | "linkat" | "readlinkat" | "mknodat" | "utimensat" | "futimesat"
        | "mount" | "name_to_handle_at" | "inotify_add_watch" | "fanotify_mark" | "open_tree"
        | "move_mount" | "mount_setattr" => 1,
        _ => return None,
    })
}

#[cfg(test)]
pub(crate) mod tests;
