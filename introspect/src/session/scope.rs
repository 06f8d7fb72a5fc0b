//! Whose events an ornament sees ([`Scope`], [`scoped`]), and the small ornaments that
//! narrow or act on a run: [`OnlyPid`] and [`PauseOnExec`].

use crate::command::{CommandView, InCommand};
use crate::event::{Event, EventMask};
use crate::ornament::{Decision, Follow, Ornament};

/// Whose events are reported and whose syscalls are denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The command's process and its descendants (the default of `ornament run`).
    Command,
    /// Every task of the guest.
    All,
    /// One pid, and with `true` its descendants as they are forked.
    Pid(i32, bool),
}

/// Restrict `inner` to the events of `scope` (`command` tells which process is the
/// command).
pub fn scoped(scope: Scope, command: &CommandView, inner: Box<dyn Ornament>) -> Box<dyn Ornament> {
    match scope {
        Scope::Command => Box::new(InCommand::new(command.clone(), inner)),
        Scope::All => inner,
        Scope::Pid(root, true) => Box::new(Follow::new(root, inner)),
        Scope::Pid(pid, false) => Box::new(OnlyPid { pid, inner }),
    }
}

/// Passes on only the events of one pid.
pub struct OnlyPid {
    pid: i32,
    inner: Box<dyn Ornament>,
}

impl std::fmt::Debug for OnlyPid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnlyPid")
            .field("pid", &self.pid)
            .field("inner", &self.inner.name())
            .finish()
    }
}

impl OnlyPid {
    /// `inner`, told only of `pid`'s events.
    pub fn new(pid: i32, inner: Box<dyn Ornament>) -> Self {
        Self { pid, inner }
    }
}

impl Ornament for OnlyPid {
    fn name(&self) -> &str {
        "only-pid"
    }

    fn mask(&self) -> EventMask {
        self.inner.mask()
    }

    fn on_event(&mut self, ev: &Event, d: &mut Decision) {
        if ev.task().pid == Some(self.pid) {
            self.inner.on_event(ev, d);
        }
    }

    fn finish(&mut self) {
        self.inner.finish();
    }
}

/// Asks to pause the whole guest when a process execs a given path, before the new
/// program runs (the exec probe then holds its vCPU: see [`crate::session::Session::new`]).
#[derive(Debug, Clone)]
pub struct PauseOnExec {
    path: String,
}

impl PauseOnExec {
    /// Pause at each exec of `path` (the file name as the exec event reports it).
    pub fn new(path: impl Into<String>) -> Self {
        Self { path: path.into() }
    }
}

impl Ornament for PauseOnExec {
    fn name(&self) -> &str {
        "pause-on-exec"
    }

    fn mask(&self) -> EventMask {
        EventMask::EXEC
    }

    fn on_event(&mut self, ev: &Event, d: &mut Decision) {
        if let Event::Exec(x) = ev {
            if x.filename.as_deref() == Some(self.path.as_str()) {
                d.pause();
            }
        }
    }
}
