//! \[6\] Ornaments: ordered host-side callbacks on guest task events, and their registry.
//!
//! An [`Ornament`] has one method per event kind (default: nothing) and an
//! [`EventMask`]. The [`Registry`] keeps ornaments in attach order and delivers each event
//! to every ornament whose mask has its kind, in that order, with one [`Decision`] that
//! each ornament may change and every later one sees.
//!
//! Delivery rules:
//! - Delivery walks a snapshot: the ornaments attached when delivery began, in order.
//!   Attach and detach requests made during delivery ([`Decision::attach`],
//!   [`Decision::detach`], or a [`RegistryQueue`] held by anyone) take effect after it: an
//!   ornament detached during delivery still gets the event (none is skipped), one
//!   attached during delivery gets the next event (none loops).
//! - A panicking ornament is contained: its changes to the decision are dropped, a
//!   `tracing::error!` names it, [`Registry::panics`] counts it, and delivery goes on
//!   with the next ornament. After [`Registry::DEFAULT_MAX_PANICS`] panics in a row (see
//!   [`Registry::set_max_panics`]) it is detached. (The process's panic hook still
//!   prints the panic message; the CLI may install a quieter one.)
//! - Deny is allowed only at syscall entry; elsewhere the request is ignored with a
//!   warning. Deny wins over pause in [`Decision::action`]; a pause requested alongside
//!   a deny is kept in [`Decision::pause_requested`] for the caller to apply after
//!   answering the hit.
//!
//! Built-in ornaments are registered in one line each:
//!
//! ```
//! use ornament_introspect::event::EventMask;
//! use ornament_introspect::ornament::*;
//!
//! let mut reg = Registry::new();
//! reg.attach(Box::new(DenySyscalls::new([(258, 1)].into()))); // mkdirat -> EPERM
//! let tree = ProcessTree::new();
//! let view = tree.view(); // render() at the end
//! reg.attach(Box::new(Follow::new(42, Box::new(tree)))); // pid 42 and descendants
//! let out = Box::new(std::io::stdout());
//! reg.attach(Box::new(EventWriter::new(out, Format::Json).with_mask(EventMask::LIFECYCLE)));
//! let counter = Counter::new();
//! let counts = counter.counts();
//! reg.attach(Box::new(counter));
//! assert_eq!(reg.names(), ["deny-syscalls", "process-tree (follow 42)", "event-writer", "counter"]);
//! # let _ = (view, counts);
//! ```

use crate::event::{
    Event, EventKind, EventMask, ExecEvent, ExitEvent, ForkEvent, SetidEvent, SyscallEvent,
};
use crate::probes::MAX_ERRNO;
use ornament_engine::Action;
use std::collections::{BTreeMap, HashSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

mod consumers;
mod summary;
mod writer;
pub use consumers::{Consumers, DEFAULT_CAPACITY as CONSUMER_QUEUE};
pub use summary::{RunSummary, SummaryCounts};
pub use writer::{EventWriter, Format, OutputHealth, OutputReport};

/// Why an ornament request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, displaydoc::Display)]
pub enum OrnamentError {
    /// ornament {0:?} is not attached
    NotAttached(OrnamentHandle),
}

/// A host-side callback on guest task events. Every method has a default that does
/// nothing; an ornament overrides those it needs and says which in [`Ornament::mask`].
pub trait Ornament: Send {
    /// A short name for logs and reports.
    fn name(&self) -> &str;
    /// The event kinds it wants (default: all).
    fn mask(&self) -> EventMask {
        EventMask::ALL
    }
    /// A task was created.
    fn on_fork(&mut self, _ev: &ForkEvent, _ctx: &mut Decision) {}
    /// A task executed a new program.
    fn on_exec(&mut self, _ev: &ExecEvent, _ctx: &mut Decision) {}
    /// A task exited.
    fn on_exit(&mut self, _ev: &ExitEvent, _ctx: &mut Decision) {}
    /// A task entered a system call (the only place [`Decision::deny`] works).
    fn on_syscall(&mut self, _ev: &SyscallEvent, _ctx: &mut Decision) {}
    /// A task's ids changed.
    fn on_setid(&mut self, _ev: &SetidEvent, _ctx: &mut Decision) {}
    /// The registry's entry point for every event in the mask: by default, the method of
    /// the event's kind. Override it to handle all kinds in one place (as
    /// [`EventWriter`] and [`Follow`] do).
    fn on_event(&mut self, ev: &Event, ctx: &mut Decision) {
        match ev {
            Event::Fork(e) => self.on_fork(e, ctx),
            Event::Exec(e) => self.on_exec(e, ctx),
            Event::Exit(e) => self.on_exit(e, ctx),
            Event::Syscall(e) => self.on_syscall(e, ctx),
            Event::Setid(e) => self.on_setid(e, ctx),
        }
    }
    /// The run is over (flush output, write summaries).
    fn finish(&mut self) {}
}

/// Names one attached ornament.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OrnamentHandle(pub u64);

/// An attach or detach request, applied after the current delivery.
enum Command {
    Attach(OrnamentHandle, Box<dyn Ornament>),
    Detach(OrnamentHandle),
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Attach(h, o) => write!(f, "Attach({h:?}, {})", o.name()),
            Command::Detach(h) => write!(f, "Detach({h:?})"),
        }
    }
}

#[derive(Debug, Default)]
struct Shared {
    next: AtomicU64,
    queue: Mutex<Vec<Command>>,
}

impl Shared {
    fn handle(&self) -> OrnamentHandle {
        OrnamentHandle(self.next.fetch_add(1, Ordering::Relaxed))
    }

    fn queue(&self) -> MutexGuard<'_, Vec<Command>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A handle to a [`Registry`] that anyone (an ornament, another thread) may keep: its
/// requests are applied by the registry before and after each delivery.
#[derive(Debug, Clone)]
pub struct RegistryQueue {
    shared: Arc<Shared>,
}

impl RegistryQueue {
    /// Request `ornament` be attached (at the end of the list); its handle is valid at
    /// once.
    pub fn attach(&self, ornament: Box<dyn Ornament>) -> OrnamentHandle {
        let h = self.shared.handle();
        self.shared.queue().push(Command::Attach(h, ornament));
        h
    }

    /// Request the ornament `handle` be detached.
    pub fn detach(&self, handle: OrnamentHandle) {
        self.shared.queue().push(Command::Detach(handle));
    }
}

/// The decision on one event so far, handed to each ornament in turn; later ornaments
/// see (and may change) what earlier ones decided.
#[derive(Debug)]
pub struct Decision {
    at_syscall_entry: bool,
    deny: Option<i32>,
    pause: bool,
    decided_by: Option<String>,
    ignored: u32,
    current: String,
    queue: Option<Arc<Shared>>,
    commands: Vec<Command>,
}

impl Decision {
    /// A fresh decision (continue) for an event at syscall entry or elsewhere.
    pub fn new(at_syscall_entry: bool) -> Self {
        Self {
            at_syscall_entry,
            deny: None,
            pause: false,
            decided_by: None,
            ignored: 0,
            current: String::new(),
            queue: None,
            commands: Vec::new(),
        }
    }

    /// The action so far: deny if any, else pause if asked, else continue.
    pub fn action(&self) -> Action {
        match (self.deny, self.pause) {
            (Some(errno), _) => Action::DenySyscall { errno },
            (None, true) => Action::PauseGuest,
            (None, false) => Action::Continue,
        }
    }

    /// The errno of a deny so far.
    pub fn denied(&self) -> Option<i32> {
        self.deny
    }

    /// True when some ornament asked to pause the guest (also alongside a deny).
    pub fn pause_requested(&self) -> bool {
        self.pause
    }

    /// True for an event at syscall entry (where deny works).
    pub fn at_syscall_entry(&self) -> bool {
        self.at_syscall_entry
    }

    /// The ornament that last changed the action.
    pub fn decided_by(&self) -> Option<&str> {
        self.decided_by.as_deref()
    }

    /// Requests ignored so far (deny outside syscall entry, errno out of range).
    pub fn ignored(&self) -> u32 {
        self.ignored
    }

    fn mark(&mut self) {
        self.decided_by = Some(self.current.clone());
    }

    /// Refuse the syscall: it returns `-errno` without running. Only at syscall entry
    /// and with errno in 1..=4095; otherwise ignored with a warning and `false`.
    pub fn deny(&mut self, errno: i32) -> bool {
        if !self.at_syscall_entry || !(1..=MAX_ERRNO).contains(&errno) {
            tracing::warn!(
                ornament = %self.current,
                errno,
                at_syscall_entry = self.at_syscall_entry,
                "deny ignored: only at syscall entry, errno 1..=4095"
            );
            self.ignored += 1;
            return false;
        }
        self.deny = Some(errno);
        self.mark();
        true
    }

    /// Withdraw a deny made by an earlier ornament.
    pub fn allow(&mut self) {
        if self.deny.take().is_some() {
            self.mark();
        }
    }

    /// Stop the whole guest until it is resumed.
    pub fn pause(&mut self) {
        self.pause = true;
        self.mark();
    }

    /// Withdraw a pause asked by an earlier ornament.
    pub fn unpause(&mut self) {
        if std::mem::take(&mut self.pause) {
            self.mark();
        }
    }

    /// Attach `ornament` after this delivery (it sees the next event, not this one).
    pub fn attach(&mut self, ornament: Box<dyn Ornament>) -> OrnamentHandle {
        let h = match &self.queue {
            Some(q) => q.handle(),
            None => OrnamentHandle(u64::MAX),
        };
        self.commands.push(Command::Attach(h, ornament));
        h
    }

    /// Detach the ornament `handle` after this delivery.
    pub fn detach(&mut self, handle: OrnamentHandle) {
        self.commands.push(Command::Detach(handle));
    }

    /// The decision state without the queued requests (to roll back after a panic).
    fn state(&self) -> (Option<i32>, bool, Option<String>, u32) {
        (self.deny, self.pause, self.decided_by.clone(), self.ignored)
    }

    fn restore(&mut self, s: (Option<i32>, bool, Option<String>, u32), commands: usize) {
        (self.deny, self.pause, self.decided_by, self.ignored) = s;
        self.commands.truncate(commands);
    }
}

struct Entry {
    handle: OrnamentHandle,
    name: String,
    mask: EventMask,
    ornament: Box<dyn Ornament>,
    panics_in_a_row: u32,
}

/// The ordered list of attached ornaments.
pub struct Registry {
    entries: Vec<Entry>,
    shared: Arc<Shared>,
    panics: u64,
    max_panics: u32,
    delivered: u64,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field(
                "ornaments",
                &self.entries.iter().map(|e| &e.name).collect::<Vec<_>>(),
            )
            .field("panics", &self.panics)
            .finish()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    /// Panics in a row after which an ornament is detached.
    pub const DEFAULT_MAX_PANICS: u32 = 3;

    /// An empty registry.
    pub fn new() -> Self {
        Self {
            entries: Vec::new(),
            shared: Arc::new(Shared::default()),
            panics: 0,
            max_panics: Self::DEFAULT_MAX_PANICS,
            delivered: 0,
        }
    }

    /// Detach an ornament after `n` panics in a row (0: never detach).
    pub fn set_max_panics(&mut self, n: u32) {
        self.max_panics = n;
    }

    /// Attach `ornament` at the end of the list.
    pub fn attach(&mut self, ornament: Box<dyn Ornament>) -> OrnamentHandle {
        let h = self.shared.handle();
        self.insert(h, ornament);
        h
    }

    fn insert(&mut self, handle: OrnamentHandle, ornament: Box<dyn Ornament>) {
        tracing::debug!(ornament = ornament.name(), ?handle, "attached");
        self.entries.push(Entry {
            handle,
            name: ornament.name().to_owned(),
            mask: ornament.mask(),
            ornament,
            panics_in_a_row: 0,
        });
    }

    /// Detach the ornament `handle`, handing it back.
    pub fn detach(&mut self, handle: OrnamentHandle) -> Result<Box<dyn Ornament>, OrnamentError> {
        let i = self
            .entries
            .iter()
            .position(|e| e.handle == handle)
            .ok_or(OrnamentError::NotAttached(handle))?;
        Ok(self.entries.remove(i).ornament)
    }

    /// A queue through which attach/detach may be requested at any time.
    pub fn queue(&self) -> RegistryQueue {
        RegistryQueue {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Names of the attached ornaments, in order.
    pub fn names(&self) -> Vec<&str> {
        self.entries.iter().map(|e| e.name.as_str()).collect()
    }

    /// Handles of the attached ornaments, in order.
    pub fn handles(&self) -> Vec<OrnamentHandle> {
        self.entries.iter().map(|e| e.handle).collect()
    }

    /// Number of attached ornaments.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when none is attached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Panics contained so far.
    pub fn panics(&self) -> u64 {
        self.panics
    }

    /// Events delivered so far.
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// The union of the attached ornaments' masks.
    pub fn mask(&self) -> EventMask {
        self.entries
            .iter()
            .fold(EventMask::NONE, |m, e| m.union(e.mask))
    }

    fn apply(&mut self, commands: Vec<Command>) {
        for c in commands {
            match c {
                Command::Attach(h, o) => self.insert(h, o),
                Command::Detach(h) => {
                    if self.detach(h).is_err() {
                        tracing::debug!(handle = ?h, "detach of an ornament not attached");
                    }
                }
            }
        }
    }

    fn apply_queued(&mut self) {
        let queued = std::mem::take(&mut *self.shared.queue());
        self.apply(queued);
    }

    /// Deliver `ev` to every attached ornament whose mask has its kind, in order; return
    /// the combined decision.
    pub fn dispatch(&mut self, ev: &Event) -> Decision {
        self.dispatch_decided(ev, None)
    }

    /// [`Registry::dispatch`] of an event on which a deny was already decided elsewhere
    /// (ornaments that run behind a queue, [`Consumers`], see what was decided inline).
    pub fn dispatch_decided(&mut self, ev: &Event, denied: Option<i32>) -> Decision {
        self.apply_queued();
        let kind = ev.kind();
        let mut d = Decision::new(kind == EventKind::Syscall);
        if let Some(errno) = denied {
            d.deny(errno);
        }
        d.queue = Some(Arc::clone(&self.shared));
        self.delivered += 1;
        let mut dead = Vec::new();
        // The snapshot: `entries` cannot change during the loop (requests are queued).
        for e in &mut self.entries {
            if !e.mask.contains(kind) {
                continue;
            }
            d.current.clone_from(&e.name);
            let before = d.state();
            let queued = d.commands.len();
            let r = catch_unwind(AssertUnwindSafe(|| {
                e.ornament.on_event(ev, &mut d);
            }));
            match r {
                Ok(()) => e.panics_in_a_row = 0,
                Err(p) => {
                    d.restore(before, queued);
                    self.panics += 1;
                    e.panics_in_a_row += 1;
                    let msg = p
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    tracing::error!(
                        ornament = %e.name,
                        event = %kind,
                        panic = %msg,
                        in_a_row = e.panics_in_a_row,
                        "ornament panicked; contained, the guest runs on"
                    );
                    if self.max_panics > 0 && e.panics_in_a_row >= self.max_panics {
                        tracing::error!(ornament = %e.name, "detached after repeated panics");
                        dead.push(e.handle);
                    }
                }
            }
        }
        let commands = std::mem::take(&mut d.commands);
        self.apply(commands);
        for h in dead {
            let _ = self.detach(h);
        }
        self.apply_queued();
        d.current.clear();
        d.queue = None;
        d
    }

    /// Tell every ornament the run is over (panics contained as in delivery).
    pub fn finish(&mut self) {
        self.apply_queued();
        for e in &mut self.entries {
            if catch_unwind(AssertUnwindSafe(|| e.ornament.finish())).is_err() {
                self.panics += 1;
                tracing::error!(ornament = %e.name, "ornament panicked in finish");
            }
        }
    }
}

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

/// One process in a [`ProcessTree`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProcNode {
    /// Process id.
    pub pid: i32,
    /// Parent's process id (as seen at fork), if known.
    pub ppid: Option<i32>,
    /// Last known comm.
    pub comm: Option<String>,
    /// Command line of the last exec.
    pub argv: Vec<String>,
    /// Executable of the last exec.
    pub filename: Option<String>,
    /// Exec count.
    pub execs: u32,
    /// Threads created (besides the first).
    pub threads: u32,
    /// Exit status, once exited (`None`: still running, or killed).
    pub exit_code: Option<u8>,
    /// Killing signal.
    pub signal: Option<u8>,
    /// Exited.
    pub exited: bool,
    /// Child process ids, in fork order.
    pub children: Vec<i32>,
}

/// The processes seen so far (shared between a [`ProcessTree`] and its [`TreeView`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TreeState {
    /// Processes by pid (a reused pid starts a new node; the old one is kept under
    /// its parent's children as the same pid).
    pub nodes: BTreeMap<i32, ProcNode>,
    /// Processes first seen without a known parent, in order.
    pub roots: Vec<i32>,
}

/// A read handle on a [`ProcessTree`]'s state, usable after the tree is attached.
#[derive(Debug, Clone, Default)]
pub struct TreeView(Arc<Mutex<TreeState>>);

impl TreeView {
    /// A copy of the state.
    pub fn snapshot(&self) -> TreeState {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The tree as text: one process per line, indented under its parent:
    /// `PID COMM [argv] exit CODE | signal N | running (, N threads)`.
    pub fn render(&self) -> String {
        let s = self.snapshot();
        let mut out = String::new();
        let mut seen = HashSet::new();
        for &r in &s.roots {
            render_node(&s, r, 0, &mut out, &mut seen);
        }
        out
    }
}

fn render_node(s: &TreeState, pid: i32, depth: usize, out: &mut String, seen: &mut HashSet<i32>) {
    use std::fmt::Write as _;
    if !seen.insert(pid) || depth > 64 {
        return;
    }
    let Some(n) = s.nodes.get(&pid) else {
        return;
    };
    let _ = write!(
        out,
        "{:indent$}{} {}",
        "",
        pid,
        n.comm.as_deref().unwrap_or("?"),
        indent = depth * 2
    );
    if !n.argv.is_empty() {
        let _ = write!(
            out,
            " {}",
            serde_json::to_string(&n.argv).unwrap_or_default()
        );
    }
    match (n.exited, n.signal, n.exit_code) {
        (true, Some(sig), _) => {
            let _ = write!(out, " signal {sig}");
        }
        (true, None, Some(c)) => {
            let _ = write!(out, " exit {c}");
        }
        _ => out.push_str(" running"),
    }
    if n.threads > 0 {
        let _ = write!(out, " (+{} threads)", n.threads);
    }
    out.push('\n');
    for &c in &n.children {
        render_node(s, c, depth + 1, out, seen);
    }
}

/// Collects fork, exec and exit events into a process tree, for a summary at the end.
#[derive(Debug, Default)]
pub struct ProcessTree {
    state: TreeView,
}

impl ProcessTree {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// A read handle (keep it before attaching the tree).
    pub fn view(&self) -> TreeView {
        self.state.clone()
    }

    fn with<R>(&self, f: impl FnOnce(&mut TreeState) -> R) -> R {
        f(&mut self.state.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

fn node(s: &mut TreeState, pid: i32, ppid: Option<i32>) -> &mut ProcNode {
    if !s.nodes.contains_key(&pid) {
        let parent_known = ppid.is_some_and(|p| s.nodes.contains_key(&p));
        if let (true, Some(p)) = (parent_known, ppid) {
            if let Some(pn) = s.nodes.get_mut(&p) {
                pn.children.push(pid);
            }
        } else {
            s.roots.push(pid);
        }
    }
    s.nodes.entry(pid).or_insert_with(|| ProcNode {
        pid,
        ppid,
        ..ProcNode::default()
    })
}

impl Ornament for ProcessTree {
    fn name(&self) -> &str {
        "process-tree"
    }
    fn mask(&self) -> EventMask {
        EventMask::LIFECYCLE
    }
    fn on_fork(&mut self, ev: &ForkEvent, _: &mut Decision) {
        let (Some(parent), Some(child)) = (ev.task.tgid, ev.child_tgid) else {
            return;
        };
        self.with(|s| {
            let comm = ev.task.comm.clone();
            let p = node(s, parent, ev.task.ppid);
            if p.comm.is_none() {
                p.comm.clone_from(&comm);
            }
            if ev.thread {
                p.threads += 1;
                return;
            }
            let argv = p.argv.clone();
            let filename = p.filename.clone();
            if s.nodes.get(&child).is_some_and(|n| n.exited) {
                // pid reuse: forget the old node (it stays listed under its parent).
                s.nodes.remove(&child);
            }
            let c = node(s, child, Some(parent));
            c.comm = comm;
            c.argv = argv;
            c.filename = filename;
        });
    }
    fn on_exec(&mut self, ev: &ExecEvent, _: &mut Decision) {
        let Some(pid) = ev.task.tgid else { return };
        self.with(|s| {
            let n = node(s, pid, ev.task.ppid);
            n.comm.clone_from(&ev.task.comm);
            n.argv.clone_from(&ev.argv);
            n.filename.clone_from(&ev.filename);
            n.execs += 1;
        });
    }
    fn on_exit(&mut self, ev: &ExitEvent, _: &mut Decision) {
        let Some(pid) = ev.task.tgid else { return };
        if !ev.group_exit {
            return;
        }
        self.with(|s| {
            let n = node(s, pid, ev.task.ppid);
            n.exited = true;
            n.exit_code = Some(ev.exit_code);
            n.signal = ev.signal;
        });
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::TaskHeader;
    use std::io::Write;

    type Log = Arc<Mutex<Vec<String>>>;

    fn log() -> Log {
        Arc::new(Mutex::new(Vec::new()))
    }

    fn lines(l: &Log) -> Vec<String> {
        l.lock().expect("log").clone()
    }

    fn hdr(pid: i32, tgid: i32) -> TaskHeader {
        TaskHeader {
            pid: Some(pid),
            tgid: Some(tgid),
            ppid: Some(1),
            comm: Some("t".into()),
            uid: Some(0),
            ..TaskHeader::default()
        }
    }

    fn syscall(pid: i32, nr: u32) -> Event {
        Event::Syscall(SyscallEvent {
            task: hdr(pid, pid),
            nr,
            name: Some(format!("sys{nr}")),
            ..SyscallEvent::default()
        })
    }

    fn fork(parent: i32, child: i32) -> Event {
        Event::Fork(ForkEvent {
            task: hdr(parent, parent),
            child_pid: Some(child),
            child_tgid: Some(child),
            ..ForkEvent::default()
        })
    }

    fn exec(pid: i32) -> Event {
        Event::Exec(ExecEvent {
            task: hdr(pid, pid),
            argv: vec![format!("prog{pid}")],
            ..ExecEvent::default()
        })
    }

    fn exit(pid: i32, code: u8) -> Event {
        Event::Exit(ExitEvent {
            task: hdr(pid, pid),
            exit_code: code,
            group_exit: true,
            ..ExitEvent::default()
        })
    }

    /// Logs each event and what it saw decided, then acts.
    struct Probe {
        name: String,
        log: Log,
        act: fn(&mut Decision),
    }

    impl Probe {
        fn boxed(name: &str, log: &Log, act: fn(&mut Decision)) -> Box<dyn Ornament> {
            Box::new(Self {
                name: name.into(),
                log: Arc::clone(log),
                act,
            })
        }
        fn note(&mut self, what: String, d: &mut Decision) {
            self.log.lock().expect("log").push(format!(
                "{} {what} saw {:?}",
                self.name,
                d.action()
            ));
            (self.act)(d);
        }
    }

    impl Ornament for Probe {
        fn name(&self) -> &str {
            &self.name
        }
        fn on_syscall(&mut self, ev: &SyscallEvent, d: &mut Decision) {
            self.note(format!("syscall {}", ev.nr), d);
        }
        fn on_exec(&mut self, ev: &ExecEvent, d: &mut Decision) {
            self.note(format!("exec {:?}", ev.task.pid), d);
        }
    }

    #[test]
    fn order_and_later_sees_earlier() {
        let l = log();
        let mut r = Registry::new();
        r.attach(Probe::boxed("a", &l, |d| {
            assert!(d.deny(1));
        }));
        r.attach(Probe::boxed("b", &l, |d| d.pause()));
        r.attach(Probe::boxed("c", &l, |d| {
            assert!(d.deny(13));
        }));
        let d = r.dispatch(&syscall(5, 83));
        assert_eq!(
            lines(&l),
            [
                "a syscall 83 saw Continue",
                "b syscall 83 saw DenySyscall { errno: 1 }",
                "c syscall 83 saw DenySyscall { errno: 1 }",
            ]
        );
        assert_eq!(d.action(), Action::DenySyscall { errno: 13 });
        assert!(d.pause_requested());
        assert_eq!(d.decided_by(), Some("c"));
        assert_eq!(r.names(), ["a", "b", "c"]);
        // Deny is refused outside syscall entry and for bad errno values.
        let d = r.dispatch(&exec(5));
        assert_eq!(d.action(), Action::PauseGuest);
        assert_eq!(d.ignored(), 0);
        let mut d = Decision::new(false);
        assert!(!d.deny(1));
        let mut s = Decision::new(true);
        assert!(!s.deny(0) && !s.deny(4096) && s.deny(4095));
        s.allow();
        assert_eq!(s.action(), Action::Continue);
        assert_eq!((d.ignored(), s.ignored()), (1, 2));
    }

    /// Detaches itself and attaches a fresh copy of itself on every event.
    struct Rejoin {
        log: Log,
        me: Arc<Mutex<Option<OrnamentHandle>>>,
    }

    impl Ornament for Rejoin {
        fn name(&self) -> &str {
            "rejoin"
        }
        fn on_syscall(&mut self, ev: &SyscallEvent, d: &mut Decision) {
            self.log
                .lock()
                .expect("log")
                .push(format!("rejoin syscall {}", ev.nr));
            if let Some(me) = *self.me.lock().expect("me") {
                d.detach(me);
            }
            let me = Arc::new(Mutex::new(None));
            let h = d.attach(Box::new(Rejoin {
                log: Arc::clone(&self.log),
                me: Arc::clone(&me),
            }));
            *me.lock().expect("me") = Some(h);
        }
    }

    #[test]
    fn attach_and_detach_during_delivery_never_loop_or_skip() {
        let l = log();
        let mut r = Registry::new();
        let first = r.attach(Probe::boxed("a", &l, |_| {}));
        let me = Arc::new(Mutex::new(None));
        let h = r.attach(Box::new(Rejoin {
            log: Arc::clone(&l),
            me: Arc::clone(&me),
        }));
        *me.lock().expect("me") = Some(h);
        r.attach(Probe::boxed("b", &l, |_| {}));
        for nr in 0..3 {
            l.lock().expect("log").clear();
            let _ = r.dispatch(&syscall(1, nr));
            // Everyone attached at the start gets the event exactly once.
            let mut got = lines(&l);
            got.sort();
            assert_eq!(
                got,
                [
                    format!("a syscall {nr} saw Continue"),
                    format!("b syscall {nr} saw Continue"),
                    format!("rejoin syscall {nr}"),
                ]
            );
            // The fresh copy replaced the old one, at the end.
            assert_eq!(r.names(), ["a", "b", "rejoin"]);
        }
        assert!(!r.handles().contains(&h));
        assert!(r.detach(first).is_ok());
        assert_eq!(
            r.detach(first).err(),
            Some(OrnamentError::NotAttached(first))
        );
    }

    #[test]
    fn detach_of_a_later_ornament_mid_delivery_does_not_skip_it() {
        struct Killer(OrnamentHandle);
        impl Ornament for Killer {
            fn name(&self) -> &str {
                "killer"
            }
            fn on_exec(&mut self, _: &ExecEvent, d: &mut Decision) {
                d.detach(self.0);
            }
        }
        let l = log();
        let mut r = Registry::new();
        let q = r.queue();
        // The killer's target is attached after it, by handle known in advance.
        let target = q.attach(Probe::boxed("target", &l, |_| {}));
        r.attach(Box::new(Killer(target)));
        // The queue is applied at the next dispatch: target first, then killer.
        assert_eq!(r.names(), ["killer"]);
        let _ = r.dispatch(&exec(3));
        assert_eq!(lines(&l), ["target exec Some(3) saw Continue"]);
        assert_eq!(r.names(), ["killer"]);
        let _ = r.dispatch(&exec(4));
        assert_eq!(lines(&l).len(), 1);
    }

    #[test]
    fn panics_are_contained_and_repeat_offenders_detached() {
        struct Bomb;
        impl Ornament for Bomb {
            fn name(&self) -> &str {
                "bomb"
            }
            fn on_syscall(&mut self, _: &SyscallEvent, d: &mut Decision) {
                d.pause();
                d.detach(OrnamentHandle(0));
                panic!("boom");
            }
        }
        let l = log();
        let mut r = Registry::new();
        let a = r.attach(Probe::boxed("a", &l, |d| {
            d.deny(1);
        }));
        r.attach(Box::new(Bomb));
        r.attach(Probe::boxed("c", &l, |_| {}));
        for i in 0..3 {
            let d = r.dispatch(&syscall(1, i));
            // The bomb's pause and detach were rolled back; c still ran.
            assert_eq!(d.action(), Action::DenySyscall { errno: 1 });
            assert!(!d.pause_requested());
            assert_eq!(r.panics(), u64::from(i) + 1);
        }
        assert!(r.handles().contains(&a));
        assert_eq!(r.names(), ["a", "c"]);
        assert_eq!(lines(&l).len(), 6);
    }

    #[test]
    fn follow_children() {
        let l = log();
        struct Rec(Log);
        impl Ornament for Rec {
            fn name(&self) -> &str {
                "rec"
            }
            fn mask(&self) -> EventMask {
                EventMask::EXEC | EventMask::SYSCALL
            }
            fn on_exec(&mut self, ev: &ExecEvent, _: &mut Decision) {
                self.0
                    .lock()
                    .expect("log")
                    .push(format!("exec {:?}", ev.task.pid));
            }
            fn on_syscall(&mut self, ev: &SyscallEvent, _: &mut Decision) {
                self.0
                    .lock()
                    .expect("log")
                    .push(format!("syscall {:?}", ev.task.pid));
            }
        }
        let mut r = Registry::new();
        r.attach(Box::new(Follow::new(10, Box::new(Rec(Arc::clone(&l))))));
        for ev in [
            fork(10, 11),
            fork(11, 12),
            fork(20, 21),
            exec(12),
            exec(21),
            syscall(11, 0),
            exit(11, 0),
            syscall(11, 1), // pid 11 is gone (and maybe reused by another process)
            exec(10),
            // A thread of the root that predates following (tid 13, tgid 10).
            Event::Syscall(SyscallEvent {
                task: hdr(13, 10),
                ..SyscallEvent::default()
            }),
        ] {
            let _ = r.dispatch(&ev);
        }
        assert_eq!(
            lines(&l),
            [
                "exec Some(12)",
                "syscall Some(11)",
                "exec Some(10)",
                "syscall Some(13)"
            ]
        );
        assert_eq!(r.names(), ["rec (follow 10)"]);
        let m = r.mask();
        assert!(m.contains(EventKind::Fork) && m.contains(EventKind::Exit));
        assert!(!m.contains(EventKind::Setid));
    }

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("buf").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn builtins_deny_write_tree_count() {
        let mut r = Registry::new();
        let (text, json) = (Buf::default(), Buf::default());
        r.attach(Box::new(DenySyscalls::new(BTreeMap::from([(83, 1)]))));
        r.attach(Box::new(EventWriter::new(
            Box::new(text.clone()),
            Format::Text,
        )));
        r.attach(Box::new(
            EventWriter::new(Box::new(json.clone()), Format::Json).with_mask(EventMask::LIFECYCLE),
        ));
        let tree = ProcessTree::new();
        let view = tree.view();
        r.attach(Box::new(tree));
        let counter = Counter::new();
        let counts = counter.counts();
        r.attach(Box::new(counter));
        let mut hidden = SyscallEvent {
            task: hdr(12, 12),
            nr: 83,
            reported: false,
            ..SyscallEvent::default()
        };
        let evs = [
            exec(10),
            fork(10, 11),
            fork(10, 12),
            Event::Fork(ForkEvent {
                task: hdr(11, 11),
                child_pid: Some(14),
                child_tgid: Some(11),
                thread: true,
                kernel_thread: false,
            }),
            exec(11),
            syscall(11, 83),
            Event::Syscall(hidden.clone()),
            exit(11, 7),
            Event::Exit(ExitEvent {
                task: hdr(12, 12),
                signal: Some(9),
                group_exit: true,
                ..ExitEvent::default()
            }),
        ];
        let actions: Vec<_> = evs.iter().map(|e| r.dispatch(e).action()).collect();
        assert_eq!(actions[5], Action::DenySyscall { errno: 1 });
        assert_eq!(actions[6], Action::DenySyscall { errno: 1 });
        assert_eq!(actions[4], Action::Continue);
        r.finish();
        let text = String::from_utf8(text.0.lock().expect("t").clone()).expect("utf8");
        assert_eq!(text.lines().count(), 8, "{text}");
        assert!(text.contains("syscall sys83("));
        let json = String::from_utf8(json.0.lock().expect("j").clone()).expect("utf8");
        let kinds: Vec<_> = json
            .lines()
            .map(|l| Event::from_json(l).expect("json").kind())
            .collect();
        assert_eq!(kinds.len(), 7);
        assert!(!kinds.contains(&EventKind::Syscall));
        assert_eq!(
            view.render(),
            "10 t [\"prog10\"] running\n  11 t [\"prog11\"] exit 7 (+1 threads)\n  12 t [\"prog10\"] signal 9\n"
        );
        let c = counts.lock().expect("counts").clone();
        assert_eq!(c.by_kind[&EventKind::Fork], 3);
        assert_eq!(c.by_kind[&EventKind::Syscall], 1);
        assert_eq!(c.by_syscall["sys83"], 1);
        hidden.reported = true;
        assert!(Event::Syscall(hidden).is_reported());
    }
}
