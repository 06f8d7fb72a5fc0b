//! Tests of the timeline: lanes from events, their order, the page's escaping, the
//! trace's shape, and the staged write.

use super::render::{page, script_safe_json, trace, tree_order};
use super::*;
use crate::event::{Event, ExecEvent, ExitEvent, ForkEvent, SyscallEvent, TaskHeader};

fn header(t: u64, tgid: i32, id: &str, parent: Option<&str>) -> TaskHeader {
    TaskHeader {
        time_ns: t,
        pid: Some(tgid),
        tgid: Some(tgid),
        comm: Some("sh".into()),
        exec_id: Some(id.into()),
        parent_exec_id: parent.map(str::to_owned),
        ..TaskHeader::default()
    }
}

fn fork(t: u64, parent: (i32, &str), child: (i32, &str)) -> Event {
    Event::Fork(ForkEvent {
        task: header(t, parent.0, parent.1, None),
        child_pid: Some(child.0),
        child_tgid: Some(child.0),
        child_exec_id: Some(child.1.into()),
        ..ForkEvent::default()
    })
}

fn exec(t: u64, who: (i32, &str), argv: &[&str]) -> Event {
    Event::Exec(ExecEvent {
        task: header(t, who.0, who.1, None),
        filename: Some(format!("/bin/{}", argv[0])),
        argv: argv.iter().map(|s| (*s).to_owned()).collect(),
        argv_truncated: false,
        cwd: None,
    })
}

fn exit(t: u64, who: (i32, &str), code: u8, signal: Option<u8>) -> Event {
    Event::Exit(ExitEvent {
        task: header(t, who.0, who.1, None),
        exit_code: code,
        signal,
        group_exit: true,
        ..ExitEvent::default()
    })
}

fn syscall(t: u64, who: (i32, &str)) -> Event {
    Event::Syscall(SyscallEvent {
        task: header(t, who.0, who.1, None),
        nr: 140,
        ..SyscallEvent::default()
    })
}

fn collect(events: &[Event]) -> TimelineData {
    let mut t = Timeline::new(Some("run".into()), None);
    let v = t.view();
    for e in events {
        t.on_event(e, &mut Decision::new(false));
    }
    v.snapshot()
}

/// The JSON embedded in a page, parsed.
fn embedded(html: &str) -> serde_json::Value {
    let start = html.find("type=\"application/json\">").expect("data block")
        + "type=\"application/json\">".len();
    let len = html[start..].find("</script>").expect("end of data");
    serde_json::from_str(&html[start..start + len]).expect("data is JSON")
}

#[test]
fn one_lane_per_process_across_pid_reuse() {
    let root = (10, "r:10:1");
    let a = (11, "r:11:2");
    let b = (11, "r:11:3"); // pid 11 again, after a ended
    let d = collect(&[
        exec(1_000, root, &["sh", "-c", "x"]),
        fork(2_000, root, a),
        exec(3_000, a, &["true"]),
        exit(4_000, a, 0, None),
        fork(5_000, root, b),
        syscall(5_500, b),
        syscall(5_600, b),
        exit(6_000, b, 0, Some(9)),
        exit(7_000, root, 3, None),
    ]);
    assert_eq!(d.lanes.len(), 3);
    let ids: Vec<_> = d.lanes.iter().map(|l| l.id.as_str()).collect();
    assert_eq!(ids, ["r:10:1", "r:11:2", "r:11:3"]);
    assert_eq!(d.lanes[1].parent, Some(0));
    assert_eq!(d.lanes[2].parent, Some(0));
    assert!(d.lanes[1].forked && !d.lanes[0].forked);
    assert_eq!(d.lanes[1].start, 2_000);
    assert_eq!(d.lanes[1].execs[0].argv, ["true"]);
    assert_eq!(d.lanes[0].exit.map(|x| x.code), Some(3));
    assert_eq!(d.lanes[2].exit.and_then(|x| x.signal), Some(9));
    assert_eq!(d.lanes[2].syscalls, 2);
    assert_eq!(d.span, Some((1_000, 7_000)));
    assert_eq!(tree_order(&d.lanes), [0, 1, 2]);
}

#[test]
fn tree_order_puts_children_under_their_parent() {
    let p = (1, "r:1:1");
    let c1 = (2, "r:2:2");
    let c2 = (3, "r:3:3");
    let g = (4, "r:4:4");
    // Seen out of order: the grandchild's fork comes after the second child's.
    let d = collect(&[
        fork(10, p, c1),
        fork(20, p, c2),
        fork(30, c1, g),
        exit(40, g, 0, None),
    ]);
    let ids: Vec<_> = tree_order(&d.lanes)
        .into_iter()
        .map(|i| d.lanes[i].id.clone())
        .collect();
    assert_eq!(ids, ["r:1:1", "r:2:2", "r:4:4", "r:3:3"]);
}

#[test]
fn threads_count_on_their_process() {
    let p = (1, "r:1:1");
    let mut ev = fork(10, p, p);
    if let Event::Fork(f) = &mut ev {
        f.thread = true;
        f.child_pid = Some(7);
    }
    let d = collect(&[ev]);
    assert_eq!(d.lanes.len(), 1);
    assert_eq!(d.lanes[0].threads, 1);
}

#[test]
fn long_argv_is_cut_and_says_so() {
    let long: Vec<String> = (0..2000).map(|i| format!("arg-{i:05}")).collect();
    let refs: Vec<&str> = long.iter().map(String::as_str).collect();
    let d = collect(&[exec(1, (1, "r:1:1"), &refs)]);
    let e = &d.lanes[0].execs[0];
    assert!(e.cut);
    assert!(e.argv.len() < 2000 && !e.argv.is_empty());
    assert_eq!(e.argv[..], long[..e.argv.len()]);
}

#[test]
fn buckets_coarsen_and_keep_every_syscall() {
    let mut d = TimelineData {
        bucket_ns: FIRST_BUCKET_NS,
        ..TimelineData::default()
    };
    let who = (1, "r:1:1");
    for k in 0..1000u64 {
        if let Event::Syscall(s) = syscall(k * FIRST_BUCKET_NS, who) {
            d.syscall(&s, false);
        }
    }
    assert_eq!(d.bucket_count, 1000);
    d.coarsen();
    assert_eq!(d.bucket_ns, 2 * FIRST_BUCKET_NS);
    assert_eq!(d.bucket_count, 500);
    assert_eq!(
        d.lanes[0]
            .buckets
            .values()
            .map(|&n| u64::from(n))
            .sum::<u64>(),
        1000
    );
}

#[test]
fn hostile_argv_stays_inside_the_data() {
    let evil = "</script><script>alert(1)</script><img src=x onerror=alert(2)> &amp; \u{2028}";
    let d = collect(&[exec(1, (1, "r:1:1"), &["sh", evil])]);
    let html = page(&d, Path::new("t.html")).expect("page");
    assert_eq!(html.matches("</script>").count(), 2, "only the page's own");
    assert!(!html.contains("<img"));
    let data = embedded(&html);
    assert_eq!(data["lanes"][0]["execs"][0]["argv"][1], evil);
    assert_eq!(script_safe_json("\"<>&\""), "\"\\u003c\\u003e\\u0026\"");
}

#[test]
fn page_data_matches_the_lanes() {
    let root = (10, "r:10:1");
    let a = (11, "r:11:2");
    let d = collect(&[
        exec(1_000_000, root, &["sh"]),
        fork(2_000_000, root, a),
        syscall(2_500_000, a),
        exit(3_000_000, a, 7, None),
    ]);
    let data = embedded(&page(&d, Path::new("t.html")).expect("page"));
    assert_eq!(data["version"], 1);
    assert_eq!(data["span"], 2_000_000);
    assert_eq!(data["syscalls"], true);
    assert_eq!(data["order"], serde_json::json!([0, 1]));
    let l = &data["lanes"][1];
    assert_eq!(l["id"], "r:11:2");
    assert_eq!(l["parent"], 0);
    assert_eq!(l["start"], 1_000_000);
    assert_eq!(l["exit"]["code"], 7);
    assert_eq!(l["sys"][1], 1);
}

#[test]
fn trace_has_the_chrome_shape() {
    let root = (10, "r:10:1");
    let a = (11, "r:11:2");
    let d = collect(&[
        exec(1_000, root, &["/bin/sh", "-c", "x"]),
        fork(2_000, root, a),
        syscall(2_500, a),
        exit(3_000, a, 7, None),
    ]);
    let v: serde_json::Value =
        serde_json::from_str(&trace(&d, Path::new("t.json")).expect("trace")).expect("JSON");
    let evs = v["traceEvents"].as_array().expect("traceEvents");
    for e in evs {
        for k in ["ph", "ts", "pid", "tid", "name"] {
            assert!(!e[k].is_null(), "{k} in {e}");
        }
    }
    let slices: Vec<_> = evs.iter().filter(|e| e["ph"] == "X").collect();
    assert!(slices.iter().any(|e| e["name"] == "sh" && e["pid"] == 1));
    assert!(evs
        .iter()
        .any(|e| e["ph"] == "i" && e["name"] == "exit 7" && e["pid"] == 2));
    assert_eq!(evs.iter().filter(|e| e["cat"] == "fork").count(), 2);
    assert!(evs.iter().any(|e| e["ph"] == "C" && e["args"]["n"] == 1));
}

#[test]
fn staged_file_appears_whole_or_not_at_all() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("t.html");
    let staged = StagedFile::create(&path).expect("stage");
    assert!(!path.exists());
    staged.commit(b"<!doctype html>").expect("commit");
    assert_eq!(std::fs::read(&path).expect("read"), b"<!doctype html>");
    let left: Vec<_> = std::fs::read_dir(dir.path()).expect("dir").collect();
    assert_eq!(left.len(), 1, "no temporary file left");
    // Dropped without a commit: nothing stays.
    drop(StagedFile::create(&dir.path().join("u.html")).expect("stage"));
    assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 1);
}

#[test]
fn a_bad_destination_is_named() {
    let err = StagedFile::create(Path::new("/nonexistent-dir/t.html")).expect_err("no dir");
    let msg = err.to_string();
    assert!(msg.contains("/nonexistent-dir/t.html"), "{msg}");
    assert!(msg.contains("/nonexistent-dir"), "{msg}");
}

#[test]
fn thousands_of_processes_make_a_page_of_bounded_size() {
    let mut events = Vec::new();
    let ids: Vec<String> = (0..3000)
        .map(|i| format!("r:{}:{}", 100 + i, i + 1))
        .collect();
    let pid = |i: usize| i32::try_from(100 + i).expect("pid");
    for i in 1..3000usize {
        let parent = (i - 1) / 4;
        let t = u64::try_from(i).expect("time") * 1_000_000;
        let me = (pid(i), ids[i].as_str());
        events.push(fork(t, (pid(parent), &ids[parent]), me));
        events.push(exec(t + 10, me, &["worker", "--n", "1"]));
        events.push(syscall(t + 20, me));
        let code = u8::try_from(i % 4).expect("code");
        events.push(exit(t + 500_000, me, code, None));
    }
    let d = collect(&events);
    assert_eq!(d.lanes.len(), 3000);
    let html = page(&d, Path::new("t.html")).expect("page");
    assert!(html.len() < 3 << 20, "{} bytes", html.len());
    assert_eq!(
        embedded(&html)["order"].as_array().map(Vec::len),
        Some(3000)
    );
}
