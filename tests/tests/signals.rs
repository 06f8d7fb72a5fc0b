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
