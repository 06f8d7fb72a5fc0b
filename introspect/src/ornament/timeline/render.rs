//! The two renderings of a [`TimelineData`]: [`page`], one self-contained HTML page (its
//! data embedded as JSON, its drawing code in `page.html`), and [`trace`], the Chrome
//! trace-event JSON that Perfetto's UI and `chrome://tracing` open.
//!
//! Guest strings (argv, comm, paths) are hostile: in the page they live only inside the
//! JSON block, where every `<`, `>` and `&` is written as a `\u` escape, so no string
//! can end the script element; the page's script draws them with canvas `fillText` and
//! `textContent`, never as markup. The page's content security policy forbids any load
//! from the network.

use super::{Lane, TimelineData, TimelineError};
use serde::Serialize;
use std::path::Path;

/// The page: HTML, CSS and the drawing script, with [`DATA_SLOT`] where the data goes.
const PAGE: &str = include_str!("page.html");

/// The placeholder in `page.html` that the data replaces (once).
const DATA_SLOT: &str = "__TIMELINE_DATA__";

/// The version of the page's embedded data (`version` in it).
pub const PAGE_DATA_VERSION: u32 = 1;

/// Most syscall buckets across the run's span in the page (each lane's are sparse).
pub const PAGE_BUCKETS: u64 = 2000;

/// An exec, times relative to the run's first event.
#[derive(Serialize)]
struct PageExec<'a> {
    t: u64,
    argv: &'a [String],
    file: Option<&'a str>,
    cut: bool,
}

/// An exit, its time relative to the run's first event.
#[derive(Serialize)]
struct PageExit {
    t: u64,
    code: u8,
    signal: Option<u8>,
    core: bool,
}

/// A lane as the page reads it.
#[derive(Serialize)]
struct PageLane<'a> {
    id: &'a str,
    pid: Option<i32>,
    parent: Option<usize>,
    parent_id: Option<&'a str>,
    comm: Option<&'a str>,
    start: u64,
    forked: bool,
    kernel: bool,
    execs: Vec<PageExec<'a>>,
    execs_dropped: u32,
    exit: Option<PageExit>,
    threads: u32,
    syscalls: u64,
    denied: u64,
    /// Syscalls by page bucket, flat: `[bucket, count, bucket, count, ...]`.
    sys: Vec<u64>,
}

/// The page's data.
#[derive(Serialize)]
struct PageData<'a> {
    version: u32,
    run_id: Option<&'a str>,
    host: Option<&'a str>,
    first_wall: Option<&'a str>,
    /// The run's span, ns (the last event's time relative to the first).
    span: u64,
    /// Width of a syscall bucket, ns.
    bucket_ns: u64,
    syscalls: bool,
    lanes_dropped: u64,
    unattributed: u64,
    lanes: Vec<PageLane<'a>>,
    /// Lane indices in tree order: each process followed by its children, by fork time.
    order: Vec<usize>,
}

/// The lanes in tree order: roots by start, each followed by its descendants
/// (children by start). A lane on a parent cycle (not possible from lineage ids, but
/// the order must not depend on that) comes at the end.
pub fn tree_order(lanes: &[Lane]) -> Vec<usize> {
    let n = lanes.len();
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut roots = Vec::new();
    for (i, l) in lanes.iter().enumerate() {
        match l.parent {
            Some(p) if p < n && p != i => children[p].push(i),
            _ => roots.push(i),
        }
    }
    let by_start = |v: &mut Vec<usize>| v.sort_by_key(|&i| (lanes[i].start, i));
    by_start(&mut roots);
    for c in &mut children {
        by_start(c);
    }
    let mut order = Vec::with_capacity(n);
    let mut done = vec![false; n];
    let mut stack: Vec<usize> = roots.into_iter().rev().collect();
    while let Some(i) = stack.pop() {
        if std::mem::replace(&mut done[i], true) {
            continue;
        }
        order.push(i);
        stack.extend(children[i].iter().rev().filter(|&&c| !done[c]));
    }
    order.extend((0..n).filter(|&i| !done[i]));
    order
}

fn page_data(d: &TimelineData) -> PageData<'_> {
    let (t0, t1) = d.span.unwrap_or((0, 0));
    let span = t1 - t0;
    let base = d.bucket_ns.max(1);
    // Page buckets are whole collection buckets, at most PAGE_BUCKETS over the span.
    let k = (span / base / PAGE_BUCKETS).saturating_add(1);
    let width = base.saturating_mul(k);
    let rel = |t: u64| t.saturating_sub(t0);
    let lanes = d
        .lanes
        .iter()
        .map(|l| {
            let mut sys: Vec<u64> = Vec::new();
            for (&b, &n) in &l.buckets {
                let pb = (b.saturating_mul(base)).saturating_sub(t0) / width;
                match sys.len() {
                    len if len >= 2 && sys[len - 2] == pb => sys[len - 1] += u64::from(n),
                    _ => sys.extend([pb, u64::from(n)]),
                }
            }
            PageLane {
                id: &l.id,
                pid: l.pid,
                parent: l.parent,
                parent_id: l.parent_id.as_deref(),
                comm: l.comm.as_deref(),
                start: rel(l.start),
                forked: l.forked,
                kernel: l.kernel,
                execs: l
                    .execs
                    .iter()
                    .map(|e| PageExec {
                        t: rel(e.t),
                        argv: &e.argv,
                        file: e.file.as_deref(),
                        cut: e.cut,
                    })
                    .collect(),
                execs_dropped: l.execs_dropped,
                exit: l.exit.map(|x| PageExit {
                    t: rel(x.t),
                    code: x.code,
                    signal: x.signal,
                    core: x.core,
                }),
                threads: l.threads,
                syscalls: l.syscalls,
                denied: l.denied,
                sys,
            }
        })
        .collect();
    PageData {
        version: PAGE_DATA_VERSION,
        run_id: d.run_id.as_deref(),
        host: d.host.as_deref(),
        first_wall: d.first_wall.as_deref(),
        span,
        bucket_ns: width,
        syscalls: d.lanes.iter().any(|l| l.syscalls > 0),
        lanes_dropped: d.lanes_dropped,
        unattributed: d.unattributed,
        lanes,
        order: tree_order(&d.lanes),
    }
}

/// JSON that is safe inside a `<script>` element: `<`, `>` and `&` (which JSON has
/// only inside strings) as `\u` escapes.
pub fn script_safe_json(json: &str) -> String {
    let mut out = String::with_capacity(json.len() + json.len() / 16);
    for c in json.chars() {
        match c {
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c => out.push(c),
        }
    }
    out
}

/// The HTML page of `d` (`path` names the destination in an error).
pub fn page(d: &TimelineData, path: &Path) -> Result<String, TimelineError> {
    let json = serde_json::to_string(&page_data(d)).map_err(|source| TimelineError::Encode {
        path: path.to_path_buf(),
        what: "the timeline's data",
        source,
    })?;
    Ok(PAGE.replacen(DATA_SLOT, &script_safe_json(&json), 1))
}

/// A name for a process in the trace: its comm, or the basename of its first argv.
fn lane_name(l: &Lane) -> String {
    l.comm
        .clone()
        .or_else(|| l.execs.first().and_then(|e| e.argv.first().cloned()))
        .unwrap_or_else(|| "?".to_owned())
}

/// The Chrome trace-event JSON of `d` (object form, `traceEvents`): each process a
/// trace process of its own (pid: its lane number from 1, so a reused guest pid is
/// another process; the name says the guest pid), sorted in tree order, a slice from
/// its start to its first exec and one per exec (named by argv\[0\]), an instant at its
/// exit, a flow arrow from parent to child at the fork, and a `syscalls` counter
/// (syscalls per bucket) where syscalls were watched.
pub fn trace(d: &TimelineData, path: &Path) -> Result<String, TimelineError> {
    use serde_json::{json, Value};
    let (t0, t1) = d.span.unwrap_or((0, 0));
    let us = |t: u64| (t.saturating_sub(t0)) as f64 / 1000.0;
    let mut ev: Vec<Value> = Vec::new();
    let order = tree_order(&d.lanes);
    for (rank, &i) in order.iter().enumerate() {
        let l = &d.lanes[i];
        let p = i + 1;
        let name = lane_name(l);
        let label = match l.pid {
            Some(pid) => format!("{name} (guest pid {pid})"),
            None => name.clone(),
        };
        for (meta, args) in [
            ("process_name", json!({ "name": label })),
            ("thread_name", json!({ "name": label })),
            ("process_sort_index", json!({ "sort_index": rank })),
        ] {
            ev.push(json!({"ph": "M", "name": meta, "ts": 0, "pid": p, "tid": p, "args": args}));
        }
        let end = l.exit.map_or(t1, |x| x.t).max(l.start);
        let mut cuts: Vec<(u64, String, Value)> = vec![(
            l.start,
            if l.forked { "forked" } else { "running" }.to_owned(),
            json!({ "exec_id": l.id, "comm": l.comm }),
        )];
        for e in &l.execs {
            let argv0 = e.argv.first().map_or("exec", String::as_str);
            let short = argv0.rsplit('/').next().unwrap_or(argv0).to_owned();
            cuts.push((
                e.t.max(l.start),
                short,
                json!({ "exec_id": l.id, "argv": e.argv, "filename": e.file, "argv_cut": e.cut }),
            ));
        }
        for (k, (t, slice, args)) in cuts.iter().enumerate() {
            let until = cuts.get(k + 1).map_or(end, |c| c.0).max(*t);
            ev.push(json!({
                "ph": "X", "name": slice, "cat": "process", "ts": us(*t),
                "dur": us(until) - us(*t), "pid": p, "tid": p, "args": args
            }));
        }
        if let Some(x) = l.exit {
            let what = match x.signal {
                Some(s) => format!("signal {s}"),
                None => format!("exit {}", x.code),
            };
            ev.push(json!({
                "ph": "i", "s": "t", "name": what, "cat": "exit", "ts": us(x.t), "pid": p,
                "tid": p, "args": { "code": x.code, "signal": x.signal, "core_dumped": x.core }
            }));
        }
        if let (Some(parent), true) = (l.parent, l.forked) {
            let q = parent + 1;
            for (ph, pid) in [("s", q), ("f", p)] {
                ev.push(json!({
                    "ph": ph, "bp": "e", "id": p, "name": "fork", "cat": "fork",
                    "ts": us(l.start), "pid": pid, "tid": pid
                }));
            }
        }
        let mut last: Option<u64> = None;
        for (&b, &n) in &l.buckets {
            let t = b.saturating_mul(d.bucket_ns);
            if let Some(prev) = last.filter(|&prev| prev + 1 != b) {
                let zero = (prev + 1).saturating_mul(d.bucket_ns);
                ev.push(json!({"ph": "C", "name": "syscalls", "ts": us(zero), "pid": p, "tid": p, "args": {"n": 0}}));
            }
            ev.push(json!({"ph": "C", "name": "syscalls", "ts": us(t), "pid": p, "tid": p, "args": {"n": n}}));
            last = Some(b);
        }
        if let Some(prev) = last {
            let zero = (prev + 1).saturating_mul(d.bucket_ns);
            ev.push(json!({"ph": "C", "name": "syscalls", "ts": us(zero), "pid": p, "tid": p, "args": {"n": 0}}));
        }
    }
    let doc = json!({
        "traceEvents": ev,
        "displayTimeUnit": "ms",
        "otherData": {
            "producer": "ornament --trace",
            "run_id": d.run_id, "host": d.host, "first_event_wall_time": d.first_wall,
            "syscall_bucket_ns": d.bucket_ns,
            "processes_dropped": d.lanes_dropped,
        },
    });
    serde_json::to_string(&doc).map_err(|source| TimelineError::Encode {
        path: path.to_path_buf(),
        what: "the trace",
        source,
    })
}
