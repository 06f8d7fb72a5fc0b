//! \[6\] The user's command inside the guest, as the hypervisor saw it: which process it
//! is, which processes descend from it, and how it ended.
//!
//! Nothing here comes from what the guest prints. The command's process is recognised
//! at its first exec (a child of a given parent, `/init`, running a given command line:
//! ornament's `sh /ornament/cmd`), before any code of the user's command has run, so a
//! later process cannot take its place. Its exit status is the one the kernel recorded
//! when its thread group ended (`task->exit_code` at `proc_exit_connector`).
//!
//! [`CommandTracker`] is an ornament: attach it first, so that every later ornament sees
//! the tree as it is at the event. [`InCommand`] wraps another ornament so that it sees
//! only the events of the command's tree (the default scope of `ornament run`'s output
//! and deny rules).

use crate::event::{Event, EventMask, TaskHeader};
use crate::ornament::{Decision, Ornament};
use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};

/// How the command's process is recognised at its first exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandMatch {
    /// The process id of its parent (`/init`: 1).
    pub parent_tgid: i32,
    /// The first arguments of the command line it execs (`["sh", "/ornament/cmd"]`).
    pub argv_prefix: Vec<String>,
}

impl CommandMatch {
    fn matches(&self, task: &TaskHeader, argv: &[String]) -> bool {
        task.ppid == Some(self.parent_tgid)
            && task.tgid.is_some()
            && argv.len() >= self.argv_prefix.len()
            && argv.iter().zip(&self.argv_prefix).all(|(a, b)| a == b)
    }
}

/// How the command's process ended, as the kernel recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObservedExit {
    /// `WEXITSTATUS` (0 when killed by a signal).
    pub code: u8,
    /// The signal that killed it, if one did.
    pub signal: Option<u8>,
    /// A core dump was written.
    pub core_dumped: bool,
}

impl ObservedExit {
    /// The status a shell reports: the exit code, or 128 + the signal.
    pub fn status(self) -> u8 {
        match self.signal {
            Some(s) => 128u8.saturating_add(s),
            None => self.code,
        }
    }
}

/// What is known of the command so far.
#[derive(Debug, Clone, Default)]
pub struct CommandState {
    /// Its process id, once it has exec'd.
    pub root: Option<i32>,
    /// How it ended, once its thread group has exited.
    pub exit: Option<ObservedExit>,
    /// Process ids of the command and its live descendants.
    members: HashSet<i32>,
    /// Process ids that ended at the event being delivered: still members during it.
    leaving: Vec<i32>,
}

/// A shared, read-only view of the tracker's state (cheap to clone).
#[derive(Debug, Clone, Default)]
pub struct CommandView(Arc<Mutex<CommandState>>);

impl CommandView {
    fn lock(&self) -> MutexGuard<'_, CommandState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The command's process id, once it has exec'd.
    pub fn root(&self) -> Option<i32> {
        self.lock().root
    }

    /// How the command's process ended, once it has.
    pub fn exit(&self) -> Option<ObservedExit> {
        self.lock().exit
    }

    /// Is the task of this event the command or one of its descendants?
    pub fn contains(&self, task: &TaskHeader) -> bool {
        task.tgid.is_some_and(|t| self.lock().members.contains(&t))
    }

    /// A copy of the state now.
    pub fn snapshot(&self) -> CommandState {
        self.lock().clone()
    }
}

/// Finds the command's process, follows its descendants and records its exit.
#[derive(Debug)]
pub struct CommandTracker {
    rule: CommandMatch,
    view: CommandView,
}

impl CommandTracker {
    /// A tracker for the process that `rule` recognises.
    pub fn new(rule: CommandMatch) -> Self {
        Self {
            rule,
            view: CommandView::default(),
        }
    }

    /// The view other ornaments and the caller read.
    pub fn view(&self) -> CommandView {
        self.view.clone()
    }
}

impl Ornament for CommandTracker {
    fn name(&self) -> &str {
        "command"
    }

    fn mask(&self) -> EventMask {
        EventMask::LIFECYCLE
    }

    fn on_event(&mut self, ev: &Event, _: &mut Decision) {
        let mut s = self.view.lock();
        // A process that ended at the previous event leaves the tree now, so that a
        // reused pid is not taken for a descendant.
        for t in std::mem::take(&mut s.leaving) {
            s.members.remove(&t);
        }
        let task = ev.task();
        match ev {
            Event::Exec(x) if s.root.is_none() && self.rule.matches(task, &x.argv) => {
                if let Some(t) = task.tgid {
                    s.root = Some(t);
                    s.members.insert(t);
                }
            }
            Event::Fork(f) if !f.thread && !f.kernel_thread => {
                if let (Some(parent), Some(child)) = (task.tgid, f.child_tgid) {
                    if s.members.contains(&parent) {
                        s.members.insert(child);
                    }
                }
            }
            Event::Exit(x) if x.group_exit => {
                if let Some(t) = task.tgid.filter(|t| s.members.contains(t)) {
                    if s.root == Some(t) && s.exit.is_none() {
                        s.exit = Some(ObservedExit {
                            code: x.exit_code,
                            signal: x.signal,
                            core_dumped: x.core_dumped,
                        });
                    }
                    s.leaving.push(t);
                }
            }
            _ => {}
        }
    }
}

/// Passes on only the events of the command's tree (see [`CommandView::contains`]).
pub struct InCommand {
    view: CommandView,
    inner: Box<dyn Ornament>,
    name: String,
}

impl std::fmt::Debug for InCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InCommand")
            .field("inner", &self.name)
            .finish()
    }
}

impl InCommand {
    /// `inner`, restricted to the command's tree as `view` sees it.
    pub fn new(view: CommandView, inner: Box<dyn Ornament>) -> Self {
        let name = format!("{} (command tree)", inner.name());
        Self { view, inner, name }
    }
}

impl Ornament for InCommand {
    fn name(&self) -> &str {
        &self.name
    }

    fn mask(&self) -> EventMask {
        self.inner.mask()
    }

    fn on_event(&mut self, ev: &Event, d: &mut Decision) {
        if self.view.contains(ev.task()) {
            self.inner.on_event(ev, d);
        }
    }

    fn finish(&mut self) {
        self.inner.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{ExecEvent, ExitEvent, ForkEvent};
    use crate::ornament::Registry;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn task(pid: i32, ppid: i32) -> TaskHeader {
        TaskHeader {
            pid: Some(pid),
            tgid: Some(pid),
            ppid: Some(ppid),
            comm: Some("sh".into()),
            ..TaskHeader::default()
        }
    }

    fn exec(pid: i32, ppid: i32, argv: &[&str]) -> Event {
        Event::Exec(ExecEvent {
            task: task(pid, ppid),
            filename: Some("/bin/busybox".into()),
            argv: argv.iter().map(|s| (*s).to_owned()).collect(),
            argv_truncated: false,
            cwd: None,
        })
    }

    fn fork(parent: i32, child: i32) -> Event {
        Event::Fork(ForkEvent {
            task: task(parent, 1),
            child_pid: Some(child),
            child_tgid: Some(child),
            thread: false,
            kernel_thread: false,
            child_exec_id: None,
        })
    }

    fn exit(pid: i32, code: u8, signal: Option<u8>) -> Event {
        Event::Exit(ExitEvent {
            task: task(pid, 1),
            exit_code: code,
            signal,
            core_dumped: false,
            group_exit: true,
        })
    }

    fn rule() -> CommandMatch {
        CommandMatch {
            parent_tgid: 1,
            argv_prefix: vec!["sh".into(), "/ornament/cmd".into()],
        }
    }

    /// Counts the events an inner ornament is given.
    struct Count(Arc<AtomicUsize>);
    impl Ornament for Count {
        fn name(&self) -> &str {
            "count"
        }
        fn on_event(&mut self, _: &Event, _: &mut Decision) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn the_command_is_the_first_matching_exec_and_its_exit_is_the_status() {
        let t = CommandTracker::new(rule());
        let view = t.view();
        let mut reg = Registry::new();
        reg.attach(Box::new(t));
        // /init's own helpers: not the command.
        reg.dispatch(&exec(5, 1, &["mkdir", "-p", "/proc"]));
        reg.dispatch(&exit(5, 0, None));
        // The wrong parent: not the command either.
        reg.dispatch(&exec(6, 9, &["sh", "/ornament/cmd"]));
        assert_eq!(view.root(), None);
        reg.dispatch(&exec(83, 1, &["sh", "/ornament/cmd"]));
        assert_eq!(view.root(), Some(83));
        // A descendant that later forges the same command line changes nothing.
        reg.dispatch(&fork(83, 84));
        reg.dispatch(&exec(84, 1, &["sh", "/ornament/cmd"]));
        assert_eq!(view.root(), Some(83));
        reg.dispatch(&exit(84, 0, None));
        assert_eq!(view.exit(), None);
        reg.dispatch(&exit(83, 3, None));
        assert_eq!(view.exit().map(ObservedExit::status), Some(3));
        // A later exit of a reused pid changes nothing.
        reg.dispatch(&exit(83, 7, None));
        assert_eq!(view.exit().map(ObservedExit::status), Some(3));
    }

    #[test]
    fn a_signal_gives_128_plus_its_number() {
        let e = ObservedExit {
            code: 0,
            signal: Some(9),
            core_dumped: false,
        };
        assert_eq!(e.status(), 137);
    }

    #[test]
    fn in_command_passes_only_the_tree_and_forgets_reused_pids() {
        let t = CommandTracker::new(rule());
        let view = t.view();
        let n = Arc::new(AtomicUsize::new(0));
        let mut reg = Registry::new();
        reg.attach(Box::new(t));
        reg.attach(Box::new(InCommand::new(
            view.clone(),
            Box::new(Count(n.clone())),
        )));
        reg.dispatch(&exec(5, 1, &["mount", "-t", "proc"])); // /init's: not passed
        reg.dispatch(&exec(83, 1, &["sh", "/ornament/cmd"])); // 1
        reg.dispatch(&fork(83, 84)); // 2
        reg.dispatch(&exec(84, 83, &["ls"])); // 3
        reg.dispatch(&exit(84, 0, None)); // 4: its own exit is still passed
        reg.dispatch(&fork(1, 84)); // init forks a new 84: not a descendant
        reg.dispatch(&exec(84, 1, &["other"])); // not passed
        assert_eq!(n.load(Ordering::Relaxed), 4);
        assert!(!view.contains(&task(84, 1)));
        assert!(view.contains(&task(83, 1)));
    }
}
