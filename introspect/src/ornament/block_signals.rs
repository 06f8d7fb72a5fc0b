//! [`BlockSignals`]: signals that tasks send are refused before the kernel queues them
//! (`--block-signal SIG[:COMM]`), so their target never sees them.
//!
//! A signal from a task is one of the syscalls of [`SIGNAL_SYSCALLS`]; the ornament denies
//! the matching ones with EPERM at their entry (through the session's deny, so on every
//! engine that denies: the sender's `kill` fails, as for a target it may not signal). A rule
//! names a signal and, optionally, the target's `comm`: the ornament learns each process's
//! comm from the fork and exec events it sees (a forked child has its parent's comm until it
//! execs) and each thread's process from thread forks. A target it cannot name (a process
//! group, `kill(-1)`, a pidfd, a process from before the probes were armed) matches only a
//! rule without COMM. Signals the kernel makes itself (faults, SIGPIPE, SIGCHLD, timers) are
//! not syscalls and are not blocked.

use super::{Decision, Ornament};
use crate::event::{signal_name, Event, EventMask, SyscallEvent};
use std::collections::HashMap;

/// The syscalls that send a signal, with the argument indexes of (target, signal) and
/// whether the target is a thread id (`tkill`) rather than a process id.
pub const SIGNAL_SYSCALLS: [(&str, Option<usize>, usize, bool); 6] = [
    ("kill", Some(0), 1, false),
    ("tkill", Some(0), 1, true),
    ("tgkill", Some(0), 2, false),
    ("rt_sigqueueinfo", Some(0), 1, false),
    ("rt_tgsigqueueinfo", Some(0), 2, false),
    // A pidfd names its process only through the sender's file table.
    ("pidfd_send_signal", None, 1, false),
];

/// `EPERM`: what a blocked sender's syscall returns.
const EPERM: i32 = 1;

/// Why a `--block-signal` rule was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, displaydoc::Display)]
pub enum BlockSignalError {
    /// unknown signal {0:?}: give a name such as TERM or SIGUSR1, or a number in 1..=64
    UnknownSignal(String),
    /// COMM {0:?} is longer than the kernel's 15 bytes: it could never match
    CommTooLong(String),
    /// empty COMM after ':'
    EmptyComm,
}

/// One rule: a signal, and optionally the target's comm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockRule {
    /// The signal number.
    pub signal: i32,
    /// The target's comm, exactly; `None`: any target.
    pub comm: Option<String>,
}

impl BlockRule {
    /// Parse `SIG[:COMM]`: `TERM`, `SIGTERM`, `15`, `TERM:sleep`.
    pub fn parse(text: &str) -> Result<Self, BlockSignalError> {
        let (sig, comm) = match text.split_once(':') {
            Some((_, "")) => return Err(BlockSignalError::EmptyComm),
            Some((s, c)) => (s, Some(c.to_owned())),
            None => (text, None),
        };
        let t = sig.trim();
        let signal = match t.parse::<i32>() {
            Ok(n) if (1..=64).contains(&n) => n,
            Ok(_) => return Err(BlockSignalError::UnknownSignal(t.to_owned())),
            Err(_) => {
                let upper = t.to_ascii_uppercase();
                let name = if upper.starts_with("SIG") {
                    upper
                } else {
                    format!("SIG{upper}")
                };
                (1..=64)
                    .find(|&n| signal_name(n) == name)
                    .ok_or_else(|| BlockSignalError::UnknownSignal(t.to_owned()))?
            }
        };
        if let Some(c) = &comm {
            if c.len() > 15 {
                return Err(BlockSignalError::CommTooLong(c.clone()));
            }
        }
        Ok(Self { signal, comm })
    }
}

/// Denies the signal-sending syscalls that match a rule (see the module documentation).
/// Attach it where it sees every process's fork and exec (unscoped).
#[derive(Debug)]
pub struct BlockSignals {
    rules: Vec<BlockRule>,
    /// Syscall number -> (target arg, signal arg, target is a thread).
    calls: HashMap<u32, (Option<usize>, usize, bool)>,
    /// Process id -> comm.
    comm: HashMap<i32, String>,
    /// Thread id -> process id (threads created while watched).
    thread_of: HashMap<i32, i32>,
    /// Syscalls denied.
    blocked: u64,
}

impl BlockSignals {
    /// The ornament for `rules`; `nr_of` gives a syscall's number on this kernel (from the
    /// profile), and syscalls it does not know are left out.
    pub fn new(rules: Vec<BlockRule>, nr_of: impl Fn(&str) -> Option<u32>) -> Self {
        let calls = SIGNAL_SYSCALLS
            .iter()
            .filter_map(|&(name, target, sig, thread)| Some((nr_of(name)?, (target, sig, thread))))
            .collect();
        Self {
            rules,
            calls,
            comm: HashMap::new(),
            thread_of: HashMap::new(),
            blocked: 0,
        }
    }

    /// The names of the syscalls it may deny (`WatchConfig::may_deny`).
    pub fn syscalls() -> Vec<String> {
        SIGNAL_SYSCALLS.iter().map(|s| s.0.to_owned()).collect()
    }

    /// How many sends it refused.
    pub fn blocked(&self) -> u64 {
        self.blocked
    }

    /// The comm of the process a send targets, if known: `id` is a process id, or a thread
    /// id when `thread`.
    fn target_comm(&self, id: i64, thread: bool) -> Option<&str> {
        let id = i32::try_from(id).ok().filter(|&p| p > 0)?;
        let tgid = if thread {
            self.thread_of.get(&id).copied().unwrap_or(id)
        } else {
            id
        };
        self.comm.get(&tgid).map(String::as_str)
    }

    fn decide(&mut self, ev: &SyscallEvent, ctx: &mut Decision) {
        let Some(&(target, sig, thread)) = self.calls.get(&ev.nr) else {
            return;
        };
        // The argument registers as the C ABI's int.
        let as_int = |v: u64| i64::from(crate::bytes::low32_signed(v));
        let signal = as_int(ev.args[sig]);
        let comm = target.and_then(|i| self.target_comm(as_int(ev.args[i]), thread));
        let hit = self.rules.iter().any(|r| {
            i64::from(r.signal) == signal
                && match (&r.comm, comm) {
                    (None, _) => true,
                    (Some(want), Some(got)) => want == got,
                    (Some(_), None) => false,
                }
        });
        if hit {
            self.blocked += 1;
            ctx.deny(EPERM);
        }
    }
}

impl Ornament for BlockSignals {
    fn name(&self) -> &str {
        "block-signals"
    }

    fn mask(&self) -> EventMask {
        EventMask::SYSCALL | EventMask::FORK | EventMask::EXEC | EventMask::EXIT
    }

    fn on_event(&mut self, ev: &Event, ctx: &mut Decision) {
        match ev {
            Event::Syscall(s) => self.decide(s, ctx),
            Event::Exec(e) => {
                if let (Some(t), Some(c)) = (e.task.tgid, &e.task.comm) {
                    self.comm.insert(t, c.clone());
                }
            }
            Event::Fork(f) if f.thread => {
                if let (Some(c), Some(t)) = (f.child_pid, f.child_tgid) {
                    self.thread_of.insert(c, t);
                }
            }
            Event::Fork(f) => {
                if let (Some(c), Some(comm)) = (f.child_tgid, &f.task.comm) {
                    self.comm.insert(c, comm.clone());
                }
            }
            Event::Exit(x) => {
                if let Some(p) = x.task.pid {
                    self.thread_of.remove(&p);
                }
                if let (true, Some(t)) = (x.group_exit, x.task.tgid) {
                    self.comm.remove(&t);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{ExecEvent, ForkEvent, TaskHeader};

    fn hdr(tgid: i32, comm: &str) -> TaskHeader {
        TaskHeader {
            pid: Some(tgid),
            tgid: Some(tgid),
            comm: Some(comm.into()),
            ..TaskHeader::default()
        }
    }

    fn send(b: &mut BlockSignals, nr: u32, args: [u64; 6]) -> Option<i32> {
        let mut d = Decision::new(true);
        b.on_event(
            &Event::Syscall(SyscallEvent {
                task: hdr(1, "sh"),
                nr,
                args,
                ..SyscallEvent::default()
            }),
            &mut d,
        );
        d.denied()
    }

    #[test]
    fn rules_parse_and_refuse_nonsense() {
        assert_eq!(
            BlockRule::parse("TERM:sleep"),
            Ok(BlockRule {
                signal: 15,
                comm: Some("sleep".into())
            })
        );
        assert_eq!(BlockRule::parse("sigusr1").map(|r| r.signal), Ok(10));
        assert_eq!(BlockRule::parse("9").map(|r| r.signal), Ok(9));
        assert_eq!(BlockRule::parse("RTMIN+2").map(|r| r.signal), Ok(34));
        for bad in ["0", "65", "NOPE", "TERM:", "TERM:abcdefghijklmnopq"] {
            assert!(BlockRule::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sends_to_the_named_comm_are_denied_and_nothing_else() {
        let nrs = |n: &str| match n {
            "kill" => Some(62),
            "tkill" => Some(200),
            "tgkill" => Some(234),
            _ => None,
        };
        let rules = vec![
            BlockRule::parse("TERM:sleep").expect("rule"),
            BlockRule::parse("USR2").expect("rule"),
        ];
        let mut b = BlockSignals::new(rules, nrs);
        let mut d = Decision::new(false);
        // sh (10) forks 11, which execs sleep; 10 also makes thread 12.
        for ev in [
            Event::Fork(ForkEvent {
                task: hdr(10, "sh"),
                child_pid: Some(11),
                child_tgid: Some(11),
                ..ForkEvent::default()
            }),
            Event::Exec(ExecEvent {
                task: hdr(11, "sleep"),
                ..ExecEvent::default()
            }),
            Event::Fork(ForkEvent {
                task: hdr(10, "sh"),
                child_pid: Some(12),
                child_tgid: Some(10),
                thread: true,
                ..ForkEvent::default()
            }),
        ] {
            b.on_event(&ev, &mut d);
        }
        assert_eq!(send(&mut b, 62, [11, 15, 0, 0, 0, 0]), Some(EPERM));
        assert_eq!(
            send(&mut b, 62, [11, 9, 0, 0, 0, 0]),
            None,
            "another signal"
        );
        assert_eq!(send(&mut b, 62, [10, 15, 0, 0, 0, 0]), None, "another comm");
        assert_eq!(
            send(&mut b, 62, [u64::MAX, 15, 0, 0, 0, 0]),
            None,
            "kill(-1)"
        );
        assert_eq!(
            send(&mut b, 62, [10, 12, 0, 0, 0, 0]),
            Some(EPERM),
            "any USR2"
        );
        assert_eq!(send(&mut b, 234, [10, 12, 15, 0, 0, 0]), None);
        assert_eq!(send(&mut b, 200, [12, 12, 0, 0, 0, 0]), Some(EPERM));
        assert_eq!(b.blocked(), 3);
        // Once sleep's process is gone, its pid names nothing.
        b.on_event(
            &Event::Exit(crate::event::ExitEvent {
                task: hdr(11, "sleep"),
                group_exit: true,
                ..crate::event::ExitEvent::default()
            }),
            &mut d,
        );
        assert_eq!(send(&mut b, 62, [11, 15, 0, 0, 0, 0]), None);
    }
}
