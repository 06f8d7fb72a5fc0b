//! The one-line text form of events (`--format text`): every string from the guest
//! quoted and escaped, so that nothing it wrote can forge a line or reach the terminal.

use super::{Event, IdChange, TaskHeader};
use std::fmt;

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
                f.write_str("]")?;
                match &e.cwd {
                    Some(d) => write!(f, " cwd={}", Quoted(d)),
                    None => Ok(()),
                }
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
                let t = &e.task;
                write!(
                    f,
                    " {which} gid={} euid={} egid={}",
                    Opt(&t.gid),
                    Opt(&t.euid),
                    Opt(&t.egid)
                )
            }
            Event::SyscallReturn(e) => {
                match &e.name {
                    Some(n) => write!(f, " {n}")?,
                    None => write!(f, " #{}", e.nr)?,
                }
                match (e.ret, &e.errno) {
                    (None, _) => f.write_str(" = (never returned: the task exited)"),
                    (Some(r), Some(n)) => write!(f, " = {r} {n}"),
                    (Some(r), None) => write!(f, " = {r}"),
                }
            }
            Event::Signal(e) => {
                write!(
                    f,
                    " {} to={}[{}",
                    e.signal_name,
                    Comm(&e.target_comm),
                    Opt(&e.target_tgid)
                )?;
                if e.target_pid != e.target_tgid {
                    write!(f, "/{}", Opt(&e.target_pid))?;
                }
                f.write_str("]")?;
                if let Some(c) = e.code {
                    write!(f, " code={c}")?;
                }
                f.write_str(match e.origin {
                    crate::event::SignalOrigin::Task => " from-task",
                    crate::event::SignalOrigin::Kernel => " from-kernel",
                })?;
                if let Some(a) = e.addr {
                    write!(f, " addr={a:#x}")?;
                }
                Ok(())
            }
            Event::SignalDeliver(e) => {
                let action = match e.action {
                    crate::event::SignalAction::Handler => "handler",
                    crate::event::SignalAction::HandlerFailed => "handler-failed",
                    crate::event::SignalAction::Stop => "stop",
                    crate::event::SignalAction::Kill => "kill",
                };
                write!(f, " {} {action}", e.signal_name)
            }
            Event::ExecFailed(e) => {
                f.write_str(" ")?;
                match &e.filename {
                    Some(p) => Quoted(p).fmt(f)?,
                    None => f.write_str("?")?,
                }
                write!(f, " {} {}", e.syscall, e.errno_name)
            }
        }
    }
}
