//! \[5\] What makes an event comparable outside its run: the run's id and host
//! ([`RunInfo`]), the wall-clock time of the hit, and a process identity that survives pid
//! reuse (`exec_id`, `parent_exec_id`), stamped on every event by the monitor before the
//! ornaments see it, whatever engine produced the hit.
//!
//! ```text
//! Event (time_ns, tgid, ppid, fork's child_tgid, exit's group_exit)
//!   -> Lineage::stamp: time (anchor + time_ns), exec_id, parent_exec_id, child_exec_id
//! ```
//!
//! A process (thread group) gets its identity from a per-run table keyed by its tgid:
//! a fork of a new process gives the child a new serial, a process first seen without its
//! fork (it was there before the probes were armed) gets one when first seen. The id is
//! `RUN_ID:TGID:SERIAL`: unique across runs by the run id, across pid reuse within a run
//! by the serial. An exec keeps it (the kernel keeps the pid, so a process is one entity
//! from fork to exit).
//!
//! The end of a process (`group_exit`) does not drop its entry, it records when the
//! process ended (the hit's engine time): events can still name it after that, and
//! not only because records of different vCPUs arrive out of order. Linux runs the
//! exit probe (`proc_exit_connector`) after `exit_notify`, so a parent can reap a child
//! and exit before the child's own exit hit, which still names it as parent (seen on
//! the PREEMPT_RT kernel). Only a fork makes a new process of a pid. An ended entry
//! seen only by its own events (a process from before the probes were armed) is then
//! not adopted by the fork, and an exit older than the entry's start (the previous
//! process's, delivered after the fork that reused its pid) is not taken as the end
//! of the new one.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::event::Event;

/// Most processes the table keeps at once: Linux's own `PID_MAX_LIMIT` (4 Mi). A
/// process seen beyond it gets an id that is not remembered (a new one at each event).
pub const MAX_TRACKED_PROCESSES: usize = 1 << 22;

/// Most bytes of a host name kept (`HOST_NAME_MAX`).
pub const MAX_HOST_NAME_BYTES: usize = 64;

/// What identifies one run of ornament: a random UUID (v4) and the host it ran on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunInfo {
    /// The run's UUID, hyphenated lower-case hex.
    pub run_id: String,
    /// The host's name (`/proc/sys/kernel/hostname`), `None` when it cannot be read.
    pub host: Option<String>,
}

impl RunInfo {
    /// A new run on this host.
    pub fn new() -> Self {
        Self {
            run_id: uuid::Uuid::new_v4().hyphenated().to_string(),
            host: host_name(),
        }
    }
}

impl Default for RunInfo {
    fn default() -> Self {
        Self::new()
    }
}

/// The host's name: the kernel's `hostname`, cut at [`MAX_HOST_NAME_BYTES`].
fn host_name() -> Option<String> {
    let raw = std::fs::read("/proc/sys/kernel/hostname").ok()?;
    let name = String::from_utf8_lossy(&raw[..raw.len().min(MAX_HOST_NAME_BYTES)])
        .trim()
        .to_owned();
    (!name.is_empty()).then_some(name)
}

/// The host's wall clock (replaceable in tests).
pub type WallClock = Box<dyn Fn() -> SystemTime + Send>;

#[derive(Debug, Clone, Copy)]
struct Entry {
    serial: u64,
    /// Its fork was seen (else it was first seen by one of its own events).
    forked: bool,
    /// Engine time of its fork, or of the first event that made it.
    since: u64,
    /// Engine time of its end (`group_exit`), once seen.
    ended: Option<u64>,
}

/// The per-run process table and wall-clock anchor that stamp events (see the module).
pub struct Lineage {
    run: RunInfo,
    table: HashMap<i32, Entry>,
    next_serial: u64,
    /// Wall-clock nanoseconds since the epoch at the engine's time 0.
    anchor_ns: Option<u64>,
    clock: WallClock,
}

impl std::fmt::Debug for Lineage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lineage")
            .field("run", &self.run)
            .field("processes", &self.table.len())
            .field("anchor_ns", &self.anchor_ns)
            .finish_non_exhaustive()
    }
}

impl Lineage {
    /// A table for the run `run`, times from the host's clock.
    pub fn new(run: RunInfo) -> Self {
        Self::with_clock(run, Box::new(SystemTime::now))
    }

    /// The same, times from `clock`.
    pub fn with_clock(run: RunInfo, clock: WallClock) -> Self {
        Self {
            run,
            table: HashMap::new(),
            next_serial: 0,
            anchor_ns: None,
            clock,
        }
    }

    /// A table for the run `run` whose hits' engine time 0 was `origin` on the host's
    /// wall clock ([`ornament_engine::Engine::clock_origin`]): a hit's wall time is when
    /// it happened, not when its event was handled.
    pub fn with_origin(run: RunInfo, origin: SystemTime) -> Self {
        let mut l = Self::new(run);
        l.anchor_ns = Some(
            origin
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
        );
        l
    }

    /// The run.
    pub fn run(&self) -> &RunInfo {
        &self.run
    }

    fn id(&self, tgid: i32, serial: u64) -> String {
        format!("{}:{tgid}:{serial}", self.run.run_id)
    }

    fn new_entry(&mut self, forked: bool, since: u64) -> Entry {
        self.next_serial += 1;
        Entry {
            serial: self.next_serial,
            forked,
            since,
            ended: None,
        }
    }

    fn remember(&mut self, tgid: i32, e: Entry) {
        if self.table.len() < MAX_TRACKED_PROCESSES || self.table.contains_key(&tgid) {
            self.table.insert(tgid, e);
        }
    }

    /// The id of the process `tgid` (the last one with that pid, ended or not), made
    /// at engine time `at` when first seen.
    fn id_of(&mut self, tgid: i32, at: u64) -> String {
        let e = match self.table.get(&tgid) {
            Some(e) => *e,
            None => {
                let e = self.new_entry(false, at);
                self.remember(tgid, e);
                e
            }
        };
        self.id(tgid, e.serial)
    }

    /// A new process `tgid` was forked at `at`: a new id, unless its own events came
    /// first (another vCPU's record delivered before the fork's) and made one already.
    fn forked(&mut self, tgid: i32, at: u64) -> String {
        let e = match self.table.get(&tgid) {
            Some(e) if !e.forked && e.ended.is_none() => Entry {
                forked: true,
                since: e.since.min(at),
                ..*e
            },
            _ => self.new_entry(true, at),
        };
        self.remember(tgid, e);
        self.id(tgid, e.serial)
    }

    /// The process `tgid` ended at `at` (unless the entry is of a later process).
    fn ended(&mut self, tgid: i32, at: u64) {
        if let Some(e) = self.table.get_mut(&tgid) {
            if e.since <= at {
                e.ended = Some(at);
            }
        }
    }

    /// The wall-clock time of a hit at engine time `time_ns`: the anchor plus `time_ns`,
    /// so wall times keep the order and spacing of the monotonic times. The anchor is the
    /// engine's clock origin ([`Lineage::with_origin`]); without one, the host's clock
    /// less `time_ns` at the first event stamped (late by that event's queueing).
    fn wall_ns(&mut self, time_ns: u64) -> u64 {
        let anchor = *self.anchor_ns.get_or_insert_with(|| {
            let now = (self.clock)()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
            now.saturating_sub(time_ns)
        });
        anchor.saturating_add(time_ns)
    }

    /// Fill in `ev`'s `time`, `exec_id`, `parent_exec_id` (and a fork's `child_exec_id`);
    /// the end of a process records when it ended.
    pub fn stamp(&mut self, ev: &mut Event) {
        let (time_ns, tgid, ppid) = {
            let t = ev.task();
            (t.time_ns, t.tgid, t.ppid)
        };
        let time = rfc3339(self.wall_ns(time_ns));
        let exec_id = tgid.map(|p| self.id_of(p, time_ns));
        let parent_exec_id = ppid.map(|p| self.id_of(p, time_ns));
        match ev {
            Event::Fork(f) => {
                f.child_exec_id = match (f.thread, f.child_tgid) {
                    (_, None) => None,
                    (true, Some(c)) => Some(self.id_of(c, time_ns)),
                    (false, Some(c)) => Some(self.forked(c, time_ns)),
                };
            }
            Event::Exit(x) if x.group_exit => {
                if let Some(p) = tgid {
                    self.ended(p, time_ns);
                }
            }
            _ => {}
        }
        let t = ev.task_mut();
        t.time = Some(time);
        t.exec_id = exec_id;
        t.parent_exec_id = parent_exec_id;
    }
}

/// `ns` nanoseconds since the Unix epoch as RFC 3339 UTC with nine fraction digits
/// (`2026-12-03T07:30:00.123456789Z`).
pub fn rfc3339(ns: u64) -> String {
    humantime::format_rfc3339_nanos(UNIX_EPOCH + Duration::from_nanos(ns)).to_string()
}

#[cfg(test)]
mod tests;
