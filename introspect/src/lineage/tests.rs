//! Tests of the lineage alone: dates, wall-clock anchoring, ids across pid reuse and out of
//! order deliveries (the session's test drives it from a synthetic guest).

use super::*;
use crate::event::{ExecEvent, ExitEvent, ForkEvent, SyscallEvent, TaskHeader};

const RUN: &str = "0b5a3f4e-1c2d-4e5f-8a9b-0c1d2e3f4a5b";

/// 2026-12-03T07:30:00Z.
const NOW_S: u64 = 1_796_283_000;

fn lineage() -> Lineage {
    Lineage::with_clock(
        RunInfo {
            run_id: RUN.into(),
            host: Some("h".into()),
        },
        Box::new(|| UNIX_EPOCH + Duration::from_secs(NOW_S)),
    )
}

fn task(time_ns: u64, tgid: i32, ppid: i32) -> TaskHeader {
    TaskHeader {
        time_ns,
        pid: Some(tgid),
        tgid: Some(tgid),
        ppid: Some(ppid),
        ..TaskHeader::default()
    }
}

fn fork(parent: i32, grandparent: i32, child: i32) -> Event {
    Event::Fork(ForkEvent {
        task: task(0, parent, grandparent),
        child_pid: Some(child),
        child_tgid: Some(child),
        ..ForkEvent::default()
    })
}

fn exec(tgid: i32, ppid: i32) -> Event {
    Event::Exec(ExecEvent {
        task: task(0, tgid, ppid),
        ..ExecEvent::default()
    })
}

fn exit(tgid: i32, ppid: i32) -> Event {
    Event::Exit(ExitEvent {
        task: task(0, tgid, ppid),
        group_exit: true,
        ..ExitEvent::default()
    })
}

/// `exec_id parent_exec_id [child_exec_id]` after stamping, each as `TGID:SERIAL`.
fn ids(l: &mut Lineage, mut ev: Event) -> String {
    l.stamp(&mut ev);
    let short = |s: &Option<String>| {
        s.as_deref()
            .and_then(|s| s.strip_prefix(&format!("{RUN}:")))
            .expect("an id of the run")
            .to_owned()
    };
    let mut out = vec![short(&ev.task().exec_id), short(&ev.task().parent_exec_id)];
    if let Event::Fork(f) = &ev {
        out.push(short(&f.child_exec_id));
    }
    out.join(" ")
}

/// Stamp each event in turn, checking its [`ids`].
fn check(l: &mut Lineage, steps: Vec<(Event, &str)>) {
    for (i, (ev, want)) in steps.into_iter().enumerate() {
        assert_eq!(ids(l, ev), want, "step {i}");
    }
}

#[test]
fn dates_are_rfc3339_with_nanoseconds() {
    assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000000Z");
    assert_eq!(
        rfc3339(951_827_696_123_456_789),
        "2000-02-29T12:34:56.123456789Z"
    );
    assert_eq!(
        rfc3339(NOW_S * 1_000_000_000 + 5),
        "2026-12-03T07:30:00.000000005Z"
    );
    assert_eq!(
        rfc3339(4_107_542_400 * 1_000_000_000),
        "2100-03-01T00:00:00.000000000Z"
    );
}

#[test]
fn wall_times_keep_the_monotonic_spacing_from_the_first_event() {
    let mut l = lineage();
    let mut times = Vec::new();
    for t in [2_000_000_000, 2_000_000_001, 3_500_000_000] {
        let mut ev = Event::Syscall(SyscallEvent {
            task: task(t, 5, 1),
            ..SyscallEvent::default()
        });
        l.stamp(&mut ev);
        times.push(ev.task().time.clone().expect("time"));
    }
    assert_eq!(
        times,
        [
            "2026-12-03T07:30:00.000000000Z",
            "2026-12-03T07:30:00.000000001Z",
            "2026-12-03T07:30:01.500000000Z"
        ]
    );
}

#[test]
fn ids_follow_forks_and_change_when_a_pid_is_reused() {
    let mut l = lineage();
    let thread = Event::Fork(ForkEvent {
        task: task(0, 11, 10),
        child_pid: Some(13),
        child_tgid: Some(11),
        thread: true,
        ..ForkEvent::default()
    });
    let mut thread_exit = exit(11, 10);
    if let Event::Exit(x) = &mut thread_exit {
        x.task.pid = Some(13);
        x.group_exit = false;
    }
    check(
        &mut l,
        vec![
            // sh (10, child of 1) forks 11, which execs, forks 12, which execs and exits.
            (fork(10, 1, 11), "10:1 1:2 11:3"),
            (exec(11, 10), "11:3 10:1"),
            (fork(11, 10, 12), "11:3 10:1 12:4"),
            (exec(12, 11), "12:4 11:3"),
            (exit(12, 11), "12:4 11:3"),
            (exit(11, 10), "11:3 10:1"),
            // Pid 11 again: a new process, a new id; its child's parent is the new one.
            (fork(10, 1, 11), "10:1 1:2 11:5"),
            (exec(11, 10), "11:5 10:1"),
            (fork(11, 10, 12), "11:5 10:1 12:6"),
            (exec(12, 11), "12:6 11:5"),
            // A thread of 11 belongs to 11, and its end (not the group's) keeps the id.
            (thread, "11:5 10:1 11:5"),
            (thread_exit, "11:5 10:1"),
            (exec(11, 10), "11:5 10:1"),
        ],
    );
}

#[test]
fn a_child_seen_before_its_fork_keeps_its_id() {
    check(
        &mut lineage(),
        vec![
            // Another vCPU's record of the child's exec came before the fork's.
            (exec(20, 10), "20:1 10:2"),
            (fork(10, 1, 20), "10:2 1:3 20:1"),
            // A second fork of a live pid is a new process (its exit was not seen).
            (fork(10, 1, 20), "10:2 1:3 20:4"),
        ],
    );
}

#[test]
fn unreadable_ids_stay_null_and_the_host_is_read() {
    let mut l = lineage();
    let mut ev = Event::Exec(ExecEvent::default());
    ev.task_mut().tgid = None;
    ev.task_mut().ppid = None;
    l.stamp(&mut ev);
    assert_eq!(
        (
            ev.task().exec_id.as_ref(),
            ev.task().parent_exec_id.as_ref()
        ),
        (None, None)
    );
    assert!(ev.task().time.is_some());
    let run = RunInfo::new();
    assert_eq!(
        uuid::Uuid::parse_str(&run.run_id)
            .map(|u| u.get_version_num())
            .ok(),
        Some(4)
    );
    assert_ne!(run.run_id, RunInfo::new().run_id);
    if let Some(h) = run.host {
        assert!(!h.is_empty() && h.len() <= MAX_HOST_NAME_BYTES && !h.contains('\n'));
    }
}

/// `ev` at engine time `t`.
fn at(t: u64, mut ev: Event) -> Event {
    ev.task_mut().time_ns = t;
    ev
}

#[test]
fn a_child_event_delivered_after_its_parents_exit_names_that_parent() {
    check(
        &mut lineage(),
        vec![
            (at(1, fork(10, 1, 11)), "10:1 1:2 11:3"),
            (at(2, fork(11, 10, 12)), "11:3 10:1 12:4"),
            // 11 ends at 4 after 12 ended at 3, but 11's record comes first (another
            // vCPU's): 12's exit still names the 11 that was its parent.
            (at(4, exit(11, 10)), "11:3 10:1"),
            (at(3, exit(12, 11)), "12:4 11:3"),
        ],
    );
    check(
        &mut lineage(),
        vec![
            (at(1, fork(10, 1, 11)), "10:1 1:2 11:3"),
            (at(2, fork(11, 10, 12)), "11:3 10:1 12:4"),
            // Linux's exit probe runs after the parent was told: 11 reaped 12 and ended
            // (at 3) before 12's exit hit (at 4), which still names 11 as its parent.
            (at(3, exit(11, 10)), "11:3 10:1"),
            (at(4, exit(12, 11)), "12:4 11:3"),
            // Only a fork makes pid 11 a new process.
            (at(9, fork(10, 1, 11)), "10:1 1:2 11:5"),
            (at(10, exec(11, 10)), "11:5 10:1"),
        ],
    );
}

#[test]
fn a_process_from_before_the_probes_is_not_adopted_by_a_later_fork_of_its_pid() {
    check(
        &mut lineage(),
        vec![
            // 30 was running before the probes were armed: first seen at its exec.
            (at(1, exec(30, 1)), "30:1 1:2"),
            (at(2, exit(30, 1)), "30:1 1:2"),
            // A fork reusing pid 30 is a new process, not the one first seen at 1.
            (at(3, fork(1, 0, 30)), "1:2 0:3 30:4"),
        ],
    );
}

#[test]
fn an_old_exit_delivered_after_the_pid_is_reused_does_not_end_the_new_process() {
    check(
        &mut lineage(),
        vec![
            (at(1, fork(10, 1, 11)), "10:1 1:2 11:3"),
            // 11 ends at 5 and pid 11 is forked again at 6; the fork's record comes first.
            (at(6, fork(10, 1, 11)), "10:1 1:2 11:4"),
            (at(5, exit(11, 10)), "11:4 10:1"),
            // The new 11 lives on with its id.
            (at(7, exec(11, 10)), "11:4 10:1"),
            (at(8, fork(11, 10, 12)), "11:4 10:1 12:5"),
        ],
    );
}
