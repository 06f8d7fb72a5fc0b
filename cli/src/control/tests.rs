//! The control socket against synthetic guests: answers, budgets, clients, stale sockets.

use super::*;
use ornament_engine::{Gva, PhysMemory};
use ornament_introspect::profile::Profile;
use ornament_introspect::testing::{SynthConfig, SynthGuest, TaskSpec};
use std::io::Read;

const PROFILES: [&str; 2] = ["6.1.0-50-cloud-amd64", "6.12.117+deb12-cloud-amd64"];

fn profile(release: &str) -> Profile {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../profiles")
        .join(format!("{release}.json"));
    Profile::load(&path).expect("committed profile")
}

/// A synthetic guest with a small known process tree, and what `ps` must say.
struct World {
    g: SynthGuest,
    expected: Vec<Process>,
    tasks: Vec<Gva>,
}

fn process(task: Gva, spec: &TaskSpec, ppid: i32) -> Process {
    Process {
        pid: Some(spec.pid),
        tgid: Some(spec.tgid),
        ppid: Some(ppid),
        uid: Some(spec.creds[0]),
        gid: Some(spec.creds[1]),
        euid: Some(spec.creds[2]),
        egid: Some(spec.creds[3]),
        comm: Some(spec.comm.clone()),
        args: Some(spec.argv.clone()),
        args_truncated: false,
        exe: spec.exe_path.clone(),
        cwd: spec.cwd.clone(),
        kernel_thread: Some(spec.kernel_thread),
        task: hex(task),
    }
}

fn world(release: &str) -> World {
    let mut g = SynthGuest::new(profile(release), SynthConfig::default()).expect("guest");
    let mut expected = Vec::new();
    let mut tasks = Vec::new();
    let mut add = |g: &mut SynthGuest, spec: TaskSpec, ppid: i32| {
        let t = g.add_task(&spec).expect("task");
        expected.push(process(t, &spec, ppid));
        tasks.push(t);
        t
    };
    let init = add(
        &mut g,
        TaskSpec::user(1, "init", "/bin/busybox", &["/bin/busybox", "sh", "/init"]),
        0,
    );
    let kthreadd = add(&mut g, TaskSpec::kthread(2, "kthreadd"), 0);
    let mut kworker = TaskSpec::kthread(3, "kworker/0:0");
    kworker.parent = Some(kthreadd);
    add(&mut g, kworker, 2);
    let mut sh = TaskSpec::user(
        80,
        "sh",
        "/bin/busybox",
        &["sh", "-c", "x &", "two words", ""],
    );
    sh.parent = Some(init);
    let sh = add(&mut g, sh, 1);
    let mut sleep = TaskSpec::user(81, "sleep", "/bin/busybox", &["sleep", "1001"]);
    sleep.parent = Some(sh);
    sleep.creds = [1000, 1001, 1002, 1003];
    add(&mut g, sleep, 80);
    World { g, expected, tasks }
}

fn view_of(g: SynthGuest) -> GuestView {
    let regs = g.regs_kernel(0, Gva(0));
    GuestView {
        ram: Arc::new(g.phys.mem),
        control: Arc::default(),
        profile: Arc::new(g.profile),
        layout: g.layout,
        vcpus: 2,
        regs,
    }
}

fn ask(view: &GuestView, line: &str) -> Value {
    Value::Object(handle_request(view, line.as_bytes()))
}

fn ps(view: &GuestView) -> ProcessList {
    let v = ask(view, r#"{"cmd":"ps"}"#);
    assert_eq!(v["ok"], Value::Bool(true), "{v}");
    serde_json::from_value(v).expect("ps response")
}

#[test]
fn ps_lists_exactly_the_tasks_written() {
    for release in PROFILES {
        let w = world(release);
        let view = view_of(w.g);
        let list = ps(&view);
        assert_eq!(list.walk, "complete");
        assert_eq!(list.walk_at, None);
        assert_eq!(list.processes, w.expected, "{release}");
        // The id is echoed, the body is the same.
        let v = ask(&view, r#"{"cmd":"ps","id":[1,"x"]}"#);
        assert_eq!(v["id"], serde_json::json!([1, "x"]));
        assert_eq!(
            v["processes"][4]["args"],
            serde_json::json!(["sleep", "1001"])
        );
        assert_eq!(v["processes"][1]["args"], serde_json::json!([]));
        assert_eq!(v["processes"][1]["exe"], Value::Null);
    }
}

#[test]
fn ps_reads_through_init_top_pgt_when_cr3_is_gone() {
    let w = world(PROFILES[0]);
    // Copy the kernel's top-level table where init_top_pgt lives, then give a CR3
    // that maps nothing (the process it belonged to has exited).
    let pgt = w.g.profile.symbol("init_top_pgt").expect("sym");
    let mut table = vec![0u8; 4096];
    w.g.phys
        .mem
        .read_phys(w.g.root.table, &mut table)
        .expect("read");
    w.g.phys
        .mem
        .write_phys(w.g.layout.phys(pgt), &table)
        .expect("write");
    let mut view = view_of(w.g);
    view.regs.cr3 = 0x10_0000;
    let list = ps(&view);
    assert_eq!(list.walk, "complete");
    assert_eq!(list.processes, w.expected);
}

#[test]
fn hostile_task_lists_end_and_bad_fields_are_null() {
    let w = world(PROFILES[1]);
    let tasks_off = w.g.off("task_struct", "tasks").expect("off");
    let cred_off = w.g.off("task_struct", "cred").expect("off");
    let comm_off = w.g.off("task_struct", "comm").expect("off");
    // The sleeper's cred points into nowhere, the sh's comm is not NUL-terminated.
    w.g.write_u64(w.tasks[4].wrapping_add(cred_off), 0xffff_dead_0000_0000)
        .expect("w");
    w.g.write(w.tasks[3].wrapping_add(comm_off), &[b'A'; 16])
        .expect("w");
    // The sleeper's tasks.next points back at the sh: a cycle that misses the head.
    w.g.write_u64(
        w.tasks[4].wrapping_add(tasks_off),
        w.tasks[3].wrapping_add(tasks_off).raw(),
    )
    .expect("w");
    let view = view_of(w.g);
    let list = ps(&view);
    assert_eq!(list.walk, "cycle");
    assert_eq!(list.processes.len(), 5);
    let sleeper = &list.processes[4];
    assert_eq!((sleeper.uid, sleeper.gid, sleeper.euid), (None, None, None));
    assert_eq!(sleeper.pid, Some(81));
    assert_eq!(list.processes[3].comm.as_deref(), Some("AAAAAAAAAAAAAAAA"));
}

#[test]
fn budgets_bound_the_answer() {
    let mut w = world(PROFILES[0]);
    let long = "x".repeat(1000);
    let spec = TaskSpec::user(90, "long", "/bin/long", &["long", &long]);
    let t = w.g.add_task(&spec).expect("task");
    let mut want = process(t, &spec, 0);
    w.expected.push(want.clone());
    let view = view_of(w.g);
    let all = process_list_bounded(&view, 100, 1 << 20).expect("ps");
    assert_eq!(all.processes, w.expected);
    let three = process_list_bounded(&view, 3, 1 << 20).expect("ps");
    assert_eq!(three.walk, "budget_exhausted");
    assert_eq!(three.processes, w.expected[..3]);
    // Past the string budget, command lines are cut short (and say so).
    let short = process_list_bounded(&view, 100, 10).expect("ps");
    assert_eq!(short.walk, "complete");
    assert_eq!(short.processes[..5], w.expected[..5]);
    let cut = usize::try_from(PS_SHORT_LIMITS.max_argv_bytes).expect("small") - "long".len() - 1;
    want.args = Some(vec!["long".into(), "x".repeat(cut)]);
    want.args_truncated = true;
    assert_eq!(short.processes[5], want);
}

#[test]
fn info_and_errors() {
    let view = view_of(world(PROFILES[0]).g);
    let v = ask(&view, r#"{"cmd":"info"}"#);
    let info: Info = serde_json::from_value(v.clone()).expect("info");
    assert_eq!(v["ok"], Value::Bool(true));
    assert_eq!(info.release, "6.1.0-50-cloud-amd64");
    assert_eq!(info.protocol, PROTOCOL_VERSION);
    assert_eq!(info.vcpus, 2);
    assert_eq!(info.layout.virt_slide, "0x1e000000");
    assert_eq!(info.layout.phys_slide, "0x2000000");
    assert!(info
        .banner
        .is_some_and(|b| b.starts_with("Linux version 6.1.0-50-cloud-amd64")));
    for (line, error) in [
        (
            r#"{"cmd":"reboot"}"#,
            "unknown command \"reboot\" (known: info, ps, pause, resume, status)",
        ),
        (r#"{"cmd":1}"#, "bad request: `cmd` must be a string"),
        (r#"{"id":3}"#, "bad request: no `cmd`"),
        (r#"["ps"]"#, "bad request: expected a JSON object"),
    ] {
        let v = ask(&view, line);
        assert_eq!(v["ok"], Value::Bool(false), "{line}");
        assert_eq!(v["error"], Value::String(error.into()), "{line}");
    }
    let v = ask(&view, "not json");
    assert_eq!(v["ok"], Value::Bool(false));
    assert!(v["error"]
        .as_str()
        .is_some_and(|e| e.starts_with("bad request: ")));
    assert_eq!(ask(&view, r#"{"id":3}"#)["id"], 3);
}

fn read_response(r: &mut impl BufRead) -> Value {
    let mut line = String::new();
    r.read_line(&mut line).expect("read");
    serde_json::from_str(&line).expect("json line")
}

#[test]
fn socket_serves_many_requests_and_clients_and_cleans_up() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("ctl");
    let view = Arc::new(view_of(world(PROFILES[0]).g));
    let server = serve(&path, view.clone()).expect("serve");
    assert_eq!(
        std::fs::metadata(&path)
            .expect("socket")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert!(matches!(
        serve(&path, view.clone()).map_err(|e| e.downcast::<ControlError>()),
        Err(Ok(ControlError::InUse { .. }))
    ));
    let mut a = UnixStream::connect(&path).expect("a");
    let mut b = UnixStream::connect(&path).expect("b");
    a.write_all(b"{\"cmd\":\"info\"}\n\n{\"cmd\":\"ps\"}\n{bad\n{\"cmd\":\"ps\",")
        .expect("write");
    b.write_all(b"{\"cmd\":\"ps\"}\n").expect("write");
    let mut ra = BufReader::new(a.try_clone().expect("clone"));
    let mut rb = BufReader::new(b.try_clone().expect("clone"));
    assert_eq!(read_response(&mut rb)["processes"][0]["pid"], 1);
    assert_eq!(read_response(&mut ra)["release"], "6.1.0-50-cloud-amd64");
    assert_eq!(read_response(&mut ra)["walk"], "complete");
    assert_eq!(read_response(&mut ra)["ok"], false);
    a.write_all(b"\"id\":9}\n").expect("write");
    let v = read_response(&mut ra);
    assert_eq!(
        (v["ok"].clone(), v["id"].clone()),
        (Value::Bool(true), 9.into())
    );
    // A line over the cap: an error, then the connection is closed.
    let mut c = UnixStream::connect(&path).expect("c");
    let _ = c.write_all(&vec![b' '; MAX_REQUEST_BYTES + 10]);
    let mut rc = BufReader::new(c);
    let v = read_response(&mut rc);
    assert_eq!(v["ok"], false);
    let mut rest = Vec::new();
    assert_eq!(rc.read_to_end(&mut rest).map(|n| n == 0).ok(), Some(true));
    // Dropping the server closes the connections and removes the socket.
    drop(server);
    assert!(!path.exists());
    let mut rest = String::new();
    assert_eq!(ra.read_to_string(&mut rest).ok(), Some(0));
}

#[test]
fn too_many_clients_are_told_so() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("ctl");
    let view = Arc::new(view_of(world(PROFILES[1]).g));
    let _server = serve(&path, view).expect("serve");
    let mut clients = Vec::new();
    for _ in 0..MAX_CLIENTS {
        let mut s = UnixStream::connect(&path).expect("connect");
        s.write_all(b"{\"cmd\":\"info\"}\n").expect("write");
        let mut r = BufReader::new(s.try_clone().expect("clone"));
        assert_eq!(read_response(&mut r)["ok"], true);
        clients.push(s);
    }
    let extra = UnixStream::connect(&path).expect("connect");
    let v = read_response(&mut BufReader::new(extra));
    assert_eq!(v["error"], "too many clients (at most 16)");
    // Once one leaves, a new one is served.
    drop(clients.pop());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut s = UnixStream::connect(&path).expect("connect");
        let _ = s.write_all(b"{\"cmd\":\"info\"}\n");
        if read_response(&mut BufReader::new(s))["ok"] == true {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no slot freed");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn stale_sockets_are_replaced_and_other_files_kept() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("ctl");
    drop(UnixListener::bind(&path).expect("stale"));
    assert!(path.exists());
    let view = Arc::new(view_of(world(PROFILES[0]).g));
    let server = serve(&path, view.clone()).expect("serve over a stale socket");
    drop(server);
    std::fs::write(&path, b"keep me").expect("file");
    let err = serve(&path, view).expect_err("not a socket");
    assert!(err.to_string().contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read(&path).expect("kept"), b"keep me");
}
