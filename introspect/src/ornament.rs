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
    Event, EventKind, EventMask, ExecEvent, ExecFailedEvent, ExitEvent, ForkEvent, SetidEvent,
    SignalDeliverEvent, SignalEvent, SyscallEvent, SyscallReturnEvent,
};
use crate::probes::MAX_ERRNO;
use ornament_engine::Action;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

mod consumers;
pub mod ecs;
mod summary;
pub mod timeline;
mod writer;
pub use consumers::{
    Consumers, DEFAULT_CAPACITY as CONSUMER_QUEUE, DEFAULT_PATIENCE as CONSUMER_PATIENCE,
};
pub use summary::{RunSummary, SummaryCounts};
pub use timeline::{StagedFile, Timeline, TimelineError, TimelineView};
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
    /// A watched system call returned (or its task exited inside it).
    fn on_syscall_return(&mut self, _ev: &SyscallReturnEvent, _ctx: &mut Decision) {}
    /// An exec failed.
    fn on_exec_failed(&mut self, _ev: &ExecFailedEvent, _ctx: &mut Decision) {}
    /// A signal was generated.
    fn on_signal(&mut self, _ev: &SignalEvent, _ctx: &mut Decision) {}
    /// A signal was delivered.
    fn on_signal_deliver(&mut self, _ev: &SignalDeliverEvent, _ctx: &mut Decision) {}
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
            Event::SyscallReturn(e) => self.on_syscall_return(e, ctx),
            Event::ExecFailed(e) => self.on_exec_failed(e, ctx),
            Event::Signal(e) => self.on_signal(e, ctx),
            Event::SignalDeliver(e) => self.on_signal_deliver(e, ctx),
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

mod block_signals;
mod builtin;
mod tree;
pub use block_signals::{BlockRule, BlockSignalError, BlockSignals, SIGNAL_SYSCALLS};
pub use builtin::{Counter, Counts, DenySyscalls, Follow};
pub use tree::{ProcNode, ProcessTree, TreeState, TreeView};

#[cfg(test)]
mod tests;
