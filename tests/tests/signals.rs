//! Signals from real guests (issue #16): `ornament-workload signals` sends SIGTERM to a
//! child's handler, SIGKILL to a child, makes a child write to NULL (SIGSEGV) and to a pipe
//! without a reader (SIGPIPE), sends SIGUSR1 to a child that blocks it until it is told
//! (pending, then delivered), and SIGUSR2 to one of its own threads. It prints each; every
//! `signal` and `signal_deliver` event of its tree is checked against those lines, one by
//! one: who sent what to whom, with which `si_code`, and what became of it. Also the
//! SIGCHLD the kernel sends the parent for each child, and the exits.

use ornament_tests::ecs::{check_ecs, ecs_flat};
use ornament_tests::schema::{check_lineage, check_schema};
use ornament_tests::signals::check_signal_events;
use ornament_tests::workload::{events, json_lines};
use ornament_tests::{assert_nothing_left, ornament, GUEST_TIMEOUT_SECS};
use serde_json::Value;
use std::collections::BTreeSet;

/// Run the workload, return (console, events in `format`).
fn run(image: &str, vcpus: &str, format: &str) -> (String, Vec<Value>) {
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("events");
    let timeout = GUEST_TIMEOUT_SECS.to_string();
    let (r, rt) = ornament(&[
        "run",
        "--image",
        image,
        "--vcpus",
        vcpus,
        "--timeout",
        &timeout,
        "--watch",
        "fork,exec,exit,signal",
        "--format",
        format,
        "--output",
        out.to_str().expect("utf8"),
        "--",
        "/ornament/bin/ornament-workload",
        "signals",
    ]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_nothing_left(&r, rt.path());
    let evs = if format == "json" {
        events(&out)
    } else {
        json_lines(&std::fs::read_to_string(&out).expect("ecs output"))
    };
    (r.stderr, evs)
}

fn check(image: &str, vcpus: &str) {
    let (console, evs) = run(image, vcpus, "json");
    check_schema(&evs);
    check_lineage(&evs);
    check_signal_events(&console, &evs);

    // The same run as ECS documents: every field one ECS defines, with its type.
    let flat = ecs_flat().expect("ECS field definitions");
    let (_, docs) = run(image, vcpus, "ecs");
    let mut seen = BTreeSet::new();
    for d in &docs {
        // Panics on a field ECS lacks or a value of the wrong type.
        check_ecs(d, &flat);
        seen.insert(d["event"]["action"].as_str().unwrap_or_default().to_owned());
    }
    assert!(
        seen.contains("signal") && seen.contains("signal-deliver"),
        "{seen:?}"
    );
}

macro_rules! gate {
    () => {
        ornament_tests::require_qemu_guest!()
    };
}

#[test]
fn signals_6_1_one_vcpu() {
    gate!();
    check("debian-6.1-cloud", "1");
}

#[test]
fn signals_6_1_two_vcpus() {
    gate!();
    check("debian-6.1-cloud", "2");
}

#[test]
fn signals_6_12_one_vcpu() {
    gate!();
    check("debian-6.12-cloud", "1");
}

#[test]
fn signals_6_12_two_vcpus() {
    gate!();
    check("debian-6.12-cloud", "2");
}

/// `sh -c` that starts the workload waiting for a signal, sends it SIGTERM with the shell's
/// own `kill` once it runs as itself (its comm) and had time to set its handlers, and
/// reports kill's status. (scripts/nested-kvm-suite runs the same.)
const KILL_FROM_SHELL: &str = "/ornament/bin/ornament-workload wait-signal 4 & p=$!; \
     until [ \"$(cat /proc/$p/comm)\" = ornament-worklo ]; do sleep 0.1; done; \
     sleep 0.5; kill -TERM $p; echo \"W kill rc=$?\"; wait $p";

/// Issue #16: `--block-signal TERM:COMM` keeps a guest shell's `kill -TERM` from its target,
/// as the target's own output says; without it the same script's target catches it; a rule
/// for another comm changes nothing. The refused `kill` is a syscall denied with EPERM.
#[test]
fn block_signal_keeps_a_shell_kill_from_its_target() {
    gate!();
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("events.json");
    let timeout = GUEST_TIMEOUT_SECS.to_string();
    let run = |block: &[&str]| {
        let mut args = vec![
            "run",
            "--timeout",
            &timeout,
            "--watch",
            "exit,syscall=kill",
            "--format",
            "json",
            "--output",
            out.to_str().expect("utf8"),
        ];
        args.extend_from_slice(block);
        args.extend(["--", "sh", "-c", KILL_FROM_SHELL]);
        let (r, rt) = ornament(&args);
        assert_eq!(r.code, Some(0), "{}", r.stderr);
        assert_nothing_left(&r, rt.path());
        (r.stderr, events(&out))
    };
    let kills = |evs: &[Value]| -> Vec<Value> {
        evs.iter()
            .filter(|e| e["event"] == "syscall" && e["name"] == "kill" && e["args"][1] == 15)
            .cloned()
            .collect()
    };

    let (err, evs) = run(&[]);
    assert!(
        err.contains("W caught pid=") && err.contains(" sig=15"),
        "{err}"
    );
    assert!(err.contains("W kill rc=0"), "{err}");
    assert_eq!(kills(&evs).len(), 1, "{evs:#?}");
    assert!(kills(&evs)[0]["denied"].is_null());

    let (err, evs) = run(&["--block-signal", "TERM:ornament-worklo"]);
    assert!(err.contains("W no-signal pid="), "{err}");
    assert!(!err.contains("W caught"), "{err}");
    assert!(
        err.contains("W kill rc=1"),
        "the shell's kill failed: {err}"
    );
    let k = kills(&evs);
    assert_eq!(k.len(), 1, "{evs:#?}");
    assert_eq!(k[0]["denied"], 1, "EPERM: {}", k[0]);
    // What the refused kill returned, as the sender saw it.
    let ret = evs
        .iter()
        .find(|e| e["event"] == "syscall_return" && e["name"] == "kill")
        .expect("kill's return");
    assert_eq!(
        (&ret["ret"], &ret["errno"]),
        (&(-1).into(), &"EPERM".into())
    );

    let (err, _) = run(&["--block-signal", "TERM:sleep", "--block-signal", "USR1"]);
    assert!(
        err.contains("W caught pid=") && err.contains(" sig=15"),
        "{err}"
    );
}

#[test]
fn bad_block_signal_rules_are_refused_before_boot() {
    for (rule, says) in [
        ("NOPE", "unknown signal \"NOPE\""),
        ("TERM:", "empty COMM"),
        ("0", "unknown signal \"0\""),
    ] {
        let (r, _rt) = ornament(&["run", "--block-signal", rule, "--", "true"]);
        assert_eq!(r.code, Some(125), "{rule}: {}", r.stderr);
        assert!(
            r.stderr.contains(&format!("--block-signal {rule}")) && r.stderr.contains(says),
            "{rule}: {}",
            r.stderr
        );
    }
}
