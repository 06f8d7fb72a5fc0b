//! Threads told apart from processes (issue #16, item 5): an exec by a thread that is not
//! its process's leader, checked against its ground truth (`tests/src/threads.rs`) on
//! both kernels.

use ornament_tests::schema::check_schema;
use ornament_tests::threads::check_thread_exec;
use ornament_tests::workload::events;
use ornament_tests::{assert_nothing_left, ornament, GUEST_TIMEOUT_SECS};

macro_rules! gate {
    () => {
        ornament_tests::require_qemu_guest!()
    };
}

fn check(image: &str, vcpus: &str) {
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("events.json");
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
        "fork,exec,exit",
        "--format",
        "json",
        "--output",
        out.to_str().expect("utf8"),
        "--",
        "/ornament/bin/ornament-workload",
        "threadexec",
    ]);
    assert_eq!(r.code, Some(0), "{image}: {}", r.stderr);
    assert_nothing_left(&r, rt.path());
    let evs = events(&out);
    check_schema(&evs);
    check_thread_exec(&r.stderr, &evs);
}

#[test]
fn exec_by_a_thread_on_6_1_two_vcpus() {
    gate!();
    check("debian-6.1-cloud", "2");
}

#[test]
fn exec_by_a_thread_on_6_12_one_vcpu() {
    gate!();
    check("debian-6.12-cloud", "1");
}
