//! [`ProcessTree`]: the process tree of a run (forks, execs, exits) as it happens, shown
//! at the end through its [`TreeView`].

use super::{Decision, Ornament};
use crate::event::{EventMask, ExecEvent, ExitEvent, ForkEvent};
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

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
