//! `ornament run --timeline FILE.html --trace FILE.json` (issue #17, item 5): the page's
//! data against the same run's JSON events (one lane per process, its execs' argv, its
//! exit, its parent, its syscalls), the page in a real headless browser (Debian's
//! chromium-headless-shell: no console message, the lanes drawn, a screenshot with lane
//! colours), the trace's shape, and a synthetic run of thousands of processes (with
//! hostile argv) rendered in the browser.

use ornament_introspect::event::{
    Event, ExecEvent, ExitEvent, ForkEvent, SyscallEvent, TaskHeader,
};
use ornament_introspect::ornament::timeline::render;
use ornament_introspect::ornament::{Decision, Ornament, Timeline};
use ornament_tests::browser::{body_attr, decode_png, has_chromium, load, screenshot};
use ornament_tests::workload::{self, events, facts};
use ornament_tests::{assert_nothing_left, ornament, GUEST_TIMEOUT_SECS};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The lane colours of `page.html`: exit 0, exit not 0.
const GREEN: [u8; 3] = [0x43, 0xa0, 0x47];
const RED: [u8; 3] = [0xe5, 0x39, 0x35];

/// The browser, or `None` (outside CI, after the SKIPPED line) when it is missing.
fn browser() -> Option<PathBuf> {
    ornament_tests::gate::require(
        "chromium-headless-shell (apt-get install chromium-headless-shell)",
        has_chromium(),
    )
}

/// The JSON embedded in a timeline page.
fn page_data(html: &str) -> Value {
    let open = "id=\"timeline-data\" type=\"application/json\">";
    let start = html.find(open).expect("the page's data block") + open.len();
    let len = html[start..]
        .find("</script>")
        .expect("end of the data block");
    serde_json::from_str(&html[start..start + len]).expect("the page's data is JSON")
}

/// Load `page` in the browser: no console message, no error caught by the page, and
/// the number of lanes it says it drew; then a screenshot, decoded, with at least
/// `green` and `red` pixels of those lane colours. The browser's time, seconds.
fn check_in_browser(bin: &Path, page: &Path, lanes: usize, green: usize, red: usize) -> f64 {
    let loaded = load(bin, page, 1400, 900);
    assert!(loaded.console.is_empty(), "console: {:?}", loaded.console);
    assert_eq!(body_attr(&loaded.dom, "data-error"), None, "{}", loaded.dom);
    assert_eq!(body_attr(&loaded.dom, "data-drawn").as_deref(), Some("1"));
    assert_eq!(
        body_attr(&loaded.dom, "data-lanes"),
        Some(lanes.to_string()),
        "lanes the page drew"
    );
    let png = page.with_extension("png");
    let console = screenshot(bin, page, &png, 1400, 900);
    assert!(console.is_empty(), "console: {console:?}");
    let bytes = std::fs::read(&png).expect("screenshot");
    let img = decode_png(&bytes).expect("decode the screenshot");
    assert_eq!((img.width, img.height), (1400, 900));
    let (g, r) = (img.count(GREEN, 6), img.count(RED, 6));
    eprintln!(
        "{}: {} kB page, screenshot {} kB, {g} green and {r} red pixels, browser {:.2} s",
        page.display(),
        std::fs::metadata(page).map(|m| m.len() / 1024).unwrap_or(0),
        bytes.len() / 1024,
        loaded.secs
    );
    if let Some(keep) = std::env::var_os("ORNAMENT_TEST_KEEP") {
        // Keep the page and its screenshot to look at.
        for f in [page, png.as_path()] {
            let to = Path::new(&keep).join(f.file_name().expect("file name"));
            std::fs::copy(f, &to).unwrap_or_else(|e| panic!("{}: {e}", to.display()));
        }
    }
    assert!(g >= green, "{g} pixels of exit-0 lanes");
    assert!(r >= red, "{r} pixels of failed lanes");
    loaded.secs
}

fn s(v: &Value, k: &str) -> String {
    v[k].as_str()
        .unwrap_or_else(|| panic!("{k} in {v}"))
        .to_owned()
}

/// The events' processes by `exec_id`: every task's, and every forked process's.
fn processes(evs: &[Value]) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    for e in evs {
        ids.insert(s(e, "exec_id"));
        if e["event"] == "fork" && e["thread"] == false {
            ids.insert(s(e, "child_exec_id"));
        }
    }
    ids
}

/// The page's data against the run's events: one lane per process, each exec's argv,
/// each process's exit, each forked process's parent, each process's syscalls.
fn check_page_against_events(data: &Value, evs: &[Value]) {
    let lanes = data["lanes"].as_array().expect("lanes");
    let ids: Vec<String> = lanes.iter().map(|l| s(l, "id")).collect();
    let by_id: BTreeMap<&str, &Value> = ids.iter().map(String::as_str).zip(lanes).collect();
    assert_eq!(by_id.len(), lanes.len(), "two lanes of one process");
    assert_eq!(
        ids.iter().cloned().collect::<BTreeSet<_>>(),
        processes(evs),
        "lanes vs the events' processes"
    );
    let mut order = data["order"].as_array().expect("order").clone();
    order.sort_by_key(|v| v.as_u64());
    assert_eq!(
        order,
        (0..lanes.len()).collect::<Vec<_>>(),
        "each lane once"
    );
    let mut execs: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    let mut syscalls: BTreeMap<String, u64> = BTreeMap::new();
    for e in evs {
        let id = s(e, "exec_id");
        let lane = by_id[id.as_str()];
        match e["event"].as_str() {
            Some("exec") => execs.entry(id).or_default().push(&e["argv"]),
            Some("exit") if e["group_exit"] == true => {
                let x = &lane["exit"];
                assert_eq!(x["code"], e["exit_code"], "exit of {id}");
                assert_eq!(x["signal"], e["signal"], "signal of {id}");
            }
            Some("fork") if e["thread"] == false => {
                let child = by_id[s(e, "child_exec_id").as_str()];
                let parent = child["parent"]
                    .as_u64()
                    .and_then(|p| usize::try_from(p).ok())
                    .expect("a forked lane's parent");
                assert_eq!(
                    lanes[parent]["id"], e["exec_id"],
                    "parent of {}",
                    child["id"]
                );
            }
            Some("syscall") => *syscalls.entry(id).or_default() += 1,
            _ => {}
        }
    }
    for (id, lane) in &by_id {
        let want = execs.remove(*id).unwrap_or_default();
        let got = lane["execs"].as_array().expect("execs");
        assert_eq!(got.len(), want.len(), "execs of {id}");
        for (g, w) in got.iter().zip(want) {
            let (g_argv, w_argv) = (
                g["argv"].as_array().expect("argv"),
                w.as_array().expect("argv"),
            );
            if g["cut"] == true {
                assert!(w_argv.starts_with(g_argv), "cut argv of {id}: a prefix");
            } else {
                assert_eq!(g_argv, w_argv, "argv of {id}");
            }
        }
        assert_eq!(
            lane["syscalls"].as_u64(),
            Some(syscalls.get(*id).copied().unwrap_or(0)),
            "syscalls of {id}"
        );
    }
}

/// The trace's shape: every event has ph, ts, pid, tid and name; one trace process per
/// lane; one slice per exec beyond the first of each process; one exit instant per exit.
fn check_trace(trace: &Value, evs: &[Value], lanes: usize) {
    let tev = trace["traceEvents"].as_array().expect("traceEvents");
    for e in tev {
        for k in ["ph", "ts", "pid", "tid", "name"] {
            assert!(!e[k].is_null(), "{k} in {e}");
        }
        assert!(e["ts"].as_f64().is_some_and(|t| t >= 0.0), "{e}");
    }
    let pids: BTreeSet<u64> = tev.iter().filter_map(|e| e["pid"].as_u64()).collect();
    assert_eq!(pids.len(), lanes, "one trace process per lane");
    let count = |ph: &str, cat: &str| {
        tev.iter()
            .filter(|e| e["ph"] == ph && e["cat"] == cat)
            .count()
    };
    let kind = |k: &str| evs.iter().filter(|e| e["event"] == k).count();
    let exits = evs
        .iter()
        .filter(|e| e["event"] == "exit" && e["group_exit"] == true)
        .count();
    assert_eq!(count("X", "process"), lanes + kind("exec"), "slices");
    assert_eq!(count("i", "exit"), exits, "exit instants");
    for e in tev.iter().filter(|e| e["ph"] == "X") {
        assert!(e["dur"].as_f64().is_some_and(|d| d >= 0.0), "{e}");
    }
}

#[test]
fn timeline_of_the_workload_matches_its_events_and_renders() {
    ornament_tests::require_qemu_guest!();
    let Some(bin) = browser() else { return };
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("events.json");
    let page = dir.path().join("timeline.html");
    let trace = dir.path().join("trace.json");
    let timeout = GUEST_TIMEOUT_SECS.to_string();
    let path = |p: &Path| p.to_str().expect("utf-8").to_owned();
    let (out_s, page_s, trace_s) = (path(&out), path(&page), path(&trace));
    let began = std::time::Instant::now();
    let mut args = vec!["run"];
    args.extend(workload::json_events_args(&timeout, &out_s));
    args.extend(["--timeline", &page_s, "--trace", &trace_s, "--"]);
    args.extend(workload::COMMAND);
    let (r, rt) = ornament(&args);
    eprintln!("guest run: {:.1} s", began.elapsed().as_secs_f64());
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_nothing_left(&r, rt.path());
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .expect("dir")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left.len(), 3, "only the three outputs: {left:?}");
    let evs = events(&out);
    let html = std::fs::read_to_string(&page).expect("the page");
    let data = page_data(&html);
    check_page_against_events(&data, &evs);
    let lanes = data["lanes"].as_array().expect("lanes").len();
    assert!(
        r.stderr
            .contains(&format!("--timeline {page_s}: {lanes} processes")),
        "{}",
        r.stderr
    );
    // And against what the workload says it did: each child's exit code or signal.
    let f = facts(&r.stderr);
    for (pid, (code, sig)) in &f.exits {
        let lane = data["lanes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| l["pid"].as_i64() == Some(*pid))
            .unwrap_or_else(|| panic!("no lane of pid {pid}"));
        match sig {
            Some(sig) => assert_eq!(lane["exit"]["signal"].as_i64(), Some(*sig), "pid {pid}"),
            None => assert_eq!(lane["exit"]["code"].as_i64(), Some(*code), "pid {pid}"),
        }
    }
    assert!(
        data["syscalls"] == true,
        "the watched syscall shows as density"
    );
    let tr: Value = serde_json::from_str(&std::fs::read_to_string(&trace).expect("trace"))
        .expect("the trace is JSON");
    check_trace(&tr, &evs, lanes);
    // Exit 0 lanes and the failed ones (codes 1..) are on screen.
    check_in_browser(&bin, &page, lanes, 200, 50);
}

/// `n` processes: a tree of fan-out 4, each forked 1 ms after the previous one, exec'd
/// (one with hostile argv), making syscalls, and exiting with `i % 4` after 50 ms.
fn synthetic(n: usize) -> ornament_introspect::ornament::timeline::TimelineData {
    let mut t = Timeline::new(Some("synthetic".into()), None);
    let view = t.view();
    let id = |i: usize| format!("synthetic:{}:{}", 100 + i, i + 1);
    let pid = |i: usize| Some(i32::try_from(100 + i).expect("pid"));
    let head = |time: u64, i: usize| TaskHeader {
        time_ns: time,
        tgid: pid(i),
        pid: pid(i),
        comm: Some("worker".into()),
        exec_id: Some(id(i)),
        ..TaskHeader::default()
    };
    let mut deliver = |ev: Event| t.on_event(&ev, &mut Decision::new(false));
    for i in 1..n {
        let at = i as u64 * 1_000_000;
        deliver(Event::Fork(ForkEvent {
            task: head(at, (i - 1) / 4),
            child_pid: pid(i),
            child_tgid: pid(i),
            child_exec_id: Some(id(i)),
            ..ForkEvent::default()
        }));
        let argv = if i == 7 {
            vec![
                "</script><script>alert(1)</script>".to_owned(),
                "<img src=x onerror=alert(2)>".to_owned(),
            ]
        } else {
            vec!["worker".to_owned(), format!("--job={i}")]
        };
        deliver(Event::Exec(ExecEvent {
            task: head(at + 100_000, i),
            filename: Some("/usr/bin/worker".into()),
            argv,
            argv_truncated: false,
            cwd: Some("/srv".into()),
        }));
        for k in 0..(i % 7) as u64 {
            deliver(Event::Syscall(SyscallEvent {
                task: head(at + 200_000 + k * 3_000_000, i),
                nr: 0,
                ..SyscallEvent::default()
            }));
        }
        deliver(Event::Exit(ExitEvent {
            task: head(at + 50_000_000, i),
            exit_code: u8::try_from(i % 4).expect("code"),
            group_exit: true,
            ..ExitEvent::default()
        }));
    }
    view.snapshot()
}

#[test]
fn thousands_of_processes_render_in_the_browser() {
    let Some(bin) = browser() else { return };
    let dir = tempfile::tempdir().expect("tmp");
    let page = dir.path().join("synthetic.html");
    let data = synthetic(3000);
    let began = std::time::Instant::now();
    let html = render::page(&data, &page).expect("render");
    eprintln!(
        "rendered 3000 processes: {} kB in {:.3} s",
        html.len() / 1024,
        began.elapsed().as_secs_f64()
    );
    std::fs::write(&page, &html).expect("write");
    assert_eq!(
        page_data(&html)["lanes"].as_array().map(Vec::len),
        Some(3000)
    );
    let secs = check_in_browser(&bin, &page, 3000, 1000, 1000);
    let dom = load(&bin, &page, 1400, 900).dom;
    assert!(!dom.contains("<img"), "hostile argv became markup");
    assert!(secs < 30.0, "the browser took {secs:.1} s");
}

#[test]
fn a_timeline_in_a_missing_directory_is_refused_before_the_boot() {
    let (r, _rt) = ornament(&[
        "run",
        "--timeline",
        "/nonexistent-ornament-dir/t.html",
        "--",
        "true",
    ]);
    assert_ne!(r.code, Some(0), "{}", r.stderr);
    assert!(
        r.stderr.contains("--timeline /nonexistent-ornament-dir/t.html: the directory /nonexistent-ornament-dir does not exist"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("engine"), "it booted: {}", r.stderr);
}
