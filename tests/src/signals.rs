//! The ground truth of `ornament-workload signals` (issue #16): the `W sig ...` lines it
//! prints, and [`check_signal_events`], which checks a run's `signal` and `signal_deliver`
//! events against them one by one.

use crate::workload::{facts, i};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

/// The `W sig ...` lines: (what, key=value pairs).
pub fn sig_lines(console: &str) -> Vec<(String, BTreeMap<String, i64>)> {
    console
        .lines()
        .filter_map(|l| l.strip_prefix("W sig "))
        .map(|l| {
            let mut w = l.split_whitespace();
            let what = w.next().unwrap_or_default().to_owned();
            let kv = w
                .filter_map(|p| p.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.parse().expect("number")))
                .collect();
            (what, kv)
        })
        .collect()
}

fn s(v: &Value, k: &str) -> String {
    v[k].as_str()
        .unwrap_or_else(|| panic!("{k} in {v}"))
        .to_owned()
}

/// The one event of `evs` that `pred` picks.
fn one<'a>(evs: &'a [Value], what: &str, pred: impl Fn(&Value) -> bool) -> &'a Value {
    let got: Vec<&Value> = evs.iter().filter(|e| pred(e)).collect();
    assert_eq!(got.len(), 1, "{what}: {got:#?}");
    got[0]
}

/// Check `evs` (a run's JSON events) against what the workload printed on `console`: who
/// sent which signal to whom with which `si_code`, and what became of it; the kernel's
/// SIGSEGV at the fault address, SIGPIPE, the SIGCHLD of each child, the thread-directed
/// SIGUSR2; nothing more and nothing less in the workload's tree.
pub fn check_signal_events(console: &str, evs: &[Value]) {
    let f = facts(console);
    let root = f.root;
    let lines = sig_lines(console);
    let kind = |e: &Value| s(e, "event");
    let children: BTreeSet<i64> = f.forks.iter().map(|&(_, c)| c).collect();
    assert_eq!(children.len(), 5, "five children: {console}");
    let tree = |t: i64| t == root || children.contains(&t);
    // Every generation event with a sender or a target in the tree, and every delivery in it.
    let gens: Vec<&Value> = evs
        .iter()
        .filter(|e| kind(e) == "signal" && (tree(i(e, "tgid")) || tree(i(e, "target_tgid"))))
        .collect();
    let dels: Vec<&Value> = evs
        .iter()
        .filter(|e| kind(e) == "signal_deliver" && tree(i(e, "tgid")))
        .collect();
    let seq = |e: &Value| i(e, "seq");
    let gen_of = |sig: i64, to_pid: i64| {
        one(evs, &format!("generation of {sig} to {to_pid}"), |e| {
            kind(e) == "signal" && i(e, "signal") == sig && i(e, "target_pid") == to_pid
        })
    };
    let del_of = |sig: i64, pid: i64| {
        one(evs, &format!("delivery of {sig} to {pid}"), |e| {
            kind(e) == "signal_deliver" && i(e, "signal") == sig && i(e, "pid") == pid
        })
    };
    let mut want_gens = 0;
    let mut want_dels = 0;
    for (what, kv) in &lines {
        let k = |n: &str| kv[n];
        match what.as_str() {
            // kill(): from the parent (SI_USER, its pid in si_pid) to the child process.
            "sent" => {
                let g = gen_of(k("sig"), k("to"));
                assert_eq!((i(g, "pid"), i(g, "tgid")), (k("from"), k("from")), "{g}");
                assert_eq!(i(g, "target_tgid"), k("to"), "{g}");
                assert_eq!(s(g, "origin"), "task", "{g}");
                assert_eq!(i(g, "code"), 0, "SI_USER: {g}");
                assert_eq!(i(g, "sender_pid"), k("from"), "{g}");
                assert_eq!(s(g, "scope"), "process", "{g}");
                assert!(g["addr"].is_null(), "{g}");
                want_gens += 1;
                // SIGKILL kills; the others reach the child's handler, after they were sent.
                let d = del_of(k("sig"), k("to"));
                let action = if k("sig") == 9 { "kill" } else { "handler" };
                assert_eq!(s(d, "action"), action, "{d}");
                assert!(seq(d) > seq(g), "delivered after it was sent: {d}");
                want_dels += 1;
            }
            "handled" | "thread-handled" => {
                let pid = kv.get("pid").or(kv.get("tid")).copied().expect("pid");
                assert_eq!(s(del_of(k("sig"), pid), "action"), "handler");
            }
            "pending" => assert_eq!(k("pending"), 1, "SIGUSR1 was pending"),
            // The kernel's SIGSEGV at the faulting address, to that thread: the task dies.
            "fault" => {
                let g = gen_of(k("sig"), k("pid"));
                assert_eq!((i(g, "tgid"), i(g, "target_tgid")), (k("pid"), k("pid")));
                assert_eq!(s(g, "origin"), "kernel", "{g}");
                assert_eq!(i(g, "code"), 1, "SEGV_MAPERR: {g}");
                assert_eq!(g["addr"], k("addr"), "{g}");
                assert_eq!(s(g, "scope"), "thread", "{g}");
                assert_eq!(s(del_of(k("sig"), k("pid")), "action"), "kill");
                (want_gens, want_dels) = (want_gens + 1, want_dels + 1);
            }
            // The kernel's SIGPIPE to the writer (the target sees SI_USER from itself).
            "pipe" => {
                let g = gen_of(k("sig"), k("pid"));
                assert_eq!((i(g, "tgid"), i(g, "sender_pid")), (k("pid"), k("pid")));
                assert_eq!(s(g, "origin"), "kernel", "{g}");
                assert_eq!(i(g, "code"), 0, "{g}");
                // complete_signal turns it into SIGKILL for the group; it dies of SIGPIPE.
                assert_eq!(s(del_of(k("sig"), k("pid")), "action"), "kill");
                (want_gens, want_dels) = (want_gens + 1, want_dels + 1);
            }
            // pthread_kill: tgkill to one thread (SI_TKILL), delivered to that thread.
            "thread-sent" => {
                let g = gen_of(k("sig"), k("to"));
                assert_eq!(i(g, "tgid"), k("from"), "{g}");
                assert_eq!(
                    i(g, "target_tgid"),
                    k("from"),
                    "a thread of the sender: {g}"
                );
                assert_eq!(s(g, "scope"), "thread", "{g}");
                assert_eq!(i(g, "code"), -6, "SI_TKILL: {g}");
                let d = del_of(k("sig"), k("to"));
                assert_eq!(
                    (i(d, "tgid"), s(d, "action")),
                    (k("from"), "handler".into())
                );
                (want_gens, want_dels) = (want_gens + 1, want_dels + 1);
            }
            other => panic!("unknown line {other}"),
        }
    }
    // SIGCHLD from the kernel to the parent at each child's end (CLD_EXITED 1, CLD_KILLED
    // 2), and the root's own to its parent.
    let exits: BTreeMap<i64, Option<i64>> = evs
        .iter()
        .filter(|e| kind(e) == "exit" && i(e, "pid") == i(e, "tgid") && tree(i(e, "tgid")))
        .map(|e| (i(e, "pid"), e["signal"].as_i64()))
        .collect();
    for c in &children {
        let g = one(evs, &format!("SIGCHLD of {c}"), |e| {
            kind(e) == "signal" && i(e, "signal") == 17 && i(e, "tgid") == *c
        });
        assert_eq!(i(g, "target_tgid"), root, "{g}");
        assert_eq!(s(g, "origin"), "kernel", "{g}");
        let killed = exits.get(c).expect("exit of child").is_some();
        assert_eq!(i(g, "code"), if killed { 2 } else { 1 }, "{g}");
        want_gens += 1;
    }
    assert!(
        gens.iter()
            .any(|e| i(e, "tgid") == root && i(e, "signal") == 17),
        "the root's SIGCHLD to its parent"
    );
    want_gens += 1;
    assert_eq!(
        gens.len(),
        want_gens,
        "signal events of the tree: {gens:#?}"
    );
    assert_eq!(dels.len(), want_dels, "deliveries in the tree: {dels:#?}");
    // The exits say the same as the deliveries that killed.
    for d in dels.iter().filter(|d| s(d, "action") == "kill") {
        assert_eq!(exits[&i(d, "pid")], Some(i(d, "signal")), "{d}");
    }
}
