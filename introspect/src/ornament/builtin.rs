//! The small built-in ornaments: [`Follow`] (a pid and its descendants), [`DenySyscalls`]
//! (refuse syscalls by number) and [`Counter`] (events by kind).

use super::{Decision, Ornament};
use crate::event::{
    Event, EventKind, EventMask, ExecEvent, ExitEvent, ForkEvent, SetidEvent, SyscallEvent,
};
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

/// Follow-children filtering: wraps an ornament so it sees only the events of a root
/// process and its descendants.
///
/// The followed set holds thread ids. It starts with the root; an event matches when its
/// `pid` is in the set or its `tgid` is the root's (threads that existed before). A fork
/// whose parent (the forking task) matches adds the child's thread id; an exit removes
/// the exiting thread id after delivery. Exec keeps the pid. Fork and exit are always
/// watched, whatever the inner mask.
pub struct Follow {
    root_pid: i32,
    pids: HashSet<i32>,
    inner: Box<dyn Ornament>,
    name: String,
}

impl std::fmt::Debug for Follow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Follow")
            .field("root_pid", &self.root_pid)
            .field("pids", &self.pids.len())
            .field("inner", &self.name)
            .finish()
    }
}

impl Follow {
    /// `inner`, restricted to `root_pid` and its descendants.
    pub fn new(root_pid: i32, inner: Box<dyn Ornament>) -> Self {
        let name = format!("{} (follow {root_pid})", inner.name());
        Self {
            root_pid,
            pids: HashSet::from([root_pid]),
            inner,
            name,
        }
    }

    /// The thread ids followed now.
    pub fn followed(&self) -> &HashSet<i32> {
        &self.pids
    }

    fn matches(&self, t: &crate::event::TaskHeader) -> bool {
        t.pid.is_some_and(|p| self.pids.contains(&p)) || t.tgid == Some(self.root_pid)
    }
}

impl Ornament for Follow {
    fn name(&self) -> &str {
        &self.name
    }
    fn mask(&self) -> EventMask {
        self.inner.mask() | EventMask::FORK | EventMask::EXIT
    }
    fn on_event(&mut self, ev: &Event, ctx: &mut Decision) {
        if !self.matches(ev.task()) {
            return;
        }
        if let Event::Fork(f) = ev {
            if let Some(c) = f.child_pid {
                self.pids.insert(c);
            }
        }
        if self.inner.mask().contains(ev.kind()) {
            self.inner.on_event(ev, ctx);
        }
        if let (Event::Exit(_), Some(p)) = (ev, ev.task().pid) {
            self.pids.remove(&p);
        }
    }
    fn finish(&mut self) {
        self.inner.finish();
    }
}

/// Refuses syscalls: syscall number -> errno.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DenySyscalls {
    rules: BTreeMap<u32, i32>,
}

impl DenySyscalls {
    /// From checked rules (e.g. [`crate::probes::ProbeSet::deny_rules`] or
    /// [`crate::probes::deny_rules`]).
    pub fn new(rules: BTreeMap<u32, i32>) -> Self {
        Self { rules }
    }
}

impl Ornament for DenySyscalls {
    fn name(&self) -> &str {
        "deny-syscalls"
    }
    fn mask(&self) -> EventMask {
        EventMask::SYSCALL
    }
    fn on_syscall(&mut self, ev: &SyscallEvent, ctx: &mut Decision) {
        if let Some(&errno) = self.rules.get(&ev.nr) {
            ctx.deny(errno);
        }
    }
}

/// Event counts by kind and syscall counts by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    /// By kind.
    pub by_kind: BTreeMap<EventKind, u64>,
    /// Syscalls by name (`#NR` for unnamed numbers).
    pub by_syscall: BTreeMap<String, u64>,
}

/// Counts events (a read handle comes from [`Counter::counts`]).
#[derive(Debug, Default)]
pub struct Counter {
    counts: Arc<Mutex<Counts>>,
}

impl Counter {
    /// Zero counts.
    pub fn new() -> Self {
        Self::default()
    }

    /// A handle on the counts (keep it before attaching the counter).
    pub fn counts(&self) -> Arc<Mutex<Counts>> {
        Arc::clone(&self.counts)
    }

    fn bump(&self, kind: EventKind, syscall: Option<&SyscallEvent>) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        *c.by_kind.entry(kind).or_default() += 1;
        if let Some(s) = syscall {
            let name = s.name.clone().unwrap_or_else(|| format!("#{}", s.nr));
            *c.by_syscall.entry(name).or_default() += 1;
        }
    }
}

impl Ornament for Counter {
    fn name(&self) -> &str {
        "counter"
    }
    fn on_fork(&mut self, _: &ForkEvent, _: &mut Decision) {
        self.bump(EventKind::Fork, None);
    }
    fn on_exec(&mut self, _: &ExecEvent, _: &mut Decision) {
        self.bump(EventKind::Exec, None);
    }
    fn on_exit(&mut self, _: &ExitEvent, _: &mut Decision) {
        self.bump(EventKind::Exit, None);
    }
    fn on_syscall(&mut self, ev: &SyscallEvent, _: &mut Decision) {
        if ev.reported {
            self.bump(EventKind::Syscall, Some(ev));
        }
    }
    fn on_setid(&mut self, _: &SetidEvent, _: &mut Decision) {
        self.bump(EventKind::Setid, None);
    }
}
