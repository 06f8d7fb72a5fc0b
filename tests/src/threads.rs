//! The ground truth of `ornament-workload threadexec` (issue #16, item 5): a thread that
//! is not its process's leader execs `ornament-workload true` while the leader waits. The
//! kernel's `de_thread` kills the other threads (the leader included, with exit code 0),
//! gives the exec'ing thread the leader's pid and runs the new program as the process.
//! The old leader's exit may carry either id (see [`check_thread_exec`]).
//! Shared by the QEMU and nested-SVM runs.

use crate::workload::i;
use serde_json::Value;

/// Check `evs` (a run watching fork, exec and exit) against the `W threadexec pid=P
/// tid=T` line on `console`: after the workload's own exec, the process has exactly the
/// thread's creation, one exit of the old leader that does not end the process
/// (`group_exit: false`, code 0), the exec by the process's pid, and one exit that ends it
/// (code 0); no other exit under the thread's id.
pub fn check_thread_exec(console: &str, evs: &[Value]) {
    let line = console
        .lines()
        .find_map(|l| l.strip_prefix("W threadexec "))
        .unwrap_or_else(|| panic!("no threadexec line: {console}"));
    let kv = |k: &str| -> i64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{k} in {line}"))
    };
    let (pid, tid) = (kv("pid"), kv("tid"));
    assert_ne!(pid, tid, "{line}");
    // Every event of the process after the workload's own exec (the root's first events
    // are /init's sh becoming the workload), in order.
    let mine: Vec<&Value> = evs.iter().filter(|e| i(e, "tgid") == pid).collect();
    let start = mine
        .iter()
        .position(|e| e["event"] == "exec" && e["argv"][1] == "threadexec")
        .unwrap_or_else(|| panic!("no exec of the workload: {mine:#?}"));
    let mut seen: Vec<(String, i64, Value)> = mine[start + 1..]
        .iter()
        .map(|e| {
            let what = match e["event"].as_str() {
                Some("fork") => Value::from(i(e, "child_pid")),
                Some("exit") => serde_json::json!([e["exit_code"], e["signal"], e["group_exit"]]),
                Some("exec") => e["argv"].clone(),
                _ => (*e).clone(),
            };
            (
                e["event"].as_str().unwrap_or("?").to_owned(),
                i(e, "pid"),
                what,
            )
        })
        .collect();
    // The old leader's exit comes from `proc_exit_connector`, which the kernel calls after
    // `exit_notify` has made the leader a zombie; by then the exec'ing thread, on another
    // CPU, may already have swapped ids with it (`exchange_tid` in `de_thread`). So that
    // exit carries the process's pid, or the thread's old id: both are what the kernel
    // reported (its own proc connector says the same), and either is accepted here.
    if let Some(leader_exit) = seen.get_mut(1) {
        if leader_exit.0 == "exit" && leader_exit.1 == tid {
            leader_exit.1 = pid;
        }
    }
    let want = [
        // The thread's creation, by the leader.
        ("fork".to_owned(), pid, Value::from(tid)),
        // de_thread: the leader dies (code 0, not a signal), the process lives on.
        ("exit".to_owned(), pid, serde_json::json!([0, null, false])),
        // The exec, by the thread now holding the leader's pid.
        (
            "exec".to_owned(),
            pid,
            serde_json::json!(["ornament-workload", "true"]),
        ),
        // The new program's end: the process's.
        ("exit".to_owned(), pid, serde_json::json!([0, null, true])),
    ];
    assert_eq!(seen, want, "events of process {pid}");
    // No other exit under the thread's id: its task took the leader's pid.
    let tid_exits = evs
        .iter()
        .filter(|e| e["event"] == "exit" && i(e, "pid") == tid)
        .count();
    assert!(tid_exits <= 1, "{tid_exits} exits of tid {tid}");
    // One process throughout: the exec keeps the lineage's parent link.
    let exec = mine[start + 1..]
        .iter()
        .find(|e| e["event"] == "exec")
        .expect("exec");
    assert_eq!(i(exec, "tgid"), pid);
}
