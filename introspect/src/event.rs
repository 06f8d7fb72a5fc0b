//! \[5\] Typed events (fork, exec, exit, syscall, setid): one JSON object per line, and a
//! one-line text form. The schema is [`SCHEMA_DOC`] (also `introspect/EVENTS.md`).

use serde::{Deserialize, Serialize};
use std::fmt;

/// The JSON-lines schema of every event, as documentation (the same text as
/// `introspect/EVENTS.md`).
pub const SCHEMA_DOC: &str = include_str!("../EVENTS.md");

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

/// The five kinds of events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
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
}

impl EventKind {
    /// Every kind, in schema order.
    pub const ALL: [EventKind; 5] = [
        EventKind::Fork,
        EventKind::Exec,
        EventKind::Exit,
        EventKind::Syscall,
        EventKind::Setid,
    ];

    /// The value of the `event` field.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Fork => "fork",
            EventKind::Exec => "exec",
            EventKind::Exit => "exit",
            EventKind::Syscall => "syscall",
            EventKind::Setid => "setid",
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
pub struct EventMask(u8);

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
    /// Fork, exec and exit.
    pub const LIFECYCLE: Self = Self(1 | 2 | 4);
    /// Every kind.
    pub const ALL: Self = Self(31);

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
/// `uid` is the new real uid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetidEvent {
    /// The task.
    #[serde(flatten)]
    pub task: TaskHeader,
    /// Which ids changed.
    pub changed: IdChange,
    /// New real group id.
    pub gid: Option<u32>,
    /// New effective user id.
    pub euid: Option<u32>,
    /// New effective group id.
    pub egid: Option<u32>,
}

/// One event. Its JSON form is one object whose `event` field names the kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
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

struct Opt<'a, T>(&'a Option<T>);

impl<T: fmt::Display> fmt::Display for Opt<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str("?"),
        }
    }
}

/// A string from the guest in double quotes, every byte that could end a line or
/// steer a terminal escaped (see [`write_escaped`]).
struct Quoted<'a>(&'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"")?;
        write_escaped(f, self.0)?;
        f.write_str("\"")
    }
}

/// A `comm` in the text form: bare when it is plain (letters, digits, `-_./:+@()`),
/// quoted and escaped otherwise, so that it can neither end the line nor pose as
/// another field.
struct Comm<'a>(&'a Option<String>);

impl fmt::Display for Comm<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None => f.write_str("?"),
            Some(c)
                if !c.is_empty()
                    && c.chars()
                        .all(|ch| ch.is_ascii_alphanumeric() || "-_./:+@()".contains(ch)) =>
            {
                f.write_str(c)
            }
            Some(c) => Quoted(c).fmt(f),
        }
    }
}

/// Writes `s` with `\\`, `\"`, `\n`, `\r`, `\t` and `\u{..}` for every other control
/// character (C0, DEL, C1: what a terminal acts on), and `\xNN` for a byte that was not
/// UTF-8 ([`crate::guest_text`]), so that nothing the guest wrote can start a new line or
/// an escape sequence in ornament's text output, and every byte shows as itself.
pub fn write_escaped(f: &mut impl fmt::Write, s: &str) -> fmt::Result {
    for ch in s.chars() {
        match ch {
            '\\' => f.write_str("\\\\")?,
            '"' => f.write_str("\\\"")?,
            '\n' => f.write_str("\\n")?,
            '\r' => f.write_str("\\r")?,
            '\t' => f.write_str("\\t")?,
            c if c.is_control() => write!(f, "\\u{{{:x}}}", u32::from(c))?,
            c => match crate::guest_text::raw_byte(c) {
                Some(b) => write!(f, "\\x{b:02x}")?,
                None => f.write_char(c)?,
            },
        }
    }
    Ok(())
}

impl fmt::Display for TaskHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{:09} cpu{} {}[{}",
            self.time_ns / 1_000_000_000,
            self.time_ns % 1_000_000_000,
            self.vcpu,
            Comm(&self.comm),
            Opt(&self.tgid),
        )?;
        if self.pid != self.tgid {
            write!(f, "/{}", Opt(&self.pid))?;
        }
        write!(f, "] ppid={} uid={}", Opt(&self.ppid), Opt(&self.uid))
    }
}

impl fmt::Display for Event {
    /// `SECONDS.NANOS cpuN COMM[TGID(/TID)] ppid=P uid=U KIND details`, `?` for
    /// unreadable fields.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.task(), self.kind())?;
        match self {
            Event::Fork(e) => {
                write!(
                    f,
                    " child={}",
                    Opt(if e.thread {
                        &e.child_pid
                    } else {
                        &e.child_tgid
                    })
                )?;
                if e.thread {
                    write!(f, " thread-of={}", Opt(&e.child_tgid))?;
                }
                if e.kernel_thread {
                    f.write_str(" kthread")?;
                }
                Ok(())
            }
            Event::Exec(e) => {
                match &e.filename {
                    Some(p) => write!(f, " {}", Quoted(p))?,
                    None => f.write_str(" ?")?,
                }
                f.write_str(" argv=[")?;
                for (i, a) in e.argv.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    Quoted(a).fmt(f)?;
                }
                if e.argv_truncated {
                    f.write_str(",...")?;
                }
                f.write_str("]")
            }
            Event::Exit(e) => {
                match e.signal {
                    Some(s) => write!(f, " signal={s}")?,
                    None => write!(f, " code={}", e.exit_code)?,
                }
                if e.core_dumped {
                    f.write_str(" core")?;
                }
                if e.group_exit {
                    f.write_str(" group")?;
                }
                Ok(())
            }
            Event::Syscall(e) => {
                match &e.name {
                    Some(n) => write!(f, " {n}(")?,
                    None => write!(f, " #{}(", e.nr)?,
                }
                for (i, a) in e.args.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{a:#x}")?;
                }
                f.write_str(")")?;
                if let Some(p) = &e.path {
                    write!(f, " path={}", Quoted(p))?;
                }
                if let Some(errno) = e.denied {
                    match crate::probes::errno_name(errno) {
                        Some(n) => write!(f, " denied={n}")?,
                        None => write!(f, " denied={errno}")?,
                    }
                }
                Ok(())
            }
            Event::Setid(e) => {
                let which = match e.changed {
                    IdChange::Uid => "uid",
                    IdChange::Gid => "gid",
                };
                write!(
                    f,
                    " {which} gid={} euid={} egid={}",
                    Opt(&e.gid),
                    Opt(&e.euid),
                    Opt(&e.egid)
                )
            }
        }
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
mod tests {
    use super::*;

    fn header() -> TaskHeader {
        TaskHeader {
            time_ns: 1_500_000_000,
            vcpu: 1,
            pid: Some(42),
            tgid: Some(42),
            ppid: Some(1),
            comm: Some("sh".into()),
            uid: Some(0),
        }
    }

    #[test]
    fn json_schema_round_trips_and_names_every_field() {
        let events = vec![
            Event::Fork(ForkEvent {
                task: header(),
                child_pid: Some(43),
                child_tgid: Some(43),
                thread: false,
                kernel_thread: false,
            }),
            Event::Exec(ExecEvent {
                task: header(),
                filename: Some("/bin/ls".into()),
                argv: vec!["ls".into(), "-l".into()],
                argv_truncated: false,
            }),
            Event::Exit(ExitEvent {
                task: header(),
                exit_code: 3,
                signal: None,
                core_dumped: false,
                group_exit: true,
            }),
            Event::Syscall(SyscallEvent {
                task: header(),
                nr: 258,
                name: Some("mkdirat".into()),
                args: [0xffff_ff9c, 0x1000, 0o755, 0, 0, 0],
                path: Some("/tmp/x".into()),
                denied: None,
                reported: true,
            }),
            Event::Setid(SetidEvent {
                task: header(),
                changed: IdChange::Uid,
                gid: Some(0),
                euid: Some(1000),
                egid: Some(0),
            }),
        ];
        for e in &events {
            let line = e.to_json();
            assert!(!line.contains('\n'));
            assert_eq!(&Event::from_json(&line).expect("parse"), e, "{line}");
            let v: serde_json::Value = serde_json::from_str(&line).expect("json");
            for k in [
                "event", "time_ns", "vcpu", "pid", "tgid", "ppid", "comm", "uid",
            ] {
                assert!(v.get(k).is_some(), "{k} in {line}");
                assert!(SCHEMA_DOC.contains(&format!("`{k}`")), "{k} documented");
            }
            for k in v.as_object().expect("object").keys() {
                assert!(SCHEMA_DOC.contains(&format!("`{k}`")), "{k} documented");
            }
        }
        assert_eq!(
            events[2].to_json(),
            r#"{"event":"exit","time_ns":1500000000,"vcpu":1,"pid":42,"tgid":42,"ppid":1,"comm":"sh","uid":0,"exit_code":3,"signal":null,"core_dumped":false,"group_exit":true}"#
        );
        assert_eq!(
            events[3].to_text(),
            "1.500000000 cpu1 sh[42] ppid=1 uid=0 syscall mkdirat(0xffffff9c, 0x1000, 0x1ed, 0x0, 0x0, 0x0) path=\"/tmp/x\""
        );
        assert_eq!(
            events[1].to_text(),
            "1.500000000 cpu1 sh[42] ppid=1 uid=0 exec \"/bin/ls\" argv=[\"ls\",\"-l\"]"
        );
        assert!(Event::from_json("{\"event\":\"nope\"}").is_err());
    }

    #[test]
    fn guest_strings_cannot_forge_a_line_or_reach_the_terminal() {
        let mut h = header();
        h.comm = Some("a\n9.999 cpu0 ss".into());
        let ev = Event::Exec(ExecEvent {
            task: h,
            filename: Some("/tmp/a\n9.999 cpu0 ss[1] exit\u{1b}[2J\u{9b}1m\\".into()),
            argv: vec!["x\"y\r".into()],
            argv_truncated: false,
        });
        let text = ev.to_text();
        assert!(!text.contains(['\n', '\r', '\u{1b}', '\u{9b}']), "{text}");
        assert_eq!(
            text,
            r#"1.500000000 cpu1 "a\n9.999 cpu0 ss"[42] ppid=1 uid=0 exec "/tmp/a\n9.999 cpu0 ss[1] exit\u{1b}[2J\u{9b}1m\\" argv=["x\"y\r"]"#
        );
        // Bytes that are not UTF-8 show as themselves, and a backslash as itself.
        let mut h = header();
        h.comm = Some(crate::guest_text::decode(b"x\xff\\x41"));
        assert!(h.to_string().contains(r#" "x\xff\\x41"[42]"#), "{h}");
        // A plain comm stays bare; an odd one is quoted so it cannot pose as fields.
        let mut h = header();
        h.comm = Some("kworker/0:1".into());
        assert!(h.to_string().contains(" kworker/0:1[42]"));
        h.comm = Some("x] ppid=9".into());
        assert!(h.to_string().contains(r#" "x] ppid=9"[42]"#), "{h}");
    }

    #[test]
    fn masks() {
        let m = EventMask::FORK | EventMask::EXIT;
        assert!(m.contains(EventKind::Fork) && !m.contains(EventKind::Exec));
        assert_eq!(EventMask::of(EventKind::ALL), EventMask::ALL);
        assert_eq!(path_arg("openat"), Some(1));
        assert_eq!(path_arg("open"), Some(0));
        assert_eq!(path_arg("read"), None);
    }
}
