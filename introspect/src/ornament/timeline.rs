//! [`Timeline`]: the ornament behind `ornament run --timeline FILE.html` and
//! `--trace FILE.json`. It collects each process of a run as one lane (fork to exit,
//! keyed by `exec_id`, so a reused pid is a new lane), its execs with their argv, its
//! exit code or signal, its syscalls counted in time buckets, and who forked it; at the
//! end [`render`] turns that into one self-contained HTML page or a Chrome trace-event
//! file, and [`StagedFile`] writes either beside its destination and renames it there.
//!
//! ```text
//! events ─► Timeline (lanes by exec_id) ─► TimelineView::snapshot ─► render::page / trace
//!                                                                     └► StagedFile::commit
//! ```
//!
//! Everything it keeps is bounded: [`MAX_LANES`] processes, [`MAX_EXECS`] execs a
//! process, argv cut to [`MAX_ARGV_BYTES`], and syscall buckets that coarsen (double
//! their width) when there are more than [`MAX_BUCKETS`].

pub mod render;

use super::{Decision, Ornament};
use crate::event::{Event, EventMask, ExecEvent, ExitEvent, ForkEvent, SyscallEvent, TaskHeader};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Most processes (lanes) a timeline keeps; later ones are counted in
/// [`TimelineData::lanes_dropped`].
pub const MAX_LANES: usize = 200_000;
/// Most execs kept for one process; later ones are counted in [`Lane::execs_dropped`].
pub const MAX_EXECS: usize = 64;
/// Most bytes of one exec's argv kept (the entries, whole, until the sum passes it).
pub const MAX_ARGV_BYTES: usize = 4096;
/// Most syscall buckets kept over all lanes before their width doubles.
pub const MAX_BUCKETS: usize = 1 << 20;
/// The first width of a syscall bucket: 1 ms.
pub const FIRST_BUCKET_NS: u64 = 1_000_000;

/// Why a timeline file could not be written. Each names the file.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum TimelineError {
    /// {path}: cannot create a file in its directory {dir}: {source}
    Create {
        /// The destination.
        path: PathBuf,
        /// Its directory.
        dir: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// {path}: writing failed: {source}
    Write {
        /// The destination.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// {path}: {what} cannot be serialised: {source}
    Encode {
        /// The destination.
        path: PathBuf,
        /// Which data.
        what: &'static str,
        /// Why.
        source: serde_json::Error,
    },
}

/// One exec of a process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExecMark {
    /// When (ns since the engine started).
    pub t: u64,
    /// The argv, cut to [`MAX_ARGV_BYTES`].
    pub argv: Vec<String>,
    /// The executable.
    pub file: Option<String>,
    /// True when argv was cut here or by the event itself (`argv_truncated`).
    pub cut: bool,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ExitMark {
    /// When (ns since the engine started).
    pub t: u64,
    /// The exit status (0 when killed).
    pub code: u8,
    /// The killing signal.
    pub signal: Option<u8>,
    /// A core was dumped.
    pub core: bool,
}

/// One process: a lane of the page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Lane {
    /// Its `exec_id`.
    pub id: String,
    /// Its guest pid (tgid).
    pub pid: Option<i32>,
    /// The lane of its parent, when the parent has one.
    pub parent: Option<usize>,
    /// The parent's `exec_id`, as its events said.
    pub parent_id: Option<String>,
    /// Last known comm.
    pub comm: Option<String>,
    /// First seen (its fork, when seen), ns since the engine started.
    pub start: u64,
    /// Its fork was seen (else it was there before, or its fork was out of scope).
    pub forked: bool,
    /// A kernel thread.
    pub kernel: bool,
    /// Its execs, in order.
    pub execs: Vec<ExecMark>,
    /// Execs beyond [`MAX_EXECS`].
    pub execs_dropped: u32,
    /// Its end, once seen.
    pub exit: Option<ExitMark>,
    /// Threads it started.
    pub threads: u32,
    /// Syscall events.
    pub syscalls: u64,
    /// Syscalls denied.
    pub denied: u64,
    /// Syscalls by bucket (`time_ns / bucket_ns`).
    #[serde(skip)]
    pub buckets: BTreeMap<u64, u32>,
}

/// What a [`Timeline`] collected.
#[derive(Debug, Clone, Default)]
pub struct TimelineData {
    /// The processes, in the order first seen.
    pub lanes: Vec<Lane>,
    /// Processes not kept (beyond [`MAX_LANES`]).
    pub lanes_dropped: u64,
    /// Events whose process was unknown (no `exec_id`).
    pub unattributed: u64,
    /// The first and last event's engine time.
    pub span: Option<(u64, u64)>,
    /// The wall-clock time of the first event.
    pub first_wall: Option<String>,
    /// Width of a syscall bucket, ns.
    pub bucket_ns: u64,
    /// Buckets over all lanes.
    pub bucket_count: usize,
    /// The run's id and host, for the page's title.
    pub run_id: Option<String>,
    /// The host.
    pub host: Option<String>,
    index: HashMap<String, usize>,
}

/// A read handle on a [`Timeline`]'s data, usable after the ornament is attached.
#[derive(Debug, Clone, Default)]
pub struct TimelineView(Arc<Mutex<TimelineData>>);

impl TimelineView {
    /// A copy of what was collected so far.
    pub fn snapshot(&self) -> TimelineData {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Collects the lanes of a timeline from fork, exec, exit and syscall events.
#[derive(Debug, Default)]
pub struct Timeline {
    data: TimelineView,
}

impl Timeline {
    /// An empty timeline for the run `run_id` on `host`.
    pub fn new(run_id: Option<String>, host: Option<String>) -> Self {
        let t = Self::default();
        {
            let mut d = t.data.0.lock().unwrap_or_else(|p| p.into_inner());
            d.run_id = run_id;
            d.host = host;
            d.bucket_ns = FIRST_BUCKET_NS;
        }
        t
    }

    /// A read handle (keep it before attaching).
    pub fn view(&self) -> TimelineView {
        self.data.clone()
    }
}

impl TimelineData {
    /// The lane of process `id`, made (first seen at `t`) if new; `None` when it is
    /// beyond [`MAX_LANES`].
    fn lane(&mut self, id: &str, pid: Option<i32>, t: u64) -> Option<usize> {
        if let Some(&i) = self.index.get(id) {
            return Some(i);
        }
        if self.lanes.len() >= MAX_LANES {
            self.lanes_dropped += 1;
            return None;
        }
        let i = self.lanes.len();
        self.lanes.push(Lane {
            id: id.to_owned(),
            pid,
            parent: None,
            parent_id: None,
            comm: None,
            start: t,
            forked: false,
            kernel: false,
            execs: Vec::new(),
            execs_dropped: 0,
            exit: None,
            threads: 0,
            syscalls: 0,
            denied: 0,
            buckets: BTreeMap::new(),
        });
        self.index.insert(id.to_owned(), i);
        Some(i)
    }

    /// The lane of the task of `h`, with what its header says of it.
    fn task_lane(&mut self, h: &TaskHeader) -> Option<usize> {
        let Some(id) = h.exec_id.as_deref() else {
            self.unattributed += 1;
            return None;
        };
        let i = self.lane(id, h.tgid, h.time_ns)?;
        let parent = h
            .parent_exec_id
            .as_deref()
            .and_then(|p| self.index.get(p).copied());
        let lane = &mut self.lanes[i];
        if lane.comm.is_none() {
            lane.comm.clone_from(&h.comm);
        }
        if lane.parent_id.is_none() {
            lane.parent_id.clone_from(&h.parent_exec_id);
        }
        if lane.parent.is_none() && parent != Some(i) {
            lane.parent = parent;
        }
        Some(i)
    }

    fn seen(&mut self, t: u64, wall: Option<&String>) {
        self.span = Some(match self.span {
            None => {
                self.first_wall = wall.cloned();
                (t, t)
            }
            Some((a, b)) => (a.min(t), b.max(t)),
        });
    }

    fn fork(&mut self, ev: &ForkEvent) {
        let Some(parent) = self.task_lane(&ev.task) else {
            return;
        };
        if ev.thread {
            self.lanes[parent].threads += 1;
            return;
        }
        let Some(child_id) = ev.child_exec_id.as_deref() else {
            self.unattributed += 1;
            return;
        };
        let t = ev.task.time_ns;
        let Some(c) = self.lane(child_id, ev.child_tgid, t) else {
            return;
        };
        let parent_id = self.lanes[parent].id.clone();
        let comm = self.lanes[parent].comm.clone();
        let lane = &mut self.lanes[c];
        lane.start = lane.start.min(t);
        lane.forked = true;
        lane.kernel = ev.kernel_thread;
        if c != parent {
            lane.parent = Some(parent);
            lane.parent_id = Some(parent_id);
        }
        if lane.comm.is_none() {
            lane.comm = comm;
        }
    }

    fn exec(&mut self, ev: &ExecEvent) {
        let Some(i) = self.task_lane(&ev.task) else {
            return;
        };
        let lane = &mut self.lanes[i];
        lane.comm.clone_from(&ev.task.comm);
        if lane.execs.len() >= MAX_EXECS {
            lane.execs_dropped += 1;
            return;
        }
        let (argv, cut) = cut_argv(&ev.argv);
        lane.execs.push(ExecMark {
            t: ev.task.time_ns,
            argv,
            file: ev.filename.clone(),
            cut: cut || ev.argv_truncated,
        });
    }

    fn exit(&mut self, ev: &ExitEvent) {
        if !ev.group_exit {
            return;
        }
        let Some(i) = self.task_lane(&ev.task) else {
            return;
        };
        self.lanes[i].exit = Some(ExitMark {
            t: ev.task.time_ns,
            code: ev.exit_code,
            signal: ev.signal,
            core: ev.core_dumped,
        });
    }

    fn syscall(&mut self, ev: &SyscallEvent, denied: bool) {
        let Some(i) = self.task_lane(&ev.task) else {
            return;
        };
        let b = ev.task.time_ns / self.bucket_ns.max(1);
        let lane = &mut self.lanes[i];
        lane.syscalls += 1;
        lane.denied += u64::from(denied);
        let slot = lane.buckets.entry(b).or_insert(0);
        if *slot == 0 {
            self.bucket_count += 1;
        }
        *slot = slot.saturating_add(1);
        while self.bucket_count > MAX_BUCKETS {
            self.coarsen();
        }
    }

    /// Double the bucket width, merging buckets pairwise.
    fn coarsen(&mut self) {
        self.bucket_ns = self.bucket_ns.saturating_mul(2);
        let mut count = 0;
        for lane in &mut self.lanes {
            let mut merged = BTreeMap::new();
            for (b, n) in std::mem::take(&mut lane.buckets) {
                let s: &mut u32 = merged.entry(b / 2).or_insert(0);
                *s = s.saturating_add(n);
            }
            count += merged.len();
            lane.buckets = merged;
        }
        self.bucket_count = count;
        tracing::debug!(
            bucket_ns = self.bucket_ns,
            buckets = count,
            "timeline buckets coarsened"
        );
    }
}

/// `argv`, whole entries until [`MAX_ARGV_BYTES`]; true when some were left out.
fn cut_argv(argv: &[String]) -> (Vec<String>, bool) {
    let mut bytes = 0;
    let mut kept = Vec::new();
    for a in argv {
        bytes += a.len() + 1;
        if bytes > MAX_ARGV_BYTES && !kept.is_empty() {
            return (kept, true);
        }
        kept.push(a.clone());
    }
    (kept, false)
}

impl Ornament for Timeline {
    fn name(&self) -> &str {
        "timeline"
    }

    fn mask(&self) -> EventMask {
        EventMask::LIFECYCLE | EventMask::SYSCALL
    }

    fn on_event(&mut self, ev: &Event, d: &mut Decision) {
        if !ev.is_reported() {
            return;
        }
        let mut data = self.data.0.lock().unwrap_or_else(|p| p.into_inner());
        data.seen(ev.task().time_ns, ev.task().time.as_ref());
        match ev {
            Event::Fork(e) => data.fork(e),
            Event::Exec(e) => data.exec(e),
            Event::Exit(e) => data.exit(e),
            Event::Syscall(e) => data.syscall(e, d.denied().is_some()),
            Event::Setid(_)
            | Event::SyscallReturn(_)
            | Event::ExecFailed(_)
            | Event::Signal(_)
            | Event::SignalDeliver(_) => {}
        }
    }
}

/// A file written beside its destination and renamed onto it once complete: a reader
/// never sees half a page, and a bad destination is found when the file is staged
/// (before the run), not at its end.
#[derive(Debug)]
pub struct StagedFile {
    path: PathBuf,
    tmp: tempfile::NamedTempFile,
}

impl StagedFile {
    /// Stage `path`: make a temporary file in its directory.
    pub fn create(path: &Path) -> Result<Self, TimelineError> {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".partial")
            .tempfile_in(&dir)
            .map_err(|source| TimelineError::Create {
                path: path.to_path_buf(),
                dir,
                source,
            })?;
        // A page to open and share, not a secret: the mode of a file made as usual.
        use std::os::unix::fs::PermissionsExt;
        if let Err(e) = tmp
            .as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
        {
            tracing::debug!(path = %path.display(), error = %e, "cannot make the timeline readable to all");
        }
        Ok(Self {
            path: path.to_path_buf(),
            tmp,
        })
    }

    /// The destination.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Write `bytes` and rename the file onto its destination.
    pub fn commit(mut self, bytes: &[u8]) -> Result<(), TimelineError> {
        let path = self.path.clone();
        let failed = |source| TimelineError::Write {
            path: path.clone(),
            source,
        };
        self.tmp.write_all(bytes).map_err(failed)?;
        self.tmp.flush().map_err(failed)?;
        self.tmp.as_file().sync_all().map_err(failed)?;
        self.tmp.persist(&self.path).map_err(|e| failed(e.error))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
