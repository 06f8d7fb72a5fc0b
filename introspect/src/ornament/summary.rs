//! [`RunSummary`]: what the watched processes did, in a few numbers, for the line a
//! person reads at the end of a run.

use super::{Decision, Ornament};
use crate::event::{Event, EventMask};
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};

/// The numbers of a run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SummaryCounts {
    /// Processes seen: every process id an event named (the task's, or a forked child's),
    /// kernel threads aside.
    pub processes: u64,
    /// Threads created.
    pub threads: u64,
    /// Successful execs.
    pub execs: u64,
    /// Failed execs (`exec_failed` events).
    pub failed_execs: u64,
    /// Processes that ended normally, by exit code.
    pub exit_codes: BTreeMap<u8, u64>,
    /// Processes killed by a signal, by signal number.
    pub signals: BTreeMap<u8, u64>,
    /// Syscall events.
    pub syscalls: u64,
    /// Syscalls denied.
    pub denied: u64,
}

impl fmt::Display for SummaryCounts {
    /// `3 processes, 1 thread, 4 execs, exits 0 x2 3 x1, killed by 9 x1, 12 syscalls (1 denied)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plural =
            |n: u64, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
        write!(
            f,
            "{}, {}, {}",
            plural(self.processes, "process", "processes"),
            plural(self.threads, "thread", "threads"),
            plural(self.execs, "exec", "execs")
        )?;
        if self.failed_execs > 0 {
            write!(
                f,
                ", {}",
                plural(self.failed_execs, "failed exec", "failed execs")
            )?;
        }
        let list = |m: &BTreeMap<u8, u64>| {
            m.iter()
                .map(|(k, n)| format!("{k} x{n}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        if !self.exit_codes.is_empty() {
            write!(f, ", exits {}", list(&self.exit_codes))?;
        }
        if !self.signals.is_empty() {
            write!(f, ", killed by signal {}", list(&self.signals))?;
        }
        if self.syscalls > 0 {
            write!(f, ", {}", plural(self.syscalls, "syscall", "syscalls"))?;
            if self.denied > 0 {
                write!(f, " ({} denied)", self.denied)?;
            }
        }
        Ok(())
    }
}

/// Counts what the processes it sees did; read the counts through [`RunSummary::counts`].
/// Attach it last (after the ornaments that deny), in the scope the user watches.
#[derive(Debug, Default)]
pub struct RunSummary {
    counts: Arc<Mutex<SummaryCounts>>,
    seen: HashSet<i32>,
}

impl RunSummary {
    /// Zero counts.
    pub fn new() -> Self {
        Self::default()
    }

    /// A handle on the counts (keep it before attaching).
    pub fn counts(&self) -> Arc<Mutex<SummaryCounts>> {
        Arc::clone(&self.counts)
    }
}

impl Ornament for RunSummary {
    fn name(&self) -> &str {
        "run-summary"
    }

    fn mask(&self) -> EventMask {
        EventMask::ALL
    }

    fn on_event(&mut self, ev: &Event, d: &mut Decision) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let child = match ev {
            Event::Fork(f) if !f.thread && !f.kernel_thread => f.child_tgid,
            _ => None,
        };
        for tgid in [ev.task().tgid, child].into_iter().flatten() {
            if self.seen.insert(tgid) {
                c.processes += 1;
            }
        }
        match ev {
            Event::Fork(f) if f.thread => c.threads += 1,
            Event::Exec(_) => c.execs += 1,
            Event::ExecFailed(_) => c.failed_execs += 1,
            Event::Exit(x) if x.group_exit => match x.signal {
                Some(s) => *c.signals.entry(s).or_default() += 1,
                None => *c.exit_codes.entry(x.exit_code).or_default() += 1,
            },
            Event::Syscall(s) if s.reported => {
                c.syscalls += 1;
                c.denied += u64::from(d.denied().is_some());
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{ExitEvent, ForkEvent, SyscallEvent};
    use crate::ornament::{DenySyscalls, Registry};

    #[test]
    fn counts_what_happened() {
        let s = RunSummary::new();
        let counts = s.counts();
        let mut reg = Registry::new();
        reg.attach(Box::new(DenySyscalls::new([(83, 1)].into())));
        reg.attach(Box::new(s));
        // Process 10 forks 11 and 12, and a thread of its own.
        for (child, thread) in [(11, false), (12, false), (10, true)] {
            reg.dispatch(&Event::Fork(ForkEvent {
                task: crate::event::TaskHeader {
                    tgid: Some(10),
                    ..Default::default()
                },
                child_tgid: Some(child),
                thread,
                ..ForkEvent::default()
            }));
        }
        for (code, signal, group) in [
            (0, None, true),
            (3, None, true),
            (0, Some(9), true),
            (0, None, false),
        ] {
            reg.dispatch(&Event::Exit(ExitEvent {
                exit_code: code,
                signal,
                group_exit: group,
                ..ExitEvent::default()
            }));
        }
        for nr in [83, 84] {
            reg.dispatch(&Event::Syscall(SyscallEvent {
                nr,
                ..SyscallEvent::default()
            }));
        }
        let c = counts.lock().expect("counts").clone();
        assert_eq!(
            c.to_string(),
            "3 processes, 1 thread, 0 execs, exits 0 x1 3 x1, killed by signal 9 x1, 2 syscalls (1 denied)"
        );
    }
}
