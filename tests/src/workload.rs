//! The events workload's ground truth (`ornament-workload all` in the guest prints
//! what it did as `W ...` console lines) and the check of a run's events against it:
//! every event of its process tree, one by one, nothing missing, duplicated or
//! invented. Shared by the QEMU, PVM and nested-SVM runs of the workload.

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

/// What the workload's tests watch: its lifecycle and the syscall it makes K times.
pub const WATCH: &str = "fork,exec,exit,syscall=getpriority";

/// The workload's command line in the guest.
pub const COMMAND: [&str; 2] = ["/ornament/bin/ornament-workload", "all"];

/// The `ornament run` options of a workload run that writes its events as JSON to
/// `out`, within `timeout` seconds.
pub fn json_events_args<'a>(timeout: &'a str, out: &'a str) -> [&'a str; 8] {
    [
        "--timeout",
        timeout,
        "--watch",
        WATCH,
        "--format",
        "json",
        "--output",
        out,
    ]
}

/// What the workload said it did.
#[derive(Debug, Default)]
pub struct Facts {
    /// The workload's own pid.
    pub root: i64,
    /// (parent, child) of every fork and vfork.
    pub forks: Vec<(i64, i64)>,
    /// pid -> (exit code, killing signal).
    pub exits: BTreeMap<i64, (i64, Option<i64>)>,
    /// pid and argc of the exec with the long argv.
    pub big_exec: Option<(i64, usize)>,
    /// The working directory it made that exec in.
    pub big_exec_cwd: Option<String>,
    /// pid whose exec failed.
    pub failed_exec: Option<i64>,
    /// How many times it called the watched syscall.
    pub syscall_n: i64,
    /// What the watched syscall returned (as the kernel returns it: -errno on failure).
    pub syscall_ret: Option<i64>,
    /// The errno of the failed exec.
    pub failed_exec_errno: Option<i64>,
    /// Threads it started.
    pub threads: i64,
}

fn kv(line: &str, key: &str) -> Option<String> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .map(str::to_owned)
}

fn num(line: &str, key: &str) -> i64 {
    kv(line, key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{key} in {line:?}"))
}

/// The `W ...` lines of `console`.
pub fn facts(console: &str) -> Facts {
    let mut f = Facts::default();
    for l in console.lines().filter_map(|l| l.strip_prefix("W ")) {
        match l.split_whitespace().next() {
            Some("start") => f.root = num(l, "pid"),
            Some("fork") | Some("vfork") => f.forks.push((num(l, "parent"), num(l, "child"))),
            Some("exit") => {
                let code = kv(l, "code").and_then(|v| v.parse().ok()).unwrap_or(0);
                let sig = kv(l, "signal").and_then(|v| v.parse().ok());
                f.exits.insert(num(l, "pid"), (code, sig));
            }
            Some("exec") => {
                if let Some(argc) = kv(l, "argc") {
                    f.big_exec = Some((num(l, "pid"), argc.parse().expect("argc")));
                    f.big_exec_cwd = kv(l, "cwd");
                }
            }
            Some("execfail") => {
                f.failed_exec = Some(num(l, "pid"));
                f.failed_exec_errno = Some(num(l, "errno"));
            }
            Some("syscall") => {
                f.syscall_n = num(l, "n");
                f.syscall_ret = Some(num(l, "ret"));
            }
            Some("threads") => f.threads = num(l, "n"),
            _ => {}
        }
    }
    f
}

/// The JSON-lines event file at `path`.
pub fn events(path: &std::path::Path) -> Vec<Value> {
    json_lines(&std::fs::read_to_string(path).expect("event file"))
}

/// The JSON values of the lines of `text` (an event output).
pub fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON {l:?}: {e}")))
        .collect()
}

/// The integer field `k` of event `v` (panics naming it when absent).
pub fn i(v: &Value, k: &str) -> i64 {
    v[k].as_i64().unwrap_or_else(|| panic!("{k} in {v}"))
}

/// Check `evs` (the run's events) against what the workload printed on `console`
/// (the run's stderr): forks, threads, exits with codes and signals, the big exec,
/// the failed exec, the root's execs and the watched syscall. With `results` (an engine
/// that reports syscall results and failed execs), also the `exec_failed` event of the
/// failed exec and a `syscall_return` paired with each watched syscall; without, that
/// there are none.
pub fn check_workload_events(console: &str, evs: &[Value], results: bool) {
    let f = facts(console);
    assert!(f.root > 1, "no start line: {console}");
    // The workload's process tree: its root and every child it reported.
    let mut procs: BTreeSet<i64> = BTreeSet::from([f.root]);
    procs.extend(f.forks.iter().map(|&(_, c)| c));
    let in_tree = |e: &Value| procs.contains(&i(e, "tgid"));
    let kind = |e: &Value| e["event"].as_str().unwrap_or_default().to_owned();

    // Forks: exactly the reported ones (processes), plus exactly N threads of the root.
    let mut forks: Vec<(i64, i64)> = evs
        .iter()
        .filter(|e| kind(e) == "fork" && in_tree(e) && e["thread"] == false)
        .map(|e| (i(e, "pid"), i(e, "child_pid")))
        .collect();
    let mut want = f.forks.clone();
    forks.sort_unstable();
    want.sort_unstable();
    assert_eq!(forks, want, "fork events vs the workload's forks");
    let threads: Vec<&Value> = evs
        .iter()
        .filter(|e| kind(e) == "fork" && e["thread"] == true && i(e, "tgid") == f.root)
        .collect();
    assert_eq!(threads.len() as i64, f.threads, "thread creations");
    for t in &threads {
        assert_eq!(t["kernel_thread"], false);
        assert_eq!(i(t, "child_tgid"), f.root);
    }
    for e in evs.iter().filter(|e| kind(e) == "fork" && in_tree(e)) {
        assert_eq!(e["kernel_thread"], false, "{e}");
    }

    // Exits of processes (pid == tgid): the reported ones, and the root's 0.
    let mut exits: BTreeMap<i64, (i64, Option<i64>)> = BTreeMap::new();
    for e in evs
        .iter()
        .filter(|e| kind(e) == "exit" && in_tree(e) && i(e, "pid") == i(e, "tgid"))
    {
        let prev = exits.insert(i(e, "pid"), (i(e, "exit_code"), e["signal"].as_i64()));
        assert!(prev.is_none(), "two exit events for pid {}", i(e, "pid"));
    }
    let mut want_exits = f.exits.clone();
    want_exits.insert(f.root, (0, None));
    for (pid, (code, sig)) in &want_exits {
        let got = exits
            .get(pid)
            .unwrap_or_else(|| panic!("no exit event for pid {pid}"));
        match sig {
            Some(s) => assert_eq!(got.1, Some(*s), "signal of pid {pid}"),
            None => assert_eq!(*got, (*code, None), "exit of pid {pid}"),
        }
    }
    assert_eq!(
        exits.len(),
        want_exits.len(),
        "exit events: {exits:?} vs {want_exits:?}"
    );
    // Thread exits: one per thread.
    let thread_exits = evs
        .iter()
        .filter(|e| kind(e) == "exit" && i(e, "tgid") == f.root && i(e, "pid") != f.root)
        .count() as i64;
    assert_eq!(thread_exits, f.threads, "thread exits");

    // Execs of the children: only the big-argv one (the failed exec has none).
    let (big_pid, argc) = f.big_exec.expect("big exec line");
    let execs: Vec<&Value> = evs
        .iter()
        .filter(|e| kind(e) == "exec" && in_tree(e) && i(e, "pid") != f.root)
        .collect();
    assert_eq!(execs.len(), 1, "exec events of children: {execs:?}");
    let x = execs[0];
    assert_eq!(i(x, "pid"), big_pid);
    assert_eq!(x["filename"], "/ornament/bin/ornament-workload");
    // Its working directory, in a directory on the /tmp tmpfs (a mount point crossed).
    let cwd = f
        .big_exec_cwd
        .as_deref()
        .expect("cwd= on the big exec line");
    assert_eq!(x["cwd"], cwd, "working directory of the big exec");
    let argv: Vec<&str> = x["argv"]
        .as_array()
        .expect("argv")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(&argv[..3], &["ornament-workload", "true", "arg000000"]);
    for (n, a) in argv.iter().enumerate().skip(2) {
        assert_eq!(*a, format!("arg{:06}", n - 2), "argv[{n}]");
    }
    if x["argv_truncated"] == false {
        assert_eq!(argv.len(), argc, "argv length");
    } else {
        assert!(argv.len() < argc);
    }
    let failed = f.failed_exec.expect("failed exec line");
    assert!(
        !evs.iter()
            .any(|e| kind(e) == "exec" && i(e, "pid") == failed),
        "a failed exec was reported"
    );

    // The root's own execs, in order: /init's `sh /ornament/cmd`, which execs the
    // workload with the command line given; both in `/`, where /init runs it.
    let root_execs: Vec<(&Value, &Value)> = evs
        .iter()
        .filter(|e| kind(e) == "exec" && i(e, "pid") == f.root)
        .map(|e| {
            assert_eq!(e["cwd"], "/", "working directory of {e}");
            (&e["filename"], &e["argv"])
        })
        .collect();
    assert_eq!(
        root_execs,
        [
            (
                &Value::from("/bin/busybox"),
                &serde_json::json!(["sh", "/ornament/cmd"])
            ),
            (
                &Value::from("/ornament/bin/ornament-workload"),
                &serde_json::json!(["/ornament/bin/ornament-workload", "all"])
            ),
        ],
        "exec events of the root {}",
        f.root
    );

    // The syscall, K times, with its arguments: every syscall event of the whole guest
    // (only getpriority is watched, and only the root calls it), each the root's.
    let calls: Vec<&Value> = evs.iter().filter(|e| kind(e) == "syscall").collect();
    assert_eq!(calls.len() as i64, f.syscall_n, "getpriority events");
    for c in calls {
        assert_eq!((i(c, "pid"), i(c, "tgid")), (f.root, f.root), "{c}");
        assert_eq!(c["name"], "getpriority");
        assert_eq!(i(c, "nr"), 140);
        assert_eq!(c["args"][0], 2, "PRIO_USER");
        assert_eq!(c["args"][1], 4242);
    }
    let returns: Vec<&Value> = evs.iter().filter(|e| kind(e) == "syscall_return").collect();
    let failed_execs: Vec<&Value> = evs
        .iter()
        .filter(|e| kind(e) == "exec_failed" && in_tree(e))
        .collect();
    if results {
        // The failed exec: once, with its file name and errno, from the child that tried.
        assert_eq!(
            failed_execs.len(),
            1,
            "exec_failed events: {failed_execs:?}"
        );
        let x = failed_execs[0];
        assert_eq!((i(x, "pid"), i(x, "tgid")), (failed, failed), "{x}");
        assert_eq!(x["syscall"], "execve", "{x}");
        assert_eq!(x["filename"], "/does/not/exist", "{x}");
        let errno = f.failed_exec_errno.expect("errno of the failed exec");
        assert_eq!(i(x, "errno"), errno, "{x}");
        assert_eq!(x["errno_name"], "ENOENT", "{x}");
        // Each watched syscall's return, with what the workload saw it return, paired
        // with its own entry (the same task, the entry's time).
        assert_eq!(returns.len() as i64, f.syscall_n, "getpriority returns");
        let entries: BTreeSet<i64> = evs
            .iter()
            .filter(|e| kind(e) == "syscall")
            .map(|e| i(e, "time_ns"))
            .collect();
        let mut paired = BTreeSet::new();
        let want_ret = f.syscall_ret.expect("ret of the syscall");
        for r in &returns {
            assert_eq!((i(r, "pid"), i(r, "nr")), (f.root, 140), "{r}");
            assert_eq!(r["name"], "getpriority", "{r}");
            assert_eq!(i(r, "ret"), want_ret, "{r}");
            let want_errno = (want_ret < 0).then_some("ESRCH");
            assert_eq!(r["errno"].as_str(), want_errno, "{r}");
            let entry = i(r, "entry_time_ns");
            assert!(entries.contains(&entry) && entry <= i(r, "time_ns"), "{r}");
            assert!(paired.insert(entry), "two returns for one entry: {r}");
        }
    } else {
        assert!(
            returns.is_empty() && failed_execs.is_empty(),
            "results reported"
        );
    }
    // Nothing else was watched.
    assert!(evs.iter().all(|e| [
        "fork",
        "exec",
        "exit",
        "syscall",
        "syscall_return",
        "exec_failed"
    ]
    .contains(&kind(e).as_str())));
}
